//! Files of a sandbox, moved by the host without the agent: the sandbox's root is reached
//! through its init's `/proc/<pid>/root` and every path goes through
//! [`upstream_sandbox::hostfs`] — resolved inside the root so that no link leads out, opened
//! as `O_PATH` first and used only if it is a regular file or directory of the sandbox's own
//! filesystems (never its `/proc`, `/sys` or devices, never a FIFO), with the sandbox's ids
//! (`setfsuid`, whose loss of capabilities also makes the host obey the sandbox's
//! permissions). Bodies stream both ways: memory stays flat whatever the size.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use utoipa::{IntoParams, ToSchema};

use upstream_sandbox::HostRoot;
use upstream_sandbox::hostfs::{self, NewFile, Reach, as_owner, split};

use crate::auth::Tenant;
use crate::daemon::{Daemon, Live};
use crate::error::{ApiError, ErrorBody};

/// Which file.
#[derive(Debug, Deserialize, IntoParams)]
pub struct FileQuery {
    /// Absolute, or relative to the sandbox's workdir.
    pub path: String,
    /// For delete: remove a directory with everything in it.
    #[serde(default)]
    pub recursive: bool,
    /// For download: bytes to skip.
    pub offset: Option<u64>,
}

/// A file written.
#[derive(Debug, Serialize, ToSchema)]
pub struct Written {
    pub path: String,
    pub size: u64,
}

/// An entry of a directory.
#[derive(Debug, Serialize, ToSchema)]
pub struct Entry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    /// Unix time in seconds.
    pub modified: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Listing {
    pub path: String,
    pub entries: Vec<Entry>,
}

/// The path inside the sandbox: absolute as given, or under the workdir.
fn full_path(live: &Live, path: &str) -> Result<String, ApiError> {
    if path.is_empty() || path.contains('\0') {
        return Err(ApiError::bad_request(
            "`path` is empty; name a file of the sandbox",
        ));
    }
    Ok(if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", live.prepared.workdir.trim_end_matches('/'))
    })
}

/// The sandbox's root and whom its files belong to (the image's user, else its root).
async fn root_of(live: &Arc<Live>) -> Result<(HostRoot, (u32, u32)), ApiError> {
    let root = live.with(|sandbox| Ok(sandbox.host_root()?)).await?;
    let (uid, gid) = live.user.as_ref().map_or((0, 0), |u| (u.uid, u.gid));
    let owner = (root.uid + uid, root.gid + gid);
    Ok((root, owner))
}

fn file_error(path: &str, e: io::Error) -> ApiError {
    if let Some(refused) = hostfs::refusal(&e) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "not_a_file",
            format!("{path}: {refused}, with POST /v1/sandboxes/{{id}}/exec"),
        );
    }
    match e.raw_os_error() {
        Some(libc::ENOENT) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{path} does not exist in the sandbox"),
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{path}: permission denied in the sandbox"),
        ),
        Some(libc::EISDIR) => ApiError::bad_request(format!(
            "{path} is a directory; list it with GET /v1/sandboxes/{{id}}/files/list"
        )),
        Some(libc::ENOTDIR) => {
            ApiError::bad_request(format!("{path}: a part of the path is not a directory"))
        }
        Some(libc::ELOOP) => ApiError::bad_request(format!(
            "{path} is a symbolic link (or leads through too many); files are not written \
             through links: name the file it points to"
        )),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "no_space",
            format!("{path}: no space left"),
        ),
        // Paths the request names that the kernel turns down: the request's to fix.
        Some(libc::ENAMETOOLONG) => ApiError::bad_request(format!(
            "a name in the path is too long (at most 255 bytes, 4096 in all): {}",
            path.chars().take(80).collect::<String>()
        )),
        Some(libc::EXDEV) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{path} is on a filesystem the files API does not reach; use exec"),
        ),
        Some(libc::EROFS) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{path} is on a read-only filesystem of the sandbox"),
        ),
        Some(libc::EINVAL) | Some(libc::EEXIST) | Some(libc::ENOTEMPTY) | Some(libc::EBUSY) => {
            ApiError::bad_request(format!("{path}: {e}"))
        }
        _ => ApiError::internal(format!("{path}: {e}")),
    }
}

/// Write a file (made with its parent directories, replaced if it exists) from the raw
/// request body: all or nothing — until the whole body is written the file is as it was,
/// and an upload that fails (no space left, the body broken off) leaves nothing of itself.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Written), (status = 404, body = ErrorBody)))]
pub async fn upload(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
    Query(query): Query<FileQuery>,
    body: Body,
) -> Result<(StatusCode, Json<Written>), ApiError> {
    let live = daemon.get(&tenant.0, &id)?;
    let path = full_path(&live, &query.path)?;
    let (root, owner) = root_of(&live).await?;
    let target = path.clone();
    // Written beside its name and put in place whole: a failed upload (the disk full, the
    // client gone mid-body) leaves the file as it was and nothing of the new one.
    let new = live
        .blocking(move || {
            let dir = as_owner(owner.0, owner.1, || {
                let (parent, _) = split(&target);
                hostfs::make_dir_all(root.dir.as_fd(), parent, Reach::InRoot(&root.own))
            })?;
            NewFile::create(dir.as_fd(), split(&target).1, 0o644, owner)
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| file_error(&path, e))?;
    let written = new
        .file()
        .try_clone()
        .map_err(|e| ApiError::internal(format!("{path}: {e}")))?;
    let mut file = tokio::fs::File::from_std(written);
    let mut stream = body.into_data_stream();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("the upload of {path} broke off: {e}")))?;
        size += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| file_error(&path, e))?;
    }
    file.flush().await.map_err(|e| file_error(&path, e))?;
    drop(file);
    live.blocking(move || new.commit())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| file_error(&path, e))?;
    Ok((StatusCode::CREATED, Json(Written { path, size })))
}

/// Streams a file of the sandbox from `offset` on.
pub async fn download(live: &Arc<Live>, path: &str, offset: u64) -> Result<Response, ApiError> {
    let path = full_path(live, path)?;
    let (root, owner) = root_of(live).await?;
    let target = path.clone();
    let (file, size) = live
        .blocking(move || {
            as_owner(owner.0, owner.1, || -> io::Result<(std::fs::File, u64)> {
                let (file, st) =
                    hostfs::open_file(root.dir.as_fd(), &target, Reach::InRoot(&root.own))?;
                Ok((file, st.st_size as u64))
            })
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| file_error(&path, e))?;
    let mut file = tokio::fs::File::from_std(file);
    if offset > 0 {
        use tokio::io::AsyncSeekExt;
        file.seek(io::SeekFrom::Start(offset))
            .await
            .map_err(|e| file_error(&path, e))?;
    }
    // What the file held when opened, however it grows meanwhile: the length sent is the
    // length promised.
    let length = size.saturating_sub(offset);
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(length), 256 << 10);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Read a file, as raw bytes.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path), FileQuery),
    responses(
        (status = 200, content_type = "application/octet-stream", description = "the bytes"),
        (status = 404, body = ErrorBody)))]
pub async fn get_file(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
    Query(query): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let live = daemon.get(&tenant.0, &id)?;
    download(&live, &query.path, query.offset.unwrap_or(0)).await
}

/// List a directory.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list", tag = "files",
    params(("id" = String, Path), FileQuery),
    responses((status = 200, body = Listing), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
    Query(query): Query<FileQuery>,
) -> Result<Json<Listing>, ApiError> {
    let live = daemon.get(&tenant.0, &id)?;
    let path = full_path(&live, &query.path)?;
    let (root, owner) = root_of(&live).await?;
    let target = path.clone();
    let entries = live
        .blocking(move || {
            as_owner(owner.0, owner.1, || -> io::Result<Vec<Entry>> {
                let fd = hostfs::open_dir(root.dir.as_fd(), &target, Reach::InRoot(&root.own))?;
                let mut dir = nix::dir::Dir::from_fd(fd).map_err(io::Error::from)?;
                let dir_fd = dir.as_fd().try_clone_to_owned()?;
                let mut entries = Vec::new();
                for entry in dir.iter() {
                    let entry = entry.map_err(io::Error::from)?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name == "." || name == ".." {
                        continue;
                    }
                    let Ok(st) = nix::sys::stat::fstatat(
                        &dir_fd,
                        entry.file_name(),
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    ) else {
                        continue;
                    };
                    let kind = match st.st_mode & libc::S_IFMT {
                        libc::S_IFREG => "file",
                        libc::S_IFDIR => "dir",
                        libc::S_IFLNK => "symlink",
                        _ => "other",
                    };
                    entries.push(Entry {
                        name,
                        kind: kind.into(),
                        size: st.st_size as u64,
                        mode: st.st_mode & 0o7777,
                        modified: st.st_mtime,
                    });
                }
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(entries)
            })
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTDIR) => ApiError::bad_request(format!(
                "{path} is not a directory; read it with GET /v1/sandboxes/{{id}}/files"
            )),
            _ => file_error(&path, e),
        })?;
    Ok(Json(Listing { path, entries }))
}

/// Delete a file, or a directory (empty, or with `recursive`).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path), FileQuery),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
    Query(query): Query<FileQuery>,
) -> Result<StatusCode, ApiError> {
    let live = daemon.get(&tenant.0, &id)?;
    let path = full_path(&live, &query.path)?;
    if split(&path).1.is_empty() {
        return Err(ApiError::bad_request(
            "the sandbox's root cannot be deleted",
        ));
    }
    let (root, owner) = root_of(&live).await?;
    let target = path.clone();
    let recursive = query.recursive;
    live.blocking(move || {
        as_owner(owner.0, owner.1, || -> io::Result<()> {
            let (parent, name) = split(&target);
            let dir = hostfs::open_dir(root.dir.as_fd(), parent, Reach::InRoot(&root.own))?;
            remove(dir.as_fd(), &hostfs::c_name(name)?, recursive)
        })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTEMPTY) => ApiError::conflict(format!(
            "{path} is a directory that is not empty; delete with `recursive=true`"
        )),
        _ => file_error(&path, e),
    })?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes `name` in `dir`, never following a link; directories' contents first when
/// `recursive`.
fn remove(dir: BorrowedFd<'_>, name: &std::ffi::CStr, recursive: bool) -> io::Result<()> {
    use nix::unistd::{UnlinkatFlags, unlinkat};
    if recursive {
        // Without recursion, however deep the sandbox nested its directories.
        return hostfs::remove_tree(dir, std::ffi::OsStr::from_bytes(name.to_bytes()));
    }
    let st = nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(io::Error::from)?;
    let flag = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        UnlinkatFlags::RemoveDir
    } else {
        UnlinkatFlags::NoRemoveDir
    };
    unlinkat(dir, name, flag).map_err(io::Error::from)
}

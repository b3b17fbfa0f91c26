//! Files of a sandbox, moved through its [`Files`]: every path is resolved inside the
//! sandbox's root so that no link leads out, and used only if it is a regular file or
//! directory of the sandbox's own filesystems (never its `/proc`, `/sys` or devices, never a
//! FIFO), as the sandbox's user the files belong to, so the sandbox's permissions hold (see
//! [`upstream_sandbox::files`]). Bodies stream both ways: memory stays flat whatever the
//! size.

use std::io::{self, Read, Write};
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use upstream_sandbox::Files;
use upstream_sandbox::files::{At, Create, DATA_CHUNK, Kind, Owner};
use upstream_sandbox::sandboxfs::{self, split};

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

/// The sandbox's files and whom they belong to (the image's user, else its root).
async fn files_of(live: &Arc<Live>) -> Result<(Arc<dyn Files>, Owner), ApiError> {
    let files = live.with(|sandbox| Ok(sandbox.files()?)).await?;
    let owner = live.user.as_ref().map_or((0, 0), |u| (u.uid, u.gid));
    Ok((files, owner))
}

/// Runs file work on a blocking thread of the sandbox's tenant.
async fn blocking<T: Send + 'static>(
    live: &Arc<Live>,
    path: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    live.blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| file_error(path, e))
}

fn file_error(path: &str, e: io::Error) -> ApiError {
    // The sandbox's agent answered outside the protocol (`AgentFiles`).
    if upstream_sandbox::files::is_out_of_protocol(&e) {
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            crate::error::AGENT_PROTOCOL,
            format!("{path}: {e}"),
        );
    }
    if let Some(refused) = sandboxfs::refusal(&e) {
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
    let (files, owner) = files_of(&live).await?;
    // Written beside its name and put in place whole: a failed upload (the disk full, the
    // client gone mid-body) leaves the file as it was and nothing of the new one. The body's
    // pieces go to a blocking thread that writes them, a few at a time.
    let (pieces, mut taken) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let target = At::Root(path.clone());
    let writing = blocking(&live, &path, move || {
        let mut new = files.create(&target, 0o644, Create::Atomic, owner)?;
        let mut size = 0u64;
        while let Some(piece) = taken.blocking_recv() {
            new.write_all(&piece)?;
            size += piece.len() as u64;
        }
        new.flush()?;
        Ok((new, size))
    });
    let sending = async {
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request(format!("the upload of {path} broke off: {e}"))
            })?;
            // The writer gone means its write failed: its error is the answer.
            if pieces.send(chunk).await.is_err() {
                break;
            }
        }
        drop(pieces);
        Ok::<(), ApiError>(())
    };
    let (written, sent) = tokio::join!(writing, sending);
    // A body broken off leaves the writer unfinished, and dropping it leaves nothing.
    let (new, size) = match (written, sent) {
        (Err(e), _) | (Ok(_), Err(e)) => return Err(e),
        (Ok(written), Ok(())) => written,
    };
    blocking(&live, &path, move || new.finish(None, None)).await?;
    Ok((StatusCode::CREATED, Json(Written { path, size })))
}

/// Streams a file of the sandbox from `offset` on.
pub async fn download(live: &Arc<Live>, path: &str, offset: u64) -> Result<Response, ApiError> {
    let path = full_path(live, path)?;
    let (files, owner) = files_of(live).await?;
    let target = At::Root(path.clone());
    let (reader, meta) = blocking(live, &path, move || {
        files.open(&target, offset, Some(owner))
    })
    .await?;
    // What the file held when opened, however it grows meanwhile: the length sent is the
    // length promised.
    let length = meta.size.saturating_sub(offset);
    let (pieces, taken) = tokio::sync::mpsc::channel::<io::Result<bytes::Bytes>>(4);
    let live = live.clone();
    let reading = async move {
        live.blocking(move || {
            let mut reader = reader;
            loop {
                let mut buf = vec![0u8; DATA_CHUNK];
                let piece = match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        Ok(bytes::Bytes::from(buf))
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => Err(e),
                };
                let failed = piece.is_err();
                // The client gone: reading on is for nothing.
                if pieces.blocking_send(piece).is_err() || failed {
                    return;
                }
            }
        })
        .await
    };
    tokio::spawn(reading);
    let stream = futures::stream::unfold(taken, |mut taken| async move {
        taken.recv().await.map(|piece| (piece, taken))
    });
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
    let (files, owner) = files_of(&live).await?;
    let target = At::Root(path.clone());
    let listed = live
        .blocking(move || files.list(&target, Some(owner)))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTDIR) => ApiError::bad_request(format!(
                "{path} is not a directory; read it with GET /v1/sandboxes/{{id}}/files"
            )),
            _ => file_error(&path, e),
        })?;
    let entries = listed
        .into_iter()
        .map(|(name, meta)| Entry {
            name,
            kind: match meta.kind {
                Kind::File => "file",
                Kind::Dir => "dir",
                Kind::Symlink => "symlink",
                _ => "other",
            }
            .into(),
            size: meta.size,
            mode: meta.mode,
            modified: meta.mtime_ns.div_euclid(1_000_000_000),
        })
        .collect();
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
    let (files, owner) = files_of(&live).await?;
    let target = At::Root(path.clone());
    let recursive = query.recursive;
    live.blocking(move || files.remove(&target, recursive, owner))
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

//! Unpacking image layers into a rootfs, so that nothing in a layer can touch anything
//! outside it.
//!
//! Layers are applied in order into one directory. Every path is resolved under the rootfs
//! with `openat2(RESOLVE_IN_ROOT)`: a symlink the image has (`/bin -> usr/bin`, or an
//! absolute one planted to point at the host's `/etc`) is followed as it would be inside the
//! sandbox, never out of the rootfs. The last component of a path is never followed: a file
//! is created with `O_EXCL | O_NOFOLLOW` after what was there is removed, a link or a device
//! is made in its parent directory. Names with `..` are refused outright, in entry paths and
//! in hardlink targets alike. Device nodes are skipped; whiteouts (`.wh.<name>`) remove what
//! lower layers had, opaque markers (`.wh..wh..opq`) empty a directory of it.
//!
//! What would act on the host rather than in the sandbox is not kept: set-uid and set-gid
//! bits on files, and extended attributes outside `user.*` (file capabilities, overlay
//! attributes). Inside the sandbox none of them could work anyway (`no_new_privs`).

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag};

/// How a layer's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression a layer media type names; `None` for a type that is not a layer.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// How files are owned once unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owners {
    /// As the layer says, shifted by this much (upstream as root: sandbox ids start at
    /// 100000 on the host). Ids a sandbox cannot have become its `nobody`.
    Shifted(u32),
    /// Whoever unpacks (an unprivileged upstream cannot give files away).
    Unpacker,
}

/// What a layer held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    pub entries: u64,
    pub file_bytes: u64,
    pub whiteouts: u64,
    /// Device nodes, which a rootfs does not get.
    pub devices_skipped: u64,
}

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("the layer tries to reach outside the image with `{path}`; it was refused")]
    Escape { path: String },
    #[error("the layer's entry `{path}`: {source}")]
    Entry { path: String, source: io::Error },
    #[error("the layer is not a readable tar archive: {0}")]
    Archive(io::Error),
}

/// The highest id a sandbox has; others become its `nobody`.
const MAX_SANDBOX_ID: u64 = 65_535;
const NOBODY: u64 = 65_534;

/// Unpacks one layer (a tar stream, compressed as said) onto the rootfs directory `root`.
pub fn unpack_layer(
    layer: impl Read,
    compression: Compression,
    root: &Path,
    owners: Owners,
) -> Result<Unpacked, UnpackError> {
    let root = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Entry {
        path: root.display().to_string(),
        source: e.into(),
    })?;
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(layer),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(layer)),
        Compression::Zstd => Box::new(zstd::Decoder::new(layer).map_err(UnpackError::Archive)?),
    };
    let mut archive = tar::Archive::new(reader);
    let mut unpacker = Unpacker {
        root: root.as_fd(),
        owners,
        created: HashSet::new(),
        dirs: Vec::new(),
        stats: Unpacked::default(),
    };
    for entry in archive.entries().map_err(UnpackError::Archive)? {
        let mut entry = entry.map_err(UnpackError::Archive)?;
        unpacker.entry(&mut entry)?;
    }
    unpacker.finish()
}

/// A path inside the rootfs, made of plain names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Inside(Vec<OsString>);

impl Inside {
    /// Reads a path from a layer: leading `/` and `./` are dropped, `..` is refused.
    fn new(raw: &[u8]) -> Result<Inside, UnpackError> {
        let mut parts = Vec::new();
        for part in raw.split(|&b| b == b'/') {
            match part {
                b"" | b"." => {}
                b".." => {
                    return Err(UnpackError::Escape {
                        path: String::from_utf8_lossy(raw).into_owned(),
                    });
                }
                name => parts.push(OsString::from_vec(name.to_vec())),
            }
        }
        Ok(Inside(parts))
    }

    fn display(&self) -> String {
        let joined: Vec<String> = self
            .0
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        format!("/{}", joined.join("/"))
    }

    fn split(&self) -> Option<(Inside, &OsStr)> {
        let (name, parent) = self.0.split_last()?;
        Some((Inside(parent.to_vec()), name.as_os_str()))
    }

    fn join(&self, name: &OsStr) -> Inside {
        let mut parts = self.0.clone();
        parts.push(name.to_os_string());
        Inside(parts)
    }

    fn as_path(&self) -> PathBuf {
        let mut path = PathBuf::from("/");
        for p in &self.0 {
            path.push(p);
        }
        path
    }
}

struct Unpacker<'r> {
    root: BorrowedFd<'r>,
    owners: Owners,
    /// What this layer made, which its own opaque markers must leave alone.
    created: HashSet<Inside>,
    /// Directories whose mode and time are set last, once nothing more goes inside.
    dirs: Vec<(Inside, u32, i64)>,
    stats: Unpacked,
}

fn io_err(e: nix::Error) -> io::Error {
    e.into()
}

impl Unpacker<'_> {
    /// A directory of the rootfs, made if missing; symlinks on the way are followed inside
    /// the rootfs only.
    fn dir(&self, path: &Inside) -> io::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        match openat2(self.root, &path.as_path(), how) {
            Ok(fd) => Ok(fd),
            Err(nix::errno::Errno::ENOENT) => {
                let Some((parent, name)) = path.split() else {
                    return Err(io::ErrorKind::NotFound.into());
                };
                let parent_fd = self.dir(&parent)?;
                match nix::sys::stat::mkdirat(&parent_fd, name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                openat2(self.root, &path.as_path(), how).map_err(io_err)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let path = Inside::new(&raw)?;
        let fail = |source: io::Error| UnpackError::Entry {
            path: path.display(),
            source,
        };
        self.stats.entries += 1;
        let Some((parent, name)) = path.split() else {
            // The rootfs itself: only its mode and time.
            let header = entry.header();
            let mode = header.mode().map_err(fail)?;
            let mtime = header.mtime().unwrap_or(0) as i64;
            self.dirs.push((path.clone(), mode, mtime));
            return Ok(());
        };
        let name_bytes = name.as_bytes();
        if name_bytes == b".wh..wh..opq" {
            self.stats.whiteouts += 1;
            return self.make_opaque(&parent).map_err(fail);
        }
        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            // `.wh..` would remove the directory the whiteout is in, `.wh...` its parent.
            if hidden == b"." || hidden == b".." {
                return Err(UnpackError::Escape {
                    path: path.display(),
                });
            }
            self.stats.whiteouts += 1;
            let dir = match self.dir(&parent) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(fail(e)),
            };
            return remove(&dir, OsStr::from_bytes(hidden)).map_err(fail);
        }
        let dir = self.dir(&parent).map_err(fail)?;
        let header = entry.header().clone();
        let mode = header.mode().map_err(fail)? & 0o7777;
        let mtime = header.mtime().unwrap_or(0) as i64;
        let owner = self.owner(&header);
        match header.entry_type() {
            tar::EntryType::Directory => {
                match nix::sys::stat::fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                {
                    Ok(st) if is(st.st_mode, SFlag::S_IFDIR) => {}
                    Ok(_) => {
                        remove(&dir, name).map_err(fail)?;
                        mkdir(&dir, name).map_err(fail)?;
                    }
                    Err(nix::errno::Errno::ENOENT) => mkdir(&dir, name).map_err(fail)?,
                    Err(e) => return Err(fail(e.into())),
                }
                if let Some((uid, gid)) = owner {
                    chown_at(&dir, name, uid, gid).map_err(fail)?;
                }
                self.set_xattrs_at(&dir, name, entry);
                self.dirs.push((path.clone(), mode, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove(&dir, name).map_err(fail)?;
                let how = OpenHow::new()
                    .flags(
                        OFlag::O_WRONLY
                            | OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                    )
                    .mode(Mode::from_bits_truncate(0o600))
                    .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
                let fd = openat2(&dir, name, how).map_err(|e| fail(e.into()))?;
                let mut file = File::from(fd);
                let copied = io::copy(entry, &mut file).map_err(fail)?;
                self.stats.file_bytes += copied;
                if let Some((uid, gid)) = owner {
                    nix::unistd::fchown(&file, Some(uid.into()), Some(gid.into()))
                        .map_err(|e| fail(e.into()))?;
                }
                // Set-id bits are dropped: a sandbox runs with no_new_privs, where they
                // mean nothing, and on the host they would make the image's programs run
                // as the ids that own the cached image.
                nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(mode & !0o6000))
                    .map_err(|e| fail(e.into()))?;
                self.set_xattrs(&file, entry);
                set_mtime(&dir, name, mtime).map_err(fail)?;
            }
            tar::EntryType::Symlink => {
                let target = header
                    .link_name_bytes()
                    .ok_or_else(|| fail(io::Error::other("a symlink without a target")))?;
                remove(&dir, name).map_err(fail)?;
                let target = OsStr::from_bytes(&target);
                nix::unistd::symlinkat(target, &dir, name).map_err(|e| fail(e.into()))?;
                if let Some((uid, gid)) = owner {
                    chown_at(&dir, name, uid, gid).map_err(fail)?;
                }
                set_mtime(&dir, name, mtime).map_err(fail)?;
            }
            tar::EntryType::Link => {
                let target = header
                    .link_name_bytes()
                    .ok_or_else(|| fail(io::Error::other("a hardlink without a target")))?;
                let target = Inside::new(&target)?;
                let Some((target_parent, target_name)) = target.split() else {
                    return Err(fail(io::Error::other("a hardlink to the root")));
                };
                let from = self.dir(&target_parent).map_err(fail)?;
                remove(&dir, name).map_err(fail)?;
                // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
                nix::unistd::linkat(&from, target_name, &dir, name, nix::fcntl::AtFlags::empty())
                    .map_err(|e| fail(e.into()))?;
            }
            tar::EntryType::Fifo => {
                remove(&dir, name).map_err(fail)?;
                nix::sys::stat::mknodat(
                    &dir,
                    name,
                    SFlag::S_IFIFO,
                    Mode::from_bits_truncate(mode),
                    0,
                )
                .map_err(|e| fail(e.into()))?;
                if let Some((uid, gid)) = owner {
                    chown_at(&dir, name, uid, gid).map_err(fail)?;
                }
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                self.stats.devices_skipped += 1;
                return Ok(());
            }
            // Metadata entries (PAX, GNU long names) are folded into the entries they
            // describe by the tar reader.
            _ => return Ok(()),
        }
        self.created.insert(path);
        Ok(())
    }

    /// Empties directory `path` of what lower layers put there.
    fn make_opaque(&mut self, path: &Inside) -> io::Result<()> {
        let dir = self.dir(path)?;
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH);
        let listing = openat2(&dir, ".", how).map_err(io_err)?;
        let mut names = Vec::new();
        for entry in nix::dir::Dir::from_fd(listing).map_err(io_err)?.iter() {
            let entry = entry.map_err(io_err)?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsString::from_vec(name.to_vec()));
            }
        }
        for name in names {
            if !self.created.contains(&path.join(&name)) {
                remove(&dir, &name)?;
            }
        }
        Ok(())
    }

    fn owner(&self, header: &tar::Header) -> Option<(u32, u32)> {
        let Owners::Shifted(base) = self.owners else {
            return None;
        };
        let shift = |id: u64| {
            let id = if id > MAX_SANDBOX_ID { NOBODY } else { id };
            base + id as u32
        };
        Some((
            shift(header.uid().unwrap_or(0)),
            shift(header.gid().unwrap_or(0)),
        ))
    }

    fn set_xattrs<R: Read>(&self, file: &File, entry: &mut tar::Entry<'_, R>) {
        apply_xattrs(file, &xattrs(entry));
    }

    fn set_xattrs_at<R: Read>(&self, dir: &OwnedFd, name: &OsStr, entry: &mut tar::Entry<'_, R>) {
        let attrs = xattrs(entry);
        if attrs.is_empty() {
            return;
        }
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        if let Ok(fd) = openat2(dir, name, how) {
            apply_xattrs(&File::from(fd), &attrs);
        }
    }

    /// Directory modes and times, deepest first, once everything is in place.
    fn finish(mut self) -> Result<Unpacked, UnpackError> {
        self.dirs
            .sort_by_key(|(p, _, _)| std::cmp::Reverse(p.0.len()));
        for (path, mode, mtime) in std::mem::take(&mut self.dirs) {
            let fail = |source: io::Error| UnpackError::Entry {
                path: path.display(),
                source,
            };
            let how = OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            let fd = match openat2(self.root, &path.as_path(), how) {
                Ok(fd) => fd,
                // Removed by a later whiteout in the same layer.
                Err(nix::errno::Errno::ENOENT) => continue,
                Err(e) => return Err(fail(e.into())),
            };
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode))
                .map_err(|e| fail(e.into()))?;
            let times = [
                nix::sys::time::TimeSpec::UTIME_OMIT,
                nix::sys::time::TimeSpec::new(mtime, 0),
            ];
            nix::sys::stat::futimens(&fd, &times[0], &times[1]).map_err(|e| fail(e.into()))?;
        }
        Ok(self.stats)
    }
}

/// Sets extended attributes on an open file; a filesystem or a namespace that refuses one
/// (`security.*`, `trusted.*` unprivileged) is not an error.
fn apply_xattrs(file: &File, attrs: &[(CString, Vec<u8>)]) {
    for (name, value) in attrs {
        // SAFETY: fsetxattr on a descriptor the caller holds, with a valid C string and a
        // buffer of the length given.
        unsafe {
            libc::fsetxattr(
                file.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            );
        }
    }
}

/// The extended attributes an entry carries (PAX `SCHILY.xattr.*`), of the `user.*`
/// namespace only: the host applies them as root, and `security.capability` would give a
/// program capabilities on the host, `trusted.overlay.*` would steer the overlay the rootfs
/// is a layer of.
fn xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Vec<(CString, Vec<u8>)> {
    let Ok(Some(extensions)) = entry.pax_extensions() else {
        return Vec::new();
    };
    extensions
        .filter_map(Result::ok)
        .filter_map(|ext| {
            let key = ext.key_bytes().strip_prefix(b"SCHILY.xattr.")?;
            if !key.starts_with(b"user.") {
                return None;
            }
            Some((CString::new(key).ok()?, ext.value_bytes().to_vec()))
        })
        .collect()
}

fn is(mode: u32, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(mode) & SFlag::S_IFMT == kind
}

fn mkdir(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o755)).map_err(io_err)
}

fn chown_at(dir: &OwnedFd, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    nix::unistd::fchownat(
        dir,
        name,
        Some(uid.into()),
        Some(gid.into()),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(io_err)
}

fn set_mtime(dir: &OwnedFd, name: &OsStr, mtime: i64) -> io::Result<()> {
    use nix::sys::time::TimeSpec;
    nix::sys::stat::utimensat(
        dir,
        name,
        &TimeSpec::UTIME_OMIT,
        &TimeSpec::new(mtime, 0),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io_err)
}

/// Removes `name` from `dir`, a whole directory tree included, following no link.
fn remove(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let st = match nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !is(st.st_mode, SFlag::S_IFDIR) {
        return nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(io_err);
    }
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let sub = openat2(dir, name, how).map_err(io_err)?;
    let listing = openat2(&sub, ".", how).map_err(io_err)?;
    let mut names = Vec::new();
    for entry in nix::dir::Dir::from_fd(listing).map_err(io_err)?.iter() {
        let entry = entry.map_err(io_err)?;
        let child = entry.file_name().to_bytes();
        if child != b"." && child != b".." {
            names.push(OsString::from_vec(child.to_vec()));
        }
    }
    for child in names {
        remove(&sub, &child)?;
    }
    nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::RemoveDir).map_err(io_err)
}

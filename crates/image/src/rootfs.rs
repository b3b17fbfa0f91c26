//! Reading an image's own files (its `/etc/passwd`, `/etc/group`) on the host, as the image
//! itself would see them and no other way.
//!
//! Whatever the image made of the path, the host reads only a regular file of the image: the
//! path is resolved under the rootfs with `openat2(RESOLVE_IN_ROOT)`, so a symlink (absolute
//! or full of `..`) is followed as it would be inside the sandbox and never to the host's
//! files; the open does not block (`O_NONBLOCK`: a FIFO cannot hang the reading thread); the
//! type is checked on the descriptor that was opened (a FIFO, a socket, a device or a
//! directory is refused); and no more than a cap is read, whatever the file's size says.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::Path;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag};

/// The most of an image's `/etc/passwd` or `/etc/group` that is read (1 MiB: a table of
/// some ten thousand users).
pub const MAX_TABLE_BYTES: u64 = 1 << 20;

/// Why a file of the image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    #[error("the image's {path} is {kind}; upstream reads it only as a regular file")]
    NotRegular { path: String, kind: &'static str },
    #[error("the image's {path} is larger than {limit} bytes, more than upstream reads")]
    TooLarge { path: String, limit: u64 },
    #[error("the image's {path} cannot be read: {source}")]
    Io { path: String, source: io::Error },
}

/// The bytes of `path` (relative to the image's root, e.g. `etc/passwd`) in the rootfs
/// directory `rootfs`, at most `limit` of them; `None` if the image has no such file.
pub fn read_file(rootfs: &Path, path: &str, limit: u64) -> Result<Option<Vec<u8>>, ImageFileError> {
    let shown = format!("/{}", path.trim_start_matches('/'));
    let fail = |source: io::Error| ImageFileError::Io {
        path: shown.clone(),
        source,
    };
    let root = nix::fcntl::open(
        rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail(e.into()))?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_IN_ROOT
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    let fd = match openat2(root.as_fd(), path.trim_start_matches('/'), how) {
        Ok(fd) => fd,
        // Missing, or a link to nothing inside the image.
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => return Ok(None),
        Err(e) => return Err(fail(e.into())),
    };
    let st = nix::sys::stat::fstat(&fd).map_err(|e| fail(e.into()))?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if kind != SFlag::S_IFREG {
        let kind = match kind {
            SFlag::S_IFDIR => "a directory",
            SFlag::S_IFIFO => "a FIFO",
            SFlag::S_IFSOCK => "a socket",
            SFlag::S_IFCHR => "a character device",
            SFlag::S_IFBLK => "a block device",
            _ => "not a regular file",
        };
        return Err(ImageFileError::NotRegular { path: shown, kind });
    }
    let too_large = || ImageFileError::TooLarge {
        path: shown.clone(),
        limit,
    };
    if u64::try_from(st.st_size).unwrap_or(u64::MAX) > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(Some(bytes))
}

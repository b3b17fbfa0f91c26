//! Stores are private to their owner: what upstream creates for one (the store's directory,
//! its subdirectories, the database and its `-wal` and `-shm` files, blobs, temporary files,
//! the lock) is made 0700 for directories and 0600 for files, set explicitly at creation so
//! that no umask loosens it. A store made world-readable by an older upstream is tightened
//! when it is opened: its own directory and everything in it, never the directory it sits
//! in (a user's project).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};

/// The mode of every directory upstream makes for a store or its state.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file upstream makes in a store.
pub const FILE_MODE: u32 = 0o600;

/// How deep a store's own tree goes (`blobs/ab/<blob>`, `tmp/3/<temp>`), with room.
const MAX_DEPTH: usize = 4;

/// Makes directory `path` private to its owner: a missing one is created 0700 (and so is
/// any missing parent), whatever the umask; an existing one loses group and other access.
/// Parents that exist are left as they are.
pub fn make_private_dir(path: &Path) -> io::Result<()> {
    let dir = create_dirs(path)?;
    tighten_dir(&dir)?;
    Ok(())
}

/// Creates `path` and any missing parent 0700 and opens it (following a link the user put
/// there: the path is theirs to choose).
pub(crate) fn create_dirs(path: &Path) -> io::Result<OwnedFd> {
    match nix::unistd::mkdir(path, Mode::from_bits_truncate(DIR_MODE)) {
        Ok(()) => {
            let dir = open_dir(path)?;
            nix::sys::stat::fchmod(&dir, Mode::from_bits_truncate(DIR_MODE))?;
            return Ok(dir);
        }
        Err(Errno::EEXIST) => return open_dir(path),
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => drop(create_dirs(parent)?),
        None => return Err(Errno::ENOENT.into()),
    }
    create_dirs(path)
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// Takes group and other access from directory `dir`; returns whether it had any. A
/// directory of someone else's is left alone (only its owner may change it).
fn tighten_dir(dir: &impl AsFd) -> io::Result<bool> {
    let st = nix::sys::stat::fstat(dir)?;
    let mode = st.st_mode & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(false);
    }
    match nix::sys::stat::fchmod(dir, Mode::from_bits_truncate(mode & 0o700)) {
        Ok(()) => Ok(true),
        Err(Errno::EPERM) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Opens (creating it if missing) the store's directory `path`, private: a store whose
/// directory others could enter was made by an older upstream, so everything in it is
/// tightened too.
pub(crate) fn store_dir(path: &Path) -> io::Result<OwnedFd> {
    let dir = create_dirs(path)?;
    if tighten_dir(&dir)? {
        tighten_tree(&dir, 0)?;
    }
    Ok(dir)
}

/// Takes group and other access from everything below `dir`, following no link; a FIFO,
/// socket or device is not opened.
fn tighten_tree(dir: &OwnedFd, depth: usize) -> io::Result<()> {
    let mut entries = nix::dir::Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let names: Vec<std::ffi::CString> = entries
        .iter()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    for name in names {
        let Ok(st) = nix::sys::stat::fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        else {
            continue;
        };
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        let flags = match kind {
            SFlag::S_IFDIR => OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            SFlag::S_IFREG if st.st_mode & 0o077 != 0 => OFlag::O_RDONLY | OFlag::O_NONBLOCK,
            _ => continue,
        };
        let fd = match nix::fcntl::openat(
            dir,
            name.as_c_str(),
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            // Gone, swapped for a link, or not the owner's to open: nothing to tighten.
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR | Errno::EACCES) => continue,
            Err(e) => return Err(e.into()),
        };
        let st = nix::sys::stat::fstat(&fd)?;
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        match kind {
            SFlag::S_IFDIR => {
                tighten_dir(&fd)?;
                if depth < MAX_DEPTH {
                    tighten_tree(&fd, depth + 1)?;
                }
            }
            SFlag::S_IFREG => {
                match nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(st.st_mode & 0o700)) {
                    Ok(()) | Err(Errno::EPERM) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Creates file `path` 0600 (never through a link), or opens the one there as it is.
pub(crate) fn open_file(path: &Path) -> io::Result<File> {
    match create_file(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path),
        other => other,
    }
}

/// Creates new file `path` 0600, whatever the umask; fails if anything is there.
pub(crate) fn create_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

//! Files of a sandbox moved by the host — uploads, downloads, artifacts, `/context` —
//! confined to the sandbox's own filesystems.
//!
//! The host does this work as root on the sandbox's behalf, and everything it meets there is
//! the sandbox's to choose: names, links, FIFOs, device nodes, and mount points such as the
//! sandbox's `/proc`. A write to `/proc/sys/kernel/core_pattern` through the sandbox's root
//! would be a write by host root to the host's kernel settings, because procfs checks the
//! writer's credentials and namespaces, not the file's; an open of a FIFO would wait for ever
//! for a writer the sandbox never sends. So every path here
//!
//! - resolves with `openat2` inside the sandbox's root (`RESOLVE_IN_ROOT`, no magic links:
//!   every link leads back inside), or beneath a directory opened so (`RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`: no link at all, no other mount);
//! - is opened first with `O_PATH`, which runs no driver's open and never waits on a FIFO;
//! - is used only if, on that descriptor, it is a regular file or a directory on one of the
//!   sandbox's own filesystems — its overlay root and workspace, and the tmpfs it mounts
//!   (`/tmp`, `/run`, `/dev`, `/dev/shm`) — never procfs, sysfs, devpts, cgroupfs, a
//!   device, a socket, a FIFO or a host directory bound in (resolved beneath a directory,
//!   it cannot leave that directory's mount, so the directory's own check covers it);
//! - and only then is opened for reading or writing, through that same descriptor, so what
//!   was checked is what is used.
//!
//! The work runs with the thread's filesystem ids set to the sandbox's ([`as_owner`]), so the
//! host obeys the sandbox's permissions and what it creates belongs to the sandbox.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};
use nix::sys::statfs::{FsType, fstatfs};

/// How a path is resolved from the directory it starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// From the sandbox's root: absolute paths and links (the last name's too) lead back
    /// inside it, and it may cross into the sandbox's other mounts (`/tmp`, the workspace).
    InRoot,
    /// Below a directory already opened: no link at all, no other mount, nothing above it.
    Beneath,
}

impl Reach {
    fn flags(self) -> ResolveFlag {
        match self {
            Reach::InRoot => ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            Reach::Beneath => {
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_XDEV
            }
        }
    }
}

/// Why the host will not touch an entry of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// What the entry is: `a FIFO`, `on procfs`, …
    pub what: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "it is {}; upstream moves only regular files, directories and symlinks of the \
             sandbox's own filesystems (read or change anything else with a command in the \
             sandbox)",
            self.what
        )
    }
}

impl std::error::Error for Refused {}

fn refused(what: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        Refused { what: what.into() },
    )
}

/// The refusal inside an error from this module, if that is what it is.
pub fn refusal(e: &io::Error) -> Option<&Refused> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Refused>())
}

/// Filesystems a sandbox makes for itself: its overlay root and workspace, and tmpfs.
const OWN: &[FsType] = &[
    nix::sys::statfs::OVERLAYFS_SUPER_MAGIC,
    nix::sys::statfs::TMPFS_MAGIC,
];

fn fs_name(kind: FsType) -> String {
    use nix::sys::statfs as s;
    let known = [
        (s::PROC_SUPER_MAGIC, "procfs"),
        (s::SYSFS_MAGIC, "sysfs"),
        (s::DEVPTS_SUPER_MAGIC, "devpts"),
        (s::CGROUP_SUPER_MAGIC, "cgroupfs"),
        (s::CGROUP2_SUPER_MAGIC, "cgroupfs"),
        (s::DEBUGFS_MAGIC, "debugfs"),
        (s::SECURITYFS_MAGIC, "securityfs"),
        (s::BPF_FS_MAGIC, "bpffs"),
        (s::TRACEFS_MAGIC, "tracefs"),
        (s::NSFS_MAGIC, "nsfs"),
    ];
    match known.iter().find(|(magic, _)| *magic == kind) {
        Some((_, name)) => format!("on {name}"),
        None => "on a filesystem the sandbox did not make (a host directory bound in)".into(),
    }
}

/// Checks that `fd` is on one of the sandbox's own filesystems.
pub fn check_fs(fd: BorrowedFd<'_>) -> io::Result<()> {
    let kind = fstatfs(fd).map_err(io::Error::from)?.filesystem_type();
    if OWN.contains(&kind) {
        Ok(())
    } else {
        Err(refused(fs_name(kind)))
    }
}

/// What kind of entry `st` is, in words: `a FIFO`, `a socket`, `a directory`, …
pub fn kind_name(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFDIR => "a directory",
        _ => "a regular file",
    }
}

/// What an entry must be to be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    File,
    Dir,
}

fn path_handle(at: BorrowedFd<'_>, path: &OsStr, reach: Reach) -> io::Result<OwnedFd> {
    let follow = match reach {
        Reach::InRoot => OFlag::empty(),
        Reach::Beneath => OFlag::O_NOFOLLOW,
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | follow)
        .resolve(reach.flags());
    openat2(at, path, how).map_err(io::Error::from)
}

/// Checks an `O_PATH` descriptor: the right kind and, reached from the root, on the
/// sandbox's own filesystems.
fn check(handle: &OwnedFd, want: Want, reach: Reach) -> io::Result<FileStat> {
    let st = fstat(handle).map_err(io::Error::from)?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    match (want, kind) {
        (Want::File, SFlag::S_IFREG) | (Want::Dir, SFlag::S_IFDIR) => {}
        (Want::File, SFlag::S_IFDIR) => return Err(Errno::EISDIR.into()),
        (Want::Dir, SFlag::S_IFREG) => return Err(Errno::ENOTDIR.into()),
        // A last name that is a link, where links are not followed.
        (_, SFlag::S_IFLNK) => return Err(Errno::ELOOP.into()),
        _ => return Err(refused(kind_name(&st))),
    }
    if reach == Reach::InRoot {
        check_fs(handle.as_fd())?;
    }
    Ok(st)
}

/// Opens what an `O_PATH` descriptor names, for I/O. Going through `/proc/self/fd` reaches
/// the very inode the descriptor holds, whatever has been renamed meanwhile.
fn reopen(handle: &OwnedFd, flags: OFlag) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let fd = nix::fcntl::open(
        path.as_str(),
        flags | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(io::Error::from)?;
    // The descriptor may be a regular file only now: a last look costs one fstat.
    let st = fstat(&fd).map_err(io::Error::from)?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if kind != SFlag::S_IFREG && kind != SFlag::S_IFDIR {
        return Err(refused(kind_name(&st)));
    }
    Ok(fd)
}

/// Opens directory `path` (a name as a directory holds it, in any bytes), which must be one
/// of the sandbox's own.
pub fn open_dir(at: BorrowedFd<'_>, path: impl AsRef<OsStr>, reach: Reach) -> io::Result<OwnedFd> {
    let path = path.as_ref();
    let path = if path.is_empty() {
        OsStr::new(".")
    } else {
        path
    };
    let handle = path_handle(at, path, reach)?;
    check(&handle, Want::Dir, reach)?;
    reopen(&handle, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
}

/// Opens directory `path`, making what is missing of it (mode 0755, as the thread's
/// filesystem ids).
pub fn make_dir_all(at: BorrowedFd<'_>, path: &str, reach: Reach) -> io::Result<OwnedFd> {
    match open_dir(at, path, reach) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    let components: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let mut dir = open_dir(at, if reach == Reach::InRoot { "/" } else { "." }, reach)?;
    let mut prefix = String::new();
    for name in components {
        if name == ".." {
            return Err(Errno::EINVAL.into());
        }
        match nix::sys::stat::mkdirat(&dir, name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        dir = match reach {
            // From the root again, checked again: the path may cross into another of the
            // sandbox's mounts (`/tmp`), and a link put there leads back inside.
            Reach::InRoot => {
                prefix.push('/');
                prefix.push_str(name);
                open_dir(at, &prefix, Reach::InRoot)?
            }
            // One name below a checked directory: a link put there is refused, not followed.
            Reach::Beneath => open_dir(dir.as_fd(), name, Reach::Beneath)?,
        };
    }
    Ok(dir)
}

/// A regular file of the sandbox, open for reading, and what it was when opened.
pub fn open_file(
    at: BorrowedFd<'_>,
    path: impl AsRef<OsStr>,
    reach: Reach,
) -> io::Result<(File, FileStat)> {
    let handle = path_handle(at, path.as_ref(), reach)?;
    let st = check(&handle, Want::File, reach)?;
    let fd = reopen(&handle, OFlag::O_RDONLY)?;
    Ok((File::from(fd), st))
}

/// How [`create_file`] treats a file already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Empty it and write over it (a link or anything but a regular file is refused).
    Truncate,
    /// Remove it (a file or a link, never a directory) and make a new one.
    Replace,
}

/// Creates regular file `name` in `dir` with `mode`, open for writing. `dir` is one of the
/// sandbox's, opened by [`open_dir`] (which checked its filesystem).
pub fn create_file(
    dir: BorrowedFd<'_>,
    name: &str,
    mode: u32,
    existing: Existing,
) -> io::Result<File> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(Errno::EINVAL.into());
    }
    // Twice at most: a name made between the look and the create is looked at again.
    for _ in 0..2 {
        match path_handle(dir, OsStr::new(name), Reach::Beneath) {
            Ok(handle) => match existing {
                Existing::Truncate => {
                    check(&handle, Want::File, Reach::Beneath)?;
                    let fd = reopen(&handle, OFlag::O_WRONLY | OFlag::O_TRUNC)?;
                    return Ok(File::from(fd));
                }
                Existing::Replace => {
                    match nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
                    {
                        Ok(()) | Err(Errno::ENOENT) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            },
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            // The name is a link (RESOLVE_NO_SYMLINKS): replace it, or refuse to write through it.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => match existing {
                Existing::Truncate => return Err(e),
                Existing::Replace => {
                    nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)?;
                }
            },
            Err(e) => return Err(e),
        }
        let how = OpenHow::new()
            .flags(
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_NONBLOCK
                    | OFlag::O_NOCTTY
                    | OFlag::O_CLOEXEC,
            )
            .mode(Mode::from_bits_truncate(mode))
            .resolve(Reach::Beneath.flags());
        match openat2(dir, name, how) {
            Ok(fd) => return Ok(File::from(fd)),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Errno::EEXIST.into())
}

/// Splits an absolute path of the sandbox into its parent directory and last name (`("/",
/// "")` for the root itself).
pub fn split(path: &str) -> (&str, &str) {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/", name),
        Some((parent, name)) => (parent, name),
        None => ("/", trimmed),
    }
}

/// A C string of a name, for the calls that take one.
pub fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| Errno::EINVAL.into())
}

/// Runs `f` with the calling thread's filesystem ids set to `uid` and `gid` — what the files
/// it creates belong to, and whose permissions the kernel checks (a non-zero fsuid also
/// leaves the thread without its file capabilities) — and puts them back after, even if `f`
/// panics, so no later work on a reused thread runs with a sandbox's ids.
pub fn as_owner<T>(uid: u32, gid: u32, f: impl FnOnce() -> T) -> T {
    struct Restore {
        uid: u32,
        gid: u32,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: setfsgid and setfsuid change only the calling thread's filesystem ids;
            // they touch no memory.
            unsafe {
                libc::setfsgid(self.gid);
                libc::setfsuid(self.uid);
            }
        }
    }
    // SAFETY: as above. Each returns the id it replaces.
    let (old_uid, old_gid) = unsafe { (libc::setfsuid(uid), libc::setfsgid(gid)) };
    let _restore = Restore {
        uid: old_uid as u32,
        gid: old_gid as u32,
    };
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::symlink;

    /// A directory on tmpfs, as a sandbox's `/tmp` is: `/dev/shm` is one on every Linux.
    fn shm_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("upstream-hostfs-")
            .tempdir_in("/dev/shm")
            .expect("a directory in /dev/shm")
    }

    fn open_root(dir: &std::path::Path) -> OwnedFd {
        nix::fcntl::open(dir, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()).unwrap()
    }

    #[test]
    fn a_regular_file_on_tmpfs_is_read_and_written() {
        let tmp = shm_dir();
        std::fs::write(tmp.path().join("a.txt"), b"hello").unwrap();
        let root = open_root(tmp.path());
        let (mut file, st) = open_file(root.as_fd(), "/a.txt", Reach::InRoot).unwrap();
        let mut text = String::new();
        file.read_to_string(&mut text).unwrap();
        assert_eq!((text.as_str(), st.st_size), ("hello", 5));

        let dir = make_dir_all(root.as_fd(), "/x/y", Reach::InRoot).unwrap();
        make_dir_all(dir.as_fd(), "p/q", Reach::Beneath).unwrap();
        assert!(tmp.path().join("x/y/p/q").is_dir());
        let mut out = create_file(dir.as_fd(), "b", 0o600, Existing::Truncate).unwrap();
        out.write_all(b"new").unwrap();
        assert_eq!(std::fs::read(tmp.path().join("x/y/b")).unwrap(), b"new");
        let mut out = create_file(dir.as_fd(), "b", 0o600, Existing::Truncate).unwrap();
        out.write_all(b"2").unwrap();
        assert_eq!(std::fs::read(tmp.path().join("x/y/b")).unwrap(), b"2");
    }

    #[test]
    fn a_fifo_is_refused_without_waiting() {
        let tmp = shm_dir();
        let fifo = tmp.path().join("pipe");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o666)).unwrap();
        let root = open_root(tmp.path());
        let started = std::time::Instant::now();
        let e = open_file(root.as_fd(), "/pipe", Reach::InRoot).unwrap_err();
        assert_eq!(refusal(&e).map(|r| r.what.as_str()), Some("a FIFO"), "{e}");
        let dir = open_dir(root.as_fd(), "/", Reach::InRoot).unwrap();
        let e = create_file(dir.as_fd(), "pipe", 0o644, Existing::Truncate).unwrap_err();
        assert_eq!(refusal(&e).map(|r| r.what.as_str()), Some("a FIFO"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // Replacing removes the FIFO and makes a file in its place.
        create_file(dir.as_fd(), "pipe", 0o644, Existing::Replace).unwrap();
        assert!(std::fs::metadata(&fifo).unwrap().is_file());
    }

    #[test]
    fn procfs_is_refused_and_tmpfs_is_not() {
        // The host's /proc stands in for a sandbox's: reached from a root whose /proc is a
        // procfs mount.
        let root = open_root(std::path::Path::new("/"));
        let e = open_file(root.as_fd(), "/proc/sys/kernel/hostname", Reach::InRoot).unwrap_err();
        assert_eq!(
            refusal(&e).map(|r| r.what.as_str()),
            Some("on procfs"),
            "{e}"
        );
        let e = open_dir(root.as_fd(), "/proc/sys/kernel", Reach::InRoot).unwrap_err();
        assert_eq!(
            refusal(&e).map(|r| r.what.as_str()),
            Some("on procfs"),
            "{e}"
        );
        let e = open_dir(root.as_fd(), "/sys/kernel", Reach::InRoot).unwrap_err();
        assert_eq!(
            refusal(&e).map(|r| r.what.as_str()),
            Some("on sysfs"),
            "{e}"
        );
        let e = open_file(root.as_fd(), "/dev/null", Reach::InRoot).unwrap_err();
        assert!(refusal(&e).is_some(), "{e}");
        // Positive control: the same root reaches a file on tmpfs.
        let tmp = shm_dir();
        std::fs::write(tmp.path().join("f"), b"x").unwrap();
        let inside = format!("{}/f", tmp.path().display());
        open_file(root.as_fd(), &inside, Reach::InRoot).unwrap();
    }

    #[test]
    fn links_are_not_followed_out() {
        let tmp = shm_dir();
        let outside = shm_dir();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        symlink(outside.path().join("secret"), tmp.path().join("abs")).unwrap();
        symlink("../../../../etc/passwd", tmp.path().join("rel")).unwrap();
        let root = open_root(tmp.path());
        // In the root, an absolute link leads back into the root (where there is no such
        // file); beneath a directory, no link is followed at all.
        let e = open_file(root.as_fd(), "/abs", Reach::InRoot).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        let e = open_file(root.as_fd(), "abs", Reach::Beneath).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        let e = open_file(root.as_fd(), "rel", Reach::Beneath).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        let dir = open_dir(root.as_fd(), "/", Reach::InRoot).unwrap();
        let e = create_file(dir.as_fd(), "abs", 0o644, Existing::Truncate).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"s");
    }

    #[test]
    fn the_owner_is_put_back_after_a_panic() {
        let before = unsafe_current_fsuid();
        let result = std::panic::catch_unwind(|| as_owner(12345, 12345, || panic!("boom")));
        assert!(result.is_err());
        assert_eq!(unsafe_current_fsuid(), before);
        if nix::unistd::geteuid().is_root() {
            assert_eq!(as_owner(54321, 54321, unsafe_current_fsuid), 54321);
            assert_eq!(unsafe_current_fsuid(), before);
        }
    }

    /// The calling thread's fsuid: `setfsuid(-1)` fails and returns it unchanged.
    fn unsafe_current_fsuid() -> u32 {
        // SAFETY: an invalid id changes nothing and returns the current one.
        unsafe { libc::setfsuid(u32::MAX) as u32 }
    }
}

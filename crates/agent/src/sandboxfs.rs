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
//!   (`/tmp`, `/run`, `/dev`, `/dev/shm`), known by mount ([`OwnMounts`]) — never procfs,
//!   sysfs, devpts, cgroupfs, a device, a socket, a FIFO or a host directory bound in, even
//!   one that is itself an overlay (resolved beneath a directory, a path cannot leave that
//!   directory's mount, so the directory's own check covers it);
//! - and only then is opened for reading or writing, through that same descriptor, so what
//!   was checked is what is used.
//!
//! The work runs with the thread's filesystem ids set to the sandbox's ([`as_owner`]), so the
//! host obeys the sandbox's permissions and what it creates belongs to the sandbox; trees are
//! removed without recursion ([`remove_tree`]), since a sandbox can nest directories deeper
//! than any stack.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};
use nix::sys::statfs::{FsType, fstatfs};

/// The sandbox's own filesystems: what a path resolved from its root may land on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnMounts {
    /// Seen from the host: the overlay and tmpfs mounts of the sandbox's mount table whose
    /// superblocks the host's mount table does not have — so a directory of the host bound
    /// in is never one of them, even where the host's `/etc` is itself an overlay (upstream
    /// in a container).
    Listed(Vec<u64>),
    /// Seen from inside, by the agent: every mount of a filesystem that holds files (an
    /// overlay, tmpfs, a disk's ext4 or erofs), none of the kernel's own (procfs, sysfs,
    /// devpts, cgroupfs, …). What the agent reaches it may reach anyway; what this keeps
    /// is that files move the same way through the agent as through the host.
    Inside,
}

impl Default for OwnMounts {
    fn default() -> OwnMounts {
        OwnMounts::Listed(Vec::new())
    }
}

impl OwnMounts {
    /// Reads the sandbox's mount table at `sandbox` (`/proc/<pid>/mountinfo` of a process in
    /// it) and the host's (this process's).
    pub fn read(sandbox: &std::path::Path) -> io::Result<OwnMounts> {
        let sandbox = std::fs::read_to_string(sandbox)?;
        let host = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(OwnMounts::from_tables(&sandbox, &host))
    }

    /// The mounts of `sandbox` (a mountinfo table) that are overlay or tmpfs and whose
    /// device no mount of `host` has.
    pub fn from_tables(sandbox: &str, host: &str) -> OwnMounts {
        // id, device, filesystem type of each line.
        fn rows(table: &str) -> impl Iterator<Item = (u64, &str, &str)> {
            table.lines().filter_map(|line| {
                let (mount, fs) = line.split_once(" - ")?;
                let mut fields = mount.split(' ');
                let id = fields.next()?.parse().ok()?;
                let device = fields.nth(1)?;
                Some((id, device, fs.split(' ').next()?))
            })
        }
        let host: std::collections::HashSet<&str> = rows(host).map(|(_, dev, _)| dev).collect();
        let ids = rows(sandbox)
            .filter(|(_, dev, fs)| matches!(*fs, "overlay" | "tmpfs") && !host.contains(dev))
            .map(|(id, _, _)| id)
            .collect();
        OwnMounts::Listed(ids)
    }

    /// Whether `fd`, on a filesystem of type `kind`, is on one of these mounts.
    fn holds(&self, fd: BorrowedFd<'_>, kind: FsType) -> io::Result<bool> {
        match self {
            OwnMounts::Listed(ids) => Ok(OWN.contains(&kind) && ids.contains(&mount_id(fd)?)),
            OwnMounts::Inside => Ok(OWN.contains(&kind) || HOLDS_FILES.contains(&kind)),
        }
    }
}

/// The id of the mount `fd` is on.
fn mount_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: an all-zero statx is a valid value of the plain C struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the call's length, the path is an empty C string and `st`
    // is writable memory of the size statx writes.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            &mut st,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this kernel does not say which mount a file is on (statx STATX_MNT_ID, Linux 5.8)",
        ));
    }
    Ok(st.stx_mnt_id)
}

/// How a path is resolved from the directory it starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach<'a> {
    /// From the sandbox's root: absolute paths and links (the last name's too) lead back
    /// inside it, and it may cross into the sandbox's other mounts (`/tmp`, the workspace),
    /// which must be among its own.
    InRoot(&'a OwnMounts),
    /// Below a directory already opened: no link at all, no other mount, nothing above it.
    Beneath,
}

impl Reach<'_> {
    fn flags(self) -> ResolveFlag {
        match self {
            Reach::InRoot(_) => ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS,
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
    /// The path it was reached by, when the refusal names it.
    pub at: Option<String>,
}

impl Refused {
    /// The same refusal, naming the path the entry was reached by.
    pub fn at(&self, path: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            Refused {
                what: self.what.clone(),
                at: Some(path.to_string()),
            },
        )
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.at {
            Some(path) => write!(f, "{path} is ")?,
            None => write!(f, "it is ")?,
        }
        write!(
            f,
            "{}; upstream moves only regular files, directories and symlinks of the \
             sandbox's own filesystems (read or change anything else with a command in the \
             sandbox)",
            self.what
        )
    }
}

impl std::error::Error for Refused {}

pub fn refused(what: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        Refused {
            what: what.into(),
            at: None,
        },
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

/// Filesystems of disks that a VM's sandbox holds its files on.
const HOLDS_FILES: &[FsType] = &[
    nix::sys::statfs::EXT4_SUPER_MAGIC,
    FsType(EROFS_SUPER_MAGIC),
    nix::sys::statfs::XFS_SUPER_MAGIC,
    nix::sys::statfs::BTRFS_SUPER_MAGIC,
];

/// erofs, which `nix` does not name.
const EROFS_SUPER_MAGIC: libc::c_long = 0xe0f5_e1e2;

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

/// Checks that `fd` is on one of the sandbox's own filesystems, `own`.
pub fn check_fs(fd: BorrowedFd<'_>, own: &OwnMounts) -> io::Result<()> {
    let kind = fstatfs(fd).map_err(io::Error::from)?.filesystem_type();
    if own.holds(fd, kind)? {
        Ok(())
    } else if OWN.contains(&kind) {
        Err(refused(
            "on a filesystem the sandbox did not make (a host directory bound in)",
        ))
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
pub(crate) enum Want {
    File,
    Dir,
}

pub(crate) fn path_handle(
    at: BorrowedFd<'_>,
    path: &OsStr,
    reach: Reach<'_>,
) -> io::Result<OwnedFd> {
    let follow = match reach {
        Reach::InRoot(_) => OFlag::empty(),
        Reach::Beneath => OFlag::O_NOFOLLOW,
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | follow)
        .resolve(reach.flags());
    openat2(at, path, how).map_err(io::Error::from)
}

/// Checks an `O_PATH` descriptor: the right kind and, reached from the root, on the
/// sandbox's own filesystems.
pub(crate) fn check(handle: &OwnedFd, want: Want, reach: Reach<'_>) -> io::Result<FileStat> {
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
    if let Reach::InRoot(own) = reach {
        check_fs(handle.as_fd(), own)?;
    }
    Ok(st)
}

/// Opens what an `O_PATH` descriptor names, for I/O. Going through `/proc/self/fd` reaches
/// the very inode the descriptor holds, whatever has been renamed meanwhile.
pub(crate) fn reopen(handle: &OwnedFd, flags: OFlag) -> io::Result<OwnedFd> {
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
pub fn make_dir_all(at: BorrowedFd<'_>, path: &str, reach: Reach<'_>) -> io::Result<OwnedFd> {
    match open_dir(at, path, reach) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    let components: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let start = match reach {
        Reach::InRoot(_) => "/",
        Reach::Beneath => ".",
    };
    let mut dir = open_dir(at, start, reach)?;
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
            Reach::InRoot(_) => {
                prefix.push('/');
                prefix.push_str(name);
                open_dir(at, &prefix, reach)?
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
    reach: Reach<'_>,
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
    // Where nothing is in the way (the most often, and all a replace needs to know), the
    // create alone does it.
    if existing == Existing::Replace {
        match create_new(dir, name, mode) {
            Ok(fd) => return Ok(File::from(fd)),
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
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
        match create_new(dir, name, mode) {
            Ok(fd) => return Ok(File::from(fd)),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Errno::EEXIST.into())
}

/// A regular file being made in place of `name` in a directory of the sandbox, all or
/// nothing: it is written under a temporary name beside `name` and put in its place by
/// [`NewFile::commit`] in one rename, so a reader sees the old file or the whole new one,
/// never part of it; dropped before that (a write failed, the disk filled, the client went
/// away), the temporary is removed and nothing of it stays. Every step on names runs as the
/// sandbox's ids given ([`as_owner`]), so the sandbox's permissions hold.
#[derive(Debug)]
pub struct NewFile {
    dir: OwnedFd,
    temp: CString,
    name: CString,
    file: File,
    owner: (u32, u32),
    done: bool,
}

/// Temporary names made by this process so far, so that no two are the same.
static TEMPORARIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl NewFile {
    /// Starts a new file to be `name` in `dir` (one of the sandbox's, opened by
    /// [`open_dir`] or [`make_dir_all`]), with `mode`, or the permission bits of the
    /// regular file it will replace. What is there already must be a regular file, or
    /// nothing: a link is refused (`ELOOP`; files are not written through links), a
    /// directory is `EISDIR`, anything else a [`refusal`].
    pub fn create(
        dir: BorrowedFd<'_>,
        name: &str,
        mode: u32,
        owner: (u32, u32),
    ) -> io::Result<NewFile> {
        NewFile::make(dir, name, mode, owner, Existing::Truncate)
    }

    /// Like [`NewFile::create`], but whatever is at `name` but a directory — a file, a
    /// link, a FIFO — is replaced (the link itself, never what it points to), and the file
    /// gets `mode` whatever was there.
    pub fn replacing(
        dir: BorrowedFd<'_>,
        name: &str,
        mode: u32,
        owner: (u32, u32),
    ) -> io::Result<NewFile> {
        NewFile::make(dir, name, mode, owner, Existing::Replace)
    }

    fn make(
        dir: BorrowedFd<'_>,
        name: &str,
        mode: u32,
        owner: (u32, u32),
        existing: Existing,
    ) -> io::Result<NewFile> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Errno::EINVAL.into());
        }
        let target = c_name(name)?;
        as_owner(owner.0, owner.1, || {
            let mode = match (existing, path_handle(dir, OsStr::new(name), Reach::Beneath)) {
                (Existing::Truncate, Ok(handle)) => {
                    check(&handle, Want::File, Reach::Beneath)?.st_mode & 0o777
                }
                (Existing::Truncate, Err(e)) if e.raw_os_error() != Some(libc::ENOENT) => {
                    return Err(e);
                }
                _ => mode,
            };
            let dir = nix::unistd::dup(dir).map_err(io::Error::from)?;
            for _ in 0..8 {
                let n = TEMPORARIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let temp = format!(".upstream-new-{:x}-{n:x}-{nanos:x}", std::process::id());
                match create_new(&dir, temp.as_str(), mode) {
                    Ok(fd) => {
                        // The umask may have taken bits the file is to have.
                        nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode))
                            .map_err(io::Error::from)?;
                        return Ok(NewFile {
                            dir,
                            temp: c_name(&temp)?,
                            name: target,
                            file: File::from(fd),
                            owner,
                            done: false,
                        });
                    }
                    // A name the sandbox took meanwhile: another.
                    Err(Errno::EEXIST) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(Errno::EEXIST.into())
        })
    }

    /// The file, open for writing.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Puts the file in place of its name, replacing what is there in one step.
    pub fn commit(mut self) -> io::Result<()> {
        let (uid, gid) = self.owner;
        let renamed = as_owner(uid, gid, || {
            nix::fcntl::renameat(
                &self.dir,
                self.temp.as_c_str(),
                &self.dir,
                self.name.as_c_str(),
            )
        });
        renamed.map_err(io::Error::from)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (uid, gid) = self.owner;
        // Never a directory: the sandbox may have put one at the name meanwhile.
        let _ = as_owner(uid, gid, || {
            nix::unistd::unlinkat(
                &self.dir,
                self.temp.as_c_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            )
        });
    }
}

/// Removes `name` in `dir` and, if it is a directory, everything below it — without
/// recursion and with three descriptors at most, whatever the tree's depth (a sandbox can
/// nest directories far deeper than any stack), never following a link and never leaving
/// `dir`'s mount. A directory whose entries are in the way is emptied by moving them up into
/// the tree's top directory, so each entry climbs at most its own depth. Directories that
/// cannot be entered or changed (a sandbox's mode 000, overlayfs's work directory) are opened
/// up first, where the caller may.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    use nix::unistd::{UnlinkatFlags, unlinkat};
    let st = nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
        return Ok(unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?);
    }
    let top = open_opening_up(dir, name)?;
    let mut moved = 0u64;
    loop {
        let names = entries(top.as_fd())?;
        if names.is_empty() {
            break;
        }
        for entry in names {
            let entry = entry.as_os_str();
            let unlink = |flag| opened_up(&[top.as_fd()], || unlinkat(&top, entry, flag));
            match unlink(UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => continue,
                Err(Errno::EISDIR) => {}
                Err(e) => return Err(e.into()),
            }
            match unlink(UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => continue,
                Err(Errno::ENOTEMPTY | Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            // Not empty: what it holds moves up here, and the next pass removes it.
            let sub = open_opening_up(top.as_fd(), entry)?;
            for child in entries(sub.as_fd())? {
                loop {
                    moved += 1;
                    let to = format!(".upstream-rm-{moved}");
                    let rename = || {
                        nix::fcntl::renameat2(
                            &sub,
                            child.as_os_str(),
                            &top,
                            to.as_str(),
                            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
                        )
                    };
                    // A directory that moves must itself be writable (its `..` changes).
                    let renamed = match opened_up(&[sub.as_fd(), top.as_fd()], rename) {
                        Err(Errno::EACCES) => {
                            open_up(sub.as_fd(), child.as_os_str())?;
                            rename()
                        }
                        other => other,
                    };
                    match renamed {
                        Ok(()) | Err(Errno::ENOENT) => break,
                        Err(Errno::EEXIST) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }
    drop(top);
    Ok(opened_up(&[dir], || {
        unlinkat(dir, name, UnlinkatFlags::RemoveDir)
    })?)
}

/// Runs `op`; if the directories it changes refuse it (a sandbox left them read-only),
/// makes them 0700 — which their owner, or root, may — and runs it once more.
fn opened_up(dirs: &[BorrowedFd<'_>], op: impl Fn() -> nix::Result<()>) -> nix::Result<()> {
    match op() {
        Err(Errno::EACCES) => {
            for dir in dirs {
                nix::sys::stat::fchmod(dir, Mode::from_bits_truncate(0o700))?;
            }
            op()
        }
        other => other,
    }
}

/// Removes the host path `path` and everything below it ([`remove_tree`]); a path that is
/// not there is removed already.
/// Whether the filesystem at `target` is full, or so nearly that a write failed for it: less
/// than 1% or 1 MiB free, whichever is larger.
pub fn is_full(target: &std::path::Path) -> bool {
    let Ok(target) = CString::new(target.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statvfs fills the zeroed struct from a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(target.as_ptr(), &mut st) } != 0 {
        return false;
    }
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let size = st.f_blocks.saturating_mul(st.f_frsize);
    free < (size / 100).max(1 << 20) || st.f_favail == 0
}

pub fn remove_all(path: &std::path::Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Errno::EINVAL.into());
    };
    let parent = if parent.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        parent
    };
    let parent = nix::fcntl::open(
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    match remove_tree(parent.as_fd(), name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Opens directory `name` below `dir`; one that may not be entered is made 0700 first (which
/// works for its owner, and for root).
fn open_opening_up(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    match open_dir(dir, name, Reach::Beneath) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && refusal(&e).is_none() => {}
        other => return other,
    }
    let handle = open_up(dir, name)?;
    reopen(&handle, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
}

/// Makes directory `name` below `dir` 0700 (never through a link: anything but a directory
/// is refused), and gives its `O_PATH` descriptor.
fn open_up(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    let handle = path_handle(dir, name, Reach::Beneath)?;
    check(&handle, Want::Dir, Reach::Beneath)?;
    // An O_PATH descriptor takes a mode change through its /proc/self/fd name, which leads
    // to the very inode it holds.
    let path = format!("/proc/self/fd/{}", handle.as_raw_fd());
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        path.as_str(),
        Mode::from_bits_truncate(0o700),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )?;
    Ok(handle)
}

/// The names in directory `dir`, as it holds them, from its beginning (read through a
/// descriptor of its own, so no earlier reading's offset counts).
fn entries(dir: BorrowedFd<'_>) -> io::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let mut listing = nix::dir::Dir::from_fd(open_dir(dir, ".", Reach::Beneath)?)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
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

/// Runs `f` with the calling thread's filesystem ids set to `uid` and `gid` and no
/// supplementary groups — what the files it creates belong to, and whose permissions the
/// kernel checks (a non-zero fsuid also leaves the thread without its file capabilities, and
/// root's own groups would still open files of group root) — and puts them back after, even
/// if `f` panics, so no later work on a reused thread runs with a sandbox's ids.
pub fn as_owner<T>(uid: u32, gid: u32, f: impl FnOnce() -> T) -> T {
    struct Restore {
        uid: u32,
        gid: u32,
        groups: Option<Vec<libc::gid_t>>,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(groups) = &self.groups {
                // SAFETY: the raw call changes the calling thread's groups only (the C
                // library's wrapper would change every thread's), from a valid slice.
                unsafe {
                    libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr());
                }
            }
            // SAFETY: setfsgid and setfsuid change only the calling thread's filesystem ids;
            // they touch no memory.
            unsafe {
                libc::setfsgid(self.gid);
                libc::setfsuid(self.uid);
            }
        }
    }
    // Dropped only where they can be put back (as root); a user's own groups are theirs.
    let groups = nix::unistd::getgroups().ok().and_then(|groups| {
        let groups: Vec<libc::gid_t> = groups.into_iter().map(|g| g.as_raw()).collect();
        // SAFETY: as above, with no groups.
        let rc =
            unsafe { libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) };
        (rc == 0).then_some(groups)
    });
    // SAFETY: as above. Each returns the id it replaces.
    let (old_uid, old_gid) = unsafe { (libc::setfsuid(uid), libc::setfsgid(gid)) };
    let _restore = Restore {
        uid: old_uid as u32,
        gid: old_gid as u32,
        groups,
    };
    f()
}

/// Makes file `name` in `dir`, which must not exist (no link is followed, nothing waits).
fn create_new(dir: impl AsFd, name: &str, mode: u32) -> nix::Result<OwnedFd> {
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
    openat2(dir, name, how)
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

    /// The test's own overlay and tmpfs mounts (`/dev/shm`), as a sandbox's would be.
    fn own() -> OwnMounts {
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        OwnMounts::from_tables(&table, "")
    }

    #[test]
    fn a_host_filesystem_bound_in_is_not_the_sandboxs() {
        let sandbox = "\
21 1 0:40 / / rw - overlay overlay rw,lowerdir=x\n\
22 21 0:41 / /tmp rw - tmpfs tmpfs rw\n\
23 21 0:30 /etc /etc ro - overlay overlay rw,lowerdir=y\n\
24 21 0:31 / /usr ro - tmpfs tmpfs rw\n\
25 21 0:22 / /proc rw - proc proc rw\n";
        let host = "\
1 0 0:30 / / rw - overlay overlay rw\n\
2 1 0:31 / /usr rw - tmpfs tmpfs rw\n\
3 1 0:22 / /proc rw - proc proc rw\n";
        assert_eq!(
            OwnMounts::from_tables(sandbox, host),
            OwnMounts::Listed(vec![21, 22])
        );
    }

    fn open_root(dir: &std::path::Path) -> OwnedFd {
        nix::fcntl::open(dir, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()).unwrap()
    }

    #[test]
    fn a_regular_file_on_tmpfs_is_read_and_written() {
        let tmp = shm_dir();
        std::fs::write(tmp.path().join("a.txt"), b"hello").unwrap();
        let root = open_root(tmp.path());
        let (mut file, st) = open_file(root.as_fd(), "/a.txt", Reach::InRoot(&own())).unwrap();
        let mut text = String::new();
        file.read_to_string(&mut text).unwrap();
        assert_eq!((text.as_str(), st.st_size), ("hello", 5));

        let dir = make_dir_all(root.as_fd(), "/x/y", Reach::InRoot(&own())).unwrap();
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
    fn a_new_file_is_all_or_nothing() {
        let tmp = shm_dir();
        std::fs::write(tmp.path().join("kept"), b"old").unwrap();
        std::fs::set_permissions(
            tmp.path().join("kept"),
            std::os::unix::fs::PermissionsExt::from_mode(0o750),
        )
        .unwrap();
        let root = open_root(tmp.path());
        let dir = open_dir(root.as_fd(), "/", Reach::InRoot(&own())).unwrap();
        let ids = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let names = || {
            let mut names: Vec<String> = std::fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        // Dropped part way: the old file as it was, and no temporary left.
        let new = NewFile::create(dir.as_fd(), "kept", 0o644, ids).unwrap();
        new.file().write_all(b"half of the new").unwrap();
        assert_eq!(std::fs::read(tmp.path().join("kept")).unwrap(), b"old");
        drop(new);
        assert_eq!(names(), ["kept"]);
        assert_eq!(std::fs::read(tmp.path().join("kept")).unwrap(), b"old");
        // Committed: the whole new file, with the old one's mode, and nothing else.
        let new = NewFile::create(dir.as_fd(), "kept", 0o644, ids).unwrap();
        new.file().write_all(b"new").unwrap();
        new.commit().unwrap();
        assert_eq!(names(), ["kept"]);
        assert_eq!(std::fs::read(tmp.path().join("kept")).unwrap(), b"new");
        let mode = std::fs::metadata(tmp.path().join("kept")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o750
        );
        // A new name gets the mode asked for.
        let new = NewFile::create(dir.as_fd(), "fresh", 0o640, ids).unwrap();
        new.commit().unwrap();
        let mode = std::fs::metadata(tmp.path().join("fresh")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o640
        );
        // What is not a regular file is not replaced.
        symlink("kept", tmp.path().join("link")).unwrap();
        let e = NewFile::create(dir.as_fd(), "link", 0o644, ids).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        let e = NewFile::create(dir.as_fd(), "sub", 0o644, ids).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EISDIR), "{e}");
        nix::unistd::mkfifo(&tmp.path().join("pipe"), Mode::from_bits_truncate(0o666)).unwrap();
        let e = NewFile::create(dir.as_fd(), "pipe", 0o644, ids).unwrap_err();
        assert!(refusal(&e).is_some(), "{e}");
        assert_eq!(names(), ["fresh", "kept", "link", "pipe", "sub"]);
        // Replacing: a link is replaced itself (its target kept), a FIFO too; never a
        // directory.
        for name in ["link", "pipe"] {
            let new = NewFile::replacing(dir.as_fd(), name, 0o600, ids).unwrap();
            new.file().write_all(name.as_bytes()).unwrap();
            new.commit().unwrap();
            let st = std::fs::symlink_metadata(tmp.path().join(name)).unwrap();
            assert!(st.is_file(), "{name}");
            assert_eq!(
                std::fs::read(tmp.path().join(name)).unwrap(),
                name.as_bytes()
            );
        }
        assert_eq!(std::fs::read(tmp.path().join("kept")).unwrap(), b"new");
        let new = NewFile::replacing(dir.as_fd(), "sub", 0o600, ids).unwrap();
        assert!(new.commit().is_err());
        assert!(tmp.path().join("sub").is_dir());
        assert_eq!(names(), ["fresh", "kept", "link", "pipe", "sub"]);
    }

    #[test]
    fn a_fifo_is_refused_without_waiting() {
        let tmp = shm_dir();
        let fifo = tmp.path().join("pipe");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o666)).unwrap();
        let root = open_root(tmp.path());
        let started = std::time::Instant::now();
        let e = open_file(root.as_fd(), "/pipe", Reach::InRoot(&own())).unwrap_err();
        assert_eq!(refusal(&e).map(|r| r.what.as_str()), Some("a FIFO"), "{e}");
        let dir = open_dir(root.as_fd(), "/", Reach::InRoot(&own())).unwrap();
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
        let e = open_file(
            root.as_fd(),
            "/proc/sys/kernel/hostname",
            Reach::InRoot(&own()),
        )
        .unwrap_err();
        assert_eq!(
            refusal(&e).map(|r| r.what.as_str()),
            Some("on procfs"),
            "{e}"
        );
        let e = open_dir(root.as_fd(), "/proc/sys/kernel", Reach::InRoot(&own())).unwrap_err();
        assert_eq!(
            refusal(&e).map(|r| r.what.as_str()),
            Some("on procfs"),
            "{e}"
        );
        let e = open_dir(root.as_fd(), "/sys/kernel", Reach::InRoot(&own())).unwrap_err();
        assert_eq!(
            refusal(&e).map(|r| r.what.as_str()),
            Some("on sysfs"),
            "{e}"
        );
        let e = open_file(root.as_fd(), "/dev/null", Reach::InRoot(&own())).unwrap_err();
        assert!(refusal(&e).is_some(), "{e}");
        // Positive control: the same root reaches a file on tmpfs.
        let tmp = shm_dir();
        std::fs::write(tmp.path().join("f"), b"x").unwrap();
        let inside = format!("{}/f", tmp.path().display());
        open_file(root.as_fd(), &inside, Reach::InRoot(&own())).unwrap();
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
        let e = open_file(root.as_fd(), "/abs", Reach::InRoot(&own())).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        let e = open_file(root.as_fd(), "abs", Reach::Beneath).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        let e = open_file(root.as_fd(), "rel", Reach::Beneath).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        let dir = open_dir(root.as_fd(), "/", Reach::InRoot(&own())).unwrap();
        let e = create_file(dir.as_fd(), "abs", 0o644, Existing::Truncate).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"s");
    }

    #[test]
    fn the_owner_is_put_back_after_a_panic() {
        let before = unsafe_current_fsuid();
        let groups = nix::unistd::getgroups().unwrap();
        let result = std::panic::catch_unwind(|| as_owner(12345, 12345, || panic!("boom")));
        assert!(result.is_err());
        assert_eq!(unsafe_current_fsuid(), before);
        assert_eq!(nix::unistd::getgroups().unwrap(), groups);
        if nix::unistd::geteuid().is_root() {
            let inside = as_owner(54321, 54321, || nix::unistd::getgroups().unwrap());
            assert!(
                inside.is_empty(),
                "no supplementary groups inside: {inside:?}"
            );
        }
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

    #[test]
    fn a_tree_deeper_than_any_stack_is_removed_without_recursion() {
        let tmp = shm_dir();
        let depth = 30_000;
        let mut dir = open_root(tmp.path());
        nix::sys::stat::mkdirat(&dir, "deep", Mode::from_bits_truncate(0o755)).unwrap();
        dir = open_dir(dir.as_fd(), "deep", Reach::Beneath).unwrap();
        for level in 0..depth {
            nix::sys::stat::mkdirat(&dir, "a", Mode::from_bits_truncate(0o755)).unwrap();
            if level % 1000 == 0 {
                let file = nix::fcntl::openat(
                    &dir,
                    "f",
                    OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o644),
                )
                .unwrap();
                drop(file);
                // Directories their owner may not enter, or not change.
                nix::sys::stat::mkdirat(&dir, "locked", Mode::empty()).unwrap();
                nix::sys::stat::mkdirat(&dir, "read-only", Mode::from_bits_truncate(0o555))
                    .unwrap();
            }
            dir = open_dir(dir.as_fd(), "a", Reach::Beneath).unwrap();
        }
        drop(dir);
        let root = open_root(tmp.path());
        let path = tmp.path().to_path_buf();
        // On a thread with a small stack: anything recursive per level would overflow it.
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || remove_tree(root.as_fd(), OsStr::new("deep")))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert!(!path.join("deep").exists());
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
        // A file, and a link (removed, not followed).
        let outside = shm_dir();
        std::fs::write(outside.path().join("keep"), b"k").unwrap();
        symlink(outside.path(), path.join("link")).unwrap();
        let root = open_root(&path);
        remove_tree(root.as_fd(), OsStr::new("link")).unwrap();
        assert!(outside.path().join("keep").exists());
        remove_all(&path.join("missing")).unwrap();
    }
}

//! A sandbox's files as one tree of paths, with the operations that move files in and out
//! of it — stat, list, read, create, mkdir, symlink, set times and modes, remove — on the
//! rules of [`crate::sandboxfs`]: the same code whether the host does the work on the
//! sandbox's root from outside (the namespace backend's fast path) or the agent does it
//! inside on the host's behalf (a VM, where the host cannot reach the files).
//!
//! Paths are [`At`]s: absolute, resolved inside the root ([`Reach::InRoot`]), or relative to
//! a directory so resolved and then strictly below it ([`Reach::Beneath`]: no link, no other
//! mount). Every change runs with the filesystem ids of the sandbox user it is made for, so
//! the sandbox's permissions hold and what is made belongs to that user.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Seek};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, fstatat};
use nix::sys::time::TimeSpec;

use crate::protocol::{At, Create, Kind, Meta, Owner};
use crate::sandboxfs::{self, Existing, NewFile, OwnMounts, Reach, Want};

/// A sandbox's root and whose ids its files get.
#[derive(Debug)]
pub struct Tree {
    root: OwnedFd,
    own: OwnMounts,
    /// The ids, where this tree is worked on, of the sandbox's root user: a sandbox uid `u`
    /// is `base.0 + u` here (`(0, 0)` inside the sandbox).
    base: (u32, u32),
    /// Each thread's last directories: a restore makes file after file in one directory.
    cache: Mutex<Vec<(ThreadId, Cache)>>,
}

#[derive(Debug, Default)]
struct Cache {
    /// The directory of the last `At::Beneath`, by its path.
    dir: Option<(String, Arc<OwnedFd>)>,
    /// The last parent made or opened by an in-place create: the `At::Beneath` directory and
    /// the parent's path below it.
    parent: Option<(String, String, Arc<OwnedFd>)>,
}

/// Where an operation starts: a directory descriptor, the path from it and how it resolves.
struct Place<'a> {
    fd: Held<'a>,
    path: &'a str,
    reach: Reach<'a>,
}

enum Held<'a> {
    Root(&'a OwnedFd),
    Dir(Arc<OwnedFd>),
}

impl Held<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Held::Root(fd) => fd.as_fd(),
            Held::Dir(fd) => fd.as_fd(),
        }
    }
}

/// Splits a path into its parent and last name: `("/", "a")` for `/a`, `("", "a")` for `a`,
/// an empty name for the root (`/`) or the starting directory (`""`, `.`).
fn split(path: &str) -> (&str, &str) {
    let trimmed = path.trim_end_matches('/');
    if trimmed == "." || trimmed.is_empty() {
        return (if path.starts_with('/') { "/" } else { "" }, "");
    }
    match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/", name),
        Some((parent, name)) => (parent, name),
        None => ("", trimmed),
    }
}

fn timespec(ns: i64) -> TimeSpec {
    TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

impl Tree {
    /// The tree of the sandbox whose root is `root` (an `O_PATH` descriptor), whose own
    /// filesystems are `own` and whose root user has ids `base` here.
    pub fn new(root: OwnedFd, own: OwnMounts, base: (u32, u32)) -> Tree {
        Tree {
            root,
            own,
            base,
            cache: Mutex::new(Vec::new()),
        }
    }

    /// The tree of the sandbox this process runs in: the agent's.
    pub fn inside() -> io::Result<Tree> {
        let root = nix::fcntl::open(
            "/",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Tree::new(root, OwnMounts::Inside, (0, 0)))
    }

    /// What `st` is, with its owner as ids of the sandbox: the host's ids of the sandbox's
    /// users less `base`; one the sandbox does not have is its `nobody` (65534).
    fn meta(&self, st: &nix::sys::stat::FileStat) -> Meta {
        meta_inside(st, self.base)
    }

    fn ids(&self, owner: Owner) -> (u32, u32) {
        (self.base.0 + owner.0, self.base.1 + owner.1)
    }

    /// Runs `f` as sandbox user `owner`, or with every permission for `None`.
    fn as_reader<T>(&self, reader: Option<Owner>, f: impl FnOnce() -> T) -> T {
        match reader {
            Some(owner) => {
                let (uid, gid) = self.ids(owner);
                sandboxfs::as_owner(uid, gid, f)
            }
            None => f(),
        }
    }

    fn as_owner<T>(&self, owner: Owner, f: impl FnOnce() -> T) -> T {
        let (uid, gid) = self.ids(owner);
        sandboxfs::as_owner(uid, gid, f)
    }

    fn with_cache<T>(&self, f: impl FnOnce(&mut Cache) -> T) -> T {
        let me = std::thread::current().id();
        let mut all = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let at = match all.iter().position(|(id, _)| *id == me) {
            Some(at) => at,
            None => {
                all.push((me, Cache::default()));
                all.len() - 1
            }
        };
        f(&mut all[at].1)
    }

    /// Lets go of the directories kept open for this thread (they keep the sandbox's mounts
    /// busy): at the end of a restore.
    pub fn forget(&self) {
        let me = std::thread::current().id();
        let mut all = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|(id, _)| *id != me);
    }

    fn beneath(&self, dir: &str) -> io::Result<Arc<OwnedFd>> {
        if let Some(fd) = self.with_cache(|c| {
            c.dir
                .as_ref()
                .filter(|(path, _)| path == dir)
                .map(|(_, fd)| fd.clone())
        }) {
            return Ok(fd);
        }
        let fd = Arc::new(sandboxfs::open_dir(
            self.root.as_fd(),
            dir,
            Reach::InRoot(&self.own),
        )?);
        self.with_cache(|c| c.dir = Some((dir.to_string(), fd.clone())));
        Ok(fd)
    }

    fn place<'a>(&'a self, at: &'a At) -> io::Result<Place<'a>> {
        Ok(match at {
            At::Root(path) => {
                if !path.starts_with('/') {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{path}: a path of the sandbox is absolute"),
                    ));
                }
                Place {
                    fd: Held::Root(&self.root),
                    path,
                    reach: Reach::InRoot(&self.own),
                }
            }
            At::Beneath { dir, path } => {
                if path.starts_with('/') || path.split('/').any(|c| c == "..") {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{path}: a path below a directory is relative, without `..`"),
                    ));
                }
                Place {
                    fd: Held::Dir(self.beneath(dir)?),
                    path,
                    reach: Reach::Beneath,
                }
            }
        })
    }

    /// The directory `parent` (of a split) from `place`.
    fn parent(&self, place: &Place<'_>, parent: &str) -> io::Result<OwnedFd> {
        sandboxfs::open_dir(place.fd.fd(), parent, place.reach)
    }

    /// What is at `at`, not following a last link: `None` where nothing is, or where a
    /// directory on the way is missing, a link or no directory.
    pub fn stat(&self, at: &At, reader: Option<Owner>) -> io::Result<Option<Meta>> {
        self.as_reader(reader, || {
            let place = self.place(at)?;
            let (parent, name) = split(place.path);
            if name.is_empty() {
                let dir = self.parent(&place, parent)?;
                return Ok(Some(self.meta(&nix::sys::stat::fstat(&dir)?)));
            }
            let dir = match self.parent(&place, parent) {
                Ok(dir) => dir,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            match fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => Ok(Some(self.meta(&st))),
                Err(Errno::ENOENT) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
    }

    /// The entries of directory `at`, each with what it is (not following links), sorted by
    /// name. Names that are not UTF-8 are given with replacement characters.
    pub fn list(&self, at: &At, reader: Option<Owner>) -> io::Result<Vec<(String, Meta)>> {
        self.as_reader(reader, || {
            let place = self.place(at)?;
            let fd = sandboxfs::open_dir(place.fd.fd(), place.path, place.reach)?;
            let mut listing = nix::dir::Dir::from_fd(fd)?;
            let mut names = Vec::new();
            for entry in listing.iter() {
                let entry = entry?;
                let name = entry.file_name().to_bytes();
                if name != b"." && name != b".." {
                    names.push(OsStr::from_bytes(name).to_os_string());
                }
            }
            let dir = listing.as_fd();
            let mut entries = Vec::with_capacity(names.len());
            for name in names {
                let st = match fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) => st,
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(e.into()),
                };
                entries.push((name.to_string_lossy().into_owned(), self.meta(&st)));
            }
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(entries)
        })
    }

    /// Where symlink `at` points.
    pub fn read_link(&self, at: &At, reader: Option<Owner>) -> io::Result<String> {
        self.as_reader(reader, || {
            let place = self.place(at)?;
            let (parent, name) = split(place.path);
            let dir = self.parent(&place, parent)?;
            let target = nix::fcntl::readlinkat(&dir, name)?;
            Ok(target.to_string_lossy().into_owned())
        })
    }

    /// Regular file `at`, open for reading from `offset`, and what it was when opened.
    pub fn open(&self, at: &At, offset: u64, reader: Option<Owner>) -> io::Result<(File, Meta)> {
        self.as_reader(reader, || {
            let place = self.place(at)?;
            let (mut file, st) = sandboxfs::open_file(place.fd.fd(), place.path, place.reach)?;
            if offset > 0 {
                file.seek(io::SeekFrom::Start(offset))?;
            }
            Ok((file, self.meta(&st)))
        })
    }

    /// Starts regular file `at` with `mode`, made (with the directories above it that are
    /// missing) as sandbox user `owner`; [`Creating::finish`] puts it in place.
    pub fn create(&self, at: &At, mode: u32, how: Create, owner: Owner) -> io::Result<Creating> {
        let ids = self.ids(owner);
        self.as_owner(owner, || {
            let place = self.place(at)?;
            let (parent, name) = split(place.path);
            if name.is_empty() {
                return Err(Errno::EISDIR.into());
            }
            Ok(match how {
                Create::Atomic | Create::AtomicReplacing => {
                    let dir = sandboxfs::make_dir_all(place.fd.fd(), parent, place.reach)?;
                    let new = if how == Create::Atomic {
                        NewFile::create(dir.as_fd(), name, mode, ids)?
                    } else {
                        NewFile::replacing(dir.as_fd(), name, mode, ids)?
                    };
                    Creating {
                        made: Made::Atomic(new),
                        base: self.base,
                    }
                }
                Create::InPlace => {
                    let dir = self.made_parent(at, &place, parent)?;
                    let file = sandboxfs::create_file(dir.as_fd(), name, mode, Existing::Replace)?;
                    Creating {
                        made: Made::InPlace(file),
                        base: self.base,
                    }
                }
            })
        })
    }

    /// The parent directory of an in-place create, made where missing: the one before when
    /// it is the same.
    fn made_parent(&self, at: &At, place: &Place<'_>, parent: &str) -> io::Result<Arc<OwnedFd>> {
        let At::Beneath { dir, .. } = at else {
            return Ok(Arc::new(sandboxfs::make_dir_all(
                place.fd.fd(),
                parent,
                place.reach,
            )?));
        };
        let known = self.with_cache(|c| {
            c.parent
                .as_ref()
                .filter(|(d, p, _)| d == dir && p == parent)
                .map(|(_, _, fd)| fd.clone())
        });
        if let Some(fd) = known {
            return Ok(fd);
        }
        let fd = Arc::new(sandboxfs::make_dir_all(place.fd.fd(), parent, place.reach)?);
        self.with_cache(|c| c.parent = Some((dir.clone(), parent.to_string(), fd.clone())));
        Ok(fd)
    }

    /// Makes directory `at` with `mode` (one there already stays as it is), and with
    /// `parents` the directories above it that are missing (0755).
    pub fn make_dir(&self, at: &At, mode: u32, parents: bool, owner: Owner) -> io::Result<()> {
        self.as_owner(owner, || {
            let place = self.place(at)?;
            let (parent, name) = split(place.path);
            if name.is_empty() {
                return self.parent(&place, parent).map(drop);
            }
            let dir = if parents {
                sandboxfs::make_dir_all(place.fd.fd(), parent, place.reach)?
            } else {
                self.parent(&place, parent)?
            };
            match nix::sys::stat::mkdirat(&dir, name, Mode::from_bits_truncate(mode)) {
                Ok(()) => Ok(()),
                Err(Errno::EEXIST) => {
                    let st = fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
                    match Kind::of_mode(st.st_mode) {
                        Kind::Dir => Ok(()),
                        _ => Err(Errno::EEXIST.into()),
                    }
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    /// Makes symlink `at` to `target` (replacing a file or link there, never a directory),
    /// with its own modification time `mtime_ns`.
    pub fn symlink(&self, at: &At, target: &str, mtime_ns: i64, owner: Owner) -> io::Result<()> {
        self.as_owner(owner, || {
            let place = self.place(at)?;
            let (parent, name) = split(place.path);
            if name.is_empty() {
                return Err(Errno::EEXIST.into());
            }
            let dir = sandboxfs::make_dir_all(place.fd.fd(), parent, place.reach)?;
            match nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
            nix::unistd::symlinkat(target, &dir, name)?;
            nix::sys::stat::utimensat(
                &dir,
                name,
                &TimeSpec::UTIME_OMIT,
                &timespec(mtime_ns),
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )?;
            Ok(())
        })
    }

    /// Sets the mode and modification time of file or directory `at` (never through a last
    /// link), without opening it for reading: a mode of 000 is no obstacle.
    pub fn set_meta(
        &self,
        at: &At,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        owner: Owner,
    ) -> io::Result<()> {
        self.as_owner(owner, || {
            let place = self.place(at)?;
            let path = if place.path.is_empty() {
                "."
            } else {
                place.path
            };
            let handle = sandboxfs::path_handle(place.fd.fd(), OsStr::new(path), place.reach)?;
            if let Err(e) = sandboxfs::check(&handle, Want::Dir, place.reach) {
                if e.raw_os_error() != Some(libc::ENOTDIR) {
                    return Err(e);
                }
                sandboxfs::check(&handle, Want::File, place.reach)?;
            }
            // The very inode the descriptor holds, by its /proc/self/fd name.
            let proc_path = format!("/proc/self/fd/{}", handle.as_raw_fd());
            if let Some(mode) = mode {
                nix::sys::stat::fchmodat(
                    nix::fcntl::AT_FDCWD,
                    proc_path.as_str(),
                    Mode::from_bits_truncate(mode),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )?;
            }
            if let Some(mtime_ns) = mtime_ns {
                nix::sys::stat::utimensat(
                    nix::fcntl::AT_FDCWD,
                    proc_path.as_str(),
                    &TimeSpec::UTIME_OMIT,
                    &timespec(mtime_ns),
                    nix::sys::stat::UtimensatFlags::FollowSymlink,
                )?;
            }
            Ok(())
        })
    }

    /// Removes the file, link or empty directory at `at`; with `recursive`, a directory and
    /// everything below it ([`sandboxfs::remove_tree`]).
    pub fn remove(&self, at: &At, recursive: bool, owner: Owner) -> io::Result<()> {
        use nix::unistd::{UnlinkatFlags, unlinkat};
        self.as_owner(owner, || {
            let place = self.place(at)?;
            let (parent, name) = split(place.path);
            if name.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the directory a path starts from cannot be removed",
                ));
            }
            let dir = self.parent(&place, parent)?;
            if recursive {
                return sandboxfs::remove_tree(dir.as_fd(), OsStr::new(name));
            }
            let st = fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
            let flag = match Kind::of_mode(st.st_mode) {
                Kind::Dir => UnlinkatFlags::RemoveDir,
                _ => UnlinkatFlags::NoRemoveDir,
            };
            Ok(unlinkat(&dir, name, flag)?)
        })
    }

    /// Gives directory `at` to sandbox user `owner` if the sandbox's root has it (as the
    /// agent makes a workspace for a command run as a user); someone else's stays theirs.
    pub fn give(&self, at: &At, owner: Owner) -> io::Result<()> {
        let place = self.place(at)?;
        let dir = sandboxfs::open_dir(place.fd.fd(), place.path, place.reach)?;
        let st = nix::sys::stat::fstat(&dir)?;
        if st.st_uid != self.base.0 || owner == (0, 0) {
            return Ok(());
        }
        let (uid, gid) = self.ids(owner);
        nix::unistd::fchown(
            &dir,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )?;
        Ok(())
    }
}

/// What `st` is, its owner given as ids of a sandbox whose root user is `base` here.
fn meta_inside(st: &nix::sys::stat::FileStat, base: (u32, u32)) -> Meta {
    let mut meta = Meta::of(st);
    if base != (0, 0) {
        let inside = |id: u32, base: u32| match id.checked_sub(base) {
            Some(id) if id < 65_536 => id,
            _ => 65_534,
        };
        meta.uid = inside(meta.uid, base.0);
        meta.gid = inside(meta.gid, base.1);
    }
    meta
}

/// A regular file being made ([`Tree::create`]).
#[derive(Debug)]
pub struct Creating {
    made: Made,
    /// The tree's `base`, for what the file is at the end.
    base: (u32, u32),
}

#[derive(Debug)]
enum Made {
    /// Beside its name, put in place at the end.
    Atomic(NewFile),
    /// At its name already.
    InPlace(File),
}

impl Creating {
    /// The file, open for writing.
    pub fn file(&self) -> &File {
        match &self.made {
            Made::Atomic(new) => new.file(),
            Made::InPlace(file) => file,
        }
    }

    /// Gives the file `mode` and `mtime_ns` where given and puts it in place; what it is then.
    /// The mode and time are set on the open file, which is this side's own: as whoever this
    /// side is (the rename as the file's owner).
    pub fn finish(self, mode: Option<u32>, mtime_ns: Option<i64>) -> io::Result<Meta> {
        let file = self.file();
        if let Some(mode) = mode {
            nix::sys::stat::fchmod(file, Mode::from_bits_truncate(mode))?;
        }
        if let Some(mtime_ns) = mtime_ns {
            nix::sys::stat::futimens(file, &TimeSpec::UTIME_OMIT, &timespec(mtime_ns))?;
        }
        let meta = meta_inside(&nix::sys::stat::fstat(file)?, self.base);
        if let Made::Atomic(new) = self.made {
            new.commit()?;
        }
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_parent_and_name() {
        assert_eq!(split("/"), ("/", ""));
        assert_eq!(split("/a"), ("/", "a"));
        assert_eq!(split("/a/b/"), ("/a", "b"));
        assert_eq!(split(""), ("", ""));
        assert_eq!(split("."), ("", ""));
        assert_eq!(split("a"), ("", "a"));
        assert_eq!(split("a/b"), ("a", "b"));
    }
}

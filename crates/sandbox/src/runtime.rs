//! The runtime directory: where sandbox directories, the pool, the skeleton and kept layers
//! live. It must be a directory no other local user can take, plant things in or read.
//!
//! `$UPSTREAM_RUNTIME_DIR` when set; else `/var/lib/upstream` as root (on disk: sandboxes'
//! writable layers and workspaces live here, and `/run` is a small tmpfs on most hosts); else
//! `$XDG_RUNTIME_DIR/upstream` when `$XDG_RUNTIME_DIR` is a private directory of the user's (as
//! the login manager makes it); else `<tmp>/upstream-<uid>`, a name any local user could make
//! first in a shared temporary directory. Whichever it is, it is opened without following a
//! symbolic link and checked on the open descriptor: a directory owned by this user, writable
//! by nobody else. One owned by anybody else is refused, never used; one only readable by
//! others is made private.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};

/// A part for the name of a file being made before it is renamed into place, which no
/// other maker uses, in this process or another: the pid and a counter (threads of one
/// process, a daemon's or a test's, make the same cached disk or template at once).
pub fn unique_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Errors finding or making the runtime directory.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error("cannot create the runtime directory {}: {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot open the runtime directory {}: {source}", path.display())]
    Open { path: PathBuf, source: Errno },
    #[error("the runtime directory {} is a symbolic link or not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error(
        "the runtime directory {} belongs to uid {owner}, not to you (uid {uid}): another user may have made it to keep your sandboxes out, and upstream will not use it",
        path.display()
    )]
    ForeignOwner { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "the runtime directory {} is writable by other users (mode {mode:03o}), who could plant files the sandboxes use",
        path.display()
    )]
    OpenToOthers { path: PathBuf, mode: u32 },
}

impl RuntimeDirError {
    /// What the user can do about it.
    pub fn hint(&self) -> String {
        match self {
            RuntimeDirError::Create { .. } | RuntimeDirError::Open { .. } => {
                "set UPSTREAM_RUNTIME_DIR to a directory you may write".into()
            }
            RuntimeDirError::NotADirectory { path }
            | RuntimeDirError::ForeignOwner { path, .. } => {
                format!(
                    "have it removed (by its owner or root: rm -r {}), or set UPSTREAM_RUNTIME_DIR to a directory of your own",
                    path.display()
                )
            }
            RuntimeDirError::OpenToOthers { path, .. } => format!(
                "check that nothing in it belongs to someone else, then make it private (chmod 700 {}), or set UPSTREAM_RUNTIME_DIR to another directory",
                path.display()
            ),
        }
    }
}

/// Where the runtime directory is, before it is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    /// Whether missing parents may be made (`$UPSTREAM_RUNTIME_DIR` only).
    pub make_parents: bool,
}

/// Picks the runtime directory from the environment's values: `override_dir` is
/// `$UPSTREAM_RUNTIME_DIR`, `xdg` is `$XDG_RUNTIME_DIR` when it is a private directory of this
/// user's (see [`is_private_dir`]), `tmp` the temporary directory.
pub fn locate(
    uid: u32,
    override_dir: Option<OsString>,
    xdg: Option<PathBuf>,
    tmp: &Path,
) -> Location {
    if let Some(dir) = override_dir.filter(|d| !d.is_empty()) {
        return Location {
            path: PathBuf::from(dir),
            make_parents: true,
        };
    }
    let path = if uid == 0 {
        PathBuf::from("/var/lib/upstream")
    } else if let Some(xdg) = xdg {
        xdg.join("upstream")
    } else {
        tmp.join(format!("upstream-{uid}"))
    };
    Location {
        path,
        make_parents: false,
    }
}

/// Finds the runtime directory from this process's environment, makes it if it is missing,
/// checks it and makes the directories named in `subdirs` inside it.
pub fn runtime_dir(subdirs: &[&str]) -> Result<PathBuf, RuntimeDirError> {
    runtime_dir_in(None, subdirs)
}

/// [`runtime_dir`], at `dir` when given (as `$UPSTREAM_RUNTIME_DIR` would name it) rather than
/// where the environment says: for whoever holds several backends in one process, each with
/// a directory of its own. It is checked just the same.
pub fn runtime_dir_in(dir: Option<&Path>, subdirs: &[&str]) -> Result<PathBuf, RuntimeDirError> {
    let uid = nix::unistd::Uid::effective().as_raw();
    let xdg = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute() && is_private_dir(d, uid));
    let override_dir = match dir {
        Some(dir) => Some(dir.as_os_str().to_os_string()),
        None => std::env::var_os("UPSTREAM_RUNTIME_DIR"),
    };
    let location = locate(uid, override_dir, xdg, &std::env::temp_dir());
    let dir = ensure_private(&location, uid)?;
    for sub in subdirs {
        match nix::sys::stat::mkdirat(&dir, *sub, Mode::S_IRWXU) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(RuntimeDirError::Create {
                    path: location.path.join(sub),
                    source: e.into(),
                });
            }
        }
    }
    Ok(location.path)
}

/// Where the locks of sandbox id ranges are (see `ids`): `/run/upstream/ids`, whatever the
/// runtime directory, so that every upstream of the host uses the same locks. Root's only.
pub fn ids_dir() -> Result<PathBuf, RuntimeDirError> {
    let location = Location {
        path: PathBuf::from("/run/upstream"),
        make_parents: false,
    };
    let dir = ensure_private(&location, 0)?;
    match nix::sys::stat::mkdirat(&dir, "ids", Mode::S_IRWXU) {
        Ok(()) | Err(Errno::EEXIST) => Ok(location.path.join("ids")),
        Err(e) => Err(RuntimeDirError::Create {
            path: location.path.join("ids"),
            source: e.into(),
        }),
    }
}

/// Whether `dir` is a directory owned by `uid` that nobody else may enter, as
/// `$XDG_RUNTIME_DIR` must be.
pub fn is_private_dir(dir: &Path, uid: u32) -> bool {
    open_dir(dir).is_ok_and(|fd| {
        nix::sys::stat::fstat(&fd).is_ok_and(|st| st.st_uid == uid && st.st_mode & 0o077 == 0)
    })
}

fn open_dir(path: &Path) -> nix::Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Makes the directory at `location` (mode 0700) if it is missing, then opens it without
/// following a link and checks the open descriptor: owned by `uid`, writable by nobody else.
/// A directory that others may only read or enter is made private.
pub fn ensure_private(location: &Location, uid: u32) -> Result<OwnedFd, RuntimeDirError> {
    let path = &location.path;
    let made = match nix::unistd::mkdir(path.as_path(), Mode::S_IRWXU) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(Errno::ENOENT) if location.make_parents => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
        }
        Err(e) => Err(e.into()),
    };
    made.map_err(|source| RuntimeDirError::Create {
        path: path.clone(),
        source,
    })?;
    let fd = open_dir(path).map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => RuntimeDirError::NotADirectory { path: path.clone() },
        e => RuntimeDirError::Open {
            path: path.clone(),
            source: e,
        },
    })?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| RuntimeDirError::Open {
        path: path.clone(),
        source: e,
    })?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFDIR {
        return Err(RuntimeDirError::NotADirectory { path: path.clone() });
    }
    if st.st_uid != uid {
        return Err(RuntimeDirError::ForeignOwner {
            path: path.clone(),
            owner: st.st_uid,
            uid,
        });
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(RuntimeDirError::OpenToOthers {
            path: path.clone(),
            mode,
        });
    }
    if mode & 0o077 != 0 {
        nix::sys::stat::fchmod(&fd, Mode::S_IRWXU).map_err(|e| RuntimeDirError::Open {
            path: path.clone(),
            source: e,
        })?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A fresh directory for one test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            static N: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "upstream-runtime-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir(&path).unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn at(path: PathBuf) -> Location {
        Location {
            path,
            make_parents: false,
        }
    }

    fn me() -> u32 {
        nix::unistd::Uid::effective().as_raw()
    }

    #[test]
    fn the_location_follows_the_override_then_root_then_xdg_then_tmp() {
        let tmp = Path::new("/tmp");
        let xdg = Some(PathBuf::from("/run/user/1000"));
        let over = Some(OsString::from("/srv/rt"));
        assert_eq!(
            locate(1000, over.clone(), xdg.clone(), tmp).path,
            Path::new("/srv/rt")
        );
        assert!(locate(0, over, None, tmp).make_parents);
        assert_eq!(
            locate(0, None, xdg.clone(), tmp).path,
            Path::new("/var/lib/upstream")
        );
        assert_eq!(
            locate(1000, None, xdg, tmp).path,
            Path::new("/run/user/1000/upstream")
        );
        let fallback = locate(1000, Some(OsString::new()), None, tmp);
        assert_eq!(fallback.path, Path::new("/tmp/upstream-1000"));
        assert!(!fallback.make_parents);
    }

    #[test]
    fn a_new_directory_is_private() {
        let scratch = Scratch::new();
        let path = scratch.0.join("rt");
        ensure_private(&at(path.clone()), me()).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        assert_eq!(meta.uid(), me());
        // Parents are made only for an explicit directory.
        let deep = scratch.0.join("a/b");
        assert!(matches!(
            ensure_private(&at(deep.clone()), me()),
            Err(RuntimeDirError::Create { .. })
        ));
        let explicit = Location {
            path: deep.clone(),
            make_parents: true,
        };
        ensure_private(&explicit, me()).unwrap();
        assert!(deep.is_dir());
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let scratch = Scratch::new();
        let path = scratch.0.join("rt");
        std::fs::create_dir(&path).unwrap();
        // Whoever runs the test, the directory is not the given uid's.
        let other = me() + 1;
        let err = ensure_private(&at(path.clone()), other).unwrap_err();
        assert!(
            matches!(err, RuntimeDirError::ForeignOwner { owner, uid, .. } if owner == me() && uid == other),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(err.hint().contains("UPSTREAM_RUNTIME_DIR"));
        // The control: the same directory is its owner's.
        ensure_private(&at(path), me()).unwrap();
    }

    #[test]
    fn a_symbolic_link_or_a_file_is_refused() {
        let scratch = Scratch::new();
        let target = scratch.0.join("target");
        std::fs::create_dir(&target).unwrap();
        let link = scratch.0.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            ensure_private(&at(link), me()),
            Err(RuntimeDirError::NotADirectory { .. })
        ));
        let file = scratch.0.join("file");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            ensure_private(&at(file), me()),
            Err(RuntimeDirError::NotADirectory { .. })
        ));
    }

    #[test]
    fn a_directory_others_may_write_is_refused_and_one_they_may_read_is_made_private() {
        let scratch = Scratch::new();
        let path = scratch.0.join("rt");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            ensure_private(&at(path.clone()), me()),
            Err(RuntimeDirError::OpenToOthers { mode: 0o777, .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private(&at(path.clone()), me()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn xdg_runtime_dir_counts_only_when_private_and_owned() {
        let scratch = Scratch::new();
        let dir = scratch.0.join("xdg");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(is_private_dir(&dir, me()));
        assert!(!is_private_dir(&dir, me() + 1), "another user's");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!is_private_dir(&dir, me()), "open to others");
        assert!(!is_private_dir(&scratch.0.join("missing"), me()));
    }
}

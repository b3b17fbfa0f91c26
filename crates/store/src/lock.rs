//! One turn of a context at a time: a turn holds its context's lock from loading what the
//! earlier turns left until its own artifacts are recorded, so the next turn of the context
//! starts from it instead of from the same turn it started from.
//!
//! The lock is an exclusive `flock` on `.upstream/locks/<hash of the context's name>`: the
//! kernel lets go of it when its holder ends, however it ends (`kill -9` included), so no lock
//! outlives its turn. The file holds the holder's pid and, once it has one, its turn's number,
//! for a turn that waits to say whom it waits for. Lock files are never removed: a file
//! removed while another process waits on it would let two turns hold "the" lock at once.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::private;

/// How often a waiting turn tries the lock again (and asks whether it should stop waiting).
const POLL: Duration = Duration::from_millis(50);

/// The turn that holds a context's lock, as far as its lock file tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockHolder {
    /// The process holding it.
    pub pid: Option<u32>,
    /// Its turn's number, once the turn is recorded.
    pub turn: Option<i64>,
}

/// A context's lock, held until dropped.
#[derive(Debug)]
pub struct ContextLock {
    file: File,
}

impl ContextLock {
    /// Records the holder's turn number in the lock file, for waiters to name it.
    pub fn set_turn(&mut self, turn: i64) -> io::Result<()> {
        self.describe(Some(turn))
    }

    fn describe(&mut self, turn: Option<i64>) -> io::Result<()> {
        let text = match turn {
            Some(t) => format!("{} {t}\n", std::process::id()),
            None => format!("{}\n", std::process::id()),
        };
        // Written over what is there, then cut to length: a waiter reading meanwhile never
        // finds the file empty.
        self.file.write_all_at(text.as_bytes(), 0)?;
        self.file.set_len(text.len() as u64)
    }
}

/// Where the lock of `context` is in store `dir`.
pub(crate) fn path(dir: &Path, context: &str) -> PathBuf {
    let hash = blake3::hash(context.as_bytes()).to_hex();
    dir.join("locks").join(&hash.as_str()[..32])
}

/// What taking a lock came to.
pub(crate) enum Taken {
    Held(ContextLock),
    /// `stop` said to stop waiting.
    Stopped,
}

/// Takes the lock at `path`. When another holds it, calls `waiting` with whom (once, and again
/// whenever the holder changes) and tries again every [`POLL`] until it is free or `stop` says
/// to give up.
pub(crate) fn take(
    path: &Path,
    waiting: &mut dyn FnMut(&LockHolder),
    stop: &dyn Fn() -> bool,
) -> io::Result<Taken> {
    if let Some(parent) = path.parent() {
        private::create_dirs(parent)?;
    }
    let mut file = private::open_file(path)?;
    let mut told: Option<LockHolder> = None;
    loop {
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => {
                let mut lock = ContextLock { file };
                lock.describe(None)?;
                return Ok(Taken::Held(lock));
            }
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {}
            Err(e) => return Err(e),
        }
        let holder = read_holder(&mut file);
        // A holder that has not written its name yet is told about once it has, unless
        // nothing was told at all.
        let changed = match &told {
            None => true,
            Some(t) => *t != holder && holder.pid.is_some(),
        };
        if changed {
            waiting(&holder);
            told = Some(holder);
        }
        if stop() {
            return Ok(Taken::Stopped);
        }
        std::thread::sleep(POLL);
        if stop() {
            return Ok(Taken::Stopped);
        }
    }
}

/// Whether the lock at `path` is held by anyone; `None` when it is free.
pub(crate) fn holder(path: &Path) -> io::Result<Option<LockHolder>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
        Ok(()) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(Some(read_holder(&mut file))),
        Err(e) => Err(e),
    }
}

/// `pid [turn]`, as [`ContextLock::describe`] writes it; what cannot be read is unknown.
fn read_holder(file: &mut File) -> LockHolder {
    let mut text = String::new();
    if file.rewind().is_err() || (&*file).take(64).read_to_string(&mut text).is_err() {
        return LockHolder::default();
    }
    let mut words = text.split_whitespace();
    LockHolder {
        pid: words.next().and_then(|w| w.parse().ok()),
        turn: words.next().and_then(|w| w.parse().ok()),
    }
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock on a file descriptor this function borrows; no memory is involved.
    let ret = unsafe { libc::flock(file.as_fd().as_raw_fd(), op) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_second_taker_waits_names_the_holder_and_gets_the_lock_once_it_is_let_go() {
        let tmp = tempfile::tempdir().unwrap();
        let at = path(tmp.path(), "research");
        let Taken::Held(mut first) = take(&at, &mut |_| panic!("waited"), &|| false).unwrap()
        else {
            panic!("stopped")
        };
        first.set_turn(7).unwrap();
        assert_eq!(
            holder(&at).unwrap(),
            Some(LockHolder {
                pid: Some(std::process::id()),
                turn: Some(7)
            })
        );
        let released = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (at, released) = (at.clone(), released.clone());
            std::thread::spawn(move || {
                let told = RefCell::new(Vec::new());
                let taken = take(&at, &mut |h| told.borrow_mut().push(h.clone()), &|| false);
                assert!(released.load(Ordering::SeqCst), "taken while held");
                assert!(matches!(taken, Ok(Taken::Held(_))));
                told.into_inner()
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        released.store(true, Ordering::SeqCst);
        drop(first);
        let told = waiter.join().unwrap();
        assert_eq!(
            told,
            vec![LockHolder {
                pid: Some(std::process::id()),
                turn: Some(7)
            }]
        );
        assert_eq!(holder(&at).unwrap(), None, "let go when dropped");
    }

    #[test]
    fn a_waiter_told_to_stop_stops_and_other_contexts_do_not_wait() {
        let tmp = tempfile::tempdir().unwrap();
        let Taken::Held(_held) = take(&path(tmp.path(), "a"), &mut |_| {}, &|| false).unwrap()
        else {
            panic!("stopped")
        };
        let mut waited = false;
        let taken = take(&path(tmp.path(), "a"), &mut |_| waited = true, &|| true).unwrap();
        assert!(matches!(taken, Taken::Stopped) && waited);
        let other = take(&path(tmp.path(), "b"), &mut |_| panic!("waited"), &|| true).unwrap();
        assert!(matches!(other, Taken::Held(_)));
    }
}

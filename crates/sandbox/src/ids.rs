//! Host id ranges for sandboxes, when upstream runs as root.
//!
//! Each live sandbox gets a range of [`RANGE_SIZE`] host uids (and the same gids) of its own:
//! no two sandboxes share a host id, so one sandbox's processes cannot signal, trace or read
//! another's. The ranges lie in [`FIRST_ID`]..[`END_ID`], a region systemd leaves unused
//! (its container ranges end below it, its foreign range starts above it), and a range is
//! never one that overlaps a range of `/etc/subuid` or `/etc/subgid`: those belong to local
//! users, who can become any id of theirs in a user namespace of their own.
//!
//! A range is taken by holding an exclusive `flock` on its lock file, `<dir>/<slot>.lock` in
//! a directory only root may write, for as long as the sandbox lives; the sandbox's pid 1
//! holds it too. The kernel drops the lock when the last holder dies, however it dies, so a
//! range of a killed upstream is free again, and several upstream processes (runs and a
//! daemon) take ranges side by side without ever taking the same one.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// How many ids each sandbox has: 0..65535 inside.
pub const RANGE_SIZE: u32 = 65_536;
/// The first host id sandboxes are given.
pub const FIRST_ID: u32 = 0x7000_0000;
/// Past the last host id sandboxes are given: where systemd's foreign range starts.
pub const END_ID: u32 = 0x7FFE_0000;

/// Errors taking a range.
#[derive(Debug, thiserror::Error)]
pub enum IdsError {
    #[error("cannot take a host id range for the sandbox: {path}: {source}", path = path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error(
        "no host id range is free for another sandbox: {live} sandboxes hold ranges and /etc/subuid and /etc/subgid take {reserved} of the {total}"
    )]
    Exhausted {
        live: usize,
        reserved: usize,
        total: usize,
    },
}

/// The ranges of a subordinate id file (`/etc/subuid`, `/etc/subgid`): `name:start:count` a
/// line. A line whose start and count are numbers counts whatever its name; a count that runs
/// past the last id runs to it. A line that cannot be read as such is skipped: it gives
/// `newuidmap` no range either, so it reserves nothing.
pub fn parse_subordinate(text: &str) -> Vec<Range<u64>> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let mut fields = line.split(':');
            let (_name, start, count) = (fields.next()?, fields.next()?, fields.next()?);
            let start: u64 = start.trim().parse().ok()?;
            let count: u64 = count.trim().parse().ok()?;
            (count > 0).then(|| start..start.saturating_add(count))
        })
        .collect()
}

/// The slots of [`FIRST_ID`]..[`END_ID`] whose range overlaps none of `reserved`.
pub fn free_slots(reserved: &[Range<u64>]) -> Vec<u32> {
    let total = (END_ID - FIRST_ID) / RANGE_SIZE;
    (0..total)
        .filter(|&slot| {
            let range = slot_range(slot);
            !reserved
                .iter()
                .any(|r| r.start < range.end && range.start < r.end)
        })
        .collect()
}

fn slot_range(slot: u32) -> Range<u64> {
    let base = u64::from(FIRST_ID) + u64::from(slot) * u64::from(RANGE_SIZE);
    base..base + u64::from(RANGE_SIZE)
}

/// A range held for a sandbox: released when dropped (and when every copy of its lock,
/// such as the one the sandbox's pid 1 holds, is closed).
#[derive(Debug)]
pub struct IdRange {
    /// The host id of the sandbox's root.
    pub base: u32,
    lock: OwnedFd,
}

impl IdRange {
    /// The lock file's descriptor, for the sandbox's pid 1 to hold too.
    pub fn lock(&self) -> &OwnedFd {
        &self.lock
    }
}

/// Hands out ranges: reads the subordinate id files when they change and takes the first
/// free slot from a cursor that moves on, so a process with many sandboxes does not try the
/// held ones again and again.
#[derive(Debug)]
pub struct Allocator {
    dir: PathBuf,
    files: Vec<PathBuf>,
    state: Mutex<Reserved>,
    cursor: AtomicU32,
}

#[derive(Debug, Default)]
struct Reserved {
    /// What the files were when read: (modified, length) of each, `None` if missing.
    seen: Vec<Option<(std::time::SystemTime, u64)>>,
    slots: Vec<u32>,
    reserved: usize,
}

impl Allocator {
    /// Ranges locked in `dir`, avoiding those of the subordinate id files `files`.
    pub fn new(dir: PathBuf, files: Vec<PathBuf>) -> Allocator {
        Allocator {
            dir,
            files,
            state: Mutex::new(Reserved::default()),
            // Processes that start together begin at different slots.
            cursor: AtomicU32::new(std::process::id().wrapping_mul(2_654_435_761)),
        }
    }

    /// The host's: `/etc/subuid` and `/etc/subgid`.
    pub fn for_host(dir: PathBuf) -> Allocator {
        Allocator::new(
            dir,
            vec![PathBuf::from("/etc/subuid"), PathBuf::from("/etc/subgid")],
        )
    }

    /// The slots free of subordinate ranges, read again if a file changed.
    fn slots(&self) -> (Vec<u32>, usize) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let seen: Vec<_> = self
            .files
            .iter()
            .map(|f| {
                std::fs::metadata(f)
                    .ok()
                    .map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()))
            })
            .collect();
        if state.seen != seen || state.slots.is_empty() {
            let mut reserved = Vec::new();
            for file in &self.files {
                // A file that cannot be read reserves nothing, as for newuidmap; one that
                // exists but cannot be read is not one this host uses.
                if let Ok(text) = read_small(file) {
                    reserved.extend(parse_subordinate(&text));
                }
            }
            let slots = free_slots(&reserved);
            let total = ((END_ID - FIRST_ID) / RANGE_SIZE) as usize;
            state.reserved = total - slots.len();
            state.slots = slots;
            state.seen = seen;
        }
        (state.slots.clone(), state.reserved)
    }

    /// Takes a free range.
    pub fn take(&self) -> Result<IdRange, IdsError> {
        let (slots, reserved) = self.slots();
        let total = ((END_ID - FIRST_ID) / RANGE_SIZE) as usize;
        if slots.is_empty() {
            return Err(IdsError::Exhausted {
                live: 0,
                reserved,
                total,
            });
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) as usize;
        for i in 0..slots.len() {
            let slot = slots[(start + i) % slots.len()];
            let path = self.dir.join(format!("{slot}.lock"));
            // Read-only: a holder the lock is handed to (a sandbox's pid 1, a VM's monitor
            // running as the range's first id) can write nothing through it.
            let file: File = nix::fcntl::open(
                &path,
                OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
                Mode::from_bits_truncate(0o600),
            )
            .map(File::from)
            .map_err(|errno| IdsError::Lock {
                path: path.clone(),
                source: errno.into(),
            })?;
            // SAFETY: flock on a descriptor this function owns; it takes no pointers.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                self.cursor.store((start + i + 1) as u32, Ordering::Relaxed);
                let base = slot_range(slot).start as u32;
                return Ok(IdRange {
                    base,
                    lock: file.into(),
                });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(IdsError::Lock { path, source: e });
            }
        }
        Err(IdsError::Exhausted {
            live: slots.len(),
            reserved,
            total,
        })
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// Reads a configuration file of at most 1 MiB, never blocking on a FIFO.
fn read_small(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_files_are_read_conservatively() {
        let text = "alice:100000:65536\n\
                    # a comment\n\
                    \n\
                    1001:1879048192:131072\n\
                    bob:2000000000:99999999999\n\
                    broken line\n\
                    carol:x:65536\n\
                    dave:5:\n\
                    erin:300000:0\n\
                    frank: 400000 : 10 :extra\n";
        assert_eq!(
            parse_subordinate(text),
            vec![
                100_000..165_536,
                1_879_048_192..1_879_179_264,
                2_000_000_000..101_999_999_999,
                400_000..400_010,
            ]
        );
    }

    #[test]
    fn slots_avoid_every_subordinate_range() {
        let all = free_slots(&[]);
        assert_eq!(all.len() as u32, (END_ID - FIRST_ID) / RANGE_SIZE);
        // A range over the first two slots by one id each side, and one reaching to the end.
        let reserved = [
            u64::from(FIRST_ID) - 1..u64::from(FIRST_ID) + u64::from(RANGE_SIZE) + 1,
            slot_range(10).start + 5..slot_range(10).start + 6,
            slot_range(20).start..u64::MAX,
        ];
        let free = free_slots(&reserved);
        assert_eq!(free, (2..20).filter(|&s| s != 10).collect::<Vec<_>>());
        for slot in free {
            let range = slot_range(slot);
            assert!(range.start >= u64::from(FIRST_ID) && range.end <= u64::from(END_ID));
            for r in &reserved {
                assert!(range.end <= r.start || r.end <= range.start, "{slot}");
            }
        }
    }

    /// A fresh directory for one test's lock files and subordinate id files.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("upstream-ids-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn live_ranges_are_distinct_and_free_again_when_dropped() {
        let dir = scratch("live");
        let subuid = dir.join("subuid");
        // Every slot but three is a user's.
        let keep = [3u32, 7, 4000];
        let mut text = String::new();
        let total = (END_ID - FIRST_ID) / RANGE_SIZE;
        for slot in (0..total).filter(|s| !keep.contains(s)) {
            let r = slot_range(slot);
            text.push_str(&format!("user{slot}:{}:{}\n", r.start, RANGE_SIZE));
        }
        std::fs::write(&subuid, text).unwrap();
        let allocator = Allocator::new(dir.clone(), vec![subuid, dir.join("missing")]);
        let a = allocator.take().unwrap();
        let b = allocator.take().unwrap();
        // Another process's allocator, reading the same files and locks.
        let other = Allocator::new(dir.clone(), allocator.files.clone());
        let c = other.take().unwrap();
        let mut bases = vec![a.base, b.base, c.base];
        bases.sort();
        let expected: Vec<u32> = keep.iter().map(|&s| slot_range(s).start as u32).collect();
        assert_eq!(bases, expected);
        assert!(matches!(
            other.take(),
            Err(IdsError::Exhausted { live: 3, .. })
        ));
        let freed = b.base;
        drop(b);
        // A child another test forks holds the lock's descriptor until it execs: the range
        // is free once that moment has passed.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let again = loop {
            match other.take() {
                Err(IdsError::Exhausted { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                taken => break taken.unwrap(),
            }
        };
        assert_eq!(again.base, freed);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_held_range_cannot_be_locked_through_another_open_file() {
        // What another process does: its own open of the lock file.
        let dir = scratch("open");
        let allocator = Allocator::new(dir.clone(), Vec::new());
        let held = allocator.take().unwrap();
        let slot = (u64::from(held.base) - u64::from(FIRST_ID)) / u64::from(RANGE_SIZE);
        let path = dir.join(format!("{slot}.lock"));
        let try_lock = || {
            let file = File::options().read(true).write(true).open(&path).unwrap();
            // SAFETY: flock on a descriptor of this test's; released when it is closed.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }
        };
        assert_eq!(try_lock(), -1, "the held range is locked");
        drop(held);
        assert_eq!(try_lock(), 0, "the dropped range is free");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

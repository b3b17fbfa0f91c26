//! A VM's console: what its guest (its kernel, its init, and root in it, who may write
//! `/dev/console` as much as it likes) sends its serial port, of which the host keeps only
//! the end.
//!
//! The VMM writes the console into a pipe ([`Console::open`] gives it the write end); one
//! thread of upstream's, for every VM ([`Keeper`]), drains every console's pipe as it fills
//! and keeps the last [`KEPT`] bytes of each in memory. Nothing a guest writes reaches the
//! host's disk, and what it costs the host is bounded by [`KEPT`] a VM, one descriptor a VM
//! and one thread in all, however much it writes. A guest that writes faster than the thread
//! drains finds the pipe full: its VMM's serial port waits, the guest's writes wait with it,
//! and nothing else does. What the console said last is there after the VMM is gone, which
//! is when it is read ([`Console::tail_once_closed`]): a VM that died is told by the end of
//! its console (its kernel's panic line, its init's last word).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;

/// How much of the end of a console the host keeps.
pub const KEPT: usize = 64 << 10;

/// How much of one console the keeper reads before it looks at the others.
const READ_AT_ONCE: usize = 64 << 10;

/// The end of a VM's console, as the keeper thread reads it from the VMM's pipe.
#[derive(Debug)]
pub struct Console {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The last bytes written, at most [`KEPT`].
    tail: VecDeque<u8>,
    /// Every byte written.
    written: u64,
    /// The pipe's every writer is gone (or reading it failed): nothing more will come.
    closed: bool,
}

impl State {
    fn take(&mut self, bytes: &[u8]) {
        self.written += bytes.len() as u64;
        let bytes = &bytes[bytes.len().saturating_sub(KEPT)..];
        let excess = (self.tail.len() + bytes.len()).saturating_sub(KEPT);
        self.tail.drain(..excess);
        self.tail.extend(bytes);
    }
}

impl Console {
    /// A console, and the write end of its pipe for the VMM (close-on-exec: the VMM is
    /// handed it). Its reading starts at once, on the keeper's thread, started on first use.
    pub fn open() -> io::Result<(Console, OwnedFd)> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        nix::fcntl::fcntl(&read, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        let shared = Arc::new(Shared::default());
        keeper()?.watch(read, Arc::downgrade(&shared));
        Ok((Console { shared }, write))
    }

    /// The last [`KEPT`] bytes (at most) written so far, as text.
    pub fn tail(&self) -> String {
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let (front, back) = state.tail.as_slices();
        let mut bytes = Vec::with_capacity(front.len() + back.len());
        bytes.extend_from_slice(front);
        bytes.extend_from_slice(back);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// [`Console::tail`] once the VMM is gone and everything it wrote was read, waiting for
    /// that at most `within` (a writer forked by another thread may hold the pipe a moment).
    pub fn tail_once_closed(&self, within: Duration) -> String {
        let until = Instant::now() + within;
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while !state.closed {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(state);
        self.tail()
    }

    /// How many bytes are kept (at most [`KEPT`]).
    pub fn kept(&self) -> usize {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tail
            .len()
    }

    /// How many bytes were written to it in all.
    pub fn written(&self) -> u64 {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .written
    }
}

/// The thread that reads every console: it polls their pipes (and its own, which wakes it
/// when a console is added) and keeps what it reads in each [`Console`]. A pipe is closed
/// once its writers are gone.
#[derive(Debug)]
struct Keeper {
    /// Consoles added since the thread last looked.
    added: Arc<Added>,
    /// The write end of the pipe that wakes the thread.
    wake: OwnedFd,
}

type Added = Mutex<Vec<(OwnedFd, Weak<Shared>)>>;

fn keeper() -> io::Result<&'static Keeper> {
    static KEEPER: OnceLock<Result<Keeper, String>> = OnceLock::new();
    KEEPER
        .get_or_init(|| {
            let (wakened, wake) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
                .map_err(|e| format!("cannot make the pipe that wakes it: {e}"))?;
            let added = Arc::new(Added::default());
            let taken = added.clone();
            std::thread::Builder::new()
                .name("upstream-consoles".into())
                .spawn(move || keep(&taken, wakened))
                .map_err(|e| e.to_string())?;
            Ok(Keeper { added, wake })
        })
        .as_ref()
        .map_err(|why| {
            io::Error::other(format!(
                "cannot start the thread that reads VMs' consoles: {why}"
            ))
        })
}

impl Keeper {
    fn watch(&self, read: OwnedFd, console: Weak<Shared>) {
        self.added
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((read, console));
        // A full pipe already wakes the thread.
        let _ = nix::unistd::write(&self.wake, &[1]);
    }
}

/// The keeper's loop, for the life of the process: it takes the consoles `added` when
/// `wakened` is written.
fn keep(added: &Added, wakened: OwnedFd) {
    let mut watched: Vec<(OwnedFd, Weak<Shared>)> = Vec::new();
    let mut buffer = vec![0u8; READ_AT_ONCE];
    loop {
        watched.append(&mut added.lock().unwrap_or_else(|e| e.into_inner()));
        let mut polled: Vec<libc::pollfd> = std::iter::once(&wakened)
            .chain(watched.iter().map(|(fd, _)| fd))
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll writes only the `revents` of the `polled.len()` entries it is given.
        let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if ready < 0 {
            // EINTR; anything else (ENOMEM) is tried again after a pause.
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        if polled[0].revents != 0 {
            while nix::unistd::read(wakened.as_fd(), &mut buffer).is_ok_and(|n| n > 0) {}
        }
        let mut index = 0;
        watched.retain(|(fd, console)| {
            index += 1;
            if polled[index].revents == 0 {
                return true;
            }
            let (read, closed) = match nix::unistd::read(fd.as_fd(), &mut buffer) {
                Ok(0) => (0, true),
                Ok(n) => (n, false),
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => (0, false),
                Err(_) => (0, true),
            };
            // A console no one holds is read to its end all the same, and what it says let
            // go: its VMM's writes never fail for it.
            let Some(console) = console.upgrade() else {
                return !closed;
            };
            let mut state = console.state.lock().unwrap_or_else(|e| e.into_inner());
            state.take(&buffer[..read]);
            state.closed = closed;
            drop(state);
            console.changed.notify_all();
            !closed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// A stand-in for a VMM: `sh -c script` writing its standard output into `console`'s
    /// pipe, and nothing else holding the pipe's write end.
    fn write_with(script: &str) -> Console {
        let (console, write) = Console::open().unwrap();
        let mut child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::from(write))
            .spawn()
            .unwrap();
        assert!(child.wait().unwrap().success());
        console
    }

    #[test]
    fn a_console_flooded_far_past_the_bound_keeps_only_its_end() {
        // 8 MiB, 128 times what is kept, then the line a dying guest's kernel leaves last.
        let console = write_with(
            "head -c 8388608 /dev/zero | tr '\\0' x; printf '\\nKernel panic - not syncing: the end\\n'",
        );
        let tail = console.tail_once_closed(Duration::from_secs(10));
        assert_eq!(console.written(), (8 << 20) + 37, "every byte was read");
        assert_eq!(console.kept(), KEPT);
        assert_eq!(tail.len(), KEPT);
        assert!(tail.ends_with("x\nKernel panic - not syncing: the end\n"));
        // The control: a console shorter than the bound is kept whole.
        let console = write_with("echo booted");
        assert_eq!(
            console.tail_once_closed(Duration::from_secs(10)),
            "booted\n"
        );
        assert_eq!(console.kept(), 7);
    }

    #[test]
    fn what_a_vmm_wrote_before_it_went_is_there_once_it_is_gone() {
        let (console, write) = Console::open().unwrap();
        let mut child = Command::new("sh")
            .args(["-c", "echo first; sleep 1; echo last"])
            .stdout(Stdio::from(write))
            .spawn()
            .unwrap();
        // Its writer lives: the wait ends at its bound, with what was written so far.
        let started = Instant::now();
        let early = console.tail_once_closed(Duration::from_millis(300));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(!early.contains("last"), "{early}");
        child.wait().unwrap();
        assert_eq!(
            console.tail_once_closed(Duration::from_secs(10)),
            "first\nlast\n"
        );
    }

    #[test]
    fn a_vmm_whose_console_is_let_go_writes_on() {
        let writer = |stdout: OwnedFd| {
            Command::new("sh")
                .args(["-c", "sleep 0.3; head -c 1048576 /dev/zero"])
                .stdout(Stdio::from(stdout))
                .status()
                .unwrap()
        };
        let (console, write) = Console::open().unwrap();
        drop(console);
        assert!(writer(write).success(), "the writer's pipe was closed");
        // The control: a pipe whose reader is gone kills the same writer (SIGPIPE).
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        drop(read);
        assert!(!writer(write).success());
    }

    /// The threads of this process.
    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task").unwrap().count()
    }

    #[test]
    fn one_thread_reads_every_console() {
        // The keeper is running before the count.
        drop(Console::open().unwrap());
        let before = threads();
        let consoles: Vec<(Console, OwnedFd)> =
            (0..200).map(|_| Console::open().unwrap()).collect();
        for (n, (_, write)) in consoles.iter().enumerate() {
            nix::unistd::write(write, format!("console {n}\n").as_bytes()).unwrap();
        }
        // Other tests of this binary run threads of their own, a few: not one a console.
        assert!(threads() < before + 20, "{before} -> {}", threads());
        for (n, (console, write)) in consoles.into_iter().enumerate() {
            drop(write);
            assert_eq!(
                console.tail_once_closed(Duration::from_secs(10)),
                format!("console {n}\n")
            );
        }
    }
}

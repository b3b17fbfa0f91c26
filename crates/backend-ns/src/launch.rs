//! Starting the sandbox init, and the host's handle on it.
//!
//! The init is this same binary. When the calling process has a single thread (the CLI, at
//! the moment it makes a sandbox), the init is a clone of it made straight into new user and
//! pid namespaces (`clone3`): no second exec, which on hosts where every exec pays for trapped
//! CPUID instructions saves about half a millisecond, and no intermediate process. A process
//! with more threads cannot safely run Rust code after fork (another thread may hold the
//! allocator's lock), so then the binary is re-executed through `/proc/self/exe`, doing only
//! async-signal-safe calls between fork and exec, and makes the namespaces itself. Either way
//! the init starts with its end of a socket pair at fd 3, in a session of its own, with
//! SIGKILL as its parent-death signal.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use upstream_sandbox::SandboxError;

use crate::init::{CONN_FD, LOCK_FD};

/// How the init is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitMode {
    /// Clone when single-threaded, else re-exec.
    Auto,
    /// Always re-exec (`UPSTREAM_INIT=exec`).
    Exec,
}

impl InitMode {
    pub fn from_env() -> InitMode {
        match std::env::var("UPSTREAM_INIT").as_deref() {
            Ok("exec") => InitMode::Exec,
            _ => InitMode::Auto,
        }
    }
}

/// The host's handle on a running init: a child process of the host.
#[derive(Debug)]
pub struct InitProcess {
    pid: Pid,
    reaped: bool,
    /// Cloned into the sandbox's namespaces: the host writes its id maps right away.
    pub cloned: bool,
}

impl InitProcess {
    pub fn id(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    pub fn kill(&self) {
        if !self.reaped {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
    }

    pub fn wait(&mut self) {
        if !self.reaped {
            while let Err(nix::errno::Errno::EINTR) = waitpid(self.pid, None) {}
            self.reaped = true;
        }
    }

    /// Waits up to `timeout` for the process to exit, without reaping it.
    pub fn exits_within(&self, timeout: Duration) -> bool {
        if self.reaped {
            return true;
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid.as_raw(), 0) };
        if fd < 0 {
            return false;
        }
        // SAFETY: the descriptor was just returned to us and is owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut fds = [nix::poll::PollFd::new(
            pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)), Ok(n) if n > 0)
    }
}

impl Drop for InitProcess {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
            self.wait();
        }
    }
}

fn single_threaded() -> bool {
    fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
}

/// Starts the init; returns the host's end of the connection, the process and its stderr.
/// `new_net` asks for a network namespace of its own; `lock`, when given, is kept open in the
/// init at [`LOCK_FD`] (the lock of the sandbox's id range, held until its pid 1 is gone).
pub fn start_init(
    exe: &Path,
    mode: InitMode,
    new_net: bool,
    lock: Option<BorrowedFd<'_>>,
) -> Result<(UnixStream, InitProcess, OwnedFd), SandboxError> {
    let (host, sandbox) = UnixStream::pair()
        .map_err(|e| SandboxError::setup(format!("cannot create a socket pair: {e}"), None))?;
    let lock = lock.map(|fd| fd.as_raw_fd());
    if mode == InitMode::Auto && single_threaded() {
        if let Some(init) = clone_init(&sandbox, new_net, lock)? {
            return Ok((host, init.0, init.1));
        }
    }
    let init = exec_init(exe, sandbox, lock)?;
    Ok((host, init.0, init.1))
}

fn setup_failed(what: &str, e: impl std::fmt::Display) -> SandboxError {
    SandboxError::setup(format!("cannot start the sandbox init: {what}: {e}"), None)
}

/// The kernel's `struct clone_args`.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Clones the init into new user and pid namespaces (it makes the others). `None` when this
/// kernel has no clone3, so the caller re-executes instead.
fn clone_init(
    sandbox: &UnixStream,
    new_net: bool,
    lock: Option<RawFd>,
) -> Result<Option<(InitProcess, OwnedFd)>, SandboxError> {
    let (stderr_read, stderr_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| setup_failed("pipe", e))?;
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| setup_failed("/dev/null", e))?;
    // Only the user and pid namespaces are made here; the init makes the others itself, in
    // parallel with the host's remaining work (a network namespace takes a while).
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWPID;
    let args = CloneArgs {
        flags: flags as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM duplicates this process like fork; `args` is a valid
    // clone_args of the size passed. The caller checked that this process has one thread, so
    // the child may run any code, as after fork.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        0 => {
            let code = child_setup(sandbox, &null, &stderr_write, lock)
                .map_or(127, |()| crate::init::cloned_main(new_net));
            // SAFETY: _exit ends this process at once, running no destructors or exit hooks
            // that belong to the host's copy of this program.
            unsafe { libc::_exit(code) }
        }
        pid if pid > 0 => Ok(Some((
            InitProcess {
                pid: Pid::from_raw(pid as i32),
                reaped: false,
                cloned: true,
            },
            stderr_read,
        ))),
        _ => match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENOSYS) => Ok(None),
            e if matches!(
                e.raw_os_error(),
                Some(libc::EPERM | libc::EINVAL | libc::ENOSPC)
            ) =>
            {
                Err(SandboxError::setup(
                    format!("cannot create a user namespace: {e}"),
                    None,
                ))
            }
            e => Err(setup_failed("clone3", e)),
        },
    }
}

/// In a cloned init: the descriptors and process attributes an exec'd init would have.
fn child_setup(
    sandbox: &UnixStream,
    null: &fs::File,
    stderr: &OwnedFd,
    lock: Option<RawFd>,
) -> io::Result<()> {
    let dup = |from: RawFd, to: RawFd| {
        // SAFETY: dup2 on descriptors this process owns.
        if unsafe { libc::dup2(from, to) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // The lock goes out of the way first: its number may be one of those set below.
    let lock = match lock {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor this process owns.
        Some(fd) => match unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64) } {
            high if high >= 0 => Some(high),
            _ => return Err(io::Error::last_os_error()),
        },
        None => None,
    };
    dup(null.as_raw_fd(), 0)?;
    dup(null.as_raw_fd(), 1)?;
    dup(stderr.as_raw_fd(), 2)?;
    dup(sandbox.as_raw_fd(), CONN_FD)?;
    let mut first_closed = LOCK_FD;
    if let Some(lock) = lock {
        // Close-on-exec: no command the agent starts holds it.
        // SAFETY: dup3 on descriptors this process owns.
        if unsafe { libc::dup3(lock, LOCK_FD, libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        first_closed = LOCK_FD + 1;
    }
    // Nothing else of the host's open files goes into the sandbox.
    // SAFETY: close_range closes descriptors this process owns; none of them is used after.
    unsafe { libc::syscall(libc::SYS_close_range, first_closed, u32::MAX, 0) };
    isolate_session()
}

/// A session of its own (Ctrl-C at the terminal reaches upstream, which tears the sandbox
/// down, not the sandbox directly), and death with upstream, however upstream dies.
fn isolate_session() -> io::Result<()> {
    // SAFETY: setsid and prctl are async-signal-safe and take no pointers.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn exec_init(
    exe: &Path,
    sandbox: UnixStream,
    lock: Option<RawFd>,
) -> Result<(InitProcess, OwnedFd), SandboxError> {
    let sandbox_fd = sandbox.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg(crate::INIT_ARG)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs between fork and exec in a possibly multi-threaded process, so
    // it makes only async-signal-safe system calls (setsid, prctl, fcntl, dup2) and does not
    // allocate.
    unsafe {
        cmd.pre_exec(move || {
            isolate_session()?;
            // The lock goes out of the way first: its number may be CONN_FD.
            let lock = match lock {
                Some(fd) => match libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64) {
                    high if high >= 0 => Some(high),
                    _ => return Err(io::Error::last_os_error()),
                },
                None => None,
            };
            if libc::dup2(sandbox_fd, CONN_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            // Open across the exec; the init makes it close-on-exec.
            if let Some(lock) = lock {
                if libc::dup2(lock, LOCK_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| setup_failed(&exe.display().to_string(), e))?;
    drop(sandbox);
    let stderr = child
        .stderr
        .take()
        .map(OwnedFd::from)
        .ok_or_else(|| setup_failed("stderr", "no pipe"))?;
    // The handle takes over waiting for the process; std's Child neither kills nor waits when
    // dropped.
    let pid = Pid::from_raw(child.id() as i32);
    drop(child);
    Ok((
        InitProcess {
            pid,
            reaped: false,
            cloned: false,
        },
        stderr,
    ))
}

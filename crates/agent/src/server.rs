//! The agent's serving loop: one request at a time, output streamed while a command runs.
//!
//! The agent is single-threaded. A host that wants commands to run side by side asks for
//! another connection ([`Request::Connect`]): a forked helper serves it the same way, with
//! the commands it starts as its own children, while the agent and other helpers go on. While a command runs it polls the command's stdout and
//! stderr, a signalfd for SIGCHLD, and the host connection (so a host that goes away, or asks
//! for shutdown mid-command, is noticed at once). When the agent is the sandbox's pid 1, a
//! timeout or shutdown kills every other process of the sandbox with one `kill(-1, SIGKILL)`:
//! nothing a step started, however it daemonised, survives.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getpid};

use crate::protocol::{
    ExecRequest, ExitStatus, FrameError, OUTPUT_CHUNK, Request, Response, Scope, Stream,
    read_frame, read_hello, write_frame, write_hello,
};

/// Why the agent stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("agent: {0}")]
    Sys(#[from] Errno),
    #[error("agent: {0}")]
    Io(#[from] io::Error),
}

/// A connection to the host: any byte stream — a Unix socket, a virtio port.
pub(crate) type Conn = fs::File;

/// Serves requests on `conn` (a Unix socket, a virtio port: any byte stream) until the host
/// asks for shutdown or goes away. Greets the host ([`write_hello`]) and sends
/// [`Response::Ready`] first, then takes the host's greeting.
///
/// The calling thread must be its process's only one: SIGCHLD is blocked on this thread and
/// read from a signalfd, and another thread that does not block it could take the signal
/// first, leaving an exited command unnoticed.
pub fn serve(conn: impl Into<OwnedFd>) -> Result<(), AgentError> {
    serve_as(
        Conn::from(conn.into()),
        Role::Agent,
        Score::open(),
        Sessions::Ports,
    )
    .map(drop)
}

/// [`serve`], with helpers attached from `sessions`; why it stopped.
pub fn serve_with(conn: impl Into<OwnedFd>, sessions: Sessions) -> Result<Ended, AgentError> {
    serve_as(
        Conn::from(conn.into()),
        Role::Agent,
        Score::open(),
        sessions,
    )
}

/// Who serves a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The agent itself, on the connection it started with: background commands are its.
    Agent,
    /// A helper forked for another connection: it runs commands in the foreground only.
    Helper,
}

fn serve_as(
    mut conn: Conn,
    role: Role,
    score: Score,
    sessions: Sessions,
) -> Result<Ended, AgentError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block()?;
    let mut sigchld = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
    write_hello(&mut conn)?;
    write_frame(&mut conn, &Response::Ready)?;
    // The host greets before its first request; one of another version is told so by its
    // own check of this side's greeting, and this side just stops.
    if !read_hello(&mut conn)? {
        kill_everything(None);
        return Ok(Ended::HostGone);
    }
    let mut background = Background::default();
    let mut tree = None;
    loop {
        // Between requests, children that end (background commands, helpers whose host
        // closed their connection) are reaped as they end, not left as zombies until the
        // next request.
        idle_until_request(&conn, &mut sigchld, &mut background)?;
        let Some(request) = read_frame::<_, Request>(&mut conn)? else {
            kill_everything(None);
            return Ok(Ended::HostGone);
        };
        match request {
            request @ (Request::Stat { .. }
            | Request::List { .. }
            | Request::ReadLink { .. }
            | Request::Read { .. }
            | Request::Create { .. }
            | Request::Data(_)
            | Request::End { .. }
            | Request::Abort
            | Request::MakeDir { .. }
            | Request::Symlink { .. }
            | Request::SetMeta { .. }
            | Request::Remove { .. }
            | Request::Give { .. }) => {
                crate::files::serve(&mut conn, &mut tree, request)?;
            }
            Request::Exec(exec) => {
                match run(&mut conn, &mut sigchld, &exec, &score, &mut background)? {
                    Flow::Continue => {}
                    Flow::Stop(ended) => return Ok(ended),
                }
            }
            Request::Spawn { .. } | Request::Wait { .. } | Request::Signal { .. }
                if role == Role::Helper =>
            {
                let message = "background commands are started, waited for and signalled \
                               on the sandbox's first connection"
                    .to_string();
                write_frame(&mut conn, &Response::Error { message })?;
            }
            Request::StopProcesses if role == Role::Helper => {
                let message =
                    "the sandbox's processes are stopped on its first connection".to_string();
                write_frame(&mut conn, &Response::Error { message })?;
            }
            Request::Renew { .. } | Request::Freeze | Request::Thaw if role == Role::Helper => {
                let message = "a machine is renewed, and its disk frozen, on its first connection"
                    .to_string();
                write_frame(&mut conn, &Response::Error { message })?;
            }
            Request::Renew {
                hostname,
                entropy,
                unix_nanos,
            } => {
                let reply = match crate::renew::renew(&hostname, &entropy, unix_nanos) {
                    Ok(()) => Response::Done,
                    Err(message) => Response::Error { message },
                };
                write_frame(&mut conn, &reply)?;
            }
            request @ (Request::Freeze | Request::Thaw) => {
                let done = match request {
                    Request::Freeze => crate::renew::freeze(),
                    _ => crate::renew::thaw(),
                };
                let reply = match done {
                    Ok(()) => Response::Done,
                    Err(message) => Response::Error { message },
                };
                write_frame(&mut conn, &reply)?;
            }
            Request::StopProcesses => {
                stop_processes(&mut sigchld, &mut background)?;
                write_frame(&mut conn, &Response::Done)?;
            }
            Request::Connect if role == Role::Helper => {
                // The socket that follows is taken and closed all the same.
                drop(receive_socket(&conn));
                let message = "another connection is asked for on the first one".to_string();
                write_frame(&mut conn, &Response::Error { message })?;
            }
            Request::Attach { port } if role == Role::Helper => {
                let message = format!("port {port} is attached on the first connection");
                write_frame(&mut conn, &Response::Error { message })?;
            }
            Request::Attach { port } => {
                let opened = match sessions {
                    Sessions::Vsock(listener) if port == crate::vsock::ATTACH_NAME => {
                        crate::vsock::accept_live(listener, Some(crate::vsock::ATTACH_WITHIN))
                    }
                    _ => open_port(&port),
                };
                let reply = match opened.and_then(fork_helper) {
                    Ok(()) => Response::Done,
                    Err(e) => Response::Error {
                        message: format!("cannot serve port {port}: {e}"),
                    },
                };
                write_frame(&mut conn, &reply)?;
            }
            Request::Connect => {
                let reply = match receive_socket(&conn).and_then(fork_helper) {
                    Ok(()) => Response::Done,
                    Err(e) => Response::Error {
                        message: format!("cannot serve another connection: {e}"),
                    },
                };
                write_frame(&mut conn, &reply)?;
            }
            Request::Spawn {
                exec,
                stdout,
                stderr,
            } => {
                let started = output_file(&stdout, exec.user)
                    .and_then(|out| Ok((out, output_file(&stderr, exec.user)?)))
                    .and_then(|(out, err)| spawn(&exec, &score, &out, &err));
                let reply = match started {
                    Ok(pid) => {
                        background.started(pid.as_raw());
                        Response::Started { pid: pid.as_raw() }
                    }
                    Err(message) => Response::Error { message },
                };
                write_frame(&mut conn, &reply)?;
            }
            Request::Wait { pid, timeout_ms } => {
                match wait(&mut conn, &mut sigchld, pid, timeout_ms, &mut background)? {
                    Flow::Continue => {}
                    Flow::Stop(ended) => return Ok(ended),
                }
            }
            Request::Signal { pid, signal } => {
                let reply = match (background.status(pid), Signal::try_from(signal)) {
                    (None, _) => Response::Error {
                        message: format!("no background command has pid {pid}"),
                    },
                    (_, Err(_)) => Response::Error {
                        message: format!("{signal} is not a signal"),
                    },
                    (Some(Some(_)), _) => Response::Done,
                    (Some(None), Ok(sig)) => match killpg(Pid::from_raw(pid), sig) {
                        Ok(()) | Err(Errno::ESRCH) => Response::Done,
                        Err(e) => Response::Error {
                            message: format!("cannot signal {pid}: {e}"),
                        },
                    },
                };
                write_frame(&mut conn, &reply)?;
            }
            Request::ReadFile { path, limit } => {
                let reply = match read_file(Path::new(&path), limit) {
                    Ok(data) => Response::File { data },
                    Err(message) => Response::Error { message },
                };
                write_frame(&mut conn, &reply)?;
            }
            Request::WriteFile { path, data, mode } => {
                let reply = match write_file(Path::new(&path), &data, mode) {
                    Ok(()) => Response::Done,
                    Err(e) => Response::Error {
                        message: format!("cannot write {path}: {e}"),
                    },
                };
                write_frame(&mut conn, &reply)?;
            }
            Request::Shutdown => {
                kill_everything(None);
                write_frame(&mut conn, &Response::Done)?;
                return Ok(Ended::Shutdown);
            }
        }
    }
}

enum Flow {
    Continue,
    Stop(Ended),
}

/// Why the agent stopped serving a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The host asked it to shut down.
    Shutdown,
    /// The host's connection ended (or greeted in another version).
    HostGone,
}

/// Where the helpers a host asks for with [`Request::Attach`] are served from.
#[derive(Debug, Clone, Copy)]
pub enum Sessions<'a> {
    /// The VM's virtio ports, by the names the host gave them ([`crate::ports`]).
    Ports,
    /// Connections to this vsock listener ([`crate::vsock::SESSION_PORT`]), attached by
    /// the name [`crate::vsock::ATTACH_NAME`].
    Vsock(BorrowedFd<'a>),
}

/// Reaps children as they end until the host's connection has something to read (a
/// request, or its end).
fn idle_until_request(
    conn: &Conn,
    sigchld: &mut SignalFd,
    background: &mut Background,
) -> Result<(), AgentError> {
    loop {
        reap(None, background);
        if wait_for_host(conn, sigchld, PollTimeout::NONE)? {
            return Ok(());
        }
    }
}

/// Waits up to `timeout` until the host's connection has something to read or a child
/// ends (whose signal it takes); returns whether the connection is readable.
fn wait_for_host(
    conn: &Conn,
    sigchld: &mut SignalFd,
    timeout: PollTimeout,
) -> Result<bool, AgentError> {
    let (chld_ready, conn_ready) = {
        let mut fds = [
            PollFd::new(sigchld.as_fd(), PollFlags::POLLIN),
            PollFd::new(conn.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
        (ready(0), ready(1))
    };
    if chld_ready {
        while let Ok(Some(_)) = sigchld.read_signal() {}
    }
    Ok(conn_ready)
}

/// A poll timeout for `left` (`None`: none), rounded up to whole milliseconds and at most a
/// minute: the caller looks again when it ends.
fn poll_timeout(left: Option<Duration>) -> PollTimeout {
    match left {
        Some(left) => PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1)
            .unwrap_or(PollTimeout::MAX),
        None => PollTimeout::NONE,
    }
}

/// Takes the socket the host sent after a `Connect` frame: one byte carrying it.
fn receive_socket(conn: &Conn) -> io::Result<OwnedFd> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{FromRawFd, RawFd};
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let msg = loop {
        match recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    if msg.bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process, and
            // nothing else refers to them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let mut fds = fds.into_iter();
    match (fds.next(), fds.next()) {
        (Some(fd), None) => Ok(fd),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "expected exactly one socket after Connect",
        )),
    }
}

/// Opens the virtio port named `name` for a helper to serve ([`Request::Attach`]), once the
/// kernel has added it ([`crate::ports`]).
fn open_port(name: &str) -> io::Result<OwnedFd> {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        && !name.starts_with('.');
    if !plain {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a port's name is letters, digits, `.`, `-` and `_`",
        ));
    }
    crate::ports::open(&crate::ports::wait_for(name, crate::ports::APPEAR_WITHIN)?)
}

/// Forks a helper that serves `socket` (a socket or a port) and exits when it is done.
fn fork_helper(socket: OwnedFd) -> io::Result<()> {
    use nix::unistd::{ForkResult, fork};
    // SAFETY: the agent is its process's only thread, so the child starts consistent.
    match unsafe { fork() }? {
        ForkResult::Child => {
            // The first connection is the agent's alone: a helper holding it would keep
            // the host from seeing the agent go away. Nor does a helper keep anything else
            // of the agent's (its score, its signalfd, its standard streams): only its own
            // connection, at 3.
            let socket = std::os::fd::IntoRawFd::into_raw_fd(socket);
            let kept = (|| -> Result<OwnedFd, Errno> {
                // SAFETY: fcntl, open, dup2 and close_range on descriptors of this helper
                // only. The connection first goes out of the way (to 10 or above), then
                // /dev/null onto 0 to 2, the connection to 3, and everything above closes.
                unsafe {
                    let high = libc::fcntl(socket, libc::F_DUPFD_CLOEXEC, 10);
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
                    if high < 0 || null < 0 {
                        return Err(Errno::last());
                    }
                    for target in 0..3 {
                        if null != target && libc::dup2(null, target) != target {
                            return Err(Errno::last());
                        }
                    }
                    if libc::dup2(high, 3) != 3
                        || libc::fcntl(3, libc::F_SETFD, libc::FD_CLOEXEC) != 0
                        || libc::syscall(libc::SYS_close_range, 4, libc::c_uint::MAX, 0) != 0
                    {
                        return Err(Errno::last());
                    }
                    Ok(<OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(3))
                }
            })();
            let Ok(socket) = kept else {
                // SAFETY: _exit ends the helper without running anything of the agent's.
                unsafe { libc::_exit(1) }
            };
            let score = match raise_own_score() {
                true => Score::Commands,
                false => Score::Child,
            };
            let code = i32::from(
                serve_as(Conn::from(socket), Role::Helper, score, Sessions::Ports).is_err(),
            );
            // SAFETY: _exit ends the helper without running anything of the agent's.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { .. } => Ok(()),
    }
}

/// Commands started in the background, with how each ended once it has.
#[derive(Default)]
struct Background {
    commands: std::collections::BTreeMap<i32, Option<ExitStatus>>,
}

impl Background {
    /// The most ended commands remembered; the oldest are forgotten past it.
    const KEEP_ENDED: usize = 4096;

    fn started(&mut self, pid: i32) {
        // A pid is reused only after its last holder was reaped, so an ended entry under
        // the same number is stale.
        self.commands.insert(pid, None);
        let ended: Vec<i32> = self
            .commands
            .iter()
            .filter(|(_, status)| status.is_some())
            .map(|(pid, _)| *pid)
            .collect();
        for pid in ended
            .iter()
            .take(ended.len().saturating_sub(Self::KEEP_ENDED))
        {
            self.commands.remove(pid);
        }
    }

    /// `None`: never spawned; `Some(None)`: still running.
    fn status(&self, pid: i32) -> Option<Option<ExitStatus>> {
        self.commands.get(&pid).copied()
    }

    fn ended(&mut self, pid: Pid, status: ExitStatus) {
        if let Some(entry) = self.commands.get_mut(&pid.as_raw()) {
            *entry = Some(status);
        }
    }
}

/// Waits for a background command to end, or for the timeout; answers `Waited`.
fn wait(
    conn: &mut Conn,
    sigchld: &mut SignalFd,
    pid: i32,
    timeout_ms: Option<u64>,
    background: &mut Background,
) -> Result<Flow, AgentError> {
    let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
    loop {
        reap(None, background);
        let status = match background.status(pid) {
            None => {
                let message = format!("no background command has pid {pid}");
                write_frame(conn, &Response::Error { message })?;
                return Ok(Flow::Continue);
            }
            Some(status) => status,
        };
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if status.is_some() || left == Some(Duration::ZERO) {
            write_frame(conn, &Response::Waited { status })?;
            return Ok(Flow::Continue);
        }
        if wait_for_host(conn, sigchld, poll_timeout(left))? {
            match read_frame::<_, Request>(conn)? {
                Some(Request::Shutdown) => {
                    kill_everything(None);
                    write_frame(conn, &Response::Done)?;
                    return Ok(Flow::Stop(Ended::Shutdown));
                }
                None => {
                    kill_everything(None);
                    return Ok(Flow::Stop(Ended::HostGone));
                }
                Some(_) => write_frame(
                    conn,
                    &Response::Error {
                        message: "the agent is busy waiting for a command".into(),
                    },
                )?,
            }
        }
    }
}

fn run(
    conn: &mut Conn,
    sigchld: &mut SignalFd,
    req: &ExecRequest,
    score: &Score,
    background: &mut Background,
) -> Result<Flow, AgentError> {
    let start = Instant::now();
    let started = output_pipes().and_then(|(readers, (out_write, err_write))| {
        spawn(req, score, &out_write, &err_write).map(|pid| (pid, readers))
    });
    let (pid, (out, err)) = match started {
        Ok(started) => started,
        Err(message) => {
            write_frame(conn, &Response::Error { message })?;
            return Ok(Flow::Continue);
        }
    };
    let kill = |pid: Pid| match req.timeout_kills {
        Scope::Sandbox => kill_everything(Some(pid)),
        Scope::Command => {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    };
    write_frame(conn, &Response::Started { pid: pid.as_raw() })?;
    let mut stdout = Some(Pipe {
        file: fs::File::from(out),
        stream: Stream::Stdout,
    });
    let mut stderr = Some(Pipe {
        file: fs::File::from(err),
        stream: Stream::Stderr,
    });
    let deadline = req.timeout_ms.map(|ms| start + Duration::from_millis(ms));
    let mut timed_out = false;
    let mut status = None;
    while status.is_none() {
        let timeout = match deadline {
            Some(_) if timed_out => PollTimeout::from(100u16),
            Some(d) => poll_timeout(Some(d.saturating_duration_since(Instant::now()))),
            None => PollTimeout::NONE,
        };
        let (out_ready, err_ready, chld_ready, conn_ready) = {
            let conn_fd = conn.as_fd();
            let chld_fd = sigchld.as_fd();
            let mut fds = vec![
                PollFd::new(chld_fd, PollFlags::POLLIN),
                PollFd::new(conn_fd, PollFlags::POLLIN),
            ];
            let out_at = stdout.as_ref().map(|p| {
                fds.push(PollFd::new(p.fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
            let err_at = stderr.as_ref().map(|p| {
                fds.push(PollFd::new(p.fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
            (
                out_at.is_some_and(ready),
                err_at.is_some_and(ready),
                ready(0),
                ready(1),
            )
        };
        if out_ready && !forward(conn, &mut stdout)? {
            stdout = None;
        }
        if err_ready && !forward(conn, &mut stderr)? {
            stderr = None;
        }
        if conn_ready {
            match read_frame::<_, Request>(conn)? {
                Some(Request::Shutdown) => {
                    kill_everything(Some(pid));
                    reap(Some(pid), background);
                    write_frame(conn, &Response::Done)?;
                    return Ok(Flow::Stop(Ended::Shutdown));
                }
                None => {
                    // The host went away: nobody is left to report to.
                    kill_everything(Some(pid));
                    return Ok(Flow::Stop(Ended::HostGone));
                }
                Some(_) => write_frame(
                    conn,
                    &Response::Error {
                        message: "the agent is busy running a command".into(),
                    },
                )?,
            }
        }
        if chld_ready {
            while let Ok(Some(_)) = sigchld.read_signal() {}
        }
        status = reap(Some(pid), background);
        if status.is_none() && !timed_out && deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            kill(pid);
        }
    }
    // A command killed outright from outside (the kernel, for want of memory) takes its
    // process group with it: what it left running would hold the memory it ran out of,
    // and the next step would find none.
    if !timed_out && status == Some(ExitStatus::Signal(libc::SIGKILL)) {
        let _ = killpg(pid, Signal::SIGKILL);
    }
    // What the command wrote before it exited is in the pipes; take it, but do not wait for
    // background processes that still hold them open.
    for pipe in [&mut stdout, &mut stderr] {
        if let Some(p) = pipe.as_ref() {
            set_nonblocking(p.fd())?;
        }
        for _ in 0..64 {
            match forward(conn, pipe) {
                Ok(true) => {}
                Ok(false) => break,
                Err(AgentError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
    let micros = start.elapsed().as_micros() as u64;
    let status = status.unwrap_or(ExitStatus::Signal(9));
    write_frame(
        conn,
        &Response::Exited {
            status,
            timed_out,
            micros,
            collected: req
                .collect
                .as_ref()
                .map(|c| read_file(Path::new(&c.path), c.limit)),
            oom_kills: oom_kills(),
            disk_full: (!status.success()).then(|| crate::sandboxfs::is_full(Path::new("/"))),
        },
    )?;
    Ok(Flow::Continue)
}

/// The `oom_kill` count of this process's cgroup, where a cgroup v2 hierarchy is mounted at
/// `/sys/fs/cgroup` (a VM's guest mounts one; a namespace sandbox has none).
fn oom_kills() -> Option<u64> {
    let cgroup = fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let events = fs::read_to_string(format!("/sys/fs/cgroup{}/memory.events", path.trim())).ok()?;
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// The read end of a command's stdout or stderr.
struct Pipe {
    file: fs::File,
    stream: Stream,
}

impl Pipe {
    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn stream(&self) -> Stream {
        self.stream
    }
}

/// Moves one read's worth of a pipe to the host. `Ok(false)` when the pipe is done.
fn forward(conn: &mut Conn, pipe: &mut Option<Pipe>) -> Result<bool, AgentError> {
    let Some(p) = pipe.as_mut() else {
        return Ok(false);
    };
    // Read straight into the frame's buffer, which is not zeroed first: the pages a chunk
    // does not fill are never touched (a command that prints nothing costs none).
    let mut data: Vec<u8> = Vec::with_capacity(OUTPUT_CHUNK);
    let n = loop {
        // SAFETY: read(2) writes at most `capacity` bytes into the vector's spare capacity,
        // which is allocated and owned by `data`.
        let n = unsafe {
            libc::read(
                p.fd().as_raw_fd(),
                data.as_mut_ptr().cast(),
                data.capacity(),
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    if n == 0 {
        *pipe = None;
        return Ok(false);
    }
    // SAFETY: the kernel initialised the first `n` bytes.
    unsafe { data.set_len(n) };
    write_frame(
        conn,
        &Response::Output {
            stream: p.stream(),
            data,
        },
    )?;
    Ok(true)
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Starts a command writing to `out` and `err`; returns its pid.
///
/// See [`spawn_child`]; stdin is the request's (else /dev/null), the working directory the
/// request's (the agent moves there first, and back to `/` after).
fn spawn(
    req: &ExecRequest,
    score: &Score,
    out_write: &OwnedFd,
    err_write: &OwnedFd,
) -> Result<Pid, String> {
    let Some(program) = req.argv.first() else {
        return Err("no command given".into());
    };
    // Standard input: the request's bytes in a memory file, else /dev/null.
    let stdin = if req.stdin.is_empty() {
        fs::File::open("/dev/null").map_err(|e| format!("cannot open /dev/null: {e}"))?
    } else {
        use std::io::Seek;
        let fail = |e: io::Error| format!("cannot start `{program}`: stdin: {e}");
        let memfd = nix::sys::memfd::memfd_create(c"stdin", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| fail(e.into()))?;
        let mut file = fs::File::from(memfd);
        file.write_all(&req.stdin).map_err(fail)?;
        file.seek(io::SeekFrom::Start(0)).map_err(fail)?;
        file
    };
    for file in &req.files {
        write_file(Path::new(&file.path), &file.data, file.mode)
            .map_err(|e| format!("cannot write {}: {e}", file.path))?;
    }
    if let Err(e) = fs::create_dir_all(&req.cwd).and_then(|()| std::env::set_current_dir(&req.cwd))
    {
        return Err(format!(
            "cannot create the working directory {}: {e}",
            req.cwd
        ));
    }
    let path_var = req
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let Some(path) = resolve(program, path_var) else {
        let _ = std::env::set_current_dir("/");
        return Err(format!("`{program}` was not found in the sandbox"));
    };
    let cstring =
        |s: &[u8]| CString::new(s).map_err(|_| "an argument holds a NUL byte".to_string());
    let argv = req
        .argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = req
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let sys = |what: &str, e: Errno| format!("cannot start `{program}`: {what}: {e}");
    if let Some((uid, gid)) = req.user {
        // A working directory root owns (the workspace upstream made) is given to the user,
        // so the command can write where it starts; one the image gave someone is left.
        let given = nix::sys::stat::stat(req.cwd.as_str()).and_then(|st| {
            if st.st_uid != 0 {
                return Ok(());
            }
            nix::unistd::chown(
                req.cwd.as_str(),
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
        });
        if let Err(e) = given {
            let _ = std::env::set_current_dir("/");
            return Err(format!(
                "cannot give the working directory {} to uid {uid}: {e}",
                req.cwd
            ));
        }
    }
    let raised = match score {
        Score::Own(own) if alone() => own.raise(),
        Score::Own(_) | Score::Child | Score::Commands => None,
    };
    let inherits = matches!(score, Score::Commands);
    let spawned = match (&raised, req.user) {
        // The child has the commands' score from this process: raised for it, or for good.
        (raised, None) if raised.is_some() || inherits => spawn_vfork(
            raised.as_ref(),
            &path,
            &argv,
            &envp,
            &stdin,
            out_write,
            err_write,
        ),
        (raised, user) => spawn_child(
            user,
            raised.as_ref(),
            inherits,
            &path,
            &argv,
            &envp,
            &stdin,
            out_write,
            err_write,
        ),
    };
    drop(raised);
    // The agent does not stay in the working directory: it would keep the workspace's
    // overlay in use, and the host replaces that between steps.
    let _ = std::env::set_current_dir("/");
    spawned.map_err(|e| match e {
        Errno::ENOENT => format!("`{program}` was not found in the sandbox"),
        Errno::EACCES => format!("cannot start `{program}`: permission denied"),
        Errno::ETIMEDOUT => format!(
            "`{program}` did not start within {} s: its process was stopped or could not run \
             before exec, and was killed",
            CHILD_START.as_secs()
        ),
        e => sys("fork", e),
    })
}

/// Two descriptors: for stdout and for stderr.
type Pair = (OwnedFd, OwnedFd);

/// A pipe for each of a command's stdout and stderr: (read ends, write ends).
fn output_pipes() -> Result<(Pair, Pair), String> {
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("cannot make a pipe: {e}"))
    };
    let (out_read, out_write) = pipe()?;
    let (err_read, err_write) = pipe()?;
    Ok(((out_read, err_read), (out_write, err_write)))
}

/// Opens a background command's output file for appending (made with its parents when
/// missing), owned by the command's user.
fn output_file(path: &str, user: Option<(u32, u32)>) -> Result<OwnedFd, String> {
    if let Some(parent) = Path::new(path).parent() {
        fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let file = open_without_waiting(
        fs::OpenOptions::new().create(true).append(true).mode(0o644),
        Path::new(path),
    )
    .map_err(|e| format!("cannot open {path}: {e}"))?;
    if let Some((uid, gid)) = user {
        nix::unistd::fchown(
            &file,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| format!("cannot give {path} to uid {uid}: {e}"))?;
    }
    Ok(file.into())
}

/// How long a forked child may take from fork to exec.
const CHILD_START: Duration = Duration::from_secs(10);

/// What a command's OOM score is: the highest, so that when the sandbox runs out of memory
/// the kernel kills the biggest of the commands, and the agent (whose score is lower: see
/// the host's `protect_agent`) only once no command is left. A step may lower its own score
/// again, as far as the agent's: it may then get its own agent killed, which ends its
/// sandbox and nothing else.
const COMMAND_OOM_SCORE: &[u8] = b"1000";

/// How a command gets [`COMMAND_OOM_SCORE`].
enum Score {
    /// Through the agent's own score, raised while it starts the command (see [`Raised`]).
    Own(OwnScore),
    /// The child raises its own before exec: for an agent that could not open its own.
    Child,
    /// This process runs at the commands' score already (a helper raised its own when it
    /// started, [`raise_own_score`]): a child inherits it.
    Commands,
}

impl Score {
    /// The agent's own score when it can open it, else [`Score::Child`].
    fn open() -> Score {
        match OwnScore::open() {
            Ok(own) => Score::Own(own),
            Err(_) => Score::Child,
        }
    }
}

/// The agent's `/proc/self/oom_score_adj`, opened once.
///
/// The agent is not dumpable (it left the host's ids for the sandbox's), which makes its
/// `/proc` files the host's, so it cannot open its own score as it is. It opens it when it
/// starts serving, the one moment it may be dumpable for two system calls: no other process
/// of the sandbox exists yet that could reach it through `/proc` meanwhile. A helper, forked
/// later, holds no such descriptor: it raises its own score for good ([`raise_own_score`]).
struct OwnScore {
    file: fs::File,
}

impl OwnScore {
    fn open() -> io::Result<OwnScore> {
        let dumpable = nix::sys::prctl::get_dumpable()?;
        if !dumpable {
            nix::sys::prctl::set_dumpable(true)?;
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/self/oom_score_adj");
        if !dumpable && nix::sys::prctl::set_dumpable(false).is_err() {
            // Never serve dumpable: the sandbox could reach the agent's descriptors.
            // SAFETY: _exit ends the agent before it serves anything.
            unsafe { libc::_exit(1) }
        }
        Ok(OwnScore { file: file? })
    }

    /// Raises the agent's score to the commands', for a child to inherit; `None` if it
    /// cannot be read or raised (the child then raises its own).
    fn raise(&self) -> Option<Raised<'_>> {
        use std::os::unix::fs::FileExt;
        let mut was = [0u8; 8];
        let len = self.file.read_at(&mut was, 0).ok()?;
        let len = was[..len].trim_ascii_end().len();
        self.file.write_at(COMMAND_OOM_SCORE, 0).ok()?;
        Some(Raised {
            file: &self.file,
            was,
            len,
        })
    }
}

/// A helper, just forked, raises its own score to the commands', so that what it starts
/// inherits it (`CLONE_VFORK`, as the agent starts commands when it is alone) and no child
/// has to raise its own. It is dumpable for the three calls that takes, as a command's
/// forked child is before its exec, and holds nothing by then but a copy of the agent's
/// memory and its own connection; a helper the kernel takes for want of memory ends only
/// its session. Whether it could: if not, the helper's children raise their own
/// ([`Score::Child`]).
fn raise_own_score() -> bool {
    if nix::sys::prctl::set_dumpable(true).is_err() {
        return false;
    }
    let raised = fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/oom_score_adj")
        .and_then(|mut f| f.write_all(COMMAND_OOM_SCORE))
        .is_ok();
    if nix::sys::prctl::set_dumpable(false).is_err() {
        // Never serve dumpable: the sandbox could reach the helper's connection.
        // SAFETY: _exit ends the helper before it serves anything.
        unsafe { libc::_exit(1) }
    }
    raised
}

/// Whether no other process of the sandbox exists: the agent is its pid 1 and has no
/// children (every other process of the sandbox is a descendant of pid 1, or an orphan it
/// adopted). Only then may the agent raise its own score to start a command: a process
/// already running could stop the child before it puts the agent's score back, and keep
/// the agent at the commands' score, suspended, for the kernel to pick.
fn alone() -> bool {
    if getpid().as_raw() != 1 {
        return false;
    }
    // SAFETY: all-zero bytes are a valid `siginfo_t`; waitid with WNOWAIT only looks.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into `info`, which outlives the call.
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    rc == -1 && Errno::last() == Errno::ECHILD
}

/// The agent's score, raised to the commands' while it starts one, and only while it is
/// alone in the sandbox ([`alone`]). The child inherits it and puts the agent's back
/// ([`Raised::restore`]) first of all, before its exec, so the agent has the commands' score
/// only while a child is being made and nothing else runs; dropping this puts it back too,
/// for a child that did not get so far.
///
/// Raising needs no privilege, and neither does going back: a process may lower its score
/// as far as the last one a privileged process gave it. Should the sandbox run out of
/// memory in that moment, the kernel takes the biggest process of the highest score, which
/// the agent is not.
struct Raised<'a> {
    file: &'a fs::File,
    was: [u8; 8],
    len: usize,
}

impl Raised<'_> {
    /// Puts the agent's score back. Async-signal-safe, for a child before its exec: it
    /// writes through the agent's descriptor, and so changes the agent's score, not its own.
    fn restore(&self) -> bool {
        // SAFETY: writes `len` bytes of a buffer that outlives the call.
        let written =
            unsafe { libc::pwrite(self.file.as_raw_fd(), self.was.as_ptr().cast(), self.len, 0) };
        written == self.len as isize
    }
}

impl Drop for Raised<'_> {
    fn drop(&mut self) {
        if !self.restore() {
            // Staying at the commands' score would make the agent a victim like them.
            // SAFETY: _exit ends the agent; the host sees it go and says so.
            unsafe { libc::_exit(1) }
        }
    }
}

/// Starts a command as posix_spawn would, in a child that shares the agent's memory until
/// its exec (`CLONE_VM | CLONE_VFORK`: no page tables copied, the agent suspended until the
/// exec, none of its pages to copy on write after). The child puts the agent's score back,
/// takes `stdin`, `out` and `err` as 0, 1 and 2, closes every other descriptor it inherited,
/// goes into a process group of its own with an empty signal mask and default SIGPIPE, and
/// execs. It makes only system calls, on data the agent made before.
fn spawn_vfork(
    raised: Option<&Raised<'_>>,
    path: &Path,
    argv: &[CString],
    envp: &[CString],
    stdin: &fs::File,
    out: &OwnedFd,
    err: &OwnedFd,
) -> Result<Pid, Errno> {
    use std::sync::atomic::{AtomicI32, Ordering};
    let program = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Errno::EINVAL)?;
    let pointers = |strings: &[CString]| {
        let mut pointers: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        pointers.push(std::ptr::null());
        pointers
    };
    let (argv, envp) = (pointers(argv), pointers(envp));
    let (stdin, out, err) = (stdin.as_raw_fd(), out.as_raw_fd(), err.as_raw_fd());
    // The child's errno when it fails before exec: memory it shares with the agent.
    let failed = AtomicI32::new(0);
    let child = || -> isize {
        let fail = || -> ! {
            failed.store(Errno::last_raw(), Ordering::Relaxed);
            // SAFETY: ends the child without running anything of the agent's.
            unsafe { libc::_exit(127) }
        };
        if raised.is_some_and(|raised| !raised.restore()) {
            fail();
        }
        // SAFETY: system calls on descriptors and buffers the agent made and keeps until
        // this child has exec'd or exited; none of them allocates or takes a lock.
        unsafe {
            for (fd, target) in [(stdin, 0), (out, 1), (err, 2)] {
                if libc::dup2(fd, target) < 0 {
                    fail();
                }
            }
            if libc::syscall(libc::SYS_close_range, 3, libc::c_uint::MAX, 0) != 0
                || libc::setpgid(0, 0) != 0
            {
                fail();
            }
            let mut empty = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut empty);
            if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0
                || libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR
            {
                fail();
            }
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        }
        fail()
    };
    // Deep enough for the calls above, which are all that run on it.
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the child runs on `stack` only the calls above; the agent is suspended until it
    // has exec'd or exited (CLONE_VFORK), so nothing of the agent's changes under it, and all
    // it uses lives until this function returns.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(child),
            &mut stack,
            nix::sched::CloneFlags::CLONE_VM | nix::sched::CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    }?;
    match failed.load(Ordering::Relaxed) {
        0 => Ok(pid),
        errno => {
            // The child is gone: reap it so it is not mistaken for a command.
            let _ = waitpid(pid, None);
            Err(Errno::from_raw(errno))
        }
    }
}

/// Starts a command: fork (the agent is single-threaded, so the child may run any code),
/// put the agent's score back when it is `raised` for the child, else give the child the
/// commands' OOM score itself unless it `inherits` it ([`Score::Commands`]), put it in a process group of
/// its own with an empty signal mask and default SIGPIPE, drop to `user` when one is given
/// (the child loses every capability when it leaves uid 0), then exec. An error of the child before exec is the spawn's error.
#[allow(clippy::too_many_arguments)]
fn spawn_child(
    user: Option<(u32, u32)>,
    raised: Option<&Raised<'_>>,
    inherits: bool,
    path: &Path,
    argv: &[CString],
    envp: &[CString],
    null: &fs::File,
    out: &OwnedFd,
    err: &OwnedFd,
) -> Result<Pid, Errno> {
    use nix::unistd::{ForkResult, Gid, Uid, dup2_raw, fork};
    let program = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Errno::EINVAL)?;
    // The child reports an error before exec as its errno on this pipe; exec closes it.
    let (report_read, report_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the agent runs a single thread: nothing in the child can find a lock held by
    // another thread.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => {
            drop(report_write);
            let mut errno = [0u8; 4];
            let mut got = 0;
            // A child that neither execs nor fails within this long was stopped (a process
            // of the sandbox may signal it) or cannot run: it is killed, so the agent is
            // never held here past the command's own timeout.
            let deadline = Instant::now() + CHILD_START;
            while got < errno.len() {
                let left = deadline.saturating_duration_since(Instant::now());
                let mut fds = [PollFd::new(report_read.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, poll_timeout(Some(left))) {
                    Ok(0) if Instant::now() >= deadline => {
                        let _ = kill(child, Signal::SIGKILL);
                        let _ = nix::sys::wait::waitpid(child, None);
                        return Err(Errno::ETIMEDOUT);
                    }
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(_) => break,
                }
                if fds[0].revents().is_none_or(|r| r.is_empty()) {
                    continue;
                }
                match nix::unistd::read(&report_read, &mut errno[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(Errno::EINTR) => {}
                    Err(_) => break,
                }
            }
            if got < errno.len() {
                return Ok(child);
            }
            // The child is gone or going: reap it so it is not mistaken for a command.
            let _ = nix::sys::wait::waitpid(child, None);
            Err(Errno::from_raw(i32::from_ne_bytes(errno)))
        }
        ForkResult::Child => {
            let setup = (|| -> Result<(), Errno> {
                // The child has the agent's raised score: the agent's goes back.
                if raised.is_some_and(|raised| !raised.restore()) {
                    return Err(Errno::last());
                }
                if let Some((uid, gid)) = user {
                    nix::unistd::setgroups(&[])?;
                    let gid = Gid::from_raw(gid);
                    nix::unistd::setresgid(gid, gid, gid)?;
                    let uid = Uid::from_raw(uid);
                    nix::unistd::setresuid(uid, uid, uid)?;
                }
                for (fd, target) in [(null.as_fd(), 0), (out.as_fd(), 1), (err.as_fd(), 2)] {
                    // SAFETY: the descriptors are open; dup2 onto 0, 1 and 2 of this child.
                    // The returned owner is forgotten: dropping it would close what it made.
                    std::mem::forget(unsafe { dup2_raw(fd, target) }?);
                }
                // Nothing of the agent's but the report pipe stays open past this point.
                let report = report_write.as_raw_fd() as libc::c_uint;
                for (first, last) in [
                    (3, report.saturating_sub(1)),
                    (report + 1, libc::c_uint::MAX),
                ] {
                    if first <= last {
                        // SAFETY: closes descriptors of this child only; none is used after.
                        unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
                    }
                }
                // The agent is not dumpable, which makes its /proc files (and a child's
                // before exec) the host's: this child becomes dumpable, as exec would make
                // it anyway, so that it can raise its own OOM score. Raising needs no
                // privilege. Until exec it holds nothing but a copy of the agent's memory.
                if raised.is_none() && !inherits {
                    nix::sys::prctl::set_dumpable(true)?;
                    let score = nix::fcntl::open(
                        "/proc/self/oom_score_adj",
                        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                        nix::sys::stat::Mode::empty(),
                    )?;
                    nix::unistd::write(&score, COMMAND_OOM_SCORE)?;
                    drop(score);
                }
                nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))?;
                nix::sys::signal::sigprocmask(
                    nix::sys::signal::SigmaskHow::SIG_SETMASK,
                    Some(&SigSet::empty()),
                    None,
                )?;
                // SAFETY: back to the default action in this child only.
                unsafe {
                    nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl)
                }?;
                nix::unistd::execve(&program, argv, envp)?;
                Ok(())
            })();
            if let Err(e) = setup {
                let errno = (e as i32).to_ne_bytes();
                // SAFETY: writes a buffer that outlives the call to the report pipe.
                let _ = unsafe { libc::write(report_write.as_raw_fd(), errno.as_ptr().cast(), 4) };
            }
            // SAFETY: leaves the child without running the agent's destructors.
            unsafe { libc::_exit(127) }
        }
    }
}

/// Where `program` is: itself when it names a path, else the first executable of that name
/// in `path_var` (the command's PATH, not the agent's).
fn resolve(program: &str, path_var: Option<&str>) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        return Some(program.into());
    }
    let executable =
        |p: &Path| p.is_file() && nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok();
    path_var?
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|p| executable(p))
}

/// Reaps exited processes, noting how background commands ended; returns the status of
/// `main` if it is among them.
fn reap(main: Option<Pid>, background: &mut Background) -> Option<ExitStatus> {
    let mut found = None;
    loop {
        let (pid, status) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(_) => continue,
        };
        if Some(pid) == main {
            found = Some(status);
        } else {
            background.ended(pid, status);
        }
    }
}

/// Kills every other process of the sandbox (when the agent is not its init: every
/// background command's process group) and reaps them, for up to ten seconds: a process
/// the kernel is still taking down is reaped as soon as it is gone.
fn stop_processes(sigchld: &mut SignalFd, background: &mut Background) -> Result<(), AgentError> {
    if getpid().as_raw() == 1 {
        kill_everything(None);
    } else {
        for (pid, status) in &background.commands {
            if status.is_none() {
                let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        reap(None, background);
        let running = background.commands.values().any(Option::is_none);
        // As init, every process left is a child (orphans come to it): once the zombies are
        // reaped, "no child" means all are gone.
        let children = getpid().as_raw() == 1
            && match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Err(Errno::ECHILD) => false,
                Ok(WaitStatus::Exited(pid, code)) => {
                    background.ended(pid, ExitStatus::Code(code));
                    true
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    background.ended(pid, ExitStatus::Signal(sig as i32));
                    true
                }
                _ => true,
            };
        if !(running || children) || Instant::now() >= deadline {
            return Ok(());
        }
        let mut fds = [PollFd::new(sigchld.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(10u16)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        while let Ok(Some(_)) = sigchld.read_signal() {}
    }
}

/// Kills every process of the sandbox when the agent is its init, else the command's session.
fn kill_everything(main: Option<Pid>) {
    if getpid().as_raw() == 1 {
        // As pid 1 of the sandbox's pid namespace, -1 means every other process in it.
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    } else if let Some(pid) = main {
        let _ = killpg(pid, Signal::SIGKILL);
    }
}

/// Opens `path` without ever waiting (a FIFO with no one at the other end answers at once
/// instead of holding the agent, which serves one request at a time), then makes the
/// descriptor blocking again for its user.
fn open_without_waiting(options: &mut fs::OpenOptions, path: &Path) -> io::Result<fs::File> {
    let file = options
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(file)
}

/// Opens a regular file without waiting ([`open_without_waiting`]); anything else is refused.
fn open_regular(options: &mut fs::OpenOptions, path: &Path) -> io::Result<fs::File> {
    let file = open_without_waiting(options, path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    }
    if !kind.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, socket or device)",
        ));
    }
    Ok(file)
}

fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let file = open_regular(fs::OpenOptions::new().read(true), path).map_err(|e| {
        match e.raw_os_error() {
            Some(libc::EISDIR) => format!("{} is a directory", path.display()),
            _ => format!("cannot read {}: {e}", path.display()),
        }
    })?;
    let mut data = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if data.len() as u64 > limit {
        return Err(format!("{} is larger than {limit} bytes", path.display()));
    }
    Ok(data)
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    // Truncated only once it is known to be a regular file.
    let f = open_regular(
        fs::OpenOptions::new().write(true).create(true).mode(mode),
        path,
    )?;
    f.set_len(0)?;
    // The mode asked for, whatever the umask took from it at the create (an outputs file
    // made for every user is 0666) or the file had before.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777))?;
    (&f).write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::process::{Command, Stdio};
    use std::thread;

    fn request(conn: &mut UnixStream, req: &Request) -> Vec<Response> {
        write_frame(conn, req).unwrap();
        let mut got = Vec::new();
        loop {
            let r: Response = read_frame(conn).unwrap().expect("agent answers");
            let last = matches!(
                r,
                Response::Exited { .. }
                    | Response::Done
                    | Response::Error { .. }
                    | Response::File { .. }
            );
            got.push(r);
            if last {
                return got;
            }
        }
    }

    /// Sends a request that has one answer, and returns it.
    fn one(conn: &mut UnixStream, req: &Request) -> Response {
        write_frame(conn, req).unwrap();
        read_frame(conn).unwrap().expect("agent answers")
    }

    /// Everything a command wrote to one stream, from the agent's answers.
    fn output_of(responses: &[Response], which: Stream) -> Vec<u8> {
        responses
            .iter()
            .filter_map(|r| match r {
                Response::Output { stream, data } if *stream == which => Some(data.as_slice()),
                _ => None,
            })
            .flatten()
            .copied()
            .collect()
    }

    fn exec(argv: &[&str], timeout_ms: Option<u64>) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: std::env::temp_dir().display().to_string(),
            timeout_ms,
            files: Vec::new(),
            collect: None,
            user: None,
            ..Default::default()
        }
    }

    /// The agent under test runs in a child process of its own: it changes the signal mask and
    /// reaps children, which must not disturb the test harness's threads.
    fn with_agent(f: impl FnOnce(&mut UnixStream)) {
        let (mut host, mut child) = start_agent();
        write_hello(&mut host).unwrap();
        f(&mut host);
        let _ = write_frame(&mut host, &Request::Shutdown);
        let _ = child.wait();
    }

    /// An agent in a child process, greeted by and ready; the host has not greeted yet.
    fn start_agent() -> (UnixStream, std::process::Child) {
        // Tests run on parallel threads: while one test's agent end is inheritable, no other
        // test may start a child, or that child would hold the socket open too.
        static SPAWNING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let spawning = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
        let (mut host, agent) = UnixStream::pair().unwrap();
        let exe = std::env::current_exe().unwrap();
        nix::fcntl::fcntl(
            &agent,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        let child = Command::new(exe)
            .args([
                "--exact",
                "server::tests::agent_process",
                "--nocapture",
                "--ignored",
            ])
            .env("UPSTREAM_AGENT_TEST_FD", agent.as_raw_fd().to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        drop(agent);
        drop(spawning);
        assert!(read_hello(&mut host).unwrap(), "the agent greets first");
        let ready: Response = read_frame(&mut host).unwrap().unwrap();
        assert_eq!(ready, Response::Ready);
        (host, child)
    }

    #[test]
    fn a_host_of_another_protocol_version_is_served_nothing() {
        let (mut host, mut child) = start_agent();
        // This side's greeting, one version on, then a request the agent would answer.
        let mut hello = Vec::new();
        write_hello(&mut hello).unwrap();
        let at = hello.len() - 4;
        hello[at..].copy_from_slice(&(crate::protocol::PROTOCOL_VERSION + 1).to_le_bytes());
        host.write_all(&hello).unwrap();
        let _ = write_frame(&mut host, &Request::Exec(exec(&["true"], None)));
        let answer = read_frame::<_, Response>(&mut host);
        assert!(
            matches!(answer, Ok(None) | Err(_)),
            "the agent answered {answer:?}"
        );
        assert!(
            !child.wait().unwrap().success(),
            "the agent stops with an error"
        );
        // The control, with this version's greeting, is every other test here.
    }

    #[test]
    #[ignore = "runs only as the agent process of the other tests"]
    fn agent_process() {
        use std::os::fd::FromRawFd;
        let Ok(fd) = std::env::var("UPSTREAM_AGENT_TEST_FD") else {
            return;
        };
        let fd: i32 = fd.parse().unwrap();
        // SAFETY: the parent passed this descriptor, open and owned by nobody else here.
        let conn = unsafe { UnixStream::from_raw_fd(fd) };
        // The harness runs this test on a thread of its own while its main thread leaves
        // SIGCHLD unblocked; the agent serves from a forked child, where it is the only
        // thread, as it is in a sandbox.
        // SAFETY: the child only runs the agent and leaves with _exit; the harness's other
        // threads hold no lock the agent takes (it writes to the socket, not to stdout).
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = i32::from(serve(conn).is_err());
                // SAFETY: _exit ends this process at once, without the harness's exit code.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(conn);
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }

    #[test]
    fn exec_streams_output_and_exit_code() {
        with_agent(|conn| {
            let got = request(
                conn,
                &Request::Exec(exec(&["sh", "-c", "echo out; echo err >&2; exit 3"], None)),
            );
            assert!(matches!(got[0], Response::Started { .. }));
            let out = output_of(&got, Stream::Stdout);
            let err = output_of(&got, Stream::Stderr);
            assert_eq!(out, b"out\n");
            assert_eq!(err, b"err\n");
            assert!(matches!(
                got.last(),
                Some(Response::Exited {
                    status: ExitStatus::Code(3),
                    timed_out: false,
                    ..
                })
            ));
        });
    }

    #[test]
    fn files_go_in_before_and_come_back_after_a_command() {
        let dir =
            std::env::temp_dir().join(format!("upstream-agent-collect-{}", std::process::id()));
        let script = dir.join("step.sh").display().to_string();
        let out = dir.join("out").display().to_string();
        let mut req = exec(&["sh", &script], None);
        req.env.push(("OUT".into(), out.clone()));
        req.files = vec![
            crate::protocol::FileSpec {
                path: script.clone(),
                data: b"echo count=3 >> \"$OUT\"".to_vec(),
                mode: 0o755,
            },
            crate::protocol::FileSpec {
                path: out.clone(),
                data: Vec::new(),
                mode: 0o644,
            },
        ];
        req.collect = Some(crate::protocol::Collect {
            path: out.clone(),
            limit: 100,
        });
        with_agent(|conn| {
            let got = request(conn, &Request::Exec(req.clone()));
            match got.last() {
                Some(Response::Exited {
                    status: ExitStatus::Code(0),
                    collected: Some(Ok(data)),
                    ..
                }) => {
                    assert_eq!(data, b"count=3\n");
                }
                other => panic!("{other:?}"),
            }
        });
        let _ = fs::remove_dir_all(dir);
    }

    /// Asks the agent for another connection, as the host does: the frame, then the socket.
    fn connect(conn: &mut UnixStream) -> UnixStream {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let (host, helper) = UnixStream::pair().unwrap();
        write_frame(conn, &Request::Connect).unwrap();
        let iov = [io::IoSlice::new(&[0])];
        let fds = [helper.as_raw_fd()];
        sendmsg::<()>(
            conn.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(
            read_frame::<_, Response>(conn).unwrap(),
            Some(Response::Done)
        );
        let mut host = host;
        assert!(read_hello(&mut host).unwrap(), "a helper greets first");
        write_hello(&mut host).unwrap();
        host
    }

    /// A command on a second connection has the commands' score from its helper, which
    /// runs at it too (so commands there start without a fork); the agent does not.
    #[test]
    fn a_helper_and_its_commands_have_the_commands_score_and_the_agent_keeps_its_own() {
        let scores = "c=$(cat /proc/$$/oom_score_adj); h=$(cat /proc/$PPID/oom_score_adj); \
                      a=$(cut -d' ' -f4 /proc/$PPID/stat); echo $c $h $(cat /proc/$a/oom_score_adj)";
        with_agent(|conn| {
            let mut second = connect(conn);
            assert_eq!(read_frame(&mut second).unwrap(), Some(Response::Ready));
            let got = request(
                &mut second,
                &Request::Exec(exec(&["sh", "-c", scores], None)),
            );
            let said = String::from_utf8(output_of(&got, Stream::Stdout)).unwrap();
            let said: Vec<&str> = said.split_whitespace().collect();
            assert_eq!(
                said[..2],
                ["1000", "1000"],
                "the command's and its helper's"
            );
            assert_ne!(said[2], "1000", "the agent's");
            // The control: on the first connection the command's parent is the agent.
            let got = request(conn, &Request::Exec(exec(&["sh", "-c", scores], None)));
            let said = String::from_utf8(output_of(&got, Stream::Stdout)).unwrap();
            let said: Vec<&str> = said.split_whitespace().collect();
            assert_eq!(said[0], "1000", "the command's");
            assert_ne!(said[1], "1000", "the agent's");
        });
    }

    #[test]
    fn another_connection_runs_commands_alongside_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("flag").display().to_string();
        with_agent(|conn| {
            let mut second = connect(conn);
            assert_eq!(read_frame(&mut second).unwrap(), Some(Response::Ready));
            // The second connection's command waits for what the first one's does: they can
            // only both end if they run at once.
            let waits = format!("while [ ! -e {flag} ]; do sleep 0.01; done; echo seen");
            write_frame(
                &mut second,
                &Request::Exec(exec(&["sh", "-c", &waits], Some(20_000))),
            )
            .unwrap();
            let got = request(conn, &Request::Exec(exec(&["touch", &flag], None)));
            assert!(matches!(
                got.last(),
                Some(Response::Exited {
                    status: ExitStatus::Code(0),
                    ..
                })
            ));
            let mut answers = Vec::new();
            loop {
                let r: Response = read_frame(&mut second).unwrap().unwrap();
                let last = matches!(r, Response::Exited { .. } | Response::Error { .. });
                answers.push(r);
                if last {
                    break;
                }
            }
            assert_eq!(output_of(&answers, Stream::Stdout), b"seen\n");
            assert!(matches!(
                answers.last(),
                Some(Response::Exited {
                    status: ExitStatus::Code(0),
                    timed_out: false,
                    ..
                })
            ));
            // Background commands belong to the first connection.
            let spawn = Request::Spawn {
                exec: exec(&["true"], None),
                stdout: "/dev/null".into(),
                stderr: "/dev/null".into(),
            };
            match one(&mut second, &spawn) {
                Response::Error { message } => assert!(message.contains("first connection")),
                other => panic!("{other:?}"),
            }
            // A host that drops a connection mid-command ends that command, and only it.
            let mut third = connect(conn);
            assert_eq!(read_frame(&mut third).unwrap(), Some(Response::Ready));
            write_frame(&mut third, &Request::Exec(exec(&["sleep", "30"], None))).unwrap();
            let Some(Response::Started { pid }) = read_frame(&mut third).unwrap() else {
                panic!("the command did not start");
            };
            drop(third);
            let gone = Instant::now() + Duration::from_secs(10);
            loop {
                let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let running = state
                    .rsplit(')')
                    .next()
                    .is_some_and(|rest| !rest.starts_with(" Z"));
                if state.is_empty() || !running {
                    break;
                }
                assert!(
                    Instant::now() < gone,
                    "the dropped connection's command still runs"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            let got = request(conn, &Request::Exec(exec(&["echo", "still here"], None)));
            assert_eq!(output_of(&got, Stream::Stdout), b"still here\n");
        });
    }

    #[test]
    fn stdin_reaches_the_command() {
        with_agent(|conn| {
            let mut req = exec(&["sh", "-c", "tr a-z A-Z; echo end"], None);
            req.stdin = b"three\nlines\nhere".to_vec();
            let got = request(conn, &Request::Exec(req));
            let out = output_of(&got, Stream::Stdout);
            assert_eq!(String::from_utf8_lossy(&out), "THREE\nLINES\nHEREend\n");
        });
    }

    #[test]
    fn background_commands_run_on_and_are_waited_for_and_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        with_agent(|conn| {
            let spawn = |conn: &mut UnixStream, script: &str, name: &str| {
                let req = Request::Spawn {
                    exec: exec(&["sh", "-c", script], None),
                    stdout: path(&format!("{name}.out")),
                    stderr: path(&format!("{name}.err")),
                };
                match one(conn, &req) {
                    Response::Started { pid } => pid,
                    other => panic!("{other:?}"),
                }
            };
            let quick = spawn(conn, "echo done; echo oops >&2; exit 4", "quick");
            let slow = spawn(conn, "echo started; exec sleep 30", "slow");
            // A foreground command meanwhile, whose timeout kills only itself.
            let mut fg = exec(&["sleep", "30"], Some(100));
            fg.timeout_kills = Scope::Command;
            let got = request(conn, &Request::Exec(fg));
            assert!(matches!(
                got.last(),
                Some(Response::Exited {
                    timed_out: true,
                    ..
                })
            ));

            let wait = |conn: &mut UnixStream, pid, timeout_ms| {
                one(conn, &Request::Wait { pid, timeout_ms })
            };
            assert_eq!(
                wait(conn, quick, None),
                Response::Waited {
                    status: Some(ExitStatus::Code(4))
                }
            );
            assert_eq!(fs::read_to_string(path("quick.out")).unwrap(), "done\n");
            assert_eq!(fs::read_to_string(path("quick.err")).unwrap(), "oops\n");
            // Still running: the foreground timeout left it alone.
            assert_eq!(wait(conn, slow, Some(0)), Response::Waited { status: None });
            assert_eq!(
                wait(conn, slow, Some(50)),
                Response::Waited { status: None }
            );
            assert_eq!(
                one(
                    conn,
                    &Request::Signal {
                        pid: slow,
                        signal: 15
                    }
                ),
                Response::Done
            );
            assert_eq!(
                wait(conn, slow, Some(10_000)),
                Response::Waited {
                    status: Some(ExitStatus::Signal(15))
                }
            );
            assert_eq!(fs::read_to_string(path("slow.out")).unwrap(), "started\n");
            // A pid it never started is refused.
            assert!(matches!(wait(conn, 999_999, None), Response::Error { .. }));
            assert!(matches!(
                one(
                    conn,
                    &Request::Signal {
                        pid: 999_999,
                        signal: 9
                    }
                ),
                Response::Error { .. }
            ));
        });
    }

    #[test]
    fn timeout_kills_the_command_and_says_so() {
        with_agent(|conn| {
            let start = Instant::now();
            let got = request(conn, &Request::Exec(exec(&["sleep", "30"], Some(200))));
            assert!(start.elapsed() < Duration::from_secs(10));
            assert!(
                matches!(
                    got.last(),
                    Some(Response::Exited {
                        status: ExitStatus::Signal(9),
                        timed_out: true,
                        ..
                    })
                ),
                "{got:?}"
            );
        });
    }

    #[test]
    fn only_a_port_of_the_vm_by_its_plain_name_is_attached() {
        with_agent(|conn| {
            for name in ["../../etc/passwd", "a/b", ".hidden", ""] {
                match one(conn, &Request::Attach { port: name.into() }) {
                    Response::Error { message } => {
                        assert!(message.contains("letters, digits"), "{name}: {message}")
                    }
                    other => panic!("{name}: {other:?}"),
                }
            }
            // A plain name that is no port here (a machine without virtio ports): refused,
            // and the connection still serves.
            match one(
                conn,
                &Request::Attach {
                    port: "upstream.9".into(),
                },
            ) {
                Response::Error { message } => {
                    assert!(
                        message.contains("no virtio port named upstream.9"),
                        "{message}"
                    )
                }
                other => panic!("{other:?}"),
            }
            let out = request(conn, &Request::Exec(exec(&["true"], None)));
            assert!(matches!(
                out.last(),
                Some(Response::Exited {
                    status: ExitStatus::Code(0),
                    ..
                })
            ));
        });
    }

    #[test]
    fn a_missing_program_is_an_error() {
        with_agent(|conn| {
            let got = request(conn, &Request::Exec(exec(&["no-such-program-here"], None)));
            assert!(
                matches!(&got[0], Response::Error { message } if message.contains("not found")),
                "{got:?}"
            );
        });
    }

    #[test]
    fn files_are_written_and_read_back_within_limits() {
        let dir = std::env::temp_dir().join(format!("upstream-agent-test-{}", std::process::id()));
        let path = dir.join("sub/file.txt").display().to_string();
        with_agent(|conn| {
            let got = request(
                conn,
                &Request::WriteFile {
                    path: path.clone(),
                    data: b"hello".to_vec(),
                    mode: 0o644,
                },
            );
            assert_eq!(got, [Response::Done]);
            let got = request(
                conn,
                &Request::ReadFile {
                    path: path.clone(),
                    limit: 5,
                },
            );
            assert_eq!(
                got,
                [Response::File {
                    data: b"hello".to_vec()
                }]
            );
            let got = request(
                conn,
                &Request::ReadFile {
                    path: path.clone(),
                    limit: 4,
                },
            );
            assert!(matches!(&got[0], Response::Error { message } if message.contains("larger")));
        });
        let _ = fs::remove_dir_all(dir);
        thread::yield_now();
    }

    #[test]
    fn a_fifo_never_holds_the_agent() {
        let dir = std::env::temp_dir().join(format!("upstream-agent-fifo-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        let fifo = fifo.display().to_string();
        let started = Instant::now();
        with_agent(|conn| {
            let got = request(
                conn,
                &Request::ReadFile {
                    path: fifo.clone(),
                    limit: 10,
                },
            );
            assert!(
                matches!(&got[0], Response::Error { message } if message.contains("not a regular file")),
                "{got:?}"
            );
            let write = Request::WriteFile {
                path: fifo.clone(),
                data: b"x".to_vec(),
                mode: 0o644,
            };
            let got = request(conn, &write);
            assert!(matches!(&got[0], Response::Error { .. }), "{got:?}");
            // A command whose outputs file is a FIFO: the collect answers, it does not wait.
            let mut req = exec(&["true"], None);
            req.collect = Some(crate::protocol::Collect {
                path: fifo.clone(),
                limit: 10,
            });
            let got = request(conn, &Request::Exec(req));
            assert!(
                matches!(
                    got.last(),
                    Some(Response::Exited {
                        collected: Some(Err(_)),
                        ..
                    })
                ),
                "{got:?}"
            );
            // Positive control: the agent still serves.
            let got = request(conn, &Request::Exec(exec(&["echo", "still here"], None)));
            assert!(
                matches!(got.last(), Some(Response::Exited { .. })),
                "{got:?}"
            );
        });
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn stop_processes_ends_background_commands() {
        with_agent(|conn| {
            let spawn = Request::Spawn {
                exec: exec(&["sleep", "30"], None),
                stdout: "/dev/null".into(),
                stderr: "/dev/null".into(),
            };
            let Response::Started { pid } = one(conn, &spawn) else {
                panic!("not started");
            };
            let wait = Request::Wait {
                pid,
                timeout_ms: Some(0),
            };
            let got = one(conn, &wait);
            assert_eq!(
                got,
                Response::Waited { status: None },
                "running before the stop"
            );
            assert_eq!(one(conn, &Request::StopProcesses), Response::Done);
            let got = one(conn, &wait);
            assert_eq!(
                got,
                Response::Waited {
                    status: Some(ExitStatus::Signal(9))
                },
                "killed by the stop"
            );
        });
    }
}

//! The agent's serving loop: one request at a time, output streamed while a command runs.
//!
//! The agent is single-threaded. While a command runs it polls the command's stdout and
//! stderr, a signalfd for SIGCHLD, and the host connection (so a host that goes away, or asks
//! for shutdown mid-command, is noticed at once). When the agent is the sandbox's pid 1, a
//! timeout or shutdown kills every other process of the sandbox with one `kill(-1, SIGKILL)`:
//! nothing a step started, however it daemonised, survives.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getpid};

use crate::protocol::{
    ExecRequest, ExitStatus, FrameError, OUTPUT_CHUNK, Request, Response, Stream, read_frame,
    write_frame,
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

/// Serves requests on `conn` until the host asks for shutdown or goes away. Sends
/// [`Response::Ready`] first.
pub fn serve(mut conn: UnixStream) -> Result<(), AgentError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block()?;
    let mut sigchld = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
    write_frame(&mut conn, &Response::Ready)?;
    loop {
        reap(None);
        let Some(request) = read_frame::<_, Request>(&mut conn)? else {
            kill_everything(None);
            return Ok(());
        };
        match request {
            Request::Exec(exec) => match run(&mut conn, &mut sigchld, &exec)? {
                Flow::Continue => {}
                Flow::Stop => return Ok(()),
            },
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
                return Ok(());
            }
        }
    }
}

enum Flow {
    Continue,
    Stop,
}

fn run(
    conn: &mut UnixStream,
    sigchld: &mut SignalFd,
    req: &ExecRequest,
) -> Result<Flow, AgentError> {
    let start = Instant::now();
    let (pid, out, err) = match spawn(req) {
        Ok(spawned) => spawned,
        Err(message) => {
            write_frame(conn, &Response::Error { message })?;
            return Ok(Flow::Continue);
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
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1)
                    .unwrap_or(PollTimeout::MAX)
            }
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
                    reap(Some(pid));
                    write_frame(conn, &Response::Done)?;
                    return Ok(Flow::Stop);
                }
                None => {
                    // The host went away: nobody is left to report to.
                    kill_everything(Some(pid));
                    return Ok(Flow::Stop);
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
        status = reap(Some(pid));
        if status.is_none() && !timed_out && deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            kill_everything(Some(pid));
        }
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
        },
    )?;
    Ok(Flow::Continue)
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
fn forward(conn: &mut UnixStream, pipe: &mut Option<Pipe>) -> Result<bool, AgentError> {
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

/// Starts a command; returns its pid and the read ends of its stdout and stderr.
///
/// posix_spawn (a vfork: no page tables copied) starts it in a process group of its own, with
/// an empty signal mask, default SIGPIPE handling, stdin from /dev/null, in the agent's
/// working directory (the agent moves there first).
fn spawn(req: &ExecRequest) -> Result<(Pid, OwnedFd, OwnedFd), String> {
    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
    let Some(program) = req.argv.first() else {
        return Err("no command given".into());
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
    let (out_read, out_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| sys("pipe", e))?;
    let (err_read, err_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| sys("pipe", e))?;
    let null = fs::File::open("/dev/null").map_err(|e| format!("cannot open /dev/null: {e}"))?;
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
        let spawned = spawn_as(uid, gid, &path, &argv, &envp, &null, &out_write, &err_write);
        let _ = std::env::set_current_dir("/");
        return spawned
            .map(|pid| (pid, out_read, err_read))
            .map_err(|e| sys("fork", e));
    }
    let mut actions = PosixSpawnFileActions::init().map_err(|e| sys("spawn", e))?;
    actions
        .add_dup2(null.as_raw_fd(), 0)
        .and_then(|()| actions.add_dup2(out_write.as_raw_fd(), 1))
        .and_then(|()| actions.add_dup2(err_write.as_raw_fd(), 2))
        .map_err(|e| sys("spawn", e))?;
    let mut attr = PosixSpawnAttr::init().map_err(|e| sys("spawn", e))?;
    let mut default = SigSet::empty();
    default.add(Signal::SIGPIPE);
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETPGROUP
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )
    .and_then(|()| attr.set_pgroup(Pid::from_raw(0)))
    .and_then(|()| attr.set_sigmask(&SigSet::empty()))
    .and_then(|()| attr.set_sigdefault(&default))
    .map_err(|e| sys("spawn", e))?;
    let spawned = posix_spawn(path.as_path(), &actions, &attr, &argv, &envp);
    // The agent does not stay in the working directory: it would keep the workspace's
    // overlay in use, and the host replaces that between steps.
    let _ = std::env::set_current_dir("/");
    let pid = spawned.map_err(|e| match e {
        Errno::ENOENT => format!("`{program}` was not found in the sandbox"),
        Errno::EACCES => format!("cannot start `{program}`: permission denied"),
        e => sys("spawn", e),
    })?;
    Ok((pid, out_read, err_read))
}

/// Starts a command as `uid`/`gid` of the sandbox: fork (the agent is single-threaded, so
/// the child may run any code), drop to the user, then exec. The child loses every
/// capability when it leaves uid 0.
#[allow(clippy::too_many_arguments)]
fn spawn_as(
    uid: u32,
    gid: u32,
    path: &Path,
    argv: &[CString],
    envp: &[CString],
    null: &fs::File,
    out: &OwnedFd,
    err: &OwnedFd,
) -> Result<Pid, Errno> {
    use nix::unistd::{ForkResult, Gid, Uid, dup2_raw, fork};
    let program = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: the agent runs a single thread: nothing in the child can find a lock held by
    // another thread.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            let setup = (|| -> Result<(), Errno> {
                nix::unistd::setgroups(&[])?;
                nix::unistd::setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid))?;
                nix::unistd::setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))?;
                for (fd, target) in [(null.as_fd(), 0), (out.as_fd(), 1), (err.as_fd(), 2)] {
                    // SAFETY: the descriptors are open; dup2 onto 0, 1 and 2 of this child.
                    // The returned owner is forgotten: dropping it would close what it made.
                    std::mem::forget(unsafe { dup2_raw(fd, target) }?);
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
                let text = format!("upstream: cannot run as uid {uid} gid {gid}: {e}\n");
                // SAFETY: writes a buffer that outlives the call to this child's stderr.
                let _ = unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
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

/// Reaps exited processes; returns the status of `main` if it is among them.
fn reap(main: Option<Pid>) -> Option<ExitStatus> {
    let mut found = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if Some(pid) == main => {
                found = Some(ExitStatus::Code(code))
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if Some(pid) == main => {
                found = Some(ExitStatus::Signal(sig as i32))
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(_) => {}
        }
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

fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.is_dir() {
        return Err(format!("{} is a directory", path.display()));
    }
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
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
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
        }
    }

    /// The agent under test runs in a child process of its own: it changes the signal mask and
    /// reaps children, which must not disturb the test harness's threads.
    fn with_agent(f: impl FnOnce(&mut UnixStream)) {
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
        let mut child = Command::new(exe)
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
        let ready: Response = read_frame(&mut host).unwrap().unwrap();
        assert_eq!(ready, Response::Ready);
        f(&mut host);
        let _ = write_frame(&mut host, &Request::Shutdown);
        let _ = child.wait();
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
        serve(conn).unwrap();
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
        let _ = thread::yield_now();
    }
}

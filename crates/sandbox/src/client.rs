//! The host side of the agent protocol, over any byte stream.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use upstream_agent::protocol::{
    ExecRequest, ExitStatus, FrameError, Request, Response, Stream, read_frame, read_hello,
    write_frame, write_hello,
};

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the sandbox's agent went away")]
    Gone,
    #[error("{0}")]
    Refused(String),
    #[error("the agent sent an unexpected answer: {0}")]
    Unexpected(String),
    /// The sandbox could not be set up: the agent's first word was why.
    #[error("{0}")]
    SetupFailed(String),
}

/// How the agent reported a command's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exited {
    pub status: ExitStatus,
    pub timed_out: bool,
    pub duration: Duration,
    /// The file the request asked to collect.
    pub collected: Option<Result<Vec<u8>, String>>,
    /// The agent's count of processes killed for want of memory so far, where it keeps one.
    pub oom_kills: Option<u64>,
    /// The command failed with the sandbox's root filesystem full, as the agent saw it.
    pub disk_full: bool,
}

/// A connection to a sandbox's agent.
///
/// Each side greets first ([`write_hello`]: the protocol's version), then the agent's first
/// word is `Ready` (or why setup failed). A client may send its first request before that
/// word arrives: requests queue in the connection, and every operation reads the first word
/// before its own answer. That saves a round trip when a sandbox is made to run one command.
#[derive(Debug)]
pub struct AgentClient<S> {
    conn: S,
    /// This side's greeting went out.
    greeted: bool,
    /// When the agent said it was ready; `None` until then.
    ready_at: Option<Instant>,
}

impl<S: Read + Write> AgentClient<S> {
    /// A client of an agent that is still starting.
    pub fn new(conn: S) -> AgentClient<S> {
        AgentClient {
            conn,
            greeted: false,
            ready_at: None,
        }
    }

    /// A client of an agent that greeted, and was greeted by, a client before this one: the
    /// agent of a VM restored from a snapshot taken once it was ready, which waits for its
    /// next request on a connection the restored VM reconnected.
    pub fn resumed(conn: S) -> AgentClient<S> {
        AgentClient {
            conn,
            greeted: true,
            ready_at: Some(Instant::now()),
        }
    }

    fn receive(&mut self) -> Result<Response, ClientError> {
        read_frame(&mut self.conn)?.ok_or(ClientError::Gone)
    }

    /// Sends this side's greeting, unless it went out already.
    fn greet(&mut self) -> Result<(), ClientError> {
        if !self.greeted {
            write_hello(&mut self.conn)?;
            self.greeted = true;
        }
        Ok(())
    }

    /// Sends a request, after this side's greeting the first time.
    fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        self.greet()?;
        write_frame(&mut self.conn, request)?;
        Ok(())
    }

    /// Sends a request with no wait for an answer (file operations read theirs with
    /// [`AgentClient::next`]).
    pub(crate) fn post(&mut self, request: &Request) -> Result<(), ClientError> {
        self.send(request)
    }

    /// The next answer, after the agent's first word.
    pub(crate) fn next(&mut self) -> Result<Response, ClientError> {
        self.wait_ready()?;
        self.receive()
    }

    /// The byte stream to the agent.
    pub fn stream(&self) -> &S {
        &self.conn
    }

    /// When the agent said it was ready, if it has.
    pub fn ready_at(&self) -> Option<Instant> {
        self.ready_at
    }

    /// Waits for the agent's first word, unless it came already.
    pub fn wait_ready(&mut self) -> Result<(), ClientError> {
        if self.ready_at.is_some() {
            return Ok(());
        }
        self.greet()?;
        if !read_hello(&mut self.conn)? {
            return Err(ClientError::Gone);
        }
        match self.receive()? {
            Response::Ready => {
                self.ready_at = Some(Instant::now());
                Ok(())
            }
            Response::SetupFailed { message } => Err(ClientError::SetupFailed(message)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Runs a command to its end, passing output to `on_output` as it arrives.
    pub fn exec(
        &mut self,
        request: &ExecRequest,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<Exited, ClientError> {
        self.send(&Request::Exec(request.clone()))?;
        self.wait_ready()?;
        loop {
            match self.receive()? {
                Response::Started { .. } => {}
                Response::Output { stream, data } => on_output(stream, &data),
                Response::Exited {
                    status,
                    timed_out,
                    micros,
                    collected,
                    oom_kills,
                    disk_full,
                } => {
                    return Ok(Exited {
                        status,
                        timed_out,
                        duration: Duration::from_micros(micros),
                        collected,
                        oom_kills,
                        disk_full: disk_full.unwrap_or(false),
                    });
                }
                Response::Error { message } => return Err(ClientError::Refused(message)),
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Sends `request` and reads its one answer (see [`AgentClient::answer`]).
    fn call<T>(
        &mut self,
        request: &Request,
        pick: impl FnOnce(Response) -> Result<T, Response>,
    ) -> Result<T, ClientError> {
        self.send(request)?;
        self.answer(pick)
    }

    /// Reads the answer to a request sent: what `pick` takes from it, else the agent's
    /// refusal or an unexpected answer as an error.
    fn answer<T>(
        &mut self,
        pick: impl FnOnce(Response) -> Result<T, Response>,
    ) -> Result<T, ClientError> {
        self.wait_ready()?;
        match pick(self.receive()?) {
            Ok(value) => Ok(value),
            Err(Response::Error { message }) => Err(ClientError::Refused(message)),
            Err(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn read_file(&mut self, path: &str, limit: u64) -> Result<Vec<u8>, ClientError> {
        let request = Request::ReadFile {
            path: path.into(),
            limit,
        };
        self.call(&request, |r| match r {
            Response::File { data } => Ok(data),
            other => Err(other),
        })
    }

    pub fn write_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), ClientError> {
        let request = Request::WriteFile {
            path: path.into(),
            data: data.to_vec(),
            mode,
        };
        self.call(&request, done)
    }

    /// Starts a command in the background, its stdout and stderr appended to these files of
    /// the sandbox; returns its pid.
    pub fn spawn(
        &mut self,
        request: &ExecRequest,
        stdout: &str,
        stderr: &str,
    ) -> Result<i32, ClientError> {
        let request = Request::Spawn {
            exec: request.clone(),
            stdout: stdout.into(),
            stderr: stderr.into(),
        };
        self.call(&request, |r| match r {
            Response::Started { pid } => Ok(pid),
            other => Err(other),
        })
    }

    /// Waits up to `timeout` (`None`: for ever) for a background command to end; `None` when
    /// it still runs.
    pub fn wait(
        &mut self,
        pid: i32,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitStatus>, ClientError> {
        let request = Request::Wait {
            pid,
            timeout_ms: timeout.map(|t| t.as_millis() as u64),
        };
        self.call(&request, |r| match r {
            Response::Waited { status } => Ok(status),
            other => Err(other),
        })
    }

    /// Sends `signal` to a background command's process group.
    pub fn signal(&mut self, pid: i32, signal: i32) -> Result<(), ClientError> {
        self.call(&Request::Signal { pid, signal }, done)
    }

    /// Asks the agent to kill everything and exit, without waiting for its answer (the
    /// caller waits for the process instead).
    /// Kills every process of the sandbox but the agent, and waits until they are gone.
    pub fn stop_processes(&mut self) -> Result<(), ClientError> {
        self.call(&Request::StopProcesses, done)
    }

    /// Makes a restored machine one of its own ([`Request::Renew`]).
    pub fn renew(
        &mut self,
        hostname: &str,
        entropy: &[u8],
        unix_nanos: u64,
    ) -> Result<(), ClientError> {
        let request = Request::Renew {
            hostname: hostname.into(),
            entropy: entropy.to_vec(),
            unix_nanos,
        };
        self.call(&request, done)
    }

    /// Freezes the sandbox's own disk ([`Request::Freeze`]) until [`AgentClient::thaw`].
    pub fn freeze(&mut self) -> Result<(), ClientError> {
        self.call(&Request::Freeze, done)
    }

    /// Lets writes to the sandbox's disk go on ([`Request::Thaw`]).
    pub fn thaw(&mut self) -> Result<(), ClientError> {
        self.call(&Request::Thaw, done)
    }

    pub fn request_shutdown(&mut self) -> Result<(), ClientError> {
        self.send(&Request::Shutdown)
    }

    /// Another connection to the same agent over a VM's virtio port `port`, whose host end
    /// `stream` this side connected first: the agent forks a helper that serves the port, as
    /// for [`AgentClient::connect`], with no descriptor passed.
    pub fn attach<T: Read + Write>(
        &mut self,
        port: &str,
        stream: T,
    ) -> Result<AgentClient<T>, ClientError> {
        let request = Request::Attach {
            port: port.to_string(),
        };
        self.call(&request, done)?;
        Ok(AgentClient::new(stream))
    }
}

impl AgentClient<std::os::unix::net::UnixStream> {
    /// Another connection to the same agent, served by a helper it forks: commands run there
    /// alongside this connection's and every other's. It answers `exec`, `read_file` and
    /// `write_file`; background commands stay on the first connection.
    pub fn connect(&mut self) -> Result<AgentClient<std::os::unix::net::UnixStream>, ClientError> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;
        let (host, helper) = UnixStream::pair().map_err(FrameError::from)?;
        self.send(&Request::Connect)?;
        let fds = [helper.as_raw_fd()];
        let byte = [0u8; 1];
        let iov = [std::io::IoSlice::new(&byte)];
        loop {
            match sendmsg::<()>(
                self.conn.as_raw_fd(),
                &iov,
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            ) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(FrameError::from(std::io::Error::from(e)).into()),
            }
        }
        drop(helper);
        self.answer(done)?;
        Ok(AgentClient::new(host))
    }
}

/// Picks a `Done` answer.
fn done(response: Response) -> Result<(), Response> {
    match response {
        Response::Done => Ok(()),
        other => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose agent side has already said `from_agent`; what the client writes
    /// is kept.
    struct Canned {
        from_agent: std::io::Cursor<Vec<u8>>,
        from_host: Vec<u8>,
    }

    impl Read for Canned {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.from_agent.read(buf)
        }
    }

    impl Write for Canned {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.from_host.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn agent_saying(version: u32) -> AgentClient<Canned> {
        let mut wire = Vec::new();
        write_hello(&mut wire).unwrap();
        let at = wire.len() - 4;
        wire[at..].copy_from_slice(&version.to_le_bytes());
        write_frame(&mut wire, &Response::Ready).unwrap();
        AgentClient::new(Canned {
            from_agent: std::io::Cursor::new(wire),
            from_host: Vec::new(),
        })
    }

    #[test]
    fn an_agent_of_another_version_is_a_clear_error_and_this_one_is_ready() {
        use upstream_agent::protocol::PROTOCOL_VERSION;
        let mut client = agent_saying(PROTOCOL_VERSION + 1);
        let e = client.wait_ready().unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "protocol version {} and this upstream speaks version {PROTOCOL_VERSION}",
                PROTOCOL_VERSION + 1
            )),
            "{e}"
        );
        // The control: this version's agent is ready, and was greeted first.
        let mut client = agent_saying(PROTOCOL_VERSION);
        client.wait_ready().unwrap();
        let mut sent = &client.conn.from_host[..];
        assert!(read_hello(&mut sent).unwrap());
    }
}

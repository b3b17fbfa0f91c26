//! The host side of the agent protocol, over any byte stream.

use std::io::{Read, Write};
use std::time::Duration;

use upstream_agent::protocol::{
    ExecRequest, ExitStatus, FrameError, Request, Response, Stream, read_frame, write_frame,
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
}

/// How the agent reported a command's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exited {
    pub status: ExitStatus,
    pub timed_out: bool,
    pub duration: Duration,
}

/// A connection to a sandbox's agent.
#[derive(Debug)]
pub struct AgentClient<S> {
    conn: S,
}

impl<S: Read + Write> AgentClient<S> {
    pub fn new(conn: S) -> AgentClient<S> {
        AgentClient { conn }
    }

    fn receive(&mut self) -> Result<Response, ClientError> {
        read_frame(&mut self.conn)?.ok_or(ClientError::Gone)
    }

    /// Waits for the agent's first word: ready, or why setup failed.
    pub fn wait_ready(&mut self) -> Result<Result<(), String>, ClientError> {
        match self.receive()? {
            Response::Ready => Ok(Ok(())),
            Response::SetupFailed { message } => Ok(Err(message)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Runs a command to its end, passing output to `on_output` as it arrives.
    pub fn exec(
        &mut self,
        request: &ExecRequest,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<Exited, ClientError> {
        write_frame(&mut self.conn, &Request::Exec(request.clone()))?;
        loop {
            match self.receive()? {
                Response::Started { .. } => {}
                Response::Output { stream, data } => on_output(stream, &data),
                Response::Exited {
                    status,
                    timed_out,
                    micros,
                } => {
                    return Ok(Exited {
                        status,
                        timed_out,
                        duration: Duration::from_micros(micros),
                    });
                }
                Response::Error { message } => return Err(ClientError::Refused(message)),
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    pub fn read_file(&mut self, path: &str, limit: u64) -> Result<Vec<u8>, ClientError> {
        write_frame(
            &mut self.conn,
            &Request::ReadFile {
                path: path.into(),
                limit,
            },
        )?;
        match self.receive()? {
            Response::File { data } => Ok(data),
            Response::Error { message } => Err(ClientError::Refused(message)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn write_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), ClientError> {
        let request = Request::WriteFile {
            path: path.into(),
            data: data.to_vec(),
            mode,
        };
        write_frame(&mut self.conn, &request)?;
        match self.receive()? {
            Response::Done => Ok(()),
            Response::Error { message } => Err(ClientError::Refused(message)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Asks the agent to kill everything and exit, without waiting for its answer (the
    /// caller waits for the process instead).
    pub fn request_shutdown(&mut self) -> Result<(), ClientError> {
        write_frame(&mut self.conn, &Request::Shutdown)?;
        Ok(())
    }
}

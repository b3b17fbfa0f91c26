//! Firecracker's API: HTTP/1.1 over its Unix socket, JSON bodies, an `Error` body
//! (`{"fault_message": …}`) with every 4xx and 5xx.
//!
//! A client of its own over `std::os::unix::net::UnixStream` rather than hyper: the driver is
//! synchronous, makes a handful of calls per VM, and Firecracker's server (`micro_http`)
//! speaks plain HTTP/1.1 with a `Content-Length` on every body — no chunking, no TLS, no
//! redirects. The response head is parsed by `httparse` (hyper's own parser, already in the
//! build through it), so the part that has to be robust against any bytes is a well-kept
//! parser; what is left here is writing a request and reading a bounded body. One connection
//! per call, each bounded in time, its head and its body in size: Firecracker is another
//! process (and a guest that broke out of the VM would be it), so nothing it sends can hang
//! or panic this side.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors of one API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach Firecracker's API at {socket}: {source}")]
    Connect { socket: PathBuf, source: io::Error },
    #[error("Firecracker's API broke off during {call}: {source}")]
    Io { call: String, source: io::Error },
    /// Firecracker refused the call: its `fault_message`.
    #[error("Firecracker refused {call}: {fault}")]
    Fault {
        call: String,
        status: u16,
        fault: String,
    },
    #[error("Firecracker's answer to {call} is not one it gives: {reason}")]
    Malformed { call: String, reason: String },
}

/// The largest response head and body taken.
const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 1 << 20;

/// Firecracker's API on its socket.
#[derive(Debug, Clone)]
pub struct Api {
    socket: PathBuf,
    /// How long one call may take (a snapshot of a large guest takes seconds).
    timeout: Duration,
}

impl Api {
    pub fn new(socket: &Path) -> Api {
        Api {
            socket: socket.to_path_buf(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the socket takes connections yet.
    pub fn is_up(&self) -> bool {
        super::jail::connect_unfollowed(&self.socket).is_ok()
    }

    pub fn put(&self, path: &str, body: &serde_json::Value) -> Result<(), ApiError> {
        self.call("PUT", path, Some(body)).map(drop)
    }

    pub fn patch(&self, path: &str, body: &serde_json::Value) -> Result<(), ApiError> {
        self.call("PATCH", path, Some(body)).map(drop)
    }

    pub fn get(&self, path: &str) -> Result<serde_json::Value, ApiError> {
        let body = self.call("GET", path, None)?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Malformed {
            call: format!("GET {path}"),
            reason: format!("its body is not JSON: {e}"),
        })
    }

    /// One request; the body of a 2xx answer.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Vec<u8>, ApiError> {
        let call = format!("{method} {path}");
        let mut stream =
            super::jail::connect_unfollowed(&self.socket).map_err(|source| ApiError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let io = |source| ApiError::Io {
            call: call.clone(),
            source,
        };
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if method != "GET" {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(&body);
        stream.write_all(request.as_bytes()).map_err(io)?;
        let (status, answer) = read_response(&mut stream).map_err(|e| match e {
            ReadError::Io(source) => ApiError::Io {
                call: call.clone(),
                source,
            },
            ReadError::Malformed(reason) => ApiError::Malformed {
                call: call.clone(),
                reason,
            },
        })?;
        if (200..300).contains(&status) {
            return Ok(answer);
        }
        Err(ApiError::Fault {
            call,
            status,
            fault: fault_of(status, &answer),
        })
    }
}

enum ReadError {
    Io(io::Error),
    Malformed(String),
}

/// The status and body of the answer on `stream`.
fn read_response(stream: &mut impl io::Read) -> Result<(u16, Vec<u8>), ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (status, length, head) = loop {
        let n = stream.read(&mut chunk).map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Malformed(
                "the connection ended before the answer's head".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(head)) => {
                let status = response.code.unwrap_or(0);
                let mut length = None;
                for header in response.headers.iter() {
                    if header.name.eq_ignore_ascii_case("content-length") {
                        let value = std::str::from_utf8(header.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .ok_or_else(|| {
                                ReadError::Malformed("its Content-Length is not a number".into())
                            })?;
                        length = Some(value);
                    }
                    if header.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(ReadError::Malformed("it is sent in chunks".into()));
                    }
                }
                break (status, length, head);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(ReadError::Malformed(format!(
                    "its head is over {} KiB",
                    MAX_HEAD >> 10
                )));
            }
            Err(e) => return Err(ReadError::Malformed(format!("its head: {e}"))),
        }
    };
    let length = match (status, length) {
        (204 | 304, _) | (100..=199, _) => 0,
        (_, Some(length)) => length,
        // micro_http gives every body a length; one without is read to its end.
        (_, None) => MAX_BODY,
    };
    if length > MAX_BODY {
        return Err(ReadError::Malformed(format!(
            "its body is over {} KiB",
            MAX_BODY >> 10
        )));
    }
    let mut body = buf.split_off(head);
    while body.len() < length {
        let n = stream.read(&mut chunk).map_err(ReadError::Io)?;
        if n == 0 {
            if length == MAX_BODY {
                break;
            }
            return Err(ReadError::Malformed(format!(
                "its body ended after {} of {length} bytes",
                body.len()
            )));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok((status, body))
}

/// What Firecracker said was wrong: its `fault_message`, else the body as text, on one line.
fn fault_of(status: u16, body: &[u8]) -> String {
    let said = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("fault_message")?.as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let said: String = said
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(1000)
        .collect();
    match said.is_empty() {
        true => format!("HTTP status {status}"),
        false => said,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<(u16, Vec<u8>), String> {
        read_response(&mut &bytes[..]).map_err(|e| match e {
            ReadError::Io(e) => e.to_string(),
            ReadError::Malformed(m) => m,
        })
    }

    #[test]
    fn answers_are_read_by_their_length() {
        assert_eq!(
            parse(b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n")
                .unwrap(),
            (204, Vec::new())
        );
        let (status, body) = parse(
            b"HTTP/1.1 400 \r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"fault_message\":\"no way\"}\nignored",
        )
        .unwrap();
        assert_eq!(status, 400);
        assert_eq!(fault_of(status, &body), "no way");
    }

    #[test]
    fn broken_answers_are_errors_not_hangs_or_panics() {
        for bytes in [
            &b""[..],
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        ] {
            assert!(
                parse(bytes).is_err(),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let endless = vec![b'a'; MAX_HEAD * 2];
        assert!(parse(&endless).is_err());
    }

    #[test]
    fn a_fault_without_a_message_says_its_status_and_control_bytes_go() {
        assert_eq!(fault_of(500, b""), "HTTP status 500");
        assert_eq!(
            fault_of(400, b"line one\n\x1b[31mline two"),
            "line one [31mline two"
        );
    }
}

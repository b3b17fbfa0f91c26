//! Errors as the API answers them: a status and `{"error": {"code": "...", "message": "..."}}`
//! whose message says what to do.
//!
//! What went wrong inside the daemon (its store, its host's files, a panic) is logged with
//! its details — host paths of the state directory among them — and answered with a
//! sentence and a reference to the log line: [`ApiError::internal`]. Errors that come from
//! the sandbox or the request itself are answered as they are.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
    /// The request's id, as its `x-request-id` answer header has it: the daemon's log
    /// names the request by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code: `not_found`, `unauthorized`, `bad_request`, …
    pub code: String,
    /// A sentence a person can act on.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// `what` of this id does not exist (for this tenant); `listed` says where to find
    /// the ones that do.
    pub fn not_found(what: &str, id: &str, listed: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {what} `{id}`; {listed} lists them"),
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn too_many(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "limit_reached", message)
    }

    /// Something failed inside the daemon: `detail` goes to the daemon's log, never to the
    /// client, who gets a reference to it: the request's id, else one of its own.
    pub fn internal(detail: impl std::fmt::Display) -> ApiError {
        let reference = crate::request::current().unwrap_or_else(reference);
        tracing::error!(reference = %reference, "{detail}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!(
                "the daemon could not do this (reference {reference}); try again, and if it \
                 persists its operator finds why in the daemon's log under that reference"
            ),
        )
    }

    /// The sandbox's agent is gone — killed for want of memory when `out_of_memory` — so
    /// nothing more can run in the sandbox.
    pub fn agent_gone(out_of_memory: bool) -> ApiError {
        let why = if out_of_memory {
            "it ran out of memory and the kernel killed its agent"
        } else {
            "its agent is gone (killed, or ended)"
        };
        ApiError::new(
            StatusCode::GONE,
            if out_of_memory {
                OUT_OF_MEMORY
            } else {
                AGENT_GONE
            },
            format!(
                "the sandbox can run nothing more: {why}; delete it (DELETE                  /v1/sandboxes/{{id}}) and make another{}",
                if out_of_memory {
                    ", with more memory (`limits.memory`)"
                } else {
                    ""
                }
            ),
        )
    }

    /// Whether this answer says the sandbox's agent is gone.
    pub fn is_agent_gone(&self) -> bool {
        self.code == AGENT_GONE || self.code == OUT_OF_MEMORY
    }

    /// Whether this answer says the sandbox's agent was killed for want of memory.
    pub fn is_out_of_memory(&self) -> bool {
        self.code == OUT_OF_MEMORY
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

/// The codes of [`ApiError::agent_gone`]: the agent is gone, or was killed for want of
/// memory.
pub const AGENT_GONE: &str = "sandbox_gone";
pub const OUT_OF_MEMORY: &str = "sandbox_out_of_memory";

/// Whether a frame error is the agent's connection breaking (a broken pipe, a reset, an
/// end mid-frame), not a frame the agent sent wrong.
fn connection_broke(frame: &(dyn std::error::Error + 'static)) -> bool {
    frame.source().is_some_and(|s| s.is::<std::io::Error>())
}

/// Eight random hex digits naming one log line (of work no request asked for).
fn reference() -> String {
    let mut bytes = [0u8; 4];
    crate::random(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The code of an error answer, for whoever counts them (the metrics, per tenant).
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = ErrorCode(self.code);
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
            request_id: crate::request::current(),
        };
        let mut response = if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is never read, so the connection cannot carry another
            // request: say so, or a client may send its next one on it and lose it.
            let close = [(axum::http::header::CONNECTION, "close")];
            (self.status, close, Json(body)).into_response()
        } else {
            (self.status, Json(body)).into_response()
        };
        response.extensions_mut().insert(code);
        response
    }
}

impl From<upstream_sandbox::SandboxError> for ApiError {
    fn from(e: upstream_sandbox::SandboxError) -> ApiError {
        use upstream_sandbox::{ClientError, SandboxError};
        match e {
            // The sandbox's own words (a program not found, a path of the sandbox), and
            // its end: the client's to read.
            // The agent refuses what the request asked for (a program not found, a
            // directory missing, a process that is not there).
            SandboxError::Agent(ClientError::Refused(why)) => {
                ApiError::new(StatusCode::BAD_REQUEST, "sandbox", why)
            }
            // Torn down (deleted, reaped) while the request ran.
            e @ SandboxError::Interrupted => ApiError::conflict(e.to_string()),
            // The agent's connection ended: the agent is gone, or the helper serving this
            // request (the daemon looks which, see `Live::settle`).
            SandboxError::OutOfMemory => ApiError::agent_gone(true),
            SandboxError::Agent(ClientError::Gone) | SandboxError::Gone(_) => {
                ApiError::agent_gone(false)
            }
            SandboxError::Agent(ClientError::Frame(frame)) if connection_broke(&frame) => {
                ApiError::agent_gone(false)
            }
            // Setting a sandbox up is the host's work: its errors name the host's paths.
            e => {
                let hint = e.hint().map(str::to_string);
                let mut answer = ApiError::internal(&e);
                answer.code = "sandbox";
                if let Some(hint) = hint {
                    answer.message = format!("{} ({hint})", answer.message);
                }
                answer
            }
        }
    }
}

impl From<upstream_store::StoreError> for ApiError {
    fn from(e: upstream_store::StoreError) -> ApiError {
        match e {
            upstream_store::StoreError::NoTurn(t) => {
                ApiError::not_found("turn", &t, "GET /v1/turns")
            }
            upstream_store::StoreError::NoContext(c) => {
                ApiError::not_found("context", &c, "GET /v1/contexts")
            }
            upstream_store::StoreError::Busy => ApiError::conflict(
                "turns are running on this tenant's store; try again when they have finished",
            ),
            e @ upstream_store::StoreError::AmbiguousTurn { .. } => {
                ApiError::bad_request(format!("{e}; give more of the id, or the turn's number"))
            }
            e @ upstream_store::StoreError::ContextBusy(_) => ApiError::conflict(e.to_string()),
            e => ApiError::internal(e),
        }
    }
}

/// A JSON body that could not be read, as an [`ApiError`] (axum's own answer is plain text).
impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> ApiError {
        use axum::extract::rejection::JsonRejection;
        let status = e.status();
        let message = match &e {
            JsonRejection::MissingJsonContentType(_) => {
                "send the body as JSON with `Content-Type: application/json`".to_string()
            }
            _ => format!("{}: fix the request body", e.body_text()),
        };
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::new(status, "too_large", "the request body is too large");
        }
        ApiError::new(status, "bad_request", message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use upstream_sandbox::{AgentClient, ClientError, ExecRequest, SandboxError};

    /// A sandbox whose agent is gone is answered 410 with what to do, and as out of memory
    /// when the backend says the kernel killed it for that; a command the agent refuses is
    /// still the request's 400 (the control).
    #[test]
    fn an_agent_gone_is_410_and_says_what_to_do() {
        let oom = ApiError::from(SandboxError::OutOfMemory);
        assert_eq!((oom.status, oom.code), (StatusCode::GONE, OUT_OF_MEMORY));
        assert!(oom.message.contains("ran out of memory"), "{}", oom.message);
        assert!(oom.message.contains("delete it"), "{}", oom.message);
        assert!(oom.is_agent_gone() && oom.is_out_of_memory());
        // The connection's end as a client meets it: a broken pipe on a dead agent's socket.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(theirs);
        let broken = AgentClient::new(ours)
            .exec(&ExecRequest::default(), &mut |_, _| {})
            .unwrap_err();
        assert!(matches!(broken, ClientError::Frame(_)), "{broken:?}");
        for e in [
            SandboxError::Agent(broken),
            SandboxError::Agent(ClientError::Gone),
        ] {
            let gone = ApiError::from(e);
            assert_eq!((gone.status, gone.code), (StatusCode::GONE, AGENT_GONE));
            assert!(gone.message.contains("agent is gone"), "{}", gone.message);
            assert!(!gone.is_out_of_memory());
        }
        let refused = ApiError::from(SandboxError::Agent(ClientError::Refused(
            "no program `nope`".into(),
        )));
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert!(!refused.is_agent_gone());
    }
}

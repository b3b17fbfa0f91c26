//! Errors as the API answers them: a status and `{"error": {"code": "...", "message": "..."}}`
//! whose message says what to do.

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

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::metrics::error(self.code);
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is never read, so the connection cannot carry another
            // request: say so, or a client may send its next one on it and lose it.
            let close = [(axum::http::header::CONNECTION, "close")];
            return (self.status, close, Json(body)).into_response();
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<upstream_sandbox::SandboxError> for ApiError {
    fn from(e: upstream_sandbox::SandboxError) -> ApiError {
        let text = match e.hint() {
            Some(hint) => format!("{e} ({hint})"),
            None => e.to_string(),
        };
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "sandbox", text)
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
            e => ApiError::internal(e.to_string()),
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

//! Who is asking: an API key on TCP (a bearer key, or E2B's `X-API-Key`; each key belongs to
//! a tenant), nobody on the
//! local socket (whose 0600 mode admits only the daemon's user) — that is the local tenant.
//!
//! The local socket is the operator's door. Only the daemon's own user can connect to it,
//! and that user can already do everything the daemon does (run `upstream run` with the
//! host's network, read the state directory), so what the daemon's policy keeps from
//! tenants — the host's network, daemon-wide metrics — is not kept from it. What comes in
//! by a key is a tenant, whatever the tenant is called: a key made for tenant `local`
//! reaches the local tenant's sandboxes, never the operator's rights.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::daemon::{Daemon, LOCAL_TENANT};
use crate::error::ApiError;

/// The tenant a request acts for, and the door it came in by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String, pub Door);

/// How a request reached the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// The local socket: the operator.
    Local,
    /// TCP, with a tenant's API key.
    Key,
}

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Tenant, ApiError> {
        parts
            .extensions
            .get::<Tenant>()
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("this request has no tenant"))
    }
}

/// Admits requests with a valid key, as the key's tenant.
pub async fn require_key(
    State(daemon): State<Arc<Daemon>>,
    mut request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    // A bearer key, or E2B's `X-API-Key` (its SDKs send no other).
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .map(str::to_string);
    // E2B's calls are answered as E2B answers, so that its SDKs raise their own errors.
    let e2b = crate::e2b::is_e2b_path(request.uri().path());
    let refuse = |message: &str| match e2b {
        true => crate::e2b::E2bError::unauthorized(message).into_response(),
        false => ApiError::unauthorized(message).into_response(),
    };
    let Some(secret) = presented else {
        return refuse(
            "send an API key as `Authorization: Bearer <key>` (or `X-API-Key: <key>`); \
             `upstream keys create` makes one",
        );
    };
    let owner = {
        let keys = daemon.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.key_owner(&secret)
    };
    match owner {
        Ok(Some(owner)) => {
            let tenant = Tenant(owner.tenant, Door::Key);
            request.extensions_mut().insert(tenant.clone());
            counted(&tenant, next.run(request).await)
        }
        Ok(None) => refuse(
            "the API key is not valid (revoked, or not of this daemon); `upstream keys ls` lists the keys",
        ),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

/// Marks requests on the local socket as the local tenant's.
pub async fn local(mut request: Request, next: Next) -> Response {
    let tenant = Tenant(LOCAL_TENANT.to_string(), Door::Local);
    request.extensions_mut().insert(tenant.clone());
    counted(&tenant, next.run(request).await)
}

/// Counts an error answer in its tenant's metrics, and names the tenant for the log.
fn counted(tenant: &Tenant, mut response: Response) -> Response {
    if let Some(crate::error::ErrorCode(code)) = response.extensions().get() {
        crate::metrics::tenant_error(&tenant.0, code);
    }
    response.extensions_mut().insert(tenant.clone());
    response
}

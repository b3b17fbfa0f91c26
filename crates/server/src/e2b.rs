//! E2B's control plane on the daemon's listener, so that the official `e2b` SDKs make,
//! find, extend and kill upstream's sandboxes with nothing changed but `E2B_API_URL`,
//! `E2B_SANDBOX_URL` and `E2B_API_KEY` (docs/e2b-wire.md, section 2).
//!
//! Its paths (`/sandboxes`, `/v2/sandboxes`) do not collide with `/v1/`; the key comes as
//! `X-API-Key` ([`crate::auth`] takes it beside a bearer key). A sandbox made here is the
//! daemon's like any other (the same tenant sees it in `/v1/sandboxes`): its template is an
//! image reference (`base` is the daemon's default image, `host`), its `timeout` its
//! lifetime counted from now, as E2B's is (killed at the end whatever it does), and
//! `allow_internet_access: true` asks for the host's network, which the daemon's policy
//! grants or refuses as it does for `/v1`. Errors are E2B's `{"code", "message"}` with `code`
//! equal to the status, which the SDKs raise their own exceptions from; a feature upstream
//! does not have answers so, naming it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::Value;

use upstream_sandbox::{Isolation, Limits, NetworkMode};

use crate::auth::Tenant;
use crate::bounds;
use crate::daemon::{CreateRequest, Daemon, Live, Shape};
use crate::error::ApiError;

/// The envd version the control plane reports: the SDKs switch features on by it.
pub const ENVD_VERSION: &str = "0.5.2";

/// The template a sandbox is made of when the SDK names none, and the image it stands for.
const BASE_TEMPLATE: &str = "base";
const BASE_IMAGE: &str = "host";

/// A sandbox's timeout when the SDK sends none (E2B's default), in seconds.
const DEFAULT_TIMEOUT: u64 = 300;

/// The routes of E2B's control plane, behind the daemon's key check.
pub fn router() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/sandboxes", post(create).get(list_v1))
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/pause", post(missing("pausing a sandbox")))
        .route(
            "/sandboxes/{id}/resume",
            post(missing("resuming a paused sandbox")),
        )
        .route("/sandboxes/{id}/metrics", get(missing("sandbox metrics")))
        .route(
            "/sandboxes/{id}/snapshots",
            post(missing("snapshots of a sandbox")),
        )
        .route("/sandboxes/{id}/fork", post(missing("forking a sandbox")))
        .route(
            "/sandboxes/{id}/network",
            axum::routing::put(missing("network rules")),
        )
        .route("/volumes", get(missing("volumes")).post(missing("volumes")))
        .route(
            "/templates",
            get(missing("templates")).post(missing("templates")),
        )
        .route("/sandboxes/{id}/logs", get(missing("sandbox logs")))
}

/// Whether `path` is one of E2B's control-plane calls (answered with E2B's errors).
pub fn is_e2b_path(path: &str) -> bool {
    ["/sandboxes", "/v2/sandboxes", "/volumes", "/templates"]
        .iter()
        .any(|p| {
            path == *p
                || path
                    .strip_prefix(p)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
}

/// An error as E2B answers it.
#[derive(Debug)]
pub struct E2bError {
    status: StatusCode,
    message: String,
}

impl E2bError {
    fn new(status: StatusCode, message: impl Into<String>) -> E2bError {
        E2bError {
            status,
            message: message.into(),
        }
    }

    pub fn unauthorized(message: &str) -> E2bError {
        E2bError::new(StatusCode::UNAUTHORIZED, message)
    }

    fn not_found(id: &str) -> E2bError {
        E2bError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox \"{id}\" not found: it was killed, timed out, or is another tenant's"),
        )
    }
}

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> E2bError {
        E2bError::new(e.status, e.message)
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({
            "code": self.status.as_u16(),
            "message": self.message,
        }));
        let mut response = (self.status, body).into_response();
        // The Python SDK replays a 502, 503 or 504 unless told not to, a create too: only
        // a busy daemon's answers (429, 503) are worth another try.
        if !matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response
                .headers_mut()
                .insert("should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

/// A handler that answers that upstream does not have `what` (yet), as E2B errors go.
fn missing(
    what: &'static str,
) -> impl Fn() -> std::future::Ready<E2bError> + Clone + Send + Sync + 'static {
    move || {
        std::future::ready(E2bError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "upstream does not support {what}; its own API is described at /v1/openapi.json"
            ),
        ))
    }
}

/// What the SDKs send to make a sandbox (`NewSandbox`, `NewSandboxV2`); fields upstream has
/// no use for are ignored, as E2B's server ignores unknown ones.
#[derive(Debug, Default, Deserialize)]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "envVars")]
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "autoPause")]
    auto_pause: Option<bool>,
    #[serde(default)]
    allow_internet_access: Option<bool>,
    #[serde(default, rename = "volumeMounts")]
    volume_mounts: Option<Vec<Value>>,
    #[serde(default)]
    mcp: Option<Value>,
}

/// A body parsed as E2B's server would: a body that is no JSON of this shape is a 400.
fn parse<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, E2bError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("the request's body is not what this call takes: {e}"),
        )
    })
}

fn timeout(seconds: u64, field: &str) -> Result<Duration, E2bError> {
    let lifetime = bounds::seconds(Some(seconds as f64), field)?;
    lifetime.flatten().ok_or_else(|| {
        E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("`{field}` must be at least 1 second"),
        )
    })
}

/// Makes a sandbox: `POST /sandboxes` (older SDKs) and `POST /v2/sandboxes`.
async fn create(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), E2bError> {
    let body: NewSandbox = parse(&body)?;
    if body.auto_pause == Some(true) {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            "upstream does not pause sandboxes on timeout: make the sandbox without autoPause \
             (it is killed when its timeout ends)",
        ));
    }
    if body.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            "upstream has no volumes: make the sandbox without volumeMounts",
        ));
    }
    if body.mcp.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            "upstream has no MCP gateway: make the sandbox without mcp",
        ));
    }
    let template = body
        .template_id
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| BASE_TEMPLATE.into());
    let image = match template.as_str() {
        BASE_TEMPLATE => BASE_IMAGE.to_string(),
        other => other.to_string(),
    };
    bounds::image(&image)?;
    let metadata = body.metadata.unwrap_or_default();
    bounds::metadata(&metadata)?;
    let env = body.env_vars.unwrap_or_default();
    bounds::env(&env, "envVars")?;
    let lifetime = timeout(body.timeout.unwrap_or(DEFAULT_TIMEOUT), "timeout")?;
    let network = match body.allow_internet_access {
        Some(true) => NetworkMode::Host,
        _ => NetworkMode::None,
    };
    let request = CreateRequest {
        shape: Shape {
            image,
            limits: Limits {
                pids: Some(Limits::DEFAULT_PIDS),
                ..Limits::default()
            },
            network,
            isolation: Isolation::Namespaces,
        },
        metadata,
        // E2B's timeout is the sandbox's lifetime; use does not extend it.
        idle_timeout: Some(None),
        lifetime: Some(Some(lifetime)),
    };
    let live = daemon.create(&tenant, request, env).await?;
    let mut sandbox = sandbox_of(&live);
    sandbox["templateID"] = Value::String(template);
    Ok((StatusCode::CREATED, Json(sandbox)))
}

/// The template a sandbox was made of, as the SDK named it.
fn template_of(live: &Live) -> String {
    match live.shape.image.as_str() {
        BASE_IMAGE => BASE_TEMPLATE.to_string(),
        image => image.to_string(),
    }
}

/// E2B's `Sandbox`: what create and connect answer.
fn sandbox_of(live: &Live) -> Value {
    serde_json::json!({
        "templateID": template_of(live),
        "sandboxID": live.id,
        "clientID": "upstream",
        "envdVersion": ENVD_VERSION,
        "alias": Value::Null,
        "domain": Value::Null,
    })
}

fn rfc3339(unix_ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(at).to_string()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// E2B's `SandboxDetail` and `ListedSandbox`.
fn detail_of(live: &Live) -> Value {
    // A sandbox without a lifetime (made through /v1) lives until deleted: its end is told
    // as a year from now, which the SDKs only show.
    let left = live
        .lifetime_left()
        .unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let limits = &live.shape.limits;
    serde_json::json!({
        "templateID": template_of(live),
        "sandboxID": live.id,
        "clientID": "upstream",
        "alias": Value::Null,
        "startedAt": rfc3339(live.created_at),
        "endAt": rfc3339(now_ms().saturating_add(left.as_millis() as u64)),
        "envdVersion": ENVD_VERSION,
        "cpuCount": limits.cpus.map_or(1, |c| c.ceil() as u64),
        "memoryMB": limits.memory.map_or(0, |m| m >> 20),
        "diskSizeMB": limits.disk.map_or(0, |d| d >> 20),
        "state": "running",
        "metadata": live.metadata,
        "allowInternetAccess": live.shape.network == NetworkMode::Host,
    })
}

fn find(daemon: &Daemon, tenant: &Tenant, id: &str) -> Result<Arc<Live>, E2bError> {
    daemon
        .get(&tenant.0, id)
        .map_err(|_| E2bError::not_found(id))
}

/// `GET /sandboxes/{id}`.
async fn detail(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, E2bError> {
    let live = find(&daemon, &tenant, &id)?;
    Ok(Json(detail_of(&live)))
}

/// `DELETE /sandboxes/{id}`: 204, or 404 (the SDKs' `kill` then says false).
async fn kill(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    daemon
        .delete(&tenant.0, &id)
        .await
        .map_err(|e| match e.status {
            StatusCode::NOT_FOUND => E2bError::not_found(&id),
            _ => E2bError::from(e),
        })?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
struct Timeout {
    timeout: Option<u64>,
}

/// `POST /sandboxes/{id}/timeout`: its lifetime, counted from now.
async fn set_timeout(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    let body: Timeout = parse(&body)?;
    let seconds = body
        .timeout
        .ok_or_else(|| E2bError::new(StatusCode::BAD_REQUEST, "`timeout` (seconds) is required"))?;
    let lifetime = timeout(seconds, "timeout")?;
    find(&daemon, &tenant, &id)?.set_lifetime(Some(lifetime));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
struct Refresh {
    duration: Option<u64>,
}

/// `POST /sandboxes/{id}/refreshes` (older SDKs' keep-alive): its lifetime at least
/// `duration` seconds from now.
async fn refresh(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    let body: Refresh = parse(&body)?;
    let live = find(&daemon, &tenant, &id)?;
    let wanted = timeout(body.duration.unwrap_or(DEFAULT_TIMEOUT), "duration")?;
    extend(&live, wanted);
    Ok(StatusCode::NO_CONTENT)
}

/// Lengthens a lifetime to at least `wanted` from now; never shortens one, nor gives one
/// to a sandbox that has none.
fn extend(live: &Live, wanted: Duration) {
    if let Some(left) = live.lifetime_left() {
        live.set_lifetime(Some(left.max(wanted)));
    }
}

/// `POST /v2/sandboxes/{id}/connect` (and the older `/sandboxes/{id}/connect`): a running
/// sandbox answers 200 with its lifetime lengthened to `timeout` if that is longer.
async fn connect(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, E2bError> {
    let body: Timeout = parse(&body)?;
    let live = find(&daemon, &tenant, &id)?;
    if let Some(seconds) = body.timeout {
        extend(&live, timeout(seconds, "timeout")?);
    }
    Ok(Json(sandbox_of(&live)))
}

/// `GET /v2/sandboxes` filters and paging.
#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "nextToken")]
    next_token: Option<String>,
}

/// The `key=value` pairs of a `metadata` filter: `k=v&k2=v2`, each part percent-encoded.
fn metadata_filter(text: &str) -> Result<Vec<(String, String)>, E2bError> {
    let decode = |part: &str| {
        percent_decode(part).ok_or_else(|| {
            E2bError::new(
                StatusCode::BAD_REQUEST,
                format!("`metadata` has a part that is not percent-encoded UTF-8: `{part}`"),
            )
        })
    };
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                E2bError::new(
                    StatusCode::BAD_REQUEST,
                    format!("`metadata` is `key=value` pairs joined by `&`; `{pair}` is not one"),
                )
            })?;
            Ok((decode(key)?, decode(value)?))
        })
        .collect()
}

/// `%XX` escapes (and `+` as a space) decoded; `None` for a broken escape or text that is
/// not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The tenant's sandboxes that match `query`'s metadata, oldest first, after the cursor.
fn listed(daemon: &Daemon, tenant: &Tenant, query: &ListQuery) -> Result<Vec<Arc<Live>>, E2bError> {
    let wanted = match &query.metadata {
        Some(text) => metadata_filter(text)?,
        None => Vec::new(),
    };
    // Oldest first, as the daemon lists them.
    let sandboxes: Vec<Arc<Live>> = daemon
        .list(&tenant.0)
        .into_iter()
        .filter(|l| l.ended().is_none())
        .filter(|l| {
            wanted
                .iter()
                .all(|(k, v)| l.metadata.get(k).is_some_and(|m| m == v))
        })
        .collect();
    Ok(sandboxes)
}

/// `GET /v2/sandboxes`: running sandboxes (none is ever paused), `limit` at a time (1 to
/// 100, default 100), the next page's cursor in `x-next-token`.
async fn list(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Query(query): Query<ListQuery>,
) -> Result<Response, E2bError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=100).contains(&limit) {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("`limit` is {limit}; it is 1 to 100"),
        ));
    }
    let states: Vec<&str> = query
        .state
        .as_deref()
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if let Some(other) = states.iter().find(|s| !matches!(**s, "running" | "paused")) {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("`state` has `{other}`; the states are `running` and `paused`"),
        ));
    }
    let mut sandboxes = listed(&daemon, &tenant, &query)?;
    if !states.is_empty() && !states.contains(&"running") {
        sandboxes.clear();
    }
    if let Some(after) = &query.next_token {
        match sandboxes.iter().position(|l| &l.id == after) {
            Some(at) => {
                sandboxes.drain(..=at);
            }
            None => {
                return Err(E2bError::new(
                    StatusCode::BAD_REQUEST,
                    "`nextToken` is no cursor of this listing (its sandbox is gone): list again from the start",
                ));
            }
        }
    }
    let more = sandboxes.len() > limit;
    sandboxes.truncate(limit);
    let body: Vec<Value> = sandboxes.iter().map(|l| detail_of(l)).collect();
    let mut response = Json(body).into_response();
    if more {
        if let Some(last) = sandboxes.last() {
            if let Ok(token) = HeaderValue::from_str(&last.id) {
                response.headers_mut().insert("x-next-token", token);
            }
        }
    }
    Ok(response)
}

/// `GET /sandboxes` (older SDKs): every running sandbox, filtered by `metadata`.
async fn list_v1(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<Value>>, E2bError> {
    let sandboxes = listed(&daemon, &tenant, &query)?;
    Ok(Json(sandboxes.iter().map(|l| detail_of(l)).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metadata_filter_is_decoded_pair_by_pair() {
        assert_eq!(
            metadata_filter("user%3Did=a%26b&team=x+y").unwrap(),
            [
                ("user=id".to_string(), "a&b".to_string()),
                ("team".to_string(), "x y".to_string())
            ]
        );
        assert!(metadata_filter("novalue").is_err());
        assert!(metadata_filter("k=%ZZ").is_err());
        assert!(metadata_filter("k=%ff").is_err(), "not UTF-8");
        assert!(metadata_filter("").unwrap().is_empty());
    }
}

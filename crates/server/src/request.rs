//! Each request's id and its line in the log.
//!
//! A request is named by the client's `x-request-id` when it sends one that is short and
//! printable, else by a new UUID v7; the answer carries it back in `x-request-id`, and every
//! error body in `request_id`. The id is the request's while it is served — across the
//! blocking threads and tasks that serve it ([`carry`], [`spawn`]) — so that what the log
//! says about it (an internal error, a sandbox it made) bears the same id.
//!
//! One line per request when it is answered: method, route (the pattern, never the path
//! with its ids and file names), status, duration, tenant. Bodies, headers and keys are
//! never logged.

use std::cell::RefCell;
use std::future::Future;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header that names a request.
pub const HEADER: &str = "x-request-id";

/// The longest client-sent id taken as it is.
const MAX_LEN: usize = 64;

tokio::task_local! {
    static CURRENT: String;
}

thread_local! {
    static ON_THREAD: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The id of the request being served here, if any.
pub fn current() -> Option<String> {
    CURRENT
        .try_with(|id| id.clone())
        .ok()
        .or_else(|| ON_THREAD.with(|id| id.borrow().clone()))
}

/// `f`, to run on another thread as part of the request being served here (its id and its
/// place in the log go with it).
pub fn carry<T>(f: impl FnOnce() -> T) -> impl FnOnce() -> T {
    let id = current();
    let span = tracing::Span::current();
    move || {
        let before = ON_THREAD.with(|slot| slot.replace(id));
        let out = span.in_scope(f);
        ON_THREAD.with(|slot| *slot.borrow_mut() = before);
        out
    }
}

/// Spawns `future` as part of the request being served here (an answer that streams on).
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let future = future.instrument(tracing::Span::current());
    match current() {
        Some(id) => tokio::spawn(CURRENT.scope(id, future)),
        None => tokio::spawn(future),
    }
}

/// The id a client sent, if it is one to keep: 1 to 64 printable ASCII characters.
fn sent(request: &Request) -> Option<String> {
    let value = request.headers().get(HEADER)?.to_str().ok()?;
    let fine =
        !value.is_empty() && value.len() <= MAX_LEN && value.bytes().all(|b| b.is_ascii_graphic());
    fine.then(|| value.to_string())
}

/// Names the request, serves it within its span, logs its answer and sends its id back.
pub async fn observe(request: Request, next: Next) -> Response {
    let id = sent(&request).unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let method = request.method().clone();
    // The route's pattern: a path holds ids and file names, which are the tenant's.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("(no route)", |p| p.as_str())
        .to_string();
    let span = tracing::info_span!("request", request_id = %id);
    let start = Instant::now();
    let mut response = CURRENT
        .scope(id.clone(), next.run(request).instrument(span.clone()))
        .await;
    let tenant = response
        .extensions()
        .get::<crate::auth::Tenant>()
        .map(|t| t.0.clone());
    let status = response.status().as_u16();
    let duration_ms = start.elapsed().as_secs_f64() * 1000.0;
    let _entered = span.enter();
    let tenant = tenant.as_deref().unwrap_or("-");
    if status >= 500 {
        tracing::warn!(request_id = %id, %method, %route, status, duration_ms, tenant, "answered");
    } else {
        tracing::info!(request_id = %id, %method, %route, status, duration_ms, tenant, "answered");
    }
    // Always a header's value: a UUID, or what the client sent, printable ASCII.
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(value: &[u8]) -> Request {
        Request::builder()
            .header(HEADER, HeaderValue::from_bytes(value).unwrap())
            .body(axum::body::Body::empty())
            .unwrap()
    }

    #[test]
    fn a_client_sent_id_is_kept_only_if_short_and_printable() {
        assert_eq!(sent(&with_header(b"job-42")).as_deref(), Some("job-42"));
        assert_eq!(sent(&with_header(&[b'a'; 64])).map(|s| s.len()), Some(64));
        assert_eq!(sent(&with_header(&[b'a'; 65])), None);
        assert_eq!(sent(&with_header(b"two words")), None);
        assert_eq!(sent(&with_header(b"tab\there")), None);
        assert_eq!(sent(&with_header("é".as_bytes())), None);
    }

    #[test]
    fn an_id_goes_with_work_carried_to_another_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let seen = runtime.block_on(CURRENT.scope("req-1".into(), async {
            let work = carry(current);
            std::thread::spawn(work).join().unwrap()
        }));
        assert_eq!(seen.as_deref(), Some("req-1"));
        assert_eq!(current(), None, "and stays with it");
    }
}

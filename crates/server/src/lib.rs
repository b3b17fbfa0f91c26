//! `upstream serve`: the engine over HTTP — sandboxes (create, exec, files, background
//! processes), turns, and the context store's records — with a warm pool of ready sandboxes
//! and API keys per tenant.
//!
//! Every route is declared once, with its OpenAPI description beside the handler
//! (`utoipa`); the router and the document at `/v1/openapi.json` come from the same list,
//! so they cannot disagree.
//!
//! What the daemon does goes to its log as `tracing` events — each request answered
//! ([`request`]), sandboxes made, claimed from a pool, torn down and reaped, pools refilled,
//! turns run, and every error it does not answer with — and the binary decides where they
//! go and how they look.

mod api;
mod auth;
mod bounds;
pub mod daemon;
pub mod e2b;
mod error;
mod files;
pub mod metrics;
mod request;
pub mod share;
mod stream;
mod turns;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use daemon::{Config, Daemon, LOCAL_TENANT};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "upstream",
        description = "Sandboxes, exec, files, turns and their records. Send an API key as \
                       `Authorization: Bearer <key>`; errors are `{\"error\": {\"code\", \"message\"}}`."
    ),
    tags(
        (name = "sandboxes", description = "Make, find and tear down sandboxes"),
        (name = "exec", description = "Run commands"),
        (name = "processes", description = "Background commands"),
        (name = "files", description = "Files of a sandbox, as raw bodies"),
        (name = "turns", description = "Markdown turns and the context store"),
    )
)]
struct ApiDoc;

/// The API's routes and their OpenAPI document.
fn api(daemon: &Arc<Daemon>) -> (Router<Arc<Daemon>>, utoipa::openapi::OpenApi) {
    let uploads = OpenApiRouter::new()
        .routes(routes!(files::upload, files::get_file, files::delete))
        .layer(DefaultBodyLimit::disable());
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(api::create_sandbox, api::list_sandboxes))
        .routes(routes!(api::get_sandbox, api::delete_sandbox))
        .routes(routes!(api::set_timeout))
        .routes(routes!(api::exec))
        .routes(routes!(api::start_process, api::list_processes))
        .routes(routes!(api::get_process))
        .routes(routes!(api::signal_process))
        .routes(routes!(api::process_output))
        .routes(routes!(files::list))
        .routes(routes!(turns::run_turn, turns::list_turns))
        .routes(routes!(turns::get_turn))
        .routes(routes!(turns::list_contexts))
        .routes(routes!(turns::list_artifacts))
        .routes(routes!(turns::get_blob))
        .layer(DefaultBodyLimit::max(daemon.config.max_body))
        .merge(uploads)
        .split_for_parts();
    (router, doc)
}

/// The whole application: `/v1` behind `guard` (key or local), `/healthz` open.
fn app(daemon: &Arc<Daemon>, local: bool) -> (Router, utoipa::openapi::OpenApi) {
    let (api, doc) = api(daemon);
    let doc_json = doc.to_pretty_json().unwrap_or_else(|e| {
        tracing::error!("the OpenAPI document cannot be written; /v1/openapi.json is empty: {e}");
        String::new()
    });
    let guarded = api
        .route("/metrics", get(metrics_text))
        .merge(e2b::router());
    let guarded = if local {
        guarded.layer(axum::middleware::from_fn(auth::local))
    } else {
        guarded.layer(axum::middleware::from_fn_with_state(
            daemon.clone(),
            auth::require_key,
        ))
    };
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/v1/openapi.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], doc_json) }),
        )
        .merge(guarded)
        .fallback(|| async {
            error::ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                "no such route; the API is described at /v1/openapi.json",
            )
        })
        .layer(axum::middleware::from_fn(answer_always))
        .layer(axum::middleware::from_fn(request::observe))
        .with_state(daemon.clone());
    (router, doc)
}

/// Every request gets an answer, and every error answer is the API's JSON error: a handler
/// that panics is answered with a 500 (the panic logged, as [`error::ApiError::internal`]
/// does) rather than a dropped connection; a request axum itself turns away (a query or a
/// path parameter that does not parse, a method a route does not have) gets its reason as
/// the error's message instead of plain text; and every error answer is counted.
async fn answer_always(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use futures::FutureExt;
    let response = match std::panic::AssertUnwindSafe(next.run(request))
        .catch_unwind()
        .await
    {
        Ok(response) => response,
        Err(panic) => error::ApiError::internal(format!(
            "a request's handler panicked: {}",
            share::panic_message(panic.as_ref())
        ))
        .into_response(),
    };
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let response = if (status.is_client_error() || status.is_server_error()) && !is_json {
        let reason = axum::body::to_bytes(response.into_body(), 16 << 10)
            .await
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .unwrap_or_else(|e| {
                tracing::debug!("an answer axum made could not be read for its reason: {e}");
                String::new()
            });
        as_api_error(status, reason).into_response()
    } else {
        response
    };
    if let Some(error::ErrorCode(code)) = response.extensions().get() {
        metrics::error(code);
    }
    response
}

/// An answer axum made itself (a rejected extractor, a missing method), as the API's error.
fn as_api_error(status: axum::http::StatusCode, reason: String) -> error::ApiError {
    use axum::http::StatusCode;
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = match (status, reason.is_empty()) {
        (StatusCode::METHOD_NOT_ALLOWED, _) => {
            "this route does not take that method; the API is described at /v1/openapi.json"
                .to_string()
        }
        (_, true) => format!("the request was refused ({status}); fix it and send it again"),
        (_, false) => format!("{reason}; fix the request and send it again"),
    };
    error::ApiError::new(status, code, message)
}

/// The OpenAPI document of this build, as served at `/v1/openapi.json`.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

/// `/metrics`: the daemon's figures for the operator (the local socket, or a key of an
/// `--operator-tenant`), the tenant's own for any other key.
async fn metrics_text(
    State(daemon): State<Arc<Daemon>>,
    caller: auth::Tenant,
) -> impl IntoResponse {
    let scope = if caller.1 == auth::Door::Local || daemon.config.operators.contains(&caller.0) {
        metrics::Scope::Daemon
    } else {
        metrics::Scope::Tenant(&caller.0)
    };
    let gauges = metrics::Gauges {
        active: daemon.active(),
        pools: daemon
            .pools
            .iter()
            .map(|p| (p.shape.key(), (p.ready(), p.target)))
            .collect(),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&gauges, scope),
    )
}

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
}

/// Runs the daemon until SIGINT or SIGTERM; then tears every sandbox down. `ready` is
/// told the addresses once it listens.
pub fn serve(
    config: Config,
    backend: upstream_sandbox::SharedBackend,
    ready: impl FnOnce(&[std::net::SocketAddr]),
) -> Result<(), ServeError> {
    // Sandbox inits are started from blocking threads and die with their parent
    // (PR_SET_PDEATHSIG), which the manual defines as the parent *thread* on some kernels:
    // blocking threads are kept for the daemon's life rather than ended when idle.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(share::BLOCKING_THREADS)
        .thread_keep_alive(Duration::from_secs(u32::MAX.into()))
        .build()
        .map_err(|e| ServeError::Setup(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(serve_async(config, backend, ready))
}

async fn serve_async(
    config: Config,
    backend: upstream_sandbox::SharedBackend,
    ready: impl FnOnce(&[std::net::SocketAddr]),
) -> Result<(), ServeError> {
    let daemon = Arc::new(Daemon::new(config, backend).map_err(ServeError::Setup)?);
    let mut bound = Vec::new();
    let mut tcp = Vec::new();
    for address in &daemon.config.listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| ServeError::Listen {
                address: address.to_string(),
                source,
            })?;
        bound.push(listener.local_addr().unwrap_or(*address));
        tcp.push(listener);
    }
    let socket_path = daemon.config.socket.clone();
    if let Some(parent) = socket_path.parent() {
        // Binding the socket below says what is wrong if this could not be done.
        if let Err(e) = std::fs::create_dir_all(parent) {
            tracing::debug!(dir = %parent.display(), "cannot create the socket's directory: {e}");
        }
    }
    // A socket left by a daemon that died is in the way; a live daemon's is not ours to take.
    if std::os::unix::net::UnixStream::connect(&socket_path).is_ok() {
        return Err(ServeError::Setup(format!(
            "another daemon is serving {}; stop it first",
            socket_path.display()
        )));
    }
    match std::fs::remove_file(&socket_path) {
        Ok(()) => {
            tracing::info!(socket = %socket_path.display(), "removed the socket a daemon that died left")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Binding says why the place is not free.
        Err(e) => {
            tracing::warn!(socket = %socket_path.display(), "cannot remove what is in the socket's place: {e}")
        }
    }
    let unix = {
        // Made 0600 from the start: no moment where another user could connect.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = tokio::net::UnixListener::bind(&socket_path);
        nix::sys::stat::umask(old);
        bound.map_err(|source| ServeError::Listen {
            address: socket_path.display().to_string(),
            source,
        })?
    };
    ready(&bound);

    for pool in &daemon.pools {
        tokio::spawn(daemon.clone().fill(pool.clone()));
    }
    let reaper = daemon.clone();
    tokio::spawn(async move {
        let mut ticks = 0u64;
        loop {
            // What a daemon that died left (its sandboxes' directories once their processes
            // are gone, their cgroups): at start, then every 10 s.
            if ticks % 40 == 0 {
                let backend = reaper.backend();
                if let Err(e) =
                    tokio::task::spawn_blocking(move || backend.remove_leftovers()).await
                {
                    tracing::error!("removing what dead daemons left failed: {e}");
                }
            }
            ticks += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
            // Each sandbox is reaped on its own (see `Daemon::reap`); this is the last line
            // of defence, so that reaping goes on whatever happens in one round.
            use futures::FutureExt;
            match std::panic::AssertUnwindSafe(reaper.reap())
                .catch_unwind()
                .await
            {
                Ok(0) => {}
                Ok(reaped) => tracing::info!(
                    reaped,
                    "reaped sandboxes past their idle timeout or lifetime"
                ),
                Err(panic) => tracing::error!(
                    "reaping failed ({}); it goes on",
                    share::panic_message(panic.as_ref())
                ),
            }
        }
    });

    let stop = tokio_util::sync::CancellationToken::new();
    let mut servers = Vec::new();
    for listener in tcp {
        let (router, _) = app(&daemon, false);
        let stop = stop.clone();
        servers.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                tracing::error!("serving TCP ended: {e}");
            }
        }));
    }
    {
        let (router, _) = app(&daemon, true);
        let stop = stop.clone();
        servers.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(unix, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                tracing::error!("serving the local socket ended: {e}");
            }
        }));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ServeError::Setup(format!("cannot handle SIGTERM: {e}")))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping: tearing every sandbox down");
    stop.cancel();
    daemon.shutdown().await;
    // Requests still running end with their sandboxes; give them a moment to answer.
    if tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(servers))
        .await
        .is_err()
    {
        tracing::warn!("requests still running after 5 s were cut off");
    }
    if let Err(e) = std::fs::remove_file(&socket_path) {
        tracing::warn!(socket = %socket_path.display(), "cannot remove the socket: {e}");
    }
    Ok(())
}

/// Fills `buf` with random bytes from the kernel.
pub(crate) fn random(buf: &mut [u8]) {
    // getrandom(2) fails only on bad arguments; with none, it blocks until it can answer.
    let _ = upstream_store::keys::fill_random(buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_that_panics_is_answered_with_a_500_and_the_server_goes_on() {
        let router = Router::new()
            .route(
                "/boom",
                get(|| async {
                    if std::hint::black_box(true) {
                        panic!("a handler's bug");
                    }
                    "unreachable"
                }),
            )
            .route("/fine", get(|| async { "fine" }))
            .route(
                "/number",
                get(
                    |axum::extract::Query(q): axum::extract::Query<NumberQuery>| async move {
                        format!("{:?}", q.n)
                    },
                ),
            )
            .layer(axum::middleware::from_fn(answer_always));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let ask = move |path: &'static str| {
            tokio::task::spawn_blocking(move || {
                let mut stream = std::net::TcpStream::connect(address).unwrap();
                write!(
                    stream,
                    "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut answer = String::new();
                stream.read_to_string(&mut answer).unwrap();
                answer
            })
        };
        let answer = ask("/boom").await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        assert!(answer.contains(r#""code":"internal""#), "{answer}");
        assert!(
            !answer.contains("a handler's bug"),
            "the panic is for the log: {answer}"
        );
        let answer = ask("/fine").await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("fine"),
            "{answer}"
        );
        // What axum turns away itself is the API's JSON error too.
        let answer = ask("/number?n=1e%2B300x").await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains(r#""code":"bad_request""#), "{answer}");
        assert!(answer.contains("invalid float literal"), "{answer}");
        let answer = ask("/number?n=2").await.unwrap();
        assert!(answer.ends_with("2.0"), "{answer}");
    }

    #[derive(serde::Deserialize)]
    struct NumberQuery {
        n: f64,
    }
}

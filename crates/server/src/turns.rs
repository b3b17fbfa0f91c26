//! Turns over HTTP: run a document (its sandbox from the warm pool when one fits) and read
//! the tenant's contexts, turns and artifacts. Each tenant has a context store of its own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use upstream_sandbox::{Backend, Kept, Sandbox, SandboxError, SandboxSpec};
use upstream_store::Store;
use upstream_turn::wire::TurnEvent;
use upstream_turn::{Cancel, Event, Observer, TurnError, TurnOptions};

use crate::auth::Tenant;
use crate::daemon::Daemon;
use crate::error::{ApiError, ErrorBody};
use crate::stream::Framing;

/// A document to run.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunTurn {
    /// The markdown document.
    pub document: String,
    /// Its file name, in the records and in error messages when no `path` is given
    /// (default `turn.md`).
    pub name: Option<String>,
    /// Where the client has it: an absolute path of the client's machine, which the
    /// records and error messages name it by, so that `upstream log` shows the document
    /// the client ran. A label only: the daemon never opens it.
    pub path: Option<String>,
    /// Resume the document's last turn (recorded under the same `path`) at the step that
    /// stopped it, with the workspace the steps before it left, as `upstream run --resume`.
    #[serde(default)]
    pub resume: bool,
    /// Values of the secrets its front matter names.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Answer with the turn's progress as NDJSON lines (as with
    /// `Accept: application/x-ndjson`).
    #[serde(default)]
    pub stream: bool,
}

/// A turn that ran.
#[derive(Debug, Serialize, ToSchema)]
pub struct TurnResult {
    /// The document with its results written in.
    pub document: String,
    /// The turn's record: status, steps with exit codes, output, outputs, timings.
    #[schema(value_type = Object)]
    pub turn: upstream_turn::TurnRecord,
}

/// Sandboxes for a tenant's turns: from a warm pool when one holds the spec, else made.
struct Pooled(Arc<Daemon>, String);

impl Backend for Pooled {
    fn name(&self) -> &str {
        self.0.backend_name()
    }

    fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>, SandboxError> {
        // A document that names no memory or disk limit gets the daemon's.
        let spec = &SandboxSpec {
            limits: self.0.config.with_default_limits(spec.limits),
            ..spec.clone()
        };
        if let Some(why) = self.0.config.refuse_limits(&spec.limits) {
            return Err(SandboxError::setup(
                format!("the document's `disk`: {why}"),
                None,
            ));
        }
        let pooled = self.0.take_pooled(spec);
        crate::metrics::handed_out(&self.1, pooled.is_some());
        match pooled {
            Some(sandbox) => {
                tracing::info!(tenant = %self.1, "a turn's sandbox claimed from a warm pool");
                Ok(sandbox)
            }
            None => {
                let made = self.0.backend().create(spec);
                match &made {
                    Ok(_) => tracing::info!(tenant = %self.1, "a turn's sandbox created"),
                    Err(e) => {
                        tracing::info!(tenant = %self.1, "a turn's sandbox could not be made: {e}")
                    }
                }
                made
            }
        }
    }

    fn make_root(
        &self,
        spec: &SandboxSpec,
        making: &mut dyn FnMut(&str),
    ) -> Result<(), SandboxError> {
        self.0.backend().make_root(spec, &mut |what| {
            tracing::info!(tenant = %self.1, "{what}");
            making(what);
        })
    }

    fn discard_kept(&self, kept: &Kept) {
        self.0.backend().discard_kept(kept);
    }

    fn kept(&self) -> Vec<Kept> {
        self.0.backend().kept()
    }

    fn label_kept(&self, kept: &Kept, label: &str) -> std::io::Result<()> {
        self.0.backend().label_kept(kept, label)
    }

    fn kept_label(&self, kept: &Kept) -> Option<(String, std::time::SystemTime)> {
        self.0.backend().kept_label(kept)
    }
}

struct Quiet;

/// Cancels a turn when dropped armed: when the request it runs for is dropped unanswered.
struct CancelOnDrop(Option<Cancel>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(cancel) = self.0.take() {
            cancel.cancel();
        }
    }
}

impl Observer for Quiet {
    fn event(&mut self, _: Event<'_>) {}
}

/// Sends each event, framed as the client asked.
struct Forward(tokio::sync::mpsc::Sender<Bytes>, Framing);

impl Observer for Forward {
    fn event(&mut self, event: Event<'_>) {
        let value = serde_json::to_value(TurnEvent::of(&event)).unwrap_or_else(|e| {
            tracing::error!("a turn's event could not be written as JSON: {e}");
            serde_json::Value::Null
        });
        let kind = value["event"].as_str().unwrap_or("event").to_string();
        // A client that went away has cancelled the turn (see `run_turn`); the rest of its
        // events go nowhere.
        let _ = self.0.blocking_send(self.1.frame(&kind, &value));
    }
}

/// Run a markdown document as a turn; answers with the document, results written in, and
/// the turn's record. The body is JSON (`RunTurn`), the document itself
/// (`Content-Type: text/markdown`), or a multipart form: a `document` part (a file, whose
/// name is used), with optional `name` and `secrets` (a JSON object) parts.
///
/// With `Accept: application/x-ndjson` (or `"stream": true`) the answer is the turn's
/// progress as it happens, one JSON object per line (`{"event": "step_started", …}`,
/// `step_finished` with the step's record, `output`, `image`, `context_loaded`, …), then
/// `{"result": {"document", "turn"}}` or `{"error": {…}}`; with `Accept: text/event-stream`,
/// the same objects as server-sent events named by their kind. A client that disconnects
/// stops the turn.
#[utoipa::path(post, path = "/v1/turns", tag = "turns",
    request_body(content = RunTurn,
        description = "JSON; or the markdown itself as text/markdown; or multipart/form-data"),
    responses(
        (status = 200, body = TurnResult),
        (status = 200, content_type = "application/x-ndjson",
            description = "the turn's progress, then its result"),
        (status = 200, content_type = "text/event-stream",
            description = "the turn's progress, then its result, as server-sent events"),
        (status = 400, body = ErrorBody)))]
pub async fn run_turn(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    request: axum::extract::Request,
) -> Result<axum::response::Response, ApiError> {
    use axum::extract::FromRequest;
    use axum::response::IntoResponse;
    let headers = request.headers().clone();
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let too_large = |e: axum::extract::rejection::BytesRejection| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(e.status(), "too_large", "the request body is too large")
        } else {
            ApiError::bad_request(e.body_text())
        }
    };
    let request = if content_type.starts_with("multipart/form-data") {
        let mut form = axum::extract::Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        let mut document = None;
        let mut name = None;
        let mut secrets = BTreeMap::new();
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| ApiError::bad_request(format!("the form: {}", e.body_text())))?
        {
            let part = field.name().unwrap_or("").to_string();
            let file_name = field.file_name().map(str::to_string);
            let text = field
                .text()
                .await
                .map_err(|e| ApiError::bad_request(format!("part `{part}`: {}", e.body_text())))?;
            match part.as_str() {
                "document" => {
                    document = Some(text);
                    name = name.or(file_name);
                }
                "name" => name = Some(text),
                "secrets" => {
                    secrets = serde_json::from_str(&text).map_err(|e| {
                        ApiError::bad_request(format!("part `secrets` is not a JSON object: {e}"))
                    })?
                }
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown form part `{other}`; send `document`, `name`, `secrets`"
                    )));
                }
            }
        }
        RunTurn {
            document: document
                .ok_or_else(|| ApiError::bad_request("the form has no `document` part"))?,
            name,
            path: None,
            secrets,
            resume: false,
            stream: false,
        }
    } else {
        let body = Bytes::from_request(request, &()).await.map_err(too_large)?;
        if content_type.starts_with("text/markdown") || content_type.starts_with("text/plain") {
            RunTurn {
                document: String::from_utf8(body.to_vec())
                    .map_err(|_| ApiError::bad_request("the document is not UTF-8"))?,
                name: None,
                path: None,
                secrets: BTreeMap::new(),
                resume: false,
                stream: false,
            }
        } else {
            serde_json::from_slice::<RunTurn>(&body)
                .map_err(|e| ApiError::bad_request(format!("the request body: {e}")))?
        }
    };
    let name = request.name.unwrap_or_else(|| "turn.md".into());
    if name.contains(['/', '\0']) || name.is_empty() || name.len() > 255 {
        return Err(ApiError::bad_request(
            "`name` must be a file name of 1 to 255 bytes, without a directory",
        ));
    }
    let path = match &request.path {
        Some(path) => document_label(path)?,
        None => PathBuf::from(&name),
    };
    crate::bounds::secrets(&request.secrets)?;
    let document = upstream_doc::Document::parse(&path, request.document.as_bytes())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let network = match document.front_matter().network {
        upstream_doc::Network::None => upstream_sandbox::NetworkMode::None,
        upstream_doc::Network::Host => upstream_sandbox::NetworkMode::Host,
    };
    daemon.config.host_network.check(&tenant, network)?;
    let framing = Framing::of(&headers, request.stream);
    let options = TurnOptions {
        store: Some(daemon.tenant_store(&tenant.0)),
        images: Some(daemon.config.images.clone()),
        secrets: Some(request.secrets),
        resume: request.resume,
        // The client's name for it, never a path of this host.
        document_name: Some(path.display().to_string()),
        ..TurnOptions::default()
    };
    let backend = Pooled(daemon.clone(), tenant.0.clone());
    let source = request.document;
    // Records name the tenant's store as the daemon's state directory holds it, never a
    // path of the daemon's host.
    let store_name = PathBuf::from("tenants").join(&tenant.0);
    let host_paths = daemon.host_paths();
    let tenant_name = tenant.0.clone();
    let run = move |observer: &mut dyn Observer, cancel: &Cancel| {
        let turn = upstream_turn::run(
            &document,
            source.as_bytes(),
            &backend,
            &options,
            observer,
            cancel,
        )
        .map_err(|e| match e {
            TurnError::MissingSecret { name, .. } => ApiError::bad_request(format!(
                "the document names secret `{name}`; give its value in `secrets`"
            )),
            TurnError::Resume(why) => ApiError::bad_request(why),
            // What is wrong with the image is the tenant's to fix, unless the reason is the
            // daemon's own files.
            TurnError::Sandbox(SandboxError::Image { image, reason })
                if !host_paths.iter().any(|p| reason.contains(p.as_str())) =>
            {
                ApiError::new(
                    axum::http::StatusCode::BAD_GATEWAY,
                    "image",
                    format!("cannot run image `{image}`: {reason}"),
                )
            }
            TurnError::Pull { image, source } => crate::daemon::pull_error(&image, source),
            // What the document's workdir or artifacts name is the tenant's to fix.
            TurnError::SaveArtifacts(e) if upstream_sandbox::sandboxfs::refusal(&e).is_some() => {
                ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "not_a_file",
                    format!("cannot save the turn's artifacts: {e}"),
                )
            }
            TurnError::Sandbox(e) => ApiError::from(e),
            e => ApiError::internal(e),
        })?;
        let document = turn.render(&document);
        let mut record = turn.record;
        tracing::info!(
            tenant = %tenant_name,
            turn = record.number,
            context = %record.context,
            status = ?record.status,
            duration_ms = record.duration_ms,
            "turn finished"
        );
        record.store = store_name;
        Ok::<_, ApiError>(TurnResult {
            document,
            turn: record,
        })
    };
    let share = daemon.shares.of(&tenant.0);
    let Some(framing) = framing else {
        // A client gone before the answer drops this handler, and the guard stops the turn
        // (or its wait for another turn of its context), as a streamed turn stops.
        let cancel = Cancel::default();
        let mut gone = CancelOnDrop(Some(cancel.clone()));
        let ran = share.run(move || run(&mut Quiet, &cancel)).await;
        gone.0 = None;
        let ran = ran.map_err(|e| ApiError::internal(e.to_string()))??;
        return Ok(Json(ran).into_response());
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let cancel = Cancel::default();
    // The response's end drops the receiver: a client gone before the turn ends stops it.
    let watcher = {
        let (tx, cancel) = (tx.clone(), cancel.clone());
        crate::request::spawn(async move {
            tx.closed().await;
            cancel.cancel();
        })
    };
    crate::request::spawn(async move {
        let sender = tx.clone();
        let ran = share
            .run(move || run(&mut Forward(sender, framing), &cancel))
            .await;
        let error = |code: &str, message: String| {
            let value = serde_json::json!({
                "error": { "code": code, "message": message },
                "request_id": crate::request::current(),
            });
            ("error", value)
        };
        let (kind, last) = match ran {
            Ok(Ok(result)) => ("result", serde_json::json!({ "result": result })),
            Ok(Err(e)) => error(e.code, e.message),
            Err(e) => {
                let answer = ApiError::internal(e);
                error(answer.code, answer.message)
            }
        };
        if tx.send(framing.frame(kind, &last)).await.is_err() {
            tracing::info!("the client went away before the turn's end");
        }
        watcher.abort();
    });
    Ok(framing.response(rx))
}

/// The path a client names its document by, checked to be one a record can show: absolute,
/// at most 4,096 bytes, without `.` or `..` components or control characters. It is never
/// opened.
fn document_label(path: &str) -> Result<PathBuf, ApiError> {
    let refused = |why: &str| {
        ApiError::bad_request(format!(
            "`path` {why}; send the document's absolute path on your machine, such as /home/me/project/analysis.md"
        ))
    };
    if !path.starts_with('/') {
        return Err(refused("must be absolute"));
    }
    if path.len() > 4096 {
        return Err(refused("is longer than 4,096 bytes"));
    }
    if path.chars().any(char::is_control) {
        return Err(refused("holds control characters"));
    }
    if path.ends_with('/') || path.split('/').any(|c| c == "." || c == "..") {
        return Err(refused("must name a file, without `.` or `..`"));
    }
    Ok(PathBuf::from(path))
}

/// Opens the tenant's store, on a blocking thread.
async fn with_store<T: Send + 'static>(
    daemon: &Arc<Daemon>,
    tenant: &Tenant,
    f: impl FnOnce(&Store) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let dir = daemon.tenant_store(&tenant.0);
    daemon
        .shares
        .of(&tenant.0)
        .run(move || {
            let store = Store::open(&dir)?;
            f(&store)
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ContextList {
    #[schema(value_type = Vec<Object>)]
    pub contexts: Vec<upstream_store::ContextSummary>,
}

/// The tenant's contexts.
#[utoipa::path(get, path = "/v1/contexts", tag = "turns",
    responses((status = 200, body = ContextList)))]
pub async fn list_contexts(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
) -> Result<Json<ContextList>, ApiError> {
    let contexts = with_store(&daemon, &tenant, |s| Ok(s.contexts()?)).await?;
    Ok(Json(ContextList { contexts }))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct TurnsQuery {
    /// Only this context's turns.
    pub context: Option<String>,
    /// Only the last this many.
    pub last: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TurnList {
    #[schema(value_type = Vec<Object>)]
    pub turns: Vec<upstream_store::TurnSummary>,
}

/// The tenant's turns, in order.
#[utoipa::path(get, path = "/v1/turns", tag = "turns", params(TurnsQuery),
    responses((status = 200, body = TurnList)))]
pub async fn list_turns(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Query(query): Query<TurnsQuery>,
) -> Result<Json<TurnList>, ApiError> {
    let turns = with_store(&daemon, &tenant, move |s| {
        Ok(s.turns(query.context.as_deref(), query.last)?)
    })
    .await?;
    Ok(Json(TurnList { turns }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TurnBody {
    /// The turn and its steps.
    #[schema(value_type = Object)]
    pub turn: upstream_store::TurnDetail,
    #[schema(value_type = Vec<Object>)]
    pub artifacts: Vec<upstream_store::ArtifactRow>,
}

/// A turn (by number or id), with its steps and artifacts.
#[utoipa::path(get, path = "/v1/turns/{turn}", tag = "turns",
    params(("turn" = String, Path)),
    responses((status = 200, body = TurnBody), (status = 404, body = ErrorBody)))]
pub async fn get_turn(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(selector): Path<String>,
) -> Result<Json<TurnBody>, ApiError> {
    let body = with_store(&daemon, &tenant, move |s| {
        let turn = s.turn(&selector)?;
        let artifacts = s.artifacts_of(turn.summary.number)?;
        Ok(TurnBody { turn, artifacts })
    })
    .await?;
    Ok(Json(body))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ArtifactsQuery {
    /// The context (default `default`).
    pub context: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ArtifactList {
    #[schema(value_type = Vec<Object>)]
    pub artifacts: Vec<upstream_store::ArtifactRow>,
}

/// The latest version of each artifact of a context.
#[utoipa::path(get, path = "/v1/artifacts", tag = "turns", params(ArtifactsQuery),
    responses((status = 200, body = ArtifactList)))]
pub async fn list_artifacts(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Query(query): Query<ArtifactsQuery>,
) -> Result<Json<ArtifactList>, ApiError> {
    let context = query
        .context
        .unwrap_or_else(|| upstream_store::DEFAULT_CONTEXT.to_string());
    let artifacts = with_store(
        &daemon,
        &tenant,
        move |s| Ok(s.context_artifacts(&context)?),
    )
    .await?;
    Ok(Json(ArtifactList { artifacts }))
}

/// The content of a blob of the tenant's store, by the BLAKE3 name a record gives it: the
/// document a turn ran (`source`) or left (`result`), a step's whole output (`log`: chunks
/// of a byte 1 for stdout or 2 for stderr, a little-endian u32 length, then the bytes), an
/// artifact's file. Streamed; checked against its name before the first byte is sent.
#[utoipa::path(get, path = "/v1/blobs/{blob}", tag = "turns",
    params(("blob" = String, Path, description = "64 hex digits")),
    responses((status = 200, content_type = "application/octet-stream"),
        (status = 404, body = ErrorBody)))]
pub async fn get_blob(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(name): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    use std::io::Read;
    let Some(id) = upstream_store::BlobId::parse(&name) else {
        return Err(ApiError::bad_request(
            "a blob is named by 64 hex digits, as the records of turns give them",
        ));
    };
    let missing = move || ApiError::not_found("blob", &name, "GET /v1/turns/{turn}");
    let reader = with_store(&daemon, &tenant, move |s| {
        s.blobs().open(&id).map_err(|e| match e {
            upstream_store::BlobError::Missing { .. } => missing(),
            e => ApiError::from(upstream_store::StoreError::from(e)),
        })
    })
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let share = daemon.shares.of(&tenant.0);
    crate::request::spawn(async move {
        let sent = share
            .run(move || {
                let mut reader = reader;
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => return Ok(()),
                        Ok(n) => {
                            if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                                // The client went away: nothing more to send.
                                return Ok(());
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(reader.error(e)),
                    }
                }
            })
            .await;
        match sent {
            Ok(Ok(())) => {}
            // The answer has begun: its end, cut short, is all the client can be told.
            Ok(Err(e)) => tracing::error!("sending a blob failed: {e}"),
            Err(e) => tracing::error!("sending a blob failed: {e}"),
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

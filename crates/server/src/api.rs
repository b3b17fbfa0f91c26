//! Handlers of `/v1/sandboxes`: create, read, list, delete, extend; exec (whole or streamed
//! as NDJSON); background processes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use upstream_sandbox::{ExecRequest, ExitStatus, Isolation, Limits, NetworkMode, Scope, Stream};

use crate::auth::Tenant;
use crate::bounds;
use crate::daemon::{CreateRequest, Daemon, Live, Process, Shape, unix_ms};
use crate::error::{ApiError, ErrorBody};

/// The JSON body extractor whose errors are [`ApiError`]s.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);

/// Limits of a sandbox.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsBody {
    /// Bytes of memory, or a size such as `512M`, `2G` (4M to 1024T). Default: the daemon's
    /// `--default-memory`.
    #[schema(value_type = Option<String>, example = "512M")]
    pub memory: Option<serde_json::Value>,
    /// CPUs (fractions allowed, 0.01 to 1024).
    pub cpus: Option<f64>,
    /// Processes and threads (default 1024, at most 4194304).
    pub pids: Option<u64>,
    /// Bytes the sandbox may write to disk (its root, /tmp, its workspace), or a size such
    /// as `2G` (16M to 8T). Default: the daemon's `--default-disk`.
    #[schema(value_type = Option<String>, example = "2G")]
    pub disk: Option<serde_json::Value>,
}

/// What to make a sandbox of.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// An OCI image (`python:3.12`, `ghcr.io/org/tool@sha256:…`) or `host` (the default).
    pub image: Option<String>,
    /// Environment of every command, over the image's (at most 4096 variables, 128 KiB a
    /// value, 1 MiB in all).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: LimitsBody,
    /// `none` (only loopback, the default) or `host`.
    pub network: Option<String>,
    /// `namespaces` (the default: the host's kernel, namespaces and cgroups) or `vm` (a
    /// microVM with a kernel of its own).
    pub isolation: Option<String>,
    /// Seconds without use after which the sandbox is torn down (at most 31536000, 365
    /// days); 0: never. Default: the daemon's `--idle-timeout`.
    pub timeout: Option<f64>,
    /// Seconds after which the sandbox is torn down whatever it does (at most 31536000);
    /// 0: never. Default: the daemon's `--lifetime` (unlimited unless set).
    pub lifetime: Option<f64>,
    /// Labels to find it by (`GET /v1/sandboxes?metadata.key=value`): at most 64 keys of
    /// up to 128 bytes, values of up to 1024 bytes, 16 KiB in all.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A sandbox.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SandboxBody {
    pub id: String,
    pub image: String,
    pub limits: LimitsOut,
    pub network: String,
    /// `namespaces` or `vm`.
    pub isolation: String,
    pub metadata: BTreeMap<String, String>,
    /// Unix time in milliseconds.
    pub created_at: u64,
    /// Milliseconds it took to hand out.
    pub created_ms: f64,
    /// Whether it came from the warm pool.
    pub from_pool: bool,
    /// Idle timeout in seconds; absent: none.
    pub timeout: Option<f64>,
    /// Seconds until it is torn down if unused; absent: never.
    pub expires_in: Option<f64>,
    /// Where commands start.
    pub workdir: String,
    /// Limits the sandbox was given that this host cannot enforce, each with why (a
    /// rootless daemon has no cgroups to bound memory with, nor a filesystem of the
    /// sandbox's own to bound its disk); empty when every limit holds.
    pub unenforced: Vec<String>,
    /// `running`, or `gone` once its agent is gone (killed for want of memory, or ended):
    /// nothing more runs in it, and it waits to be deleted.
    pub state: String,
    /// Why it is gone and what to do, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gone: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LimitsOut {
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    /// Bytes of disk.
    pub disk: Option<u64>,
}

impl SandboxBody {
    fn of(live: &Live) -> SandboxBody {
        let ended = live.ended();
        SandboxBody {
            id: live.id.clone(),
            image: live.shape.image.clone(),
            limits: LimitsOut {
                memory: live.shape.limits.memory,
                cpus: live.shape.limits.cpus,
                pids: live.shape.limits.pids,
                disk: live.shape.limits.disk,
            },
            network: match live.shape.network {
                NetworkMode::None => "none".into(),
                NetworkMode::Host => "host".into(),
            },
            isolation: match live.shape.isolation {
                Isolation::Namespaces => "namespaces".into(),
                Isolation::Vm => "vm".into(),
            },
            metadata: live.metadata.clone(),
            created_at: live.created_at,
            created_ms: live.claim_ms,
            from_pool: live.from_pool,
            timeout: live.idle_timeout().map(|t| t.as_secs_f64()),
            expires_in: live.expires_in(),
            workdir: live.prepared.workdir.clone(),
            unenforced: live.unenforced.clone(),
            state: if ended.is_some() { "gone" } else { "running" }.into(),
            gone: ended.map(|e| e.message),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxBody>,
}

/// A size given as bytes or as text such as `512M`, in `limits.<field>`.
fn size(value: &Option<serde_json::Value>, field: &str) -> Result<Option<u64>, ApiError> {
    let bytes = match value {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Number(n)) => n.as_u64().ok_or_else(|| {
            ApiError::bad_request(format!("`limits.{field}` must be a whole number of bytes"))
        })?,
        Some(serde_json::Value::String(s)) => upstream_doc::front_matter::parse_size(s)
            .map_err(|e| ApiError::bad_request(format!("`limits.{field}`: {e}")))?,
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "`limits.{field}` must be bytes or a size such as `512M`"
            )));
        }
    };
    Ok(Some(bytes))
}

fn memory(value: &Option<serde_json::Value>) -> Result<Option<u64>, ApiError> {
    size(value, "memory")?
        .map(|b| bounds::memory(b, "limits.memory"))
        .transpose()
}

fn disk(value: &Option<serde_json::Value>) -> Result<Option<u64>, ApiError> {
    size(value, "disk")?
        .map(|b| bounds::disk(b, "limits.disk"))
        .transpose()
}

impl CreateSandbox {
    fn into_request(self) -> Result<(CreateRequest, BTreeMap<String, String>), ApiError> {
        let image = self.image.unwrap_or_else(|| "host".into());
        bounds::image(&image)?;
        bounds::metadata(&self.metadata)?;
        bounds::env(&self.env, "env")?;
        let network = match self.network.as_deref() {
            None | Some("none") => NetworkMode::None,
            Some("host") => NetworkMode::Host,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "`network` is `{other}`; use `none` or `host`"
                )));
            }
        };
        let isolation = match self.isolation.as_deref() {
            None | Some("namespaces") => Isolation::Namespaces,
            Some("vm") => Isolation::Vm,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "`isolation` is `{other}`; use `namespaces` or `vm`"
                )));
            }
        };
        let cpus = match self.limits.cpus {
            Some(c) => Some(bounds::cpus(c, "limits.cpus")?),
            None => None,
        };
        let pids = bounds::pids(
            self.limits.pids.unwrap_or(Limits::DEFAULT_PIDS),
            "limits.pids",
        )?;
        let shape = Shape {
            image,
            limits: Limits {
                memory: memory(&self.limits.memory)?,
                cpus,
                pids: Some(pids),
                disk: disk(&self.limits.disk)?,
            },
            network,
            isolation,
        };
        let idle = bounds::seconds(self.timeout, "timeout")?;
        let lifetime = bounds::seconds(self.lifetime, "lifetime")?;
        Ok((
            CreateRequest {
                shape,
                metadata: self.metadata,
                idle_timeout: idle,
                lifetime,
            },
            self.env,
        ))
    }
}

/// Make a sandbox (from the warm pool when one of its shape is ready).
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes",
    request_body = CreateSandbox,
    responses(
        (status = 201, body = SandboxBody),
        (status = 400, body = ErrorBody), (status = 429, body = ErrorBody),
    ))]
pub async fn create_sandbox(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    JsonBody(body): JsonBody<CreateSandbox>,
) -> Result<(StatusCode, Json<SandboxBody>), ApiError> {
    let (request, env) = body.into_request()?;
    let live = daemon.create(&tenant, request, env).await?;
    Ok((StatusCode::CREATED, Json(SandboxBody::of(&live))))
}

/// Filters of a listing: `metadata.KEY=VALUE`, any number.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    #[serde(flatten)]
    #[param(value_type = Object)]
    pub filters: BTreeMap<String, String>,
}

/// The tenant's sandboxes, oldest first.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    params(ListQuery),
    responses((status = 200, body = SandboxList)))]
pub async fn list_sandboxes(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Query(query): Query<ListQuery>,
) -> Result<Json<SandboxList>, ApiError> {
    let mut wanted = Vec::new();
    for (key, value) in &query.filters {
        match key.strip_prefix("metadata.") {
            Some(k) if !k.is_empty() => wanted.push((k.to_string(), value.clone())),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown filter `{key}`; filter with `metadata.KEY=VALUE`"
                )));
            }
        }
    }
    let sandboxes = daemon
        .list(&tenant.0)
        .iter()
        .filter(|l| {
            wanted
                .iter()
                .all(|(k, v)| l.metadata.get(k).is_some_and(|m| m == v))
        })
        .map(|l| SandboxBody::of(l.as_ref()))
        .collect();
    Ok(Json(SandboxList { sandboxes }))
}

/// A sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path)),
    responses((status = 200, body = SandboxBody), (status = 404, body = ErrorBody)))]
pub async fn get_sandbox(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<SandboxBody>, ApiError> {
    let live = daemon.get(&tenant.0, &id)?;
    Ok(Json(SandboxBody::of(&live)))
}

/// Tear a sandbox down, with everything running in it.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_sandbox(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    daemon.delete(&tenant.0, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new idle timeout.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    /// Seconds without use before the sandbox is torn down, counted from now (at most
    /// 31536000); 0: never.
    pub timeout: f64,
}

/// Set a sandbox's idle timeout, counted from now.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/timeout", tag = "sandboxes",
    params(("id" = String, Path)), request_body = SetTimeout,
    responses((status = 200, body = SandboxBody), (status = 404, body = ErrorBody)))]
pub async fn set_timeout(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<SetTimeout>,
) -> Result<Json<SandboxBody>, ApiError> {
    let live = daemon.get(&tenant.0, &id)?;
    let timeout = bounds::seconds(Some(body.timeout), "timeout")?.flatten();
    live.set_idle_timeout(timeout);
    Ok(Json(SandboxBody::of(&live)))
}

/// A command to run.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// The program and its arguments; the program is looked up in `PATH` (at most 4096
    /// arguments, 128 KiB each, 1 MiB in all).
    pub cmd: Vec<String>,
    /// Text given to the command on its standard input.
    pub stdin: Option<String>,
    /// Bytes given to the command on its standard input, base64 (instead of `stdin`).
    pub stdin_base64: Option<String>,
    /// Environment over the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the sandbox's workdir).
    pub cwd: Option<String>,
    /// Seconds after which the command (its process group) is killed (at most 31536000).
    pub timeout: Option<f64>,
    /// Answer with the output as it comes, as NDJSON (also with `Accept: application/x-ndjson`).
    #[serde(default)]
    pub stream: bool,
}

/// How a command ended, with all it wrote.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ExecResult {
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// The kernel killed a process of the sandbox (the command or another) for going over
    /// the sandbox's memory limit while the command ran: a signal 9 with this set is the
    /// memory limit's doing.
    pub out_of_memory: bool,
    /// The command failed with the sandbox's disk full: the disk limit it ran out of, in
    /// bytes; null otherwise.
    pub out_of_disk: Option<u64>,
    pub duration_ms: f64,
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    pub stderr: String,
    /// Output past the first 16 MiB of a stream was dropped (stream it to get it all).
    pub truncated: bool,
}

/// The most output of one stream a whole (not streamed) exec answer carries.
const MAX_EXEC_OUTPUT: usize = 16 << 20;

/// Builds the agent request: the sandbox's environment under the request's.
fn exec_request(live: &Live, body: &ExecBody) -> Result<ExecRequest, ApiError> {
    bounds::argv(&body.cmd)?;
    bounds::env(&body.env, "env")?;
    if let Some(cwd) = &body.cwd {
        bounds::path(cwd, "cwd")?;
    }
    let timeout_ms = match bounds::seconds(body.timeout, "timeout")? {
        Some(Some(t)) => Some(t.as_millis().max(1) as u64),
        _ => None,
    };
    let mut env = live.base_env.clone();
    env.extend(live.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(body.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(ExecRequest {
        argv: body.cmd.clone(),
        env: env.into_iter().collect(),
        cwd: body
            .cwd
            .clone()
            .unwrap_or_else(|| live.prepared.workdir.clone()),
        timeout_ms,
        user: live.user.as_ref().map(|u| (u.uid, u.gid)),
        stdin: stdin_of(body.stdin.as_deref(), body.stdin_base64.as_deref())?,
        timeout_kills: Scope::Command,
        ..ExecRequest::default()
    })
}

/// A command's standard input, from text or from base64.
fn stdin_of(text: Option<&str>, base64: Option<&str>) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    match (text, base64) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give `stdin` (text) or `stdin_base64` (bytes), not both",
        )),
        (Some(text), None) => Ok(text.as_bytes().to_vec()),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| ApiError::bad_request(format!("`stdin_base64` is not base64: {e}"))),
        (None, None) => Ok(Vec::new()),
    }
}

fn status_parts(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    match status {
        ExitStatus::Code(c) => (Some(c), None),
        ExitStatus::Signal(s) => (None, Some(s)),
    }
}

/// Run a command in a sandbox: the whole output at the end, or streamed as NDJSON lines
/// (`{"stdout": "…"}`, `{"stderr": "…"}`, then `{"exit": {…}}`), or as server-sent events
/// (`Accept: text/event-stream`) carrying the same objects, each named by its kind.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "exec",
    params(("id" = String, Path)), request_body = ExecBody,
    responses(
        (status = 200, body = ExecResult, description = "the command's end and output"),
        (status = 200, content_type = "application/x-ndjson", description = "output as it comes"),
        (status = 200, content_type = "text/event-stream",
            description = "output as it comes, as server-sent events"),
        (status = 404, body = ErrorBody),
    ))]
pub async fn exec(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let live = daemon.get(&tenant.0, &id)?;
    let request = exec_request(&live, &body)?;
    let framing = crate::stream::Framing::of(&headers, body.stream);
    let start = Instant::now();
    let Some(framing) = framing else {
        let result = live
            .alongside(move |session| {
                let mut out = Capture::default();
                let mut err = Capture::default();
                let outcome = session.exec(&request, &mut |stream, data| match stream {
                    Stream::Stdout => out.push(data),
                    Stream::Stderr => err.push(data),
                })?;
                let (exit_code, signal) = status_parts(outcome.status);
                Ok(ExecResult {
                    exit_code,
                    signal,
                    timed_out: outcome.timed_out,
                    out_of_memory: outcome.out_of_memory,
                    out_of_disk: outcome.out_of_disk,
                    duration_ms: outcome.duration.as_secs_f64() * 1000.0,
                    truncated: out.truncated || err.truncated,
                    stdout: String::from_utf8_lossy(&out.data).into_owned(),
                    stderr: String::from_utf8_lossy(&err.data).into_owned(),
                })
            })
            .await?;
        crate::metrics::exec(&live.tenant, start.elapsed());
        return Ok(Json(result).into_response());
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
    crate::request::spawn(async move {
        let sender = tx.clone();
        let ran = live
            .alongside(move |session| {
                let outcome = session.exec(&request, &mut |stream, data| {
                    let key = match stream {
                        Stream::Stdout => "stdout",
                        Stream::Stderr => "stderr",
                    };
                    let text = String::from_utf8_lossy(data);
                    // A client that went away stops receiving; the command runs on to its
                    // end or timeout.
                    let message = serde_json::json!({ key: text });
                    let _ = sender.blocking_send(framing.frame(key, &message));
                })?;
                Ok(outcome)
            })
            .await;
        crate::metrics::exec(&live.tenant, start.elapsed());
        let (kind, last) = match ran {
            Ok(outcome) => {
                let (exit_code, signal) = status_parts(outcome.status);
                let exit = serde_json::json!({ "exit": {
                    "exit_code": exit_code,
                    "signal": signal,
                    "timed_out": outcome.timed_out,
                    "out_of_memory": outcome.out_of_memory,
                    "out_of_disk": outcome.out_of_disk,
                    "duration_ms": outcome.duration.as_secs_f64() * 1000.0,
                }});
                ("exit", exit)
            }
            Err(e) => {
                let error = serde_json::json!({
                    "error": { "code": e.code, "message": e.message },
                    "request_id": crate::request::current(),
                });
                ("error", error)
            }
        };
        // A client that went away has its command's end logged with its request.
        if tx.send(framing.frame(kind, &last)).await.is_err() {
            tracing::debug!("the client went away before the command's end");
        }
    });
    Ok(framing.response(rx))
}

/// Output kept up to [`MAX_EXEC_OUTPUT`].
#[derive(Default)]
struct Capture {
    data: Vec<u8>,
    truncated: bool,
}

impl Capture {
    fn push(&mut self, data: &[u8]) {
        let room = MAX_EXEC_OUTPUT.saturating_sub(self.data.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// A command to start in the background.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartProcess {
    pub cmd: Vec<String>,
    pub stdin: Option<String>,
    /// Bytes for its standard input, base64 (instead of `stdin`).
    pub stdin_base64: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
}

/// A background command.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProcessBody {
    /// Its pid in the sandbox: the handle for its output, signals and wait.
    pub pid: i32,
    pub cmd: Vec<String>,
    /// `running` or `exited`.
    pub state: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Unix time in milliseconds.
    pub started_at: u64,
    /// Where its output goes in the sandbox (also readable as files).
    pub stdout_path: String,
    pub stderr_path: String,
}

impl ProcessBody {
    fn of(p: &Process, status: Option<ExitStatus>) -> ProcessBody {
        let (exit_code, signal) = status.map_or((None, None), status_parts);
        ProcessBody {
            pid: p.pid,
            cmd: p.cmd.clone(),
            state: if status.is_some() {
                "exited"
            } else {
                "running"
            }
            .into(),
            exit_code,
            signal,
            started_at: p.started_at,
            stdout_path: p.stdout.clone(),
            stderr_path: p.stderr.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessList {
    pub processes: Vec<ProcessBody>,
}

/// Where background commands' output goes in a sandbox.
const PROCESS_DIR: &str = "/run/upstream/processes";

/// Start a command in the background; its output is kept for reading later.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes", tag = "processes",
    params(("id" = String, Path)), request_body = StartProcess,
    responses((status = 201, body = ProcessBody), (status = 404, body = ErrorBody)))]
pub async fn start_process(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<StartProcess>,
) -> Result<(StatusCode, Json<ProcessBody>), ApiError> {
    let live = daemon.get(&tenant.0, &id)?;
    let exec = ExecBody {
        cmd: body.cmd,
        stdin: body.stdin,
        stdin_base64: body.stdin_base64,
        env: body.env,
        cwd: body.cwd,
        timeout: None,
        stream: false,
    };
    let request = exec_request(&live, &exec)?;
    let n = unix_ms();
    let stdout = format!("{PROCESS_DIR}/{n}-{}.stdout", live.processes_started());
    let stderr = stdout.replace(".stdout", ".stderr");
    let (out, err) = (stdout.clone(), stderr.clone());
    let pid = live
        .with(move |sandbox| Ok(sandbox.spawn(&request, &out, &err)?))
        .await?;
    let process = Process {
        pid,
        cmd: exec.cmd,
        stdout,
        stderr,
        started_at: n,
    };
    live.processes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(pid, process.clone());
    Ok((StatusCode::CREATED, Json(ProcessBody::of(&process, None))))
}

fn process_of(live: &Live, pid: i32) -> Result<Process, ApiError> {
    live.processes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&pid)
        .cloned()
        .ok_or_else(|| {
            ApiError::not_found(
                "process",
                &pid.to_string(),
                &format!("GET /v1/sandboxes/{}/processes", live.id),
            )
        })
}

/// The sandbox's background commands.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes", tag = "processes",
    params(("id" = String, Path)),
    responses((status = 200, body = ProcessList), (status = 404, body = ErrorBody)))]
pub async fn list_processes(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path(id): Path<String>,
) -> Result<Json<ProcessList>, ApiError> {
    let live = daemon.get(&tenant.0, &id)?;
    let processes: Vec<Process> = live
        .processes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    let processes = live
        .with(move |sandbox| {
            processes
                .iter()
                .map(|p| {
                    let status = sandbox.wait(p.pid, Some(Duration::ZERO))?;
                    Ok(ProcessBody::of(p, status))
                })
                .collect::<Result<Vec<_>, ApiError>>()
        })
        .await?;
    Ok(Json(ProcessList { processes }))
}

/// How long to wait.
#[derive(Debug, Deserialize, IntoParams)]
pub struct WaitQuery {
    /// Seconds to wait at most (default: 0, just look; at most 31536000).
    pub timeout: Option<f64>,
}

/// A background command's state; with `timeout`, waits up to that long for it to end.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}", tag = "processes",
    params(("id" = String, Path), ("pid" = i32, Path), WaitQuery),
    responses((status = 200, body = ProcessBody), (status = 404, body = ErrorBody)))]
pub async fn get_process(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path((id, pid)): Path<(String, i32)>,
    Query(query): Query<WaitQuery>,
) -> Result<Json<ProcessBody>, ApiError> {
    let live = daemon.get(&tenant.0, &id)?;
    let process = process_of(&live, pid)?;
    let timeout = bounds::seconds(query.timeout, "timeout")?
        .flatten()
        .unwrap_or(Duration::ZERO);
    // Waiting is looking again and again, ever less often: the sandbox serves other requests
    // meanwhile, and a command's end is seen within 25 ms.
    let _busy = live.hold();
    let now = Instant::now();
    let deadline = now.checked_add(timeout).unwrap_or(now);
    let mut pause = Duration::from_millis(1);
    let status = loop {
        let status = live
            .with(move |sandbox| Ok(sandbox.wait(pid, Some(Duration::ZERO))?))
            .await?;
        let now = Instant::now();
        if status.is_some() || now >= deadline {
            break status;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(25));
    };
    Ok(Json(ProcessBody::of(&process, status)))
}

/// A signal to send.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// A name (`TERM`, `SIGKILL`, `INT`) or a number.
    #[schema(value_type = String, example = "TERM")]
    pub signal: serde_json::Value,
}

fn signal_number(value: &serde_json::Value) -> Result<i32, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "`signal` is {value}; give a name such as `TERM` or `KILL`, or a number"
        ))
    };
    match value {
        serde_json::Value::Number(n) => n.as_i64().and_then(bounds::signal).ok_or_else(bad),
        serde_json::Value::String(s) => {
            let name = s.trim_start_matches("SIG").to_ascii_uppercase();
            format!("SIG{name}")
                .parse::<nix::sys::signal::Signal>()
                .map(|s| s as i32)
                .map_err(|_| bad())
        }
        _ => Err(bad()),
    }
}

/// Send a signal to a background command (its process group).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/signal", tag = "processes",
    params(("id" = String, Path), ("pid" = i32, Path)), request_body = SignalBody,
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn signal_process(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path((id, pid)): Path<(String, i32)>,
    JsonBody(body): JsonBody<SignalBody>,
) -> Result<StatusCode, ApiError> {
    let live = daemon.get(&tenant.0, &id)?;
    process_of(&live, pid)?;
    let signal = signal_number(&body.signal)?;
    live.with(move |sandbox| Ok(sandbox.signal(pid, signal)?))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Which output and from where.
#[derive(Debug, Deserialize, IntoParams)]
pub struct OutputQuery {
    /// `stdout` (default) or `stderr`.
    pub stream: Option<String>,
    /// Bytes to skip: what was read before.
    pub offset: Option<u64>,
}

/// A background command's output from `offset` on, as raw bytes.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}/output", tag = "processes",
    params(("id" = String, Path), ("pid" = i32, Path), OutputQuery),
    responses(
        (status = 200, content_type = "application/octet-stream", description = "the bytes"),
        (status = 404, body = ErrorBody)))]
pub async fn process_output(
    State(daemon): State<Arc<Daemon>>,
    tenant: Tenant,
    Path((id, pid)): Path<(String, i32)>,
    Query(query): Query<OutputQuery>,
) -> Result<Response, ApiError> {
    let live = daemon.get(&tenant.0, &id)?;
    let process = process_of(&live, pid)?;
    let path = match query.stream.as_deref() {
        None | Some("stdout") => process.stdout,
        Some("stderr") => process.stderr,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`stream` is `{other}`; use `stdout` or `stderr`"
            )));
        }
    };
    let offset = query.offset.unwrap_or(0);
    if offset > i64::MAX as u64 {
        return Err(ApiError::bad_request(format!(
            "`offset` is {offset}; give at most {}",
            i64::MAX
        )));
    }
    crate::files::download(&live, &path, offset).await
}

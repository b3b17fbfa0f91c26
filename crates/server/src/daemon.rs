//! The daemon's state: live sandboxes, warm pools, the image cache, the key store.
//!
//! A sandbox is driven through blocking calls (its agent speaks over a socket), so every
//! operation on one runs on tokio's blocking threads, one at a time per sandbox (a mutex);
//! the async side only hands requests over and streams what comes back.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use upstream_sandbox::{
    ClientError, Interrupter, Isolation, Limits, NetworkMode, Sandbox, SandboxError, SandboxSpec,
    Session, SharedBackend, WorkspaceSpec,
};
use upstream_store::Store;
use upstream_turn::ImageSource;

use crate::auth::{Door, Tenant};
use crate::error::ApiError;
use crate::share::{Share, ShareError, Shares};

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// TCP addresses to listen on (API keys required).
    pub listen: Vec<std::net::SocketAddr>,
    /// The local socket (mode 0600, no key: its requests act as tenant [`LOCAL_TENANT`]).
    pub socket: PathBuf,
    /// Where the daemon keeps its key store and the tenants' context stores.
    pub state_dir: PathBuf,
    /// Warm pools: the shape of their sandboxes and how many to keep ready.
    pub pools: Vec<(Shape, usize)>,
    /// Lifetime of a sandbox that asks for none; `None`: unlimited.
    pub default_lifetime: Option<Duration>,
    /// Most sandboxes handed out at once, all tenants together.
    pub max_sandboxes: usize,
    /// Most sandboxes one tenant may have at once.
    pub max_per_tenant: usize,
    /// Most blocking threads one tenant's operations may hold at once (see
    /// [`crate::share`]); more wait their turn.
    pub max_concurrent_per_tenant: usize,
    /// Idle timeout of a sandbox that asks for none; `None`: never.
    pub default_idle_timeout: Option<Duration>,
    /// Memory limit of a sandbox or turn that asks for none; `None`: unlimited.
    pub default_memory: Option<u64>,
    /// Disk limit of a sandbox or turn that asks for none.
    pub default_disk: u64,
    /// The most disk a sandbox or turn may ask for: a disk's metadata grows with its size
    /// (about 12 MiB for 1 TiB), and the host pays it for every sandbox.
    pub max_disk: u64,
    /// Largest request body accepted outside file uploads.
    pub max_body: usize,
    pub images: ImageSource,
    /// Which tenants' sandboxes and turns may have the host's network.
    pub host_network: HostNetwork,
    /// Tenants whose keys see the daemon-wide `/metrics`, as the local socket does.
    pub operators: BTreeSet<String>,
}

/// Who may ask for `network: host`: a sandbox with the host's network reaches the host's
/// loopback services and abstract Unix sockets, so no tenant may unless the operator says
/// so. Requests on the local socket always may: they are the operator's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNetwork {
    /// Every tenant may (`--allow-host-network`).
    pub every_tenant: bool,
    /// These tenants may (`--allow-host-network-for`).
    pub tenants: BTreeSet<String>,
}

impl HostNetwork {
    /// Whether `tenant` may have the host's network.
    pub fn allows(&self, tenant: &Tenant) -> bool {
        tenant.1 == Door::Local || self.every_tenant || self.tenants.contains(&tenant.0)
    }

    /// Whether any tenant may.
    pub fn anyone(&self) -> bool {
        self.every_tenant || !self.tenants.is_empty()
    }

    /// `Ok` when `tenant` may have `network`; else the refusal, saying how to allow it.
    pub fn check(&self, tenant: &Tenant, network: NetworkMode) -> Result<(), ApiError> {
        if network == NetworkMode::None || self.allows(tenant) {
            return Ok(());
        }
        Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "`network: host` would give the sandbox the host's network, its loopback \
                 services included, and this daemon does not allow it for tenant `{0}`; \
                 use `network: none`, or ask the operator to start `upstream serve` with \
                 `--allow-host-network-for {0}` (or `--allow-host-network` for every tenant)",
                tenant.0
            ),
        ))
    }
}

impl Config {
    /// `limits` with the daemon's defaults where they name none.
    pub fn with_default_limits(&self, limits: Limits) -> Limits {
        Limits {
            memory: limits.memory.or(self.default_memory),
            disk: Some(limits.disk.unwrap_or(self.default_disk)),
            ..limits
        }
    }

    /// Why `limits` are more than this daemon gives, if they are.
    pub fn refuse_limits(&self, limits: &Limits) -> Option<String> {
        let disk = limits.disk?;
        (disk > self.max_disk).then(|| {
            format!(
                "a disk of {} is more than this daemon gives a sandbox ({}, its --max-disk); ask for less",
                upstream_doc::front_matter::format_size(disk),
                upstream_doc::front_matter::format_size(self.max_disk)
            )
        })
    }
}

/// The tenant of requests on the local socket.
pub const LOCAL_TENANT: &str = "local";

/// The image, limits, network and isolation a sandbox is made with: what a warm pool is
/// keyed by.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub image: String,
    pub limits: Limits,
    pub network: NetworkMode,
    pub isolation: Isolation,
}

impl Shape {
    /// `IMAGE[,memory=SIZE][,disk=SIZE][,cpus=N][,pids=N][,network=none|host]
    /// [,isolation=namespaces|vm]`: a pool's shape as `--pool` names it.
    pub fn parse(text: &str) -> Result<Shape, String> {
        let mut parts = text.split(',');
        let image = parts
            .next()
            .filter(|i| !i.is_empty())
            .ok_or("name an image")?;
        let mut shape = Shape::new(image);
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not KEY=VALUE"))?;
            match key {
                // A pool's limits are bounded as a request's are.
                "memory" => {
                    let bytes = upstream_doc::front_matter::parse_size(value)?;
                    shape.limits.memory =
                        Some(crate::bounds::memory(bytes, "memory").map_err(|e| e.message)?)
                }
                "disk" => {
                    let bytes = upstream_doc::front_matter::parse_size(value)?;
                    shape.limits.disk =
                        Some(crate::bounds::disk(bytes, "disk").map_err(|e| e.message)?)
                }
                "cpus" => {
                    let cpus: f64 = value
                        .parse()
                        .map_err(|_| format!("cpus `{value}` is not a number"))?;
                    shape.limits.cpus =
                        Some(crate::bounds::cpus(cpus, "cpus").map_err(|e| e.message)?);
                }
                "pids" => {
                    let pids = value
                        .parse()
                        .map_err(|_| format!("pids `{value}` is not a number"))?;
                    shape.limits.pids =
                        Some(crate::bounds::pids(pids, "pids").map_err(|e| e.message)?)
                }
                "network" => {
                    shape.network = match value {
                        "none" => NetworkMode::None,
                        "host" => NetworkMode::Host,
                        _ => return Err(format!("network `{value}`: use none or host")),
                    }
                }
                "isolation" => {
                    shape.isolation = match value {
                        "namespaces" => Isolation::Namespaces,
                        "vm" => Isolation::Vm,
                        _ => return Err(format!("isolation `{value}`: use namespaces or vm")),
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown `{key}`; a pool takes memory, disk, cpus, pids, network and \
                         isolation"
                    ));
                }
            }
        }
        Ok(shape)
    }

    pub fn new(image: &str) -> Shape {
        Shape {
            image: image.to_string(),
            limits: Limits {
                pids: Some(Limits::DEFAULT_PIDS),
                ..Limits::default()
            },
            network: NetworkMode::None,
            isolation: Isolation::Namespaces,
        }
    }

    /// `python:3.12 memory=… cpus=… pids=… network=host isolation=vm`: a pool's name in
    /// metrics.
    pub fn key(&self) -> String {
        let mut key = self.image.clone();
        if let Some(m) = self.limits.memory {
            key.push_str(&format!(" memory={m}"));
        }
        if let Some(d) = self.limits.disk {
            key.push_str(&format!(" disk={d}"));
        }
        if let Some(c) = self.limits.cpus {
            key.push_str(&format!(" cpus={c}"));
        }
        if let Some(p) = self.limits.pids.filter(|p| *p != Limits::DEFAULT_PIDS) {
            key.push_str(&format!(" pids={p}"));
        }
        if self.network == NetworkMode::Host {
            key.push_str(" network=host");
        }
        if self.isolation == Isolation::Vm {
            key.push_str(" isolation=vm");
        }
        key
    }
}

/// An image made ready for sandboxes: the spec to make them with and what commands in them
/// start with.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub spec: SandboxSpec,
    pub image: upstream_turn::image::Prepared,
    pub workdir: String,
}

/// A sandbox handed out to a tenant.
pub struct Live {
    pub id: String,
    pub tenant: String,
    pub shape: Shape,
    pub prepared: Prepared,
    pub metadata: BTreeMap<String, String>,
    /// Limits this host does not enforce for the sandbox, each with why.
    pub unenforced: Vec<String>,
    /// Environment of every command, over the image's.
    pub env: BTreeMap<String, String>,
    /// Whom commands run as: the image's user when the sandbox has its ids; `None`: root.
    pub user: Option<upstream_image::ImageUser>,
    /// What every command starts with, under [`Live::env`]: the base environment, the
    /// user's and the image's ([`upstream_turn::image::Prepared::env`]).
    pub base_env: BTreeMap<String, String>,
    /// Background commands started so far.
    started: AtomicUsize,
    /// Unix time in milliseconds.
    pub created_at: u64,
    /// How long it took to hand out, in milliseconds.
    pub claim_ms: f64,
    pub from_pool: bool,
    times: Mutex<Times>,
    /// Operations in flight: a busy sandbox is never idle.
    busy: AtomicUsize,
    sandbox: Mutex<Option<Box<dyn Sandbox>>>,
    /// Sessions no command runs on, for the next commands.
    sessions: Mutex<Vec<Box<dyn Session>>>,
    interrupter: Arc<dyn Interrupter>,
    /// Background commands started through the API, by pid.
    pub processes: Mutex<BTreeMap<i32, Process>>,
    /// The tenant's share of the daemon's blocking threads.
    share: Share,
    /// Set once its agent is gone: the answer to every later operation.
    ended: Mutex<Option<ApiError>>,
}

/// A background command.
#[derive(Debug, Clone)]
pub struct Process {
    pub pid: i32,
    pub cmd: Vec<String>,
    pub stdout: String,
    pub stderr: String,
    pub started_at: u64,
}

/// A sandbox in use: see [`Live::hold`].
pub struct Busy(Arc<Live>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Times {
    last_used: Instant,
    idle_timeout: Option<Duration>,
    /// When the sandbox is torn down whatever it is doing; `None`: never.
    deadline: Option<Instant>,
}

impl Live {
    /// Runs `f` on the sandbox on a blocking thread of its tenant's share, after any
    /// operation already running.
    pub async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut dyn Sandbox) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let live = self.clone();
        // Held by the work, so the sandbox is busy until the work ends, not the request.
        let busy = self.hold();
        let result = self
            .blocking(move || {
                let _busy = busy;
                if let Some(ended) = live.ended() {
                    return Err(ended);
                }
                let mut guard = live.sandbox.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_mut() {
                    Some(sandbox) => {
                        f(sandbox.as_mut()).map_err(|e| live.settle(sandbox.as_mut(), e))
                    }
                    None => Err(gone(&live.id)),
                }
            })
            .await;
        result.map_err(|e| ApiError::internal(format!("an operation failed: {e}")))?
    }

    /// Runs `f` on a session of its own on a blocking thread of its tenant's share:
    /// commands run this way go on alongside each other and alongside [`Live::with`]'s
    /// operations.
    pub async fn alongside<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut dyn Session) -> Result<T, SandboxError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let live = self.clone();
        let busy = self.hold();
        let result = self
            .blocking(move || {
                let _busy = busy;
                if let Some(ended) = live.ended() {
                    return Err(ended);
                }
                let idle = live
                    .sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop();
                let mut session = match idle {
                    Some(session) => session,
                    None => {
                        let mut guard = live.sandbox.lock().unwrap_or_else(|e| e.into_inner());
                        match guard.as_mut() {
                            Some(sandbox) => sandbox.session().map_err(|e| {
                                let e = ApiError::from(e);
                                live.settle(sandbox.as_mut(), e)
                            })?,
                            None => return Err(gone(&live.id)),
                        }
                    }
                };
                let result = f(session.as_mut());
                // A session that only had a command refused serves the next; one whose
                // helper went away or broke the protocol is dropped.
                let usable = match &result {
                    Ok(_) => true,
                    Err(e) => matches!(e, SandboxError::Agent(ClientError::Refused(_))),
                };
                if usable {
                    live.keep_session(session);
                } else {
                    drop(session);
                }
                match result {
                    Ok(value) => Ok(value),
                    Err(e @ SandboxError::Agent(ClientError::Refused(_))) => Err(e.into()),
                    // Whether the agent is gone, or only this session's helper.
                    Err(e) => {
                        let e = ApiError::from(e);
                        let mut guard = live.sandbox.lock().unwrap_or_else(|e| e.into_inner());
                        match guard.as_mut() {
                            Some(sandbox) => Err(live.settle(sandbox.as_mut(), e)),
                            None => Err(e),
                        }
                    }
                }
            })
            .await;
        result.map_err(|e| ApiError::internal(format!("an operation failed: {e}")))?
    }

    /// Runs blocking work for this sandbox's tenant, within the tenant's share of the
    /// daemon's threads (see [`crate::share`]).
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ShareError> {
        self.share.run(f).await
    }

    /// Sessions kept for later commands; more run at once when asked.
    const IDLE_SESSIONS: usize = 2;

    /// Keeps a session for a later command, unless enough are kept.
    fn keep_session(&self, session: Box<dyn Session>) {
        let mut idle = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < Self::IDLE_SESSIONS {
            idle.push(session);
        }
    }

    /// The answer to every operation once its agent is gone; `None` while it runs.
    pub fn ended(&self) -> Option<ApiError> {
        self.ended.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What an operation's failure means: when it failed inside the daemon or lost its
    /// connection, the agent is asked for a new session; if it gives none, the agent is
    /// gone, the sandbox is marked so (its listing says so, and every later operation
    /// answers at once that it is gone), and the answer says what to do. A session's helper
    /// killed from inside the sandbox is only that request's failure.
    fn settle(&self, sandbox: &mut dyn Sandbox, error: ApiError) -> ApiError {
        if !error.status.is_server_error() && !error.is_agent_gone() {
            return error;
        }
        match sandbox.session() {
            Ok(session) => {
                self.keep_session(session);
                if error.is_agent_gone() {
                    ApiError::new(
                        axum::http::StatusCode::BAD_GATEWAY,
                        "sandbox",
                        "the connection serving this request inside the sandbox broke off \
                         (something in the sandbox ended it); the sandbox still runs: try again",
                    )
                } else {
                    error
                }
            }
            // Torn down meanwhile: the request's own answer says so.
            Err(SandboxError::Interrupted) => error,
            Err(probe) => {
                let probe = ApiError::from(probe);
                if !probe.is_agent_gone() {
                    return error;
                }
                let ended =
                    ApiError::agent_gone(error.is_out_of_memory() || probe.is_out_of_memory());
                tracing::warn!(
                    sandbox = %self.id,
                    tenant = %self.tenant,
                    out_of_memory = ended.is_out_of_memory(),
                    "the sandbox's agent is gone: nothing more runs in it"
                );
                self.sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
                *self.ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(ended.clone());
                ended
            }
        }
    }

    /// Marks the sandbox in use (never idle) until the guard is dropped.
    pub fn hold(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// A number for the next background command's output files.
    pub fn processes_started(&self) -> usize {
        self.started.fetch_add(1, Ordering::SeqCst)
    }

    fn touch(&self) {
        self.times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_used = Instant::now();
    }

    /// Seconds of idleness after which it is torn down (`None`: never).
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .idle_timeout
    }

    /// Sets the idle timeout (`None`: never) and starts it afresh.
    pub fn set_idle_timeout(&self, timeout: Option<Duration>) {
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        times.idle_timeout = timeout;
        times.last_used = Instant::now();
    }

    /// Sets when it is torn down whatever it does, counted from now (`None`: never).
    pub fn set_lifetime(&self, lifetime: Option<Duration>) {
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        times.deadline = lifetime.and_then(|l| Instant::now().checked_add(l));
    }

    /// Its lifetime left, from now: `None` if it has none (it lives until deleted or idle).
    pub fn lifetime_left(&self) -> Option<Duration> {
        let times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        times
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// When it will be torn down if nothing uses it, as seconds from now.
    pub fn expires_in(&self) -> Option<f64> {
        let times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let idle = times.idle_timeout.and_then(|t| {
            let end = times.last_used.checked_add(t)?;
            Some(end.saturating_duration_since(Instant::now()))
        });
        let lifetime = times
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        match (idle, lifetime) {
            (Some(a), Some(b)) => Some(a.min(b).as_secs_f64()),
            (a, b) => a.or(b).map(|d| d.as_secs_f64()),
        }
    }

    fn expired(&self, now: Instant) -> bool {
        let times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        // An end past what an `Instant` holds is never reached.
        let idle = self.busy.load(Ordering::SeqCst) == 0
            && times
                .idle_timeout
                .and_then(|t| times.last_used.checked_add(t))
                .is_some_and(|end| now >= end);
        idle || times.deadline.is_some_and(|d| now >= d)
    }

    /// Stops everything in it at once (from any thread); the sandbox is then torn down by
    /// whoever holds it.
    fn interrupt(&self) {
        self.interrupter.interrupt();
    }

    /// Tears it down (waiting for an operation in flight, which the interrupt ends).
    fn destroy_blocking(&self) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let taken = self
            .sandbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(sandbox) = taken {
            match sandbox.destroy() {
                Ok(()) => {
                    tracing::info!(sandbox = %self.id, tenant = %self.tenant, "sandbox torn down")
                }
                Err(e) => tracing::error!(
                    sandbox = %self.id,
                    tenant = %self.tenant,
                    "tearing the sandbox down failed: {e}"
                ),
            }
        }
    }
}

fn gone(id: &str) -> ApiError {
    ApiError::not_found("sandbox", id, "GET /v1/sandboxes")
}

/// A pooled sandbox, with a session already open for its first command (opening one costs
/// a fork in the sandbox and a round trip, ~0.4 ms, which the pool pays ahead of time).
struct Warm {
    sandbox: Box<dyn Sandbox>,
    session: Option<Box<dyn Session>>,
}

/// Ready sandboxes of one shape.
pub struct Pool {
    pub shape: Shape,
    pub target: usize,
    prepared: Mutex<Option<Prepared>>,
    ready: Mutex<VecDeque<Warm>>,
    /// Sandboxes being made for it.
    filling: AtomicUsize,
    wake: tokio::sync::Notify,
    /// Why the last refill failed, if it did.
    pub last_error: Mutex<Option<String>>,
}

impl Pool {
    pub fn ready(&self) -> usize {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Takes a ready sandbox, if there is one, and wakes the filler to replace it.
    fn take(&self) -> Option<Warm> {
        let taken = self
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        self.wake.notify_one();
        taken
    }
}

/// The sandboxes handed out, and the creates admitted but not finished: both count against
/// the limits, so that checking a limit and taking a place under it are one step.
#[derive(Default)]
struct Inventory {
    live: HashMap<String, Arc<Live>>,
    /// Creates under way, by tenant.
    pending: HashMap<String, usize>,
}

impl Inventory {
    fn pending_total(&self) -> usize {
        self.pending.values().sum()
    }

    fn release(&mut self, tenant: &str) {
        if let Some(n) = self.pending.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending.remove(tenant);
            }
        }
    }
}

/// A place under the limits, taken by [`Daemon::admit`] for a create under way: given back
/// when dropped, unless [`Admitted::insert`] filled it with the sandbox made.
struct Admitted<'a> {
    daemon: &'a Daemon,
    tenant: String,
    filled: bool,
}

impl Admitted<'_> {
    /// Hands `live` out in the place taken: one step, under the inventory's lock.
    fn insert(mut self, live: Arc<Live>) {
        let mut inventory = self.daemon.lock_inventory();
        inventory.release(&self.tenant);
        inventory.live.insert(live.id.clone(), live);
        self.filled = true;
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.filled {
            self.daemon.lock_inventory().release(&self.tenant);
        }
    }
}

/// Everything the daemon holds.
pub struct Daemon {
    pub config: Config,
    backend: SharedBackend,
    sandboxes: Mutex<Inventory>,
    pub pools: Vec<Arc<Pool>>,
    /// The daemon's own store: API keys.
    pub keys: Mutex<Store>,
    /// Each tenant's share of the blocking threads.
    pub shares: Shares,
    stopping: AtomicBool,
}

/// What a create asks for.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub shape: Shape,
    pub metadata: BTreeMap<String, String>,
    /// `None`: the daemon's default; `Some(None)`: never.
    pub idle_timeout: Option<Option<Duration>>,
    /// `None`: the daemon's default; `Some(None)`: unlimited.
    pub lifetime: Option<Option<Duration>>,
}

impl Daemon {
    /// A daemon that makes its sandboxes with `backend`.
    pub fn new(config: Config, backend: SharedBackend) -> Result<Daemon, String> {
        for (shape, _) in &config.pools {
            let limits = config.with_default_limits(shape.limits);
            if let Some(why) = config.refuse_limits(&limits) {
                return Err(format!("the pool `{}`: {why}", shape.key()));
            }
        }
        if let Some((shape, _)) = config
            .pools
            .iter()
            .find(|(shape, _)| shape.network == NetworkMode::Host)
            .filter(|_| !config.host_network.anyone())
        {
            return Err(format!(
                "the pool `{}` has the host's network, which no tenant may use: start with \
                 `--allow-host-network` (or `--allow-host-network-for TENANT`) to keep it, \
                 or drop `network=host` from the pool",
                shape.key()
            ));
        }
        upstream_store::make_private_dir(&config.state_dir)
            .map_err(|e| format!("cannot create {}: {e}", config.state_dir.display()))?;
        let keys = Store::open(&config.state_dir.join("keys"))
            .map_err(|e| format!("cannot open the key store: {e}"))?;
        let pools = config
            .pools
            .iter()
            .map(|(shape, target)| {
                Arc::new(Pool {
                    shape: shape.clone(),
                    target: *target,
                    prepared: Mutex::new(None),
                    ready: Mutex::new(VecDeque::new()),
                    filling: AtomicUsize::new(0),
                    wake: tokio::sync::Notify::new(),
                    last_error: Mutex::new(None),
                })
            })
            .collect();
        let shares = Shares::new(config.max_concurrent_per_tenant);
        Ok(Daemon {
            config,
            backend,
            sandboxes: Mutex::new(Inventory::default()),
            pools,
            keys: Mutex::new(keys),
            shares,
            stopping: AtomicBool::new(false),
        })
    }

    pub fn backend(&self) -> SharedBackend {
        self.backend.clone()
    }

    /// The backend's short name: `namespaces`.
    pub fn backend_name(&self) -> &str {
        self.backend.name()
    }

    /// The daemon's own directories on the host, as text: an error that names one is
    /// logged, never answered (see [`ApiError::internal`]).
    pub fn host_paths(&self) -> Vec<String> {
        [
            self.config.state_dir.as_path(),
            self.config.images.cache.dir(),
        ]
        .iter()
        .map(|p| p.display().to_string())
        .filter(|p| p.len() > 1)
        .collect()
    }

    /// The context store of a tenant.
    pub fn tenant_store(&self, tenant: &str) -> PathBuf {
        self.config.state_dir.join("tenants").join(tenant)
    }

    /// Makes an image ready (pulling it unless cached): blocking.
    pub fn prepare(&self, shape: &Shape) -> Result<Prepared, ApiError> {
        let base = SandboxSpec {
            limits: self.config.with_default_limits(shape.limits),
            network: shape.network,
            isolation: shape.isolation,
            ..SandboxSpec::default()
        };
        let image = upstream_turn::image::prepare(
            &shape.image,
            Some(&self.config.images),
            &mut upstream_image::NoProgress,
        )
        .map_err(|e| match e {
            upstream_turn::image::PrepareError::Pull { source, .. } => {
                pull_error(&shape.image, source)
            }
            other => ApiError::bad_request(other.to_string()),
        })?;
        let workdir = image.workdir();
        Ok(Prepared {
            spec: SandboxSpec {
                image: image.image.clone(),
                workspace: Some(WorkspaceSpec {
                    dir: workdir.clone(),
                    resume: None,
                }),
                ..base
            },
            image,
            workdir,
        })
    }

    /// Makes a sandbox and waits until it is ready: blocking.
    fn make(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>, SandboxError> {
        self.backend
            .make_root(spec, &mut |what| tracing::info!("{what}"))?;
        let mut sandbox = self.backend.create(spec)?;
        sandbox.wait_ready()?;
        Ok(sandbox)
    }

    /// The pool of `shape` (whose limits have the daemon's defaults): a pool is named as the
    /// operator wrote it, and holds sandboxes with the defaults where it names no limit.
    fn pool_for(&self, shape: &Shape) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| {
            let limits = self.config.with_default_limits(p.shape.limits);
            p.shape.image == shape.image
                && p.shape.network == shape.network
                && p.shape.isolation == shape.isolation
                && limits == shape.limits
        })
    }

    /// Takes a ready sandbox of `spec` from a pool, if one matches and has one.
    pub fn take_pooled(&self, spec: &SandboxSpec) -> Option<Box<dyn Sandbox>> {
        let pool = self.pools.iter().find(|p| {
            p.prepared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(|prep| prep.spec == *spec)
        })?;
        // A turn runs its steps on the sandbox's own connection: the session goes.
        pool.take().map(|warm| warm.sandbox)
    }

    fn lock_inventory(&self) -> std::sync::MutexGuard<'_, Inventory> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place for one more sandbox of `tenant` under `--max-sandboxes` and
    /// `--max-per-tenant`, counting the creates still under way, or says which limit is
    /// reached.
    fn admit(&self, tenant: &str) -> Result<Admitted<'_>, ApiError> {
        let mut inventory = self.lock_inventory();
        let all = inventory.live.len() + inventory.pending_total();
        if all >= self.config.max_sandboxes {
            return Err(ApiError::too_many(format!(
                "the daemon has {all} sandboxes, its limit (--max-sandboxes); delete some first"
            )));
        }
        let mine = inventory
            .live
            .values()
            .filter(|l| l.tenant == tenant)
            .count()
            + inventory.pending.get(tenant).copied().unwrap_or(0);
        if mine >= self.config.max_per_tenant {
            return Err(ApiError::too_many(format!(
                "this tenant has {mine} sandboxes, its limit (--max-per-tenant); delete some first"
            )));
        }
        *inventory.pending.entry(tenant.to_string()).or_default() += 1;
        Ok(Admitted {
            daemon: self,
            tenant: tenant.to_string(),
            filled: false,
        })
    }

    /// Hands a sandbox to `tenant`: from the warm pool when one of its shape is ready, else
    /// made on the spot.
    pub async fn create(
        self: &Arc<Self>,
        caller: &Tenant,
        request: CreateRequest,
        env: BTreeMap<String, String>,
    ) -> Result<Arc<Live>, ApiError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the daemon is shutting down"));
        }
        self.config
            .host_network
            .check(caller, request.shape.network)?;
        let tenant = caller.0.as_str();
        let mut request = request;
        request.shape.limits = self.config.with_default_limits(request.shape.limits);
        if let Some(why) = self.config.refuse_limits(&request.shape.limits) {
            return Err(ApiError::bad_request(format!("`limits.disk`: {why}")));
        }
        let admitted = self.admit(tenant)?;
        let start = Instant::now();
        let pooled = self.pool_for(&request.shape).and_then(|pool| {
            let prepared = pool
                .prepared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()?;
            Some((prepared, pool.take()?))
        });
        let from_pool = pooled.is_some();
        let (prepared, sandbox, session) = match pooled {
            Some((prepared, warm)) => (prepared, warm.sandbox, warm.session),
            None => {
                let daemon = self.clone();
                let shape = request.shape.clone();
                self.shares
                    .of(tenant)
                    .run(move || {
                        let prepared = daemon.prepare(&shape)?;
                        let sandbox = daemon.make(&prepared.spec)?;
                        Ok::<_, ApiError>((prepared, sandbox, None))
                    })
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))??
            }
        };
        let lifetime = request.lifetime.unwrap_or(self.config.default_lifetime);
        // Lifetimes are bounded when read (`crate::bounds`); one no `Instant` can hold
        // is unlimited rather than a panic.
        let deadline = lifetime.and_then(|l| Instant::now().checked_add(l));
        let took = start.elapsed();
        crate::metrics::claim(tenant, took);
        crate::metrics::handed_out(tenant, from_pool);
        let now = Instant::now();
        let (user, warning) = prepared.image.user_in(sandbox.info().ids);
        if let Some(warning) = warning {
            tracing::warn!(image = %request.shape.image, "{warning}");
        }
        let base_env = prepared.image.env(user.as_ref());
        let live = Arc::new(Live {
            id: new_id(),
            tenant: tenant.to_string(),
            shape: request.shape,
            prepared,
            metadata: request.metadata,
            unenforced: sandbox.info().unenforced.clone(),
            env,
            user,
            base_env,
            started: AtomicUsize::new(0),
            created_at: unix_ms(),
            claim_ms: took.as_secs_f64() * 1000.0,
            from_pool,
            times: Mutex::new(Times {
                last_used: now,
                idle_timeout: request
                    .idle_timeout
                    .unwrap_or(self.config.default_idle_timeout),
                deadline,
            }),
            busy: AtomicUsize::new(0),
            interrupter: sandbox.interrupter(),
            sandbox: Mutex::new(Some(sandbox)),
            sessions: Mutex::new(session.into_iter().collect()),
            processes: Mutex::new(BTreeMap::new()),
            share: self.shares.of(tenant),
            ended: Mutex::new(None),
        });
        tracing::info!(
            sandbox = %live.id,
            tenant,
            image = %live.shape.image,
            from_pool,
            claim_ms = live.claim_ms,
            "{}",
            if from_pool { "sandbox claimed from a warm pool" } else { "sandbox created" }
        );
        admitted.insert(live.clone());
        if self.stopping.load(Ordering::SeqCst) {
            // Shutdown may have emptied the inventory before this sandbox was in it.
            let removed = self.lock_inventory().live.remove(&live.id);
            if let Some(live) = removed {
                teardown(live).await;
            }
            return Err(ApiError::unavailable("the daemon is shutting down"));
        }
        Ok(live)
    }

    /// The tenant's sandbox `id`; another tenant's answers as missing.
    pub fn get(&self, tenant: &str, id: &str) -> Result<Arc<Live>, ApiError> {
        self.lock_inventory()
            .live
            .get(id)
            .filter(|l| l.tenant == tenant)
            .cloned()
            .ok_or_else(|| gone(id))
    }

    /// The tenant's sandboxes, oldest first.
    pub fn list(&self, tenant: &str) -> Vec<Arc<Live>> {
        let mut all: Vec<Arc<Live>> = self
            .lock_inventory()
            .live
            .values()
            .filter(|l| l.tenant == tenant)
            .cloned()
            .collect();
        all.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        all
    }

    /// Sandboxes handed out, by tenant.
    pub fn active(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for live in self.lock_inventory().live.values() {
            *counts.entry(live.tenant.clone()).or_default() += 1;
        }
        counts
    }

    /// Tears the tenant's sandbox `id` down.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), ApiError> {
        let live = {
            let mut inventory = self.lock_inventory();
            match inventory.live.get(id) {
                Some(l) if l.tenant == tenant => inventory.live.remove(id),
                _ => None,
            }
        }
        .ok_or_else(|| gone(id))?;
        tracing::info!(sandbox = %live.id, tenant, "sandbox deleted");
        teardown(live).await;
        Ok(())
    }

    /// Tears down sandboxes past their idle timeout or lifetime; returns how many.
    pub async fn reap(&self) -> usize {
        reap(&self.sandboxes).await
    }

    /// Keeps `pool` at its target, for as long as the daemon runs.
    pub async fn fill(self: Arc<Self>, pool: Arc<Pool>) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let prepared = pool
                .prepared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let prepared = match prepared {
                Some(p) => p,
                None => {
                    let daemon = self.clone();
                    let shape = pool.shape.clone();
                    // The image, then the backend: a pool of VMs boots one and snapshots it,
                    // and is filled by restoring that snapshot.
                    let prepare = move || {
                        let prepared = daemon.prepare(&shape)?;
                        daemon
                            .backend
                            .make_root(&prepared.spec, &mut |what| tracing::info!("{what}"))?;
                        daemon.backend.prepare(&prepared.spec)?;
                        Ok::<_, ApiError>(prepared)
                    };
                    match tokio::task::spawn_blocking(prepare).await {
                        Ok(Ok(p)) => {
                            *pool.prepared.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(p.clone());
                            p
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(
                                pool = %pool.shape.key(),
                                "cannot prepare the pool's sandboxes (trying again in 5 s): {}",
                                e.message
                            );
                            *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(e.message);
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(pool = %pool.shape.key(), "the pool stops filling: {e}");
                            return;
                        }
                    }
                }
            };
            // Two at a time: sandbox setup is mostly waiting on the kernel.
            let missing = pool
                .target
                .saturating_sub(pool.ready() + pool.filling.load(Ordering::SeqCst));
            let batch = missing.min(2);
            if batch == 0 {
                // Woken by a claim, or after a second to look again: both are the same.
                let _ = tokio::time::timeout(Duration::from_secs(1), pool.wake.notified()).await;
                continue;
            }
            let mut made = Vec::new();
            for _ in 0..batch {
                pool.filling.fetch_add(1, Ordering::SeqCst);
                let daemon = self.clone();
                let spec = prepared.spec.clone();
                made.push(tokio::task::spawn_blocking(move || {
                    let mut sandbox = daemon.make(&spec)?;
                    // Without a session the first command opens one itself.
                    let session = sandbox
                        .session()
                        .inspect_err(|e| {
                            tracing::debug!("a pool's sandbox has no session yet: {e}")
                        })
                        .ok();
                    Ok::<_, SandboxError>(Warm { sandbox, session })
                }));
            }
            for handle in made {
                let result = handle.await;
                pool.filling.fetch_sub(1, Ordering::SeqCst);
                match result {
                    Ok(Ok(warm)) => {
                        if self.stopping.load(Ordering::SeqCst) {
                            let Warm { sandbox, session } = warm;
                            drop(session);
                            destroyed(
                                tokio::task::spawn_blocking(move || sandbox.destroy()).await,
                                &pool.shape.key(),
                            );
                            continue;
                        }
                        let ready = {
                            let mut ready = pool.ready.lock().unwrap_or_else(|e| e.into_inner());
                            ready.push_back(warm);
                            ready.len()
                        };
                        tracing::info!(pool = %pool.shape.key(), ready, target = pool.target, "pool refilled");
                        *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(pool = %pool.shape.key(), "a pool's sandbox could not be made (trying again in 1 s): {e}");
                        *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(e.to_string());
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        tracing::error!(pool = %pool.shape.key(), "the pool stops filling: {e}");
                        return;
                    }
                }
            }
        }
    }

    /// Tears every sandbox down, handed out or pooled: the daemon is stopping.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let live: Vec<Arc<Live>> = self.lock_inventory().live.drain().map(|(_, l)| l).collect();
        futures::future::join_all(live.into_iter().map(teardown)).await;
        let mut pooled = Vec::new();
        for pool in &self.pools {
            pooled.extend(
                pool.ready
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drain(..),
            );
            pool.wake.notify_one();
        }
        let torn_down = pooled.into_iter().map(|warm: Warm| {
            drop(warm.session);
            tokio::task::spawn_blocking(move || warm.sandbox.destroy())
        });
        for result in futures::future::join_all(torn_down).await {
            destroyed(result, "(stopping)");
        }
    }
}

/// Logs how tearing down a pool's sandbox went.
fn destroyed(result: Result<Result<(), SandboxError>, tokio::task::JoinError>, pool: &str) {
    match result {
        Ok(Ok(())) => tracing::debug!(pool, "a pool's sandbox torn down"),
        Ok(Err(e)) => tracing::error!(pool, "tearing a pool's sandbox down failed: {e}"),
        Err(e) => tracing::error!(pool, "tearing a pool's sandbox down failed: {e}"),
    }
}

/// Tears a sandbox down, interrupting what runs in it.
async fn teardown(live: Arc<Live>) {
    live.interrupt();
    let id = live.id.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || live.destroy_blocking()).await {
        tracing::error!(sandbox = %id, "tearing the sandbox down failed: {e}");
    }
}

/// Takes the sandboxes past their idle timeout or lifetime out of `inventory` and tears
/// them down; returns how many. Each is handled on its own: one whose check or teardown
/// fails, even by a panic, is logged and the others are reaped all the same. A sandbox
/// whose check panics is torn down: the daemon could no longer tell when it expires.
async fn reap(inventory: &Mutex<Inventory>) -> usize {
    use futures::FutureExt;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    let now = Instant::now();
    let expired: Vec<Arc<Live>> = {
        let mut inventory = inventory.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<String> = inventory
            .live
            .values()
            .filter(|l| {
                catch_unwind(AssertUnwindSafe(|| l.expired(now))).unwrap_or_else(|panic| {
                    tracing::error!(
                        sandbox = %l.id,
                        tenant = %l.tenant,
                        "its expiry could not be checked ({}); tearing it down",
                        crate::share::panic_message(panic.as_ref())
                    );
                    true
                })
            })
            .map(|l| l.id.clone())
            .collect();
        ids.iter()
            .filter_map(|id| inventory.live.remove(id))
            .collect()
    };
    let n = expired.len();
    let handled: Vec<_> = expired
        .into_iter()
        .map(|live| async move {
            let id = live.id.clone();
            tracing::info!(sandbox = %id, tenant = %live.tenant, "reaping the sandbox: past its idle timeout or lifetime");
            if let Err(panic) = AssertUnwindSafe(teardown(live)).catch_unwind().await {
                tracing::error!(
                    sandbox = %id,
                    "its teardown failed ({})",
                    crate::share::panic_message(panic.as_ref())
                );
            }
        })
        .collect();
    futures::future::join_all(handled).await;
    n
}

/// `sbx_` and 16 random hex digits.
fn new_id() -> String {
    let mut bytes = [0u8; 8];
    crate::random(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sbx_{hex}")
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The answer for an image a tenant named that could not be pulled: refused by the daemon's
/// registry policy (403), the registry's failure (502), or the daemon's own cache (500, its
/// paths only in the log).
pub(crate) fn pull_error(image: &str, e: upstream_image::PullError) -> ApiError {
    let status = match e {
        upstream_image::PullError::Refused { .. } => axum::http::StatusCode::FORBIDDEN,
        upstream_image::PullError::Io { .. } | upstream_image::PullError::Unpack { .. } => {
            return ApiError::internal(format!("image `{image}`: {e}"));
        }
        _ => axum::http::StatusCode::BAD_GATEWAY,
    };
    ApiError::new(status, "image", format!("cannot pull image `{image}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the interrupts of a sandbox (a teardown starts with one), or panics at it.
    struct Counted {
        interrupts: AtomicUsize,
        panics: bool,
    }

    impl Interrupter for Counted {
        fn interrupt(&self) {
            if self.panics {
                panic!("this sandbox's teardown fails");
            }
            self.interrupts.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A sandbox handed out (its sandbox already gone), idle for `idle` of `timeout`.
    fn live(
        id: &str,
        timeout: Duration,
        idle: Duration,
        panics: bool,
    ) -> (Arc<Live>, Arc<Counted>) {
        let counted = Arc::new(Counted {
            interrupts: AtomicUsize::new(0),
            panics,
        });
        let now = Instant::now();
        let live = Arc::new(Live {
            id: id.to_string(),
            tenant: "t".to_string(),
            shape: Shape::new("host"),
            prepared: Prepared {
                spec: SandboxSpec::default(),
                image: upstream_turn::image::Prepared {
                    image: upstream_sandbox::Image::Host,
                    pulled: None,
                    user: None,
                },
                workdir: "/workspace".to_string(),
            },
            metadata: BTreeMap::new(),
            unenforced: Vec::new(),
            env: BTreeMap::new(),
            user: None,
            base_env: BTreeMap::new(),
            started: AtomicUsize::new(0),
            created_at: 0,
            claim_ms: 0.0,
            from_pool: false,
            times: Mutex::new(Times {
                last_used: now.checked_sub(idle).unwrap_or(now),
                idle_timeout: Some(timeout),
                deadline: None,
            }),
            busy: AtomicUsize::new(0),
            interrupter: counted.clone(),
            sandbox: Mutex::new(None),
            sessions: Mutex::new(Vec::new()),
            processes: Mutex::new(BTreeMap::new()),
            share: Shares::new(1).of("t"),
            ended: Mutex::new(None),
        });
        (live, counted)
    }

    #[tokio::test]
    async fn the_reaper_goes_on_past_a_sandbox_whose_handling_fails() {
        let inventory = Mutex::new(Inventory::default());
        let second = Duration::from_secs(1);
        let (failing, _) = live("sbx_failing", second, 2 * second, true);
        let (a, a_count) = live("sbx_a", second, 2 * second, false);
        let (b, b_count) = live("sbx_b", second, 2 * second, false);
        // An idle timeout no `Instant` can add up to: never reached, and no panic.
        let (forever, forever_count) = live("sbx_forever", Duration::MAX, 2 * second, false);
        let (fresh, fresh_count) = live("sbx_fresh", 60 * second, Duration::ZERO, false);
        for l in [&failing, &a, &b, &forever, &fresh] {
            inventory
                .lock()
                .unwrap()
                .live
                .insert(l.id.clone(), (*l).clone());
        }
        assert_eq!(reap(&inventory).await, 3);
        assert_eq!(a_count.interrupts.load(Ordering::SeqCst), 1, "a was reaped");
        assert_eq!(b_count.interrupts.load(Ordering::SeqCst), 1, "b was reaped");
        for (count, what) in [(&forever_count, "forever"), (&fresh_count, "fresh")] {
            assert_eq!(
                count.interrupts.load(Ordering::SeqCst),
                0,
                "{what} was kept"
            );
        }
        let left: BTreeSet<String> = inventory.lock().unwrap().live.keys().cloned().collect();
        assert_eq!(
            left,
            BTreeSet::from(["sbx_forever".to_string(), "sbx_fresh".to_string()])
        );
        // The next round works as the first did.
        let (c, c_count) = live("sbx_c", second, 2 * second, false);
        inventory.lock().unwrap().live.insert(c.id.clone(), c);
        assert_eq!(reap(&inventory).await, 1);
        assert_eq!(c_count.interrupts.load(Ordering::SeqCst), 1);
        assert_eq!(
            forever.expires_in(),
            None,
            "an end past all Instants is never"
        );
    }

    #[test]
    fn a_place_taken_is_given_back_unless_it_was_filled() {
        let mut inventory = Inventory::default();
        *inventory.pending.entry("t".into()).or_default() += 2;
        inventory.release("t");
        assert_eq!(inventory.pending_total(), 1);
        inventory.release("t");
        inventory.release("t");
        assert!(inventory.pending.is_empty(), "no count below zero");
    }

    #[test]
    fn pool_shapes_are_read_from_their_names() {
        assert_eq!(Shape::parse("host").unwrap(), Shape::new("host"));
        let shape = Shape::parse("python:3.12,memory=1G,cpus=1.5,pids=64,network=host").unwrap();
        assert_eq!(shape.image, "python:3.12");
        assert_eq!(shape.limits.memory, Some(1 << 30));
        assert_eq!(shape.limits.cpus, Some(1.5));
        assert_eq!(shape.limits.pids, Some(64));
        assert_eq!(shape.network, NetworkMode::Host);
        let disk = Shape::parse("host,disk=2G").unwrap();
        assert_eq!(disk.limits.disk, Some(2 << 30));
        assert_eq!(disk.key(), "host disk=2147483648");
        assert_eq!(
            shape.key(),
            "python:3.12 memory=1073741824 cpus=1.5 pids=64 network=host"
        );
        for bad in [
            "",
            ",memory=1G",
            "host,memory",
            "host,cpus=0",
            "host,cpus=1e9",
            "host,memory=4K",
            "host,disk=1K",
            "host,pids=0",
            "host,network=wifi",
            "host,gpu=1",
        ] {
            assert!(Shape::parse(bad).is_err(), "{bad}");
        }
    }
}

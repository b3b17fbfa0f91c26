//! Turns: running a document's steps in one sandbox and turning what happened into results.
//!
//! [`run`] takes a parsed document and a backend, runs the steps in order, streams progress to
//! an [`Observer`], and records everything in the context store: the document as run, each
//! step's whole output, outputs, artifacts and the document with its results. Before the first
//! step, the sandbox gets what the document's context left: the latest artifacts, the earlier
//! turns' outputs as `UPSTREAM_CTX_*` variables and their history at `/context/turns.json`.
//! Turns of one context never overlap: a turn holds its context's lock
//! ([`Store::lock_context`]) from loading the context until its artifacts are recorded, and a
//! second one waits for it ([`Event::Waiting`]) or for its [`Cancel`].
//! It never writes the document itself: [`write_back`] does, and only if nobody changed the
//! file meanwhile.

pub mod artifacts;
mod context;
pub mod image;
pub mod kept;
mod record;
pub mod wire;
mod writeback;

pub use record::{SandboxRecord, StepRecord, StepStatus, TurnRecord, TurnStatus};
pub use writeback::{WriteBack, write_back};

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use upstream_doc::{
    Captured, Document, FrontMatter, Language, Network, Outcome, OutputCapture, OutputLimits,
    Redactor, ResultBlock, Step,
};
use upstream_sandbox::{
    Backend, Collect, ExecOutcome, ExecRequest, ExitStatus, FileSpec, Image, Interrupter, Kept,
    Limits, NetworkMode, Sandbox, SandboxError, SandboxInfo, SandboxSpec, Stream,
};
use upstream_store::log::{LogStream, LogWriter};
use upstream_store::{
    BlobId, BlobWriter, FinishTurn, NewArtifact, NewStep, NewTurn, Store, StoreError, TurnState,
};

/// The most bytes a step may publish through `$UPSTREAM_OUTPUT`.
pub const MAX_OUTPUTS_BYTES: u64 = 1 << 20;

/// Errors that stop a turn before or outside its steps.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    /// The document names a secret the environment does not have.
    #[error("{path}: secret `{name}` is not set in the environment")]
    MissingSecret { path: PathBuf, name: String },
    /// The sandbox could not be made or failed outside any step.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The document's image could not be pulled (or the pull was refused: which registries
    /// are allowed is the caller's policy).
    #[error("cannot run image `{image}`: {source}")]
    Pull {
        image: String,
        source: upstream_image::PullError,
    },
    /// The context store could not be opened or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The context's artifacts could not be restored into the sandbox.
    #[error("cannot restore the context's artifacts: {0}")]
    Restore(#[from] artifacts::RestoreError),
    /// The turn's artifacts could not be saved.
    #[error("cannot save the turn's artifacts: {0}")]
    SaveArtifacts(io::Error),
    /// `--resume` has nothing to resume, or the document changed too much to resume.
    #[error("{0}")]
    Resume(String),
}

/// What an observer is told while a turn runs.
#[derive(Debug)]
pub enum Event<'a> {
    SandboxReady(&'a SandboxInfo),
    StepStarted(&'a Step),
    /// Output of the running step, secrets already redacted.
    Output(Stream, &'a [u8]),
    StepFinished(&'a Step, &'a StepRecord),
    /// The sandbox got what earlier turns of the context left.
    ContextLoaded(&'a ContextLoaded),
    /// The turn's artifacts are in the store.
    ContextSaved(&'a ContextSaved),
    /// The turn resumes an earlier one, at this step.
    Resuming {
        turn: i64,
        step: usize,
    },
    /// The image is being pulled (`None`) or is ready (`Some`).
    Image {
        reference: &'a str,
        pulled: Option<&'a upstream_image::Pulled>,
    },
    /// A layer of the image being pulled, of `size` bytes; `cached` when it needs no
    /// download.
    ImageLayer {
        digest: &'a str,
        size: u64,
        cached: bool,
    },
    /// `bytes` of a layer have arrived.
    ImageDownloaded {
        digest: &'a str,
        bytes: u64,
    },
    /// Every layer has arrived; the rootfs is being made.
    ImageUnpacking,
    /// Something sandboxes start from is being made, once, and takes long (the VM
    /// backend's disk of the host's files): what, in a sentence.
    Building(&'a str),
    /// Something the user should know that does not stop the turn.
    Warning(&'a str),
    /// Another turn of the context is running (turn `turn` of process `pid`, where known):
    /// this one waits for it to finish, to start from what it leaves.
    Waiting {
        context: &'a str,
        turn: Option<i64>,
        pid: Option<u32>,
    },
}

/// What a turn started with.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextLoaded {
    pub context: String,
    pub artifacts: usize,
    pub outputs: usize,
    /// The context's latest passed turn.
    pub turn: i64,
}

/// What a turn left for the next.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextSaved {
    pub context: String,
    /// Artifacts (files, directories, symlinks) saved.
    pub artifacts: usize,
    pub bytes: u64,
    /// Restored artifacts the turn deleted.
    pub deleted: usize,
    pub turn: i64,
    /// Whether the next turn of the context gets them: only a turn that passed hands its
    /// artifacts on; a failed one's are recorded (`upstream artifacts --turn N`) and no more.
    pub handed_on: bool,
}

/// Receives progress as a turn runs.
pub trait Observer {
    fn event(&mut self, event: Event<'_>);
}

/// Stops a running turn from another thread (a Ctrl-C handler).
#[derive(Default, Clone)]
pub struct Cancel {
    inner: Arc<CancelInner>,
}

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    sandbox: Mutex<Option<Arc<dyn Interrupter>>>,
}

impl Cancel {
    /// Stops the turn: the running step's sandbox is killed at once.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        if let Ok(guard) = self.inner.sandbox.lock() {
            if let Some(sandbox) = guard.as_ref() {
                sandbox.interrupt();
            }
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Makes [`Cancel::cancel`] stop `sandbox` (or nothing, with `None`).
    pub fn watch(&self, sandbox: Option<Arc<dyn Interrupter>>) {
        if let Ok(mut guard) = self.inner.sandbox.lock() {
            *guard = sandbox;
        }
        if self.is_cancelled() {
            self.cancel();
        }
    }
}

/// Settings of a turn that do not come from the document.
#[derive(Debug, Clone, Default)]
pub struct TurnOptions {
    pub output_limits: OutputLimits,
    /// The store to use (`--store`); else found from the document ([`upstream_store::locate`]).
    pub store: Option<PathBuf>,
    /// Resume the document's last turn, which did not pass, at the step that stopped it.
    pub resume: bool,
    /// Where images come from; `None` allows only `image: host`.
    pub images: Option<ImageSource>,
    /// The values of the document's `secrets`; `None` takes them from this process's
    /// environment (a daemon running turns for others must never do that).
    pub secrets: Option<BTreeMap<String, String>>,
    /// The document's name in the records, as whoever sent it names it (a daemon's client);
    /// `None`: its path, relative to the store's directory when below it. A name only:
    /// nothing opens it.
    pub document_name: Option<String>,
}

/// The image cache and how to pull into it.
#[derive(Debug, Clone)]
pub struct ImageSource {
    pub cache: upstream_image::Cache,
    pub pull: upstream_image::PullOptions,
}

/// A finished (or interrupted) turn.
#[derive(Debug)]
pub struct Turn {
    pub record: TurnRecord,
    /// One result block per step, to render into the document; `None` keeps the block the
    /// document has (a step a resume did not run again).
    pub results: Vec<Option<ResultBlock>>,
}

impl Turn {
    /// The document with this turn's results.
    pub fn render(&self, document: &Document) -> String {
        document.render(&self.results)
    }
}

/// Passes a pull's progress on to the turn's observer; the image's name is the second field.
struct PullEvents<'a>(&'a mut dyn Observer, &'a str);

impl upstream_image::PullProgress for PullEvents<'_> {
    fn starting(&mut self) {
        self.0.event(Event::Image {
            reference: self.1,
            pulled: None,
        });
    }

    fn layer(&mut self, digest: &str, size: u64, cached: bool) {
        self.0.event(Event::ImageLayer {
            digest,
            size,
            cached,
        });
    }

    fn downloaded(&mut self, digest: &str, bytes: u64) {
        self.0.event(Event::ImageDownloaded { digest, bytes });
    }

    fn unpacking(&mut self) {
        self.0.event(Event::ImageUnpacking);
    }
}

/// What a `--resume` starts from.
#[derive(Debug, Clone)]
struct Resume {
    turn: i64,
    kept: Kept,
    /// The first step to run again (1-based).
    step: usize,
    /// The kept steps' outputs, by step number.
    outputs: BTreeMap<usize, BTreeMap<String, String>>,
}

/// Finds what `--resume` of `document` resumes, and checks the steps before the one to run
/// again are those that ran.
fn find_resume(
    store: &Store,
    backend: &dyn Backend,
    document: &Document,
    shown: &str,
    context: &str,
) -> Result<Resume, TurnError> {
    let path = document.path().display();
    let found = store.resumable(shown, context)?;
    let Some(last) = found else {
        return Err(TurnError::Resume(format!(
            "{path}: nothing to resume: no turn of it has run in context `{context}`; run it without --resume"
        )));
    };
    let (Some(kept), Some(source)) = (&last.kept, &last.source) else {
        return Err(TurnError::Resume(format!(
            "{path}: nothing to resume: its last turn ({}) {}; run it without --resume",
            last.number,
            if last.status == "passed" {
                "passed"
            } else {
                "kept no workspace"
            }
        )));
    };
    let Some(kept) = Kept::parse(kept).filter(|k| backend.kept().contains(k)) else {
        return Err(TurnError::Resume(format!(
            "{path}: the workspace turn {} kept ({kept}) is gone: a reboot clears kept workspaces, and `upstream gc` or a turn of another store clears one whose store was moved or removed; run it without --resume",
            last.number,
        )));
    };
    let step = last.step.max(1) as usize;
    let bytes = store.blobs().read(source).map_err(StoreError::from)?;
    let before = Document::parse(document.path(), &bytes).map_err(|e| {
        TurnError::Resume(format!(
            "{path}: cannot read the document turn {} ran: {e}",
            last.number
        ))
    })?;
    if document.steps().len() < step {
        return Err(TurnError::Resume(format!(
            "{path}: turn {} stopped at step {step}, but the document now has {} steps; run it without --resume",
            last.number,
            document.steps().len()
        )));
    }
    for (now, then) in document.steps().iter().zip(before.steps()).take(step - 1) {
        if now.code != then.code || now.language != then.language {
            return Err(TurnError::Resume(format!(
                "{path}: step {} changed since turn {} ran it, so its workspace no longer matches; run it without --resume",
                now.number, last.number
            )));
        }
    }
    let outputs = store
        .steps(last.number)?
        .into_iter()
        .filter(|s| (s.number as usize) < step)
        .map(|s| (s.number as usize, s.outputs))
        .collect();
    Ok(Resume {
        turn: last.number,
        kept,
        step,
        outputs,
    })
}

/// The sandbox a document asks for.
pub fn sandbox_spec(front_matter: &FrontMatter) -> SandboxSpec {
    let image = match front_matter.image() {
        upstream_doc::front_matter::HOST_IMAGE => Image::Host,
        other => Image::Layers {
            reference: other.to_string(),
            layers: Vec::new(),
        },
    };
    SandboxSpec {
        image,
        limits: Limits {
            memory: front_matter.memory,
            cpus: front_matter.cpus,
            pids: Some(Limits::DEFAULT_PIDS),
            disk: front_matter.disk,
        },
        network: match front_matter.network {
            Network::None => NetworkMode::None,
            Network::Host => NetworkMode::Host,
        },
        isolation: isolation(front_matter.isolation),
        ..SandboxSpec::default()
    }
}

/// The sandbox's isolation for a document's (or a request's) `isolation`.
pub fn isolation(isolation: upstream_doc::Isolation) -> upstream_sandbox::Isolation {
    match isolation {
        upstream_doc::Isolation::Namespaces => upstream_sandbox::Isolation::Namespaces,
        upstream_doc::Isolation::Vm => upstream_sandbox::Isolation::Vm,
    }
}

/// Runs every step of `document` in one sandbox from `backend`, recording the turn in the
/// document's context store. `source` is the document's bytes as read.
pub fn run(
    document: &Document,
    source: &[u8],
    backend: &dyn Backend,
    options: &TurnOptions,
    observer: &mut dyn Observer,
    cancel: &Cancel,
) -> Result<Turn, TurnError> {
    let started = Instant::now();
    let started_at = now();
    let fm = document.front_matter();
    let secrets = resolve_secrets(document, options.secrets.as_ref())?;
    let mut spec = sandbox_spec(fm);
    // An image is pulled (or found in the cache) before anything is recorded.
    let prepared = image::prepare(
        fm.image(),
        options.images.as_ref(),
        &mut PullEvents(observer, fm.image()),
    )
    .map_err(|e| {
        let reason = match e {
            image::PrepareError::Pull { image, source } => {
                return TurnError::Pull { image, source };
            }
            image::PrepareError::Reference { why, .. } => why,
            image::PrepareError::Config { reason, .. } => reason,
            image::PrepareError::NoCache { .. } => {
                "this upstream has no image cache configured".to_string()
            }
        };
        TurnError::Sandbox(SandboxError::Image {
            image: fm.image().to_string(),
            reason,
        })
    })?;
    if let Some(pulled) = &prepared.pulled {
        observer.event(Event::Image {
            reference: fm.image(),
            pulled: Some(pulled),
        });
    }
    spec.image = prepared.image.clone();
    let workdir = fm.workdir.clone().unwrap_or_else(|| prepared.workdir());
    let doc_dir = document
        .path()
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let store_dir = upstream_store::locate(doc_dir, options.store.as_deref());
    // A resume that has no store to resume from refuses before it makes one.
    if options.resume && !store_dir.join("store.db").is_file() {
        return Err(TurnError::Resume(format!(
            "{}: nothing to resume: no turn has run in this store, which does not exist yet; run it without --resume",
            document.path().display(),
        )));
    }
    // Workspaces kept by turns whose store (or record) is gone go before this turn opens
    // its store: a store removed and made anew is not the one that kept them.
    // A set the store here records is its own, wherever its owner file says it was made.
    let kept_sets = backend.kept();
    kept::adopt(backend, &kept_sets, &store_dir);
    kept::reclaim(backend, &kept_sets);
    let mut store = Store::open(&store_dir)?;
    let context_name = fm
        .context
        .clone()
        .unwrap_or_else(|| upstream_store::DEFAULT_CONTEXT.to_string());
    // One turn of a context at a time, from loading what the last one left until this
    // one's artifacts are recorded; the lock goes when this function returns.
    let waiting = &mut |holder: &upstream_store::LockHolder| {
        observer.event(Event::Waiting {
            context: &context_name,
            turn: holder.turn,
            pid: holder.pid,
        })
    };
    let Some(mut lock) = store.lock_context(&context_name, waiting, &|| cancel.is_cancelled())?
    else {
        return Err(SandboxError::Interrupted.into());
    };
    let context = context::Context::load(&store, &context_name)?;
    let id = uuid::Uuid::now_v7().to_string();
    let shown_path = match &options.document_name {
        Some(name) => name.clone(),
        None => shown_path(document.path(), &store_dir),
    };
    let resume = match options.resume {
        true => Some(find_resume(
            &store,
            backend,
            document,
            &shown_path,
            &context_name,
        )?),
        false => None,
    };
    spec.workspace = Some(upstream_sandbox::WorkspaceSpec {
        dir: workdir.clone(),
        resume: resume.as_ref().map(|r| r.kept.clone()),
    });
    let number = store.begin_turn(&NewTurn {
        id: &id,
        context: &context_name,
        document: &shown_path,
        source,
        started_at,
        resumed_from: resume.as_ref().map(|r| r.turn),
    })?;
    // Only for a waiting turn to name this one.
    let _ = lock.set_turn(number);
    let mut turn = TurnInStore {
        store,
        number,
        done: false,
        kept: None,
    };
    let outcome = run_in_sandbox(
        document,
        backend,
        options,
        observer,
        cancel,
        &mut turn,
        &context,
        &secrets,
        &spec,
        started,
        &id,
        resume.as_ref(),
        &prepared,
    );
    let Ran {
        records,
        results,
        sandbox: sandbox_record,
        saved,
        status,
        kept,
    } = match outcome {
        Ok(done) => done,
        Err(e) => {
            let status = match e {
                TurnError::Sandbox(SandboxError::Interrupted) => TurnState::Interrupted,
                _ => TurnState::Failed,
            };
            turn.finish(status, started, None, None, Vec::new());
            return Err(e);
        }
    };
    let record = TurnRecord {
        id,
        number,
        context: context_name.clone(),
        document: document.path().to_path_buf(),
        status,
        started_at,
        duration_ms: started.elapsed().as_millis() as u64,
        sandbox: Some(sandbox_record),
        steps: records,
        resumed_from: resume.as_ref().map(|r| r.turn),
        store: store_dir.clone(),
    };
    let result = Turn { record, results };
    let rendered = (status != TurnStatus::Interrupted).then(|| result.render(document));
    let state = match status {
        TurnStatus::Passed => TurnState::Passed,
        TurnStatus::Failed => TurnState::Failed,
        TurnStatus::Interrupted => TurnState::Interrupted,
    };
    let sandbox_json = serde_json::to_value(&result.record.sandbox).ok();
    let result_blob = match &rendered {
        Some(text) => Some(
            turn.store
                .blobs()
                .put(text.as_bytes())
                .map_err(|e| TurnError::Store(store_io(&store_dir, e)))?,
        ),
        None => None,
    };
    let (artifacts, summary) = match saved {
        Some((artifacts, summary)) => (artifacts, Some(summary)),
        None => (Vec::new(), None),
    };
    if let Some((name, _)) = &kept {
        kept::mark(backend, name, &store_dir, number);
    }
    turn.kept = kept;
    turn.finish_checked(state, started, sandbox_json, result_blob, artifacts)?;
    // This turn supersedes what earlier turns of the document kept for resuming.
    for old in turn
        .store
        .take_superseded(&shown_path, &context_name, number)?
    {
        if let Some(old) = Kept::parse(&old) {
            backend.discard_kept(&old);
        }
    }
    if let Some(summary) = summary {
        observer.event(Event::ContextSaved(&ContextSaved {
            context: context_name,
            turn: number,
            handed_on: state == TurnState::Passed,
            ..summary
        }));
    }
    Ok(result)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn store_io(dir: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        path: dir.to_path_buf(),
        source,
    }
}

/// The document's path as the store shows it: relative to the directory the store is in when
/// it is below it.
fn shown_path(document: &Path, store_dir: &Path) -> String {
    let absolute = std::path::absolute(document).unwrap_or_else(|_| document.to_path_buf());
    let base = store_dir
        .parent()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
    match base.as_deref().and_then(|b| absolute.strip_prefix(b).ok()) {
        Some(relative) => relative.display().to_string(),
        None => absolute.display().to_string(),
    }
}

/// A turn recorded as running; if it is dropped unfinished (a panic), it is recorded as
/// interrupted.
struct TurnInStore {
    store: Store,
    number: i64,
    done: bool,
    /// What the backend kept for resuming, and the step to resume at.
    kept: Option<(Kept, usize)>,
}

impl TurnInStore {
    fn finish_checked(
        &mut self,
        status: TurnState,
        started: Instant,
        sandbox: Option<serde_json::Value>,
        result: Option<BlobId>,
        artifacts: Vec<NewArtifact>,
    ) -> Result<(), StoreError> {
        self.done = true;
        self.store.finish_turn(
            self.number,
            &FinishTurn {
                status,
                finished_at: now(),
                duration_ms: started.elapsed().as_millis() as u64,
                sandbox,
                result,
                artifacts,
                kept: self.kept.as_ref().map(|(k, _)| k.to_string()),
                resume_step: self.kept.as_ref().map(|(_, s)| *s as i64),
            },
        )
    }

    /// Records the end of a turn that already failed for another reason, which is the one
    /// reported.
    fn finish(
        &mut self,
        status: TurnState,
        started: Instant,
        sandbox: Option<serde_json::Value>,
        result: Option<BlobId>,
        artifacts: Vec<NewArtifact>,
    ) {
        let _ = self.finish_checked(status, started, sandbox, result, artifacts);
    }
}

impl Drop for TurnInStore {
    fn drop(&mut self) {
        if !self.done {
            let started = Instant::now();
            self.finish(TurnState::Interrupted, started, None, None, Vec::new());
        }
    }
}

/// What running the steps gave.
struct Ran {
    records: Vec<StepRecord>,
    results: Vec<Option<ResultBlock>>,
    sandbox: SandboxRecord,
    saved: Option<(Vec<NewArtifact>, ContextSaved)>,
    status: TurnStatus,
    /// What the backend kept for resuming, and the step to resume at.
    kept: Option<(Kept, usize)>,
}

#[allow(clippy::too_many_arguments)]
fn run_in_sandbox(
    document: &Document,
    backend: &dyn Backend,
    options: &TurnOptions,
    observer: &mut dyn Observer,
    cancel: &Cancel,
    turn: &mut TurnInStore,
    context: &context::Context,
    secrets: &[(String, String)],
    spec: &SandboxSpec,
    started: Instant,
    id: &str,
    resume: Option<&Resume>,
    prepared: &image::Prepared,
) -> Result<Ran, TurnError> {
    let fm = document.front_matter();
    let workdir = spec
        .workspace
        .as_ref()
        .map_or_else(|| fm.workdir().to_string(), |w| w.dir.clone());
    backend.make_root(spec, &mut |what| observer.event(Event::Building(what)))?;
    let mut sandbox = backend.create(spec)?;
    sandbox.wait_ready()?;
    cancel.watch(Some(sandbox.interrupter()));
    observer.event(Event::SandboxReady(sandbox.info()));
    let sandbox_record = SandboxRecord {
        backend: sandbox.info().backend.clone(),
        image: spec.image.name().to_string(),
        setup_ms: sandbox.info().setup.as_secs_f64() * 1000.0,
        unenforced: sandbox.info().unenforced.clone(),
    };
    // The image's user runs the steps when the sandbox has its ids (a rootless one maps
    // only its root).
    let (user, warning) = prepared.user_in(sandbox.info().ids);
    if let Some(warning) = warning {
        observer.event(Event::Warning(&warning));
    }
    // Every phase of the turn ends with its timeout or when it is cancelled: the steps by
    // their timeouts, the restore and the save by asking this between files and chunks.
    let deadline = fm.timeout.and_then(|t| started.checked_add(t));
    let stop = || {
        if cancel.is_cancelled() {
            Some(artifacts::Stopped::Cancelled)
        } else if deadline.is_some_and(|d| Instant::now() >= d) {
            Some(artifacts::Stopped::TimedOut)
        } else {
            None
        }
    };
    // A resumed turn's workspace is the one kept, artifacts and all.
    let known = {
        let files = sandbox.files()?;
        let owner = user.as_ref().map(|u| (u.uid, u.gid));
        match context.prepare(&*files, &workdir, resume.is_none(), owner, &stop) {
            Err(TurnError::Restore(artifacts::RestoreError::Io { source, .. }))
                if artifacts::Stopped::of(&source) == Some(artifacts::Stopped::Cancelled) =>
            {
                cancel.watch(None);
                return Err(SandboxError::Interrupted.into());
            }
            other => other?,
        }
    };
    if let Some(r) = resume {
        observer.event(Event::Resuming {
            turn: r.turn,
            step: r.step,
        });
    } else if let Some(loaded) = context.loaded() {
        observer.event(Event::ContextLoaded(&loaded));
    }
    // What the restore wrote becomes a layer of its own, kept if the first step fails.
    let mut layering = true;
    let mut checkpoint =
        |sandbox: &mut dyn Sandbox, observer: &mut dyn Observer| -> Result<(), SandboxError> {
            if layering {
                match sandbox.checkpoint() {
                    Ok(()) => {}
                    Err(e @ SandboxError::Workspace(_)) => return Err(e),
                    Err(e) => {
                        layering = false;
                        let text = match e.hint() {
                            Some(hint) => format!("{e} ({hint})"),
                            None => e.to_string(),
                        };
                        observer.event(Event::Warning(&text));
                    }
                }
            }
            Ok(())
        };
    checkpoint(sandbox.as_mut(), observer)?;

    let mut runner = StepRunner {
        document,
        options,
        secrets,
        turn_id: id,
        turn_number: turn.number,
        deadline,
        context_env: context.env(),
        base_env: prepared.env(user.as_ref()),
        workdir: workdir.clone(),
        user,
        store: &mut turn.store,
        lost: None,
    };
    let mut records = Vec::new();
    let mut results = Vec::new();
    let mut stopped = false;
    let mut interrupted = false;
    // The step a later --resume starts at: the one that stopped this turn.
    let mut stopped_at = None;
    for step in document.steps() {
        if let Some(r) = resume.filter(|r| step.number < r.step) {
            let mut record = not_run_record(step);
            record.status = StepStatus::Kept;
            record.message = Some(format!("kept from turn {}", r.turn));
            record.outputs = r.outputs.get(&step.number).cloned().unwrap_or_default();
            observer.event(Event::StepFinished(step, &record));
            runner.record(&record, None)?;
            runner.publish(&record);
            records.push(record);
            results.push(None);
            continue;
        }
        if stopped || interrupted || cancel.is_cancelled() {
            interrupted |= cancel.is_cancelled();
            if interrupted {
                stopped_at.get_or_insert(step.number);
            }
            let record = not_run_record(step);
            observer.event(Event::StepFinished(step, &record));
            runner.record(&record, None)?;
            records.push(record);
            results.push(Some(ResultBlock::not_run()));
            continue;
        }
        if !records.is_empty() && resume.is_none_or(|r| step.number > r.step) {
            if let Err(e) = checkpoint(sandbox.as_mut(), observer) {
                cancel.watch(None);
                return Err(e.into());
            }
        }
        observer.event(Event::StepStarted(step));
        match runner.run_step(sandbox.as_mut(), step, observer) {
            Ok((record, result, log)) => {
                if record.status.failed() && (!step.continue_on_error || runner.lost.is_some()) {
                    stopped = true;
                    stopped_at = Some(step.number);
                }
                observer.event(Event::StepFinished(step, &record));
                runner.record(&record, log)?;
                runner.publish(&record);
                records.push(record);
                results.push(Some(result));
            }
            Err(SandboxError::Interrupted) => {
                interrupted = true;
                stopped_at = Some(step.number);
                let record = not_run_record(step);
                records.push(record);
                results.push(Some(ResultBlock::not_run()));
            }
            Err(e) => {
                cancel.watch(None);
                return Err(e.into());
            }
        }
    }
    cancel.watch(None);
    let lost = runner.lost.take();
    interrupted |= cancel.is_cancelled();
    let status = if interrupted {
        TurnStatus::Interrupted
    } else if records.iter().any(|r| r.status.failed()) {
        TurnStatus::Failed
    } else {
        TurnStatus::Passed
    };
    let mut status = status;
    let saved = if interrupted {
        None
    } else if let Some(why) = &lost {
        observer.event(Event::Warning(&format!("no artifacts were saved: {why}")));
        None
    } else if fm.artifacts.is_empty() {
        // Nothing to save: what the steps left running goes with the sandbox, with no wait
        // for it here (a guest's fork bomb takes its emulated CPU minutes to end).
        None
    } else {
        // What is saved is what the steps left: nothing they started in the background
        // changes it (or swaps a file for a FIFO) while it is read.
        sandbox.stop_processes()?;
        let files = sandbox.files()?;
        match context.save(&*files, fm, &workdir, turn.store.blobs(), &known, &stop) {
            Ok(Some(context::Saved {
                artifacts,
                summary,
                skipped,
            })) => {
                for (path, what) in skipped {
                    observer.event(Event::Warning(&format!(
                        "artifact {path} was not saved: it is {what}"
                    )));
                }
                Some((artifacts, summary))
            }
            Ok(None) => None,
            Err(e) => match artifacts::Stopped::of(&e) {
                Some(artifacts::Stopped::Cancelled) => {
                    status = TurnStatus::Interrupted;
                    None
                }
                Some(artifacts::Stopped::TimedOut) => {
                    observer.event(Event::Warning(&format!(
                        "the turn's timeout ({}) ran out while its artifacts were saved; none \
                         were saved",
                        upstream_doc::format_duration(fm.timeout.unwrap_or_default())
                    )));
                    status = TurnStatus::Failed;
                    None
                }
                None => return Err(TurnError::SaveArtifacts(e)),
            },
        }
    };
    // A turn that did not pass keeps its workspace as the steps before the one that stopped
    // it left it, for `--resume`.
    let kept = match (status, stopped_at, layering) {
        (TurnStatus::Passed, _, _) | (_, None, _) | (_, _, false) => {
            sandbox.destroy()?;
            None
        }
        (_, Some(step), true) => match sandbox.destroy_keeping() {
            Ok(kept) => Some((kept, step)),
            Err(e) => {
                observer.event(Event::Warning(&format!(
                    "the workspace could not be kept for --resume: {e}"
                )));
                None
            }
        },
    };
    Ok(Ran {
        records,
        results,
        sandbox: sandbox_record,
        saved,
        status,
        kept,
    })
}

fn resolve_secrets(
    document: &Document,
    given: Option<&BTreeMap<String, String>>,
) -> Result<Vec<(String, String)>, TurnError> {
    let value = |name: &str| match given {
        Some(values) => values.get(name).cloned(),
        None => std::env::var(name).ok(),
    };
    document
        .front_matter()
        .secrets
        .iter()
        .map(|name| match value(name) {
            Some(value) => Ok((name.clone(), value)),
            None => Err(TurnError::MissingSecret {
                path: document.path().to_path_buf(),
                name: name.clone(),
            }),
        })
        .collect()
}

fn not_run_record(step: &Step) -> StepRecord {
    StepRecord {
        number: step.number,
        title: step.title(),
        language: step.language,
        status: StepStatus::NotRun,
        exit_code: None,
        signal: None,
        duration_ms: None,
        stdout: String::new(),
        stderr: String::new(),
        stdout_bytes: 0,
        stderr_bytes: 0,
        outputs: BTreeMap::new(),
        log: None,
        message: None,
    }
}

/// Where steps' scripts and `$UPSTREAM_OUTPUT` files live inside the sandbox.
const SANDBOX_RUN_DIR: &str = "/run/upstream";

struct StepRunner<'a> {
    document: &'a Document,
    options: &'a TurnOptions,
    secrets: &'a [(String, String)],
    turn_id: &'a str,
    turn_number: i64,
    deadline: Option<Instant>,
    /// `UPSTREAM_CTX_*`: outputs of earlier turns, then of earlier steps of this one.
    context_env: BTreeMap<String, String>,
    /// What every step starts with: the base environment, the image's user and the
    /// image's environment, under the document's.
    base_env: BTreeMap<String, String>,
    /// Where steps start.
    workdir: String,
    /// The image's user, whom steps run as (root when `None`).
    user: Option<upstream_image::ImageUser>,
    store: &'a mut Store,
    /// Why the sandbox can run nothing more, once its agent is gone.
    lost: Option<String>,
}

/// The most of one step's output its log keeps. The log is the whole output a person reads
/// with `upstream show --step`, and it lives in the context's store on the host's disk, out
/// of reach of the sandbox's disk limit: without a bound a step printing in a loop fills the
/// host's disk. 64 MiB holds the longest build or test logs people read (a few MiB) many
/// times over, and keeps a turn of many such steps to a size a store can carry; what is
/// past it is counted (the step's byte counts) and said, not kept.
pub const MAX_STEP_LOG: u64 = 64 << 20;

/// Everything one step's output goes to.
struct OutputSinks<'s> {
    redact_out: Redactor,
    redact_err: Redactor,
    stdout: OutputCapture,
    stderr: OutputCapture,
    combined: OutputCapture,
    /// The step's whole output, a blob started when the step first prints.
    store: &'s Store,
    log: Option<LogWriter<BlobWriter>>,
    log_error: Option<io::Error>,
    /// How much of the output the log holds, at most [`MAX_STEP_LOG`].
    log_kept: u64,
    scratch: Vec<u8>,
}

impl OutputSinks<'_> {
    fn push(&mut self, stream: Stream, data: &[u8], observer: &mut dyn Observer) {
        self.scratch.clear();
        match stream {
            Stream::Stdout => self.redact_out.push(data, &mut self.scratch),
            Stream::Stderr => self.redact_err.push(data, &mut self.scratch),
        }
        self.deliver(stream, observer);
    }

    fn finish(&mut self, observer: &mut dyn Observer) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            self.scratch.clear();
            match stream {
                Stream::Stdout => self.redact_out.finish(&mut self.scratch),
                Stream::Stderr => self.redact_err.finish(&mut self.scratch),
            }
            self.deliver(stream, observer);
        }
    }

    fn deliver(&mut self, stream: Stream, observer: &mut dyn Observer) {
        let data = &self.scratch;
        if data.is_empty() {
            return;
        }
        match stream {
            Stream::Stdout => self.stdout.push(data),
            Stream::Stderr => self.stderr.push(data),
        }
        self.combined.push(data);
        let room = MAX_STEP_LOG.saturating_sub(self.log_kept);
        let data = &data[..data.len().min(usize::try_from(room).unwrap_or(usize::MAX))];
        if self.log_error.is_none() && !data.is_empty() {
            if self.log.is_none() {
                match self.store.blobs().writer() {
                    Ok(w) => self.log = Some(LogWriter::new(w)),
                    Err(e) => self.log_error = Some(e),
                }
            }
            let which = match stream {
                Stream::Stdout => LogStream::Stdout,
                Stream::Stderr => LogStream::Stderr,
            };
            match self.log.as_mut().map(|log| log.chunk(which, data)) {
                Some(Err(e)) => {
                    self.log_error = Some(e);
                    self.log = None;
                }
                Some(Ok(())) => self.log_kept += data.len() as u64,
                None => {}
            }
        }
        observer.event(Event::Output(stream, &self.scratch));
    }

    /// Puts the log in the store.
    fn commit_log(&mut self) -> Result<Option<BlobId>, io::Error> {
        if let Some(e) = self.log_error.take() {
            return Err(e);
        }
        let Some(log) = self.log.take() else {
            return Ok(None);
        };
        let pending = log.into_inner().finish()?;
        let id = pending.id.clone();
        self.store.blobs().commit(vec![pending])?;
        Ok(Some(id))
    }
}

/// What a step's record says when its log holds `kept` bytes of the `total` it printed.
pub fn log_dropped_note(kept: u64, total: u64) -> String {
    format!(
        "output past {} was not kept ({} in all)",
        upstream_doc::format_size(kept),
        upstream_doc::format_size(total)
    )
}

/// `UPSTREAM_CTX_<KEY>` for output `key`: upper case, anything but letters and digits `_`.
pub fn context_variable(key: &str) -> String {
    let name: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("UPSTREAM_CTX_{name}")
}

impl StepRunner<'_> {
    fn env(&self, step: &Step) -> Vec<(String, String)> {
        let fm = self.document.front_matter();
        let mut env = self.base_env.clone();
        env.insert("UPSTREAM_TURN".into(), self.turn_id.to_string());
        env.insert("UPSTREAM_STEP".into(), step.number.to_string());
        env.insert("UPSTREAM_OUTPUT".into(), output_path(step));
        for (k, v) in &self.context_env {
            env.insert(k.clone(), v.clone());
        }
        for (k, v) in &fm.env {
            env.insert(k.clone(), v.clone());
        }
        for (k, v) in self.secrets {
            env.insert(k.clone(), v.clone());
        }
        env.into_iter().collect()
    }

    /// Makes a step's outputs visible to the steps after it.
    fn publish(&mut self, record: &StepRecord) {
        for (key, value) in &record.outputs {
            self.context_env
                .insert(context_variable(key), value.clone());
        }
    }

    /// Records a step in the store.
    fn record(&mut self, record: &StepRecord, log: Option<BlobId>) -> Result<(), StoreError> {
        let language = match record.language {
            Language::Bash => "bash",
            Language::Sh => "sh",
            Language::Python => "python",
        };
        let status = serde_json::to_value(record.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        self.store.record_step(
            self.turn_number,
            &NewStep {
                number: record.number as i64,
                title: record.title.clone(),
                language: language.into(),
                status,
                exit_code: record.exit_code,
                signal: record.signal,
                duration_ms: record.duration_ms,
                message: record.message.clone(),
                stdout_bytes: record.stdout_bytes,
                stderr_bytes: record.stderr_bytes,
                log,
                outputs: record.outputs.clone(),
            },
        )
    }

    fn run_step(
        &mut self,
        sandbox: &mut dyn Sandbox,
        step: &Step,
        observer: &mut dyn Observer,
    ) -> Result<(StepRecord, ResultBlock, Option<BlobId>), SandboxError> {
        let fm = self.document.front_matter();
        let (script, argv) = script_for(step);

        let left = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        let (limit, limit_is_turn) = match (fm.step_timeout, left) {
            (Some(s), Some(t)) if t < s => (Some(t), true),
            (Some(s), _) => (Some(s), false),
            (None, Some(t)) => (Some(t), true),
            (None, None) => (None, false),
        };
        let limits = self.options.output_limits;
        let secret_values = self.secrets.iter().map(|(_, v)| v.as_str());
        let redactor = Redactor::new(secret_values);
        let request = ExecRequest {
            argv,
            env: self.env(step),
            cwd: self.workdir.clone(),
            timeout_ms: limit.map(|l| l.as_millis().max(1) as u64),
            files: vec![
                FileSpec {
                    path: script,
                    data: step.code.as_bytes().to_vec(),
                    mode: 0o755,
                },
                FileSpec {
                    path: output_path(step),
                    data: Vec::new(),
                    mode: 0o666,
                },
            ],
            collect: Some(Collect {
                path: output_path(step),
                limit: MAX_OUTPUTS_BYTES,
            }),
            user: self.user.as_ref().map(|u| (u.uid, u.gid)),
            ..Default::default()
        };
        let mut sinks = OutputSinks {
            redact_out: redactor.clone(),
            redact_err: redactor.clone(),
            stdout: OutputCapture::new(limits),
            stderr: OutputCapture::new(limits),
            combined: OutputCapture::new(limits),
            store: self.store,
            log: None,
            log_error: None,
            log_kept: 0,
            scratch: Vec::new(),
        };
        let exec = if limit.is_some_and(|l| l.is_zero()) {
            None
        } else {
            Some(sandbox.exec(&request, &mut |stream, data| {
                sinks.push(stream, data, observer)
            }))
        };
        sinks.finish(observer);
        let log = sinks.commit_log();

        let OutputSinks {
            stdout,
            stderr,
            combined,
            log_kept,
            ..
        } = sinks;
        let mut record = not_run_record(step);
        let (outcome, duration) = match exec {
            None => {
                record.status = StepStatus::TimedOut;
                record.message = Some("the turn's timeout ran out before this step".into());
                (Outcome::TimedOut(fm.timeout.unwrap_or_default()), None)
            }
            Some(Err(SandboxError::Agent(upstream_sandbox::ClientError::Refused(why)))) => {
                record.status = StepStatus::Error;
                record.message = Some(why.clone());
                (Outcome::Failed(why), None)
            }
            Some(Err(
                e @ (SandboxError::Agent(_)
                | SandboxError::OutOfMemory
                | SandboxError::Gone(_)
                | SandboxError::Workspace(_)),
            )) => {
                // The agent went away with the sandbox (a VM that died takes it along): the
                // step ends here, nothing more can run, and the turn still records and writes
                // what it has.
                let message = e.to_string();
                let outcome = if matches!(e, SandboxError::OutOfMemory) {
                    record.status = StepStatus::OutOfMemory;
                    Outcome::OutOfMemory { limit: fm.memory }
                } else {
                    record.status = StepStatus::Failed;
                    Outcome::Lost(message.clone())
                };
                record.message = Some(message.clone());
                self.lost = Some(message);
                (outcome, None)
            }
            Some(Err(e)) => return Err(e),
            Some(Ok(done)) => {
                let limit = StepLimit {
                    limit,
                    is_turn: limit_is_turn,
                    memory: fm.memory,
                };
                let outcome = classify(&done, &limit, &mut record);
                match &done.collected {
                    Some(Ok(bytes)) => {
                        let text = redactor.redact_str(&String::from_utf8_lossy(bytes));
                        let parsed = parse_outputs(&text);
                        record.outputs = parsed.values;
                        if !parsed.refused.is_empty() {
                            let keys: Vec<String> = parsed
                                .refused
                                .iter()
                                .map(|k| format!("`{}`", upstream_doc::terminal::line(k)))
                                .collect();
                            let text = format!(
                                "step {}: output key{} {} not kept: an output's name is a letter or `_`, then letters, digits, `_`, `.` or `-`",
                                step.number,
                                if keys.len() == 1 { "" } else { "s" },
                                keys.join(", ")
                            );
                            observer.event(Event::Warning(&text));
                            record.message.get_or_insert(text);
                        }
                    }
                    Some(Err(e)) => {
                        record
                            .message
                            .get_or_insert(format!("outputs not read: {e}"));
                    }
                    None => {}
                }
                (outcome, Some(done.duration))
            }
        };
        let log = match log {
            Ok(log) => log,
            Err(e) => {
                record
                    .message
                    .get_or_insert(format!("the step's whole output could not be kept: {e}"));
                None
            }
        };
        record.log = log.as_ref().map(|id| id.to_string());
        let (combined, stdout, stderr) = (combined.finish(), stdout.finish(), stderr.finish());
        record.stdout = captured_text(&stdout);
        record.stderr = captured_text(&stderr);
        record.stdout_bytes = stdout.total_bytes;
        record.stderr_bytes = stderr.total_bytes;
        let total = stdout.total_bytes + stderr.total_bytes;
        let dropped = log.is_some() && log_kept < total;
        if dropped {
            let note = log_dropped_note(log_kept, total);
            record.message = Some(match record.message.take() {
                Some(m) => format!("{m}; {note}"),
                None => note,
            });
        }
        let full_output = (combined.omitted.is_some() && log.is_some()).then(|| {
            let show = format!("upstream show {} --step {}", self.turn_number, step.number);
            if dropped {
                format!(
                    "its first {}: {show} (the rest was not kept; {} in all)",
                    upstream_doc::format_size(log_kept),
                    upstream_doc::format_size(total)
                )
            } else {
                format!("the whole output: {show}")
            }
        });
        let result = ResultBlock {
            outcome,
            duration,
            output: combined,
            outputs: record
                .outputs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            full_output,
        };
        Ok((record, result, log))
    }
}

/// The limits a step ran under, for telling how it ended.
struct StepLimit {
    /// The time it was given, if any.
    limit: Option<std::time::Duration>,
    /// Whether that time was what was left of the turn's timeout.
    is_turn: bool,
    memory: Option<u64>,
}

/// How a finished command's end reads as a step result; fills in the record's status, exit
/// code or signal, duration and message.
fn classify(done: &ExecOutcome, limits: &StepLimit, record: &mut StepRecord) -> Outcome {
    record.duration_ms = Some(done.duration.as_millis() as u64);
    let (mut outcome, passed) = match done.status {
        ExitStatus::Code(c) => {
            record.exit_code = Some(c);
            (Outcome::Exited(c), c == 0)
        }
        ExitStatus::Signal(s) => {
            record.signal = Some(s);
            (Outcome::Signalled(s), false)
        }
    };
    record.status = if passed {
        StepStatus::Passed
    } else {
        StepStatus::Failed
    };
    if done.timed_out {
        outcome = Outcome::TimedOut(limits.limit.unwrap_or_default());
        record.status = StepStatus::TimedOut;
        record.message = Some(if limits.is_turn {
            "the turn's timeout ran out".into()
        } else {
            "the step ran past step_timeout".into()
        });
    } else if done.out_of_memory && !passed {
        outcome = Outcome::OutOfMemory {
            limit: limits.memory,
        };
        record.status = StepStatus::OutOfMemory;
        record.message = Some("killed for using more memory than the sandbox's limit".into());
    } else if let (Some(limit), false) = (done.out_of_disk, passed) {
        let mut message = format!(
            "out of disk space (limit {})",
            upstream_doc::format_size(limit)
        );
        if record.number > 1 {
            // Each step's writes to the workspace are a layer of their own until the turn
            // ends, kept for --resume: deleting an earlier step's file hides it, and frees
            // nothing.
            message.push_str(
                "; what earlier steps of this turn wrote to the workspace takes disk space until the turn ends, even once deleted (it is what --resume starts from)",
            );
        }
        record.message = Some(message);
        if let Outcome::Exited(code) = outcome {
            outcome = Outcome::OutOfDisk { code, limit };
        }
    }
    outcome
}

fn output_path(step: &Step) -> String {
    format!("{SANDBOX_RUN_DIR}/outputs/step-{}", step.number)
}

/// Where a step's code is written in the sandbox, and the command that runs it.
fn script_for(step: &Step) -> (String, Vec<String>) {
    let (ext, interpreter): (&str, &[&str]) = match step.language {
        Language::Bash => ("sh", &["bash", "-e", "-o", "pipefail"]),
        Language::Sh => ("sh", &["sh", "-e"]),
        Language::Python => ("py", &["python3", "-u"]),
    };
    let path = format!("{SANDBOX_RUN_DIR}/steps/step-{}.{ext}", step.number);
    let mut argv: Vec<String> = interpreter.iter().map(|s| s.to_string()).collect();
    argv.push(path.clone());
    (path, argv)
}

fn captured_text(c: &Captured) -> String {
    let mut text = String::from_utf8_lossy(&c.head).into_owned();
    if let Some(o) = c.omitted {
        text.push_str(&format!(
            "\n[… {} lines ({} bytes) not shown …]\n",
            o.lines, o.bytes
        ));
        text.push_str(&String::from_utf8_lossy(&c.tail));
    }
    text
}

/// What a step wrote to `$UPSTREAM_OUTPUT`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ParsedOutputs {
    pub values: BTreeMap<String, String>,
    /// Keys that are not output names ([`is_output_key`]), as written, in order; their values
    /// are not kept.
    pub refused: Vec<String>,
}

/// Whether `key` names an output: a letter or `_`, then letters, digits, `_`, `.` and `-`,
/// at most [`MAX_OUTPUT_KEY`] bytes. Such a name is an environment variable's once mapped to
/// `UPSTREAM_CTX_*`, and shows in a document, a terminal and a log as it is.
pub fn is_output_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    key.len() <= MAX_OUTPUT_KEY
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The longest output name, in bytes.
pub const MAX_OUTPUT_KEY: usize = 128;

/// Parses `$UPSTREAM_OUTPUT`: `key=value` lines, and `key<<DELIM` … `DELIM` for values that
/// span lines (as GitHub Actions reads `$GITHUB_OUTPUT`). Later values replace earlier ones.
/// A key that is not a name ([`is_output_key`]) is refused, its value dropped.
pub fn parse_outputs(text: &str) -> ParsedOutputs {
    let mut parsed = ParsedOutputs::default();
    let mut keep = |key: &str, value: String| {
        let key = key.trim();
        if is_output_key(key) {
            parsed.values.insert(key.to_string(), value);
        } else if !parsed.refused.iter().any(|k| k == key) {
            parsed.refused.push(key.to_string());
        }
    };
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some((key, delim)) = line.split_once("<<") {
            if !key.contains('=') && !key.trim().is_empty() {
                let mut value = Vec::new();
                for l in lines.by_ref() {
                    if l == delim {
                        break;
                    }
                    value.push(l);
                }
                keep(key, value.join("\n"));
                continue;
            }
        }
        if let Some((key, value)) = line.split_once('=') {
            if !key.trim().is_empty() {
                keep(key, value.to_string());
            }
        }
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_read_like_github_outputs() {
        let got = parse_outputs(
            "count=847\nsummary=14 results\nnotes<<EOF\nline 1\nline 2\nEOF\nempty=\ncount=848\n",
        )
        .values;
        assert_eq!(got["count"], "848");
        assert_eq!(got["summary"], "14 results");
        assert_eq!(got["notes"], "line 1\nline 2");
        assert_eq!(got["empty"], "");
        assert_eq!(got.len(), 4);
    }

    fn classified(
        status: ExitStatus,
        timed_out: bool,
        out_of_memory: bool,
    ) -> (Outcome, StepRecord) {
        let done = ExecOutcome {
            status,
            timed_out,
            out_of_memory,
            out_of_disk: None,
            duration: std::time::Duration::from_millis(1500),
            collected: None,
        };
        let limits = StepLimit {
            limit: Some(std::time::Duration::from_secs(30)),
            is_turn: false,
            memory: Some(64 << 20),
        };
        let doc = Document::parse(std::path::Path::new("t.md"), b"```bash\ntrue\n```\n").unwrap();
        let mut record = not_run_record(&doc.steps()[0]);
        let outcome = classify(&done, &limits, &mut record);
        (outcome, record)
    }

    #[test]
    fn exit_codes_signals_timeouts_and_oom_are_told_apart() {
        let (o, r) = classified(ExitStatus::Code(0), false, false);
        assert_eq!(
            (o, r.status, r.exit_code),
            (Outcome::Exited(0), StepStatus::Passed, Some(0))
        );
        let (o, r) = classified(ExitStatus::Code(3), false, false);
        assert_eq!((o, r.status), (Outcome::Exited(3), StepStatus::Failed));
        let (o, r) = classified(ExitStatus::Signal(11), false, false);
        assert_eq!(
            (o, r.status, r.signal),
            (Outcome::Signalled(11), StepStatus::Failed, Some(11))
        );
        let (o, r) = classified(ExitStatus::Signal(9), true, false);
        assert_eq!(
            (o, r.status),
            (
                Outcome::TimedOut(std::time::Duration::from_secs(30)),
                StepStatus::TimedOut
            )
        );
        assert_eq!(r.message.as_deref(), Some("the step ran past step_timeout"));
        // A shell whose child was OOM-killed exits 137: still out of memory.
        let (o, r) = classified(ExitStatus::Code(137), false, true);
        assert_eq!(
            (o, r.status),
            (
                Outcome::OutOfMemory {
                    limit: Some(64 << 20)
                },
                StepStatus::OutOfMemory
            )
        );
        // An OOM kill of some other process does not fail a step that passed.
        let (_, r) = classified(ExitStatus::Code(0), false, true);
        assert_eq!(r.status, StepStatus::Passed);
        assert_eq!(r.duration_ms, Some(1500));
    }

    #[test]
    fn an_output_key_that_is_not_a_name_is_refused() {
        let parsed = parse_outputs(
            "k\x1b[31m=red\nok.name-1=yes\n_x=1\n1st=no\nsp ace=no\nk\u{202e}<<EOF\nv\nEOF\n",
        );
        assert_eq!(
            parsed.values.keys().collect::<Vec<_>>(),
            vec!["_x", "ok.name-1"]
        );
        assert_eq!(
            parsed.refused,
            vec!["k\x1b[31m", "1st", "sp ace", "k\u{202e}"]
        );
        assert!(!is_output_key(&"a".repeat(MAX_OUTPUT_KEY + 1)));
        assert!(is_output_key(&"a".repeat(MAX_OUTPUT_KEY)));
    }

    #[test]
    fn garbage_lines_are_ignored() {
        let parsed = parse_outputs("no equals sign\n=value\n");
        assert!(parsed.values.is_empty() && parsed.refused.is_empty());
    }
}

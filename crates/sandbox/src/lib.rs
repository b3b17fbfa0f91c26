//! Sandboxes: what a turn runs in, whatever isolates it.
//!
//! A [`Backend`] turns a [`SandboxSpec`] into a running [`Sandbox`]; the turn engine sees only
//! these types. Every backend runs the same agent inside the sandbox, and [`AgentClient`] is
//! the host side of its protocol.

pub mod cgroup;
mod client;
pub mod files;
pub mod host_image;
pub mod ids;
pub mod runtime;
pub mod spawner;
mod spec;

pub use client::{AgentClient, ClientError};
pub use files::{AgentFiles, FileWriter, Files};
pub use spec::{
    DEFAULT_HOSTNAME, Image, Isolation, Kept, Limits, NetworkMode, SandboxSpec, WorkspaceSpec,
    read_kept_label, write_kept_label,
};
pub use upstream_agent::protocol::{Collect, ExecRequest, ExitStatus, FileSpec, Scope, Stream};
pub use upstream_agent::sandboxfs;

use std::time::Duration;

/// Errors from creating or using a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The host cannot provide this sandbox; `hint` says what would fix it.
    #[error("cannot set up the sandbox: {reason}")]
    Setup {
        reason: String,
        hint: Option<String>,
    },
    /// The image is not one this backend can run.
    #[error("cannot run image `{image}`: {reason}")]
    Image { image: String, reason: String },
    /// The agent inside the sandbox failed or went away.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// The sandbox was torn down from outside (Ctrl-C).
    #[error("the sandbox was stopped")]
    Interrupted,
    /// The sandbox lost its workspace: nothing more can run in it.
    #[error("{0}")]
    Workspace(String),
    /// The sandbox died (its VM stopped: a guest's kernel panic, its monitor killed or out
    /// of memory): nothing more can run in it. The message says what happened.
    #[error("{0}")]
    Gone(String),
    /// The kernel killed the sandbox's agent for want of memory (where upstream could not
    /// make it the last process to go): nothing more can run in it.
    #[error("the sandbox ran out of memory and its agent was killed")]
    OutOfMemory,
}

impl SandboxError {
    pub fn setup(reason: impl Into<String>, hint: Option<&str>) -> SandboxError {
        SandboxError::Setup {
            reason: reason.into(),
            hint: hint.map(str::to_string),
        }
    }

    pub fn hint(&self) -> Option<&str> {
        match self {
            SandboxError::Setup { hint, .. } => hint.as_deref(),
            _ => None,
        }
    }
}

/// How a command in a sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    pub status: ExitStatus,
    /// The command ran past its timeout and was killed.
    pub timed_out: bool,
    /// The kernel killed a process of the sandbox for going over its memory limit.
    pub out_of_memory: bool,
    /// The command failed with the sandbox's disk full: the disk limit it ran out of.
    pub out_of_disk: Option<u64>,
    pub duration: Duration,
    /// The file the request asked to collect: its bytes, or why it could not be read.
    pub collected: Option<Result<Vec<u8>, String>>,
}

/// What a sandbox is and how it came to be, for progress lines and `--json`.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxInfo {
    /// `namespaces`, `namespaces (rootless)`, …
    pub backend: String,
    /// How long setting the sandbox up took.
    pub setup: Duration,
    /// Limits asked for that this host cannot enforce, each with why.
    pub unenforced: Vec<String>,
    /// How many user and group ids exist in the sandbox, from 0: 1 when only its root is
    /// mapped (rootless), so a command can run as uid `n` only when `n < ids`.
    pub ids: u32,
}

/// A way to stop a sandbox from another thread, such as a Ctrl-C handler.
pub trait Interrupter: Send + Sync {
    /// Kills the sandbox's processes at once; its owner then sees [`SandboxError::Interrupted`].
    ///
    /// It may be called from a signal handler, so it must be async-signal-safe: atomics and
    /// system calls such as kill(2) only, no allocation, no locks.
    fn interrupt(&self);
}

/// A running sandbox. It may move between threads (a server keeps many), but is used by one
/// at a time.
pub trait Sandbox: Send {
    /// What the sandbox is; its setup time is known once it is ready.
    fn info(&self) -> &SandboxInfo;

    /// Waits until the sandbox is set up, or says why it could not be. Every other operation
    /// waits for this itself; calling it first only makes setup errors come first.
    fn wait_ready(&mut self) -> Result<(), SandboxError>;

    /// Runs a command, passing its output to `on_output` as it arrives.
    fn exec(
        &mut self,
        request: &ExecRequest,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, SandboxError>;

    /// Starts a command in the background, its stdout and stderr appended to these files of
    /// the sandbox; returns its pid in the sandbox.
    fn spawn(
        &mut self,
        request: &ExecRequest,
        stdout: &str,
        stderr: &str,
    ) -> Result<i32, SandboxError>;

    /// Waits up to `timeout` (`None`: for ever) for a background command to end; `None`
    /// while it still runs.
    fn wait(
        &mut self,
        pid: i32,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitStatus>, SandboxError>;

    /// Sends `signal` to a background command's process group.
    fn signal(&mut self, pid: i32, signal: i32) -> Result<(), SandboxError>;

    /// Kills every process in the sandbox but its agent — background commands, what the
    /// steps left running, sessions' commands — and waits until they are gone, so that
    /// nothing changes the sandbox's files any more (a turn does this before it saves its
    /// artifacts). The sandbox stays up: files can still be read and written.
    fn stop_processes(&mut self) -> Result<(), SandboxError>;

    /// Another way in, on which commands run alongside those started here and in every
    /// other session. It lives until dropped or the sandbox ends.
    fn session(&mut self) -> Result<Box<dyn Session>, SandboxError>;

    /// Reads a file inside the sandbox, refusing files over `limit` bytes.
    fn read_file(&mut self, path: &str, limit: u64) -> Result<Vec<u8>, SandboxError>;

    /// Writes a file inside the sandbox.
    fn write_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), SandboxError>;

    /// The sandbox's files, to move them in and out ([`Files`]): the host's own way to them
    /// where it has one, else the agent's. Drop it before destroying the sandbox: it may
    /// hold the sandbox's root, or connections to its agent.
    fn files(&mut self) -> Result<std::sync::Arc<dyn Files>, SandboxError>;

    /// A handle that can stop this sandbox from elsewhere.
    fn interrupter(&self) -> std::sync::Arc<dyn Interrupter>;

    /// With a layered workspace: makes what the steps so far wrote a read-only layer, so
    /// that what the next step writes can be told apart. Does nothing otherwise, or when
    /// nothing was written since the last time.
    fn checkpoint(&mut self) -> Result<(), SandboxError>;

    /// Stops every process and removes everything the sandbox left on the host. Dropping a
    /// sandbox does the same; this reports what went wrong.
    fn destroy(self: Box<Self>) -> Result<(), SandboxError>;

    /// Like [`Sandbox::destroy`], but first keeps the layered workspace below its top layer
    /// (what the steps before the last checkpoint wrote) and the root's writable layer, for a
    /// later sandbox to start from ([`WorkspaceSpec::resume`]). Returns the backend's name
    /// for what it kept.
    fn destroy_keeping(self: Box<Self>) -> Result<Kept, SandboxError>;
}

/// A second way into a running sandbox ([`Sandbox::session`]): commands run here alongside
/// the sandbox's own and other sessions'. Dropping it kills what it still runs.
pub trait Session: Send {
    /// Runs a command, passing its output to `on_output` as it arrives. A timeout kills the
    /// command's process group only, whatever the request's scope.
    fn exec(
        &mut self,
        request: &ExecRequest,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, SandboxError>;
}

/// Something that makes sandboxes.
pub trait Backend {
    /// A short name: `namespaces`.
    fn name(&self) -> &str;

    fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>, SandboxError>;

    /// Removes what [`Sandbox::destroy_keeping`] kept, now that nothing will resume from
    /// it. A name of another backend's, or of nothing kept, is no error: nothing happens.
    fn discard_kept(&self, kept: &Kept);

    /// Gets ready to make sandboxes of `spec`'s shape quickly, as a warm pool does before it
    /// fills: the VM backend boots one machine and snapshots it, and restores later ones of
    /// that shape from the snapshot. Backends with nothing to prepare do nothing.
    fn prepare(&self, _spec: &SandboxSpec) -> Result<(), SandboxError> {
        Ok(())
    }

    /// Makes what sandboxes of `spec` start from where this backend makes that once and has
    /// not made it yet (the VM backend's disk of the host's files, for `image: host`),
    /// telling `making` first, in a sentence, what it makes: it takes long.
    /// [`Backend::create`] makes it too, without a word; this is for whoever shows progress.
    fn make_root(
        &self,
        _spec: &SandboxSpec,
        _making: &mut dyn FnMut(&str),
    ) -> Result<(), SandboxError> {
        Ok(())
    }

    /// Everything this backend has kept, resumable or not.
    fn kept(&self) -> Vec<Kept> {
        Vec::new()
    }

    /// Labels what was kept as `kept` with `label` (who it belongs to: see
    /// `upstream_turn::kept`), replacing any label before.
    fn label_kept(&self, _kept: &Kept, _label: &str) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// The label of what was kept as `kept`, and when it was set; `None` without one.
    fn kept_label(&self, _kept: &Kept) -> Option<(String, std::time::SystemTime)> {
        None
    }

    /// Removes what sandboxes of upstream processes that are gone left on the host (a
    /// long-running daemon calls this now and then).
    fn remove_leftovers(&self) {}
}

/// A backend chosen at run time, shared by whoever makes sandboxes (the CLI, the daemon's
/// tasks).
pub type SharedBackend = std::sync::Arc<dyn Backend + Send + Sync>;

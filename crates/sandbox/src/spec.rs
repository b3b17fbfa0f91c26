//! What a sandbox should be: its image, limits and network.

use std::path::PathBuf;

/// The root filesystem of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// The host's /usr, /etc and the links to them, behind a writable layer of the sandbox's own.
    Host,
    /// An unpacked image: read-only layers, lowest first.
    Layers {
        reference: String,
        layers: Vec<PathBuf>,
    },
}

impl Image {
    pub fn name(&self) -> &str {
        match self {
            Image::Host => "host",
            Image::Layers { reference, .. } => reference,
        }
    }
}

/// Resource limits. `None` leaves a resource unlimited, but for `disk`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    /// Bytes of memory.
    pub memory: Option<u64>,
    /// CPU time as a number of CPUs.
    pub cpus: Option<f64>,
    /// Processes and threads.
    pub pids: Option<u64>,
    /// Bytes the sandbox may write to disk: its root's writable layer (with /tmp), its
    /// workspace and whatever the host writes there for it. Enforced by a filesystem of the
    /// sandbox's own where the backend can make one; a sandbox whose writable layer lives in
    /// memory ([`SandboxSpec::scratch_in_memory`]) is bounded by its memory instead. `None`:
    /// [`Limits::DEFAULT_DISK`]; whoever makes sandboxes for others (the daemon) puts its
    /// own default here.
    pub disk: Option<u64>,
}

impl Limits {
    /// The cap on processes every sandbox gets unless told otherwise: enough for builds, too
    /// few for a fork bomb to hurt the host.
    pub const DEFAULT_PIDS: u64 = 1024;
    /// The disk limit of a sandbox that names none: room for a large build or data set,
    /// and a bound on what a runaway step can take from the host.
    pub const DEFAULT_DISK: u64 = 10 << 30;

    /// The disk limit these limits give a disk-backed sandbox.
    pub fn disk_or_default(&self) -> u64 {
        self.disk.unwrap_or(Limits::DEFAULT_DISK)
    }
}

/// The network a sandbox sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// A network namespace of its own with only loopback.
    #[default]
    None,
    /// The host's network.
    Host,
}

/// The hostname of a sandbox unless told otherwise.
pub const DEFAULT_HOSTNAME: &str = "sandbox";

/// A workspace kept in layers, one per step, so that a turn that fails can be resumed from
/// the state the steps before the failure left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceSpec {
    /// The workspace, inside the sandbox (`/workspace`).
    pub dir: String,
    /// Layers an earlier sandbox kept ([`crate::Sandbox::destroy_keeping`]) to start from.
    pub resume: Option<PathBuf>,
}

/// Everything a backend needs to make a sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxSpec {
    pub image: Image,
    pub limits: Limits,
    pub network: NetworkMode,
    pub hostname: String,
    /// A layered workspace; `None` for a plain one.
    pub workspace: Option<WorkspaceSpec>,
    /// Keep the root's writable layer in memory (a tmpfs, charged to the sandbox's memory)
    /// rather than on disk: for short-lived sandboxes whose writes are thrown away.
    pub scratch_in_memory: bool,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        SandboxSpec {
            image: Image::Host,
            limits: Limits {
                pids: Some(Limits::DEFAULT_PIDS),
                ..Limits::default()
            },
            network: NetworkMode::None,
            hostname: DEFAULT_HOSTNAME.into(),
            workspace: None,
            scratch_in_memory: false,
        }
    }
}

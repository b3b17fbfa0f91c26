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

/// What isolates a sandbox: which backend makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// Linux namespaces on the host's kernel.
    #[default]
    Namespaces,
    /// A microVM with a kernel of its own.
    Vm,
}

impl Isolation {
    pub fn name(self) -> &'static str {
        match self {
            Isolation::Namespaces => "namespaces",
            Isolation::Vm => "vm",
        }
    }
}

/// The hostname of a sandbox unless told otherwise.
pub const DEFAULT_HOSTNAME: &str = "sandbox";

/// A workspace kept in layers, one per step, so that a turn that fails can be resumed from
/// the state the steps before the failure left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceSpec {
    /// The workspace, inside the sandbox (`/workspace`).
    pub dir: String,
    /// What an earlier sandbox kept ([`crate::Sandbox::destroy_keeping`]) to start from.
    pub resume: Option<Kept>,
}

/// What a backend kept of a sandbox for a later one to start from
/// ([`crate::Sandbox::destroy_keeping`], [`WorkspaceSpec::resume`]): a name that only the
/// backend that made it resolves, recorded as text (`namespaces:4f2a…`). It is no path:
/// one backend keeps directories, another a disk image, and nothing outside the backend
/// reaches what the name stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Kept {
    backend: String,
    id: String,
}

impl Kept {
    /// The most bytes of an id.
    const MAX_ID: usize = 128;

    /// A name of `backend`'s for what it kept as `id`: `None` unless the backend's name is
    /// lowercase letters and the id letters, digits, `.`, `_` and `-` (not first `.`), so
    /// that no id read back from a store can lead elsewhere.
    pub fn new(backend: &str, id: &str) -> Option<Kept> {
        let backend_ok = !backend.is_empty() && backend.bytes().all(|b| b.is_ascii_lowercase());
        let id_ok = !id.is_empty()
            && id.len() <= Kept::MAX_ID
            && !id.starts_with('.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        (backend_ok && id_ok).then(|| Kept {
            backend: backend.to_string(),
            id: id.to_string(),
        })
    }

    /// A name as [`Kept`]'s `Display` writes it. An absolute path is what upstream recorded
    /// before names: `…/kept/<id>`, a set of the namespace backend's.
    pub fn parse(text: &str) -> Option<Kept> {
        if text.starts_with('/') {
            let path = std::path::Path::new(text);
            if path.parent()?.file_name()? != "kept" {
                return None;
            }
            return Kept::new("namespaces", path.file_name()?.to_str()?);
        }
        let (backend, id) = text.split_once(':')?;
        Kept::new(backend, id)
    }

    /// The backend that kept it (its [`crate::Backend::name`]).
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// What the backend named it.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl std::fmt::Display for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.backend, self.id)
    }
}

/// Everything a backend needs to make a sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxSpec {
    pub isolation: Isolation,
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
            isolation: Isolation::Namespaces,
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

/// The file of a kept set that holds its label ([`crate::Backend::label_kept`]).
const KEPT_LABEL: &str = "owner";

/// Labels the kept set in directory `set` with `label`, replacing any label before: a file
/// only its owner reads, never a link followed.
pub fn write_kept_label(set: &std::path::Path, label: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(set.join(KEPT_LABEL))?;
    std::io::Write::write_all(&mut file, label.as_bytes())
}

/// The label of the kept set in directory `set` (its first 4 KiB) and when it was set;
/// `None` without one.
pub fn read_kept_label(set: &std::path::Path) -> Option<(String, std::time::SystemTime)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(set.join(KEPT_LABEL))
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, 4096), &mut text).ok()?;
    Some((text, meta.modified().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_name_round_trips_and_reads_the_paths_recorded_before_names() {
        let kept = Kept::new("namespaces", "sb-0193.a_b").unwrap();
        assert_eq!(kept.to_string(), "namespaces:sb-0193.a_b");
        assert_eq!(Kept::parse(&kept.to_string()), Some(kept.clone()));
        assert_eq!(
            Kept::parse("/var/lib/upstream/kept/sb-0193.a_b"),
            Some(kept),
            "a path an older upstream recorded"
        );
    }

    #[test]
    fn a_kept_name_that_could_lead_elsewhere_is_refused() {
        for bad in [
            "namespaces:../etc",
            "namespaces:a/b",
            "namespaces:..",
            "namespaces:.hidden",
            "namespaces:",
            ":id",
            "Name:id",
            "namespaces:a\0b",
            "namespaces:a b",
            "no-colon",
            "/var/lib/upstream/other/x",
            "/var/lib/upstream/kept/..",
            "/kept",
        ] {
            assert_eq!(Kept::parse(bad), None, "{bad}");
        }
        assert!(Kept::new("vm", &"x".repeat(128)).is_some());
        assert!(Kept::new("vm", &"x".repeat(129)).is_none());
    }
}

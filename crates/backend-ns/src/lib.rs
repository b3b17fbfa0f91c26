//! The namespace backend: sandboxes made of Linux namespaces, an overlay root, cgroups,
//! dropped capabilities and a seccomp filter. It needs no daemon and no KVM: root, or a kernel
//! that lets unprivileged users create user namespaces, is enough.
//!
//! The host side ([`NamespaceBackend`]) prepares the sandbox directory and cgroups and starts
//! the upstream binary again as the sandbox's init ([`init::main`]), which builds the sandbox
//! and becomes its agent. The host then talks to the agent over a socket pair.

pub use upstream_sandbox::cgroup;
pub mod disk;
mod idmap;
pub use upstream_sandbox::ids;
pub mod init;
mod launch;
mod layers;
mod mounts;
pub mod probe;
pub use upstream_sandbox::runtime;
mod security;
mod setup;

use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid};
use upstream_agent::protocol::{read_frame, write_frame};
use upstream_sandbox::files::Tree;
use upstream_sandbox::sandboxfs;
use upstream_sandbox::{
    AgentClient, AgentFiles, Backend, ClientError, ExecOutcome, ExecRequest, ExitStatus, Files,
    Image, Interrupter, Kept, NetworkMode, Sandbox, SandboxError, SandboxInfo, SandboxSpec,
    Session, Stream,
};

use crate::cgroup::{Cgroups, Layout};
use crate::setup::{FromInit, IdMap, InitConfig, ToInit, WorkspaceLayers};

/// The argument that makes the upstream binary run as a sandbox init.
pub const INIT_ARG: &str = "__sandbox-init";

/// As root, the host id that files sandboxes see are stored with for sandbox id 0 (so sandbox
/// id `n` is stored as `n`): each sandbox runs as a host id range of its own ([`ids`]) and sees
/// them through idmapped mounts ([`idmap`]). Images are unpacked with these owners.
pub const STORED_ID_BASE: u32 = 0;
/// How many ids a sandbox has when upstream runs as root.
pub const SANDBOX_ID_COUNT: u32 = ids::RANGE_SIZE;

/// Makes namespace sandboxes.
#[derive(Debug)]
pub struct NamespaceBackend {
    init_exe: PathBuf,
    /// Where sandbox directories are made.
    sandboxes: PathBuf,
    /// Sandbox directories kept for reuse.
    pool: PathBuf,
    /// The lower layer shared by host-image sandboxes.
    skeleton: PathBuf,
    /// Layers kept for resuming turns.
    kept: PathBuf,
    /// Formatted templates of sandbox disks, one per size (see [`disk`]).
    disks: PathBuf,
    /// Read on first use: only sandboxes with memory or cpu limits need it.
    layout: std::sync::OnceLock<Layout>,
    rootless: bool,
    /// Host id ranges for sandboxes, as root.
    ids: Option<ids::Allocator>,
    init_mode: launch::InitMode,
    files: FilesWay,
}

/// How the host moves a sandbox's files ([`Sandbox::files`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilesWay {
    /// On the sandbox's root from the host: the fastest (the default).
    Host,
    /// By the agent inside, as for a VM (`UPSTREAM_FILES=agent`): the host never opens a
    /// file of the sandbox itself.
    Agent,
}

impl FilesWay {
    fn from_env() -> FilesWay {
        match std::env::var("UPSTREAM_FILES").as_deref() {
            Ok("agent") => FilesWay::Agent,
            _ => FilesWay::Host,
        }
    }
}

/// How many connections of its own the agent gets to move files on: as many files at once.
const FILE_CONNECTIONS: usize = 2;

impl NamespaceBackend {
    /// A backend that starts `init_exe` (an upstream binary) as the init of each sandbox.
    pub fn new(init_exe: PathBuf) -> Result<NamespaceBackend, SandboxError> {
        NamespaceBackend::in_runtime_dir(init_exe, None)
    }

    /// [`NamespaceBackend::new`] with its sandboxes, pool and kept workspaces in `dir` (which
    /// must be private to this user, as [`runtime`] checks) instead of the runtime directory
    /// the environment names: several backends in one process each get their own.
    pub fn in_runtime_dir(
        init_exe: PathBuf,
        dir: Option<&Path>,
    ) -> Result<NamespaceBackend, SandboxError> {
        let runtime_dir = runtime_dir(dir)?;
        let rootless = !Uid::effective().is_root();
        let skeleton = runtime_dir.join(SKELETON_DIR);
        if !skeleton.is_dir() {
            let temp = runtime_dir.join(format!(
                "{SKELETON_DIR}.tmp-{}",
                upstream_sandbox::runtime::unique_name()
            ));
            let made = mounts::make_skeleton(&temp).and_then(|()| fs::rename(&temp, &skeleton));
            if made.is_err() {
                let _ = sandboxfs::remove_all(&temp);
                // Another upstream may have made it meanwhile; only its absence is an error.
                if !skeleton.is_dir() {
                    return Err(SandboxError::setup(
                        format!(
                            "cannot create {}: {}",
                            skeleton.display(),
                            made.err().map_or(String::new(), |e| e.to_string())
                        ),
                        None,
                    ));
                }
            }
        }
        remove_stale_sandboxes(&runtime_dir.join("sandboxes"));
        let ids = if rootless {
            None
        } else {
            let dir = runtime::ids_dir().map_err(|e| {
                let hint = e.hint();
                SandboxError::setup(e.to_string(), Some(hint.as_str()))
            })?;
            Some(ids::Allocator::for_host(dir))
        };
        Ok(NamespaceBackend {
            init_exe,
            sandboxes: runtime_dir.join("sandboxes"),
            pool: runtime_dir.join(POOL_DIR),
            kept: runtime_dir.join("kept"),
            disks: runtime_dir.join("disks"),
            skeleton,
            layout: std::sync::OnceLock::new(),
            rootless,
            ids,
            init_mode: launch::InitMode::from_env(),
            files: FilesWay::from_env(),
        })
    }

    /// The same backend moving sandboxes' files `way` ([`Sandbox::files`]), whatever
    /// `$UPSTREAM_FILES` says.
    pub fn moving_files(mut self, way: FilesWay) -> NamespaceBackend {
        self.files = way;
        self
    }

    fn describe(&self) -> String {
        if self.rootless {
            "namespaces, rootless".into()
        } else {
            "namespaces".into()
        }
    }
}

/// Removes the directories of sandboxes whose upstream process died without cleaning up
/// (killed with SIGKILL, say); its processes died with it (parent-death signal).
fn remove_stale_sandboxes(sandboxes: &Path) {
    let Ok(entries) = fs::read_dir(sandboxes) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(cgroup::owner_pid) else {
            continue;
        };
        if kill(Pid::from_raw(owner), None).is_err() {
            if entry.path().join(disk::IMAGE).exists() {
                disk::return_stale(&entry.path());
            } else {
                layers::return_resumed(&entry.path());
            }
            let _ = SandboxDir::at(entry.path()).remove();
        }
    }
}

/// The versioned name of the shared skeleton: a change to its contents gets a new name.
const SKELETON_DIR: &str = "skeleton-4";

/// Opens a directory as a path-only descriptor (`O_PATH`): enough to resolve and mount
/// through, and open while the path to it may not be searchable later.
pub(crate) fn open_path_dir(path: &str) -> nix::Result<OwnedFd> {
    use nix::fcntl::OFlag;
    nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
}

/// Where sandbox directories live (see [`runtime`]), with its `sandboxes` and pool
/// directories made.
fn runtime_dir(dir: Option<&Path>) -> Result<PathBuf, SandboxError> {
    runtime::runtime_dir_in(dir, &["sandboxes", POOL_DIR]).map_err(|e| {
        let hint = e.hint();
        SandboxError::setup(e.to_string(), Some(hint.as_str()))
    })
}

static NEXT_SANDBOX: AtomicU32 = AtomicU32::new(0);

impl Backend for NamespaceBackend {
    fn name(&self) -> &str {
        BACKEND_NAME
    }

    fn discard_kept(&self, kept: &Kept) {
        if let Some(path) = self.kept_path(kept) {
            discard_kept_dir(&path);
        }
    }

    fn kept(&self) -> Vec<Kept> {
        disk::kept_sets(&self.kept)
            .iter()
            .filter_map(|p| Kept::new(BACKEND_NAME, p.file_name()?.to_str()?))
            .collect()
    }

    fn label_kept(&self, kept: &Kept, label: &str) -> io::Result<()> {
        let path = self.kept_path(kept).ok_or(io::ErrorKind::NotFound)?;
        upstream_sandbox::write_kept_label(&path, label)
    }

    fn kept_label(&self, kept: &Kept) -> Option<(String, std::time::SystemTime)> {
        upstream_sandbox::read_kept_label(&self.kept_path(kept)?)
    }

    fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>, SandboxError> {
        self.create_sandbox(spec)
    }

    fn remove_leftovers(&self) {
        self.remove_stale();
    }
}

/// The namespace backend, as the CLI and the daemon hold it: sandboxes run `init_exe` (this
/// upstream binary) as their init.
pub fn open(init_exe: PathBuf) -> Result<upstream_sandbox::SharedBackend, SandboxError> {
    Ok(std::sync::Arc::new(NamespaceBackend::new(init_exe)?))
}

/// This backend's name, in what it names ([`Kept`]).
const BACKEND_NAME: &str = "namespaces";

impl NamespaceBackend {
    /// Where the set this backend kept as `kept` is; `None` for another backend's.
    fn kept_path(&self, kept: &Kept) -> Option<PathBuf> {
        (kept.backend() == BACKEND_NAME).then(|| self.kept.join(kept.id()))
    }

    /// Removes what sandboxes of upstream processes that are gone left behind: their
    /// directories (once their processes have exited) and their empty cgroups. A new
    /// backend does the directories itself; a long-running one calls this now and then.
    fn remove_stale(&self) {
        remove_stale_sandboxes(&self.sandboxes);
        self.layout.get_or_init(Layout::detect).remove_stale();
    }

    fn create_sandbox(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>, SandboxError> {
        let start = Instant::now();
        let layers = match &spec.image {
            Image::Host => Vec::new(),
            Image::Layers { layers, .. } => {
                layers.iter().map(|p| p.display().to_string()).collect()
            }
        };
        let name = format!(
            "upstream-{}-{}",
            std::process::id(),
            NEXT_SANDBOX.fetch_add(1, Ordering::Relaxed)
        );
        // As root, the sandbox's own host ids; the init holds their lock too.
        let id_range = match &self.ids {
            Some(ids) => Some(
                ids.take()
                    .map_err(|e| SandboxError::setup(e.to_string(), None))?,
            ),
            None => None,
        };
        // The init starts first: it loads while the directory and cgroups are made.
        let new_net = spec.network == NetworkMode::None;
        let (mut conn, child, stderr) = launch::start_init(
            &self.init_exe,
            self.init_mode,
            new_net,
            id_range.as_ref().map(|r| r.lock().as_fd()),
        )?;
        let cloned = child.cloned;
        let pid = child.id();
        let mut sandbox = NamespaceSandbox {
            info: SandboxInfo {
                backend: self.describe(),
                setup: Duration::ZERO,
                unenforced: Vec::new(),
                ids: if self.rootless { 1 } else { SANDBOX_ID_COUNT },
            },
            child: Some(child),
            id_range,
            stderr: Some(stderr),
            client: None,
            cgroups: Cgroups::default(),
            dir: None,
            pool: self.pool.clone(),
            started: start,
            rootless: self.rootless,
            layers: None,
            kept: self.kept.clone(),
            files: self.files,
            interrupter: Arc::new(NsInterrupter {
                pid: pid as i32,
                interrupted: AtomicBool::new(false),
            }),
        };
        let (claimed, unenforced) = self.claim_dir(&self.sandboxes.join(&name), spec)?;
        sandbox.info.unenforced.extend(unenforced);
        let dir = sandbox.dir.insert(claimed);
        let mut root_layers = 0;
        let mut workspace = None;
        if let Some(ws) = &spec.workspace {
            let kept = ws.resume.as_ref().and_then(|k| self.kept_path(k));
            let resume = dir.resume_from(kept.as_deref());
            let (prepared, roots) = layers::Layers::prepare(&dir.data, &ws.dir, resume.as_deref())
                .map_err(|e| {
                    SandboxError::setup(format!("cannot prepare the workspace's layers: {e}"), None)
                })?;
            root_layers = roots;
            workspace = Some(WorkspaceLayers {
                dir: ws.dir.clone(),
                below: prepared.below(),
            });
            sandbox.layers = Some(prepared);
        }
        let dir = sandbox.dir.as_mut().expect("claimed above");
        let config = InitConfig {
            root_layers,
            workspace,
            upper_in_memory: spec.scratch_in_memory,
            memory: spec.limits.memory,
            sandbox_dir: dir.data.display().to_string(),
            skeleton: layers
                .is_empty()
                .then(|| self.skeleton.display().to_string()),
            layers,
            id_map: match &sandbox.id_range {
                Some(range) => IdMap::Range {
                    base: range.base,
                    count: SANDBOX_ID_COUNT,
                },
                None => IdMap::Own,
            },
            idmapped: sandbox.id_range.is_some(),
            new_net,
            hostname: spec.hostname.clone(),
            max_processes: spec.limits.pids,
        };
        if spec.limits.memory.is_some() || spec.limits.cpus.is_some() {
            let layout = self.layout.get_or_init(Layout::detect);
            let (cgroups, unenforced) = Cgroups::create(
                layout,
                &name,
                &cgroup::Wanted::memory_and_cpus(&spec.limits),
            );
            sandbox.cgroups = cgroups;
            sandbox.info.unenforced.extend(unenforced);
        }
        if let Err(e) = sandbox.cgroups.add(pid) {
            return Err(SandboxError::setup(
                format!("cannot move the sandbox into its cgroups: {e}"),
                None,
            ));
        }
        protect_agent(pid);
        let setup = (|| -> Result<Result<(), String>, ClientError> {
            if cloned {
                // The init is already in its user namespace, making the others; then it
                // waits for its configuration.
                if let Err(e) = write_id_maps(pid, config.id_map) {
                    return Ok(Err(format!("cannot map the sandbox's user ids: {e}")));
                }
                if let Err(e) = dir.prepare() {
                    return Ok(Err(e.to_string()));
                }
                let mounts = match idmapped_mounts(pid, &config) {
                    Ok(mounts) => mounts,
                    Err(e) => return Ok(Err(e)),
                };
                write_frame(&mut conn, &ToInit::Config(config.clone()))?;
                if let Err(e) = send_mounts(&conn, &config, &mounts) {
                    return Ok(Err(e));
                }
            } else {
                if let Err(e) = dir.prepare() {
                    return Ok(Err(e.to_string()));
                }
                write_frame(&mut conn, &ToInit::Config(config.clone()))?;
                if let IdMap::Range { .. } = config.id_map {
                    match read_frame::<_, FromInit>(&mut conn)? {
                        Some(FromInit::MapIds) => {}
                        None => {
                            return Ok(Err(
                                "the sandbox init exited before its user namespace was ready"
                                    .into(),
                            ));
                        }
                    }
                    if let Err(e) = write_id_maps(pid, config.id_map) {
                        return Ok(Err(format!("cannot map the sandbox's user ids: {e}")));
                    }
                    let mounts = match idmapped_mounts(pid, &config) {
                        Ok(mounts) => mounts,
                        Err(e) => return Ok(Err(e)),
                    };
                    write_frame(&mut conn, &ToInit::Mapped)?;
                    if let Err(e) = send_mounts(&conn, &config, &mounts) {
                        return Ok(Err(e));
                    }
                }
            }
            Ok(Ok(()))
        })();
        match setup {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(setup_error(message, self.rootless)),
            Err(e) => {
                let detail = sandbox.init_stderr();
                let message = if detail.is_empty() {
                    e.to_string()
                } else {
                    format!("{e}: {detail}")
                };
                return Err(setup_error(message, self.rootless));
            }
        }
        // The agent says it is ready when it is; the first request may go before that.
        sandbox.client = Some(AgentClient::new(conn));
        Ok(Box::new(sandbox))
    }
}

/// The idmapped mounts of the sandbox directory, the skeleton and the image's layers through
/// the user namespace of the init `pid`, when the configuration asks for them.
fn idmapped_mounts(pid: u32, config: &InitConfig) -> Result<Vec<OwnedFd>, String> {
    if !config.idmapped {
        return Ok(Vec::new());
    }
    let path = format!("/proc/{pid}/ns/user");
    let userns = fs::File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
    let dirs = std::iter::once(&config.sandbox_dir)
        .chain(config.skeleton.as_ref())
        .chain(&config.layers);
    let mut mounts = Vec::new();
    for dir in dirs {
        mounts.push(
            idmap::clone_idmapped(Path::new(dir), userns.as_fd()).map_err(|e| {
                match e.raw_os_error() {
                    Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => format!(
                        "cannot make an idmapped mount of {dir}: its filesystem does not support them ({e})"
                    ),
                    _ => format!("cannot make an idmapped mount of {dir}: {e}"),
                }
            })?,
        );
    }
    // An image unpacked by an older upstream has its files shifted to where sandbox ids
    // once started; seen through the mount they would belong to nobody.
    for layer in &config.layers {
        let owner = fs::metadata(layer)
            .map(|m| m.uid())
            .unwrap_or(STORED_ID_BASE);
        if owner != STORED_ID_BASE {
            let image = Path::new(layer).parent().unwrap_or(Path::new(layer));
            return Err(format!(
                "the image at {layer} was unpacked by an older upstream (its root belongs to host uid {owner}); remove {} and run again to have it unpacked anew",
                image.display()
            ));
        }
    }
    Ok(mounts)
}

fn send_mounts(conn: &UnixStream, config: &InitConfig, mounts: &[OwnedFd]) -> Result<(), String> {
    if !config.idmapped {
        return Ok(());
    }
    idmap::send_fds(conn, mounts).map_err(|e| format!("cannot hand the sandbox its mounts: {e}"))
}

fn setup_error(message: String, rootless: bool) -> SandboxError {
    let hint = if message.contains("idmapped mount") {
        Some(
            "sandboxes of root see their files through idmapped mounts (Linux 5.19 or later; 6.3 for a runtime directory on tmpfs): set UPSTREAM_RUNTIME_DIR to a directory on ext4, xfs or btrfs, or upgrade the kernel",
        )
    } else if message.contains("user namespace") && rootless {
        Some(
            "this kernel does not let unprivileged users create user namespaces: run as root, or allow them (sysctl kernel.unprivileged_userns_clone=1, or kernel.apparmor_restrict_unprivileged_userns=0); `upstream doctor` shows what this host supports",
        )
    } else if message.contains("mount overlay") {
        Some(
            "the sandbox's writable layer must be on a filesystem overlayfs accepts as upper layer (ext4, xfs, btrfs, tmpfs; not overlayfs itself, as inside a container): set UPSTREAM_RUNTIME_DIR to a directory on one",
        )
    } else {
        Some("`upstream doctor` shows what this host supports")
    };
    SandboxError::setup(message, hint)
}

/// Writes the uid and gid maps of the init's user namespace: the sandbox's id range (as root),
/// or sandbox root as this user (rootless: the only map an unprivileged user may write, and
/// only with setgroups denied).
fn write_id_maps(pid: u32, map: IdMap) -> io::Result<()> {
    let (uid_map, gid_map) = match map {
        IdMap::Range { base, count } => {
            let line = format!("0 {base} {count}\n");
            (line.clone(), line)
        }
        IdMap::Own => {
            fs::write(format!("/proc/{pid}/setgroups"), "deny")?;
            (
                format!("0 {} 1\n", Uid::effective()),
                format!("0 {} 1\n", nix::unistd::Gid::effective()),
            )
        }
    };
    fs::write(format!("/proc/{pid}/uid_map"), uid_map)?;
    fs::write(format!("/proc/{pid}/gid_map"), gid_map)
}

/// The sandbox's directory on the host.
#[derive(Debug)]
struct SandboxDir {
    path: PathBuf,
    /// Where the sandbox's files are (`root`, `upper`, `work`, `layers`): `path` itself, or
    /// its `data/` on a disk of its own ([`disk`]).
    data: PathBuf,
    /// Taken from the pool: overlayfs's work directory from its last use is still there.
    reused: bool,
    /// The files are on a disk of their own.
    disk: Option<disk::DiskDir>,
}

/// The versioned name of the pool directory: a change to what a pooled directory may hold
/// gets a new name, so that another version of upstream never takes one it cannot use.
const POOL_DIR: &str = "pool-3";

/// How many sandbox directories are kept for reuse.
const POOL_SIZE: usize = 4;

impl SandboxDir {
    /// The directory at `path`, its files in it.
    fn at(path: PathBuf) -> SandboxDir {
        SandboxDir {
            data: path.clone(),
            path,
            reused: false,
            disk: None,
        }
    }

    /// A directory for a new sandbox at `path`: one from `pool` if there is one (a rename
    /// instead of creating four directories), else a fresh one.
    fn claim(path: &Path, pool: &Path) -> Result<SandboxDir, SandboxError> {
        for slot in 0..POOL_SIZE {
            if fs::rename(pool.join(format!("slot-{slot}")), path).is_ok() {
                return Ok(SandboxDir {
                    reused: true,
                    ..SandboxDir::at(path.to_path_buf())
                });
            }
        }
        SandboxDir::fresh(path)
    }

    fn fresh(path: &Path) -> Result<SandboxDir, SandboxError> {
        let fail = |e: io::Error| {
            SandboxError::setup(format!("cannot create {}: {e}", path.display()), None)
        };
        fs::DirBuilder::new()
            .mode(0o755)
            .create(path)
            .map_err(fail)?;
        let dir = SandboxDir::at(path.to_path_buf());
        for sub in ["root", "upper", "work"] {
            let p = path.join(sub);
            // Upstream's user's: sandbox root's (see `idmap`).
            fs::DirBuilder::new().mode(0o755).create(&p).map_err(fail)?;
        }
        Ok(dir)
    }

    /// Makes a reused directory mountable: removes the work directory overlayfs left in it,
    /// with the marker a volatile overlay leaves to stop it being mounted again. This is
    /// done while the init creates its namespaces, so that neither the end of the last
    /// sandbox nor the overlay mount of this one waits for it. A directory that cannot be
    /// cleaned is replaced by a fresh one.
    fn prepare(&mut self) -> Result<(), SandboxError> {
        if !self.reused {
            return Ok(());
        }
        let work = self.path.join("work/work");
        if sandboxfs::remove_all(&work).is_ok() {
            return Ok(());
        }
        let _ = self.remove();
        *self = SandboxDir::fresh(&self.path)?;
        Ok(())
    }

    /// Done with the directory: keep it for the next sandbox if the sandbox wrote nothing
    /// (its layer and mount point are empty), else remove it.
    fn release(self, pool: &Path) -> io::Result<()> {
        if self.disk.is_some() {
            return self.remove();
        }
        let empty = |sub: &str| {
            fs::read_dir(self.path.join(sub)).is_ok_and(|mut entries| entries.next().is_none())
        };
        if empty("upper") && empty("root") {
            for slot in 0..POOL_SIZE {
                let taken = nix::fcntl::renameat2(
                    nix::fcntl::AT_FDCWD,
                    &self.path,
                    nix::fcntl::AT_FDCWD,
                    &pool.join(format!("slot-{slot}")),
                    nix::fcntl::RenameFlags::RENAME_NOREPLACE,
                );
                if taken.is_ok() {
                    return Ok(());
                }
            }
        }
        self.remove()
    }

    /// Removes the directory, without recursion however deep a sandbox nested what it left
    /// and opening up directories it made unreadable (overlayfs's work directory is one).
    fn remove(&self) -> io::Result<()> {
        // A disk of its own goes first (a stale one may still be mounted): what is on it
        // goes with it, and the directory it was mounted on is empty.
        let data = self.path.join(disk::DATA);
        if disk::is_mounted(&data) {
            disk::discard(&data, &self.path.join(disk::IMAGE));
        }
        sandboxfs::remove_all(&self.path)
    }
}

/// Removes a workspace kept for resuming (`Sandbox::destroy_keeping`), whatever modes the
/// sandbox left on what is inside. Only directories under a `kept` directory are touched.
fn discard_kept_dir(kept: &Path) {
    if kept.parent().and_then(Path::file_name) != Some(std::ffi::OsStr::new("kept")) {
        return;
    }
    let _ = sandboxfs::remove_all(kept);
}

#[derive(Debug)]
struct NsInterrupter {
    pid: i32,
    interrupted: AtomicBool,
}

impl Interrupter for NsInterrupter {
    fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
        if self.pid > 0 {
            // Stage 1 dies; the kernel then kills stage 2 (parent-death signal) and, with the
            // pid namespace's init gone, every process in the sandbox.
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }
}

/// A session of a namespace sandbox: a connection to a helper of its agent.
struct NamespaceSession {
    client: AgentClient<UnixStream>,
    oom: cgroup::OomCounter,
    disk: disk::DiskWatch,
    interrupter: Arc<NsInterrupter>,
}

impl Session for NamespaceSession {
    fn exec(
        &mut self,
        request: &ExecRequest,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, SandboxError> {
        let oom_before = self.oom.kills();
        let exited = self.client.exec(request, on_output).map_err(|e| {
            if self.interrupter.interrupted.load(Ordering::SeqCst) {
                SandboxError::Interrupted
            } else if self.oom.kills() > oom_before {
                SandboxError::OutOfMemory
            } else {
                SandboxError::Agent(e)
            }
        })?;
        Ok(ExecOutcome {
            status: exited.status,
            timed_out: exited.timed_out,
            out_of_memory: self.oom.kills() > oom_before,
            out_of_disk: self.disk.out_of_disk(exited.status),
            duration: exited.duration,
            collected: exited.collected,
        })
    }
}

/// Makes the sandbox's init, which is its agent, the process the kernel kills last for want
/// of memory. The commands the agent starts raise their OOM score to the highest (see the
/// agent's spawn), so the kernel always picks a command while one is left. Where upstream
/// holds `CAP_SYS_RESOURCE` (root, unless a container runtime took it away) the agent's
/// score goes lower still, to [`AGENT_OOM_SCORE`]. Every process the agent forks to serve
/// a connection inherits its score.
fn protect_agent(pid: u32) {
    // Lowering a score needs the capability: without it the agent keeps upstream's own
    // score, below every command's, as above.
    let _ = fs::write(format!("/proc/{pid}/oom_score_adj"), AGENT_OOM_SCORE);
}

/// The agent's OOM score where upstream may lower it: one above the lowest. At the lowest
/// (-1000) the kernel never kills a process; children inherit how low they may go, so a
/// step could then make itself unkillable too, and a sandbox whose every process is
/// unkillable stalls at its memory limit instead of losing a process.
const AGENT_OOM_SCORE: &str = "-999";

/// A running namespace sandbox.
pub struct NamespaceSandbox {
    info: SandboxInfo,
    child: Option<launch::InitProcess>,
    /// The sandbox's host ids (as root), held until its processes are gone.
    id_range: Option<ids::IdRange>,
    stderr: Option<OwnedFd>,
    client: Option<AgentClient<UnixStream>>,
    cgroups: Cgroups,
    dir: Option<SandboxDir>,
    pool: PathBuf,
    interrupter: Arc<NsInterrupter>,
    /// When making the sandbox began, for its setup time.
    started: Instant,
    rootless: bool,
    /// The workspace's layers, when it is layered.
    layers: Option<layers::Layers>,
    /// Where kept layers go: `<runtime>/kept`.
    kept: PathBuf,
    files: FilesWay,
}

impl NamespaceSandbox {
    fn client(&mut self) -> Result<&mut AgentClient<UnixStream>, SandboxError> {
        if self.interrupter.interrupted.load(Ordering::SeqCst) {
            return Err(SandboxError::Interrupted);
        }
        self.client
            .as_mut()
            .ok_or(SandboxError::Agent(ClientError::Gone))
    }

    /// What went wrong, in the user's terms: an agent that failed or vanished before saying it
    /// was ready means the sandbox could not be set up.
    fn map_error(&mut self, e: ClientError) -> SandboxError {
        if self.interrupter.interrupted.load(Ordering::SeqCst) {
            return SandboxError::Interrupted;
        }
        let ready = self.client.as_ref().is_some_and(|c| c.ready_at().is_some());
        match e {
            ClientError::SetupFailed(message) => setup_error(message, self.rootless),
            e if !ready => {
                let detail = self.init_stderr();
                let message = if detail.is_empty() {
                    e.to_string()
                } else {
                    format!("{e}: {detail}")
                };
                setup_error(message, self.rootless)
            }
            e => SandboxError::Agent(e),
        }
    }

    /// Records how long setup took, once the agent has said it is ready.
    fn note_ready(&mut self) {
        if let Some(at) = self.client.as_ref().and_then(AgentClient::ready_at) {
            if self.info.setup.is_zero() {
                self.info.setup = at.duration_since(self.started);
            }
        }
    }

    /// Whatever the init wrote to stderr, for setup errors.
    fn init_stderr(&mut self) -> String {
        let Some(fd) = self.stderr.take() else {
            return String::new();
        };
        if let Some(child) = self.child.as_mut() {
            child.kill();
            child.wait();
        }
        let mut text = String::new();
        let _ = fs::File::from(fd).take(4096).read_to_string(&mut text);
        text.trim().to_string()
    }

    fn teardown(&mut self) -> io::Result<()> {
        self.teardown_keeping(Ending::Discard).map(|_| ())
    }

    /// Ends the sandbox, doing with its layered workspace what `ending` says; returns where
    /// it was kept.
    fn teardown_keeping(&mut self, ending: Ending) -> io::Result<Option<PathBuf>> {
        let agent_was_up = self.client.as_ref().is_some_and(|c| c.ready_at().is_some());
        if let Some(mut child) = self.child.take() {
            if child.cloned {
                // The init is pid 1 of the sandbox and our child: when it dies the kernel
                // kills everything else in the sandbox before its exit completes, so
                // reaping it means the sandbox is gone.
                child.kill();
            } else if let Some(mut client) = self.client.take() {
                // A re-executed init's pid 1 is not our child: the agent kills everything
                // and exits, and stage 1 exits after it.
                if !self.interrupter.interrupted.load(Ordering::SeqCst) {
                    let _ = client.request_shutdown();
                }
            }
            // An init that never became an agent may be waiting for its configuration.
            if !agent_was_up || !child.exits_within(Duration::from_secs(2)) {
                child.kill();
            }
            child.wait();
        }
        self.id_range = None;
        self.client = None;
        self.stderr = None;
        let cgroups = self.cgroups.destroy();
        let mut kept = None;
        let mut layers_result = Ok(());
        let on_disk = self.dir.as_ref().is_some_and(|d| d.disk.is_some());
        if let (true, Some(dir)) = (on_disk, self.dir.as_ref()) {
            match disk::end(dir, self.layers.take(), ending, &self.kept) {
                Ok(k) => kept = k,
                Err(e) => layers_result = Err(e),
            }
        } else if let (Some(layers), Some(dir)) = (self.layers.take(), self.dir.as_ref()) {
            match ending {
                Ending::Keep => {
                    let name = dir.path.file_name().unwrap_or_default();
                    let target = self.kept.join(name);
                    layers_result = fs::create_dir_all(&self.kept)
                        .and_then(|()| layers.keep(&dir.path, &target));
                    if layers_result.is_ok() {
                        kept = Some(target);
                    }
                }
                Ending::Discard => layers.forget_resume(&dir.path),
                Ending::Return => layers::return_resumed(&dir.path),
            }
            layers.remove(&dir.path);
        }
        let dir = match self.dir.take() {
            Some(dir) => dir.release(&self.pool),
            None => Ok(()),
        };
        cgroups.and(layers_result).and(dir).map(|()| kept)
    }

    /// The host pid of the sandbox's pid 1.
    fn pid1(&self) -> Result<i32, String> {
        let child = self.child.as_ref().ok_or("it has ended")?;
        if child.cloned {
            return Ok(child.id() as i32);
        }
        // A re-executed init (stage 1) has pid 1 as its only child.
        let path = format!("/proc/{0}/task/{0}/children", child.id());
        let children = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| "its pid 1 is not running".into())
    }
}

impl Sandbox for NamespaceSandbox {
    fn info(&self) -> &SandboxInfo {
        &self.info
    }

    fn exec(
        &mut self,
        request: &ExecRequest,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, SandboxError> {
        let oom_before = self.cgroups.oom_kills();
        let result = self.client()?.exec(request, on_output);
        self.note_ready();
        let exited = result.map_err(|e| match self.map_error(e) {
            SandboxError::Agent(_) if self.cgroups.oom_kills() > oom_before => {
                SandboxError::OutOfMemory
            }
            e => e,
        })?;
        let out_of_memory = self.cgroups.oom_kills() > oom_before;
        Ok(ExecOutcome {
            status: exited.status,
            timed_out: exited.timed_out,
            out_of_memory,
            out_of_disk: disk::DiskWatch::of(self.dir.as_ref()).out_of_disk(exited.status),
            duration: exited.duration,
            collected: exited.collected,
        })
    }

    fn spawn(
        &mut self,
        request: &ExecRequest,
        stdout: &str,
        stderr: &str,
    ) -> Result<i32, SandboxError> {
        let result = self.client()?.spawn(request, stdout, stderr);
        self.note_ready();
        result.map_err(|e| self.map_error(e))
    }

    fn wait(
        &mut self,
        pid: i32,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitStatus>, SandboxError> {
        let result = self.client()?.wait(pid, timeout);
        self.note_ready();
        result.map_err(|e| self.map_error(e))
    }

    fn signal(&mut self, pid: i32, signal: i32) -> Result<(), SandboxError> {
        let result = self.client()?.signal(pid, signal);
        self.note_ready();
        result.map_err(|e| self.map_error(e))
    }

    fn stop_processes(&mut self) -> Result<(), SandboxError> {
        let result = self.client()?.stop_processes();
        self.note_ready();
        result.map_err(|e| self.map_error(e))
    }

    fn session(&mut self) -> Result<Box<dyn Session>, SandboxError> {
        let result = self.client()?.connect();
        self.note_ready();
        let client = result.map_err(|e| self.map_error(e))?;
        Ok(Box::new(NamespaceSession {
            client,
            oom: self.cgroups.oom_counter(),
            disk: disk::DiskWatch::of(self.dir.as_ref()),
            interrupter: self.interrupter.clone(),
        }))
    }

    fn read_file(&mut self, path: &str, limit: u64) -> Result<Vec<u8>, SandboxError> {
        let result = self.client()?.read_file(path, limit);
        self.note_ready();
        result.map_err(|e| self.map_error(e))
    }

    fn write_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), SandboxError> {
        let result = self.client()?.write_file(path, data, mode);
        self.note_ready();
        result.map_err(|e| self.map_error(e))
    }

    fn wait_ready(&mut self) -> Result<(), SandboxError> {
        let result = self.client()?.wait_ready();
        self.note_ready();
        result.map_err(|e| self.map_error(e))
    }

    fn files(&mut self) -> Result<Arc<dyn Files>, SandboxError> {
        let fail =
            |e: String| SandboxError::setup(format!("cannot reach the sandbox's files: {e}"), None);
        if self.child.is_none() {
            return Err(fail("it has ended".into()));
        }
        if self.files == FilesWay::Agent {
            let mut connections = Vec::new();
            for _ in 0..FILE_CONNECTIONS {
                let result = self.client()?.connect();
                self.note_ready();
                connections.push(result.map_err(|e| self.map_error(e))?);
            }
            return Ok(Arc::new(AgentFiles::new(connections)));
        }
        // Before the agent is ready, pid 1 may not have its own root yet: its /proc root
        // would be the host's.
        if self.client.as_ref().is_none_or(|c| c.ready_at().is_none()) {
            return Err(fail("it is not ready yet".into()));
        }
        let pid1 = self.pid1().map_err(fail)?;
        let path = format!("/proc/{pid1}/root");
        let dir = open_path_dir(&path).map_err(|e| fail(format!("{path}: {e}")))?;
        let base = match &self.id_range {
            Some(range) => (range.base, range.base),
            None => (
                Uid::effective().as_raw(),
                nix::unistd::Gid::effective().as_raw(),
            ),
        };
        let table = format!("/proc/{pid1}/mountinfo");
        let own = sandboxfs::OwnMounts::read(Path::new(&table))
            .map_err(|e| fail(format!("{table}: {e}")))?;
        Ok(Arc::new(Tree::new(dir, own, base)))
    }

    fn interrupter(&self) -> Arc<dyn Interrupter> {
        self.interrupter.clone()
    }

    fn destroy(mut self: Box<Self>) -> Result<(), SandboxError> {
        self.teardown().map_err(|e| {
            SandboxError::setup(
                format!("could not remove everything the sandbox left: {e}"),
                None,
            )
        })
    }

    fn checkpoint(&mut self) -> Result<(), SandboxError> {
        let Some(layers) = self.layers.as_ref() else {
            return Ok(());
        };
        if layers.broken.is_some() {
            return Ok(());
        }
        let pid1 = self
            .pid1()
            .map_err(|e| SandboxError::setup(format!("cannot layer the workspace: {e}"), None))?;
        let layers = self.layers.as_mut().expect("checked above");
        layers.checkpoint(pid1).map(|_| ()).map_err(|e| {
            if e.kind() == io::ErrorKind::BrokenPipe {
                return SandboxError::Workspace(format!(
                    "the workspace could not be put back after stacking a layer on it: {e}"
                ));
            }
            SandboxError::setup(
                format!("cannot stack a new layer on the workspace: {e}"),
                Some("the turn goes on in the layer it has, so `--resume` would see what a failed step wrote"),
            )
        })
    }

    fn destroy_keeping(mut self: Box<Self>) -> Result<Kept, SandboxError> {
        if self.layers.is_none() {
            self.teardown().ok();
            return Err(SandboxError::setup(
                "this sandbox has no layered workspace to keep",
                None,
            ));
        }
        match self.teardown_keeping(Ending::Keep) {
            Ok(Some(kept)) => kept
                .file_name()
                .and_then(|n| Kept::new(BACKEND_NAME, n.to_str()?))
                .ok_or_else(|| {
                    SandboxError::setup(
                        format!(
                            "the workspace was kept at {}, which has no name to give it",
                            kept.display()
                        ),
                        None,
                    )
                }),
            Ok(None) => Err(SandboxError::setup("the workspace was not kept", None)),
            Err(e) => Err(SandboxError::setup(
                format!("could not keep the sandbox's workspace: {e}"),
                None,
            )),
        }
    }
}

impl Drop for NamespaceSandbox {
    fn drop(&mut self) {
        // Dropped without a decision (an error or a panic mid-turn): a resumed workspace
        // goes back where it came from, to be resumed again.
        let _ = self.teardown_keeping(Ending::Return);
    }
}

/// What becomes of a layered workspace when its sandbox ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Thrown away, with any kept set it was resumed from.
    Discard,
    /// Kept for resuming (`destroy_keeping`).
    Keep,
    /// A kept set it was resumed from goes back; the rest is thrown away.
    Return,
}

//! The microVM backend: each sandbox is a virtual machine with its own Linux kernel, so code
//! in it shares nothing with the host's kernel but a few virtio devices.
//!
//! A sandbox's VM boots the guest kernel ([`boot::Kernel`]) with an initramfs whose init is
//! this same upstream binary ([`guest`]); its root is the image as a read-only disk made
//! once per image ([`disk`]) under an overlay on a disk of the sandbox's own, thrown away
//! with it, which also holds the workspace. The host speaks the agent protocol to the
//! guest's agent over virtio-serial ports ([`qemu`]): one for the agent's first connection,
//! one per session, so no descriptor ever crosses into the guest; files move through the
//! agent ([`upstream_sandbox::AgentFiles`]), since the host cannot reach the guest's.

pub mod boot;
pub mod confine;
pub mod console;
pub mod disk;
pub mod guest;
pub mod network;
pub mod qemu;
pub mod qmp;

use std::collections::HashMap;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use upstream_sandbox::{
    AgentClient, AgentFiles, Backend, ClientError, ExecOutcome, ExecRequest, ExitStatus, Files,
    Image, Interrupter, Kept, Sandbox, SandboxError, SandboxInfo, SandboxSpec, Session, Stream,
};

use crate::boot::Kernel;
use crate::confine::Confinement;
use crate::qemu::{Accel, Machine};

/// This backend's name, in what it names.
pub const BACKEND_NAME: &str = "vm";

/// Guest RAM when the document names no memory limit.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// What a guest has beyond the sandbox's memory limit, for its kernel, its page cache and
/// the agent (the limit itself is held by the guest's cgroup, so the commands get exactly
/// it and the guest lives through their running out).
pub const GUEST_OVERHEAD: u64 = 192 << 20;

/// How many users a guest has, from 0: all of a Linux system's.
const GUEST_IDS: u32 = 65_536;

/// How many connections of their own the sandbox's files get.
const FILE_CONNECTIONS: usize = 2;

/// How to run VMs on this host.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The upstream binary the guest's init is made from.
    pub init_exe: PathBuf,
    pub qemu: PathBuf,
    pub kernel: Kernel,
    pub accel: Accel,
    /// Where sandboxes' directories go.
    pub runtime: PathBuf,
    /// Where the initramfs and the images' disks are kept between sandboxes.
    pub cache: PathBuf,
}

impl VmConfig {
    /// The configuration from this host and its environment: QEMU from `$UPSTREAM_QEMU` or
    /// the `PATH`, the kernel from [`Kernel::find`], the accelerator from
    /// [`Accel::from_env`], disks kept in `$UPSTREAM_VM_CACHE` or the runtime directory.
    pub fn from_env(init_exe: PathBuf, kernel: Option<&Path>) -> Result<VmConfig, SandboxError> {
        VmConfig::in_runtime_dir(init_exe, kernel, None)
    }

    /// [`VmConfig::from_env`] with sandboxes in runtime directory `runtime` (`None`: the
    /// environment's).
    pub fn in_runtime_dir(
        init_exe: PathBuf,
        kernel: Option<&Path>,
        runtime: Option<&Path>,
    ) -> Result<VmConfig, SandboxError> {
        let runtime = upstream_sandbox::runtime::runtime_dir_in(runtime, &["vm"]).map_err(|e| {
            let hint = e.hint();
            SandboxError::setup(e.to_string(), Some(hint.as_str()))
        })?;
        let runtime = runtime.join("vm");
        let cache = std::env::var_os("UPSTREAM_VM_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| runtime.join("cache"));
        let qemu = match std::env::var_os("UPSTREAM_QEMU") {
            Some(path) => PathBuf::from(path),
            None => find_program("qemu-system-x86_64").ok_or_else(|| {
                SandboxError::setup(
                    "QEMU is not installed: `isolation: vm` runs sandboxes in qemu-system-x86_64",
                    Some("install Debian's qemu-system-x86 (scripts/test does), or set $UPSTREAM_QEMU"),
                )
            })?,
        };
        let kernel = Kernel::find(kernel).map_err(|e| SandboxError::setup(e.to_string(), None))?;
        // The binary itself, not /proc/self/exe, which names whoever reads it.
        let init_exe = std::fs::canonicalize(&init_exe).unwrap_or(init_exe);
        Ok(VmConfig {
            init_exe,
            qemu,
            kernel,
            accel: Accel::from_env(),
            runtime,
            cache,
        })
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The VM backend.
#[derive(Debug)]
pub struct VmBackend {
    config: VmConfig,
    /// Made on first use, then kept.
    initramfs: Mutex<Option<PathBuf>>,
    /// Snapshots of machines ready to run, by shape ([`Backend::prepare`]).
    templates: Mutex<HashMap<Shape, Arc<Template>>>,
    /// Held while a snapshot is taken.
    snapshotting: Mutex<()>,
    /// What confining VMMs takes of the host, read on first use.
    host: std::sync::OnceLock<confine::Host>,
}

impl VmBackend {
    pub fn new(config: VmConfig) -> VmBackend {
        VmBackend {
            config,
            initramfs: Mutex::new(None),
            templates: Mutex::new(HashMap::new()),
            snapshotting: Mutex::new(()),
            host: std::sync::OnceLock::new(),
        }
    }

    /// What confining VMMs takes of the host; the first call also removes what VMs of an
    /// upstream that is gone left behind (their cgroups, killing what runs there, and
    /// their directories).
    fn host(&self) -> &confine::Host {
        self.host.get_or_init(|| {
            self.remove_stale_dirs();
            confine::Host::new()
        })
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    fn initramfs(&self) -> Result<PathBuf, SandboxError> {
        let mut made = self.initramfs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = made.as_ref() {
            return Ok(path.clone());
        }
        let path = boot::initramfs(
            &self.config.cache,
            &self.config.init_exe,
            &self.config.kernel,
        )
        .map_err(|e| SandboxError::setup(e.to_string(), None))?;
        *made = Some(path.clone());
        Ok(path)
    }

    /// The machine a sandbox of `spec` runs on, checking first that a VM can be it.
    fn shape(&self, spec: &SandboxSpec) -> Result<Shape, SandboxError> {
        let initramfs = self.initramfs()?;
        let root_disk = match &spec.image {
            Image::Layers { layers, reference } => {
                let [rootfs] = layers.as_slice() else {
                    return Err(SandboxError::Image {
                        image: reference.clone(),
                        reason: format!(
                            "a VM takes an image as one unpacked root, not {} layers",
                            layers.len()
                        ),
                    });
                };
                disk::root_disk(&self.config.cache.join("roots"), rootfs).map_err(|e| {
                    SandboxError::Image {
                        image: reference.clone(),
                        reason: e.to_string(),
                    }
                })?
            }
            Image::Host => {
                return Err(SandboxError::Image {
                    image: "host".into(),
                    reason: "a VM sandbox runs an OCI image: name one (`image: debian:12`)".into(),
                });
            }
        };
        let memory = match spec.limits.memory {
            Some(limit) => limit.saturating_add(GUEST_OVERHEAD),
            None => DEFAULT_MEMORY,
        };
        Ok(Shape {
            initramfs,
            root_disk,
            memory_mib: memory.div_ceil(1 << 20).max(256),
            cpus: spec.limits.cpus.map_or(1, |c| c.ceil().max(1.0) as u32),
            cpu_millis: spec.limits.cpus.map(|c| (c * 1000.0).round() as u64),
            memory_limit: spec.limits.memory,
            pids_limit: spec.limits.pids,
            disk: spec.limits.disk_or_default(),
            host_network: spec.network == upstream_sandbox::NetworkMode::Host,
        })
    }

    /// Starts the machine of `shape` in `dir` (the sandbox's: removed with it, where its disk
    /// `scratch.ext4` is made already), its VMM confined, and returns the sandbox with no
    /// agent connection yet, the listener of the agent's port, and that of QMP's and the
    /// snapshot's state as the VMM reaches it where the machine has a monitor.
    fn start(
        &self,
        shape: &Shape,
        hostname: &str,
        network: network::Network,
        dir: PathBuf,
        ram: Ram,
        started: Instant,
    ) -> Result<Booting, SandboxError> {
        let failed = |dir: &Path, e: String, hint: Option<&str>| {
            let _ = std::fs::remove_dir_all(dir);
            SandboxError::setup(e, hint)
        };
        let scratch = dir.join("scratch.ext4");
        if matches!(ram, Ram::Snapshotted) {
            // What the VMM writes is made for it first: its RAM, and its state once saved.
            for name in [TEMPLATE_MEMORY, TEMPLATE_STATE] {
                if let Err(e) = std::fs::File::create(dir.join(name)) {
                    return Err(failed(
                        &dir,
                        format!("cannot make the snapshot's files: {e}"),
                        None,
                    ));
                }
            }
        }
        let limits = confine::VmmLimits::for_guest(
            shape.memory_mib << 20,
            confine::qemu_overhead(self.config.accel),
            shape.cpus,
            shape.cpu_millis.map(|m| m as f64 / 1000.0),
        );
        let confined = self.host().confine(&dir, &limits).and_then(|c| {
            confine::Reached::of(
                c,
                &self.config,
                &shape.initramfs,
                &shape.root_disk,
                &scratch,
            )
        });
        let mut reached = confined.map_err(|e| failed(&dir, e.to_string(), e.hint()))?;
        let (memory_path, state) = match ram {
            Ram::Anonymous => (None, None),
            Ram::Snapshotted => (Some(reached.dir.join(TEMPLATE_MEMORY)), None),
            Ram::RestoredFrom(template) => {
                let reach = |c: &mut Confinement, path: &Path| c.reach(path);
                let memory = reach(&mut reached.confinement, &template.memory())
                    .and_then(|m| Ok((m, reach(&mut reached.confinement, &template.state())?)));
                let (memory, state) = memory.map_err(|e| failed(&dir, e.to_string(), e.hint()))?;
                (Some(memory), Some(state))
            }
        };
        let memory = match (&ram, &memory_path) {
            (Ram::Snapshotted, Some(path)) => qemu::Memory::SharedFile(path),
            (Ram::RestoredFrom(_), Some(path)) => qemu::Memory::PrivateFile(path),
            _ => qemu::Memory::Anonymous,
        };
        let machine = Machine {
            qemu: &self.config.qemu,
            accel: self.config.accel,
            kernel: &reached.kernel,
            initramfs: &reached.initramfs,
            root_disk: &reached.root_disk,
            scratch_disk: &reached.scratch_disk,
            memory_mib: shape.memory_mib,
            cpus: shape.cpus,
            memory_limit: shape.memory_limit,
            pids_limit: shape.pids_limit,
            hostname,
            network,
            dir: &reached.dir,
            incoming: matches!(memory, qemu::Memory::PrivateFile(_)),
            memory,
        };
        let vm = machine
            .start_confined(&[], Some(&reached.confinement))
            .map_err(|e| {
                failed(
                    &dir,
                    format!("cannot start {}: {e}", self.config.qemu.display()),
                    None,
                )
            })?;
        let mut ports = vm.ports;
        let agent = ports.remove(0);
        let interrupter = Arc::new(VmInterrupter {
            pid: vm.child.id() as i32,
            interrupted: AtomicBool::new(false),
        });
        let sandbox = VmSandbox {
            info: SandboxInfo {
                backend: format!("vm (qemu, {})", self.config.accel.name()),
                setup: Duration::ZERO,
                unenforced: reached.confinement.unenforced().to_vec(),
                ids: GUEST_IDS,
            },
            dir,
            disk_limit: shape.disk,
            child: Some(vm.child),
            console: vm.console,
            confinement: Some(reached.confinement),
            client: None,
            ports: Arc::new(Ports {
                listeners: ports,
                free: Mutex::new((1..=qemu::SESSION_PORTS).collect()),
            }),
            interrupter,
            started,
            oom_kills: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            layered: false,
            resumed_from: None,
            kept_root: PathBuf::new(),
        };
        Ok(Booting {
            sandbox,
            agent,
            qmp: vm.qmp,
            state,
        })
    }

    fn create_vm(&self, spec: &SandboxSpec) -> Result<VmSandbox, SandboxError> {
        let started = Instant::now();
        let resume = spec.workspace.as_ref().and_then(|w| w.resume.as_ref());
        let resumed_from = match resume {
            Some(kept) => Some(self.kept_path(kept).filter(|p| p.is_dir()).ok_or_else(|| {
                SandboxError::setup(
                    format!(
                        "nothing is kept as `{kept}` to resume: a VM sandbox resumes only what a \
                         VM sandbox kept"
                    ),
                    Some("run the turn again without --resume"),
                )
            })?),
            None => None,
        };
        let shape = self.shape(spec)?;
        let template = match resumed_from {
            Some(_) => None,
            None => self.template_of(&shape),
        };
        let layered = spec.workspace.is_some();
        let mut sandbox = match template {
            Some(template) => {
                let mut sandbox = self.restore(&template, started)?;
                if layered {
                    sandbox.first_checkpoint(&template.scratch())?;
                }
                sandbox.renew(&spec.hostname)?;
                sandbox
            }
            None => {
                let dir = make_sandbox_dir(&self.config.runtime.join("sandboxes"))?;
                let scratch = dir.join("scratch.ext4");
                let made = match &resumed_from {
                    Some(kept) => disk::sparse_copy(&kept.join(KEPT_DISK), &scratch),
                    None => disk::scratch_disk_from(
                        &self.config.cache.join("disks"),
                        &scratch,
                        shape.disk,
                    ),
                };
                // What a sandbox that keeps its workspace starts from is its first checkpoint.
                let made = made.and_then(|()| match layered {
                    true => disk::sparse_copy(&scratch, &dir.join(CHECKPOINT)),
                    false => Ok(()),
                });
                if let Err(e) = made {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(SandboxError::setup(
                        format!("cannot make the sandbox's disk: {e}"),
                        None,
                    ));
                }
                let network = network::Network::of(spec.network);
                let booting = self.start(
                    &shape,
                    &spec.hostname,
                    network,
                    dir,
                    Ram::Anonymous,
                    started,
                )?;
                let mut sandbox = booting.sandbox;
                let stream = sandbox.accept(&booting.agent)?;
                sandbox.client = Some(AgentClient::new(stream));
                sandbox
            }
        };
        sandbox.layered = layered;
        sandbox.resumed_from = resumed_from;
        sandbox.kept_root = self.kept_root();
        Ok(sandbox)
    }

    /// Where kept sandbox disks go: `<id>/scratch.ext4`, with its label beside it.
    fn kept_root(&self) -> PathBuf {
        self.config.runtime.join("kept")
    }

    /// Where the set kept as `kept` is; `None` for another backend's.
    fn kept_path(&self, kept: &Kept) -> Option<PathBuf> {
        (kept.backend() == BACKEND_NAME).then(|| self.kept_root().join(kept.id()))
    }

    /// Boots a machine of `shape` and snapshots it once its agent is ready: its RAM in a
    /// file QEMU maps shared, its devices' state written beside it, its disk kept.
    fn snapshot(&self, shape: &Shape) -> Result<Template, SandboxError> {
        let failed = |e: io::Error| {
            SandboxError::setup(format!("cannot snapshot the sandbox's VM: {e}"), None)
        };
        let template = Template {
            dir: make_sandbox_dir(&self.config.runtime.join("templates"))?,
            shape: shape.clone(),
            network: match shape.host_network {
                true => network::Network::of(upstream_sandbox::NetworkMode::Host),
                false => network::Network::None,
            },
        };
        let dir = make_sandbox_dir(&self.config.runtime.join("sandboxes"))?;
        if let Err(e) = disk::scratch_disk_from(
            &self.config.cache.join("disks"),
            &dir.join("scratch.ext4"),
            shape.disk,
        ) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(failed(e));
        }
        let booting = self.start(
            shape,
            upstream_sandbox::DEFAULT_HOSTNAME,
            template.network,
            dir.clone(),
            Ram::Snapshotted,
            Instant::now(),
        )?;
        let mut vm = booting.sandbox;
        let stream = vm.accept(&booting.agent)?;
        vm.client = Some(AgentClient::new(stream));
        vm.wait_ready()?;
        // Its generator reseeded last thing, so that every VM restored from it wakes with the
        // same fresh seed, which its own renewal replaces before it runs anything (the kernel
        // would otherwise reseed on its own at a moment the snapshot's age decides).
        vm.renew(upstream_sandbox::DEFAULT_HOSTNAME)?;
        let qmp = booting
            .qmp
            .ok_or_else(|| failed(io::Error::other("the machine has no monitor")))?;
        let monitor = vm.accept(&qmp)?;
        // Where the VMM reaches its directory.
        let state = match &vm.confinement {
            Some(confinement) => confinement.dir().join(TEMPLATE_STATE),
            None => vm.dir.join(TEMPLATE_STATE),
        };
        qmp::Monitor::new(monitor)
            .and_then(|mut monitor| monitor.save(&state))
            .map_err(failed)?;
        // Its disk, RAM and state are the template's: what the guest wrote is in them, and
        // nothing more will be. They become root's, readable (their directory is not).
        vm.stop_vm();
        for (name, to) in [
            ("scratch.ext4", template.scratch()),
            (TEMPLATE_MEMORY, template.memory()),
            (TEMPLATE_STATE, template.state()),
        ] {
            let from = dir.join(name);
            std::os::unix::fs::lchown(&from, Some(0), Some(0))
                .and_then(|()| {
                    std::fs::set_permissions(
                        &from,
                        std::os::unix::fs::PermissionsExt::from_mode(0o644),
                    )
                })
                .or_else(|e| match nix::unistd::Uid::effective().is_root() {
                    true => Err(e),
                    false => Ok(()),
                })
                .and_then(|()| std::fs::rename(&from, &to))
                .map_err(failed)?;
        }
        Box::new(vm).destroy()?;
        Ok(template)
    }

    /// A sandbox restored from `template`, not yet renewed ([`VmSandbox::renew`]): its
    /// random generator, clock and hostname are still the snapshot's.
    fn restore(&self, template: &Template, started: Instant) -> Result<VmSandbox, SandboxError> {
        let failed = |e: io::Error| {
            SandboxError::setup(format!("cannot restore the sandbox's VM: {e}"), None)
        };
        let dir = make_sandbox_dir(&self.config.runtime.join("sandboxes"))?;
        if let Err(e) = disk::sparse_copy(&template.scratch(), &dir.join("scratch.ext4")) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(failed(e));
        }
        let booting = self.start(
            &template.shape,
            upstream_sandbox::DEFAULT_HOSTNAME,
            template.network,
            dir,
            Ram::RestoredFrom(template),
            started,
        )?;
        let mut vm = booting.sandbox;
        let qmp = booting
            .qmp
            .ok_or_else(|| failed(io::Error::other("the machine has no monitor")))?;
        let state = booting
            .state
            .ok_or_else(|| failed(io::Error::other("the snapshot has no state")))?;
        let monitor = vm.accept(&qmp)?;
        let mut monitor = qmp::Monitor::new(monitor).map_err(failed)?;
        // The agent's port is connected before the guest runs: a guest that found its host
        // gone would take it as the end of its connection.
        let stream = vm.accept(&booting.agent)?;
        monitor.load(&state).map_err(|e| {
            let why = vm.exited().unwrap_or_else(|| e.to_string());
            SandboxError::setup(format!("cannot restore the sandbox's VM: {why}"), None)
        })?;
        vm.client = Some(AgentClient::resumed(stream));
        Ok(vm)
    }

    /// The snapshot of `shape`, if one was taken.
    fn template_of(&self, shape: &Shape) -> Option<Arc<Template>> {
        self.templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(shape)
            .cloned()
    }

    /// The snapshot of `shape`, taken now unless one was: later sandboxes of the shape are
    /// restored from it.
    fn template_for(&self, shape: &Shape) -> Result<Arc<Template>, SandboxError> {
        // One snapshot at a time: two of one shape would boot twice for nothing.
        let _one = self.snapshotting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(template) = self.template_of(shape) {
            return Ok(template);
        }
        let template = Arc::new(self.snapshot(shape)?);
        self.templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(shape.clone(), template.clone());
        Ok(template)
    }

    /// Removes the directories of VMs and snapshots whose upstream is gone.
    fn remove_stale_dirs(&self) {
        confine::remove_stale_dirs(&self.config.runtime.join("sandboxes"));
        confine::remove_stale_dirs(&self.config.runtime.join("templates"));
    }
}

#[cfg(feature = "testing")]
impl VmBackend {
    /// A sandbox restored from the snapshot of `spec`'s shape (taken now if there is none)
    /// with nothing renewed: what every restored VM would be without [`VmSandbox::renew`],
    /// for tests that show the renewal is what sets them apart.
    pub fn restore_unrenewed(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>, SandboxError> {
        let template = self.template_for(&self.shape(spec)?)?;
        Ok(Box::new(self.restore(&template, Instant::now())?))
    }
}

/// What a sandbox's machine is made of, but for the sandbox's own disk, directory and name:
/// what a snapshot is taken of, and restored to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Shape {
    initramfs: PathBuf,
    root_disk: PathBuf,
    /// Guest RAM.
    memory_mib: u64,
    /// vCPUs, and the VMM's CPU quota in thousandths of a CPU, if the sandbox has one.
    cpus: u32,
    cpu_millis: Option<u64>,
    /// The sandbox's limits, which the guest's cgroup holds.
    memory_limit: Option<u64>,
    pids_limit: Option<u64>,
    /// The size of its disk.
    disk: u64,
    /// It has the host's network (user-mode NAT).
    host_network: bool,
}

/// A snapshot's RAM and devices' state, by name in its directory.
const TEMPLATE_MEMORY: &str = "memory";
const TEMPLATE_STATE: &str = "state";

/// What a machine's RAM is, for [`VmBackend::start`].
enum Ram<'a> {
    /// QEMU's own memory.
    Anonymous,
    /// A file of the VM's directory, mapped shared, for a snapshot to be taken of it.
    Snapshotted,
    /// A snapshot's RAM, mapped private.
    RestoredFrom(&'a Template),
}

/// A machine just started: the sandbox, its agent's port and, with a monitor, QMP's and
/// the snapshot's state as the VMM reaches it.
struct Booting {
    sandbox: VmSandbox,
    agent: UnixListener,
    qmp: Option<UnixListener>,
    state: Option<PathBuf>,
}

/// A snapshot of a machine whose agent was ready: sandboxes of its shape are restored from it
/// in a fraction of a boot. Removed when dropped; VMs restored from it keep the pages of its
/// RAM file they mapped.
#[derive(Debug)]
struct Template {
    dir: PathBuf,
    shape: Shape,
    /// Its network device, which every VM restored from it has (the guest set it up).
    network: network::Network,
}

impl Template {
    /// The guest's RAM.
    fn memory(&self) -> PathBuf {
        self.dir.join(TEMPLATE_MEMORY)
    }

    /// Its devices' state.
    fn state(&self) -> PathBuf {
        self.dir.join(TEMPLATE_STATE)
    }

    /// Its disk, which each restored sandbox gets a copy of.
    fn scratch(&self) -> PathBuf {
        self.dir.join("scratch.ext4")
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Backend for VmBackend {
    fn name(&self) -> &str {
        BACKEND_NAME
    }

    fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>, SandboxError> {
        Ok(Box::new(self.create_vm(spec)?))
    }

    fn prepare(&self, spec: &SandboxSpec) -> Result<(), SandboxError> {
        self.template_for(&self.shape(spec)?).map(drop)
    }

    fn discard_kept(&self, kept: &Kept) {
        if let Some(path) = self.kept_path(kept) {
            let _ = std::fs::remove_dir_all(path);
        }
    }

    fn kept(&self) -> Vec<Kept> {
        let Ok(entries) = std::fs::read_dir(self.kept_root()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().join(KEPT_DISK).is_file())
            .filter_map(|e| Kept::new(BACKEND_NAME, e.file_name().to_str()?))
            .collect()
    }

    fn label_kept(&self, kept: &Kept, label: &str) -> io::Result<()> {
        let path = self.kept_path(kept).ok_or(io::ErrorKind::NotFound)?;
        if !path.join(KEPT_DISK).is_file() {
            return Err(io::ErrorKind::NotFound.into());
        }
        upstream_sandbox::write_kept_label(&path, label)
    }

    fn kept_label(&self, kept: &Kept) -> Option<(String, std::time::SystemTime)> {
        upstream_sandbox::read_kept_label(&self.kept_path(kept)?)
    }

    fn remove_leftovers(&self) {
        self.remove_stale_dirs();
        self.host().remove_stale();
    }
}

/// A kept set's disk: the sandbox's disk at its last checkpoint.
const KEPT_DISK: &str = "scratch.ext4";

/// A sandbox's disk at its last checkpoint, in its directory, while it runs.
const CHECKPOINT: &str = "checkpoint.ext4";

/// Makes a new directory for a sandbox under `parent`.
fn make_sandbox_dir(parent: &Path) -> Result<PathBuf, SandboxError> {
    std::fs::create_dir_all(parent)
        .map_err(|e| SandboxError::setup(format!("cannot make {}: {e}", parent.display()), None))?;
    for attempt in 0..16u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = parent.join(format!("{}-{nanos:x}-{attempt}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(SandboxError::setup(
                    format!("cannot make {}: {e}", dir.display()),
                    None,
                ));
            }
        }
    }
    Err(SandboxError::setup(
        format!("cannot make a directory under {}", parent.display()),
        None,
    ))
}

/// The session ports of a VM and which are free.
#[derive(Debug)]
struct Ports {
    /// Port `n`'s listener at `n - 1`.
    listeners: Vec<UnixListener>,
    free: Mutex<Vec<usize>>,
}

/// Stops a VM from anywhere: kills its QEMU.
#[derive(Debug)]
struct VmInterrupter {
    pid: i32,
    interrupted: AtomicBool,
}

impl Interrupter for VmInterrupter {
    fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
        // SAFETY: kill(2) is async-signal-safe and touches no memory.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
    }
}

/// A sandbox in a VM.
#[derive(Debug)]
pub struct VmSandbox {
    info: SandboxInfo,
    dir: PathBuf,
    /// The size of the sandbox's disk.
    disk_limit: u64,
    child: Option<Child>,
    /// The end of its guest's console.
    console: console::Console,
    /// Its VMM's confinement: dropped (its cgroups removed) once the VMM is gone.
    confinement: Option<Confinement>,
    client: Option<AgentClient<UnixStream>>,
    ports: Arc<Ports>,
    interrupter: Arc<VmInterrupter>,
    started: Instant,
    /// The guest's count of processes killed for want of memory, at the last command's end.
    oom_kills: Arc<std::sync::atomic::AtomicU64>,
    /// It keeps its workspace for `--resume`: its disk is copied at each checkpoint.
    layered: bool,
    /// The kept set it resumed, let go once it ends (well, or kept anew).
    resumed_from: Option<PathBuf>,
    /// Where its backend keeps sets.
    kept_root: PathBuf,
}

/// How long a VMM that is gone may take to let go of its console: what it wrote is read
/// to its end within it.
const CONSOLE_CLOSED_WITHIN: Duration = Duration::from_secs(2);

/// How long QEMU has to connect a port's socket: a VM that cannot start says so within it.
const CONNECT_WITHIN: Duration = Duration::from_secs(30);

/// How long a guest has from QEMU's start to its agent's first word: a boot under TCG takes
/// seconds, under KVM a fraction of one; one that hangs (a kernel that cannot boot on this
/// host's KVM) fails the sandbox with what its console said.
const BOOT_WITHIN: Duration = Duration::from_secs(90);

impl VmSandbox {
    /// The connection QEMU makes to `listener` once it runs, unless it exits first.
    fn accept(&mut self, listener: &UnixListener) -> Result<UnixStream, SandboxError> {
        listener
            .set_nonblocking(true)
            .map_err(|e| SandboxError::setup(format!("cannot wait for the VM: {e}"), None))?;
        let until = Instant::now() + CONNECT_WITHIN;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| {
                        SandboxError::setup(format!("cannot talk to the VM: {e}"), None)
                    })?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    return Err(SandboxError::setup(
                        format!("cannot wait for the VM: {e}"),
                        None,
                    ));
                }
            }
            if let Some(why) = self.exited() {
                return Err(SandboxError::setup(why, None));
            }
            if Instant::now() >= until {
                return Err(SandboxError::setup(
                    format!(
                        "QEMU did not connect to the sandbox's ports within {} s",
                        CONNECT_WITHIN.as_secs()
                    ),
                    None,
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Why the VM is gone, if it is: QEMU's exit and what it and the guest said last.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().ok()??;
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            use std::io::Read;
            let _ = err.read_to_string(&mut stderr);
        }
        Some(self.death_notice(status, &stderr))
    }

    fn death_notice(&self, status: std::process::ExitStatus, stderr: &str) -> String {
        let console = self.console.tail_once_closed(CONSOLE_CLOSED_WITHIN);
        // What the guest's init said last, else the console's last lines.
        let said: String = console
            .lines()
            .filter(|l| l.contains("upstream: "))
            .map(|l| format!("{l}\n"))
            .collect();
        let last = match said.is_empty() {
            true => last_lines(&console, 6),
            false => last_lines(&said, 3),
        };
        let mut notice = format!("the sandbox's VM stopped (QEMU {status})");
        if let Some(panic) = console.lines().find(|l| l.contains("Kernel panic")) {
            let why = panic
                .split("Kernel panic - not syncing:")
                .nth(1)
                .unwrap_or("")
                .trim();
            notice = format!(
                "the sandbox's VM stopped: its kernel panicked ({})",
                confine::printable(why)
            );
        } else if let Some(limits) = self
            .confinement
            .as_ref()
            .filter(|c| c.out_of_memory())
            .map(|c| *c.limits())
        {
            notice = format!(
                "the sandbox's VM stopped: its VMM ran out of memory (the VMM's limit is {} MiB: the guest's {} MiB of RAM and {} MiB for QEMU itself)",
                limits.memory >> 20,
                limits.guest_memory >> 20,
                (limits.memory - limits.guest_memory) >> 20
            );
        } else if console.contains("Out of memory") {
            notice = format!("the sandbox's VM stopped: it ran out of memory (QEMU {status})");
        }
        let stderr = stderr.trim();
        if !stderr.is_empty() {
            notice.push_str(&format!(
                "; QEMU said: {}",
                confine::printable(stderr.lines().last().unwrap_or(""))
            ));
        }
        if !last.is_empty() {
            notice.push_str(&format!("; its console ended with: {last}"));
        }
        notice
    }

    fn client(&mut self) -> Result<&mut AgentClient<UnixStream>, SandboxError> {
        if self.interrupter.interrupted.load(Ordering::SeqCst) {
            return Err(SandboxError::Interrupted);
        }
        if self.client.as_ref().is_some_and(|c| c.ready_at().is_none()) {
            self.boot()?;
        }
        self.client
            .as_mut()
            .ok_or(SandboxError::Agent(ClientError::Gone))
    }

    /// Waits for the agent's first word, within [`BOOT_WITHIN`] of QEMU's start.
    fn boot(&mut self) -> Result<(), SandboxError> {
        let Some(client) = self.client.as_mut() else {
            return Err(SandboxError::Agent(ClientError::Gone));
        };
        let left = BOOT_WITHIN.saturating_sub(self.started.elapsed());
        let stream = client.stream();
        let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        let result = client.wait_ready();
        let _ = client.stream().set_read_timeout(None);
        self.note_ready();
        match result {
            Ok(()) => Ok(()),
            Err(ClientError::Frame(upstream_agent::protocol::FrameError::Io(e)))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let console = self.console.tail();
                let last = last_lines(&console, 4);
                self.stop_vm();
                Err(SandboxError::setup(
                    format!(
                        "the sandbox's VM did not start within {} s; its console ended with: {}",
                        BOOT_WITHIN.as_secs(),
                        last
                    ),
                    Some("`upstream doctor` boots a VM and says what this host lacks"),
                ))
            }
            Err(e) => Err(self.map_error(e)),
        }
    }

    fn note_ready(&mut self) {
        if self.info.setup.is_zero() {
            if let Some(at) = self.client.as_ref().and_then(|c| c.ready_at()) {
                self.info.setup = at.duration_since(self.started);
            }
        }
    }

    /// The error of an agent call, in the user's terms: a VM that died says so.
    fn map_error(&mut self, e: ClientError) -> SandboxError {
        if self.interrupter.interrupted.load(Ordering::SeqCst) {
            return SandboxError::Interrupted;
        }
        if let ClientError::SetupFailed(message) = e {
            return SandboxError::setup(message, None);
        }
        // The agent went away: the VM is going, or gone; a moment tells.
        for _ in 0..50 {
            if let Some(why) = self.exited() {
                return SandboxError::Gone(why);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        SandboxError::Agent(e)
    }

    /// A connection to a helper of the agent on a free session port.
    fn attach(&mut self) -> Result<(AgentClient<UnixStream>, PortLease), SandboxError> {
        let mut tried = 0;
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self
                .ports
                .free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop();
            let Some(n) = n else {
                return Err(SandboxError::setup(
                    format!(
                        "all {} session ports of the VM are in use: end a session first",
                        qemu::SESSION_PORTS
                    ),
                    None,
                ));
            };
            let lease = PortLease {
                n,
                ports: self.ports.clone(),
            };
            let listener = self.ports.listeners[n - 1]
                .try_clone()
                .map_err(|e| SandboxError::setup(format!("cannot use the VM's port: {e}"), None))?;
            let stream = self.accept(&listener)?;
            let result = self.client()?.attach(&qemu::port_name(n), stream);
            self.note_ready();
            match result {
                Ok(client) => return Ok((client, lease)),
                // The helper of the port's last session may not have let it go yet.
                Err(ClientError::Refused(message))
                    if message.contains("busy") && Instant::now() < until =>
                {
                    tried += 1;
                    drop(lease);
                    std::thread::sleep(Duration::from_millis(5 * tried.min(20)));
                }
                Err(e) => return Err(self.map_error(e)),
            }
        }
    }

    /// Its first checkpoint: a copy of `disk`, what its own disk was made from.
    fn first_checkpoint(&mut self, disk: &Path) -> Result<(), SandboxError> {
        disk::sparse_copy(disk, &self.dir.join(CHECKPOINT))
            .map_err(|e| SandboxError::setup(format!("cannot keep the sandbox's disk: {e}"), None))
    }

    /// Copies its disk as it is now, whole and consistent: the guest flushes it and holds
    /// its writes (`FIFREEZE`) while the host copies.
    fn take_checkpoint(&mut self) -> Result<(), SandboxError> {
        let frozen = self.client()?.freeze();
        frozen.map_err(|e| self.map_error(e))?;
        let temp = self.dir.join(format!("{CHECKPOINT}.tmp"));
        let _ = std::fs::remove_file(&temp);
        let copied = disk::sparse_copy(&self.dir.join("scratch.ext4"), &temp)
            .and_then(|()| std::fs::rename(&temp, self.dir.join(CHECKPOINT)));
        let thawed = self.client()?.thaw();
        thawed.map_err(|e| self.map_error(e))?;
        copied.map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            SandboxError::setup(format!("cannot keep the sandbox's disk: {e}"), None)
        })
    }

    /// Lets the kept set it resumed go: what it holds is superseded.
    fn let_resumed_go(&mut self) {
        if let Some(path) = self.resumed_from.take() {
            let _ = std::fs::remove_dir_all(path);
        }
    }

    /// Makes a sandbox restored from a snapshot one of its own, before it runs anything: its
    /// random generator reseeded from the host's, its clock set, its hostname `hostname`.
    fn renew(&mut self, hostname: &str) -> Result<(), SandboxError> {
        let mut entropy = [0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut random| io::Read::read_exact(&mut random, &mut entropy))
            .map_err(|e| {
                SandboxError::setup(format!("cannot read the host's random source: {e}"), None)
            })?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let result = self.client()?.renew(hostname, &entropy, now);
        result.map_err(|e| self.map_error(e))?;
        self.info.setup = self.started.elapsed();
        Ok(())
    }

    /// Ends the VM at once: nothing of it is kept (its disk goes with its directory), so
    /// there is nothing to shut down cleanly, and a guest's power-off under TCG takes seconds.
    fn stop_vm(&mut self) {
        self.client = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever else is in the VMM's cgroups is killed, and the cgroups removed.
        self.confinement = None;
    }
}

/// The last `n` lines of `text` that are not blank, on one line, without the control
/// characters and bidi overrides a guest (or its firmware) put in its console: the text
/// goes into messages and documents.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<String> = text
        .lines()
        .map(confine::printable)
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// A session port in use; free again when dropped.
#[derive(Debug)]
struct PortLease {
    n: usize,
    ports: Arc<Ports>,
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.ports
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(0, self.n);
    }
}

impl Sandbox for VmSandbox {
    fn info(&self) -> &SandboxInfo {
        &self.info
    }

    fn wait_ready(&mut self) -> Result<(), SandboxError> {
        self.client().map(drop)
    }

    fn exec(
        &mut self,
        request: &ExecRequest,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, SandboxError> {
        let result = self.client()?.exec(request, on_output);
        self.note_ready();
        let exited = result.map_err(|e| self.map_error(e))?;
        Ok(ExecOutcome {
            status: exited.status,
            timed_out: exited.timed_out,
            out_of_memory: ran_out(&self.oom_kills, exited.oom_kills),
            out_of_disk: exited.disk_full.then_some(self.disk_limit),
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
        let (client, lease) = self.attach()?;
        Ok(Box::new(VmSession {
            client,
            disk_limit: self.disk_limit,
            _lease: lease,
            interrupter: self.interrupter.clone(),
            oom_kills: self.oom_kills.clone(),
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

    fn files(&mut self) -> Result<Arc<dyn Files>, SandboxError> {
        let mut connections = Vec::new();
        let mut leases = Vec::new();
        for _ in 0..FILE_CONNECTIONS {
            let (client, lease) = self.attach()?;
            connections.push(client);
            leases.push(lease);
        }
        Ok(Arc::new(
            AgentFiles::new(connections).holding(Box::new(leases)),
        ))
    }

    fn interrupter(&self) -> Arc<dyn Interrupter> {
        self.interrupter.clone()
    }

    fn checkpoint(&mut self) -> Result<(), SandboxError> {
        match self.layered {
            true => self.take_checkpoint(),
            false => Ok(()),
        }
    }

    fn destroy(mut self: Box<Self>) -> Result<(), SandboxError> {
        self.stop_vm();
        self.let_resumed_go();
        std::fs::remove_dir_all(&self.dir).map_err(|e| {
            SandboxError::setup(
                format!("could not remove {}: {e}", self.dir.display()),
                None,
            )
        })
    }

    fn destroy_keeping(mut self: Box<Self>) -> Result<Kept, SandboxError> {
        // What is kept is the last checkpoint, a copy of its own: the VM has nothing to finish.
        self.stop_vm();
        let kept = (|| {
            if !self.layered {
                return Err("this sandbox has no layered workspace to keep".to_string());
            }
            let set = make_sandbox_dir(&self.kept_root).map_err(|e| e.to_string())?;
            let id = set
                .file_name()
                .and_then(|n| Kept::new(BACKEND_NAME, n.to_str()?))
                .ok_or("a kept set with no name")?;
            std::fs::rename(self.dir.join(CHECKPOINT), set.join(KEPT_DISK)).map_err(|e| {
                let _ = std::fs::remove_dir_all(&set);
                format!("could not keep the sandbox's disk: {e}")
            })?;
            Ok(id)
        })();
        let _ = std::fs::remove_dir_all(&self.dir);
        let kept = kept.map_err(|why| SandboxError::setup(why, None))?;
        self.let_resumed_go();
        Ok(kept)
    }
}

impl Drop for VmSandbox {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop_vm();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A session of a VM sandbox: a helper of its agent on a port of its own.
struct VmSession {
    client: AgentClient<UnixStream>,
    disk_limit: u64,
    _lease: PortLease,
    interrupter: Arc<VmInterrupter>,
    oom_kills: Arc<std::sync::atomic::AtomicU64>,
}

/// Whether the guest's count of OOM kills went up since `last`, which it then becomes.
fn ran_out(last: &std::sync::atomic::AtomicU64, now: Option<u64>) -> bool {
    match now {
        Some(now) => last.swap(now, Ordering::SeqCst) < now,
        None => false,
    }
}

impl Session for VmSession {
    fn exec(
        &mut self,
        request: &ExecRequest,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, SandboxError> {
        let exited = self.client.exec(request, on_output).map_err(|e| {
            if self.interrupter.interrupted.load(Ordering::SeqCst) {
                SandboxError::Interrupted
            } else {
                SandboxError::Agent(e)
            }
        })?;
        Ok(ExecOutcome {
            status: exited.status,
            timed_out: exited.timed_out,
            out_of_memory: ran_out(&self.oom_kills, exited.oom_kills),
            out_of_disk: exited.disk_full.then_some(self.disk_limit),
            duration: exited.duration,
            collected: exited.collected,
        })
    }
}

/// Boots a guest on `config` to an init that powers off at once, as `upstream doctor` does
/// to tell whether this host runs VMs: how long QEMU took from its start to its exit.
pub fn probe(config: &VmConfig) -> Result<Duration, String> {
    let initramfs = boot::initramfs(&config.cache, &config.init_exe, &config.kernel)
        .map_err(|e| e.to_string())?;
    let dir = make_sandbox_dir(&config.runtime.join("sandboxes")).map_err(|e| e.to_string())?;
    let result = (|| {
        // Two disks, as a sandbox has: QEMU locks each for the way it opens it.
        let root = dir.join("root.ext4");
        let scratch = dir.join("scratch.ext4");
        for disk in [&root, &scratch] {
            disk::scratch_disk(disk, 16 << 20).map_err(|e| e.to_string())?;
        }
        // Confined as a sandbox's VMM is, so that a confinement this host cannot give shows.
        confine::remove_stale_dirs(&config.runtime.join("sandboxes"));
        let limits = confine::VmmLimits::for_guest(
            DEFAULT_MEMORY,
            confine::qemu_overhead(config.accel),
            1,
            None,
        );
        let reached = confine::Host::new()
            .confine(&dir, &limits)
            .and_then(|c| confine::Reached::of(c, config, &initramfs, &root, &scratch))
            .map_err(|e| e.to_string())?;
        let machine = Machine {
            qemu: &config.qemu,
            accel: config.accel,
            kernel: &reached.kernel,
            initramfs: &reached.initramfs,
            root_disk: &reached.root_disk,
            scratch_disk: &reached.scratch_disk,
            memory_mib: DEFAULT_MEMORY >> 20,
            cpus: 1,
            memory_limit: None,
            pids_limit: None,
            hostname: upstream_sandbox::DEFAULT_HOSTNAME,
            network: network::Network::None,
            dir: &reached.dir,
            memory: qemu::Memory::Anonymous,
            incoming: false,
        };
        let started = Instant::now();
        let mut child = machine
            .start_confined(&[guest::POWER_OFF_AT_ONCE], Some(&reached.confinement))
            .map_err(|e| e.to_string())?
            .child;
        loop {
            match child.try_wait().map_err(|e| e.to_string())? {
                Some(status) if status.success() => return Ok(started.elapsed()),
                Some(status) => {
                    let mut stderr = String::new();
                    if let Some(mut err) = child.stderr.take() {
                        use std::io::Read;
                        let _ = err.read_to_string(&mut stderr);
                    }
                    return Err(format!("QEMU {status}: {}", stderr.trim()));
                }
                None if started.elapsed() > BOOT_WITHIN => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "the guest did not power off within {} s",
                        BOOT_WITHIN.as_secs()
                    ));
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The VM backend for this host, or why there is none.
pub fn open(
    init_exe: PathBuf,
    kernel: Option<&Path>,
) -> Result<upstream_sandbox::SharedBackend, SandboxError> {
    Ok(Arc::new(VmBackend::new(VmConfig::from_env(
        init_exe, kernel,
    )?)))
}

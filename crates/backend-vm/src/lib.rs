//! The microVM backend: each sandbox is a virtual machine with its own Linux kernel, so code
//! in it shares nothing with the host's kernel but a few virtio devices.
//!
//! A sandbox's VM boots the guest kernel ([`boot::Kernel`]) with an initramfs whose init is
//! this same upstream binary ([`guest`]); its root is the image as a read-only disk made
//! once per image ([`disk`]) under an overlay on a disk of the sandbox's own, thrown away
//! with it, which also holds the workspace. The VM runs in a VMM behind one interface
//! ([`vmm`]): Firecracker ([`firecracker`]) where a host has it and hardware KVM, QEMU
//! ([`qemu`]) elsewhere. The host speaks the agent protocol to the guest's agent over
//! byte streams the VMM carries — virtio-serial ports under QEMU, vsock under Firecracker
//! — one for the agent's first connection, one per session, so no descriptor ever crosses
//! into the guest; files move through the agent ([`upstream_sandbox::AgentFiles`]), since
//! the host cannot reach the guest's.

pub mod boot;
pub mod confine;
pub mod console;
pub mod disk;
pub mod firecracker;
pub mod guest;
pub mod host_disk;
pub mod kvm;
pub mod network;
pub mod qemu;
pub mod qmp;
pub mod vmlinux;
pub mod vmm;

use std::collections::HashMap;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use upstream_sandbox::{
    AgentClient, AgentFiles, Backend, ClientError, ExecOutcome, ExecRequest, ExitStatus, Files,
    Image, Interrupter, Kept, Sandbox, SandboxError, SandboxInfo, SandboxSpec, Session, Stream,
};

use crate::boot::Kernel;
use crate::confine::Confinement;
use crate::firecracker::{Firecracker, Jailer};
use crate::qemu::{Accel, Qemu};
use crate::vmm::{MachineSpec, Snapshot, Vm, Vmm, VmmError, VmmKind};

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
    /// The VMM: QEMU or Firecracker ([`vmm::choose`]).
    pub vmm: Arc<dyn Vmm>,
    /// Why this VMM, in a sentence.
    pub vmm_why: String,
    /// The VMM's program.
    pub vmm_binary: PathBuf,
    pub kernel: Kernel,
    /// Where sandboxes' directories go.
    pub runtime: PathBuf,
    /// Where the initramfs and the images' disks are kept between sandboxes.
    pub cache: PathBuf,
    /// The root whose trees the disk of `image: host` is made of ([`host_disk`]): `/`.
    pub host_root: PathBuf,
}

impl VmConfig {
    /// The configuration from this host and its environment: the VMM [`vmm::choose`]s
    /// (`$UPSTREAM_VMM`, else Firecracker — `$UPSTREAM_FIRECRACKER` or the `PATH`'s — where
    /// `/dev/kvm` runs a stock guest, else QEMU from `$UPSTREAM_QEMU` or the `PATH`), the
    /// kernel from [`Kernel::find`], QEMU's accelerator from [`Accel::from_env`], disks kept
    /// in `$UPSTREAM_VM_CACHE` or the runtime directory.
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
        let firecracker = match std::env::var_os("UPSTREAM_FIRECRACKER") {
            Some(path) if !Path::new(&path).is_file() => {
                return Err(SandboxError::setup(
                    format!(
                        "$UPSTREAM_FIRECRACKER is {}, which is no file",
                        Path::new(&path).display()
                    ),
                    Some("name Firecracker's binary, or unset it to take the PATH's"),
                ));
            }
            Some(path) => Some(PathBuf::from(path)),
            None => find_program("firecracker"),
        };
        let asked = std::env::var("UPSTREAM_VMM").ok();
        let choice = vmm::choose(
            asked.as_deref().filter(|a| !a.is_empty()),
            firecracker,
            kvm::stock_guest_runs,
        )
        .map_err(|e| SandboxError::setup(e, None))?;
        let (vmm, vmm_binary): (Arc<dyn Vmm>, PathBuf) = match choice.kind {
            VmmKind::Firecracker => {
                let binary = choice.firecracker.clone().unwrap_or_default();
                let exe = std::fs::canonicalize(&init_exe).unwrap_or_else(|_| init_exe.clone());
                let jailer = jailer_of(&binary, &runtime, &exe)?;
                (
                    Arc::new(Firecracker {
                        binary: binary.clone(),
                        jailer,
                    }),
                    binary,
                )
            }
            VmmKind::Qemu => {
                let qemu = match std::env::var_os("UPSTREAM_QEMU") {
                    Some(path) => PathBuf::from(path),
                    None => find_program("qemu-system-x86_64").ok_or_else(|| {
                        SandboxError::setup(
                            format!(
                                "QEMU is not installed ({}): `isolation: vm` runs sandboxes in \
                                 qemu-system-x86_64",
                                choice.why
                            ),
                            Some(
                                "install Debian's qemu-system-x86 (scripts/test does), or set \
                                 $UPSTREAM_QEMU; on a host with hardware KVM, Firecracker",
                            ),
                        )
                    })?,
                };
                let accel = Accel::from_env();
                (
                    Arc::new(Qemu {
                        qemu: qemu.clone(),
                        accel,
                    }),
                    qemu,
                )
            }
        };
        let kernel = Kernel::find(kernel).map_err(|e| SandboxError::setup(e.to_string(), None))?;
        // The binary itself, not /proc/self/exe, which names whoever reads it.
        let init_exe = std::fs::canonicalize(&init_exe).unwrap_or(init_exe);
        Ok(VmConfig {
            init_exe,
            vmm,
            vmm_why: choice.why,
            vmm_binary,
            kernel,
            runtime,
            cache,
            host_root: PathBuf::from("/"),
        })
    }
}

/// Firecracker's jailer, where there is one beside Firecracker or at `$UPSTREAM_JAILER`
/// (`$UPSTREAM_JAILER=none`: none), with its jails in the runtime directory (on the cache's
/// filesystem unless `$UPSTREAM_VM_CACHE` moves it, so disks are linked into a jail rather
/// than copied) and `exe` (upstream's binary) as the keeper of their pid namespace. Each
/// VM's Firecracker drops to a uid and gid of its own, unless `$UPSTREAM_JAILER_IDS=uid:gid`
/// names one for all (an operator's own user for Firecracker), which the sandbox then lists as
/// unenforced.
fn jailer_of(
    firecracker: &Path,
    runtime: &Path,
    exe: &Path,
) -> Result<Option<Jailer>, SandboxError> {
    let binary = match std::env::var_os("UPSTREAM_JAILER") {
        Some(path) if path == "none" => return Ok(None),
        Some(path) => Some(PathBuf::from(path)),
        None => firecracker
            .parent()
            .map(|dir| dir.join("jailer"))
            .filter(|p| p.is_file())
            .or_else(|| find_program("jailer")),
    };
    let Some(binary) = binary else {
        return Ok(None);
    };
    let shared_ids = match std::env::var("UPSTREAM_JAILER_IDS") {
        Err(_) => None,
        Ok(ids) => {
            let parsed = ids
                .split_once(':')
                .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
                .filter(|(u, g)| *u != 0 && *g != 0);
            if parsed.is_none() {
                return Err(SandboxError::setup(
                    format!(
                        "$UPSTREAM_JAILER_IDS is {ids:?}: it is uid:gid, neither 0 (`65534:65534`)"
                    ),
                    Some("unset it to give each VM a user of its own"),
                ));
            }
            parsed
        }
    };
    Ok(Some(Jailer {
        binary,
        shared_ids,
        chroot_base: jail_base(runtime),
        keeper: firecracker::jail::Keeper::of(exe),
    }))
}

/// Where Firecracker's jails are, in the runtime directory `runtime`.
fn jail_base(runtime: &Path) -> PathBuf {
    runtime.join("jail")
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A VM's kernel, initramfs, image disk, own disk and directory as its VMM reaches them:
/// through the confinement that holds it (`reached`), else at the host's paths (`host`, in
/// that order).
fn as_reached(
    reached: Option<&confine::Reached>,
    host: [&PathBuf; 5],
) -> (PathBuf, PathBuf, PathBuf, PathBuf, PathBuf) {
    match reached {
        Some(r) => (
            r.kernel.clone(),
            r.initramfs.clone(),
            r.root_disk.clone(),
            r.scratch_disk.clone(),
            r.dir.clone(),
        ),
        None => {
            let [kernel, initramfs, root_disk, scratch_disk, dir] = host.map(PathBuf::clone);
            (kernel, initramfs, root_disk, scratch_disk, dir)
        }
    }
}

/// The VM backend.
#[derive(Debug)]
pub struct VmBackend {
    config: VmConfig,
    /// The kernel image and initramfs the VMM boots, made on first use, then kept.
    boot: Mutex<Option<BootFiles>>,
    /// Snapshots of machines ready to run, by shape ([`Backend::prepare`]).
    templates: Mutex<HashMap<Shape, Arc<Template>>>,
    /// Held while a snapshot is taken.
    snapshotting: Mutex<()>,
    /// What confining VMMs takes of the host, read on first use.
    host: std::sync::OnceLock<confine::Host>,
    /// The disks of the host's files, for `image: host`, and when they were last checked.
    host_disks: host_disk::HostDisks,
}

impl VmBackend {
    pub fn new(config: VmConfig) -> VmBackend {
        VmBackend {
            host_disks: host_disk::HostDisks::new(
                config.cache.join("host"),
                config.host_root.clone(),
                host_disk::RECHECK,
            ),
            config,
            boot: Mutex::new(None),
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

    fn boot_files(&self) -> Result<BootFiles, SandboxError> {
        let mut made = self.boot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(files) = made.as_ref() {
            return Ok(files.clone());
        }
        let files = boot_files(&self.config).map_err(|e| SandboxError::setup(e, None))?;
        *made = Some(files.clone());
        Ok(files)
    }

    /// The machine a sandbox of `spec` runs on, checking first that a VM can be it.
    fn shape(&self, spec: &SandboxSpec) -> Result<Shape, SandboxError> {
        let boot = self.boot_files()?;
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
            Image::Host => self.host_disk(&mut |_| {})?,
        };
        let memory = match spec.limits.memory {
            Some(limit) => limit.saturating_add(GUEST_OVERHEAD),
            None => DEFAULT_MEMORY,
        };
        Ok(Shape {
            kernel: boot.kernel,
            initramfs: boot.initramfs,
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

    /// The disk of the host's files as they are, made now if there is none (`making` is
    /// told first). Snapshots of machines on an older disk, which is gone, go too.
    fn host_disk(&self, making: &mut dyn FnMut(&str)) -> Result<PathBuf, SandboxError> {
        let disk = self.host_disks.disk(making).map_err(|e| match e {
            host_disk::HostDiskError::Read { .. } => SandboxError::Image {
                image: "host".into(),
                reason: e.to_string(),
            },
            e => SandboxError::setup(e.to_string(), e.hint()),
        })?;
        self.templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|shape, _| shape.root_disk == disk || shape.root_disk.is_file());
        Ok(disk)
    }

    /// Starts the machine of `shape` in `dir` (the sandbox's: removed with it, where its disk
    /// `scratch.ext4` is made already) — booted, booted to be snapshotted, or restored from a
    /// snapshot, as `ram` says — and returns the sandbox with no agent connection yet. QEMU
    /// runs confined ([`confine`]); Firecracker confines itself, through its jailer where one
    /// is installed.
    fn start(
        &self,
        shape: &Shape,
        hostname: &str,
        network: network::Network,
        dir: PathBuf,
        ram: Ram,
        started: Instant,
    ) -> Result<VmSandbox, SandboxError> {
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
        let limits = shape.vmm_limits(self.config.vmm.as_ref());
        // A VMM that confines itself (a jailed Firecracker) is given its cgroups and user.
        let jailed = match self.config.vmm.confines_itself() {
            true => Some(
                self.host()
                    .confine(&dir, &limits)
                    .map_err(|e| failed(&dir, e.to_string(), e.hint()))?,
            ),
            false => None,
        };
        let mut reached = match self.config.vmm.kind() {
            VmmKind::Qemu => {
                let confined = self.host().confine(&dir, &limits).and_then(|mut c| {
                    if network == network::Network::None {
                        c.without_network();
                    }
                    confine::Reached::of(
                        c,
                        self.config.vmm.uses_kvm(),
                        &shape.kernel,
                        &shape.initramfs,
                        &shape.root_disk,
                        &scratch,
                    )
                });
                Some(confined.map_err(|e| failed(&dir, e.to_string(), e.hint()))?)
            }
            VmmKind::Firecracker => None,
        };
        let (kernel, initramfs, root_disk, scratch_disk, vmm_dir) = as_reached(
            reached.as_ref(),
            [
                &shape.kernel,
                &shape.initramfs,
                &shape.root_disk,
                &scratch,
                &dir,
            ],
        );
        let (snapshot_memory, snapshot) = match ram {
            Ram::Anonymous => (None, None),
            Ram::Snapshotted => (Some(vmm_dir.join(TEMPLATE_MEMORY)), None),
            Ram::RestoredFrom(template) => match reached.as_mut() {
                Some(r) => {
                    let c = &mut r.confinement;
                    let reach = c
                        .reach(&template.memory())
                        .and_then(|memory| Ok((memory, c.reach(&template.state())?)));
                    let (memory, state) =
                        reach.map_err(|e| failed(&dir, e.to_string(), e.hint()))?;
                    (None, Some(Snapshot { state, memory }))
                }
                None => (None, Some(template.snapshot())),
            },
        };
        let cmdline = shape.cmdline(hostname, network);
        let machine = MachineSpec {
            kernel: &kernel,
            initramfs: &initramfs,
            root_disk: &root_disk,
            scratch_disk: &scratch_disk,
            memory_mib: shape.memory_mib,
            cpus: shape.cpus,
            cmdline: &cmdline,
            network,
            dir: &vmm_dir,
            snapshot_memory: snapshot_memory.as_deref(),
            confinement: reached.as_ref().map(|r| &r.confinement).or(jailed.as_ref()),
        };
        let vm = match &snapshot {
            Some(snapshot) => self.config.vmm.restore(snapshot, &machine),
            None => self.config.vmm.start(&machine),
        };
        let vm = vm.map_err(|e| {
            let what = match snapshot {
                Some(_) => "cannot restore the sandbox's VM".to_string(),
                None => format!("cannot start {}", self.config.vmm_binary.display()),
            };
            failed(&dir, format!("{what}: {e}"), None)
        })?;
        let confinement = reached.map(|r| r.confinement).or(jailed);
        let mut unenforced: Vec<String> = confinement
            .as_ref()
            .map(|c| c.unenforced().to_vec())
            .unwrap_or_default();
        unenforced.extend(self.config.vmm.unenforced());
        let interrupter = Arc::new(VmInterrupter {
            pid: vm.pid(),
            interrupted: AtomicBool::new(false),
        });
        Ok(VmSandbox {
            info: SandboxInfo {
                backend: format!("vm ({})", self.config.vmm.describe()),
                setup: Duration::ZERO,
                unenforced,
                ids: GUEST_IDS,
            },
            dir,
            vmm_dir,
            disk_limit: shape.disk,
            vmm: self.config.vmm.kind(),
            ports: Arc::new(Ports {
                // Taken from the end: the lowest first, so a QEMU machine adds a port only
                // when those it has are all in use.
                free: Mutex::new((1..=vm.session_channels()).rev().collect()),
            }),
            vm: Some(vm),
            confinement,
            client: None,
            interrupter,
            started,
            oom_kills: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            layered: false,
            resumed_from: None,
            kept_root: PathBuf::new(),
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
                let mut sandbox = self.start(
                    &shape,
                    &spec.hostname,
                    network,
                    dir,
                    Ram::Anonymous,
                    started,
                )?;
                let stream = sandbox.connect_agent()?;
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
        let mut vm = self.start(
            shape,
            upstream_sandbox::DEFAULT_HOSTNAME,
            template.network,
            dir.clone(),
            Ram::Snapshotted,
            Instant::now(),
        )?;
        let stream = vm.connect_agent()?;
        vm.client = Some(AgentClient::new(stream));
        vm.wait_ready()?;
        // Its generator reseeded last thing, so that every VM restored from it wakes with the
        // same fresh seed, which its own renewal replaces before it runs anything (the kernel
        // would otherwise reseed on its own at a moment the snapshot's age decides).
        vm.renew(upstream_sandbox::DEFAULT_HOSTNAME)?;
        // Its RAM and state where the VMM reaches its directory.
        let snapshot = Snapshot {
            state: vm.vmm_dir.join(TEMPLATE_STATE),
            memory: vm.vmm_dir.join(TEMPLATE_MEMORY),
        };
        let taken = match vm.vm.as_mut() {
            Some(machine) => machine.snapshot(&snapshot),
            None => return Err(SandboxError::Agent(ClientError::Gone)),
        };
        taken.map_err(|e| {
            SandboxError::setup(format!("cannot snapshot the sandbox's VM: {e}"), None)
        })?;
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
        let mut vm = self.start(
            &template.shape,
            upstream_sandbox::DEFAULT_HOSTNAME,
            template.network,
            dir,
            Ram::RestoredFrom(template),
            started,
        )?;
        let stream = vm.connect_agent()?;
        // A guest whose agent kept its connection goes on with it; one whose connections
        // were reset greets on the new one.
        vm.client = Some(match self.config.vmm.keeps_agent_connection() {
            true => AgentClient::resumed(stream),
            false => AgentClient::new(stream),
        });
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

    /// Removes the directories of VMs, snapshots and jails whose upstream is gone.
    fn remove_stale_dirs(&self) {
        confine::remove_stale_dirs(&self.config.runtime.join("sandboxes"));
        confine::remove_stale_dirs(&self.config.runtime.join("templates"));
        firecracker::jail::remove_stale_jails(&jail_base(&self.config.runtime));
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
    /// The kernel image the VMM boots, and the initramfs.
    kernel: PathBuf,
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

impl Shape {
    /// What the VMM of a machine of this shape may use, whichever VMM it is: the guest's
    /// RAM and what the VMM takes itself, its vCPUs' and the sandbox's CPUs.
    fn vmm_limits(&self, vmm: &dyn Vmm) -> confine::VmmLimits {
        confine::VmmLimits::for_guest(
            self.memory_mib << 20,
            vmm.memory_overhead(),
            self.cpus,
            self.cpu_millis.map(|m| m as f64 / 1000.0),
        )
    }
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

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            state: self.state(),
            memory: self.memory(),
        }
    }
}

impl Shape {
    /// The words on its guest's kernel command line, for a guest named `hostname`.
    fn cmdline(&self, hostname: &str, network: network::Network) -> Vec<String> {
        guest::cmdline(hostname, self.memory_limit, self.pids_limit, network)
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

    fn make_root(
        &self,
        spec: &SandboxSpec,
        making: &mut dyn FnMut(&str),
    ) -> Result<(), SandboxError> {
        match spec.image {
            Image::Host => self.host_disk(making).map(drop),
            Image::Layers { .. } => Ok(()),
        }
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

/// The kernel image and initramfs a VMM boots.
#[derive(Debug, Clone)]
struct BootFiles {
    kernel: PathBuf,
    initramfs: PathBuf,
}

/// The boot files of `config`'s VMM, made (or found made) in its cache.
fn boot_files(config: &VmConfig) -> Result<BootFiles, String> {
    let kernel = config
        .vmm
        .boot_image(&config.kernel, &config.cache)
        .map_err(|e| e.to_string())?;
    let initramfs = boot::initramfs_for(
        &config.cache,
        &config.init_exe,
        &config.kernel,
        config.vmm.channel(),
    )
    .map_err(|e| e.to_string())?;
    Ok(BootFiles { kernel, initramfs })
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

/// Which of a VM's session channels are free.
#[derive(Debug)]
struct Ports {
    free: Mutex<Vec<usize>>,
}

/// Stops a VM from anywhere: kills its VMM.
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
    /// The same directory as its VMM reaches it ([`confine::Confinement::dir`]).
    vmm_dir: PathBuf,
    /// The size of the sandbox's disk.
    disk_limit: u64,
    vmm: VmmKind,
    vm: Option<Box<dyn Vm>>,
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

/// How long a guest has from QEMU's start to its agent's first word: a boot under TCG takes
/// seconds, under KVM a fraction of one; one that hangs (a kernel that cannot boot on this
/// host's KVM) fails the sandbox with what its console said.
const BOOT_WITHIN: Duration = Duration::from_secs(90);

impl VmSandbox {
    /// The agent's first connection, within [`BOOT_WITHIN`] of the VMM's start.
    fn connect_agent(&mut self) -> Result<UnixStream, SandboxError> {
        let until = self.started + BOOT_WITHIN;
        let result = match self.vm.as_mut() {
            Some(vm) => vm.connect_agent(until),
            None => return Err(SandboxError::Agent(ClientError::Gone)),
        };
        result.map_err(|e| self.vmm_error(e))
    }

    /// A VMM's error in the user's terms: a VM that stopped says why, one whose guest never
    /// answered says what its console last said.
    fn vmm_error(&mut self, e: VmmError) -> SandboxError {
        if let Some(why) = self.exited() {
            return SandboxError::setup(why, None);
        }
        match e {
            VmmError::Exited => SandboxError::setup("the sandbox's VM stopped", None),
            e @ VmmError::Setup(_) if self.vmm == VmmKind::Firecracker => {
                let last = last_lines(&self.console_tail(), 4);
                self.stop_vm();
                SandboxError::setup(
                    format!("the sandbox's VM did not start: {e}; its console ended with: {last}"),
                    Some("`upstream doctor` boots a VM and says what this host lacks"),
                )
            }
            e => SandboxError::setup(e.to_string(), None),
        }
    }

    /// Why the VM is gone, if it is: the VMM's exit and what it and the guest said last.
    fn exited(&mut self) -> Option<String> {
        let vm = self.vm.as_mut()?;
        let status = vm.process().try_wait().ok()??;
        let said = vm.last_words();
        Some(self.death_notice(status, &said))
    }

    /// What the guest's console has said so far (its last 64 KiB).
    fn console_tail(&self) -> String {
        self.vm
            .as_ref()
            .map(|vm| vm.console().tail())
            .unwrap_or_default()
    }

    fn death_notice(&self, status: std::process::ExitStatus, vmm_said: &str) -> String {
        let console = match &self.vm {
            Some(vm) => vm.console().tail_once_closed(CONSOLE_CLOSED_WITHIN),
            None => String::new(),
        };
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
        let vmm = self.vmm.program();
        let mut notice = format!("the sandbox's VM stopped ({vmm} {status})");
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
                "the sandbox's VM stopped: its VMM ran out of memory (the VMM's limit is {} MiB: the guest's {} MiB of RAM and {} MiB for {vmm} itself)",
                limits.memory >> 20,
                limits.guest_memory >> 20,
                (limits.memory - limits.guest_memory) >> 20
            );
        } else if console.contains("Out of memory") {
            notice = format!("the sandbox's VM stopped: it ran out of memory ({vmm} {status})");
        }
        let vmm_said = vmm_said.trim();
        if !vmm_said.is_empty() {
            notice.push_str(&format!("; {vmm} said: {}", confine::printable(vmm_said)));
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
                let last = last_lines(&self.console_tail(), 4);
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
                let channels = self.vm.as_ref().map_or(0, |vm| vm.session_channels());
                return Err(SandboxError::setup(
                    format!(
                        "all {channels} session connections of the VM are in use: end a session first"
                    ),
                    None,
                ));
            };
            let lease = PortLease {
                n,
                ports: self.ports.clone(),
            };
            let connected = match self.vm.as_mut() {
                Some(vm) => vm.connect_session(n, Instant::now() + Duration::from_secs(5)),
                None => return Err(SandboxError::Agent(ClientError::Gone)),
            };
            let (stream, name) = connected.map_err(|e| self.vmm_error(e))?;
            let result = self.client()?.attach(&name, stream);
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
        if let Some(mut vm) = self.vm.take() {
            vm.kill();
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
        if self.vm.is_some() {
            self.stop_vm();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A session of a VM sandbox: a helper of its agent on a connection of its own.
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
    let boot = boot_files(config)?;
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
        firecracker::jail::remove_stale_jails(&jail_base(&config.runtime));
        let host = confine::Host::new();
        let limits =
            confine::VmmLimits::for_guest(DEFAULT_MEMORY, config.vmm.memory_overhead(), 1, None);
        let jailed = match config.vmm.confines_itself() {
            true => Some(host.confine(&dir, &limits).map_err(|e| e.to_string())?),
            false => None,
        };
        let reached = match config.vmm.kind() {
            VmmKind::Qemu => {
                let reached = host
                    .confine(&dir, &limits)
                    .and_then(|mut c| {
                        c.without_network();
                        confine::Reached::of(
                            c,
                            config.vmm.uses_kvm(),
                            &boot.kernel,
                            &boot.initramfs,
                            &root,
                            &scratch,
                        )
                    })
                    .map_err(|e| e.to_string())?;
                Some(reached)
            }
            VmmKind::Firecracker => None,
        };
        let mut cmdline = guest::cmdline(
            upstream_sandbox::DEFAULT_HOSTNAME,
            None,
            None,
            network::Network::None,
        );
        cmdline.push(guest::POWER_OFF_AT_ONCE.to_string());
        let (kernel, initramfs, root_disk, scratch_disk, vmm_dir) = as_reached(
            reached.as_ref(),
            [&boot.kernel, &boot.initramfs, &root, &scratch, &dir],
        );
        let machine = MachineSpec {
            kernel: &kernel,
            initramfs: &initramfs,
            root_disk: &root_disk,
            scratch_disk: &scratch_disk,
            memory_mib: DEFAULT_MEMORY >> 20,
            cpus: 1,
            cmdline: &cmdline,
            network: network::Network::None,
            dir: &vmm_dir,
            snapshot_memory: None,
            confinement: reached.as_ref().map(|r| &r.confinement).or(jailed.as_ref()),
        };
        let vmm = config.vmm.kind().program();
        let started = Instant::now();
        let mut vm = config.vmm.start(&machine).map_err(|e| e.to_string())?;
        loop {
            match vm.process().try_wait().map_err(|e| e.to_string())? {
                Some(status) if status.success() => return Ok(started.elapsed()),
                Some(status) => {
                    return Err(format!("{vmm} {status}: {}", vm.last_words()));
                }
                None if started.elapsed() > BOOT_WITHIN => {
                    vm.kill();
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

/// What `config`'s cache holds of the disk of `image: host` for the host's files as they
/// are now.
pub fn host_disk_state(config: &VmConfig) -> Result<host_disk::DiskState, String> {
    host_disk::HostDisks::new(
        config.cache.join("host"),
        config.host_root.clone(),
        host_disk::RECHECK,
    )
    .state()
    .map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vmms_limits_are_its_guests_ram_and_its_own_overhead() {
        let shape = Shape {
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            root_disk: PathBuf::new(),
            memory_mib: 704,
            cpus: 2,
            cpu_millis: Some(1500),
            memory_limit: None,
            pids_limit: None,
            disk: 1 << 30,
            host_network: false,
        };
        let firecracker = Firecracker {
            binary: "/usr/bin/firecracker".into(),
            jailer: None,
        };
        let limits = shape.vmm_limits(&firecracker);
        assert_eq!(limits.memory, (704 + 128) << 20);
        assert_eq!(limits.guest_memory, 704 << 20);
        assert_eq!((limits.cpus, limits.pids), (1.5, confine::VMM_THREADS + 2));
        let qemu = Qemu {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            accel: Accel::Tcg,
        };
        assert_eq!(
            shape.vmm_limits(&qemu).memory,
            (704 << 20) + confine::qemu_overhead(Accel::Tcg)
        );
    }
}

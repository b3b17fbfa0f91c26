//! The Firecracker driver: a sandbox's VM as a `firecracker` process configured over its
//! HTTP API, its agent reached over virtio-vsock.
//!
//! Firecracker is started with its API on a Unix socket in the sandbox's directory
//! (`firecracker --api-sock fc.sock`), or through `jailer` where one is configured: then it
//! runs chrooted in a jail of its own, as the VM's own uid and gid, in the VM's cgroups, and
//! dies with upstream ([`jail`]); everything it opens is hard-linked into the jail (copied
//! where the jail is on another filesystem, or where the VM's user could not read it). It is
//! configured with `PUT /machine-config`, `/boot-source`
//! (the `vmlinux` of [`crate::vmlinux`], the initramfs, the command line), `/drives/root`
//! (read-only), `/drives/scratch`, `/vsock` and `/actions` `InstanceStart`; a refusal is
//! Firecracker's own `fault_message` in a [`VmmError::Api`].
//!
//! The files a VM has of its own — the scratch disk, the vsock socket, the API socket, the
//! log — are named relative to Firecracker's working directory (the sandbox's directory,
//! or the jail's root), so a snapshot taken of one VM restores in another directory onto
//! that directory's own disk and socket.
//!
//! The agent's connections are host-initiated vsock streams: Firecracker listens on the
//! vsock device's Unix socket; this side connects, writes `CONNECT <port>\n` and reads
//! `OK <host port>\n`, after which the stream is the guest's. The guest's agent listens on
//! [`upstream_agent::vsock::AGENT_PORT`] for its first connection and on
//! [`upstream_agent::vsock::SESSION_PORT`] for helpers, which a session asks for with
//! `Attach` of [`upstream_agent::vsock::ATTACH_NAME`] once its connection is made. Host
//! connections rather than the guest's: a guest's listening sockets live through a
//! snapshot and its restore, while Firecracker resets every open vsock connection then, so
//! a restored agent is simply connected to again.

pub mod api;
pub mod jail;

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::boot::Kernel;
use crate::network::Network;
use crate::vmm::{Channel, MachineSpec, Snapshot, Vm, Vmm, VmmError, VmmKind};
use api::Api;

/// The guest's vsock context id (any from 3; each VM has a device of its own).
pub const GUEST_CID: u32 = 3;

/// How many sessions a Firecracker VM holds at once: each is a helper of the agent.
pub const SESSIONS: usize = 32;

/// Names of a VM's files, relative to Firecracker's working directory.
const API_SOCKET: &str = "fc.sock";
const VSOCK_SOCKET: &str = "v.sock";
const LOG: &str = "fc.log";
const SCRATCH: &str = "scratch.ext4";
/// What a jailed VM's shared files are linked in as.
const JAILED_KERNEL: &str = "vmlinux";
const JAILED_INITRAMFS: &str = "initramfs";
const JAILED_ROOT: &str = "root.ext4";
const JAILED_STATE: &str = "snapshot.state";
const JAILED_MEMORY: &str = "snapshot.mem";

/// How much of the end of Firecracker's log its last words are looked for in.
const LOG_TAIL: u64 = 16 << 10;

/// How long Firecracker has to open its API socket.
const API_WITHIN: Duration = Duration::from_secs(10);

/// The words this driver puts on the kernel's command line: reboot through the keyboard
/// controller, which is how a Firecracker guest ends its VM (Firecracker exits), and the
/// guest's disks told apart by mode (Firecracker's virtio-blk serial is not the drive's id).
pub const CMDLINE: &[&str] = &[
    "reboot=k",
    crate::guest::STOP_BY_REBOOT,
    crate::guest::DISKS_BY_MODE,
];

/// Firecracker run through its jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jailer {
    pub binary: PathBuf,
    /// The uid and gid every VM's Firecracker drops to, where they are to share one
    /// (`$UPSTREAM_JAILER_IDS`); else each drops to its VM's own, its confinement's
    /// ([`crate::confine::Confinement::user`]).
    pub shared_ids: Option<(u32, u32)>,
    /// Where jails are made (`<base>/firecracker/<id>/root`): best on the filesystem of the
    /// cache, so the disks are linked into a jail rather than copied.
    pub chroot_base: PathBuf,
    /// The first process of the pid namespace jailers run in ([`jail`]).
    pub keeper: jail::Keeper,
}

/// The Firecracker VMM.
#[derive(Debug, Clone)]
pub struct Firecracker {
    pub binary: PathBuf,
    pub jailer: Option<Jailer>,
}

/// Where a VM's files are, as Firecracker names them and as this side reaches them.
#[derive(Debug, Clone)]
struct Place {
    /// Firecracker's working directory on the host: the sandbox's directory or the jail's
    /// root.
    work: PathBuf,
    /// The jail (`<base>/firecracker/<id>`), removed with the VM.
    jail: Option<PathBuf>,
    /// The uid and gid a jailed Firecracker drops to.
    ids: Option<(u32, u32)>,
}

impl Place {
    fn host(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }
}

impl Firecracker {
    /// The VM's id, from its directory's name (the jailer takes letters, digits and `-`).
    fn id_of(dir: &Path) -> String {
        let name: String = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(48)
            .collect();
        format!("upstream-{name}")
    }

    /// The uid and gid the jailer drops `machine`'s Firecracker to: the ids all VMs share,
    /// else the VM's own (its confinement's), else (not root, so none is taken) upstream's.
    fn jailed_ids(jailer: &Jailer, machine: &MachineSpec) -> Result<(u32, u32), VmmError> {
        if let Some(ids) = jailer.shared_ids {
            return Ok(ids);
        }
        if let Some(id) = machine.confinement.and_then(|c| c.user()) {
            return Ok((id, id));
        }
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        if uid.is_root() {
            return Err(VmmError::Setup(
                "a jailed Firecracker runs as a user of its own, and none was taken for this VM"
                    .into(),
            ));
        }
        Ok((uid.as_raw(), gid.as_raw()))
    }

    /// Where the VM's files go, made ready for Firecracker to open: the jail is made and
    /// the files it needs linked into it.
    fn place(&self, machine: &MachineSpec, extra: &[(&Path, &str)]) -> Result<Place, VmmError> {
        let Some(jailer) = &self.jailer else {
            // The disk by its name in the working directory, whatever its own path: a
            // snapshot names it so, and a restore in another directory opens that one's.
            let named = machine.dir.join(SCRATCH);
            if machine.scratch_disk != named {
                let _ = fs::remove_file(&named);
                std::os::unix::fs::symlink(machine.scratch_disk, &named).map_err(|e| {
                    VmmError::Setup(format!(
                        "cannot name the sandbox's disk {}: {e}",
                        named.display()
                    ))
                })?;
            }
            return Ok(Place {
                work: machine.dir.to_path_buf(),
                jail: None,
                ids: None,
            });
        };
        let (uid, gid) = Self::jailed_ids(jailer, machine)?;
        let exec_name = self
            .binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firecracker".into());
        let id = Self::id_of(machine.dir);
        let jail = jailer.chroot_base.join(&exec_name).join(&id);
        let root = jail.join("root");
        let fail = |what: &str, e: io::Error| {
            VmmError::Setup(format!(
                "cannot make the VM's jail at {}: {what}: {e}",
                jail.display()
            ))
        };
        let _ = fs::remove_dir_all(&jail);
        fs::create_dir_all(&root).map_err(|e| fail("mkdir", e))?;
        let place = Place {
            work: root.clone(),
            jail: Some(jail.clone()),
            ids: Some((uid, gid)),
        };
        let mut files: Vec<(&Path, &str)> = vec![
            (machine.kernel, JAILED_KERNEL),
            (machine.initramfs, JAILED_INITRAMFS),
            (machine.root_disk, JAILED_ROOT),
        ];
        files.extend_from_slice(extra);
        for (from, name) in files {
            link_for(from, &root.join(name), uid, gid).map_err(|e| fail(name, e))?;
        }
        // The sandbox's disk is linked, never copied: what the guest writes must be the
        // disk's (a snapshot's template disk is what its restores copy).
        fs::hard_link(machine.scratch_disk, root.join(SCRATCH)).map_err(|e| {
            fail(
                &format!(
                    "{SCRATCH} (the jails' base must be on the filesystem of {})",
                    machine.scratch_disk.display()
                ),
                e,
            )
        })?;
        // Firecracker, as its uid, writes the scratch disk and its log.
        fs::write(root.join(LOG), b"").map_err(|e| fail(LOG, e))?;
        for name in [SCRATCH, LOG] {
            std::os::unix::fs::chown(root.join(name), Some(uid), Some(gid))
                .map_err(|e| fail(name, e))?;
        }
        Ok(place)
    }

    /// How Firecracker names `file` of `machine`: relative to its working directory for
    /// what the VM has of its own or what is linked into its jail, else the host's path.
    fn name_of(&self, file: &Path, jailed: &str) -> String {
        if self.jailer.is_some() {
            jailed.to_string()
        } else {
            file.display().to_string()
        }
    }

    /// The command that starts Firecracker (through the jailer, if there is one) in
    /// `place`.
    fn command(&self, place: &Place, id: &str) -> Command {
        let firecracker_args = [
            "--api-sock",
            API_SOCKET,
            "--log-path",
            LOG,
            "--level",
            "Warning",
        ];
        match &self.jailer {
            None => {
                let mut command = Command::new(&self.binary);
                command
                    .arg("--id")
                    .arg(id)
                    .args(firecracker_args)
                    .current_dir(&place.work);
                command
            }
            Some(jailer) => {
                let (uid, gid) = place.ids.unwrap_or_default();
                let mut command = Command::new(&jailer.binary);
                command.args(jailer_args(jailer, &self.binary, id, uid, gid));
                command.arg("--").args(firecracker_args);
                command
            }
        }
    }

    /// Starts Firecracker for `machine` and waits for its API.
    fn launch(
        &self,
        machine: &MachineSpec,
        extra: &[(&Path, &str)],
    ) -> Result<FirecrackerVm, VmmError> {
        let place = self.place(machine, extra)?;
        let id = Self::id_of(machine.dir);
        let spawn = |source| VmmError::Spawn {
            vmm: self.binary.display().to_string(),
            source,
        };
        if self.jailer.is_none() {
            fs::write(place.host(LOG), b"").map_err(spawn)?;
        }
        for name in [API_SOCKET, VSOCK_SOCKET] {
            let _ = fs::remove_file(place.host(name));
        }
        // The guest's console is Firecracker's standard output: a pipe whose end upstream
        // keeps ([`crate::console`]), as it does QEMU's.
        let (console, writer) = crate::console::Console::open().map_err(spawn)?;
        let mut command = self.command(&place, &id);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped());
        let child = match &self.jailer {
            // In the VM's cgroups, in the keeper's pid namespace: killed with upstream
            // whatever the jailer does to its credentials.
            Some(jailer) => jail::spawn(command, machine.confinement, &jailer.keeper),
            // Forked by upstream's spawning thread, killed with upstream if it dies first.
            None => crate::confine::spawn(command, machine.confinement),
        }
        .map_err(spawn)?;
        let mut vm = FirecrackerVm {
            child,
            api: Api::new(&place.host(API_SOCKET)),
            console,
            place,
            stderr: None,
            killed: false,
        };
        let until = Instant::now() + API_WITHIN;
        while !vm.api.is_up() {
            if vm.exited() {
                return Err(VmmError::Exited);
            }
            if Instant::now() >= until {
                vm.kill();
                return Err(VmmError::Timeout {
                    what: format!(
                        "Firecracker did not open its API socket {}",
                        vm.api.socket().display()
                    ),
                    within: API_WITHIN,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(vm)
    }
}

/// The jailer's arguments before `--`: no `--cgroup`, as the jailer is in the VM's
/// cgroups before it runs ([`jail::spawn`]).
fn jailer_args(jailer: &Jailer, firecracker: &Path, id: &str, uid: u32, gid: u32) -> Vec<String> {
    [
        "--id",
        id,
        "--exec-file",
        &firecracker.display().to_string(),
        "--uid",
        &uid.to_string(),
        "--gid",
        &gid.to_string(),
        "--chroot-base-dir",
        &jailer.chroot_base.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The largest file that is copied into a jail because its VM's user could not read it.
const COPIED_AT_MOST: u64 = 256 << 20;

/// Puts `from`, a file the VM only reads, at `to` in a jail whose Firecracker runs as
/// `uid`:`gid`: hard-linked, or copied where they are on different filesystems; copied and
/// given to the VM's user where only its owner (or group) may read it — a kernel in `/boot`
/// on some distributions —, if it is small.
fn link_for(from: &Path, to: &Path, uid: u32, gid: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let _ = fs::remove_file(to);
    let meta = fs::metadata(from)?;
    let readable = meta.mode() & 0o004 != 0 || meta.uid() == uid;
    if !readable {
        if meta.len() > COPIED_AT_MOST {
            return Err(io::Error::other(format!(
                "the VM's user cannot read {}: only its owner may, and it is too large to copy; \
                 make it readable by others (its directory may stay private)",
                from.display()
            )));
        }
        fs::copy(from, to)?;
        std::os::unix::fs::chown(to, Some(uid), Some(gid))?;
        return fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o400));
    }
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => fs::copy(from, to).map(drop),
        Err(e) => Err(e),
    }
}

impl Vmm for Firecracker {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    fn describe(&self) -> String {
        match &self.jailer {
            None => format!("firecracker ({})", self.binary.display()),
            Some(Jailer {
                binary,
                shared_ids: Some((uid, gid)),
                ..
            }) => format!(
                "firecracker ({}, jailed by {}, every VM as {uid}:{gid})",
                self.binary.display(),
                binary.display(),
            ),
            Some(j) => format!(
                "firecracker ({}, jailed by {}, each VM as a user of its own)",
                self.binary.display(),
                j.binary.display(),
            ),
        }
    }

    fn channel(&self) -> Channel {
        Channel::Vsock
    }

    fn memory_overhead(&self) -> u64 {
        // Firecracker itself takes a few MiB (its own heap, the devices' queues, the API
        // and vCPU threads' stacks); its cgroup allows 128 beyond the guest's RAM.
        128 << 20
    }

    fn uses_kvm(&self) -> bool {
        true
    }

    fn confines_itself(&self) -> bool {
        self.jailer.is_some()
    }

    fn unenforced(&self) -> Vec<String> {
        match &self.jailer {
            None => vec![
                "the VMM's own confinement: Firecracker runs without its jailer (none is \
                 installed beside it)"
                    .to_string(),
            ],
            Some(Jailer {
                shared_ids: Some((uid, gid)),
                ..
            }) => vec![format!(
                "a user of its own for each VM's monitor: every jailed Firecracker runs as \
                 {uid}:{gid} ($UPSTREAM_JAILER_IDS), so a guest that broke into one could reach \
                 the others' files and processes"
            )],
            Some(_) => Vec::new(),
        }
    }

    fn boot_image(&self, kernel: &Kernel, cache: &Path) -> Result<PathBuf, VmmError> {
        Ok(crate::vmlinux::of(&kernel.image, cache)?)
    }

    fn keeps_agent_connection(&self) -> bool {
        false
    }

    fn start(&self, machine: &MachineSpec) -> Result<Box<dyn Vm>, VmmError> {
        if machine.network != Network::None {
            return Err(VmmError::Unsupported(
                "a Firecracker guest has no user-mode NAT for `network: host`: run it with \
                 UPSTREAM_VMM=qemu"
                    .into(),
            ));
        }
        let mut vm = self.launch(machine, &[])?;
        let mut cmdline: Vec<&str> = machine.cmdline.iter().map(String::as_str).collect();
        cmdline.extend(CMDLINE);
        let configured = (|| -> Result<(), VmmError> {
            vm.api.put(
                "/machine-config",
                &json!({
                    "vcpu_count": machine.cpus,
                    "mem_size_mib": machine.memory_mib,
                    "smt": false,
                }),
            )?;
            vm.api.put(
                "/boot-source",
                &json!({
                    "kernel_image_path": self.name_of(machine.kernel, JAILED_KERNEL),
                    "initrd_path": self.name_of(machine.initramfs, JAILED_INITRAMFS),
                    "boot_args": cmdline.join(" "),
                }),
            )?;
            vm.api.put(
                "/drives/root",
                &json!({
                    "drive_id": "root",
                    "path_on_host": self.name_of(machine.root_disk, JAILED_ROOT),
                    "is_root_device": false,
                    "is_read_only": true,
                }),
            )?;
            let scratch = SCRATCH;
            vm.api.put(
                "/drives/scratch",
                &json!({
                    "drive_id": "scratch",
                    "path_on_host": scratch,
                    "is_root_device": false,
                    "is_read_only": false,
                }),
            )?;
            vm.api.put(
                "/vsock",
                &json!({ "guest_cid": GUEST_CID, "uds_path": VSOCK_SOCKET }),
            )?;
            vm.api
                .put("/actions", &json!({ "action_type": "InstanceStart" }))?;
            Ok(())
        })();
        match configured {
            Ok(()) => Ok(Box::new(vm)),
            Err(e) => {
                vm.kill();
                Err(e)
            }
        }
    }

    fn restore(&self, snapshot: &Snapshot, machine: &MachineSpec) -> Result<Box<dyn Vm>, VmmError> {
        let extra: Vec<(&Path, &str)> = match self.jailer {
            Some(_) => vec![
                (snapshot.state.as_path(), JAILED_STATE),
                (snapshot.memory.as_path(), JAILED_MEMORY),
            ],
            None => Vec::new(),
        };
        let mut vm = self.launch(machine, &extra)?;
        let loaded = vm.api.put(
            "/snapshot/load",
            &json!({
                "snapshot_path": self.name_of(&snapshot.state, JAILED_STATE),
                "mem_backend": {
                    "backend_type": "File",
                    "backend_path": self.name_of(&snapshot.memory, JAILED_MEMORY),
                },
                "resume_vm": true,
            }),
        );
        match loaded {
            Ok(()) => Ok(Box::new(vm)),
            Err(e) => {
                vm.kill();
                Err(e.into())
            }
        }
    }
}

/// A Firecracker VM.
#[derive(Debug)]
pub struct FirecrackerVm {
    child: Child,
    api: Api,
    /// The guest's console, its last 64 KiB as upstream keeps it.
    console: crate::console::Console,
    place: Place,
    /// Firecracker's standard error, once it exited.
    stderr: Option<String>,
    killed: bool,
}

impl FirecrackerVm {
    /// Whether Firecracker has exited.
    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// A stream to guest port `port`, through Firecracker's vsock socket, by `until`.
    fn connect_port(&mut self, port: u32, until: Instant) -> Result<UnixStream, VmmError> {
        let socket = self.place.host(VSOCK_SOCKET);
        loop {
            if self.exited() {
                return Err(VmmError::Exited);
            }
            let last = match connect_vsock(&socket, port) {
                Ok(stream) => return Ok(stream),
                Err(e) => e,
            };
            if Instant::now() >= until {
                return Err(VmmError::Setup(format!(
                    "the guest did not take a connection on vsock port {port}: {last}"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One try at a stream to guest port `port` through Firecracker's vsock socket: `CONNECT`,
/// then `OK <host port>` once the guest took it (a guest not listening yet: the stream ends).
pub fn connect_vsock(socket: &Path, port: u32) -> Result<UnixStream, String> {
    let mut stream =
        jail::connect_unfollowed(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    // Firecracker answers once the guest did, or ends the stream; a guest that never
    // answers is tried again.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("CONNECT: {e}"))?;
    // Byte by byte: what follows the line is the guest's.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err("the guest refused the connection (not listening yet)".into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < 32 => line.push(byte[0]),
            Ok(_) => return Err("Firecracker's answer to CONNECT is too long".into()),
            Err(e) => return Err(format!("no answer to CONNECT: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&line);
    match line.strip_prefix("OK ") {
        Some(port) if port.trim().parse::<u32>().is_ok() => {
            let _ = stream.set_read_timeout(None);
            Ok(stream)
        }
        _ => Err(format!("Firecracker answered CONNECT with {line:?}")),
    }
}

impl Vm for FirecrackerVm {
    fn process(&mut self) -> &mut Child {
        &mut self.child
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn connect_agent(&mut self, until: Instant) -> Result<UnixStream, VmmError> {
        self.connect_port(upstream_agent::vsock::AGENT_PORT, until)
    }

    fn session_channels(&self) -> usize {
        SESSIONS
    }

    fn connect_session(
        &mut self,
        _n: usize,
        until: Instant,
    ) -> Result<(UnixStream, String), VmmError> {
        let stream = self.connect_port(upstream_agent::vsock::SESSION_PORT, until)?;
        Ok((stream, upstream_agent::vsock::ATTACH_NAME.to_string()))
    }

    fn snapshot(&mut self, to: &Snapshot) -> Result<(), VmmError> {
        let (state, memory) = match self.place.jail {
            Some(_) => (JAILED_STATE.to_string(), JAILED_MEMORY.to_string()),
            None => (
                to.state.display().to_string(),
                to.memory.display().to_string(),
            ),
        };
        self.api.patch("/vm", &json!({ "state": "Paused" }))?;
        self.api.put(
            "/snapshot/create",
            &json!({
                "snapshot_type": "Full",
                "snapshot_path": state,
                "mem_file_path": memory,
            }),
        )?;
        if self.place.jail.is_some() {
            for (name, to) in [(JAILED_STATE, &to.state), (JAILED_MEMORY, &to.memory)] {
                jail::take_out(&self.place.host(name), to).map_err(|e| {
                    VmmError::Setup(format!(
                        "cannot move the snapshot out of the jail to {}: {e}",
                        to.display()
                    ))
                })?;
            }
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        Ok(self.api.patch("/vm", &json!({ "state": "Resumed" }))?)
    }

    fn console(&self) -> &crate::console::Console {
        &self.console
    }

    fn last_words(&mut self) -> String {
        if self.stderr.is_none() && self.exited() {
            let mut text = String::new();
            if let Some(mut err) = self.child.stderr.take() {
                let _ = err.read_to_string(&mut text);
            }
            self.stderr = Some(text);
        }
        // Its log is in a directory a jailed Firecracker owns: read as the console is, a
        // regular file only, never through a link, its end only.
        let log = read_tail(&self.place.host(LOG), LOG_TAIL);
        let said: Vec<&str> = log
            .lines()
            .chain(self.stderr.as_deref().unwrap_or("").lines())
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        said[said.len().saturating_sub(2)..].join(" | ")
    }

    fn kill(&mut self) {
        if !self.killed {
            self.killed = true;
            let _ = self.child.kill();
            let _ = self.child.wait();
            // Its cgroups go with its confinement, its user is free again then.
            if let Some(jail) = &self.place.jail {
                let _ = fs::remove_dir_all(jail);
            }
        }
    }
}

impl Drop for FirecrackerVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `bytes` of a file Firecracker writes in a directory it may own (its log), as
/// long as it likes: opened without following a link or waiting on a FIFO, a regular file
/// only.
fn read_tail(path: &Path, bytes: u64) -> String {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let Ok(mut file) = opened else {
        return String::new();
    };
    let size = match file.metadata() {
        Ok(meta) if meta.is_file() => meta.len(),
        _ => return String::new(),
    };
    let mut tail = Vec::new();
    let _ = file
        .seek(SeekFrom::Start(size.saturating_sub(bytes)))
        .and_then(|_| file.take(bytes).read_to_end(&mut tail));
    String::from_utf8_lossy(&tail).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vms_id_is_what_the_jailer_takes() {
        let id = Firecracker::id_of(Path::new("/run/upstream/vm/sandboxes/123-ab_c.d-0"));
        assert_eq!(id, "upstream-123-ab-c-d-0");
        assert!(id.len() <= 64);
    }

    fn jailer(shared_ids: Option<(u32, u32)>, chroot_base: PathBuf) -> Jailer {
        Jailer {
            binary: "/usr/bin/jailer".into(),
            shared_ids,
            chroot_base,
            keeper: jail::Keeper::of(Path::new("/usr/bin/upstream")),
        }
    }

    #[test]
    fn the_jailer_gets_the_vms_ids_and_the_chroot_and_makes_no_cgroup_of_its_own() {
        let jailer = jailer(None, "/run/upstream/vm/jail".into());
        let args = jailer_args(
            &jailer,
            Path::new("/usr/bin/firecracker"),
            "upstream-1",
            4000,
            4001,
        );
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(after("--id"), "upstream-1");
        assert_eq!(after("--exec-file"), "/usr/bin/firecracker");
        assert_eq!(after("--uid"), "4000");
        assert_eq!(after("--gid"), "4001");
        assert_eq!(after("--chroot-base-dir"), "/run/upstream/vm/jail");
        // It is in the VM's cgroups before it runs: it makes none.
        assert!(!args.iter().any(|a| a.starts_with("--cgroup")), "{args:?}");
    }

    #[test]
    fn each_vm_drops_to_its_own_ids_unless_all_share_one() {
        let cmdline = Vec::new();
        let path = Path::new("/none");
        let machine = MachineSpec {
            kernel: path,
            initramfs: path,
            root_disk: path,
            scratch_disk: path,
            memory_mib: 256,
            cpus: 1,
            cmdline: &cmdline,
            network: crate::network::Network::None,
            dir: path,
            snapshot_memory: None,
            confinement: None,
        };
        let shared = jailer(Some((4000, 4001)), "/j".into());
        assert_eq!(
            Firecracker::jailed_ids(&shared, &machine).unwrap(),
            (4000, 4001)
        );
        let own = jailer(None, "/j".into());
        let ids = Firecracker::jailed_ids(&own, &machine);
        if nix::unistd::geteuid().is_root() {
            // As root a VM without a user of its own taken for it is not started as root.
            let e = ids.unwrap_err();
            assert!(e.to_string().contains("a user of its own"), "{e}");
        } else {
            let me = (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            );
            assert_eq!(ids.unwrap(), me);
        }
        let fc = |jailer| Firecracker {
            binary: "/usr/bin/firecracker".into(),
            jailer,
        };
        assert!(fc(Some(own)).unenforced().is_empty());
        let said = fc(Some(shared)).unenforced().join(" ");
        assert!(
            said.contains("4000:4001") && said.contains("UPSTREAM_JAILER_IDS"),
            "{said}"
        );
        assert!(fc(None).unenforced()[0].contains("without its jailer"));
    }

    #[test]
    fn a_jail_holds_links_to_the_vms_files() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join("sandboxes/9-a-0");
        fs::create_dir_all(&sandbox).unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            fs::write(&path, name).unwrap();
            path
        };
        let (kernel, initramfs, root) = (file("vmlinux-x"), file("initramfs-y"), file("root-z"));
        let scratch = sandbox.join("scratch.ext4");
        fs::write(&scratch, "scratch").unwrap();
        let fc = Firecracker {
            binary: "/usr/bin/firecracker".into(),
            jailer: Some(jailer(
                Some((
                    nix::unistd::getuid().as_raw(),
                    nix::unistd::getgid().as_raw(),
                )),
                dir.path().join("jail"),
            )),
        };
        let cmdline = Vec::new();
        let machine = MachineSpec {
            kernel: &kernel,
            initramfs: &initramfs,
            root_disk: &root,
            scratch_disk: &scratch,
            memory_mib: 256,
            cpus: 1,
            cmdline: &cmdline,
            network: crate::network::Network::None,
            dir: &sandbox,
            snapshot_memory: None,
            confinement: None,
        };
        let place = fc.place(&machine, &[]).unwrap();
        assert_eq!(
            place.work,
            dir.path().join("jail/firecracker/upstream-9-a-0/root")
        );
        use std::os::unix::fs::MetadataExt;
        for (name, of) in [
            (JAILED_KERNEL, &kernel),
            (JAILED_INITRAMFS, &initramfs),
            (JAILED_ROOT, &root),
            (SCRATCH, &scratch),
        ] {
            let inside = fs::metadata(place.host(name)).unwrap();
            assert_eq!(inside.ino(), fs::metadata(of).unwrap().ino(), "{name}");
        }
        assert_eq!(fc.name_of(&root, JAILED_ROOT), "root.ext4");
        let command = fc.command(&place, "upstream-9-a-0");
        let args: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let split = args.iter().position(|a| a == "--").unwrap();
        assert_eq!(
            args[split + 1..],
            [
                "--api-sock",
                "fc.sock",
                "--log-path",
                "fc.log",
                "--level",
                "Warning"
            ]
        );
        assert_eq!(command.get_program(), "/usr/bin/jailer");
    }
}

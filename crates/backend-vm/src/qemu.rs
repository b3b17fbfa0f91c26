//! The QEMU driver: the command line of a sandbox's VM, and its process.
//!
//! The machine is QEMU's `microvm` (virtio-mmio devices only, no PCI, no firmware tables to
//! walk): under TCG it reaches the guest's init a fifth sooner than `q35`. It has no
//! network device unless asked, a read-only disk for the image and a writable one of the
//! sandbox's own, and two virtio-serial devices whose ports are the agent's connections:
//! the first holds only `upstream.0`, the agent's first connection, the second the
//! sessions' ports. The guest's kernel names a device's ports only once it has added them
//! all, one by one, slowly under TCG; alone on a device of its own the agent's port is named
//! at once, and the guest starts while its kernel goes on adding the sessions' (the agent
//! waits for a session's port to appear: `upstream_agent::ports`). Each port's
//! chardev connects, as a client, to a socket this side listened on before QEMU started (so
//! no side waits for the other's socket to appear), and connects again when this side
//! closes it (a session ended). The guest's serial console goes to a pipe upstream reads
//! ([`crate::console`]). QEMU runs confined ([`crate::confine`]), with its own system call
//! filter where it has one, and in a root of its own that holds the firmware a `microvm`
//! loads ([`firmware_of`]).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::boot::Kernel;
use crate::confine::Confinement;
use crate::console::Console;
use crate::guest;
use crate::network::Network;
use crate::qmp::Monitor;
use crate::vmm::{Channel, MachineSpec, Snapshot, Vm, Vmm, VmmError, VmmKind};

/// How QEMU runs the guest's CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// The host's KVM: a guest at native speed.
    Kvm,
    /// QEMU's own translator: any host, slowly.
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// QEMU's `-accel` option: under TCG with its translation cache bounded to
    /// [`TCG_CACHE_MIB`] (QEMU's default is a GiB, which the VMM's memory would have to hold).
    pub fn option(self) -> String {
        match self {
            Accel::Kvm => "kvm".into(),
            Accel::Tcg => format!("tcg,tb-size={TCG_CACHE_MIB}"),
        }
    }

    /// `$UPSTREAM_VM_ACCEL` (`kvm` or `tcg`), else TCG: a `/dev/kvm` may be there and still
    /// not boot a stock kernel (a paravirtualised one), and only a boot tells.
    pub fn from_env() -> Accel {
        match std::env::var("UPSTREAM_VM_ACCEL").as_deref() {
            Ok("kvm") => Accel::Kvm,
            _ => Accel::Tcg,
        }
    }
}

/// TCG's translation cache, in MiB: what the guest's code becomes on the host, kept in the
/// VMM's memory. A guest's boot fills about 64 MiB; when the cache is full QEMU starts it
/// anew. [`crate::confine::QEMU_OVERHEAD`] counts it.
pub const TCG_CACHE_MIB: u64 = 128;

/// Ports for sessions, beside the agent's: as many sessions (and file connections) at once.
pub const SESSION_PORTS: usize = 31;

/// The sessions' ports a machine boots with; the others are added while it runs, as
/// sessions take them ([`QemuVm::connect_session`]). The guest's kernel takes tens of
/// milliseconds of an emulated CPU to add each port, so a guest boots with few: the two a
/// sandbox's files take and one for a session.
pub const BOOT_SESSION_PORTS: usize = 3;

/// The virtio-serial device of the sessions' ports (session port `n` is its port `n`).
const SESSIONS_BUS: &str = "ports.0";

/// The name of session port `n` (from 1).
pub fn port_name(n: usize) -> String {
    format!("upstream.{n}")
}

/// How soon a port's chardev connects again after this side closed it (a session ended).
const RECONNECT_MS: u32 = 50;

/// Port `n` of a machine (0: the agent's) as QEMU is told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// The name the guest knows it by.
    pub name: String,
    pub chardev: String,
    /// The socket its chardev connects to, as QEMU reaches it.
    pub socket: PathBuf,
    /// Its virtio-serial device and its number there: the agent's alone on a device of its
    /// own, the sessions' on the other.
    pub bus: &'static str,
    pub nr: usize,
}

impl Port {
    pub fn of(dir: &Path, n: usize) -> Port {
        let name = port_name(n);
        let (bus, nr) = match n {
            0 => ("agent.0", 1),
            n => (SESSIONS_BUS, n),
        };
        Port {
            socket: socket_of(dir, &name),
            chardev: format!("port{n}"),
            name,
            bus,
            nr,
        }
    }
}

/// What a sandbox's VM is made of.
#[derive(Debug, Clone)]
pub struct Machine<'a> {
    pub qemu: &'a Path,
    pub accel: Accel,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub root_disk: &'a Path,
    pub scratch_disk: &'a Path,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    pub cpus: u32,
    /// The words for the guest on the kernel's command line ([`guest::cmdline`]).
    pub cmdline: &'a [String],
    /// The guest's network device, if any ([`crate::network`]); its word is in `cmdline`.
    pub network: Network,
    /// The sandbox's directory, where its sockets are, as QEMU reaches it.
    pub dir: &'a Path,
    /// Guest RAM in a file rather than anonymous memory: a snapshot's (see [`Memory`]).
    pub memory: Memory<'a>,
    /// Start paused, waiting for a snapshot's state over QMP (`-incoming defer`): a
    /// machine given no kernel, initramfs or kernel command line (the snapshot's RAM holds
    /// its kernel, booted).
    pub incoming: bool,
}

/// Where a guest's RAM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory<'a> {
    /// Anonymous memory of QEMU's, gone with it.
    Anonymous,
    /// A file QEMU maps shared: what the guest writes is the file's, so a snapshot of the
    /// machine need not copy its RAM (QEMU's `x-ignore-shared`), and the file outlives QEMU.
    SharedFile(&'a Path),
    /// A snapshot's RAM file mapped private: each restored guest reads the pages it has not
    /// written from the file — from the page cache all of them share — and its writes are
    /// its own.
    PrivateFile(&'a Path),
}

/// The QMP socket in `dir`: QEMU connects to it as it does to the ports.
pub fn qmp_socket_of(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}

/// A started QEMU, the listeners of its ports (the agent's first, then the sessions') and of
/// its QMP monitor, and its guest's console.
#[derive(Debug)]
pub struct Started {
    pub child: Child,
    pub ports: Vec<UnixListener>,
    pub qmp: UnixListener,
    pub console: Console,
}

/// The socket of port `name` in `dir`.
pub fn socket_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// The descriptor set QEMU is handed its console's pipe in (`-add-fd`), which its serial
/// port's chardev opens as `/dev/fdset/N`.
const CONSOLE_FDSET: u32 = 1;

/// The arguments that send the guest's serial console to descriptor `fd`: a `file`
/// chardev on the descriptor set it is handed in, appending (a pipe cannot be truncated).
fn console_args(fd: i32) -> Vec<String> {
    vec![
        "-add-fd".into(),
        format!("fd={fd},set={CONSOLE_FDSET}"),
        "-chardev".into(),
        format!("file,id=console,path=/dev/fdset/{CONSOLE_FDSET},append=on"),
        "-serial".into(),
        "chardev:console".into(),
    ]
}

/// The firmware a `microvm` machine may load: its BIOS (SeaBIOS built for it, or qboot
/// where it has no ACPI) and the option ROMs that boot a kernel given by `-kernel` (a
/// bzImage, or a PVH ELF).
const MICROVM_FIRMWARE: [&str; 5] = [
    "bios-microvm.bin",
    "qboot.rom",
    "linuxboot_dma.bin",
    "linuxboot.bin",
    "pvh.bin",
];

/// Where QEMU `qemu` finds each of the firmware a `microvm` loads that it has: in the first
/// of its firmware directories (`-L help`, in the order it searches them) that holds it.
/// These go in the root of its own a confined QEMU runs in, at those paths. Asked of each
/// QEMU binary once.
pub fn firmware_of(qemu: &Path) -> Vec<PathBuf> {
    type Known = Vec<(PathBuf, Vec<PathBuf>)>;
    static KNOWN: Mutex<Known> = Mutex::new(Vec::new());
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, found)) = known.iter().find(|(p, _)| p == qemu) {
        return found.clone();
    }
    let dirs = Command::new(qemu)
        .args(["-L", "help"])
        .env_clear()
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    let found: Vec<PathBuf> = MICROVM_FIRMWARE
        .iter()
        .filter_map(|name| {
            dirs.lines()
                .map(|dir| Path::new(dir.trim()).join(name))
                .find(|path| path.is_absolute() && path.is_file())
        })
        .collect();
    known.push((qemu.to_path_buf(), found.clone()));
    found
}

/// The TSC rate the guest is told (kHz): under TCG its TSC runs at the host's, and a guest
/// that calibrates it against the PIT on a microvm sometimes never finishes.
fn tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

impl Machine<'_> {
    /// QEMU's arguments for this machine, but its console's ([`Machine::start`] adds them:
    /// they name the descriptor of a pipe made as QEMU starts).
    pub fn args(&self) -> Vec<String> {
        self.args_with(&[])
    }

    /// QEMU's arguments, with `more` words on the kernel's command line.
    pub fn args_with(&self, more: &[&str]) -> Vec<String> {
        let mut append = self.cmdline.to_vec();
        append.extend(more.iter().map(|w| w.to_string()));
        if self.accel == Accel::Tcg {
            append.extend(["tsc=reliable".into(), "no_timer_check".into()]);
            if let Some(khz) = tsc_khz() {
                append.push(format!("tsc_early_khz={khz}"));
            }
        }
        let mut args: Vec<String> = [
            "-M",
            "microvm,rtc=on,isa-serial=on",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-display",
            "none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(["-accel".into(), self.accel.option()]);
        args.extend(crate::confine::qemu_seccomp(self.qemu));
        if self.accel == Accel::Kvm {
            args.extend(["-cpu".into(), "host".into()]);
        } else {
            args.extend(["-cpu".into(), "max".into()]);
        }
        let memory_object = |path: &Path, how: &str| {
            format!(
                "memory-backend-file,id=ram,size={}M,mem-path={},{how},prealloc=off",
                self.memory_mib,
                path.display()
            )
        };
        match self.memory {
            Memory::Anonymous => {}
            Memory::SharedFile(path) => {
                args.extend(["-object".into(), memory_object(path, "share=on")]);
            }
            // The file opened read-only (no restored guest can change the snapshot), its
            // mapping private and writable (`rom=off`).
            Memory::PrivateFile(path) => {
                args.extend([
                    "-object".into(),
                    memory_object(path, "share=off,readonly=on,rom=off"),
                ]);
            }
        }
        if self.memory != Memory::Anonymous {
            args.extend(["-machine".into(), "memory-backend=ram".into()]);
        }
        // Every machine has a monitor: a snapshot is taken and loaded through it, and the
        // sessions' ports past the first few are added through it.
        args.extend([
            "-chardev".into(),
            format!(
                "socket,id=qmp,path={},reconnect-ms={RECONNECT_MS}",
                qmp_socket_of(self.dir).display()
            ),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]);
        if self.incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        args.extend([
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-smp".into(),
            self.cpus.to_string(),
        ]);
        // A machine restored from a snapshot boots nothing: its kernel is in the snapshot's
        // RAM. Given one, QEMU would keep the kernel's image in its own memory for the
        // firmware to load (14 MiB of Debian's, in every restored VM).
        if !self.incoming {
            args.extend([
                "-kernel".into(),
                self.kernel.display().to_string(),
                "-initrd".into(),
                self.initramfs.display().to_string(),
                "-append".into(),
                append.join(" "),
            ]);
        }
        args.extend([
            "-drive".into(),
            format!(
                "file={},format=raw,if=none,id=root,readonly=on,cache=unsafe",
                self.root_disk.display()
            ),
            "-device".into(),
            format!("virtio-blk-device,drive=root,serial={}", guest::ROOT_SERIAL),
            "-drive".into(),
            format!(
                "file={},format=raw,if=none,id=scratch,discard=unmap,cache=unsafe",
                self.scratch_disk.display()
            ),
            "-device".into(),
            format!(
                "virtio-blk-device,drive=scratch,serial={}",
                guest::SCRATCH_SERIAL
            ),
            "-device".into(),
            "virtio-serial-device,id=agent,max_ports=2".into(),
            "-device".into(),
            format!(
                "virtio-serial-device,id=ports,max_ports={}",
                SESSION_PORTS + 1
            ),
        ]);
        args.extend(self.network.qemu_args());
        for n in 0..=BOOT_SESSION_PORTS {
            let port = Port::of(self.dir, n);
            args.extend([
                "-chardev".into(),
                format!(
                    "socket,id={},path={},reconnect-ms={RECONNECT_MS}",
                    port.chardev,
                    port.socket.display()
                ),
                "-device".into(),
                format!(
                    "virtserialport,bus={},nr={},chardev={},name={}",
                    port.bus, port.nr, port.chardev, port.name
                ),
            ]);
        }
        args
    }

    /// Listens on every port's socket (and QMP's), then starts QEMU, which connects to them.
    pub fn start(&self) -> std::io::Result<Started> {
        self.start_with(&[])
    }

    /// [`Machine::start`] with `more` words on the kernel's command line.
    pub fn start_with(&self, more: &[&str]) -> std::io::Result<Started> {
        self.start_confined(more, None)
    }

    /// [`Machine::start_with`], QEMU held by `confinement` ([`crate::confine`]; `None`: it
    /// only dies with upstream). `dir` is then the directory as QEMU reaches it.
    pub fn start_confined(
        &self,
        more: &[&str],
        confinement: Option<&Confinement>,
    ) -> std::io::Result<Started> {
        // Where this process reaches the directory QEMU reaches at `dir`.
        let host_dir = confinement.map_or_else(|| self.dir.to_path_buf(), |c| c.host_dir());
        let listen = |path: PathBuf| {
            let _ = std::fs::remove_file(&path);
            UnixListener::bind(&path)
        };
        // Every port's socket, those added later too: made now, they are given to the VMM
        // with its directory.
        let mut ports = Vec::new();
        for n in 0..=SESSION_PORTS {
            ports.push(listen(socket_of(&host_dir, &port_name(n)))?);
        }
        let qmp = listen(qmp_socket_of(&host_dir))?;
        let (console, writer) = Console::open()?;
        let mut command = Command::new(self.qemu);
        command
            .args(self.args_with(more))
            .args(console_args(writer.as_raw_fd()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if self.incoming {
            // A restored VM's own memory is what it changed of the snapshot's RAM and the
            // translation cache it fills anew: worth counting in pages of 4 KiB. Left to
            // the host's huge pages, which QEMU asks for, each 2 MiB of the cache and of
            // the firmware's RAM (a few KiB of it used) is taken whole at its first write:
            // 2.4 MiB more per idle VM, measured. (The snapshot's RAM, a file mapped
            // private, has none either way.)
            // SAFETY: prctl is async-signal-safe and touches no memory of this process's.
            unsafe {
                command.pre_exec(|| match libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                });
            }
        }
        let firmware = firmware_of(self.qemu);
        let mut files: Vec<&Path> = firmware.iter().map(PathBuf::as_path).collect();
        files.extend(self.network.host_files());
        let child =
            crate::confine::spawn_handing(command, confinement, &[writer.as_raw_fd()], &files)?;
        // QEMU holds the pipe's write end now; once it is gone the console reads its end.
        drop(writer);
        Ok(Started {
            child,
            ports,
            qmp,
            console,
        })
    }
}

/// How long QEMU has to connect a port's socket: a VM that cannot start says so within it.
const CONNECT_WITHIN: Duration = Duration::from_secs(30);

/// The QEMU VMM.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub qemu: PathBuf,
    pub accel: Accel,
}

impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn describe(&self) -> String {
        format!("qemu, {}", self.accel.name())
    }

    fn channel(&self) -> Channel {
        Channel::VirtioSerial
    }

    fn memory_overhead(&self) -> u64 {
        crate::confine::qemu_overhead(self.accel)
    }

    fn uses_kvm(&self) -> bool {
        self.accel == Accel::Kvm
    }

    fn confines_itself(&self) -> bool {
        false
    }

    fn boot_image(&self, kernel: &Kernel, _cache: &Path) -> Result<PathBuf, VmmError> {
        Ok(kernel.image.clone())
    }

    fn keeps_agent_connection(&self) -> bool {
        // A restored guest's port was open when it was saved and is open still: its chardev
        // connects to the new QEMU's socket, and the agent goes on where it was.
        true
    }

    fn start(&self, spec: &MachineSpec) -> Result<Box<dyn Vm>, VmmError> {
        let memory = match spec.snapshot_memory {
            Some(path) => Memory::SharedFile(path),
            None => Memory::Anonymous,
        };
        Ok(Box::new(self.launch(spec, memory)?))
    }

    fn restore(&self, snapshot: &Snapshot, spec: &MachineSpec) -> Result<Box<dyn Vm>, VmmError> {
        let mut vm = self.launch(spec, Memory::PrivateFile(&snapshot.memory))?;
        let until = Instant::now() + CONNECT_WITHIN;
        let mut monitor = vm.monitor(until)?;
        // The agent's port is connected before the guest runs: a guest that found its host
        // gone would take it as the end of its connection.
        vm.agent = Some(vm.accept(0, until)?);
        if let Err(e) = monitor.load(&snapshot.state) {
            if matches!(vm.child.try_wait(), Ok(Some(_))) {
                return Err(VmmError::Exited);
            }
            vm.kill();
            return Err(VmmError::Setup(e.to_string()));
        }
        vm.monitor = Some(monitor);
        Ok(Box::new(vm))
    }
}

impl Qemu {
    fn launch(&self, spec: &MachineSpec, memory: Memory) -> Result<QemuVm, VmmError> {
        let machine = Machine {
            qemu: &self.qemu,
            accel: self.accel,
            kernel: spec.kernel,
            initramfs: spec.initramfs,
            root_disk: spec.root_disk,
            scratch_disk: spec.scratch_disk,
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            cmdline: spec.cmdline,
            network: spec.network,
            dir: spec.dir,
            incoming: matches!(memory, Memory::PrivateFile(_)),
            memory,
        };
        let started = machine
            .start_confined(&[], spec.confinement)
            .map_err(|source| VmmError::Spawn {
                vmm: self.qemu.display().to_string(),
                source,
            })?;
        Ok(QemuVm {
            child: started.child,
            listeners: started.ports,
            plugged: BOOT_SESSION_PORTS,
            dir: spec.dir.to_path_buf(),
            qmp: started.qmp,
            monitor: None,
            agent: None,
            memory: spec.snapshot_memory.map(Path::to_path_buf),
            console: started.console,
            stderr: None,
        })
    }
}

/// A QEMU VM: its process and the listeners of its ports.
#[derive(Debug)]
pub struct QemuVm {
    child: Child,
    /// Port `n`'s listener at `n`, for every port it may have.
    listeners: Vec<UnixListener>,
    /// The sessions' ports the machine has: those it booted with and those added since.
    plugged: usize,
    /// Its directory as QEMU reaches it, where the sockets of the ports it is given are.
    dir: PathBuf,
    /// The listener of its monitor, and the monitor once QEMU connected.
    qmp: UnixListener,
    monitor: Option<Monitor>,
    /// The agent's connection, taken before a restored guest ran.
    agent: Option<UnixStream>,
    /// The file its RAM is in, for a machine booted to be snapshotted.
    memory: Option<PathBuf>,
    /// The guest's serial console, its last 64 KiB as upstream keeps it.
    console: Console,
    /// QEMU's standard error, once it exited.
    stderr: Option<String>,
}

impl QemuVm {
    /// The connection QEMU makes to port `n`'s socket once it runs, unless it exits first.
    fn accept(&mut self, n: usize, until: Instant) -> Result<UnixStream, VmmError> {
        let listener = self
            .listeners
            .get(n)
            .ok_or_else(|| VmmError::Setup(format!("the VM has no port {n}")))?
            .try_clone()
            .map_err(|e| VmmError::Setup(format!("cannot use the VM's port: {e}")))?;
        self.accept_on(&listener, until)
    }

    /// Adds session port `n` to the running machine: its chardev, connecting to the socket
    /// made for it at the start, then the port on the sessions' device, which the guest's
    /// kernel adds and names.
    fn plug(&mut self, n: usize, until: Instant) -> Result<(), VmmError> {
        let port = Port::of(&self.dir, n);
        self.connected_monitor(until)?
            .add_port(&port, RECONNECT_MS)
            .map_err(|e| VmmError::Setup(format!("cannot add the VM's port {n}: {e}")))?;
        self.plugged = n;
        Ok(())
    }

    /// The machine's monitor, connected and greeted the first time it is asked for.
    fn connected_monitor(&mut self, until: Instant) -> Result<&mut Monitor, VmmError> {
        if self.monitor.is_none() {
            self.monitor = Some(self.monitor(until)?);
        }
        self.monitor
            .as_mut()
            .ok_or_else(|| VmmError::Setup("the VM has no monitor".into()))
    }

    /// The machine's monitor, greeted, once QEMU connected to it.
    fn monitor(&mut self, until: Instant) -> Result<Monitor, VmmError> {
        let listener = self
            .qmp
            .try_clone()
            .map_err(|e| VmmError::Setup(format!("cannot use the VM's monitor: {e}")))?;
        let stream = self.accept_on(&listener, until)?;
        Monitor::new(stream).map_err(|e| VmmError::Setup(e.to_string()))
    }

    /// The connection QEMU makes to `listener`, unless it exits first.
    fn accept_on(
        &mut self,
        listener: &UnixListener,
        until: Instant,
    ) -> Result<UnixStream, VmmError> {
        let setup = |what: &str, e: io::Error| VmmError::Setup(format!("{what}: {e}"));
        listener
            .set_nonblocking(true)
            .map_err(|e| setup("cannot wait for the VM", e))?;
        let until = until.min(Instant::now() + CONNECT_WITHIN);
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| setup("cannot talk to the VM", e))?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(setup("cannot wait for the VM", e)),
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return Err(VmmError::Exited);
            }
            if Instant::now() >= until {
                return Err(VmmError::Timeout {
                    what: "QEMU did not connect to the sandbox's ports".into(),
                    within: CONNECT_WITHIN,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Vm for QemuVm {
    fn process(&mut self) -> &mut Child {
        &mut self.child
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn connect_agent(&mut self, until: Instant) -> Result<UnixStream, VmmError> {
        match self.agent.take() {
            Some(stream) => Ok(stream),
            None => self.accept(0, until),
        }
    }

    fn session_channels(&self) -> usize {
        SESSION_PORTS
    }

    fn connect_session(
        &mut self,
        n: usize,
        until: Instant,
    ) -> Result<(UnixStream, String), VmmError> {
        if !(1..=SESSION_PORTS).contains(&n) {
            return Err(VmmError::Setup(format!("the VM has no session port {n}")));
        }
        while self.plugged < n {
            self.plug(self.plugged + 1, until)?;
        }
        Ok((self.accept(n, until)?, port_name(n)))
    }

    fn snapshot(&mut self, to: &Snapshot) -> Result<(), VmmError> {
        // A machine restored from the snapshot is started with the ports it booted with:
        // its devices must be those it was saved with.
        if self.plugged != BOOT_SESSION_PORTS {
            return Err(VmmError::Unsupported(format!(
                "a QEMU machine is snapshotted with the {BOOT_SESSION_PORTS} session ports it \
                 booted with, and this one was given {} more",
                self.plugged - BOOT_SESSION_PORTS
            )));
        }
        if self.memory.as_deref() != Some(to.memory.as_path()) {
            return Err(VmmError::Unsupported(format!(
                "a QEMU machine's snapshot keeps its RAM where the machine has it ({}), not at {}",
                self.memory
                    .as_deref()
                    .map_or("anonymous memory".into(), |m| m.display().to_string()),
                to.memory.display()
            )));
        }
        self.connected_monitor(Instant::now() + CONNECT_WITHIN)?
            .save(&to.state)
            .map_err(|e| VmmError::Setup(e.to_string()))
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        match self.monitor.as_mut() {
            Some(monitor) => monitor.resume().map_err(|e| VmmError::Setup(e.to_string())),
            None => Err(VmmError::Setup("the VM has no monitor to resume it".into())),
        }
    }

    fn console(&self) -> &Console {
        &self.console
    }

    fn last_words(&mut self) -> String {
        if self.stderr.is_none() && matches!(self.child.try_wait(), Ok(Some(_))) {
            let mut text = String::new();
            if let Some(mut err) = self.child.stderr.take() {
                use std::io::Read;
                let _ = err.read_to_string(&mut text);
            }
            self.stderr = Some(text);
        }
        self.stderr
            .as_deref()
            .unwrap_or("")
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("")
            .to_string()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine<'a>(dir: &'a Path, incoming: bool, memory: Memory<'a>) -> Machine<'a> {
        Machine {
            qemu: Path::new("/nonexistent/qemu-system-x86_64"),
            accel: Accel::Tcg,
            kernel: Path::new("/boot/vmlinuz"),
            initramfs: Path::new("/cache/initramfs"),
            root_disk: Path::new("/cache/root.ext4"),
            scratch_disk: Path::new("/vm/scratch.ext4"),
            memory_mib: 256,
            cpus: 1,
            cmdline: &[],
            network: Network::None,
            dir,
            memory,
            incoming,
        }
    }

    #[test]
    fn a_booted_machine_is_given_its_kernel_initramfs_and_command_line() {
        let args = machine(Path::new("/vm"), false, Memory::Anonymous).args();
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing: {args:?}");
        }
        assert!(!args.iter().any(|a| a == "-incoming"), "{args:?}");
    }

    #[test]
    fn the_agents_port_has_a_device_of_its_own_and_a_machine_boots_with_few_sessions_ports() {
        let args = machine(Path::new("/vm"), false, Memory::Anonymous).args();
        let ports: Vec<&String> = args
            .iter()
            .filter(|a| a.starts_with("virtserialport,"))
            .collect();
        assert_eq!(ports.len(), 1 + BOOT_SESSION_PORTS, "{ports:?}");
        assert_eq!(
            ports[0],
            "virtserialport,bus=agent.0,nr=1,chardev=port0,name=upstream.0"
        );
        for (n, port) in ports.iter().enumerate().skip(1) {
            assert_eq!(
                **port,
                format!("virtserialport,bus=ports.0,nr={n},chardev=port{n},name=upstream.{n}")
            );
        }
        let devices: Vec<&String> = args
            .iter()
            .filter(|a| a.starts_with("virtio-serial-device,"))
            .collect();
        assert_eq!(
            devices,
            [
                "virtio-serial-device,id=agent,max_ports=2",
                &format!(
                    "virtio-serial-device,id=ports,max_ports={}",
                    SESSION_PORTS + 1
                )
            ]
        );
        // The monitor the rest are added through.
        assert!(
            args.iter().any(|a| a == "chardev=qmp,mode=control"),
            "{args:?}"
        );
        // A port added later is told of as one the machine booted with is.
        let later = Port::of(Path::new("/vm"), SESSION_PORTS);
        assert_eq!(later.bus, "ports.0");
        assert_eq!(later.nr, SESSION_PORTS);
        assert_eq!(later.socket, Path::new("/vm/upstream.31.sock"));
    }

    #[test]
    fn a_restored_machine_is_given_no_kernel_initramfs_or_command_line() {
        // Its kernel is in the snapshot's RAM; QEMU given the image would hold a copy of it.
        let snapshot = Path::new("/cache/snapshot.ram");
        let args = machine(Path::new("/vm"), true, Memory::PrivateFile(snapshot)).args();
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(!args.iter().any(|a| a == flag), "{flag} given: {args:?}");
        }
        assert!(args.iter().any(|a| a == "-incoming"), "{args:?}");
    }
}

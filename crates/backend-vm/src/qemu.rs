//! The QEMU driver: the command line of a sandbox's VM, and its process.
//!
//! The machine is QEMU's `microvm` (virtio-mmio devices only, no PCI, no firmware tables to
//! walk): under TCG it reaches the guest's init a fifth sooner than `q35`. It has no
//! network device unless asked, a read-only disk for the image and a writable one of the
//! sandbox's own, and one virtio-serial device whose ports are the agent's connections:
//! `upstream.0` for the agent's first connection, the others for sessions. Each port's
//! chardev connects, as a client, to a socket this side listened on before QEMU started (so
//! no side waits for the other's socket to appear), and connects again when this side
//! closes it (a session ended). QEMU runs confined ([`crate::confine`]), with its own system
//! call filter where it has one.

use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::boot::Kernel;
use crate::confine::Confinement;
use crate::guest;
use crate::network::Network;

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
pub const SESSION_PORTS: usize = 15;

/// The name of session port `n` (from 1).
pub fn port_name(n: usize) -> String {
    format!("upstream.{n}")
}

/// What a sandbox's VM is made of.
#[derive(Debug, Clone)]
pub struct Machine<'a> {
    pub qemu: &'a Path,
    pub accel: Accel,
    pub kernel: &'a Kernel,
    pub initramfs: &'a Path,
    pub root_disk: &'a Path,
    pub scratch_disk: &'a Path,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    pub cpus: u32,
    /// The sandbox's own limits, which the guest's cgroup holds.
    pub memory_limit: Option<u64>,
    pub pids_limit: Option<u64>,
    pub hostname: &'a str,
    pub network: Network,
    /// The sandbox's directory: sockets and the console log go there.
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

/// A started QEMU, the listeners of its ports (the agent's first, then the sessions') and,
/// for a machine whose RAM is a file, of its QMP monitor.
#[derive(Debug)]
pub struct Started {
    pub child: Child,
    pub ports: Vec<UnixListener>,
    pub qmp: Option<UnixListener>,
}

/// The socket of port `name` in `dir`.
pub fn socket_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// The guest's console, kept for telling why a VM died.
pub fn console_of(dir: &Path) -> PathBuf {
    dir.join("console.log")
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
    /// QEMU's arguments for this machine.
    pub fn args(&self) -> Vec<String> {
        self.args_with(&[])
    }

    /// QEMU's arguments, with `more` words on the kernel's command line.
    pub fn args_with(&self, more: &[&str]) -> Vec<String> {
        let mut append = vec![
            "console=ttyS0".to_string(),
            "quiet".into(),
            "panic=-1".into(),
            format!("rdinit={}", guest::INIT_PATH),
            "random.trust_cpu=on".into(),
            "i8042.noaux".into(),
            "i8042.nomux".into(),
            "i8042.nopnp".into(),
            "i8042.dumbkbd".into(),
            format!("upstream.hostname={}", self.hostname),
        ];
        if let Some(memory) = self.memory_limit {
            append.push(format!("upstream.memory={memory}"));
        }
        if let Some(pids) = self.pids_limit {
            append.push(format!("upstream.pids={pids}"));
        }
        let (network_args, network_word) = self.network_args();
        append.extend(network_word);
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
            args.extend([
                "-machine".into(),
                "memory-backend=ram".into(),
                "-chardev".into(),
                format!("socket,id=qmp,path={}", qmp_socket_of(self.dir).display()),
                "-mon".into(),
                "chardev=qmp,mode=control".into(),
            ]);
        }
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
                self.kernel.image.display().to_string(),
                "-initrd".into(),
                self.initramfs.display().to_string(),
                "-append".into(),
                append.join(" "),
            ]);
        }
        args.extend([
            "-chardev".into(),
            format!("file,id=console,path={}", console_of(self.dir).display()),
            "-serial".into(),
            "chardev:console".into(),
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
            format!(
                "virtio-serial-device,id=ports,max_ports={}",
                SESSION_PORTS + 2
            ),
        ]);
        args.extend(network_args);
        for n in 0..=SESSION_PORTS {
            let name = port_name(n);
            let id = format!("port{n}");
            args.extend([
                "-chardev".into(),
                format!(
                    "socket,id={id},path={},reconnect-ms=50",
                    socket_of(self.dir, &name).display()
                ),
                "-device".into(),
                format!(
                    "virtserialport,bus=ports.0,nr={},chardev={id},name={name}",
                    n + 1
                ),
            ]);
        }
        args
    }

    /// The network device's arguments (none without network) and the kernel command line
    /// word that tells the guest to bring it up.
    fn network_args(&self) -> (Vec<String>, Option<String>) {
        (self.network.qemu_args(), self.network.kernel_word())
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
        let listen = |path: PathBuf| {
            let _ = std::fs::remove_file(&path);
            UnixListener::bind(&path)
        };
        let mut ports = Vec::new();
        for n in 0..=SESSION_PORTS {
            ports.push(listen(socket_of(self.dir, &port_name(n)))?);
        }
        let qmp = match self.memory {
            Memory::Anonymous => None,
            _ => Some(listen(qmp_socket_of(self.dir))?),
        };
        // A confined QEMU makes nothing in its directory: what it writes is there first.
        std::fs::File::create(console_of(self.dir))?;
        let mut command = Command::new(self.qemu);
        command
            .args(self.args_with(more))
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
        let child = crate::confine::spawn(command, confinement)?;
        Ok(Started { child, ports, qmp })
    }
}

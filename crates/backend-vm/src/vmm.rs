//! The VMM a sandbox's VM runs in, behind one interface: QEMU ([`crate::qemu`]) or
//! Firecracker ([`crate::firecracker`]), and which of them this host uses.
//!
//! A driver starts a machine from a [`MachineSpec`] (kernel, initramfs, the image's disk
//! read-only, the sandbox's own disk, RAM, vCPUs, the words upstream puts on the kernel's
//! command line, the sandbox's directory) and hands back a [`Vm`]: the process to watch,
//! the agent's first connection and further session connections (as byte streams, whatever
//! carries them: virtio-serial ports behind Unix sockets, or vsock through Firecracker's
//! socket), a snapshot of the running guest, and its end. What a driver needs of the guest
//! (which transport the agent listens on, which kernel image it boots, which words it adds
//! to the command line) it says itself, so the backend above knows nothing of either VMM.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Instant;

use crate::boot::Kernel;

/// Which VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmKind {
    Qemu,
    Firecracker,
}

impl VmmKind {
    pub fn name(self) -> &'static str {
        match self {
            VmmKind::Qemu => "qemu",
            VmmKind::Firecracker => "firecracker",
        }
    }

    /// The program's name in a sentence.
    pub fn program(self) -> &'static str {
        match self {
            VmmKind::Qemu => "QEMU",
            VmmKind::Firecracker => "Firecracker",
        }
    }
}

/// How the host reaches the guest's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Named virtio-serial ports (QEMU): the guest needs `virtio_console`.
    VirtioSerial,
    /// virtio-vsock (Firecracker): the guest needs `vmw_vsock_virtio_transport`.
    Vsock,
}

/// Errors of a VMM driver.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start {vmm}: {source}")]
    Spawn { vmm: String, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
    /// The VMM refused what it was asked (Firecracker's `fault_message`).
    #[error(transparent)]
    Api(#[from] crate::firecracker::api::ApiError),
    /// The VMM's process ended; [`Vm::process`] has its status.
    #[error("the VMM exited")]
    Exited,
    #[error("{what} within {} s", .within.as_secs())]
    Timeout {
        what: String,
        within: std::time::Duration,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Kernel(#[from] crate::vmlinux::VmlinuxError),
}

/// What a sandbox's VM is made of, whichever VMM runs it.
#[derive(Debug, Clone)]
pub struct MachineSpec<'a> {
    /// The kernel image this VMM boots ([`Vmm::boot_image`]).
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    /// The image's disk, opened read-only.
    pub root_disk: &'a Path,
    /// The sandbox's own disk, in [`MachineSpec::dir`].
    pub scratch_disk: &'a Path,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    pub cpus: u32,
    /// Words upstream puts on the kernel's command line (the guest's options, `rdinit=`,
    /// the console); the driver adds its own.
    pub cmdline: &'a [String],
    /// The guest's network device, if any ([`crate::network`]); the word that tells the
    /// guest of it is in `cmdline` ([`guest::cmdline`](crate::guest::cmdline)).
    pub network: crate::network::Network,
    /// The sandbox's directory: sockets, the console log and the VMM's own files go there.
    pub dir: &'a Path,
    /// Where the guest's RAM goes when the machine is booted to be snapshotted: QEMU keeps
    /// it in this file from the start (so a snapshot need not copy it), Firecracker writes
    /// it there when the snapshot is taken.
    pub snapshot_memory: Option<&'a Path>,
    /// What holds the VMM ([`crate::confine`]), if upstream confines it; its files above
    /// are then paths as the VMM reaches them (but for a VMM that confines itself,
    /// [`Vmm::confines_itself`], which is given host paths and its cgroups and user only).
    pub confinement: Option<&'a crate::confine::Confinement>,
}

/// The files of a snapshot of a running guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The VM's device and vCPU state.
    pub state: PathBuf,
    /// The guest's memory.
    pub memory: PathBuf,
}

/// A VMM: starts machines.
pub trait Vmm: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> VmmKind;

    /// The program and how it runs, for `upstream doctor` and `SandboxInfo::backend`
    /// (`qemu, tcg`).
    fn describe(&self) -> String;

    /// How the guest's agent is reached: which modules the initramfs carries.
    fn channel(&self) -> Channel;

    /// What the VMM's process takes beyond its guest's RAM, for the memory cgroup that
    /// holds it.
    fn memory_overhead(&self) -> u64;

    /// Whether it opens `/dev/kvm`.
    fn uses_kvm(&self) -> bool;

    /// Whether it confines itself (Firecracker's jailer): upstream then gives it a
    /// confinement ([`crate::confine`]: cgroups and a user of its own) that it applies
    /// itself, rather than one it is spawned into and reaches its files through.
    fn confines_itself(&self) -> bool;

    /// What of a VMM's confinement this one does not have, as sentences for the sandbox's
    /// `unenforced`.
    fn unenforced(&self) -> Vec<String> {
        Vec::new()
    }

    /// The kernel image to boot for `kernel`, made (and kept in `cache`) if this VMM needs
    /// one of its own.
    fn boot_image(&self, kernel: &Kernel, cache: &Path) -> Result<PathBuf, VmmError>;

    /// Whether a restored guest's agent goes on with the connection it had when the
    /// snapshot was taken (QEMU: its virtio port stays open), or greets anew on a new one
    /// (Firecracker: a restore resets every vsock connection).
    fn keeps_agent_connection(&self) -> bool;

    /// Starts `machine`; its guest boots on its own.
    fn start(&self, machine: &MachineSpec) -> Result<Box<dyn Vm>, VmmError>;

    /// Starts a machine from `snapshot` in `machine.dir`, which holds a scratch disk as the
    /// snapshotted machine's was when it was taken; the guest runs on from where it was.
    fn restore(&self, snapshot: &Snapshot, machine: &MachineSpec) -> Result<Box<dyn Vm>, VmmError>;
}

/// A running VM.
pub trait Vm: Send + std::fmt::Debug {
    /// The VMM's process: what to watch for the VM's end and what to kill.
    fn process(&mut self) -> &mut Child;

    /// Its pid, for an interrupter that kills it from another thread.
    fn pid(&self) -> i32;

    /// The agent's first connection, by `until`; [`VmmError::Exited`] if the VMM ends first.
    fn connect_agent(&mut self, until: Instant) -> Result<UnixStream, VmmError>;

    /// How many session connections the VM carries at once.
    fn session_channels(&self) -> usize;

    /// A connection for session channel `n` (from 1) and the name the agent attaches it by
    /// (`Request::Attach`).
    fn connect_session(
        &mut self,
        n: usize,
        until: Instant,
    ) -> Result<(UnixStream, String), VmmError>;

    /// Pauses the guest and writes its state to `to`; it stays paused (so that a disk
    /// copied now matches the snapshot) until [`Vm::resume`], or is killed. A QEMU machine
    /// keeps its RAM where [`MachineSpec::snapshot_memory`] put it at boot, which must be
    /// `to.memory`.
    fn snapshot(&mut self, to: &Snapshot) -> Result<(), VmmError>;

    /// Runs a paused guest on.
    fn resume(&mut self) -> Result<(), VmmError>;

    /// The guest's console, as upstream keeps it ([`crate::console`]: its last 64 KiB).
    fn console(&self) -> &crate::console::Console;

    /// What the VMM itself said last (its log, its standard error), for a VM that stopped.
    fn last_words(&mut self) -> String;

    /// Ends the VM at once.
    fn kill(&mut self);
}

/// Which VMM this host uses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub kind: VmmKind,
    /// Firecracker's binary, when it is the choice.
    pub firecracker: Option<PathBuf>,
    /// Why, in a sentence for `upstream doctor`.
    pub why: String,
}

/// What the choice is made from: the environment's `$UPSTREAM_VMM`, the `firecracker`
/// binary on the `PATH`, and the KVM check ([`crate::kvm::stock_guest_runs`]), which is
/// only run when it matters.
pub fn choose(
    asked: Option<&str>,
    firecracker: Option<PathBuf>,
    kvm: impl FnOnce() -> Result<(), String>,
) -> Result<Choice, String> {
    match asked {
        Some("qemu") => Ok(Choice {
            kind: VmmKind::Qemu,
            firecracker: None,
            why: "$UPSTREAM_VMM=qemu".into(),
        }),
        Some("firecracker") => match firecracker {
            Some(path) => Ok(Choice {
                kind: VmmKind::Firecracker,
                firecracker: Some(path),
                why: "$UPSTREAM_VMM=firecracker".into(),
            }),
            None => Err(
                "$UPSTREAM_VMM=firecracker, but there is no firecracker binary on the PATH \
                 (or at $UPSTREAM_FIRECRACKER): install Firecracker 1.8 or later, or unset \
                 $UPSTREAM_VMM"
                    .into(),
            ),
        },
        Some(other) => Err(format!(
            "$UPSTREAM_VMM is {other:?}: it names a VMM, `qemu` or `firecracker` (unset, \
             upstream picks Firecracker where it can run and QEMU elsewhere)"
        )),
        None => match firecracker {
            None => Ok(Choice {
                kind: VmmKind::Qemu,
                firecracker: None,
                why: "no firecracker binary on the PATH".into(),
            }),
            Some(path) => match kvm() {
                Ok(()) => Ok(Choice {
                    kind: VmmKind::Firecracker,
                    firecracker: Some(path),
                    why: "a firecracker binary, and /dev/kvm runs a stock guest".into(),
                }),
                Err(why) => Ok(Choice {
                    kind: VmmKind::Qemu,
                    firecracker: None,
                    why: format!(
                        "{} is there, but Firecracker needs hardware KVM: {why}",
                        path.display()
                    ),
                }),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_decides_else_firecracker_where_kvm_runs_a_stock_guest() {
        let fc = || Some(PathBuf::from("/usr/bin/firecracker"));
        let never = || -> Result<(), String> { panic!("the KVM check ran") };
        let c = choose(Some("qemu"), fc(), never).unwrap();
        assert_eq!(c.kind, VmmKind::Qemu);
        let c = choose(Some("firecracker"), fc(), never).unwrap();
        assert_eq!(c.kind, VmmKind::Firecracker);
        assert_eq!(c.firecracker, fc());
        let e = choose(Some("firecracker"), None, never).unwrap_err();
        assert!(e.contains("no firecracker binary"), "{e}");
        let e = choose(Some("kvm"), fc(), never).unwrap_err();
        assert!(e.contains("`qemu` or `firecracker`"), "{e}");
        let c = choose(None, None, never).unwrap();
        assert_eq!(c.kind, VmmKind::Qemu);
        assert!(c.why.contains("no firecracker"), "{}", c.why);
        let c = choose(None, fc(), || Ok(())).unwrap();
        assert_eq!(c.kind, VmmKind::Firecracker);
        let c = choose(None, fc(), || Err("a guest took 211 ms".into())).unwrap();
        assert_eq!(c.kind, VmmKind::Qemu);
        assert!(c.why.contains("211 ms"), "{}", c.why);
    }
}

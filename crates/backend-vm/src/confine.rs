//! The VMM's confinement: what the process that runs a sandbox's VM (QEMU, or any monitor a
//! driver starts from a [`Command`]) may use of the host, and how it ends.
//!
//! The guest's kernel is the sandbox's first boundary; the VMM, which emulates the guest's
//! devices in a host process, is the second, and a guest that broke into it must find as
//! little of the host as can be. Each VMM:
//!
//! - **runs in cgroups of its own** (below upstream's, as a namespace sandbox's are:
//!   `upstream_sandbox::cgroup`), joined between fork and exec, so it never runs outside
//!   them: memory for the guest's RAM and what the monitor itself takes ([`qemu_overhead`],
//!   measured), at most [`VMM_THREADS`] processes and threads past the guest's vCPUs, and
//!   CPU time for the sandbox's `cpus`. The cgroups go, with whatever still runs in them,
//!   with the sandbox; those an upstream that is gone left are emptied and removed when the
//!   next one opens the VM backend ([`Host::new`]).
//! - **as root, is a user of its own**: the first id of a host id range, taken as a
//!   namespace sandbox takes its range (`upstream_sandbox::ids`: outside every range of
//!   `/etc/subuid` and `/etc/subgid`, held by an `flock` that the VMM holds too), as uid and
//!   gid, with no supplementary group (but `/dev/kvm`'s where it needs it). So it passes no
//!   owner check on the host's files: it cannot open what only root (or any user) may open,
//!   nor signal or trace any process but its own.
//! - **without new privileges** (`no_new_privs`: no set-uid binary, file capability or
//!   LSM transition raises it), with no core dumps (its memory is the guest's), an empty
//!   environment (upstream's may hold a document's secrets) and no descriptor of
//!   upstream's but the ones handed to it.
//! - **reaches only its own files.** Its directory (the sandbox's, where its sockets and
//!   the sandbox's disk are) belongs to root and only the VMM's group may search it: the
//!   VMM cannot make, remove or replace anything there, so nothing upstream reads there
//!   later can be a link or a FIFO the VMM planted; what it writes is made first and given
//!   to it when it starts. The files it only reads (the kernel, the initramfs, the image's
//!   disk, a snapshot's RAM and state) are reached through descriptors upstream opened
//!   ([`Confinement::reach`]); its console is a pipe ([`crate::console`]).
//! - **as root, sees nothing else of the host's files** ([`jail`]): it runs in a mount
//!   namespace of its own whose root holds its program and the libraries it loads, the
//!   files its driver names (QEMU's firmware), `/dev/null`, `/dev/urandom` and its
//!   devices, the files it reads (under `/reached`) and its directory (at `/vm`), and no
//!   `/proc`. Not as root, it reaches its directory and those files through descriptors
//!   (`/proc/self/fd/N`) and sees what upstream's user sees, which its sandbox's
//!   `unenforced` says ([`unconfined_here`]).
//! - **dies with upstream and with its sandbox.** It is forked by upstream's spawning
//!   thread with SIGKILL as its parent-death signal (`upstream_sandbox::spawner`: a child
//!   forked by a thread that ends would die with that thread), and its sandbox's teardown
//!   kills everything in its cgroups.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use upstream_sandbox::cgroup::{Cgroups, Controller, Layout, Wanted};
use upstream_sandbox::ids::{Allocator, IdRange};

pub mod jail;

/// What a QEMU process takes beyond its guest's RAM and (under TCG) its translation cache,
/// which its memory cgroup allows it on top of both ([`qemu_overhead`]).
///
/// Measured here under TCG (QEMU 10.0, a guest booted and running commands, `smaps` of QEMU
/// and its cgroup's `memory.usage_in_bytes`): a 256 MiB guest with all its RAM touched put
/// 368 MiB in the cgroup, a 512 MiB guest with 422 MiB touched 531 MiB — 109–112 MiB beyond
/// the guest's pages for both sizes, of which 68 MiB was the translation cache and ~44 MiB
/// QEMU itself (its heap, the device models' buffers, its libraries' private pages). It does
/// not grow with the guest. The page cache of the disks and the initramfs the cgroup may be
/// charged for is clean and taken back under pressure, never a reason to kill.
pub const QEMU_OVERHEAD: u64 = 64 << 20;

/// The memory a QEMU with accelerator `accel` needs beyond its guest's RAM:
/// [`QEMU_OVERHEAD`], and under TCG its whole translation cache ([`crate::qemu::TCG_CACHE_MIB`]),
/// which fills as the guest runs new code.
pub fn qemu_overhead(accel: crate::qemu::Accel) -> u64 {
    match accel {
        crate::qemu::Accel::Kvm => QEMU_OVERHEAD,
        crate::qemu::Accel::Tcg => QEMU_OVERHEAD + (crate::qemu::TCG_CACHE_MIB << 20),
    }
}

/// How many processes and threads a VMM may have beyond one per vCPU: QEMU's main loop, its
/// RCU and signal threads, and a pool of up to 64 I/O workers.
pub const VMM_THREADS: u64 = 96;

/// What a sandbox's VMM may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VmmLimits {
    /// Bytes of memory: the guest's RAM and the VMM's own overhead.
    pub memory: u64,
    /// Of which the guest's RAM.
    pub guest_memory: u64,
    /// CPUs' worth of time.
    pub cpus: f64,
    /// Processes and threads.
    pub pids: u64,
}

impl VmmLimits {
    /// The limits of a VMM whose guest has `guest_memory` bytes of RAM and `vcpus` vCPUs,
    /// for a sandbox with `cpus` CPUs (`None`: as many as its vCPUs); `overhead` is what the
    /// VMM itself takes ([`qemu_overhead`]).
    pub fn for_guest(guest_memory: u64, overhead: u64, vcpus: u32, cpus: Option<f64>) -> VmmLimits {
        VmmLimits {
            memory: guest_memory.saturating_add(overhead),
            guest_memory,
            cpus: cpus.unwrap_or(f64::from(vcpus)),
            pids: VMM_THREADS + u64::from(vcpus),
        }
    }
}

/// Errors confining a VMM.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot take a user for the VM's monitor: {0}")]
    Ids(String),
    #[error("cannot confine the VM's monitor: {what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(
        "the VM's monitor, which runs as a user of its own, cannot open {path} (mode {mode:o}, owner {uid}:{gid})"
    )]
    Device {
        path: PathBuf,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    #[error("the VM's monitor cannot read {path}: only its owner may, and it is too large to copy")]
    Unreadable { path: PathBuf },
    #[error("cannot give the VM's monitor a root of its own: {0}")]
    Jail(String),
}

impl ConfineError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ConfineError::Device { .. } => Some(
                "give the device to a group (udev's rules give /dev/kvm to `kvm`, mode 0660): the monitor is given that group",
            ),
            ConfineError::Unreadable { .. } => {
                Some("make the file readable by others (its directory may stay private)")
            }
            ConfineError::Jail(_) => Some(
                "name the VMM by the absolute path of its binary ($UPSTREAM_QEMU), whose libraries its loader finds",
            ),
            _ => None,
        }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> ConfineError {
        let what = what.into();
        move |source| ConfineError::Io { what, source }
    }
}

/// What confining VMMs takes of this host, shared by a backend's VMs: where cgroups go,
/// and (as root) the users VMMs are given.
#[derive(Debug)]
pub struct Host {
    layout: Layout,
    /// As root; why not, when the id range lock directory cannot be had.
    ids: Option<Result<Allocator, String>>,
    /// Whether VMMs get a root of their own ([`jail`]), and why not.
    jail: Result<(), String>,
}

static NEXT_VMM: AtomicU32 = AtomicU32::new(0);

impl Host {
    /// This host's, as upstream's user sees it: as root, VMMs get users of their own. What
    /// VMMs of an upstream that is gone left behind in their cgroups is killed, and the
    /// cgroups removed.
    pub fn new() -> Host {
        let ids = nix::unistd::Uid::effective().is_root().then(|| {
            upstream_sandbox::runtime::ids_dir()
                .map(Allocator::for_host)
                .map_err(|e| format!("{e} ({})", e.hint()))
        });
        let host = Host {
            layout: Layout::detect(),
            ids,
            jail: jail::available(),
        };
        host.remove_stale();
        host
    }

    /// Kills what runs in the cgroups of upstream processes that are gone, and removes them.
    pub fn remove_stale(&self) {
        self.layout.remove_stale();
    }

    /// Confines a VMM whose files are in `dir` (the sandbox's directory, made by upstream)
    /// to `limits`.
    pub fn confine(&self, dir: &Path, limits: &VmmLimits) -> Result<Confinement, ConfineError> {
        let name =
            upstream_sandbox::cgroup::owned_name("vm", NEXT_VMM.fetch_add(1, Ordering::Relaxed));
        let (cgroups, monitor_unenforced) = Cgroups::create(
            &self.layout,
            &name,
            &Wanted {
                memory: Some(limits.memory),
                cpus: Some(limits.cpus),
                pids: Some(limits.pids),
            },
        );
        let mut unenforced: Vec<String> = monitor_unenforced
            .into_iter()
            .map(|u| format!("the VM's monitor's {u}"))
            .collect();
        if let Err(why) = &self.jail {
            unenforced.push(unjailed(why));
        }
        let ids = match &self.ids {
            None => None,
            Some(Err(why)) => return Err(ConfineError::Ids(why.clone())),
            Some(Ok(allocator)) => Some(
                allocator
                    .take()
                    .map_err(|e| ConfineError::Ids(e.to_string()))?,
            ),
        };
        let dir_fd = nix::fcntl::open(
            dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| ConfineError::io(format!("open {}", dir.display()))(e.into()))?;
        if let Some(range) = &ids {
            // The VMM's group may search its directory, nobody but root change it.
            nix::unistd::fchown(&dir_fd, Some(0.into()), Some(range.base.into()))
                .map_err(|e| ConfineError::io(format!("chown {}", dir.display()))(e.into()))?;
            nix::sys::stat::fchmod(&dir_fd, Mode::from_bits_truncate(0o710))
                .map_err(|e| ConfineError::io(format!("chmod {}", dir.display()))(e.into()))?;
        }
        Ok(Confinement {
            dir: dir.to_path_buf(),
            dir_fd,
            jailed: self.jail.is_ok() && ids.is_some(),
            reached: Vec::new(),
            devices: Vec::new(),
            groups: Vec::new(),
            cgroups,
            unenforced,
            ids,
            limits: *limits,
            network: true,
        })
    }
}

/// What a VMM is not held to on this host beyond its cgroups' limits, as sentences: as
/// root, nothing; else that it sees the host's files as upstream's user does.
pub fn unconfined_here() -> Vec<String> {
    match jail::available() {
        Ok(()) => Vec::new(),
        Err(why) => vec![unjailed(&why)],
    }
}

fn unjailed(why: &str) -> String {
    format!("the VM's monitor sees the host's files as upstream's user does: {why}")
}

impl Default for Host {
    fn default() -> Host {
        Host::new()
    }
}

/// One VMM's confinement: made before it starts ([`Host::confine`]), applied as it starts
/// ([`Confinement::spawn`]), undone when dropped (after the VMM is gone): its cgroups are
/// emptied and removed and its user is free again.
#[derive(Debug)]
pub struct Confinement {
    /// The VMM's directory, and the descriptor it is reached through.
    dir: PathBuf,
    dir_fd: OwnedFd,
    /// The VMM gets a root of its own ([`jail`]).
    jailed: bool,
    /// Files elsewhere the VMM reads, open for it, and where it reaches each.
    reached: Vec<(OwnedFd, PathBuf)>,
    /// The devices it may open, which its root holds.
    devices: Vec<PathBuf>,
    /// Its supplementary groups.
    groups: Vec<u32>,
    cgroups: Cgroups,
    unenforced: Vec<String>,
    /// As root, the id range whose first id is the VMM's uid and gid.
    ids: Option<IdRange>,
    limits: VmmLimits,
    /// The VMM keeps the host's network (a guest on user-mode NAT needs it); else, in a
    /// root of its own, it gets an empty network namespace.
    network: bool,
}

impl Confinement {
    /// The VMM's guest has no network device: its VMM, in a root of its own, runs in a
    /// network namespace of its own with no interface, so a guest that broke into it can
    /// reach no address, the host's loopback included. (Its sockets are files: they work
    /// across namespaces.) Not as root, it keeps upstream's network, which its sandbox's
    /// `unenforced` says.
    pub fn without_network(&mut self) {
        self.network = false;
        if !self.jailed {
            self.unenforced
                .push("the VM's monitor shares upstream's network namespace".into());
        }
    }

    /// The VMM's directory as the VMM reaches it: [`jail::DIR`] in a root of its own, else
    /// through the descriptor of it this process holds at the same number.
    pub fn dir(&self) -> PathBuf {
        match self.jailed {
            true => PathBuf::from(jail::DIR),
            false => self.host_dir(),
        }
    }

    /// The VMM's directory as this process reaches it (to bind its sockets, say): through
    /// its descriptor, never through the private runtime directory above it.
    pub fn host_dir(&self) -> PathBuf {
        fd_path(self.dir_fd.as_raw_fd())
    }

    /// A path the VMM can read `path` at, a file outside its directory it only reads, opened
    /// by this process: in the VMM's root, under [`jail::REACHED`], else through the
    /// descriptor, which the VMM reopens read-only. A file only its owner may read (a
    /// kernel in `/boot` on some distributions) is copied into the VMM's directory, if it
    /// is small.
    pub fn reach(&mut self, path: &Path) -> Result<PathBuf, ConfineError> {
        let file =
            fs::File::open(path).map_err(ConfineError::io(format!("open {}", path.display())))?;
        let meta = file
            .metadata()
            .map_err(ConfineError::io(format!("stat {}", path.display())))?;
        let readable = self.ids.is_none() || meta.mode() & 0o004 != 0;
        if readable {
            let seen = match self.jailed {
                true => Path::new(jail::REACHED).join(format!(
                    "{}-{}",
                    self.reached.len(),
                    plain_name(path)
                )),
                false => fd_path(file.as_raw_fd()),
            };
            self.reached.push((file.into(), seen.clone()));
            return Ok(seen);
        }
        if meta.len() > 256 << 20 {
            return Err(ConfineError::Unreadable {
                path: path.to_path_buf(),
            });
        }
        let name = format!(
            "reached-{}-{}",
            self.reached.len(),
            path.file_name()
                .map_or("file".into(), |n| n.to_string_lossy())
        );
        let copy = self.dir.join(&name);
        let mut out = fs::File::create(&copy)
            .map_err(ConfineError::io(format!("create {}", copy.display())))?;
        io::copy(&mut &file, &mut out)
            .map_err(ConfineError::io(format!("copy {}", path.display())))?;
        Ok(self.dir().join(name))
    }

    /// Lets the VMM open device `path` (`/dev/kvm`): nothing to do where anybody may, its
    /// group where that group may, else an error saying how to allow it.
    pub fn allow_device(&mut self, path: &Path) -> Result<(), ConfineError> {
        if self.ids.is_none() {
            return Ok(());
        }
        let meta =
            fs::metadata(path).map_err(ConfineError::io(format!("stat {}", path.display())))?;
        let mode = meta.mode() & 0o777;
        if mode & 0o006 == 0o006 {
            self.devices.push(path.to_path_buf());
            return Ok(());
        }
        if mode & 0o060 == 0o060 && meta.gid() != 0 {
            self.groups.push(meta.gid());
            self.devices.push(path.to_path_buf());
            return Ok(());
        }
        Err(ConfineError::Device {
            path: path.to_path_buf(),
            mode,
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }

    /// The VMM's uid and gid, as root (`None`: it runs as upstream's user).
    pub fn user(&self) -> Option<u32> {
        self.ids.as_ref().map(|r| r.base)
    }

    /// What the VMM's cgroups allow it.
    pub fn limits(&self) -> &VmmLimits {
        &self.limits
    }

    /// The limits that could not be set, as sentences.
    pub fn unenforced(&self) -> &[String] {
        &self.unenforced
    }

    /// Whether the kernel killed a process of the VMM's cgroup for want of memory.
    pub fn out_of_memory(&self) -> bool {
        self.cgroups.oom_kills() > 0
    }

    /// The VMM's cgroup of `controller`, if it has one.
    pub fn cgroup(&self, controller: Controller) -> Option<&Path> {
        self.cgroups.dir_of(controller)
    }

    /// The `cgroup.procs` file of each of the VMM's cgroups, for a VMM that is started
    /// another way ([`crate::firecracker::jail`]) to join them before it execs.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.cgroups.procs_files()
    }

    /// Gives what is in the VMM's directory to the VMM (its disk, its sockets, the files it
    /// writes), as upstream made it.
    fn give_directory(&self) -> Result<(), ConfineError> {
        let Some(id) = self.user() else {
            return Ok(());
        };
        let entries = fs::read_dir(&self.dir)
            .map_err(ConfineError::io(format!("list {}", self.dir.display())))?;
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            use std::os::unix::fs::FileTypeExt;
            if !(kind.is_file() || kind.is_socket()) {
                continue;
            }
            let path = entry.path();
            std::os::unix::fs::lchown(&path, Some(id), Some(id))
                .map_err(ConfineError::io(format!("chown {}", path.display())))?;
            if kind.is_file() {
                let mode = entry.metadata().map_or(0o600, |m| m.mode() & 0o7777);
                fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o600))
                    .map_err(ConfineError::io(format!("chmod {}", path.display())))?;
            }
        }
        Ok(())
    }

    /// Starts `command` (the VMM) confined: in its cgroups, as its user, in a root of its
    /// own (as root), holding the descriptors of what it reaches and nothing else of this
    /// process's, dying with upstream.
    pub fn spawn(&self, command: Command) -> io::Result<Child> {
        self.spawn_handing(command, &[], &[])
    }

    /// [`Confinement::spawn`], handing the VMM descriptors `handed` too (at their numbers)
    /// and, in its root, the host's `files` at their own paths, read-only (firmware a driver
    /// knows its VMM loads).
    pub fn spawn_handing(
        &self,
        mut command: Command,
        handed: &[RawFd],
        files: &[&Path],
    ) -> io::Result<Child> {
        self.give_directory()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let procs: Vec<CString> = self
            .cgroups
            .procs_files()
            .iter()
            .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
            .collect();
        let jail = match self.jailed {
            true => {
                let jail = self
                    .jail(&command, files)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                Some(match self.network {
                    true => jail,
                    false => jail.without_network(),
                })
            }
            false => None,
        };
        // In a root of its own the VMM reaches its files by their paths there.
        let mut keep: Vec<RawFd> = match self.jailed {
            true => Vec::new(),
            false => std::iter::once(self.dir_fd.as_raw_fd())
                .chain(self.reached.iter().map(|(f, _)| f.as_raw_fd()))
                .collect(),
        };
        keep.extend_from_slice(handed);
        if let Some(range) = &self.ids {
            keep.push(range.lock().as_raw_fd());
        }
        let user = self.user().map(|id| (id, self.groups.clone()));
        let parent = std::process::id() as libc::pid_t;
        command.env_clear();
        // SAFETY: the closure runs between fork and exec in a multi-threaded process: it
        // makes only async-signal-safe system calls (open, write, close, fcntl,
        // close_range, unshare, mount, mkdir, move_mount, chdir, pivot_root, umount2,
        // setgroups, setresgid, setresuid, setrlimit, prctl, getppid) and allocates
        // nothing: its strings and lists were made before the fork.
        unsafe {
            command.pre_exec(move || {
                for file in &procs {
                    join_cgroup(file)?;
                }
                if let Some(jail) = &jail {
                    jail.enter()?;
                }
                hand_over(&keep)?;
                if let Some((id, groups)) = &user {
                    become_user(*id, groups)?;
                }
                no_core_no_new_privileges()?;
                upstream_sandbox::spawner::die_with_parent(parent)
            });
        }
        upstream_sandbox::spawner::spawn(command)
    }

    /// The root of its own `command`'s VMM runs in, with the host's `files` in it.
    fn jail(&self, command: &Command, files: &[&Path]) -> Result<jail::Jail, ConfineError> {
        use jail::{Piece, Source, What};
        let program = Path::new(command.get_program());
        if !program.is_absolute() {
            return Err(ConfineError::Jail(format!(
                "{} is not an absolute path",
                program.display()
            )));
        }
        let runs_on = jail::runs_on(program).map_err(ConfineError::Jail)?;
        fn host(path: &Path, what: What) -> Piece<'_> {
            Piece {
                source: Source::Path(path),
                at: path,
                what,
            }
        }
        let mut pieces = vec![host(program, What::Program)];
        pieces.extend(runs_on.libraries.iter().map(|l| host(l, What::Program)));
        pieces.extend(runs_on.cache.iter().map(|c| host(c, What::Data)));
        for device in ["/dev/null", "/dev/urandom"] {
            pieces.push(host(Path::new(device), What::Device));
        }
        pieces.extend(self.devices.iter().map(|d| host(d, What::Device)));
        pieces.extend(files.iter().map(|f| host(f, What::Data)));
        pieces.extend(self.reached.iter().map(|(fd, at)| Piece {
            source: Source::Open(fd.as_fd()),
            at,
            what: What::Data,
        }));
        let dir = Path::new(jail::DIR);
        pieces.push(Piece {
            source: Source::Open(self.dir_fd.as_fd()),
            at: dir,
            what: What::Directory,
        });
        jail::Jail::new(&pieces).map_err(ConfineError::Jail)
    }
}

/// Starts a VMM `confinement` holds, or (`None`: a boot probe, say) one that only dies with
/// upstream, with an empty environment.
pub fn spawn(command: Command, confinement: Option<&Confinement>) -> io::Result<Child> {
    spawn_handing(command, confinement, &[], &[])
}

/// [`spawn`], handing the VMM descriptors `handed` and, confined, the host's `files`
/// ([`Confinement::spawn_handing`]).
pub fn spawn_handing(
    mut command: Command,
    confinement: Option<&Confinement>,
    handed: &[RawFd],
    files: &[&Path],
) -> io::Result<Child> {
    if let Some(confinement) = confinement {
        return confinement.spawn_handing(command, handed, files);
    }
    let parent = std::process::id() as libc::pid_t;
    let handed = handed.to_vec();
    command.env_clear();
    // SAFETY: hand_over and die_with_parent make only async-signal-safe calls, on a list
    // made before the fork.
    unsafe {
        command.pre_exec(move || {
            hand_over(&handed)?;
            upstream_sandbox::spawner::die_with_parent(parent)
        });
    }
    upstream_sandbox::spawner::spawn(command)
}

/// `path`'s file name with nothing but letters, digits, `.`, `-` and `_` (a VMM's command
/// line takes `,` and `=` as its own).
fn plain_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map_or("file".into(), |n| n.to_string_lossy());
    name.chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                true => c,
                false => '_',
            },
        )
        .collect()
}

fn fd_path(fd: RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `file`.
pub(crate) fn join_cgroup(file: &CString) -> io::Result<()> {
    // SAFETY: open, write and close of a descriptor this function owns, on a string made
    // before the fork; all async-signal-safe.
    unsafe {
        let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let error = io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(error);
        }
    }
    Ok(())
}

/// Marks every descriptor from 3 up close-on-exec but those in `keep`, which stay open
/// across the exec at the same numbers.
pub(crate) fn hand_over(keep: &[RawFd]) -> io::Result<()> {
    // SAFETY: close_range and fcntl on this process's own descriptors; async-signal-safe.
    unsafe {
        // Everything this process opens is close-on-exec already; this makes sure. A
        // kernel without CLOSE_RANGE_CLOEXEC (before 5.11) keeps what it is handed.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        for &fd in keep {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Becomes uid and gid `id` with supplementary `groups` only (this thread is the whole
/// process after fork, so the raw system calls change all of it).
fn become_user(id: u32, groups: &[u32]) -> io::Result<()> {
    // SAFETY: setgroups reads `groups` (made before the fork) and the set*id calls take
    // plain ids; all async-signal-safe.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
            || libc::syscall(libc::SYS_setresgid, id, id, id) != 0
            || libc::syscall(libc::SYS_setresuid, id, id, id) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// No core dump (the VMM's memory is the guest's) and no new privileges past the exec.
pub(crate) fn no_core_no_new_privileges() -> io::Result<()> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a struct on this stack; prctl takes plain integers.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A VM's files as its confined VMM reaches them (what a [`crate::qemu::Machine`] is told),
/// and the confinement that holds them open.
pub struct Reached {
    pub confinement: Confinement,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub root_disk: PathBuf,
    /// A file of the VMM's directory.
    pub scratch_disk: PathBuf,
    /// The VMM's directory ([`Confinement::dir`]).
    pub dir: PathBuf,
}

impl Reached {
    /// The files of a VM — the kernel image its VMM boots, `initramfs`, the image's
    /// `root_disk` and `scratch_disk` (in the VMM's directory) — as `confinement`'s VMM
    /// reaches them; `/dev/kvm` too where it uses KVM (`kvm`).
    pub fn of(
        mut confinement: Confinement,
        kvm: bool,
        kernel: &Path,
        initramfs: &Path,
        root_disk: &Path,
        scratch_disk: &Path,
    ) -> Result<Reached, ConfineError> {
        if kvm {
            confinement.allow_device(Path::new("/dev/kvm"))?;
        }
        let kernel = confinement.reach(kernel)?;
        let dir = confinement.dir();
        Ok(Reached {
            kernel,
            initramfs: confinement.reach(initramfs)?,
            root_disk: confinement.reach(root_disk)?,
            scratch_disk: dir.join(scratch_disk.file_name().unwrap_or_default()),
            dir,
            confinement,
        })
    }
}

/// Removes the directories under `parent` of VMs whose upstream is gone (named `<pid>-…`
/// for the upstream that made them); their VMMs died with it.
pub fn remove_stale_dirs(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH);
        if gone {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// `line` without control characters and bidi overrides: what a guest (or its firmware)
/// printed, fit to go into a message and a document.
pub fn printable(line: &str) -> String {
    line.chars()
        .filter(|&c| {
            !c.is_control() && !matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect()
}

/// QEMU's own system call filter, where this QEMU has one: no obsolete calls, no changing
/// ids, no new processes or programs, no changing priorities or CPU affinity. Asked of each
/// QEMU binary once (`-sandbox … -version` fails where it was built without seccomp).
pub fn qemu_seccomp(qemu: &Path) -> Vec<String> {
    const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
    static KNOWN: OnceLock<Mutex<Vec<(PathBuf, bool)>>> = OnceLock::new();
    let known = KNOWN.get_or_init(|| Mutex::new(Vec::new()));
    let mut known = known.lock().unwrap_or_else(|e| e.into_inner());
    let has = match known.iter().find(|(p, _)| p == qemu) {
        Some((_, has)) => *has,
        None => {
            let has = Command::new(qemu)
                .args(["-sandbox", SANDBOX, "-version"])
                .env_clear()
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            known.push((qemu.to_path_buf(), has));
            has
        }
    };
    if has {
        vec!["-sandbox".into(), SANDBOX.into()]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Each test makes a [`Host`], which removes what looks stale: one at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// QEMU, as root: what these tests need (scripts/test installs QEMU). Not root, they
    /// say so and pass, as they cannot confine anything.
    fn qemu_as_root(test: &str) -> Option<PathBuf> {
        if !nix::unistd::Uid::effective().is_root() {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED (needs root): {test}");
            return None;
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let qemu = std::env::split_paths(&path)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
            .expect("no qemu-system-x86_64 (scripts/test installs it)");
        Some(qemu)
    }

    /// A QEMU with no machine that opens `file` as a read-only disk and then idles.
    fn qemu_opening(qemu: &Path, file: &Path) -> Command {
        let mut command = Command::new(qemu);
        command
            .args(["-M", "none", "-nodefaults", "-display", "none"])
            .args(["-monitor", "none", "-serial", "none"])
            .args(qemu_seccomp(qemu))
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=d,readonly=on",
                file.display()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    }

    /// Whether `child` still runs after a second (it opened its disk), else what it said.
    fn opened(mut child: Child) -> Result<u32, String> {
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if let Some(status) = child.try_wait().unwrap() {
                let mut said = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut said);
                return Err(format!("{status}: {said}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = child.id();
        let uid = fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|u| u.split_whitespace().next().unwrap().parse().unwrap())
            })
            .unwrap();
        let _ = child.kill();
        let _ = child.wait();
        Ok(uid)
    }

    /// A file only root may read, in a directory any user may search (0755, in /tmp), and
    /// a file any user may read in a private one (0700): what the VMM's user could not and
    /// could open, were they in its root. Each 1 MiB, as a disk QEMU opens.
    fn host_files() -> (tempfile::TempDir, PathBuf, tempfile::TempDir, PathBuf) {
        let open_dir = tempfile::Builder::new()
            .prefix("upstream-confine-")
            .tempdir()
            .unwrap();
        fs::set_permissions(open_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let secret = open_dir.path().join("secret");
        fs::write(&secret, vec![7u8; 1 << 20]).unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let private = tempfile::Builder::new()
            .prefix("upstream-confine-private-")
            .tempdir()
            .unwrap();
        fs::set_permissions(private.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let readable = private.path().join("readable");
        fs::write(&readable, vec![7u8; 1 << 20]).unwrap();
        fs::set_permissions(&readable, fs::Permissions::from_mode(0o644)).unwrap();
        (open_dir, secret, private, readable)
    }

    /// A directory for a VMM, with a file upstream made for it (root's, 0600, as upstream
    /// makes the sandbox's disk).
    fn vm_dir() -> tempfile::TempDir {
        let vm_dir = tempfile::Builder::new()
            .prefix("upstream-confine-vm-")
            .tempdir()
            .unwrap();
        let given = vm_dir.path().join("given");
        fs::write(&given, vec![7u8; 1 << 20]).unwrap();
        fs::set_permissions(&given, fs::Permissions::from_mode(0o600)).unwrap();
        vm_dir
    }

    #[test]
    fn a_confined_vmm_opens_its_own_files_and_none_of_the_hosts() {
        let Some(qemu) = qemu_as_root("a_confined_vmm_opens_its_own_files_and_none_of_the_hosts")
        else {
            return;
        };
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let (_open_dir, secret, _private, readable) = host_files();
        let vm_dir = vm_dir();
        let host = Host::new();
        let limits = VmmLimits::for_guest(64 << 20, QEMU_OVERHEAD, 1, None);
        let mut confinement = host.confine(vm_dir.path(), &limits).unwrap();
        let uid = confinement.user().unwrap();
        assert_ne!(uid, 0);
        assert!(
            confinement.unenforced().is_empty(),
            "{:?}",
            confinement.unenforced()
        );

        // A real QEMU, in its root of its own: neither host file is there to open.
        for file in [&secret, &readable] {
            let said = opened(confinement.spawn(qemu_opening(&qemu, file)).unwrap())
                .expect_err("the confined VMM opened a host file");
            assert!(said.contains("No such file or directory"), "{said}");
        }
        // Control: QEMU as root, unconfined, opens both.
        for file in [&secret, &readable] {
            assert_eq!(
                opened(spawn(qemu_opening(&qemu, file), None).unwrap()),
                Ok(0)
            );
        }
        // Control: the confined VMM opens the file of its own directory, as its own user.
        let given = confinement.dir().join("given");
        assert_eq!(given, Path::new("/vm/given"));
        assert_eq!(
            opened(confinement.spawn(qemu_opening(&qemu, &given)).unwrap()),
            Ok(uid)
        );
        // ... and a file reached for it, read-only, through the descriptor upstream opened.
        let reached = confinement.reach(&readable).unwrap();
        assert!(reached.starts_with(jail::REACHED), "{}", reached.display());
        assert_eq!(
            opened(confinement.spawn(qemu_opening(&qemu, &reached)).unwrap()),
            Ok(uid)
        );
        // Its user still counts in its root: a host file only root may read, put there
        // as it is, is refused to it.
        let said = opened(
            confinement
                .spawn_handing(qemu_opening(&qemu, &secret), &[], &[&secret])
                .unwrap(),
        )
        .expect_err("the confined VMM opened a file only root may read");
        assert!(said.contains("Permission denied"), "{said}");
    }

    /// What `sh` finds of the paths it is given, and of the root, with builtins only (no
    /// other program is in a VMM's root): `present`/`absent` by `[ -e ]` (a stat), `read`
    /// and the first line where a redirection opens it, the root's entries by a glob.
    const PROBE: &str = r#"for p in "$@"; do
        if [ -e "$p" ]; then echo "present $p"; else echo "absent $p"; fi
        if read -r line < "$p"; then echo "read $p: $line"; fi
    done 2>/dev/null
    echo "root:" /*"#;

    fn probe(files: &[&Path]) -> Command {
        let mut command = Command::new("/bin/sh");
        command
            .args(["-c", PROBE, "probe"])
            .args(files)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        command
    }

    fn probed(child: Child) -> String {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn a_confined_vmm_cannot_stat_what_the_host_lets_anyone_read() {
        if !nix::unistd::Uid::effective().is_root() {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (needs root): a_confined_vmm_cannot_stat_what_the_host_lets_anyone_read"
            );
            return;
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        // What the host lets any user read: a world-readable file in a world-searchable
        // directory, and the host's users.
        let open_dir = tempfile::Builder::new()
            .prefix("upstream-confine-")
            .tempdir()
            .unwrap();
        fs::set_permissions(open_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let public = open_dir.path().join("public");
        fs::write(&public, "anyone may read this\n").unwrap();
        fs::set_permissions(&public, fs::Permissions::from_mode(0o644)).unwrap();
        let passwd = Path::new("/etc/passwd");
        let vm_dir = vm_dir();
        fs::write(vm_dir.path().join("given"), "the VM's own\n").unwrap();
        let kernel = open_dir.path().join("kernel");
        fs::write(&kernel, "a file it reads\n").unwrap();
        fs::set_permissions(&kernel, fs::Permissions::from_mode(0o644)).unwrap();

        // `sh` in place of the VMM, confined as the VMM is.
        let host = Host::new();
        let limits = VmmLimits::for_guest(64 << 20, QEMU_OVERHEAD, 1, None);
        let mut confinement = host.confine(vm_dir.path(), &limits).unwrap();
        let reached = confinement.reach(&kernel).unwrap();
        let given = confinement.dir().join("given");
        let elsewhere = [
            passwd,
            public.as_path(),
            open_dir.path(),
            Path::new("/proc/self/status"),
            Path::new("/sys/kernel"),
            Path::new("/home"),
            Path::new("/root"),
            Path::new("/tmp"),
            Path::new("/etc"),
        ];
        let mut asked: Vec<&Path> = elsewhere.to_vec();
        asked.extend([given.as_path(), reached.as_path()]);
        let inside = probed(confinement.spawn(probe(&asked)).unwrap());
        for path in elsewhere {
            let p = path.display();
            assert!(inside.contains(&format!("absent {p}\n")), "{p}:\n{inside}");
            assert!(!inside.contains(&format!("read {p}:")), "{p}:\n{inside}");
        }
        // Control: its own files are there, and read, as its own user.
        assert!(
            inside.contains(&format!("read {}: the VM's own\n", given.display())),
            "{inside}"
        );
        assert!(
            inside.contains(&format!("read {}: a file it reads\n", reached.display())),
            "{inside}"
        );
        // Its root: what it runs on and what it was given, nothing of the host's.
        let root = inside
            .lines()
            .find_map(|l| l.strip_prefix("root: "))
            .unwrap_or_else(|| panic!("{inside}"));
        let mut entries: Vec<&str> = root.split_whitespace().collect();
        entries.retain(|e| !["/lib", "/lib64", "/usr", "/bin"].contains(e));
        assert_eq!(entries, ["/dev", "/reached", "/vm"], "{root}");

        // The control: the same probe, unconfined, finds the host's files it was denied.
        let outside = probed(spawn(probe(&elsewhere), None).unwrap());
        for path in [passwd, public.as_path(), open_dir.path(), Path::new("/etc")] {
            let p = path.display();
            assert!(
                outside.contains(&format!("present {p}\n")),
                "{p}:\n{outside}"
            );
        }
        assert!(
            outside.contains(&format!(
                "read {}: anyone may read this\n",
                public.display()
            )),
            "{outside}"
        );
        assert!(
            outside.contains(&format!("read {}: root:", passwd.display())),
            "{outside}"
        );
    }

    #[test]
    fn what_a_gone_upstream_left_in_its_cgroups_is_killed_and_the_cgroups_removed() {
        if qemu_as_root(
            "what_a_gone_upstream_left_in_its_cgroups_is_killed_and_the_cgroups_removed",
        )
        .is_none()
        {
            return;
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let layout = Layout::detect();
        let wanted = Wanted {
            pids: Some(16),
            ..Wanted::default()
        };
        // An owner that is gone: a process that ran and was reaped.
        let mut gone = Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let live = upstream_sandbox::cgroup::owned_name("vm", 1_000_000);
        let stale = upstream_sandbox::cgroup::owned_name("vm", 7).replacen(
            &format!("upstream-{}-", std::process::id()),
            &format!("upstream-{}-", gone.id()),
            1,
        );
        let mut sleepers = Vec::new();
        let mut dirs = Vec::new();
        // The live one first: making a cgroup removes stale ones beside it.
        for name in [&live, &stale] {
            let (cgroups, unenforced) = Cgroups::create(&layout, name, &wanted);
            assert!(unenforced.is_empty(), "{unenforced:?}");
            let sleeper = Command::new("sleep").arg("60").spawn().unwrap();
            cgroups.add(sleeper.id()).unwrap();
            dirs.push(cgroups.dir_of(Controller::Pids).unwrap().to_path_buf());
            sleepers.push(sleeper);
            // Left behind, as by an upstream killed outright.
            std::mem::forget(cgroups);
        }
        let _ = Host::new();
        let mut stale_sleeper = sleepers.remove(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while stale_sleeper.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the stale cgroup's process lives on"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!dirs[1].exists(), "{} remains", dirs[1].display());
        // Control: the cgroup of a live upstream (this process) and its process stay.
        let mut live_sleeper = sleepers.remove(0);
        assert!(
            live_sleeper.try_wait().unwrap().is_none(),
            "a live owner's process was killed"
        );
        assert!(dirs[0].exists());
        let _ = live_sleeper.kill();
        let _ = live_sleeper.wait();
        let _ = fs::remove_dir(&dirs[0]);
    }
}

//! What holds a jailed Firecracker besides its jailer, and how it ends with upstream.
//!
//! Firecracker's jailer chroots Firecracker into a jail of its own (only the VM's files are
//! linked in) and drops it to a uid and gid. Upstream gives it the rest, as it gives QEMU
//! ([`crate::confine`], whose id ranges and cgroups these are):
//!
//! - **cgroups of its own**, sized for its guest (its RAM and
//!   [`Vmm::memory_overhead`](crate::vmm::Vmm::memory_overhead)), joined between fork and
//!   exec of the jailer: the jailer is given no `--cgroup` of its own to make, so neither it
//!   nor Firecracker ever runs outside them, and they are named, removed and swept as QEMU's
//!   are (the next upstream empties and removes those of one that is gone);
//! - **a user of its own**: the first id of a host id range held for the VM's life
//!   (`upstream_sandbox::ids`), given to the jailer as `--uid` and `--gid`, so no two VMs
//!   share an id (unless `$UPSTREAM_JAILER_IDS` names one for all, which the sandbox then
//!   lists as unenforced);
//! - no new privileges, no core dumps, an empty environment;
//! - **an end with upstream's.** The parent-death signal a child of upstream's asks for is
//!   cleared when its credentials change, so the jailer's drop to its uid (and its exec of
//!   Firecracker) undoes it: a jailed Firecracker would outlive an upstream killed outright.
//!   So every jailer is forked into a pid namespace whose init is upstream's *keeper*: a
//!   process upstream forks once (its own binary again, [`KEEPER_ARG`]), which drops
//!   nothing, asks for SIGKILL when upstream dies and also ends when its standard input — a
//!   pipe whose other end only upstream holds — reaches its end. When a pid namespace's
//!   init ends the kernel kills every process in it, whatever its uid, cgroup or signals:
//!   nothing a VM does undoes that, nothing escapes it (a jailer is in the namespace from
//!   its first instruction, before it could fork), and it needs no cgroup version of its
//!   own. A watchdog that killed the VMs' cgroups on upstream's end would have to race the
//!   VMs starting and the cgroups' layout; the namespace has neither.
//!
//! The jailers are forked by a thread of their own, the only one whose children go into the
//! keeper's namespace (`unshare(CLONE_NEWPID)` changes where the calling thread's children
//! go, and nothing else): every other child of upstream stays in upstream's namespace. The
//! thread lives as long as upstream, so the jailers' parent is upstream (`Child` watches and
//! reaps them as any child), and the keeper's parent-death signal comes when upstream ends,
//! never before. A keeper that is gone (killed by hand: its VMs went with it) is replaced
//! on the next start. The thread makes no thread of its own: a thread whose children go to
//! another pid namespace cannot (`CLONE_THREAD` there is `EINVAL`).

use std::ffi::{CString, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;

use nix::sched::CloneFlags;

use crate::confine::Confinement;

/// The argument that makes upstream's binary the keeper of the jailed VMs' pid namespace.
pub const KEEPER_ARG: &str = "__vm-jail-keeper";

/// How the keeper is started: `program` with `args` (upstream's binary and [`KEEPER_ARG`],
/// [`Keeper::of`]), as pid 1 of a new pid namespace, its standard input upstream's pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keeper {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl Keeper {
    /// The keeper that upstream's binary `exe` is when started with [`KEEPER_ARG`].
    pub fn of(exe: &Path) -> Keeper {
        Keeper {
            program: exe.to_path_buf(),
            args: vec![KEEPER_ARG.into()],
        }
    }
}

/// Errors of the keeper's own process.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error(
        "`{KEEPER_ARG}` makes this program the first process of the pid namespace jailed VMs run in, which upstream starts itself: it is not pid 1 here"
    )]
    NotInit,
    #[error("the keeper of the jailed VMs cannot watch upstream: {0}")]
    Watch(nix::Error),
}

/// Whether this process was started as the keeper ([`KEEPER_ARG`]).
pub fn is_keeper() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == KEEPER_ARG)
}

/// The keeper's life: it waits for upstream's end — its standard input ending, or its
/// parent-death signal — reaping whatever the namespace leaves to it, and returns then; its
/// end (the binary's exit) ends every process of the namespace.
pub fn keep() -> Result<(), KeeperError> {
    if std::process::id() != 1 {
        return Err(KeeperError::NotInit);
    }
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let stdin = io::stdin();
    loop {
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => {
                let mut bytes = [0u8; 64];
                match nix::unistd::read(stdin.as_fd(), &mut bytes) {
                    // Upstream's end is closed: it is gone.
                    Ok(0) => return Ok(()),
                    Ok(_) | Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                    Err(e) => return Err(KeeperError::Watch(e)),
                }
            }
            Err(e) => return Err(KeeperError::Watch(e)),
        }
        // Orphans of the namespace are the keeper's to reap (a jailer run with
        // `--daemonize` leaves one); upstream reaps its own children.
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
    }
}

/// Starts `command` (the jailer) in the keeper's pid namespace, in `confinement`'s cgroups
/// (if it has one), with network, IPC and host-name namespaces of its own (an empty network
/// namespace: Firecracker's guest has no network device, and its API and vsock sockets are
/// files, which reach across namespaces), an empty environment, no new privileges, no core
/// dumps and SIGKILL as its parent-death signal until the jailer's drop to its uid clears
/// it.
pub(crate) fn spawn(
    mut command: Command,
    confinement: Option<&Confinement>,
    keeper: &Keeper,
) -> io::Result<Child> {
    let procs: Vec<CString> = confinement
        .map(Confinement::procs_files)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
        .collect();
    command.env_clear();
    // SAFETY: the closure runs between fork and exec in a multi-threaded process: it makes
    // only async-signal-safe system calls (open, write, close, close_range, fcntl, setrlimit,
    // prctl, unshare) and allocates nothing: its strings were made before the fork.
    unsafe {
        command.pre_exec(move || {
            for file in &procs {
                crate::confine::join_cgroup(file)?;
            }
            if libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) < 0 {
                return Err(io::Error::last_os_error());
            }
            crate::confine::hand_over(&[])?;
            crate::confine::no_core_no_new_privileges()?;
            killed_with_parent()
        });
    }
    spawn_in_namespace(command, keeper)
}

/// Asks for SIGKILL when the forking thread ends. Without the check `die_with_parent` makes
/// (`upstream_sandbox::spawner`): from inside the keeper's namespace the parent is not seen
/// (`getppid` is 0), and an upstream gone before this call took the keeper, and with it
/// everything in its namespace, along.
///
/// # Safety
/// Only async-signal-safe calls: fit to run in a `pre_exec` closure.
unsafe fn killed_with_parent() -> io::Result<()> {
    // SAFETY: prctl takes plain integers.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

type Job = (Command, Keeper, mpsc::SyncSender<io::Result<Child>>);

/// Spawns `command` from the jails' thread (started on first use), into the namespace of a
/// keeper started as `keeper` says (on first use, or once the last one is gone).
fn spawn_in_namespace(command: Command, keeper: &Keeper) -> io::Result<Child> {
    static JAILS: OnceLock<Result<mpsc::Sender<Job>, String>> = OnceLock::new();
    let jobs = JAILS.get_or_init(|| {
        let (send, receive) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("upstream-jails".into())
            // The sender lives in a static: the thread ends only with the process.
            .spawn(move || serve(receive))
            .map(|_| send)
            .map_err(|e| e.to_string())
    });
    let gone = || io::Error::other("the thread that starts jailed VMs is gone");
    let jobs = jobs
        .as_ref()
        .map_err(|why| io::Error::other(format!("cannot start jailed VMs: {why}")))?;
    let (answer, answered) = mpsc::sync_channel(1);
    jobs.send((command, keeper.clone(), answer))
        .map_err(|_| gone())?;
    answered.recv().map_err(|_| gone())?
}

/// The jails' thread: forks each jailer into the keeper's namespace.
fn serve(jobs: mpsc::Receiver<Job>) {
    let mut jails = Jails {
        // This thread's own pid namespace (upstream's), to come back to before making
        // another.
        own: fs::File::open("/proc/thread-self/ns/pid"),
        namespace: None,
        retired: Vec::new(),
    };
    for (mut command, keeper, answer) in jobs {
        jails
            .retired
            .retain_mut(|k| matches!(k.try_wait(), Ok(None)));
        let mut spawned = jails.spawn(&mut command, &keeper);
        // A keeper that ended just now: its namespace takes no process (ENOMEM). Once more,
        // in a new one.
        if spawned
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::ENOMEM))
            && !jails.namespace.as_ref().is_some_and(Namespace::alive)
        {
            spawned = jails.spawn(&mut command, &keeper);
        }
        let _ = answer.send(spawned);
    }
}

/// What the jails' thread holds.
struct Jails {
    own: io::Result<fs::File>,
    namespace: Option<Namespace>,
    /// Keepers of namespaces that ended, reaped once they are through: a keeper's end waits
    /// for every process of its namespace to be reaped, by upstream as their parent.
    retired: Vec<Child>,
}

impl Jails {
    /// Spawns `command` in the keeper's namespace, made anew (its keeper started as `keeper`
    /// says) if there is none or its keeper is ending.
    fn spawn(&mut self, command: &mut Command, keeper: &Keeper) -> io::Result<Child> {
        if !self.namespace.as_ref().is_some_and(Namespace::alive) {
            self.retired.extend(self.namespace.take().map(|n| n.keeper));
            let own = self.own.as_ref().map_err(|e| {
                io::Error::other(format!("cannot read upstream's pid namespace: {e}"))
            })?;
            self.namespace = Some(Namespace::new(own, keeper)?);
        }
        command.spawn()
    }
}

/// The pid namespace the jails' thread forks into, and its keeper.
struct Namespace {
    keeper: Child,
    /// The end of the keeper's standard input that only upstream holds (close-on-exec):
    /// closed when upstream ends, however it ends.
    _upstream_end: OwnedFd,
    /// The other end of the keeper's standard output, which it never writes: it hangs up
    /// as the keeper starts to end, before the keeper waits for its namespace to empty
    /// (and so before `try_wait` would tell).
    life: OwnedFd,
}

impl Namespace {
    /// A new namespace, its first process (pid 1) the keeper. The calling thread's children
    /// go into it from now on.
    fn new(own: &fs::File, keeper: &Keeper) -> io::Result<Namespace> {
        let fail = |what: &str, e: nix::Error| {
            io::Error::other(format!(
                "cannot make the pid namespace jailed VMs run in ({what}: {e}); the jailer \
                 needs root's privileges too"
            ))
        };
        // Back to upstream's own first: a namespace is made below the one this thread is in.
        nix::sched::setns(own, CloneFlags::CLONE_NEWPID).map_err(|e| fail("setns", e))?;
        nix::sched::unshare(CloneFlags::CLONE_NEWPID).map_err(|e| fail("unshare", e))?;
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| fail("pipe", e));
        let ((read, write), (life, lives)) = (pipe()?, pipe()?);
        let mut command = Command::new(&keeper.program);
        command
            .args(&keeper.args)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::from(read))
            .stdout(Stdio::from(lives))
            .stderr(Stdio::null());
        // SAFETY: killed_with_parent makes only async-signal-safe calls.
        unsafe {
            command.pre_exec(|| killed_with_parent());
        }
        let keeper = command.spawn().map_err(|e| {
            io::Error::other(format!(
                "cannot start the keeper of jailed VMs ({}): {e}",
                keeper.program.display()
            ))
        })?;
        Ok(Namespace {
            keeper,
            _upstream_end: write,
            life,
        })
    }

    /// Whether its keeper runs: a namespace whose init is ending takes no process.
    fn alive(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.life.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => true,
            Ok(_) => !fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            Err(_) => false,
        }
    }
}

/// Connects to the Unix socket at `path` without following a link there: a jailed
/// Firecracker owns the directory its sockets are in, and could have put a link to another
/// of the host's sockets (another VM's, a daemon's) in their place. The socket is opened as a
/// path (`O_PATH`, `O_NOFOLLOW`), checked to be a socket, and connected to through its
/// descriptor.
pub fn connect_unfollowed(path: &Path) -> io::Result<UnixStream> {
    use nix::fcntl::OFlag;
    let fd = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let stat = nix::sys::stat::fstat(&fd)?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is no socket", path.display()),
        ));
    }
    UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Moves `from`, a file Firecracker wrote in its jail, to `to` outside it, made upstream's and
/// read-only (every VM restored from a snapshot reads it as a user of its own). As the jail
/// is Firecracker's to change, `from` is opened without following a link or waiting on a
/// FIFO, and must be a regular file of one link; what lands at `to` must be that file (else it
/// is removed), and it is changed through the descriptor opened, never through a path.
pub(crate) fn take_out(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(from)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(io::Error::other(format!(
            "{} is not a file of Firecracker's own",
            from.display()
        )));
    }
    let taken = match fs::rename(from, to) {
        Ok(()) => {
            let landed = fs::symlink_metadata(to)?;
            if (landed.dev(), landed.ino()) != (meta.dev(), meta.ino()) {
                let _ = fs::remove_file(to);
                return Err(io::Error::other(format!(
                    "{} was changed as it was moved",
                    from.display()
                )));
            }
            file
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let _ = fs::remove_file(to);
            let mut copy = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(to)?;
            io::copy(&mut &file, &mut copy)?;
            let _ = fs::remove_file(from);
            copy
        }
        Err(e) => return Err(e),
    };
    std::os::unix::fs::fchown(
        &taken,
        Some(nix::unistd::geteuid().as_raw()),
        Some(nix::unistd::getegid().as_raw()),
    )?;
    taken.set_permissions(fs::Permissions::from_mode(0o444))
}

/// Removes the jails under `base` (`<base>/<Firecracker's name>/upstream-<pid>-…`) of VMs
/// whose upstream is gone: their Firecrackers died with it, and their cgroups are swept
/// with QEMU's ([`crate::confine::Host::new`]).
pub fn remove_stale_jails(base: &Path) {
    let Ok(programs) = fs::read_dir(base) else {
        return;
    };
    for program in programs.flatten() {
        let Ok(jails) = fs::read_dir(program.path()) else {
            continue;
        };
        for jail in jails.flatten() {
            let name = jail.file_name();
            let Some(pid) = name.to_str().and_then(upstream_sandbox::cgroup::owner_pid) else {
                continue;
            };
            let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                == Err(nix::errno::Errno::ESRCH);
            if gone {
                let _ = fs::remove_dir_all(jail.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keeper_that_is_not_pid_1_refuses_to_run() {
        let e = keep().unwrap_err();
        assert!(matches!(e, KeeperError::NotInit), "{e}");
        assert!(e.to_string().contains("not pid 1"), "{e}");
        let keeper = Keeper::of(Path::new("/usr/bin/upstream"));
        assert_eq!(keeper.args, [KEEPER_ARG]);
    }

    #[test]
    fn a_link_planted_for_a_socket_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("other.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        // The control: the socket itself is reached.
        assert!(connect_unfollowed(&socket).is_ok());
        // A link to it, where a VM's socket should be, is not.
        let planted = dir.path().join("v.sock");
        std::os::unix::fs::symlink(&socket, &planted).unwrap();
        assert!(
            UnixStream::connect(&planted).is_ok(),
            "the link leads to the socket"
        );
        let e = connect_unfollowed(&planted).unwrap_err();
        assert!(e.to_string().contains("no socket"), "{e}");
        // Nor is a file that is no socket.
        let file = dir.path().join("fc.sock");
        fs::write(&file, "").unwrap();
        assert!(connect_unfollowed(&file).is_err());
    }

    #[test]
    fn what_is_taken_out_of_a_jail_is_a_file_of_its_own_and_nothing_it_leads_to() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let (jail, out) = (dir.path().join("jail"), dir.path().join("out"));
        fs::create_dir_all(&jail).unwrap();
        fs::create_dir_all(&out).unwrap();
        // A host file a link in the jail leads to: neither moved nor changed.
        let secret = dir.path().join("secret");
        fs::write(&secret, "secret").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let link = jail.join("snapshot.state");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(take_out(&link, &out.join("state")).is_err());
        assert_eq!(fs::metadata(&secret).unwrap().mode() & 0o777, 0o600);
        assert!(!out.join("state").exists());
        // A FIFO is refused at once, not waited on.
        let fifo = jail.join("snapshot.mem");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(take_out(&fifo, &out.join("mem")).is_err());
        // A second link to a file (its disk, say) is refused.
        let disk = jail.join("scratch.ext4");
        fs::write(&disk, "disk").unwrap();
        let mode = fs::metadata(&disk).unwrap().mode();
        let linked = jail.join("linked");
        fs::hard_link(&disk, &linked).unwrap();
        assert!(take_out(&linked, &out.join("mem")).is_err());
        assert_eq!(fs::metadata(&disk).unwrap().mode(), mode);
        // The control: a file of its own is moved out, upstream's and read-only.
        let written = jail.join("written");
        fs::write(&written, "state").unwrap();
        fs::set_permissions(&written, fs::Permissions::from_mode(0o600)).unwrap();
        take_out(&written, &out.join("state")).unwrap();
        assert!(!written.exists());
        let meta = fs::metadata(out.join("state")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o444);
        assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
        assert_eq!(fs::read_to_string(out.join("state")).unwrap(), "state");
    }

    #[test]
    fn jails_of_a_gone_upstream_are_removed_and_live_ones_kept() {
        let base = tempfile::tempdir().unwrap();
        let mut gone = Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let stale = base
            .path()
            .join(format!("firecracker/upstream-{}-a-0", gone.id()));
        let live = base
            .path()
            .join(format!("firecracker/upstream-{}-b-0", std::process::id()));
        let other = base.path().join("firecracker/not-upstreams");
        for jail in [&stale, &live, &other] {
            fs::create_dir_all(jail.join("root/dev")).unwrap();
        }
        remove_stale_jails(base.path());
        assert!(!stale.exists());
        // The controls: this process's jail, and one not named by upstream, stay.
        assert!(live.join("root/dev").is_dir());
        assert!(other.is_dir());
    }
}

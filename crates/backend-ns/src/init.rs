//! The sandbox side of the namespace backend: the sandbox's init, which builds the sandbox
//! from the inside and becomes its agent.
//!
//! The init starts in one of two ways (see `launch`). Cloned by a single-threaded host into new
//! user and pid namespaces, it is pid 1 at once, makes the other namespaces itself while the
//! host writes its id maps, then waits for its configuration. Re-executed
//! by a multi-threaded host (stage 1), it creates the user namespace, gets its id maps,
//! unshares the mount, pid, uts, ipc, cgroup and (by default) network namespaces and forks
//! pid 1; stage 1 then only waits, and if it dies the kernel kills pid 1 (parent-death
//! signal). Either way pid 1 (stage 2) builds the root filesystem, pivots into it, locks
//! itself down and becomes the agent; when pid 1 dies the kernel kills every other process of
//! the sandbox.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Uid, fork};
use upstream_agent::protocol::{Response, read_frame, write_frame, write_hello};

use crate::setup::{FromInit, IdMap, InitConfig, ToInit};
use crate::{idmap, mounts, security};

/// The descriptor the host leaves the connection on.
pub const CONN_FD: RawFd = 3;
/// The descriptor of the lock on the sandbox's id range (as root), held until pid 1 is gone.
pub const LOCK_FD: RawFd = 4;

/// Exit code of an init that could not set the sandbox up.
const SETUP_FAILED: i32 = 125;

/// How the init came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// Re-executed by a multi-threaded host: it makes the namespaces itself and forks pid 1.
    Exec,
    /// Cloned by a single-threaded host into new user and pid namespaces: it is pid 1, and the
    /// host writes its id maps before sending the configuration.
    Cloned { new_net: bool },
}

/// Runs the init of a re-executed upstream; returns the process's exit code.
pub fn main() -> i32 {
    run(Entry::Exec)
}

/// Runs the init in a process the host cloned into new user and pid namespaces.
pub fn cloned_main(new_net: bool) -> i32 {
    run(Entry::Cloned { new_net })
}

fn run(entry: Entry) -> i32 {
    // SAFETY: the host placed its end of a socket pair at CONN_FD; nothing else in this
    // process owns that descriptor.
    let mut conn = unsafe { UnixStream::from_raw_fd(CONN_FD) };
    // Commands run in the sandbox must not inherit the connection to the host.
    let _ = nix::fcntl::fcntl(
        &conn,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    // Nor the lock of the id range, when there is one (a re-executed init gets it open).
    // SAFETY: F_SETFD takes an integer; on a number that is not open it fails with EBADF.
    unsafe { libc::fcntl(LOCK_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    match prepare(&mut conn, entry) {
        Ok(code) => code,
        Err(message) => {
            setup_failed(&mut conn, message);
            SETUP_FAILED
        }
    }
}

/// Tells the host why the sandbox could not be set up, as the agent's first word would be
/// (after the greeting the agent would have sent).
fn setup_failed(conn: &mut UnixStream, message: String) {
    let _ = write_hello(conn).and_then(|()| write_frame(conn, &Response::SetupFailed { message }));
}

fn prepare(conn: &mut UnixStream, entry: Entry) -> Result<i32, String> {
    // Work that needs no configuration is done while the host is still preparing: the
    // remaining namespaces, and the seccomp filter.
    if let Entry::Cloned { new_net } = entry {
        let mut flags =
            CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
        if new_net {
            flags |= CloneFlags::CLONE_NEWNET;
        }
        unshare(flags).map_err(|e| format!("cannot create the sandbox's namespaces: {e}"))?;
    }
    let filter = security::filter().map_err(|e| e.to_string())?;
    let config = match read_frame::<_, ToInit>(conn) {
        Ok(Some(ToInit::Config(c))) => c,
        Ok(_) => return Err("the host sent no configuration".into()),
        Err(e) => return Err(e.to_string()),
    };
    // Paths below are relative to the sandbox directory, so nothing above it needs to be
    // searchable by the sandbox's (unprivileged) root.
    nix::unistd::chdir(config.sandbox_dir.as_str())
        .map_err(|e| format!("cannot enter {}: {e}", config.sandbox_dir))?;
    let mounts = match entry {
        Entry::Exec => enter_namespaces(conn, &config)?,
        // The host moved this process into its cgroups before sending the configuration: a
        // cgroup namespace made now has them as its root.
        Entry::Cloned { .. } => {
            let mounts = receive_mounts(conn, &config)?;
            unshare(CloneFlags::CLONE_NEWCGROUP)
                .map_err(|e| format!("cannot create the sandbox's cgroup namespace: {e}"))?;
            mounts
        }
    };
    if !mounts.is_empty() {
        attach_mounts(&config, &mounts)?;
    }
    // The shared skeleton is opened while this process still has its host ids (so the path to
    // it need not be searchable by sandbox root) and is in the new mount namespace (so the
    // overlay can use it); the mount reaches it through /proc/self/fd.
    let skeleton = match &config.skeleton {
        Some(path) => {
            Some(crate::open_path_dir(path).map_err(|e| format!("cannot open {path}: {e}"))?)
        }
        None => None,
    };
    // An image's layers likewise: its cache need not be searchable by sandbox root.
    let mut config = config;
    let image_layers = config
        .layers
        .iter()
        .map(|path| {
            crate::open_path_dir(path)
                .map_err(|e| format!("cannot open the image layer {path}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    config.layers = image_layers
        .iter()
        .map(|fd| format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .collect();
    if let IdMap::Range { .. } = config.id_map {
        nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    }
    nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .map_err(|e| format!("cannot become the sandbox's root group: {e}"))?;
    nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(|e| format!("cannot become the sandbox's root: {e}"))?;
    let lower = skeleton
        .as_ref()
        .map(|fd| format!("/proc/self/fd/{}", fd.as_raw_fd()));
    if let Entry::Cloned { .. } = entry {
        return Ok(stage2(conn, &config, lower.as_deref(), &filter));
    }
    // SAFETY: this process is single-threaded (a fresh exec that started no threads), so the
    // child may run any code after fork.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => std::process::exit(stage2(conn, &config, lower.as_deref(), &filter)),
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("waitpid: {e}")),
            }
        },
    }
}

/// The idmapped mounts the host sends when the configuration says so.
fn receive_mounts(conn: &UnixStream, config: &InitConfig) -> Result<Vec<OwnedFd>, String> {
    if !config.idmapped {
        return Ok(Vec::new());
    }
    let mounts =
        idmap::recv_fds(conn).map_err(|e| format!("cannot receive the sandbox's mounts: {e}"))?;
    let expected = 1 + usize::from(config.skeleton.is_some()) + config.layers.len();
    if mounts.len() != expected {
        return Err(format!(
            "the host sent {} mounts for the sandbox, not {expected}",
            mounts.len()
        ));
    }
    Ok(mounts)
}

/// Attaches the idmapped mounts over the sandbox directory, the skeleton and the layers, in
/// this mount namespace only, and enters the sandbox directory's again.
fn attach_mounts(config: &InitConfig, mounts: &[OwnedFd]) -> Result<(), String> {
    // Nothing attached here may reach the host's mount namespace.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make the sandbox's mounts private: {e}"))?;
    let targets = std::iter::once(&config.sandbox_dir)
        .chain(config.skeleton.as_ref())
        .chain(&config.layers);
    for (mount, target) in mounts.iter().zip(targets) {
        idmap::attach(mount, target).map_err(|e| format!("cannot mount {target}: {e}"))?;
    }
    nix::unistd::chdir(config.sandbox_dir.as_str())
        .map_err(|e| format!("cannot enter {}: {e}", config.sandbox_dir))
}

/// Stage 1 of a re-executed init: the user namespace (and its maps, and the idmapped mounts
/// made with them), then the others. The caller then forks, so the child is pid 1 of the new
/// pid namespace.
fn enter_namespaces(conn: &mut UnixStream, config: &InitConfig) -> Result<Vec<OwnedFd>, String> {
    let (uid, gid) = (Uid::current(), Gid::current());
    unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("cannot create a user namespace: {e}"))?;
    match config.id_map {
        IdMap::Range { .. } => {
            write_frame(conn, &FromInit::MapIds).map_err(|e| e.to_string())?;
            match read_frame::<_, ToInit>(conn) {
                Ok(Some(ToInit::Mapped)) => {}
                Ok(_) => return Err("the host did not map the sandbox's ids".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
        IdMap::Own => {
            std::fs::write("/proc/self/setgroups", "deny")
                .map_err(|e| format!("setgroups: {e}"))?;
            std::fs::write("/proc/self/uid_map", format!("0 {uid} 1"))
                .map_err(|e| format!("cannot write the uid map: {e}"))?;
            std::fs::write("/proc/self/gid_map", format!("0 {gid} 1"))
                .map_err(|e| format!("cannot write the gid map: {e}"))?;
        }
    }
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWCGROUP;
    if config.new_net {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    let mounts = receive_mounts(conn, config)?;
    unshare(flags).map_err(|e| format!("cannot create the sandbox's namespaces: {e}"))?;
    Ok(mounts)
}

/// Pid 1 of the sandbox.
fn stage2(
    conn: &mut UnixStream,
    config: &InitConfig,
    skeleton: Option<&str>,
    filter: &seccompiler::BpfProgram,
) -> i32 {
    // If its parent dies (the host, or stage 1, killed), so does the whole sandbox. Set here,
    // after the uid change, which clears it.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let setup = mounts::build_root(config, skeleton)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            security::lock_down(config.max_processes, filter).map_err(|e| e.to_string())
        });
    if let Err(message) = setup {
        setup_failed(conn, message);
        return SETUP_FAILED;
    }
    let conn = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return SETUP_FAILED,
    };
    match upstream_agent::serve(conn) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

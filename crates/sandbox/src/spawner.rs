//! Children that die with this process, whichever thread asks for them.
//!
//! A child that must not outlive upstream (a sandbox's init, a VM's monitor) asks the kernel
//! for SIGKILL when its parent dies (`PR_SET_PDEATHSIG`). The kernel's "parent" is the
//! *thread* that forked the child: a child forked by a thread that then ends — a daemon's
//! blocking thread let go when idle, a thread a library call made for a moment — is killed
//! with that thread while upstream runs on. So children are forked here, by one thread that
//! lives as long as the process: the signal then comes when the process ends, however it
//! ends, and never before.

use std::io;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc;

type Job = (Command, mpsc::SyncSender<io::Result<Child>>);

/// Spawns `command` from the process's spawning thread (started on first use). The caller's
/// `pre_exec` closures run in the child as usual; one of them should call
/// [`die_with_parent`] last.
pub fn spawn(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let jobs = SPAWNER.get_or_init(|| {
        let (send, receive) = mpsc::channel::<Job>();
        let started = std::thread::Builder::new()
            .name("upstream-spawner".into())
            .spawn(move || {
                // The sender lives in a static: this loop ends only with the process.
                for (mut command, answer) in receive {
                    let _ = answer.send(command.spawn());
                }
            });
        if let Err(e) = started {
            // Without the thread every job fails, saying why, rather than the process.
            let (fail, failing) = mpsc::channel::<Job>();
            let why = e.to_string();
            let _ = std::thread::Builder::new().spawn(move || {
                for (_, answer) in failing {
                    let _ = answer.send(Err(io::Error::other(why.clone())));
                }
            });
            return fail;
        }
        send
    });
    let (answer, answered) = mpsc::sync_channel(1);
    jobs.send((command, answer))
        .map_err(|_| io::Error::other("the thread that starts upstream's children is gone"))?;
    answered
        .recv()
        .map_err(|_| io::Error::other("the thread that starts upstream's children is gone"))?
}

/// Asks for SIGKILL when this child's parent dies, and dies at once if it already has (its
/// parent is no longer `parent`, the pid of the process that forked it). To be called
/// between fork and exec, after the child's last change of credentials, which clears the
/// request.
///
/// # Safety
/// Only async-signal-safe calls: fit to run in a `pre_exec` closure.
pub unsafe fn die_with_parent(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: prctl, getppid and _exit take no pointers; all are async-signal-safe.
    unsafe {
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};

    /// Whether process `pid` is still there (and not a zombie waiting to be reaped).
    fn runs(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let state = s[s.rfind(')')? + 2..].chars().next()?;
                Some(state != 'Z')
            })
            .unwrap_or(false)
    }

    fn sleeper() -> Command {
        let mut command = Command::new("sleep");
        command.arg("30");
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: die_with_parent is async-signal-safe.
        unsafe {
            command.pre_exec(move || die_with_parent(parent));
        }
        command
    }

    #[test]
    fn a_child_asked_for_by_a_thread_that_ends_lives_on() {
        let mut child = std::thread::spawn(|| spawn(sleeper()).unwrap())
            .join()
            .unwrap();
        let pid = child.id() as i32;
        // The asking thread is gone: a child it had forked itself would be killed now.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            runs(pid),
            "the child died with the thread that asked for it"
        );
        // Control: the same child forked by a thread that ends dies with that thread.
        let mut control = std::thread::spawn(|| sleeper().spawn().unwrap())
            .join()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while runs(control.id() as i32) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !runs(control.id() as i32),
            "a child forked by a thread that ended lived on: the control shows nothing"
        );
        let _ = control.wait();
        let _ = child.kill();
        let _ = child.wait();
    }
}

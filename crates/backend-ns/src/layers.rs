//! The workspace in layers: one overlay layer per step, so that a turn that fails can be
//! resumed with the workspace exactly as the steps before the failure left it.
//!
//! The workspace is an overlay of its own over the root's: `layers/0` .. `layers/<n>` in the
//! sandbox directory, the top one writable. Between steps, if the top layer holds anything,
//! the host stacks a new empty layer on it ([`Layers::checkpoint`]): a short-lived child
//! process enters the sandbox's mount and user namespaces, builds the new overlay from
//! descriptors (the new mount API: no path of the host need be visible inside) and swaps it
//! in. The descriptors it needs come from the sandbox's init, which kept them at fixed
//! numbers: the layers directory as a detached mount (`LAYERS_FD`) and the directory below
//! the workspace (`BASE_FD`); the child takes copies with `pidfd_getfd`. Nothing inside the
//! sandbox can reach them.
//!
//! When a turn does not pass, every layer below the top (and the root's writable layer) is
//! kept in `<runtime>/kept/<sandbox>/` for a later `--resume`; a resumed sandbox starts with
//! them moved back in below a fresh top layer. A sandbox directory holding a resumed set
//! names where it came from (`resume-from`), so that if upstream dies mid-turn the next start
//! puts the set back.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// Where the init keeps the layers directory, as a detached mount.
pub const LAYERS_FD: RawFd = 990;
/// Where the init keeps the directory the workspace's layers lie over.
pub const BASE_FD: RawFd = 991;

/// The name of the file that says which kept set a sandbox directory holds.
const RESUME_FROM: &str = "resume-from";

/// Moves `fd` to number `at` (close-on-exec), closing the original.
pub fn keep_fd(fd: OwnedFd, at: RawFd) -> io::Result<()> {
    // SAFETY: dup3 onto a number this process reserves for the purpose; `fd` stays owned
    // and is closed when dropped.
    let ret = unsafe { libc::dup3(fd.as_raw_fd(), at, libc::O_CLOEXEC) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `open_tree(path, OPEN_TREE_CLONE)`: a detached copy of the mount at `path`.
pub fn open_tree_clone(path: &str) -> io::Result<OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let path = CString::new(path).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: open_tree with a valid C string; the returned descriptor is new and ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A sandbox's workspace layers, seen from the host.
#[derive(Debug)]
pub struct Layers {
    /// `<sandbox>/layers`.
    dir: PathBuf,
    /// The workspace inside the sandbox.
    workspace: String,
    /// The writable layer's number.
    top: u32,
    /// Why layers can no longer be stacked, once that happened.
    pub broken: Option<String>,
}

impl Layers {
    /// Makes the layers of a new sandbox in `sandbox_dir`, moving in the set kept at `resume`
    /// if there is one. Returns the layers and how many kept root layers were moved in.
    pub fn prepare(
        sandbox_dir: &Path,
        workspace: &str,
        resume: Option<&Path>,
    ) -> io::Result<(Layers, u32)> {
        let dir = sandbox_dir.join("layers");
        make_dir(&dir)?;
        let (mut below, mut root_layers) = (0, 0);
        if let Some(kept) = resume {
            below = count(&kept.join("layers"));
            root_layers = count(&kept.join("rootlayers"));
            fs::write(
                sandbox_dir.join(RESUME_FROM),
                format!("{}\n{below}\n{root_layers}\n", kept.display()),
            )?;
            for i in 0..below {
                fs::rename(kept.join(format!("layers/{i}")), dir.join(i.to_string()))?;
            }
            if root_layers > 0 {
                make_dir(&sandbox_dir.join("rootlayers"))?;
            }
            for i in 0..root_layers {
                fs::rename(
                    kept.join(format!("rootlayers/{i}")),
                    sandbox_dir.join(format!("rootlayers/{i}")),
                )?;
            }
        }
        let layers = Layers {
            dir,
            workspace: workspace.to_string(),
            top: below,
            broken: None,
        };
        layers.make_top()?;
        Ok((layers, root_layers))
    }

    /// How many read-only layers lie below the writable one.
    pub fn below(&self) -> u32 {
        self.top
    }

    fn make_top(&self) -> io::Result<()> {
        make_dir(&self.dir.join(self.top.to_string()))?;
        make_dir(&self.dir.join(format!("{}.work", self.top)))
    }

    /// Stacks a fresh writable layer on the workspace of the sandbox whose pid 1 is `pid1`,
    /// if anything was written to the current one. Returns whether it did.
    pub fn checkpoint(&mut self, pid1: i32) -> io::Result<bool> {
        if let Some(why) = &self.broken {
            return Err(io::Error::other(why.clone()));
        }
        let top = self.dir.join(self.top.to_string());
        if fs::read_dir(&top)?.next().is_none() {
            return Ok(false);
        }
        self.top += 1;
        if let Err(e) = self.make_top().and_then(|()| self.stack(pid1)) {
            self.broken = Some(e.to_string());
            return Err(e);
        }
        Ok(true)
    }

    /// Runs the child that swaps the workspace's overlay for one with a new top layer.
    fn stack(&self, pid1: i32) -> io::Result<()> {
        let cstr =
            |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
        let names: Vec<CString> = (0..=self.top)
            .map(|i| cstr(&i.to_string()))
            .collect::<io::Result<_>>()?;
        let work = cstr(&format!("{}.work", self.top))?;
        let target = cstr(&self.workspace)?;
        let ns = |kind: &str| {
            let path = format!("/proc/{pid1}/ns/{kind}");
            nix::fcntl::open(
                path.as_str(),
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(io::Error::from)
        };
        let (mnt, user) = (ns("mnt")?, ns("user")?);
        // SAFETY: pidfd_open on the sandbox's pid 1, our own child or grandchild.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid1, 0) };
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor to us.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        let (report_read, report_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let plan = StackPlan {
            pidfd: pidfd.as_raw_fd(),
            mnt: mnt.as_raw_fd(),
            user: user.as_raw_fd(),
            names: &names,
            work: &work,
            target: &target,
            report: report_write.as_raw_fd(),
        };
        // SAFETY: the child runs only system calls on memory prepared above (no allocation,
        // no locks), so forking a multi-threaded process is sound; it ends with _exit.
        let child = unsafe { libc::fork() };
        if child < 0 {
            return Err(io::Error::last_os_error());
        }
        if child == 0 {
            // SAFETY: see above; `stack_in_child` never returns.
            unsafe { stack_in_child(&plan) };
        }
        drop(report_write);
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(child, &mut status, 0) };
        let mut report = [0u8; 8];
        let got = nix::unistd::read(&report_read, &mut report).unwrap_or(0);
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            return Ok(());
        }
        let (stage, errno) = if got == 8 {
            (
                i32::from_le_bytes(report[..4].try_into().expect("4 bytes")),
                i32::from_le_bytes(report[4..].try_into().expect("4 bytes")),
            )
        } else {
            (0, 0)
        };
        let what = STAGES
            .get(stage as usize)
            .copied()
            .unwrap_or("stack the layer");
        let mut message = format!("cannot {what}: {}", io::Error::from_raw_os_error(errno));
        if matches!(errno, libc::EINVAL | libc::ENOSYS) && (6..=10).contains(&stage) {
            message.push_str(" (layers from descriptors need Linux 6.8 or later)");
        }
        if stage >= DETACHED_STAGE || stage == 0 {
            // The workspace may be gone: nothing more can run in this sandbox.
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, message));
        }
        Err(io::Error::other(message))
    }

    /// After the sandbox has ended: moves every workspace layer below the top one, the kept
    /// root layers and the root's writable layer (from `sandbox_dir`) into `kept`.
    pub fn keep(&self, sandbox_dir: &Path, kept: &Path) -> io::Result<()> {
        fs::create_dir_all(kept.join("layers"))?;
        fs::create_dir_all(kept.join("rootlayers"))?;
        for i in 0..self.top {
            fs::rename(
                self.dir.join(i.to_string()),
                kept.join(format!("layers/{i}")),
            )?;
        }
        let roots = count(&sandbox_dir.join("rootlayers"));
        for i in 0..roots {
            fs::rename(
                sandbox_dir.join(format!("rootlayers/{i}")),
                kept.join(format!("rootlayers/{i}")),
            )?;
        }
        fs::rename(
            sandbox_dir.join("upper"),
            kept.join(format!("rootlayers/{roots}")),
        )?;
        make_dir(&sandbox_dir.join("upper"))?;
        self.forget_resume(sandbox_dir);
        Ok(())
    }

    /// The set a resumed sandbox started from is used up (moved in, then kept anew or
    /// discarded): its directory goes.
    pub fn forget_resume(&self, sandbox_dir: &Path) {
        if let Some((kept, _, _)) = resume_marker(sandbox_dir) {
            let _ = upstream_sandbox::sandboxfs::remove_all(&kept);
        }
        let _ = fs::remove_file(sandbox_dir.join(RESUME_FROM));
    }

    /// Removes the layers from the sandbox directory (what it holds is thrown away).
    pub fn remove(&self, sandbox_dir: &Path) {
        for sub in ["layers", "rootlayers"] {
            let path = sandbox_dir.join(sub);
            let _ = upstream_sandbox::sandboxfs::remove_all(&path);
        }
    }
}

/// Puts the kept set a sandbox directory had moved in back where it was (its upstream died,
/// or the resumed turn ended in an error).
pub fn return_resumed(sandbox_dir: &Path) {
    let Some((kept, below, roots)) = resume_marker(sandbox_dir) else {
        return;
    };
    let _ = fs::remove_file(sandbox_dir.join(RESUME_FROM));
    let _ = fs::create_dir_all(kept.join("layers"));
    let _ = fs::create_dir_all(kept.join("rootlayers"));
    for i in 0..below {
        let _ = fs::rename(
            sandbox_dir.join(format!("layers/{i}")),
            kept.join(format!("layers/{i}")),
        );
    }
    for i in 0..roots {
        let _ = fs::rename(
            sandbox_dir.join(format!("rootlayers/{i}")),
            kept.join(format!("rootlayers/{i}")),
        );
    }
}

fn resume_marker(sandbox_dir: &Path) -> Option<(PathBuf, u32, u32)> {
    let text = fs::read_to_string(sandbox_dir.join(RESUME_FROM)).ok()?;
    let mut lines = text.lines();
    let kept = PathBuf::from(lines.next()?);
    let below = lines.next()?.parse().ok()?;
    let roots = lines.next()?.parse().ok()?;
    Some((kept, below, roots))
}

/// How many numbered layers `dir` holds (`0`, `1`, … with no gap).
fn count(dir: &Path) -> u32 {
    (0..)
        .take_while(|i| dir.join(i.to_string()).is_dir())
        .count() as u32
}

/// Makes a layer's directory. Made by upstream's user, it is sandbox root's: as root the
/// sandbox sees it through an idmapped mount (see `idmap`), rootless its root is that user.
fn make_dir(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// What the child does, all prepared before the fork.
struct StackPlan<'a> {
    pidfd: RawFd,
    mnt: RawFd,
    user: RawFd,
    /// Layer names, `0` up to the new top.
    names: &'a [CString],
    work: &'a CString,
    target: &'a CString,
    report: RawFd,
}

/// Stages from this one on come after the old workspace was detached: failing there leaves
/// the sandbox without its workspace.
pub const DETACHED_STAGE: i32 = 9;

/// What the child was doing, by the number it reports.
const STAGES: &[&str] = &[
    "stack the layer",
    "take the sandbox's layer directory",
    "take the directory below the workspace",
    "enter the sandbox's mount namespace",
    "enter the sandbox's user namespace",
    "become the sandbox's root",
    "open an overlay",
    "open a layer",
    "add a layer",
    "create the overlay",
    "mount the overlay",
    "detach the old workspace",
    "attach the new workspace",
];

/// The child: builds the new overlay and swaps it in. Only system calls.
///
/// # Safety
/// Must run in a freshly forked child; it never returns.
unsafe fn stack_in_child(plan: &StackPlan<'_>) -> ! {
    let fail = |stage: i32| -> ! {
        // SAFETY: errno, write and _exit are async-signal-safe.
        unsafe {
            let errno = *libc::__errno_location();
            let mut report = [0u8; 8];
            report[..4].copy_from_slice(&stage.to_le_bytes());
            report[4..].copy_from_slice(&errno.to_le_bytes());
            libc::write(plan.report, report.as_ptr().cast(), 8);
            libc::_exit(1)
        }
    };
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSCONFIG_SET_FLAG: libc::c_uint = 0;
    const FSCONFIG_SET_FD: libc::c_uint = 5;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
    const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    // SAFETY: every call below is a plain system call on descriptors and C strings prepared
    // by the parent; failures end the child through `fail`.
    unsafe {
        let tree = libc::syscall(libc::SYS_pidfd_getfd, plan.pidfd, LAYERS_FD, 0) as RawFd;
        if tree < 0 {
            fail(1);
        }
        let base = libc::syscall(libc::SYS_pidfd_getfd, plan.pidfd, BASE_FD, 0) as RawFd;
        if base < 0 {
            fail(2);
        }
        // The user namespace first: in it this process has the capabilities that entering
        // the mount namespace (and, rootless, anything else here) asks for.
        if libc::setns(plan.user, libc::CLONE_NEWUSER) != 0 {
            fail(4);
        }
        if libc::setns(plan.mnt, libc::CLONE_NEWNS) != 0 {
            fail(3);
        }
        if libc::setresgid(0, 0, 0) != 0 || libc::setresuid(0, 0, 0) != 0 {
            fail(5);
        }
        let fs = libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) as RawFd;
        if fs < 0 {
            fail(6);
        }
        let open = |name: &CString| -> RawFd {
            let fd = libc::openat(
                tree,
                name.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            );
            if fd < 0 {
                fail(7);
            }
            fd
        };
        let set_fd = |key: &std::ffi::CStr, fd: RawFd| {
            let ret = libc::syscall(
                libc::SYS_fsconfig,
                fs,
                FSCONFIG_SET_FD,
                key.as_ptr(),
                std::ptr::null::<libc::c_char>(),
                fd,
            );
            if ret < 0 {
                fail(8);
            }
        };
        let top = plan.names.len() - 1;
        // The lower layers, top first, then the directory they lie over.
        for name in plan.names[..top].iter().rev() {
            set_fd(c"lowerdir+", open(name));
        }
        set_fd(c"lowerdir+", base);
        set_fd(c"upperdir", open(&plan.names[top]));
        set_fd(c"workdir", open(plan.work));
        for flag in [c"userxattr", c"volatile"] {
            // Both as the init mounted the first layer; a kernel without them refused that
            // too, and the init fell back the same way.
            libc::syscall(
                libc::SYS_fsconfig,
                fs,
                FSCONFIG_SET_FLAG,
                flag.as_ptr(),
                std::ptr::null::<libc::c_char>(),
                0,
            );
        }
        // The old overlay goes first: while it is mounted its top layer, a lower layer of
        // the new one, counts as in use. Nothing holds it (the agent leaves the workspace
        // after starting each step), so it is gone once detached.
        if libc::umount2(plan.target.as_ptr(), libc::MNT_DETACH) != 0 {
            fail(11);
        }
        if libc::syscall(
            libc::SYS_fsconfig,
            fs,
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        ) < 0
        {
            fail(9);
        }
        let mount = libc::syscall(
            libc::SYS_fsmount,
            fs,
            FSMOUNT_CLOEXEC,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        ) as RawFd;
        if mount < 0 {
            fail(10);
        }
        if libc::syscall(
            libc::SYS_move_mount,
            mount,
            c"".as_ptr(),
            libc::AT_FDCWD,
            plan.target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        ) < 0
        {
            fail(12);
        }
        libc::_exit(0)
    }
}

//! Idmapped mounts, which let every sandbox see the same files owned by its own ids.
//!
//! As root, what sandboxes see of the host's disk (the sandbox directory with its writable
//! layers, the host image's skeleton, an image's unpacked rootfs) is stored owned by the
//! sandbox's own ids: sandbox uid `n` is host uid `n` on disk. Each sandbox has a host id
//! range of its own ([`crate::ids`]), so the host makes each of those directories an
//! idmapped mount through the sandbox's user namespace (on-disk `n` is seen as the sandbox's
//! `n`, which is host id `base + n`) and hands the mounts to the sandbox's init over its
//! connection; the init attaches them over the same paths in its own mount namespace before
//! it builds the root. Files a sandbox writes go to disk unshifted too, so a layer kept by one
//! sandbox is the same to the next whatever its range. The directories holding them are root's
//! alone (the runtime directory, the image cache).

use std::ffi::CString;
use std::io;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The most mounts handed to one sandbox's init.
pub const MAX_MOUNTS: usize = 16;

/// The kernel's `struct mount_attr`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// A detached copy of the directory at `path` whose files are seen through the user
/// namespace `userns`: on-disk id `n` is the namespace's `n`.
pub fn clone_idmapped(path: &Path, userns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    // SAFETY: open_tree with a valid C string; the descriptor it returns is new and ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: mount_setattr reads `attr`, of the size passed, for the detached mount `tree`
    // (an empty path with AT_EMPTY_PATH names the descriptor itself).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tree)
}

/// Attaches the detached mount `tree` over `target` in this process's mount namespace.
pub fn attach(tree: &OwnedFd, target: &str) -> io::Result<()> {
    let c = CString::new(target).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: move_mount with a descriptor of ours, an empty source path and a valid C string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `fds` over `conn` with one byte.
pub fn send_fds(conn: &UnixStream, fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let control = [ControlMessage::ScmRights(&raw)];
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(&[0])],
        &control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    Ok(())
}

/// Receives the byte [`send_fds`] sent and the descriptors with it (close-on-exec).
pub fn recv_fds(conn: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; MAX_MOUNTS]);
    let msg = recvmsg::<()>(
        conn.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    if msg.bytes != 1 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel installed this descriptor in this process for us.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other("more mounts were sent than expected"));
    }
    Ok(fds)
}

//! The agent's vsock listeners, in a VM whose host reaches it over virtio-vsock
//! (Firecracker): one port for the agent's first connection, one for the helpers a host
//! asks for with `Attach` of [`ATTACH_NAME`].
//!
//! Both ports are below 1024, which only a process with `CAP_NET_BIND_SERVICE` may bind:
//! should the agent's listener go, a command without that capability cannot take its place.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, VsockAddr, bind, listen, socket,
};

/// The vsock port of the agent's first connection.
pub const AGENT_PORT: u32 = 700;
/// The vsock port of helpers' connections.
pub const SESSION_PORT: u32 = 701;
/// The name a host attaches a helper by once its connection to [`SESSION_PORT`] is made.
pub const ATTACH_NAME: &str = "vsock";

/// How long a helper's connection may take to be there once a host asked for it (it
/// connected first, so it is queued already).
pub const ATTACH_WITHIN: Duration = Duration::from_secs(5);

/// A socket listening on vsock port `port` of this guest, any CID.
pub fn listen_on(port: u32) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    listen(&fd, Backlog::new(16).map_err(io::Error::from)?)?;
    Ok(fd)
}

/// The next connection on `listener`, waiting as long as it takes.
pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    accept_live(listener.as_fd(), None)
}

/// The next connection on `listener` whose host end is still open, within `within`
/// (`None`: no bound): one a host made and gave up on before it was taken is skipped.
pub fn accept_live(listener: BorrowedFd, within: Option<Duration>) -> io::Result<OwnedFd> {
    let until = within.map(|w| Instant::now() + w);
    loop {
        let timeout = match until {
            Some(until) => {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no connection came to the vsock port",
                    ));
                }
                PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1)
                    .unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut fds = [PollFd::new(listener, PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        // SAFETY: accept4 on a listening socket this function borrows; the descriptor it
        // returns is new and owned by nothing else.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.raw_os_error(),
                Some(libc::EAGAIN | libc::EINTR | libc::ECONNABORTED)
            ) {
                continue;
            }
            return Err(e);
        }
        // SAFETY: `fd` was just returned by accept4 and is this function's alone.
        let conn = unsafe { OwnedFd::from_raw_fd(fd) };
        // POLLRDHUP (which nix does not name): the host end shut down its side.
        let mut fds = [PollFd::new(
            conn.as_fd(),
            PollFlags::from_bits_retain(libc::POLLRDHUP) | PollFlags::POLLHUP,
        )];
        let gone = poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0);
        if !gone {
            return Ok(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port is the agent's once bound; with nobody connecting, taking a helper's
    /// connection gives up within its bound instead of holding the agent.
    #[test]
    fn a_port_is_bound_once_and_an_empty_listener_gives_up_in_time() {
        let port = 50_000 + std::process::id() % 10_000;
        let listener = listen_on(port).unwrap();
        let again = listen_on(port).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EADDRINUSE), "{again}");
        let start = Instant::now();
        let e = accept_live(listener.as_fd(), Some(Duration::from_millis(100))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(start.elapsed() < Duration::from_secs(5));
        // Control: another port binds while the first is held.
        listen_on(port + 1).unwrap();
    }
}

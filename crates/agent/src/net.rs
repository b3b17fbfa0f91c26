//! Networking inside a sandbox: loopback for every one (a namespace or a VM without network has
//! nothing else), and for a VM given a network device, its address and default route.
//!
//! Everything here is a socket ioctl, so it works in an image without `ip` or a netlink
//! library, and takes a guest microseconds.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

/// Brings up `lo`, the only interface of a fresh network namespace.
pub fn loopback_up() -> io::Result<()> {
    interface_up(&control_socket()?, "lo")
}

/// Gives the interface `name` the address `address/prefix`, brings it up and routes
/// everything not on its network through `gateway`.
pub fn configure(name: &str, address: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> io::Result<()> {
    if prefix > 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a prefix of {prefix} bits is longer than an IPv4 address"),
        ));
    }
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_of(address);
    // SAFETY: SIOCSIFADDR reads the name and address in `req`, valid for the whole call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    req.ifr_ifru.ifru_netmask = sockaddr_of(Ipv4Addr::from(mask));
    // SAFETY: SIOCSIFNETMASK reads the name and mask in `req`, valid for the whole call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    interface_up(&sock, name)?;
    // SAFETY: rtentry is plain old data (its one pointer, the device, may be null); all zeroes
    // is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_of(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_of(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_of(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT reads `route`, valid for the whole call; its device pointer is null,
    // so the kernel picks the interface that reaches the gateway.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &route) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A socket to ask the kernel's IPv4 stack about interfaces and routes through.
fn control_socket() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| io::Error::from_raw_os_error(e as i32))
}

/// An `ifreq` naming the interface `name`, the rest zero.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is no interface name"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// Sets the flags `IFF_UP | IFF_RUNNING` on the interface `name`.
fn interface_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS reads the flags of the interface named in `req` into `req`, which
    // lives for the whole call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFFLAGS the union holds the flags.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, valid for the whole call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `address` as the generic `sockaddr` the interface and route ioctls take: laid out as a
/// `sockaddr_in` (family, port 0, the address in network order), which is what the kernel
/// reads from a `sockaddr` whose family is `AF_INET`.
fn sockaddr_of(address: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    for (dst, src) in data[2..6].iter_mut().zip(address.octets()) {
        *dst = src as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_laid_out_as_the_kernel_reads_a_sockaddr_in() {
        let raw = sockaddr_of(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(raw.sa_family, libc::AF_INET as libc::sa_family_t);
        // Port 0, then the address in network order.
        let data: Vec<u8> = raw.sa_data.iter().map(|b| *b as u8).collect();
        assert_eq!(&data[..6], &[0, 0, 10, 0, 2, 15]);
        assert!(data[6..].iter().all(|b| *b == 0));
    }

    #[test]
    fn an_interface_name_must_fit_and_a_bad_prefix_is_refused() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-name-far-too-long-for-linux").is_err());
        let e = configure("eth0", Ipv4Addr::LOCALHOST, 33, Ipv4Addr::LOCALHOST).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}

//! A VM's requests of its whole machine. A restored machine made one of its own
//! ([`Request::Renew`](crate::protocol::Request)): every VM restored from one snapshot wakes
//! with the snapshot's random generator, clock and name, so until it is told otherwise two of
//! them would draw the same "random" bytes. And the sandbox's disk frozen while the host
//! copies it for a checkpoint (`Freeze`, `Thaw`).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;

use nix::sys::time::TimeSpec;
use nix::time::{ClockId, clock_settime};

/// The most entropy taken in one request: a generator is reseeded from 256 bits; more is
/// no use.
pub const MOST_ENTROPY: usize = 512;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `struct rand_pool_info` with its buffer.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MOST_ENTROPY],
}

/// Mixes `entropy` into the kernel's pool, crediting it, then reseeds the generator from
/// the pool at once rather than at its next scheduled reseed.
pub fn reseed(entropy: &[u8]) -> io::Result<()> {
    if entropy.is_empty() || entropy.len() > MOST_ENTROPY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("entropy of {} bytes (1 to {MOST_ENTROPY})", entropy.len()),
        ));
    }
    let random = File::options().write(true).open("/dev/urandom")?;
    let mut info = PoolInfo {
        entropy_count: (entropy.len() * 8) as libc::c_int,
        buf_size: entropy.len() as libc::c_int,
        buf: [0; MOST_ENTROPY],
    };
    info.buf[..entropy.len()].copy_from_slice(entropy);
    // SAFETY: `info` is a rand_pool_info whose buffer holds `buf_size` bytes, alive for the
    // call; the kernel only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, &info) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an ioctl that takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Renews this machine: its random generator from `entropy`, its clock to `unix_nanos`, its
/// name to `hostname`.
pub fn renew(hostname: &str, entropy: &[u8], unix_nanos: u64) -> Result<(), String> {
    reseed(entropy).map_err(|e| format!("cannot reseed the random generator: {e}"))?;
    let now = TimeSpec::new(
        (unix_nanos / 1_000_000_000) as libc::time_t,
        (unix_nanos % 1_000_000_000) as libc::c_long,
    );
    clock_settime(ClockId::CLOCK_REALTIME, now)
        .map_err(|e| format!("cannot set the clock: {e}"))?;
    nix::unistd::sethostname(hostname).map_err(|e| format!("cannot set the hostname: {e}"))?;
    Ok(())
}

/// A directory of the filesystem on the sandbox's own disk, held by a VM's init before it
/// moves into the sandbox's root (from which that filesystem, under the overlay, cannot be
/// named): what [`freeze`] and [`thaw`] act on.
static SCRATCH: OnceLock<OwnedFd> = OnceLock::new();

/// Holds `dir`, a directory of the sandbox's own disk, for [`freeze`] and [`thaw`].
pub fn hold_scratch(dir: OwnedFd) {
    let _ = SCRATCH.set(dir);
}

/// `FIFREEZE`: `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `FITHAW`: `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xC004_5878;

fn scratch_ioctl(request: libc::c_ulong, what: &str) -> Result<(), String> {
    let Some(dir) = SCRATCH.get() else {
        return Err("this sandbox has no disk of its own to freeze".into());
    };
    let arg: libc::c_int = 0;
    // SAFETY: FIFREEZE and FITHAW take an int argument they ignore; `dir` is an open fd.
    if unsafe { libc::ioctl(dir.as_raw_fd(), request as _, &arg) } != 0 {
        return Err(format!(
            "cannot {what} the sandbox's disk: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Flushes the sandbox's disk and holds writes to it until [`thaw`].
pub fn freeze() -> Result<(), String> {
    scratch_ioctl(FIFREEZE, "freeze")
}

/// Lets writes to the sandbox's disk go on.
pub fn thaw() -> Result<(), String> {
    scratch_ioctl(FITHAW, "thaw")
}

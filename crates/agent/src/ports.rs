//! A VM's virtio ports, found by the names the host gave them. A guest has no udev to link
//! them under `/dev/virtio-ports`: the kernel tells each port's name in
//! `/sys/class/virtio-ports/<device>/name`, and its device is `/dev/<device>`.
//!
//! The host's ports come on two virtio-serial devices, the agent's alone on the first, so
//! that the guest is given its name before the kernel has added the sessions' ports of the
//! second, which it goes on adding while the guest starts: a session's port may appear a
//! moment after the agent first answers, and is waited for ([`wait_for`]).

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the kernel lists the virtio ports.
const CLASS_DIR: &str = "/sys/class/virtio-ports";

/// How long a port the host names may take to appear: the kernel adds the sessions' ports
/// one by one as the guest boots, slowly on an emulated CPU under load.
pub const APPEAR_WITHIN: Duration = Duration::from_secs(30);

/// Every named virtio port: its name and its device.
pub fn all() -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(CLASS_DIR) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = fs::read_to_string(entry.path().join("name")).ok()?;
            let name = name.trim();
            (!name.is_empty()).then(|| {
                let device = Path::new("/dev").join(entry.file_name());
                (name.to_string(), device)
            })
        })
        .collect()
}

/// The device of the port named `name`, once it is there (its device node too).
pub fn find(name: &str) -> Option<PathBuf> {
    named(&all(), name)
}

/// The device of the port named `name` among `ports`, if its device node is there.
fn named(ports: &[(String, PathBuf)], name: &str) -> Option<PathBuf> {
    ports
        .iter()
        .find(|(n, device)| n == name && device.exists())
        .map(|(_, device)| device.clone())
}

/// [`find`], waiting up to `within` for the port to appear on a machine that has virtio
/// ports; on one without any, an error at once.
pub fn wait_for(name: &str, within: Duration) -> io::Result<PathBuf> {
    let until = Instant::now() + within;
    loop {
        let ports = all();
        if let Some(device) = named(&ports, name) {
            return Ok(device);
        }
        // The agent's own port is there before it serves: a machine with none at all is
        // not a VM's guest, and waiting would not bring one.
        if ports.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio port named {name}: this machine has no virtio ports"),
            ));
        }
        if Instant::now() >= until {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no virtio port named {name} appeared within {} s",
                    within.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Opens a port's device for reading and writing (never as a controlling terminal).
pub fn open(device: &Path) -> io::Result<OwnedFd> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(device)?;
    Ok(file.into())
}

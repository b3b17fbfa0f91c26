//! The guest's init: what the upstream binary does as pid 1 of a VM, started by the kernel
//! from the initramfs this backend builds ([`crate::boot`]).
//!
//! It mounts the kernel's filesystems, loads the modules the initramfs carries (the virtio
//! transports, the console, block devices, overlayfs), names the virtio ports, mounts the
//! sandbox's root — the image's read-only disk under an overlay whose writable layer is the
//! sandbox's own disk — brings the network up where the host gave the VM a device
//! ([`crate::network`]), moves into the root, and then is the agent, serving the host on
//! the port `upstream.0` until the host asks it to shut down; then it powers the VM off.
//! Whatever fails on the way is told to the host as the agent's first word
//! (`SetupFailed`), so a guest that cannot start says why instead of hanging the host.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use upstream_agent::protocol::{Response, write_frame, write_hello};

use crate::network::GuestNetwork;

/// The argument the kernel is told to start init with (`rdinit=/init upstream.vm`): how
/// the binary knows it is a VM's init.
pub const INIT_PATH: &str = "/init";

/// Where the initramfs keeps the modules, and the file naming them in load order.
pub const MODULES_DIR: &str = "/upstream/modules";
pub const MODULES_ORDER: &str = "/upstream/modules/order";

/// The port the agent serves first; sessions get the others ([`crate::SESSION_PORTS`]).
pub const AGENT_PORT: &str = "upstream.0";

/// Serials of the guest's disks, as QEMU gives them (`virtio-blk,serial=`).
pub const ROOT_SERIAL: &str = "upstream-root";
pub const SCRATCH_SERIAL: &str = "upstream-scratch";

/// Where the new root is put together before the init moves into it.
const NEW_ROOT: &str = "/upstream/root";
const LOWER: &str = "/upstream/lower";
const SCRATCH: &str = "/upstream/scratch";

/// Whether this process is a VM's init: pid 1, started as [`INIT_PATH`].
pub fn is_vm_init() -> bool {
    std::process::id() == 1 && std::env::args_os().next().is_some_and(|a| a == INIT_PATH)
}

/// The kernel command line word that makes the init power off as soon as it starts: the
/// peer of the boot benchmark (the same kernel and initramfs, no sandbox).
pub const POWER_OFF_AT_ONCE: &str = "upstream.poweroff";

/// Runs the guest; never returns (the VM powers off).
pub fn main() -> ! {
    let cmdline = {
        // /proc is not mounted yet: the kernel's own copy is read once it is.
        let _ = mount_dir("proc", "/proc", "proc", MsFlags::empty(), "");
        fs::read_to_string("/proc/cmdline").unwrap_or_default()
    };
    if cmdline.split_whitespace().any(|w| w == POWER_OFF_AT_ONCE) {
        power_off();
    }
    let mut port = None;
    if let Err(message) = start(&mut port) {
        log(&format!("cannot start the sandbox: {message}"));
        if let Some(port) = port.take() {
            let mut port = fs::File::from(port);
            let failed = Response::SetupFailed {
                message: format!("the VM's guest could not start: {message}"),
            };
            let _ = write_hello(&mut port).and_then(|()| write_frame(&mut port, &failed));
        }
    }
    power_off()
}

fn start(port: &mut Option<OwnedFd>) -> Result<(), String> {
    let _ = nix::mount::umount("/proc");
    mount_kernel_filesystems("")?;
    let events = device_events();
    load_modules(MODULES_ORDER)?;
    let agent = wait_for_port(AGENT_PORT, Duration::from_secs(20), events.as_ref())?;
    // The kernel would go on queueing events no one reads.
    drop(events);
    *port = Some(open_port(&agent)?);
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let options = Options::from_cmdline(&cmdline);
    let root = disk_by_serial(ROOT_SERIAL)?;
    let scratch = disk_by_serial(SCRATCH_SERIAL)?;
    mount_dir(&root, LOWER, "ext4", MsFlags::MS_RDONLY, "")?;
    mount_dir(&scratch, SCRATCH, "ext4", MsFlags::MS_NOATIME, "")?;
    for dir in [format!("{SCRATCH}/upper"), format!("{SCRATCH}/work")] {
        fs::create_dir_all(&dir).map_err(|e| format!("cannot make {dir}: {e}"))?;
    }
    // The sandbox's disk, held for checkpoints: under the overlay it has no name inside.
    let scratch_dir = fs::File::open(SCRATCH).map_err(|e| format!("cannot open {SCRATCH}: {e}"))?;
    upstream_agent::renew::hold_scratch(scratch_dir.into());
    let layers = format!("lowerdir={LOWER},upperdir={SCRATCH}/upper,workdir={SCRATCH}/work");
    mount_dir("overlay", NEW_ROOT, "overlay", MsFlags::empty(), &layers)?;
    mount_kernel_filesystems(NEW_ROOT)?;
    limit(NEW_ROOT, &options)?;
    name_ports(NEW_ROOT)?;
    nix::unistd::sethostname(&options.hostname).map_err(|e| format!("sethostname: {e}"))?;
    upstream_agent::net::loopback_up().map_err(|e| format!("cannot bring up loopback: {e}"))?;
    let network = GuestNetwork::from_cmdline(&cmdline)?;
    if let Some(network) = &network {
        network.bring_up(load_modules)?;
    }
    // Into the new root, as switch_root does: the initramfs cannot be pivoted away from.
    nix::unistd::chdir(NEW_ROOT).map_err(|e| format!("chdir {NEW_ROOT}: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("cannot move the new root into place: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    if let Some(network) = &network {
        network.name_resolver()?;
    }
    let conn = port.take().expect("opened above");
    // From here on the agent reports its own failures over its connection.
    let _ = upstream_agent::serve(conn);
    Ok(())
}

/// What the host tells the guest on the kernel's command line (`upstream.<name>=<value>`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    hostname: String,
    /// The sandbox's memory limit in bytes, held by its cgroup (the guest has more, for its
    /// kernel and the agent).
    memory: Option<u64>,
    /// Its limit on processes and threads.
    pids: Option<u64>,
}

impl Options {
    fn from_cmdline(cmdline: &str) -> Options {
        let mut options = Options {
            hostname: upstream_sandbox::DEFAULT_HOSTNAME.to_string(),
            memory: None,
            pids: None,
        };
        for word in cmdline.split_whitespace() {
            if let Some(n) = word.strip_prefix("upstream.memory=") {
                options.memory = n.parse().ok();
            }
            if let Some(n) = word.strip_prefix("upstream.pids=") {
                options.pids = n.parse().ok();
            }
            if let Some(name) = word.strip_prefix("upstream.hostname=") {
                if !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                {
                    options.hostname = name.to_string();
                }
            }
        }
        options
    }
}

/// The cgroup everything of the sandbox runs in, the agent too: its limits are the
/// sandbox's.
pub const SANDBOX_CGROUP: &str = "/sys/fs/cgroup/sandbox";

/// Mounts cgroup v2 under `root` and moves this process (and so all it starts) into a
/// cgroup with the sandbox's memory and process limits.
fn limit(root: &str, options: &Options) -> Result<(), String> {
    let top = format!("{root}/sys/fs/cgroup");
    mount_dir(
        "cgroup2",
        &top,
        "cgroup2",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "",
    )?;
    let write = |file: &str, value: &str| {
        fs::write(file, value).map_err(|e| format!("cannot write {value} to {file}: {e}"))
    };
    write(&format!("{top}/cgroup.subtree_control"), "+memory +pids")?;
    let own = format!("{root}{SANDBOX_CGROUP}");
    fs::create_dir_all(&own).map_err(|e| format!("cannot make {own}: {e}"))?;
    if let Some(memory) = options.memory {
        write(&format!("{own}/memory.max"), &memory.to_string())?;
        write(&format!("{own}/memory.swap.max"), "0").ok();
    }
    if let Some(pids) = options.pids {
        write(&format!("{own}/pids.max"), &pids.to_string())?;
    }
    // An allocation is refused by the limit, as on a host with memory to spare, not by the
    // guest's smaller RAM at the call: a command over its limit is killed for it, and the
    // host hears that it ran out of memory.
    write(&format!("{root}/proc/sys/vm/overcommit_memory"), "1")?;
    write(
        &format!("{own}/cgroup.procs"),
        &std::process::id().to_string(),
    )
}

/// Mounts /proc, /sys, /dev and the rest under `root` (`""`: the initramfs itself).
fn mount_kernel_filesystems(root: &str) -> Result<(), String> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let all: &[(&str, &str, &str, MsFlags, &str)] = &[
        ("proc", "/proc", "proc", nosuid, ""),
        ("sysfs", "/sys", "sysfs", nosuid, ""),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            "mode=0755",
        ),
    ];
    for (source, target, kind, flags, data) in all {
        mount_dir(source, &format!("{root}{target}"), kind, *flags, data)?;
    }
    if root.is_empty() {
        return Ok(());
    }
    let more: &[(&str, &str, &str, MsFlags, &str)] = &[
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=0755",
        ),
    ];
    for (source, target, kind, flags, data) in more {
        mount_dir(source, &format!("{root}{target}"), kind, *flags, data)?;
    }
    // /tmp is a directory of the root's writable layer, on the sandbox's disk, as on every
    // backend: what is written there counts against the disk, not the memory.
    let tmp = format!("{root}/tmp");
    fs::create_dir_all(&tmp).map_err(|e| format!("cannot make {tmp}: {e}"))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))
        .map_err(|e| format!("cannot open up {tmp}: {e}"))?;
    Ok(())
}

fn mount_dir(
    source: &str,
    target: &str,
    kind: &str,
    flags: MsFlags,
    data: &str,
) -> Result<(), String> {
    fs::create_dir_all(target).map_err(|e| format!("cannot make {target}: {e}"))?;
    let data = (!data.is_empty()).then_some(data);
    mount(Some(source), target, Some(kind), flags, data)
        .map_err(|e| format!("cannot mount {source} ({kind}) on {target}: {e}"))
}

/// Loads the modules the initramfs carries that the file `list` names, in the order its
/// build wrote (each after what it needs).
fn load_modules(list: &str) -> Result<(), String> {
    let order = match fs::read_to_string(list) {
        Ok(order) => order,
        // A kernel with everything built in needs none.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read {list}: {e}")),
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("{MODULES_DIR}/{name}");
        let file = fs::File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
        // SAFETY: finit_module reads the module from an open descriptor, with an empty
        // parameter string; it touches no memory of this process but the string.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                c"".as_ptr(),
                0 as libc::c_int,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("cannot load the kernel module {name}: {e}"));
            }
        }
    }
    Ok(())
}

/// The kernel's device events (`NETLINK_KOBJECT_UEVENT`), for waiting on a port without
/// polling; `None` where the socket cannot be had (then the wait polls).
fn device_events() -> Option<OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
    };
    let events = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkKObjectUEvent,
    )
    .ok()?;
    // Group 1: the kernel's own events (udev's are group 2).
    bind(events.as_raw_fd(), &NetlinkAddr::new(0, 1)).ok()?;
    Some(events)
}

/// The device of the virtio port named `name` (`/dev/vport0p1`), once the kernel made it.
///
/// The console driver adds the ports one by one and names them only once all are added
/// (the host's names queue behind its adds): under TCG that takes a few hundred
/// milliseconds, which a wait that looked every few milliseconds took its share of. This
/// one looks when the kernel says a device came or changed (`events`, opened before the
/// driver was loaded), and at least every 50 ms.
fn wait_for_port(name: &str, within: Duration, events: Option<&OwnedFd>) -> Result<String, String> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let until = Instant::now() + within;
    loop {
        if let Some(device) = ports().into_iter().find(|(n, _)| n == name).map(|(_, d)| d) {
            if Path::new(&device).exists() {
                return Ok(device);
            }
        }
        let now = Instant::now();
        if now >= until {
            return Err(format!(
                "the virtio port {name} did not appear within {} s (is virtio_console loaded?)",
                within.as_secs()
            ));
        }
        let Some(events) = events else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let wait = (until - now).min(Duration::from_millis(50));
        let mut fds = [PollFd::new(events.as_fd(), PollFlags::POLLIN)];
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(wait).unwrap_or(PollTimeout::ZERO),
        );
        // What the events say is not read: the ports are looked at anew after them all.
        let mut message = [0u8; 4096];
        while nix::sys::socket::recv(
            events.as_raw_fd(),
            &mut message,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .is_ok()
        {}
    }
}

/// Every named virtio port: its name and device.
fn ports() -> Vec<(String, String)> {
    let Ok(entries) = fs::read_dir("/sys/class/virtio-ports") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = fs::read_to_string(entry.path().join("name")).ok()?;
            let name = name.trim();
            (!name.is_empty()).then(|| {
                (
                    name.to_string(),
                    format!("/dev/{}", entry.file_name().to_string_lossy()),
                )
            })
        })
        .collect()
}

fn open_port(device: &str) -> Result<OwnedFd, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(device)
        .map_err(|e| format!("cannot open {device}: {e}"))?;
    Ok(file.into())
}

/// Links each port by name in `<root>/dev/virtio-ports`, as udev would, for the agent to
/// find the ports a host attaches sessions to.
fn name_ports(root: &str) -> Result<(), String> {
    let dir = format!("{root}{}", upstream_agent::PORTS_DIR);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot make {dir}: {e}"))?;
    for (name, device) in ports() {
        let link = format!("{dir}/{name}");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&device, &link)
            .map_err(|e| format!("cannot link {link}: {e}"))?;
    }
    Ok(())
}

/// The block device whose virtio serial is `serial` (`/dev/vda`).
fn disk_by_serial(serial: &str) -> Result<String, String> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(entries) = fs::read_dir("/sys/block") {
            for entry in entries.flatten() {
                let found = fs::read_to_string(entry.path().join("serial")).ok();
                if found.as_deref().map(str::trim) == Some(serial) {
                    let device = format!("/dev/{}", entry.file_name().to_string_lossy());
                    if Path::new(&device).exists() {
                        return Ok(device);
                    }
                }
            }
        }
        if Instant::now() >= until {
            return Err(format!(
                "no disk with serial {serial} (is virtio_blk loaded?)"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A line in the kernel's log, which the host keeps as the VM's console.
fn log(message: &str) {
    if let Ok(mut kmsg) = fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = kmsg.write_all(format!("upstream: {message}\n").as_bytes());
    }
}

fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Without a way to power off (no ACPI on a microvm), a reboot, which `-no-reboot`
    // turns into QEMU's exit.
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hostname_comes_from_the_command_line_when_it_is_a_plain_name() {
        let o = Options::from_cmdline(
            "quiet upstream.hostname=box-1 upstream.memory=67108864 upstream.pids=64 panic=-1",
        );
        assert_eq!(o.hostname, "box-1");
        assert_eq!((o.memory, o.pids), (Some(64 << 20), Some(64)));
        let o = Options::from_cmdline("upstream.hostname=a/b");
        assert_eq!(o.hostname, upstream_sandbox::DEFAULT_HOSTNAME);
    }
}

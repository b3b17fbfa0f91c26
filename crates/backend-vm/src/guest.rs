//! The guest's init: what the upstream binary does as pid 1 of a VM, started by the kernel
//! from the initramfs this backend builds ([`crate::boot`]).
//!
//! It mounts the kernel's filesystems, loads the modules the initramfs carries (the virtio
//! transports, the console or vsock, block devices, overlayfs), finds how the host reaches
//! it — the virtio port `upstream.0` (QEMU), or, with no virtio console but a vsock device
//! (Firecracker), a vsock listener it opens and takes the host's first connection on —
//! names the virtio ports, mounts the sandbox's root — the image's read-only disk under an
//! overlay whose writable layer is the sandbox's own disk — brings the network up where the
//! host gave the VM a device ([`crate::network`]), moves into the root, and then is the
//! agent, serving the host until it asks the agent to shut down; then it powers the VM off
//! (or reboots it, which ends a Firecracker VM). Whatever fails on the way is told to the
//! host as the agent's first word (`SetupFailed`), so a guest that cannot start says why
//! instead of hanging the host.

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

/// The word that makes the guest end its VM with a reboot rather than a power-off: a
/// Firecracker guest has no way to power off, and Firecracker exits when its guest reboots
/// (`reboot=k`, through the keyboard controller).
pub const STOP_BY_REBOOT: &str = "upstream.stop=reboot";

/// The word that makes the guest tell its disks apart by mode — the image's is the
/// read-only one — rather than by serial, which Firecracker does not let the host set.
pub const DISKS_BY_MODE: &str = "upstream.disks=by-mode";

/// The words on the kernel's command line of a sandbox's guest, whichever VMM boots it: the
/// console, the init, entropy and keyboard-controller options, and the sandbox's options
/// that its init reads ([`Options`]). A driver adds its own.
pub fn cmdline(
    hostname: &str,
    memory_limit: Option<u64>,
    pids_limit: Option<u64>,
    network: crate::network::Network,
) -> Vec<String> {
    let mut words = vec![
        "console=ttyS0".to_string(),
        "quiet".into(),
        "panic=-1".into(),
        format!("rdinit={INIT_PATH}"),
        "random.trust_cpu=on".into(),
        "i8042.noaux".into(),
        "i8042.nomux".into(),
        "i8042.nopnp".into(),
        "i8042.dumbkbd".into(),
        format!("upstream.hostname={hostname}"),
    ];
    if let Some(memory) = memory_limit {
        words.push(format!("upstream.memory={memory}"));
    }
    if let Some(pids) = pids_limit {
        words.push(format!("upstream.pids={pids}"));
    }
    words.extend(network.kernel_word());
    words
}

/// The virtio device ids the guest tells its transport by.
const VIRTIO_CONSOLE: u32 = 3;
const VIRTIO_VSOCK: u32 = 19;

/// Runs the guest; never returns (the VM powers off).
pub fn main() -> ! {
    let cmdline = {
        // /proc is not mounted yet: the kernel's own copy is read once it is.
        let _ = mount_dir("proc", "/proc", "proc", MsFlags::empty(), "");
        fs::read_to_string("/proc/cmdline").unwrap_or_default()
    };
    let reboot = cmdline.split_whitespace().any(|w| w == STOP_BY_REBOOT);
    if cmdline.split_whitespace().any(|w| w == POWER_OFF_AT_ONCE) {
        power_off(reboot);
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
    power_off(reboot)
}

/// How the host reaches this guest's agent.
enum Transport {
    /// The virtio port [`AGENT_PORT`], at this device.
    Port(std::path::PathBuf),
    /// virtio-vsock: the agent listens ([`upstream_agent::vsock`]).
    Vsock,
}

fn start(port: &mut Option<OwnedFd>) -> Result<(), String> {
    let _ = nix::mount::umount("/proc");
    mount_kernel_filesystems("")?;
    load_modules(MODULES_ORDER)?;
    // A vsock guest listens before anything else, so the host's first connection, through
    // which a failure on the way is told, is taken as soon as it comes.
    let mut vsock = None;
    match wait_for_transport(Duration::from_secs(20))? {
        Transport::Port(agent) => {
            let opened = upstream_agent::ports::open(&agent)
                .map_err(|e| format!("cannot open {}: {e}", agent.display()))?;
            *port = Some(opened);
        }
        Transport::Vsock => {
            use upstream_agent::vsock::{AGENT_PORT, SESSION_PORT, accept, listen_on};
            let listen =
                |n| listen_on(n).map_err(|e| format!("cannot listen on vsock port {n}: {e}"));
            let (agent, sessions) = (listen(AGENT_PORT)?, listen(SESSION_PORT)?);
            *port = Some(
                accept(&agent).map_err(|e| format!("cannot take the host's connection: {e}"))?,
            );
            vsock = Some((agent, sessions));
        }
    }
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let options = Options::from_cmdline(&cmdline);
    let (root, scratch) = match options.disks_by_mode {
        false => (
            disk_by_serial(ROOT_SERIAL)?,
            disk_by_serial(SCRATCH_SERIAL)?,
        ),
        true => (disk_by_mode(true)?, disk_by_mode(false)?),
    };
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
    let Some((agent, sessions)) = vsock else {
        let _ = upstream_agent::serve(conn);
        return Ok(());
    };
    // Over vsock a first connection that ends without a shutdown is followed by the next:
    // a snapshot's restore resets every vsock connection, and the host connects again.
    let mut conn = conn;
    loop {
        use std::os::fd::AsFd;
        let sessions = upstream_agent::Sessions::Vsock(sessions.as_fd());
        match upstream_agent::serve_with(conn, sessions) {
            Ok(upstream_agent::Ended::Shutdown) => return Ok(()),
            Ok(upstream_agent::Ended::HostGone) | Err(_) => {}
        }
        conn = match upstream_agent::vsock::accept(&agent) {
            Ok(next) => next,
            Err(e) => return Err(format!("cannot take the host's next connection: {e}")),
        };
    }
}

/// How the host reaches the agent, once the devices are there: the virtio port
/// [`AGENT_PORT`], else a virtio-vsock device in a guest without a virtio console.
fn wait_for_transport(within: Duration) -> Result<Transport, String> {
    let until = Instant::now() + within;
    loop {
        if let Some(device) = upstream_agent::ports::find(AGENT_PORT) {
            return Ok(Transport::Port(device));
        }
        let devices = virtio_devices();
        if devices.contains(&VIRTIO_VSOCK) && !devices.contains(&VIRTIO_CONSOLE) {
            return Ok(Transport::Vsock);
        }
        if Instant::now() >= until {
            return Err(format!(
                "neither the virtio port {AGENT_PORT} nor a vsock device appeared within {} s \
                 (are virtio_console or vmw_vsock_virtio_transport loaded?)",
                within.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The ids of the guest's virtio devices (`/sys/bus/virtio/devices/*/device`).
fn virtio_devices() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/sys/bus/virtio/devices") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let id = fs::read_to_string(e.path().join("device")).ok()?;
            u32::from_str_radix(id.trim().trim_start_matches("0x"), 16).ok()
        })
        .collect()
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
    /// The disks are told apart by mode ([`DISKS_BY_MODE`]), not by serial.
    disks_by_mode: bool,
}

impl Options {
    fn from_cmdline(cmdline: &str) -> Options {
        let mut options = Options {
            hostname: upstream_sandbox::DEFAULT_HOSTNAME.to_string(),
            memory: None,
            pids: None,
            disks_by_mode: false,
        };
        for word in cmdline.split_whitespace() {
            if word == DISKS_BY_MODE {
                options.disks_by_mode = true;
            }
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

/// The virtio disk that is read-only (`read_only`: the image's) or writable (the
/// sandbox's): one of each, or none is taken.
fn disk_by_mode(read_only: bool) -> Result<String, String> {
    let until = Instant::now() + Duration::from_secs(10);
    let want = if read_only { "1" } else { "0" };
    loop {
        let mut found = Vec::new();
        if let Ok(entries) = fs::read_dir("/sys/block") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with("vd") {
                    continue;
                }
                let ro = fs::read_to_string(entry.path().join("ro")).unwrap_or_default();
                if ro.trim() == want {
                    found.push(format!("/dev/{name}"));
                }
            }
        }
        match found.as_slice() {
            [device] if Path::new(device).exists() => return Ok(device.clone()),
            [_, _, ..] => {
                return Err(format!(
                    "more than one {} virtio disk: {}",
                    if read_only { "read-only" } else { "writable" },
                    found.join(", ")
                ));
            }
            _ => {}
        }
        if Instant::now() >= until {
            return Err(format!(
                "no {} virtio disk (is virtio_blk loaded?)",
                if read_only { "read-only" } else { "writable" }
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

fn power_off(reboot: bool) -> ! {
    nix::unistd::sync();
    if !reboot {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
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
    fn what_the_host_puts_on_the_command_line_the_guest_reads_back() {
        use crate::network::Network;
        let words = cmdline("box-2", Some(64 << 20), Some(32), Network::None).join(" ");
        let o = Options::from_cmdline(&words);
        assert_eq!(o.hostname, "box-2");
        assert_eq!((o.memory, o.pids), (Some(64 << 20), Some(32)));
        assert!(words.contains("rdinit=/init"), "{words}");
        assert_eq!(GuestNetwork::from_cmdline(&words), Ok(None));
        // With the host's network, the guest reads back where its NAT is.
        let host = upstream_sandbox::NetworkMode::Host;
        let words = cmdline("box-2", None, None, Network::of(host)).join(" ");
        let network = GuestNetwork::from_cmdline(&words).unwrap().unwrap();
        assert_eq!(network.gateway, crate::network::HOST_ADDRESS);
    }

    #[test]
    fn the_hostname_comes_from_the_command_line_when_it_is_a_plain_name() {
        let o = Options::from_cmdline(
            "quiet upstream.hostname=box-1 upstream.memory=67108864 upstream.pids=64 panic=-1",
        );
        assert_eq!(o.hostname, "box-1");
        assert_eq!((o.memory, o.pids), (Some(64 << 20), Some(64)));
        assert!(!o.disks_by_mode);
        let o = Options::from_cmdline("upstream.hostname=a/b upstream.disks=by-mode");
        assert_eq!(o.hostname, upstream_sandbox::DEFAULT_HOSTNAME);
        assert!(o.disks_by_mode);
    }
}

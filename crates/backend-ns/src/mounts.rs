//! The sandbox's root filesystem, built by its init inside the new mount namespace.
//!
//! The root is an overlay: the image's read-only layers below, the sandbox's own directory on
//! the host above, so anything written outside the mounts below lands in the sandbox's layer
//! and vanishes with it. For the host image the lower layer is a small skeleton of mount
//! points, and the host's /usr and /etc (and any of /bin, /sbin, /lib* that are directories)
//! are bind-mounted read-only over it. Nothing else of the host is reachable. /workspace is
//! part of the writable layer (on the host: `upper/workspace`), so files move between it and
//! the rest of the root without copying; /tmp, /run and /dev are fresh tmpfs; /proc shows only
//! the sandbox's processes.
//!
//! Every path here is relative to the sandbox directory (the init's working directory) until
//! the pivot.

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::setup::InitConfig;

use upstream_sandbox::host_image::{
    SHARED_DIRS as HOST_DIRS, SKELETON, SKELETON_MODES, USR_LINKS, identity_files,
};

const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Why the root could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct MountError {
    what: String,
    source: io::Error,
}

fn ctx<E: Into<io::Error>>(what: impl FnOnce() -> String) -> impl FnOnce(E) -> MountError {
    move |e| MountError {
        what: what(),
        source: e.into(),
    }
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn do_mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), MountError> {
    mount(source, target, fstype, flags, data)
        .map_err(nix_io)
        .map_err(ctx(|| {
            // Targets are relative to the sandbox directory; name them as the sandbox sees them.
            let inside = target.strip_prefix("root").unwrap_or(target);
            let inside = if inside.is_empty() { "/" } else { inside };
            format!(
                "cannot mount {} on {inside}",
                fstype.or(source).unwrap_or("?")
            )
        }))
}

fn bind_read_only(source: &str, target: &str) -> Result<(), MountError> {
    do_mount(
        Some(source),
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    do_mount(
        None,
        target,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None,
    )
}

/// Builds the root and pivots into it; afterwards `/` is the sandbox's root. `skeleton` is
/// a path to the host image's lower layer that the init can reach.
pub fn build_root(config: &InitConfig, skeleton: Option<&str>) -> Result<(), MountError> {
    do_mount(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)?;
    let image = if config.layers.is_empty() {
        skeleton.unwrap_or("lower").to_string()
    } else {
        // overlayfs lists the top layer first.
        config
            .layers
            .iter()
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join(":")
    };
    // Layers kept from an earlier turn go above the image.
    let kept = (0..config.root_layers)
        .rev()
        .map(|i| format!("rootlayers/{i}"));
    let lower = kept.chain([image]).collect::<Vec<_>>().join(":");
    if config.upper_in_memory {
        // A tmpfs over `work/` in this mount namespace only: the host's directory is not
        // touched, and the layer is gone with the namespace.
        // Its pages count against the memory limit and cannot be reclaimed: it gets three
        // quarters of the limit, so that a write past it fails with "no space" instead of
        // the sandbox running out of memory (where the kernel might kill the agent).
        let size = config
            .memory
            .map_or_else(|| "size=50%".to_string(), |m| format!("size={}", m / 4 * 3));
        do_mount(
            Some("tmpfs"),
            "work",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(&format!("mode=755,{size}")),
        )?;
        for dir in ["work/upper", "work/work"] {
            fs::create_dir(dir).map_err(ctx(|| "cannot make the in-memory layer".to_string()))?;
        }
        mount_overlay(&lower, "work/upper", "work/work", "root")?;
    } else {
        mount_overlay(&lower, "upper", "work", "root")?;
    }
    if let Some(workspace) = &config.workspace {
        mount_workspace(workspace)?;
    }
    if config.layers.is_empty() {
        for dir in HOST_DIRS {
            bind_read_only(&format!("/{dir}"), &format!("root/{dir}"))?;
        }
        for name in USR_LINKS {
            if fs::symlink_metadata(format!("/{name}")).is_ok_and(|m| m.is_dir()) {
                fs::create_dir_all(format!("root/{name}"))
                    .map_err(ctx(|| format!("cannot create /{name}")))?;
                bind_read_only(&format!("/{name}"), &format!("root/{name}"))?;
            }
        }
    } else {
        // An image may lack some mount points; they go into the sandbox's own layer.
        for dir in SKELETON {
            fs::create_dir_all(format!("root/{dir}"))
                .map_err(ctx(|| format!("cannot create /{dir}")))?;
        }
    }
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // /tmp is a directory of the root's writable layer: on the sandbox's disk, counted
    // against its disk limit and kept with it for `--resume` (or, with the layer in memory,
    // bounded with it). An image without one gets it in that layer.
    let tmp = Path::new("root/tmp");
    if !fs::symlink_metadata(tmp).is_ok_and(|m| m.is_dir()) {
        fs::create_dir_all(tmp).map_err(ctx(|| "cannot create /tmp".to_string()))?;
    }
    if fs::metadata(tmp).is_ok_and(|m| m.permissions().mode() & 0o7777 != 0o1777) {
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o1777))
            .map_err(ctx(|| "cannot make /tmp writable by everyone".to_string()))?;
    }
    let (run_size, shm_size) = tmpfs_sizes(config.memory, config.upper_in_memory);
    // The skeleton holds the identity files of a sandbox with the default name: bind them
    // before /run gets its tmpfs, which then hides them.
    let ready_identity =
        config.layers.is_empty() && config.hostname == upstream_sandbox::DEFAULT_HOSTNAME;
    if ready_identity {
        bind_identity()?;
    }
    do_mount(
        Some("tmpfs"),
        "root/run",
        Some("tmpfs"),
        nosuid_nodev,
        Some(&format!("mode=755,size={run_size}")),
    )?;
    build_dev(config.layers.is_empty(), &format!(",size={shm_size}"))?;
    do_mount(
        Some("proc"),
        "root/proc",
        Some("proc"),
        nosuid_nodev | MsFlags::MS_NOEXEC,
        None,
    )?;
    if config.new_net {
        // sysfs may be mounted only by the owner of the network namespace; without one of our
        // own, /sys stays empty.
        let _ = do_mount(
            Some("sysfs"),
            "root/sys",
            Some("sysfs"),
            nosuid_nodev | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
            None,
        );
        upstream_agent::net::loopback_up()
            .map_err(ctx(|| "cannot bring up loopback".to_string()))?;
    }
    if !ready_identity {
        write_identity(config)?;
    }
    nix::unistd::sethostname(&config.hostname)
        .map_err(nix_io)
        .map_err(ctx(|| "cannot set the hostname".to_string()))?;
    pivot()
}

/// The sizes of /run and /dev/shm, which are memory: what is written there is charged to the
/// sandbox's memory when the sandbox writes it, and to nobody's when the host writes it for
/// the sandbox (an upload), so the sizes are what bound them, and together they stay well
/// inside the memory limit: /run (the agent's steps, outputs and logs of background
/// commands) a sixteenth of it, /dev/shm a quarter (an eighth when the root's writable layer
/// is in memory too, which takes three quarters). Without a memory limit, 64 MiB and 256
/// MiB of the host's memory.
pub fn tmpfs_sizes(memory: Option<u64>, upper_in_memory: bool) -> (u64, u64) {
    // tmpfs reads a size of 0 as unlimited: never less than a page.
    let (run, shm) = match memory {
        Some(m) if upper_in_memory => (m / 16, m / 8),
        Some(m) => (m / 16, m / 4),
        None => (64 << 20, 256 << 20),
    };
    (run.max(4096), shm.max(4096))
}

/// Makes the lower layer of host-image sandboxes: the mount points every root has, and the
/// host's links into /usr. The host makes it once and every sandbox shares it read-only. Made
/// by upstream's user, it is sandbox root's (see `idmap`), which should own the directories a
/// sandbox writes into (such as /root).
pub fn make_skeleton(dir: &Path) -> io::Result<()> {
    for sub in SKELETON {
        fs::create_dir_all(dir.join(sub))?;
    }
    populate_dev(&dir.join("dev"))?;
    // The identity of a sandbox with the default name is ready-made; build_root binds it
    // before /run gets its tmpfs.
    fs::create_dir_all(dir.join("run/upstream"))?;
    for (file, content) in identity_files(upstream_sandbox::DEFAULT_HOSTNAME) {
        fs::write(dir.join("run/upstream").join(file), content)?;
    }
    for (sub, mode) in SKELETON_MODES {
        fs::set_permissions(dir.join(sub), fs::Permissions::from_mode(*mode))?;
    }
    for name in USR_LINKS {
        if let Ok(target) = fs::read_link(format!("/{name}")) {
            symlink(&target, dir.join(name))?;
        }
    }
    Ok(())
}

/// The mount points and links of a /dev: empty files the devices are bound onto, `pts` and
/// `shm`, and the standard links.
fn populate_dev(dev: &Path) -> io::Result<()> {
    for name in DEVICES {
        fs::File::create(dev.join(name))?;
    }
    for name in ["pts", "shm"] {
        fs::create_dir(dev.join(name))?;
    }
    for (link, target) in DEV_LINKS {
        symlink(target, dev.join(link))?;
    }
    Ok(())
}

fn mount_overlay(lower: &str, upper: &str, work: &str, target: &str) -> Result<(), MountError> {
    let base = format!("lowerdir={lower},upperdir={upper},workdir={work}");
    // `volatile`: the layer dies with the sandbox, so overlayfs need not sync it, and above
    // all need not sync the whole host filesystem under it when it is unmounted (measured
    // under a concurrent 3 GB write: 9.7 ms per sandbox with syncing, 7.0 ms without).
    // `userxattr`: inside a user namespace overlayfs keeps its bookkeeping in user.*
    // extended attributes. Older kernels know neither, so fall back.
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let mut last = None;
    for extra in [",userxattr,volatile", ",userxattr", ""] {
        let options = format!("{base}{extra}");
        match do_mount(
            Some("overlay"),
            target,
            Some("overlay"),
            flags,
            Some(&options),
        ) {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

/// The workspace's own overlay: the step layers in `layers/` over what the root has there.
/// The init keeps two descriptors for the host, which stacks a new layer between steps
/// ([`crate::layers`]): the layers directory as a detached mount (a mount the host may make
/// layers from once it has entered the sandbox's namespaces) and the directory below.
fn mount_workspace(ws: &crate::setup::WorkspaceLayers) -> Result<(), MountError> {
    let target = format!("root{}", ws.dir);
    fs::create_dir_all(&target).map_err(ctx(|| format!("cannot create {}", ws.dir)))?;
    let base = crate::open_path_dir(&target)
        .map_err(nix_io)
        .map_err(ctx(|| format!("cannot open {}", ws.dir)))?;
    crate::layers::keep_fd(base, crate::layers::BASE_FD)
        .map_err(ctx(|| "cannot keep the workspace's base".to_string()))?;
    // Without a detached mount (kernels before 5.2) the workspace still works; only the
    // layers between steps cannot be made, which the host reports.
    if let Ok(tree) = crate::layers::open_tree_clone("layers") {
        let _ = crate::layers::keep_fd(tree, crate::layers::LAYERS_FD);
    }
    let lower = (0..ws.below)
        .rev()
        .map(|i| format!("layers/{i}"))
        .chain([target.clone()])
        .collect::<Vec<_>>()
        .join(":");
    mount_overlay(
        &lower,
        &format!("layers/{}", ws.below),
        &format!("layers/{}.work", ws.below),
        &target,
    )
}

/// Links every /dev has.
const DEV_LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// /dev: the host's harmless devices bound in, its own ptys and shared memory. In the host
/// image's skeleton the mount points and links already exist (`prepared`); an image gets a
/// fresh tmpfs with them.
fn build_dev(prepared: bool, shm_size: &str) -> Result<(), MountError> {
    if !prepared {
        do_mount(
            Some("tmpfs"),
            "root/dev",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=755,size=1m"),
        )?;
        populate_dev(Path::new("root/dev")).map_err(ctx(|| "cannot populate /dev".to_string()))?;
    }
    for dev in DEVICES {
        let target = format!("root/dev/{dev}");
        do_mount(
            Some(&format!("/dev/{dev}")),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    do_mount(
        Some("devpts"),
        "root/dev/pts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    )?;
    do_mount(
        Some("tmpfs"),
        "root/dev/shm",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(&format!("mode=1777{shm_size}")),
    )?;
    Ok(())
}

/// Binds `root/run/upstream/{hostname,hosts}` over the image's /etc files (made when an image
/// lacks them).
fn bind_identity() -> Result<(), MountError> {
    for file in ["hostname", "hosts"] {
        let source = format!("root/run/upstream/{file}");
        let target = format!("root/etc/{file}");
        if !Path::new(&target).exists() {
            // An image without the file: create it in the sandbox's own layer.
            if fs::write(&target, "").is_err() {
                continue;
            }
        }
        do_mount(Some(&source), &target, None, MsFlags::MS_BIND, None)?;
    }
    Ok(())
}

/// /etc/hostname and /etc/hosts naming the sandbox, written to its /run and bound over the
/// image's.
fn write_identity(config: &InitConfig) -> Result<(), MountError> {
    fs::create_dir_all("root/run/upstream")
        .map_err(ctx(|| "cannot create /run/upstream".to_string()))?;
    for (file, content) in identity_files(&config.hostname) {
        fs::write(format!("root/run/upstream/{file}"), content)
            .map_err(ctx(|| format!("cannot write /run/upstream/{file}")))?;
    }
    bind_identity()
}

fn pivot() -> Result<(), MountError> {
    nix::unistd::chdir("root")
        .map_err(nix_io)
        .map_err(ctx(|| "cannot enter the new root".to_string()))?;
    // Pivoting onto "." stacks the old root over the new one; unmounting it leaves the new.
    nix::unistd::pivot_root(".", ".")
        .map_err(nix_io)
        .map_err(ctx(|| "pivot_root".to_string()))?;
    umount2(".", MntFlags::MNT_DETACH)
        .map_err(nix_io)
        .map_err(ctx(|| "cannot detach the host's root".to_string()))?;
    nix::unistd::chdir("/")
        .map_err(nix_io)
        .map_err(ctx(|| "chdir /".to_string()))?;
    Ok(())
}

//! What this host offers the namespace backend, for `upstream doctor` and for errors.

use std::fs;
use std::path::Path;

use crate::cgroup::{Controller, Layout, Version};

/// One fact about the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// What to do when it is not ok.
    pub hint: Option<String>,
}

fn read(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// The host facts the namespace backend depends on.
pub fn checks() -> Vec<Check> {
    let root = nix::unistd::Uid::effective().is_root();
    let mut checks = Vec::new();

    let max_userns = read("/proc/sys/user/max_user_namespaces").and_then(|s| s.parse::<u64>().ok());
    let unpriv_clone = read("/proc/sys/kernel/unprivileged_userns_clone");
    let apparmor = read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns");
    let userns_ok = max_userns != Some(0)
        && (root || (unpriv_clone.as_deref() != Some("0") && apparmor.as_deref() != Some("1")));
    checks.push(Check {
        name: "user namespaces",
        ok: userns_ok,
        detail: match (root, userns_ok) {
            (true, true) => format!(
                "available; running as root (each sandbox runs as a host id range of its own, \
                 {} ids from {:#x}, outside /etc/subuid and /etc/subgid)",
                crate::ids::RANGE_SIZE,
                crate::ids::FIRST_ID
            ),
            (false, true) => "available to unprivileged users (rootless)".into(),
            (_, false) => "not available to this user".into(),
        },
        hint: (!userns_ok).then(|| {
            "run as root, or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, kernel.apparmor_restrict_unprivileged_userns=0, user.max_user_namespaces>0)".into()
        }),
    });

    let filesystems = read("/proc/filesystems").unwrap_or_default();
    let overlay = filesystems
        .lines()
        .any(|l| l.trim_end().ends_with("overlay"));
    checks.push(Check {
        name: "overlayfs",
        ok: overlay,
        detail: if overlay {
            "available".into()
        } else {
            "not in /proc/filesystems".into()
        },
        hint: (!overlay).then(|| "load the overlay module: modprobe overlay".into()),
    });

    let layout = Layout::detect();
    let placed: Vec<String> = layout
        .placements
        .iter()
        .map(|p| {
            let v = match p.version {
                Version::V1 => "v1",
                Version::V2 => "v2",
            };
            let writable = nix::unistd::access(&p.parent, nix::unistd::AccessFlags::W_OK).is_ok();
            format!(
                "{} ({v}{})",
                p.controller.name(),
                if writable { "" } else { ", not writable" }
            )
        })
        .collect();
    // Namespaces use memory and cpu; the process limit holds without a cgroup.
    let used = |c: &Controller| *c != Controller::Pids;
    let all_writable = !layout.missing.iter().any(|(c, _)| used(c))
        && layout
            .placements
            .iter()
            .filter(|p| used(&p.controller))
            .all(|p| nix::unistd::access(&p.parent, nix::unistd::AccessFlags::W_OK).is_ok());
    let kind = match (
        layout.unified.is_some(),
        layout.placements.iter().any(|p| p.version == Version::V1),
    ) {
        (true, true) => "hybrid",
        (true, false) => "v2",
        (false, true) => "v1",
        (false, false) => "none",
    };
    checks.push(Check {
        name: "cgroups",
        ok: all_writable,
        detail: format!(
            "{kind}; {}",
            if placed.is_empty() { "no usable controllers".to_string() } else { placed.join(", ") }
        ),
        hint: (!all_writable).then(|| {
            "memory and cpu limits need writable cgroups (the process limit is RLIMIT_NPROC and holds without them): run as root, or under a delegated cgroup v2 subtree (systemd-run --user --scope -p Delegate=yes)".into()
        }),
    });

    let seccomp = read("/proc/sys/kernel/seccomp/actions_avail");
    let seccomp_ok = seccomp.as_deref().is_some_and(|a| a.contains("errno"));
    checks.push(Check {
        name: "seccomp",
        ok: seccomp_ok,
        detail: seccomp.map_or("not available".into(), |a| {
            format!("filters available ({a})")
        }),
        hint: (!seccomp_ok).then(|| "use a kernel built with CONFIG_SECCOMP_FILTER".into()),
    });

    let exists = Path::new("/proc/self/ns/cgroup").exists();
    checks.push(Check {
        name: "cgroup namespaces",
        ok: exists,
        detail: if exists {
            "available".into()
        } else {
            "not available".into()
        },
        hint: (!exists).then(|| "use a kernel of version 4.6 or later".into()),
    });
    let runtime = crate::runtime::runtime_dir(&[]);
    checks.push(Check {
        name: "runtime directory",
        ok: runtime.is_ok(),
        detail: match &runtime {
            Ok(dir) => format!("{} (private to this user)", dir.display()),
            Err(e) => e.to_string(),
        },
        hint: runtime.err().map(|e| e.hint()),
    });
    let ext4 = filesystems.lines().any(|l| l.trim_end().ends_with("ext4"));
    let loop_control = Path::new("/dev/loop-control").exists();
    let mkfs = crate::disk::can_format();
    let disk_ok = root && ext4 && loop_control && mkfs;
    checks.push(Check {
        name: "disk limits",
        ok: disk_ok,
        detail: if disk_ok {
            "each sandbox's writes go to an ext4 disk of its own (mke2fs, a loop device)".into()
        } else if !root {
            "not enforced: only root may mount a sandbox's own disk (rootless)".into()
        } else if !mkfs {
            "not enforced: mke2fs is not installed".into()
        } else if !loop_control {
            "not enforced: /dev/loop-control is missing".into()
        } else {
            "not enforced: ext4 is not in /proc/filesystems".into()
        },
        hint: (!disk_ok).then(|| {
            if !root {
                "run as root to bound what a sandbox writes to disk".into()
            } else if !mkfs {
                "install e2fsprogs (Debian and Ubuntu: apt-get install e2fsprogs)".into()
            } else {
                "load the loop and ext4 modules (modprobe loop ext4)".into()
            }
        }),
    });
    checks
}

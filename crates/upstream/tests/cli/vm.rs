//! Sandboxes in microVMs (`isolation: vm`): QEMU booting the guest kernel, with the agent
//! as its init. Under TCG (hosts without a KVM that boots a stock kernel) each boot takes
//! seconds: these tests share what they can.

use upstream_image::testing::{Registry, layer_of_host_programs, layer_of_host_trees};

use crate::util::{Env, code, stderr, stdout};

/// Skips the calling test unless this host can run VM sandboxes: QEMU and a guest kernel
/// (scripts/test installs both). As root or in CI, a missing one is a failure.
macro_rules! require_vm {
    () => {
        if let Some(lack) = $crate::vm::lacks_vm() {
            $crate::util::skip(format!("SKIPPED: {}: {lack}", module_path!()));
            return;
        }
    };
}

pub fn lacks_vm() -> Option<String> {
    let qemu = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|d| d.join("qemu-system-x86_64").is_file())
    });
    if !qemu {
        return Some("no qemu-system-x86_64 on this machine (scripts/test installs it)".into());
    }
    if upstream_backend_vm::boot::Kernel::find(None).is_err() {
        return Some("no guest kernel (scripts/vm-kernel unpacks one)".into());
    }
    None
}

/// A registry with a small image of host programs.
fn image() -> Option<(Registry, String)> {
    let registry = Registry::start()?;
    let layer = layer_of_host_programs(
        &[
            "/usr/bin/bash",
            "/usr/bin/cat",
            "/usr/bin/uname",
            "/usr/bin/true",
            "/usr/bin/echo",
            "/usr/bin/ls",
            "/usr/bin/id",
            "/usr/bin/hostname",
            "/usr/bin/sleep",
        ],
        &[("etc/image-marker", b"from the image\n")],
    );
    registry.push(
        "test/vm:1",
        vec![(layer, "application/vnd.oci.image.layer.v1.tar+gzip")],
        &["PATH=/usr/bin"],
    );
    let name = format!("{}/test/vm:1", registry.host());
    Some((registry, name))
}

/// The programs the isolation attacks run in a VM (`isolation::vm`), beside bash.
const ATTACK_PROGRAMS: &[&str] = &[
    "/usr/bin/bash",
    "/usr/bin/sh",
    "/usr/bin/cat",
    "/usr/bin/ls",
    "/usr/bin/ps",
    "/usr/bin/grep",
    "/usr/bin/python3",
    "/usr/bin/mount",
    "/usr/bin/umount",
    "/usr/bin/unshare",
    "/usr/bin/dd",
    "/usr/sbin/blockdev",
    "/usr/bin/sync",
    "/usr/bin/head",
    "/usr/bin/tail",
    "/usr/bin/tr",
    "/usr/bin/sleep",
    "/usr/bin/setsid",
    "/usr/bin/id",
    "/usr/bin/wc",
    "/usr/bin/true",
    "/usr/bin/echo",
    "/usr/bin/uname",
    "/usr/bin/hostname",
    "/usr/bin/mkdir",
    "/usr/bin/rm",
    "/usr/bin/yes",
    "/usr/bin/cmp",
    "/usr/bin/sha256sum",
    "/usr/bin/od",
    "/usr/bin/mkfifo",
    "/usr/sbin/blkdiscard",
    "/usr/bin/dmesg",
];

/// The image the isolation attacks run in a VM from (`isolation::vm`): host programs, and
/// python with its standard library (less what no attack imports), pushed to a registry of
/// the test's own.
pub fn attack_image() -> Option<(Registry, String)> {
    let registry = Registry::start()?;
    let python = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import os, sysconfig; print(sysconfig.get_paths()['stdlib']); \
             print(os.path.basename(sysconfig.get_config_var('LIBPL')))",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&python.stdout).to_string();
    let mut lines = said.lines();
    let stdlib = lines.next().unwrap_or_default();
    // The static library and its makefiles, for building python itself: most of the tree.
    let config = lines.next().unwrap_or_default();
    let leave_out: &[&str] = &[
        config,
        "test",
        "idlelib",
        "tkinter",
        "lib2to3",
        "pydoc_data",
        "ensurepip",
        "distutils",
        "site-packages",
        "dist-packages",
    ];
    let files: &[(&str, &[u8])] = &[
        ("etc/image-marker", b"from the image\n"),
        // Root's home and /home, as a system has them.
        ("root/.profile", b""),
        ("home/.keep", b""),
        (
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
        ),
        ("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
    ];
    // Made once for every test process of the run (and the next runs): a layer of the
    // same programs, made under a name of this process's and renamed into place.
    let mut key = blake3::Hasher::new();
    key.update(format!("{ATTACK_PROGRAMS:?} {stdlib} {leave_out:?} {files:?}").as_bytes());
    let kept = std::env::temp_dir().join(format!(
        "upstream-test-vm-attack-{}.tar.gz",
        &key.finalize().to_hex()[..16]
    ));
    let layer = match std::fs::read(&kept) {
        Ok(layer) => layer,
        Err(_) => {
            let layer = layer_of_host_trees(ATTACK_PROGRAMS, &[(stdlib, leave_out)], files);
            let temp = kept.with_extension(format!("{}.tmp", std::process::id()));
            std::fs::write(&temp, &layer).unwrap();
            std::fs::rename(&temp, &kept).unwrap();
            layer
        }
    };
    registry.push(
        "test/vm-attack:1",
        vec![(layer, "application/vnd.oci.image.layer.v1.tar+gzip")],
        &["PATH=/usr/bin:/usr/sbin"],
    );
    let name = format!("{}/test/vm-attack:1", registry.host());
    Some((registry, name))
}

#[test]
fn a_command_runs_in_a_vm_with_its_own_kernel() {
    crate::require_root_sandbox!();
    require_vm!();
    let Some((_registry, image)) = image() else {
        crate::util::skip(
            "SKIPPED: no docker-registry on this machine (scripts/test installs it)".into(),
        );
        return;
    };
    let env = Env::new();
    let out = env
        .command()
        .env("UPSTREAM_CACHE_DIR", env.path("cache"))
        .args([
            "exec",
            "--isolation",
            "vm",
            "--image",
            &image,
            "--",
            "bash",
            "-c",
            "uname -r; cat /etc/image-marker; hostname",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    let guest_kernel = lines.next().unwrap_or_default();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(
        guest_kernel,
        host_kernel.trim(),
        "the guest runs the host's kernel"
    );
    assert!(guest_kernel.ends_with("cloud-amd64"), "{guest_kernel}");
    assert_eq!(lines.next(), Some("from the image"));
    assert_eq!(lines.next(), Some(upstream_sandbox::DEFAULT_HOSTNAME));
    // Control: the same command on namespaces sees the host's kernel.
    let out = env
        .command()
        .env("UPSTREAM_CACHE_DIR", env.path("cache"))
        .args(["exec", "--image", &image, "--", "uname", "-r"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), host_kernel.trim());
}

#[test]
fn doctor_names_the_vmm_accelerator_and_kernel_and_boots_a_guest() {
    crate::require_root_sandbox!();
    require_vm!();
    let env = Env::new();
    let out = env.upstream(&["doctor"]);
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("vm"))
        .unwrap_or_else(|| panic!("no vm line in:\n{text}"));
    assert!(line.starts_with("ok"), "{line}");
    assert!(line.contains("qemu-system-x86_64"), "{line}");
    assert!(line.contains("vmlinuz-"), "{line}");
    assert!(line.contains("a guest booted and powered off"), "{line}");
    // Control: a "kernel" that is no kernel boots nothing, and doctor says so.
    let not_a_kernel = env.write("vmlinuz-not", "not a kernel");
    let out = env
        .command()
        .env("UPSTREAM_VM_KERNEL", &not_a_kernel)
        .arg("doctor")
        .output()
        .unwrap();
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("vm"))
        .unwrap_or_else(|| panic!("no vm line in:\n{text}"));
    assert!(line.starts_with("no"), "{line}");
}

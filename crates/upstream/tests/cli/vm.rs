//! Sandboxes in microVMs (`isolation: vm`): QEMU booting the guest kernel, with the agent
//! as its init. Under TCG (hosts without a KVM that boots a stock kernel) each boot takes
//! seconds: these tests share what they can.

use upstream_image::testing::{Registry, layer_of_host_programs, layer_of_host_trees};

use crate::util::{Env, code, stderr, stdout};

/// Skips the calling test unless this host can run VM sandboxes: QEMU and a guest kernel
/// (scripts/test installs both). As root or in CI, a missing one is a failure.
#[macro_export]
macro_rules! require_vm {
    () => {
        if let Some(lack) = $crate::vm::lacks_vm() {
            $crate::util::skip(format!("SKIPPED: {}: {lack}", module_path!()));
            return;
        }
    };
}

/// A registry with the VM tests' image ([`image`]) and the image's name, or skips the
/// calling test (scripts/test installs docker-registry; as root a skip fails the run).
#[macro_export]
macro_rules! require_image {
    () => {
        match $crate::vm::image() {
            Some(found) => found,
            None => {
                $crate::util::skip(
                    "SKIPPED: no docker-registry on this machine (scripts/test installs it)".into(),
                );
                return;
            }
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

/// The VM cache of the tests that share one, for every test of the run (and the next
/// runs): the initramfs, and the disk of the host's files that `image: host` VMs boot
/// (gigabytes, made once per state of the host's files).
pub fn shared_vm_cache() -> std::path::PathBuf {
    std::env::temp_dir().join("upstream-cli-vm-cache")
}

/// The path of the disk of the host's files as they are now in [`shared_vm_cache`], and
/// whether it is made.
fn host_disk_now() -> (std::path::PathBuf, bool) {
    let survey = upstream_backend_vm::host_disk::survey(std::path::Path::new("/")).unwrap();
    let path = shared_vm_cache().join("host").join(survey.disk_name());
    let made = path.is_file();
    (path, made)
}

/// A registry with a small image of host programs.
pub fn image() -> Option<(Registry, String)> {
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
            "/usr/bin/nproc",
            "/usr/bin/head",
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
    let (_registry, image) = require_image!();
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

/// A VMM asked for that cannot be had is said in a sentence, on every host: a name that is
/// no VMM's, Firecracker at a path that is no file; and QEMU asked for is QEMU, said so.
#[test]
fn doctor_says_why_a_vmm_asked_for_cannot_be_had() {
    crate::require_root_sandbox!();
    require_vm!();
    let env = Env::new();
    let vm_line = |vars: &[(&str, &str)]| {
        let mut command = env.command();
        for (k, v) in vars {
            command.env(k, v);
        }
        let text = stdout(&command.arg("doctor").output().unwrap());
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some("vm"))
            .unwrap_or_else(|| panic!("no vm line in:\n{text}"))
            .to_string()
    };
    let line = vm_line(&[("UPSTREAM_VMM", "kvmtool")]);
    assert!(line.starts_with("no"), "{line}");
    assert!(line.contains("`qemu` or `firecracker`"), "{line}");
    let line = vm_line(&[
        ("UPSTREAM_VMM", "firecracker"),
        ("UPSTREAM_FIRECRACKER", "/nonexistent/firecracker"),
    ]);
    assert!(line.starts_with("no"), "{line}");
    assert!(line.contains("which is no file"), "{line}");
    // Control: QEMU asked for is taken, and the line says why.
    let line = vm_line(&[("UPSTREAM_VMM", "qemu")]);
    assert!(line.starts_with("ok"), "{line}");
    assert!(line.contains("($UPSTREAM_VMM=qemu)"), "{line}");
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
    assert!(
        line.contains("qemu-system-x86_64") || line.contains("firecracker ("),
        "{line}"
    );
    // Why this VMM: no Firecracker, a KVM it cannot use, or Firecracker and one it can.
    assert!(
        [
            "no firecracker binary on the PATH",
            "Firecracker needs hardware KVM",
            "/dev/kvm runs a stock guest",
            "$UPSTREAM_VMM=",
        ]
        .iter()
        .any(|why| line.contains(why)),
        "{line}"
    );
    assert!(line.contains("vmlinuz-"), "{line}");
    assert!(line.contains("a guest booted and powered off"), "{line}");
    // As root the VM's monitor has a root of its own: nothing is said to be unconfined.
    assert!(!line.contains("sees the host's files"), "{line}");
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

/// Without root the VM's monitor keeps the host's root (a mount namespace of its own needs
/// root): `upstream doctor` still boots a guest, and says the monitor sees the host's files
/// as upstream's user does. The control is the root doctor's line above, which does not.
#[test]
fn doctor_says_a_vm_monitor_without_root_sees_the_hosts_files() {
    crate::require_root_sandbox!();
    require_vm!();
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    let nobody = 65534;
    let work = env.path("nobody");
    std::fs::create_dir(&work).unwrap();
    std::os::unix::fs::chown(&work, Some(nobody), Some(nobody)).unwrap();
    let out = std::process::Command::new(crate::util::binary_for_nobody(&env))
        .arg("doctor")
        .current_dir(&work)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", &work)
        .env("UPSTREAM_RUNTIME_DIR", work.join("runtime"))
        .uid(nobody)
        .gid(nobody)
        .output()
        .unwrap();
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("vm"))
        .unwrap_or_else(|| panic!("no vm line in:\n{text}\n{}", stderr(&out)));
    assert!(line.starts_with("ok"), "{line}");
    assert!(line.contains("a guest booted and powered off"), "{line}");
    assert!(
        line.contains(
            "the VM's monitor sees the host's files as upstream's user does: a root of its own needs upstream to run as root"
        ),
        "{line}"
    );
}

/// A daemon's pool of VMs is filled by restoring a snapshot of one booted guest; what it
/// hands out are machines of their own, and sandboxes of other shapes boot as before.
#[test]
fn a_daemon_fills_a_pool_of_vms_from_a_snapshot() {
    use serde_json::json;

    use crate::serve::{Daemon, id, unix_request};

    crate::require_root_sandbox!();
    require_vm!();
    let (registry, image) = require_image!();
    let env = Env::new();
    let pool = format!("{image},isolation=vm=2");
    let daemon = Daemon::start(&env, &["--registry", &registry.host(), "--pool", &pool]);
    let api = daemon.client(&daemon.key("t", "t"));
    let metric = format!("upstream_pool_ready{{pool=\"{image} isolation=vm\"}} ");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let (_, text) = unix_request(&daemon.socket, "GET", "/metrics", "");
        let ready = text
            .lines()
            .find_map(|l| l.strip_prefix(metric.as_str()))
            .map_or(0, |n| n.parse::<usize>().unwrap());
        if ready == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled: {text}\nthe daemon warned: {}",
            daemon
                .log
                .lock()
                .unwrap()
                .lines()
                .filter(|l| !l.contains(" INFO "))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let identity = [
        "bash",
        "-c",
        "cat /proc/sys/kernel/random/boot_id; uname -r",
    ];
    let mut boot_ids = Vec::new();
    for _ in 0..2 {
        let sandbox = api.create(json!({ "image": image, "isolation": "vm" }));
        assert_eq!(sandbox["from_pool"], true, "{sandbox}");
        assert_eq!(sandbox["isolation"], "vm", "{sandbox}");
        let ran = api.exec(&id(&sandbox), &identity);
        let out = ran["stdout"].as_str().unwrap().to_string();
        let mut lines = out.lines();
        boot_ids.push(lines.next().unwrap().to_string());
        assert!(lines.next().unwrap().ends_with("cloud-amd64"), "{out}");
    }
    assert_ne!(boot_ids[0], boot_ids[1], "two pooled VMs are one machine");
    // Another shape is booted on the spot, and is a VM all the same.
    let other = api.create(json!({
        "image": image, "isolation": "vm", "limits": { "memory": "300M" }
    }));
    assert_eq!(other["from_pool"], false, "{other}");
    let ran = api.exec(&id(&other), &identity);
    assert!(
        ran["stdout"].as_str().unwrap().contains("cloud-amd64"),
        "{ran}"
    );
    // An isolation that is none is refused in a sentence.
    let (status, body) = api.post(
        "/v1/sandboxes",
        json!({ "image": image, "isolation": "chroot" }),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.to_string().contains("use `namespaces` or `vm`"),
        "{body}"
    );
}

/// A turn on a VM that fails is resumed at the failed step, on a VM again, with the disk as
/// it was before that step: what the step wrote before failing is gone, what came before is
/// there, inside the workspace and out.
#[test]
fn a_failed_turn_on_a_vm_resumes_from_its_kept_disk() {
    crate::require_root_sandbox!();
    require_vm!();
    let (_registry, image) = require_image!();
    let env = Env::new();
    let doc = |second: &str| {
        format!(
            "---\nisolation: vm\nimage: {image}\n---\n\n```bash\necho one > a.txt; echo made > /tmp/m\n```\n\n```bash\n{second}\n```\n"
        )
    };
    let path = env.write(
        "vm.md",
        doc("echo two > b.txt; echo changed > a.txt; exit 1"),
    );
    let out = env
        .command()
        .env("UPSTREAM_CACHE_DIR", env.path("cache"))
        .args(["run", "vm.md"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let kept = env.runtime.join("vm/kept");
    let sets = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&kept)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    assert_eq!(
        sets().len(),
        1,
        "the failed turn kept its disk: {:?}",
        sets()
    );
    let failed = std::fs::read_to_string(&path).unwrap();
    // The fix: step 2 rewritten, step 1 and its result as they were.
    let fixed = failed.replace(
        "echo two > b.txt; echo changed > a.txt; exit 1",
        "cat a.txt /tmp/m; test ! -e b.txt && echo clean",
    );
    assert_ne!(fixed, failed);
    std::fs::write(&path, fixed).unwrap();
    let out = env
        .command()
        .env("UPSTREAM_CACHE_DIR", env.path("cache"))
        .args(["run", "--resume", "vm.md"])
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(code(&out), 0, "{}\n{text}", stderr(&out));
    assert!(
        stderr(&out).contains("Resuming turn 1 at step 2"),
        "{}",
        stderr(&out)
    );
    assert!(text.contains("one\nmade\nclean"), "{text}");
    // Nothing is left kept once the resumed turn passed.
    assert!(sets().is_empty(), "{:?}", sets());
}

#[test]
fn a_document_with_the_hosts_network_reaches_the_hosts_loopback_from_a_vm() {
    use std::io::{BufRead, Write};
    crate::require_root_sandbox!();
    require_vm!();
    let (_registry, image) = require_image!();
    // A server on the host's 127.0.0.1 that answers one line.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(30)));
        let mut line = String::new();
        let _ = std::io::BufReader::new(&stream).read_line(&mut line);
        let _ = (&stream).write_all(b"pong from the host\n");
        let _ = tx.send(line);
    });
    let host = upstream_backend_vm::network::HOST_ADDRESS;
    let env = Env::new();
    let doc = format!(
        "---\nisolation: vm\nimage: {image}\nnetwork: host\n---\n\
         ```bash\n\
         exec 3<>/dev/tcp/{host}/{port}\n\
         echo ping >&3\n\
         read -r reply <&3\n\
         echo \"$reply\"\n\
         cat /etc/resolv.conf\n\
         ls /sys/class/net\n\
         cat /sys/class/net/eth0/address\n\
         ```\n"
    );
    let path = env.write("net.md", &doc);
    let out = env
        .command()
        .env("UPSTREAM_CACHE_DIR", env.path("cache"))
        .args(["run", "net.md"])
        .output()
        .unwrap();
    let block = crate::util::result_block(&std::fs::read_to_string(&path).unwrap(), 1);
    assert_eq!(code(&out), 0, "{}\n{block}", stderr(&out));
    assert!(
        block.contains(&format!(
            "pong from the host\nnameserver {}\neth0\nlo\n52:54:00:",
            upstream_backend_vm::network::RESOLVER
        )),
        "{block}"
    );
    // A MAC of the sandbox's own, not QEMU's default.
    assert!(!block.contains("52:54:00:12:34:56"), "{block}");
    assert_eq!(
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
        "ping\n"
    );
}

/// Firecracker's binary, if this host can run it: a `firecracker` on the PATH and a
/// `/dev/kvm` that runs a stock guest (`kvm::stock_guest_runs`). Otherwise says why, as a
/// lack of hardware.
fn firecracker_here() -> Option<std::path::PathBuf> {
    let binary = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("firecracker"))
            .find(|p| p.is_file())
    });
    let why = match binary {
        None => "no firecracker binary on the PATH".to_string(),
        Some(binary) => match upstream_backend_vm::kvm::stock_guest_runs() {
            Ok(()) => return Some(binary),
            Err(why) => format!("no hardware KVM: {why}"),
        },
    };
    crate::util::skip_for(
        crate::util::Lack::Hardware,
        format!(
            "{}: no firecracker binary / no hardware KVM ({why})",
            module_path!()
        ),
    );
    None
}

#[test]
fn a_command_runs_in_a_firecracker_vm() {
    crate::require_root_sandbox!();
    require_vm!();
    if firecracker_here().is_none() {
        return;
    }
    let Some((_registry, image)) = image() else {
        crate::util::skip(
            "SKIPPED: no docker-registry on this machine (scripts/test installs it)".into(),
        );
        return;
    };
    let env = Env::new();
    let run = |vmm: &str| {
        env.command()
            .env("UPSTREAM_CACHE_DIR", env.path("cache"))
            .env("UPSTREAM_VMM", vmm)
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
            .unwrap()
    };
    let out = run("firecracker");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert!(
        lines.next().unwrap_or_default().ends_with("cloud-amd64"),
        "{text}"
    );
    assert_eq!(lines.next(), Some("from the image"));
    assert_eq!(lines.next(), Some(upstream_sandbox::DEFAULT_HOSTNAME));
    // doctor names Firecracker and why.
    let out = env
        .command()
        .env("UPSTREAM_VMM", "firecracker")
        .arg("doctor")
        .output()
        .unwrap();
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("vm"))
        .unwrap_or_else(|| panic!("no vm line in:\n{text}"));
    assert!(line.starts_with("ok"), "{line}");
    assert!(line.contains("firecracker"), "{line}");
    assert!(line.contains("$UPSTREAM_VMM=firecracker"), "{line}");
}

/// A root of host programs for a guest, unpacked: the programs, their libraries and a
/// marker.
fn host_rootfs(at: &std::path::Path) {
    for program in [
        "/usr/bin/bash",
        "/usr/bin/cat",
        "/usr/bin/uname",
        "/usr/bin/true",
    ] {
        let mut files =
            upstream_backend_vm::boot::libraries_of(std::path::Path::new(program)).unwrap();
        files.push(program.into());
        for file in files {
            let inside = at.join(file.strip_prefix("/").unwrap());
            std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
            std::fs::copy(&file, &inside).unwrap();
        }
    }
    std::fs::create_dir_all(at.join("etc")).unwrap();
    std::fs::write(at.join("etc/image-marker"), "from the image\n").unwrap();
}

#[test]
fn a_firecracker_vm_runs_a_command_from_its_snapshot() {
    use std::time::{Duration, Instant};
    use upstream_backend_vm::vmm::{Channel, MachineSpec, Snapshot, Vmm};
    use upstream_backend_vm::{boot, disk, firecracker::Firecracker, guest};
    crate::require_root_sandbox!();
    require_vm!();
    let Some(binary) = firecracker_here() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let kernel = boot::Kernel::find(None).unwrap();
    let fc = Firecracker {
        binary,
        jailer: None,
    };
    let vmlinux = fc.boot_image(&kernel, &cache).unwrap();
    let initramfs = boot::initramfs_for(
        &cache,
        std::path::Path::new(crate::util::BIN),
        &kernel,
        Channel::Vsock,
    )
    .unwrap();
    host_rootfs(&work.path().join("rootfs"));
    let root_disk = disk::root_disk(&cache.join("roots"), &work.path().join("rootfs")).unwrap();
    let cmdline = guest::cmdline(
        "snap",
        None,
        None,
        upstream_backend_vm::network::Network::None,
    );
    let sandbox = |name: &str| {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let exec = |client: &mut upstream_sandbox::AgentClient<std::os::unix::net::UnixStream>,
                script: &str| {
        let request = upstream_sandbox::ExecRequest {
            argv: vec!["/usr/bin/bash".into(), "-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin".into())],
            cwd: "/".into(),
            timeout_ms: Some(30_000),
            ..Default::default()
        };
        let mut out = Vec::new();
        let exited = client
            .exec(&request, &mut |_, d| out.extend_from_slice(d))
            .unwrap();
        assert!(exited.status.success(), "{exited:?}");
        String::from_utf8(out).unwrap()
    };

    let first = sandbox("1-first-0");
    let scratch = first.join("scratch.ext4");
    disk::scratch_disk(&scratch, 64 << 20).unwrap();
    let spec = MachineSpec {
        kernel: &vmlinux,
        initramfs: &initramfs,
        root_disk: &root_disk,
        scratch_disk: &scratch,
        memory_mib: 256,
        cpus: 1,
        cmdline: &cmdline,
        network: upstream_backend_vm::network::Network::None,
        dir: &first,
        snapshot_memory: None,
        confinement: None,
    };
    let mut vm = fc.start(&spec).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let mut agent = upstream_sandbox::AgentClient::new(vm.connect_agent(until).unwrap());
    agent.wait_ready().unwrap();
    assert_eq!(
        exec(
            &mut agent,
            "cat /etc/image-marker; echo before > /tmp/mark; hostname"
        ),
        "from the image\nsnap\n"
    );
    // The agent lets its first connection go, and the snapshot is taken of a guest that
    // listens for the next.
    drop(agent);
    std::thread::sleep(Duration::from_millis(200));
    let snapshot = Snapshot {
        state: work.path().join("vm.state"),
        memory: work.path().join("vm.mem"),
    };
    vm.snapshot(&snapshot).unwrap();
    // The restored guest's disk is the snapshotted one's as it was when it was taken.
    let second = sandbox("2-second-0");
    let scratch2 = second.join("scratch.ext4");
    std::fs::copy(&scratch, &scratch2).unwrap();
    vm.kill();

    let started = Instant::now();
    let spec = MachineSpec {
        scratch_disk: &scratch2,
        dir: &second,
        ..spec
    };
    let mut restored = fc.restore(&snapshot, &spec).unwrap();
    let mut agent = upstream_sandbox::AgentClient::new(restored.connect_agent(until).unwrap());
    agent.wait_ready().unwrap();
    assert_eq!(
        exec(&mut agent, "cat /tmp/mark; uname -r"),
        format!("before\n{}\n", kernel.version)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a restore took {:?}",
        started.elapsed()
    );
    restored.kill();
}

/// What a Firecracker guest does differently, tried where it can be: under QEMU, a guest told
/// to tell its disks apart by mode (`upstream.disks=by-mode`) mounts the read-only one as the
/// image and the writable one as its own, and one told to stop by rebooting ends its VM so.
#[test]
fn a_guest_finds_its_disks_by_mode_and_stops_by_reboot_as_under_firecracker() {
    use std::time::{Duration, Instant};
    use upstream_backend_vm::qemu::{Accel, Qemu};
    use upstream_backend_vm::vmm::{MachineSpec, Vmm};
    use upstream_backend_vm::{boot, disk, guest};
    crate::require_root_sandbox!();
    require_vm!();
    let qemu = Qemu {
        qemu: std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
            .unwrap(),
        accel: Accel::Tcg,
    };
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let kernel = boot::Kernel::find(None).unwrap();
    let initramfs =
        boot::initramfs(&cache, std::path::Path::new(crate::util::BIN), &kernel).unwrap();
    host_rootfs(&work.path().join("rootfs"));
    let root_disk = disk::root_disk(&cache.join("roots"), &work.path().join("rootfs")).unwrap();
    let mut cmdline = guest::cmdline(
        "by-mode",
        None,
        None,
        upstream_backend_vm::network::Network::None,
    );
    cmdline.push(guest::DISKS_BY_MODE.into());
    cmdline.push(guest::STOP_BY_REBOOT.into());
    let dir = work.path().join("1-by-mode-0");
    std::fs::create_dir_all(&dir).unwrap();
    let scratch = dir.join("scratch.ext4");
    disk::scratch_disk(&scratch, 64 << 20).unwrap();
    let spec = MachineSpec {
        kernel: &kernel.image,
        initramfs: &initramfs,
        root_disk: &root_disk,
        scratch_disk: &scratch,
        memory_mib: 256,
        cpus: 1,
        cmdline: &cmdline,
        network: upstream_backend_vm::network::Network::None,
        dir: &dir,
        snapshot_memory: None,
        confinement: None,
    };
    let mut vm = qemu.start(&spec).unwrap();
    let until = Instant::now() + Duration::from_secs(90);
    let mut agent = upstream_sandbox::AgentClient::new(vm.connect_agent(until).unwrap());
    agent.wait_ready().unwrap();
    let request = upstream_sandbox::ExecRequest {
        argv: vec![
            "/usr/bin/bash".into(),
            "-c".into(),
            "cat /etc/image-marker; echo mine > /tmp/mine; cat /tmp/mine".into(),
        ],
        env: vec![("PATH".into(), "/usr/bin".into())],
        cwd: "/".into(),
        timeout_ms: Some(30_000),
        ..Default::default()
    };
    let mut out = Vec::new();
    let exited = agent
        .exec(&request, &mut |_, d| out.extend_from_slice(d))
        .unwrap();
    assert!(exited.status.success(), "{exited:?}");
    assert_eq!(String::from_utf8(out).unwrap(), "from the image\nmine\n");
    // Asked to shut down, the guest reboots, which ends QEMU (`-no-reboot`) as it ends
    // Firecracker.
    agent.request_shutdown().unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = vm.process().try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < until, "the guest did not end its VM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let console = vm.console().tail_once_closed(Duration::from_secs(2));
    assert!(
        console.contains("reboot: Restarting system"),
        "no reboot on the console: {console}"
    );
}

/// `image: host` on a VM: the host's programs and /etc, as a namespace sandbox sees them,
/// from a disk of the host's files, under the guest's own kernel; what the guest writes
/// stays in it, and what only root may read on the host is not there to read. A second
/// sandbox boots the same disk.
#[test]
fn a_vm_of_the_host_image_runs_the_hosts_programs_on_its_own_kernel() {
    use std::os::unix::fs::MetadataExt;
    crate::require_root_sandbox!();
    require_vm!();
    let env = Env::new();
    let marker = format!("upstream-vm-host-{}", std::process::id());
    // The guest's root reads anything on its disk: what is not there cannot be read.
    let shadow = std::fs::metadata("/etc/shadow").unwrap();
    assert_eq!(
        shadow.mode() & 0o004,
        0,
        "the host's /etc/shadow is for anyone"
    );
    assert!(shadow.len() > 0);
    let script = format!(
        "echo \"kernel=$(uname -r)\"\n\
         echo \"env=$(/usr/bin/env | grep -c '^PATH=')\"\n\
         echo \"python=$(python3 -c 'print(6 * 7)')\"\n\
         echo \"os-release=$(sha256sum < /etc/os-release)\"\n\
         echo \"passwd=$(sha256sum < /etc/passwd)\"\n\
         echo \"shadow=$(wc -c < /etc/shadow)\"\n\
         echo \"hostname=$(cat /etc/hostname)\"\n\
         echo guest > /etc/{marker} && echo guest > /usr/{marker} &&\n\
         echo \"wrote=$(cat /etc/{marker} /usr/{marker} | tr '\\n' ' ')\"\n"
    );
    let (disk, made) = host_disk_now();
    let out = env
        .command()
        .env("UPSTREAM_VM_CACHE", shared_vm_cache())
        .args(["exec", "--isolation", "vm", "--", "bash", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // The user is told while the disk is made (unless another test's upstream made it
    // meanwhile), and not when it was made already.
    if made {
        assert!(
            !stderr(&out).contains(upstream_backend_vm::host_disk::BUILDING),
            "{}",
            stderr(&out)
        );
    }
    assert!(disk.is_file(), "no disk at {}", disk.display());
    let text = stdout(&out);
    let said = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
            .to_string()
    };
    let sha = |path: &str| {
        let out = std::process::Command::new("sha256sum")
            .stdin(std::fs::File::open(path).unwrap())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let guest_kernel = said("kernel");
    assert_ne!(
        guest_kernel,
        host_kernel.trim(),
        "the guest runs the host's kernel"
    );
    assert!(guest_kernel.ends_with("cloud-amd64"), "{guest_kernel}");
    assert_eq!(said("env"), "1");
    assert_eq!(said("python"), "42");
    assert_eq!(said("os-release"), sha("/etc/os-release"));
    // The control: a file anyone may read is read whole; the one only root (and the
    // shadow group) may is there empty.
    assert_eq!(said("passwd"), sha("/etc/passwd"));
    assert_eq!(said("shadow"), "0");
    assert_eq!(said("hostname"), upstream_sandbox::DEFAULT_HOSTNAME);
    assert_eq!(said("wrote"), "guest guest ");
    for tree in ["/etc", "/usr"] {
        let path = std::path::Path::new(tree).join(&marker);
        assert!(!path.exists(), "the guest wrote {}", path.display());
    }
    let first = std::fs::metadata(&disk).unwrap();
    // A document of `isolation: vm` and no image boots the same disk: not made again.
    let doc = env.write(
        "host.md",
        "---\nisolation: vm\n---\n```bash\nuname -r; cat /etc/os-release\n```\n",
    );
    let out = env
        .command()
        .env("UPSTREAM_VM_CACHE", shared_vm_cache())
        .args(["run", doc.to_str().unwrap()])
        .output()
        .unwrap();
    let result = crate::util::result_block(&std::fs::read_to_string(&doc).unwrap(), 1);
    assert_eq!(code(&out), 0, "{}\n{result}", stderr(&out));
    assert!(result.contains("cloud-amd64"), "{result}");
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    assert!(
        result.contains(os_release.lines().next().unwrap()),
        "{result}"
    );
    assert!(
        !stderr(&out).contains(upstream_backend_vm::host_disk::BUILDING),
        "{}",
        stderr(&out)
    );
    let again = std::fs::metadata(&disk).unwrap();
    assert_eq!(
        (again.ino(), again.mtime(), again.mtime_nsec()),
        (first.ino(), first.mtime(), first.mtime_nsec()),
        "the host's disk was made again"
    );
}

/// A daemon's pool of `image: host` VMs is filled from a snapshot of a machine on the
/// host's disk, and what it hands out runs the host's programs.
#[test]
fn a_daemon_fills_a_pool_of_host_image_vms() {
    use serde_json::json;

    use crate::serve::{Daemon, id, unix_request};

    crate::require_root_sandbox!();
    require_vm!();
    let env = Env::new();
    let mut command = std::process::Command::new(crate::util::BIN);
    command
        .env("UPSTREAM_RUNTIME_DIR", &env.runtime)
        .env("UPSTREAM_CACHE_DIR", env.path("cache"))
        .env("UPSTREAM_VM_CACHE", shared_vm_cache());
    let daemon = Daemon::start_with(
        command,
        env.path("state"),
        env.runtime.clone(),
        &["--pool", "host,isolation=vm=1"],
    );
    let api = daemon.client(&daemon.key("t", "t"));
    let metric = "upstream_pool_ready{pool=\"host isolation=vm\"} 1";
    // Making the host's disk, if this is the first test to need it, takes minutes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
    loop {
        let (_, text) = unix_request(&daemon.socket, "GET", "/metrics", "");
        if text.lines().any(|l| l == metric) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled: {text}\nthe daemon said: {}",
            daemon.log.lock().unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let sandbox = api.create(json!({ "isolation": "vm" }));
    assert_eq!(sandbox["from_pool"], true, "{sandbox}");
    let ran = api.exec(
        &id(&sandbox),
        &[
            "bash",
            "-c",
            "uname -r; python3 -c 'print(6 * 7)'; cat /etc/os-release",
        ],
    );
    let out = ran["stdout"].as_str().unwrap();
    let mut lines = out.lines();
    assert!(lines.next().unwrap().ends_with("cloud-amd64"), "{ran}");
    assert_eq!(lines.next(), Some("42"), "{ran}");
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    assert_eq!(lines.next(), os_release.lines().next(), "{ran}");
}

/// The binary is the keeper of the pid namespace jailed Firecrackers run in
/// (`__vm-jail-keeper`) only as that namespace's first process, and ends when upstream's end
/// of its standard input closes, which ends the namespace's VMs; the backend's tests start
/// jailed VMs under the same keeper code (`backend-vm tests/firecracker.rs`).
#[test]
fn the_binary_keeps_the_jailed_vms_namespace_only_as_its_first_process_and_ends_with_upstream() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let out = Command::new(crate::util::BIN)
        .arg("__vm-jail-keeper")
        .output()
        .unwrap();
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("not pid 1"), "{}", stderr(&out));
    if !crate::util::is_root() {
        crate::util::skip_for(
            crate::util::Lack::Root,
            format!("{}: needs root (a pid namespace)", module_path!()),
        );
        return;
    }
    // As pid 1 of a namespace of its own, its standard input a pipe the test holds.
    let mut keeper = Command::new("unshare")
        .args(["--pid", "--fork", crate::util::BIN, "__vm-jail-keeper"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut upstream_end = keeper.stdin.take().unwrap();
    upstream_end
        .write_all(b"anything written is not an end")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        keeper.try_wait().unwrap().is_none(),
        "the keeper ended while upstream's end was open"
    );
    drop(upstream_end);
    let until = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = keeper.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= until {
            let _ = keeper.kill();
            panic!("the keeper outlived upstream's end of its pipe");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

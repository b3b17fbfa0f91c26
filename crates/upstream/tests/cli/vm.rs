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

//! Sandboxes in microVMs (`isolation: vm`): QEMU booting the guest kernel, with the agent
//! as its init. Under TCG (hosts without a KVM that boots a stock kernel) each boot takes
//! seconds: these tests share what they can.

use upstream_image::testing::{Registry, layer_of_host_programs};

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

#[test]
fn a_document_with_the_hosts_network_reaches_the_hosts_loopback_from_a_vm() {
    use std::io::{BufRead, Write};
    crate::require_root_sandbox!();
    require_vm!();
    let Some((_registry, image)) = image() else {
        crate::util::skip(
            "SKIPPED: no docker-registry on this machine (scripts/test installs it)".into(),
        );
        return;
    };
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

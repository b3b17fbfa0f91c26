//! VM sandboxes (`isolation: vm`) against their peers, measured in one run, interleaved.
//!
//! - cold boot: a VM sandbox from `create` to its agent's first word, against
//!   `qemu-system-x86_64` booting the same kernel and initramfs on the same machine to an
//!   init that powers off at once (start to exit);
//! - exec: `true` in a running VM sandbox, p50 and p99;
//! - ten steps: a sandbox made, ten `true`s run in it one after another and torn down, on a
//!   VM against the same on namespaces.
//!
//! Needs root, QEMU and a guest kernel (`scripts/vm-kernel`); says so and does nothing
//! without. `UPSTREAM_BENCH_RUNS` sets the rounds (default 5).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use upstream_backend_vm::{VmBackend, VmConfig, boot, disk, guest, qemu};
use upstream_sandbox::{Backend, ExecRequest, Image, Isolation, SandboxSpec};

const BIN: &str = env!("CARGO_BIN_EXE_upstream");

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("vm: needs root (sandboxes on images); nothing measured");
        return;
    }
    let runs: usize = std::env::var("UPSTREAM_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let work = tempfile::tempdir().unwrap();
    let config = match VmConfig::in_runtime_dir(
        PathBuf::from(BIN),
        None,
        Some(&work.path().join("runtime")),
    ) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vm: this machine cannot run VM sandboxes ({e}); nothing measured");
            return;
        }
    };
    if config.vmm.kind() != upstream_backend_vm::vmm::VmmKind::Qemu {
        eprintln!(
            "vm: the VMM here is {} and this measures QEMU against itself: set UPSTREAM_VMM=qemu",
            config.vmm.describe()
        );
        return;
    }
    let rootfs = small_rootfs(&work.path().join("rootfs"));
    let image = Image::Layers {
        reference: "bench/true".into(),
        layers: vec![rootfs.clone()],
    };
    let vm = VmBackend::new(config.clone());
    let spec = SandboxSpec {
        isolation: Isolation::Vm,
        image: image.clone(),
        ..SandboxSpec::default()
    };
    // Once first, unmeasured: the initramfs and the image's disk are made and kept.
    let mut warm = vm.create(&spec).unwrap();
    warm.wait_ready().unwrap();
    warm.destroy().unwrap();
    let initramfs = boot::initramfs(&config.cache, &config.init_exe, &config.kernel).unwrap();
    let root_disk = disk::root_disk(&config.cache.join("roots"), &rootfs).unwrap();

    let (mut cold, mut bare) = (Vec::new(), Vec::new());
    for round in 0..runs {
        let mut ours = || {
            let start = Instant::now();
            let mut sandbox = vm.create(&spec).unwrap();
            sandbox.wait_ready().unwrap();
            cold.push(start.elapsed());
            sandbox.destroy().unwrap();
        };
        let mut peer = || {
            let dir = work.path().join(format!("bare-{round}"));
            std::fs::create_dir_all(&dir).unwrap();
            let scratch = dir.join("scratch.ext4");
            disk::scratch_disk(&scratch, 1 << 30).unwrap();
            let cmdline = guest::cmdline(
                "sandbox",
                None,
                Some(upstream_sandbox::Limits::DEFAULT_PIDS),
            );
            let machine = qemu::Machine {
                qemu: &config.vmm_binary,
                accel: qemu::Accel::from_env(),
                kernel: &config.kernel.image,
                initramfs: &initramfs,
                root_disk: &root_disk,
                scratch_disk: &scratch,
                memory_mib: upstream_backend_vm::DEFAULT_MEMORY >> 20,
                cpus: 1,
                cmdline: &cmdline,
                dir: &dir,
                memory: qemu::Memory::Anonymous,
                incoming: false,
            };
            let start = Instant::now();
            let mut child = std::process::Command::new(&config.vmm_binary)
                .args(machine.args_with(&[guest::POWER_OFF_AT_ONCE]))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            child.wait().unwrap();
            bare.push(start.elapsed());
            std::fs::remove_dir_all(&dir).unwrap();
        };
        if round % 2 == 0 {
            ours();
            peer();
        } else {
            peer();
            ours();
        }
    }
    let ratio = ms(median(&cold)) / ms(median(&bare));
    println!(
        "cold boot to agent ready: {:.0} ms (median of {runs}); qemu booting the same kernel and initramfs to an init that powers off: {:.0} ms; ratio {ratio:.2} (target <= 1.2) {}",
        ms(median(&cold)),
        ms(median(&bare)),
        verdict(ratio <= 1.2)
    );

    // Exec of `true` in a running VM sandbox.
    let mut sandbox = vm.create(&spec).unwrap();
    sandbox.wait_ready().unwrap();
    let request = ExecRequest {
        argv: vec!["/usr/bin/true".into()],
        env: vec![("PATH".into(), "/usr/bin".into())],
        cwd: "/".into(),
        ..ExecRequest::default()
    };
    for _ in 0..10 {
        sandbox.exec(&request, &mut |_, _| {}).unwrap();
    }
    let mut execs = Vec::new();
    for _ in 0..(runs * 40) {
        let start = Instant::now();
        let outcome = sandbox.exec(&request, &mut |_, _| {}).unwrap();
        assert!(outcome.status.success());
        execs.push(start.elapsed());
    }
    sandbox.destroy().unwrap();
    execs.sort();
    let at = |q: f64| execs[((execs.len() as f64 * q) as usize).min(execs.len() - 1)];
    println!(
        "exec of true in a running VM sandbox ({} execs): p50 {:.2} ms, p99 {:.2} ms",
        execs.len(),
        ms(at(0.50)),
        ms(at(0.99))
    );

    // Ten steps, VM against namespaces, on the same image.
    let namespaces = upstream_backend_ns::NamespaceBackend::in_runtime_dir(
        PathBuf::from(BIN),
        Some(&work.path().join("runtime")),
    )
    .unwrap();
    let ns_spec = SandboxSpec {
        isolation: Isolation::Namespaces,
        ..spec.clone()
    };
    let ten = |backend: &dyn Backend, spec: &SandboxSpec| {
        let start = Instant::now();
        let mut sandbox = backend.create(spec).unwrap();
        for _ in 0..10 {
            let outcome = sandbox.exec(&request, &mut |_, _| {}).unwrap();
            assert!(outcome.status.success());
        }
        sandbox.destroy().unwrap();
        start.elapsed()
    };
    let (mut on_vm, mut on_ns) = (Vec::new(), Vec::new());
    for round in 0..runs {
        if round % 2 == 0 {
            on_vm.push(ten(&vm, &spec));
            on_ns.push(ten(&namespaces, &ns_spec));
        } else {
            on_ns.push(ten(&namespaces, &ns_spec));
            on_vm.push(ten(&vm, &spec));
        }
    }
    println!(
        "ten steps (make, 10 x true, tear down): vm {:.0} ms, namespaces {:.1} ms, ratio {:.0}",
        ms(median(&on_vm)),
        ms(median(&on_ns)),
        ms(median(&on_vm)) / ms(median(&on_ns))
    );
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn verdict(ok: bool) -> &'static str {
    if ok { "meets target" } else { "MISSES target" }
}

/// An image of `/usr/bin/true` and what it loads.
fn small_rootfs(root: &Path) -> PathBuf {
    for dir in ["usr/bin", "etc", "tmp", "workspace"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let copy = |named: &Path| {
        let from = std::fs::canonicalize(named).unwrap();
        let inside = root.join(from.strip_prefix("/").unwrap());
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::copy(&from, &inside).unwrap();
        let link = root.join(named.strip_prefix("/").unwrap());
        if named != from && std::fs::symlink_metadata(&link).is_err() {
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(&from, &link).unwrap();
        }
    };
    copy(Path::new("/usr/bin/true"));
    for library in boot::libraries_of(Path::new("/usr/bin/true")).unwrap() {
        copy(&library);
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/usr/bin/true\n").unwrap();
    root.to_path_buf()
}

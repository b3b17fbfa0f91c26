//! VM sandboxes (`isolation: vm`) against their peers, measured in one run, interleaved.
//!
//! - cold boot: a VM sandbox from `create` to its agent's first word, against
//!   `qemu-system-x86_64` booting the same kernel and initramfs on the same machine to an
//!   init that powers off at once (start to exit);
//! - the same cold boot with `network: host` (a virtio-net device on QEMU's user-mode NAT,
//!   the guest's driver loaded and its interface configured);
//! - exec: `true` in a running VM sandbox, booted cold and restored from a snapshot, p50
//!   and p99;
//! - ten steps: a sandbox made, ten `true`s run in it one after another and torn down, on a
//!   VM against the same on namespaces; and `upstream run` of a document of ten `true`
//!   steps with `isolation: vm` against the same document on namespaces;
//! - from a snapshot: a VM sandbox restored from a snapshot of its shape, from `create` to
//!   its first `true`'s result, against a cold boot to the same (target: 0.1 of it);
//! - memory: the proportional set size (PSS) of QEMU per idle VM sandbox of a 256 MiB
//!   guest with 20 idle, restored from a snapshot (target: 40 MiB), and of cold-booted ones.
//!
//! Needs root, QEMU and a guest kernel (`scripts/vm-kernel`); says so and does nothing
//! without. `UPSTREAM_BENCH_RUNS` sets the rounds (default 5); `UPSTREAM_BENCH_ONLY` names
//! the parts to measure, separated by commas (`boot`, `exec`, `steps`, `run`, `snapshot`,
//! `memory`; default all).

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
    let only = std::env::var("UPSTREAM_BENCH_ONLY").unwrap_or_default();
    let measures = |part: &str| only.is_empty() || only.split(',').any(|p| p.trim() == part);
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

    let request = ExecRequest {
        argv: vec!["/usr/bin/true".into()],
        env: vec![("PATH".into(), "/usr/bin".into())],
        cwd: "/".into(),
        ..ExecRequest::default()
    };
    let networked_spec = SandboxSpec {
        network: upstream_sandbox::NetworkMode::Host,
        ..spec.clone()
    };
    if measures("boot") {
        let (mut cold, mut bare, mut networked) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..runs {
            let boot = |spec: &SandboxSpec, into: &mut Vec<Duration>| {
                let start = Instant::now();
                let mut sandbox = vm.create(spec).unwrap();
                sandbox.wait_ready().unwrap();
                into.push(start.elapsed());
                sandbox.destroy().unwrap();
            };
            let mut ours = || boot(&spec, &mut cold);
            let mut peer = || {
                let dir = work.path().join(format!("bare-{round}"));
                std::fs::create_dir_all(&dir).unwrap();
                let scratch = dir.join("scratch.ext4");
                disk::scratch_disk(&scratch, 1 << 30).unwrap();
                let cmdline = guest::cmdline(
                    "sandbox",
                    None,
                    Some(upstream_sandbox::Limits::DEFAULT_PIDS),
                    upstream_backend_vm::network::Network::None,
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
                    network: upstream_backend_vm::network::Network::None,
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
                boot(&networked_spec, &mut networked);
                ours();
                peer();
            } else {
                peer();
                ours();
                boot(&networked_spec, &mut networked);
            }
        }
        let ratio = ms(median(&cold)) / ms(median(&bare));
        println!(
            "cold boot to agent ready: {:.0} ms (median of {runs}); qemu booting the same kernel and initramfs to an init that powers off: {:.0} ms; ratio {ratio:.2} (target <= 1.2) {}",
            ms(median(&cold)),
            ms(median(&bare)),
            verdict(ratio <= 1.2)
        );
        println!(
            "cold boot to agent ready with network: host: {:.0} ms (median of {runs}), {:+.0} ms against none",
            ms(median(&networked)),
            ms(median(&networked)) - ms(median(&cold))
        );
    }
    // Exec of `true` in a running VM sandbox.
    // Snapshots of the sandboxes' shapes are taken on this backend's first use of each.
    let restoring = VmBackend::new(config.clone());
    if measures("exec") {
        // In a VM booted cold and in one restored from a snapshot (whose translation cache
        // starts empty), one exec in each by turns.
        restoring.prepare(&spec).unwrap();
        let (mut booted, mut restored) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let mut pair = [vm.create(&spec).unwrap(), restoring.create(&spec).unwrap()];
            for sandbox in &mut pair {
                sandbox.wait_ready().unwrap();
                for _ in 0..10 {
                    sandbox.exec(&request, &mut |_, _| {}).unwrap();
                }
            }
            for _ in 0..40 {
                for (sandbox, into) in pair.iter_mut().zip([&mut booted, &mut restored]) {
                    let start = Instant::now();
                    let outcome = sandbox.exec(&request, &mut |_, _| {}).unwrap();
                    assert!(outcome.status.success());
                    into.push(start.elapsed());
                }
            }
            for sandbox in pair {
                sandbox.destroy().unwrap();
            }
        }
        let at = |execs: &mut Vec<Duration>, q: f64| {
            execs.sort();
            ms(execs[((execs.len() as f64 * q) as usize).min(execs.len() - 1)])
        };
        println!(
            "exec of true in a running VM sandbox ({} execs each): booted cold p50 {:.2} ms, p99 {:.2} ms; restored from a snapshot p50 {:.2} ms, p99 {:.2} ms",
            booted.len(),
            at(&mut booted, 0.50),
            at(&mut booted, 0.99),
            at(&mut restored, 0.50),
            at(&mut restored, 0.99)
        );
    }
    // Ten steps, VM against namespaces, on the same image.
    if measures("steps") {
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
    // A turn of ten trivial steps through `upstream run`, VM against namespaces, the image
    // from a registry on this machine.
    if !measures("run") {
    } else if let Some(registry) = upstream_image::testing::Registry::start() {
        let layer = upstream_image::testing::layer_of_host_programs(
            &["/usr/bin/bash", "/usr/bin/true"],
            &[],
        );
        registry.push(
            "bench/steps:1",
            vec![(layer, "application/vnd.oci.image.layer.v1.tar+gzip")],
            &["PATH=/usr/bin"],
        );
        let image = format!("{}/bench/steps:1", registry.host());
        let steps = "```bash\ntrue\n```\n\n".repeat(10);
        let turn = |isolation: &str, round: usize| {
            let dir = work.path().join(format!("turn-{isolation}-{round}"));
            std::fs::create_dir_all(&dir).unwrap();
            let doc = dir.join("turn.md");
            std::fs::write(
                &doc,
                format!("---\nisolation: {isolation}\nimage: {image}\n---\n\n{steps}"),
            )
            .unwrap();
            let start = Instant::now();
            let out = std::process::Command::new(BIN)
                .current_dir(&dir)
                .env("UPSTREAM_RUNTIME_DIR", work.path().join("runtime"))
                .env("UPSTREAM_CACHE_DIR", work.path().join("cache"))
                .args(["run", "turn.md"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            start.elapsed()
        };
        // Once each first, unmeasured: the image is pulled, the VM's disks made.
        turn("vm", runs);
        turn("namespaces", runs);
        let (mut on_vm, mut on_ns) = (Vec::new(), Vec::new());
        for round in 0..runs {
            if round % 2 == 0 {
                on_vm.push(turn("vm", round));
                on_ns.push(turn("namespaces", round));
            } else {
                on_ns.push(turn("namespaces", round));
                on_vm.push(turn("vm", round));
            }
        }
        println!(
            "upstream run of ten trivial steps: isolation vm {:.0} ms, namespaces {:.0} ms, ratio {:.1}",
            ms(median(&on_vm)),
            ms(median(&on_ns)),
            ms(median(&on_vm)) / ms(median(&on_ns))
        );
    } else {
        println!("upstream run of ten trivial steps: not measured (no docker-registry here)");
    }

    // From a snapshot against a cold boot, to the first command's result.
    if measures("snapshot") {
        let first_true = |backend: &VmBackend| {
            let start = Instant::now();
            let mut sandbox = backend.create(&spec).unwrap();
            let outcome = sandbox.exec(&request, &mut |_, _| {}).unwrap();
            assert!(outcome.status.success());
            let took = start.elapsed();
            sandbox.destroy().unwrap();
            took
        };
        restoring.prepare(&spec).unwrap();
        let (mut restored, mut booted) = (Vec::new(), Vec::new());
        for round in 0..runs {
            if round % 2 == 0 {
                restored.push(first_true(&restoring));
                booted.push(first_true(&vm));
            } else {
                booted.push(first_true(&vm));
                restored.push(first_true(&restoring));
            }
        }
        let ratio = ms(median(&restored)) / ms(median(&booted));
        println!(
            "to the first command's result: restored from a snapshot {:.0} ms, booted cold {:.0} ms (medians of {runs}); ratio {ratio:.3} (target <= 0.1) {}",
            ms(median(&restored)),
            ms(median(&booted)),
            verdict(ratio <= 0.1)
        );
    }
    // Memory of idle VMs of a 256 MiB guest: 20 restored, then 5 booted cold.
    if measures("memory") {
        let small = SandboxSpec {
            limits: upstream_sandbox::Limits {
                memory: Some((256 << 20) - upstream_backend_vm::GUEST_OVERHEAD),
                ..spec.limits
            },
            ..spec.clone()
        };
        restoring.prepare(&small).unwrap();
        let idle = |backend: &VmBackend, count: usize| {
            let mut sandboxes = Vec::new();
            for _ in 0..count {
                let mut sandbox = backend.create(&small).unwrap();
                let outcome = sandbox.exec(&request, &mut |_, _| {}).unwrap();
                assert!(outcome.status.success());
                sandboxes.push(sandbox);
            }
            // Idle: what the guests do once their command is done.
            std::thread::sleep(Duration::from_secs(3));
            let pss = vmm_pss(256 << 20);
            assert_eq!(pss.len(), count, "one QEMU per sandbox");
            for sandbox in sandboxes {
                sandbox.destroy().unwrap();
            }
            Pss::mean(&pss)
        };
        let (restored, cold) = (idle(&restoring, 20), idle(&vm, 5));
        let mib = |p: &Pss| p.total as f64 / f64::from(1 << 20);
        println!(
            "PSS per idle VM sandbox of a 256 MiB guest: {:.1} MiB with 20 restored from a snapshot (target <= 40) {}; {:.1} MiB with 5 booted cold; ratio {:.2}",
            mib(&restored),
            verdict(mib(&restored) <= 40.0),
            mib(&cold),
            mib(&restored) / mib(&cold)
        );
        println!("  restored, in MiB: {}", restored.parts());
        println!("  booted cold, in MiB: {}", cold.parts());
    }
}

/// The proportional set size of one QEMU, in bytes, and what it is made of.
#[derive(Debug, Default, Clone, Copy)]
struct Pss {
    total: u64,
    /// The guest's RAM: anonymous, or the snapshot's file mapped private.
    guest: u64,
    /// TCG's translation cache (QEMU's only executable anonymous mapping).
    translated: u64,
    /// Mapped files: QEMU's binary, its libraries (their relocated pages its own).
    files: u64,
    /// The rest: QEMU's heap, its threads' arenas and stacks, device buffers.
    own: u64,
}

impl Pss {
    fn mean(all: &[Pss]) -> Pss {
        let n = all.len().max(1) as u64;
        let sum = |f: fn(&Pss) -> u64| all.iter().map(f).sum::<u64>() / n;
        Pss {
            total: sum(|p| p.total),
            guest: sum(|p| p.guest),
            translated: sum(|p| p.translated),
            files: sum(|p| p.files),
            own: sum(|p| p.own),
        }
    }

    fn parts(&self) -> String {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        format!(
            "guest RAM {:.1}, translation cache {:.1}, QEMU's heap and other memory {:.1}, its binary and libraries {:.1}",
            mib(self.guest),
            mib(self.translated),
            mib(self.own),
            mib(self.files)
        )
    }
}

/// The PSS of each QEMU this process started, whose guests have `guest_ram` bytes of RAM.
/// `$UPSTREAM_BENCH_SMAPS` names a directory to copy their `smaps` to.
fn vmm_pss(guest_ram: u64) -> Vec<Pss> {
    let me = std::process::id().to_string();
    let mut sizes = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let dir = entry.path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`: the command may hold spaces, the part after it not.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1);
        if !head.contains("(qemu-system-x86") || ppid != Some(me.as_str()) {
            continue;
        }
        let (Ok(rollup), Ok(smaps)) = (
            std::fs::read_to_string(dir.join("smaps_rollup")),
            std::fs::read_to_string(dir.join("smaps")),
        ) else {
            continue;
        };
        let kib = |line: &str| -> u64 {
            line.trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0)
        };
        let mut pss = Pss {
            total: rollup
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .map_or(0, kib)
                << 10,
            ..Pss::default()
        };
        // Each mapping: `start-end perms offset dev inode [name]`, then its fields.
        let mut part: Option<&mut u64> = None;
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let range = words.next().unwrap_or("");
            if let Some((start, end)) = range.split_once('-').filter(|_| !range.ends_with(':')) {
                let size = u64::from_str_radix(end, 16).unwrap_or(0)
                    - u64::from_str_radix(start, 16).unwrap_or(0);
                let perms = words.next().unwrap_or("");
                let name = words.nth(3).unwrap_or("");
                part = Some(
                    if name.ends_with("/memory") || (name.is_empty() && size >= guest_ram) {
                        &mut pss.guest
                    } else if name.is_empty() && perms.contains('x') {
                        &mut pss.translated
                    } else if name.starts_with('/') {
                        &mut pss.files
                    } else {
                        &mut pss.own
                    },
                );
            } else if let (Some(part), Some(value)) = (part.as_mut(), line.strip_prefix("Pss:")) {
                **part += kib(value) << 10;
            }
        }
        sizes.push(pss);
        if let Some(to) = std::env::var_os("UPSTREAM_BENCH_SMAPS") {
            let pid = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            let _ = std::fs::create_dir_all(&to);
            let _ = std::fs::write(Path::new(&to).join(format!("{pid}.smaps")), &smaps);
        }
    }
    sizes
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

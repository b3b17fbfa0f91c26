//! A VM sandbox's limits and lifecycle, and its monitor's confinement: the QEMU process runs
//! as a user of its own in cgroups sized for its guest, dies with its sandbox and with
//! upstream, and a VM that dies fails its step and keeps the turn's other results. Each test
//! boots one guest (two for the monitor killed from outside): under TCG a boot takes seconds.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::util::{Env, code, result_block, stderr};

/// Skips the calling test unless this host runs VM sandboxes as root, with a registry for
/// the image; gives the registry and the image's name.
macro_rules! vm_image {
    () => {{
        crate::require_root_sandbox!();
        crate::require_vm!();
        crate::require_image!()
    }};
}

/// A document that runs `steps` (bash) in a VM of `image`, with `front` more front matter.
fn vm_document(image: &str, front: &str, steps: &[&str]) -> String {
    let mut doc = format!("---\nisolation: vm\nimage: {image}\n{front}---\n");
    for (n, step) in steps.iter().enumerate() {
        doc.push_str(&format!("# Step {}\n```bash\n{step}\n```\n", n + 1));
    }
    doc
}

/// `upstream run -v <doc>` in `env`, its stderr piped; the VM's files kept in one cache for
/// every test of the run (the initramfs is made once).
fn start_run(env: &Env, doc: &str) -> Child {
    env.command()
        .env("UPSTREAM_CACHE_DIR", env.path("cache"))
        .env("UPSTREAM_VM_CACHE", crate::vm::shared_vm_cache())
        .args(["run", "-v", doc])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads `child`'s stderr up to a line that is `line`; the lines read. Panics (killing the
/// child) if the stream ends first.
fn read_until(
    lines: &mut impl Iterator<Item = String>,
    child: &mut Child,
    line: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    for l in lines.by_ref() {
        let done = l == line;
        seen.push(l);
        if done {
            return seen;
        }
    }
    let _ = child.kill();
    panic!("never saw `{line}`:\n{}", seen.join("\n"));
}

/// The QEMU process `upstream` (pid `upstream`) started, once there is one.
fn vmm_of(upstream: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tasks = fs::read_dir(format!("/proc/{upstream}/task")).unwrap();
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace() {
                let comm = fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                if comm.starts_with("qemu-system") {
                    return child.parse().unwrap();
                }
            }
        }
        assert!(Instant::now() < deadline, "upstream started no QEMU");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|at| s[at + 2..].chars().next())
            .is_some_and(|state| state != 'Z')
    })
}

/// Waits up to `seconds` for process `pid` to be gone.
fn gone_within(pid: u32, seconds: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while running(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Field `name` of `/proc/<pid>/status`.
fn status(pid: u32, name: &str) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .trim()
        .to_string()
}

/// The cgroup directory of `pid` for v1 `controller` (or the unified one, where the host has
/// that controller in v2).
fn cgroup_of(pid: u32, controller: &str) -> PathBuf {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, names, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        if names.split(',').any(|n| n == controller) {
            return Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(path.trim_start_matches('/'));
        }
    }
    let unified = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no {controller} cgroup in {text}"));
    let mount = if Path::new("/sys/fs/cgroup/unified").is_dir() {
        "/sys/fs/cgroup/unified"
    } else {
        "/sys/fs/cgroup"
    };
    Path::new(mount).join(unified.trim_start_matches('/'))
}

/// A limit file of `dir`, whichever of the names (v1, v2) it has.
fn limit_file(dir: &Path, names: &[&str]) -> String {
    for name in names {
        if let Ok(text) = fs::read_to_string(dir.join(name)) {
            return text.trim().to_string();
        }
    }
    panic!("none of {names:?} in {}", dir.display());
}

/// The VMM runs as a user of its own (not root, in no other user's range, no supplementary
/// group, no new privileges, QEMU's seccomp filter on, an empty environment) in cgroups of
/// its own with the guest's RAM plus QEMU's overhead, one process per vCPU plus QEMU's own
/// threads, and the sandbox's CPUs; `cpus: 2` gives the guest two vCPUs; its disk is as large
/// as `disk:`, and writing past it is out of disk, as on namespaces. After the run the VMM
/// and its cgroups are gone.
#[test]
fn the_vmm_runs_as_a_user_of_its_own_in_cgroups_sized_for_its_guest() {
    let (_registry, image) = vm_image!();
    let env = Env::new();
    let doc = vm_document(
        &image,
        "cpus: 2\nmemory: 64M\ndisk: 64M\n",
        &[
            "nproc; echo ready; sleep 4",
            "head -c 100000000 /dev/zero > /tmp/fill",
        ],
    );
    let path = env.write("limits.md", &doc);
    let mut child = start_run(&env, "limits.md");
    let mut lines = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let seen = read_until(&mut lines, &mut child, "ready");
    assert!(
        seen.iter().any(|l| l == "2"),
        "nproc in the guest: {seen:?}"
    );
    let vmm = vmm_of(child.id());

    // Its user: not root, none of the host's users, no one's subordinate ids.
    let uid: u32 = status(vmm, "Uid:")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    for field in ["Uid:", "Gid:"] {
        let ids: Vec<u32> = status(vmm, field)
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        assert!(ids.iter().all(|&id| id == uid), "{field} {ids:?}");
    }
    assert_ne!(uid, 0, "the VMM runs as root");
    assert!(
        (0x7000_0000..0x7FFE_0000).contains(&uid),
        "the VMM's uid {uid} is outside upstream's own ranges"
    );
    let passwd = fs::read_to_string("/etc/passwd").unwrap();
    assert!(
        !passwd
            .lines()
            .any(|l| l.split(':').nth(2) == Some(&uid.to_string())),
        "{uid} is a user of the host"
    );
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = fs::read_to_string(file).unwrap_or_default();
        for range in upstream_sandbox::ids::parse_subordinate(&text) {
            assert!(
                !range.contains(&u64::from(uid)),
                "{uid} is in {file}: {range:?}"
            );
        }
    }
    if upstream_backend_vm::qemu::Accel::from_env() == upstream_backend_vm::qemu::Accel::Tcg {
        // (Under KVM it has /dev/kvm's group.)
        assert_eq!(status(vmm, "Groups:"), "", "supplementary groups");
    }
    assert_eq!(status(vmm, "NoNewPrivs:"), "1");
    assert_eq!(status(vmm, "Seccomp:"), "2", "QEMU's own filter");
    let environ = fs::read(format!("/proc/{vmm}/environ")).unwrap();
    assert!(environ.is_empty(), "{}", String::from_utf8_lossy(&environ));

    // Its cgroups: its own, with its limits.
    let guest_ram = (64u64 << 20) + upstream_backend_vm::GUEST_OVERHEAD;
    let memory = cgroup_of(vmm, "memory");
    let pids = cgroup_of(vmm, "pids");
    let cpu = cgroup_of(vmm, "cpu");
    let own = format!("upstream-{}-vm", child.id());
    for dir in [&memory, &pids, &cpu] {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(&own), "{}", dir.display());
    }
    assert_eq!(
        limit_file(&memory, &["memory.limit_in_bytes", "memory.max"]),
        (guest_ram
            + upstream_backend_vm::confine::qemu_overhead(
                upstream_backend_vm::qemu::Accel::from_env()
            ))
        .to_string()
    );
    assert_eq!(
        limit_file(&pids, &["pids.max"]),
        (upstream_backend_vm::confine::VMM_THREADS + 2).to_string()
    );
    match fs::read_to_string(cpu.join("cpu.cfs_quota_us")) {
        Ok(quota) => {
            assert_eq!(quota.trim(), "200000");
            assert_eq!(limit_file(&cpu, &["cpu.cfs_period_us"]), "100000");
        }
        Err(_) => assert_eq!(limit_file(&cpu, &["cpu.max"]), "200000 100000"),
    }
    let held = fs::read_to_string(memory.join("cgroup.procs")).unwrap();
    assert!(held.lines().any(|l| l == vmm.to_string()), "{held}");

    let rest: Vec<String> = lines.collect();
    let status = child.wait().unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(status.code(), Some(1), "{rest:?}\n{text}");
    assert!(result_block(&text, 1).contains("exit 0"), "{text}");
    let full = result_block(&text, 2);
    assert!(
        full.contains("out of disk space (limit 64.0 MiB)") && full.contains("No space left"),
        "{full}\n{rest:?}"
    );
    assert!(gone_within(vmm, 5), "the VMM outlived its sandbox");
    let left = crate::util::cgroups_of(child.id());
    assert!(left.is_empty(), "cgroups remain: {left:?}");
}

/// A guest whose kernel panics (a step writes `c` to `/proc/sysrq-trigger`) fails that step
/// with a message that says the VM's kernel panicked, with its console's last lines; the
/// step before keeps its result, the one after is not run, and the run ends with nothing of
/// the VM left.
#[test]
fn a_guest_kernel_panic_fails_its_step_and_the_turn_keeps_the_earlier_results() {
    let (_registry, image) = vm_image!();
    let env = Env::new();
    let doc = vm_document(
        &image,
        "",
        &[
            "echo before",
            "echo c > /proc/sysrq-trigger; sleep 30",
            "echo after",
        ],
    );
    let path = env.write("panic.md", &doc);
    let started = Instant::now();
    let child = start_run(&env, "panic.md");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(code(&out), 1, "{err}\n{text}");
    assert!(started.elapsed() < Duration::from_secs(60), "{err}");
    let first = result_block(&text, 1);
    assert!(
        first.contains("exit 0") && first.contains("before"),
        "{text}"
    );
    let panicked = result_block(&text, 2);
    assert!(
        panicked.contains("its kernel panicked") && panicked.contains("sysrq"),
        "{panicked}\n{err}"
    );
    assert!(panicked.contains("its console ended with"), "{panicked}");
    assert!(result_block(&text, 3).contains("not run"), "{text}");
    assert!(crate::util::cgroups_of(pid).is_empty());
    assert!(env.leftover_sandboxes().is_empty());
}

/// The VMM killed from outside — SIGKILL, and its cgroup out of memory — fails the step it
/// ran with a message that says which, and the turn keeps the step before.
#[test]
fn a_vmm_killed_from_outside_fails_its_step_and_says_how_it_died() {
    let (_registry, image) = vm_image!();
    for (how, said) in [
        ("sigkill", "QEMU signal: 9 (SIGKILL)"),
        ("memory", "its VMM ran out of memory"),
    ] {
        let env = Env::new();
        // The guest writes 200 MB to its /dev/shm (its RAM) a few seconds after `ready`:
        // QEMU's resident memory grows by as much.
        let doc = vm_document(
            &image,
            "",
            &[
                "echo before",
                "echo ready; sleep 3; head -c 200000000 /dev/zero > /dev/shm/fill; sleep 30",
                "echo after",
            ],
        );
        let path = env.write("killed.md", &doc);
        let mut child = start_run(&env, "killed.md");
        let mut lines = BufReader::new(child.stderr.take().unwrap())
            .lines()
            .map_while(Result::ok);
        read_until(&mut lines, &mut child, "ready");
        let vmm = vmm_of(child.id());
        match how {
            "sigkill" => nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(vmm as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap(),
            _ => {
                // Squeeze the VMM's cgroup to a little above what it uses now.
                let memory = cgroup_of(vmm, "memory");
                let (usage, limit) = if memory.join("memory.limit_in_bytes").exists() {
                    ("memory.usage_in_bytes", "memory.limit_in_bytes")
                } else {
                    ("memory.current", "memory.max")
                };
                let used: u64 = fs::read_to_string(memory.join(usage))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                fs::write(memory.join(limit), (used + (32 << 20)).to_string()).unwrap();
            }
        }
        let rest: Vec<String> = lines.collect();
        let status = child.wait().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(status.code(), Some(1), "{how}: {rest:?}\n{text}");
        assert!(result_block(&text, 1).contains("before"), "{how}: {text}");
        let died = result_block(&text, 2);
        assert!(died.contains(said), "{how}: {died}\n{rest:?}");
        assert!(result_block(&text, 3).contains("not run"), "{how}: {text}");
        assert!(gone_within(vmm, 5), "{how}");
        assert!(crate::util::cgroups_of(child.id()).is_empty(), "{how}");
    }
}

/// Ctrl-C of `upstream run` with a VM kills the VM at once and leaves the document as it
/// was.
#[test]
fn ctrl_c_kills_the_vm_and_leaves_the_document_alone() {
    let (_registry, image) = vm_image!();
    let env = Env::new();
    let doc = vm_document(&image, "", &["echo started; sleep 60", "echo after"]);
    let path = env.write("long.md", &doc);
    let mut child = start_run(&env, "long.md");
    let mut lines = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    read_until(&mut lines, &mut child, "started");
    let vmm = vmm_of(child.id());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let rest: Vec<String> = lines.collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("Interrupted") && l.contains("not modified")),
        "{rest:?}"
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), doc);
    assert!(gone_within(vmm, 5), "the VMM outlived Ctrl-C");
    assert!(crate::util::cgroups_of(child.id()).is_empty());
    assert!(env.leftover_sandboxes().is_empty());
}

/// `upstream` killed outright mid-step takes its VMM with it within seconds (its parent-death
/// signal); the next upstream to open the VM backend removes the cgroups it left.
#[test]
fn the_vmm_is_gone_within_seconds_of_upstream_killed_outright() {
    let (_registry, image) = vm_image!();
    let env = Env::new();
    let doc = vm_document(&image, "", &["echo started; sleep 60"]);
    env.write("long.md", &doc);
    let mut child = start_run(&env, "long.md");
    let mut lines = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    read_until(&mut lines, &mut child, "started");
    let vmm = vmm_of(child.id());
    let left_by = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(gone_within(vmm, 5), "the VMM outlived upstream");
    // What upstream could not remove, its VMM's cgroups (empty now), goes when the next
    // upstream opens the VM backend, as a doctor's boot does (or when any upstream making
    // cgroups beside them gets there first).
    let out = env.upstream(&["doctor"]);
    assert!(
        crate::util::stdout(&out).contains("a guest booted"),
        "{}",
        crate::util::stdout(&out)
    );
    let left = crate::util::cgroups_of(left_by);
    assert!(left.is_empty(), "{left:?}");
}

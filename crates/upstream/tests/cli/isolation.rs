//! Each isolation promise, attacked from inside a sandbox. These run as root in CI.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::util::{Env, code, result_block, stderr, stdout};

/// Runs a one-step document and returns the step's result block.
fn run_step(env: &Env, front_matter: &str, script: &str) -> (i32, String, String) {
    let text = format!("---\n{front_matter}\n---\n# Attack\n```bash\n{script}\n```\n");
    let path = env.write("attack.md", text);
    let out = env.upstream(&["run", "attack.md"]);
    let doc = fs::read_to_string(path).unwrap();
    (code(&out), result_block(&doc, 1), stderr(&out))
}

#[test]
fn host_files_are_not_visible() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let name = format!("upstream-planted-{}", std::process::id());
    let in_root = Path::new("/root").join(&name);
    let in_home = Path::new("/home").join(&name);
    fs::write(&in_root, "root secret").unwrap();
    fs::create_dir_all(&in_home).unwrap();
    fs::write(in_home.join("secret"), "home secret").unwrap();
    let script = format!(
        "for p in /root/{name} /home/{name}/secret /proc/1/root/root/{name} /proc/1/cwd/../root/{name}; do\n  if cat \"$p\" 2>/dev/null; then echo \"READ $p\"; else echo \"denied $p\"; fi\ndone\nls -a /root /home\ncat /etc/shadow >/dev/null 2>&1 && echo READ shadow || echo denied shadow"
    );
    let (code, block, err) = run_step(&env, "network: none", &script);
    let _ = fs::remove_file(&in_root);
    let _ = fs::remove_dir_all(&in_home);
    assert_eq!(code, 0, "{err}\n{block}");
    assert!(
        !block.contains("READ") && !block.contains("root secret") && !block.contains("home secret"),
        "{block}"
    );
    assert!(
        !block.lines().any(|l| l.trim() == name),
        "planted names are listed:\n{block}"
    );
    assert_eq!(block.matches("denied").count(), 5, "{block}");
}

#[test]
fn only_the_sandbox_processes_are_visible() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let script = "ps -e -o pid=,comm=\necho \"count $(ls /proc | grep -c '^[0-9]*$')\"";
    let (code, block, err) = run_step(&env, "image: host", script);
    assert_eq!(code, 0, "{err}");
    let count: usize = block
        .lines()
        .find_map(|l| l.strip_prefix("count "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(count <= 6, "{block}");
    let test_pid = std::process::id().to_string();
    let pids: Vec<&str> = block
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert!(pids.contains(&"1"), "the agent is pid 1: {block}");
    assert!(
        !pids.contains(&test_pid.as_str()) || test_pid.len() <= 2,
        "{block}"
    );
    assert!(
        !block.contains("cargo") && !block.contains("systemd"),
        "{block}"
    );
}

fn connect_script(port: u16) -> String {
    format!(
        "python3 - <<'EOF'\nimport socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=3).close()\n    print('CONNECTED')\nexcept OSError as e:\n    print('blocked', e)\nEOF"
    )
}

#[test]
fn no_network_means_the_host_loopback_is_unreachable() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let (code, block, err) = run_step(&env, "network: none", &connect_script(port));
    assert_eq!(code, 0, "{err}");
    assert!(block.contains("blocked"), "{block}");
    assert!(listener.accept().is_err(), "the host listener was reached");
    // The same probe does reach it with the host's network: the test can fail.
    let (_, block, _) = run_step(&env, "network: host", &connect_script(port));
    assert!(block.contains("CONNECTED"), "{block}");
}

#[test]
fn writes_to_host_paths_fail_or_stay_inside() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let name = format!("upstream-probe-{}", std::process::id());
    let targets = [
        "/usr",
        "/etc",
        "/usr/local/bin",
        "/",
        "/tmp",
        "/var/tmp",
        "/root",
        "/home",
        "/opt",
    ];
    let script: String = targets
        .iter()
        .map(|d| {
            format!(
                "echo x > {d}/{name} 2>/dev/null && echo \"wrote {d}\" || echo \"refused {d}\"\n"
            )
        })
        .collect();
    let (code, block, err) = run_step(&env, "image: host", &script);
    assert_eq!(code, 0, "{err}");
    assert!(
        block.contains("refused /usr") && block.contains("refused /etc"),
        "{block}"
    );
    for dir in targets {
        assert!(
            !Path::new(dir).join(&name).exists(),
            "{dir}/{name} appeared on the host"
        );
    }
}

#[test]
fn fork_bomb_is_capped_and_the_host_stays_responsive() {
    crate::require_root_sandbox!();
    let env = Env::new();
    // The bomb's complaints go nowhere, so the count is not lost in cut output. Processes
    // already dead are not counted: the kernel stops counting one against the cap as it
    // reaps it, a moment before its /proc entry goes, and a fork may take its place in that
    // moment. The count uses builtins only: the bomb leaves no room for another fork.
    let script = "bomb() { bomb | bomb & }\nbomb 2>/dev/null\nwhile (( SECONDS < 4 )); do :; done\n\
                  n=0; for p in /proc/[0-9]*; do read -r stat < \"$p/stat\" 2>/dev/null || continue; \
                  rest=${stat##*) }; [[ ${rest%% *} == [ZX] ]] && continue; n=$((n+1)); done\n\
                  echo \"processes=$n\" >> \"$UPSTREAM_OUTPUT\"";
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            while !done.load(Ordering::SeqCst) {
                let start = Instant::now();
                std::process::Command::new("/bin/true").status().unwrap();
                worst = worst.max(start.elapsed());
                std::thread::sleep(Duration::from_millis(100));
            }
            worst
        })
    };
    let (code, block, err) = run_step(&env, "step_timeout: 30s", script);
    done.store(true, Ordering::SeqCst);
    let worst = watcher.join().unwrap();
    assert_eq!(code, 0, "{err}\n{block}");
    let n: usize = block
        .lines()
        .find_map(|l| l.strip_prefix("**Outputs:** `processes` = `"))
        .and_then(|n| n.trim_end_matches('`').parse().ok())
        .unwrap_or_else(|| panic!("no process count in:\n{block}"));
    assert!(n > 50, "the bomb did fork: {n}");
    assert!(n <= 1024, "the pids cap held: {n}");
    assert!(
        worst < Duration::from_secs(2),
        "the host answered within {worst:?}"
    );
    assert!(env.leftover_sandboxes().is_empty());
}

#[test]
fn memory_limit_kills_and_reports_out_of_memory() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let script = "python3 -c \"x = b'x' * (512 << 20); print('survived', len(x))\"";
    let (code, block, err) = run_step(&env, "memory: 64M", script);
    assert_eq!(code, 1, "{err}");
    assert!(
        block.contains("**Result:** out of memory (limit 64.0 MiB)"),
        "{block}"
    );
    assert!(!block.contains("survived 536870912"), "{block}");
    assert!(err.contains("out of memory"), "{err}");
}

#[test]
fn cpu_limit_is_applied() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let script = "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo none";
    // The sandbox does not mount its cgroup tree; read the limit from the host side instead.
    let _ = script;
    let text = "---\ncpus: 0.5\n---\n```bash\npython3 - <<'EOF'\nimport time, os\nstart = time.time(); cpu0 = time.process_time()\nwhile time.time() - start < 2: pass\nprint('share', round((time.process_time() - cpu0) / (time.time() - start), 2))\nEOF\n```\n";
    let path = env.write("cpu.md", text);
    let out = env.upstream(&["run", "cpu.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let block = result_block(&fs::read_to_string(path).unwrap(), 1);
    let share: f64 = block
        .lines()
        .find_map(|l| l.strip_prefix("share "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(share < 0.75, "half a CPU was enforced: {share}");
}

#[test]
fn huge_output_is_cut_and_memory_stays_bounded() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let path = env.write(
        "big.md",
        "```bash\nhead -c 100000000 /dev/zero | tr '\\0' x | fold -w 99\n```\n",
    );
    // upstream's peak memory, as /usr/bin/time (its parent) sees it: a child spawned from
    // this test process would count the test harness's own memory (vfork shares it until
    // exec), which other tests running alongside make large.
    let rss_file = env.path("rss");
    let command = env.command();
    let upstream = command.get_program().to_os_string();
    let out = std::process::Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg(upstream)
        .args(["run", "big.md"])
        .current_dir(env.dir.path())
        .envs(command.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stderr(std::process::Stdio::null())
        .output()
        .expect("/usr/bin/time (scripts/test installs it)");
    assert_eq!(code(&out), 0);
    let kib: f64 = fs::read_to_string(&rss_file)
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    let doc = fs::read_to_string(path).unwrap();
    assert!(
        doc.len() < 200_000,
        "the document holds a cut: {} bytes",
        doc.len()
    );
    assert!(doc.contains("not shown"));
    let peak_mib = kib / 1024.0;
    assert!(
        peak_mib < 128.0,
        "peak memory {peak_mib:.1} MiB does not grow with output"
    );
    let whole = env.upstream(&["show", "1", "--step", "1"]);
    assert_eq!(code(&whole), 0, "{}", stderr(&whole));
    // The store keeps the first 64 MiB of a step's output and counts the rest.
    assert_eq!(
        whole.stdout.len(),
        upstream_turn::MAX_STEP_LOG as usize,
        "the store keeps the step's log up to its bound"
    );
    assert!(stderr(&whole).contains("not kept"), "{}", stderr(&whole));
    let record = env.upstream(&["show", "1", "--json"]);
    assert!(
        stdout(&record).contains("\"stdout_bytes\": 101010101"),
        "{}",
        stdout(&record)
    );
}

#[test]
fn kernel_facilities_are_refused() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let script = r#"unshare -U true 2>/dev/null && echo "ALLOWED unshare" || echo "refused unshare"
unshare -n true 2>/dev/null && echo "ALLOWED unshare-net" || echo "refused unshare-net"
mount -t tmpfs none /mnt 2>/dev/null && echo "ALLOWED mount" || echo "refused mount"
python3 - <<'EOF'
import ctypes, os, platform
libc = ctypes.CDLL(None, use_errno=True)
calls = {"x86_64": {"bpf": 321, "kexec_load": 246, "init_module": 175, "finit_module": 313, "mount": 165, "unshare": 272, "keyctl": 250, "pivot_root": 155}}
for name, nr in calls[platform.machine()].items():
    r = libc.syscall(nr, 0, 0, 0, 0)
    err = ctypes.get_errno()
    print(("refused" if r == -1 and err == 1 else "ALLOWED"), name, os.strerror(err))
# A system call by its x32 number (bit 30), which rules for x86-64 numbers would not match.
r = libc.syscall(0x40000000 | 165, 0, 0, 0, 0)
print(("refused" if r == -1 else "ALLOWED"), "x32-mount")
# clone() with a namespace flag.
CLONE_NEWUSER = 0x10000000
r = libc.syscall(56, CLONE_NEWUSER | 17, 0, 0, 0, 0)
print(("refused" if r == -1 else "ALLOWED"), "clone-newuser")
EOF"#;
    let (code, block, err) = run_step(&env, "image: host", script);
    assert_eq!(code, 0, "{err}\n{block}");
    assert!(!block.contains("ALLOWED"), "{block}");
    for name in [
        "unshare",
        "mount",
        "bpf",
        "kexec_load",
        "init_module",
        "finit_module",
        "clone-newuser",
        "x32-mount",
    ] {
        assert!(
            block.contains(&format!("refused {name}")),
            "{name}: {block}"
        );
    }
}

#[test]
fn nothing_of_the_sandbox_remains_after_the_turn() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let marker = format!("5{}.75", std::process::id());
    env.write("doc.md", format!("---\nmemory: 256M\n---\n```bash\nsleep {marker} &\nsetsid sleep {marker} &\necho started\n```\n"));
    let child = env.command().args(["run", "doc.md"]).output().unwrap();
    assert_eq!(code(&child), 0, "{}", stderr(&child));
    // Its processes and directories are gone, and so are its mounts and cgroups.
    env.assert_gone(&marker);
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(env.runtime.to_str().unwrap()),
        "a mount remains"
    );
    // …and its cgroups. The upstream process's pid names them; find any that exist.
    let out = env
        .command()
        .args(["run", "--json", "doc.md"])
        .spawn()
        .unwrap();
    let pid = out.id();
    let _ = out.wait_with_output().unwrap();
    assert!(
        crate::util::cgroups_of(pid).is_empty(),
        "{:?}",
        crate::util::cgroups_of(pid)
    );
}

#[test]
fn rootless_runs_as_an_unprivileged_user() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let nobody = 65534;
    let work = env.path("nobody");
    fs::create_dir(&work).unwrap();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&work, Some(nobody), Some(nobody)).unwrap();
    let doc = work.join("doc.md");
    fs::write(&doc, "---\nmemory: 64M\n---\n```bash\nid -u; ps -e -o comm= | wc -l; cat /etc/shadow > /dev/null 2>&1 && echo READ || echo denied\n```\n").unwrap();
    std::os::unix::fs::chown(&doc, Some(nobody), Some(nobody)).unwrap();
    let out = std::process::Command::new(crate::util::binary_for_nobody(&env))
        .args(["run", doc.to_str().unwrap()])
        .current_dir(&work)
        .env("UPSTREAM_RUNTIME_DIR", work.join("runtime"))
        .env("UPSTREAM_STORE", work.join(".upstream"))
        .env("HOME", &work)
        .uid(nobody)
        .gid(nobody)
        .output()
        .unwrap();
    let err = stderr(&out);
    if err.contains("cannot create a user namespace") {
        crate::util::skip(
            "SKIPPED: rootless: this kernel does not allow unprivileged user namespaces".into(),
        );
        return;
    }
    assert_eq!(code(&out), 0, "{err}");
    assert!(err.contains("namespaces, rootless"), "{err}");
    assert!(
        err.contains("warning: memory limit is not enforced"),
        "the run says which limits are not enforced: {err}"
    );
    let block = result_block(&fs::read_to_string(&doc).unwrap(), 1);
    assert!(block.contains("\n0\n"), "root inside: {block}");
    assert!(block.contains("denied"), "{block}");
    assert!(
        fs::read_dir(work.join("runtime/sandboxes"))
            .unwrap()
            .next()
            .is_none(),
        "cleaned up"
    );
}

#[test]
fn the_agent_and_its_host_connection_are_out_of_reach() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let script = r#"for p in /proc/1/fd /proc/1/root/etc; do
  ls "$p" >/dev/null 2>&1 && echo "OPENED $p" || echo "refused $p"
done
for p in /proc/1/environ /proc/1/maps; do
  head -c 1 "$p" >/dev/null 2>&1 && echo "OPENED $p" || echo "refused $p"
done
python3 -c "open('/proc/1/mem', 'rb').read(1)" 2>/dev/null && echo "OPENED mem" || echo "refused mem"
{ echo frame > /proc/1/fd/3; } 2>/dev/null && echo "OPENED socket" || echo "refused socket"
python3 - <<'EOF'
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16
print("OPENED ptrace" if libc.ptrace(PTRACE_ATTACH, 1, 0, 0) == 0 else "refused ptrace")
EOF"#;
    let (code, block, err) = run_step(&env, "image: host", script);
    assert_eq!(code, 0, "{err}\n{block}");
    assert!(!block.contains("OPENED"), "{block}");
    assert_eq!(block.matches("refused").count(), 7, "{block}");
}

#[test]
fn a_later_sandbox_sees_nothing_of_an_earlier_one() {
    // Directories of sandboxes that wrote nothing are reused; any that wrote are not.
    crate::require_sandbox!();
    let env = Env::new();
    for _ in 0..3 {
        let out = env.upstream(&["exec", "--", "true"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let pool = env.runtime.join("pool-3");
    let pooled = fs::read_dir(&pool).unwrap().count();
    assert!(
        (1..=4).contains(&pooled),
        "directories are kept for reuse: {pooled}"
    );
    let out = env.upstream(&[
        "exec",
        "--",
        "sh",
        "-c",
        "echo secret > /root/left; echo secret > /workspace/left; mkdir -p /opt/left",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for _ in 0..6 {
        let out = env.upstream(&[
            "exec",
            "--",
            "sh",
            "-c",
            "ls -A /root /workspace /opt; cat /root/left /workspace/left 2>/dev/null; true",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let listing = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            !listing.contains("left") && !listing.contains("secret"),
            "{listing}"
        );
    }
    assert!(
        fs::read_dir(&pool).unwrap().count() <= 4,
        "the pool is bounded"
    );
    for entry in fs::read_dir(&pool).unwrap() {
        let upper = entry.unwrap().path().join("upper");
        assert_eq!(
            fs::read_dir(&upper).unwrap().count(),
            0,
            "{} is empty",
            upper.display()
        );
    }
    assert!(env.leftover_sandboxes().is_empty());
}

/// Tries the kernel surface a sandbox is refused, printing `<probe> ok` or `<probe> <errno>`.
const SURFACE_PROBE: &str = r#"python3 - <<'EOF'
import ctypes, errno, socket
libc = ctypes.CDLL(None, use_errno=True)
def report(name, make):
    try:
        make().close()
        print(name, "ok")
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
report("vsock", lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM))
report("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
report("alg", lambda: socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET))
report("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
report("inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
report("inet6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
report("netlink-route", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 8, params)  # io_uring_setup on x86-64 and aarch64
print("io_uring", "ok" if fd >= 0 else errno.errorcode[ctypes.get_errno()])
# A listener on loopback and a connection to it: IP inside the sandbox works.
server = socket.create_server(("127.0.0.1", 0))
socket.create_connection(server.getsockname(), timeout=3).close()
print("loopback ok")
EOF"#;

#[test]
fn vsock_io_uring_and_other_socket_families_are_refused() {
    crate::require_root_sandbox!();
    // The control: the same probe on the host. AF_VSOCK and io_uring exist here (or the
    // kernel says they do not, which is not the filter's EPERM).
    let host = std::process::Command::new("bash")
        .arg("-c")
        .arg(SURFACE_PROBE)
        .output()
        .unwrap();
    let host = stdout(&host);
    assert!(
        host.contains("vsock ok") || host.contains("vsock EAFNOSUPPORT"),
        "{host}"
    );
    if !host.contains("vsock ok") {
        crate::util::skip(
            "note: this host has no AF_VSOCK; the sandbox's EPERM is still the filter's".into(),
        );
    }
    assert!(
        host.contains("io_uring ok"),
        "io_uring works on the host: {host}"
    );
    let env = Env::new();
    for network in ["none", "host"] {
        let (code, block, err) = run_step(&env, &format!("network: {network}"), SURFACE_PROBE);
        assert_eq!(code, 0, "{network}: {err}\n{block}");
        for refused in ["vsock", "packet", "alg", "io_uring"] {
            assert!(
                block.contains(&format!("{refused} EPERM")),
                "{network}: {refused} is refused by the filter: {block}"
            );
        }
        for allowed in ["unix", "inet", "inet6", "netlink-route", "loopback"] {
            assert!(
                block.contains(&format!("{allowed} ok")),
                "{network}: {allowed} works: {block}"
            );
        }
    }
}

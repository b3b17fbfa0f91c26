//! Each isolation promise, attacked from inside a sandbox. These run as root in CI.
//!
//! The attacks that mean the same on every isolation run twice: on namespaces (the test of
//! the attack's name) and from inside a VM (`vm::` and the same name), through one function
//! of [`attacks`] given the [`Isolation`]. Where a VM differs — its guest is root of a kernel
//! of its own, so `mount`, `unshare`, its block devices and `/proc/sysrq-trigger` are the
//! guest's — the VM's test shows they cannot reach the host; and [`vm`] holds the attacks
//! only a guest can make (its disks).

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
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

/// Where an attack runs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// The namespace sandbox, on the host's kernel, its root the host's programs.
    Namespaces,
    /// A microVM on a kernel of its own (`isolation: vm`), its root an image of the host's
    /// programs ([`crate::vm::attack_image`]).
    Vm,
}

/// A place to attack from: a test's directory and, for a VM, the registry its image comes
/// from (stopped when the test ends).
struct Target {
    isolation: Isolation,
    env: Env,
    image: Option<(upstream_image::testing::Registry, String)>,
}

impl Target {
    /// A target on `isolation`, for an attack that needs upstream to run as root; `None`
    /// (said why, which fails the test as root or in CI) where this machine cannot make
    /// such sandboxes.
    fn new(isolation: Isolation) -> Option<Target> {
        Target::make(isolation, true)
    }

    /// [`Target::new`] for an attack that runs as any user.
    fn as_any_user(isolation: Isolation) -> Option<Target> {
        Target::make(isolation, false)
    }

    fn make(isolation: Isolation, as_root: bool) -> Option<Target> {
        if !crate::util::sandboxes_available() {
            crate::util::skip(format!(
                "SKIPPED: {}: this machine cannot make sandboxes (see `upstream doctor`)",
                module_path!()
            ));
            return None;
        }
        if as_root && !crate::util::is_root() {
            crate::util::skip_for(
                crate::util::Lack::Root,
                format!(
                    "{}: needs root (cgroup limits and the uid-range sandbox)",
                    module_path!()
                ),
            );
            return None;
        }
        let image = match isolation {
            Isolation::Namespaces => None,
            Isolation::Vm => {
                if let Some(lack) = crate::vm::lacks_vm() {
                    crate::util::skip(format!("SKIPPED: {}: {lack}", module_path!()));
                    return None;
                }
                let Some(image) = crate::vm::attack_image() else {
                    crate::util::skip(
                        "SKIPPED: no docker-registry on this machine (scripts/test installs it)"
                            .into(),
                    );
                    return None;
                };
                Some(image)
            }
        };
        Some(Target {
            isolation,
            env: Env::new(),
            image,
        })
    }

    fn is_vm(&self) -> bool {
        self.isolation == Isolation::Vm
    }

    /// How long the host may take to start a program while an attack runs: a namespace
    /// sandbox's attack is on the host's own kernel; a VM's is on QEMU's threads, and what
    /// the host then takes is other work's (the machine's other tests), given more room.
    fn responsive_within(&self) -> Duration {
        match self.isolation {
            Isolation::Namespaces => Duration::from_secs(2),
            Isolation::Vm => Duration::from_secs(5),
        }
    }

    /// Where VMs keep their root disks and scratch templates.
    fn vm_cache(&self) -> PathBuf {
        self.env.path("vm-cache")
    }

    /// An `upstream` command of this target's: images and VM disks kept in the test's
    /// directory.
    fn command(&self) -> Command {
        let mut command = self.env.command();
        command
            .env("UPSTREAM_CACHE_DIR", self.env.path("cache"))
            .env("UPSTREAM_VM_CACHE", self.vm_cache());
        command
    }

    /// Front matter that puts a document on this target, with `more`.
    fn front_matter(&self, more: &str) -> String {
        match &self.image {
            None => format!("image: host\n{more}"),
            Some((_, image)) => format!("isolation: vm\nimage: {image}\n{more}"),
        }
    }

    /// Runs a document of `steps` on this target: its exit code, the document afterwards
    /// and what upstream said.
    fn run_steps(&self, more: &str, steps: &[&str]) -> (i32, String, String) {
        let mut text = format!("---\n{}\n---\n", self.front_matter(more).trim_end());
        for (n, script) in steps.iter().enumerate() {
            text.push_str(&format!("# Attack {}\n```bash\n{script}\n```\n", n + 1));
        }
        let path = self.env.write("attack.md", text);
        let out = self.command().args(["run", "attack.md"]).output().unwrap();
        let doc = fs::read_to_string(path).unwrap();
        assert!(
            doc.contains("<!-- upstream:result -->"),
            "no results were written:\n{}",
            stderr(&out)
        );
        (code(&out), doc, stderr(&out))
    }

    /// Runs a one-step document on this target: the exit code, the step's result block and
    /// what upstream said.
    fn run_step(&self, more: &str, script: &str) -> (i32, String, String) {
        let (code, doc, err) = self.run_steps(more, &[script]);
        (code, result_block(&doc, 1), err)
    }

    /// `upstream exec` of `argv` in a new sandbox of this target.
    fn exec(&self, argv: &[&str]) -> Output {
        let mut command = self.command();
        command.arg("exec");
        if let Some((_, image)) = &self.image {
            command.args(["--isolation", "vm", "--image", image]);
        }
        command.arg("--").args(argv).output().unwrap()
    }

    /// Asserts that a new sandbox still runs a command: what an attack left does not stop
    /// the next one.
    fn assert_a_new_sandbox_works(&self) {
        let out = self.exec(&["echo", "a new sandbox works"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(stdout(&out).trim(), "a new sandbox works");
    }

    /// Sandbox directories still on the host.
    fn leftover_sandboxes(&self) -> Vec<PathBuf> {
        let dir = match self.isolation {
            Isolation::Namespaces => self.env.runtime.join("sandboxes"),
            Isolation::Vm => self.env.runtime.join("vm/sandboxes"),
        };
        match fs::read_dir(dir) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// How long the host takes, at worst, to start `/bin/true` while an attack runs: watched
/// from its start until [`Responsive::worst`].
struct Responsive {
    done: Arc<AtomicBool>,
    watcher: std::thread::JoinHandle<Duration>,
}

impl Responsive {
    fn watch() -> Responsive {
        let done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut worst = Duration::ZERO;
                while !done.load(Ordering::SeqCst) {
                    let start = Instant::now();
                    Command::new("/bin/true").status().unwrap();
                    worst = worst.max(start.elapsed());
                    std::thread::sleep(Duration::from_millis(100));
                }
                worst
            })
        };
        Responsive { done, watcher }
    }

    fn worst(self) -> Duration {
        self.done.store(true, Ordering::SeqCst);
        self.watcher.join().unwrap()
    }
}

/// The device of the guest's disk with virtio serial `serial`, found as the guest's init
/// finds it (no udev makes `/dev/disk` in a guest).
fn disk_of(serial: &str) -> String {
    format!(
        "$(for b in /sys/block/*; do [ \"$(cat \"$b/serial\" 2>/dev/null)\" = {serial} ] && echo \"/dev/${{b##*/}}\"; done; true)"
    )
}

/// The BLAKE3 hash of a file's every byte.
fn hash_of(path: &Path) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(fs::File::open(path).unwrap()).unwrap();
    hasher.finalize()
}

/// The files in `dir`, each with its hash and modification time.
fn files_in(dir: &Path) -> Vec<(PathBuf, blake3::Hash, std::time::SystemTime)> {
    let mut found: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let modified = fs::metadata(&p).unwrap().modified().unwrap();
            (p.clone(), hash_of(&p), modified)
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// The access modes (`O_RDONLY`, `O_RDWR`) of every descriptor that a QEMU of a sandbox
/// under `runtime` holds on `root_disk`, and on a sandbox's `scratch.ext4`, seen until
/// `done`.
fn disk_modes(root_disk: &Path, runtime: &Path, done: &AtomicBool) -> (Vec<i32>, Vec<i32>) {
    use std::os::unix::fs::MetadataExt;
    let (mut root, mut scratch) = (Vec::new(), Vec::new());
    let file_of = |m: &fs::Metadata| (m.dev(), m.ino());
    let root_file = file_of(&fs::metadata(root_disk).unwrap());
    while !done.load(Ordering::SeqCst) {
        // The sandboxes' disks now: a QEMU in a root of its own names its files by paths
        // of that root, so they are told by the files its descriptors lead to.
        let scratch_files: Vec<(u64, u64)> = fs::read_dir(runtime.join("vm/sandboxes"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|dir| fs::metadata(dir.path().join("scratch.ext4")).ok())
            .map(|m| file_of(&m))
            .collect();
        for process in fs::read_dir("/proc").unwrap().flatten() {
            let cmdline = fs::read(process.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if !cmdline.contains("qemu") {
                continue;
            }
            let Ok(fds) = fs::read_dir(process.path().join("fd")) else {
                continue;
            };
            for fd in fds.flatten() {
                let Ok(meta) = fs::metadata(fd.path()) else {
                    continue;
                };
                let into = if file_of(&meta) == root_file {
                    &mut root
                } else if scratch_files.contains(&file_of(&meta)) {
                    &mut scratch
                } else {
                    continue;
                };
                let info = process.path().join("fdinfo").join(fd.file_name());
                let flags = fs::read_to_string(info).unwrap_or_default();
                if let Some(flags) = flags.lines().find_map(|l| l.strip_prefix("flags:")) {
                    let flags = i32::from_str_radix(flags.trim(), 8).unwrap();
                    if !into.contains(&(flags & libc::O_ACCMODE)) {
                        into.push(flags & libc::O_ACCMODE);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (root, scratch)
}

/// Declares each of `attacks` as a test on `isolation`, of the attack's name.
macro_rules! attacks_on {
    ($isolation:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::isolation::attacks::$name($isolation)
            }
        )*
    };
}

attacks_on!(Isolation::Namespaces;
    host_files_are_not_visible,
    only_the_sandbox_processes_are_visible,
    no_network_means_the_host_loopback_is_unreachable,
    writes_to_host_paths_fail_or_stay_inside,
    fork_bomb_is_capped_and_the_host_stays_responsive,
    memory_limit_kills_and_reports_out_of_memory,
    nothing_of_the_sandbox_remains_after_the_turn,
    a_later_sandbox_sees_nothing_of_an_earlier_one,
);

/// The attacks that run on every isolation, each given where it runs.
mod attacks {
    use super::*;

    pub fn host_files_are_not_visible(isolation: Isolation) {
        let Some(t) = Target::new(isolation) else {
            return;
        };
        let name = format!("upstream-planted-{}", std::process::id());
        let in_root = Path::new("/root").join(&name);
        let in_home = Path::new("/home").join(&name);
        // Beside the document, where the host's upstream works.
        let beside = t.env.path(&name);
        fs::write(&in_root, "root secret").unwrap();
        fs::create_dir_all(&in_home).unwrap();
        fs::write(in_home.join("secret"), "home secret").unwrap();
        fs::write(&beside, "beside secret").unwrap();
        let mut script = format!(
            "for p in /root/{name} /home/{name}/secret /proc/1/root/root/{name} /proc/1/cwd/../root/{name} {beside}; do\n  if cat \"$p\" 2>/dev/null; then echo \"READ $p\"; else echo \"denied $p\"; fi\ndone\nls -a /root /home\ncat /etc/shadow >/dev/null 2>&1 && echo READ shadow || echo denied shadow\n",
            beside = beside.display()
        );
        if t.is_vm() {
            // No device of the guest's could carry the host's files: no 9p (9), no
            // virtio-fs (26), no network (1). The control: its disks (2) are listed.
            script.push_str(
                "for d in /sys/bus/virtio/devices/*; do echo \"virtio device $(cat \"$d/device\")\"; done\n\
                 grep -E ' (9p|virtiofs|nfs4?|cifs) ' /proc/mounts && echo MOUNTED-FROM-HOST\n\
                 cat /etc/image-marker\n",
            );
        }
        let (code, block, err) = t.run_step("network: none", &script);
        let _ = fs::remove_file(&in_root);
        let _ = fs::remove_dir_all(&in_home);
        assert_eq!(code, 0, "{err}\n{block}");
        assert!(
            !block.contains("READ")
                && !block.contains("root secret")
                && !block.contains("home secret")
                && !block.contains("beside secret"),
            "{block}"
        );
        assert!(
            !block.lines().any(|l| l.trim() == name),
            "planted names are listed:\n{block}"
        );
        assert_eq!(block.matches("denied").count(), 6, "{block}");
        if t.is_vm() {
            assert!(
                block.contains("from the image"),
                "the guest reads its own files: {block}"
            );
            assert!(block.contains("virtio device 0x0002"), "{block}");
            for other in ["0x0001", "0x0009", "0x001a"] {
                assert!(
                    !block.contains(&format!("virtio device {other}")),
                    "a device that could carry the host's files or network, {other}: {block}"
                );
            }
            assert!(!block.contains("MOUNTED-FROM-HOST"), "{block}");
        }
    }

    pub fn only_the_sandbox_processes_are_visible(isolation: Isolation) {
        let Some(t) = Target::new(isolation) else {
            return;
        };
        // A process of the host's that the sandbox must not see, and one of its own that
        // it must (the control: the listing sees processes at all).
        let host_marker = format!("4{}.125", std::process::id());
        let own_marker = format!("300.{}", std::process::id());
        let mut host = Command::new("sleep").arg(&host_marker).spawn().unwrap();
        assert!(crate::util::wait_for_processes(&host_marker, 1, 10));
        // Processes with a command line: a VM's kernel threads have none (and are no
        // sandbox's but the guest kernel's own).
        let script = format!(
            "sleep {own_marker} &\n\
             n=0\n\
             for p in /proc/[0-9]*; do\n  \
               c=$(tr '\\0' ' ' < \"$p/cmdline\" 2>/dev/null) || continue\n  \
               [ -n \"$c\" ] || continue\n  \
               n=$((n+1))\n  \
               echo \"process ${{p#/proc/}}: $c\"\n\
             done\n\
             echo \"count $n\"\n\
             kill %1"
        );
        let (code, block, err) = t.run_step("network: none", &script);
        let _ = host.kill();
        let _ = host.wait();
        assert_eq!(code, 0, "{err}\n{block}");
        let count: usize = block
            .lines()
            .find_map(|l| l.strip_prefix("count "))
            .unwrap_or_else(|| panic!("no count in {block}"))
            .trim()
            .parse()
            .unwrap();
        assert!(count <= 6, "{block}");
        assert!(block.contains("process 1: "), "the agent is pid 1: {block}");
        assert!(
            block
                .lines()
                .any(|l| l.contains(&format!("sleep {own_marker}"))),
            "the sandbox's own process is seen: {block}"
        );
        assert!(
            !block.contains(&host_marker),
            "a host process is seen: {block}"
        );
        assert!(
            !block.contains("cargo") && !block.contains("systemd") && !block.contains("qemu"),
            "{block}"
        );
    }

    fn connect_script(port: u16) -> String {
        format!(
            "python3 - <<'EOF'\nimport socket\nprint('links', [n for _, n in socket.if_nameindex()])\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=3).close()\n    print('CONNECTED')\nexcept OSError as e:\n    print('blocked', e)\n# The control inside: a listener on the same port of the sandbox's own loopback.\nserver = socket.create_server(('127.0.0.1', {port}))\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).close()\nprint('inside CONNECTED')\nEOF"
        )
    }

    pub fn no_network_means_the_host_loopback_is_unreachable(isolation: Isolation) {
        let Some(t) = Target::new(isolation) else {
            return;
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (code, block, err) = t.run_step("network: none", &connect_script(port));
        assert_eq!(code, 0, "{err}\n{block}");
        assert!(block.contains("blocked"), "{block}");
        assert!(block.contains("inside CONNECTED"), "{block}");
        assert!(block.contains("links ['lo']"), "only loopback: {block}");
        assert!(listener.accept().is_err(), "the host listener was reached");
        match t.isolation {
            // The same probe does reach it with the host's network: the test can fail.
            Isolation::Namespaces => {
                let (_, block, _) = t.run_step("network: host", &connect_script(port));
                assert!(block.contains("CONNECTED\n"), "{block}");
            }
            // A VM has no host network to compare with: the host itself reaches the
            // listener, which tells every connection made to it.
            Isolation::Vm => {
                let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                let deadline = Instant::now() + Duration::from_secs(5);
                while listener.accept().is_err() {
                    assert!(
                        Instant::now() < deadline,
                        "the listener tells no connection"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    pub fn writes_to_host_paths_fail_or_stay_inside(isolation: Isolation) {
        let Some(t) = Target::new(isolation) else {
            return;
        };
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
        let mut script = String::new();
        if t.is_vm() {
            // A guest's root is its own to write: every directory is made, so that every
            // write is tried and stays in the guest.
            script.push_str(&format!("mkdir -p {}\n", targets.join(" ")));
        }
        for d in targets {
            script.push_str(&format!(
                "if echo x > {d}/{name} 2>/dev/null; then echo \"wrote {d}\"; [ \"$(cat {d}/{name})\" = x ] && echo \"read back {d}\"; else echo \"refused {d}\"; fi\n"
            ));
        }
        let (code, block, err) = t.run_step("network: none", &script);
        assert_eq!(code, 0, "{err}");
        match t.isolation {
            Isolation::Namespaces => assert!(
                block.contains("refused /usr") && block.contains("refused /etc"),
                "{block}"
            ),
            // The control: the writes were made, in the guest.
            Isolation::Vm => {
                for dir in targets {
                    assert!(
                        block.contains(&format!("read back {dir}\n")),
                        "{dir}: {block}"
                    );
                }
            }
        }
        for dir in targets {
            assert!(
                !Path::new(dir).join(&name).exists(),
                "{dir}/{name} appeared on the host"
            );
        }
    }

    pub fn fork_bomb_is_capped_and_the_host_stays_responsive(isolation: Isolation) {
        let Some(t) = Target::new(isolation) else {
            return;
        };
        // The bomb's complaints go nowhere, so the count is not lost in cut output, and the
        // step waits on a FIFO of its own, which takes no process and no CPU from the count.
        // Processes already dead are not counted: the kernel stops counting one against the
        // cap as it reaps it, a moment before its /proc entry goes, and a fork may take its
        // place in that moment. The count uses builtins only: the bomb leaves no room for
        // another fork. A VM's guest counts what its sandbox's cgroup holds (its kernel's
        // threads are in none) and how often the cap refused a fork.
        let (wait, count) = match t.isolation {
            Isolation::Namespaces => (
                "read -rt 5 -u 9 _ || true\n",
                "n=0; for p in /proc/[0-9]*; do { read -r stat < \"$p/stat\"; } 2>/dev/null || continue; \
                 rest=${stat##*) }; [[ ${rest%% *} == [ZX] ]] && continue; n=$((n+1)); done\n",
            ),
            // An emulated CPU forks slowly: the guest waits until the cap refuses a fork.
            Isolation::Vm => (
                "for ((i = 0; i < 90; i++)); do read -r _ refused < /sys/fs/cgroup/sandbox/pids.events; \
                 (( refused > 0 )) && break; read -rt 1 -u 9 _ || true; done\n",
                "read -r n < /sys/fs/cgroup/sandbox/pids.current\n\
                 read -r max < /sys/fs/cgroup/sandbox/pids.max\n\
                 read -r _ refused < /sys/fs/cgroup/sandbox/pids.events\n\
                 echo \"pids_max=$max\" >> \"$UPSTREAM_OUTPUT\"\n\
                 echo \"refused=$refused\" >> \"$UPSTREAM_OUTPUT\"\n",
            ),
        };
        let script = format!(
            "mkfifo /tmp/wait; exec 9<>/tmp/wait\n\
             bomb() {{ bomb | bomb & }}\nbomb 2>/dev/null\n\
             {wait}\
             {count}\
             echo \"processes=$n\" >> \"$UPSTREAM_OUTPUT\""
        );
        // A guest's RAM holds a thousand shells: the cap, not the memory, is what stops it.
        let more = match t.isolation {
            Isolation::Namespaces => "step_timeout: 60s\nnetwork: none",
            Isolation::Vm => "step_timeout: 180s\nnetwork: none\nmemory: 2G",
        };
        let responsive = Responsive::watch();
        let (code, block, err) = t.run_step(more, &script);
        let worst = responsive.worst();
        assert_eq!(code, 0, "{err}\n{block}");
        let output = |key: &str| -> usize {
            block
                .lines()
                .flat_map(|l| l.split(" · "))
                .find_map(|l| {
                    l.trim_start_matches("**Outputs:** ")
                        .strip_prefix(&format!("`{key}` = `"))
                })
                .and_then(|n| n.trim_end_matches('`').parse().ok())
                .unwrap_or_else(|| panic!("no {key} in:\n{block}"))
        };
        let n = output("processes");
        assert!(n > 50, "the bomb did fork: {n}");
        assert!(n <= 1024, "the pids cap held: {n}");
        if t.is_vm() {
            assert_eq!(
                output("pids_max"),
                1024,
                "the guest holds the sandbox's limit"
            );
            assert!(output("refused") > 0, "the cap refused forks: {block}");
        }
        assert!(
            worst < t.responsive_within(),
            "the host answered within {worst:?}"
        );
        assert!(t.leftover_sandboxes().is_empty());
        t.assert_a_new_sandbox_works();
    }

    pub fn memory_limit_kills_and_reports_out_of_memory(isolation: Isolation) {
        let Some(t) = Target::new(isolation) else {
            return;
        };
        let script = "python3 -c \"x = b'x' * (512 << 20); print('survived', len(x))\"";
        let responsive = Responsive::watch();
        let (code, block, err) = t.run_step("memory: 64M\nnetwork: none", script);
        let worst = responsive.worst();
        assert_eq!(code, 1, "{err}");
        assert!(
            block.contains("**Result:** out of memory (limit 64.0 MiB)"),
            "{block}"
        );
        assert!(!block.contains("survived 536870912"), "{block}");
        assert!(err.contains("out of memory"), "{err}");
        assert!(
            worst < t.responsive_within(),
            "the host answered within {worst:?}"
        );
        t.assert_a_new_sandbox_works();
    }

    pub fn nothing_of_the_sandbox_remains_after_the_turn(isolation: Isolation) {
        let Some(t) = Target::new(isolation) else {
            return;
        };
        let marker = format!("5{}.75", std::process::id());
        let doc = format!(
            "---\n{}memory: 256M\nnetwork: none\n---\n```bash\nsleep {marker} &\nsetsid sleep {marker} &\necho started\n```\n",
            t.front_matter("")
        );
        t.env.write("doc.md", doc);
        let child = t.command().args(["run", "doc.md"]).output().unwrap();
        assert_eq!(code(&child), 0, "{}", stderr(&child));
        // Its processes and directories are gone (a VM's QEMU names the sandbox's
        // directory, under the runtime directory), and so are its mounts and cgroups.
        let processes = crate::util::processes_with(&marker);
        assert!(
            processes.is_empty(),
            "sandbox processes remain: {processes:?}"
        );
        let runtime = t.env.runtime.to_str().unwrap();
        let processes = crate::util::processes_with(runtime);
        assert!(
            processes.is_empty(),
            "sandbox processes remain: {processes:?}"
        );
        let dirs = t.leftover_sandboxes();
        assert!(dirs.is_empty(), "sandbox directories remain: {dirs:?}");
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.contains(runtime), "a mount remains");
        // …and its cgroups. The upstream process's pid names them; find any that exist.
        let out = t
            .command()
            .args(["run", "--json", "doc.md"])
            .spawn()
            .unwrap();
        let pid = out.id();
        let out = out.wait_with_output().unwrap();
        assert_eq!(code(&out), 0);
        assert!(
            crate::util::cgroups_of(pid).is_empty(),
            "{:?}",
            crate::util::cgroups_of(pid)
        );
        assert!(t.leftover_sandboxes().is_empty());
    }

    pub fn a_later_sandbox_sees_nothing_of_an_earlier_one(isolation: Isolation) {
        let Some(t) = Target::as_any_user(isolation) else {
            return;
        };
        // Directories of namespace sandboxes that wrote nothing are reused; any that wrote
        // are not. A VM's disk is a new copy each time.
        let pool = t.env.runtime.join("pool-3");
        if !t.is_vm() {
            for _ in 0..3 {
                let out = t.exec(&["true"]);
                assert_eq!(code(&out), 0, "{}", stderr(&out));
            }
            let pooled = fs::read_dir(&pool).unwrap().count();
            assert!(
                (1..=4).contains(&pooled),
                "directories are kept for reuse: {pooled}"
            );
        }
        let out = t.exec(&[
            "sh",
            "-c",
            "mkdir -p /root /workspace; echo secret > /root/left; echo secret > /workspace/left; \
             echo secret > /tmp/left; mkdir -p /opt/left; cat /root/left",
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(
            stdout(&out).trim(),
            "secret",
            "the control: the writes were made"
        );
        let later = if t.is_vm() { 2 } else { 6 };
        for _ in 0..later {
            let out = t.exec(&[
                "sh",
                "-c",
                "ls -A /root /workspace /opt /tmp; cat /root/left /workspace/left /tmp/left 2>/dev/null; true",
            ]);
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            let listing = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                !listing.contains("left") && !listing.contains("secret"),
                "{listing}"
            );
        }
        if !t.is_vm() {
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
        }
        assert!(t.leftover_sandboxes().is_empty());
    }
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

/// The attacks from inside a VM: those above, and those only a guest, root of a kernel of
/// its own with block devices of its own, can make.
mod vm {
    use super::*;
    use upstream_backend_vm::guest::{ROOT_SERIAL, SCRATCH_SERIAL};

    attacks_on!(Isolation::Vm;
        host_files_are_not_visible,
        only_the_sandbox_processes_are_visible,
        no_network_means_the_host_loopback_is_unreachable,
        writes_to_host_paths_fail_or_stay_inside,
        fork_bomb_is_capped_and_the_host_stays_responsive,
        memory_limit_kills_and_reports_out_of_memory,
        nothing_of_the_sandbox_remains_after_the_turn,
        a_later_sandbox_sees_nothing_of_an_earlier_one,
    );

    /// What a namespace sandbox is refused (`kernel_facilities_are_refused`) a guest may
    /// do, to its own kernel: none of it reaches the host's, and crashing its kernel ends
    /// its own sandbox only.
    #[test]
    fn mount_unshare_sysctl_and_sysrq_are_the_guests_own() {
        let Some(t) = Target::new(Isolation::Vm) else {
            return;
        };
        let host_name = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let host_kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mark = format!("guest-{}", std::process::id());
        let inside = format!(
            "echo \"kernel $(uname -r)\"\n\
             unshare -U -n -m -p -f sh -c 'echo \"in namespaces of its own\"'\n\
             mkdir -p /mnt/planted && mount -t tmpfs none /mnt/planted && echo planted > /mnt/planted/f && echo \"mounted: $(cat /mnt/planted/f)\"\n\
             hostname {mark} && echo \"hostname $(hostname)\"\n\
             echo 3 > /proc/sys/vm/drop_caches && echo \"dropped the guest's caches\"\n\
             echo 1 > /proc/sys/kernel/sysrq && echo \"sysrq on\""
        );
        let crash = "echo c > /proc/sysrq-trigger\necho UNREACHED";
        let started = Instant::now();
        let (code, doc, err) = t.run_steps("network: none", &[&inside, crash]);
        let took = started.elapsed();
        let first = result_block(&doc, 1);
        let guest_kernel = first
            .lines()
            .find_map(|l| l.strip_prefix("kernel "))
            .unwrap_or_else(|| panic!("no kernel in {first}\n{err}"));
        assert_ne!(guest_kernel, host_kernel.trim(), "the host's kernel");
        assert!(guest_kernel.ends_with("cloud-amd64"), "{guest_kernel}");
        for done in [
            "in namespaces of its own",
            "mounted: planted",
            &format!("hostname {mark}"),
            "dropped the guest's caches",
            "sysrq on",
        ] {
            assert!(
                first.contains(done),
                "the control: `{done}` in the guest: {first}"
            );
        }
        // None of it is the host's.
        assert_eq!(
            fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
            host_name
        );
        assert!(!Path::new("/mnt/planted").exists());
        assert!(
            !fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains("planted")
        );
        // The guest's kernel crashed: its sandbox ends, says so, and soon.
        let second = result_block(&doc, 2);
        assert_ne!(code, 0, "{err}");
        assert!(!second.contains("UNREACHED"), "{second}");
        assert!(
            err.contains("kernel panicked") || second.contains("kernel panicked"),
            "{err}\n{second}"
        );
        assert!(took < Duration::from_secs(120), "{took:?}");
        t.assert_a_new_sandbox_works();
    }

    /// The QEMU processes running a machine whose parent is `run` (not those asked what
    /// they have: `-version`, `-L help`), once there is one; what `run` said if it ends first.
    fn vmms_of(run: &mut std::process::Child) -> Vec<u32> {
        let parent = run.id();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let found: Vec<u32> = fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    let ppid = stat
                        .rfind(')')
                        .and_then(|at| stat[at + 2..].split_whitespace().nth(1))
                        .and_then(|p| p.parse::<u32>().ok());
                    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    comm.starts_with("qemu-system")
                        && ppid == Some(parent)
                        && String::from_utf8_lossy(&cmdline).contains("microvm")
                })
                .collect();
            if !found.is_empty() {
                return found;
            }
            if let Some(status) = run.try_wait().unwrap() {
                let mut said = String::new();
                use std::io::Read;
                let _ = run.stderr.take().map(|mut e| e.read_to_string(&mut said));
                panic!("upstream ended ({status}) before its VM ran: {said}");
            }
            assert!(Instant::now() < deadline, "upstream started no QEMU");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every path below `root` (a process's `/proc/<pid>/root`), without following links,
    /// as that process names it, and whether it is a directory.
    fn tree_of(root: &Path) -> Vec<(PathBuf, bool)> {
        let mut found = Vec::new();
        let mut left = vec![root.to_path_buf()];
        while let Some(dir) = left.pop() {
            for entry in fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                let is_dir = entry.file_type().unwrap().is_dir();
                if is_dir {
                    left.push(path.clone());
                }
                found.push((
                    Path::new("/").join(path.strip_prefix(root).unwrap()),
                    is_dir,
                ));
            }
        }
        found.sort();
        found
    }

    /// A guest that broke into its VMM would find none of the host's files: the QEMU of a
    /// running VM has a root of its own that holds its program, its libraries, its firmware,
    /// its devices, the files it reads and its own directory, and nothing else — not
    /// `/etc/passwd`, not a file any user may read in `/tmp`, no `/proc`, `/home`, `/root`.
    /// With the host's network it has the resolver's configuration too. Seen from the host
    /// through `/proc/<qemu>/root` while the VM runs, the control being the same look at
    /// its own files there, and at the same host paths through this process's own root.
    /// Nor does it share the host's IPC or host-name namespaces, nor, without a network,
    /// its network: a connection from its network namespace to a listener on the host's
    /// loopback fails, the control being the same connection with `network: host` (and
    /// from this process).
    #[test]
    fn the_vmm_finds_none_of_the_hosts_files() {
        let Some(t) = Target::new(Isolation::Vm) else {
            return;
        };
        let public_dir = tempfile::Builder::new()
            .prefix("upstream-vmm-root-")
            .tempdir()
            .unwrap();
        fs::set_permissions(public_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let public = public_dir.path().join("public");
        fs::write(&public, "anyone may read this\n").unwrap();
        fs::set_permissions(&public, fs::Permissions::from_mode(0o644)).unwrap();
        let host_files = [
            Path::new("/etc/passwd"),
            public.as_path(),
            public_dir.path(),
            Path::new("/home"),
            Path::new("/root"),
            Path::new("/proc/1"),
            Path::new("/sys/kernel"),
            Path::new("/tmp"),
            Path::new("/var"),
        ];
        let own_files = [
            Path::new("/vm/scratch.ext4"),
            Path::new("/vm/upstream.0.sock"),
            Path::new("/dev/null"),
            Path::new("/dev/urandom"),
        ];
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        for network in ["none", "host"] {
            let text = format!(
                "---\n{}\n---\n# Wait\n```bash\nsleep 6\n```\n",
                t.front_matter(&format!("network: {network}")).trim_end()
            );
            t.env.write("wait.md", text);
            let mut run = t
                .command()
                .args(["run", "wait.md"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let vmm = vmms_of(&mut run)[0];
            let root = PathBuf::from(format!("/proc/{vmm}/root"));
            let deadline = Instant::now() + Duration::from_secs(60);
            while !root.join("vm/upstream.0.sock").exists() {
                assert!(
                    Instant::now() < deadline,
                    "no /vm/upstream.0.sock in its root"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            // Looked at while it runs: a root that is gone has nothing in it.
            let seen = |path: &Path| {
                root.join(path.strip_prefix("/").unwrap())
                    .symlink_metadata()
                    .is_ok()
            };
            let host_seen: Vec<bool> = host_files.iter().map(|p| seen(p)).collect();
            let own_seen: Vec<bool> = own_files.iter().map(|p| seen(p)).collect();
            let listed = tree_of(&root);
            let reaches_listener = reaches_from_network_of(vmm, &listener);
            let namespaces = ["net", "ipc", "uts"].map(|ns| {
                let of = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
                (ns, of(&vmm.to_string()) == of("self"))
            });
            let still_running = seen(Path::new("/vm/upstream.0.sock"));
            let _ = run.wait();
            assert!(still_running, "the VM ended while its root was looked at");
            // Without a network device its QEMU has no network: the host's loopback
            // listener, which this process reaches (the control, below), is out of reach.
            // With user-mode NAT it keeps the host's, which the NAT dials from.
            for (ns, shared) in namespaces {
                let expected = ns == "net" && network == "host";
                assert_eq!(
                    shared, expected,
                    "the VMM shares the host's {ns} namespace with network: {network}"
                );
            }
            assert_eq!(
                reaches_listener,
                network == "host",
                "the VMM reached a host loopback listener with network: {network}"
            );
            assert!(
                std::net::TcpStream::connect(listener.local_addr().unwrap()).is_ok(),
                "the listener is there from the host's network"
            );
            let tree: Vec<PathBuf> = listed.iter().map(|(p, _)| p.clone()).collect();
            // The control: its own files are there, by the same look.
            for (own, seen) in own_files.iter().zip(own_seen) {
                assert!(seen, "{} is not in its root", own.display());
                assert!(
                    tree.contains(&own.to_path_buf()),
                    "{} in {tree:#?}",
                    own.display()
                );
            }
            assert!(
                tree.iter().filter(|p| p.starts_with("/reached")).count() >= 3,
                "the kernel, the initramfs and the image's disk: {tree:#?}"
            );
            assert!(
                tree.iter().any(|p| p.ends_with("qemu-system-x86_64")),
                "{tree:#?}"
            );
            // Nothing of the host's but what QEMU runs on.
            for (path, seen) in host_files.iter().zip(host_seen) {
                assert!(!seen, "{} is in the VMM's root", path.display());
                assert!(
                    !tree.contains(&path.to_path_buf()),
                    "{} in {tree:#?}",
                    path.display()
                );
            }
            let runs_on = |p: &Path| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.contains(".so")
                    || name.starts_with("qemu-system")
                    || name.ends_with(".bin")
                    || name.ends_with(".rom")
            };
            let resolver = Path::new("/etc/resolv.conf");
            for (path, is_dir) in &listed {
                if *is_dir {
                    continue;
                }
                let expected = path.starts_with("/vm")
                    || path.starts_with("/reached")
                    || ["/dev/null", "/dev/urandom", "/dev/kvm", "/etc/ld.so.cache"]
                        .iter()
                        .any(|p| path == Path::new(p))
                    || (network == "host" && path == resolver)
                    || runs_on(path);
                assert!(expected, "{} in the VMM's root: {tree:#?}", path.display());
            }
            assert_eq!(
                tree.contains(&resolver.to_path_buf()),
                network == "host" && resolver.is_file(),
                "the resolver's configuration with network: {network}"
            );
            // The control: the same host paths, through this process's own root, are there.
            for path in [
                Path::new("/etc/passwd"),
                public.as_path(),
                Path::new("/proc/1"),
            ] {
                assert!(
                    Path::new("/proc/self/root")
                        .join(path.strip_prefix("/").unwrap())
                        .exists(),
                    "{}",
                    path.display()
                );
            }
        }
        assert!(t.leftover_sandboxes().is_empty());
    }

    /// Whether a connection made from the network namespace of process `pid` reaches
    /// `listener` (on the host's loopback): tried from a thread that joined that namespace.
    fn reaches_from_network_of(pid: u32, listener: &std::net::TcpListener) -> bool {
        let at = listener.local_addr().unwrap();
        let ns = fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            std::net::TcpStream::connect_timeout(&at, Duration::from_secs(2)).is_ok()
        })
        .join()
        .unwrap()
    }

    /// Root in the guest writes its console far past what the host keeps of it (64 KiB),
    /// then crashes its kernel: none of it lands in a file on the host (no file of the
    /// sandbox's directory but its disk grows while it writes), and the step still says the
    /// kernel panicked, from the end of the console the host kept. The control: the end of
    /// the flood is in what the step says the console ended with, so it reached the host.
    #[test]
    fn a_console_flood_fills_no_host_file_and_the_panic_is_still_told() {
        let Some(t) = Target::new(Isolation::Vm) else {
            return;
        };
        let done = Arc::new(AtomicBool::new(false));
        let largest = {
            let done = done.clone();
            let sandboxes = t.env.runtime.join("vm/sandboxes");
            std::thread::spawn(move || {
                use std::os::unix::fs::MetadataExt;
                let mut largest = (0u64, PathBuf::new());
                while !done.load(Ordering::SeqCst) {
                    for dir in fs::read_dir(&sandboxes).into_iter().flatten().flatten() {
                        for file in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                            let Ok(meta) = file.metadata() else {
                                continue;
                            };
                            let name = file.file_name().to_string_lossy().into_owned();
                            // What it takes on disk (a disk is sparse, and bounded by `disk:`).
                            let used = meta.blocks() * 512;
                            if meta.is_file() && !name.contains(".ext4") && used > largest.0 {
                                largest = (used, file.path());
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                largest
            })
        };
        // Its last line looks like its init's, which what the host tells of a VM's end
        // names first: so it shows whether the flood's end reached the host.
        let flood = "{ yes 'the guest floods its console' || true; } | head -c 4194304 > /dev/ttyS0\n\
                     printf '\\nupstream: the end of the flood\\n' > /dev/ttyS0\n\
                     echo flooded";
        let crash = "echo c > /proc/sysrq-trigger\necho UNREACHED";
        let (code, doc, err) = t.run_steps("network: none", &[flood, crash]);
        done.store(true, Ordering::SeqCst);
        let largest = largest.join().unwrap();
        let first = result_block(&doc, 1);
        assert!(
            first.contains("exit 0") && first.contains("flooded"),
            "{first}\n{err}"
        );
        assert!(
            largest.0 < 64 << 10,
            "{} takes {} bytes",
            largest.1.display(),
            largest.0
        );
        let second = result_block(&doc, 2);
        assert_ne!(code, 0, "{err}");
        assert!(!second.contains("UNREACHED"), "{second}");
        assert!(
            second.contains("its kernel panicked (sysrq triggered crash)"),
            "{second}\n{err}"
        );
        assert!(
            second.contains("its console ended with: upstream: the end of the flood"),
            "the control: {second}"
        );
        t.assert_a_new_sandbox_works();
    }

    /// The guest's root can write its read-only root disk's device, and the files on it
    /// through a mount of its own: what its kernel holds changes, the image's disk on the
    /// host (made once, kept for every sandbox of the image) does not, by a byte.
    #[test]
    fn the_root_disk_stays_as_the_image_made_it() {
        let Some(t) = Target::new(Isolation::Vm) else {
            return;
        };
        // The first sandbox of the image makes its disk.
        let out = t.exec(&["cat", "/etc/image-marker"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(stdout(&out), "from the image\n");
        let roots = t.vm_cache().join("roots");
        let before = files_in(&roots);
        assert_eq!(before.len(), 1, "one disk for the image: {before:?}");
        let root = disk_of(ROOT_SERIAL);
        // A step runs under `bash -e -o pipefail`: what may fail says so and goes on. The
        // guest's root tries every way its kernel offers: a write as the disk is, one once it
        // cleared the flag the kernel keeps (`blockdev --setrw`; the disk's own read-only
        // flag stays), a mount of its own made writable, and BLKZEROOUT (`blkdiscard -z`),
        // which its kernel would pass to the device were the disk not in use. Code of its
        // own in its kernel could go further, to QEMU: which holds the file read-only (below).
        let scratch = disk_of(SCRATCH_SERIAL);
        let files = format!(
            "root={root}\n\
             echo \"root disk $root\"\n\
             echo \"scratch control\" > /tmp/control && sync && echo 3 > /proc/sys/vm/drop_caches && cat /tmp/control\n\
             if dd if=/dev/zero of=\"$root\" bs=4096 count=1 conv=notrunc 2>/dev/null; then echo \"WROTE as it is\"; else echo \"refused as it is\"; fi\n\
             blockdev --setrw \"$root\" && echo \"made writable in the guest's kernel\"\n\
             if dd if=/dev/zero of=\"$root\" bs=4096 count=1 conv=notrunc,fsync 2>/dev/null; then echo \"WROTE once writable\"; else echo \"refused once writable\"; fi\n\
             mkdir -p /mnt/root\n\
             mount \"$root\" /mnt/root 2>&1 || true\n\
             mount -o remount,rw /mnt/root 2>&1 || true\n\
             {{ echo evil > /mnt/root/etc/image-marker && sync; }} 2>&1 || true\n\
             echo \"through a mount: $(cat /mnt/root/etc/image-marker)\"\n\
             echo changed > /etc/image-marker && echo \"through the overlay: $(cat /etc/image-marker)\""
        );
        let raw = format!(
            "root={root}\n\
             scratch={scratch}\n\
             blockdev --setrw \"$root\"\n\
             umount /mnt/root 2>/dev/null || true\n\
             size=$(blockdev --getsize64 \"$scratch\")\n\
             blkdiscard -z -f -o $((size - 1048576)) -l 1048576 \"$scratch\" 2>/dev/null && echo \"zeroed the end of its own disk\"\n\
             if blkdiscard -z -f \"$root\" 2>&1; then echo \"ZEROED the image's disk\"; else echo \"the image's disk took no zeroes\"; fi\n\
             echo \"read back: $(dd if=\"$root\" bs=1024 count=1 skip=1 2>/dev/null | od -An -tx1 -j56 -N2)\""
        );
        // What the guest's kernel cannot be made to do, code of its own could (a module an
        // image brings): QEMU itself holds the image's disk open for reading only.
        let watching = Arc::new(AtomicBool::new(false));
        let modes = {
            let watching = watching.clone();
            let root_disk = before[0].0.clone();
            let runtime = t.env.runtime.clone();
            std::thread::spawn(move || disk_modes(&root_disk, &runtime, &watching))
        };
        let (_, doc, err) = t.run_steps("network: none", &[&files, &raw]);
        watching.store(true, Ordering::SeqCst);
        let (root_modes, scratch_modes) = modes.join().unwrap();
        let first = result_block(&doc, 1);
        let second = result_block(&doc, 2);
        assert!(
            !root_modes.is_empty(),
            "QEMU was seen holding the image's disk"
        );
        assert!(
            root_modes.iter().all(|m| *m == libc::O_RDONLY),
            "QEMU holds the image's disk writable: {root_modes:?}"
        );
        assert!(
            scratch_modes.contains(&libc::O_RDWR),
            "the control: QEMU holds the sandbox's own disk writable: {scratch_modes:?}"
        );
        // The host's disk of the image, byte for byte.
        let after = files_in(&roots);
        assert_eq!(
            after, before,
            "the image's disk changed:\n{first}\n{second}\n{err}"
        );
        // The controls: the sandbox's own disk takes writes, raw ones too, and a write to the
        // image's files lands on the sandbox's disk; the image's disk keeps its ext4 magic.
        assert!(first.contains("\nscratch control\n"), "{first}\n{err}");
        assert!(first.contains("refused as it is"), "{first}");
        assert!(
            first.contains("made writable in the guest's kernel"),
            "{first}"
        );
        assert!(first.contains("refused once writable"), "{first}");
        assert!(first.contains("through a mount: from the image"), "{first}");
        assert!(first.contains("through the overlay: changed"), "{first}");
        assert!(
            second.contains("zeroed the end of its own disk"),
            "{second}\n{err}"
        );
        assert!(
            second.contains("the image's disk took no zeroes"),
            "{second}"
        );
        assert!(second.contains("read back:  53 ef"), "{second}");
        // A later sandbox of the image boots from the same disk and finds its files.
        let out = t.exec(&["bash", "-c", "cat /etc/image-marker; ls /usr/bin | wc -l"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.starts_with("from the image\n"), "{text}");
        let programs: usize = text.lines().nth(1).unwrap().trim().parse().unwrap();
        assert!(programs >= 20, "{text}");
        assert_eq!(files_in(&roots), before, "the disk was made again");
    }

    /// A guest wrecks its own disk, past its cache: the template its disk was copied from,
    /// shared by every sandbox of that disk size, keeps every byte, and the next sandbox
    /// boots and writes as ever.
    #[test]
    fn a_wrecked_scratch_disk_leaves_its_template_and_the_next_sandbox_whole() {
        let Some(t) = Target::new(Isolation::Vm) else {
            return;
        };
        let more = "network: none\ndisk: 256M";
        let (code, doc, err) = t.run_steps(more, &["echo first"]);
        assert_eq!(code, 0, "{err}\n{doc}");
        let disks = t.vm_cache().join("disks");
        let before = files_in(&disks);
        assert_eq!(before.len(), 1, "one template: {before:?}");
        let scratch = disk_of(SCRATCH_SERIAL);
        let script = format!(
            "scratch={scratch}\n\
             echo \"scratch disk $scratch\"\n\
             echo before > /tmp/f && sync && echo \"wrote a file\"\n\
             {{ yes WRECKED || true; }} | dd of=\"$scratch\" bs=1M count=64 iflag=fullblock oflag=direct conv=notrunc 2>&1\n\
             echo wrecked\n\
             echo \"on the device: $(dd if=\"$scratch\" bs=1M count=1 iflag=direct 2>/dev/null | grep -ac WRECKED) lines\""
        );
        let (_, doc, err) = t.run_steps(more, &[&script]);
        let block = result_block(&doc, 1);
        // The control: the guest's writes reached its disk, not only its cache.
        assert!(block.contains("wrecked\n"), "{block}\n{err}");
        let on_device: usize = block
            .lines()
            .find_map(|l| l.strip_prefix("on the device: "))
            .and_then(|l| l.strip_suffix(" lines"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{block}\n{err}"));
        assert!(on_device > 1000, "{block}");
        assert_eq!(files_in(&disks), before, "the template changed");
        let whole = "echo whole > /tmp/f && sync && echo 3 > /proc/sys/vm/drop_caches && cat /tmp/f && ls -A /tmp";
        let (code, doc, err) = t.run_steps(more, &[whole]);
        let block = result_block(&doc, 1);
        assert_eq!(code, 0, "{err}\n{block}");
        assert!(block.contains("\nwhole\nf\n"), "{block}");
        assert!(t.leftover_sandboxes().is_empty());
    }
}

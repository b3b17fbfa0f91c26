//! The harness: each test gets a fresh directory, its own runtime directory for sandboxes, and
//! a builder for `upstream` commands.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const BIN: &str = env!("CARGO_BIN_EXE_upstream");

/// The ways the host can move a sandbox's files (`UPSTREAM_FILES`): itself, on the
/// sandbox's root, and through the agent inside, as for a VM.
pub const FILE_WAYS: [&str; 2] = ["host", "agent"];

thread_local! {
    /// The way every `upstream` an [`Env`] starts moves files: set by [`each_files_way`].
    static FILES_WAY: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// Runs `test` once for each of [`FILE_WAYS`]: every `upstream` an [`Env`] starts meanwhile
/// moves the sandbox's files that way, so a promise about files holds for both.
pub fn each_files_way(test: impl Fn()) {
    for way in FILE_WAYS {
        eprintln!("files moved by the {way}:");
        FILES_WAY.set(Some(way));
        test();
        FILES_WAY.set(None);
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub runtime: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("upstream-test-")
            .tempdir()
            .unwrap();
        let runtime = dir.path().join("runtime");
        Env { dir, runtime }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, content).unwrap();
        path
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        // `upstream exec` reads a pipe on its stdin to its end: never the test runner's.
        cmd.stdin(std::process::Stdio::null());
        cmd.current_dir(self.dir.path())
            .env("UPSTREAM_RUNTIME_DIR", &self.runtime)
            .env("UPSTREAM_STORE", self.path(".upstream"))
            // A daemon is used only where a test starts one.
            .env("UPSTREAM_STATE_DIR", self.path("state"))
            .env_remove("UPSTREAM_URL")
            .env_remove("UPSTREAM_API_KEY")
            .env_remove("RUST_BACKTRACE");
        if let Some(way) = FILES_WAY.get() {
            cmd.env("UPSTREAM_FILES", way);
        }
        cmd
    }

    pub fn upstream(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// Asserts that nothing is left of a sandbox whose processes carry `marker` in their
    /// command line: no process, no sandbox directory.
    pub fn assert_gone(&self, marker: &str) {
        let processes = processes_with(marker);
        assert!(
            processes.is_empty(),
            "sandbox processes remain: {processes:?}"
        );
        let dirs = self.leftover_sandboxes();
        assert!(dirs.is_empty(), "sandbox directories remain: {dirs:?}");
    }

    /// Sandbox directories still on the host.
    pub fn leftover_sandboxes(&self) -> Vec<PathBuf> {
        match fs::read_dir(self.runtime.join("sandboxes")) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Whether this machine can make sandboxes at all; prints why not once.
pub fn sandboxes_available() -> bool {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    let result = AVAILABLE.get_or_init(|| {
        let env = Env::new();
        let out = env.upstream(&["exec", "--", "/bin/true"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(stderr(&out))
        }
    });
    result.is_ok()
}

/// What a test needs that this machine lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lack {
    /// Hardware (KVM) or a virtual machine monitor's binary: nothing `scripts/test` can
    /// install.
    Hardware,
    /// Root: the test attacks what only upstream running as root does.
    Root,
    /// Anything else: a program `scripts/test` installs, a kernel setting, a filesystem
    /// feature. The machine is not set up as the tests need.
    Setup,
}

/// Whether a test may be skipped for want of `lack`. As root or in CI every test runs
/// unless the machine lacks hardware: a skip there would pass a test that never ran.
pub fn may_skip(lack: Lack, root: bool, ci: bool) -> bool {
    match lack {
        Lack::Hardware => true,
        Lack::Root => !root,
        Lack::Setup => !root && !ci,
    }
}

/// Whether the tests run in CI: `$CI` set (as CI services set it), and not to `false` or `0`.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Skips a test for want of something this machine does not have (not root, not hardware):
/// see [`skip_for`].
pub fn skip(message: String) {
    skip_for(Lack::Setup, message);
}

/// Says why a test is skipped, past the test harness's output capture, so a skip is seen in
/// every run, not only when a test fails; `scripts/test` counts these lines. Where
/// [`may_skip`] says no (as root or in CI, for anything but hardware), fails the test
/// instead.
pub fn skip_for(lack: Lack, message: String) {
    use std::io::Write;
    let reason = message.trim_start_matches("SKIPPED:").trim_start();
    assert!(
        may_skip(lack, is_root(), in_ci()),
        "not skipped: {reason}\nas root or in CI every test runs unless the machine lacks \
         hardware (KVM, a VMM): give this machine what the test needs (scripts/test \
         installs the programs the tests use)"
    );
    let label = match lack {
        Lack::Hardware => "SKIPPED (hardware):",
        Lack::Root => "SKIPPED (needs root):",
        Lack::Setup => "SKIPPED:",
    };
    let _ = writeln!(std::io::stderr().lock(), "{label} {reason}");
}

/// Skips the calling test, loudly, when sandboxes cannot be made here.
#[macro_export]
macro_rules! require_sandbox {
    () => {
        if !$crate::util::sandboxes_available() {
            $crate::util::skip(format!(
                "SKIPPED: {}: this machine cannot make sandboxes (see `upstream doctor`)",
                module_path!()
            ));
            return;
        }
    };
}

/// Skips the calling test, loudly, unless it runs as root with sandboxes available.
#[macro_export]
macro_rules! require_root_sandbox {
    () => {
        $crate::require_sandbox!();
        if !$crate::util::is_root() {
            $crate::util::skip_for(
                $crate::util::Lack::Root,
                format!(
                    "{}: needs root (cgroup limits and the uid-range sandbox)",
                    module_path!()
                ),
            );
            return;
        }
    };
}

/// A copy of the upstream binary that an unprivileged user can run, in the test's directory
/// (made searchable): the build directory may be private to root.
pub fn binary_for_nobody(env: &Env) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let copy = env.path("upstream-bin");
    fs::copy(BIN, &copy).unwrap();
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
    // A child another test forked while the copy was open for writing holds it open until
    // it execs ("text file busy"): the copy is ready once it runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Command::new(&copy).arg("--version").output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            _ => break,
        }
    }
    copy
}

/// Waits, up to `seconds`, until at least `count` processes carry `marker` in their command
/// line (or, for 0, until none does); returns whether that happened.
pub fn wait_for_processes(marker: &str, count: usize, seconds: u64) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        let found = processes_with(marker).len();
        if (count == 0 && found == 0) || (count > 0 && found >= count) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Every process whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// The pid of the first process whose command line holds `marker`, once there is one
/// (at most 30 s).
pub fn pid_of(marker: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(line) = processes_with(marker).first() {
            return line.split(':').next().unwrap().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "`{marker}` never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Field `name` (`"PPid:"`, `"NSpid:"`) of process `pid`'s /proc status.
pub fn status_field(pid: &str, name: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap()
        .trim()
        .to_string()
}

/// The host pid of the sandbox's agent: pid 1 of the pid namespace of the process whose
/// command line holds `marker`, found up its ancestors.
pub fn agent_above(marker: &str) -> i32 {
    let mut agent = pid_of(marker);
    while status_field(&agent, "NSpid:").split_whitespace().last() != Some("1") {
        agent = status_field(&agent, "PPid:");
        assert_ne!(agent, "0", "no pid 1 above `{marker}`");
    }
    agent.parse().unwrap()
}

/// cgroup directories named for sandboxes of the upstream process `pid`.
pub fn cgroups_of(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("upstream-{pid}-");
    let mut found = Vec::new();
    fn walk(dir: &Path, prefix: &str, depth: usize, found: &mut Vec<PathBuf>) {
        if depth > 6 {
            return;
        }
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                found.push(path.clone());
            }
            walk(&path, prefix, depth + 1, found);
        }
    }
    walk(Path::new("/sys/fs/cgroup"), &prefix, 0, &mut found);
    found
}

/// The document's result block for step `n` (1-based), as text.
pub fn result_block(doc: &str, n: usize) -> String {
    doc.split("<!-- upstream:result -->")
        .nth(n)
        .and_then(|rest| rest.split("<!-- /upstream:result -->").next())
        .unwrap_or_else(|| panic!("no result block {n} in:\n{doc}"))
        .to_string()
}

#[test]
fn only_missing_hardware_skips_a_test_as_root_or_in_ci() {
    for (root, ci) in [(true, false), (true, true), (false, true)] {
        assert!(
            !may_skip(Lack::Setup, root, ci),
            "a missing program or setting fails the run (root {root}, CI {ci})"
        );
        assert!(may_skip(Lack::Hardware, root, ci), "no KVM is no failure");
    }
    assert!(!may_skip(Lack::Root, true, false), "as root, root is there");
    assert!(
        may_skip(Lack::Root, false, true),
        "CI as a user skips root's tests"
    );
    // A developer's machine, as a user: every skip is a skip.
    for lack in [Lack::Setup, Lack::Root, Lack::Hardware] {
        assert!(may_skip(lack, false, false), "{lack:?}");
    }
}

/// The helper as tests call it: as root or in CI, a skip for want of a program fails.
#[test]
fn a_skip_for_want_of_a_program_fails_the_test_as_root_or_in_ci() {
    let strict = is_root() || in_ci();
    let skipped = std::panic::catch_unwind(|| {
        skip("SKIPPED: util: the skip helper's own test, run as a user".into())
    });
    assert_eq!(skipped.is_err(), strict, "strict: {strict}");
}

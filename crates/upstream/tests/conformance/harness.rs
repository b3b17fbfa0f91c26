//! The suite's harness: the cases (how each backend is made), a fresh backend per test with
//! a runtime directory of its own, and small helpers for running commands.

use std::path::{Path, PathBuf};
use std::time::Instant;

use upstream_backend_ns::{FilesWay, NamespaceBackend};
use upstream_sandbox::{
    ExecOutcome, ExecRequest, Sandbox, SandboxError, SandboxSpec, SharedBackend, Stream,
};

/// A backend the suite runs against: its name in messages, and how to make one whose
/// sandboxes keep what they leave on the host in `runtime` (a private directory of the test's).
pub struct Case {
    pub name: &'static str,
    pub make: fn(runtime: &Path) -> Result<SharedBackend, SandboxError>,
}

/// The upstream binary, which the namespace backend starts as each sandbox's init.
const BIN: &str = env!("CARGO_BIN_EXE_upstream");

fn namespaces(runtime: &Path, way: FilesWay) -> Result<SharedBackend, SandboxError> {
    let backend = NamespaceBackend::in_runtime_dir(PathBuf::from(BIN), Some(runtime))?;
    Ok(std::sync::Arc::new(backend.moving_files(way)))
}

/// Namespaces, the host working on the sandbox's files itself.
pub fn namespaces_host_files() -> Case {
    Case {
        name: "namespaces, files by the host",
        make: |runtime| namespaces(runtime, FilesWay::Host),
    }
}

/// Namespaces, files moved by the agent inside (as a VM's are).
pub fn namespaces_agent_files() -> Case {
    Case {
        name: "namespaces, files by the agent",
        make: |runtime| namespaces(runtime, FilesWay::Agent),
    }
}

/// What a test gets: a backend of its case, and a directory of its own on the host.
pub struct Bench {
    pub case: Case,
    pub backend: SharedBackend,
    /// The test's directory on the host (the runtime directory is inside it).
    pub dir: tempfile::TempDir,
}

/// Makes the case's backend in a fresh directory and runs `test` on it.
pub fn run(case: fn() -> Case, test: fn(&Bench)) {
    let case = case();
    let dir = tempfile::Builder::new()
        .prefix("upstream-conformance-")
        .tempdir()
        .unwrap();
    let backend = match (case.make)(&dir.path().join("runtime")) {
        Ok(backend) => backend,
        Err(e) => {
            skip(
                Lack::Setup,
                &format!("{}: this machine cannot make its sandboxes: {e}", case.name),
            );
            return;
        }
    };
    let bench = Bench { case, backend, dir };
    test(&bench);
}

impl Bench {
    /// A ready sandbox of `spec`.
    pub fn sandbox(&self, spec: &SandboxSpec) -> Box<dyn Sandbox> {
        let mut sandbox = self
            .backend
            .create(spec)
            .unwrap_or_else(|e| panic!("{}: cannot make a sandbox: {e}", self.case.name));
        sandbox
            .wait_ready()
            .unwrap_or_else(|e| panic!("{}: the sandbox never got ready: {e}", self.case.name));
        sandbox
    }

    /// A ready sandbox as every default spec makes it.
    pub fn default_sandbox(&self) -> Box<dyn Sandbox> {
        self.sandbox(&SandboxSpec::default())
    }

    /// A path on the host, in the test's directory.
    pub fn host_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The environment commands get unless a test says otherwise: requests carry the whole of it.
pub fn base_env() -> Vec<(String, String)> {
    vec![(
        "PATH".into(),
        "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
    )]
}

/// `sh -c script`, in `/`, with [`base_env`].
pub fn sh(script: &str) -> ExecRequest {
    command(&["sh", "-c", script])
}

/// `argv`, in `/`, with [`base_env`].
pub fn command(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: base_env(),
        cwd: "/".into(),
        ..ExecRequest::default()
    }
}

/// What a command did: how it ended, its two streams, and every chunk as it came.
pub struct Ran {
    pub outcome: ExecOutcome,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Each chunk with its stream and when it arrived.
    pub chunks: Vec<(Stream, Vec<u8>, Instant)>,
}

impl Ran {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Runs `request` in `sandbox`, keeping what it printed.
pub fn exec(sandbox: &mut dyn Sandbox, request: &ExecRequest) -> Result<Ran, SandboxError> {
    let mut chunks = Vec::new();
    let outcome = sandbox.exec(request, &mut |stream, data| {
        chunks.push((stream, data.to_vec(), Instant::now()))
    })?;
    Ok(collect(outcome, chunks))
}

/// Runs `request` in `session`, keeping what it printed.
pub fn exec_in(
    session: &mut dyn upstream_sandbox::Session,
    request: &ExecRequest,
) -> Result<Ran, SandboxError> {
    let mut chunks = Vec::new();
    let outcome = session.exec(request, &mut |stream, data| {
        chunks.push((stream, data.to_vec(), Instant::now()))
    })?;
    Ok(collect(outcome, chunks))
}

fn collect(outcome: ExecOutcome, chunks: Vec<(Stream, Vec<u8>, Instant)>) -> Ran {
    let of = |which: Stream| {
        chunks
            .iter()
            .filter(|(s, _, _)| *s == which)
            .flat_map(|(_, d, _)| d.iter().copied())
            .collect()
    };
    Ran {
        stdout: of(Stream::Stdout),
        stderr: of(Stream::Stderr),
        outcome,
        chunks,
    }
}

/// Runs a shell script that must pass; its stdout.
pub fn check(sandbox: &mut dyn Sandbox, script: &str) -> String {
    let ran = exec(sandbox, &sh(script)).unwrap_or_else(|e| panic!("`{script}`: {e}"));
    assert!(
        ran.outcome.status.success(),
        "`{script}` failed: {:?}\nstdout: {}\nstderr: {}",
        ran.outcome.status,
        ran.stdout(),
        ran.stderr()
    );
    ran.stdout()
}

/// What a test needs that this machine lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lack {
    /// Root: the promise is one upstream keeps only as root (uid ranges, cgroup limits).
    Root,
    /// A program, a kernel setting, a filesystem feature.
    Setup,
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Says why a test is skipped, past the harness's capture, as the end-to-end tests do; as
/// root or in CI nothing may be skipped for want of root or setup, so it fails instead.
pub fn skip(lack: Lack, reason: &str) {
    use std::io::Write;
    let may = match lack {
        Lack::Root => !is_root(),
        Lack::Setup => !is_root() && !in_ci(),
    };
    assert!(
        may,
        "not skipped: {reason}\nas root or in CI every conformance test runs: give this \
         machine what the test needs"
    );
    let label = match lack {
        Lack::Root => "SKIPPED (needs root):",
        Lack::Setup => "SKIPPED:",
    };
    let _ = writeln!(std::io::stderr().lock(), "{label} {reason}");
}

/// The peak resident memory of this process so far, in bytes (`VmHWM`).
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
        .unwrap()
}

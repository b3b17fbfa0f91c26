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
    /// What the case changes in every spec a test asks for (a VM's isolation and image).
    pub adapt: fn(&mut SandboxSpec),
    /// Its default image binds the host's directories in (`image: host` on namespaces).
    pub binds_host: bool,
    /// It gives sandboxes the host's network when asked (`network: host`).
    pub host_network: bool,
    /// It keeps a layered workspace for `--resume` (`destroy_keeping`).
    pub keeps: bool,
}

fn as_asked(_: &mut SandboxSpec) {}

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
        adapt: as_asked,
        binds_host: true,
        host_network: true,
        keeps: true,
    }
}

/// Namespaces, files moved by the agent inside (as a VM's are).
pub fn namespaces_agent_files() -> Case {
    Case {
        name: "namespaces, files by the agent",
        make: |runtime| namespaces(runtime, FilesWay::Agent),
        adapt: as_asked,
        binds_host: true,
        host_network: true,
        keeps: true,
    }
}

/// A microVM (QEMU; KVM where the host's can boot a stock kernel, else TCG), its root the
/// image [`vm_image`] makes of the host's programs.
pub fn vm() -> Case {
    Case {
        name: "vm",
        make: |runtime| Ok(std::sync::Arc::new(vm_backend(runtime)?)),
        adapt: |spec| {
            spec.isolation = upstream_sandbox::Isolation::Vm;
            if spec.image == upstream_sandbox::Image::Host {
                spec.image = vm_image();
            }
        },
        binds_host: false,
        host_network: false,
        keeps: true,
    }
}

/// A microVM as [`vm`], each restored from a snapshot of its shape (taken when a sandbox of
/// it is first asked for), as a daemon's warm pool of VMs is filled.
pub fn vm_restored() -> Case {
    Case {
        name: "vm restored from a snapshot",
        make: |runtime| {
            let backend: SharedBackend = std::sync::Arc::new(vm_backend(runtime)?);
            Ok(std::sync::Arc::new(FromSnapshots(backend)))
        },
        ..vm()
    }
}

/// Prepares each sandbox's shape before making it, so each is restored from a snapshot.
struct FromSnapshots(SharedBackend);

impl upstream_sandbox::Backend for FromSnapshots {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>, SandboxError> {
        self.0.prepare(spec)?;
        self.0.create(spec)
    }

    fn discard_kept(&self, kept: &upstream_sandbox::Kept) {
        self.0.discard_kept(kept)
    }

    fn kept(&self) -> Vec<upstream_sandbox::Kept> {
        self.0.kept()
    }
}

/// The VM backend of [`vm`] itself, for tests of what only it does, in `runtime`.
pub fn vm_backend(runtime: &Path) -> Result<upstream_backend_vm::VmBackend, SandboxError> {
    if let Some(lack) = lacks_vm() {
        return Err(SandboxError::setup(lack, None));
    }
    let config =
        upstream_backend_vm::VmConfig::in_runtime_dir(PathBuf::from(BIN), None, Some(runtime))?;
    Ok(upstream_backend_vm::VmBackend::new(
        upstream_backend_vm::VmConfig {
            // Made once for the whole run: every test boots the same guest.
            cache: std::env::temp_dir().join("upstream-conformance-vm-cache"),
            ..config
        },
    ))
}

/// A spec of the image [`vm`] boots.
pub fn vm_spec() -> SandboxSpec {
    let mut spec = SandboxSpec::default();
    (vm().adapt)(&mut spec);
    spec
}

/// What this machine lacks to run VM sandboxes, if anything.
fn lacks_vm() -> Option<String> {
    let qemu = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|d| d.join("qemu-system-x86_64").is_file())
    });
    if !qemu {
        return Some("no qemu-system-x86_64 (scripts/test installs it)".into());
    }
    if let Err(e) = upstream_backend_vm::boot::Kernel::find(None) {
        return Some(e.to_string());
    }
    None
}

/// The programs a VM's image holds for the suite's commands.
const VM_PROGRAMS: &[&str] = &[
    "sh",
    "bash",
    "cat",
    "echo",
    "sleep",
    "touch",
    "test",
    "stat",
    "kill",
    "true",
    "false",
    "mkdir",
    "setsid",
    "id",
    "rm",
    "pwd",
    "printf",
    "head",
    "env",
    "ln",
    "timeout",
    "tr",
    "seq",
    "readlink",
    "od",
    "grep",
    "cut",
    "ls",
    "python3",
    "dd",
    "chmod",
    "wc",
    "mkfifo",
    "tail",
    "mv",
    "cp",
    "find",
    "sort",
    "xargs",
    "basename",
    "dirname",
    "uname",
    "hostname",
    "sync",
    "du",
    "df",
    "nproc",
    "date",
    "expr",
    "base64",
    "sha256sum",
    "ps",
    "pkill",
    "pgrep",
    "chown",
    "whoami",
    "nohup",
    "yes",
];

/// An image of the host's programs and the libraries they load (python3 with its standard
/// library), unpacked once for the run: a VM boots an image, never the host's `/usr`.
fn vm_image() -> upstream_sandbox::Image {
    static ROOTFS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let rootfs = ROOTFS.get_or_init(|| {
        // One for every test process of the run (and the next runs): made under a name of
        // this process's and renamed into place, so one whole tree is what they all find.
        let done = std::env::temp_dir().join("upstream-conformance-vm-rootfs");
        if done.join("usr/bin/python3").exists() {
            return done;
        }
        let root = std::env::temp_dir().join(format!(
            "upstream-conformance-vm-rootfs.{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        for dir in [
            "usr/bin",
            "usr/lib",
            "usr/lib64",
            "etc",
            "tmp",
            "root",
            "workspace",
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for (link, to) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            std::os::unix::fs::symlink(to, root.join(link)).unwrap();
        }
        // A file at its real path, and a link at the path it was named by (through the
        // host's links, such as /lib64/ld-linux-x86-64.so.2) if that is another.
        let copy = |named: &Path| {
            let from = std::fs::canonicalize(named).unwrap();
            let inside = root.join(from.strip_prefix("/").unwrap());
            std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
            if !inside.exists() {
                let status = std::process::Command::new("cp")
                    .args(["-a", "--no-preserve=ownership"])
                    .arg(&from)
                    .arg(&inside)
                    .status()
                    .unwrap();
                assert!(status.success(), "cp {}", from.display());
            }
            let link = root.join(named.strip_prefix("/").unwrap());
            if named != from && std::fs::symlink_metadata(&link).is_err() {
                std::fs::create_dir_all(link.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(&from, &link).unwrap();
            }
        };
        for program in VM_PROGRAMS {
            let path = which(program);
            copy(&path);
            for library in upstream_backend_vm::boot::libraries_of(&path).unwrap() {
                copy(&library);
            }
        }
        // The loader where binaries look for it, whatever the host's links.
        copy(Path::new("/lib64/ld-linux-x86-64.so.2"));
        let python = std::process::Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import sys; print(sys.prefix + '/lib/python' + sys.version[:4].rstrip('.'))",
            ])
            .output()
            .unwrap();
        let stdlib = String::from_utf8_lossy(&python.stdout).trim().to_string();
        if Path::new(&stdlib).is_dir() {
            copy(Path::new(&stdlib));
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
        if std::fs::rename(&root, &done).is_err() {
            // Another process put its tree there first.
            let _ = std::fs::remove_dir_all(&root);
        }
        done
    });
    upstream_sandbox::Image::Layers {
        reference: "conformance/host-programs".into(),
        layers: vec![rootfs.clone()],
    }
}

fn which(program: &str) -> PathBuf {
    // The system's own first (not a version manager's shim).
    let system = Path::new("/usr/bin").join(program);
    if system.is_file() {
        return system;
    }
    let path = std::env::var_os("PATH").unwrap();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no {program} on this machine"))
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
        let mut spec = spec.clone();
        (self.case.adapt)(&mut spec);
        let mut sandbox = self
            .backend
            .create(&spec)
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

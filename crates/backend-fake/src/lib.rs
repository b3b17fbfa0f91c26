//! A sandbox backend in memory, for testing what runs on top of [`Backend`] (the turn engine)
//! in milliseconds: no process, no namespace, no disk.
//!
//! Commands do not run; a [`Script`] says what each would have done ([`Behaviour`]): its
//! output, how it ended, how long it took (simulated: nothing sleeps), the files it wrote and
//! the outputs it published to `$UPSTREAM_OUTPUT`. A behaviour that takes longer than the
//! request's `timeout_ms` comes back timed out at the timeout, as a real one killed then would.
//! The files are a [`Tree`] in memory with the rules of the real ones ([`upstream_sandbox::files::At`]),
//! a layered workspace is kept for resuming as a snapshot at the last checkpoint, and the
//! interrupter makes every later call fail as [`SandboxError::Interrupted`].

pub mod tree;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use upstream_sandbox::{
    Backend, ExecOutcome, ExecRequest, ExitStatus, Files, Interrupter, Kept, Sandbox, SandboxError,
    SandboxInfo, SandboxSpec, Session, Stream,
};

pub use tree::{Node, Tree};

/// What a command would have done.
#[derive(Debug, Clone, PartialEq)]
pub struct Behaviour {
    /// Output chunks, in order.
    pub output: Vec<(Stream, Vec<u8>)>,
    pub status: ExitStatus,
    /// How long it ran (simulated).
    pub duration: Duration,
    /// Files it wrote (relative paths are in its working directory).
    pub writes: Vec<(String, Vec<u8>)>,
    /// Paths it removed, as `rm -rf` would.
    pub removes: Vec<String>,
    /// Lines it appended to the file `$UPSTREAM_OUTPUT` names.
    pub outputs: Vec<String>,
    /// The kernel killed it for going over the memory limit.
    pub out_of_memory: bool,
}

impl Behaviour {
    /// A command that exits with `code` at once, printing nothing.
    pub fn exits(code: i32) -> Behaviour {
        Behaviour {
            output: Vec::new(),
            status: ExitStatus::Code(code),
            duration: Duration::from_millis(1),
            writes: Vec::new(),
            removes: Vec::new(),
            outputs: Vec::new(),
            out_of_memory: false,
        }
    }

    /// Prints `text` on stdout.
    pub fn stdout(mut self, text: &str) -> Behaviour {
        self.output.push((Stream::Stdout, text.as_bytes().to_vec()));
        self
    }

    /// Prints `text` on stderr.
    pub fn stderr(mut self, text: &str) -> Behaviour {
        self.output.push((Stream::Stderr, text.as_bytes().to_vec()));
        self
    }

    /// Writes `data` to `path`.
    pub fn writes(mut self, path: &str, data: &str) -> Behaviour {
        self.writes.push((path.into(), data.as_bytes().to_vec()));
        self
    }

    /// Removes `path`.
    pub fn removes(mut self, path: &str) -> Behaviour {
        self.removes.push(path.into());
        self
    }

    /// Publishes output `key=value`.
    pub fn publishes(mut self, key: &str, value: &str) -> Behaviour {
        self.outputs.push(format!("{key}={value}"));
        self
    }

    /// Runs for `duration`.
    pub fn taking(mut self, duration: Duration) -> Behaviour {
        self.duration = duration;
        self
    }

    /// Killed by the kernel for want of memory.
    pub fn out_of_memory(mut self) -> Behaviour {
        self.status = ExitStatus::Signal(libc::SIGKILL);
        self.out_of_memory = true;
        self
    }
}

/// A command as the fake sees it: the request, the code it runs (the file its last argument
/// names, from the request's files or the tree: a turn's step script), and the sandbox's files
/// as they are when it starts.
pub struct Command<'a> {
    pub request: &'a ExecRequest,
    /// The script the command runs, when its last argument names one.
    pub code: Option<String>,
    pub files: &'a Tree,
}

impl Command<'_> {
    /// The value of environment variable `name` in the request.
    pub fn env(&self, name: &str) -> Option<&str> {
        self.request
            .env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the code holds `text`.
    pub fn runs(&self, text: &str) -> bool {
        self.code.as_deref().is_some_and(|c| c.contains(text))
    }
}

/// What each command does.
pub type Script = Arc<dyn Fn(&Command<'_>) -> Behaviour + Send + Sync>;

/// The in-memory backend.
pub struct FakeBackend {
    script: Script,
    /// What sandboxes kept for resuming, by id.
    kept: KeptSets,
    labels: Mutex<BTreeMap<String, (String, std::time::SystemTime)>>,
    /// Every command run in any of its sandboxes, in order.
    requests: Arc<Mutex<Vec<ExecRequest>>>,
    specs: Mutex<Vec<SandboxSpec>>,
    next: AtomicU64,
    refuse: Option<String>,
}

/// What sandboxes kept for resuming, by id: the backend's, shared with its sandboxes.
type KeptSets = Arc<Mutex<BTreeMap<String, Tree>>>;

/// This backend's name, in what it keeps ([`Kept`]).
const NAME: &str = "fake";

impl FakeBackend {
    /// A backend whose commands do what `script` says.
    pub fn new(script: impl Fn(&Command<'_>) -> Behaviour + Send + Sync + 'static) -> FakeBackend {
        FakeBackend {
            script: Arc::new(script),
            kept: KeptSets::default(),
            labels: Mutex::default(),
            requests: Arc::default(),
            specs: Mutex::default(),
            next: AtomicU64::new(1),
            refuse: None,
        }
    }

    /// A backend that cannot make sandboxes, saying `why`.
    pub fn refusing(why: &str) -> FakeBackend {
        FakeBackend {
            refuse: Some(why.into()),
            ..FakeBackend::new(|_| Behaviour::exits(0))
        }
    }

    /// Every command run so far, in order.
    pub fn requests(&self) -> Vec<ExecRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every sandbox asked for so far.
    pub fn specs(&self) -> Vec<SandboxSpec> {
        self.specs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Backend for FakeBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>, SandboxError> {
        if let Some(why) = &self.refuse {
            return Err(SandboxError::setup(why.clone(), None));
        }
        self.specs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(spec.clone());
        let resumed = spec.workspace.as_ref().and_then(|w| w.resume.as_ref());
        let tree = match resumed {
            Some(kept) => {
                let mut sets = self.kept.lock().unwrap_or_else(|e| e.into_inner());
                match sets.remove(kept.id()).filter(|_| kept.backend() == NAME) {
                    Some(tree) => tree,
                    None => {
                        return Err(SandboxError::setup(format!("nothing kept as {kept}"), None));
                    }
                }
            }
            None => Tree::default(),
        };
        Ok(Box::new(FakeSandbox {
            info: SandboxInfo {
                backend: NAME.into(),
                setup: Duration::ZERO,
                unenforced: Vec::new(),
                ids: 65536,
            },
            tree: Arc::new(Mutex::new(tree)),
            layered: spec.workspace.is_some(),
            checkpoint: None,
            script: self.script.clone(),
            requests: self.requests.clone(),
            interrupter: Arc::new(FakeInterrupter::default()),
            background: BTreeMap::new(),
            next_pid: 100,
            id: format!("sandbox-{}", self.next.fetch_add(1, Ordering::Relaxed)),
            keep_into: self.kept.clone(),
        }))
    }

    fn discard_kept(&self, kept: &Kept) {
        if kept.backend() == NAME {
            self.kept
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(kept.id());
        }
    }

    fn kept(&self) -> Vec<Kept> {
        self.kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter_map(|id| Kept::new(NAME, id))
            .collect()
    }

    fn label_kept(&self, kept: &Kept, label: &str) -> std::io::Result<()> {
        self.labels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                kept.id().into(),
                (label.into(), std::time::SystemTime::now()),
            );
        Ok(())
    }

    fn kept_label(&self, kept: &Kept) -> Option<(String, std::time::SystemTime)> {
        self.labels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(kept.id())
            .cloned()
    }
}

#[derive(Default)]
struct FakeInterrupter {
    interrupted: AtomicBool,
}

impl Interrupter for FakeInterrupter {
    fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
    }
}

/// A sandbox of [`FakeBackend`].
pub struct FakeSandbox {
    info: SandboxInfo,
    tree: tree::Shared,
    layered: bool,
    /// The tree at the last checkpoint: what a kept workspace holds.
    checkpoint: Option<Tree>,
    script: Script,
    requests: Arc<Mutex<Vec<ExecRequest>>>,
    interrupter: Arc<FakeInterrupter>,
    /// How background commands ended, by pid.
    background: BTreeMap<i32, ExitStatus>,
    next_pid: i32,
    id: String,
    /// Its backend's kept sets, where [`Sandbox::destroy_keeping`] puts the workspace.
    keep_into: KeptSets,
}

/// Runs `request` as the script says, on `tree`.
fn run(
    script: &Script,
    requests: &Mutex<Vec<ExecRequest>>,
    interrupter: &FakeInterrupter,
    tree: &tree::Shared,
    request: &ExecRequest,
    on_output: &mut dyn FnMut(Stream, &[u8]),
) -> Result<ExecOutcome, SandboxError> {
    if interrupter.interrupted.load(Ordering::SeqCst) {
        return Err(SandboxError::Interrupted);
    }
    requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(request.clone());
    let behaviour = {
        let mut files = tree::lock(tree);
        for file in &request.files {
            files
                .write(&file.path, &file.data, file.mode)
                .map_err(|e| {
                    SandboxError::setup(format!("cannot write {}: {e}", file.path), None)
                })?;
        }
        files
            .make_dir_all(&request.cwd)
            .map_err(|e| SandboxError::setup(format!("cannot make {}: {e}", request.cwd), None))?;
        let code = request
            .argv
            .last()
            .and_then(|path| files.read(path))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        let command = Command {
            request,
            code,
            files: &files,
        };
        (script)(&command)
    };
    // The script may have stopped the sandbox (a Ctrl-C while the command ran).
    if interrupter.interrupted.load(Ordering::SeqCst) {
        return Err(SandboxError::Interrupted);
    }
    let timeout = request.timeout_ms.map(Duration::from_millis);
    let timed_out = timeout.is_some_and(|t| behaviour.duration > t);
    for (stream, data) in &behaviour.output {
        on_output(*stream, data);
    }
    let mut files = tree::lock(tree);
    let in_cwd = |path: &str| match path.starts_with('/') {
        true => path.to_string(),
        false => format!("{}/{path}", request.cwd.trim_end_matches('/')),
    };
    for path in &behaviour.removes {
        files.remove_all(&in_cwd(path));
    }
    for (path, data) in &behaviour.writes {
        let _ = files.write(&in_cwd(path), data, 0o644);
    }
    let outputs_file = request
        .env
        .iter()
        .find(|(k, _)| k == "UPSTREAM_OUTPUT")
        .map(|(_, v)| v.clone());
    if let Some(path) = outputs_file {
        for line in &behaviour.outputs {
            let _ = files.append(&path, format!("{line}\n").as_bytes());
        }
    }
    let collected = request.collect.as_ref().map(|c| match files.read(&c.path) {
        Some(data) if data.len() as u64 <= c.limit => Ok(data),
        Some(_) => Err(format!("{} is larger than {} bytes", c.path, c.limit)),
        None => Err(format!("cannot read {}", c.path)),
    });
    Ok(ExecOutcome {
        status: if timed_out {
            ExitStatus::Signal(libc::SIGKILL)
        } else {
            behaviour.status
        },
        timed_out,
        out_of_memory: behaviour.out_of_memory,
        out_of_disk: None,
        duration: match (timed_out, timeout) {
            (true, Some(t)) => t,
            _ => behaviour.duration,
        },
        collected,
    })
}

impl FakeSandbox {
    fn live(&self) -> Result<(), SandboxError> {
        match self.interrupter.interrupted.load(Ordering::SeqCst) {
            true => Err(SandboxError::Interrupted),
            false => Ok(()),
        }
    }
}

impl Sandbox for FakeSandbox {
    fn info(&self) -> &SandboxInfo {
        &self.info
    }

    fn wait_ready(&mut self) -> Result<(), SandboxError> {
        self.live()
    }

    fn exec(
        &mut self,
        request: &ExecRequest,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, SandboxError> {
        run(
            &self.script,
            &self.requests,
            &self.interrupter,
            &self.tree,
            request,
            on_output,
        )
    }

    fn spawn(
        &mut self,
        request: &ExecRequest,
        stdout: &str,
        stderr: &str,
    ) -> Result<i32, SandboxError> {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let done = run(
            &self.script,
            &self.requests,
            &self.interrupter,
            &self.tree,
            request,
            &mut |stream, data| match stream {
                Stream::Stdout => out.extend_from_slice(data),
                Stream::Stderr => err.extend_from_slice(data),
            },
        )?;
        let mut tree = tree::lock(&self.tree);
        let _ = tree.append(stdout, &out);
        let _ = tree.append(stderr, &err);
        self.next_pid += 1;
        self.background.insert(self.next_pid, done.status);
        Ok(self.next_pid)
    }

    fn wait(
        &mut self,
        pid: i32,
        _timeout: Option<Duration>,
    ) -> Result<Option<ExitStatus>, SandboxError> {
        self.live()?;
        match self.background.get(&pid) {
            Some(status) => Ok(Some(*status)),
            None => Err(SandboxError::setup(
                format!("no background command {pid}"),
                None,
            )),
        }
    }

    fn signal(&mut self, pid: i32, _signal: i32) -> Result<(), SandboxError> {
        self.wait(pid, None).map(drop)
    }

    fn stop_processes(&mut self) -> Result<(), SandboxError> {
        self.live()
    }

    fn session(&mut self) -> Result<Box<dyn Session>, SandboxError> {
        self.live()?;
        Ok(Box::new(FakeSession {
            script: self.script.clone(),
            requests: self.requests.clone(),
            interrupter: self.interrupter.clone(),
            tree: self.tree.clone(),
        }))
    }

    fn read_file(&mut self, path: &str, limit: u64) -> Result<Vec<u8>, SandboxError> {
        self.live()?;
        match tree::lock(&self.tree).read(path) {
            Some(data) if data.len() as u64 <= limit => Ok(data),
            Some(_) => Err(SandboxError::setup(format!("{path} is too big"), None)),
            None => Err(SandboxError::setup(format!("cannot read {path}"), None)),
        }
    }

    fn write_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), SandboxError> {
        self.live()?;
        tree::lock(&self.tree)
            .write(path, data, mode)
            .map_err(|e| SandboxError::setup(format!("cannot write {path}: {e}"), None))
    }

    fn files(&mut self) -> Result<Arc<dyn Files>, SandboxError> {
        self.live()?;
        Ok(Arc::new(tree::TreeFiles(self.tree.clone())))
    }

    fn interrupter(&self) -> Arc<dyn Interrupter> {
        self.interrupter.clone()
    }

    fn checkpoint(&mut self) -> Result<(), SandboxError> {
        if self.layered {
            self.checkpoint = Some(tree::lock(&self.tree).clone());
        }
        Ok(())
    }

    fn destroy(self: Box<Self>) -> Result<(), SandboxError> {
        Ok(())
    }

    fn destroy_keeping(self: Box<Self>) -> Result<Kept, SandboxError> {
        let no = || SandboxError::setup("this sandbox has no layered workspace to keep", None);
        let snapshot = self
            .checkpoint
            .clone()
            .filter(|_| self.layered)
            .ok_or_else(no)?;
        let kept = Kept::new(NAME, &self.id).ok_or_else(no)?;
        self.keep_into
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.id.clone(), snapshot);
        Ok(kept)
    }
}

/// A session of a [`FakeSandbox`]: its commands run on the same tree.
struct FakeSession {
    script: Script,
    requests: Arc<Mutex<Vec<ExecRequest>>>,
    interrupter: Arc<FakeInterrupter>,
    tree: tree::Shared,
}

impl Session for FakeSession {
    fn exec(
        &mut self,
        request: &ExecRequest,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome, SandboxError> {
        let mut request = request.clone();
        request.timeout_kills = upstream_sandbox::Scope::Command;
        run(
            &self.script,
            &self.requests,
            &self.interrupter,
            &self.tree,
            &request,
            on_output,
        )
    }
}

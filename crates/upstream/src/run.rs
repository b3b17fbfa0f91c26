//! `upstream run`: run documents, show progress, write results back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use upstream_doc::{Document, terminal};
use upstream_sandbox::SandboxError;
use upstream_turn::wire::TurnEvent;
use upstream_turn::{Cancel, TurnError, TurnOptions, TurnRecord, TurnStatus, WriteBack};

use crate::cli::{DaemonArg, RunArgs};
use crate::exit;
use crate::progress::{self, Progress};

pub fn run(args: RunArgs) -> u8 {
    // Every document is read before any runs: bad input anywhere stops everything, untouched.
    let mut documents = Vec::new();
    let mut bad = false;
    for path in &args.files {
        match Document::read(path) {
            Ok(parsed) => documents.push(parsed),
            Err(e) => {
                eprintln!("{}", e.report());
                bad = true;
            }
        }
    }
    if bad {
        let good: Vec<String> = documents
            .iter()
            .map(|(d, _)| d.path().display().to_string())
            .collect();
        if !good.is_empty() {
            eprintln!(
                "Not run: {} (every document is read before any runs, and the errors above stop them all)",
                good.join(", ")
            );
        }
        return exit::BAD_INPUT;
    }
    if args.store.store.is_some() && (args.daemon.daemon || args.daemon.url.is_some()) {
        eprintln!("error: --store names a store here, and a daemon keeps its turns in its own");
        eprintln!("hint: leave out --store to run on the daemon, or --daemon/--url to run here");
        return exit::BAD_INPUT;
    }
    // A daemon runs the turns only when asked: one that merely listens here never moves a
    // context's turns out of the store they have been going to.
    let client = match daemon_client(&args.daemon, !args.local && args.store.store.is_none()) {
        Ok(client) => client,
        Err(code) => return code,
    };
    let backend = match client {
        Some(_) => None,
        None => match crate::backends::open_here() {
            Ok(b) => Some(b),
            Err(e) => return sandbox_failed(&e),
        },
    };
    let cancel = Cancel::default();
    let mut worst = exit::OK;
    let mut shown_store = None;
    for (i, (document, original)) in documents.iter().enumerate() {
        let code = match (&client, &backend) {
            (Some(client), _) => run_remote(&args, client, document, original, &cancel),
            (None, Some(backend)) => {
                let store = store_of(document, &args);
                if shown_store.as_ref() != Some(&store) {
                    say_store(document, &store, args.store.store.is_some(), args.resume);
                    shown_store = Some(store);
                }
                run_one(&args, backend, document, original, &cancel)
            }
            (None, None) => unreachable!("a local run has its backend"),
        };
        worst = worst.max(code);
        if code == exit::INTERRUPTED {
            break;
        }
        let rest = &documents[i + 1..];
        if code != exit::OK && !args.keep_going && !rest.is_empty() {
            let names: Vec<String> = rest
                .iter()
                .map(|(d, _)| d.path().display().to_string())
                .collect();
            eprintln!(
                "Not run: {} ({} did not pass, and the next turns would start from an older context; --keep-going runs them anyway)",
                names.join(", "),
                document.path().display()
            );
            break;
        }
    }
    worst
}

/// The daemon `arg` asks for (`--url`, `--daemon`; `$UPSTREAM_URL` when `env`), if any; a
/// daemon asked for that is not there is an error, never a quiet fallback to this machine.
pub fn daemon_client(arg: &DaemonArg, env: bool) -> Result<Option<upstream_client::Client>, u8> {
    let socket = crate::serve::state_dir(&arg.state).join("upstream.sock");
    match upstream_client::Client::chosen(arg.url.as_deref(), arg.daemon, env, &socket) {
        Ok(client) => Ok(client),
        Err(e @ upstream_client::ClientError::NoDaemon(_)) => {
            eprintln!("error: {e}");
            eprintln!(
                "hint: start it with `upstream serve` (or name another with --state-dir), or leave out --daemon to use the store here"
            );
            Err(exit::SANDBOX)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(exit::SANDBOX)
        }
    }
}

/// Says when the context a daemon's turn goes on has turns in the store here: the daemon
/// keeps a chain of its own, which does not start from them.
fn note_local_chain(document: &Document, args: &RunArgs) {
    let dir = store_of(document, args);
    if !dir.join("store.db").is_file() {
        return;
    }
    let context = document
        .front_matter()
        .context
        .clone()
        .unwrap_or_else(|| upstream_store::DEFAULT_CONTEXT.to_string());
    // A note, not the turn's business: a store here that cannot be read says nothing.
    let Ok(turns) = upstream_store::Store::open(&dir).and_then(|s| s.contexts()) else {
        return;
    };
    if let Some(local) = turns.iter().find(|c| c.name == context && c.turns > 0) {
        eprintln!(
            "note: context {context} has {} turn{} in the store here ({}); the daemon keeps a chain of its own, which does not start from them",
            local.turns,
            if local.turns == 1 { "" } else { "s" },
            dir.display()
        );
    }
}

/// Whether the store a local turn of `document` goes to has turns in its context.
fn has_turns_here(document: &Document, args: &RunArgs) -> bool {
    let dir = store_of(document, args);
    if !dir.join("store.db").is_file() {
        return false;
    }
    let context = document
        .front_matter()
        .context
        .clone()
        .unwrap_or_else(|| upstream_store::DEFAULT_CONTEXT.to_string());
    upstream_store::Store::open(&dir)
        .and_then(|s| s.contexts())
        .is_ok_and(|contexts| contexts.iter().any(|c| c.name == context && c.turns > 0))
}

/// The option that reads the records of the daemon `arg` chose.
fn reading_flag(arg: &DaemonArg) -> String {
    match &arg.url {
        Some(url) => format!("--url {url}"),
        None if arg.daemon => "--daemon".to_string(),
        None => "--url $UPSTREAM_URL".to_string(),
    }
}

/// The store a local turn of `document` goes to, as the turn finds it.
fn store_of(document: &Document, args: &RunArgs) -> PathBuf {
    let dir = document
        .path()
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    upstream_store::locate(dir, args.store.store.as_deref())
}

/// Says which store a turn goes to (relative to the current directory when below it), and
/// warns when the store was found in the home directory or above it while the document is
/// in a project further down: every project there then shares one chain of turns.
fn say_store(document: &Document, store: &Path, named: bool, resume: bool) {
    let cwd = std::env::current_dir().unwrap_or_default();
    let absolute = std::path::absolute(store).unwrap_or_else(|_| store.to_path_buf());
    let shown = match absolute.strip_prefix(&cwd) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
        _ => absolute.display().to_string(),
    };
    // A resume makes no store: it refuses when there is none.
    let new = match (store.join("store.db").is_file(), resume) {
        (true, _) => "",
        (false, true) => " (none)",
        (false, false) => " (new)",
    };
    eprintln!("Store: {shown}{new}");
    if named || std::env::var_os("UPSTREAM_STORE").is_some() {
        return;
    }
    let Some(home) = std::env::var_os("HOME").map(PathBuf::from) else {
        return;
    };
    let (Some(holder), Some(doc_dir)) = (
        absolute.parent(),
        std::path::absolute(document.path())
            .ok()
            .and_then(|d| d.parent().map(Path::to_path_buf)),
    ) else {
        return;
    };
    if home.starts_with(holder) && doc_dir != holder && doc_dir.starts_with(holder) {
        eprintln!(
            "warning: this store is in {}, above the document's directory: every project below it shares its contexts",
            holder.display()
        );
        eprintln!(
            "hint: `mkdir {}/.upstream` gives this project a store of its own",
            doc_dir.display()
        );
    }
}

fn run_one(
    args: &RunArgs,
    backend: &upstream_sandbox::SharedBackend,
    document: &Document,
    original: &[u8],
    cancel: &Cancel,
) -> u8 {
    let start = Instant::now();
    let mut progress = Progress::new(document.front_matter().image(), args.verbose, cancel);
    let options = TurnOptions {
        store: args.store.store.clone(),
        resume: args.resume,
        images: Some(image_source(&args.insecure_registry, args.pull)),
        ..TurnOptions::default()
    };
    let turn = match upstream_turn::run(
        document,
        original,
        &**backend,
        &options,
        &mut progress,
        cancel,
    ) {
        Ok(turn) => turn,
        Err(TurnError::MissingSecret { path, name }) => {
            eprintln!(
                "error: {}: secret `{name}` is not set in the environment",
                path.display()
            );
            eprintln!("hint: export {name} before running, or remove it from `secrets`");
            return exit::BAD_INPUT;
        }
        Err(TurnError::Sandbox(SandboxError::Interrupted)) => {
            eprintln!(
                "Interrupted: the sandbox was torn down; {} was not modified",
                document.path().display()
            );
            return exit::INTERRUPTED;
        }
        Err(TurnError::Sandbox(e)) => return sandbox_failed(&e),
        Err(TurnError::Pull { image, source }) => {
            return sandbox_failed(&SandboxError::Image {
                image,
                reason: source.to_string(),
            });
        }
        Err(TurnError::Resume(why)) => {
            eprintln!("error: {why}");
            if !has_turns_here(document, args) {
                eprintln!(
                    "hint: the store here has no turn in this document's context; a turn that ran on a daemon is resumed there: add --daemon (or --url URL)"
                );
            }
            return exit::BAD_INPUT;
        }
        Err(e @ (TurnError::Store(_) | TurnError::Restore(_) | TurnError::SaveArtifacts(_))) => {
            // It may quote what the sandbox named (an artifact's path).
            eprintln!("error: {}", terminal::line(&e.to_string()));
            eprintln!(
                "hint: {} was not modified; `upstream log` shows what the store holds",
                document.path().display()
            );
            return exit::SANDBOX;
        }
    };
    let rendered = turn.render(document);
    finish(
        args,
        document,
        original,
        &turn.record,
        &rendered,
        start,
        None,
    )
}

/// Prints the turn's record (`--json`) and summary, and writes its results into the document;
/// returns the exit code. `daemon`: where it ran, when not here, and the option that reads
/// its records (`--daemon`, `--url …`).
fn finish(
    args: &RunArgs,
    document: &Document,
    original: &[u8],
    record: &TurnRecord,
    rendered: &str,
    start: Instant,
    daemon: Option<(&str, &str)>,
) -> u8 {
    if args.json {
        if let Ok(line) = serde_json::to_string(record) {
            let mut out = std::io::stdout().lock();
            // A closed stdout (`| head`) is not an error worth reporting.
            let _ = writeln!(out, "{line}");
        }
    }
    let (on, flag) = daemon.map_or((String::new(), String::new()), |(at, flag)| {
        (format!(" on the daemon at {at}"), format!(" {flag}"))
    });
    if record.status == TurnStatus::Interrupted {
        eprintln!(
            "Interrupted: the sandbox was torn down; {} was not modified (what ran is turn {}{on}: `upstream show {}{flag}`)",
            document.path().display(),
            record.number,
            record.number
        );
        return exit::INTERRUPTED;
    }
    let written = upstream_turn::write_back(document.path(), original, rendered);
    let total = record.steps.len();
    let passed = record.passed_steps();
    // The step that stopped the turn: the first failure not marked continue_on_error.
    let failed = record
        .steps
        .iter()
        .zip(document.steps())
        .find(|(r, s)| r.status.failed() && !s.continue_on_error)
        .map(|(r, _)| r);
    let mut summary = match (record.status, failed) {
        (TurnStatus::Passed, _) => format!(
            "{passed} step{} passed in {}",
            if passed == 1 { "" } else { "s" },
            progress::since(start)
        ),
        (_, Some(step)) => format!(
            "Step {} {} · {passed} of {total} steps passed in {}",
            step.number,
            progress::status_text(step),
            progress::since(start)
        ),
        (_, None) => format!(
            "{passed} of {total} steps passed in {}",
            progress::since(start)
        ),
    };
    if daemon.is_some() {
        summary.push_str(&format!(" (turn {} on the daemon)", record.number));
    }
    let code = if record.status == TurnStatus::Passed {
        exit::OK
    } else {
        exit::STEP_FAILED
    };
    let hint = || {
        eprintln!(
            "hint: the document with this turn's results: `upstream show {} --document{flag}`",
            record.number
        )
    };
    match written {
        Ok(WriteBack::Written) => {
            summary.push_str(&format!(
                " · results written to {}",
                document.path().display()
            ));
            eprintln!("{summary}");
            code
        }
        Ok(WriteBack::Unlinked { links }) => {
            summary.push_str(&format!(
                " · results written to {}",
                document.path().display()
            ));
            eprintln!("{summary}");
            let path = document.path().display();
            let others = match links - 1 {
                1 => "another hard link: it keeps".to_string(),
                n => format!("{n} other hard links: they keep"),
            };
            eprintln!(
                "warning: {path} had {others} the document as it was before this turn, and {path} is a file of its own now"
            );
            code
        }
        Ok(WriteBack::Conflict) => {
            eprintln!("{summary}");
            eprintln!(
                "warning: {} changed while the turn ran, so its results were not written into it",
                document.path().display()
            );
            hint();
            code
        }
        Err(e) => {
            eprintln!("{summary}");
            eprintln!(
                "error: cannot write results to {}: {e}",
                document.path().display()
            );
            hint();
            exit::STEP_FAILED
        }
    }
}

/// Runs a document on the daemon, showing its progress as it comes as a local run does, and
/// writes its results back here.
fn run_remote(
    args: &RunArgs,
    client: &upstream_client::Client,
    document: &Document,
    original: &[u8],
    cancel: &Cancel,
) -> u8 {
    let start = Instant::now();
    let mut secrets = std::collections::BTreeMap::new();
    for name in &document.front_matter().secrets {
        match std::env::var(name) {
            Ok(value) => {
                secrets.insert(name.clone(), value);
            }
            Err(_) => {
                eprintln!(
                    "error: {}: secret `{name}` is not set in the environment",
                    document.path().display()
                );
                eprintln!("hint: export {name} before running, or remove it from `secrets`");
                return exit::BAD_INPUT;
            }
        }
    }
    let name = document
        .path()
        .file_name()
        .map_or("turn.md".into(), |n| n.to_string_lossy().into_owned());
    // The daemon's records name the document as it is here: one history, whichever door a
    // turn came in by.
    let path = std::path::absolute(document.path())
        .ok()
        .and_then(|p| p.to_str().map(str::to_string));
    eprintln!("Daemon: {} runs {name}", client.endpoint());
    note_local_chain(document, args);
    let request = upstream_client::RunTurn {
        document: String::from_utf8_lossy(original).into_owned(),
        name: Some(name),
        path,
        secrets,
        resume: args.resume,
    };
    // The daemon is read on a thread of its own, so that Ctrl-C is seen at once: ending the
    // process drops the connection, and the daemon stops the turn.
    enum Heard {
        Event(serde_json::Value),
        Done(Result<upstream_client::TurnResult, upstream_client::ClientError>),
    }
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let client = client.clone();
        std::thread::spawn(move || {
            let events = tx.clone();
            let done = client.run_turn_streamed(&request, &mut |event| {
                let _ = events.send(Heard::Event(event));
            });
            let _ = tx.send(Heard::Done(done));
        });
    }
    let mut progress = Progress::new(document.front_matter().image(), args.verbose, cancel);
    let done = loop {
        match rx.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(Heard::Event(event)) => {
                // Events this upstream does not know (a newer daemon's) are passed over.
                if let Ok(event) = serde_json::from_value::<TurnEvent>(event) {
                    event.replay(document, &mut progress);
                }
            }
            Ok(Heard::Done(done)) => break done,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                eprintln!("error: the connection to the daemon ended");
                return exit::SANDBOX;
            }
        }
        if cancel.is_cancelled() {
            eprintln!(
                "Interrupted: the daemon stops the turn; {} was not modified",
                document.path().display()
            );
            return exit::INTERRUPTED;
        }
    };
    drop(progress);
    let result = match done {
        Ok(r) => r,
        Err(upstream_client::ClientError::Api {
            status, message, ..
        }) if (400..500).contains(&status) => {
            eprintln!("error: {}", terminal::line(&message));
            return exit::BAD_INPUT;
        }
        Err(e) => {
            eprintln!("error: {}", terminal::line(&e.to_string()));
            return exit::SANDBOX;
        }
    };
    let record: TurnRecord = match serde_json::from_value(result.turn) {
        Ok(record) => record,
        Err(e) => {
            eprintln!("error: the daemon's record of the turn: {e}");
            return exit::SANDBOX;
        }
    };
    finish(
        args,
        document,
        original,
        &record,
        &result.document,
        start,
        Some((client.endpoint(), &reading_flag(&args.daemon))),
    )
}

pub fn sandbox_failed(e: &SandboxError) -> u8 {
    // What the agent or an image said is shown, not obeyed.
    eprintln!("error: {}", terminal::line(&e.to_string()));
    if let Some(hint) = e.hint() {
        eprintln!("hint: {hint}");
    }
    if let SandboxError::Image { .. } = e {
        eprintln!(
            "hint: remove `image:` from the front matter (or set `image: host`) to run on the host's /usr and /etc"
        );
    }
    exit::SANDBOX
}

/// Where images are cached and how they are pulled: `$UPSTREAM_CACHE_DIR`, else
/// `/var/cache/upstream` as root and `~/.cache/upstream` otherwise; plain HTTP for loopback
/// registries and those named with --insecure-registry; credentials from
/// `$UPSTREAM_REGISTRY_AUTH` (`registry=user:password,…`, each for its registry only), then from
/// Docker's `config.json` (`$DOCKER_CONFIG`, else `~/.docker`).
pub fn image_source(insecure_registry: &[String], refresh: bool) -> upstream_turn::ImageSource {
    let root = nix::unistd::Uid::effective().is_root();
    let dir = match std::env::var_os("UPSTREAM_CACHE_DIR") {
        Some(d) => PathBuf::from(d),
        None if root => PathBuf::from("/var/cache/upstream"),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir)
            .join("upstream"),
    };
    let mut insecure = insecure_registry.to_vec();
    for host in ["localhost", "127.0.0.1", "[::1]"] {
        insecure.push(host.to_string());
    }
    let docker_config = std::env::var_os("DOCKER_CONFIG")
        .map(|d| PathBuf::from(d).join("config.json"))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")));
    let credentials = upstream_image::Credentials::load(
        std::env::var("UPSTREAM_REGISTRY_AUTH").ok().as_deref(),
        docker_config.as_deref(),
    );
    upstream_turn::ImageSource {
        cache: upstream_image::Cache::new(dir),
        pull: upstream_image::PullOptions {
            insecure,
            credentials,
            refresh,
            owners: if root {
                upstream_image::Owners::Shifted(upstream_backend_ns::STORED_ID_BASE)
            } else {
                upstream_image::Owners::Unpacker
            },
            // The user's own machine: loopback registries too (`upstream serve` narrows it).
            registries: upstream_image::RegistryPolicy::Any,
        },
    }
}

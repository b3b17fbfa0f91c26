//! `upstream log`, `show`, `artifacts`, `context` and `gc`: reading and tidying the store.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use upstream_doc::{format_duration, format_size};
use upstream_store::log::{LogStream, replay};
use upstream_store::{
    ArtifactKind, ArtifactRow, BlobError, Store, StoreError, TurnDetail, TurnState,
};

use crate::cli::{ArtifactScope, ArtifactsArgs, ArtifactsCommand, ContextCommand, GcArgs};
use crate::cli::{LogArgs, ShowArgs, StoreArg};
use crate::exit;
use crate::table::{Align, Table, time};

/// Opens the store named by `arg`, or the nearest one above the current directory; never
/// creates one.
fn open(arg: &StoreArg) -> Result<Store, u8> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let dir = upstream_store::locate(&cwd, arg.store.as_deref());
    if !dir.join("store.db").is_file() {
        eprintln!("error: no store at {}", dir.display());
        eprintln!(
            "hint: stores are made by `upstream run`; run one here, or name a store with --store DIR or UPSTREAM_STORE"
        );
        return Err(exit::BAD_INPUT);
    }
    Store::open(&dir).map_err(|e| failed(&e))
}

fn failed(e: &StoreError) -> u8 {
    eprintln!("error: {e}");
    match e {
        StoreError::NoTurn(_) => {
            eprintln!("hint: `upstream log` lists the turns");
            exit::STEP_FAILED
        }
        StoreError::NoContext(_) => {
            eprintln!("hint: `upstream context ls` lists the contexts");
            exit::STEP_FAILED
        }
        StoreError::Busy => exit::STEP_FAILED,
        StoreError::Blob(
            BlobError::Corrupt { .. } | BlobError::NotAFile { .. } | BlobError::Changed { .. },
        ) => {
            eprintln!(
                "hint: the store's copy is unusable; running the turn that made it again stores it anew"
            );
            exit::SANDBOX
        }
        _ => exit::SANDBOX,
    }
}

pub(crate) fn print_json(value: &impl Serialize) -> u8 {
    let mut out = io::stdout().lock();
    match serde_json::to_writer_pretty(&mut out, value) {
        Ok(()) => {
            let _ = writeln!(out);
            exit::OK
        }
        Err(_) => exit::OK, // a closed stdout (`| head`)
    }
}

fn status(state: TurnState) -> &'static str {
    state.as_str()
}

fn duration(ms: Option<u64>) -> String {
    ms.map_or("-".into(), |ms| format_duration(Duration::from_millis(ms)))
}

fn artifacts_cell(count: u64, bytes: u64) -> String {
    match count {
        0 => "-".into(),
        n => format!("{n} ({})", format_size(bytes)),
    }
}

pub fn log(args: LogArgs) -> u8 {
    if let Some(code) = crate::daemon_records::log(&args) {
        return code;
    }
    let store = match open(&args.store) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let turns = match store.turns(args.context.as_deref(), args.last) {
        Ok(t) => t,
        Err(e) => return failed(&e),
    };
    print_log(&turns, args.json)
}

/// The turns as `upstream log` shows them.
pub(crate) fn print_log(turns: &[upstream_store::TurnSummary], json: bool) -> u8 {
    if json {
        return print_json(&turns);
    }
    if turns.is_empty() {
        eprintln!("No turns yet.");
        return exit::OK;
    }
    let mut table = Table::new(&[
        ("TURN", Align::Right),
        ("STARTED", Align::Left),
        ("CONTEXT", Align::Left),
        ("DOCUMENT", Align::Left),
        ("STATUS", Align::Left),
        ("STEPS", Align::Right),
        ("DURATION", Align::Right),
        ("ARTIFACTS", Align::Left),
    ]);
    for t in turns {
        table.row(vec![
            t.number.to_string(),
            time(t.started_at),
            t.context.clone(),
            t.document.clone(),
            status(t.status).into(),
            format!("{}/{}", t.steps_passed, t.steps),
            duration(t.duration_ms),
            artifacts_cell(t.artifacts, t.artifact_bytes),
        ]);
    }
    let _ = table.print(&mut io::stdout().lock());
    exit::OK
}

/// A step's whole output, for `show --step --json`.
#[derive(Serialize)]
struct StepOutput<'a> {
    turn: i64,
    #[serde(flatten)]
    step: &'a upstream_store::StepRow,
    stdout: String,
    stderr: String,
}

pub fn show(args: ShowArgs) -> u8 {
    if let Some(code) = crate::daemon_records::show(&args) {
        return code;
    }
    let store = match open(&args.store) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let turn = match store.turn(&args.turn) {
        Ok(t) => t,
        Err(e) => return failed(&e),
    };
    if args.document {
        let Some(blob) = turn.result.as_ref().or(turn.source.as_ref()) else {
            eprintln!("error: turn {} kept no document", turn.summary.number);
            return exit::STEP_FAILED;
        };
        return match store.blobs().read(blob) {
            Ok(bytes) => {
                let _ = io::stdout().lock().write_all(&bytes);
                exit::OK
            }
            Err(e) => failed(&e.into()),
        };
    }
    if let Some(number) = args.step {
        return show_step(
            &turn,
            number,
            args.json,
            |log| store.blobs().open(log).map_err(|e| failed(&e.into())),
            |reader, e| failed(&reader.error(e).into()),
        );
    }
    if args.json {
        return print_json(&turn);
    }
    print_turn(&turn);
    exit::OK
}

pub(crate) fn print_turn(turn: &TurnDetail) {
    let t = &turn.summary;
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "Turn {} ({})", t.number, t.id);
    let _ = writeln!(out, "  context   {}", t.context);
    let _ = writeln!(out, "  document  {}", t.document);
    let _ = writeln!(out, "  status    {}", status(t.status));
    let _ = writeln!(out, "  started   {}", time(t.started_at));
    let _ = writeln!(out, "  duration  {}", duration(t.duration_ms));
    if let Some(backend) = turn
        .sandbox
        .as_ref()
        .and_then(|s| s.get("backend"))
        .and_then(|b| b.as_str())
    {
        let _ = writeln!(out, "  sandbox   {backend}");
    }
    let _ = writeln!(out);
    if turn.steps.is_empty() {
        let _ = writeln!(out, "No steps recorded.");
    } else {
        let mut table = Table::new(&[
            ("STEP", Align::Right),
            ("TITLE", Align::Left),
            ("STATUS", Align::Left),
            ("EXIT", Align::Right),
            ("DURATION", Align::Right),
            ("OUTPUT", Align::Right),
        ]);
        for s in &turn.steps {
            let exit = match (s.exit_code, s.signal) {
                (Some(c), _) => c.to_string(),
                (None, Some(sig)) => upstream_doc::signal_name(sig).to_string(),
                _ => "-".into(),
            };
            table.row(vec![
                s.number.to_string(),
                s.title.clone(),
                s.status.replace('_', " "),
                exit,
                duration(s.duration_ms),
                format_size(s.stdout_bytes + s.stderr_bytes),
            ]);
        }
        let _ = table.print(&mut out);
        for s in &turn.steps {
            for (k, v) in &s.outputs {
                let _ = writeln!(out, "  step {} output {k}={v}", s.number);
            }
        }
    }
    let _ = writeln!(out);
    if turn.artifact_list.is_empty() {
        let _ = writeln!(out, "No artifacts saved.");
    } else {
        let _ = artifact_table(&turn.artifact_list).print(&mut out);
    }
    let _ = writeln!(
        out,
        "\nWhole output of a step: upstream show {} --step N",
        t.number
    );
}

/// Prints step `number`'s whole output, its log opened by `open`; `fail` reports an error
/// reading it.
pub(crate) fn show_step<R: io::Read>(
    turn: &TurnDetail,
    number: i64,
    json: bool,
    open: impl FnOnce(&upstream_store::BlobId) -> Result<R, u8>,
    fail: impl Fn(&R, io::Error) -> u8,
) -> u8 {
    let Some(step) = turn.steps.iter().find(|s| s.number == number) else {
        eprintln!(
            "error: turn {} has no step {number} (it recorded {})",
            turn.summary.number,
            turn.steps.len()
        );
        return exit::STEP_FAILED;
    };
    let Some(log) = &step.log else {
        if json {
            return print_json(&StepOutput {
                turn: turn.summary.number,
                step,
                stdout: String::new(),
                stderr: String::new(),
            });
        }
        return exit::OK;
    };
    let mut checked = match open(log) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if json {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let result = replay(&mut checked, |stream, data| {
            match stream {
                LogStream::Stdout => stdout.extend_from_slice(data),
                LogStream::Stderr => stderr.extend_from_slice(data),
            }
            Ok(())
        });
        if let Err(e) = result {
            return fail(&checked, e);
        }
        return print_json(&StepOutput {
            turn: turn.summary.number,
            step,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        });
    }
    let (mut out, mut err) = (io::stdout().lock(), io::stderr().lock());
    let result = replay(&mut checked, |stream, data| match stream {
        LogStream::Stdout => out.write_all(data),
        LogStream::Stderr => err.write_all(data),
    });
    match result {
        Ok(()) => exit::OK,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => exit::OK,
        Err(e) => {
            drop(out);
            eprintln!();
            fail(&checked, e)
        }
    }
}

pub(crate) fn artifact_table(artifacts: &[ArtifactRow]) -> Table {
    let mut table = Table::new(&[
        ("PATH", Align::Left),
        ("KIND", Align::Left),
        ("SIZE", Align::Right),
        ("MODE", Align::Right),
        ("TURN", Align::Right),
        ("BLAKE3", Align::Left),
    ]);
    for a in artifacts {
        let (size, hash) = match a.kind {
            ArtifactKind::File => (
                format_size(a.size),
                a.blob
                    .as_ref()
                    .map_or("-".into(), |b| b.as_str()[..16].to_string()),
            ),
            ArtifactKind::Symlink => (
                "-".into(),
                format!("-> {}", a.target.as_deref().unwrap_or("")),
            ),
            _ => ("-".into(), "-".into()),
        };
        table.row(vec![
            a.path.clone(),
            a.kind.as_str().into(),
            size,
            format!("{:04o}", a.mode),
            a.turn.to_string(),
            hash,
        ]);
    }
    table
}

/// The artifacts `scope` names, and a line saying whose they are.
fn scoped(store: &Store, scope: &ArtifactScope) -> Result<(Vec<ArtifactRow>, String), StoreError> {
    if let Some(turn) = &scope.turn {
        let turn = store.turn(turn)?;
        let what = format!("Artifacts saved by turn {}:", turn.summary.number);
        return Ok((turn.artifact_list, what));
    }
    let context = match &scope.context {
        Some(c) => c.clone(),
        None => store.turns(None, Some(1))?.pop().map_or_else(
            || upstream_store::DEFAULT_CONTEXT.to_string(),
            |t| t.context,
        ),
    };
    if scope.context.is_some() && !store.contexts()?.iter().any(|c| c.name == context) {
        return Err(StoreError::NoContext(context));
    }
    let list = store.context_artifacts(&context)?;
    Ok((
        list,
        format!("Artifacts of context {context}, as its next turn gets them:"),
    ))
}

pub fn artifacts(args: ArtifactsArgs) -> u8 {
    if let Some(code) = crate::daemon_records::artifacts(&args) {
        return code;
    }
    let store = match open(&args.store) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let (list, what) = match scoped(&store, &args.scope) {
        Ok(found) => found,
        Err(e) => return failed(&e),
    };
    if let Some(ArtifactsCommand::Get { path, output }) = args.get {
        return get(
            &list,
            &path,
            output.as_deref(),
            |blob| store.blobs().open(blob).map_err(|e| failed(&e.into())),
            |reader, e| failed(&reader.error(e).into()),
        );
    }
    print_artifacts(&list, &what, args.json)
}

/// Artifacts as `upstream artifacts` lists them, under `what`: whose they are.
pub(crate) fn print_artifacts(list: &[ArtifactRow], what: &str, json: bool) -> u8 {
    if json {
        return print_json(&list);
    }
    if list.is_empty() {
        eprintln!("{what} none.");
        return exit::OK;
    }
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{what}");
    let _ = artifact_table(list).print(&mut out);
    exit::OK
}

/// Writes the artifact at `path` of `list` to `output` (else stdout), its content opened by
/// `open`; `fail` reports an error reading it.
pub(crate) fn get<R: io::Read>(
    list: &[ArtifactRow],
    path: &str,
    output: Option<&Path>,
    open: impl FnOnce(&upstream_store::BlobId) -> Result<R, u8>,
    fail: impl Fn(&R, io::Error) -> u8,
) -> u8 {
    let wanted = path.trim_start_matches("./").trim_end_matches('/');
    let Some(artifact) = list.iter().find(|a| a.path == wanted) else {
        eprintln!("error: no artifact {path} here");
        eprintln!("hint: `upstream artifacts` lists them (with --context or --turn for others)");
        return exit::STEP_FAILED;
    };
    let Some(blob) = artifact
        .blob
        .as_ref()
        .filter(|_| artifact.kind == ArtifactKind::File)
    else {
        eprintln!(
            "error: {path} is a {}, not a file: get the files inside it one by one",
            artifact.kind.as_str()
        );
        return exit::STEP_FAILED;
    };
    // Checked against its name before this returns: nothing of a damaged blob, or of
    // anything but the store's own file, is written anywhere.
    let mut reader = match open(blob) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let result = match output {
        Some(file) => write_file(&mut reader, file, artifact.mode & 0o777),
        None => io::copy(&mut reader, &mut io::stdout().lock()).map(|_| ()),
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => exit::OK,
        Err(e) => fail(&reader, e),
    }
}

/// Writes `reader` to `file` whole or not at all: to a new file beside it (made, never
/// opened through a link, readable only by its owner until done), then renamed.
fn write_file(reader: &mut impl io::Read, file: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut random = [0u8; 6];
    upstream_store::keys::fill_random(&mut random)?;
    let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".upstream-partial-{suffix}"));
    let temp = file.with_file_name(name);
    let copied = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temp)
        .and_then(|mut f| {
            io::copy(reader, &mut f)?;
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            f.sync_all()
        });
    match copied.and_then(|()| fs::rename(&temp, file)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

pub fn context(command: ContextCommand) -> u8 {
    match command {
        ContextCommand::Ls { json, store } => {
            let store = match open(&store) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let contexts = match store.contexts() {
                Ok(c) => c,
                Err(e) => return failed(&e),
            };
            if json {
                return print_json(&contexts);
            }
            if contexts.is_empty() {
                eprintln!("No contexts yet.");
                return exit::OK;
            }
            let mut table = Table::new(&[
                ("CONTEXT", Align::Left),
                ("TURNS", Align::Right),
                ("LAST TURN", Align::Right),
                ("LAST STARTED", Align::Left),
                ("ARTIFACTS", Align::Left),
            ]);
            for c in &contexts {
                table.row(vec![
                    c.name.clone(),
                    c.turns.to_string(),
                    c.last_turn.map_or("-".into(), |n| n.to_string()),
                    c.last_started_at.map_or("-".into(), time),
                    artifacts_cell(c.artifacts, c.artifact_bytes),
                ]);
            }
            let _ = table.print(&mut io::stdout().lock());
            exit::OK
        }
        ContextCommand::Rm { name, store } => {
            let mut store = match open(&store) {
                Ok(s) => s,
                Err(code) => return code,
            };
            match store.remove_context(&name) {
                Ok((turns, kept)) => {
                    for dir in kept {
                        upstream_backend_ns::discard_kept_dir(&dir);
                    }
                    eprintln!(
                        "Removed context {name} and its {turns} turn{}; `upstream gc` frees their stored content",
                        if turns == 1 { "" } else { "s" }
                    );
                    exit::OK
                }
                Err(e) => failed(&e),
            }
        }
    }
}

pub fn gc(args: GcArgs) -> u8 {
    let mut store = match open(&args.store) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.gc() {
        Ok(report) if args.json => print_json(&report),
        Ok(report) => {
            eprintln!(
                "Removed {} blob{} ({}); kept {} ({})",
                report.removed,
                if report.removed == 1 { "" } else { "s" },
                format_size(report.removed_bytes),
                report.kept,
                format_size(report.kept_bytes)
            );
            exit::OK
        }
        Err(e) => failed(&e),
    }
}

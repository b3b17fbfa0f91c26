//! `upstream log`, `show`, `artifacts`, `context` and `gc`: reading and tidying the store.

use std::fs;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use upstream_doc::{format_duration, format_size, terminal};
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
        let named = if arg.store.is_some() {
            Some("--store")
        } else if std::env::var_os("UPSTREAM_STORE").is_some() {
            Some("$UPSTREAM_STORE")
        } else {
            None
        };
        match named {
            Some(by) => eprintln!("error: no store at {} (named by {by})", dir.display()),
            None => eprintln!(
                "error: no store in {} or any directory above it",
                cwd.display()
            ),
        }
        eprintln!(
            "hint: a turn's store is the {} directory nearest above its document, made beside \
             the document by its first turn; name another with --store DIR or UPSTREAM_STORE",
            upstream_store::STORE_DIR
        );
        let below = stores_below(&cwd);
        if let Some(first) = below.first() {
            let shown: Vec<String> = below.iter().map(|d| d.display().to_string()).collect();
            eprintln!(
                "hint: stores below here: {}; e.g. `upstream log --store {}`",
                shown.join(", "),
                first.display()
            );
        }
        return Err(exit::BAD_INPUT);
    }
    Store::open(&dir).map_err(|e| failed(&e))
}

/// Stores in directories a few levels below `dir` (relative to it), for a hint: a turn run
/// from a subdirectory (`examples/`) made its store there.
fn stores_below(dir: &Path) -> Vec<PathBuf> {
    const DEPTH: usize = 3;
    const MAX_ENTRIES: usize = 4096;
    const SHOWN: usize = 5;
    let mut found = Vec::new();
    let mut seen = 0;
    let mut level = vec![PathBuf::new()];
    for _ in 0..DEPTH {
        let mut next = Vec::new();
        for relative in level {
            let Ok(entries) = fs::read_dir(dir.join(&relative)) else {
                continue;
            };
            for entry in entries.flatten() {
                seen += 1;
                if seen > MAX_ENTRIES || found.len() >= SHOWN {
                    return found;
                }
                // Directories only, never through a link.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let path = relative.join(&name);
                if name == upstream_store::STORE_DIR {
                    if dir.join(&path).join("store.db").is_file() {
                        found.push(path);
                    }
                } else if !name.to_string_lossy().starts_with('.') {
                    next.push(path);
                }
            }
        }
        level = next;
    }
    found
}

fn failed(e: &StoreError) -> u8 {
    eprintln!("error: {e}");
    match e {
        StoreError::NoTurn(_) => {
            eprintln!("hint: `upstream log` lists the turns");
            exit::STEP_FAILED
        }
        StoreError::AmbiguousTurn { .. } => {
            eprintln!(
                "hint: give more of the id, or the turn's number (`upstream log` lists them)"
            );
            exit::BAD_INPUT
        }
        StoreError::NoContext(_) => {
            eprintln!("hint: `upstream context ls` lists the contexts");
            exit::STEP_FAILED
        }
        StoreError::Busy | StoreError::ContextBusy(_) => exit::STEP_FAILED,
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
        return match store.blobs().open(blob) {
            Ok(mut reader) => match print_document(&mut reader) {
                Ok(()) => exit::OK,
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => exit::OK,
                Err(e) => failed(&reader.error(e).into()),
            },
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

/// Output that goes to a terminal as it was stored: a document, a step's whole output. To a
/// terminal its control characters are shown escaped ([`terminal::block`]); anywhere else
/// (a file, a pipe) the bytes go as they are, for what reads them.
struct ToPerson<W: Write> {
    out: W,
    escaper: Option<terminal::BlockEscaper>,
}

impl<W: Write + IsTerminal> ToPerson<W> {
    fn new(out: W) -> ToPerson<W> {
        let escaper = out.is_terminal().then(terminal::BlockEscaper::new);
        ToPerson { out, escaper }
    }
}

impl<W: Write> ToPerson<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.escaper {
            None => self.out.write_all(data),
            Some(escaper) => {
                let mut text = String::new();
                escaper.push(data, &mut text);
                self.out.write_all(text.as_bytes())
            }
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        if let Some(escaper) = &mut self.escaper {
            let mut text = String::new();
            escaper.finish(&mut text);
            self.out.write_all(text.as_bytes())?;
        }
        self.out.flush()
    }
}

/// Prints a document `reader` gives (`show --document`) as [`ToPerson`] does.
pub(crate) fn print_document(reader: &mut impl io::Read) -> io::Result<()> {
    let mut out = ToPerson::new(io::stdout().lock());
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write(&buf[..n])?;
    }
    out.finish()
}

pub(crate) fn print_turn(turn: &TurnDetail) {
    let t = &turn.summary;
    let mut out = io::stdout().lock();
    let shown = |text: &str| terminal::line(text).into_owned();
    let _ = writeln!(out, "Turn {} ({})", t.number, t.id);
    let _ = writeln!(out, "  context   {}", shown(&t.context));
    let _ = writeln!(out, "  document  {}", shown(&t.document));
    let _ = writeln!(out, "  status    {}", status(t.status));
    let _ = writeln!(out, "  started   {}", time(t.started_at));
    let _ = writeln!(out, "  duration  {}", duration(t.duration_ms));
    if let Some(backend) = turn
        .sandbox
        .as_ref()
        .and_then(|s| s.get("backend"))
        .and_then(|b| b.as_str())
    {
        let _ = writeln!(out, "  sandbox   {}", shown(backend));
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
                let _ = writeln!(out, "  step {} output {}={}", s.number, shown(k), shown(v));
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
    let mut out = ToPerson::new(io::stdout().lock());
    let mut err = ToPerson::new(io::stderr().lock());
    let mut kept = 0u64;
    let result = replay(&mut checked, |stream, data| {
        kept += data.len() as u64;
        match stream {
            LogStream::Stdout => out.write(data),
            LogStream::Stderr => err.write(data),
        }
    })
    .and_then(|()| out.finish())
    .and_then(|()| err.finish());
    match result {
        Ok(()) => {
            // The log keeps the first MAX_STEP_LOG bytes; the record counts them all.
            let total = step.stdout_bytes + step.stderr_bytes;
            if kept < total {
                drop(out);
                drop(err);
                eprintln!("note: {}", upstream_turn::log_dropped_note(kept, total));
            }
            exit::OK
        }
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
            &what,
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
    what: &str,
    path: &str,
    output: Option<&Path>,
    open: impl FnOnce(&upstream_store::BlobId) -> Result<R, u8>,
    fail: impl Fn(&R, io::Error) -> u8,
) -> u8 {
    let wanted = path.trim_start_matches("./").trim_end_matches('/');
    let Some(artifact) = list.iter().find(|a| a.path == wanted) else {
        // `what` is the heading of the list: "Artifacts of context c, as its next turn …:".
        let whose = what.trim_end_matches(':');
        let whose = match whose.strip_prefix("Artifacts") {
            Some(rest) => format!("the artifacts{rest}"),
            None => whose.to_string(),
        };
        eprintln!("error: no artifact {} among {whose}", terminal::line(path));
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
                    if !kept.is_empty() {
                        match crate::backends::open_here() {
                            Ok(backend) => {
                                for kept in
                                    kept.iter().filter_map(|k| upstream_sandbox::Kept::parse(k))
                                {
                                    backend.discard_kept(&kept);
                                }
                            }
                            // What stays is reclaimed by `upstream gc` on a host that can.
                            Err(e) => eprintln!(
                                "warning: the workspaces its turns kept for resuming stay until `upstream gc`: {e}"
                            ),
                        }
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
    // Workspaces kept for resuming by turns whose store or record is gone, whichever store
    // kept them: nothing can resume them any more. Those the store here records are its
    // own, though it was moved since.
    // A host that cannot make sandboxes has kept nothing either.
    let reclaimed = match crate::backends::open_here() {
        Ok(backend) => {
            let kept = backend.kept();
            let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            upstream_turn::kept::adopt(
                &*backend,
                &kept,
                &upstream_store::locate(&cwd, args.store.store.as_deref()),
            );
            upstream_turn::kept::reclaim(&*backend, &kept)
        }
        Err(_) => 0,
    };
    if reclaimed > 0 && !args.json {
        eprintln!(
            "Removed {reclaimed} workspace{} kept for resuming turns whose store or record is gone",
            if reclaimed == 1 { "" } else { "s" }
        );
    }
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

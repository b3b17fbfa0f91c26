//! `upstream log`, `show` and `artifacts` of the turns a daemon ran (`--daemon`, `--url`,
//! `$UPSTREAM_URL`): its records read through its API and shown as a local store's are.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use upstream_client::{Client, ClientError};
use upstream_store::{ArtifactRow, ContextSummary, TurnDetail, TurnSummary};

use crate::cli::{ArtifactsArgs, ArtifactsCommand, DaemonArg, LogArgs, ShowArgs, StoreArg};
use crate::exit;
use crate::store_cmd;

/// The daemon the command asked for; `None` when it reads a local store. An error is
/// `Some(Err(code))`, reported.
fn asked(daemon: &DaemonArg, store: &StoreArg) -> Option<Result<Client, u8>> {
    if store.store.is_some() && (daemon.daemon || daemon.url.is_some()) {
        eprintln!("error: --store names a store here, and a daemon keeps its turns in its own");
        eprintln!(
            "hint: leave out --store to read the daemon's records, or --daemon/--url to read the store"
        );
        return Some(Err(exit::BAD_INPUT));
    }
    crate::run::daemon_client(daemon, store.store.is_none()).transpose()
}

/// Reports an error of the daemon's; returns the exit code.
fn failed(client: &Client, e: &ClientError) -> u8 {
    match e {
        ClientError::Api {
            status, message, ..
        } if (400..500).contains(status) => {
            eprintln!("error: {}", upstream_doc::terminal::line(message));
            if *status == 404 {
                eprintln!(
                    "hint: `upstream log --daemon` (or with --url) lists the daemon's turns; a turn run here is in the local store: `upstream log`"
                );
            }
            exit::STEP_FAILED
        }
        e => {
            eprintln!("error: the daemon at {}: {e}", client.endpoint());
            exit::SANDBOX
        }
    }
}

/// A record of the daemon's as the store's type.
fn read<T: DeserializeOwned>(
    client: &Client,
    answer: Result<serde_json::Value, ClientError>,
) -> Result<T, u8> {
    let value = answer.map_err(|e| failed(client, &e))?;
    serde_json::from_value(value).map_err(|e| {
        eprintln!(
            "error: the daemon at {} answered with a record this upstream cannot read: {e}",
            client.endpoint()
        );
        eprintln!("hint: run the same version of upstream on both sides");
        exit::SANDBOX
    })
}

/// Opens a blob of the daemon's store.
fn blob(client: &Client, id: &upstream_store::BlobId) -> Result<Box<dyn Read>, u8> {
    match client.blob(id.as_str()) {
        Ok(reader) => Ok(Box::new(reader)),
        Err(e) => Err(failed(client, &e)),
    }
}

/// Reports an error reading a blob as it streamed in.
fn cut_off(client: &Client, e: io::Error) -> u8 {
    eprintln!(
        "error: the content from the daemon at {} was cut off: {e}",
        client.endpoint()
    );
    exit::SANDBOX
}

pub fn log(args: &LogArgs) -> Option<u8> {
    let client = match asked(&args.daemon, &args.store)? {
        Ok(c) => c,
        Err(code) => return Some(code),
    };
    let turns: Vec<TurnSummary> =
        match read(&client, client.turns(args.context.as_deref(), args.last)) {
            Ok(t) => t,
            Err(code) => return Some(code),
        };
    Some(store_cmd::print_log(&turns, args.json))
}

pub fn show(args: &ShowArgs) -> Option<u8> {
    let client = match asked(&args.daemon, &args.store)? {
        Ok(c) => c,
        Err(code) => return Some(code),
    };
    let turn: TurnDetail = match read(&client, client.turn(&args.turn)) {
        Ok(t) => t,
        Err(code) => return Some(code),
    };
    if args.document {
        let Some(id) = turn.result.as_ref().or(turn.source.as_ref()) else {
            eprintln!("error: turn {} kept no document", turn.summary.number);
            return Some(exit::STEP_FAILED);
        };
        let mut reader = match blob(&client, id) {
            Ok(r) => r,
            Err(code) => return Some(code),
        };
        return Some(match store_cmd::print_document(&mut reader) {
            Ok(_) => exit::OK,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => exit::OK,
            Err(e) => cut_off(&client, e),
        });
    }
    if let Some(number) = args.step {
        return Some(store_cmd::show_step(
            &turn,
            number,
            args.json,
            |log| blob(&client, log),
            |_, e| cut_off(&client, e),
        ));
    }
    if args.json {
        return Some(store_cmd::print_json(&turn));
    }
    store_cmd::print_turn(&turn);
    let _ = io::stdout().flush();
    Some(exit::OK)
}

pub fn artifacts(args: &ArtifactsArgs) -> Option<u8> {
    let client = match asked(&args.daemon, &args.store)? {
        Ok(c) => c,
        Err(code) => return Some(code),
    };
    let (list, what) = match scoped(&client, &args.scope) {
        Ok(found) => found,
        Err(code) => return Some(code),
    };
    if let Some(ArtifactsCommand::Get { path, output }) = &args.get {
        return Some(store_cmd::get(
            &list,
            &what,
            path,
            output.as_deref(),
            |id| blob(&client, id),
            |_, e| cut_off(&client, e),
        ));
    }
    Some(store_cmd::print_artifacts(&list, &what, args.json))
}

/// The artifacts `scope` names on the daemon, and a line saying whose they are (as the
/// local store's are chosen: a turn's, a context's, else the last turn's context's).
fn scoped(
    client: &Client,
    scope: &crate::cli::ArtifactScope,
) -> Result<(Vec<ArtifactRow>, String), u8> {
    if let Some(turn) = &scope.turn {
        let turn: TurnDetail = read(client, client.turn(turn))?;
        let what = format!("Artifacts saved by turn {}:", turn.summary.number);
        return Ok((turn.artifact_list, what));
    }
    let context = match &scope.context {
        Some(c) => {
            let contexts: Vec<ContextSummary> = read(client, client.contexts())?;
            if !contexts.iter().any(|known| &known.name == c) {
                eprintln!("error: no context `{c}` on the daemon");
                eprintln!(
                    "hint: `upstream context ls` lists a local store's contexts; the daemon's are at GET /v1/contexts"
                );
                return Err(exit::STEP_FAILED);
            }
            c.clone()
        }
        None => {
            let last: Vec<TurnSummary> = read(client, client.turns(None, Some(1)))?;
            last.into_iter().next().map_or_else(
                || upstream_store::DEFAULT_CONTEXT.to_string(),
                |t| t.context,
            )
        }
    };
    let list = read(client, client.context_artifacts(&context))?;
    Ok((
        list,
        format!("Artifacts of context {context}, as its next turn gets them:"),
    ))
}

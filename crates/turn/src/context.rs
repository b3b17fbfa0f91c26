//! A turn's context: what earlier turns of the same chain left for it, and what it leaves for
//! the next.

use std::collections::BTreeMap;
use std::io::{self, Write};

use serde::Serialize;
use upstream_doc::FrontMatter;
use upstream_sandbox::Files;
use upstream_sandbox::files::{At, Create, Kind};
use upstream_sandbox::sandboxfs;
use upstream_store::{
    ArtifactKind, ArtifactRow, Blobs, NewArtifact, OutputRow, Store, StoreError, TurnDetail,
    TurnState,
};

use crate::artifacts::{self, Known, Patterns, Stop};
use crate::{ContextLoaded, ContextSaved, TurnError, context_variable};

/// Where a sandbox finds its context's history.
pub const HISTORY_PATH: &str = "/context/turns.json";

pub(crate) struct Context {
    name: String,
    artifacts: Vec<ArtifactRow>,
    outputs: Vec<OutputRow>,
    history: History,
    last_passed: Option<i64>,
    blobs: Blobs,
}

/// `/context/turns.json`.
#[derive(Debug, Serialize)]
struct History {
    context: String,
    turns: Vec<HistoryTurn>,
}

#[derive(Debug, Serialize)]
struct HistoryTurn {
    number: i64,
    id: String,
    document: String,
    status: TurnState,
    started_at: f64,
    duration_ms: Option<u64>,
    steps: Vec<HistoryStep>,
    artifacts: Vec<HistoryArtifact>,
}

#[derive(Debug, Serialize)]
struct HistoryStep {
    number: i64,
    title: String,
    status: String,
    exit_code: Option<i32>,
    outputs: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct HistoryArtifact {
    path: String,
    kind: ArtifactKind,
    size: u64,
    mode: u32,
    blake3: Option<String>,
}

impl HistoryTurn {
    fn new(turn: TurnDetail) -> HistoryTurn {
        HistoryTurn {
            number: turn.summary.number,
            id: turn.summary.id,
            document: turn.summary.document,
            status: turn.summary.status,
            started_at: turn.summary.started_at,
            duration_ms: turn.summary.duration_ms,
            steps: turn
                .steps
                .into_iter()
                .map(|s| HistoryStep {
                    number: s.number,
                    title: s.title,
                    status: s.status,
                    exit_code: s.exit_code,
                    outputs: s.outputs,
                })
                .collect(),
            artifacts: turn
                .artifact_list
                .into_iter()
                .map(|a| HistoryArtifact {
                    path: a.path,
                    kind: a.kind,
                    size: a.size,
                    mode: a.mode,
                    blake3: a.blob.map(|b| b.to_string()),
                })
                .collect(),
        }
    }
}

impl Context {
    pub(crate) fn load(store: &Store, name: &str) -> Result<Context, StoreError> {
        let chain = store.chain(name)?;
        let last_passed = chain
            .iter()
            .rev()
            .find(|t| t.summary.status == TurnState::Passed)
            .map(|t| t.summary.number);
        Ok(Context {
            name: name.to_string(),
            artifacts: store.context_artifacts(name)?,
            outputs: store.context_outputs(name)?,
            history: History {
                context: name.to_string(),
                turns: chain.into_iter().map(HistoryTurn::new).collect(),
            },
            last_passed,
            blobs: store.blobs().clone(),
        })
    }

    /// What to tell the user the turn starts with, if anything.
    pub(crate) fn loaded(&self) -> Option<ContextLoaded> {
        let turn = self.last_passed?;
        Some(ContextLoaded {
            context: self.name.clone(),
            artifacts: self.artifacts.len(),
            outputs: self.outputs.len(),
            turn,
        })
    }

    /// `UPSTREAM_CTX_<KEY>` for every output of the context's earlier turns.
    pub(crate) fn env(&self) -> BTreeMap<String, String> {
        self.outputs
            .iter()
            .map(|o| (context_variable(&o.key), o.value.clone()))
            .collect()
    }

    /// Puts the history at [`HISTORY_PATH`] and the artifacts in the workspace. Returns the
    /// restored files, so the save at the end need not read the unchanged ones. Restored
    /// files belong to `user` (ids in the sandbox) when steps run as one, else to root.
    pub(crate) fn prepare(
        &self,
        files: &dyn Files,
        workdir: &str,
        restore: bool,
        user: Option<(u32, u32)>,
        stop: Stop<'_>,
    ) -> Result<Known, TurnError> {
        let history = serde_json::to_vec_pretty(&self.history).unwrap_or_default();
        let fail = |path: &str, e: io::Error| {
            TurnError::Restore(artifacts::RestoreError::Io {
                path: path.to_string(),
                source: e,
            })
        };
        files
            .make_dir(&At::Root("/context".into()), 0o755, true, (0, 0))
            .map_err(|e| fail("/context", e))?;
        write_new(files, HISTORY_PATH, &history).map_err(|e| fail(HISTORY_PATH, e))?;
        if self.artifacts.is_empty() || !restore {
            return Ok(Known::new());
        }
        let workspace = At::Root(workdir.to_string());
        files
            .make_dir(&workspace, 0o755, true, (0, 0))
            .map_err(|e| fail(workdir, e))?;
        // Restored files belong to whom the steps run as, and so does the workspace, as the
        // agent would make it.
        let owner = user.unwrap_or((0, 0));
        if user.is_some() {
            files
                .give(&workspace, owner)
                .map_err(|e| fail(workdir, e))?;
        }
        Ok(artifacts::restore(
            files,
            workdir,
            &self.artifacts,
            &self.blobs,
            owner,
            stop,
        )?)
    }

    /// Saves the artifacts the document names (and records restored ones it deleted).
    pub(crate) fn save(
        &self,
        files: &dyn Files,
        fm: &FrontMatter,
        workdir: &str,
        blobs: &Blobs,
        known: &Known,
        stop: Stop<'_>,
    ) -> io::Result<Option<Saved>> {
        let patterns = Patterns::new(&fm.artifacts)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if patterns.is_empty() {
            return Ok(None);
        }
        let at_workdir = |e: io::Error| match sandboxfs::refusal(&e) {
            Some(refused) if refused.at.is_none() => refused.at(workdir),
            _ => e,
        };
        let workspace = files
            .stat(&At::Root(workdir.to_string()), None)
            .map_err(|e| match sandboxfs::refusal(&e) {
                Some(refused) => refused.at(workdir),
                None => io::Error::new(e.kind(), format!("{workdir}: {e}")),
            })?;
        let saved = match workspace.map(|meta| meta.kind) {
            None => artifacts::Saved::default(),
            // A link is followed, inside the sandbox.
            Some(Kind::Dir | Kind::Symlink) => {
                artifacts::save(files, workdir, &patterns, blobs, known, stop)
                    .map_err(at_workdir)?
            }
            Some(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("{workdir}: the workspace is not a directory"),
                ));
            }
        };
        let mut list = saved.artifacts;
        let bytes = list.iter().map(|a| a.size).sum();
        let count = list.len();
        let present: std::collections::HashSet<&str> =
            list.iter().map(|a| a.path.as_str()).collect();
        let deleted: Vec<NewArtifact> = self
            .artifacts
            .iter()
            .filter(|a| patterns.covers(&a.path) && !present.contains(a.path.as_str()))
            .map(|a| NewArtifact {
                path: a.path.clone(),
                kind: ArtifactKind::Deleted,
                mode: 0,
                size: 0,
                mtime_ns: 0,
                blob: None,
                target: None,
            })
            .collect();
        let summary = ContextSaved {
            context: self.name.clone(),
            artifacts: count,
            bytes,
            deleted: deleted.len(),
            turn: 0,
            handed_on: false,
        };
        list.extend(deleted);
        blobs.commit(saved.pending)?;
        Ok(Some(Saved {
            artifacts: list,
            summary,
            skipped: saved.skipped,
        }))
    }
}

/// What a save recorded, and what it passed over.
pub(crate) struct Saved {
    pub(crate) artifacts: Vec<NewArtifact>,
    pub(crate) summary: ContextSaved,
    /// Entries the patterns matched that are not files, directories or links, with what each is.
    pub(crate) skipped: Vec<(String, String)>,
}

/// Writes file `path` of the sandbox (replacing what is there, even a link), all or
/// nothing: a write that fails (the disk full) leaves no part of it.
fn write_new(files: &dyn Files, path: &str, data: &[u8]) -> io::Result<()> {
    let mut new = files.create(
        &At::Root(path.into()),
        0o644,
        Create::AtomicReplacing,
        (0, 0),
    )?;
    new.write_all(data)?;
    new.flush()?;
    new.finish(None, None).map(drop)
}

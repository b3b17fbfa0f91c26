//! Reading the store: turns, their steps and artifacts, and the state of a context.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

use crate::{BlobId, Store, StoreError, owner_alive};

/// How many turns an ambiguous id prefix names in its error.
const AMBIGUOUS_SHOWN: usize = 5;

/// Where a turn is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TurnState {
    Running,
    Passed,
    Failed,
    /// Stopped by Ctrl-C, or its process died.
    Interrupted,
}

impl TurnState {
    pub fn as_str(self) -> &'static str {
        match self {
            TurnState::Running => "running",
            TurnState::Passed => "passed",
            TurnState::Failed => "failed",
            TurnState::Interrupted => "interrupted",
        }
    }

    fn read(status: &str, owner: Option<&str>) -> TurnState {
        match status {
            "passed" => TurnState::Passed,
            "failed" => TurnState::Failed,
            "running" if owner.is_some_and(owner_alive) => TurnState::Running,
            _ => TurnState::Interrupted,
        }
    }
}

/// What an artifact record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    File,
    Dir,
    Symlink,
    /// A restored artifact the turn deleted: later turns do not get it back.
    Deleted,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::File => "file",
            ArtifactKind::Dir => "dir",
            ArtifactKind::Symlink => "symlink",
            ArtifactKind::Deleted => "deleted",
        }
    }

    fn parse(text: &str) -> ArtifactKind {
        match text {
            "file" => ArtifactKind::File,
            "dir" => ArtifactKind::Dir,
            "symlink" => ArtifactKind::Symlink,
            _ => ArtifactKind::Deleted,
        }
    }
}

/// A turn in a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnSummary {
    pub number: i64,
    pub id: String,
    pub context: String,
    pub document: String,
    pub status: TurnState,
    /// Seconds since the Unix epoch.
    pub started_at: f64,
    pub finished_at: Option<f64>,
    pub duration_ms: Option<u64>,
    pub steps: u64,
    pub steps_passed: u64,
    /// Artifacts saved by this turn (files, directories and symlinks).
    pub artifacts: u64,
    pub artifact_bytes: u64,
    /// The turn this one resumed.
    pub resumed_from: Option<i64>,
}

/// A step of a turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRow {
    pub number: i64,
    pub title: String,
    pub language: String,
    pub status: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: Option<u64>,
    pub message: Option<String>,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// The blob of its stdout and stderr ([`crate::log`]).
    pub log: Option<BlobId>,
    pub outputs: BTreeMap<String, String>,
}

/// An artifact record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRow {
    /// The turn that saved it.
    pub turn: i64,
    pub path: String,
    pub kind: ArtifactKind,
    pub mode: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub blob: Option<BlobId>,
    pub target: Option<String>,
}

/// A turn with its steps and artifacts: in JSON, the summary's fields beside its own, where
/// the list of steps takes the place of the summary's count of them (read back, the count
/// is the list's length).
#[derive(Debug, Clone, PartialEq)]
pub struct TurnDetail {
    pub summary: TurnSummary,
    pub sandbox: Option<serde_json::Value>,
    /// The document as it was run.
    pub source: Option<BlobId>,
    /// The document with this turn's results.
    pub result: Option<BlobId>,
    pub steps: Vec<StepRow>,
    pub artifact_list: Vec<ArtifactRow>,
}

/// [`TurnDetail`]'s own fields, as JSON has them.
#[derive(Serialize, Deserialize)]
struct DetailFields {
    sandbox: Option<serde_json::Value>,
    source: Option<BlobId>,
    result: Option<BlobId>,
    steps: Vec<StepRow>,
    artifact_list: Vec<ArtifactRow>,
}

impl Serialize for TurnDetail {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let mut all = serde_json::to_value(&self.summary).map_err(S::Error::custom)?;
        let own = serde_json::to_value(DetailFields {
            sandbox: self.sandbox.clone(),
            source: self.source.clone(),
            result: self.result.clone(),
            steps: self.steps.clone(),
            artifact_list: self.artifact_list.clone(),
        })
        .map_err(S::Error::custom)?;
        if let (serde_json::Value::Object(all), serde_json::Value::Object(own)) = (&mut all, own) {
            all.extend(own);
        }
        all.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TurnDetail {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<TurnDetail, D::Error> {
        use serde::de::Error;
        let mut all = serde_json::Map::deserialize(deserializer)?;
        let mut own = serde_json::Map::new();
        for key in ["sandbox", "source", "result", "steps", "artifact_list"] {
            if let Some(value) = all.remove(key) {
                own.insert(key.into(), value);
            }
        }
        let own: DetailFields =
            serde_json::from_value(serde_json::Value::Object(own)).map_err(D::Error::custom)?;
        all.insert("steps".into(), own.steps.len().into());
        let summary: TurnSummary =
            serde_json::from_value(serde_json::Value::Object(all)).map_err(D::Error::custom)?;
        Ok(TurnDetail {
            summary,
            sandbox: own.sandbox,
            source: own.source,
            result: own.result,
            steps: own.steps,
            artifact_list: own.artifact_list,
        })
    }
}

/// An output value with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputRow {
    pub turn: i64,
    pub step: i64,
    pub key: String,
    pub value: String,
}

/// A context in a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextSummary {
    pub name: String,
    pub turns: u64,
    pub last_turn: Option<i64>,
    pub last_started_at: Option<f64>,
    /// Artifacts the next turn in this context would get.
    pub artifacts: u64,
    pub artifact_bytes: u64,
}

/// What `gc` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GcReport {
    pub removed: u64,
    pub removed_bytes: u64,
    pub kept: u64,
    pub kept_bytes: u64,
}

const SUMMARY_COLUMNS: &str = "t.number, t.id, c.name, t.document, t.status, t.owner,
    t.started_at, t.finished_at, t.duration_ms, t.steps, t.steps_passed, t.artifacts,
    t.artifact_bytes, t.resumed_from";

fn summary(row: &Row<'_>) -> rusqlite::Result<TurnSummary> {
    let status: String = row.get(4)?;
    let owner: Option<String> = row.get(5)?;
    Ok(TurnSummary {
        number: row.get(0)?,
        id: row.get(1)?,
        context: row.get(2)?,
        document: row.get(3)?,
        status: TurnState::read(&status, owner.as_deref()),
        started_at: row.get(6)?,
        finished_at: row.get(7)?,
        duration_ms: row.get::<_, Option<i64>>(8)?.map(|d| d as u64),
        steps: row.get::<_, i64>(9)? as u64,
        steps_passed: row.get::<_, i64>(10)? as u64,
        artifacts: row.get::<_, i64>(11)? as u64,
        artifact_bytes: row.get::<_, i64>(12)? as u64,
        resumed_from: row.get(13)?,
    })
}

fn blob_id(text: Option<String>) -> Option<BlobId> {
    text.as_deref().and_then(BlobId::parse)
}

fn artifact(row: &Row<'_>) -> rusqlite::Result<ArtifactRow> {
    Ok(ArtifactRow {
        turn: row.get(0)?,
        path: row.get(1)?,
        kind: ArtifactKind::parse(&row.get::<_, String>(2)?),
        mode: row.get(3)?,
        size: row.get::<_, i64>(4)? as u64,
        mtime_ns: row.get(5)?,
        blob: blob_id(row.get(6)?),
        target: row.get(7)?,
    })
}

impl Store {
    /// Turns in order, of one context or all; with `last`, only the last that many.
    pub fn turns(
        &self,
        context: Option<&str>,
        last: Option<u64>,
    ) -> Result<Vec<TurnSummary>, StoreError> {
        let sql = format!(
            "SELECT * FROM (SELECT {SUMMARY_COLUMNS} FROM turns t JOIN contexts c ON c.id = t.context_id
             WHERE ?1 IS NULL OR c.name = ?1 ORDER BY t.number DESC LIMIT ?2) ORDER BY 1"
        );
        let mut stmt = self.conn().prepare(&sql).map_err(|e| self.db_err(e))?;
        let limit = last.map_or(-1, |n| n as i64);
        let rows = stmt
            .query_map(params![context, limit], summary)
            .map_err(|e| self.db_err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.db_err(e))
    }

    /// A turn by number, or by its id or a prefix of it (at least 4 characters); a prefix of
    /// several turns' ids is [`StoreError::AmbiguousTurn`], naming them.
    pub fn turn(&self, selector: &str) -> Result<TurnDetail, StoreError> {
        if let Ok(number) = selector.parse::<i64>() {
            if let Some(turn) = self.turn_by_number(number)? {
                return Ok(turn);
            }
        }
        // Else the start of a turn's id: one turn, or the ones it could mean.
        let prefix = selector.to_ascii_lowercase();
        if prefix.len() >= 4 {
            let mut stmt = self
                .conn()
                .prepare(
                    "SELECT number, id FROM turns WHERE substr(id, 1, length(?1)) = ?1
                     ORDER BY number LIMIT ?2",
                )
                .map_err(|e| self.db_err(e))?;
            let found: Vec<(i64, String)> = stmt
                .query_map(params![prefix, AMBIGUOUS_SHOWN as i64 + 1], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .map_err(|e| self.db_err(e))?
                .collect::<Result<_, _>>()
                .map_err(|e| self.db_err(e))?;
            match found.as_slice() {
                [] => {}
                [(number, _)] => {
                    if let Some(turn) = self.turn_by_number(*number)? {
                        return Ok(turn);
                    }
                }
                _ => {
                    let more = found.len() > AMBIGUOUS_SHOWN;
                    let mut candidates: Vec<String> = found
                        .iter()
                        .take(AMBIGUOUS_SHOWN)
                        .map(|(n, id)| format!("turn {n} ({id})"))
                        .collect();
                    if more {
                        candidates.push("more".into());
                    }
                    return Err(StoreError::AmbiguousTurn {
                        selector: selector.to_string(),
                        candidates: candidates.join(", "),
                    });
                }
            }
        }
        Err(StoreError::NoTurn(selector.to_string()))
    }

    fn turn_by_number(&self, number: i64) -> Result<Option<TurnDetail>, StoreError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS}, t.sandbox, t.source_blob, t.result_blob
             FROM turns t JOIN contexts c ON c.id = t.context_id WHERE t.number = ?1"
        );
        let found = self
            .conn()
            .query_row(&sql, [number], |row| {
                let sandbox: Option<String> = row.get(14)?;
                Ok((
                    summary(row)?,
                    sandbox.and_then(|s| serde_json::from_str(&s).ok()),
                    blob_id(row.get(15)?),
                    blob_id(row.get(16)?),
                ))
            })
            .optional()
            .map_err(|e| self.db_err(e))?;
        let Some((summary, sandbox, source, result)) = found else {
            return Ok(None);
        };
        Ok(Some(TurnDetail {
            summary,
            sandbox,
            source,
            result,
            steps: self.steps(number)?,
            artifact_list: self.artifacts_of(number)?,
        }))
    }

    /// The steps of turn `number`, with their outputs.
    pub fn steps(&self, number: i64) -> Result<Vec<StepRow>, StoreError> {
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT number, title, language, status, exit_code, signal, duration_ms, message,
                    stdout_bytes, stderr_bytes, log_blob FROM steps WHERE turn = ?1 ORDER BY number",
            )
            .map_err(|e| self.db_err(e))?;
        let mut steps: Vec<StepRow> = stmt
            .query_map([number], |r| {
                Ok(StepRow {
                    number: r.get(0)?,
                    title: r.get(1)?,
                    language: r.get(2)?,
                    status: r.get(3)?,
                    exit_code: r.get(4)?,
                    signal: r.get(5)?,
                    duration_ms: r.get::<_, Option<i64>>(6)?.map(|d| d as u64),
                    message: r.get(7)?,
                    stdout_bytes: r.get::<_, i64>(8)? as u64,
                    stderr_bytes: r.get::<_, i64>(9)? as u64,
                    log: blob_id(r.get(10)?),
                    outputs: BTreeMap::new(),
                })
            })
            .map_err(|e| self.db_err(e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.db_err(e))?;
        let mut stmt = self
            .conn()
            .prepare("SELECT step, key, value FROM outputs WHERE turn = ?1")
            .map_err(|e| self.db_err(e))?;
        let outputs = stmt
            .query_map([number], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get(2)?))
            })
            .map_err(|e| self.db_err(e))?;
        for output in outputs {
            let (step, key, value) = output.map_err(|e| self.db_err(e))?;
            if let Some(s) = steps.iter_mut().find(|s| s.number == step) {
                s.outputs.insert(key, value);
            }
        }
        Ok(steps)
    }

    /// The artifacts turn `number` saved.
    pub fn artifacts_of(&self, number: i64) -> Result<Vec<ArtifactRow>, StoreError> {
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT turn, path, kind, mode, size, mtime_ns, blob, target FROM artifacts
                 WHERE turn = ?1 ORDER BY path",
            )
            .map_err(|e| self.db_err(e))?;
        let rows = stmt
            .query_map([number], artifact)
            .map_err(|e| self.db_err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.db_err(e))
    }

    /// What the next turn of `context` starts with: the latest version of every artifact
    /// saved by the context's passed turns, less those a later passed turn deleted.
    pub fn context_artifacts(&self, context: &str) -> Result<Vec<ArtifactRow>, StoreError> {
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT turn, path, kind, mode, size, mtime_ns, blob, target FROM (
                    SELECT a.*, row_number() OVER (PARTITION BY a.path ORDER BY a.turn DESC) AS n
                    FROM artifacts a JOIN turns t ON t.number = a.turn
                    JOIN contexts c ON c.id = t.context_id
                    WHERE c.name = ?1 AND t.status = 'passed')
                 WHERE n = 1 AND kind != 'deleted' ORDER BY path",
            )
            .map_err(|e| self.db_err(e))?;
        let rows = stmt
            .query_map([context], artifact)
            .map_err(|e| self.db_err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.db_err(e))
    }

    /// The latest value of every output key published by the context's passed turns.
    pub fn context_outputs(&self, context: &str) -> Result<Vec<OutputRow>, StoreError> {
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT turn, step, key, value FROM (
                    SELECT o.*, row_number() OVER (PARTITION BY o.key
                        ORDER BY o.turn DESC, o.step DESC) AS n
                    FROM outputs o JOIN turns t ON t.number = o.turn
                    JOIN contexts c ON c.id = t.context_id
                    WHERE c.name = ?1 AND t.status = 'passed')
                 WHERE n = 1 ORDER BY key",
            )
            .map_err(|e| self.db_err(e))?;
        let rows = stmt
            .query_map([context], |r| {
                Ok(OutputRow {
                    turn: r.get(0)?,
                    step: r.get(1)?,
                    key: r.get(2)?,
                    value: r.get(3)?,
                })
            })
            .map_err(|e| self.db_err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.db_err(e))
    }

    /// Every turn of `context`, whole, in order: four queries whatever the number of turns.
    pub fn chain(&self, context: &str) -> Result<Vec<TurnDetail>, StoreError> {
        let e = |e| self.db_err(e);
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS}, t.sandbox, t.source_blob, t.result_blob
             FROM turns t JOIN contexts c ON c.id = t.context_id
             WHERE c.name = ?1 ORDER BY t.number"
        );
        let mut stmt = self.conn().prepare(&sql).map_err(e)?;
        let mut chain: Vec<TurnDetail> = stmt
            .query_map([context], |row| {
                let sandbox: Option<String> = row.get(14)?;
                Ok(TurnDetail {
                    summary: summary(row)?,
                    sandbox: sandbox.and_then(|s| serde_json::from_str(&s).ok()),
                    source: blob_id(row.get(15)?),
                    result: blob_id(row.get(16)?),
                    steps: Vec::new(),
                    artifact_list: Vec::new(),
                })
            })
            .map_err(e)?
            .collect::<Result<_, _>>()
            .map_err(e)?;
        let index: std::collections::HashMap<i64, usize> = chain
            .iter()
            .enumerate()
            .map(|(i, t)| (t.summary.number, i))
            .collect();
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT s.turn, s.number, s.title, s.language, s.status, s.exit_code, s.signal,
                    s.duration_ms, s.message, s.stdout_bytes, s.stderr_bytes, s.log_blob
                 FROM steps s JOIN turns t ON t.number = s.turn
                 JOIN contexts c ON c.id = t.context_id
                 WHERE c.name = ?1 ORDER BY s.turn, s.number",
            )
            .map_err(e)?;
        let steps = stmt
            .query_map([context], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    StepRow {
                        number: r.get(1)?,
                        title: r.get(2)?,
                        language: r.get(3)?,
                        status: r.get(4)?,
                        exit_code: r.get(5)?,
                        signal: r.get(6)?,
                        duration_ms: r.get::<_, Option<i64>>(7)?.map(|d| d as u64),
                        message: r.get(8)?,
                        stdout_bytes: r.get::<_, i64>(9)? as u64,
                        stderr_bytes: r.get::<_, i64>(10)? as u64,
                        log: blob_id(r.get(11)?),
                        outputs: BTreeMap::new(),
                    },
                ))
            })
            .map_err(e)?;
        for step in steps {
            let (turn, step) = step.map_err(e)?;
            if let Some(&i) = index.get(&turn) {
                chain[i].steps.push(step);
            }
        }
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT o.turn, o.step, o.key, o.value FROM outputs o
                 JOIN turns t ON t.number = o.turn JOIN contexts c ON c.id = t.context_id
                 WHERE c.name = ?1",
            )
            .map_err(e)?;
        let outputs = stmt
            .query_map([context], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(e)?;
        for output in outputs {
            let (turn, step, key, value) = output.map_err(e)?;
            let Some(&i) = index.get(&turn) else { continue };
            if let Some(s) = chain[i].steps.iter_mut().find(|s| s.number == step) {
                s.outputs.insert(key, value);
            }
        }
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT a.turn, a.path, a.kind, a.mode, a.size, a.mtime_ns, a.blob, a.target
                 FROM artifacts a JOIN turns t ON t.number = a.turn
                 JOIN contexts c ON c.id = t.context_id
                 WHERE c.name = ?1 ORDER BY a.turn, a.path",
            )
            .map_err(e)?;
        let artifacts = stmt.query_map([context], artifact).map_err(e)?;
        for a in artifacts {
            let a = a.map_err(e)?;
            if let Some(&i) = index.get(&a.turn) {
                chain[i].artifact_list.push(a);
            }
        }
        Ok(chain)
    }

    /// Every context.
    pub fn contexts(&self) -> Result<Vec<ContextSummary>, StoreError> {
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT c.name, count(t.number), max(t.number), max(t.started_at)
                 FROM contexts c LEFT JOIN turns t ON t.context_id = c.id
                 GROUP BY c.id ORDER BY c.name",
            )
            .map_err(|e| self.db_err(e))?;
        let rows: Vec<(String, i64, Option<i64>, Option<f64>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(|e| self.db_err(e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.db_err(e))?;
        let mut contexts = Vec::with_capacity(rows.len());
        for (name, turns, last_turn, last_started_at) in rows {
            let artifacts = self.context_artifacts(&name)?;
            contexts.push(ContextSummary {
                turns: turns as u64,
                last_turn,
                last_started_at,
                artifacts: artifacts.len() as u64,
                artifact_bytes: artifacts.iter().map(|a| a.size).sum(),
                name,
            });
        }
        Ok(contexts)
    }
}

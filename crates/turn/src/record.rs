//! The record of a turn: what ran, how it ended, what it printed. Printed by `--json` and kept
//! with the turn's logs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use upstream_doc::Language;

/// How a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnStatus {
    /// Every step passed (or failed with `continue_on_error`).
    Passed,
    /// A step failed, timed out or ran out of memory.
    Failed,
    /// The turn was stopped by Ctrl-C.
    Interrupted,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Passed,
    Failed,
    TimedOut,
    OutOfMemory,
    /// The step's command could not be started.
    Error,
    NotRun,
    /// Not run again by `--resume`: the turn it resumed ran it, and its result stands.
    Kept,
}

impl StepStatus {
    pub fn failed(self) -> bool {
        matches!(
            self,
            StepStatus::Failed | StepStatus::TimedOut | StepStatus::OutOfMemory | StepStatus::Error
        )
    }
}

/// One step's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub number: usize,
    pub title: String,
    pub language: Language,
    pub status: StepStatus,
    /// The exit code, when the process exited.
    pub exit_code: Option<i32>,
    /// The signal that killed the process, when one did.
    pub signal: Option<i32>,
    pub duration_ms: Option<u64>,
    /// Standard output (head and tail when it was long), secrets redacted.
    pub stdout: String,
    pub stderr: String,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Values published through `$UPSTREAM_OUTPUT`.
    pub outputs: BTreeMap<String, String>,
    /// The blob holding the step's whole output (stdout and stderr as they arrived); `None`
    /// when it printed nothing.
    pub log: Option<String>,
    /// Why the step could not run, or what limit stopped it.
    pub message: Option<String>,
}

/// The sandbox a turn ran in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub backend: String,
    pub image: String,
    pub setup_ms: f64,
    /// Limits asked for that the host could not enforce.
    pub unenforced: Vec<String>,
}

/// A whole turn's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnRecord {
    pub id: String,
    /// Its number in the store.
    pub number: i64,
    pub context: String,
    pub document: PathBuf,
    pub status: TurnStatus,
    /// Seconds since the Unix epoch when the turn started.
    pub started_at: f64,
    pub duration_ms: u64,
    pub sandbox: Option<SandboxRecord>,
    pub steps: Vec<StepRecord>,
    /// The turn this one resumed.
    pub resumed_from: Option<i64>,
    /// The store the turn is recorded in.
    pub store: PathBuf,
}

impl TurnRecord {
    pub fn passed_steps(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.status == StepStatus::Passed)
            .count()
    }
}

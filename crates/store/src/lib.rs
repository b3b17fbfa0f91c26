//! The context store: everything turns produced, kept so the next turn can start where the
//! last one ended.
//!
//! A store is a directory, `.upstream/` beside the documents (found by walking up from a
//! document, as git finds `.git`):
//!
//! ```text
//! .upstream/store.db      SQLite (WAL): contexts, turns, steps, outputs, artifacts
//! .upstream/blobs/ab/cd…  content named by its BLAKE3 hash
//! .upstream/tmp/          blobs being written
//! .upstream/lock          held shared by writers, exclusively by `gc`
//! .upstream/locks/…       one per context, held by the turn running in it ([`lock`])
//! ```
//!
//! Everything in a store is its owner's alone: 0700 directories and 0600 files, whatever
//! the umask ([`make_private_dir`] does the same for the daemon's state directory).
//!
//! Content is made durable before any record points to it ([`blob`]), so whatever point a
//! process is killed at, no record names a missing blob; a turn whose process died shows as
//! interrupted.

pub mod blob;
pub mod keys;
pub mod lock;
pub mod log;
mod private;
mod query;
pub mod schema;

pub use blob::{
    BlobError, BlobId, BlobReader, BlobWriter, Blobs, CopyBuffer, OpenBlob, PendingBlob,
};
pub use keys::{ApiKey, KeyOwner, NewKey};
pub use lock::{ContextLock, LockHolder};
pub use private::{DIR_MODE, FILE_MODE, make_private_dir};
pub use query::{
    ArtifactKind, ArtifactRow, ContextSummary, GcReport, OutputRow, StepRow, TurnDetail, TurnState,
    TurnSummary,
};

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// The name of a store directory.
pub const STORE_DIR: &str = ".upstream";
/// The context of a document that names none.
pub const DEFAULT_CONTEXT: &str = "default";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use the store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the store database {path}: {source}")]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: {source}")]
    Schema {
        path: PathBuf,
        source: schema::MigrationError,
    },
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("no turn {0} in this store")]
    NoTurn(String),
    #[error("`{selector}` is the start of more than one turn's id: {candidates}")]
    AmbiguousTurn {
        selector: String,
        candidates: String,
    },
    #[error("no context `{0}` in this store")]
    NoContext(String),
    #[error("turns are running on this store; try again when they have finished")]
    Busy,
    #[error("a turn of context `{0}` is running; try again when it has finished")]
    ContextBusy(String),
}

/// Where the store for a document is: `explicit` (`--store`), else `$UPSTREAM_STORE`, else the
/// nearest `.upstream/` above the document's directory, else a new one beside the document.
pub fn locate(document_dir: &Path, explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("UPSTREAM_STORE") {
        return PathBuf::from(dir);
    }
    let start = std::path::absolute(document_dir).unwrap_or_else(|_| document_dir.to_path_buf());
    let mut dir = Some(start.as_path());
    while let Some(d) = dir {
        let candidate = d.join(STORE_DIR);
        if candidate.is_dir() {
            return candidate;
        }
        dir = d.parent();
    }
    start.join(STORE_DIR)
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// An open store.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    db_path: PathBuf,
    conn: Connection,
    blobs: Blobs,
    /// The shared lock of a store being written to, once taken.
    writing: Option<fs::File>,
}

impl Store {
    /// Opens the store at `dir`, creating it if it does not exist, and brings its schema up
    /// to date.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_at_version(dir, schema::VERSION)
    }

    /// Opens the store with its schema at `version` (or newer, if it already is): for tests
    /// of migrations.
    #[doc(hidden)]
    pub fn open_at_version(dir: &Path, version: i64) -> Result<Store, StoreError> {
        let io_err = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let fresh = !dir.join("store.db").exists();
        // Private to its owner, whatever the umask; a store left open by an older upstream
        // is closed here.
        private::store_dir(dir).map_err(io_err)?;
        for sub in ["blobs", "tmp"] {
            private::create_dirs(&dir.join(sub)).map_err(io_err)?;
        }
        let db_path = dir.join("store.db");
        if fresh {
            // Made 0600 before SQLite opens it: its -wal and -shm files take its mode.
            match private::create_file(&db_path) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_err(e)),
                _ => {}
            }
            // The store holds logs that may contain anything a step printed: not for git.
            if let Ok(mut ignore) = private::create_file(&dir.join(".gitignore")) {
                let _ = io::Write::write_all(&mut ignore, b"*\n");
            }
        }
        let db_err = |source| StoreError::Db {
            path: db_path.clone(),
            source,
        };
        let mut conn = Connection::open(&db_path).map_err(db_err)?;
        // Concurrent runs wait for one another's short write transactions.
        conn.busy_timeout(Duration::from_secs(60)).map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        // In WAL mode NORMAL keeps the database consistent through any crash; a power loss
        // can lose the last commits, never make a record point to a missing blob (blobs are
        // flushed before their records are written).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(db_err)?;
        schema::migrate_to(&mut conn, version).map_err(|source| StoreError::Schema {
            path: db_path.clone(),
            source,
        })?;
        let blobs = Blobs::at(dir.join("blobs"), dir.join("tmp")).map_err(io_err)?;
        Ok(Store {
            dir: dir.to_path_buf(),
            db_path,
            conn,
            blobs,
            writing: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// The schema version of the open store.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| self.db_err(e))
    }

    fn db_err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Db {
            path: self.db_path.clone(),
            source,
        }
    }

    fn io_err(&self, source: io::Error) -> StoreError {
        StoreError::Io {
            path: self.dir.clone(),
            source,
        }
    }

    /// Declares this process a writer for as long as the store is open: `gc` waits for
    /// writers, so it never removes a blob a turn is about to record.
    fn hold_for_writing(&mut self) -> Result<(), StoreError> {
        if self.writing.is_some() {
            return Ok(());
        }
        let file = private::open_file(&self.dir.join("lock")).map_err(|e| self.io_err(e))?;
        // Blocks only while a `gc` runs, which is short.
        flock(&file, libc::LOCK_SH).map_err(|e| self.io_err(e))?;
        self.writing = Some(file);
        Ok(())
    }

    /// Takes the lock of `context`, which a turn holds from loading the context until its
    /// artifacts are recorded: while another turn holds it, calls `waiting` with whom and
    /// waits, asking `stop` every few milliseconds whether to give up (`None`).
    pub fn lock_context(
        &self,
        context: &str,
        waiting: &mut dyn FnMut(&LockHolder),
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<ContextLock>, StoreError> {
        match lock::take(&lock::path(&self.dir, context), waiting, stop) {
            Ok(lock::Taken::Held(lock)) => Ok(Some(lock)),
            Ok(lock::Taken::Stopped) => Ok(None),
            Err(e) => Err(self.io_err(e)),
        }
    }

    /// The turn running in `context` now, if one is.
    pub fn context_holder(&self, context: &str) -> Result<Option<LockHolder>, StoreError> {
        lock::holder(&lock::path(&self.dir, context)).map_err(|e| self.io_err(e))
    }

    /// Runs `f` in a write transaction, taken at once (concurrent writers queue for it instead
    /// of failing midway), and commits it.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let db_path = self.db_path.clone();
        let fail = |source| StoreError::Db {
            path: db_path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        let value = f(&tx).map_err(fail)?;
        tx.commit().map_err(fail)?;
        Ok(value)
    }

    /// Starts a turn: records it as running in `context` (created if new) and returns its
    /// number. `source` is the document as it was read.
    pub fn begin_turn(&mut self, turn: &NewTurn<'_>) -> Result<i64, StoreError> {
        self.hold_for_writing()?;
        self.blobs.remove_abandoned_temps();
        let source = self.blobs.put(turn.source).map_err(|e| self.io_err(e))?;
        let owner = owner_token(std::process::id());
        self.write(|tx| {
            mark_dead_turns_interrupted(tx)?;
            tx.execute(
                "INSERT OR IGNORE INTO contexts (name, created_at) VALUES (?1, ?2)",
                params![turn.context, turn.started_at],
            )?;
            let context_id: i64 = tx
                .query_row(
                    "SELECT id FROM contexts WHERE name = ?1",
                    [turn.context],
                    |r| r.get(0),
                )?;
            tx.execute(
                "INSERT INTO turns (id, context_id, document, source_blob, status, owner, started_at,
                    resumed_from)
                 VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6, ?7)",
                params![
                    turn.id,
                    context_id,
                    turn.document,
                    source.as_str(),
                    owner,
                    turn.started_at,
                    turn.resumed_from,
                ],
            )?;
            let number = tx.last_insert_rowid();
            Ok(number)
        })
    }

    /// Records a finished step of a running turn. `log` must be committed already.
    pub fn record_step(&mut self, turn: i64, step: &NewStep) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO steps (turn, number, title, language, status, exit_code,
                    signal, duration_ms, message, stdout_bytes, stderr_bytes, log_blob)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    turn,
                    step.number,
                    step.title,
                    step.language,
                    step.status,
                    step.exit_code,
                    step.signal,
                    step.duration_ms.map(|d| d as i64),
                    step.message,
                    step.stdout_bytes as i64,
                    step.stderr_bytes as i64,
                    step.log.as_ref().map(BlobId::as_str),
                ],
            )?;
            tx.execute(
                "DELETE FROM outputs WHERE turn = ?1 AND step = ?2",
                params![turn, step.number],
            )?;
            for (key, value) in &step.outputs {
                tx.execute(
                    "INSERT INTO outputs (turn, step, key, value) VALUES (?1, ?2, ?3, ?4)",
                    params![turn, step.number, key, value],
                )?;
            }
            tx.execute(
                "UPDATE turns SET
                    steps = (SELECT count(*) FROM steps WHERE turn = ?1),
                    steps_passed = (SELECT count(*) FROM steps WHERE turn = ?1 AND status = 'passed')
                 WHERE number = ?1",
                [turn],
            )?;
            Ok(())
        })
    }

    /// Ends a turn: its status, the document with its results, and its artifacts, in one
    /// transaction. Every blob named must be committed already.
    pub fn finish_turn(&mut self, turn: i64, finish: &FinishTurn) -> Result<(), StoreError> {
        self.write(|tx| {
            {
                let mut insert = tx
                    .prepare(
                        "INSERT OR REPLACE INTO artifacts (turn, path, kind, mode, size, mtime_ns,
                            blob, target) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )?;
                for a in &finish.artifacts {
                    insert
                        .execute(params![
                            turn,
                            a.path,
                            a.kind.as_str(),
                            a.mode,
                            a.size as i64,
                            a.mtime_ns,
                            a.blob.as_ref().map(BlobId::as_str),
                            a.target,
                        ])?;
                }
            }
            tx.execute(
                "UPDATE turns SET
                    artifacts = (SELECT count(*) FROM artifacts WHERE turn = ?1 AND kind != 'deleted'),
                    artifact_bytes = (SELECT coalesce(sum(size), 0) FROM artifacts
                        WHERE turn = ?1 AND kind = 'file')
                 WHERE number = ?1",
                [turn],
            )?;
            tx.execute(
                "UPDATE turns SET status = ?2, owner = NULL, finished_at = ?3, duration_ms = ?4,
                    sandbox = ?5, result_blob = ?6, kept = ?7, resume_step = ?8 WHERE number = ?1",
                params![
                    turn,
                    finish.status.as_str(),
                    finish.finished_at,
                    finish.duration_ms as i64,
                    finish.sandbox.as_ref().map(|v| v.to_string()),
                    finish.result.as_ref().map(BlobId::as_str),
                    finish.kept,
                    finish.resume_step,
                ],
            )?;
            Ok(())
        })
    }

    /// The turn a `--resume` of `document` in `context` would resume: the document's latest
    /// turn there, if it did not pass and kept its workspace.
    pub fn resumable(
        &self,
        document: &str,
        context: &str,
    ) -> Result<Option<Resumable>, StoreError> {
        let found = self
            .conn
            .query_row(
                "SELECT t.number, t.status, t.kept, t.resume_step, t.source_blob
                 FROM turns t JOIN contexts c ON c.id = t.context_id
                 WHERE t.document = ?1 AND c.name = ?2 AND t.status != 'running'
                 ORDER BY t.number DESC LIMIT 1",
                params![document, context],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                        r.get::<_, Option<String>>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.db_err(e))?;
        let Some((number, status, kept, step, source)) = found else {
            return Ok(None);
        };
        let (Some(kept), Some(step), Some(source)) =
            (kept, step, source.as_deref().and_then(BlobId::parse))
        else {
            return Ok(Some(Resumable {
                number,
                status,
                kept: None,
                step: 0,
                source: None,
            }));
        };
        Ok(Some(Resumable {
            number,
            status,
            kept: Some(kept),
            step,
            source: Some(source),
        }))
    }

    /// What the turns of the store at `dir` kept for resuming (each a backend's name for it),
    /// read without opening the store as [`Store::open`] does: nothing is created, made
    /// private or migrated, and a store busy for more than two seconds is an error.
    pub fn kept_workspaces_at(dir: &Path) -> Result<Vec<String>, StoreError> {
        let db_path = dir.join("store.db");
        let db_err = |source| StoreError::Db {
            path: db_path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &db_path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err)?;
        conn.busy_timeout(Duration::from_secs(2)).map_err(db_err)?;
        let mut stmt = conn
            .prepare("SELECT kept FROM turns WHERE kept IS NOT NULL")
            .map_err(db_err)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    /// Takes the kept workspaces of `document`'s turns in `context` other than `turn` off
    /// the records (a newer turn supersedes them) and returns their names, to remove.
    pub fn take_superseded(
        &mut self,
        document: &str,
        context: &str,
        turn: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.write(|tx| {
            let kept: Vec<(i64, String)> = {
                let mut stmt = tx.prepare(
                    "SELECT t.number, t.kept FROM turns t JOIN contexts c ON c.id = t.context_id
                         WHERE t.document = ?1 AND c.name = ?2 AND t.number != ?3
                            AND t.kept IS NOT NULL",
                )?;
                stmt.query_map(params![document, context, turn], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<Result<_, _>>()?
            };
            for (number, _) in &kept {
                tx.execute("UPDATE turns SET kept = NULL WHERE number = ?1", [number])?;
            }
            Ok(kept.into_iter().map(|(_, k)| k).collect())
        })
    }

    /// Removes a context and its turns' records. Their blobs stay until [`Store::gc`].
    /// Returns how many turns went, and the workspaces they kept for resuming, for the
    /// caller to remove.
    pub fn remove_context(&mut self, name: &str) -> Result<(usize, Vec<String>), StoreError> {
        // Not under a running turn, and no turn starts in the context while it goes.
        let Some(_lock) = self.lock_context(name, &mut |_| {}, &|| true)? else {
            return Err(StoreError::ContextBusy(name.to_string()));
        };
        let removed = self.write(|tx| {
            let id: Option<i64> = tx
                .query_row("SELECT id FROM contexts WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(id) = id else {
                return Ok(None);
            };
            let kept: Vec<String> = tx
                .prepare("SELECT kept FROM turns WHERE context_id = ?1 AND kept IS NOT NULL")?
                .query_map([id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let turns = tx.execute("DELETE FROM turns WHERE context_id = ?1", [id])?;
            tx.execute("DELETE FROM contexts WHERE id = ?1", [id])?;
            Ok(Some((turns, kept)))
        })?;
        removed.ok_or_else(|| StoreError::NoContext(name.to_string()))
    }

    /// Removes every blob no record refers to (and temporary files of dead writers). Waits
    /// for no one: with a turn running it refuses, because that turn may be about to record
    /// a blob it has just written.
    pub fn gc(&mut self) -> Result<GcReport, StoreError> {
        let file = private::open_file(&self.dir.join("lock")).map_err(|e| self.io_err(e))?;
        if flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            return Err(StoreError::Busy);
        }
        self.blobs.remove_abandoned_temps();
        let referenced = self.referenced_blobs()?;
        let mut report = GcReport::default();
        for (id, size) in self.blobs.list().map_err(|e| self.io_err(e))? {
            if referenced.contains(id.as_str()) {
                report.kept += 1;
                report.kept_bytes += size;
            } else {
                self.blobs.remove(&id).map_err(|e| self.io_err(e))?;
                report.removed += 1;
                report.removed_bytes += size;
            }
        }
        drop(file);
        Ok(report)
    }

    fn referenced_blobs(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT source_blob FROM turns WHERE source_blob IS NOT NULL
                 UNION SELECT result_blob FROM turns WHERE result_blob IS NOT NULL
                 UNION SELECT log_blob FROM steps WHERE log_blob IS NOT NULL
                 UNION SELECT blob FROM artifacts WHERE blob IS NOT NULL",
            )
            .map_err(|e| self.db_err(e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.db_err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.db_err(e))
    }

    /// Every record that points to a blob the store does not hold: should always be empty.
    pub fn dangling_blobs(&self) -> Result<Vec<String>, StoreError> {
        let mut missing: Vec<String> = self
            .referenced_blobs()?
            .into_iter()
            .filter(|id| BlobId::parse(id).is_none_or(|id| !self.blobs.contains(&id)))
            .collect();
        missing.sort();
        Ok(missing)
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }
}

/// A turn about to start.
#[derive(Debug)]
pub struct NewTurn<'a> {
    /// Its unique id (a UUID).
    pub id: &'a str,
    pub context: &'a str,
    /// The document's path, as shown to people.
    pub document: &'a str,
    /// The document's bytes as read.
    pub source: &'a [u8],
    /// Seconds since the Unix epoch.
    pub started_at: f64,
    /// The turn this one resumes.
    pub resumed_from: Option<i64>,
}

/// A turn that a `--resume` would start from.
#[derive(Debug, Clone, PartialEq)]
pub struct Resumable {
    pub number: i64,
    pub status: String,
    /// The backend's name for what it kept; `None` when nothing was (it passed, or keeping
    /// failed).
    pub kept: Option<String>,
    /// The step to resume at.
    pub step: i64,
    /// The document as it ran.
    pub source: Option<BlobId>,
}

/// A finished step.
#[derive(Debug, Clone, Default)]
pub struct NewStep {
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
    /// Its stdout and stderr ([`log`]); `None` when it printed nothing.
    pub log: Option<BlobId>,
    pub outputs: BTreeMap<String, String>,
}

/// One saved artifact (or the record that a restored one was deleted).
#[derive(Debug, Clone, PartialEq)]
pub struct NewArtifact {
    /// Relative to the workspace, `/`-separated.
    pub path: String,
    pub kind: ArtifactKind,
    pub mode: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub blob: Option<BlobId>,
    /// A symlink's target.
    pub target: Option<String>,
}

/// How a turn ends.
#[derive(Debug)]
pub struct FinishTurn {
    pub status: TurnState,
    pub finished_at: f64,
    pub duration_ms: u64,
    pub sandbox: Option<serde_json::Value>,
    /// The document with this turn's results.
    pub result: Option<BlobId>,
    pub artifacts: Vec<NewArtifact>,
    /// Where its workspace was kept for resuming, and the step to resume at.
    pub kept: Option<String>,
    pub resume_step: Option<i64>,
}

fn flock(file: &fs::File, op: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor this function borrows; no memory is involved.
    let ret = unsafe { libc::flock(file.as_fd().as_raw_fd(), op) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A token naming process `pid` for as long as it lives: its pid and start time, so a pid
/// reused by another process does not pass for it.
pub fn owner_token(pid: u32) -> String {
    format!("{pid}:{}", start_time(pid).unwrap_or(0))
}

/// Whether the process an [`owner_token`] names is still running.
pub fn owner_alive(token: &str) -> bool {
    let Some((pid, start)) = token.split_once(':') else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    start_time(pid) == Some(start)
}

/// Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Turns left `running` by processes that died are marked interrupted.
fn mark_dead_turns_interrupted(conn: &Connection) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("SELECT number, owner FROM turns WHERE status = 'running'")?;
    let dead: Vec<i64> = stmt
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?))
        })?
        .filter_map(Result::ok)
        .filter(|(_, owner)| !owner.as_deref().is_some_and(owner_alive))
        .map(|(n, _)| n)
        .collect();
    for number in dead {
        conn.execute(
            "UPDATE turns SET status = 'interrupted', owner = NULL WHERE number = ?1",
            [number],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_store_above_is_found() {
        let tmp = tempfile::tempdir().unwrap();
        let nested = tmp.path().join("a/b");
        fs::create_dir_all(&nested).unwrap();
        assert_eq!(locate(&nested, None), nested.join(STORE_DIR));
        fs::create_dir(tmp.path().join(STORE_DIR)).unwrap();
        assert_eq!(locate(&nested, None), tmp.path().join(STORE_DIR));
        let explicit = tmp.path().join("elsewhere");
        assert_eq!(locate(&nested, Some(&explicit)), explicit);
    }

    #[test]
    fn owner_tokens_tell_live_processes_from_dead_ones() {
        assert!(owner_alive(&owner_token(std::process::id())));
        assert!(!owner_alive("999999999:1"));
        assert!(!owner_alive(&format!("{}:1", std::process::id())));
        assert!(!owner_alive("garbage"));
    }
}

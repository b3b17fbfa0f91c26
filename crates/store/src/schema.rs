//! The store's SQLite schema, as numbered migrations. A store records the number of the last
//! migration it ran in `PRAGMA user_version`; opening it runs the ones after that, each in a
//! transaction of its own, so an older store is brought up to date and a crash mid-way leaves
//! it at a version it can be opened at.

use rusqlite::{Connection, TransactionBehavior};

/// Each migration, in order; migration `i` takes the store to version `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: contexts, turns, steps, outputs, artifacts.
    r#"
    CREATE TABLE contexts (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        created_at  REAL NOT NULL
    );
    CREATE TABLE turns (
        number      INTEGER PRIMARY KEY AUTOINCREMENT,
        id          TEXT NOT NULL UNIQUE,
        context_id  INTEGER NOT NULL REFERENCES contexts(id) ON DELETE CASCADE,
        document    TEXT NOT NULL,
        source_blob TEXT,
        result_blob TEXT,
        status      TEXT NOT NULL,
        owner       TEXT,
        started_at  REAL NOT NULL,
        finished_at REAL,
        duration_ms INTEGER,
        sandbox     TEXT
    );
    CREATE INDEX turns_by_context ON turns(context_id, number);
    CREATE TABLE steps (
        turn         INTEGER NOT NULL REFERENCES turns(number) ON DELETE CASCADE,
        number       INTEGER NOT NULL,
        title        TEXT NOT NULL,
        language     TEXT NOT NULL,
        status       TEXT NOT NULL,
        exit_code    INTEGER,
        signal       INTEGER,
        duration_ms  INTEGER,
        message      TEXT,
        stdout_bytes INTEGER NOT NULL,
        stderr_bytes INTEGER NOT NULL,
        log_blob     TEXT,
        PRIMARY KEY (turn, number)
    );
    CREATE TABLE outputs (
        turn  INTEGER NOT NULL,
        step  INTEGER NOT NULL,
        key   TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (turn, step, key),
        FOREIGN KEY (turn, step) REFERENCES steps(turn, number) ON DELETE CASCADE
    );
    CREATE TABLE artifacts (
        turn     INTEGER NOT NULL REFERENCES turns(number) ON DELETE CASCADE,
        path     TEXT NOT NULL,
        kind     TEXT NOT NULL,
        mode     INTEGER NOT NULL,
        size     INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        blob     TEXT,
        target   TEXT,
        PRIMARY KEY (turn, path)
    );
    CREATE INDEX artifacts_by_path ON artifacts(path, turn);
    "#,
    // 2: each turn's step and artifact counts kept on its row, so listing turns reads one
    // table; existing turns are counted.
    r#"
    ALTER TABLE turns ADD COLUMN steps INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN steps_passed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN artifacts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE turns ADD COLUMN artifact_bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE turns SET
        steps = (SELECT count(*) FROM steps s WHERE s.turn = turns.number),
        steps_passed = (SELECT count(*) FROM steps s
            WHERE s.turn = turns.number AND s.status = 'passed'),
        artifacts = (SELECT count(*) FROM artifacts a
            WHERE a.turn = turns.number AND a.kind != 'deleted'),
        artifact_bytes = (SELECT coalesce(sum(a.size), 0) FROM artifacts a
            WHERE a.turn = turns.number AND a.kind = 'file');
    "#,
    // 3: resuming: where a turn that did not pass kept its workspace, the step to resume
    // at, and which turn a turn resumed.
    r#"
    ALTER TABLE turns ADD COLUMN kept TEXT;
    ALTER TABLE turns ADD COLUMN resume_step INTEGER;
    ALTER TABLE turns ADD COLUMN resumed_from INTEGER;
    CREATE INDEX turns_by_document ON turns(document, context_id, number);
    "#,
    // 4: API keys of `upstream serve`: only a hash of each is kept.
    r#"
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        tenant TEXT NOT NULL,
        prefix TEXT NOT NULL,
        hash BLOB NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    "#,
];

/// The schema version this build writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// Errors bringing the schema up to date.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(
        "the store is at schema version {found}, newer than this upstream knows ({known}): use a newer upstream"
    )]
    TooNew { found: i64, known: i64 },
    #[error("migrating the store to schema version {version}: {source}")]
    Failed {
        version: i64,
        source: rusqlite::Error,
    },
}

/// Runs the migrations `conn` has not had, up to `target`.
pub fn migrate_to(conn: &mut Connection, target: i64) -> Result<(), MigrationError> {
    let version_of = |conn: &Connection| -> rusqlite::Result<i64> {
        conn.pragma_query_value(None, "user_version", |row| row.get(0))
    };
    let found = version_of(conn).map_err(|source| MigrationError::Failed { version: 0, source })?;
    if found > VERSION {
        return Err(MigrationError::TooNew {
            found,
            known: VERSION,
        });
    }
    for version in found + 1..=target {
        let failed = |source| MigrationError::Failed { version, source };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(failed)?;
        // Another process may have migrated while this one waited for the lock.
        if version_of(&tx).map_err(failed)? >= version {
            continue;
        }
        tx.execute_batch(MIGRATIONS[version as usize - 1])
            .map_err(failed)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(failed)?;
        tx.commit().map_err(failed)?;
    }
    Ok(())
}

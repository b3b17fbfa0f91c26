//! The daemon's log: what went wrong inside it, with the details its operator needs (host
//! paths, errors of the kernel and the store). API clients never get those details; their
//! answer says something failed and gives a reference to the line here.
//!
//! Process-wide, as the metrics are: one daemon per process. The binary decides where the
//! lines go ([`Log`] in [`crate::Config`]); until a daemon starts they go nowhere.

use std::sync::{Arc, RwLock};

/// Where the daemon's log lines go.
#[derive(Clone)]
pub struct Log(pub Arc<dyn Fn(&str) + Send + Sync>);

impl Log {
    pub fn new(write: impl Fn(&str) + Send + Sync + 'static) -> Log {
        Log(Arc::new(write))
    }

    /// A log that keeps nothing.
    pub fn discard() -> Log {
        Log::new(|_| {})
    }
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Log")
    }
}

static SINK: RwLock<Option<Log>> = RwLock::new(None);

/// Sends the log's lines to `log` from now on.
pub fn set(log: Log) {
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = Some(log);
}

/// Logs an error.
pub fn error(line: &str) {
    let sink = SINK.read().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(Log(write)) = sink {
        write(&format!("error: {line}"));
    }
}

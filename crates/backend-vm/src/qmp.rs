//! QEMU's monitor (QMP), for what a snapshot needs: pausing a machine and writing its state
//! to a file, and loading that state into a machine started to receive it.
//!
//! QEMU connects to a socket this side listened on before it started, as for the ports; a
//! machine under QMP is one whose RAM is a file ([`crate::qemu::Memory`]).

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use qapi::qmp;

/// How long writing or loading a machine's state may take: its RAM is not in it (that is
/// the file's), so it is devices only, a few megabytes.
const MIGRATE_WITHIN: Duration = Duration::from_secs(60);

/// A connection to one QEMU's monitor.
pub struct Monitor {
    qmp: qapi::Qmp<qapi::Stream<io::BufReader<UnixStream>, UnixStream>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Monitor")
    }
}

/// A monitor command's failure, in words.
fn failed(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("QEMU's {what} failed: {e}"))
}

impl Monitor {
    /// Greets the monitor on `stream`, as QMP asks before any command.
    pub fn new(stream: UnixStream) -> io::Result<Monitor> {
        stream.set_read_timeout(Some(MIGRATE_WITHIN))?;
        let reader = io::BufReader::new(stream.try_clone()?);
        let mut qmp = qapi::Qmp::new(qapi::Stream::new(reader, stream));
        qmp.handshake().map_err(|e| failed("monitor greeting", e))?;
        Ok(Monitor { qmp })
    }

    fn execute<C: qapi::Command>(&mut self, what: &str, command: &C) -> io::Result<C::Ok> {
        self.qmp.execute(command).map_err(|e| failed(what, e))
    }

    /// Migrates RAM held in shared files by reference, not by content.
    fn ignore_shared(&mut self) -> io::Result<()> {
        self.execute(
            "migrate-set-capabilities",
            &qmp::migrate_set_capabilities {
                capabilities: vec![qmp::MigrationCapabilityStatus {
                    capability: qmp::MigrationCapability::x_ignore_shared,
                    state: true,
                }],
            },
        )?;
        Ok(())
    }

    /// Pauses the machine (its disks drained and flushed) and writes its state to `state`.
    pub fn save(&mut self, state: &Path) -> io::Result<()> {
        self.execute("stop", &qmp::stop {})?;
        self.ignore_shared()?;
        self.execute(
            "migrate",
            &qmp::migrate {
                uri: Some(format!("file:{}", state.display())),
                channels: None,
                detach: None,
                resume: None,
            },
        )?;
        self.until_migrated("saving the machine's state")
    }

    /// Loads the state of a machine saved by [`Monitor::save`] into this one (started with
    /// `-incoming defer`), and runs it.
    pub fn load(&mut self, state: &Path) -> io::Result<()> {
        self.ignore_shared()?;
        self.execute(
            "migrate-incoming",
            &qmp::migrate_incoming {
                uri: Some(format!("file:{}", state.display())),
                channels: None,
                exit_on_error: None,
            },
        )?;
        self.until_migrated("loading the machine's state")?;
        self.execute("cont", &qmp::cont {})?;
        Ok(())
    }

    /// Runs a paused machine on.
    pub fn resume(&mut self) -> io::Result<()> {
        self.execute("cont", &qmp::cont {})?;
        Ok(())
    }

    /// Waits for the migration under way to end.
    fn until_migrated(&mut self, what: &str) -> io::Result<()> {
        let until = Instant::now() + MIGRATE_WITHIN;
        loop {
            let info = self.execute("query-migrate", &qmp::query_migrate {})?;
            match info.status {
                Some(qmp::MigrationStatus::completed) => return Ok(()),
                Some(qmp::MigrationStatus::failed | qmp::MigrationStatus::cancelled) => {
                    let why = info.error_desc.unwrap_or_else(|| "no reason given".into());
                    return Err(io::Error::other(format!("{what} failed: {why}")));
                }
                _ if Instant::now() >= until => {
                    return Err(io::Error::other(format!(
                        "{what} took more than {} s",
                        MIGRATE_WITHIN.as_secs()
                    )));
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
}

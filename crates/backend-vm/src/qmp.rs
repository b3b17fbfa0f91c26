//! QEMU's monitor (QMP): for a snapshot, pausing a machine and writing its state to a file,
//! and loading that state into a machine started to receive it; and adding a sessions' port
//! to a running machine.
//!
//! QEMU connects to a socket this side listened on before it started, as for the ports.

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

    /// Adds `port` to the running machine: a chardev connecting to its socket as a client
    /// that connects again `reconnect_ms` after the socket's end is closed, then the port on
    /// its virtio-serial device.
    pub fn add_port(&mut self, port: &crate::qemu::Port, reconnect_ms: u32) -> io::Result<()> {
        let socket = port
            .socket
            .to_str()
            .ok_or_else(|| io::Error::other(format!("{} is not UTF-8", port.socket.display())))?;
        self.execute(
            "chardev-add",
            &ChardevAdd {
                id: port.chardev.clone(),
                backend: serde_json::json!({
                    "type": "socket",
                    "data": {
                        "addr": {"type": "unix", "data": {"path": socket}},
                        "server": false,
                        "reconnect-ms": reconnect_ms,
                    },
                }),
            },
        )?;
        self.execute(
            "device_add",
            &qmp::device_add::new(
                "virtserialport",
                None,
                Some(port.bus.to_string()),
                [
                    ("nr".to_string(), serde_json::json!(port.nr)),
                    ("chardev".to_string(), serde_json::json!(port.chardev)),
                    ("name".to_string(), serde_json::json!(port.name)),
                ],
            ),
        )?;
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

/// QMP's `chardev-add` with a backend given as JSON: the schema this side is built with
/// knows a socket's `reconnect` in seconds only, and a session's port must connect again
/// within milliseconds of the last session's end (`reconnect-ms`, QEMU 9.2 and later).
#[derive(Debug, serde::Serialize)]
struct ChardevAdd {
    id: String,
    backend: serde_json::Value,
}

impl qapi::Command for ChardevAdd {
    type Ok = serde_json::Value;
    const NAME: &'static str = "chardev-add";
    const ALLOW_OOB: bool = false;
}

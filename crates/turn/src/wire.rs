//! A turn's progress as data: what `upstream serve` streams while a turn runs (one JSON object
//! per line), and what a client replays into its own [`Observer`] to show the same progress
//! as a local run.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use upstream_doc::Document;
use upstream_sandbox::{SandboxInfo, Stream};

use crate::{ContextLoaded, ContextSaved, Event, Observer, StepRecord};

/// One [`Event`], owned and serializable. Steps are named by number: the client has the
/// document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TurnEvent {
    SandboxReady {
        backend: String,
        setup_ms: f64,
        unenforced: Vec<String>,
        ids: u32,
    },
    StepStarted {
        number: usize,
    },
    /// Output of the running step, secrets redacted; bytes that are not UTF-8 are replaced.
    Output {
        stream: OutputStream,
        text: String,
    },
    StepFinished {
        record: Box<StepRecord>,
    },
    ContextLoaded {
        context: String,
        artifacts: usize,
        outputs: usize,
        turn: i64,
    },
    ContextSaved {
        context: String,
        artifacts: usize,
        bytes: u64,
        deleted: usize,
        turn: i64,
        /// Whether the next turn gets them (only a passed turn's are); a daemon that does not
        /// say is taken to hand them on.
        #[serde(default = "handed_on")]
        handed_on: bool,
    },
    Resuming {
        turn: i64,
        step: usize,
    },
    /// The image is being pulled (no `layers`) or is ready.
    Image {
        reference: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ready: Option<ImageReady>,
    },
    ImageLayer {
        digest: String,
        size: u64,
        cached: bool,
    },
    ImageDownloaded {
        digest: String,
        bytes: u64,
    },
    ImageUnpacking,
    /// Something sandboxes start from is being made, once (the VM backend's disk of the
    /// host's files): what, in a sentence.
    Building {
        what: String,
    },
    Warning {
        message: String,
    },
    /// Another turn of the context is running; this one waits for it.
    Waiting {
        context: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        turn: Option<i64>,
    },
}

fn handed_on() -> bool {
    true
}

/// Which stream output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A pulled image, as progress shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageReady {
    pub digest: String,
    pub layers: usize,
    /// Bytes this pull downloaded (0: all cached).
    pub downloaded: u64,
}

impl TurnEvent {
    pub fn of(event: &Event<'_>) -> TurnEvent {
        match event {
            Event::SandboxReady(info) => TurnEvent::SandboxReady {
                backend: info.backend.clone(),
                setup_ms: info.setup.as_secs_f64() * 1000.0,
                unenforced: info.unenforced.clone(),
                ids: info.ids,
            },
            Event::StepStarted(step) => TurnEvent::StepStarted {
                number: step.number,
            },
            Event::Output(stream, data) => TurnEvent::Output {
                stream: match stream {
                    Stream::Stdout => OutputStream::Stdout,
                    Stream::Stderr => OutputStream::Stderr,
                },
                text: String::from_utf8_lossy(data).into_owned(),
            },
            Event::StepFinished(_, record) => TurnEvent::StepFinished {
                record: Box::new((*record).clone()),
            },
            Event::ContextLoaded(c) => TurnEvent::ContextLoaded {
                context: c.context.clone(),
                artifacts: c.artifacts,
                outputs: c.outputs,
                turn: c.turn,
            },
            Event::ContextSaved(c) => TurnEvent::ContextSaved {
                context: c.context.clone(),
                artifacts: c.artifacts,
                bytes: c.bytes,
                deleted: c.deleted,
                turn: c.turn,
                handed_on: c.handed_on,
            },
            Event::Resuming { turn, step } => TurnEvent::Resuming {
                turn: *turn,
                step: *step,
            },
            Event::Image { reference, pulled } => TurnEvent::Image {
                reference: reference.to_string(),
                ready: pulled.map(|p| ImageReady {
                    digest: p.digest.clone(),
                    layers: p.layers,
                    downloaded: p.downloaded,
                }),
            },
            Event::ImageLayer {
                digest,
                size,
                cached,
            } => TurnEvent::ImageLayer {
                digest: digest.to_string(),
                size: *size,
                cached: *cached,
            },
            Event::ImageDownloaded { digest, bytes } => TurnEvent::ImageDownloaded {
                digest: digest.to_string(),
                bytes: *bytes,
            },
            Event::ImageUnpacking => TurnEvent::ImageUnpacking,
            Event::Building(what) => TurnEvent::Building {
                what: what.to_string(),
            },
            Event::Warning(message) => TurnEvent::Warning {
                message: message.to_string(),
            },
            // The pid is of the process running the turn, which is no one else's business.
            Event::Waiting { context, turn, .. } => TurnEvent::Waiting {
                context: context.to_string(),
                turn: *turn,
            },
        }
    }

    /// Tells `observer` what this event told, with `document`'s steps for the steps it names
    /// (an event naming a step the document lacks is passed over).
    pub fn replay(&self, document: &Document, observer: &mut dyn Observer) {
        let step = |number: usize| document.steps().iter().find(|s| s.number == number);
        match self {
            TurnEvent::SandboxReady {
                backend,
                setup_ms,
                unenforced,
                ids,
            } => observer.event(Event::SandboxReady(&SandboxInfo {
                backend: backend.clone(),
                setup: Duration::from_secs_f64(setup_ms.max(0.0) / 1000.0),
                unenforced: unenforced.clone(),
                ids: *ids,
            })),
            TurnEvent::StepStarted { number } => {
                if let Some(step) = step(*number) {
                    observer.event(Event::StepStarted(step));
                }
            }
            TurnEvent::Output { stream, text } => {
                let stream = match stream {
                    OutputStream::Stdout => Stream::Stdout,
                    OutputStream::Stderr => Stream::Stderr,
                };
                observer.event(Event::Output(stream, text.as_bytes()));
            }
            TurnEvent::StepFinished { record } => {
                if let Some(step) = step(record.number) {
                    observer.event(Event::StepFinished(step, record));
                }
            }
            TurnEvent::ContextLoaded {
                context,
                artifacts,
                outputs,
                turn,
            } => observer.event(Event::ContextLoaded(&ContextLoaded {
                context: context.clone(),
                artifacts: *artifacts,
                outputs: *outputs,
                turn: *turn,
            })),
            TurnEvent::ContextSaved {
                context,
                artifacts,
                bytes,
                deleted,
                turn,
                handed_on,
            } => observer.event(Event::ContextSaved(&ContextSaved {
                context: context.clone(),
                artifacts: *artifacts,
                bytes: *bytes,
                deleted: *deleted,
                turn: *turn,
                handed_on: *handed_on,
            })),
            TurnEvent::Resuming { turn, step } => observer.event(Event::Resuming {
                turn: *turn,
                step: *step,
            }),
            TurnEvent::Image { reference, ready } => {
                let pulled = ready.as_ref().map(|r| upstream_image::Pulled {
                    digest: r.digest.clone(),
                    rootfs: PathBuf::new(),
                    config: upstream_image::ImageConfig::default(),
                    layers: r.layers,
                    downloaded: r.downloaded,
                });
                observer.event(Event::Image {
                    reference,
                    pulled: pulled.as_ref(),
                });
            }
            TurnEvent::ImageLayer {
                digest,
                size,
                cached,
            } => observer.event(Event::ImageLayer {
                digest,
                size: *size,
                cached: *cached,
            }),
            TurnEvent::ImageDownloaded { digest, bytes } => {
                observer.event(Event::ImageDownloaded {
                    digest,
                    bytes: *bytes,
                })
            }
            TurnEvent::ImageUnpacking => observer.event(Event::ImageUnpacking),
            TurnEvent::Building { what } => observer.event(Event::Building(what)),
            TurnEvent::Warning { message } => observer.event(Event::Warning(message)),
            TurnEvent::Waiting { context, turn } => observer.event(Event::Waiting {
                context,
                turn: *turn,
                pid: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Remembers events as data, to compare what was sent with what was replayed.
    #[derive(Default)]
    struct Recorder(Vec<TurnEvent>);

    impl Observer for Recorder {
        fn event(&mut self, event: Event<'_>) {
            self.0.push(TurnEvent::of(&event));
        }
    }

    #[test]
    fn events_survive_json_and_replay_as_they_were() {
        let document = Document::parse(
            std::path::Path::new("t.md"),
            b"# One\n```bash\ntrue\n```\n# Two\n```python\npass\n```\n",
        )
        .unwrap();
        let record = StepRecord {
            number: 2,
            title: "Two".into(),
            language: upstream_doc::Language::Python,
            status: crate::StepStatus::Failed,
            exit_code: Some(3),
            signal: None,
            duration_ms: Some(12),
            stdout: "out".into(),
            stderr: String::new(),
            stdout_bytes: 3,
            stderr_bytes: 0,
            outputs: BTreeMap::from([("summary".to_string(), "3 rows".to_string())]),
            log: None,
            message: None,
        };
        let sent = vec![
            TurnEvent::Image {
                reference: "python:3.12".into(),
                ready: None,
            },
            TurnEvent::ImageLayer {
                digest: "sha256:ab".into(),
                size: 10,
                cached: false,
            },
            TurnEvent::ImageDownloaded {
                digest: "sha256:ab".into(),
                bytes: 10,
            },
            TurnEvent::ImageUnpacking,
            TurnEvent::Building {
                what: "Building the host's root disk for VMs".into(),
            },
            TurnEvent::Image {
                reference: "python:3.12".into(),
                ready: Some(ImageReady {
                    digest: "sha256:cd".into(),
                    layers: 1,
                    downloaded: 10,
                }),
            },
            TurnEvent::SandboxReady {
                backend: "namespaces".into(),
                setup_ms: 2.5,
                unenforced: vec!["memory: no controller".into()],
                ids: 65536,
            },
            TurnEvent::ContextLoaded {
                context: "c".into(),
                artifacts: 2,
                outputs: 1,
                turn: 4,
            },
            TurnEvent::StepStarted { number: 2 },
            TurnEvent::Output {
                stream: OutputStream::Stderr,
                text: "héllo\n".into(),
            },
            TurnEvent::StepFinished {
                record: Box::new(record),
            },
            TurnEvent::ContextSaved {
                context: "c".into(),
                artifacts: 1,
                bytes: 5,
                deleted: 0,
                turn: 5,
                handed_on: false,
            },
            TurnEvent::Resuming { turn: 4, step: 2 },
            TurnEvent::Warning {
                message: "careful".into(),
            },
            TurnEvent::Waiting {
                context: "c".into(),
                turn: Some(6),
            },
        ];
        let mut replayed = Recorder::default();
        for event in &sent {
            let line = serde_json::to_string(event).unwrap();
            assert!(!line.contains('\n'), "one line per event: {line}");
            let back: TurnEvent = serde_json::from_str(&line).unwrap();
            back.replay(&document, &mut replayed);
        }
        assert_eq!(replayed.0, sent);
        // A step the document does not have is passed over, not invented.
        let mut none = Recorder::default();
        TurnEvent::StepStarted { number: 9 }.replay(&document, &mut none);
        assert!(none.0.is_empty());
    }
}

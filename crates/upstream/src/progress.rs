//! Progress on stderr: a live spinner per step on a terminal, plain lines otherwise.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use upstream_doc::{Step, format_duration, signal_name};
use upstream_turn::{Cancel, Event, Observer, StepRecord, StepStatus};

/// Where the status column of a step line starts.
const STATUS_COLUMN: usize = 36;

/// Fault injection for tests: with `UPSTREAM_FAILPOINT=panic-on-output`, upstream panics on
/// the first output of a step, to show that a crash still tears the sandbox down.
const FAILPOINT: &str = "UPSTREAM_FAILPOINT";

pub struct Progress {
    /// Ctrl-C handling, installed once the sandbox exists (see `interrupt::install`).
    cancel: Cancel,
    panic_on_output: bool,
    image: String,
    verbose: bool,
    tty: bool,
    bar: Option<ProgressBar>,
    /// A pull's layers, while it runs on a terminal.
    layers: Option<crate::layer_bars::LayerBars>,
    /// The running step's stdout and stderr, shown with `-v` as a terminal can take them.
    escapers: [upstream_doc::terminal::BlockEscaper; 2],
    stderr: io::Stderr,
}

impl Progress {
    pub fn new(image: &str, verbose: bool, cancel: &Cancel) -> Progress {
        let stderr = io::stderr();
        Progress {
            cancel: cancel.clone(),
            panic_on_output: std::env::var_os(FAILPOINT).is_some_and(|v| v == "panic-on-output"),
            image: image.to_string(),
            verbose,
            tty: stderr.is_terminal(),
            bar: None,
            layers: None,
            escapers: Default::default(),
            stderr,
        }
    }

    /// Shows a step's output (with `-v`), escaped already.
    fn output(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        let stderr = &mut self.stderr;
        match &self.bar {
            Some(bar) => bar.suspend(|| {
                let _ = stderr.write_all(text.as_bytes());
                let _ = stderr.flush();
            }),
            None => {
                let _ = stderr.write_all(text.as_bytes());
            }
        }
    }

    /// Prints a line of progress. Whatever it quotes of the sandbox's (a summary, a file name,
    /// an excerpt of output) is shown with its control characters escaped.
    fn line(&mut self, text: &str) {
        let text = upstream_doc::terminal::line(text);
        match &self.bar {
            Some(bar) => bar.println(text),
            None => {
                let _ = writeln!(self.stderr, "{text}");
            }
        }
    }
}

/// `Step 1: Count files ........`
fn step_label(step: &Step) -> String {
    let label = format!(
        "Step {}: {}",
        step.number,
        upstream_doc::terminal::line(&step.title())
    );
    let width = label.chars().count();
    let dots = STATUS_COLUMN.saturating_sub(width + 2).max(3);
    format!("{label} {}", ".".repeat(dots))
}

/// `done (0.01s)`, `failed: exit 1 (0.2s)`, `timed out after 30s`, …; what the step chose (its
/// summary, a message quoting it) with control characters escaped.
pub fn status_text(record: &StepRecord) -> String {
    upstream_doc::terminal::line(&status_text_raw(record)).into_owned()
}

fn status_text_raw(record: &StepRecord) -> String {
    let took = record
        .duration_ms
        .map(|ms| format_duration(Duration::from_millis(ms)));
    let with_time = |s: String| match &took {
        Some(t) => format!("{s} ({t})"),
        None => s,
    };
    match record.status {
        StepStatus::Passed => match (record.outputs.get("summary"), &took) {
            (Some(summary), Some(t)) => format!("done ({summary}, {t})"),
            (Some(summary), None) => format!("done ({summary})"),
            (None, _) => with_time("done".into()),
        },
        StepStatus::Failed => match (record.exit_code, record.signal) {
            // Why it failed, when upstream knows more than the code (its disk was full).
            (Some(code), _) => match &record.message {
                Some(why) => with_time(format!("failed: exit {code} — {why}")),
                None => with_time(format!("failed: exit {code}")),
            },
            (None, Some(sig)) => with_time(format!("failed: killed by {}", signal_name(sig))),
            // The sandbox died under it: why.
            _ => match &record.message {
                Some(why) => format!("failed: {why}"),
                None => with_time("failed".into()),
            },
        },
        StepStatus::TimedOut => match record.duration_ms {
            Some(ms) => format!(
                "timed out after {}",
                format_duration(Duration::from_millis(ms))
            ),
            None => "timed out".into(),
        },
        StepStatus::OutOfMemory => with_time("out of memory".into()),
        StepStatus::Error => format!(
            "could not start: {}",
            record.message.as_deref().unwrap_or("unknown error")
        ),
        StepStatus::NotRun => "not run".into(),
        StepStatus::Kept => record.message.clone().unwrap_or_else(|| "kept".into()),
    }
}

impl Observer for Progress {
    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::SandboxReady(info) => {
                crate::interrupt::install(&self.cancel);
                let ms = info.setup.as_secs_f64() * 1000.0;
                let line = format!(
                    "Sandbox: {} image, {} ({ms:.1} ms)",
                    self.image, info.backend
                );
                self.line(&line);
                for warning in &info.unenforced {
                    self.line(&format!("warning: {warning}"));
                }
            }
            Event::StepStarted(step) => {
                let label = step_label(step);
                if self.tty {
                    let bar = ProgressBar::new_spinner();
                    bar.set_style(
                        ProgressStyle::with_template("{msg} {spinner} {elapsed}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_message(label);
                    bar.enable_steady_tick(Duration::from_millis(100));
                    self.bar = Some(bar);
                } else if self.verbose {
                    self.line(&format!("Step {}: {}", step.number, step.title()));
                }
            }
            Event::Output(stream, data) => {
                assert!(!self.panic_on_output, "{FAILPOINT}=panic-on-output");
                if !self.verbose {
                    return;
                }
                let mut text = String::new();
                self.escapers[stream as usize].push(data, &mut text);
                self.output(&text);
            }
            Event::Resuming { turn, step } => {
                self.line(&format!(
                    "Resuming turn {turn} at step {step}, with the workspace as the steps before it left it"
                ));
            }
            Event::Warning(text) => self.line(&format!("warning: {text}")),
            Event::Building(what) => self.line(&format!("{what} ...")),
            Event::Waiting { context, turn, pid } => {
                // Ctrl-C stops the wait as it would stop the turn.
                crate::interrupt::install(&self.cancel);
                let whom = match turn {
                    Some(n) => format!("turn {n}"),
                    None => "a turn".to_string(),
                };
                let of = match pid {
                    Some(pid) => format!(" (pid {pid})"),
                    None => String::new(),
                };
                self.line(&format!(
                    "Waiting for {whom} of context {context}{of} to finish, to start from what it leaves"
                ));
            }
            Event::Image {
                reference,
                pulled: None,
            } => self.line(&format!("Image: {reference} ...")),
            Event::ImageLayer {
                digest,
                size,
                cached,
            } => {
                if self.tty {
                    self.layers
                        .get_or_insert_with(crate::layer_bars::LayerBars::new)
                        .layer(digest, size, cached);
                }
            }
            Event::ImageDownloaded { digest, bytes } => {
                if let Some(layers) = &mut self.layers {
                    layers.downloaded(digest, bytes);
                }
            }
            Event::ImageUnpacking => {
                if let Some(layers) = &mut self.layers {
                    layers.unpacking();
                }
            }
            Event::Image {
                reference,
                pulled: Some(p),
            } => {
                self.layers = None;
                let how = if p.downloaded > 0 {
                    format!("pulled {}", upstream_doc::format_size(p.downloaded))
                } else {
                    "cached".to_string()
                };
                self.line(&format!(
                    "Image: {reference} ({} layer{}, {how})",
                    p.layers,
                    if p.layers == 1 { "" } else { "s" }
                ));
            }
            Event::ContextLoaded(loaded) => {
                let mut what = vec![plural(loaded.artifacts, "artifact")];
                if loaded.outputs > 0 {
                    what.push(plural(loaded.outputs, "output"));
                }
                let line = format!(
                    "Context loaded: {} from previous turns ({}, turn {})",
                    what.join(", "),
                    loaded.context,
                    loaded.turn
                );
                self.line(&line);
            }
            Event::ContextSaved(saved) => {
                let what = if saved.handed_on { "saved" } else { "recorded" };
                let mut line = format!("Context: {} {what}", plural(saved.artifacts, "artifact"));
                if saved.deleted > 0 {
                    line.push_str(&format!(", {} deleted", saved.deleted));
                }
                // Only a turn that passed hands its artifacts on to the next.
                if !saved.handed_on {
                    line.push_str(", not handed on: the turn did not pass");
                }
                line.push_str(&format!(" ({}, turn {})", saved.context, saved.turn));
                self.line(&line);
            }
            Event::StepFinished(step, record) => {
                let mut rest = String::new();
                for escaper in &mut self.escapers {
                    escaper.finish(&mut rest);
                }
                self.output(&rest);
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                let line = format!("{} {}", step_label(step), status_text(record));
                self.line(&line);
                // Without -v the output was not shown: show why a step failed.
                if record.status.failed() && !self.verbose {
                    for l in failure_excerpt(record) {
                        // A tab is layout, not a control to show escaped.
                        self.line(&format!("  | {}", l.replace('\t', "    ")));
                    }
                }
            }
        }
    }
}

/// The last lines a failed step printed, stderr first (where failures usually speak).
fn failure_excerpt(record: &StepRecord) -> Vec<String> {
    const LINES: usize = 10;
    let text = if record.stderr.trim().is_empty() {
        &record.stdout
    } else {
        &record.stderr
    };
    let cleaned = upstream_doc::clean_output(text.as_bytes());
    let lines: Vec<&str> = cleaned.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(LINES)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// `1 artifact`, `2 artifacts`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A clock for the summary line.
pub fn since(start: Instant) -> String {
    format_duration(start.elapsed())
}

//! Writing step results back into a document.
//!
//! Each step's result goes right after its closing fence, between `<!-- upstream:result -->`
//! markers, carrying the container prefix of the step (block quote, list indentation) so it
//! stays inside the same container. A step given no new result keeps its bytes untouched.

use std::time::Duration;

use crate::output::Captured;
use crate::parse::{Document, RESULT_END, RESULT_START};

/// How a step ended, as the document reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The step's process exited with this code.
    Exited(i32),
    /// The step's process was killed by a signal.
    Signalled(i32),
    /// The step ran past `step_timeout` or the turn's `timeout` and was killed.
    TimedOut(Duration),
    /// The step was killed for going past the sandbox's memory limit.
    OutOfMemory { limit: Option<u64> },
    /// The step exited with `code` with the sandbox's disk full: its limit, in bytes.
    OutOfDisk { code: i32, limit: u64 },
    /// The step could not be started.
    Failed(String),
    /// The sandbox died while the step ran (its agent, its VM): why.
    Lost(String),
    /// The turn stopped before this step.
    NotRun,
}

/// A step's result, ready to be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultBlock {
    pub outcome: Outcome,
    pub duration: Option<Duration>,
    /// Combined stdout and stderr, as captured (already redacted).
    pub output: Captured,
    /// Values the step published through `$UPSTREAM_OUTPUT`.
    pub outputs: Vec<(String, String)>,
    /// Where the output can be read when the document shows only part of it, said as the
    /// document says it ("the whole output: upstream show 3 --step 2").
    pub full_output: Option<String>,
}

impl ResultBlock {
    pub fn not_run() -> ResultBlock {
        ResultBlock {
            outcome: Outcome::NotRun,
            duration: None,
            output: Captured::default(),
            outputs: Vec::new(),
            full_output: None,
        }
    }

    /// The `**Result:**` line's text.
    pub fn summary(&self) -> String {
        let took = |s: String| match self.duration {
            Some(d) => format!("{s} ({})", format_duration(d)),
            None => s,
        };
        match &self.outcome {
            Outcome::Exited(code) => took(format!("exit {code}")),
            Outcome::Signalled(sig) => {
                took(format!("killed by signal {sig} ({})", signal_name(*sig)))
            }
            Outcome::TimedOut(after) => format!("timed out after {}", format_duration(*after)),
            Outcome::OutOfMemory { limit: Some(l) } => {
                took(format!("out of memory (limit {})", format_size(*l)))
            }
            Outcome::OutOfMemory { limit: None } => took("out of memory".to_string()),
            Outcome::OutOfDisk { code, limit } => took(format!(
                "exit {code}, out of disk space (limit {})",
                format_size(*limit)
            )),
            Outcome::Failed(why) => format!("could not start: {why}"),
            Outcome::Lost(why) => format!("failed: {why}"),
            Outcome::NotRun => "not run".to_string(),
        }
    }
}

impl Document {
    /// The document with each step's result replaced by the one given for it; `None` keeps the
    /// step's current bytes. With no results at all this is the source, byte for byte.
    pub fn render(&self, results: &[Option<ResultBlock>]) -> String {
        let source = self.source();
        let mut out = String::with_capacity(source.len() + results.len() * 256);
        let mut copied = 0;
        for (step, result) in self.steps().iter().zip(results) {
            let Some(result) = result else { continue };
            out.push_str(&source[copied..step.result_span.start]);
            self.render_block(&mut out, &step.prefix, result);
            copied = step.result_span.end;
        }
        out.push_str(&source[copied..]);
        out
    }

    fn render_block(&self, out: &mut String, prefix: &str, result: &ResultBlock) {
        let nl = self.newline();
        let blank = prefix.trim_end();
        let mut line = |text: &str| {
            out.push_str(nl);
            if text.is_empty() {
                out.push_str(blank);
            } else {
                out.push_str(prefix);
                out.push_str(text);
            }
        };
        line("");
        line(RESULT_START);
        line(&format!("**Result:** {}", result.summary()));
        if !result.outputs.is_empty() {
            let values: Vec<String> = result
                .outputs
                .iter()
                .map(|(k, v)| format!("{} = {}", inline_code(k), inline_code(&shown_value(v))))
                .collect();
            line("");
            line(&format!("**Outputs:** {}", values.join(" · ")));
        }
        if !result.output.is_empty() {
            let mut text = clean_output(&result.output.head);
            if let Some(omitted) = result.output.omitted {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                let whole = match &result.full_output {
                    Some(place) => format!("; {place}"),
                    None => String::new(),
                };
                text.push_str(&format!(
                    "[… {} lines ({}) not shown{whole} …]\n",
                    omitted.lines,
                    format_size(omitted.bytes)
                ));
                text.push_str(&clean_output(&result.output.tail));
            }
            let text = text.strip_suffix('\n').unwrap_or(&text);
            let fence = "`".repeat(longest_backtick_run(text).max(2) + 1);
            line("");
            line(&format!("{fence}text"));
            for l in text.split('\n') {
                line(l);
            }
            line(&fence);
        }
        line(RESULT_END);
    }
}

/// Output as a document shows it: ANSI escapes removed, carriage-return overwrites resolved,
/// other control characters dropped, invalid UTF-8 replaced.
pub fn clean_output(bytes: &[u8]) -> String {
    let mut redrawn = Vec::with_capacity(bytes.len());
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            redrawn.push(b'\n');
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        // A progress bar redraws its line after `\r`: keep what was drawn last.
        let shown = line
            .rsplit(|&b| b == b'\r')
            .find(|s| !s.is_empty())
            .unwrap_or(b"");
        redrawn.extend_from_slice(shown);
    }
    // The escape stripper drops tabs with the other control characters: strip between them.
    let mut stripped = Vec::with_capacity(redrawn.len());
    for (i, part) in redrawn.split(|&b| b == b'\t').enumerate() {
        if i > 0 {
            stripped.push(b'\t');
        }
        stripped.extend_from_slice(&strip_ansi_escapes::strip(part));
    }
    String::from_utf8_lossy(&stripped)
        .chars()
        .filter(|&c| c == '\t' || c == '\n' || !c.is_control())
        .collect()
}

fn longest_backtick_run(text: &str) -> usize {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        if c == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    longest
}

/// An output's value as the document shows it, as a step's output block is shown: escape
/// sequences removed whole, lines joined by spaces, and every other character that steers a
/// terminal (a control, a bidi override) shown escaped.
fn shown_value(value: &str) -> String {
    let one_line: String = value
        .chars()
        .map(|c| if matches!(c, '\n' | '\t') { ' ' } else { c })
        .collect();
    let stripped = strip_ansi_escapes::strip(one_line.as_bytes());
    crate::terminal::line(&String::from_utf8_lossy(&stripped)).into_owned()
}

fn inline_code(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let ticks = "`".repeat(longest_backtick_run(&one_line) + 1);
    let pad = if one_line.starts_with('`') || one_line.ends_with('`') {
        " "
    } else {
        ""
    };
    format!("{ticks}{pad}{one_line}{pad}{ticks}")
}

/// `0.01s`, `1.4s`, `2m 5s`, `1h 2m`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 1.0 {
        format!("{secs:.2}s")
    } else if secs < 60.0 {
        let s = format!("{secs:.1}s");
        s.replace(".0s", "s")
    } else if secs < 3600.0 {
        let whole = d.as_secs();
        match whole % 60 {
            0 => format!("{}m", whole / 60),
            s => format!("{}m {s}s", whole / 60),
        }
    } else {
        let whole = d.as_secs();
        match (whole % 3600) / 60 {
            0 => format!("{}h", whole / 3600),
            m => format!("{}h {m}m", whole / 3600),
        }
    }
}

/// `512 B`, `64.0 KiB`, `98.2 MiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The conventional name of a signal number.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(Duration::from_millis(10)), "0.01s");
        assert_eq!(format_duration(Duration::from_millis(1400)), "1.4s");
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m 5s");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
    }

    #[test]
    fn output_is_cleaned_of_escapes_and_redraws() {
        assert_eq!(clean_output(b"\x1b[31mred\x1b[0m\n"), "red\n");
        assert_eq!(clean_output(b"10%\r50%\r100%\ndone\r\n"), "100%\ndone\n");
        assert_eq!(clean_output(b"bell\x07 \xff"), "bell \u{fffd}");
        assert_eq!(clean_output(b"a\tb\t\x1b[1mc\x1b[0m\n"), "a\tb\tc\n");
    }

    #[test]
    fn an_output_value_shows_no_escape_sequence_nor_bidi_override() {
        assert_eq!(
            shown_value("\u{1b}]0;PWNED2\u{7}\u{1b}[2Jx\u{202e}y\u{7}\nz"),
            "x\\u{202e}y z"
        );
        assert_eq!(shown_value("plain value"), "plain value");
    }

    #[test]
    fn inline_code_survives_backticks() {
        assert_eq!(inline_code("a`b"), "``a`b``");
        assert_eq!(inline_code("`x"), "`` `x ``");
    }
}

//! Errors for documents that cannot be read or parsed.
//!
//! Every error points at a place: the file, and where the content is at fault, the 1-based line
//! and column. The `Display` form is one line (`file:line:col: message`); [`ParseError::report`]
//! adds the offending source line with a caret and a hint saying what to do.

use std::fmt;
use std::path::PathBuf;

/// A position in a document, 1-based, column counted in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The location of byte `offset` in `text`.
    pub fn of_offset(text: &str, offset: usize) -> Location {
        let offset = offset.min(text.len());
        let before = &text[..floor_char_boundary(text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Location { line, column }
    }
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// What is wrong with a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file could not be read.
    Io(String),
    /// The path names a directory.
    IsDirectory,
    /// The bytes are not UTF-8.
    NotUtf8,
    /// The document is empty or holds only whitespace.
    Empty,
    /// The document has no step to run.
    NoSteps,
    /// The front matter starts with `---` but never ends.
    UnclosedFrontMatter,
    /// The front matter is not valid YAML or does not match the schema.
    FrontMatter(String),
    /// A front matter key has a value upstream does not take (out of bounds, wrong type).
    FrontMatterValue { message: String, hint: String },
    /// A step's fence is never closed.
    UnclosedFence { fence: String },
    /// A step's info string has a word upstream does not know.
    UnknownStepOption { option: String },
    /// A result block lost its closing marker.
    UnclosedResult,
    /// A result block's closing marker without its opening one: a block that lost its start.
    StrayResultEnd,
    /// A result block that follows no step: its step was deleted or changed, or the block
    /// was moved away from it.
    OrphanResult,
}

/// A document that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    pub path: PathBuf,
    pub location: Option<Location>,
    pub kind: ErrorKind,
    /// The line the location points into, for the caret display.
    pub source_line: Option<String>,
}

impl ParseError {
    pub(crate) fn new(path: PathBuf, kind: ErrorKind) -> ParseError {
        ParseError {
            path,
            location: None,
            kind,
            source_line: None,
        }
    }

    pub(crate) fn at(path: PathBuf, text: &str, offset: usize, kind: ErrorKind) -> ParseError {
        let location = Location::of_offset(text, offset);
        ParseError::at_location(path, text, location, kind)
    }

    pub(crate) fn at_location(
        path: PathBuf,
        text: &str,
        location: Location,
        kind: ErrorKind,
    ) -> ParseError {
        let source_line = text
            .split('\n')
            .nth(location.line - 1)
            .map(|l| l.trim_end_matches('\r').to_string());
        ParseError {
            path,
            location: Some(location),
            kind,
            source_line,
        }
    }

    /// The message without the place.
    pub fn message(&self) -> String {
        match &self.kind {
            ErrorKind::Io(e) => format!("cannot read the document: {e}"),
            ErrorKind::IsDirectory => "this is a directory, not a document".into(),
            ErrorKind::NotUtf8 => "the document is not valid UTF-8".into(),
            ErrorKind::Empty => "the document is empty".into(),
            ErrorKind::NoSteps => "the document has no steps".into(),
            ErrorKind::UnclosedFrontMatter => "the front matter is never closed".into(),
            ErrorKind::FrontMatter(e) => format!("invalid front matter: {e}"),
            ErrorKind::FrontMatterValue { message, .. } => {
                format!("invalid front matter: {message}")
            }
            ErrorKind::UnclosedFence { fence } => {
                format!("this step's code block is never closed (it opens with {fence})")
            }
            ErrorKind::UnknownStepOption { option } => {
                format!("unknown step option `{option}`")
            }
            ErrorKind::UnclosedResult => {
                "this result block has no closing `<!-- /upstream:result -->` marker".into()
            }
            ErrorKind::StrayResultEnd => {
                "this `<!-- /upstream:result -->` marker closes no result block: its opening \
                 `<!-- upstream:result -->` marker is gone"
                    .into()
            }
            ErrorKind::OrphanResult => {
                "this result block follows no step: a step's result goes right after the step's \
                 code block"
                    .into()
            }
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match &self.kind {
            ErrorKind::Io(_) => "check that the path is right and that you may read it".into(),
            ErrorKind::IsDirectory => "name a markdown file, such as examples/quickstart.md".into(),
            ErrorKind::NotUtf8 => "save the file as UTF-8".into(),
            ErrorKind::Empty | ErrorKind::NoSteps => {
                "add a step: a fenced code block whose info string is bash, sh or python".into()
            }
            ErrorKind::UnclosedFrontMatter => {
                "end the front matter with a line holding only `---`".into()
            }
            ErrorKind::FrontMatterValue { hint, .. } => hint.clone(),
            ErrorKind::FrontMatter(_) => format!(
                "front matter keys are: {}",
                crate::front_matter::KEYS.join(", ")
            ),
            ErrorKind::UnclosedFence { fence } => {
                format!("add a closing {fence} line after the step's code")
            }
            ErrorKind::UnknownStepOption { .. } => {
                "the only step option is `continue_on_error`; use another language \
                 tag (such as `console`) for a block that should not run"
                    .into()
            }
            ErrorKind::UnclosedResult => {
                "delete the damaged result block; the next run writes a new one".into()
            }
            ErrorKind::StrayResultEnd => {
                "delete what is left of the result block (its `**Result:**` line, its output and \
                 this marker), or put its opening marker back; the next run writes a new one"
                    .into()
            }
            ErrorKind::OrphanResult => {
                "delete the block (through its `<!-- /upstream:result -->` line), or move it back \
                 under its step; the next run writes each step's result after it (to show one as \
                 an example, put it in a fenced block)"
                    .into()
            }
        })
    }

    /// The full report: the one-line error, the source line with a caret, and the hint.
    pub fn report(&self) -> String {
        let mut out = format!("error: {self}");
        if let (Some(loc), Some(line)) = (self.location, &self.source_line) {
            let number = loc.line.to_string();
            let pad = " ".repeat(number.len());
            let caret_pad: String = line
                .chars()
                .take(loc.column.saturating_sub(1))
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            out.push_str(&format!(
                "\n{pad} |\n{number} | {line}\n{pad} | {caret_pad}^"
            ));
        }
        if let Some(hint) = self.hint() {
            out.push_str(&format!("\nhint: {hint}"));
        }
        out
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some(loc) => write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                loc.line,
                loc.column,
                self.message()
            ),
            None => write!(f, "{}: {}", self.path.display(), self.message()),
        }
    }
}

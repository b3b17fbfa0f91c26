//! Splitting a document into front matter, steps and the result blocks that follow them.
//!
//! Parsing never changes text: every step records byte spans into the source, so rendering
//! with no new results reproduces the source byte for byte.
//!
//! A result block is a step's when it follows the step's code block with only blank lines
//! between, in the step's own container (quote, list item); copies of it right after it (a
//! block pasted twice) are taken with it, so a rewrite leaves one. Every other result block —
//! one moved away from its step, one whose step was deleted or is no longer a step — and
//! every marker without its partner is an error at its place: a rewrite would leave it stale.

use std::ops::Range;
use std::path::{Path, PathBuf};

use pulldown_cmark::{CodeBlockKind, Event, Options, Parser, Tag, TagEnd};

use crate::error::{ErrorKind, Location, ParseError};
use crate::front_matter::FrontMatter;

pub(crate) const RESULT_START: &str = "<!-- upstream:result -->";
pub(crate) const RESULT_END: &str = "<!-- /upstream:result -->";

/// A parsed document.
#[derive(Debug, Clone)]
pub struct Document {
    path: PathBuf,
    source: String,
    front_matter: FrontMatter,
    steps: Vec<Step>,
    crlf: bool,
}

/// The interpreter of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Bash,
    Sh,
    Python,
}

impl Language {
    fn from_tag(tag: &str) -> Option<Language> {
        match tag {
            "bash" => Some(Language::Bash),
            "sh" | "shell" => Some(Language::Sh),
            "python" | "python3" | "py" => Some(Language::Python),
            _ => None,
        }
    }
}

/// One step: a fenced code block to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// 1-based position among the document's steps.
    pub number: usize,
    /// Text of the nearest heading above the step.
    pub heading: Option<String>,
    pub language: Language,
    /// The code, without fences and container prefixes.
    pub code: String,
    /// Later steps run even when this one fails.
    pub continue_on_error: bool,
    /// Where the step's fence opens.
    pub location: Location,
    /// The bytes after the closing fence (before its line break) through the end of the step's
    /// existing result block; empty when it has none.
    pub(crate) result_span: Range<usize>,
    /// What precedes the closing fence on its line: block-quote markers, list indentation.
    pub(crate) prefix: String,
}

impl Step {
    /// The title shown in progress lines: the heading, or else the first line of code.
    pub fn title(&self) -> String {
        if let Some(h) = &self.heading {
            return h.clone();
        }
        let first = self
            .code
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("");
        let mut title: String = first.chars().take(48).collect();
        if first.chars().count() > 48 {
            title.push('…');
        }
        title
    }

    /// Whether a result block from an earlier run follows the step.
    pub fn has_result(&self) -> bool {
        !self.result_span.is_empty()
    }
}

impl Document {
    /// Reads and parses the document at `path`.
    pub fn read(path: &Path) -> Result<(Document, Vec<u8>), ParseError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| ParseError::new(path.to_path_buf(), ErrorKind::Io(io_reason(&e))))?;
        if meta.is_dir() {
            return Err(ParseError::new(path.to_path_buf(), ErrorKind::IsDirectory));
        }
        let bytes = std::fs::read(path)
            .map_err(|e| ParseError::new(path.to_path_buf(), ErrorKind::Io(io_reason(&e))))?;
        let doc = Document::parse(path, &bytes)?;
        Ok((doc, bytes))
    }

    /// Parses the bytes of a document; `path` names it in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Document, ParseError> {
        let path = path.to_path_buf();
        let source = match std::str::from_utf8(bytes) {
            Ok(s) => s.to_string(),
            Err(e) => {
                let valid = String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned();
                let location = Location::of_offset(&valid, valid.len());
                let lossy = String::from_utf8_lossy(bytes).into_owned();
                return Err(ParseError::at_location(
                    path,
                    &lossy,
                    location,
                    ErrorKind::NotUtf8,
                ));
            }
        };
        if source.trim().is_empty() {
            return Err(ParseError::new(path, ErrorKind::Empty));
        }
        let (front_matter, body_start) = split_front_matter(&path, &source)?;
        let steps = find_steps(&path, &source, body_start)?;
        if steps.is_empty() {
            return Err(ParseError::new(path, ErrorKind::NoSteps));
        }
        let crlf = source.contains("\r\n");
        Ok(Document {
            path,
            source,
            front_matter,
            steps,
            crlf,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn front_matter(&self) -> &FrontMatter {
        &self.front_matter
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The line break the document uses, for text written into it.
    pub(crate) fn newline(&self) -> &'static str {
        if self.crlf { "\r\n" } else { "\n" }
    }
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// Lines of `text` with the byte offset each starts at, line breaks included in the slice.
fn lines_with_offsets(text: &str, from: usize) -> impl Iterator<Item = (usize, &str)> {
    let mut pos = from;
    std::iter::from_fn(move || {
        if pos >= text.len() {
            return None;
        }
        let end = text[pos..].find('\n').map_or(text.len(), |i| pos + i + 1);
        let line = &text[pos..end];
        let start = pos;
        pos = end;
        Some((start, line))
    })
}

fn strip_newline(line: &str) -> &str {
    line.strip_suffix('\n')
        .map_or(line, |l| l.strip_suffix('\r').unwrap_or(l))
}

/// Returns the front matter and where the markdown body starts.
fn split_front_matter(path: &Path, source: &str) -> Result<(FrontMatter, usize), ParseError> {
    let start = if source.starts_with('\u{feff}') {
        '\u{feff}'.len_utf8()
    } else {
        0
    };
    let mut lines = lines_with_offsets(source, start);
    match lines.next() {
        Some((_, first)) if strip_newline(first).trim_end() == "---" => {}
        _ => return Ok((FrontMatter::default(), 0)),
    }
    let yaml_start = lines_with_offsets(source, start)
        .nth(1)
        .map_or(source.len(), |(o, _)| o);
    for (offset, line) in lines {
        let bare = strip_newline(line).trim_end();
        if bare == "---" || bare == "..." {
            let yaml = &source[yaml_start..offset];
            let fm = parse_yaml(path, source, yaml, yaml_start)?;
            return Ok((fm, offset + line.len()));
        }
    }
    Err(ParseError::at(
        path.to_path_buf(),
        source,
        start,
        ErrorKind::UnclosedFrontMatter,
    ))
}

fn parse_yaml(
    path: &Path,
    source: &str,
    yaml: &str,
    yaml_start: usize,
) -> Result<FrontMatter, ParseError> {
    let meaningful = yaml
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    if !meaningful {
        return Ok(FrontMatter::default());
    }
    serde_yaml_ng::from_str::<FrontMatter>(yaml).map_err(|e| {
        let message = clean_yaml_message(&e.to_string());
        let first_line = Location::of_offset(source, yaml_start).line;
        let (kind, location) = match crate::front_matter::split_value_error(&message) {
            // A key's own check failed: serde knows no place for it, so the key's value is
            // found in the text.
            Some(bad) => (
                ErrorKind::FrontMatterValue {
                    message: bad.message.to_string(),
                    hint: bad.hint.to_string(),
                },
                key_location(yaml, bad.key).map(|(line, column)| Location {
                    line: first_line + line,
                    column,
                }),
            ),
            None => (
                ErrorKind::FrontMatter(message.clone()),
                e.location().and_then(|loc| {
                    Some(Location {
                        line: first_line + loc.line().checked_sub(1)?,
                        column: loc.column(),
                    })
                }),
            ),
        };
        // Only a place inside the document is shown (libyaml can point just past a line).
        let location = location.and_then(|loc| {
            let text = source.split('\n').nth(loc.line.checked_sub(1)?)?;
            let width = text.trim_end_matches('\r').chars().count();
            Some(Location {
                line: loc.line,
                column: loc.column.clamp(1, width + 1),
            })
        });
        match location {
            Some(location) => ParseError::at_location(path.to_path_buf(), source, location, kind),
            None => ParseError::at(path.to_path_buf(), source, yaml_start, kind),
        }
    })
}

/// Where the value of top-level `key` starts in `yaml`: its 0-based line and 1-based column
/// (the key itself when its value is on the lines below). `None` when the key is not written
/// in block style at the start of a line.
fn key_location(yaml: &str, key: &str) -> Option<(usize, usize)> {
    yaml.split('\n').enumerate().find_map(|(number, line)| {
        let rest = [
            format!("{key}:"),
            format!("\"{key}\":"),
            format!("'{key}':"),
        ]
        .iter()
        .find_map(|k| line.strip_prefix(k.as_str()))?;
        let value = rest.trim_start_matches([' ', '\t']);
        let column = if value.trim_end().is_empty() || value.starts_with('#') {
            1
        } else {
            line[..line.len() - value.len()].chars().count() + 1
        };
        Some((number, column))
    })
}

/// serde_yaml appends " at line L column C" to its messages; the error shows the place itself.
fn clean_yaml_message(message: &str) -> String {
    let message = strip_place(message);
    message.replace("unknown field", "unknown front matter key")
}

/// `message` without a trailing ` at line L column C` (or ` at line L`).
fn strip_place(message: &str) -> &str {
    let Some(at) = message.rfind(" at line ") else {
        return message;
    };
    let place = &message[at + " at line ".len()..];
    let (line, column) = match place.split_once(" column ") {
        Some((line, column)) => (line, Some(column)),
        None => (place, None),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if digits(line) && column.is_none_or(digits) {
        &message[..at]
    } else {
        message
    }
}

struct Block {
    range: Range<usize>,
    info: String,
    code: String,
    /// Where the last of the code ends in the source.
    code_end: usize,
    heading: Option<String>,
}

fn find_steps(path: &Path, source: &str, body_start: usize) -> Result<Vec<Step>, ParseError> {
    let body = &source[body_start..];
    let options = Options::ENABLE_TABLES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS
        | Options::ENABLE_FOOTNOTES;
    let mut blocks: Vec<Block> = Vec::new();
    let mut markers: Vec<(usize, bool)> = Vec::new();
    let mut heading: Option<String> = None;
    let mut heading_text: Option<String> = None;
    let mut open_block: Option<Block> = None;
    for (event, range) in Parser::new_ext(body, options).into_offset_iter() {
        let range = range.start + body_start..range.end + body_start;
        match event {
            Event::Start(Tag::Heading { .. }) => heading_text = Some(String::new()),
            Event::End(TagEnd::Heading(_)) => {
                heading = heading_text
                    .take()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty());
            }
            Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(info))) => {
                open_block = Some(Block {
                    code_end: range.start,
                    range,
                    info: info.to_string(),
                    code: String::new(),
                    heading: heading.clone(),
                });
            }
            Event::End(TagEnd::CodeBlock) => {
                if let Some(block) = open_block.take() {
                    blocks.push(block);
                }
            }
            Event::Text(text) | Event::Code(text) => {
                if let Some(block) = open_block.as_mut() {
                    block.code.push_str(&text);
                    block.code_end = range.end;
                } else if let Some(h) = heading_text.as_mut() {
                    h.push_str(&text);
                }
            }
            Event::Start(Tag::HtmlBlock) => {
                let line = source[range.start..].lines().next().unwrap_or("").trim();
                if line == RESULT_START {
                    markers.push((range.start, true));
                } else if line == RESULT_END {
                    markers.push((range.start, false));
                }
            }
            _ => {}
        }
    }

    let pairs = pair_markers(path, source, &markers)?;
    let mut claimed = vec![false; pairs.len()];
    let mut steps = Vec::new();
    let mut claimed_until = 0;
    for block in blocks {
        if block.range.start < claimed_until {
            continue; // a code block inside an earlier step's result block
        }
        let mut words = block
            .info
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| !w.is_empty());
        let tag = words.next().unwrap_or("").to_ascii_lowercase();
        let Some(language) = Language::from_tag(&tag) else {
            continue;
        };
        let mut continue_on_error = false;
        for word in words {
            match word {
                "continue_on_error" | "continue-on-error" => continue_on_error = true,
                other => {
                    let at = info_offset(source, block.range.start, other);
                    return Err(ParseError::at(
                        path.to_path_buf(),
                        source,
                        at,
                        ErrorKind::UnknownStepOption {
                            option: other.to_string(),
                        },
                    ));
                }
            }
        }
        let fence = Fence::opening(source, block.range.start);
        let (close_line_start, close_line) = last_line(source, block.range.clone());
        let close_bare = strip_newline(close_line);
        // The last line must be a closing fence, not the opening line itself, and not code:
        // a line that only looks like a fence (inside a quote the fence is not in, or
        // indented too far) is part of a block that runs on to its container's end unclosed.
        let closing = fence
            .closes(close_bare)
            .filter(|_| close_line_start > block.range.start && block.code_end <= close_line_start);
        let Some(fence_pos) = closing else {
            return Err(ParseError::at(
                path.to_path_buf(),
                source,
                block.range.start,
                ErrorKind::UnclosedFence {
                    fence: fence.text(),
                },
            ));
        };
        let prefix = close_bare[..fence_pos].to_string();
        let insert_at = close_line_start + close_bare.len();
        let result_end = existing_result(source, insert_at, &prefix, &pairs, &mut claimed);
        claimed_until = result_end.unwrap_or(insert_at);
        steps.push(Step {
            number: steps.len() + 1,
            heading: block.heading,
            language,
            code: block.code,
            continue_on_error,
            location: Location::of_offset(source, block.range.start),
            result_span: insert_at..result_end.unwrap_or(insert_at),
            prefix,
        });
    }
    // A result block no step claims is what is left of a step deleted or changed, or a
    // block moved away from its step: rewriting would leave it stale.
    if let Some(i) = claimed.iter().position(|c| !c) {
        return Err(ParseError::at(
            path.to_path_buf(),
            source,
            pairs[i].0,
            ErrorKind::OrphanResult,
        ));
    }
    Ok(steps)
}

/// Pairs each result block's opening marker with its closing one, in order: a marker without
/// its partner is a damaged block.
fn pair_markers(
    path: &Path,
    source: &str,
    markers: &[(usize, bool)],
) -> Result<Vec<(usize, usize)>, ParseError> {
    let fail = |at, kind| Err(ParseError::at(path.to_path_buf(), source, at, kind));
    let mut pairs = Vec::new();
    let mut open = None;
    for &(offset, is_start) in markers {
        match (is_start, open) {
            (true, None) => open = Some(offset),
            (true, Some(start)) => return fail(start, ErrorKind::UnclosedResult),
            (false, Some(start)) => {
                pairs.push((start, offset));
                open = None;
            }
            (false, None) => return fail(offset, ErrorKind::StrayResultEnd),
        }
    }
    match open {
        Some(start) => fail(start, ErrorKind::UnclosedResult),
        None => Ok(pairs),
    }
}

fn info_offset(source: &str, fence_start: usize, word: &str) -> usize {
    let line_end = source[fence_start..]
        .find('\n')
        .map_or(source.len(), |i| fence_start + i);
    source[fence_start..line_end]
        .find(word)
        .map_or(fence_start, |i| fence_start + i)
}

/// The opening fence of a code block.
struct Fence {
    ch: char,
    len: usize,
}

impl Fence {
    fn opening(source: &str, start: usize) -> Fence {
        let line = source[start..].trim_start_matches([' ', '\t']);
        let ch = line.chars().next().unwrap_or('`');
        let len = line.chars().take_while(|&c| c == ch).count();
        Fence { ch, len }
    }

    fn text(&self) -> String {
        std::iter::repeat_n(self.ch, self.len).collect()
    }

    /// Where the fence starts in `line`, if `line` closes a block this fence opened.
    fn closes(&self, line: &str) -> Option<usize> {
        let pos = line.find(self.ch)?;
        if !line[..pos]
            .chars()
            .all(|c| c == ' ' || c == '\t' || c == '>')
        {
            return None;
        }
        let run = line[pos..].chars().take_while(|&c| c == self.ch).count();
        let rest = &line[pos + run * self.ch.len_utf8()..];
        (run >= self.len && rest.trim().is_empty()).then_some(pos)
    }
}

/// The last non-empty line inside `range`, with its start offset.
fn last_line(source: &str, range: Range<usize>) -> (usize, &str) {
    let text = &source[range.clone()];
    let trimmed = text.strip_suffix('\n').unwrap_or(text);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
    let start = trimmed.rfind('\n').map_or(0, |i| i + 1);
    let line_start = range.start + start;
    let line_end = source[line_start..]
        .find('\n')
        .map_or(source.len(), |i| line_start + i + 1);
    // The range may begin after container markers; the line is taken whole from its start.
    let real_start = source[..line_start].rfind('\n').map_or(0, |i| i + 1);
    (real_start, &source[real_start..line_end])
}

/// If a result block follows `insert_at` with only blank lines between, where it ends; the
/// blocks it is made of are marked `claimed`. Copies of the block right after it (a block
/// pasted twice) are taken with it, so that a rewrite leaves one.
fn existing_result(
    source: &str,
    insert_at: usize,
    prefix: &str,
    pairs: &[(usize, usize)],
    claimed: &mut [bool],
) -> Option<usize> {
    let mut end = None;
    let mut from = insert_at;
    let first = pairs.iter().position(|&(start, _)| start >= insert_at)?;
    for (i, &(start, close)) in pairs.iter().enumerate().skip(first) {
        let between = &source[from..start];
        if !between.chars().all(|c| c.is_whitespace() || c == '>') {
            break;
        }
        // Only a block in the step's own container is its result (one written there has the
        // step's prefix); replacing a block from another container would move what follows
        // it into this one.
        let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
        if source[line_start..start] != *prefix {
            break;
        }
        let line_end = source[close..]
            .find('\n')
            .map_or(source.len(), |i| close + i);
        let line_end = if source[..line_end].ends_with('\r') {
            line_end - 1
        } else {
            line_end
        };
        claimed[i] = true;
        end = Some(line_end);
        from = line_end;
    }
    end
}

//! Text a sandbox chose, on its way to a person's terminal: a step's summary, its output, the
//! names of its artifacts. A terminal obeys what such text holds — an OSC sequence retitles
//! the window or writes the clipboard, a CSI one clears the screen or moves the cursor over
//! what was printed, a bidi override shows a file name backwards — so every character that
//! steers a terminal is shown escaped instead, and the person sees what the sandbox wrote.
//!
//! Escaped: C0 controls (`\x1b`, `\x07`, `\r`, … and `\n`, `\t` in [`line`]), DEL, C1
//! controls (`\u{9b}`), the bidi embeddings, overrides and isolates (U+202A–U+202E,
//! U+2066–U+2069), and bytes that are not UTF-8 (`\xff`). Everything else is printed as it
//! is, so ordinary text (any script, emoji) reads as written.

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` is one a terminal would act on, given whether newlines and tabs are kept.
fn steers(c: char, keep_layout: bool) -> bool {
    match c {
        '\n' | '\t' => !keep_layout,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' => true,
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => true,
        _ => false,
    }
}

fn escape_char(c: char, out: &mut String) {
    if (c as u32) < 0x80 {
        let _ = write!(out, "\\x{:02x}", c as u32);
    } else {
        let _ = write!(out, "\\u{{{:x}}}", c as u32);
    }
}

fn escape(text: &str, keep_layout: bool) -> Cow<'_, str> {
    if !text.chars().any(|c| steers(c, keep_layout)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        // A line ending `\r\n` only ends the line.
        if keep_layout && c == '\r' && chars.peek() == Some(&'\n') {
            continue;
        }
        if steers(c, keep_layout) {
            escape_char(c, &mut out);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` for one line of a terminal (a name, a value, a progress line): every control
/// character escaped, newlines and tabs too.
pub fn line(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

/// `text` as a block of lines for a terminal (a step's output): newlines and tabs kept, every
/// other control character escaped.
pub fn block(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

/// Escapes a stream of bytes as [`block`] does, chunk by chunk: a character split between
/// two chunks is escaped (or not) whole, and bytes that are not UTF-8 are shown as `\xNN`.
#[derive(Debug, Default)]
pub struct BlockEscaper {
    /// The start of a character the last chunk ended in the middle of.
    carry: Vec<u8>,
    /// A `\r` the last chunk ended with: a line ending if `\n` comes next.
    cr: bool,
}

impl BlockEscaper {
    pub fn new() -> BlockEscaper {
        BlockEscaper::default()
    }

    /// Escapes `data`, appending to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut String) {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(data);
        let mut rest = bytes.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    self.text(text, out);
                    return;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    self.text(std::str::from_utf8(valid).unwrap_or_default(), out);
                    match e.error_len() {
                        Some(n) => {
                            self.flush_cr(out);
                            for b in &after[..n] {
                                let _ = write!(out, "\\x{b:02x}");
                            }
                            rest = &after[n..];
                        }
                        None => {
                            self.carry = after.to_vec();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: what is left of a character that never ended is escaped.
    pub fn finish(&mut self, out: &mut String) {
        self.flush_cr(out);
        for b in std::mem::take(&mut self.carry) {
            let _ = write!(out, "\\x{b:02x}");
        }
    }

    fn flush_cr(&mut self, out: &mut String) {
        if std::mem::take(&mut self.cr) {
            out.push_str("\\x0d");
        }
    }

    fn text(&mut self, text: &str, out: &mut String) {
        if text.is_empty() {
            return;
        }
        if self.cr {
            self.cr = false;
            if !text.starts_with('\n') {
                out.push_str("\\x0d");
            }
        }
        let (text, ends_in_cr) = match text.strip_suffix('\r') {
            Some(t) => (t, true),
            None => (text, false),
        };
        out.push_str(&block(text));
        self.cr = ends_in_cr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "a\x1b]0;owned\x07b\x1b[2J\x1b[Hc\u{202e}gnp.exe\u{2066}d\u{9b}31m\x7f";

    #[test]
    fn escapes_and_csi_and_bidi_overrides_are_shown_not_obeyed() {
        let shown = line(HOSTILE);
        assert_eq!(
            shown,
            "a\\x1b]0;owned\\x07b\\x1b[2J\\x1b[Hc\\u{202e}gnp.exe\\u{2066}d\\u{9b}31m\\x7f"
        );
        assert!(!shown.chars().any(|c| steers(c, false)));
        assert_eq!(line("two\nlines\tand tab"), "two\\x0alines\\x09and tab");
    }

    #[test]
    fn ordinary_text_is_untouched_and_blocks_keep_their_lines() {
        assert!(matches!(line("café ✓ 表"), Cow::Borrowed("café ✓ 表")));
        assert_eq!(
            block("one\r\ntwo\n\tthree\rover"),
            "one\ntwo\n\tthree\\x0dover"
        );
    }

    #[test]
    fn a_stream_is_escaped_whole_however_it_is_cut() {
        let bytes = format!("{HOSTILE}\r\nend é\r").into_bytes();
        let mut whole = String::new();
        let mut once = BlockEscaper::new();
        once.push(&bytes, &mut whole);
        once.finish(&mut whole);
        assert_eq!(whole, format!("{}\nend é\\x0d", block(HOSTILE)));
        for cut in 0..bytes.len() {
            let mut out = String::new();
            let mut e = BlockEscaper::new();
            e.push(&bytes[..cut], &mut out);
            e.push(&bytes[cut..], &mut out);
            e.finish(&mut out);
            assert_eq!(out, whole, "cut at {cut}");
        }
        let mut out = String::new();
        let mut e = BlockEscaper::new();
        e.push(b"ok \xff\xfe \xe2\x82", &mut out);
        e.finish(&mut out);
        assert_eq!(out, "ok \\xff\\xfe \\xe2\\x82");
    }
}

//! Step output on its way into a document: secrets redacted from the stream, and the head and
//! tail kept in bounded memory however much a step prints.

use std::collections::VecDeque;

/// How much output a document shows for one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    pub max_lines: usize,
    pub max_bytes: usize,
}

impl Default for OutputLimits {
    fn default() -> Self {
        OutputLimits {
            max_lines: 200,
            max_bytes: 64 * 1024,
        }
    }
}

/// Keeps the first and last part of a stream of output, in memory bounded by the limits.
#[derive(Debug)]
pub struct OutputCapture {
    limits: OutputLimits,
    head: Vec<u8>,
    head_lines: usize,
    head_full: bool,
    tail: VecDeque<u8>,
    evicted: bool,
    total_bytes: u64,
    total_lines: u64,
    ends_with_newline: bool,
}

/// What a capture kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// The output from its start: all of it when `omitted` is `None`.
    pub head: Vec<u8>,
    /// The end of the output, when some of the middle was left out.
    pub tail: Vec<u8>,
    /// What was left out between head and tail.
    pub omitted: Option<Omitted>,
    pub total_bytes: u64,
    pub total_lines: u64,
}

/// The part of an output a document does not show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Omitted {
    pub lines: u64,
    pub bytes: u64,
}

impl Captured {
    /// Whether the step printed nothing at all.
    pub fn is_empty(&self) -> bool {
        self.total_bytes == 0
    }
}

impl OutputCapture {
    pub fn new(limits: OutputLimits) -> OutputCapture {
        OutputCapture {
            limits,
            head: Vec::new(),
            head_lines: 0,
            head_full: false,
            tail: VecDeque::new(),
            evicted: false,
            total_bytes: 0,
            total_lines: 0,
            ends_with_newline: false,
        }
    }

    fn head_line_cap(&self) -> usize {
        self.limits.max_lines / 2
    }

    fn head_byte_cap(&self) -> usize {
        self.limits.max_bytes / 2
    }

    pub fn push(&mut self, mut data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.total_bytes += data.len() as u64;
        self.total_lines += data.iter().filter(|&&b| b == b'\n').count() as u64;
        self.ends_with_newline = data.last() == Some(&b'\n');
        while !self.head_full && !data.is_empty() {
            let room = self.head_byte_cap() - self.head.len();
            let take = match data.iter().position(|&b| b == b'\n') {
                Some(nl) if nl < room => nl + 1,
                _ => room.min(data.len()),
            };
            self.head.extend_from_slice(&data[..take]);
            if self.head.last() == Some(&b'\n') {
                self.head_lines += 1;
            }
            data = &data[take..];
            if self.head_lines >= self.head_line_cap() || self.head.len() >= self.head_byte_cap() {
                self.head_full = true;
            }
        }
        if data.is_empty() {
            return;
        }
        self.tail.extend(data);
        let cap = self.limits.max_bytes;
        if self.tail.len() > cap {
            let excess = self.tail.len() - cap;
            self.tail.drain(..excess);
            self.evicted = true;
        }
    }

    pub fn finish(self) -> Captured {
        let lines_in_all =
            self.total_lines + u64::from(!self.ends_with_newline && self.total_bytes > 0);
        let fits = !self.evicted
            && lines_in_all <= self.limits.max_lines as u64
            && self.total_bytes <= self.limits.max_bytes as u64;
        let mut tail: Vec<u8> = self.tail.into_iter().collect();
        if fits {
            let mut head = self.head;
            head.extend_from_slice(&tail);
            return Captured {
                head,
                tail: Vec::new(),
                omitted: None,
                total_bytes: self.total_bytes,
                total_lines: self.total_lines,
            };
        }
        // Keep at most half the limits for the tail, starting at a line boundary.
        let byte_cap = self.limits.max_bytes / 2;
        if tail.len() > byte_cap {
            tail.drain(..tail.len() - byte_cap);
            if let Some(nl) = tail.iter().position(|&b| b == b'\n') {
                if nl + 1 < tail.len() {
                    tail.drain(..=nl);
                }
            }
        }
        let line_cap = self.limits.max_lines - self.limits.max_lines / 2;
        let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
        let newlines: Vec<usize> = body
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i)
            .collect();
        if newlines.len() >= line_cap {
            let cut = newlines[newlines.len() - line_cap] + 1;
            tail.drain(..cut);
        }
        let kept_bytes = (self.head.len() + tail.len()) as u64;
        let kept_lines = (self
            .head
            .iter()
            .chain(tail.iter())
            .filter(|&&b| b == b'\n')
            .count()) as u64;
        Captured {
            omitted: Some(Omitted {
                lines: self.total_lines.saturating_sub(kept_lines),
                bytes: self.total_bytes.saturating_sub(kept_bytes),
            }),
            head: self.head,
            tail,
            total_bytes: self.total_bytes,
            total_lines: self.total_lines,
        }
    }
}

/// Replaces the values of secrets with `***` in a stream of bytes, also where a secret is split
/// across two chunks.
#[derive(Debug, Default, Clone)]
pub struct Redactor {
    secrets: Vec<Vec<u8>>,
    carry: Vec<u8>,
}

/// What a redacted secret reads as.
pub const REDACTED: &[u8] = b"***";

impl Redactor {
    pub fn new<I, S>(secrets: I) -> Redactor
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut secrets: Vec<Vec<u8>> = secrets
            .into_iter()
            .map(|s| s.as_ref().to_vec())
            .filter(|s| !s.is_empty())
            .collect();
        // Longest first, so a secret that contains another is redacted whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor {
            secrets,
            carry: Vec::new(),
        }
    }

    pub fn is_active(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// Redacts `data`, appending what can be released to `out`. A possible start of a secret at
    /// the end of `data` is held back until the next call or [`Redactor::finish`].
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.secrets.is_empty() {
            out.extend_from_slice(data);
            return;
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(data);
        let mut i = 0;
        'scan: while i < buf.len() {
            let rest = &buf[i..];
            for secret in &self.secrets {
                if rest.starts_with(secret) {
                    out.extend_from_slice(REDACTED);
                    i += secret.len();
                    continue 'scan;
                }
                if secret.len() > rest.len() && secret.starts_with(rest) {
                    // Perhaps a secret split across chunks: wait for more.
                    self.carry = rest.to_vec();
                    return;
                }
            }
            out.push(buf[i]);
            i += 1;
        }
    }

    /// Releases what was held back: at the end of the stream it cannot be a secret.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.carry);
    }

    /// Redacts a whole string at once.
    pub fn redact_str(&self, text: &str) -> String {
        let mut r = Redactor {
            secrets: self.secrets.clone(),
            carry: Vec::new(),
        };
        let mut out = Vec::with_capacity(text.len());
        r.push(text.as_bytes(), &mut out);
        r.finish(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(limits: OutputLimits, chunks: &[&[u8]]) -> Captured {
        let mut c = OutputCapture::new(limits);
        for chunk in chunks {
            c.push(chunk);
        }
        c.finish()
    }

    #[test]
    fn short_output_is_kept_whole() {
        let got = capture(OutputLimits::default(), &[b"one\n", b"two\nthr", b"ee\n"]);
        assert_eq!(got.omitted, None);
        assert_eq!(got.head, b"one\ntwo\nthree\n");
        assert_eq!(got.total_lines, 3);
    }

    #[test]
    fn long_output_keeps_head_and_tail_lines() {
        let text: String = (1..=1000).map(|n| format!("line {n}\n")).collect();
        let got = capture(
            OutputLimits {
                max_lines: 10,
                max_bytes: 1 << 20,
            },
            &[text.as_bytes()],
        );
        assert_eq!(
            String::from_utf8_lossy(&got.head),
            "line 1\nline 2\nline 3\nline 4\nline 5\n"
        );
        assert_eq!(
            String::from_utf8_lossy(&got.tail),
            "line 996\nline 997\nline 998\nline 999\nline 1000\n"
        );
        assert_eq!(got.omitted.map(|o| o.lines), Some(990));
    }

    #[test]
    fn output_over_the_byte_limit_is_cut_in_bounded_memory() {
        let mut c = OutputCapture::new(OutputLimits {
            max_lines: 200,
            max_bytes: 1024,
        });
        let chunk = vec![b'x'; 4096];
        for _ in 0..1000 {
            c.push(&chunk);
        }
        assert!(c.tail.len() <= 1024);
        let got = c.finish();
        assert_eq!(got.head.len(), 512);
        assert!(got.tail.len() <= 512);
        assert_eq!(got.total_bytes, 4096 * 1000);
        assert_eq!(
            got.omitted.unwrap().bytes,
            4096 * 1000 - got.head.len() as u64 - got.tail.len() as u64
        );
    }

    #[test]
    fn exactly_the_limit_is_not_cut() {
        let text: String = (1..=200).map(|n| format!("{n}\n")).collect();
        let got = capture(OutputLimits::default(), &[text.as_bytes()]);
        assert_eq!(got.omitted, None);
        let text: String = (1..=201).map(|n| format!("{n}\n")).collect();
        let got = capture(OutputLimits::default(), &[text.as_bytes()]);
        assert_eq!(got.omitted.map(|o| o.lines), Some(1));
    }

    #[test]
    fn secrets_are_redacted_across_chunk_boundaries() {
        let mut r = Redactor::new(["hunter2", "hunter2-long"]);
        let mut out = Vec::new();
        for chunk in [
            &b"pass: hun"[..],
            b"ter2 and hunter2-lo",
            b"ng, hunt",
            b"er",
        ] {
            r.push(chunk, &mut out);
        }
        r.finish(&mut out);
        assert_eq!(String::from_utf8_lossy(&out), "pass: *** and ***, hunter");
    }

    #[test]
    fn no_secrets_passes_bytes_through() {
        let mut r = Redactor::new(Vec::<String>::new());
        let mut out = Vec::new();
        r.push(b"plain", &mut out);
        r.finish(&mut out);
        assert_eq!(out, b"plain");
        assert!(!r.is_active());
    }
}

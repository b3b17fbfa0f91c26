//! Aligned tables for people.

use std::io::{self, Write};

/// How a column lines up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table: a header and rows of cells, printed with every column as wide as its widest cell.
#[derive(Debug)]
pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row. Cells are shown with control characters escaped
    /// ([`upstream_doc::terminal::line`]): a sandbox names files and titles, and what it names
    /// neither steers the terminal nor breaks the columns.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| match upstream_doc::terminal::line(&c) {
                    std::borrow::Cow::Borrowed(_) => c,
                    std::borrow::Cow::Owned(escaped) => escaped,
                })
                .collect(),
        );
    }

    pub fn print(&self, out: &mut impl Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.columns.iter().map(|(h, _)| h.len()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut dyn Write| {
            let mut text = String::new();
            for (i, cell) in cells.enumerate() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                let last = i + 1 == self.columns.len();
                match self.columns[i].1 {
                    Align::Right => {
                        text.push_str(&" ".repeat(pad));
                        text.push_str(cell);
                    }
                    Align::Left => {
                        text.push_str(cell);
                        if !last {
                            text.push_str(&" ".repeat(pad));
                        }
                    }
                }
                if !last {
                    text.push_str("  ");
                }
            }
            writeln!(out, "{}", text.trim_end())
        };
        line(&mut self.columns.iter().map(|(h, _)| *h), out)?;
        for row in &self.rows {
            line(&mut row.iter().map(String::as_str), out)?;
        }
        Ok(())
    }
}

/// A time as `2026-11-29 03:10:05Z` (UTC).
pub fn time(epoch_seconds: f64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(epoch_seconds.max(0.0));
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replacen('T', " ", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let mut t = Table::new(&[("TURN", Align::Right), ("DOCUMENT", Align::Left)]);
        t.row(vec!["1".into(), "a.md".into()]);
        t.row(vec!["12".into(), "research.md".into()]);
        let mut out = Vec::new();
        t.print(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "TURN  DOCUMENT\n   1  a.md\n  12  research.md\n"
        );
    }

    #[test]
    fn control_characters_in_cells_are_shown_escaped() {
        let mut t = Table::new(&[("PATH", Align::Left), ("KIND", Align::Left)]);
        t.row(vec!["a\x1b]0;t\x07\u{202e}b\nc".into(), "file".into()]);
        let mut out = Vec::new();
        t.print(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            // The escaped cell is 27 characters wide: the header is padded to it.
            "PATH                         KIND\na\\x1b]0;t\\x07\\u{202e}b\\x0ac  file\n"
        );
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(time(0.0), "1970-01-01 00:00:00Z");
    }
}

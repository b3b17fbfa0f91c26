//! A step's log: its stdout and stderr as they arrived, in one blob.
//!
//! The log is a sequence of chunks, each a stream byte (1 stdout, 2 stderr), a 32-bit
//! little-endian length and that many bytes. Replaying it gives either stream alone or both
//! in the order they were printed.

use std::io::{self, Read, Write};

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout = 1,
    Stderr = 2,
}

/// Writes chunks to `inner`.
#[derive(Debug)]
pub struct LogWriter<W: Write> {
    inner: W,
}

impl<W: Write> LogWriter<W> {
    pub fn new(inner: W) -> LogWriter<W> {
        LogWriter { inner }
    }

    pub fn chunk(&mut self, stream: LogStream, data: &[u8]) -> io::Result<()> {
        for piece in data.chunks(u32::MAX as usize) {
            self.inner.write_all(&[stream as u8])?;
            self.inner.write_all(&(piece.len() as u32).to_le_bytes())?;
            self.inner.write_all(piece)?;
        }
        Ok(())
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Reads a log's chunks back, calling `each` for every one in order.
pub fn replay(
    mut reader: impl Read,
    mut each: impl FnMut(LogStream, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let mut head = [0u8; 5];
        if !read_exact_or_eof(&mut reader, &mut head)? {
            return Ok(());
        }
        let stream = match head[0] {
            1 => LogStream::Stdout,
            2 => LogStream::Stderr,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not a step log: chunk of stream {other}"),
                ));
            }
        };
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        buf.resize(len.min(1 << 20), 0);
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            reader.read_exact(&mut buf[..n])?;
            each(stream, &buf[..n])?;
            left -= n;
        }
    }
}

/// Fills `buf`, or returns false at a clean end of input.
fn read_exact_or_eof(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_come_back_in_order() {
        let mut log = LogWriter::new(Vec::new());
        log.chunk(LogStream::Stdout, b"one\n").unwrap();
        log.chunk(LogStream::Stderr, b"warn\n").unwrap();
        log.chunk(LogStream::Stdout, b"two\n").unwrap();
        let bytes = log.into_inner();
        let mut seen = Vec::new();
        replay(&bytes[..], |s, d| {
            seen.push((s, d.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (LogStream::Stdout, b"one\n".to_vec()),
                (LogStream::Stderr, b"warn\n".to_vec()),
                (LogStream::Stdout, b"two\n".to_vec()),
            ]
        );
    }

    #[test]
    fn a_truncated_log_is_an_error() {
        let mut log = LogWriter::new(Vec::new());
        log.chunk(LogStream::Stdout, b"hello").unwrap();
        let bytes = log.into_inner();
        let result = replay(&bytes[..bytes.len() - 1], |_, _| Ok(()));
        assert!(result.is_err());
    }
}

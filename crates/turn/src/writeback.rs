//! Writing results into the user's document: atomically, and never over someone else's edit.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// What became of the results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteBack {
    /// The document now holds the results.
    Written,
    /// The document changed while the turn ran; it was left as it is (the results are in
    /// the store).
    Conflict,
}

/// Replaces `path` with `rendered` if it still holds `original`. The replacement is a rename
/// of a fully written, synced file, so the document is never seen half-written.
pub fn write_back(path: &Path, original: &[u8], rendered: &str) -> io::Result<WriteBack> {
    let current = fs::read(path)?;
    if current != original {
        return Ok(WriteBack::Conflict);
    }
    if rendered.as_bytes() == original {
        return Ok(WriteBack::Written);
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.upstream-{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = fs::File::create(&temp)?;
        file.write_all(rendered.as_bytes())?;
        file.set_permissions(fs::metadata(path)?.permissions())?;
        file.sync_all()?;
        // A last look: an edit that landed while we wrote wins.
        if fs::read(path)? != original {
            return Ok(WriteBack::Conflict);
        }
        fs::rename(&temp, path)?;
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(WriteBack::Written)
    })();
    let _ = fs::remove_file(&temp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_document_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let doc = tmp.path().join("doc.md");
        fs::write(&doc, "before").unwrap();
        assert_eq!(
            write_back(&doc, b"before", "after").unwrap(),
            WriteBack::Written
        );
        assert_eq!(fs::read_to_string(&doc).unwrap(), "after");
        let leftovers: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn edited_document_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let doc = tmp.path().join("doc.md");
        fs::write(&doc, "edited by someone").unwrap();
        let got = write_back(&doc, b"before", "after").unwrap();
        assert_eq!(got, WriteBack::Conflict);
        assert_eq!(fs::read_to_string(&doc).unwrap(), "edited by someone");
    }
}

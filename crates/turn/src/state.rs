//! Where a turn keeps what it produced: the `.upstream/` directory found by walking up from
//! the document, as git finds `.git`, and created beside the document on first use.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The name of the state directory.
pub const STATE_DIR: &str = ".upstream";

/// Finds the `.upstream/` directory for a document, creating one beside it if none exists
/// above it. `$UPSTREAM_STATE_DIR` names one outright.
pub fn state_dir_for(document: &Path) -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("UPSTREAM_STATE_DIR") {
        let dir = PathBuf::from(dir);
        fs::create_dir_all(&dir)?;
        return Ok(dir);
    }
    let absolute = std::path::absolute(document)?;
    let start = absolute
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let mut dir = Some(start.as_path());
    while let Some(d) = dir {
        let candidate = d.join(STATE_DIR);
        if candidate.is_dir() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    let created = start.join(STATE_DIR);
    fs::create_dir_all(&created)?;
    fs::write(created.join(".gitignore"), "*\n")?;
    Ok(created)
}

/// Creates the directory of one turn's logs and record.
pub fn run_dir(state: &Path, turn_id: &str) -> io::Result<PathBuf> {
    let dir = state.join("runs").join(turn_id);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `path` relative to `base` when it is below it, for messages.
pub fn relative_to(path: &Path, base: &Path) -> PathBuf {
    let abs_base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    path.strip_prefix(&abs_base)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_is_found_above_and_created_beside() {
        let tmp = tempfile::tempdir().unwrap();
        let nested = tmp.path().join("a/b");
        fs::create_dir_all(&nested).unwrap();
        let created = state_dir_for(&nested.join("doc.md")).unwrap();
        assert_eq!(created, nested.join(STATE_DIR));
        fs::remove_dir_all(&created).unwrap();
        fs::create_dir(tmp.path().join(STATE_DIR)).unwrap();
        assert_eq!(
            state_dir_for(&nested.join("doc.md")).unwrap(),
            tmp.path().join(STATE_DIR)
        );
    }
}

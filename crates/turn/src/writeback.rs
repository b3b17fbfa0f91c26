//! Writing results into the user's document: atomically, never over someone else's edit, and
//! leaving the file the user's.
//!
//! The document is replaced by renaming a fully written, synced file over it, so it is never
//! seen half-written. What the user made of the file stays as it was:
//! - a document that is a symlink is written through it: its target gets the results and the
//!   link stays a link;
//! - the new file gets the old one's owner, group and mode (permission bits, setgid and
//!   sticky bits included);
//! - a document with other hard links loses them (each other name keeps the document as it
//!   was before the turn, whole): writing in place would keep them, but a crash midway would
//!   leave every name half-written. [`WriteBack::Unlinked`] says so;
//! - where the owner cannot be kept (the file is another user's, and this process may write
//!   it but not give a file away) or no new file can be made beside it (a directory the user
//!   may not write), the document is written in place instead; the store keeps the document as
//!   it was read, so even a crash midway loses nothing (`upstream show N --document`).

use std::fs;
use std::io::{self, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What became of the results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteBack {
    /// The document now holds the results.
    Written,
    /// The document holds the results, and its other hard links (`links` names in all,
    /// this one included) hold it as it was before.
    Unlinked { links: u64 },
    /// The document changed while the turn ran; it was left as it is (the results are in
    /// the store).
    Conflict,
}

/// Replaces `path` (or, if it is a symlink, the file it leads to) with `rendered` if it still
/// holds `original`, keeping its owner and mode.
pub fn write_back(path: &Path, original: &[u8], rendered: &str) -> io::Result<WriteBack> {
    let current = fs::read(path)?;
    if current != original {
        return Ok(WriteBack::Conflict);
    }
    if rendered.as_bytes() == original {
        return Ok(WriteBack::Written);
    }
    // The file itself, wherever links lead: the links stay as they are.
    let target = fs::canonicalize(path)?;
    let meta = fs::metadata(&target)?;
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (temp, mut file) = match new_beside(&dir, &name) {
        Ok(made) => made,
        Err(e) if denied(&e) => return in_place(&target, original, rendered),
        Err(e) => return Err(e),
    };
    let result = (|| {
        file.write_all(rendered.as_bytes())?;
        match keep_owner(&file, &meta) {
            Ok(()) => {}
            Err(e) if denied(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        // After the owner: a change of owner clears the setgid bit.
        file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        file.sync_all()?;
        // A last look: an edit that landed while we wrote wins.
        if fs::read(&target)? != original {
            return Ok(Some(WriteBack::Conflict));
        }
        fs::rename(&temp, &target)?;
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(Some(match meta.nlink() {
            0 | 1 => WriteBack::Written,
            links => WriteBack::Unlinked { links },
        }))
    })();
    let _ = fs::remove_file(&temp);
    match result? {
        Some(done) => Ok(done),
        None => in_place(&target, original, rendered),
    }
}

fn denied(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EACCES | libc::EROFS)
    )
}

/// A new file in `dir` named after `name`, readable by its owner only until it is done; made,
/// never opened through a link someone put in its place.
fn new_beside(dir: &Path, name: &str) -> io::Result<(PathBuf, fs::File)> {
    let mut attempt = 0u32;
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let temp = dir.join(format!(
            ".{name}.upstream-{}-{nanos:x}.tmp",
            std::process::id()
        ));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)
        {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Gives `file` the owner and group of the document `meta` describes, where they differ.
fn keep_owner(file: &fs::File, meta: &fs::Metadata) -> io::Result<()> {
    let mine = file.metadata()?;
    if mine.uid() == meta.uid() && mine.gid() == meta.gid() {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, Some(meta.uid()), Some(meta.gid()))
}

/// Writes `rendered` into the document itself, if it still holds `original`.
fn in_place(target: &Path, original: &[u8], rendered: &str) -> io::Result<WriteBack> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(target)?;
    let mut current = Vec::with_capacity(original.len());
    io::Read::read_to_end(&mut file, &mut current)?;
    if current != original {
        return Ok(WriteBack::Conflict);
    }
    file.rewind()?;
    file.write_all(rendered.as_bytes())?;
    file.set_len(rendered.len() as u64)?;
    file.sync_all()?;
    Ok(WriteBack::Written)
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

    #[test]
    fn the_document_keeps_its_owner_group_and_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let doc = tmp.path().join("doc.md");
        fs::write(&doc, "before").unwrap();
        let root = nix::unistd::geteuid().is_root();
        // As root, a document of another user's; else one's own, which still keeps its mode.
        let (uid, gid) = if root {
            (4321, 8765)
        } else {
            let m = fs::metadata(&doc).unwrap();
            (m.uid(), m.gid())
        };
        std::os::unix::fs::chown(&doc, Some(uid), Some(gid)).unwrap();
        fs::set_permissions(&doc, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            write_back(&doc, b"before", "after").unwrap(),
            WriteBack::Written
        );
        let meta = fs::metadata(&doc).unwrap();
        assert_eq!(fs::read_to_string(&doc).unwrap(), "after");
        assert_eq!((meta.uid(), meta.gid()), (uid, gid));
        assert_eq!(meta.mode() & 0o7777, 0o640);
    }

    #[test]
    fn a_symlinked_document_is_written_through_the_link_which_stays_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("real")).unwrap();
        let real = tmp.path().join("real/doc.md");
        fs::write(&real, "before").unwrap();
        let link = tmp.path().join("doc.md");
        std::os::unix::fs::symlink("real/doc.md", &link).unwrap();
        assert_eq!(
            write_back(&link, b"before", "after").unwrap(),
            WriteBack::Written
        );
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("real/doc.md"));
        assert_eq!(fs::read_to_string(&real).unwrap(), "after");
        let beside: Vec<_> = fs::read_dir(tmp.path().join("real")).unwrap().collect();
        assert_eq!(
            beside.len(),
            1,
            "no temporary file is left beside the target"
        );
    }

    #[test]
    fn a_hard_linked_document_says_its_other_names_keep_the_old_text() {
        let tmp = tempfile::tempdir().unwrap();
        let doc = tmp.path().join("doc.md");
        let other = tmp.path().join("copy.md");
        fs::write(&doc, "before").unwrap();
        fs::hard_link(&doc, &other).unwrap();
        assert_eq!(
            write_back(&doc, b"before", "after").unwrap(),
            WriteBack::Unlinked { links: 2 }
        );
        assert_eq!(fs::read_to_string(&doc).unwrap(), "after");
        assert_eq!(
            fs::read_to_string(&other).unwrap(),
            "before",
            "whole, as it was"
        );
    }

    #[test]
    fn in_place_writes_keep_the_file_and_never_write_over_an_edit() {
        let tmp = tempfile::tempdir().unwrap();
        let doc = tmp.path().join("doc.md");
        fs::write(&doc, "before and longer").unwrap();
        let inode = fs::metadata(&doc).unwrap().ino();
        assert_eq!(
            in_place(&doc, b"before and longer", "after").unwrap(),
            WriteBack::Written
        );
        assert_eq!(fs::read_to_string(&doc).unwrap(), "after");
        assert_eq!(fs::metadata(&doc).unwrap().ino(), inode, "the same file");
        assert_eq!(
            in_place(&doc, b"before and longer", "again").unwrap(),
            WriteBack::Conflict
        );
        assert_eq!(fs::read_to_string(&doc).unwrap(), "after");
    }
}

//! A VM's disks: the image as a read-only ext4 disk made once per unpacked image and kept,
//! and a disk of the sandbox's own — sparse, as large as its disk limit — for the overlay's
//! writable layer and the workspace, thrown away with it. Both are made with `mke2fs`
//! (from a directory, `-d`), which needs no privilege and no loop device.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Room a root disk has beyond what its files take, for ext4's own structures.
const ROOT_SLACK: u64 = 64 << 20;

/// The read-only disk of the image unpacked at `rootfs`, made in `cache` the first time.
pub fn root_disk(cache: &Path, rootfs: &Path) -> io::Result<PathBuf> {
    let meta = fs::metadata(rootfs)?;
    let mut key = blake3::Hasher::new();
    key.update(b"upstream root disk 1\0");
    key.update(rootfs.as_os_str().as_encoded_bytes());
    key.update(&meta.dev().to_le_bytes());
    key.update(&meta.ino().to_le_bytes());
    key.update(&meta.ctime().to_le_bytes());
    key.update(&meta.ctime_nsec().to_le_bytes());
    let name = format!("{}.ext4", &key.finalize().to_hex()[..32]);
    let path = cache.join(&name);
    if path.is_file() {
        return Ok(path);
    }
    fs::create_dir_all(cache)?;
    let (bytes, inodes) = usage(rootfs)?;
    // Half as much again as the files, and an inode for each with as many to spare.
    let size = (bytes + bytes / 2 + ROOT_SLACK).div_ceil(1 << 20) << 20;
    let temp = cache.join(format!("{name}.{}.tmp", std::process::id()));
    let result = mke2fs(
        &temp,
        size,
        &[
            "-d".as_ref(),
            rootfs.as_os_str(),
            "-N".as_ref(),
            (inodes * 2 + 1024).to_string().as_ref(),
            "-L".as_ref(),
            "upstream-root".as_ref(),
        ],
    )
    .and_then(|()| fs::rename(&temp, &path));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map(|()| path)
}

/// A new, empty ext4 disk at `path` of `size` bytes (sparse: it takes what is written).
pub fn scratch_disk(path: &Path, size: u64) -> io::Result<()> {
    mke2fs(path, size, &["-L".as_ref(), "upstream-scratch".as_ref()])
}

fn mke2fs(path: &Path, size: u64, extra: &[&std::ffi::OsStr]) -> io::Result<()> {
    let file = fs::File::create(path)?;
    file.set_len(size)?;
    drop(file);
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-m", "0", "-b", "4096"])
        .args([
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
        ])
        .args(extra)
        .arg(path)
        .arg(format!("{}k", size / 1024))
        .env("MKE2FS_SYNC", "0")
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot run mke2fs (Debian's e2fsprogs): {e}"),
            )
        })?;
    if !out.status.success() {
        let _ = fs::remove_file(path);
        return Err(io::Error::other(format!(
            "mke2fs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The bytes and entries below `dir`, not following links (iteratively: an image's tree
/// may be deep).
fn usage(dir: &Path) -> io::Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut entries = 0u64;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(at) = todo.pop() {
        for entry in fs::read_dir(&at)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            entries += 1;
            // Whole blocks, as the disk will hold them.
            bytes += meta.blocks() * 512;
            if meta.is_dir() {
                todo.push(entry.path());
            }
        }
    }
    Ok((bytes, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_disk_is_made_once_per_unpacked_image() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(rootfs.join("usr/bin")).unwrap();
        fs::write(rootfs.join("usr/bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
        let cache = dir.path().join("cache");
        let first = root_disk(&cache, &rootfs).unwrap();
        let made = fs::metadata(&first).unwrap().mtime_nsec();
        let again = root_disk(&cache, &rootfs).unwrap();
        assert_eq!(first, again);
        assert_eq!(
            fs::metadata(&again).unwrap().mtime_nsec(),
            made,
            "made again"
        );
        // The disk holds the file: debugfs reads it back.
        let out = Command::new("debugfs")
            .args(["-R", "cat /usr/bin/hello"])
            .arg(&first)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "#!/bin/sh\necho hi\n");
    }
}

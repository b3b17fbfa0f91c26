//! A VM's disks: the image as a read-only ext4 disk made once per unpacked image and kept
//! (the host's files for `image: host`: [`crate::host_disk`]), and a disk of the sandbox's own — sparse, as large as its disk limit — for the overlay's
//! writable layer and the workspace, thrown away with it. Both are made with `mke2fs`
//! (from a directory, `-d`), which needs no privilege and no loop device.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Room a root disk has beyond what its files take, for ext4's own structures.
pub(crate) const ROOT_SLACK: u64 = 64 << 20;

/// The read-only disk of the image unpacked at `rootfs`, made in `cache` the first time.
pub fn root_disk(cache: &Path, rootfs: &Path) -> io::Result<PathBuf> {
    let meta = fs::metadata(rootfs)?;
    let mut key = blake3::Hasher::new();
    key.update(b"upstream root disk 3\0");
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
    let temp = cache.join(format!(
        "{name}.{}.tmp",
        upstream_sandbox::runtime::unique_name()
    ));
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
    // Readable by the VMM, which runs as a user of its own and reaches it through a
    // descriptor upstream opened (`confine`); the cache directory stays private.
    .and_then(|()| fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(0o644)))
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

/// [`scratch_disk`] copied from a template of that size made once in `cache`: formatting a
/// large disk writes its group descriptors and bitmaps each time, copying only what the
/// template holds (a few megabytes of a sparse file) does not.
pub fn scratch_disk_from(cache: &Path, path: &Path, size: u64) -> io::Result<()> {
    let template = cache.join(format!("scratch-v2-{}.ext4", size >> 20));
    if !template.is_file() {
        fs::create_dir_all(cache)?;
        let temp = cache.join(format!(
            "scratch-{}.ext4.{}.tmp",
            size >> 20,
            upstream_sandbox::runtime::unique_name()
        ));
        let made = scratch_disk(&temp, size).and_then(|()| fs::rename(&temp, &template));
        if made.is_err() {
            let _ = fs::remove_file(&temp);
            // Another upstream may have made it meanwhile.
            if !template.is_file() {
                return made;
            }
        }
    }
    sparse_copy(&template, path)
}

/// Copies `from` to a new file `to`, holes and all: by reflink where the filesystem shares
/// blocks, else only the extents that hold data.
pub fn sparse_copy(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let source = fs::File::open(from)?;
    let target = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both are open.
    if unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let len = source.metadata()?.len();
    target.set_len(len)?;
    let mut at: i64 = 0;
    while (at as u64) < len {
        // SAFETY: lseek on an open descriptor; it touches no memory.
        let data = unsafe { libc::lseek(source.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            // No data past `at`: the rest is a hole.
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(source.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut from_at = data;
        let mut to_at = data;
        while from_at < hole {
            let want = (hole - from_at) as usize;
            // SAFETY: copy_file_range between two open descriptors, with offsets this
            // function owns.
            let n = unsafe {
                libc::copy_file_range(
                    source.as_raw_fd(),
                    &mut from_at,
                    target.as_raw_fd(),
                    &mut to_at,
                    want,
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
        }
        at = hole;
    }
    Ok(())
}

/// Makes an ext4 filesystem without a journal: an image's disk is only read, and a
/// sandbox's is thrown away with it (a crash loses nothing a journal would have kept), and
/// mounting one with a journal costs a guest under TCG its setup.
pub(crate) fn mke2fs(path: &Path, size: u64, extra: &[&std::ffi::OsStr]) -> io::Result<()> {
    let file = fs::File::create(path)?;
    file.set_len(size)?;
    drop(file);
    let mut command = Command::new("mke2fs");
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        // An upstream killed while it makes a disk (the host's takes minutes) leaves no
        // mke2fs writing gigabytes nobody will use: the thread that waits for it is gone.
        command.pre_exec(
            || match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            },
        );
    }
    let out = command
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

/// The disk at `path` is a whole ext4 filesystem, as `e2fsck` checks it without changing it.
#[cfg(test)]
pub(crate) fn assert_whole(path: &Path) {
    let out = Command::new("e2fsck")
        .args(["-n", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// What `debugfs` prints for `request` on the disk at `path`.
#[cfg(test)]
pub(crate) fn debugfs(path: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads of one process (a daemon's, a test's) that need the same image's disk at
    /// once each get it whole: none writes over another's half-made disk or renames it
    /// away. The control: the disk is checked whole, holding the image's file.
    #[test]
    fn threads_making_the_same_root_disk_at_once_all_get_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        for n in 0..200 {
            fs::write(rootfs.join(format!("etc/file-{n}")), vec![b'x'; 4096]).unwrap();
        }
        std::os::unix::fs::symlink("usr/bin", rootfs.join("bin")).unwrap();
        let cache = dir.path().join("cache");
        let made: Vec<_> = (0..4)
            .map(|_| {
                let (cache, rootfs) = (cache.clone(), rootfs.clone());
                std::thread::spawn(move || root_disk(&cache, &rootfs))
            })
            .collect();
        let paths: Vec<PathBuf> = made
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        assert!(paths.iter().all(|p| p == &paths[0]), "{paths:?}");
        assert_whole(&paths[0]);
        let listed = debugfs(&paths[0], "ls /etc");
        assert!(listed.contains("file-199"), "{listed}");
        // Nothing half-made is left beside it.
        let left: Vec<_> = fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn a_scratch_disk_from_its_template_is_a_whole_sparse_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("one.ext4");
        scratch_disk_from(&dir.path().join("cache"), &disk, 1 << 30).unwrap();
        let meta = fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        assert!(
            meta.blocks() * 512 < 64 << 20,
            "{} bytes taken",
            meta.blocks() * 512
        );
        assert_whole(&disk);
        // A second from the same template.
        let two = dir.path().join("two.ext4");
        scratch_disk_from(&dir.path().join("cache"), &two, 1 << 30).unwrap();
        let hash = |path: &Path| {
            let mut hasher = blake3::Hasher::new();
            hasher.update_reader(fs::File::open(path).unwrap()).unwrap();
            hasher.finalize()
        };
        assert_eq!(hash(&disk), hash(&two));
    }

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

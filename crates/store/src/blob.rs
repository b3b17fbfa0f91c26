//! Content-addressed blobs: files named by the BLAKE3 hash of their bytes.
//!
//! A blob is written to a temporary name in `tmp/`, hashed as it is written, made durable,
//! then renamed to `blobs/<first two hex digits>/<the rest>`; only then may a record point
//! to it. Identical content is stored once: a blob already present is not written again.
//! Reading a blob hashes it again, so a blob damaged on disk is reported, with its path,
//! instead of being handed on.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The BLAKE3 hash naming a blob, as 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct BlobId(String);

impl BlobId {
    /// Parses 64 hex digits.
    pub fn parse(text: &str) -> Option<BlobId> {
        let ok = text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| BlobId(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn from_hash(hash: blake3::Hash) -> BlobId {
        BlobId(hash.to_hex().to_string())
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Errors reading a blob.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {path} is missing from the store")]
    Missing { path: PathBuf },
    #[error(
        "blob {path} is corrupt: its content hashes to {actual}, not to its name; the store's copy of this data is damaged"
    )]
    Corrupt { path: PathBuf, actual: String },
    #[error("cannot read blob {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The blob directory of a store.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
    tmp: PathBuf,
}

static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// Temporary files are spread over this many directories, one per writing thread, so that
/// threads writing blobs at once do not queue on one directory's lock.
const TEMP_DIRS: usize = 8;

thread_local! {
    static TEMP_DIR: usize = {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) as usize % TEMP_DIRS
    };
}

impl Blobs {
    pub(crate) fn new(dir: PathBuf, tmp: PathBuf) -> Blobs {
        Blobs { dir, tmp }
    }

    /// Makes the 256 shard directories and the temporary directories, once per store: a
    /// save then never pays for making directories.
    pub(crate) fn prepare(&self) -> io::Result<()> {
        if self.dir.join("ff").is_dir() && self.tmp.join((TEMP_DIRS - 1).to_string()).is_dir() {
            return Ok(());
        }
        for shard in 0..=255u8 {
            fs::create_dir_all(self.dir.join(format!("{shard:02x}")))?;
        }
        for i in 0..TEMP_DIRS {
            fs::create_dir_all(self.tmp.join(i.to_string()))?;
        }
        Ok(())
    }

    /// Where blob `id` lives.
    pub fn path(&self, id: &BlobId) -> PathBuf {
        self.dir.join(&id.0[..2]).join(&id.0[2..])
    }

    pub fn contains(&self, id: &BlobId) -> bool {
        self.path(id).is_file()
    }

    /// Starts a new blob; its name is known when it is finished.
    pub fn writer(&self) -> io::Result<BlobWriter> {
        let name = format!(
            "{}-{}-{:08x}",
            std::process::id(),
            NEXT_TEMP.fetch_add(1, Ordering::Relaxed),
            rand_u32()
        );
        let path = self.tmp.join(TEMP_DIR.with(|d| d.to_string())).join(name);
        let file = File::options().write(true).create_new(true).open(&path)?;
        Ok(BlobWriter {
            file: io::BufWriter::with_capacity(256 << 10, file),
            hasher: blake3::Hasher::new(),
            path,
            size: 0,
        })
    }

    /// Stores `data` as a blob, durably; content the store holds already is not written.
    pub fn put(&self, data: &[u8]) -> io::Result<BlobId> {
        let id = BlobId::from_hash(blake3::hash(data));
        if self.contains(&id) {
            return Ok(id);
        }
        let mut writer = self.writer()?;
        writer.write_all(data)?;
        let pending = writer.finish()?;
        let id = pending.id.clone();
        self.commit(vec![pending])?;
        Ok(id)
    }

    /// Makes finished blobs durable and puts them in place: the temporary files reach the
    /// disk, are renamed to their names (or dropped where that blob already exists), and the
    /// renames reach the disk. After this, records may point to them.
    pub fn commit(&self, mut pending: Vec<PendingBlob>) -> io::Result<()> {
        pending.retain(|p| p.temp.is_some());
        if pending.is_empty() {
            return Ok(());
        }
        // Few files: a flush of each file and directory. Many: one flush of the whole
        // filesystem for the contents and one for the renames, which costs far less than a
        // journal commit per file and per directory.
        let many = pending.len() > 2;
        if many {
            syncfs(&self.tmp)?;
        } else {
            for p in &pending {
                File::open(p.temp.as_ref().expect("kept above"))?.sync_data()?;
            }
        }
        let mut shards = BTreeSet::new();
        for p in &mut pending {
            let temp = p.temp.take().expect("kept above");
            let target = self.path(&p.id);
            let shard = target
                .parent()
                .expect("blob paths have a shard")
                .to_path_buf();
            if target.exists() {
                fs::remove_file(&temp)?;
                continue;
            }
            if let Err(e) = fs::rename(&temp, &target) {
                if e.kind() != io::ErrorKind::NotFound {
                    p.temp = Some(temp);
                    return Err(e);
                }
                fs::create_dir_all(&shard)?;
                if !many {
                    File::open(&self.dir)?.sync_all()?;
                }
                fs::rename(&temp, &target)?;
            }
            shards.insert(shard);
        }
        if many {
            syncfs(&self.dir)?;
        } else {
            for shard in shards {
                File::open(shard)?.sync_all()?;
            }
        }
        Ok(())
    }

    /// Opens blob `id` for reading; the reader fails at the end if the bytes do not hash to
    /// `id`, so nothing read from a damaged blob passes unnoticed.
    pub fn open(&self, id: &BlobId) -> Result<BlobReader, BlobError> {
        let path = self.path(id);
        let file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BlobError::Missing { path: path.clone() },
            _ => BlobError::Io {
                path: path.clone(),
                source: e,
            },
        })?;
        Ok(BlobReader {
            inner: BufReader::with_capacity(256 << 10, file),
            hasher: blake3::Hasher::new(),
            expected: id.clone(),
            path,
            checked: false,
        })
    }

    /// Copies blob `id` to the end of `target`, checked against its name before a byte is
    /// copied: the blob is hashed through a mapping in `arena` (no copy), then copied inside
    /// the kernel (`sendfile`, as `cp` does). `Ok(false)` when the blob does not fit in the
    /// arena (copy it with [`Blobs::open`] instead).
    pub fn copy_checked(
        &self,
        id: &BlobId,
        arena: &mut MapArena,
        target: &File,
    ) -> Result<bool, BlobError> {
        let path = self.path(id);
        let fail = |e: io::Error| match e.kind() {
            io::ErrorKind::NotFound => BlobError::Missing { path: path.clone() },
            _ => BlobError::Io {
                path: path.clone(),
                source: e,
            },
        };
        let file = File::open(&path).map_err(fail)?;
        let len = file.metadata().map_err(fail)?.len() as usize;
        let Some(bytes) = arena.map(&file, len).map_err(fail)? else {
            return Ok(false);
        };
        let actual = BlobId::from_hash(blake3::hash(bytes));
        if &actual != id {
            return Err(BlobError::Corrupt {
                path,
                actual: actual.0,
            });
        }
        let mut offset: libc::off_t = 0;
        while (offset as usize) < len {
            // SAFETY: sendfile between two descriptors this function holds; `offset` is a
            // local the kernel advances.
            let n = unsafe {
                libc::sendfile(
                    target.as_raw_fd(),
                    file.as_raw_fd(),
                    &mut offset,
                    len - offset as usize,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(BlobError::Io {
                    path: path.clone(),
                    source: e,
                });
            }
            if n == 0 {
                break;
            }
        }
        Ok(true)
    }

    /// Reads a whole blob, checked.
    pub fn read(&self, id: &BlobId) -> Result<Vec<u8>, BlobError> {
        let mut reader = self.open(id)?;
        let mut data = Vec::new();
        reader.read_to_end(&mut data).map_err(|e| reader.error(e))?;
        Ok(data)
    }

    /// Checks blob `id` against its name without keeping its bytes.
    pub fn verify(&self, id: &BlobId) -> Result<u64, BlobError> {
        let mut reader = self.open(id)?;
        io::copy(&mut reader, &mut io::sink()).map_err(|e| reader.error(e))
    }

    /// Every blob on disk.
    pub fn list(&self) -> io::Result<Vec<(BlobId, u64)>> {
        let mut all = Vec::new();
        let shards = match fs::read_dir(&self.dir) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(all),
            Err(e) => return Err(e),
        };
        for shard in shards {
            let shard = shard?;
            let prefix = shard.file_name().to_string_lossy().into_owned();
            if prefix.len() != 2 || !shard.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(shard.path())? {
                let entry = entry?;
                let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
                if let Some(id) = BlobId::parse(&name) {
                    all.push((id, entry.metadata()?.len()));
                }
            }
        }
        Ok(all)
    }

    /// Removes blob `id`.
    pub(crate) fn remove(&self, id: &BlobId) -> io::Result<()> {
        match fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes temporary files left by processes that died while writing them.
    pub(crate) fn remove_abandoned_temps(&self) {
        let dirs = (0..TEMP_DIRS).map(|i| self.tmp.join(i.to_string()));
        let entries = dirs
            .filter_map(|d| fs::read_dir(d).ok())
            .flat_map(|entries| entries.flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()));
        for entry in entries {
            let name = entry.file_name();
            let owner = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|pid| pid.parse::<i32>().ok());
            let alive = owner.is_some_and(|pid| {
                pid as u32 == std::process::id()
                    || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            });
            if !alive {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

fn syncfs(dir: &Path) -> io::Result<()> {
    let file = File::open(dir)?;
    nix::unistd::syncfs(file.as_fd()).map_err(io::Error::from)
}

/// Sets temporary names of processes with a reused pid apart; a clash only makes
/// `create_new` fail, which the caller reports.
fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// A blob being written: bytes go to a temporary file and into the hash.
#[derive(Debug)]
pub struct BlobWriter {
    file: io::BufWriter<File>,
    hasher: blake3::Hasher,
    path: PathBuf,
    size: u64,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Ends the blob. It is not durable until [`Blobs::commit`].
    pub fn finish(mut self) -> io::Result<PendingBlob> {
        self.file.flush()?;
        let id = BlobId::from_hash(self.hasher.finalize());
        let temp = std::mem::take(&mut self.path);
        Ok(PendingBlob {
            id,
            size: self.size,
            temp: Some(temp),
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Abandoned before `finish`: the temporary file goes.
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A finished blob waiting for [`Blobs::commit`].
#[derive(Debug)]
pub struct PendingBlob {
    pub id: BlobId,
    pub size: u64,
    /// The temporary file; `None` for a blob the store already holds.
    temp: Option<PathBuf>,
}

impl PendingBlob {
    /// A blob already in the store, to commit alongside new ones.
    pub fn existing(id: BlobId, size: u64) -> PendingBlob {
        PendingBlob {
            id,
            size,
            temp: None,
        }
    }
}

impl Drop for PendingBlob {
    fn drop(&mut self) {
        // Never committed: its temporary file goes (a committed one was renamed away).
        if let Some(temp) = &self.temp {
            let _ = fs::remove_file(temp);
        }
    }
}

/// Address space reserved for mapping many blobs one after another. Each blob is mapped at
/// fresh addresses and nothing is unmapped until the arena is full or dropped: unmapping
/// makes the kernel flush the TLB of every CPU running the process's threads, which per file
/// would cost more than reading the file.
#[derive(Debug)]
pub struct MapArena {
    base: *mut libc::c_void,
    size: usize,
    used: usize,
}

// SAFETY: the arena owns its reservation; it is used by one thread at a time (`&mut self`).
unsafe impl Send for MapArena {}

impl MapArena {
    /// Reserves `size` bytes of address space (no memory).
    pub fn new(size: usize) -> io::Result<MapArena> {
        let mut arena = MapArena {
            base: std::ptr::null_mut(),
            size,
            used: 0,
        };
        arena.reserve()?;
        Ok(arena)
    }

    fn reserve(&mut self) -> io::Result<()> {
        // SAFETY: an anonymous, inaccessible reservation; nothing refers to it yet.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.base = base;
        self.used = 0;
        Ok(())
    }

    fn release(&mut self) {
        if !self.base.is_null() {
            // SAFETY: unmaps exactly the reservation made in `reserve`.
            unsafe { libc::munmap(self.base, self.size) };
            self.base = std::ptr::null_mut();
        }
    }

    /// Maps `len` bytes of `file` read-only; `None` when it can never fit.
    fn map(&mut self, file: &File, len: usize) -> io::Result<Option<&[u8]>> {
        if len == 0 {
            return Ok(Some(&[]));
        }
        let pages = len.div_ceil(4096) * 4096;
        if pages > self.size {
            return Ok(None);
        }
        if self.used + pages > self.size {
            // Full: one unmap for everything mapped so far, and start again.
            self.release();
            self.reserve()?;
        }
        // SAFETY: `used + pages <= size`, so the address is inside the reservation.
        let at = unsafe { self.base.cast::<u8>().add(self.used) }.cast::<libc::c_void>();
        // SAFETY: maps the file over unused addresses inside this arena's reservation
        // (MAP_FIXED replaces only the reservation there). The slice handed out lives no
        // longer than the `&mut self` borrow, before which nothing is unmapped.
        let ptr = unsafe {
            libc::mmap(
                at,
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.used += pages;
        // SAFETY: `ptr` maps `len` readable bytes until the arena is released.
        Ok(Some(unsafe {
            std::slice::from_raw_parts(ptr.cast::<u8>(), len)
        }))
    }
}

impl Drop for MapArena {
    fn drop(&mut self) {
        self.release();
    }
}

/// Reads a blob and checks it against its name at the end.
#[derive(Debug)]
pub struct BlobReader {
    inner: BufReader<File>,
    hasher: blake3::Hasher,
    expected: BlobId,
    path: PathBuf,
    checked: bool,
}

impl BlobReader {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The error to report for an I/O error `e` from this reader: a corrupt blob is named as
    /// such.
    pub fn error(&self, e: io::Error) -> BlobError {
        if let Some(actual) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<Mismatch>())
        {
            return BlobError::Corrupt {
                path: self.path.clone(),
                actual: actual.0.clone(),
            };
        }
        BlobError::Io {
            path: self.path.clone(),
            source: e,
        }
    }
}

/// The hash a corrupt blob's content actually has.
#[derive(Debug)]
struct Mismatch(String);

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "content hashes to {}", self.0)
    }
}

impl std::error::Error for Mismatch {}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.hasher.update(&buf[..n]);
        } else if !buf.is_empty() && !self.checked {
            self.checked = true;
            let actual = BlobId::from_hash(self.hasher.finalize());
            if actual != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    Mismatch(actual.0),
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> (tempfile::TempDir, Blobs) {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = Blobs::new(tmp.path().join("blobs"), tmp.path().join("tmp"));
        blobs.prepare().unwrap();
        (tmp, blobs)
    }

    fn temps(blobs: &Blobs) -> usize {
        (0..TEMP_DIRS)
            .map(|i| fs::read_dir(blobs.tmp.join(i.to_string())).unwrap().count())
            .sum()
    }

    #[test]
    fn identical_content_is_stored_once_under_its_hash() {
        let (_tmp, blobs) = blobs();
        let a = blobs.put(b"hello").unwrap();
        let b = blobs.put(b"hello").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(blobs.list().unwrap(), vec![(a.clone(), 5)]);
        assert_eq!(blobs.read(&a).unwrap(), b"hello");
        assert_eq!(temps(&blobs), 0, "no temp left");
    }

    #[test]
    fn a_flipped_byte_is_reported_with_the_path() {
        let (_tmp, blobs) = blobs();
        let id = blobs.put(b"important data").unwrap();
        let path = blobs.path(&id);
        let mut bytes = fs::read(&path).unwrap();
        bytes[3] ^= 1;
        fs::write(&path, bytes).unwrap();
        match blobs.read(&id) {
            Err(BlobError::Corrupt { path: p, .. }) => assert_eq!(p, path),
            other => panic!("expected corruption, got {other:?}"),
        }
        assert!(matches!(blobs.verify(&id), Err(BlobError::Corrupt { .. })));
    }

    #[test]
    fn many_blobs_commit_together() {
        let (_tmp, blobs) = blobs();
        let mut pending = Vec::new();
        for i in 0..10 {
            let mut w = blobs.writer().unwrap();
            write!(w, "blob {i}").unwrap();
            pending.push(w.finish().unwrap());
        }
        let ids: Vec<BlobId> = pending.iter().map(|p| p.id.clone()).collect();
        blobs.commit(pending).unwrap();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(blobs.read(id).unwrap(), format!("blob {i}").as_bytes());
        }
    }

    #[test]
    fn an_uncommitted_blob_leaves_nothing() {
        let (_tmp, blobs) = blobs();
        let mut w = blobs.writer().unwrap();
        w.write_all(b"never committed").unwrap();
        let pending = w.finish().unwrap();
        let id = pending.id.clone();
        drop(pending);
        assert!(!blobs.contains(&id));
        assert_eq!(temps(&blobs), 0);
    }
}

//! Content-addressed blobs: files named by the BLAKE3 hash of their bytes.
//!
//! A blob is written to a temporary name in `tmp/`, hashed as it is written, made durable,
//! then renamed to `blobs/<first two hex digits>/<the rest>`; only then may a record point
//! to it. Identical content is stored once: a blob already present is not written again.
//!
//! Nothing is handed on from a blob before all of it has been checked against its name, so
//! a blob damaged on disk is reported, with its path, and no byte of it is used. The store
//! never follows a link inside its blob directory and reads nothing there but regular files:
//! every open goes through directory descriptors with `O_NOFOLLOW` (a blob, or a shard
//! directory, replaced by a symlink is refused) and `O_NONBLOCK` (a FIFO in a blob's place
//! cannot hold the reader), and the type is checked on the open descriptor.
//!
//! A blob read in a stream is read twice through the one descriptor opened and checked
//! first: once to hash it, then to hand it on. Blobs are never written in place (they are
//! renamed in whole), and only the store's owner may write its files, so nothing else can
//! change a blob between the two passes; the file's size and change times are compared
//! after the second pass all the same, and a blob that changed is reported.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

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

/// Read back from a record another process serialized (the daemon's API): only a hash.
impl<'de> serde::Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BlobId, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        BlobId::parse(&text)
            .ok_or_else(|| serde::de::Error::custom("a blob's name is 64 hex digits"))
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
    #[error(
        "blob {path} is {what}, not a file: the store reads only its own files and never follows links; the store's copy of this data is lost"
    )]
    NotAFile { path: PathBuf, what: &'static str },
    #[error(
        "blob {path} changed while it was read: blobs are never written in place, so something other than upstream wrote it"
    )]
    Changed { path: PathBuf },
    #[error("cannot read blob {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The blob directory of a store.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
    tmp: PathBuf,
    /// The blob directory, opened once without following a link: every blob is reached
    /// from it.
    root: Arc<OwnedFd>,
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
    /// The blobs in `dir`, written through `tmp`; both must exist. Makes the shard and
    /// temporary directories if they are missing.
    pub(crate) fn at(dir: PathBuf, tmp: PathBuf) -> io::Result<Blobs> {
        let root = nix::fcntl::open(
            &dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| link_error(e, "the blob directory"))?;
        let blobs = Blobs {
            dir,
            tmp,
            root: Arc::new(root),
        };
        blobs.prepare()?;
        Ok(blobs)
    }

    /// Makes the 256 shard directories and the temporary directories, once per store: a
    /// save then never pays for making directories.
    fn prepare(&self) -> io::Result<()> {
        if self.dir.join("ff").is_dir() && self.tmp.join((TEMP_DIRS - 1).to_string()).is_dir() {
            return Ok(());
        }
        for shard in 0..=255u8 {
            crate::private::create_dirs(&self.dir.join(format!("{shard:02x}")))?;
        }
        for i in 0..TEMP_DIRS {
            crate::private::create_dirs(&self.tmp.join(i.to_string()))?;
        }
        Ok(())
    }

    /// Where blob `id` lives.
    pub fn path(&self, id: &BlobId) -> PathBuf {
        self.dir.join(&id.0[..2]).join(&id.0[2..])
    }

    /// Whether the store holds blob `id` as a regular file (not checked against its name).
    pub fn contains(&self, id: &BlobId) -> bool {
        self.stat(id)
            .is_ok_and(|st| file_type(&st) == SFlag::S_IFREG)
    }

    /// Shard directory `name`, opened without following a link.
    fn shard(&self, name: &str) -> nix::Result<OwnedFd> {
        nix::fcntl::openat(
            &*self.root,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    }

    /// What is at blob `id`'s place, itself (not what a link there points to).
    fn stat(&self, id: &BlobId) -> nix::Result<FileStat> {
        let shard = self.shard(&id.0[..2])?;
        nix::sys::stat::fstatat(&shard, &id.0[2..], nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
    }

    /// Opens blob `id`'s file, as the calling thread is now: never through a link, never
    /// blocking, only a regular file. Nothing is read yet; work that reads it under another
    /// identity (a restore writes as the sandbox's owner, who may not enter the store) opens
    /// it first with this.
    pub fn fetch(&self, id: &BlobId) -> Result<OpenBlob, BlobError> {
        let path = self.path(id);
        let fail = |e: Errno| match e {
            Errno::ENOENT => BlobError::Missing { path: path.clone() },
            // A symlink in the blob's place or the shard's (O_NOFOLLOW), or a socket.
            Errno::ELOOP | Errno::ENOTDIR => BlobError::NotAFile {
                path: path.clone(),
                what: "a symbolic link",
            },
            Errno::ENXIO => BlobError::NotAFile {
                path: path.clone(),
                what: "a socket",
            },
            e => BlobError::Io {
                path: path.clone(),
                source: e.into(),
            },
        };
        let shard = self.shard(&id.0[..2]).map_err(fail)?;
        let fd = nix::fcntl::openat(
            &shard,
            &id.0[2..],
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(fail)?;
        let st = nix::sys::stat::fstat(&fd).map_err(fail)?;
        let what = match file_type(&st) {
            SFlag::S_IFREG => None,
            SFlag::S_IFIFO => Some("a FIFO"),
            SFlag::S_IFDIR => Some("a directory"),
            SFlag::S_IFSOCK => Some("a socket"),
            SFlag::S_IFCHR | SFlag::S_IFBLK => Some("a device"),
            _ => Some("not a regular file"),
        };
        if let Some(what) = what {
            return Err(BlobError::NotAFile { path, what });
        }
        Ok(OpenBlob {
            id: id.clone(),
            path,
            file: File::from(fd),
            stamp: Stamp::of(&st),
        })
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
        let file = crate::private::create_file(&path)?;
        Ok(BlobWriter {
            file: io::BufWriter::with_capacity(64 << 10, file),
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
        let mut shards: BTreeMap<String, OwnedFd> = BTreeMap::new();
        for p in &mut pending {
            let temp = p.temp.take().expect("kept above");
            let (shard_name, name) = (&p.id.0[..2], &p.id.0[2..]);
            if !shards.contains_key(shard_name) {
                let fd = self.make_shard(shard_name, many)?;
                shards.insert(shard_name.to_string(), fd);
            }
            let shard = &shards[shard_name];
            // A regular file there is this blob already; anything else (a link, a FIFO) is
            // replaced by the blob.
            let present =
                nix::sys::stat::fstatat(shard, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| file_type(&st) == SFlag::S_IFREG);
            if present {
                fs::remove_file(&temp)?;
                continue;
            }
            if let Err(e) = nix::fcntl::renameat(AT_FDCWD, &temp, shard, name) {
                p.temp = Some(temp);
                return Err(e.into());
            }
        }
        if many {
            nix::unistd::syncfs(&*self.root).map_err(io::Error::from)?;
        } else {
            for shard in shards.values() {
                nix::unistd::fsync(shard).map_err(io::Error::from)?;
            }
        }
        Ok(())
    }

    /// Opens shard directory `name`, making it if it is missing (a store made by hand, or
    /// tidied by one).
    fn make_shard(&self, name: &str, many: bool) -> io::Result<OwnedFd> {
        match self.shard(name) {
            Err(Errno::ENOENT) => {}
            other => return other.map_err(|e| link_error(e, "a blob shard directory")),
        }
        let mode = Mode::from_bits_truncate(crate::private::DIR_MODE);
        let made = match nix::sys::stat::mkdirat(&*self.root, name, mode) {
            Ok(()) => true,
            Err(Errno::EEXIST) => false,
            Err(e) => return Err(e.into()),
        };
        if !many {
            nix::unistd::fsync(&*self.root).map_err(io::Error::from)?;
        }
        let shard = self
            .shard(name)
            .map_err(|e| link_error(e, "a blob shard directory"))?;
        if made {
            nix::sys::stat::fchmod(&shard, mode)?;
        }
        Ok(shard)
    }

    /// Opens blob `id` for reading, checked against its name before this returns: a
    /// damaged blob is an error here, before a byte of it is read. The reader fails at the
    /// end if the file changed while it was read.
    pub fn open(&self, id: &BlobId) -> Result<BlobReader, BlobError> {
        self.fetch(id)?.reader()
    }

    /// Copies blob `id` to the end of `target`, checked first ([`OpenBlob::copy_checked`]).
    pub fn copy_checked(
        &self,
        id: &BlobId,
        buffer: &mut CopyBuffer,
        target: &mut dyn Write,
    ) -> Result<bool, BlobError> {
        self.fetch(id)?.copy_checked(buffer, target)
    }

    /// Reads a whole blob, checked (one pass: the bytes are hashed as they are read, and
    /// returned only if they match).
    pub fn read(&self, id: &BlobId) -> Result<Vec<u8>, BlobError> {
        let blob = self.fetch(id)?;
        let mut data = Vec::new();
        data.try_reserve_exact(blob.stamp.size as usize)
            .map_err(|e| BlobError::Io {
                path: blob.path.clone(),
                source: io::Error::new(io::ErrorKind::OutOfMemory, e),
            })?;
        blob.hash(Some(&mut data))?;
        Ok(data)
    }

    /// Checks blob `id` against its name without keeping its bytes; returns its size.
    pub fn verify(&self, id: &BlobId) -> Result<u64, BlobError> {
        let blob = self.fetch(id)?;
        blob.hash(None)?;
        Ok(blob.stamp.size)
    }

    /// Every blob on disk: the regular files with a blob's name, found without following a
    /// link (a link, a FIFO or anything else in a blob's place is not a blob).
    pub fn list(&self) -> io::Result<Vec<(BlobId, u64)>> {
        let mut all = Vec::new();
        let mut shards = nix::dir::Dir::openat(
            &*self.root,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let names: Vec<String> = shards
            .iter()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().ok().map(str::to_string))
            .filter(|n| n.len() == 2 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        for prefix in names {
            let shard = match self.shard(&prefix) {
                Ok(fd) => fd,
                // A link or a file where a shard should be holds no blobs.
                Err(Errno::ELOOP | Errno::ENOTDIR | Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut entries = nix::dir::Dir::from_fd(shard)?;
            let shard_fd = entries.as_fd().try_clone_to_owned()?;
            for entry in entries.iter() {
                let entry = entry?;
                let Ok(rest) = entry.file_name().to_str() else {
                    continue;
                };
                let Some(id) = BlobId::parse(&format!("{prefix}{rest}")) else {
                    continue;
                };
                let st = match nix::sys::stat::fstatat(
                    &shard_fd,
                    rest,
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                ) {
                    Ok(st) => st,
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(e.into()),
                };
                if file_type(&st) == SFlag::S_IFREG {
                    all.push((id, st.st_size as u64));
                }
            }
        }
        Ok(all)
    }

    /// Removes blob `id` (whatever is in its place; a link is removed, not followed).
    pub(crate) fn remove(&self, id: &BlobId) -> io::Result<()> {
        let shard = match self.shard(&id.0[..2]) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(link_error(e, "a blob shard directory")),
        };
        match nix::unistd::unlinkat(&shard, &id.0[2..], nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
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

/// A blob's file, opened and type-checked ([`Blobs::fetch`]), not yet read.
#[derive(Debug)]
pub struct OpenBlob {
    id: BlobId,
    path: PathBuf,
    file: File,
    stamp: Stamp,
}

impl OpenBlob {
    pub fn id(&self) -> &BlobId {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hashes the whole file (as long as it was when opened), reading at offsets so that the
    /// descriptor's position is left alone; `keep` gets the bytes. An error unless they hash
    /// to the blob's name.
    fn hash(&self, mut keep: Option<&mut Vec<u8>>) -> Result<(), BlobError> {
        let size = self.stamp.size;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; (256 << 10).min(size.max(1) as usize)];
        let mut offset = 0u64;
        while offset < size {
            let want = buf.len().min((size - offset) as usize);
            let n = match self.file.read_at(&mut buf[..want], offset) {
                Ok(0) => {
                    return Err(BlobError::Changed {
                        path: self.path.clone(),
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(BlobError::Io {
                        path: self.path.clone(),
                        source,
                    });
                }
            };
            hasher.update(&buf[..n]);
            if let Some(keep) = keep.as_deref_mut() {
                keep.extend_from_slice(&buf[..n]);
            }
            offset += n as u64;
        }
        let actual = BlobId::from_hash(hasher.finalize());
        if actual != self.id {
            return Err(BlobError::Corrupt {
                path: self.path.clone(),
                actual: actual.0,
            });
        }
        Ok(())
    }

    /// Checks the blob against its name, then reads it: nothing of a damaged blob is read.
    /// The reader fails at the end if the file changed while it was read.
    pub fn reader(&self) -> Result<BlobReader, BlobError> {
        self.hash(None)?;
        let file = self.file.try_clone().map_err(|source| BlobError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(BlobReader {
            inner: BufReader::with_capacity(
                (256 << 10).min(self.stamp.size.max(1) as usize),
                Checked {
                    file,
                    stamp: self.stamp,
                    offset: 0,
                },
            ),
            path: self.path.clone(),
        })
    }

    /// Copies the blob to the end of `target`, checked against its name before a byte is
    /// written: read whole into `buffer`, hashed there, then written from it. One read of the
    /// page cache and one write, the least a checked copy can do: a copy inside the kernel
    /// (as `cp` does) needs the bytes read once more to hash them, and hashing them through
    /// a mapping costs more in page tables than the read. `Ok(false)` when the blob is
    /// bigger than the buffer may grow (read it with [`OpenBlob::reader`] instead).
    pub fn copy_checked(
        &self,
        buffer: &mut CopyBuffer,
        target: &mut dyn Write,
    ) -> Result<bool, BlobError> {
        let fail = |source: io::Error| BlobError::Io {
            path: self.path.clone(),
            source,
        };
        let len = self.stamp.size as usize;
        let Some(bytes) = buffer.take(len) else {
            return Ok(false);
        };
        self.file
            .read_exact_at(bytes, 0)
            .map_err(|e| match e.kind() {
                // Shorter than it was when opened: it changed.
                io::ErrorKind::UnexpectedEof => BlobError::Changed {
                    path: self.path.clone(),
                },
                _ => fail(e),
            })?;
        let actual = BlobId::from_hash(blake3::hash(bytes));
        if actual != self.id {
            return Err(BlobError::Corrupt {
                path: self.path.clone(),
                actual: actual.0,
            });
        }
        if !self.stamp.unchanged(&self.file) {
            return Err(BlobError::Changed {
                path: self.path.clone(),
            });
        }
        target.write_all(bytes).map_err(fail)?;
        Ok(true)
    }
}

fn syncfs(dir: &Path) -> io::Result<()> {
    let file = File::open(dir)?;
    nix::unistd::syncfs(file.as_fd()).map_err(io::Error::from)
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// An error opening one of the store's directories, saying so when it is a link.
fn link_error(e: Errno, what: &str) -> io::Error {
    match e {
        Errno::ELOOP | Errno::ENOTDIR => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} is not a directory (a link?): the store never follows links"),
        ),
        e => e.into(),
    }
}

/// What a blob's file was when it was opened: compared after it is read, so a blob that
/// changed while being read is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(st: &FileStat) -> Stamp {
        Stamp {
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }

    fn unchanged(&self, file: &File) -> bool {
        nix::sys::stat::fstat(file).is_ok_and(|st| Stamp::of(&st) == *self)
    }
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

/// Memory a thread copies blobs through ([`OpenBlob::copy_checked`]): it grows to the
/// biggest blob copied so far, up to [`CopyBuffer::MAX`], and is kept for the next.
#[derive(Debug, Default)]
pub struct CopyBuffer {
    bytes: Vec<u8>,
}

impl CopyBuffer {
    /// The biggest blob copied whole: bigger ones are read twice instead (hashed, then
    /// copied), so that a thread never holds more than this.
    pub const MAX: usize = 4 << 20;

    /// `len` bytes of the buffer, grown as needed; `None` past [`CopyBuffer::MAX`].
    fn take(&mut self, len: usize) -> Option<&mut [u8]> {
        if len > Self::MAX {
            return None;
        }
        if self.bytes.len() < len {
            self.bytes.resize(len, 0);
        }
        Some(&mut self.bytes[..len])
    }
}

/// Reads a blob that was checked against its name when it was opened ([`Blobs::open`]).
#[derive(Debug)]
pub struct BlobReader {
    inner: BufReader<Checked>,
    path: PathBuf,
}

impl BlobReader {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The error to report for an I/O error `e` from this reader: a blob that changed while
    /// it was read is named as such.
    pub fn error(&self, e: io::Error) -> BlobError {
        if e.get_ref()
            .is_some_and(|inner| inner.is::<ChangedWhileRead>())
        {
            return BlobError::Changed {
                path: self.path.clone(),
            };
        }
        BlobError::Io {
            path: self.path.clone(),
            source: e,
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

/// The second pass over a checked blob: exactly the bytes that were hashed, then a check
/// that the file is as it was.
#[derive(Debug)]
struct Checked {
    file: File,
    stamp: Stamp,
    offset: u64,
}

/// A blob's file changed between its check and the end of its reading.
#[derive(Debug)]
struct ChangedWhileRead;

impl fmt::Display for ChangedWhileRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the blob changed while it was read")
    }
}

impl std::error::Error for ChangedWhileRead {}

impl Read for Checked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let changed = || io::Error::new(io::ErrorKind::InvalidData, ChangedWhileRead);
        let left = self.stamp.size - self.offset;
        if left == 0 || buf.is_empty() {
            if left == 0 && !buf.is_empty() && !self.stamp.unchanged(&self.file) {
                return Err(changed());
            }
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.offset)?;
        if n == 0 {
            return Err(changed());
        }
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> (tempfile::TempDir, Blobs) {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("blobs")).unwrap();
        let blobs = Blobs::at(tmp.path().join("blobs"), tmp.path().join("tmp")).unwrap();
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
    fn a_damaged_blob_is_refused_before_a_byte_is_read() {
        let (_tmp, blobs) = blobs();
        let id = blobs.put(b"important data").unwrap();
        let path = blobs.path(&id);
        let mut bytes = fs::read(&path).unwrap();
        bytes[3] ^= 1;
        fs::write(&path, bytes).unwrap();
        // The reader is never handed out: nothing of the blob can be read from it.
        assert!(matches!(blobs.open(&id), Err(BlobError::Corrupt { .. })));
        // Positive control: an intact blob opens and reads whole.
        let good = blobs.put(b"intact").unwrap();
        let mut read = Vec::new();
        blobs.open(&good).unwrap().read_to_end(&mut read).unwrap();
        assert_eq!(read, b"intact");
    }

    #[test]
    fn a_checked_copy_writes_nothing_of_a_damaged_blob_and_leaves_a_big_one_to_the_stream() {
        let (_tmp, blobs) = blobs();
        let mut buffer = CopyBuffer::default();
        // Positive control: an intact blob is copied whole, after what the target held.
        let good = blobs.put(b"intact").unwrap();
        let mut target = tempfile::tempfile().unwrap();
        target.write_all(b">").unwrap();
        assert!(
            blobs
                .copy_checked(&good, &mut buffer, &mut &target)
                .unwrap()
        );
        let mut copied = vec![0u8; 7];
        target.read_exact_at(&mut copied, 0).unwrap();
        assert_eq!(copied, b">intact");
        assert_eq!(target.metadata().unwrap().len(), 7);
        // The buffer, grown for a bigger blob before, copies a smaller one exactly.
        let big = blobs.put(&vec![5u8; 100_000]).unwrap();
        let small = blobs.put(b"small").unwrap();
        let target = tempfile::tempfile().unwrap();
        assert!(blobs.copy_checked(&big, &mut buffer, &mut &target).unwrap());
        assert!(
            blobs
                .copy_checked(&small, &mut buffer, &mut &target)
                .unwrap()
        );
        assert_eq!(target.metadata().unwrap().len(), 100_005);
        // A damaged blob: an error, and not a byte written.
        let id = blobs.put(b"important data").unwrap();
        let path = blobs.path(&id);
        let mut bytes = fs::read(&path).unwrap();
        bytes[3] ^= 1;
        fs::write(&path, bytes).unwrap();
        let target = tempfile::tempfile().unwrap();
        let r = blobs.copy_checked(&id, &mut buffer, &mut &target);
        assert!(matches!(r, Err(BlobError::Corrupt { .. })), "{r:?}");
        assert_eq!(target.metadata().unwrap().len(), 0, "nothing copied");
        // Past the buffer's bound: left to the caller's stream, nothing written.
        let huge = blobs.put(&vec![1u8; CopyBuffer::MAX + 1]).unwrap();
        assert!(
            !blobs
                .copy_checked(&huge, &mut buffer, &mut &target)
                .unwrap()
        );
        assert_eq!(target.metadata().unwrap().len(), 0);
    }

    #[test]
    fn a_blob_replaced_by_a_link_is_refused_and_its_target_never_read() {
        let (tmp, blobs) = blobs();
        let id = blobs.put(b"the artifact").unwrap();
        let secret = tmp.path().join("secret");
        fs::write(&secret, b"SECRET-OUTSIDE-THE-STORE").unwrap();
        let path = blobs.path(&id);
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        let refused = |r: Result<(), BlobError>| {
            assert!(
                matches!(
                    r,
                    Err(BlobError::NotAFile {
                        what: "a symbolic link",
                        ..
                    })
                ),
                "{r:?}"
            );
        };
        refused(blobs.open(&id).map(drop));
        refused(blobs.read(&id).map(drop));
        refused(blobs.verify(&id).map(drop));
        let target = tempfile::tempfile().unwrap();
        refused(
            blobs
                .copy_checked(&id, &mut CopyBuffer::default(), &mut &target)
                .map(drop),
        );
        assert_eq!(target.metadata().unwrap().len(), 0, "nothing copied");
        assert!(!blobs.contains(&id), "a link is not a blob");
        assert!(blobs.list().unwrap().is_empty(), "nor listed as one");
        // Storing the content again puts the blob back in the link's place.
        assert_eq!(blobs.put(b"the artifact").unwrap(), id);
        assert_eq!(blobs.read(&id).unwrap(), b"the artifact");
        assert_eq!(fs::read(&secret).unwrap(), b"SECRET-OUTSIDE-THE-STORE");
    }

    #[test]
    fn a_shard_replaced_by_a_link_is_refused() {
        let (tmp, blobs) = blobs();
        let id = blobs.put(b"sharded").unwrap();
        let shard = blobs.path(&id).parent().unwrap().to_path_buf();
        let elsewhere = tmp.path().join("elsewhere");
        fs::rename(&shard, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &shard).unwrap();
        assert!(matches!(
            blobs.read(&id),
            Err(BlobError::NotAFile {
                what: "a symbolic link",
                ..
            })
        ));
        assert!(blobs.list().unwrap().is_empty());
        // Removing goes no further than the link.
        blobs.remove(&id).unwrap_err();
        assert!(elsewhere.join(&id.as_str()[2..]).is_file());
    }

    #[test]
    fn a_fifo_in_a_blobs_place_is_refused_at_once() {
        let (_tmp, blobs) = blobs();
        let id = blobs.put(b"was a file").unwrap();
        let path = blobs.path(&id);
        fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = blobs.clone();
        let id2 = id.clone();
        std::thread::spawn(move || {
            let _ = tx.send((reader.read(&id2).map(drop), reader.verify(&id2).map(drop)));
        });
        let (read, verify) = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("opening a FIFO must not block");
        for r in [read, verify] {
            assert!(
                matches!(r, Err(BlobError::NotAFile { what: "a FIFO", .. })),
                "{r:?}"
            );
        }
        assert!(blobs.list().unwrap().is_empty());
    }

    #[test]
    fn a_blob_changed_while_it_is_read_is_reported() {
        let (_tmp, blobs) = blobs();
        let id = blobs.put(&vec![7u8; 1 << 20]).unwrap();
        let mut reader = blobs.open(&id).unwrap();
        let mut first = [0u8; 10];
        reader.read_exact(&mut first).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        let path = blobs.path(&id);
        let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_at(&[8u8; 16], 1 << 19).unwrap();
        let e = io::copy(&mut reader, &mut io::sink()).unwrap_err();
        assert!(
            matches!(reader.error(e), BlobError::Changed { .. }),
            "a change is reported"
        );
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

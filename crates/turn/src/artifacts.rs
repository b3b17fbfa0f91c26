//! Artifacts: files of the workspace saved to the store when a turn ends, and restored into the
//! workspace of the next turn of the same context.
//!
//! Both directions work on the sandbox's files from the host, through a directory descriptor
//! of the workspace that [`hostfs::open_dir`] checked is one of the sandbox's own
//! filesystems: every path below it is resolved with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`, so no name, link or mount inside the sandbox can
//! lead a save or a restore anywhere else, and every entry is opened first as `O_PATH` and
//! used only if it is a regular file or a directory (a FIFO put in a file's place is
//! skipped, never waited on). Symlinks are saved and restored as symlinks, never followed;
//! file modes and modification times are kept. Both stop, between files and between
//! chunks of a file, when the turn runs out of time or is cancelled ([`Stop`]).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use globset::{GlobBuilder, GlobMatcher};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};
use upstream_sandbox::hostfs::{self, Existing, Reach};
use upstream_store::{ArtifactKind, ArtifactRow, BlobId, Blobs, NewArtifact, PendingBlob};

/// Why a save or a restore stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    #[error("the turn's timeout ran out")]
    TimedOut,
    #[error("the turn was stopped")]
    Cancelled,
}

impl Stopped {
    /// The stop inside an error of a save or a restore, if that is what it is.
    pub fn of(e: &io::Error) -> Option<Stopped> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<Stopped>())
            .copied()
    }
}

impl From<Stopped> for io::Error {
    fn from(stopped: Stopped) -> io::Error {
        let kind = match stopped {
            Stopped::TimedOut => io::ErrorKind::TimedOut,
            Stopped::Cancelled => io::ErrorKind::Interrupted,
        };
        io::Error::new(kind, stopped)
    }
}

/// Asked between files and between chunks: whether to stop, and why.
pub type Stop<'a> = &'a (dyn Fn() -> Option<Stopped> + Sync);

/// A [`Stop`] that never stops.
pub fn never() -> Option<Stopped> {
    None
}

fn checkpoint(stop: Stop<'_>) -> io::Result<()> {
    match stop() {
        Some(stopped) => Err(stopped.into()),
        None => Ok(()),
    }
}

/// The `artifacts:` patterns of a document.
#[derive(Debug, Clone)]
pub struct Patterns {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
enum Pattern {
    /// A path: the file, symlink or whole directory there.
    Literal(String),
    /// A glob: what it matches (directories whole), found by walking from `base` down to
    /// `depth` components (unbounded for `**`).
    Glob {
        base: String,
        depth: Option<usize>,
        matcher: GlobMatcher,
    },
}

/// Whether `text` uses glob syntax.
fn is_glob(text: &str) -> bool {
    text.contains(['*', '?', '[', '{'])
}

impl Patterns {
    /// Parses patterns (already checked by the document's parser: relative, no `..`).
    pub fn new(patterns: &[String]) -> Result<Patterns, globset::Error> {
        let mut parsed = Vec::new();
        for raw in patterns {
            let text = normalize(raw);
            if text.is_empty() {
                continue;
            }
            if !is_glob(&text) {
                parsed.push(Pattern::Literal(text));
                continue;
            }
            let components: Vec<&str> = text.split('/').collect();
            let literal = components.iter().take_while(|c| !is_glob(c)).count();
            let base = components[..literal].join("/");
            let depth = (!text.contains("**")).then_some(components.len());
            let matcher = GlobBuilder::new(&text)
                .literal_separator(true)
                .build()?
                .compile_matcher();
            parsed.push(Pattern::Glob {
                base,
                depth,
                matcher,
            });
        }
        Ok(Patterns { patterns: parsed })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether a save with these patterns would look at `path`: what decides whether a
    /// restored artifact that is gone was deleted.
    pub fn covers(&self, path: &str) -> bool {
        self.patterns.iter().any(|p| match p {
            Pattern::Literal(l) => path == l || is_below(path, l),
            Pattern::Glob { matcher, .. } => {
                let mut at = Some(path);
                while let Some(p) = at {
                    if matcher.is_match(p) {
                        return true;
                    }
                    at = p.rfind('/').map(|i| &p[..i]);
                }
                false
            }
        })
    }
}

fn normalize(raw: &str) -> String {
    raw.trim()
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

fn is_below(path: &str, dir: &str) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

/// A file as restored, to recognise it unchanged at the next save without reading it: the
/// kernel moves a file's ctime on every change to it, and nothing in a sandbox can set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownFile {
    pub ino: u64,
    pub ctime_ns: i128,
    pub size: u64,
    pub blob: BlobId,
}

/// Files whose content is known, by path.
pub type Known = HashMap<String, KnownFile>;

fn ctime_ns(st: &FileStat) -> i128 {
    st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128
}

fn mtime_ns(st: &FileStat) -> i64 {
    st.st_mtime * 1_000_000_000 + st.st_mtime_nsec
}

/// What a save found.
#[derive(Debug, Default)]
pub struct Saved {
    /// Every artifact, sorted by path.
    pub artifacts: Vec<NewArtifact>,
    /// New blobs to commit before the artifacts are recorded.
    pub pending: Vec<PendingBlob>,
    /// Entries that matched but are neither files, directories nor symlinks, each with what
    /// it is.
    pub skipped: Vec<(String, String)>,
    /// Files read (the others were known unchanged).
    pub files_read: u64,
    pub bytes_read: u64,
}

/// Saves what `patterns` match under the workspace `dir` (opened by [`hostfs::open_dir`]):
/// files into blobs (not yet committed), directories and symlinks as records. Files in
/// `known` whose inode, ctime and size are unchanged are not read again. A file is read up
/// to the size it had when opened.
pub fn save(
    dir: BorrowedFd<'_>,
    patterns: &Patterns,
    blobs: &Blobs,
    known: &Known,
    stop: Stop<'_>,
) -> io::Result<Saved> {
    let mut found: BTreeMap<String, FileStat> = BTreeMap::new();
    for pattern in &patterns.patterns {
        checkpoint(stop)?;
        match pattern {
            Pattern::Literal(path) => {
                if let Some(st) = lstat(dir, path)? {
                    take(dir, path, st, &mut found)?;
                }
            }
            Pattern::Glob {
                base,
                depth,
                matcher,
            } => {
                let start = if base.is_empty() { "." } else { base.as_str() };
                let Some(st) = lstat(dir, start)? else {
                    continue;
                };
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
                    if matcher.is_match(base) {
                        take(dir, base, st, &mut found)?;
                    }
                    continue;
                }
                walk(dir, base, &mut |path, st, level| {
                    checkpoint(stop)?;
                    if matcher.is_match(path) {
                        take(dir, path, st, &mut found)?;
                        return Ok(false);
                    }
                    Ok(depth.is_none_or(|d| level < d))
                })?;
            }
        }
    }
    let mut saved = Saved::default();
    // Files to read, by index into `saved.artifacts`.
    let mut reads: Vec<(usize, String)> = Vec::new();
    for (path, st) in found {
        let mut artifact = NewArtifact {
            path: path.clone(),
            kind: ArtifactKind::File,
            mode: st.st_mode & 0o7777,
            size: 0,
            mtime_ns: mtime_ns(&st),
            blob: None,
            target: None,
        };
        match kind_of(&st) {
            Some(ArtifactKind::Dir) => artifact.kind = ArtifactKind::Dir,
            Some(ArtifactKind::Symlink) => {
                artifact.kind = ArtifactKind::Symlink;
                let (parent, name) = split(&path);
                let parent = open_parent(dir, parent)?;
                let target = nix::fcntl::readlinkat(&parent, name).map_err(io::Error::from)?;
                artifact.target = Some(target.to_string_lossy().into_owned());
            }
            Some(_) => {
                artifact.size = st.st_size as u64;
                let unchanged = known.get(&path).filter(|k| {
                    k.ino == st.st_ino && k.ctime_ns == ctime_ns(&st) && k.size == artifact.size
                });
                match unchanged {
                    Some(k) => {
                        artifact.blob = Some(k.blob.clone());
                        saved
                            .pending
                            .push(PendingBlob::existing(k.blob.clone(), k.size));
                    }
                    None => reads.push((saved.artifacts.len(), path)),
                }
            }
            None => {
                saved
                    .skipped
                    .push((path, hostfs::kind_name(&st).to_string()));
                continue;
            }
        }
        saved.artifacts.push(artifact);
    }
    // Reading and hashing are spread over the CPUs.
    let results = parallel(reads.len(), |i| {
        read_into_blob(dir, &reads[i].1, blobs, stop)
    });
    let mut gone = Vec::new();
    for ((index, path), result) in reads.iter().zip(results) {
        let pending = match result {
            Ok(pending) => pending,
            // Swapped since it was listed for something that is not a file: skipped, as
            // it would have been had it been that when listed.
            Err(e) if hostfs::refusal(&e).is_some() || e.raw_os_error() == Some(libc::ELOOP) => {
                let what = hostfs::refusal(&e).map_or("a symlink".to_string(), |r| r.what.clone());
                saved.skipped.push((path.clone(), what));
                gone.push(*index);
                continue;
            }
            Err(e) => return Err(e),
        };
        let artifact = &mut saved.artifacts[*index];
        artifact.size = pending.size;
        artifact.blob = Some(pending.id.clone());
        saved.files_read += 1;
        saved.bytes_read += pending.size;
        saved.pending.push(pending);
    }
    for index in gone.into_iter().rev() {
        saved.artifacts.remove(index);
    }
    Ok(saved)
}

/// Runs `job(0..count)` on up to one thread per CPU; the results in order.
///
/// Each thread takes a run of neighbouring indices at a time: neighbours are files of one
/// directory, which one thread then makes alone (two making files in one directory queue
/// for its lock) and finds open from the file before.
fn parallel<T: Send>(count: usize, job: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8)
        .min(count);
    if workers <= 1 {
        return (0..count).map(job).collect();
    }
    // Eight runs a thread: short enough that the threads end together.
    let run = count.div_ceil(workers * 8);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<T>>> =
        (0..count).map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let first = next.fetch_add(run, std::sync::atomic::Ordering::Relaxed);
                    if first >= count {
                        break;
                    }
                    for (i, slot) in slots.iter().enumerate().skip(first).take(run) {
                        let result = job(i);
                        if let Ok(mut slot) = slot.lock() {
                            *slot = Some(result);
                        }
                    }
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|s| s.into_inner().ok().flatten().expect("every job ran"))
        .collect()
}

fn read_into_blob(
    dir: BorrowedFd<'_>,
    path: &str,
    blobs: &Blobs,
    stop: Stop<'_>,
) -> io::Result<PendingBlob> {
    checkpoint(stop)?;
    let (file, st) = hostfs::open_file(dir, path, Reach::Beneath)?;
    let mut writer = blobs.writer()?;
    copy(file.take(st.st_size as u64), &mut writer, stop)?;
    writer.finish()
}

fn copy(mut from: impl Read, to: &mut impl Write, stop: Stop<'_>) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    loop {
        checkpoint(stop)?;
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

fn kind_of(st: &FileStat) -> Option<ArtifactKind> {
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => Some(ArtifactKind::File),
        SFlag::S_IFDIR => Some(ArtifactKind::Dir),
        SFlag::S_IFLNK => Some(ArtifactKind::Symlink),
        _ => None,
    }
}

/// Adds `path` (and, for a directory, everything below it) to `found`.
fn take(
    dir: BorrowedFd<'_>,
    path: &str,
    st: FileStat,
    found: &mut BTreeMap<String, FileStat>,
) -> io::Result<()> {
    let is_dir = kind_of(&st) == Some(ArtifactKind::Dir);
    found.insert(path.to_string(), st);
    if is_dir {
        walk(dir, path, &mut |p, st, _| {
            found.insert(p.to_string(), st);
            Ok(true)
        })?;
    }
    Ok(())
}

/// Calls `visit(path, stat, depth)` for everything below directory `path` (`""` for the
/// workspace itself), depth first; `visit` returns whether to go into a directory.
fn walk(
    dir: BorrowedFd<'_>,
    path: &str,
    visit: &mut dyn FnMut(&str, FileStat, usize) -> io::Result<bool>,
) -> io::Result<()> {
    let level = if path.is_empty() {
        0
    } else {
        path.split('/').count()
    };
    let fd = hostfs::open_dir(dir, path, Reach::Beneath)?;
    let mut names = Vec::new();
    let mut listing = nix::dir::Dir::from_fd(fd).map_err(io::Error::from)?;
    for entry in listing.iter() {
        let entry = entry.map_err(io::Error::from)?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        names.push(OsStr::from_bytes(name).to_string_lossy().into_owned());
    }
    names.sort();
    let fd = listing.as_fd();
    for name in names {
        let child = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}/{name}")
        };
        let st = match fstatat(fd, name.as_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let descend = visit(&child, st, level + 1)?;
        if descend && kind_of(&st) == Some(ArtifactKind::Dir) {
            walk(dir, &child, visit)?;
        }
    }
    Ok(())
}

fn lstat(dir: BorrowedFd<'_>, path: &str) -> io::Result<Option<FileStat>> {
    let (parent, name) = split(path);
    let parent = match open_parent(dir, parent) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
        Err(e) => return Err(e),
    };
    match fstatat(&parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((parent, name)) => (parent, name),
        None => ("", path),
    }
}

fn open_parent(dir: BorrowedFd<'_>, parent: &str) -> io::Result<OwnedFd> {
    hostfs::open_dir(dir, parent, Reach::Beneath)
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Blob(#[from] upstream_store::BlobError),
    #[error("cannot restore artifact {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// Restores `artifacts` under the workspace `dir` (opened by [`hostfs::open_dir`]): files
/// from their blobs (each checked against its hash; a damaged one fails the restore),
/// directories, symlinks, modes and modification times. What is created is made as `owner`
/// (uid, gid; see [`hostfs::as_owner`]). Returns the restored files, to recognise them at
/// the next save.
pub fn restore(
    dir: BorrowedFd<'_>,
    artifacts: &[ArtifactRow],
    blobs: &Blobs,
    owner: Option<(u32, u32)>,
    stop: Stop<'_>,
) -> Result<Known, RestoreError> {
    let as_owner_do = |f: &mut dyn FnMut() -> Result<(), RestoreError>| match owner {
        Some((uid, gid)) => hostfs::as_owner(uid, gid, f),
        None => f(),
    };
    let fail = |a: &ArtifactRow, source: io::Error| RestoreError::Io {
        path: a.path.clone(),
        source,
    };
    // Directories first (parents sort before children), made writable for what goes inside;
    // their modes are set last.
    let mut dirs = Vec::new();
    as_owner_do(&mut || {
        for a in artifacts.iter().filter(|a| a.kind == ArtifactKind::Dir) {
            checkpoint(stop).map_err(|e| fail(a, e))?;
            let (parent, name) = split(&a.path);
            let parent =
                hostfs::make_dir_all(dir, parent, Reach::Beneath).map_err(|e| fail(a, e))?;
            match nix::sys::stat::mkdirat(&parent, name, Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(fail(a, e.into())),
            }
            dirs.push(a);
        }
        Ok(())
    })?;
    let files: Vec<&ArtifactRow> = artifacts
        .iter()
        .filter(|a| a.kind == ArtifactKind::File && a.blob.is_some())
        .collect();
    let restored = parallel(files.len(), |i| {
        // Opened as upstream itself, before the switch to the owner: the store is private to
        // upstream's user.
        let blob = blobs.fetch(files[i].blob.as_ref().expect("files have blobs"))?;
        let mut result = None;
        let _ = as_owner_do(&mut || {
            result = Some(
                checkpoint(stop)
                    .map_err(|e| fail(files[i], e))
                    .and_then(|()| restore_file(dir, files[i], &blob)),
            );
            Ok(())
        });
        result.expect("ran")
    });
    // The worker threads let their buffers and directories go as they end; this one (which
    // works alone when there is one file) does it now.
    BUFFER.with_borrow_mut(|buffer| *buffer = upstream_store::CopyBuffer::default());
    PARENT.with_borrow_mut(|parent| *parent = None);
    let mut known = Known::new();
    for (a, r) in files.iter().zip(restored) {
        known.insert(a.path.clone(), r?);
    }
    as_owner_do(&mut || {
        for a in artifacts.iter().filter(|a| a.kind == ArtifactKind::Symlink) {
            let (parent, name) = split(&a.path);
            let parent =
                hostfs::make_dir_all(dir, parent, Reach::Beneath).map_err(|e| fail(a, e))?;
            remove_entry(&parent, name).map_err(|e| fail(a, e))?;
            let target = a.target.as_deref().unwrap_or("");
            nix::unistd::symlinkat(target, &parent, name).map_err(|e| fail(a, e.into()))?;
            set_link_mtime(&parent, name, a.mtime_ns).map_err(|e| fail(a, e))?;
        }
        for a in dirs.iter().rev() {
            // The directory itself, opened without following a link, so a mode set can only
            // land on it.
            let made = open_parent(dir, &a.path).map_err(|e| fail(a, e))?;
            nix::sys::stat::fchmod(&made, Mode::from_bits_truncate(a.mode))
                .map_err(|e| fail(a, e.into()))?;
            set_file_mtime(&made, a.mtime_ns).map_err(|e| fail(a, e))?;
        }
        Ok(())
    })?;
    Ok(known)
}

thread_local! {
    /// Each restoring thread's buffer for blobs, grown on use and let go when a restore
    /// ends.
    static BUFFER: std::cell::RefCell<upstream_store::CopyBuffer> =
        std::cell::RefCell::new(upstream_store::CopyBuffer::default());
    /// The directory the thread restored its last file into, by its path below the
    /// restore's directory: the next file is most often its neighbour. Held for one restore
    /// only.
    static PARENT: std::cell::RefCell<Option<(String, OwnedFd)>> =
        const { std::cell::RefCell::new(None) };
}

fn restore_file(
    dir: BorrowedFd<'_>,
    a: &ArtifactRow,
    blob: &upstream_store::OpenBlob,
) -> Result<KnownFile, RestoreError> {
    let fail = |source: io::Error| RestoreError::Io {
        path: a.path.clone(),
        source,
    };
    let (parent, name) = split(&a.path);
    let mut file = PARENT
        .with_borrow_mut(|last| -> io::Result<std::fs::File> {
            if last.as_ref().is_none_or(|(path, _)| path != parent) {
                *last = None;
                let fd = hostfs::make_dir_all(dir, parent, Reach::Beneath)?;
                *last = Some((parent.to_string(), fd));
            }
            let (_, fd) = last.as_ref().expect("set above");
            hostfs::create_file(fd.as_fd(), name, 0o600, Existing::Replace)
        })
        .map_err(fail)?;
    // Read and checked before a byte is written, so a damaged blob leaves nothing; one too
    // big for the buffer is streamed and checked at its end (the turn then fails).
    let copied = BUFFER.with_borrow_mut(|buffer| blob.copy_checked(buffer, &file))?;
    if !copied {
        let mut reader = blob.reader()?;
        io::copy(&mut reader, &mut file).map_err(|e| match reader.error(e) {
            upstream_store::BlobError::Io { source, .. } => fail(source),
            other => RestoreError::Blob(other),
        })?;
    }
    nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(a.mode)).map_err(|e| fail(e.into()))?;
    set_file_mtime(&file, a.mtime_ns).map_err(fail)?;
    let st = nix::sys::stat::fstat(&file).map_err(|e| fail(e.into()))?;
    Ok(KnownFile {
        ino: st.st_ino,
        ctime_ns: ctime_ns(&st),
        size: st.st_size as u64,
        blob: blob.id().clone(),
    })
}

/// Removes a file or link at `name` (what the image had there) before restoring over it.
fn remove_entry(parent: &OwnedFd, name: &str) -> io::Result<()> {
    match nix::unistd::unlinkat(parent, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn timespec(mtime_ns: i64) -> nix::sys::time::TimeSpec {
    nix::sys::time::TimeSpec::new(
        mtime_ns.div_euclid(1_000_000_000),
        mtime_ns.rem_euclid(1_000_000_000),
    )
}

/// Sets the modification time of link `name` in `parent`, never following it.
fn set_link_mtime(parent: &OwnedFd, name: &str, mtime_ns: i64) -> io::Result<()> {
    use nix::sys::time::TimeSpec;
    nix::sys::stat::utimensat(
        parent,
        name,
        &TimeSpec::UTIME_OMIT,
        &timespec(mtime_ns),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

/// Sets the modification time of what `fd` holds open.
fn set_file_mtime(fd: &impl AsFd, mtime_ns: i64) -> io::Result<()> {
    use nix::sys::time::TimeSpec;
    nix::sys::stat::futimens(fd, &TimeSpec::UTIME_OMIT, &timespec(mtime_ns))
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_cover_what_they_would_save() {
        let p =
            Patterns::new(&["results/".into(), "*.csv".into(), "logs/**/*.txt".into()]).unwrap();
        assert!(p.covers("results"));
        assert!(p.covers("results/a/b"));
        assert!(!p.covers("results2"));
        assert!(p.covers("data.csv"));
        assert!(!p.covers("deep/data.csv"), "* does not cross /");
        assert!(p.covers("logs/x/y/z.txt"));
        assert!(!p.covers("notes.md"));
    }
}

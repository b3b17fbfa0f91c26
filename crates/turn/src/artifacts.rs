//! Artifacts: files of the workspace saved to the store when a turn ends, and restored into the
//! workspace of the next turn of the same context.
//!
//! Both directions work through the sandbox's [`Files`], below the workspace
//! ([`At::Beneath`]): no name, link or mount inside the sandbox can lead a save or a restore
//! anywhere else, and every entry is used only if it is a regular file, a directory or a
//! symlink (a FIFO put in a file's place is skipped, never waited on). Symlinks are saved
//! and restored as symlinks, never followed; file modes and modification times are kept.
//! Both stop, between files and between chunks of a file, when the turn runs out of time or
//! is cancelled ([`Stop`]).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};

use globset::{GlobBuilder, GlobMatcher};
use upstream_sandbox::Files;
use upstream_sandbox::files::{At, Create, Kind, Meta, Owner};
use upstream_sandbox::sandboxfs;
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
    pub ctime_ns: i64,
    pub size: u64,
    pub blob: BlobId,
}

/// Files whose content is known, by path.
pub type Known = HashMap<String, KnownFile>;

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

/// Saves what `patterns` match in the sandbox's workspace `workdir`: files into blobs (not
/// yet committed), directories and symlinks as records. Files in `known` whose inode, ctime
/// and size are unchanged are not read again. A file is read up to the size it had when
/// opened.
pub fn save(
    files: &dyn Files,
    workdir: &str,
    patterns: &Patterns,
    blobs: &Blobs,
    known: &Known,
    stop: Stop<'_>,
) -> io::Result<Saved> {
    let ws = Workspace {
        files,
        dir: workdir,
    };
    let mut found: BTreeMap<String, Meta> = BTreeMap::new();
    for pattern in &patterns.patterns {
        checkpoint(stop)?;
        match pattern {
            Pattern::Literal(path) => {
                if let Some(meta) = ws.stat(path)? {
                    take(&ws, path, meta, &mut found)?;
                }
            }
            Pattern::Glob {
                base,
                depth,
                matcher,
            } => {
                let Some(meta) = ws.stat(base)? else {
                    continue;
                };
                if meta.kind != Kind::Dir {
                    if matcher.is_match(base) {
                        take(&ws, base, meta, &mut found)?;
                    }
                    continue;
                }
                walk(&ws, base, &mut |path, meta, level| {
                    checkpoint(stop)?;
                    if matcher.is_match(path) {
                        take(&ws, path, meta, &mut found)?;
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
    for (path, meta) in found {
        let mut artifact = NewArtifact {
            path: path.clone(),
            kind: ArtifactKind::File,
            mode: meta.mode,
            size: 0,
            mtime_ns: meta.mtime_ns,
            blob: None,
            target: None,
        };
        match meta.kind {
            Kind::Dir => artifact.kind = ArtifactKind::Dir,
            Kind::Symlink => {
                artifact.kind = ArtifactKind::Symlink;
                artifact.target = Some(files.read_link(&ws.at(&path), None)?);
            }
            Kind::File => {
                artifact.size = meta.size;
                let unchanged = known.get(&path).filter(|k| {
                    k.ino == meta.ino && k.ctime_ns == meta.ctime_ns && k.size == meta.size
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
            other => {
                saved.skipped.push((path, other.what().to_string()));
                continue;
            }
        }
        saved.artifacts.push(artifact);
    }
    // Reading and hashing are spread over the CPUs.
    let results = parallel(reads.len(), |i| {
        read_into_blob(&ws, &reads[i].1, blobs, stop)
    });
    let mut gone = Vec::new();
    for ((index, path), result) in reads.iter().zip(results) {
        let pending = match result {
            Ok(pending) => pending,
            // Swapped since it was listed for something that is not a file: skipped, as
            // it would have been had it been that when listed.
            Err(e) if sandboxfs::refusal(&e).is_some() || e.raw_os_error() == Some(libc::ELOOP) => {
                let what =
                    sandboxfs::refusal(&e).map_or("a symlink".to_string(), |r| r.what.clone());
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
    files.forget();
    Ok(saved)
}

/// The workspace, through the sandbox's files.
struct Workspace<'a> {
    files: &'a dyn Files,
    dir: &'a str,
}

impl Workspace<'_> {
    /// `path` (relative to the workspace) as the sandbox's files take it.
    fn at(&self, path: &str) -> At {
        At::Beneath {
            dir: self.dir.to_string(),
            path: path.to_string(),
        }
    }

    /// What is at `path`, not following a link; `None` where nothing is (or a directory on
    /// the way is missing, or no directory).
    fn stat(&self, path: &str) -> io::Result<Option<Meta>> {
        self.files.stat(&self.at(path), None)
    }
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
    ws: &Workspace<'_>,
    path: &str,
    blobs: &Blobs,
    stop: Stop<'_>,
) -> io::Result<PendingBlob> {
    checkpoint(stop)?;
    let (file, _) = ws.files.open(&ws.at(path), 0, None)?;
    let mut writer = blobs.writer()?;
    copy(file, &mut writer, stop)?;
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

/// Adds `path` (and, for a directory, everything below it) to `found`.
fn take(
    ws: &Workspace<'_>,
    path: &str,
    meta: Meta,
    found: &mut BTreeMap<String, Meta>,
) -> io::Result<()> {
    let is_dir = meta.kind == Kind::Dir;
    found.insert(path.to_string(), meta);
    if is_dir {
        walk(ws, path, &mut |p, meta, _| {
            found.insert(p.to_string(), meta);
            Ok(true)
        })?;
    }
    Ok(())
}

/// Calls `visit(path, meta, depth)` for everything below directory `path` (`""` for the
/// workspace itself), depth first; `visit` returns whether to go into a directory.
fn walk(
    ws: &Workspace<'_>,
    path: &str,
    visit: &mut dyn FnMut(&str, Meta, usize) -> io::Result<bool>,
) -> io::Result<()> {
    let level = if path.is_empty() {
        0
    } else {
        path.split('/').count()
    };
    for (name, meta) in ws.files.list(&ws.at(path), None)? {
        let child = if path.is_empty() {
            name
        } else {
            format!("{path}/{name}")
        };
        let descend = visit(&child, meta, level + 1)?;
        if descend && meta.kind == Kind::Dir {
            walk(ws, &child, visit)?;
        }
    }
    Ok(())
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Blob(#[from] upstream_store::BlobError),
    #[error("cannot restore artifact {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// Restores `artifacts` in the sandbox's workspace `workdir`: files from their blobs (each
/// checked against its hash; a damaged one fails the restore), directories, symlinks, modes
/// and modification times, all made as sandbox user `owner`. Returns the restored files, to
/// recognise them at the next save.
pub fn restore(
    files: &dyn Files,
    workdir: &str,
    artifacts: &[ArtifactRow],
    blobs: &Blobs,
    owner: Owner,
    stop: Stop<'_>,
) -> Result<Known, RestoreError> {
    let ws = Workspace {
        files,
        dir: workdir,
    };
    let fail = |a: &ArtifactRow, source: io::Error| RestoreError::Io {
        path: a.path.clone(),
        source,
    };
    // Directories first (parents sort before children), made writable for what goes inside;
    // their modes are set last.
    let mut dirs = Vec::new();
    for a in artifacts.iter().filter(|a| a.kind == ArtifactKind::Dir) {
        checkpoint(stop).map_err(|e| fail(a, e))?;
        files
            .make_dir(&ws.at(&a.path), 0o700, true, owner)
            .map_err(|e| fail(a, e))?;
        dirs.push(a);
    }
    let to_restore: Vec<&ArtifactRow> = artifacts
        .iter()
        .filter(|a| a.kind == ArtifactKind::File && a.blob.is_some())
        .collect();
    let restored = parallel(to_restore.len(), |i| {
        let a = to_restore[i];
        // Opened as upstream itself: the store is private to upstream's user.
        let blob = blobs.fetch(a.blob.as_ref().expect("files have blobs"))?;
        checkpoint(stop).map_err(|e| fail(a, e))?;
        let result = restore_file(&ws, a, &blob, owner);
        // A worker thread lets its directories go as it ends; this one, too.
        files.forget();
        result
    });
    BUFFER.with_borrow_mut(|buffer| *buffer = upstream_store::CopyBuffer::default());
    let mut known = Known::new();
    for (a, r) in to_restore.iter().zip(restored) {
        known.insert(a.path.clone(), r?);
    }
    for a in artifacts.iter().filter(|a| a.kind == ArtifactKind::Symlink) {
        let target = a.target.as_deref().unwrap_or("");
        files
            .symlink(&ws.at(&a.path), target, a.mtime_ns, owner)
            .map_err(|e| fail(a, e))?;
    }
    for a in dirs.iter().rev() {
        files
            .set_meta(&ws.at(&a.path), Some(a.mode), Some(a.mtime_ns), owner)
            .map_err(|e| fail(a, e))?;
    }
    files.forget();
    Ok(known)
}

thread_local! {
    /// Each restoring thread's buffer for blobs, grown on use and let go when a restore
    /// ends.
    static BUFFER: std::cell::RefCell<upstream_store::CopyBuffer> =
        std::cell::RefCell::new(upstream_store::CopyBuffer::default());
}

fn restore_file(
    ws: &Workspace<'_>,
    a: &ArtifactRow,
    blob: &upstream_store::OpenBlob,
    owner: Owner,
) -> Result<KnownFile, RestoreError> {
    let fail = |source: io::Error| RestoreError::Io {
        path: a.path.clone(),
        source,
    };
    let mut file = ws
        .files
        .create(&ws.at(&a.path), 0o600, Create::InPlace, owner)
        .map_err(fail)?;
    // Read and checked before a byte is written, so a damaged blob leaves nothing; one too
    // big for the buffer is streamed and checked at its end (the turn then fails).
    let copied = BUFFER.with_borrow_mut(|buffer| match file.file() {
        Some(target) => blob.copy_checked(buffer, &mut &*target),
        None => blob.copy_checked(buffer, &mut file),
    })?;
    if !copied {
        let mut reader = blob.reader()?;
        io::copy(&mut reader, &mut file).map_err(|e| match reader.error(e) {
            upstream_store::BlobError::Io { source, .. } => fail(source),
            other => RestoreError::Blob(other),
        })?;
    }
    file.flush().map_err(fail)?;
    let meta = file.finish(Some(a.mode), Some(a.mtime_ns)).map_err(fail)?;
    Ok(KnownFile {
        ino: meta.ino,
        ctime_ns: meta.ctime_ns,
        size: meta.size,
        blob: blob.id().clone(),
    })
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

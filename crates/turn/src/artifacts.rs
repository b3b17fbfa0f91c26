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

/// The most entries a save takes (files, directories and links together): past it the save
/// fails, rather than hold without end what a sandbox lists (a VM's agent can list a tree
/// that has no end).
pub const MAX_ARTIFACTS: usize = 1 << 20;

/// The longest path below the workspace a save takes: no longer one names a file there.
const MAX_PATH: usize = 4095;

/// Adds `path` (and, for a directory, everything below it) to `found`.
fn take(
    ws: &Workspace<'_>,
    path: &str,
    meta: Meta,
    found: &mut BTreeMap<String, Meta>,
) -> io::Result<()> {
    let is_dir = meta.kind == Kind::Dir;
    add(found, path, meta)?;
    if is_dir {
        walk(ws, path, &mut |p, meta, _| {
            add(found, p, meta)?;
            Ok(true)
        })?;
    }
    Ok(())
}

fn add(found: &mut BTreeMap<String, Meta>, path: &str, meta: Meta) -> io::Result<()> {
    if found.len() >= MAX_ARTIFACTS && !found.contains_key(path) {
        return Err(io::Error::other(format!(
            "the artifacts' patterns match more than {MAX_ARTIFACTS} entries; name fewer, \
             or pack them into one archive (tar) in a step and name that"
        )));
    }
    found.insert(path.to_string(), meta);
    Ok(())
}

/// Whether `path` is one a save may record: relative, below the workspace, each of its
/// names a name (none empty, `.` or `..`, no NUL).
pub fn is_artifact_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= MAX_PATH
        && !path.contains('\0')
        && path
            .split('/')
            .all(|name| !name.is_empty() && name != "." && name != "..")
}

/// Calls `visit(path, meta, depth)` for everything below directory `path` (`""` for the
/// workspace itself), depth first, in name order; `visit` returns whether to go into a
/// directory. The directories still to go into are kept on a list of this function's, not
/// on the stack: however deep a tree, it cannot overflow the thread's.
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
    // Each directory's entries, last first, with the depth they are at.
    let mut todo: Vec<(String, Meta, usize)> = Vec::new();
    let push_entries = |todo: &mut Vec<(String, Meta, usize)>, dir: &str, level: usize| {
        let entries = ws.files.list(&ws.at(dir), None)?;
        for (name, meta) in entries.into_iter().rev() {
            let child = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            if !is_artifact_path(&child) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the workspace lists {}, which names no file below it (a path of \
                         at most {MAX_PATH} bytes, of names that are not empty, `.` or `..`)",
                        upstream_doc::terminal::line(&child.chars().take(120).collect::<String>())
                    ),
                ));
            }
            todo.push((child, meta, level + 1));
        }
        Ok::<(), io::Error>(())
    };
    push_entries(&mut todo, path, level)?;
    while let Some((child, meta, depth)) = todo.pop() {
        let descend = visit(&child, meta, depth)?;
        if descend && meta.kind == Kind::Dir {
            push_entries(&mut todo, &child, depth)?;
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
    // What the store holds was saved by this code, which records no other; a row that names
    // no place below the workspace (a store changed by hand, or by an older upstream that
    // took a VM's listing on trust) is refused before anything is made.
    if let Some(a) = artifacts.iter().find(|a| !is_artifact_path(&a.path)) {
        return Err(fail(
            a,
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the store records this artifact at a path that is not below the workspace; \
                 it is not restored",
            ),
        ));
    }
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
    use std::sync::Mutex;
    use upstream_sandbox::FileWriter;

    fn meta(kind: Kind) -> Meta {
        Meta {
            kind,
            mode: 0o755,
            size: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            ino: 1,
            uid: 0,
            gid: 0,
        }
    }

    /// A sandbox's files as a hostile VM's agent may list them: every directory holds a
    /// directory `a` and entries named `names`, so the tree has no end; what it is asked
    /// to make is only noted.
    struct Endless {
        names: Vec<&'static str>,
        made: Mutex<Vec<String>>,
    }

    impl Endless {
        fn new(names: &[&'static str]) -> Endless {
            Endless {
                names: names.to_vec(),
                made: Mutex::new(Vec::new()),
            }
        }

        fn note(&self, at: &At) -> io::Result<()> {
            self.made.lock().unwrap().push(at.display());
            Ok(())
        }
    }

    impl Files for Endless {
        fn stat(&self, _: &At, _: Option<Owner>) -> io::Result<Option<Meta>> {
            Ok(Some(meta(Kind::Dir)))
        }
        fn list(&self, _: &At, _: Option<Owner>) -> io::Result<Vec<(String, Meta)>> {
            let mut entries = vec![("a".to_string(), meta(Kind::Dir))];
            entries.extend(self.names.iter().map(|n| (n.to_string(), meta(Kind::File))));
            Ok(entries)
        }
        fn read_link(&self, _: &At, _: Option<Owner>) -> io::Result<String> {
            Err(io::Error::other("no links here"))
        }
        fn open(
            &self,
            _: &At,
            _: u64,
            _: Option<Owner>,
        ) -> io::Result<(Box<dyn Read + Send>, Meta)> {
            Ok((Box::new(io::empty()), meta(Kind::File)))
        }
        fn create(&self, at: &At, _: u32, _: Create, _: Owner) -> io::Result<Box<dyn FileWriter>> {
            self.note(at)?;
            Err(io::Error::other("nothing is made here"))
        }
        fn make_dir(&self, at: &At, _: u32, _: bool, _: Owner) -> io::Result<()> {
            self.note(at)
        }
        fn symlink(&self, at: &At, _: &str, _: i64, _: Owner) -> io::Result<()> {
            self.note(at)
        }
        fn set_meta(&self, at: &At, _: Option<u32>, _: Option<i64>, _: Owner) -> io::Result<()> {
            self.note(at)
        }
        fn remove(&self, at: &At, _: bool, _: Owner) -> io::Result<()> {
            self.note(at)
        }
        fn give(&self, at: &At, _: Owner) -> io::Result<()> {
            self.note(at)
        }
    }

    fn save_all(files: &dyn Files) -> io::Result<Saved> {
        let store = tempfile::tempdir().unwrap();
        let store = upstream_store::Store::open(store.path()).unwrap();
        let patterns = Patterns::new(&["results/".into()]).unwrap();
        save(
            files,
            "/workspace",
            &patterns,
            store.blobs(),
            &Known::new(),
            &never,
        )
    }

    #[test]
    fn a_tree_without_end_stops_the_save_at_the_longest_path_with_no_stack_to_overflow() {
        let started = std::time::Instant::now();
        let e = save_all(&Endless::new(&[])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("at most 4095 bytes"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn a_listed_name_that_is_no_name_stops_the_save() {
        for bad in ["..", ".", "", "x/../../etc", "nul\0"] {
            let e = save_all(&Endless::new(&[bad])).unwrap_err();
            assert!(
                e.to_string().contains("names no file below it"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn a_stored_path_that_is_not_below_the_workspace_is_refused_before_anything_is_made() {
        let store = tempfile::tempdir().unwrap();
        let store = upstream_store::Store::open(store.path()).unwrap();
        let row = |path: &str, kind: ArtifactKind| ArtifactRow {
            turn: 1,
            path: path.into(),
            kind,
            mode: 0o755,
            size: 0,
            mtime_ns: 0,
            blob: None,
            target: Some("t".into()),
        };
        for bad in ["../escape", "/etc/cron.d/x", "a/./b", "a//b", ""] {
            let files = Endless::new(&[]);
            let rows = [
                row("fine", ArtifactKind::Dir),
                row(bad, ArtifactKind::Symlink),
            ];
            let e =
                restore(&files, "/workspace", &rows, store.blobs(), (0, 0), &never).unwrap_err();
            assert!(
                e.to_string().contains("not below the workspace"),
                "{bad:?}: {e}"
            );
            assert!(files.made.lock().unwrap().is_empty(), "{bad:?}");
        }
        // The control: the same rows with a path below the workspace are made.
        let files = Endless::new(&[]);
        let rows = [
            row("fine", ArtifactKind::Dir),
            row("fine/link", ArtifactKind::Symlink),
        ];
        restore(&files, "/workspace", &rows, store.blobs(), (0, 0), &never).unwrap();
        assert!(!files.made.lock().unwrap().is_empty());
    }

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

//! Artifacts: files of the workspace saved to the store when a turn ends, and restored into the
//! workspace of the next turn of the same context.
//!
//! Both directions work on the sandbox's files from the host, through a directory descriptor
//! of the workspace: every path below it is resolved with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`, so no name or link inside the sandbox can lead a
//! save or a restore anywhere else. Symlinks are saved and restored as symlinks, never
//! followed; file modes and modification times are kept.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use globset::{GlobBuilder, GlobMatcher};
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};
use upstream_store::{ArtifactKind, ArtifactRow, BlobId, Blobs, NewArtifact, PendingBlob};

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

/// How paths below the workspace are resolved: never through a link, never onto another
/// mount, never above it.
fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

fn open_beneath(dir: BorrowedFd<'_>, path: &str, flags: OFlag) -> io::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(beneath());
    openat2(dir, path, how).map_err(io::Error::from)
}

/// Opens the workspace `workdir` (absolute, inside the sandbox) under the sandbox's root
/// directory `root`, creating it if `create`.
pub fn open_workspace(root: BorrowedFd<'_>, workdir: &str, create: bool) -> io::Result<OwnedFd> {
    let how = || {
        OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    match openat2(root, workdir, how()) {
        Err(nix::errno::Errno::ENOENT) if create => {
            let mut at = String::new();
            for component in workdir.split('/').filter(|c| !c.is_empty()) {
                at.push('/');
                at.push_str(component);
                if openat2(root, at.as_str(), how()).is_err() {
                    let (parent, name) = at.rsplit_once('/').expect("starts with /");
                    let parent = if parent.is_empty() { "/" } else { parent };
                    let parent = openat2(root, parent, how()).map_err(io::Error::from)?;
                    match nix::sys::stat::mkdirat(&parent, name, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            openat2(root, workdir, how()).map_err(io::Error::from)
        }
        other => other.map_err(io::Error::from),
    }
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
    /// Entries that matched but are neither files, directories nor symlinks.
    pub skipped: Vec<String>,
    /// Files read (the others were known unchanged).
    pub files_read: u64,
    pub bytes_read: u64,
}

/// Saves what `patterns` match under the workspace `dir`: files into blobs (not yet
/// committed), directories and symlinks as records. Files in `known` whose inode, ctime and
/// size are unchanged are not read again.
pub fn save(
    dir: BorrowedFd<'_>,
    patterns: &Patterns,
    blobs: &Blobs,
    known: &Known,
) -> io::Result<Saved> {
    let mut found: BTreeMap<String, FileStat> = BTreeMap::new();
    for pattern in &patterns.patterns {
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
                saved.skipped.push(path);
                continue;
            }
        }
        saved.artifacts.push(artifact);
    }
    // Reading and hashing are spread over the CPUs.
    let results = parallel(reads.len(), |i| read_into_blob(dir, &reads[i].1, blobs));
    for ((index, _), result) in reads.iter().zip(results) {
        let pending = result?;
        let artifact = &mut saved.artifacts[*index];
        artifact.size = pending.size;
        artifact.blob = Some(pending.id.clone());
        saved.files_read += 1;
        saved.bytes_read += pending.size;
        saved.pending.push(pending);
    }
    Ok(saved)
}

/// Runs `job(0..count)` on up to one thread per CPU; the results in order.
fn parallel<T: Send>(count: usize, job: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8)
        .min(count);
    if workers <= 1 {
        return (0..count).map(job).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<T>>> =
        (0..count).map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let result = job(i);
                    if let Ok(mut slot) = slots[i].lock() {
                        *slot = Some(result);
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

fn read_into_blob(dir: BorrowedFd<'_>, path: &str, blobs: &Blobs) -> io::Result<PendingBlob> {
    let file = File::from(open_beneath(dir, path, OFlag::O_RDONLY)?);
    let mut writer = blobs.writer()?;
    copy(file, &mut writer)?;
    writer.finish()
}

fn copy(mut from: File, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    loop {
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
    let fd = if path.is_empty() {
        open_beneath(dir, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY)?
    } else {
        open_beneath(dir, path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?
    };
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
    let parent = if parent.is_empty() { "." } else { parent };
    open_beneath(dir, parent, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Blob(#[from] upstream_store::BlobError),
    #[error("cannot restore artifact {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// Restores `artifacts` under the workspace `dir`: files from their blobs (each checked
/// against its hash; a damaged one fails the restore), directories, symlinks, modes and
/// modification times. What is created is made as `owner` (uid, gid; see [`as_owner`]).
/// Returns the restored files, to recognise them at the next save.
pub fn restore(
    dir: BorrowedFd<'_>,
    artifacts: &[ArtifactRow],
    blobs: &Blobs,
    owner: Option<(u32, u32)>,
) -> Result<Known, RestoreError> {
    let as_owner_do = |f: &mut dyn FnMut() -> Result<(), RestoreError>| match owner {
        Some((uid, gid)) => as_owner(uid, gid, f),
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
            let (parent, name) = split(&a.path);
            let parent = make_parents(dir, parent).map_err(|e| fail(a, e))?;
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
            result = Some(restore_file(dir, files[i], &blob));
            Ok(())
        });
        result.expect("ran")
    });
    // The worker threads let their arenas go as they end; this one (which works alone when
    // there is one file) does it now.
    ARENA.with_borrow_mut(|arena| *arena = None);
    let mut known = Known::new();
    for (a, r) in files.iter().zip(restored) {
        known.insert(a.path.clone(), r?);
    }
    as_owner_do(&mut || {
        for a in artifacts.iter().filter(|a| a.kind == ArtifactKind::Symlink) {
            let (parent, name) = split(&a.path);
            let parent = make_parents(dir, parent).map_err(|e| fail(a, e))?;
            remove_entry(&parent, name).map_err(|e| fail(a, e))?;
            let target = a.target.as_deref().unwrap_or("");
            nix::unistd::symlinkat(target, &parent, name).map_err(|e| fail(a, e.into()))?;
            set_mtime(&parent, name, a.mtime_ns, true).map_err(|e| fail(a, e))?;
        }
        for a in dirs.iter().rev() {
            let (parent, name) = split(&a.path);
            let parent = open_parent(dir, parent).map_err(|e| fail(a, e))?;
            // Restores run before any step: nothing in the sandbox can have swapped the
            // directory for a link.
            nix::sys::stat::fchmodat(
                &parent,
                name,
                Mode::from_bits_truncate(a.mode),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| fail(a, e.into()))?;
            set_mtime(&parent, name, a.mtime_ns, true).map_err(|e| fail(a, e))?;
        }
        Ok(())
    })?;
    Ok(known)
}

thread_local! {
    /// Each restoring thread's address space for blobs (1 GiB, reserved, not memory), made
    /// on first use and let go when a restore ends.
    static ARENA: std::cell::RefCell<Option<upstream_store::MapArena>> =
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
    let parent = make_parents(dir, parent).map_err(fail)?;
    remove_entry(&parent, name).map_err(fail)?;
    let how = OpenHow::new()
        .flags(
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        )
        .mode(Mode::from_bits_truncate(0o600))
        .resolve(beneath());
    let fd = openat2(&parent, name, how).map_err(|e| fail(e.into()))?;
    let mut file = File::from(fd);
    // Mapped and checked before a byte is written, so a damaged blob leaves nothing; one
    // too big for the arena is streamed and checked at its end (the turn then fails).
    let mapped = ARENA.with_borrow_mut(|arena| -> Result<bool, RestoreError> {
        if arena.is_none() {
            *arena = upstream_store::MapArena::new(1 << 30).ok();
        }
        let Some(arena) = arena.as_mut() else {
            return Ok(false);
        };
        Ok(blob.copy_checked(arena, &file)?)
    })?;
    if !mapped {
        let mut reader = blob.reader()?;
        io::copy(&mut reader, &mut file).map_err(|e| match reader.error(e) {
            upstream_store::BlobError::Io { source, .. } => fail(source),
            other => RestoreError::Blob(other),
        })?;
    }
    nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(a.mode)).map_err(|e| fail(e.into()))?;
    set_mtime(&parent, name, a.mtime_ns, false).map_err(fail)?;
    let st = nix::sys::stat::fstat(&file).map_err(|e| fail(e.into()))?;
    Ok(KnownFile {
        ino: st.st_ino,
        ctime_ns: ctime_ns(&st),
        size: st.st_size as u64,
        blob: blob.id().clone(),
    })
}

/// Opens directory `path` below `dir`, making any part of it that is missing.
fn make_parents(dir: BorrowedFd<'_>, path: &str) -> io::Result<OwnedFd> {
    match open_parent(dir, path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let (up, name) = split(path);
            let up = make_parents(dir, up)?;
            match nix::sys::stat::mkdirat(&up, name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            open_parent(dir, path)
        }
        other => other,
    }
}

/// Removes a file or link at `name` (what the image had there) before restoring over it.
fn remove_entry(parent: &OwnedFd, name: &str) -> io::Result<()> {
    match nix::unistd::unlinkat(parent, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn set_mtime(parent: &OwnedFd, name: &str, mtime_ns: i64, no_follow: bool) -> io::Result<()> {
    use nix::sys::time::TimeSpec;
    let mtime = TimeSpec::new(
        mtime_ns.div_euclid(1_000_000_000),
        mtime_ns.rem_euclid(1_000_000_000),
    );
    let flag = if no_follow {
        nix::sys::stat::UtimensatFlags::NoFollowSymlink
    } else {
        nix::sys::stat::UtimensatFlags::FollowSymlink
    };
    nix::sys::stat::utimensat(parent, name, &TimeSpec::UTIME_OMIT, &mtime, flag)
        .map_err(io::Error::from)
}

/// Runs `f` with the calling thread's filesystem ids set to `uid` and `gid` (what files it
/// creates are owned by), and puts them back after.
pub fn as_owner<T>(uid: u32, gid: u32, f: impl FnOnce() -> T) -> T {
    // SAFETY: setfsuid and setfsgid change only the calling thread's filesystem ids, which
    // are put back below; they touch no memory.
    let (old_uid, old_gid) = unsafe { (libc::setfsuid(uid), libc::setfsgid(gid)) };
    let result = f();
    // SAFETY: as above.
    unsafe {
        libc::setfsgid(old_gid as u32);
        libc::setfsuid(old_uid as u32);
    }
    result
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

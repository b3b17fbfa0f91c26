//! The root disk of `image: host` VM sandboxes: what a namespace sandbox of the host image
//! sees of the host ([`upstream_sandbox::host_image`]) as a read-only ext4 disk, made once
//! per state of the host's files and kept in the VM cache (`host/`).
//!
//! A guest reaches nothing of the host but its disks and its channel, so the host's trees
//! are copied into the disk, not shared with the guest. The disk is `mke2fs -d` of a root
//! put together in a mount namespace of the builder's own — the host's trees bound over a
//! skeleton, seen by nothing else on the host and gone with the builder — so it needs root.
//! What goes in is what a namespace sandbox of the host image can read: its users are none
//! of the host's, so what it reads of a host file is what anyone may. A file others may not
//! read goes in empty (its name, mode, owner and times kept), a directory others may not
//! both list and enter goes in empty, and `/etc/hostname` and `/etc/hosts` are the
//! sandbox's, as on namespaces; the guest's root, which reads anything on its disk, gets
//! no more of the host than that.
//!
//! The disk is named by a fingerprint of the trees' metadata — every entry's name, inode,
//! mode and owner, and for all but directories its size and times — so that a package
//! installed, a `pip install` into /usr/local or an edit in /etc gets a new disk, and the
//! older ones are removed. The walk that takes the fingerprint stats every entry (136k under
//! /usr and /etc on a Debian host with a build toolchain: 1.3–3.3 s on a busy machine), so a
//! backend does it at most once per [`RECHECK`]. Building copies what the trees hold
//! (gigabytes: /usr is most of it) and takes minutes; it is done under a lock, into a
//! temporary name renamed into place, so upstreams at once build it once and never see half
//! a disk.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use upstream_sandbox::host_image::{SHARED_DIRS, SKELETON, SKELETON_MODES, USR_LINKS};

/// How long a backend takes the host's files to be as it last found them, before it walks
/// them again: a CLI run walks them once; a daemon sees a change within this.
pub const RECHECK: Duration = Duration::from_secs(60);

/// What the user is told while the disk is made.
pub const BUILDING: &str =
    "Building the host's root disk for VMs (once per change of the host's files)";

/// Directories whose entries the fingerprint passes over: Python writes its compiled
/// modules there as it runs (as root, into /usr), and a module's source, which the
/// fingerprint sees, says whether a compiled one is still good.
const UNWATCHED: &str = "__pycache__";

/// Why the host's disk could not be had.
#[derive(Debug, thiserror::Error)]
pub enum HostDiskError {
    #[error("cannot read the host's {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "making the host's root disk for VMs needs root: its root is put together in a mount \
         namespace of its own ({0})"
    )]
    NeedsRoot(io::Error),
    #[error("cannot make the host's root disk for VMs: {0}")]
    Build(io::Error),
}

impl HostDiskError {
    /// What to do about it, where there is something.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            HostDiskError::NeedsRoot(_) => Some(
                "run upstream as root, or name an image for the VM (`image: debian:12`), or \
                 run `image: host` on namespaces",
            ),
            HostDiskError::Build(_) => Some(
                "the disk takes about as much room as the host's /usr: make room in the VM \
                 cache ($UPSTREAM_VM_CACHE)",
            ),
            HostDiskError::Read { .. } => None,
        }
    }
}

/// What of the host's trees goes into its disk, as they were when walked.
#[derive(Debug)]
pub struct Survey {
    /// Names the state of everything that goes in.
    pub fingerprint: String,
    /// Bytes (in whole blocks) and entries of what goes in.
    pub bytes: u64,
    pub entries: u64,
    /// The shared trees by name in the root: `usr`, `etc`, and the top-level directories
    /// of [`USR_LINKS`] that are directories.
    shared: Vec<&'static str>,
    /// The top-level links of [`USR_LINKS`], as the host has them.
    links: Vec<(&'static str, PathBuf)>,
    /// What goes in empty, by path in the root (`etc/shadow`), with what the host has of it.
    hidden: Vec<(PathBuf, fs::Metadata)>,
}

impl Survey {
    /// The disk's name in the cache.
    pub fn disk_name(&self) -> String {
        format!("host-{}.ext4", self.fingerprint)
    }

    /// What goes in empty, by path in the root.
    pub fn hidden(&self) -> impl Iterator<Item = &Path> {
        self.hidden.iter().map(|(p, _)| p.as_path())
    }
}

/// Whether anyone may read a file with `mode`, or list and enter a directory with it.
fn open_to_others(meta: &fs::Metadata) -> bool {
    let mode = meta.mode();
    match meta.is_dir() {
        true => mode & 0o005 == 0o005,
        false => mode & 0o004 != 0,
    }
}

/// Walks the trees of `source` (`/` for the host) that a host-image root shows.
pub fn survey(source: &Path) -> Result<Survey, HostDiskError> {
    let read = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HostDiskError::Read { path, source }
    };
    let mut survey = Survey {
        fingerprint: String::new(),
        bytes: 0,
        entries: 0,
        shared: Vec::new(),
        links: Vec::new(),
        hidden: Vec::new(),
    };
    let mut hash = blake3::Hasher::new();
    hash.update(b"upstream host disk 1\0");
    let mut tops = Vec::new();
    for name in SHARED_DIRS {
        // As a bind does, through a link.
        let meta = fs::metadata(source.join(name)).map_err(read(&source.join(name)))?;
        if !meta.is_dir() {
            return Err(HostDiskError::Read {
                path: source.join(name),
                source: io::Error::other("not a directory"),
            });
        }
        tops.push((*name, meta));
    }
    for name in USR_LINKS {
        let Ok(meta) = fs::symlink_metadata(source.join(name)) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = fs::read_link(source.join(name)).map_err(read(&source.join(name)))?;
            hash.update(format!("link {name}\0").as_bytes());
            hash.update(target.as_os_str().as_encoded_bytes());
            hash.update(b"\0");
            survey.links.push((name, target));
        } else if meta.is_dir() {
            tops.push((*name, meta));
        }
    }
    // Depth first, each directory's entries in name order, so one state is one fingerprint.
    let mut todo: Vec<(PathBuf, fs::Metadata, bool)> = Vec::new();
    for (name, meta) in tops.into_iter().rev() {
        survey.shared.push(name);
        todo.push((PathBuf::from(name), meta, true));
    }
    survey.shared.reverse();
    while let Some((rel, meta, watched)) = todo.pop() {
        survey.entries += 1;
        survey.bytes += meta.blocks() * 512;
        if watched {
            note(&mut hash, &rel, &meta);
        }
        if !open_to_others(&meta) {
            if meta.is_dir() || meta.is_file() {
                survey.hidden.push((rel, meta));
            }
            continue;
        }
        if !meta.is_dir() {
            continue;
        }
        let dir = source.join(&rel);
        let mut entries = Vec::new();
        for entry in fs::read_dir(&dir).map_err(read(&dir))? {
            let entry = entry.map_err(read(&dir))?;
            let meta = entry.metadata().map_err(read(&entry.path()))?;
            entries.push((entry.file_name(), meta));
        }
        entries.sort_by(|a, b| b.0.cmp(&a.0));
        for (name, meta) in entries {
            let inside = watched && !(meta.is_dir() && name == UNWATCHED);
            todo.push((rel.join(name), meta, inside));
        }
    }
    survey.fingerprint = hash.finalize().to_hex()[..32].to_string();
    Ok(survey)
}

/// Adds one entry to the fingerprint: a directory by what it is (its entries speak for
/// its times), anything else by its state too.
fn note(hash: &mut blake3::Hasher, rel: &Path, meta: &fs::Metadata) {
    hash.update(rel.as_os_str().as_encoded_bytes());
    hash.update(b"\0");
    let mut fields = vec![
        meta.ino(),
        meta.mode().into(),
        meta.uid().into(),
        meta.gid().into(),
    ];
    if !meta.is_dir() {
        fields.extend([
            meta.size(),
            meta.mtime() as u64,
            meta.mtime_nsec() as u64,
            meta.ctime() as u64,
            meta.ctime_nsec() as u64,
        ]);
    }
    for field in fields {
        hash.update(&field.to_le_bytes());
    }
}

/// Makes the disk of what `survey` found in `source` in `dir`, named
/// [`Survey::disk_name`], and returns its path. The caller holds the cache's lock.
pub fn build(source: &Path, survey: &Survey, dir: &Path) -> Result<PathBuf, HostDiskError> {
    let path = dir.join(survey.disk_name());
    let work = dir.join(format!("build.{}", std::process::id()));
    let temp = dir.join(format!("{}.{}.tmp", survey.disk_name(), std::process::id()));
    remove_work(&work);
    let result = (|| {
        // The skeleton, the trees and the host's links, and an inode for each with as many
        // to spare; half as much room again as the files take.
        let inodes = survey.entries + SKELETON.len() as u64 + 64;
        let size =
            (survey.bytes + survey.bytes / 2 + crate::disk::ROOT_SLACK).div_ceil(1 << 20) << 20;
        let root = work.join("root");
        std::thread::scope(|s| {
            s.spawn(|| {
                let binds = || lay_out(source, survey, &work).map_err(HostDiskError::Build);
                in_mounts_of_own(binds, || {
                    crate::disk::mke2fs(
                        &temp,
                        size,
                        &[
                            "-d".as_ref(),
                            root.as_os_str(),
                            "-N".as_ref(),
                            (inodes * 2 + 1024).to_string().as_ref(),
                            "-L".as_ref(),
                            "upstream-root".as_ref(),
                        ],
                    )
                    .map_err(HostDiskError::Build)
                })
            })
            .join()
            .unwrap_or_else(|_| {
                Err(HostDiskError::Build(io::Error::other(
                    "the builder panicked",
                )))
            })
        })?;
        // Readable by the VMM, which runs as a user of its own (`confine`).
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o644))
            .and_then(|()| fs::rename(&temp, &path))
            .map_err(HostDiskError::Build)
    })();
    remove_work(&work);
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map(|()| path)
}

/// What is bound where: a host tree or a stand-in of `work`, onto a path in `work/root`.
struct Bind {
    from: PathBuf,
    onto: PathBuf,
}

/// Lays out in `work` the skeleton root (`root/`) and the stand-ins (`blanks/`) of what
/// goes in empty, and returns the binds that make the root whole.
fn lay_out(source: &Path, survey: &Survey, work: &Path) -> io::Result<Vec<Bind>> {
    let root = work.join("root");
    let blanks = work.join("blanks");
    fs::create_dir_all(&blanks)?;
    fs::create_dir_all(&root)?;
    fs::set_permissions(work, fs::Permissions::from_mode(0o700))?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
    for sub in SKELETON {
        fs::create_dir_all(root.join(sub))?;
        fs::set_permissions(root.join(sub), fs::Permissions::from_mode(0o755))?;
    }
    for (sub, mode) in SKELETON_MODES {
        fs::set_permissions(root.join(sub), fs::Permissions::from_mode(*mode))?;
    }
    for (name, target) in &survey.links {
        std::os::unix::fs::symlink(target, root.join(name))?;
    }
    let mut binds = Vec::new();
    for name in &survey.shared {
        fs::create_dir_all(root.join(name))?;
        binds.push(Bind {
            from: source.join(name),
            onto: root.join(name),
        });
    }
    for (n, (rel, meta)) in survey.hidden.iter().enumerate() {
        let blank = blanks.join(n.to_string());
        match meta.is_dir() {
            true => fs::create_dir(&blank)?,
            false => drop(fs::File::create(&blank)?),
        }
        like(&blank, meta)?;
        binds.push(Bind {
            from: blank,
            onto: root.join(rel),
        });
    }
    // The sandbox's name, not the host's, where the host has the files.
    let hidden: Vec<&Path> = survey.hidden().collect();
    for (file, content) in
        upstream_sandbox::host_image::identity_files(upstream_sandbox::DEFAULT_HOSTNAME)
    {
        let rel = Path::new("etc").join(file);
        let at = source.join(&rel);
        if !fs::symlink_metadata(&at).is_ok_and(|m| m.is_file()) || hidden.contains(&rel.as_path())
        {
            continue;
        }
        let blank = blanks.join(file);
        fs::write(&blank, content)?;
        fs::set_permissions(&blank, fs::Permissions::from_mode(0o644))?;
        binds.push(Bind {
            from: blank,
            onto: root.join(rel),
        });
    }
    Ok(binds)
}

/// Gives `path` the mode, owner and times `meta` has.
fn like(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(meta.uid()), Some(meta.gid()))?;
    // After the owner, which a change of clears the set-id bits.
    fs::set_permissions(path, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    let times = fs::FileTimes::new()
        .set_accessed(meta.accessed()?)
        .set_modified(meta.modified()?);
    fs::File::open(path)?.set_times(times)
}

/// Takes a mount namespace of its own for this thread, makes there (read-only) the binds
/// `binds` lays out, and runs `then`: the host's mounts never change, and the namespace is
/// gone once the thread and what it started are. Without the privilege to, nothing is
/// laid out.
fn in_mounts_of_own<T>(
    binds: impl FnOnce() -> Result<Vec<Bind>, HostDiskError>,
    then: impl FnOnce() -> Result<T, HostDiskError>,
) -> Result<T, HostDiskError> {
    // A thread of a process with others may take a mount namespace of its own (unlike a
    // user namespace); what it starts inherits it.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|e| {
        let e = io::Error::from_raw_os_error(e as i32);
        match e.kind() {
            io::ErrorKind::PermissionDenied => HostDiskError::NeedsRoot(e),
            _ => HostDiskError::Build(e),
        }
    })?;
    let os = |e: nix::Error| io::Error::from_raw_os_error(e as i32);
    // Nothing bound here reaches the host's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| {
        HostDiskError::Build(io::Error::other(format!(
            "cannot make this thread's mounts private: {}",
            os(e)
        )))
    })?;
    for bind in &binds()? {
        let failed = |e: nix::Error| {
            HostDiskError::Build(io::Error::other(format!(
                "cannot bind {} onto {}: {}",
                bind.from.display(),
                bind.onto.display(),
                os(e)
            )))
        };
        mount(
            Some(&bind.from),
            &bind.onto,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(failed)?;
        mount(
            None::<&str>,
            &bind.onto,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(failed)?;
    }
    then()
}

/// Removes a builder's work directory, made here or left by one that died. Never
/// recursively below `root/`: what it holds are mount points, empty but in the builder's
/// own namespace, and a directory that is not empty is left as it is.
fn remove_work(work: &Path) {
    let root = work.join("root");
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => {
                    if let Ok(inner) = fs::read_dir(&path) {
                        // The skeleton's own subdirectories (`var/tmp`), one level down.
                        for sub in inner.flatten() {
                            let _ = fs::remove_dir(sub.path());
                        }
                    }
                    let _ = fs::remove_dir(&path);
                }
                _ => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }
    let _ = fs::remove_dir(&root);
    // The stand-ins are the builder's own files.
    let _ = fs::remove_dir_all(work.join("blanks"));
    let _ = fs::remove_dir(work);
}

/// What a VM cache holds for the host's files as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskState {
    /// Their disk, and what it takes of the cache's filesystem.
    Made { path: PathBuf, taken: u64 },
    /// None yet: the files take `bytes`; `older`: there is a disk of them as they were.
    Unmade { bytes: u64, older: bool },
}

/// The host's disks in a VM cache, and what a backend last found of the host's files.
#[derive(Debug)]
pub struct HostDisks {
    /// `host/` in the VM cache.
    dir: PathBuf,
    /// The root whose trees go in: `/`, or a tree a test made.
    source: PathBuf,
    recheck: Duration,
    /// When the host's files were last walked, and the disk of what was found.
    last: Mutex<Option<(Instant, PathBuf)>>,
}

impl HostDisks {
    pub fn new(dir: PathBuf, source: PathBuf, recheck: Duration) -> HostDisks {
        HostDisks {
            dir,
            source,
            recheck,
            last: Mutex::new(None),
        }
    }

    /// The disk of the host's files as they are (as they were at most `recheck` ago),
    /// made now if there is none; `making` is told so first.
    pub fn disk(&self, making: &mut dyn FnMut(&str)) -> Result<PathBuf, HostDiskError> {
        // Held while a disk is made: the backend's other sandboxes wait for the same disk.
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, path)) = last.as_ref() {
            if at.elapsed() < self.recheck && path.is_file() {
                return Ok(path.clone());
            }
        }
        let walked = Instant::now();
        let survey = survey(&self.source)?;
        let path = self.dir.join(survey.disk_name());
        if !path.is_file() {
            making(BUILDING);
            self.make(&survey)?;
        }
        *last = Some((walked, path.clone()));
        Ok(path)
    }

    /// The shared tree of `survey` the cache is in, if it is in one.
    fn inside_a_tree(&self, survey: &Survey) -> Option<PathBuf> {
        let dir = fs::canonicalize(&self.dir).ok()?;
        survey
            .shared
            .iter()
            .filter_map(|name| fs::canonicalize(self.source.join(name)).ok())
            .find(|tree| dir.starts_with(tree))
    }

    /// What the cache holds for the host's files as they are now, as `upstream doctor`
    /// tells it (walking them, as [`HostDisks::disk`] does).
    pub fn state(&self) -> Result<DiskState, HostDiskError> {
        let survey = survey(&self.source)?;
        let path = self.dir.join(survey.disk_name());
        match fs::metadata(&path) {
            Ok(meta) => Ok(DiskState::Made {
                path,
                taken: meta.blocks() * 512,
            }),
            Err(_) => Ok(DiskState::Unmade {
                bytes: survey.bytes,
                older: fs::read_dir(&self.dir).is_ok_and(|d| {
                    d.flatten().any(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.starts_with("host-") && name.ends_with(".ext4")
                    })
                }),
            }),
        }
    }

    /// Makes the disk of `survey` unless another upstream did while this one waited for
    /// the cache's lock; then removes the older disks and what builders that died left.
    fn make(&self, survey: &Survey) -> Result<(), HostDiskError> {
        fs::create_dir_all(&self.dir).map_err(HostDiskError::Build)?;
        let lock = fs::File::create(self.dir.join("lock")).map_err(HostDiskError::Build)?;
        // SAFETY: flock on a descriptor this function holds open; released when it closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(HostDiskError::Build(io::Error::last_os_error()));
        }
        let name = survey.disk_name();
        if let Some(tree) = self.inside_a_tree(survey) {
            return Err(HostDiskError::Build(io::Error::other(format!(
                "the VM cache {} is inside the host's {}, which its disk copies",
                self.dir.display(),
                tree.display()
            ))));
        }
        if !self.dir.join(&name).is_file() {
            // What is here but the lock and the disks is a dead builder's: this one holds
            // the lock.
            for entry in fs::read_dir(&self.dir)
                .map_err(HostDiskError::Build)?
                .flatten()
            {
                let file = entry.file_name().to_string_lossy().into_owned();
                if file.starts_with("build.") {
                    remove_work(&entry.path());
                } else if file.ends_with(".tmp") {
                    let _ = fs::remove_file(entry.path());
                }
            }
            build(&self.source, survey, &self.dir)?;
        }
        // A VM started on an older disk keeps it open; none is started on it again.
        for entry in fs::read_dir(&self.dir)
            .map_err(HostDiskError::Build)?
            .flatten()
        {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with("host-") && file.ends_with(".ext4") && file != name {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::debugfs;

    /// A host's root in small: programs in /usr, /bin a link into it and /sbin a directory
    /// of its own, /etc with a file anyone may read, one only root may, and a directory
    /// only root may enter.
    fn fake_host(at: &Path) {
        let file = |rel: &str, content: &str, mode: u32| {
            let path = at.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        };
        file("usr/bin/hello", "#!/bin/sh\necho hi\n", 0o755);
        file("usr/lib/x86_64/libx.so", "library\n", 0o644);
        file("usr/lib/python3/m.py", "x = 1\n", 0o644);
        file("sbin/tool", "tool\n", 0o755);
        file("etc/visible", "for all\n", 0o644);
        file("etc/secret", "s3cret\n", 0o600);
        file("etc/private/key", "private key\n", 0o644);
        file("etc/hostname", "the-hosts-name\n", 0o644);
        file("etc/hosts", "10.1.2.3 the-hosts-name\n", 0o644);
        fs::set_permissions(at.join("etc/private"), fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("usr/bin", at.join("bin")).unwrap();
        // Not shared: nothing of it goes in.
        file("home/user/notes", "mine\n", 0o644);
    }

    /// Whether this test may build disks (as root); says why not otherwise.
    fn as_root(test: &str) -> bool {
        let root = nix::unistd::Uid::effective().is_root();
        if !root {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED (needs root): {test}");
        }
        root
    }

    /// What debugfs says of `path` in `disk` (`cat`, `stat`, `ls -l`).
    #[test]
    fn the_fingerprint_follows_the_host_files_but_not_compiled_python() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        fake_host(&host);
        let first = survey(&host).unwrap();
        assert_eq!(survey(&host).unwrap().fingerprint, first.fingerprint);
        let hidden: Vec<&Path> = first.hidden().collect();
        assert_eq!(
            hidden,
            [Path::new("etc/private"), Path::new("etc/secret")],
            "{hidden:?}"
        );
        assert_eq!(first.shared, ["usr", "etc", "sbin"]);
        assert_eq!(first.links, [("bin", PathBuf::from("usr/bin"))]);
        // Python compiling a module as it runs changes nothing.
        let cache = host.join("usr/lib/python3/__pycache__");
        fs::create_dir(&cache).unwrap();
        fs::write(cache.join("m.cpython-311.pyc"), "compiled").unwrap();
        assert_eq!(survey(&host).unwrap().fingerprint, first.fingerprint);
        // What a package install, an edit in /etc or a change of mode does, does.
        let mut seen = vec![first.fingerprint.clone()];
        let mut changed = |what: &str, change: &dyn Fn()| {
            change();
            let now = survey(&host).unwrap().fingerprint;
            assert!(
                !seen.contains(&now),
                "{what} left the fingerprint as it was"
            );
            seen.push(now);
        };
        changed("a new library", &|| {
            fs::write(host.join("usr/lib/x86_64/liby.so"), "y").unwrap()
        });
        changed("an edit in place", &|| {
            use std::io::Write;
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(host.join("etc/visible"))
                .unwrap();
            f.write_all(b"more\n").unwrap();
        });
        changed("a change of mode", &|| {
            fs::set_permissions(host.join("etc/visible"), fs::Permissions::from_mode(0o640))
                .unwrap()
        });
        changed("a file replaced by another", &|| {
            fs::write(host.join("usr/bin/hello.new"), "#!/bin/sh\n").unwrap();
            fs::rename(host.join("usr/bin/hello.new"), host.join("usr/bin/hello")).unwrap();
        });
        changed("a link moved", &|| {
            fs::remove_file(host.join("bin")).unwrap();
            std::os::unix::fs::symlink("usr/sbin", host.join("bin")).unwrap();
        });
        // The file that became private is now hidden.
        assert!(
            survey(&host)
                .unwrap()
                .hidden()
                .any(|p| p == Path::new("etc/visible"))
        );
    }

    #[test]
    fn a_host_disk_holds_what_a_namespace_sandbox_may_read_and_no_more() {
        if !as_root("a_host_disk_holds_what_a_namespace_sandbox_may_read_and_no_more") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        fake_host(&host);
        let cache = dir.path().join("cache");
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let disks = HostDisks::new(cache.clone(), host.clone(), Duration::ZERO);
        let mut told = Vec::new();
        let disk = disks.disk(&mut |what| told.push(what.to_string())).unwrap();
        assert_eq!(told, [BUILDING]);
        // Nothing was mounted where the host sees it, and nothing of the build is left.
        assert_eq!(fs::read_to_string("/proc/self/mountinfo").unwrap(), mounts);
        let mut left: Vec<String> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [disk.file_name().unwrap().to_str().unwrap(), "lock"]);
        assert_eq!(fs::metadata(&disk).unwrap().mode() & 0o777, 0o644);
        // What anyone may read is there; so is what a sandbox runs.
        assert_eq!(debugfs(&disk, "cat /etc/visible"), "for all\n");
        assert_eq!(debugfs(&disk, "cat /usr/bin/hello"), "#!/bin/sh\necho hi\n");
        assert_eq!(debugfs(&disk, "cat /sbin/tool"), "tool\n");
        assert!(debugfs(&disk, "stat /bin").contains("Fast link dest: \"usr/bin\""));
        // The control: the host's secret is there to be read, on the host.
        assert_eq!(
            fs::read_to_string(host.join("etc/secret")).unwrap(),
            "s3cret\n"
        );
        // On the disk, it is there by name and mode, and empty.
        assert_eq!(debugfs(&disk, "cat /etc/secret"), "");
        let stat = debugfs(&disk, "stat /etc/secret");
        assert!(
            stat.contains("Mode:  0600") && stat.contains("Size: 0"),
            "{stat}"
        );
        // The directory only root may enter is there, empty.
        let listed = debugfs(&disk, "ls -l /etc/private");
        assert!(!listed.contains("key"), "{listed}");
        assert!(debugfs(&disk, "stat /etc/private").contains("Mode:  0700"));
        assert_eq!(debugfs(&disk, "cat /etc/private/key"), "");
        // The sandbox's name, not the host's.
        assert_eq!(debugfs(&disk, "cat /etc/hostname"), "sandbox\n");
        let hosts = debugfs(&disk, "cat /etc/hosts");
        assert!(hosts.contains("localhost sandbox") && !hosts.contains("the-hosts-name"));
        // Nothing of the host but its shared trees.
        assert!(!debugfs(&disk, "ls -l /home").contains("user"));
        for (sub, mode) in [("/tmp", "01777"), ("/root", "0700"), ("/workspace", "0755")] {
            let stat = debugfs(&disk, &format!("stat {sub}"));
            assert!(stat.contains(&format!("Mode:  {mode}")), "{sub}: {stat}");
        }
        crate::disk::assert_whole(&disk);
    }

    #[test]
    fn a_host_disk_is_made_once_and_again_when_the_host_files_change() {
        if !as_root("a_host_disk_is_made_once_and_again_when_the_host_files_change") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        fake_host(&host);
        let cache = dir.path().join("cache");
        let disks = HostDisks::new(cache.clone(), host.clone(), Duration::ZERO);
        let mut told = 0;
        let first = disks.disk(&mut |_| told += 1).unwrap();
        let made = fs::metadata(&first).unwrap();
        // Walked again, the same files: the same disk, not made again.
        let again = disks.disk(&mut |_| told += 1).unwrap();
        assert_eq!((&again, told), (&first, 1));
        let now = fs::metadata(&again).unwrap();
        assert_eq!(
            (now.ino(), now.mtime(), now.mtime_nsec()),
            (made.ino(), made.mtime(), made.mtime_nsec())
        );
        // Another backend on the same cache takes it too.
        let other = HostDisks::new(cache.clone(), host.clone(), Duration::ZERO);
        assert_eq!(other.disk(&mut |_| told += 1).unwrap(), first);
        assert_eq!(
            other.state().unwrap(),
            DiskState::Made {
                path: first.clone(),
                taken: now.blocks() * 512
            }
        );
        // A backend that walked them a moment ago does not walk them again.
        let patient = HostDisks::new(cache.clone(), host.clone(), Duration::from_secs(3600));
        assert_eq!(patient.disk(&mut |_| {}).unwrap(), first);
        fs::write(host.join("usr/bin/new"), "new\n").unwrap();
        assert!(matches!(
            other.state().unwrap(),
            DiskState::Unmade { older: true, .. }
        ));
        assert_eq!(patient.disk(&mut |_| {}).unwrap(), first);
        // A change of the host's files gets a new disk, which has it; the older goes.
        let second = disks.disk(&mut |_| told += 1).unwrap();
        assert_ne!(second, first);
        assert_eq!(told, 2);
        assert_eq!(debugfs(&second, "cat /usr/bin/new"), "new\n");
        assert!(!first.exists(), "the older disk was kept");
    }

    #[test]
    fn two_builders_at_once_make_the_disk_once() {
        if !as_root("two_builders_at_once_make_the_disk_once") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        fake_host(&host);
        let cache = dir.path().join("cache");
        let made: Vec<(PathBuf, u64)> = std::thread::scope(|s| {
            let builders: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let disks = HostDisks::new(cache.clone(), host.clone(), Duration::ZERO);
                        let disk = disks.disk(&mut |_| {}).unwrap();
                        let ino = fs::metadata(&disk).unwrap().ino();
                        (disk, ino)
                    })
                })
                .collect();
            builders.into_iter().map(|b| b.join().unwrap()).collect()
        });
        assert_eq!(made[0], made[1], "each builder made a disk of its own");
        assert_eq!(fs::metadata(&made[0].0).unwrap().ino(), made[0].1);
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 2, "lock and disk");
    }

    #[test]
    fn without_root_the_disk_is_refused_in_a_sentence_saying_what_to_do() {
        if !as_root("without_root_the_disk_is_refused_in_a_sentence_saying_what_to_do") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        fake_host(&host);
        let found = survey(&host).unwrap();
        let cache = dir.path().join("cache");
        fs::create_dir(&cache).unwrap();
        fs::set_permissions(&cache, fs::Permissions::from_mode(0o777)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        // A thread of its own as nobody (credentials are per thread below glibc), which
        // has no capability left.
        let refused = std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setresuid for this thread only; it touches no memory.
                let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
                assert_eq!(rc, 0, "{}", io::Error::last_os_error());
                build(&host, &found, &cache)
            })
            .join()
            .unwrap()
        });
        let e = refused.unwrap_err();
        assert!(matches!(e, HostDiskError::NeedsRoot(_)), "{e}");
        assert!(e.to_string().contains("needs root"), "{e}");
        assert!(e.hint().unwrap().contains("run upstream as root"));
        // Nothing is left of the attempt; the control: as root the same build is made.
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 0);
        let disk = build(&host, &found, &cache).unwrap();
        assert_eq!(debugfs(&disk, "cat /etc/visible"), "for all\n");
    }

    #[test]
    fn a_cache_inside_the_trees_it_copies_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        fake_host(&host);
        let disks = HostDisks::new(host.join("usr/cache"), host.clone(), Duration::ZERO);
        let e = disks.disk(&mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("is inside the host's"), "{e}");
    }
}

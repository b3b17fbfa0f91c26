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
//! /usr and /etc on a Debian host with a build toolchain, ~2 s): a backend does it at most
//! once per [`RECHECK`]. Building copies what the trees hold (gigabytes: /usr is most of it)
//! and takes minutes; it is done under a lock, into a temporary name renamed into place,
//! so upstreams at once build it once and never see half a disk.

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
        let binds = lay_out(source, survey, &work).map_err(HostDiskError::Build)?;
        // The skeleton, the trees and the host's links, and an inode for each with as many
        // to spare; half as much room again as the files take.
        let inodes = survey.entries + SKELETON.len() as u64 + 64;
        let size =
            (survey.bytes + survey.bytes / 2 + crate::disk::ROOT_SLACK).div_ceil(1 << 20) << 20;
        let root = work.join("root");
        std::thread::scope(|s| {
            s.spawn(|| {
                in_mounts_of_own(&binds, || {
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

/// Runs `then` on a thread whose mount namespace is its own, with `binds` made there
/// (read-only): the host's mounts never change, and the namespace is gone once the thread
/// and what it started are.
fn in_mounts_of_own<T>(
    binds: &[Bind],
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
    for bind in binds {
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

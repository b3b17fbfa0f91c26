//! A sandbox's disk: a filesystem of its own that holds everything the sandbox writes to the
//! host's disk (its root's writable layer with /tmp, its workspace's layers), so that the
//! kernel, not upstream, enforces its disk limit: a write past it gets `ENOSPC`.
//!
//! The filesystem is a sparse ext4 image file in the sandbox directory (`disk.img`),
//! attached to a loop device of its own (`LO_FLAGS_AUTOCLEAR`: the device goes with the last
//! mount) and mounted `nosuid,nodev,discard` on the directory's `data/` before the init gets
//! its configuration, so that deletes inside give the host its space back. Formatting is done
//! once per size: `<runtime>/disks/<bytes>.ext4` is a template made with `mke2fs`, and each
//! image is a sparse copy of it (about 230 KiB of data, however large the limit).
//!
//! It needs root (a loop device and a mount of the host); rootless, the limit is not enforced,
//! and the sandbox says so.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use upstream_sandbox::{ExitStatus, SandboxError, SandboxSpec};

use crate::layers::Layers;
use crate::{Ending, NamespaceBackend, SandboxDir};

/// The image file in a sandbox directory.
pub const IMAGE: &str = "disk.img";
/// Where the image is mounted in a sandbox directory.
pub const DATA: &str = "data";

/// Why a sandbox's disk could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot format a disk: mke2fs (from e2fsprogs) is not installed; install e2fsprogs")]
    NoMkfs,
    #[error("cannot format a disk: mke2fs failed: {0}")]
    Mkfs(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> DiskError {
    move |source| DiskError::Io { what, source }
}

/// The formatted template for disks of `size` bytes in `dir`, made if there is none.
pub fn template(dir: &Path, size: u64) -> Result<PathBuf, DiskError> {
    let path = dir.join(format!("{size}.ext4"));
    if path.is_file() {
        return Ok(path);
    }
    fs::create_dir_all(dir).map_err(io_err("create the directory of disk templates"))?;
    let temp = dir.join(format!(
        "{size}.ext4.tmp-{}",
        upstream_sandbox::runtime::unique_name()
    ));
    let made = format(&temp, size)
        .and_then(|()| fs::rename(&temp, &path).map_err(io_err("put a disk template in place")));
    if let Err(e) = made {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    Ok(path)
}

/// Formats a sparse file of `size` bytes at `path` as ext4: no journal (the disk dies with
/// its sandbox, or is kept only after a clean unmount), inode tables initialised lazily,
/// nothing reserved for root.
fn format(path: &Path, size: u64) -> Result<(), DiskError> {
    let file = File::create(path).map_err(io_err("create a disk template"))?;
    file.set_len(size).map_err(io_err("size a disk template"))?;
    drop(file);
    let mut last = None;
    for mkfs in ["mke2fs", "/usr/sbin/mke2fs", "/sbin/mke2fs"] {
        let out = Command::new(mkfs)
            .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal,^resize_inode"])
            .args(["-E", "lazy_itable_init=1,nodiscard", "-m", "0"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match out {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => {
                return Err(DiskError::Mkfs(
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => last = Some(DiskError::NoMkfs),
            Err(e) => return Err(DiskError::Mkfs(e.to_string())),
        }
    }
    Err(last.unwrap_or(DiskError::NoMkfs))
}

/// Whether this host can format disks (`mke2fs` is installed), for `doctor`.
pub fn can_format() -> bool {
    ["mke2fs", "/usr/sbin/mke2fs", "/sbin/mke2fs"]
        .iter()
        .any(|mkfs| {
            Command::new(mkfs)
                .arg("-V")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        })
}

/// Makes `image` a sparse copy of `template`: only the template's data is copied
/// (`SEEK_DATA`/`SEEK_HOLE`), the rest stays holes.
pub fn copy_sparse(template: &Path, image: &Path) -> Result<(), DiskError> {
    let from = File::open(template).map_err(io_err("open a disk template"))?;
    let len = from
        .metadata()
        .map_err(io_err("read a disk template"))?
        .len();
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)
        .map_err(io_err("create a sandbox's disk"))?;
    to.set_len(len).map_err(io_err("size a sandbox's disk"))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(from.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(DiskError::Io {
                what: "read a disk template",
                source: e,
            });
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(from.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(DiskError::Io {
                what: "read a disk template",
                source: io::Error::last_os_error(),
            });
        }
        let mut at = data as u64;
        while at < hole as u64 {
            let want = buf.len().min((hole as u64 - at) as usize);
            let got = from
                .read_at(&mut buf[..want], at)
                .map_err(io_err("read a disk template"))?;
            if got == 0 {
                break;
            }
            to.write_all_at(&buf[..got], at)
                .map_err(io_err("write a sandbox's disk"))?;
            at += got as u64;
        }
        pos = hole;
    }
    Ok(())
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// The kernel's `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// The kernel's `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Whether a disk is new (a copy of the template made just now) or was used before (kept
/// for a resume, or given back): only one used before can still be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Used {
    New,
    Before,
}

/// Attaches `image` to a free loop device that detaches itself once nothing uses it; returns
/// the device's path and an open descriptor of it (close it once it is mounted). A disk used
/// before may be attached still: a dead sandbox's mount namespace holds it until the last of
/// its processes is gone. Its device is used then, so that one filesystem, not two, writes
/// the image.
fn attach(image: &Path, used: Used) -> Result<(PathBuf, OwnedFd), DiskError> {
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)
        .map_err(io_err("open a sandbox's disk"))?;
    if used == Used::Before {
        if let Some(attached) = attached(&backing) {
            return Ok(attached);
        }
    }
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(io_err("open /dev/loop-control"))?;
    let mut last = io::Error::from_raw_os_error(libc::EBUSY);
    // Another process may take the free device between asking and configuring it.
    for _ in 0..32 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(DiskError::Io {
                what: "find a free loop device",
                source: io::Error::last_os_error(),
            });
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let device = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(d) => d,
            Err(e) => {
                last = e;
                continue;
            }
        };
        // SAFETY: all-zero bytes are a valid `loop_config` (plain integers and arrays).
        let mut config: LoopConfig = unsafe { std::mem::zeroed() };
        config.fd = backing.as_raw_fd() as u32;
        config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: LOOP_CONFIGURE reads a `loop_config` of the kernel's layout from the pointer.
        let rc = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                LOOP_CONFIGURE as _,
                &config as *const LoopConfig,
            )
        };
        if rc == 0 {
            return Ok((path, device.into()));
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EBUSY) {
            break;
        }
    }
    Err(DiskError::Io {
        what: "attach a sandbox's disk to a loop device",
        source: last,
    })
}

/// The loop device `image` (open) is attached to, if any, with an open descriptor of it.
fn attached(image: &fs::File) -> Option<(PathBuf, OwnedFd)> {
    let st = nix::sys::stat::fstat(image).ok()?;
    for entry in fs::read_dir("/sys/block").ok()?.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        // `loop/` is there only while the device has a backing file.
        if !name.starts_with("loop") || !entry.path().join("loop").exists() {
            continue;
        }
        let path = PathBuf::from(format!("/dev/{name}"));
        let Ok(device) = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        else {
            continue;
        };
        if backs(&device, &st) {
            return Some((path, device.into()));
        }
    }
    None
}

/// Whether the loop device open as `device` has as its backing file the one `image` is the
/// status of.
fn backs(device: &File, image: &nix::sys::stat::FileStat) -> bool {
    // SAFETY: all-zero bytes are a valid `loop_info64` (plain integers and arrays).
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes a `loop_info64` of the kernel's layout.
    let rc = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            LOOP_GET_STATUS64 as _,
            &mut info as *mut LoopInfo64,
        )
    };
    rc == 0 && info.lo_inode == image.st_ino && same_device(info.lo_device, image.st_dev)
}

/// Whether the kernel's encoding of a device number in `loop_info64` (`huge_encode_dev`)
/// and the C library's `dev_t` name the same device.
fn same_device(huge: u64, dev: libc::dev_t) -> bool {
    let major = (huge >> 8) & 0xfff;
    let minor = (huge & 0xff) | ((huge >> 12) & 0xfff00);
    u64::from(libc::major(dev)) == major && u64::from(libc::minor(dev)) == minor
}

/// Mounts the disk `image` on `target`.
fn mount(image: &Path, target: &Path, used: Used) -> Result<(), DiskError> {
    let (device, fd) = attach(image, used)?;
    let mounted = mount_device(&device, target);
    // The mount holds the device now; with the descriptor closed it detaches once unmounted
    // (or at once, if the mount failed).
    drop(fd);
    mounted.map_err(|e| DiskError::Io {
        what: "mount a sandbox's disk",
        source: io::Error::from_raw_os_error(e as i32),
    })
}

/// Mounts the disk on loop device `device` on `target`.
fn mount_device(device: &Path, target: &Path) -> nix::Result<()> {
    let mount_with = |options: &str| {
        nix::mount::mount(
            Some(device),
            target,
            Some("ext4"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
            Some(options),
        )
    };
    // The image is sparse: its inode tables read as zeros already, and zeroing them in the
    // background would only allocate host disk (and make removing the image slow). Nor are
    // the block bitmaps read ahead: for a 10 GiB disk that is 80 of them, 335 KiB of the
    // host's memory for every sandbox, read from disk behind each mount, where allocating
    // reads the few a sandbox writes into. Kernels before 5.9 know no such option.
    match mount_with("discard,noinit_itable,no_prefetch_block_bitmaps") {
        Err(nix::errno::Errno::EINVAL) => mount_with("discard,noinit_itable"),
        other => other,
    }
}

/// Unmounts what is mounted on `target`, if anything: at once if nothing uses it, else
/// lazily (it goes when the last descriptor into it closes).
pub fn unmount(target: &Path) {
    if nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW).is_err() {
        let _ = nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH);
    }
}

/// Unmounts the disk `image` mounted on `target` that nothing will read again, without
/// writing back what is dirty in it: the filesystem is shut down first (`EXT4_IOC_SHUTDOWN`,
/// no log flush), which drops what the kernel holds for it, and then detached, so the
/// unmount does not wait for anything. Writing the workspace's last files out to an image
/// about to be deleted cost a turn 3–9 ms.
///
/// Only the root of the filesystem on the loop device backed by `image` is ever shut down:
/// what is on `target` is looked at through the descriptor the shutdown goes to, so a
/// directory that is no longer a mount point (another process unmounted it first) or some
/// other filesystem there is only unmounted, never shut down.
pub fn discard(target: &Path, image: &Path) {
    /// `_IOR('X', 125, __u32)` and `EXT4_GOING_FLAGS_NOLOGFLUSH` from linux/ext4.h.
    const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
    const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;
    let root = nix::fcntl::open(
        target,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    );
    if let Ok(root) = root
        && is_root_of(&root, image)
    {
        let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: the ioctl reads one u32 that outlives the call, on a descriptor this
        // function holds.
        unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_SHUTDOWN as _, &flags) };
    }
    let _ = nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH);
}

/// Whether `dir` is the root directory of an ext4 filesystem on the loop device whose
/// backing file is `image`.
fn is_root_of(dir: &OwnedFd, image: &Path) -> bool {
    /// The inode number of an ext4 filesystem's root directory.
    const EXT4_ROOT_INO: u64 = 2;
    let ext4 = nix::sys::statfs::fstatfs(dir)
        .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC);
    let Ok(st) = nix::sys::stat::fstat(dir) else {
        return false;
    };
    if !ext4 || st.st_ino != EXT4_ROOT_INO {
        return false;
    }
    let Ok(image) = nix::sys::stat::stat(image) else {
        return false;
    };
    // The device the directory is on, by its number: one open, not a look at every loop
    // device (a daemon with a thousand sandboxes has a thousand).
    let (major, minor) = (libc::major(st.st_dev), libc::minor(st.st_dev));
    let Ok(link) = fs::read_link(format!("/sys/dev/block/{major}:{minor}")) else {
        return false;
    };
    let Some(name) = link.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if !name.starts_with("loop") {
        return false;
    }
    let Ok(device) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/dev/{name}"))
    else {
        return false;
    };
    nix::sys::stat::fstat(&device).is_ok_and(|d| d.st_rdev == st.st_dev) && backs(&device, &image)
}

/// Whether something is mounted on `target` (its device differs from its parent's).
pub fn is_mounted(target: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(at), Some(Ok(parent))) = (
        fs::symlink_metadata(target),
        target.parent().map(fs::symlink_metadata),
    ) else {
        return false;
    };
    at.is_dir() && at.dev() != parent.dev()
}

pub use upstream_sandbox::sandboxfs::is_full;

/// A sandbox directory's disk.
#[derive(Debug)]
pub(crate) struct DiskDir {
    /// Its size in bytes: the sandbox's disk limit.
    limit: u64,
    /// The kept set (`<runtime>/kept/<sandbox>`) whose disk this one is, when resumed.
    resumed_from: Option<PathBuf>,
}

/// In a resumed sandbox's directory: the kept set its disk came from, to go back to if the
/// sandbox's upstream dies.
const RESUMED_FROM: &str = "resumed-from";
/// On a kept disk: the layers kept, as [`Layers::keep`] leaves them.
const KEPT: &str = "kept";
/// On a resumed disk: the kept layers, while the sandbox moves them in.
const RESUMING: &str = "resume";

impl NamespaceBackend {
    /// The directory of a new sandbox at `path` and the limits it cannot enforce: one whose
    /// files are on a disk of their own of the spec's limit, where upstream can make one;
    /// else a plain one (from the pool), and a sentence saying the disk limit does not hold.
    pub(crate) fn claim_dir(
        &self,
        path: &Path,
        spec: &SandboxSpec,
    ) -> Result<(SandboxDir, Vec<String>), SandboxError> {
        if spec.scratch_in_memory {
            return Ok((SandboxDir::claim(path, &self.pool)?, Vec::new()));
        }
        let limit = spec.limits.disk_or_default();
        let resume = spec
            .workspace
            .as_ref()
            .and_then(|w| w.resume.as_ref())
            .and_then(|k| self.kept_path(k));
        let resume = resume.as_deref();
        let why_not = if self.rootless {
            "only root may mount a filesystem of the sandbox's own, so what it writes goes to the host's disk unbounded".to_string()
        } else if resume.is_some_and(|kept| !kept.join(IMAGE).is_file()) {
            "the workspace it resumes was kept without a disk of its own".to_string()
        } else {
            match SandboxDir::with_disk(path, &self.disks, limit, resume) {
                Ok(dir) => return Ok((dir, Vec::new())),
                Err(e) => e.to_string(),
            }
        };
        let note = format!(
            "disk limit ({}) is not enforced: {why_not}",
            upstream_doc_size(limit)
        );
        Ok((SandboxDir::claim(path, &self.pool)?, vec![note]))
    }
}

/// The sets of layers kept for resuming in `kept_root` (`<runtime>/kept`).
pub(crate) fn kept_sets(kept_root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(kept_root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// A size for a message: `10G`, `512M`.
fn upstream_doc_size(bytes: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

impl SandboxDir {
    /// A new sandbox directory at `path` whose files live on a disk of `limit` bytes: a
    /// fresh one from the template in `templates`, or, resuming, the disk kept at `resume`
    /// (moved in; it goes back if this fails).
    fn with_disk(
        path: &Path,
        templates: &Path,
        limit: u64,
        resume: Option<&Path>,
    ) -> Result<SandboxDir, DiskError> {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(path)
            .map_err(io_err("create the sandbox's directory"))?;
        let data = path.join(DATA);
        let image = path.join(IMAGE);
        let made = (|| {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&data)
                .map_err(io_err("create the sandbox's directory"))?;
            match resume {
                Some(kept) => {
                    fs::write(path.join(RESUMED_FROM), kept.as_os_str().as_encoded_bytes())
                        .map_err(io_err("note which disk the sandbox resumes"))?;
                    fs::rename(kept.join(IMAGE), &image).map_err(io_err("take the kept disk"))?;
                }
                None => copy_sparse(&template(templates, limit)?, &image)?,
            }
            mount(
                &image,
                &data,
                if resume.is_some() {
                    Used::Before
                } else {
                    Used::New
                },
            )?;
            if resume.is_some() {
                // The kept layers are moved in from here ([`Layers::prepare`]).
                fs::rename(data.join(KEPT), data.join(RESUMING))
                    .map_err(io_err("find the layers on the kept disk"))?;
            } else {
                for sub in ["root", "upper", "work"] {
                    // Upstream's user's: sandbox root's (see `idmap`).
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(data.join(sub))
                        .map_err(io_err("prepare the sandbox's disk"))?;
                }
            }
            Ok(())
        })();
        if let Err(e) = made {
            if is_mounted(&data) {
                unmount(&data);
            }
            if let Some(kept) = resume {
                let _ = fs::rename(&image, kept.join(IMAGE));
            }
            let _ = upstream_sandbox::sandboxfs::remove_all(path);
            return Err(e);
        }
        Ok(SandboxDir {
            path: path.to_path_buf(),
            data,
            reused: false,
            disk: Some(DiskDir {
                limit,
                resumed_from: resume.map(Path::to_path_buf),
            }),
        })
    }

    /// Where the workspace's kept layers are moved in from when resuming `kept`: on this
    /// directory's own disk when it took the kept one, else `kept` itself.
    pub(crate) fn resume_from(&self, kept: Option<&Path>) -> Option<PathBuf> {
        match &self.disk {
            Some(DiskDir {
                resumed_from: Some(_),
                ..
            }) => Some(self.data.join(RESUMING)),
            _ => kept.map(Path::to_path_buf),
        }
    }
}

/// Tells whether a command ended with its sandbox's disk full.
#[derive(Debug, Clone, Default)]
pub(crate) struct DiskWatch(Option<(PathBuf, u64)>);

impl DiskWatch {
    pub(crate) fn of(dir: Option<&SandboxDir>) -> DiskWatch {
        DiskWatch(dir.and_then(|d| Some((d.data.clone(), d.disk.as_ref()?.limit))))
    }

    /// The disk limit a command that ended with `status` ran out of, if it failed with the
    /// disk full.
    pub(crate) fn out_of_disk(&self, status: ExitStatus) -> Option<u64> {
        let (data, limit) = self.0.as_ref()?;
        (!status.success() && is_full(data)).then_some(*limit)
    }
}

/// Ends the layers of a sandbox whose files are on a disk of their own, as `ending` says:
/// kept, the disk becomes the kept set `<kept_root>/<sandbox>/disk.img`, unmounted, with the
/// layers to resume from on it; a disk it was resumed from is used up (discarded or kept
/// anew) or goes back where it came from. Returns where it was kept.
pub(crate) fn end(
    dir: &SandboxDir,
    layers: Option<Layers>,
    ending: Ending,
    kept_root: &Path,
) -> io::Result<Option<PathBuf>> {
    let resumed_from = dir.disk.as_ref().and_then(|d| d.resumed_from.clone());
    let Some(layers) = layers else {
        return Ok(None);
    };
    let data = &dir.data;
    let mut kept = None;
    match ending {
        Ending::Keep => {
            layers.keep(data, &data.join(KEPT))?;
            tidy(data);
            unmount(data);
            let name = dir.path.file_name().unwrap_or_default();
            let target = kept_root.join(name);
            fs::create_dir_all(&target)?;
            fs::rename(dir.path.join(IMAGE), target.join(IMAGE))?;
            if let Some(old) = resumed_from {
                let _ = upstream_sandbox::sandboxfs::remove_all(&old);
            }
            kept = Some(target);
        }
        Ending::Discard => {
            layers.forget_resume(data);
            layers.remove(data);
            if let Some(old) = resumed_from {
                let _ = upstream_sandbox::sandboxfs::remove_all(&old);
            }
        }
        Ending::Return => give_back(&dir.path),
    }
    Ok(kept)
}

/// Puts the disk a resumed sandbox directory took back into the kept set it came from,
/// with its layers where they were; unmounts it.
fn give_back(path: &Path) {
    let data = path.join(DATA);
    let Ok(kept) = fs::read(path.join(RESUMED_FROM)) else {
        return;
    };
    // SAFETY: the bytes were written from an `OsStr` by this module.
    let kept = PathBuf::from(unsafe { std::ffi::OsString::from_encoded_bytes_unchecked(kept) });
    if !is_mounted(&data) && mount(&path.join(IMAGE), &data, Used::Before).is_err() {
        return;
    }
    crate::layers::return_resumed(&data);
    let _ = fs::rename(data.join(RESUMING), data.join(KEPT));
    tidy(&data);
    unmount(&data);
    if fs::create_dir_all(&kept).is_ok() && fs::rename(path.join(IMAGE), kept.join(IMAGE)).is_ok() {
        let _ = fs::remove_file(path.join(RESUMED_FROM));
    }
}

/// Leaves only the kept layers on a disk about to be kept: the workspace's other layers,
/// the root's writable layer and overlayfs's work directories (with the marker a volatile
/// overlay leaves, which would stop the next mount) go, and empty ones take their place.
fn tidy(data: &Path) {
    for sub in ["layers", "rootlayers", "upper", "work"] {
        let _ = upstream_sandbox::sandboxfs::remove_all(&data.join(sub));
    }
    for sub in ["upper", "work"] {
        let _ = fs::DirBuilder::new().mode(0o755).create(data.join(sub));
    }
}

/// The directory of a sandbox whose upstream died: a disk it resumed goes back.
pub(crate) fn return_stale(path: &Path) {
    if path.join(RESUMED_FROM).exists() {
        give_back(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_structs_have_the_kernels_sizes() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn a_sparse_copy_has_the_templates_bytes_and_holes() {
        let dir = std::env::temp_dir().join(format!("upstream-disk-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let template = dir.join("t");
        let f = File::create(&template).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(f);
        let image = dir.join("i");
        copy_sparse(&template, &image).unwrap();
        let bytes = fs::read(&image).unwrap();
        assert_eq!(bytes.len(), 64 << 20);
        assert_eq!(&bytes[..4], b"head");
        assert_eq!(&bytes[bytes.len() - 4..], b"tail");
        use std::os::unix::fs::MetadataExt;
        let blocks = fs::metadata(&image).unwrap().blocks();
        assert!(blocks * 512 < 1 << 20, "holes stay holes: {blocks} blocks");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A disk still mounted somewhere (a dead sandbox's mount namespace) is mounted again
    /// through the same device, so one filesystem writes it; a new disk gets a device of its
    /// own (the control: the two are told apart by the backing file, not by chance).
    #[test]
    fn a_disk_used_before_is_attached_through_its_device_if_it_still_has_one() {
        if !can_mount_disks() {
            return;
        }
        let (dir, template) = dir_with_template("attach", 16 << 20);
        let (first, second) = (dir.join("first.img"), dir.join("second.img"));
        copy_sparse(&template, &first).unwrap();
        copy_sparse(&template, &second).unwrap();
        let held = dir.join("held");
        fs::create_dir(&held).unwrap();
        mount(&first, &held, Used::New).unwrap();
        let (again, fd) = attach(&first, Used::Before).unwrap();
        drop(fd);
        let (other, fd) = attach(&second, Used::New).unwrap();
        drop(fd);
        let device_of = |target: &Path| {
            let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
            table
                .lines()
                .find(|l| l.split(' ').nth(4) == target.to_str())
                .and_then(|l| l.split(" - ").nth(1))
                .and_then(|rest| rest.split(' ').nth(1))
                .map(str::to_string)
                .unwrap()
        };
        assert_eq!(Some(device_of(&held).as_str()), again.to_str());
        assert_ne!(again, other);
        unmount(&held);
        let _ = fs::remove_dir_all(&dir);
    }

    /// Discarding shuts down no filesystem but the disk's own: not the one a directory that
    /// is no longer a mount point lies on (another process unmounted it first), nor a disk
    /// backed by another image. The filesystem playing the host's is a disk too, so a
    /// shutdown would show; `a_discarded_disk_writes_nothing_back` is the control that
    /// discarding does shut down the disk it names.
    #[test]
    fn a_discard_shuts_down_only_the_disk_it_names() {
        if !can_mount_disks() {
            return;
        }
        let (dir, template) = dir_with_template("discard-other", 64 << 20);
        let (host_image, host) = (dir.join("host.img"), dir.join("host"));
        copy_sparse(&template, &host_image).unwrap();
        fs::create_dir_all(&host).unwrap();
        mount(&host_image, &host, Used::New).unwrap();
        fs::write(host.join("keep"), b"the host's file").unwrap();
        // Through a descriptor opened before: a discard unmounts what it is given, and a
        // filesystem shut down answers every read and write with EIO.
        let held = File::open(&host).unwrap();
        let usable = || {
            let at = |name: &str| format!("/proc/self/fd/{}/{name}", held.as_raw_fd());
            fs::read(at("keep")).is_ok_and(|b| b == b"the host's file")
                && fs::write(at("new"), b"x").is_ok()
        };
        // A sandbox directory on it whose disk is gone: `data` is a plain directory.
        let sandbox = host.join("sandbox");
        fs::create_dir_all(sandbox.join(DATA)).unwrap();
        fs::write(sandbox.join(IMAGE), b"").unwrap();
        discard(&sandbox.join(DATA), &sandbox.join(IMAGE));
        assert!(usable(), "a plain directory's filesystem stays up");
        // The mount point of another image's disk.
        let other = dir.join("other.img");
        copy_sparse(&template, &other).unwrap();
        discard(&host, &other);
        assert!(usable(), "another image's disk stays up");
        // The control, through the same descriptor: discarding the disk by its own image
        // shuts it down.
        mount(&host_image, &host, Used::Before).unwrap();
        discard(&host, &host_image);
        assert!(!usable(), "the disk named is shut down");
        drop(held);
        let _ = fs::remove_dir_all(&dir);
    }

    /// A discarded disk is gone from its mount point at once and what was dirty in it never
    /// reaches its image; the control, a disk unmounted the usual way, writes it out.
    #[test]
    fn a_discarded_disk_writes_nothing_back() {
        if !can_mount_disks() {
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let (dir, template) = dir_with_template("discard", 64 << 20);
        let written = |how: fn(&Path, &Path)| {
            let (image, target) = (dir.join("disk.img"), dir.join("data"));
            copy_sparse(&template, &image).unwrap();
            fs::create_dir_all(&target).unwrap();
            mount(&image, &target, Used::New).unwrap();
            let before = fs::metadata(&image).unwrap().blocks() * 512;
            fs::write(target.join("dirty"), vec![7u8; 8 << 20]).unwrap();
            how(&target, &image);
            assert!(!is_mounted(&target), "unmounted");
            // The device lets go of the image once the filesystem is gone; its size on the
            // host is what reached it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while attached(&File::open(&image).unwrap()).is_some()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let after = fs::metadata(&image).unwrap().blocks() * 512;
            fs::remove_file(&image).unwrap();
            after - before
        };
        assert!(
            written(|target, _| unmount(target)) >= 8 << 20,
            "an unmount writes the file out"
        );
        let discarded = written(discard);
        assert!(discarded < 1 << 20, "{discarded} bytes written back");
        let _ = fs::remove_dir_all(&dir);
    }

    /// Whether this test may attach and mount disks (root, loop devices); says SKIPPED if not.
    fn can_mount_disks() -> bool {
        if nix::unistd::geteuid().is_root() && Path::new("/dev/loop-control").exists() {
            return true;
        }
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (needs root): a disk needs a loop device and a mount"
        );
        false
    }

    /// A test directory `name` holding a disk template of `size` bytes: (directory, template).
    fn dir_with_template(name: &str, size: u64) -> (PathBuf, PathBuf) {
        let dir = tempfile_dir(name);
        let templates = dir.join("templates");
        fs::create_dir_all(&templates).unwrap();
        let template = template(&templates, size).unwrap();
        (dir, template)
    }

    fn tempfile_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "upstream-disk-{name}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }
}

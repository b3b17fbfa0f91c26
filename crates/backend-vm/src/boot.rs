//! What a VM boots: a Linux kernel found on the host, and an initramfs this backend makes
//! from it and from the upstream binary itself, whose `/init` is that binary ([`crate::guest`]).
//!
//! The initramfs is made once per (binary, kernel) and kept in the runtime directory. It
//! holds the binary (and, for a dynamically linked one, the libraries it loads), the kernel
//! modules the guest needs that the kernel does not have built in — the virtio transports,
//! console and block devices, overlayfs — with whatever they depend on, in load order, the
//! network driver's apart (loaded only by a guest with a network device, [`crate::network`]),
//! and `/dev/console`. Module signatures are cut off: checking them costs a guest under TCG tens
//! of milliseconds of emulated RSA, and a kernel that does not enforce signatures loads the
//! modules without them.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::vmm::Channel;
use crate::{guest, network};

/// Errors finding a kernel or making the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "no kernel for VMs: {0}; run scripts/vm-kernel (it unpacks Debian's \
         linux-image-cloud-amd64 into {default}), or name one with --kernel or \
         $UPSTREAM_VM_KERNEL",
        default = DEFAULT_KERNEL_ROOT
    )]
    NoKernel(String),
    #[error("the kernel {kernel}: {reason}")]
    Kernel { kernel: PathBuf, reason: String },
    #[error("cannot make the VM's initramfs at {path}: {source}")]
    Initramfs { path: PathBuf, source: io::Error },
}

/// Where `scripts/vm-kernel` unpacks the default guest kernel: `boot/vmlinuz-<version>`
/// and `lib/modules/<version>` below it.
pub const DEFAULT_KERNEL_ROOT: &str = "/var/cache/upstream/vm-kernel";

/// A guest kernel and its modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub image: PathBuf,
    pub version: String,
    /// `lib/modules/<version>` of the kernel, if it has modules.
    pub modules: Option<PathBuf>,
}

impl Kernel {
    /// The kernel to boot: `explicit`, else `$UPSTREAM_VM_KERNEL`, else the newest under
    /// [`DEFAULT_KERNEL_ROOT`], else the host's own cloud kernel in `/boot`.
    pub fn find(explicit: Option<&Path>) -> Result<Kernel, BootError> {
        if let Some(path) = explicit {
            return Kernel::at(path);
        }
        if let Some(path) = std::env::var_os("UPSTREAM_VM_KERNEL") {
            return Kernel::at(Path::new(&path));
        }
        for boot in [
            PathBuf::from(DEFAULT_KERNEL_ROOT).join("boot"),
            PathBuf::from("/boot"),
        ] {
            let Ok(entries) = fs::read_dir(&boot) else {
                continue;
            };
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
                })
                .collect();
            found.sort();
            if let Some(newest) = found.pop() {
                return Kernel::at(&newest);
            }
        }
        Err(BootError::NoKernel(format!(
            "none under {DEFAULT_KERNEL_ROOT}/boot or /boot"
        )))
    }

    /// The kernel image at `path` (`…/boot/vmlinuz-<version>`), with the modules of that
    /// version beside it (`…/lib/modules/<version>`) or the host's (`/lib/modules`).
    pub fn at(path: &Path) -> Result<Kernel, BootError> {
        let fail = |reason: String| BootError::Kernel {
            kernel: path.to_path_buf(),
            reason,
        };
        let meta = fs::metadata(path).map_err(|e| fail(e.to_string()))?;
        if !meta.is_file() {
            return Err(fail("is not a file".into()));
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let version = name
            .strip_prefix("vmlinuz-")
            .unwrap_or_default()
            .to_string();
        let root = path.parent().and_then(Path::parent);
        let modules = [
            root.map(|r| r.join("lib/modules").join(&version)),
            Some(PathBuf::from("/lib/modules").join(&version)),
        ]
        .into_iter()
        .flatten()
        .find(|dir| !version.is_empty() && dir.join("modules.dep").is_file());
        Ok(Kernel {
            image: path.to_path_buf(),
            version,
            modules,
        })
    }
}

/// The modules every guest loads (what they need comes along): the virtio-mmio transport of
/// the microvm machine, the agent's channel, disks and overlayfs. A guest reached over
/// virtio-serial (QEMU) carries the console; one reached over vsock (Firecracker, which has
/// no virtio console) the vsock transport instead.
fn wanted_modules(channel: Channel) -> &'static [&'static str] {
    match channel {
        Channel::VirtioSerial => &["virtio_mmio", "virtio_console", "virtio_blk", "overlay"],
        Channel::Vsock => &[
            "virtio_mmio",
            "vmw_vsock_virtio_transport",
            "virtio_blk",
            "overlay",
        ],
    }
}

/// The modules a guest with a network device loads after those (`failover` and
/// `net_failover` come along with `virtio_net`).
const NETWORK_MODULES: &[&str] = &["virtio_net"];

/// The modules of `kernel` in `wanted` and what they need but `loaded`, each after what it
/// depends on: paths relative to its modules directory.
fn modules_in_order(
    modules: &Path,
    wanted: &[&str],
    loaded: &[String],
) -> Result<Vec<String>, String> {
    let dep = fs::read_to_string(modules.join("modules.dep"))
        .map_err(|e| format!("cannot read {}/modules.dep: {e}", modules.display()))?;
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let name_of = |path: &str| -> String {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let mut table = std::collections::HashMap::new();
    for line in dep.lines() {
        let Some((module, needs)) = line.split_once(':') else {
            continue;
        };
        let needs: Vec<String> = needs.split_whitespace().map(str::to_string).collect();
        table.insert(name_of(module), (module.trim().to_string(), needs));
    }
    let builtin: std::collections::HashSet<String> =
        builtin.lines().map(|l| name_of(l.trim())).collect();
    let mut order: Vec<String> = Vec::new();
    for wanted in wanted {
        if builtin.contains(*wanted) {
            continue;
        }
        let Some((path, needs)) = table.get(*wanted) else {
            return Err(format!(
                "the kernel has no module {wanted}, built in or not"
            ));
        };
        // modules.dep lists every module needed, nearest first: load them farthest first.
        for need in needs.iter().rev().chain(std::iter::once(path)) {
            if !order.contains(need) && !loaded.contains(need) {
                order.push(need.clone());
            }
        }
    }
    Ok(order)
}

/// A kernel module without the signature appended to it.
fn unsigned(module: Vec<u8>) -> Vec<u8> {
    const MAGIC: &[u8] = b"~Module signature appended~\n";
    // struct module_signature: five bytes, three of padding, a big-endian u32 length.
    const INFO: usize = 12;
    let Some(body) = module.strip_suffix(MAGIC) else {
        return module;
    };
    if body.len() < INFO {
        return module;
    }
    let info = &body[body.len() - INFO..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    match (body.len() - INFO).checked_sub(sig_len) {
        Some(end) => body[..end].to_vec(),
        None => module,
    }
}

/// The libraries a dynamically linked `binary` loads, by the paths the loader finds them
/// at (its interpreter among them); none for a static one.
pub fn libraries_of(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("cannot run ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            found.push(PathBuf::from(path));
        }
    }
    Ok(found)
}

/// `binary` without its debug information, which a development build carries by the
/// hundred megabytes and a guest would have to hold in memory: `strip --strip-debug`
/// (binutils) into `stripped` where the host has it, else the binary as it is.
fn without_debug_info<'a>(binary: &'a Path, stripped: &'a Path) -> &'a Path {
    let ran = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(stripped)
        .arg(binary)
        .stderr(std::process::Stdio::null())
        .status();
    match ran {
        Ok(status) if status.success() => stripped,
        _ => binary,
    }
}

/// Makes (or finds, made before) the initramfs for `binary` and `kernel` in `cache`, for a
/// guest reached over virtio-serial.
pub fn initramfs(cache: &Path, binary: &Path, kernel: &Kernel) -> Result<PathBuf, BootError> {
    initramfs_for(cache, binary, kernel, Channel::VirtioSerial)
}

/// [`initramfs`] for a guest reached over `channel`.
pub fn initramfs_for(
    cache: &Path,
    binary: &Path,
    kernel: &Kernel,
    channel: Channel,
) -> Result<PathBuf, BootError> {
    let fail = |path: &Path, source: io::Error| BootError::Initramfs {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(binary).map_err(|e| fail(binary, e))?;
    let kmeta = fs::metadata(&kernel.image).map_err(|e| fail(&kernel.image, e))?;
    let mut key = blake3::Hasher::new();
    key.update(b"upstream initramfs 3\0");
    for m in [&meta, &kmeta] {
        key.update(&m.dev().to_le_bytes());
        key.update(&m.ino().to_le_bytes());
        key.update(&m.size().to_le_bytes());
        key.update(&m.mtime().to_le_bytes());
        key.update(&m.mtime_nsec().to_le_bytes());
    }
    key.update(kernel.image.as_os_str().as_encoded_bytes());
    if channel != Channel::VirtioSerial {
        key.update(b"\0vsock");
    }
    let name = format!("initramfs-{}.cpio", &key.finalize().to_hex()[..24]);
    let path = cache.join(&name);
    if path.is_file() {
        return Ok(path);
    }
    fs::create_dir_all(cache).map_err(|e| fail(cache, e))?;
    // One at a time in this process (tests make backends side by side), each under a name
    // of its own and renamed whole into place.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    if path.is_file() {
        return Ok(path);
    }
    let temp = cache.join(format!("{name}.{}.tmp", std::process::id()));
    let stripped = cache.join(format!("{name}.{}.init", std::process::id()));
    // Readable by the VMM, which runs as a user of its own and reaches it through a
    // descriptor upstream opened (`confine`); the cache directory stays private.
    let made = write_initramfs(&temp, &stripped, binary, kernel, channel)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&temp, fs::Permissions::from_mode(0o644))
                .map_err(|e| fail(&temp, e))
        })
        .and_then(|()| fs::rename(&temp, &path).map_err(|e| fail(&path, e)));
    let _ = fs::remove_file(&stripped);
    if made.is_err() {
        let _ = fs::remove_file(&temp);
    }
    made.map(|()| path)
}

/// Writes the initramfs of `binary` and `kernel` to `to`, with `stripped` as scratch.
fn write_initramfs(
    to: &Path,
    stripped: &Path,
    binary: &Path,
    kernel: &Kernel,
    channel: Channel,
) -> Result<(), BootError> {
    let fail = |path: &Path, source: io::Error| BootError::Initramfs {
        path: path.to_path_buf(),
        source,
    };
    let out = fs::File::create(to).map_err(|e| fail(to, e))?;
    let mut cpio = Cpio::new(io::BufWriter::with_capacity(1 << 20, out));
    let io = |e: io::Error| fail(to, e);
    for dir in ["dev", "proc", "sys", "upstream", "upstream/modules"] {
        cpio.dir(dir, 0o755).map_err(io)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1).map_err(io)?;
    let init = without_debug_info(binary, stripped);
    cpio.file_from(guest::INIT_PATH.trim_start_matches('/'), 0o755, init)
        .map_err(|e| fail(init, e))?;
    let libraries = libraries_of(binary).map_err(|e| fail(binary, io::Error::other(e)))?;
    for library in libraries {
        let inside = library
            .to_string_lossy()
            .trim_start_matches('/')
            .to_string();
        cpio.parents(&inside).map_err(io)?;
        cpio.file_from(&inside, 0o755, &library)
            .map_err(|e| fail(&library, e))?;
    }
    if let Some(modules) = &kernel.modules {
        let fail_kernel = |reason| BootError::Kernel {
            kernel: kernel.image.clone(),
            reason,
        };
        let order = modules_in_order(modules, wanted_modules(channel), &[]).map_err(fail_kernel)?;
        let network = modules_in_order(modules, NETWORK_MODULES, &order).map_err(fail_kernel)?;
        let (mut names, mut network_names) = (String::new(), String::new());
        for module in order.iter().chain(&network) {
            let source = modules.join(module);
            if !module.ends_with(".ko") {
                return Err(BootError::Kernel {
                    kernel: kernel.image.clone(),
                    reason: format!(
                        "its module {module} is compressed; the guest loads plain .ko files"
                    ),
                });
            }
            let bytes = fs::read(&source).map_err(|e| fail(&source, e))?;
            let file = module.rsplit('/').next().unwrap_or(module);
            cpio.file(&format!("upstream/modules/{file}"), 0o644, &unsigned(bytes))
                .map_err(io)?;
            let names = match network.contains(module) {
                true => &mut network_names,
                false => &mut names,
            };
            names.push_str(file);
            names.push('\n');
        }
        for (list, names) in [
            (guest::MODULES_ORDER, names),
            (network::MODULES_ORDER, network_names),
        ] {
            cpio.file(list.trim_start_matches('/'), 0o644, names.as_bytes())
                .map_err(io)?;
        }
    }
    let mut out = cpio.finish().map_err(io)?;
    out.flush().map_err(io)?;
    out.get_ref().sync_all().map_err(io)
}

/// A cpio archive in the "newc" format the kernel unpacks an initramfs from, written as it
/// is made.
struct Cpio<W: Write> {
    out: W,
    written: u64,
    inode: u32,
    dirs: std::collections::HashSet<String>,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Cpio<W> {
        Cpio {
            out,
            written: 0,
            inode: 0,
            dirs: Default::default(),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..pad as usize])
    }

    /// An entry's header and name; its `size` bytes of data follow.
    fn header(&mut self, name: &str, mode: u32, rdev: (u32, u32), size: u64) -> io::Result<()> {
        let size = u32::try_from(size).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is over 4 GiB"))
        })?;
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut head = Vec::with_capacity(110 + name.len() + 1);
        head.extend_from_slice(b"070701");
        for field in fields {
            head.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        head.extend_from_slice(name.as_bytes());
        head.push(0);
        self.put(&head)?;
        self.pad()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        self.header(name, mode, rdev, data.len() as u64)?;
        self.put(data)?;
        self.pad()
    }

    fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        if self.dirs.insert(name.to_string()) {
            self.entry(name, libc::S_IFDIR | perm, (0, 0), &[])?;
        }
        Ok(())
    }

    /// The directories above `path`.
    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut at = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            self.dir(&at.clone(), 0o755)?;
        }
        Ok(())
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, libc::S_IFREG | perm, (0, 0), data)
    }

    /// A file whose bytes are copied from `from`, never held whole.
    fn file_from(&mut self, name: &str, perm: u32, from: &Path) -> io::Result<()> {
        let mut source = fs::File::open(from)?;
        let size = source.metadata()?.len();
        self.header(name, libc::S_IFREG | perm, (0, 0), size)?;
        let copied = io::copy(&mut io::Read::take(&mut source, size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} changed while it was copied", from.display()),
            ));
        }
        self.written += copied;
        self.pad()
    }

    fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, libc::S_IFCHR | perm, (major, minor), &[])
    }

    fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_cut_off_and_an_unsigned_module_kept() {
        let mut signed = b"\x7fELF module body".to_vec();
        let signature = vec![0xabu8; 40];
        signed.extend_from_slice(&signature);
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        signed.extend_from_slice(&(signature.len() as u32).to_be_bytes());
        signed.extend_from_slice(b"~Module signature appended~\n");
        assert_eq!(unsigned(signed), b"\x7fELF module body");
        assert_eq!(unsigned(b"plain".to_vec()), b"plain");
        // A length past the start is no signature of this module's: left whole.
        let mut odd = vec![0u8; 8];
        odd.extend_from_slice(&u32::MAX.to_be_bytes());
        odd.extend_from_slice(b"~Module signature appended~\n");
        assert_eq!(unsigned(odd.clone()), odd);
    }

    #[test]
    fn modules_come_after_what_they_need_and_built_in_ones_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
             kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
             kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
             kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
             kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko\n\
             kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
             kernel/net/core/failover.ko:\n\
             kernel/drivers/virtio/virtio.ko:\n\
             kernel/drivers/virtio/virtio_pci_modern_dev.ko:\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/overlayfs/overlay.ko\n",
        )
        .unwrap();
        let order =
            modules_in_order(dir.path(), wanted_modules(Channel::VirtioSerial), &[]).unwrap();
        let at = |m: &str| order.iter().position(|o| o.ends_with(m)).unwrap();
        assert!(at("/virtio.ko") < at("/virtio_ring.ko"));
        assert!(at("/virtio_ring.ko") < at("/virtio_mmio.ko"));
        assert_eq!(
            order.iter().filter(|o| o.ends_with("/virtio.ko")).count(),
            1
        );
        assert!(!order.iter().any(|o| o.contains("overlay")), "{order:?}");
        // The network driver's list holds what the first does not: no module twice.
        let network = modules_in_order(dir.path(), NETWORK_MODULES, &order).unwrap();
        let names: Vec<&str> = network
            .iter()
            .map(|m| m.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(names, ["failover.ko", "net_failover.ko", "virtio_net.ko"]);
        // A module the kernel has neither way is an error that names it.
        fs::write(dir.path().join("modules.builtin"), "").unwrap();
        let e =
            modules_in_order(dir.path(), wanted_modules(Channel::VirtioSerial), &[]).unwrap_err();
        assert!(e.contains("overlay"), "{e}");
    }

    /// Debian's cloud kernel: a vsock guest loads the vsock transport after the vsock core
    /// it needs, and no console; a virtio-serial guest the console and no vsock.
    #[test]
    fn each_channel_carries_its_own_modules() {
        let kernel = Kernel::find(None).expect("no guest kernel: scripts/vm-kernel unpacks one");
        let modules = kernel.modules.expect("the guest kernel has modules");
        let vsock = modules_in_order(&modules, wanted_modules(Channel::Vsock), &[]).unwrap();
        let at = |order: &[String], m: &str| order.iter().position(|o| o.ends_with(m));
        let transport = at(&vsock, "/vmw_vsock_virtio_transport.ko").expect("no transport");
        let core = at(&vsock, "/vsock.ko").expect("no vsock core");
        assert!(core < transport, "{vsock:?}");
        assert_eq!(at(&vsock, "/virtio_console.ko"), None);
        let serial =
            modules_in_order(&modules, wanted_modules(Channel::VirtioSerial), &[]).unwrap();
        assert!(at(&serial, "/virtio_console.ko").is_some());
        assert_eq!(at(&serial, "/vsock.ko"), None);
    }

    #[test]
    fn the_archive_is_newc_with_a_trailer() {
        let mut cpio = Cpio::new(Vec::new());
        cpio.dir("dev", 0o755).unwrap();
        cpio.file("init", 0o755, b"abc").unwrap();
        let bytes = cpio.finish().unwrap();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
    }
}

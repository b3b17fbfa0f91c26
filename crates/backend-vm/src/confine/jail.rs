//! The VMM's root: a mount namespace of its own whose root holds what the VMM runs on and
//! what it is given, and nothing else of the host's — not unreadable: absent.
//!
//! What goes in ([`Jail::new`], from [`Piece`]s):
//! - the VMM's program at its own path, the shared libraries it loads at theirs (where its
//!   loader finds them: [`runs_on`]) and the loader itself;
//! - files its driver names at their own paths (QEMU's firmware, the resolver's
//!   configuration a NAT forwards to), read-only;
//! - `/dev/null`, `/dev/urandom` and the devices it is allowed (`/dev/kvm`);
//! - the files it reads, under [`REACHED`], read-only;
//! - its directory at [`DIR`], as writable as its files are.
//!
//! No `/proc`: every file the VMM opens is named by a path of its root, so it has no use for
//! `/proc/self/fd`, and without `/proc` it sees no process (not even its cgroup's others),
//! nor the kernel's settings, nor the host's mounts. No `/sys`, no `/etc` but the files
//! named, no `/tmp`, `/home`, `/root`, `/var`, `/run`.
//!
//! Each piece is a copy of a mount of the host made before the fork (`open_tree`, from a
//! path or from a descriptor this process opened: a mount no namespace holds), so the
//! child needs no path of the host to find it. Between fork and exec, as root, the child
//! ([`Jail::enter`]) makes a mount namespace of its own, private (nothing it mounts reaches
//! the host's), lays its root out in a small tmpfs over its `/tmp` — the directories
//! leading to each piece, an empty file or directory where it goes, the piece moved there
//! and remounted read-only (but the VM's directory), without set-uid programs, devices
//! (but the devices) or programs (but the program and its libraries) — makes the tmpfs
//! read-only and its root (`pivot_root`), and detaches the host's root from under it.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Where, in the VMM's root, its directory is.
pub const DIR: &str = "/vm";

/// Where, in the VMM's root, the files it only reads are.
pub const REACHED: &str = "/reached";

/// Where, in the VMM's new mount namespace, its root is laid out before it becomes its root.
const STAGE: &CStr = c"/tmp";

/// What a piece of the VMM's root is, which says how it is mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    /// A program or a library: read-only, executable.
    Program,
    /// A file it reads: read-only, nothing executable.
    Data,
    /// A device: read-only (which stops no write to a device), nothing executable.
    Device,
    /// The VM's directory: as writable as its files are, nothing executable.
    Directory,
}

impl What {
    /// The mount flags its copy gets.
    fn flags(self) -> libc::c_ulong {
        match self {
            What::Program => libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            What::Data => libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            What::Device => libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
            What::Directory => libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        }
    }
}

/// Where a piece comes from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// The host's file at this path (its links followed).
    Path(&'a Path),
    /// What this descriptor leads to.
    Open(BorrowedFd<'a>),
}

/// A piece of the VMM's root: what, from where, and where in the root (an absolute path).
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    pub source: Source<'a>,
    pub at: &'a Path,
    pub what: What,
}

/// A VMM's root, ready to be entered by its child between fork and exec.
#[derive(Debug)]
pub struct Jail {
    /// The directories of the stage to make, parents first.
    dirs: Vec<CString>,
    mounts: Vec<Mount>,
    /// The namespaces the VMM gets of its own besides its mount namespace.
    namespaces: libc::c_int,
}

/// A piece's copy, and where on the stage it goes.
#[derive(Debug)]
struct Mount {
    tree: OwnedFd,
    at: CString,
    what: What,
}

impl Jail {
    /// A root of `pieces`; a later piece at the path of an earlier one is left out.
    pub fn new(pieces: &[Piece]) -> Result<Jail, String> {
        let mut dirs = BTreeSet::new();
        let mut taken = BTreeSet::new();
        let mut mounts = Vec::new();
        for piece in pieces {
            let at = inside(piece.at)
                .ok_or_else(|| format!("{} is no plain absolute path", piece.at.display()))?;
            if !taken.insert(at.clone()) {
                continue;
            }
            let mut parent = at.parent();
            while let Some(dir) = parent.filter(|d| *d != Path::new("/")) {
                dirs.insert(dir.to_path_buf());
                parent = dir.parent();
            }
            let tree = open_tree(piece.source).map_err(|e| match piece.source {
                Source::Path(path) => format!("cannot take {}: {e}", path.display()),
                Source::Open(_) => format!("cannot take what goes at {}: {e}", at.display()),
            })?;
            mounts.push(Mount {
                tree,
                at: staged(&at)?,
                what: piece.what,
            });
        }
        if mounts.iter().any(|m| dirs.contains(&unstaged(&m.at))) {
            return Err("a file of the VMM's root is also a directory of it".into());
        }
        Ok(Jail {
            dirs: dirs.iter().map(|d| staged(d)).collect::<Result<_, _>>()?,
            mounts,
            namespaces: libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
        })
    }

    /// The VMM gets a network namespace of its own too, empty (not even loopback up): for a
    /// guest without a network device, whose VMM reaches nothing but its files and sockets.
    pub fn without_network(mut self) -> Jail {
        self.namespaces |= libc::CLONE_NEWNET;
        self
    }

    /// Makes this process's root the jail's. To be called between fork and exec, as root:
    /// it only makes system calls, allocates nothing and takes no lock.
    pub fn enter(&self) -> io::Result<()> {
        const TMPFS: &CStr = c"tmpfs";
        const OPTIONS: &CStr = c"mode=0755,size=64k,nr_inodes=4096";
        const ROOT: &CStr = c"/";
        const HERE: &CStr = c".";
        const EMPTY: &CStr = c"";
        let fail = |done: libc::c_long| {
            if done < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: system calls on strings made before the fork (NUL-terminated constants and
        // CStrings) and descriptors this process holds; each is async-signal-safe.
        unsafe {
            fail(libc::unshare(libc::CLONE_NEWNS | self.namespaces).into())?;
            fail(
                libc::mount(
                    std::ptr::null(),
                    ROOT.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
                .into(),
            )?;
            fail(
                libc::mount(
                    TMPFS.as_ptr(),
                    STAGE.as_ptr(),
                    TMPFS.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    OPTIONS.as_ptr().cast(),
                )
                .into(),
            )?;
            for dir in &self.dirs {
                if libc::mkdir(dir.as_ptr(), 0o755) < 0
                    && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                {
                    return Err(io::Error::last_os_error());
                }
            }
            for mount in &self.mounts {
                if mount.what == What::Directory {
                    fail(libc::mkdir(mount.at.as_ptr(), 0o755).into())?;
                } else {
                    let made = libc::open(
                        mount.at.as_ptr(),
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                        0o644,
                    );
                    fail(made.into())?;
                    libc::close(made);
                }
                fail(libc::syscall(
                    libc::SYS_move_mount,
                    mount.tree.as_raw_fd(),
                    EMPTY.as_ptr(),
                    libc::AT_FDCWD,
                    mount.at.as_ptr(),
                    libc::MOVE_MOUNT_F_EMPTY_PATH,
                ))?;
                fail(
                    libc::mount(
                        std::ptr::null(),
                        mount.at.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT | libc::MS_BIND | mount.what.flags(),
                        std::ptr::null(),
                    )
                    .into(),
                )?;
            }
            fail(
                libc::mount(
                    std::ptr::null(),
                    STAGE.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                    std::ptr::null(),
                )
                .into(),
            )?;
            fail(libc::chdir(STAGE.as_ptr()).into())?;
            // The stage becomes the root, and the old root, stacked on it, is let go.
            fail(libc::syscall(
                libc::SYS_pivot_root,
                HERE.as_ptr(),
                HERE.as_ptr(),
            ))?;
            fail(libc::umount2(HERE.as_ptr(), libc::MNT_DETACH).into())?;
            fail(libc::chdir(ROOT.as_ptr()).into())?;
        }
        Ok(())
    }
}

/// `path` as a plain absolute path (no `.`, `..` or repeated `/`), if it is one.
fn inside(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut plain = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(name) => plain.push(name),
            _ => return None,
        }
    }
    (plain != Path::new("/")).then_some(plain)
}

/// Where `at` of the root is on the stage.
fn staged(at: &Path) -> Result<CString, String> {
    let mut bytes = STAGE.to_bytes().to_vec();
    bytes.extend_from_slice(at.as_os_str().as_bytes());
    CString::new(bytes).map_err(|_| format!("{} has a NUL in its name", at.display()))
}

/// The path of the root that `staged` is on the stage.
fn unstaged(staged: &CString) -> PathBuf {
    let bytes = &staged.as_bytes()[STAGE.to_bytes().len()..];
    PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

/// A detached copy of the mount of `source` (not of what is mounted below it), closed on exec.
fn open_tree(source: Source) -> io::Result<OwnedFd> {
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    let (dir, path, flags) = match source {
        Source::Path(path) => (
            libc::AT_FDCWD,
            CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?,
            flags,
        ),
        Source::Open(fd) => (
            fd.as_raw_fd(),
            CString::default(),
            flags | libc::AT_EMPTY_PATH as libc::c_uint,
        ),
    };
    // SAFETY: open_tree reads the NUL-terminated `path`; the descriptor it returns is new
    // and this function's to own.
    unsafe {
        let fd = libc::syscall(libc::SYS_open_tree, dir, path.as_ptr(), flags);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd as i32))
    }
}

/// Whether VMMs can have a root of their own here, and why not: it takes root with the
/// right to mount (which a container may not give), and `open_tree` (Linux 5.2).
pub fn available() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("a root of its own needs upstream to run as root".into());
    }
    let probe = CString::new("/").map_err(|e| e.to_string())?;
    // SAFETY: open_tree copies the mount of "/" (not those below it), detached, and opens
    // a descriptor of the copy, closed at once (which lets the copy go); it reads the
    // NUL-terminated path.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            probe.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    };
    if fd < 0 {
        let error = io::Error::last_os_error();
        return Err(match error.raw_os_error() {
            Some(libc::ENOSYS) => format!(
                "this kernel cannot copy mounts for a root of its own ({error}; Linux 5.2 and later can)"
            ),
            _ => format!("upstream may not copy mounts for a root of its own ({error})"),
        });
    }
    // SAFETY: the descriptor was just opened and is this function's.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

/// What `program` runs on: the shared libraries it loads, where its loader finds them, the
/// loader itself, and the loader's cache where a library is found only through it.
///
/// The loader is asked (`ld.so --list program`, what `ldd` runs: it maps the libraries the
/// program's `DT_NEEDED` names, and theirs, and prints where it found each, running none of
/// the program's code). Its cache (`/etc/ld.so.cache`) goes in only where a library lies
/// outside the directories the loader searches without it (`ld.so --help` names them; a
/// loader that does not say gets the cache). A program with no loader (static) runs on
/// nothing. Asked once per program as it is on disk.
pub fn runs_on(program: &Path) -> Result<RunsOn, String> {
    type Known = Vec<((PathBuf, u64, u64, i64), RunsOn)>;
    static KNOWN: Mutex<Known> = Mutex::new(Vec::new());
    let meta = std::fs::metadata(program).map_err(|e| format!("{}: {e}", program.display()))?;
    let key = (
        program.to_path_buf(),
        meta.dev(),
        meta.ino(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
    );
    if let Some((_, found)) = KNOWN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(k, _)| *k == key)
    {
        return Ok(found.clone());
    }
    let Some(loader) = interpreter_of(program)? else {
        return Ok(RunsOn::default());
    };
    let listed = ask_loader(&loader, &["--list".as_ref(), program.as_os_str()])?;
    let mut libraries = libraries_listed(&listed).map_err(|missing| {
        format!(
            "{} needs {missing}, which its loader does not find",
            program.display()
        )
    })?;
    if !libraries.contains(&loader) {
        libraries.push(loader.clone());
    }
    let help = ask_loader(&loader, &["--help".as_ref()]).unwrap_or_default();
    let cache = Path::new("/etc/ld.so.cache");
    let found = RunsOn {
        cache: (needs_cache(&libraries, &loader, &search_path(&help)) && cache.is_file())
            .then(|| cache.to_path_buf()),
        libraries,
    };
    KNOWN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((key, found.clone()));
    Ok(found)
}

/// What a program runs on ([`runs_on`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunsOn {
    /// Its shared libraries and its loader.
    pub libraries: Vec<PathBuf>,
    /// The loader's cache, where it needs it.
    pub cache: Option<PathBuf>,
}

/// What `loader` prints given `args`, with an empty environment.
fn ask_loader(loader: &Path, args: &[&std::ffi::OsStr]) -> Result<String, String> {
    let out = Command::new(loader)
        .args(args)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", loader.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {}: {}",
            loader.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The loader an ELF program names (`PT_INTERP`); `None` for one linked statically. A file
/// that is no 64-bit little-endian ELF (a script) is refused: its interpreter would need a
/// root of its own too.
fn interpreter_of(program: &Path) -> Result<Option<PathBuf>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let not_elf = || {
        format!(
            "{} is not a 64-bit ELF program (a script?): name the VMM's binary itself",
            program.display()
        )
    };
    let mut file =
        std::fs::File::open(program).map_err(|e| format!("{}: {e}", program.display()))?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header).map_err(|_| not_elf())?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(not_elf());
    }
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let u64_at = |b: &[u8], at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(word)
    };
    let (phoff, phentsize, phnum) = (
        u64_at(&header, 0x20),
        usize::from(u16_at(&header, 0x36)),
        usize::from(u16_at(&header, 0x38)),
    );
    if phentsize < 56 || phnum > 4096 {
        return Err(not_elf());
    }
    let mut headers = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut headers))
        .map_err(|_| not_elf())?;
    for entry in headers.chunks(phentsize) {
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]) != PT_INTERP {
            continue;
        }
        let (offset, size) = (u64_at(entry, 8), u64_at(entry, 32));
        if size == 0 || size > 4096 {
            return Err(not_elf());
        }
        let mut name = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut name))
            .map_err(|_| not_elf())?;
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        let loader = PathBuf::from(std::ffi::OsStr::from_bytes(name));
        if !loader.is_absolute() {
            return Err(not_elf());
        }
        return Ok(Some(loader));
    }
    Ok(None)
}

/// The libraries (and the loader) the loader's `--list` output names, or the name of one it
/// did not find. Lines read `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x…)`, the
/// loader's own `/lib64/ld-linux-x86-64.so.2 (0x…)`, and the vDSO's name without a path.
fn libraries_listed(listed: &str) -> Result<Vec<PathBuf>, String> {
    let mut found = Vec::new();
    for line in listed.lines() {
        let (name, resolved) = match line.split_once("=>") {
            Some((name, resolved)) => (name.trim(), resolved.trim()),
            None => (line.trim(), line.trim()),
        };
        if resolved.starts_with("not found") {
            return Err(name.to_string());
        }
        let Some(path) = resolved
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        else {
            continue;
        };
        let path = PathBuf::from(path);
        if !found.contains(&path) {
            found.push(path);
        }
    }
    Ok(found)
}

/// The directories a glibc loader searches without its cache, as its `--help` says
/// (`  /lib/x86_64-linux-gnu (system search path)`).
fn search_path(help: &str) -> Vec<PathBuf> {
    help.lines()
        .filter_map(|l| l.trim().strip_suffix("(system search path)"))
        .map(|dir| PathBuf::from(dir.trim()))
        .collect()
}

/// Whether a library of `libraries` (`loader` aside, which the kernel loads by its path) is
/// in none of the loader's `search` directories nor a `glibc-hwcaps` directory of one: one
/// the loader finds only through its cache. Told nothing of its search path, it needs it.
fn needs_cache(libraries: &[PathBuf], loader: &Path, search: &[PathBuf]) -> bool {
    if search.is_empty() {
        return true;
    }
    libraries.iter().filter(|l| *l != loader).any(|library| {
        let Some(dir) = library.parent() else {
            return true;
        };
        let hwcaps = dir
            .parent()
            .filter(|p| p.file_name().is_some_and(|n| n == "glibc-hwcaps"))
            .and_then(Path::parent);
        !search
            .iter()
            .any(|s| s == dir || Some(s.as_path()) == hwcaps)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loaders_list_names_each_library_and_the_loader() {
        let listed = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                      \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f4b)\n\
                      \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f4c)\n\
                      \t/lib64/ld-linux-x86-64.so.2 (0x00007f4d)\n\
                      \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f4b)\n";
        assert_eq!(
            libraries_listed(listed).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libz.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            libraries_listed("\tlibgone.so.3 => not found\n"),
            Err("libgone.so.3".into())
        );
        // musl's loader says the same.
        assert_eq!(
            libraries_listed("\t/lib/ld-musl-x86_64.so.1 (0x7f)\n\tlibc.musl-x86_64.so.1 => /lib/ld-musl-x86_64.so.1 (0x7f)\n").unwrap(),
            [PathBuf::from("/lib/ld-musl-x86_64.so.1")]
        );
    }

    #[test]
    fn the_loaders_cache_goes_in_only_for_a_library_outside_its_search_path() {
        let help = "Shared library search path:\n  (libraries located via /etc/ld.so.cache)\n  /lib/x86_64-linux-gnu (system search path)\n  /usr/lib/x86_64-linux-gnu (system search path)\n  /lib (system search path)\n  /usr/lib (system search path)\n";
        let search = search_path(help);
        assert_eq!(search.len(), 4);
        let loader = Path::new("/lib64/ld-linux-x86-64.so.2");
        let plain = [
            "/lib/x86_64-linux-gnu/libz.so.1",
            "/usr/lib/x86_64-linux-gnu/glibc-hwcaps/x86-64-v3/libm.so.6",
            "/lib64/ld-linux-x86-64.so.2",
        ]
        .map(PathBuf::from);
        assert!(!needs_cache(&plain, loader, &search));
        let elsewhere = [PathBuf::from(
            "/usr/lib/x86_64-linux-gnu/ceph/librados.so.2",
        )];
        assert!(needs_cache(&elsewhere, loader, &search));
        let below = [PathBuf::from(
            "/usr/lib/glibc-hwcaps/x86-64-v3/extra/libx.so",
        )];
        assert!(needs_cache(&below, loader, &search));
        assert!(
            needs_cache(&plain, loader, &[]),
            "a loader that does not say"
        );
    }

    #[test]
    fn a_program_is_known_by_its_loader_and_a_script_is_refused() {
        let sh = Path::new("/bin/sh");
        let runs = runs_on(sh).unwrap().libraries;
        let loader = interpreter_of(sh).unwrap().unwrap();
        assert!(runs.contains(&loader), "{runs:?}");
        assert!(
            runs.iter().any(|l| l
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libc.so"))),
            "{runs:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("qemu");
        std::fs::write(&script, "#!/bin/sh\nexec qemu-system-x86_64 \"$@\"\n").unwrap();
        let said = runs_on(&script).unwrap_err();
        assert!(said.contains("not a 64-bit ELF program"), "{said}");
    }

    #[test]
    fn a_path_in_the_root_is_plain_and_absolute() {
        assert_eq!(inside(Path::new("/vm")), Some(PathBuf::from("/vm")));
        assert_eq!(
            inside(Path::new("/usr//lib/x")),
            Some(PathBuf::from("/usr/lib/x"))
        );
        for bad in ["vm", "/usr/../etc/passwd", "/"] {
            assert_eq!(inside(Path::new(bad)), None, "{bad}");
        }
    }
}

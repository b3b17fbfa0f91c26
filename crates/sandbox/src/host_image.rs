//! What a sandbox of `image: host` sees of the host, whichever backend makes it: a skeleton
//! root of mount points, the host's `/usr` and `/etc` read-only, and those of `/bin`,
//! `/sbin` and `/lib*` that are directories rather than links into `/usr`; its own
//! `/etc/hostname` and `/etc/hosts`. Nothing else of the host. The namespace backend binds
//! these trees in; the VM backend copies them into a read-only disk.

/// Host directories shared, read-only, into a host-image sandbox.
pub const SHARED_DIRS: &[&str] = &["usr", "etc"];

/// Top-level entries that are links into /usr on merged-/usr hosts, directories elsewhere:
/// a link is made in the sandbox's root as the host has it, a directory is shared as
/// [`SHARED_DIRS`] are.
pub const USR_LINKS: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Directories every sandbox root has.
pub const SKELETON: &[&str] = &[
    "usr",
    "etc",
    "proc",
    "dev",
    "sys",
    "tmp",
    "run",
    "workspace",
    "root",
    "home",
    "var",
    "var/tmp",
    "opt",
    "mnt",
];

/// The modes of the skeleton's directories that are not 0755.
pub const SKELETON_MODES: &[(&str, u32)] = &[("root", 0o700), ("tmp", 0o1777), ("var/tmp", 0o1777)];

/// The contents of `/etc/hostname` and `/etc/hosts` for a sandbox named `hostname`, which
/// stand in for the host's.
pub fn identity_files(hostname: &str) -> [(&'static str, String); 2] {
    let hosts = format!(
        "127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback {hostname}\n"
    );
    [("hostname", format!("{hostname}\n")), ("hosts", hosts)]
}

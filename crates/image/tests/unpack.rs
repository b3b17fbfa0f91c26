//! Layers unpacked into a rootfs: whiteouts, links, modes, compression, and layers built to
//! reach outside the rootfs, which must not.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use upstream_image::{Compression, Owners, UnpackError, unpack_layer};

/// A layer under construction; entries are written with raw names, so that a test can make
/// the malicious ones a careful tar writer refuses.
struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Layer {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, name: &str, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        let raw = &mut h.as_gnu_mut().unwrap().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        h
    }

    fn file(mut self, name: &str, mode: u32, data: &[u8]) -> Layer {
        let h = Layer::header(tar::EntryType::Regular, name, mode, data.len() as u64);
        self.builder.append(&h, data).unwrap();
        self
    }

    fn dir(mut self, name: &str, mode: u32) -> Layer {
        let h = Layer::header(tar::EntryType::Directory, name, mode, 0);
        self.builder.append(&h, &[][..]).unwrap();
        self
    }

    fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Layer {
        let mut h = Layer::header(kind, name, 0o777, 0);
        let raw = &mut h.as_gnu_mut().unwrap().linkname;
        raw[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.builder.append(&h, &[][..]).unwrap();
        self
    }

    fn device(mut self, name: &str) -> Layer {
        let h = Layer::header(tar::EntryType::Char, name, 0o666, 0);
        self.builder.append(&h, &[][..]).unwrap();
        self
    }

    fn bytes(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

fn apply(root: &Path, layer: Layer) -> Result<upstream_image::Unpacked, UnpackError> {
    unpack_layer(
        &layer.bytes()[..],
        Compression::None,
        root,
        Owners::Unpacker,
    )
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn upper_layers_whiteout_and_make_opaque_what_lower_ones_had() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    let lower = Layer::new()
        .dir("etc/", 0o755)
        .file("etc/a", 0o644, b"a")
        .file("etc/b", 0o644, b"b")
        .dir("dir/", 0o755)
        .file("dir/x", 0o644, b"x")
        .dir("dir/sub/", 0o755)
        .file("dir/sub/y", 0o644, b"y");
    apply(&root, lower).unwrap();
    let upper = Layer::new()
        .file("etc/.wh.a", 0o644, b"")
        .file("dir/z", 0o644, b"z")
        .file("dir/.wh..wh..opq", 0o644, b"");
    let stats = apply(&root, upper).unwrap();
    assert_eq!(stats.whiteouts, 2);
    assert_eq!(names(&root.join("etc")), vec!["b"]);
    assert_eq!(
        names(&root.join("dir")),
        vec!["z"],
        "opaque keeps only this layer's own"
    );
}

#[test]
fn files_links_modes_and_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    let layer = Layer::new()
        .dir("usr/bin/", 0o755)
        .file("usr/bin/tool", 0o4755, b"#!/bin/sh\n")
        .link(tar::EntryType::Symlink, "bin", "usr/bin")
        .link(tar::EntryType::Link, "usr/bin/tool2", "usr/bin/tool")
        .file("bin/through-link", 0o600, b"inside")
        .dir("private/", 0o700)
        .device("dev/null")
        .file("./etc/./conf", 0o640, b"k=v");
    let stats = apply(&root, layer).unwrap();
    assert_eq!(stats.devices_skipped, 1);
    // The set-uid bit is dropped (it could only act on the host), the rest is kept.
    let tool = fs::metadata(root.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.permissions().mode() & 0o7777, 0o755);
    assert_eq!(tool.nlink(), 2, "hardlinked");
    assert_eq!(
        fs::read_link(root.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    // An entry through the image's own link lands where the link points, inside.
    assert_eq!(
        fs::read(root.join("usr/bin/through-link")).unwrap(),
        b"inside"
    );
    assert_eq!(
        fs::metadata(root.join("private"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert!(!root.join("dev/null").exists());
    assert_eq!(fs::read(root.join("etc/conf")).unwrap(), b"k=v");
    assert_eq!(
        fs::metadata(root.join("etc/conf")).unwrap().mtime(),
        1_700_000_000
    );
}

#[test]
fn dotdot_paths_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    for name in ["../escape", "a/../../escape", "/../escape"] {
        let err = apply(&root, Layer::new().file(name, 0o644, b"x")).unwrap_err();
        assert!(matches!(err, UnpackError::Escape { .. }), "{name}: {err}");
    }
    assert!(!tmp.path().join("escape").exists());
}

#[test]
fn absolute_and_climbing_symlinks_lead_back_into_the_rootfs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    let outside = tmp.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    let layer = Layer::new()
        .dir("etc/", 0o755)
        .link(tar::EntryType::Symlink, "hostetc", "/etc")
        .file("hostetc/pwned", 0o644, b"1")
        .link(tar::EntryType::Symlink, "up", "../../../../../..")
        .file("up/pwned2", 0o644, b"2");
    apply(&root, layer).unwrap();
    assert!(
        !Path::new("/etc/pwned").exists(),
        "the host's /etc is untouched"
    );
    // Each landed inside, where the link points when the rootfs is `/`.
    assert_eq!(fs::read(root.join("etc/pwned")).unwrap(), b"1");
    assert_eq!(fs::read(root.join("pwned2")).unwrap(), b"2");
    // A link to a host directory the rootfs does not have leads nowhere: refused.
    let dangling = Layer::new()
        .link(tar::EntryType::Symlink, "abs", outside.to_str().unwrap())
        .file("abs/pwned3", 0o644, b"3");
    assert!(apply(&root, dangling).is_err());
    assert_eq!(
        names(&outside),
        Vec::<String>::new(),
        "nothing written outside"
    );
}

#[test]
fn a_file_replaces_a_planted_link_instead_of_writing_through_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    let target = tmp.path().join("host-file");
    fs::create_dir(&root).unwrap();
    fs::write(&target, b"host").unwrap();
    apply(
        &root,
        Layer::new().link(tar::EntryType::Symlink, "victim", target.to_str().unwrap()),
    )
    .unwrap();
    apply(&root, Layer::new().file("victim", 0o644, b"image")).unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"host");
    assert_eq!(fs::read(root.join("victim")).unwrap(), b"image");
    assert!(
        !fs::symlink_metadata(root.join("victim"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn hardlinks_cannot_reach_outside() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    let secret = tmp.path().join("secret");
    fs::write(&secret, b"host secret").unwrap();
    let err = apply(
        &root,
        Layer::new().link(tar::EntryType::Link, "stolen", "../secret"),
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::Escape { .. }), "{err}");
    // An absolute target is a path inside the rootfs, where there is no such file.
    let absolute = apply(
        &root,
        Layer::new().link(tar::EntryType::Link, "stolen", secret.to_str().unwrap()),
    );
    assert!(absolute.is_err());
    assert!(!root.join("stolen").exists());
    // Through a planted link to the host: resolved inside, still nothing to link.
    let through = apply(
        &root,
        Layer::new()
            .link(tar::EntryType::Symlink, "way", tmp.path().to_str().unwrap())
            .link(tar::EntryType::Link, "stolen", "way/secret"),
    );
    assert!(through.is_err());
    assert_eq!(
        fs::metadata(&secret).unwrap().nlink(),
        1,
        "the host file gained no link"
    );
}

#[test]
fn gzip_and_zstd_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    let plain = Layer::new().file("g.txt", 0o644, b"gzip").bytes();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    let gz = gz.finish().unwrap();
    unpack_layer(&gz[..], Compression::Gzip, &root, Owners::Unpacker).unwrap();
    let plain = Layer::new().file("z.txt", 0o644, b"zstd").bytes();
    let zst = zstd::encode_all(&plain[..], 3).unwrap();
    unpack_layer(&zst[..], Compression::Zstd, &root, Owners::Unpacker).unwrap();
    assert_eq!(fs::read(root.join("g.txt")).unwrap(), b"gzip");
    assert_eq!(fs::read(root.join("z.txt")).unwrap(), b"zstd");
    assert_eq!(
        Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
        Some(Compression::Zstd)
    );
    assert!(Compression::from_media_type("application/json").is_none());
    // A truncated stream is an error, not a half-unpacked success.
    let err = unpack_layer(
        &gz[..gz.len() / 2],
        Compression::Gzip,
        &root,
        Owners::Unpacker,
    );
    assert!(err.is_err());
}

#[test]
fn owners_are_shifted_into_the_sandbox_range() {
    if !nix::unistd::Uid::effective().is_root() {
        let _ = writeln!(std::io::stderr(), "SKIPPED (needs root): shifting owners");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    let mut h = Layer::header(tar::EntryType::Regular, "owned", 0o644, 1);
    h.set_uid(1000);
    h.set_gid(70_000);
    h.set_cksum();
    let mut layer = Layer::new();
    layer.builder.append(&h, &b"x"[..]).unwrap();
    unpack_layer(
        &layer.bytes()[..],
        Compression::None,
        &root,
        Owners::Shifted(100_000),
    )
    .unwrap();
    let meta = fs::metadata(root.join("owned")).unwrap();
    assert_eq!(meta.uid(), 101_000);
    assert_eq!(
        meta.gid(),
        100_000 + 65_534,
        "an id past the sandbox's range is nobody"
    );
}

#[test]
fn whiteouts_of_dot_and_dotdot_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    apply(&root, Layer::new().file("etc/keep", 0o644, b"k")).unwrap();
    for whiteout in ["etc/.wh..", "etc/.wh...", ".wh.."] {
        let err = apply(&root, Layer::new().file(whiteout, 0o644, b"")).unwrap_err();
        assert!(
            matches!(err, UnpackError::Escape { .. }),
            "{whiteout}: {err}"
        );
        assert_eq!(fs::read(root.join("etc/keep")).unwrap(), b"k", "{whiteout}");
    }
}

#[test]
fn set_id_bits_that_would_act_on_the_host_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    let layer = Layer::new()
        .file("suid", 0o4755, b"x")
        .file("sgid", 0o2711, b"x")
        .dir("shared/", 0o3777);
    apply(&root, layer).unwrap();
    let mode = |p: &str| fs::metadata(root.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("suid"), 0o755);
    assert_eq!(mode("sgid"), 0o711);
    // A directory's set-gid and sticky bits act only on what is made in it: kept.
    assert_eq!(mode("shared"), 0o3777);
}

/// The value of extended attribute `name` on `path`, if it has one.
fn xattr(path: &Path, name: &std::ffi::CStr) -> Option<Vec<u8>> {
    let path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut value = [0u8; 64];
    // SAFETY: getxattr into a local buffer of the length given.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    (n >= 0).then(|| value[..n as usize].to_vec())
}

#[test]
fn only_user_extended_attributes_are_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    // cap_setuid+ep, as `setcap` writes it (v2).
    let capability: &[u8] = &[
        0, 0, 0, 2, 0x80, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let mut layer = Layer::new();
    layer
        .builder
        .append_pax_extensions([
            ("SCHILY.xattr.security.capability", capability),
            ("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..]),
            ("SCHILY.xattr.user.upstream", &b"kept"[..]),
        ])
        .unwrap();
    let layer = layer.file("tool", 0o755, b"x");
    apply(&root, layer).unwrap();
    let tool = root.join("tool");
    assert_eq!(
        xattr(&tool, c"security.capability"),
        None,
        "no file capability"
    );
    assert_eq!(xattr(&tool, c"trusted.overlay.opaque"), None);
    match xattr(&tool, c"user.upstream") {
        Some(v) => assert_eq!(v, b"kept"),
        None => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (user.* part): this filesystem keeps no user.* attributes"
            );
        }
    }
}

#[test]
fn extended_attributes_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    let mut layer = Layer::new();
    layer
        .builder
        .append_pax_extensions([("SCHILY.xattr.user.upstream", &b"kept"[..])])
        .unwrap();
    let layer = layer.file("tagged", 0o644, b"x");
    apply(&root, layer).unwrap();
    let path = std::ffi::CString::new(root.join("tagged").to_str().unwrap()).unwrap();
    let mut value = [0u8; 16];
    // SAFETY: getxattr into a local buffer of the length given.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.upstream".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTSUP) {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: this filesystem keeps no user.* extended attributes"
        );
        return;
    }
    assert_eq!(&value[..n.max(0) as usize], b"kept");
}

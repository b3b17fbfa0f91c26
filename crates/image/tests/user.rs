//! The image's user, looked up in an image's `/etc/passwd` and `/etc/group` that try to make
//! the host read something else: a link to a host file, to `/dev/zero`, to a FIFO, a FIFO
//! itself, a table too large to read.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use upstream_image::{Compression, ImageConfig, ImageUser, Owners, unpack_layer};

/// A layer of regular files, symlinks and FIFOs, written as given.
#[derive(Default)]
struct Layer {
    builder: Option<tar::Builder<Vec<u8>>>,
}

impl Layer {
    fn new() -> Layer {
        Layer {
            builder: Some(tar::Builder::new(Vec::new())),
        }
    }

    fn entry(mut self, kind: tar::EntryType, name: &str, target: &str, data: &[u8]) -> Layer {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(data.len() as u64);
        h.set_path(name).unwrap();
        if !target.is_empty() {
            h.set_link_name(target).unwrap();
        }
        h.set_cksum();
        self.builder.as_mut().unwrap().append(&h, data).unwrap();
        self
    }

    fn dir(self, name: &str) -> Layer {
        self.entry(tar::EntryType::Directory, name, "", b"")
    }

    fn file(self, name: &str, data: &[u8]) -> Layer {
        self.entry(tar::EntryType::Regular, name, "", data)
    }

    fn symlink(self, name: &str, target: &str) -> Layer {
        self.entry(tar::EntryType::Symlink, name, target, b"")
    }

    fn fifo(self, name: &str) -> Layer {
        self.entry(tar::EntryType::Fifo, name, "", b"")
    }

    /// Unpacked into a fresh rootfs.
    fn rootfs(mut self) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let bytes = self.builder.take().unwrap().into_inner().unwrap();
        unpack_layer(&bytes[..], Compression::None, dir.path(), Owners::Unpacker).unwrap();
        dir
    }
}

const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
const GROUP: &[u8] = b"root:x:0:\nstaff:x:50:\n";

/// The user `user` resolves to in `rootfs`, within 10 s (a hung read fails the test).
fn user_of(rootfs: &Path, user: &str) -> Result<Option<ImageUser>, String> {
    let config = ImageConfig {
        user: Some(user.to_string()),
        ..ImageConfig::default()
    };
    let rootfs = rootfs.to_path_buf();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(config.user(&rootfs));
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("looking up the image's user must not block")
}

#[test]
fn a_regular_passwd_and_group_resolve_the_user() {
    let image = Layer::new()
        .dir("etc")
        .file("etc/passwd", PASSWD)
        .file("etc/group", GROUP)
        .rootfs();
    let app = user_of(image.path(), "app:staff").unwrap().unwrap();
    assert_eq!(
        (app.uid, app.gid, app.name.as_str(), app.home.as_str()),
        (1000, 50, "app", "/home/app")
    );
    assert_eq!(user_of(image.path(), "root").unwrap(), None);
}

#[test]
fn links_in_the_image_are_followed_inside_the_image() {
    // Absolute and relative links to the image's own files are fine: they lead where they
    // would inside the sandbox.
    let image = Layer::new()
        .dir("etc")
        .dir("usr")
        .dir("usr/lib")
        .file("usr/lib/passwd", PASSWD)
        .file("usr/lib/group", GROUP)
        .symlink("etc/passwd", "/usr/lib/passwd")
        .symlink("etc/group", "../../../../usr/lib/group")
        .rootfs();
    let app = user_of(image.path(), "app:staff").unwrap().unwrap();
    assert_eq!(
        (app.uid, app.gid, app.home.as_str()),
        (1000, 50, "/home/app")
    );
}

#[test]
fn a_passwd_linked_to_a_host_file_does_not_give_the_hosts_users() {
    let host = tempfile::tempdir().unwrap();
    let shadow = host.path().join("shadow-like");
    std::fs::write(
        &shadow,
        "hostonlyuser:x:4242:4242::/home/hostonly:/bin/sh\n",
    )
    .unwrap();
    let group = host.path().join("group-like");
    std::fs::write(&group, "hostonlygroup:x:4343:\n").unwrap();
    for (passwd_link, group_link) in [
        (shadow.display().to_string(), group.display().to_string()),
        (
            format!("../../../../../../..{}", shadow.display()),
            format!("../../../../../../..{}", group.display()),
        ),
    ] {
        let image = Layer::new()
            .dir("etc")
            .symlink("etc/passwd", &passwd_link)
            .symlink("etc/group", &group_link)
            .rootfs();
        let err = user_of(image.path(), "hostonlyuser").unwrap_err();
        assert!(err.contains("not in its /etc/passwd"), "{err}");
        // A numeric user gets no name or home from the host's file.
        let numeric = user_of(image.path(), "4242").unwrap().unwrap();
        assert_eq!(
            (numeric.name.as_str(), numeric.home.as_str()),
            ("4242", "/")
        );
        let err = user_of(image.path(), "4242:hostonlygroup").unwrap_err();
        assert!(err.contains("not in its /etc/group"), "{err}");
    }
}

#[test]
fn a_passwd_linked_to_dev_zero_or_a_host_fifo_neither_blocks_nor_grows() {
    let host = tempfile::tempdir().unwrap();
    let fifo = host.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    for target in [
        "/dev/zero",
        "/dev/urandom",
        fifo.to_str().unwrap(),
        "/proc/self/environ",
    ] {
        let image = Layer::new()
            .dir("etc")
            .symlink("etc/passwd", target)
            .rootfs();
        let err = user_of(image.path(), "app").unwrap_err();
        assert!(err.contains("not in its /etc/passwd"), "{target}: {err}");
        let numeric = user_of(image.path(), "1000").unwrap().unwrap();
        assert_eq!(numeric.name, "1000", "{target}");
    }
}

#[test]
fn a_passwd_that_is_a_fifo_is_refused_without_blocking() {
    let image = Layer::new()
        .dir("etc")
        .fifo("etc/passwd")
        .fifo("etc/group")
        .rootfs();
    let err = user_of(image.path(), "app").unwrap_err();
    assert!(
        err.contains("`app`") && err.contains("/etc/passwd") && err.contains("FIFO"),
        "{err}"
    );
    // A numeric user does without the table.
    let numeric = user_of(image.path(), "1000").unwrap().unwrap();
    assert_eq!((numeric.uid, numeric.name.as_str()), (1000, "1000"));
    let err = user_of(image.path(), "1000:staff").unwrap_err();
    assert!(err.contains("/etc/group") && err.contains("FIFO"), "{err}");
}

#[test]
fn a_passwd_that_is_a_directory_or_too_large_is_refused() {
    let image = Layer::new().dir("etc").dir("etc/passwd").rootfs();
    let err = user_of(image.path(), "app").unwrap_err();
    assert!(err.contains("/etc/passwd is a directory"), "{err}");

    let mut huge = PASSWD.to_vec();
    huge.resize(2 << 20, b'#');
    let image = Layer::new().dir("etc").file("etc/passwd", &huge).rootfs();
    let err = user_of(image.path(), "app").unwrap_err();
    assert!(
        err.contains("/etc/passwd is larger than 1048576 bytes"),
        "{err}"
    );
    // Just under the cap is read.
    let mut large = PASSWD.to_vec();
    large.resize((1 << 20) - 1, b'\n');
    let image = Layer::new().dir("etc").file("etc/passwd", &large).rootfs();
    assert_eq!(user_of(image.path(), "app").unwrap().unwrap().uid, 1000);
}

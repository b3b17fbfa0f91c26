//! Files through the sandbox ([`upstream_sandbox::Files`]): in and out with their metadata,
//! streamed in flat memory, and never anywhere but the sandbox's own files.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use upstream_sandbox::Files;
use upstream_sandbox::files::{At, Create, Kind};

use crate::harness::{Bench, check, peak_rss};

fn root(path: &str) -> At {
    At::Root(path.to_string())
}

fn read_all(files: &dyn Files, at: &At) -> std::io::Result<Vec<u8>> {
    let (mut reader, _) = files.open(at, 0, None)?;
    let mut data = Vec::new();
    reader.read_to_end(&mut data)?;
    Ok(data)
}

fn write_all(files: &dyn Files, at: &At, data: &[u8], how: Create) -> std::io::Result<()> {
    let mut writer = files.create(at, 0o644, how, (0, 0))?;
    writer.write_all(data)?;
    writer.flush()?;
    writer.finish(None, None).map(drop)
}

pub fn small_files_move_in_and_out_with_their_metadata(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    let files = sandbox.files().unwrap();
    let mtime = 1_500_000_000_123_456_789;
    files
        .make_dir(&root("/tmp/x/y"), 0o750, true, (0, 0))
        .unwrap();
    let mut writer = files
        .create(&root("/tmp/x/y/a.txt"), 0o600, Create::Atomic, (0, 0))
        .unwrap();
    writer.write_all(b"hello, sandbox\n").unwrap();
    let made = writer.finish(Some(0o640), Some(mtime)).unwrap();
    assert_eq!(
        (made.kind, made.mode, made.size, made.mtime_ns),
        (Kind::File, 0o640, 15, mtime)
    );
    let meta = files.stat(&root("/tmp/x/y/a.txt"), None).unwrap().unwrap();
    assert_eq!((meta.mode, meta.size, meta.mtime_ns), (0o640, 15, mtime));
    assert_eq!(
        read_all(&*files, &root("/tmp/x/y/a.txt")).unwrap(),
        b"hello, sandbox\n"
    );
    let (mut tail, _) = files.open(&root("/tmp/x/y/a.txt"), 7, None).unwrap();
    let mut rest = String::new();
    tail.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "sandbox\n");

    files
        .symlink(&root("/tmp/x/y/link"), "a.txt", mtime, (0, 0))
        .unwrap();
    assert_eq!(
        files.read_link(&root("/tmp/x/y/link"), None).unwrap(),
        "a.txt"
    );
    let names: Vec<(String, Kind)> = files
        .list(&root("/tmp/x/y"), None)
        .unwrap()
        .into_iter()
        .map(|(name, meta)| (name, meta.kind))
        .collect();
    assert_eq!(
        names,
        vec![("a.txt".into(), Kind::File), ("link".into(), Kind::Symlink)]
    );
    assert_eq!(
        files.stat(&root("/tmp/x/y"), None).unwrap().unwrap().mode,
        0o750
    );

    // The sandbox sees what was made, as it was made.
    assert_eq!(
        check(
            sandbox.as_mut(),
            "cd /tmp/x/y && cat link && stat -c '%a %s %Y' a.txt && readlink link"
        ),
        "hello, sandbox\n640 15 1500000000\na.txt\n"
    );
    // And the host reads what the sandbox wrote, beneath a directory too.
    check(sandbox.as_mut(), "printf made-inside > /tmp/x/inside");
    let beneath = At::Beneath {
        dir: "/tmp/x".into(),
        path: "inside".into(),
    };
    assert_eq!(read_all(&*files, &beneath).unwrap(), b"made-inside");

    files
        .set_meta(
            &root("/tmp/x/y/a.txt"),
            Some(0o604),
            Some(42_000_000_000),
            (0, 0),
        )
        .unwrap();
    assert_eq!(
        check(sandbox.as_mut(), "stat -c '%a %Y' /tmp/x/y/a.txt"),
        "604 42\n"
    );
    // Replaced whole.
    write_all(&*files, &root("/tmp/x/y/a.txt"), b"new", Create::Atomic).unwrap();
    assert_eq!(check(sandbox.as_mut(), "cat /tmp/x/y/a.txt"), "new");

    assert!(
        files.remove(&root("/tmp/x/y"), false, (0, 0)).is_err(),
        "not empty"
    );
    files.remove(&root("/tmp/x/y/link"), false, (0, 0)).unwrap();
    assert_eq!(files.stat(&root("/tmp/x/y/link"), None).unwrap(), None);
    files.remove(&root("/tmp/x"), true, (0, 0)).unwrap();
    assert_eq!(files.stat(&root("/tmp/x"), None).unwrap(), None);
    check(sandbox.as_mut(), "test ! -e /tmp/x");

    // Made as, and given to, a user of the sandbox where it has one.
    if sandbox.info().ids > 1000 {
        files
            .make_dir(&root("/tmp/home"), 0o755, true, (0, 0))
            .unwrap();
        files.give(&root("/tmp/home"), (1000, 1000)).unwrap();
        let mut writer = files
            .create(&root("/tmp/home/mine"), 0o600, Create::Atomic, (1000, 1000))
            .unwrap();
        writer.write_all(b"mine").unwrap();
        writer.finish(None, None).unwrap();
        assert_eq!(
            check(sandbox.as_mut(), "stat -c %u:%g /tmp/home /tmp/home/mine"),
            "1000:1000\n1000:1000\n"
        );
        // A user's permissions hold: a file of root's it may not read stays unread.
        check(
            sandbox.as_mut(),
            "echo root-only > /tmp/secret; chmod 600 /tmp/secret",
        );
        assert!(
            files
                .open(&root("/tmp/secret"), 0, Some((1000, 1000)))
                .is_err()
        );
        assert!(files.open(&root("/tmp/secret"), 0, Some((0, 0))).is_ok());
    }
}

/// Resets this process's peak RSS, so that [`peak_rss`] measures from here.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

pub fn a_gibibyte_streams_in_and_out_in_flat_memory(bench: &Bench) {
    const CHUNK: usize = 256 << 10;
    const CHUNKS: u64 = 4096;
    let mut sandbox = bench.default_sandbox();
    let files = sandbox.files().unwrap();
    reset_peak_rss();
    // One block of noise, each copy stamped with its number: order and every chunk count.
    let mut block = vec![0u8; CHUNK];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in block.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let at = root("/tmp/big");
    let mut sent = blake3::Hasher::new();
    let mut writer = files.create(&at, 0o644, Create::Atomic, (0, 0)).unwrap();
    for i in 0..CHUNKS {
        block[..8].copy_from_slice(&i.to_le_bytes());
        sent.update(&block);
        writer.write_all(&block).unwrap();
    }
    writer.flush().unwrap();
    let made = writer.finish(None, None).unwrap();
    assert_eq!(made.size, 1 << 30);
    assert_eq!(
        check(
            sandbox.as_mut(),
            "stat -c %s /tmp/big; tail -c 262144 /tmp/big | head -c 8 | od -An -tu8 | tr -d ' '"
        ),
        "1073741824\n4095\n"
    );
    let (mut reader, meta) = files.open(&at, 0, None).unwrap();
    assert_eq!(meta.size, 1 << 30);
    let mut received = blake3::Hasher::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        received.update(&buf[..n]);
        total += n as u64;
    }
    assert_eq!(total, 1 << 30);
    assert_eq!(
        received.finalize(),
        sent.finalize(),
        "the bytes changed on the way"
    );
    let peak = peak_rss();
    assert!(peak < 192 << 20, "peak RSS {} MiB moving 1 GiB", peak >> 20);
}

/// A file outside every sandbox, on the host, with content no sandbox has.
fn plant_host_file(bench: &Bench) -> (String, String) {
    let path = bench.host_path("host-secret");
    let secret = format!("host secret {}", std::process::id());
    std::fs::write(&path, &secret).unwrap();
    (path.display().to_string(), secret)
}

pub fn links_and_dot_dot_never_lead_out_of_the_sandbox(bench: &Bench) {
    let (host, secret) = plant_host_file(bench);
    let host_dir = bench.dir.path().display().to_string();
    let mut sandbox = bench.default_sandbox();
    let files = sandbox.files().unwrap();
    // Inside, at the host file's path, a decoy: a link that resolves in the sandbox finds it.
    let up = "../".repeat(20);
    check(
        sandbox.as_mut(),
        &format!(
            "mkdir -p {host_dir} /tmp/links && echo decoy > {host} && echo legit > /tmp/legit \
             && cd /tmp/links && ln -s {host} abs && ln -s {up}{rel} rel && ln -s ../legit legit \
             && ln -s /proc/1/root{host} magic && ln -s / top && ln -s {host_dir} dir",
            rel = host.trim_start_matches('/'),
        ),
    );
    let attempts = [
        root("/tmp/links/abs"),
        root("/tmp/links/rel"),
        root("/tmp/links/magic"),
        root(&format!("/tmp/links/top{host}")),
        root("/tmp/links/dir/host-secret"),
        root(&format!("/{up}{}", host.trim_start_matches('/'))),
        At::Beneath {
            dir: "/tmp/links".into(),
            path: "abs".into(),
        },
        At::Beneath {
            dir: "/tmp/links".into(),
            path: format!("{up}{}", host.trim_start_matches('/')),
        },
        At::Beneath {
            dir: "/tmp/links".into(),
            path: "dir/host-secret".into(),
        },
    ];
    let read = |at: &At| {
        read_all(&*files, at)
            .ok()
            .map(|d| String::from_utf8_lossy(&d).into_owned())
    };
    // The positive controls: links are followed, inside the sandbox.
    assert_eq!(read(&root("/tmp/links/legit")).as_deref(), Some("legit\n"));
    for i in [0, 1, 3, 4, 5] {
        assert_eq!(
            read(&attempts[i]).as_deref(),
            Some("decoy\n"),
            "{:?}",
            attempts[i]
        );
    }
    assert_eq!(
        read(&attempts[2]),
        None,
        "a link through /proc was followed"
    );
    // Beneath a directory, no link is followed at all, nor `..` taken.
    for at in &attempts[6..] {
        assert_eq!(read(at), None, "{at:?} followed a link or `..` beneath");
    }
    // Without the decoy, nothing finds the host's file.
    check(sandbox.as_mut(), &format!("rm {host}"));
    for at in &attempts {
        let got = read(at);
        assert!(
            got.as_deref() != Some(secret.as_str()),
            "{at:?} read the host's file"
        );
        assert!(
            files
                .stat(at, None)
                .unwrap_or(None)
                .is_none_or(|m| m.kind != Kind::File || m.size != secret.len() as u64),
            "{at:?} found the host's file"
        );
    }
    // Writes through links land inside, never on the host.
    for how in [Create::Atomic, Create::AtomicReplacing, Create::InPlace] {
        let _ = write_all(&*files, &root("/tmp/links/abs"), b"written", how);
        let _ = write_all(&*files, &root("/tmp/links/dir/new-file"), b"written", how);
    }
    let _ = files.make_dir(&root("/tmp/links/dir/new-dir"), 0o755, true, (0, 0));
    let _ = files.symlink(&root("/tmp/links/dir/new-link"), "/", 0, (0, 0));
    let _ = files.set_meta(&root("/tmp/links/abs"), Some(0o777), Some(0), (0, 0));
    let _ = files.remove(&root("/tmp/links/dir/host-secret"), false, (0, 0));
    assert_eq!(std::fs::read_to_string(&host).unwrap(), secret);
    let mode = std::fs::metadata(&host).unwrap().permissions();
    assert_ne!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o777
    );
    for name in ["new-file", "new-dir", "new-link"] {
        assert!(
            std::fs::symlink_metadata(bench.host_path(name)).is_err(),
            "{name} was made on the host"
        );
    }
    // The positive control: what went through the directory link is in the sandbox.
    check(
        sandbox.as_mut(),
        &format!("test -f {host_dir}/new-file && test -d {host_dir}/new-dir"),
    );
}

/// Opens `at` on another thread: a FIFO or device must be refused, never waited on.
fn open_within(files: &Arc<dyn Files>, at: At) -> Option<std::io::Result<Vec<u8>>> {
    let files = files.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read_all(&*files, &at));
    });
    rx.recv_timeout(Duration::from_secs(20)).ok()
}

pub fn the_kernels_files_and_the_hosts_bound_directories_are_refused(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    let files = sandbox.files().unwrap();
    check(
        sandbox.as_mut(),
        "test -f /proc/self/status && test -c /dev/null && mkfifo /tmp/fifo && echo ok > /tmp/ok",
    );
    // The positive control: a file of the sandbox's own is read.
    assert_eq!(
        open_within(&files, root("/tmp/ok")).unwrap().unwrap(),
        b"ok\n"
    );
    for path in [
        "/proc/self/status",
        "/proc/sys/kernel/hostname",
        "/dev/null",
        "/tmp/fifo",
    ] {
        match open_within(&files, root(path)) {
            None => panic!("{path}: the read waited"),
            Some(Ok(data)) => panic!("{path} was read: {:?}", String::from_utf8_lossy(&data)),
            Some(Err(_)) => {}
        }
    }
    // A write to procfs from the host would act on the host (procfs checks the writer).
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for how in [Create::InPlace, Create::AtomicReplacing] {
        assert!(
            write_all(&*files, &root("/proc/sys/kernel/hostname"), b"taken\n", how).is_err(),
            "{how:?}"
        );
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        hostname
    );
    // The host's directories bound into the sandbox (`image: host`) are not its to change.
    let probe = format!("/etc/upstream-conformance-{}", std::process::id());
    if bench.case.binds_host {
        assert!(write_all(&*files, &root(&probe), b"x", Create::Atomic).is_err());
        assert!(
            files
                .make_dir(&root(&format!("{probe}.d")), 0o755, false, (0, 0))
                .is_err()
        );
    } else {
        // An image's /etc is the sandbox's own: written there, and only there.
        write_all(&*files, &root(&probe), b"x", Create::Atomic).unwrap();
        assert_eq!(check(sandbox.as_mut(), &format!("cat {probe}")), "x");
    }
    assert!(
        std::fs::symlink_metadata(&probe).is_err(),
        "{probe} was made on the host"
    );
    assert!(std::fs::symlink_metadata(format!("{probe}.d")).is_err());
    // The positive control: the same write beside the sandbox's own files works.
    write_all(&*files, &root("/tmp/probe"), b"x", Create::Atomic).unwrap();
}

/// What [`Files::stat`] and [`Files::list`] tell of an owner is an id of the sandbox, as
/// [`upstream_sandbox::files::Owner`]s are, whoever does the work.
pub fn owners_are_told_as_ids_of_the_sandbox(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    let user = if sandbox.info().ids > 1000 { 1000 } else { 0 };
    check(
        sandbox.as_mut(),
        &format!(
            "mkdir /tmp/o && touch /tmp/o/root && touch /tmp/o/user && chown {user}:{user} /tmp/o/user"
        ),
    );
    let files = sandbox.files().unwrap();
    let meta = files.stat(&root("/tmp/o/root"), None).unwrap().unwrap();
    assert_eq!((meta.uid, meta.gid), (0, 0), "sandbox root's file");
    let listed: Vec<(String, u32, u32)> = files
        .list(&root("/tmp/o"), None)
        .unwrap()
        .into_iter()
        .map(|(name, m)| (name, m.uid, m.gid))
        .collect();
    assert_eq!(
        listed,
        vec![("root".into(), 0, 0), ("user".into(), user, user)]
    );
}

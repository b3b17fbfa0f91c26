//! Pulling from a real registry: Debian's docker-registry, started by the test on a free
//! port of 127.0.0.1 (scripts/test installs it; without it these tests say SKIPPED).

#![allow(clippy::print_stderr)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use upstream_image::testing::Registry;
use upstream_image::{Cache, Owners, PullOptions, PullProgress, Reference, RegistryPolicy, pull};

fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

#[derive(Default)]
struct Seen {
    layers: Vec<(String, bool)>,
    sizes: std::collections::HashMap<String, u64>,
    /// The last byte count told of each layer.
    arrived: std::collections::HashMap<String, u64>,
    unpacking: bool,
}

impl PullProgress for Seen {
    fn layer(&mut self, digest: &str, size: u64, cached: bool) {
        self.layers.push((digest.to_string(), cached));
        self.sizes.insert(digest.to_string(), size);
    }

    fn downloaded(&mut self, digest: &str, bytes: u64) {
        let last = self.arrived.insert(digest.to_string(), bytes).unwrap_or(0);
        assert!(bytes >= last, "a layer's count never goes back");
        assert!(!self.unpacking, "downloads are told before the unpack");
    }

    fn unpacking(&mut self) {
        self.unpacking = true;
    }
}

fn options(registry: &Registry) -> PullOptions {
    PullOptions {
        insecure: vec![registry.host()],
        credentials: Default::default(),
        refresh: false,
        owners: Owners::Unpacker,
        registries: RegistryPolicy::Any,
    }
}

fn blob_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.file_name().is_some_and(|n| n == "data") {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn a_two_layer_image_with_whiteouts_is_pulled_then_used_from_the_cache() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let lower = gzip(&tar_of(&[("etc/old", b"old"), ("etc/keep", b"keep")]));
    let upper = zstd::encode_all(
        &tar_of(&[("etc/.wh.old", b""), ("app/run.sh", b"echo hi")])[..],
        3,
    )
    .unwrap();
    registry.push(
        "test/two:1",
        vec![
            (lower, "application/vnd.oci.image.layer.v1.tar+gzip"),
            (upper, "application/vnd.oci.image.layer.v1.tar+zstd"),
        ],
        &["PATH=/usr/bin", "GREETING=hello"],
    );
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let reference = Reference::parse(&format!("{}/test/two:1", registry.host())).unwrap();
    let mut seen = Seen::default();
    let pulled = pull(&reference, &cache, &options(&registry), &mut seen).unwrap();
    assert_eq!(pulled.layers, 2);
    assert!(pulled.downloaded > 0);
    assert_eq!(seen.layers.len(), 2);
    assert!(seen.layers.iter().all(|(_, cached)| !cached));
    // Each layer's progress ended at its whole size, and the sizes add up to the download.
    assert_eq!(seen.arrived, seen.sizes);
    assert_eq!(seen.arrived.values().sum::<u64>(), pulled.downloaded);
    assert!(seen.unpacking);
    let rootfs = &pulled.rootfs;
    assert_eq!(fs::read(rootfs.join("etc/keep")).unwrap(), b"keep");
    assert!(!rootfs.join("etc/old").exists(), "the whiteout removed it");
    assert_eq!(fs::read(rootfs.join("app/run.sh")).unwrap(), b"echo hi");
    assert_eq!(pulled.config.working_dir.as_deref(), Some("/app"));
    assert!(
        pulled
            .config
            .env
            .contains(&("GREETING".into(), "hello".into()))
    );

    // Offline: the registry is gone, the cached tag still works.
    drop(registry);
    let mut seen = Seen::default();
    let offline = pull(
        &reference,
        &cache,
        &PullOptions {
            insecure: Vec::new(),
            credentials: Default::default(),
            refresh: false,
            owners: Owners::Unpacker,
            registries: RegistryPolicy::Any,
        },
        &mut seen,
    )
    .unwrap();
    assert_eq!(offline.digest, pulled.digest);
    assert_eq!(offline.downloaded, 0);
    assert!(seen.layers.is_empty(), "nothing was asked of the network");
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused_and_the_cache_untouched() {
    let Some(registry) = Registry::start() else {
        return;
    };
    registry.push(
        "test/bad:1",
        vec![(
            gzip(&tar_of(&[("file", b"good content")])),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )],
        &[],
    );
    // Damage the layer in the registry's storage: the registry now serves other bytes
    // under the same digest.
    for blob in blob_files(&registry.data) {
        let bytes = fs::read(&blob).unwrap();
        if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut damaged = gzip(&tar_of(&[("file", b"evil content")]));
            damaged.truncate(bytes.len().min(damaged.len()));
            fs::write(&blob, damaged).unwrap();
        }
    }
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let reference = Reference::parse(&format!("{}/test/bad:1", registry.host())).unwrap();
    let err = pull(
        &reference,
        &cache,
        &options(&registry),
        &mut Seen::default(),
    )
    .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("digest"), "{err}");
    let blobs = cache_dir.path().join("blobs/sha256");
    assert_eq!(
        fs::read_dir(&blobs).map_or(0, |d| d.count()),
        0,
        "no blob kept"
    );
    assert!(
        fs::read_dir(cache_dir.path().join("images")).map_or(0, |d| d.count()) == 0,
        "no image made"
    );
}

#[test]
fn concurrent_pulls_of_one_image_wait_for_each_other() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let files: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| (format!("data/{i}"), vec![i as u8; 64 << 10]))
        .collect();
    let entries: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    registry.push(
        "test/shared:1",
        vec![(
            gzip(&tar_of(&entries)),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )],
        &[],
    );
    let cache_dir = tempfile::tempdir().unwrap();
    let reference = Reference::parse(&format!("{}/test/shared:1", registry.host())).unwrap();
    let pulls: Vec<_> = (0..4)
        .map(|_| {
            let cache = Cache::new(cache_dir.path());
            let reference = reference.clone();
            let options = options(&registry);
            std::thread::spawn(move || pull(&reference, &cache, &options, &mut Seen::default()))
        })
        .collect();
    let digests: Vec<String> = pulls
        .into_iter()
        .map(|p| p.join().unwrap().unwrap().digest)
        .collect();
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
    let images: Vec<_> = fs::read_dir(cache_dir.path().join("images"))
        .unwrap()
        .collect();
    assert_eq!(images.len(), 1, "one image, made once");
    let cache = Cache::new(cache_dir.path());
    let pulled = cache.lookup(&reference).unwrap();
    assert_eq!(
        fs::read_dir(pulled.rootfs.join("data")).unwrap().count(),
        50
    );
    let leftovers = fs::read_dir(cache_dir.path().join("tmp")).unwrap().count();
    assert_eq!(leftovers, 0, "no temporary file or rootfs left behind");
}

#[test]
fn a_registry_that_asks_for_a_login_gets_the_credentials_given() {
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let Some(registry) = Registry::start_with_login(Some(("ci", "s3cret", &hash))) else {
        return;
    };
    registry.push(
        "private/app:1",
        vec![(
            gzip(&tar_of(&[("secret.txt", b"behind a login")])),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )],
        &[],
    );
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let reference = Reference::parse(&format!("{}/private/app:1", registry.host())).unwrap();
    let anonymous = pull(
        &reference,
        &cache,
        &options(&registry),
        &mut Seen::default(),
    );
    let err = anonymous.unwrap_err().to_string();
    assert!(err.contains("the registry"), "{err}");
    let mut with_login = options(&registry);
    with_login.credentials =
        upstream_image::Credentials::load(Some(&format!("{}=ci:s3cret", registry.host())), None);
    let pulled = pull(&reference, &cache, &with_login, &mut Seen::default()).unwrap();
    assert_eq!(
        fs::read(pulled.rootfs.join("secret.txt")).unwrap(),
        b"behind a login"
    );
}

#[test]
fn a_registry_gone_mid_pull_gives_a_clear_error_and_a_retry_keeps_what_was_fetched() {
    let Some(mut registry) = Registry::start() else {
        return;
    };
    let layers: Vec<(Vec<u8>, &str)> = (0..3)
        .map(|i| {
            let name = format!("layer-{i}");
            (
                gzip(&tar_of(&[(name.as_str(), name.as_bytes())])),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        })
        .collect();
    registry.push("test/flaky:1", layers, &[]);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let reference = Reference::parse(&format!("{}/test/flaky:1", registry.host())).unwrap();
    // A first pull that got two of the three layers before the registry went away: the
    // image and one layer are removed from a complete pull.
    let done = pull(
        &reference,
        &cache,
        &options(&registry),
        &mut Seen::default(),
    )
    .unwrap();
    fs::remove_dir_all(done.rootfs.parent().unwrap()).unwrap();
    fs::remove_dir_all(cache_dir.path().join("refs")).unwrap();
    let blobs = cache_dir.path().join("blobs/sha256");
    let first = fs::read_dir(&blobs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    fs::remove_file(&first).unwrap();

    registry.stop();
    let err = pull(
        &reference,
        &cache,
        &options(&registry),
        &mut Seen::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&registry.host()),
        "the error names the registry: {text}"
    );
    assert_eq!(
        fs::read_dir(&blobs).unwrap().count(),
        2,
        "what was fetched is kept"
    );

    registry.restart();
    let mut seen = Seen::default();
    let again = pull(&reference, &cache, &options(&registry), &mut seen).unwrap();
    assert_eq!(again.digest, done.digest);
    let fetched: Vec<bool> = seen.layers.iter().map(|(_, cached)| *cached).collect();
    assert_eq!(
        fetched.iter().filter(|c| !**c).count(),
        1,
        "only the missing layer: {fetched:?}"
    );
    assert!(again.rootfs.join("layer-2").exists());
}

#[test]
fn a_multi_platform_index_resolves_to_this_host() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let host_arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let other_arch = if host_arch == "amd64" {
        "arm64"
    } else {
        "amd64"
    };
    for arch in [host_arch, other_arch] {
        registry.push(
            &format!("test/multi:{arch}"),
            vec![(
                gzip(&tar_of(&[("arch", arch.as_bytes())])),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )],
            &[],
        );
    }
    registry.push_index(
        "test/multi:1",
        &[(other_arch, other_arch), (host_arch, host_arch)],
    );
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let reference = Reference::parse(&format!("{}/test/multi:1", registry.host())).unwrap();
    let pulled = pull(
        &reference,
        &cache,
        &options(&registry),
        &mut Seen::default(),
    )
    .unwrap();
    assert_eq!(
        fs::read(pulled.rootfs.join("arch")).unwrap(),
        host_arch.as_bytes()
    );
}

#[test]
fn two_images_sharing_a_layer_pull_at_once_in_one_process() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let shared = gzip(&tar_of(&[("shared", &[7u8; 256 << 10][..])]));
    for name in ["a", "b"] {
        registry.push(
            &format!("test/{name}:1"),
            vec![
                (
                    shared.clone(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                ),
                (
                    gzip(&tar_of(&[(name, name.as_bytes())])),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                ),
            ],
            &[],
        );
    }
    let cache_dir = tempfile::tempdir().unwrap();
    let pulls: Vec<_> = ["a", "b", "a", "b"]
        .iter()
        .map(|name| {
            let cache = Cache::new(cache_dir.path());
            let reference =
                Reference::parse(&format!("{}/test/{name}:1", registry.host())).unwrap();
            let options = options(&registry);
            let name = name.to_string();
            std::thread::spawn(move || {
                let pulled = pull(&reference, &cache, &options, &mut Seen::default()).unwrap();
                assert_eq!(
                    fs::read(pulled.rootfs.join(&name)).unwrap(),
                    name.as_bytes()
                );
                assert_eq!(
                    fs::read(pulled.rootfs.join("shared")).unwrap().len(),
                    256 << 10
                );
            })
        })
        .collect();
    for p in pulls {
        p.join().unwrap();
    }
    assert_eq!(
        fs::read_dir(cache_dir.path().join("images"))
            .unwrap()
            .count(),
        2
    );
    assert_eq!(
        fs::read_dir(cache_dir.path().join("tmp")).unwrap().count(),
        0
    );
}

/// Whether a request head carries an `Authorization` header.
fn authorized(head: &str) -> bool {
    head.lines()
        .any(|l| l.to_ascii_lowercase().starts_with("authorization:"))
}

#[test]
fn credentials_scoped_to_one_registry_never_reach_another() {
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let Some(a) = Registry::start_with_login(Some(("ci", "s3cret", &hash))) else {
        return;
    };
    a.push(
        "private/app:1",
        vec![(
            gzip(&tar_of(&[("secret.txt", b"behind a login")])),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )],
        &[],
    );
    // Registry B asks every client for a login and records what it is sent.
    let b = upstream_image::testing::Recorder::start(upstream_image::testing::basic_challenge);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let from_b = Reference::parse(&format!("{}/tenant/collect:1", b.host())).unwrap();
    let mut scoped_to_a = plain(&[a.host(), b.host()]);
    scoped_to_a.credentials =
        upstream_image::Credentials::load(Some(&format!("{}=ci:s3cret", a.host())), None);

    let err = pull(&from_b, &cache, &scoped_to_a, &mut Seen::default()).unwrap_err();
    assert!(err.to_string().contains(&b.host()), "{err}");
    let requests = b.requests();
    assert!(!requests.is_empty(), "the pull reached registry B");
    assert!(
        !requests.iter().any(|r| authorized(r)),
        "credentials for A were sent to B: {requests:?}"
    );

    // Positive control: the same credentials pull from A.
    let from_a = Reference::parse(&format!("{}/private/app:1", a.host())).unwrap();
    let pulled = pull(&from_a, &cache, &scoped_to_a, &mut Seen::default()).unwrap();
    assert_eq!(
        fs::read(pulled.rootfs.join("secret.txt")).unwrap(),
        b"behind a login"
    );

    // The recorder does see credentials that are scoped to it.
    let mut scoped_to_b = plain(&[a.host(), b.host()]);
    scoped_to_b.credentials =
        upstream_image::Credentials::load(Some(&format!("{}=ci:s3cret", b.host())), None);
    let _ = pull(&from_b, &cache, &scoped_to_b, &mut Seen::default());
    // base64("ci:s3cret")
    assert!(
        b.requests()
            .iter()
            .any(|r| r.contains("Basic Y2k6czNjcmV0") || r.contains("basic Y2k6czNjcmV0")),
        "{:?}",
        b.requests()
    );

    // The old unscoped form is refused before any registry is asked.
    let before = b.connections();
    let mut unscoped = plain(&[a.host(), b.host()]);
    unscoped.credentials = upstream_image::Credentials::load(Some("ci:s3cret"), None);
    let err = pull(&from_b, &cache, &unscoped, &mut Seen::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("registry.example.com=user:password"),
        "{err}"
    );
    assert_eq!(b.connections(), before, "nothing was sent anywhere");
}

/// Pull options for registries reached over plain HTTP.
fn plain(hosts: &[String]) -> PullOptions {
    PullOptions {
        insecure: hosts.to_vec(),
        credentials: Default::default(),
        refresh: false,
        owners: Owners::Unpacker,
        registries: RegistryPolicy::Any,
    }
}

/// Pull options of a daemon: public registries, and those in `allowed`.
fn public(allowed: &[String]) -> PullOptions {
    PullOptions {
        registries: RegistryPolicy::Public {
            allowed: allowed.to_vec(),
        },
        ..plain(allowed)
    }
}

#[test]
fn under_the_public_policy_loopback_and_private_registries_are_refused_unasked() {
    use upstream_image::testing::{Recorder, basic_challenge};
    let recorder = Recorder::start(basic_challenge);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let port = recorder.port;
    for image in [
        format!("127.0.0.1:{port}/x:1"),
        format!("localhost:{port}/x:1"),
        format!("127.1.2.3:{port}/x:1"),
        "10.0.0.1:5000/x:1".to_string(),
        "192.168.1.1/x:1".to_string(),
        "169.254.169.254/latest:1".to_string(),
        "192.0.2.1:5000/x:1".to_string(),
        "100.64.0.1:5000/x:1".to_string(),
    ] {
        let reference = Reference::parse(&image).unwrap();
        let started = std::time::Instant::now();
        let err = pull(&reference, &cache, &public(&[]), &mut Seen::default()).unwrap_err();
        assert!(
            matches!(err, upstream_image::PullError::Refused { .. }),
            "{image}: {err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("not public") && text.contains("--registry"),
            "{image}: {text}"
        );
        assert!(!text.contains("401"), "no answer is passed on: {text}");
        // Refused before any connection, not after one timed out.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{image}"
        );
    }
    assert_eq!(
        recorder.connections(),
        0,
        "nothing connected to the recorder"
    );

    // Positive control: the same registry, allowed by the operator, is asked.
    let allowed = public(&[recorder.host()]);
    let reference = Reference::parse(&format!("{}/x:1", recorder.host())).unwrap();
    let err = pull(&reference, &cache, &allowed, &mut Seen::default()).unwrap_err();
    assert!(
        matches!(err, upstream_image::PullError::Registry { .. }),
        "{err}"
    );
    let before = recorder.connections();
    assert!(before > 0, "the allowed registry was asked");
    // Over HTTPS too (the proxy tunnels it; the recorder speaks no TLS, so the pull fails
    // after the connection is made).
    let mut https = allowed.clone();
    https.insecure.clear();
    let err = pull(&reference, &cache, &https, &mut Seen::default()).unwrap_err();
    assert!(
        matches!(err, upstream_image::PullError::Registry { .. }),
        "{err}"
    );
    assert!(
        recorder.connections() > before,
        "the tunnel reached the registry"
    );
}

#[test]
fn an_allowed_registry_pulls_under_the_public_policy() {
    let Some(registry) = Registry::start() else {
        return;
    };
    registry.push(
        "test/allowed:1",
        vec![(
            gzip(&tar_of(&[("through", b"the proxy")])),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )],
        &[],
    );
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let reference = Reference::parse(&format!("{}/test/allowed:1", registry.host())).unwrap();
    let err = pull(&reference, &cache, &public(&[]), &mut Seen::default()).unwrap_err();
    assert!(
        matches!(err, upstream_image::PullError::Refused { .. }),
        "{err}"
    );
    for allowed in [registry.host(), "127.0.0.1".to_string()] {
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(cache_dir.path());
        let mut options = public(&[allowed]);
        options.insecure = vec![registry.host()];
        let pulled = pull(&reference, &cache, &options, &mut Seen::default()).unwrap();
        assert_eq!(
            fs::read(pulled.rootfs.join("through")).unwrap(),
            b"the proxy"
        );
    }
}

#[test]
fn an_allowed_registry_cannot_send_the_pull_on_to_a_refused_address() {
    use upstream_image::testing::Recorder;
    let victim = Recorder::start(|_| {
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_string()
    });
    let victim_host = victim.host();
    // A registry whose login challenge names the victim as its token service...
    let realm = format!("http://{victim_host}/token");
    let challenger = Recorder::start(move |_| {
        format!(
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"x\"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        )
    });
    // ...and one that redirects its manifests there.
    let target = format!("http://{victim_host}/v2/x/manifests/1");
    let redirector = Recorder::start(move |request| {
        if request.starts_with("GET /v2/ ") {
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_string()
        } else {
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
        }
    });
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    for registry in [&challenger, &redirector] {
        let reference = Reference::parse(&format!("{}/x:1", registry.host())).unwrap();
        let err = pull(
            &reference,
            &cache,
            &public(&[registry.host()]),
            &mut Seen::default(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, upstream_image::PullError::Refused { .. })
                && text.contains(&format!("sent the pull on to {victim_host}")),
            "{text}"
        );
        assert!(registry.connections() > 0, "the allowed registry was asked");
    }
    assert_eq!(
        victim.connections(),
        0,
        "nothing reached the refused address"
    );

    // Positive control: with the victim allowed too, the challenge does lead there.
    let reference = Reference::parse(&format!("{}/x:1", challenger.host())).unwrap();
    let _ = pull(
        &reference,
        &cache,
        &public(&[challenger.host(), victim_host.clone()]),
        &mut Seen::default(),
    );
    assert!(victim.connections() > 0, "the recorder sees connections");
}

#[test]
fn the_cache_is_private_to_its_owner_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let Some(registry) = Registry::start() else {
        return;
    };
    registry.push(
        "test/private:1",
        vec![(
            gzip(&tar_of(&[("bin/tool", b"x")])),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )],
        &[],
    );
    let cache_dir = tempfile::tempdir().unwrap();
    // Made readable by all, as a umask of 022 leaves a directory.
    fs::set_permissions(cache_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let cache = Cache::new(cache_dir.path());
    let reference = Reference::parse(&format!("{}/test/private:1", registry.host())).unwrap();
    pull(
        &reference,
        &cache,
        &options(&registry),
        &mut Seen::default(),
    )
    .unwrap();
    for dir in [
        "",
        "images",
        "blobs",
        "blobs/sha256",
        "refs",
        "tmp",
        "locks",
    ] {
        let mode = fs::metadata(cache_dir.path().join(dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{dir}: {mode:o}");
    }
}

/// A registry of one image, served by a recorder: its manifest gives its one layer
/// `declared` bytes, and the registry sends `sent` bytes for it.
fn lying_registry(declared: u64, sent: usize) -> upstream_image::testing::Recorder {
    let sha256 = |data: &[u8]| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        fs::write(&path, data).unwrap();
        let out = std::process::Command::new("sha256sum")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        format!("sha256:{}", text.split_whitespace().next().unwrap())
    };
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": { "type": "layers", "diff_ids": [] }
    })
    .to_string();
    let config_digest = sha256(config.as_bytes());
    let layer_digest = format!("sha256:{}", "a".repeat(64));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest, "size": config.len()
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest, "size": declared
        }]
    })
    .to_string();
    upstream_image::testing::Recorder::start(move |request| {
        let path = request.split(' ').nth(1).unwrap_or("");
        let (kind, body) = if path.contains("/manifests/") {
            (
                "application/vnd.oci.image.manifest.v1+json",
                manifest.clone(),
            )
        } else if path.ends_with(&config_digest) {
            ("application/octet-stream", config.clone())
        } else if path.ends_with(&layer_digest) {
            ("application/octet-stream", "x".repeat(sent))
        } else {
            ("application/json", "{}".to_string())
        };
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    })
}

#[test]
fn a_registry_cannot_send_more_of_a_layer_than_its_manifest_says() {
    let registry = lying_registry(10, 4 << 20);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let reference = Reference::parse(&format!("{}/x:1", registry.host())).unwrap();
    let err = pull(
        &reference,
        &cache,
        &plain(&[registry.host()]),
        &mut Seen::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("more than the 10 bytes"), "{err}");
    assert_eq!(
        fs::read_dir(cache_dir.path().join("tmp")).unwrap().count(),
        0,
        "nothing of it kept"
    );
}

#[test]
fn a_daemons_pull_takes_in_no_more_than_the_manifest_accounts_for() {
    // A manifest of 80 MiB, which the registry client would hold in memory whole.
    let registry = upstream_image::testing::Recorder::start(|request| {
        let body = if request.contains("/manifests/") {
            " ".repeat(80 << 20)
        } else {
            "{}".to_string()
        };
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    });
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let reference = Reference::parse(&format!("{}/x:1", registry.host())).unwrap();
    let err = pull(
        &reference,
        &cache,
        &public(&[registry.host()]),
        &mut Seen::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("more than the image's manifest accounts for"),
        "{err}"
    );
    // Positive control: a small image through the same proxy pulls.
    let small = lying_registry(3, 3);
    let reference = Reference::parse(&format!("{}/x:1", small.host())).unwrap();
    let err = pull(
        &reference,
        &cache,
        &public(&[small.host()]),
        &mut Seen::default(),
    )
    .unwrap_err();
    // Its layer is not what its digest says, which the client finds once it has it all.
    assert!(err.to_string().to_lowercase().contains("digest"), "{err}");
}

//! Pulling from a real registry: Debian's docker-registry, started by the test on a free
//! port of 127.0.0.1 (scripts/test installs it; without it these tests say SKIPPED).

#![allow(clippy::print_stderr)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use upstream_image::{Cache, Owners, PullOptions, PullProgress, Reference, pull};

struct Registry {
    child: Child,
    port: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts a registry, or says why not (SKIPPED).
    fn start() -> Option<Registry> {
        let Ok(binary) = which("docker-registry") else {
            eprintln!("SKIPPED: no docker-registry on this machine (scripts/test installs it)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = dir.path().join("data");
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                data.display()
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let registry = Registry {
            child,
            port,
            data,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if registry.get("/v2/").starts_with("HTTP/1.1 200") {
                return Some(registry);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the registry did not start on port {port}");
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn get(&self, path: &str) -> String {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        let _ = write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        );
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
    }

    /// Pushes an image of `layers` (tar bytes, each with its media type) as `name:tag`.
    fn push(&self, name: &str, layers: Vec<(Vec<u8>, &str)>, env: &[&str]) {
        let client = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            ..Default::default()
        });
        let reference: oci_client::Reference = format!("{}/{name}", self.host()).parse().unwrap();
        let layers: Vec<oci_client::client::ImageLayer> = layers
            .into_iter()
            .map(|(data, media_type)| {
                oci_client::client::ImageLayer::new(data, media_type.to_string(), None)
            })
            .collect();
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": env, "WorkingDir": "/app" },
            "rootfs": { "type": "layers", "diff_ids": [] }
        });
        let config = oci_client::client::Config::new(
            serde_json::to_vec(&config).unwrap(),
            "application/vnd.oci.image.config.v1+json".into(),
            None,
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime
            .block_on(client.push(
                &reference,
                &layers,
                config,
                &oci_client::secrets::RegistryAuth::Anonymous,
                None,
            ))
            .unwrap();
    }
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .ok_or(())
}

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
}

impl PullProgress for Seen {
    fn layer(&mut self, digest: &str, _size: u64, cached: bool) {
        self.layers.push((digest.to_string(), cached));
    }
}

fn options(registry: &Registry) -> PullOptions {
    PullOptions {
        insecure: vec![registry.host()],
        basic_auth: None,
        refresh: false,
        owners: Owners::Unpacker,
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
            basic_auth: None,
            refresh: false,
            owners: Owners::Unpacker,
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

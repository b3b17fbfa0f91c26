//! What tests of upstream need to exercise images: a registry of their own on a free port of
//! 127.0.0.1 (Debian's docker-registry) and a way to push images to it. Not for use outside
//! tests.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A registry started for a test, stopped when dropped.
pub struct Registry {
    child: Child,
    /// Credentials it asks for, if it asks.
    login: Option<(String, String)>,
    pub port: u16,
    /// Where it stores what is pushed.
    pub data: PathBuf,
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
    pub fn start() -> Option<Registry> {
        Registry::start_with_login(None)
    }

    /// Starts a registry that asks for a login: `login` is the user, the password and the
    /// bcrypt hash of the password (the registry's htpasswd file takes only bcrypt).
    pub fn start_with_login(login: Option<(&str, &str, &str)>) -> Option<Registry> {
        let Ok(binary) = which("docker-registry") else {
            // Past the harness's capture, so every run shows it (scripts/test reads it).
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: no docker-registry on this machine (scripts/test installs it)"
            );
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
        let mut text = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            data.display()
        );
        if let Some((user, _, hash)) = login {
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        fs::write(&config, text).unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let registry = Registry {
            child,
            login: login.map(|(u, p, _)| (u.to_string(), p.to_string())),
            port,
            data,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let answer = registry.get("/v2/");
            if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.1 401") {
                return Some(registry);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the registry did not start on port {port}");
    }

    /// Pushes a multi-platform index `name` whose entries are images already pushed under
    /// the given tags of the same repository, each with its architecture.
    pub fn push_index(&self, name: &str, entries: &[(&str, &str)]) {
        let client = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            ..Default::default()
        });
        let auth = oci_client::secrets::RegistryAuth::Anonymous;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let repository = name.split(':').next().unwrap();
        let mut manifests = Vec::new();
        for (tag, arch) in entries {
            let reference: oci_client::Reference = format!("{}/{repository}:{tag}", self.host())
                .parse()
                .unwrap();
            let (raw, digest) = runtime
                .block_on(client.pull_manifest_raw(
                    &reference,
                    &auth,
                    &["application/vnd.oci.image.manifest.v1+json"],
                ))
                .unwrap();
            manifests.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": raw.len(),
                "platform": { "architecture": arch, "os": "linux" }
            }));
        }
        let index: oci_client::manifest::OciImageIndex =
            serde_json::from_value(serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": manifests
            }))
            .unwrap();
        let reference: oci_client::Reference = format!("{}/{name}", self.host()).parse().unwrap();
        runtime
            .block_on(client.push_manifest_list(&reference, &auth, index))
            .unwrap();
    }

    /// Stops the registry (what was pushed stays on disk).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port, with what was pushed.
    pub fn restart(&mut self) {
        self.stop();
        let config = self.data.parent().unwrap().join("config.yml");
        self.child = Command::new(which("docker-registry").unwrap())
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !self.get("/v2/").is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the registry did not come back on port {}", self.port);
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn get(&self, path: &str) -> String {
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
    pub fn push(&self, name: &str, layers: Vec<(Vec<u8>, &str)>, env: &[&str]) {
        self.push_with_config(
            name,
            layers,
            serde_json::json!({ "Env": env, "WorkingDir": "/app" }),
        );
    }

    /// Pushes an image of `layers` whose configuration's `config` object is `config`.
    pub fn push_with_config(
        &self,
        name: &str,
        layers: Vec<(Vec<u8>, &str)>,
        config: serde_json::Value,
    ) {
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
            "config": config,
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
                &match &self.login {
                    Some((u, p)) => oci_client::secrets::RegistryAuth::Basic(u.clone(), p.clone()),
                    None => oci_client::secrets::RegistryAuth::Anonymous,
                },
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

/// A gzipped layer holding `programs` from the host (with the libraries they load, at their
/// real paths, and links from where they are named) in a merged-/usr tree, plus `files`.
pub fn layer_of_host_programs(programs: &[&str], files: &[(&str, &[u8])]) -> Vec<u8> {
    layer_of_host_trees(programs, &[], files)
}

/// [`layer_of_host_programs`], with whole directory trees of the host too (such as a
/// language's standard library), each with the names below it to leave out; the libraries
/// its shared objects load come along.
pub fn layer_of_host_trees(
    programs: &[&str],
    trees: &[(&str, &[&str])],
    files: &[(&str, &[u8])],
) -> Vec<u8> {
    let mut paths = std::collections::BTreeSet::new();
    let with_libraries = |paths: &mut std::collections::BTreeSet<PathBuf>, file: &Path| {
        paths.insert(file.to_path_buf());
        let out = Command::new("ldd").arg(file).output().unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let lib = line.split("=>").last().unwrap_or("").trim();
            let lib = lib.split(' ').next().unwrap_or("");
            if lib.starts_with('/') {
                paths.insert(PathBuf::from(lib));
            }
        }
    };
    for program in programs {
        with_libraries(&mut paths, Path::new(program));
    }
    for (tree, leave_out) in trees {
        let mut todo = vec![PathBuf::from(tree)];
        while let Some(dir) = todo.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name();
                if leave_out.iter().any(|n| name == *n) {
                    continue;
                }
                let kind = entry.file_type().unwrap();
                if kind.is_dir() {
                    todo.push(entry.path());
                } else if kind.is_file() && name.to_string_lossy().ends_with(".so") {
                    with_libraries(&mut paths, &entry.path());
                } else if kind.is_file() || kind.is_symlink() {
                    paths.insert(entry.path());
                }
            }
        }
    }
    let mut builder = tar::Builder::new(Vec::new());
    for d in ["usr/", "usr/bin/", "usr/lib/", "usr/lib64/", "etc/", "tmp/"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_cksum();
        builder.append_data(&mut h, d, &[][..]).unwrap();
    }
    let link = |builder: &mut tar::Builder<Vec<u8>>, name: &str, target: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        builder.append_link(&mut h, name, target).unwrap();
    };
    for (name, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        link(&mut builder, name, target);
    }
    let merged = |p: &str| {
        for (from, to) in [
            ("/lib64/", "/usr/lib64/"),
            ("/lib/", "/usr/lib/"),
            ("/bin/", "/usr/bin/"),
        ] {
            if let Some(rest) = p.strip_prefix(from) {
                return format!("{to}{rest}");
            }
        }
        p.to_string()
    };
    let mut added = std::collections::BTreeSet::new();
    for path in paths {
        let real = fs::canonicalize(&path).unwrap();
        let real_name = merged(real.to_str().unwrap());
        if added.insert(real_name.clone()) {
            builder
                .append_path_with_name(&real, real_name.trim_start_matches('/'))
                .unwrap();
        }
        let named = merged(path.to_str().unwrap());
        if named != real_name && added.insert(named.clone()) {
            link(&mut builder, named.trim_start_matches('/'), &real_name);
        }
    }
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        builder.append_data(&mut h, name, *data).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// An HTTP server on a free port of 127.0.0.1 that records every connection and every
/// request head it gets, and answers each request as `answer` says (a whole response; it
/// is sent, then the connection closed). Stopped when dropped.
pub struct Recorder {
    pub port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Seen {
    connections: usize,
    requests: Vec<String>,
}

/// The answer of a registry that wants a login (HTTP Basic).
pub fn basic_challenge(_request: &str) -> String {
    "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"recorder\"\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_string()
}

impl Recorder {
    pub fn start(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> Recorder {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answer = std::sync::Arc::new(answer);
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut stream) = stream else { continue };
                    seen.lock().unwrap().connections += 1;
                    let (seen, answer) = (seen.clone(), answer.clone());
                    std::thread::spawn(move || {
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
                            match stream.read(&mut byte) {
                                Ok(1) => head.push(byte[0]),
                                _ => break,
                            }
                        }
                        if head.is_empty() {
                            return;
                        }
                        let head = String::from_utf8_lossy(&head).into_owned();
                        seen.lock().unwrap().requests.push(head.clone());
                        let _ = stream.write_all(answer(&head).as_bytes());
                    });
                }
            })
        };
        Recorder {
            port,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.seen.lock().unwrap().connections
    }

    /// Request heads received so far.
    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().requests.clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

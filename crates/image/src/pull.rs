//! Pulling images into the local cache.
//!
//! ```text
//! <cache>/blobs/sha256/<hex>        layers as downloaded, each checked against its digest
//! <cache>/images/<hex>/rootfs/      an image's layers unpacked, in order (<hex>: manifest)
//! <cache>/images/<hex>/config.json  its configuration
//! <cache>/refs/<registry>/<repo>/<tag>   the manifest digest a tag last resolved to
//! <cache>/locks/<hex>               held while an image is being made
//! ```
//!
//! A layer is downloaded to a temporary name and renamed only once the registry client has
//! checked it against its digest, so an interrupted pull keeps the layers it finished and
//! never a partial one. An image's rootfs is made under a temporary name and renamed whole;
//! two pulls of one image wait for each other on its lock. A tag in the cache is used
//! without the network unless asked to re-resolve it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;

use crate::reference::Reference;
use crate::registries::{Guard, RegistryPolicy, Stop};
use crate::rootfs::{ImageFileError, MAX_TABLE_BYTES, read_file};
use crate::unpack::{Compression, Owners, UnpackError, unpack_layer};

/// The parts of an image's configuration a sandbox uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// The user an image's steps run as, when it is not root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUser {
    pub uid: u32,
    pub gid: u32,
    /// The name in the image's /etc/passwd, else the uid.
    pub name: String,
    /// The home directory in the image's /etc/passwd, else `/`.
    pub home: String,
}

impl ImageConfig {
    /// Who the image's `User` names (`1000`, `1000:100`, `app`, `app:staff`), names looked
    /// up in the image's `/etc/passwd` and `/etc/group`; `None` for root.
    ///
    /// Those files are read inside the image's root (see [`crate::rootfs`]). One that is
    /// missing is an empty table; one that cannot be read (not a regular file, larger than
    /// [`MAX_TABLE_BYTES`]) is an error when a name must be looked up in it, and otherwise
    /// only costs a numeric user its name and home (the uid and `/`).
    pub fn user(&self, rootfs: &Path) -> Result<Option<ImageUser>, String> {
        let Some(user) = self.user.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let (name, group) = match user.split_once(':') {
            Some((n, g)) => (n, Some(g)),
            None => (user, None),
        };
        let table = |file: &str| -> Result<String, ImageFileError> {
            let bytes = read_file(rootfs, file, MAX_TABLE_BYTES)?.unwrap_or_default();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        let entries = |table: &str| -> Vec<Vec<String>> {
            table
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split(':').map(str::to_string).collect())
                .collect()
        };
        let passwd = match (table("etc/passwd"), name.parse::<u32>()) {
            (Ok(text), _) => entries(&text),
            // A numeric user needs the table only for its name and home.
            (Err(_), Ok(_)) => Vec::new(),
            (Err(e), Err(_)) => {
                return Err(format!("cannot look up the image's user `{name}`: {e}"));
            }
        };
        let id = |entry: &[String], field: usize| entry.get(field)?.parse::<u32>().ok();
        let (uid, entry) = match name.parse::<u32>() {
            Ok(uid) => (uid, passwd.iter().find(|e| id(e, 2) == Some(uid))),
            Err(_) => {
                let entry = passwd
                    .iter()
                    .find(|e| e.first().map(String::as_str) == Some(name))
                    .ok_or_else(|| {
                        format!("the image's user `{name}` is not in its /etc/passwd")
                    })?;
                let uid = id(entry, 2).ok_or_else(|| {
                    format!("the image's user `{name}` has no uid in its /etc/passwd")
                })?;
                (uid, Some(entry))
            }
        };
        let gid = match group {
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => entries(
                    &table("etc/group")
                        .map_err(|e| format!("cannot look up the image's group `{g}`: {e}"))?,
                )
                .iter()
                .find(|e| e.first().map(String::as_str) == Some(g))
                .and_then(|e| id(e, 2))
                .ok_or_else(|| format!("the image's group `{g}` is not in its /etc/group"))?,
            },
            // The user's own group, else the gid equal to the uid.
            None => entry.and_then(|e| id(e, 3)).unwrap_or(uid),
        };
        if uid > 65_535 || gid > 65_535 {
            return Err(format!(
                "the image's user `{user}` is outside the sandbox's ids (0–65535)"
            ));
        }
        if uid == 0 && gid == 0 {
            return Ok(None);
        }
        let field = |n: usize| entry.and_then(|e| e.get(n)).filter(|v| !v.is_empty());
        Ok(Some(ImageUser {
            uid,
            gid,
            name: field(0).cloned().unwrap_or_else(|| uid.to_string()),
            home: field(5).cloned().unwrap_or_else(|| "/".to_string()),
        }))
    }

    fn parse(json: &str) -> Result<ImageConfig, PullError> {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| PullError::Config(format!("the image's configuration: {e}")))?;
        let config = &value["config"];
        let env = config["Env"]
            .as_array()
            .map(|vars| {
                vars.iter()
                    .filter_map(|v| v.as_str()?.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let text = |key: &str| {
            config[key]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        Ok(ImageConfig {
            env,
            working_dir: text("WorkingDir"),
            user: text("User"),
        })
    }
}

/// An image ready in the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Pulled {
    /// `sha256:<hex>` of its manifest.
    pub digest: String,
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    pub layers: usize,
    /// Bytes downloaded by this pull (0 when the cache had everything).
    pub downloaded: u64,
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("the registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("layer {digest}: {source}")]
    Unpack { digest: String, source: UnpackError },
    #[error("layer {digest} has media type `{media_type}`, which upstream cannot unpack")]
    UnknownLayer { digest: String, media_type: String },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The pull would have connected to an address its policy refuses; nothing was sent
    /// there.
    #[error("{}", refused_message(.registry, .host))]
    Refused { registry: String, host: String },
}

fn refused_message(registry: &str, host: &str) -> String {
    let parts = |text: &str| -> (String, Option<String>) {
        let (name, port) = text
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or((text, None), |(name, port)| (name, Some(port.to_string())));
        (name.trim_matches(['[', ']']).to_ascii_lowercase(), port)
    };
    let ((r_name, r_port), (h_name, h_port)) = (parts(registry), parts(host));
    let same = r_name == h_name && (r_port.is_none() || r_port == h_port);
    let what = if same {
        format!("the registry {registry} is")
    } else {
        format!("the registry {registry} sent the pull on to {host}, which is")
    };
    format!(
        "{what} not public (a loopback, private or other non-public address), so it was not contacted; images come only from public registries and those the operator allows (`upstream serve --registry HOST[:PORT]`)"
    )
}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries reached over plain HTTP, with or without their port (`localhost`,
    /// `build:5000`); any other uses HTTPS.
    pub insecure: Vec<String>,
    /// Who to log in to registries as; a registry without credentials is pulled from
    /// anonymously.
    pub credentials: Credentials,
    /// Resolve the tag at the registry even if the cache knows it.
    pub refresh: bool,
    /// Who owns the unpacked files.
    pub owners: Owners,
    /// Which registries the pull may reach: every connection it makes is held to this.
    pub registries: RegistryPolicy,
}

/// Registry credentials, each scoped to one registry: they are sent to that registry (its
/// host and port exactly as the reference names them, Docker Hub by any of its names) and to
/// no other.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_registry: std::collections::BTreeMap<String, (String, String)>,
    /// Why `$UPSTREAM_REGISTRY_AUTH` was refused; a pull that would reach a registry fails
    /// with it rather than going on without the credentials meant for it.
    refused: Option<CredentialsError>,
}

/// Why `$UPSTREAM_REGISTRY_AUTH` cannot be used. Entries are named by their place in the
/// list, never by their text, which may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "entry {entry} of $UPSTREAM_REGISTRY_AUTH names no registry, and credentials go only to the registry they are for; write it as `registry.example.com=user:password` (several: separate them with `,`)"
    )]
    Unscoped { entry: usize },
    #[error(
        "entry {entry} of $UPSTREAM_REGISTRY_AUTH is not `registry=user:password` (a user, `:`, then the password)"
    )]
    Malformed { entry: usize },
}

impl Credentials {
    /// Credentials from `$UPSTREAM_REGISTRY_AUTH` (`registry=user:password,…`), then from
    /// Docker's `config.json` (`auths`, base64 `user:password`) under `docker_config`. An
    /// entry that names no registry (the form `user:password`) is refused, not applied to
    /// every registry: see [`Credentials::refused`].
    pub fn load(env: Option<&str>, docker_config: Option<&Path>) -> Credentials {
        let mut credentials = Credentials::default();
        if let Some(text) = env.filter(|t| !t.trim().is_empty()) {
            for (i, item) in text.split(',').enumerate() {
                let entry = i + 1;
                let item = item.trim();
                let scoped = item
                    .split_once('=')
                    .filter(|(registry, _)| looks_like_registry(registry));
                let Some((registry, pair)) = scoped else {
                    credentials.refused = Some(CredentialsError::Unscoped { entry });
                    break;
                };
                match pair.split_once(':') {
                    Some((user, password)) if !user.is_empty() => {
                        credentials.by_registry.insert(
                            normal_registry(registry),
                            (user.to_string(), password.to_string()),
                        );
                    }
                    _ => {
                        credentials.refused = Some(CredentialsError::Malformed { entry });
                        break;
                    }
                }
            }
        }
        let docker = docker_config
            .and_then(|path| fs::read_to_string(path).ok())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        if let Some(auths) = docker.as_ref().and_then(|d| d["auths"].as_object()) {
            use base64::Engine;
            for (registry, entry) in auths {
                let Some(encoded) = entry["auth"].as_str() else {
                    continue;
                };
                let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
                    continue;
                };
                let decoded = String::from_utf8_lossy(&decoded).into_owned();
                if let Some((u, p)) = decoded.split_once(':') {
                    credentials
                        .by_registry
                        .entry(normal_registry(registry))
                        .or_insert((u.to_string(), p.to_string()));
                }
            }
        }
        credentials
    }

    /// The credentials scoped to `registry` (`ghcr.io`, `localhost:5000`), if any.
    pub fn for_registry(&self, registry: &str) -> Option<&(String, String)> {
        self.by_registry.get(&normal_registry(registry))
    }

    /// Why `$UPSTREAM_REGISTRY_AUTH` was refused, if it was.
    pub fn refused(&self) -> Option<&CredentialsError> {
        self.refused.as_ref()
    }
}

/// Whether `text` (what comes before `=` in an entry) can name a registry: a host name or
/// address, with a port of digits or none. `user:secret` cannot, so a password with `=`
/// in an unscoped entry is not mistaken for a scope.
fn looks_like_registry(text: &str) -> bool {
    let text = text
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = text.split('/').next().unwrap_or(text);
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') => (name, Some(port)),
        _ => (host, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    port_ok && name_ok
}

/// A registry as credentials are scoped to it: no scheme, no path, the host in lowercase,
/// the port as written, Docker Hub (`index.docker.io`, `registry-1.docker.io`,
/// `registry.hub.docker.com`) as `docker.io`. Two registries match only if these are equal.
fn normal_registry(text: &str) -> String {
    let text = text
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = text.split('/').next().unwrap_or(text).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

/// The image cache.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn new(dir: impl Into<PathBuf>) -> Cache {
        Cache { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn blob(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.join("blobs/sha256").join(hex)
    }

    fn image(&self, digest: &str) -> PathBuf {
        self.dir
            .join("images")
            .join(digest.trim_start_matches("sha256:"))
    }

    fn tag_file(&self, reference: &Reference) -> Option<PathBuf> {
        let tag = reference.tag.as_ref()?;
        Some(
            self.dir
                .join("refs")
                .join(reference.registry.replace(':', "_"))
                .join(&reference.repository)
                .join(tag),
        )
    }

    /// The image `reference` names, if the cache has it (by digest, or by the tag's last
    /// resolution).
    pub fn lookup(&self, reference: &Reference) -> Option<Pulled> {
        let digest = match &reference.digest {
            Some(d) => d.clone(),
            None => fs::read_to_string(self.tag_file(reference)?)
                .ok()?
                .trim()
                .to_string(),
        };
        self.load(&digest)
    }

    fn load(&self, digest: &str) -> Option<Pulled> {
        let dir = self.image(digest);
        let config = fs::read_to_string(dir.join("config.json")).ok()?;
        let layers = fs::read_to_string(dir.join("layers")).ok()?;
        Some(Pulled {
            digest: digest.to_string(),
            rootfs: dir.join("rootfs"),
            config: ImageConfig::parse(&config).ok()?,
            layers: layers.trim().parse().unwrap_or(0),
            downloaded: 0,
        })
    }

    fn io(&self, path: &Path) -> impl Fn(io::Error) -> PullError {
        let path = path.to_path_buf();
        move |source| PullError::Io {
            path: path.clone(),
            source,
        }
    }
}

/// An image in the cache, for `upstream images ls`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CachedImage {
    /// `sha256:<hex>` of its manifest.
    pub digest: String,
    /// The references that resolve to it (`registry/repository:tag`).
    pub tags: Vec<String>,
    pub layers: usize,
    /// Bytes its rootfs takes on disk.
    pub rootfs_bytes: u64,
}

/// What `prune` removed.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Pruned {
    pub images: usize,
    pub blobs: usize,
    pub bytes: u64,
}

impl Cache {
    /// Every tag the cache knows, with the digest it resolves to.
    fn tags(&self) -> Vec<(String, String)> {
        let refs = self.dir.join("refs");
        let mut found = Vec::new();
        let mut pending = vec![refs.clone()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                    continue;
                }
                if path
                    .extension()
                    .is_some_and(|e| e.to_string_lossy().starts_with("tmp-"))
                {
                    continue;
                }
                let Ok(relative) = path.strip_prefix(&refs) else {
                    continue;
                };
                let parts: Vec<String> = relative
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                if parts.len() < 3 {
                    continue;
                }
                let registry = parts[0].replacen('_', ":", 1);
                let repository = parts[1..parts.len() - 1].join("/");
                let tag = &parts[parts.len() - 1];
                if let Ok(digest) = fs::read_to_string(&path) {
                    found.push((
                        format!("{registry}/{repository}:{tag}"),
                        digest.trim().to_string(),
                    ));
                }
            }
        }
        found.sort();
        found
    }

    /// Every image in the cache.
    pub fn list(&self) -> Vec<CachedImage> {
        let tags = self.tags();
        let mut images = Vec::new();
        for entry in fs::read_dir(self.dir.join("images"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let hex = entry.file_name().to_string_lossy().into_owned();
            if hex.len() != 64 {
                continue;
            }
            let digest = format!("sha256:{hex}");
            let Some(image) = self.load(&digest) else {
                continue;
            };
            images.push(CachedImage {
                tags: tags
                    .iter()
                    .filter(|(_, d)| *d == digest)
                    .map(|(t, _)| t.clone())
                    .collect(),
                layers: image.layers,
                rootfs_bytes: disk_use(&image.rootfs),
                digest,
            });
        }
        images.sort_by(|a, b| a.tags.cmp(&b.tags).then(a.digest.cmp(&b.digest)));
        images
    }

    /// Forgets `reference` (a tag, or the image a digest names); the image itself goes once
    /// no tag refers to it. Returns whether the cache knew it.
    pub fn remove(&self, reference: &Reference) -> Result<bool, PullError> {
        let digest = match &reference.digest {
            Some(d) => Some(d.clone()),
            None => self
                .tag_file(reference)
                .and_then(|f| fs::read_to_string(f).ok())
                .map(|d| d.trim().to_string()),
        };
        let Some(digest) = digest else {
            return Ok(false);
        };
        if reference.digest.is_some() {
            for (tag, d) in self.tags() {
                if d == digest {
                    if let Ok(r) = Reference::parse(&tag) {
                        if let Some(f) = self.tag_file(&r) {
                            let _ = fs::remove_file(f);
                        }
                    }
                }
            }
        } else if let Some(f) = self.tag_file(reference) {
            fs::remove_file(&f).map_err(self.io(&f))?;
        }
        if !self.tags().iter().any(|(_, d)| *d == digest) {
            self.remove_image(&digest)?;
        }
        Ok(true)
    }

    fn remove_image(&self, digest: &str) -> Result<(), PullError> {
        let dir = self.image(digest);
        if !dir.exists() {
            return Ok(());
        }
        // Away from its name first, so that no sandbox starts on a half-removed rootfs.
        let trash = self.dir.join("tmp").join(format!(
            "removed-{}-{}",
            digest.trim_start_matches("sha256:"),
            std::process::id()
        ));
        fs::create_dir_all(self.dir.join("tmp")).map_err(self.io(&self.dir))?;
        fs::rename(&dir, &trash).map_err(self.io(&dir))?;
        remove_all(&trash).map_err(self.io(&trash))
    }

    /// Removes images no tag refers to, and downloaded layers no cached image uses.
    pub fn prune(&self) -> Result<Pruned, PullError> {
        let mut pruned = Pruned::default();
        let tagged: std::collections::HashSet<String> =
            self.tags().into_iter().map(|(_, d)| d).collect();
        for image in self.list() {
            if !tagged.contains(&image.digest) {
                pruned.bytes += image.rootfs_bytes;
                self.remove_image(&image.digest)?;
                pruned.images += 1;
            }
        }
        let mut used = std::collections::HashSet::new();
        for entry in fs::read_dir(self.dir.join("images"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(text) = fs::read_to_string(entry.path().join("blobs")) {
                used.extend(
                    text.lines()
                        .map(|l| l.trim_start_matches("sha256:").to_string()),
                );
            }
        }
        let blobs = self.dir.join("blobs/sha256");
        for entry in fs::read_dir(&blobs).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !used.contains(&name) {
                pruned.bytes += entry.metadata().map_or(0, |m| m.len());
                fs::remove_file(entry.path()).map_err(self.io(&entry.path()))?;
                pruned.blobs += 1;
            }
        }
        Ok(pruned)
    }
}

/// Makes `path` (and what is missing above it) a directory only its owner can enter,
/// whatever the umask.
fn private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Err(io::Error::other("not a directory"));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Bytes a tree takes on disk, links not followed.
fn disk_use(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in fs::read_dir(path).into_iter().flatten().flatten() {
            total += disk_use(&entry.path());
        }
    }
    total
}

/// Removes a tree whatever modes an image gave what is inside.
fn remove_all(path: &Path) -> io::Result<()> {
    if fs::remove_dir_all(path).is_ok() {
        return Ok(());
    }
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700));
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    fs::remove_dir_all(path)
}

/// Hears nothing of a pull: for callers that show no progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl PullProgress for NoProgress {
    fn layer(&mut self, _: &str, _: u64, _: bool) {}
}

/// Reports a pull as it goes.
pub trait PullProgress {
    /// The image is about to be looked up in the cache, and pulled if it is not there.
    fn starting(&mut self) {}

    /// A layer of `size` bytes starts downloading (`cached`: it needs no download).
    fn layer(&mut self, digest: &str, size: u64, cached: bool);

    /// `bytes` of the layer have arrived so far (told a few times a second while layers
    /// download, and once at the end of each).
    fn downloaded(&mut self, _digest: &str, _bytes: u64) {}

    /// Every layer is in the cache; the rootfs is being made from them.
    fn unpacking(&mut self) {}
}

/// Makes `reference` ready in `cache`: from the cache alone when it can, else from the
/// registry.
pub fn pull(
    reference: &Reference,
    cache: &Cache,
    options: &PullOptions,
    progress: &mut dyn PullProgress,
) -> Result<Pulled, PullError> {
    if !options.refresh || reference.digest.is_some() {
        if let Some(found) = cache.lookup(reference) {
            return Ok(found);
        }
    }
    if let Some(refused) = options.credentials.refused() {
        return Err(refused.clone().into());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(cache.io(cache.dir()))?;
    runtime.block_on(pull_async(reference, cache, options, progress))
}

async fn pull_async(
    reference: &Reference,
    cache: &Cache,
    options: &PullOptions,
    progress: &mut dyn PullProgress,
) -> Result<Pulled, PullError> {
    let host = reference
        .registry
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(reference.registry.as_str(), |(host, _)| host);
    let plain = options
        .insecure
        .iter()
        .any(|e| *e == reference.registry || e == host);
    let mut config = ClientConfig {
        protocol: if plain {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        ..ClientConfig::default()
    };
    // Under a policy, every connection goes through the pull's own proxy, which holds it
    // to the policy (and replaces any proxy of the environment).
    let guard = match &options.registries {
        RegistryPolicy::Any => None,
        RegistryPolicy::Public { allowed } => Some(
            Guard::start(allowed.clone())
                .await
                .map_err(|e| PullError::Config(format!("cannot start the pull's proxy: {e}")))?,
        ),
    };
    if let Some(guard) = &guard {
        config.https_proxy = Some(guard.url.clone());
        config.http_proxy = Some(guard.url.clone());
    }
    let client = oci_client::Client::try_from(config).map_err(|e| PullError::Registry {
        registry: reference.registry.clone(),
        message: e.to_string(),
    })?;
    // What the registry client says, unless the proxy stopped a connection: then what it
    // stopped and why (a refused address's answer is never seen, let alone passed on).
    let registry_error = |e: oci_client::errors::OciDistributionError| {
        let registry = reference.registry.clone();
        match guard.as_ref().and_then(Guard::stopped) {
            Some(Stop::Refused { host }) => PullError::Refused { registry, host },
            Some(Stop::Unreachable { host, why }) => PullError::Registry {
                registry,
                message: format!("cannot connect to {host}: {why}"),
            },
            Some(Stop::TooMuch { host }) => PullError::Registry {
                registry,
                message: format!(
                    "{host} sent more than the image's manifest accounts for; the pull was stopped"
                ),
            },
            None => PullError::Registry {
                registry,
                message: e.to_string(),
            },
        }
    };
    let oci_ref: oci_client::Reference = reference
        .to_string()
        .parse()
        .map_err(|e| PullError::Config(format!("{reference}: {e}")))?;
    let auth = match options.credentials.for_registry(&reference.registry) {
        Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
        None => RegistryAuth::Anonymous,
    };
    let (manifest, digest, config) = client
        .pull_manifest_and_config(&oci_ref, &auth)
        .await
        .map_err(registry_error)?;
    let image_config = ImageConfig::parse(&config)?;
    if let Some(guard) = &guard {
        guard.expect(
            manifest
                .layers
                .iter()
                .map(|l| l.size.max(0) as u64)
                .fold(0, u64::saturating_add),
        );
    }

    // The cache is its owner's alone: no other user may reach an image's files (another
    // tenant's private image, a program the image made executable).
    private_dir(&cache.dir).map_err(cache.io(&cache.dir))?;
    for dir in ["blobs", "blobs/sha256", "images", "locks", "tmp", "refs"] {
        let path = cache.dir.join(dir);
        private_dir(&path).map_err(cache.io(&path))?;
    }
    // Pulls of the same image wait for one another here.
    let lock_path = cache
        .dir
        .join("locks")
        .join(digest.trim_start_matches("sha256:"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(cache.io(&lock_path))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| cache.io(&lock_path)(e.into()))?;

    if let Some(mut found) = cache.load(&digest) {
        found.downloaded = 0;
        remember_tag(cache, reference, &digest)?;
        return Ok(found);
    }

    // Layers not in the cache, downloaded side by side.
    let mut downloaded = 0;
    let mut downloads = Vec::new();
    for layer in &manifest.layers {
        let cached = cache.blob(&layer.digest).is_file();
        progress.layer(&layer.digest, layer.size.max(0) as u64, cached);
        if !cached {
            downloaded += layer.size.max(0) as u64;
            let counter = Arc::new(AtomicU64::new(0));
            downloads.push((
                layer.digest.clone(),
                counter.clone(),
                download(&client, &oci_ref, layer, cache, counter),
            ));
        }
    }
    // While they run, what has arrived is reported a few times a second.
    let counters: Vec<(String, Arc<AtomicU64>)> = downloads
        .iter()
        .map(|(digest, counter, _)| (digest.clone(), counter.clone()))
        .collect();
    let report = |progress: &mut dyn PullProgress| {
        for (digest, counter) in &counters {
            progress.downloaded(digest, counter.load(Ordering::Relaxed));
        }
    };
    let all = futures::future::join_all(downloads.into_iter().map(|(_, _, f)| f));
    futures::pin_mut!(all);
    let results = loop {
        let tick = Box::pin(tokio::time::sleep(PROGRESS_EVERY));
        match futures::future::select(all, tick).await {
            futures::future::Either::Left((results, _)) => break results,
            futures::future::Either::Right(((), pending)) => {
                report(progress);
                all = pending;
            }
        }
    };
    report(progress);
    for result in results {
        result.map_err(|e| match e {
            Fetch::Registry(e) => registry_error(e),
            Fetch::Io(e) => e,
        })?;
    }
    progress.unpacking();

    // The rootfs, made aside and renamed whole.
    let target = cache.image(&digest);
    let temp = cache.dir.join("tmp").join(format!("image-{}", unique()));
    let _ = fs::remove_dir_all(&temp);
    let rootfs = temp.join("rootfs");
    fs::create_dir_all(&rootfs).map_err(cache.io(&rootfs))?;
    for layer in &manifest.layers {
        let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
            PullError::UnknownLayer {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            }
        })?;
        let path = cache.blob(&layer.digest);
        let file = fs::File::open(&path).map_err(cache.io(&path))?;
        unpack_layer(
            io::BufReader::new(file),
            compression,
            &rootfs,
            options.owners,
        )
        .map_err(|source| PullError::Unpack {
            digest: layer.digest.clone(),
            source,
        })?;
    }
    let write = |name: &str, text: &str| {
        let path = temp.join(name);
        fs::write(&path, text).map_err(cache.io(&path))
    };
    write("config.json", &config)?;
    write("layers", &manifest.layers.len().to_string())?;
    // The layers' digests, one a line: what `prune` keeps while the image is cached.
    let digests: Vec<&str> = manifest.layers.iter().map(|l| l.digest.as_str()).collect();
    write("blobs", &digests.join("\n"))?;
    if let Err(e) = fs::rename(&temp, &target) {
        let _ = fs::remove_dir_all(&temp);
        return Err(cache.io(&target)(e));
    }
    remember_tag(cache, reference, &digest)?;
    Ok(Pulled {
        digest,
        rootfs: target.join("rootfs"),
        config: image_config,
        layers: manifest.layers.len(),
        downloaded,
    })
}

enum Fetch {
    Registry(oci_client::errors::OciDistributionError),
    Io(PullError),
}

/// Downloads one layer into the cache: to a temporary file, checked against its digest by
/// the client, then renamed to its name.
async fn download(
    client: &oci_client::Client,
    reference: &oci_client::Reference,
    layer: &oci_client::manifest::OciDescriptor,
    cache: &Cache,
    arrived: Arc<AtomicU64>,
) -> Result<(), Fetch> {
    let target = cache.blob(&layer.digest);
    let temp = cache.dir.join("tmp").join(format!(
        "{}-{}",
        layer.digest.trim_start_matches("sha256:"),
        unique()
    ));
    let file = tokio::fs::File::create(&temp)
        .await
        .map_err(|e| Fetch::Io(cache.io(&temp)(e)))?;
    let mut file = Counting {
        inner: tokio::io::BufWriter::new(file),
        count: arrived,
        limit: layer.size.max(0) as u64,
    };
    if let Err(e) = client.pull_blob(reference, layer, &mut file).await {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(Fetch::Registry(e));
    }
    use tokio::io::AsyncWriteExt;
    file.flush()
        .await
        .map_err(|e| Fetch::Io(cache.io(&temp)(e)))?;
    drop(file);
    tokio::fs::rename(&temp, &target)
        .await
        .map_err(|e| Fetch::Io(cache.io(&target)(e)))
}

/// How often a pull reports the bytes that have arrived.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// A writer that counts what goes through it, and refuses more than `limit` bytes: a
/// registry cannot fill the cache's disk by sending a layer without end.
struct Counting<W> {
    inner: W,
    count: Arc<AtomicU64>,
    limit: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counting<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        if self.count.load(Ordering::Relaxed) + buf.len() as u64 > self.limit {
            return std::task::Poll::Ready(Err(io::Error::other(format!(
                "the registry sent more than the {} bytes the manifest gives the layer",
                self.limit
            ))));
        }
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            self.count.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A name part no other pull, in this process or another, is using: the pid and a counter
/// (threads of one process pull different images at once).
fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn remember_tag(cache: &Cache, reference: &Reference, digest: &str) -> Result<(), PullError> {
    let Some(path) = cache.tag_file(reference) else {
        return Ok(());
    };
    let parent = path.parent().expect("tag files have a parent");
    fs::create_dir_all(parent).map_err(cache.io(parent))?;
    let temp = path.with_extension(format!("tmp-{}", unique()));
    fs::write(&temp, digest).map_err(cache.io(&temp))?;
    fs::rename(&temp, &path).map_err(cache.io(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_environment_then_docker_config() {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("config.json");
        // base64("hub:secret") and base64("me:pw")
        fs::write(
            &config,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldA=="},"ghcr.io":{"auth":"bWU6cHc="}}}"#,
        )
        .unwrap();
        let c = Credentials::load(
            Some("localhost:5000=ci:token,Registry.Example.com=a:b=c"),
            Some(&config),
        );
        assert_eq!(c.refused(), None);
        assert_eq!(
            c.for_registry("docker.io"),
            Some(&("hub".into(), "secret".into()))
        );
        assert_eq!(c.for_registry("ghcr.io"), Some(&("me".into(), "pw".into())));
        assert_eq!(
            c.for_registry("localhost:5000"),
            Some(&("ci".into(), "token".into()))
        );
        // Host names match whatever their case; a password may hold `=`.
        assert_eq!(
            c.for_registry("registry.example.com"),
            Some(&("a".into(), "b=c".into()))
        );
        assert_eq!(c.for_registry("quay.io"), None);
    }

    #[test]
    fn credentials_go_only_to_the_registry_they_name_exactly() {
        let c = Credentials::load(
            Some("registry.example.com=ci:token,localhost:5000=l:p"),
            None,
        );
        for other in [
            "example.com",
            "registry.example.com.evil.test",
            "evil-registry.example.com",
            "registry.example.co",
            "registry.example.com:5000",
            "localhost",
            "localhost:50001",
            "localhost:500",
            "docker.io",
            "127.0.0.1:5000",
        ] {
            assert_eq!(c.for_registry(other), None, "{other}");
        }
        // Docker Hub's names are one registry, and only they are.
        let hub = Credentials::load(Some("index.docker.io=h:p"), None);
        for name in [
            "docker.io",
            "registry-1.docker.io",
            "registry.hub.docker.com",
        ] {
            assert_eq!(
                hub.for_registry(name),
                Some(&("h".into(), "p".into())),
                "{name}"
            );
        }
        for name in [
            "docker.io.evil.test",
            "evil.docker.io",
            "docker.io:5000",
            "ghcr.io",
        ] {
            assert_eq!(hub.for_registry(name), None, "{name}");
        }
    }

    #[test]
    fn unscoped_credentials_are_refused_with_how_to_scope_them() {
        for (text, entry) in [
            ("alice:hunter2", 1),
            ("ghcr.io=a:b,alice:hun=ter2", 2),
            ("=alice:hunter2", 1),
        ] {
            let c = Credentials::load(Some(text), None);
            let err = c.refused().expect(text).to_string();
            assert!(err.contains(&format!("entry {entry}")), "{err}");
            assert!(err.contains("registry.example.com=user:password"), "{err}");
            assert!(
                !err.contains("hunter2") && !err.contains("ter2") && !err.contains("alice"),
                "the error shows nothing of the entry: {err}"
            );
            assert_eq!(c.for_registry("quay.io"), None);
        }
        let c = Credentials::load(Some("ghcr.io=token-without-user"), None);
        let err = c.refused().unwrap().to_string();
        assert!(
            err.contains("entry 1") && !err.contains("token-without-user"),
            "{err}"
        );
        // A pull with refused credentials fails before it reaches any registry.
        let cache_dir = tempfile::tempdir().unwrap();
        let options = PullOptions {
            insecure: Vec::new(),
            credentials: Credentials::load(Some("user:pass"), None),
            refresh: false,
            owners: Owners::Unpacker,
            registries: RegistryPolicy::Any,
        };
        let reference = Reference::parse("192.0.2.1:5000/any:1").unwrap();
        let err = pull(
            &reference,
            &Cache::new(cache_dir.path()),
            &options,
            &mut NoProgress,
        )
        .unwrap_err();
        assert!(matches!(err, PullError::Credentials(_)), "{err}");
    }

    struct NoProgress;
    impl PullProgress for NoProgress {
        fn layer(&mut self, _: &str, _: u64, _: bool) {}
    }

    #[test]
    fn the_config_a_sandbox_needs_is_read() {
        let config = ImageConfig::parse(
            r#"{"config":{"Env":["PATH=/usr/local/bin:/usr/bin","LANG=C.UTF-8"],"WorkingDir":"/app","User":"1000:1000"}}"#,
        )
        .unwrap();
        assert_eq!(
            config.env[0],
            ("PATH".into(), "/usr/local/bin:/usr/bin".into())
        );
        assert_eq!(config.working_dir.as_deref(), Some("/app"));
        assert_eq!(config.user.as_deref(), Some("1000:1000"));
        assert_eq!(ImageConfig::parse("{}").unwrap(), ImageConfig::default());
        assert!(ImageConfig::parse("not json").is_err());
    }
}

//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run markdown turns in isolated sandboxes and write the results back into them.
#[derive(Debug, Parser)]
#[command(name = "upstream", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the steps of one or more documents and write each step's result after it.
    Run(RunArgs),
    /// Run one command in a fresh sandbox, like `docker run --rm`.
    Exec(ExecArgs),
    /// List the turns in the store: number, start, context, document, status, duration.
    Log(LogArgs),
    /// Show a turn: its steps, outputs and artifacts, or the whole output of one step.
    Show(ShowArgs),
    /// List artifacts (of a context, as its next turn gets them, or of one turn), or get one.
    Artifacts(ArtifactsArgs),
    /// List or remove contexts.
    #[command(subcommand)]
    Context(ContextCommand),
    /// Remove stored content that no record refers to any more.
    Gc(GcArgs),
    /// List, pull or remove cached images.
    #[command(subcommand)]
    Images(ImagesCommand),
    /// Serve the HTTP API (sandboxes, exec, files, turns) with warm pools of sandboxes.
    Serve(ServeArgs),
    /// Make, list or revoke the API keys of `upstream serve`.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Use sandboxes of a running `upstream serve` (`$UPSTREAM_URL` and `$UPSTREAM_API_KEY`,
    /// else its local socket).
    Sandbox(SandboxArgs),
    /// Show what this host supports and what upstream will use.
    Doctor,
}

/// Where `serve` keeps its keys and the tenants' stores.
#[derive(Debug, Args, Clone)]
pub struct StateArg {
    /// The daemon's state directory (default: `$UPSTREAM_STATE_DIR`, else
    /// /var/lib/upstream as root, ~/.local/share/upstream otherwise).
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// An address to serve the API on, with API keys; may be repeated.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub listen: Vec<std::net::SocketAddr>,
    /// The local socket, served without keys to this user only (default: the state
    /// directory's `upstream.sock`).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Keep N sandboxes of a shape ready: `host=8`, `python:3.12=4`,
    /// `python:3.12,memory=1G,cpus=2,network=host=4`; may be repeated.
    #[arg(long, value_name = "IMAGE[,LIMIT=V...]=N", value_parser = parse_pool)]
    pub pool: Vec<(upstream_server::daemon::Shape, usize)>,
    /// Most sandboxes handed out at once.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_sandboxes: usize,
    /// Most sandboxes one tenant may have at once.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub max_per_tenant: usize,
    /// Most operations (commands, file transfers, turns, sandboxes being made) one tenant
    /// may have running at once; more wait for one of its own to end, and other tenants'
    /// requests never wait behind them.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=768))]
    pub max_concurrent_per_tenant: u64,
    /// Let every tenant's sandboxes and turns have the host's network (`network: host`),
    /// the host's loopback services included; without it only the local socket and the
    /// tenants named by --allow-host-network-for may.
    #[arg(long)]
    pub allow_host_network: bool,
    /// Let this tenant's sandboxes and turns have the host's network; may be repeated.
    #[arg(long, value_name = "TENANT")]
    pub allow_host_network_for: Vec<String>,
    /// Keys of this tenant see the daemon-wide /metrics (every tenant's figures), as the
    /// local socket does; other keys see their own tenant's. May be repeated.
    #[arg(long, value_name = "TENANT")]
    pub operator_tenant: Vec<String>,
    /// Tear down a sandbox unused this long, unless it asks otherwise (`0`: never).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration_or_zero)]
    pub idle_timeout: std::time::Duration,
    /// Tear down a sandbox this long after it was made, unless it asks otherwise (`0`:
    /// never; sessions may run for days).
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_duration_or_zero)]
    pub lifetime: std::time::Duration,
    /// Memory limit of a sandbox or turn that names none (`0`: unlimited).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size_or_zero)]
    pub default_memory: u64,
    /// Disk limit of a sandbox or turn that names none: what it may write to its root, /tmp
    /// and workspace.
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_disk)]
    pub default_disk: u64,
    /// The most disk a sandbox or turn may ask for.
    #[arg(long, value_name = "SIZE", default_value = "1T", value_parser = parse_disk)]
    pub max_disk: u64,
    /// Largest request body outside file uploads (which stream, unlimited).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub max_body: u64,
    /// A registry to reach over plain HTTP (loopback ones always are); may be repeated.
    /// The daemon may pull from it even if it is not public.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
    /// A registry the daemon may pull from although it is not public (on loopback or a
    /// private network): `HOST` (any port) or `HOST:PORT`; may be repeated. Other pulls
    /// reach only public addresses, every connection checked.
    #[arg(long = "registry", value_name = "HOST[:PORT]")]
    pub registry: Vec<String>,
    /// How the log on stderr looks: `text`, or `json` (one JSON object per line).
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// What the log shows: a level (`error`, `warn`, `info`, `debug`, `trace`), or
    /// directives as `RUST_LOG` takes them (`info,upstream_server=debug`) [default:
    /// `$RUST_LOG`, else `info`].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    #[command(flatten)]
    pub state: StateArg,
}

/// How `serve` writes its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key; it is printed once, on stdout, and only its hash is kept.
    Create {
        /// What the key is for (`ci`, `laptop`).
        #[arg(long)]
        name: String,
        /// The tenant it acts for: sandboxes, turns and contexts are kept apart by tenant.
        #[arg(long, default_value = "default")]
        tenant: String,
        #[command(flatten)]
        state: StateArg,
    },
    /// The keys: id, name, tenant, prefix, made, revoked.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// Revoke a key (by id, or every key of a name); it stops working at once.
    Revoke {
        #[arg(value_name = "ID|NAME")]
        key: String,
        #[command(flatten)]
        state: StateArg,
    },
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    #[command(subcommand)]
    pub command: SandboxCommand,
    #[command(flatten)]
    pub state: StateArg,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Make a sandbox (from the warm pool when one fits); prints its id.
    Create {
        /// `host` or an OCI image.
        #[arg(long, default_value = "host")]
        image: String,
        /// Memory limit, such as 512M or 2G (default: the daemon's).
        #[arg(long, value_parser = parse_memory)]
        memory: Option<u64>,
        /// Disk limit — its root, /tmp and workspace together — such as 2G (default: the
        /// daemon's).
        #[arg(long, value_parser = parse_disk)]
        disk: Option<u64>,
        /// CPU limit, in CPUs.
        #[arg(long)]
        cpus: Option<f64>,
        /// `none` (only loopback) or `host`.
        #[arg(long, default_value = "none")]
        network: String,
        /// Tear it down when unused this long (`0`: never; default: the daemon's).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_or_zero)]
        timeout: Option<std::time::Duration>,
        /// Tear it down after this long whatever it does.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        lifetime: Option<std::time::Duration>,
        /// Environment of its commands (KEY=VALUE); may be repeated.
        #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// A label to find it by (KEY=VALUE); may be repeated.
        #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_env)]
        metadata: Vec<(String, String)>,
        /// Print the sandbox as JSON instead of its id.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a sandbox; its output streams back, its exit code is upstream's.
    Exec {
        id: String,
        /// Environment over the sandbox's (KEY=VALUE); may be repeated.
        #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
        /// Kill the command after this long.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Give the command upstream's standard input (read to its end first); otherwise
        /// it reads nothing.
        #[arg(short = 'i', long)]
        stdin: bool,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// The sandboxes: id, image, age, idle timeout, labels.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Tear sandboxes down.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Copy a file into or out of a sandbox: `cp data.csv ID:/workspace/` or
    /// `cp ID:/workspace/out.json .` (`-` is stdin or stdout).
    Cp { source: String, target: String },
}

fn parse_pool(s: &str) -> Result<(upstream_server::daemon::Shape, usize), String> {
    let (shape, n) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("`{s}`: write IMAGE=N, such as host=8"))?;
    let n = n
        .parse()
        .map_err(|_| format!("`{s}`: N must be a whole number"))?;
    let shape = upstream_server::daemon::Shape::parse(shape).map_err(|e| format!("`{s}`: {e}"))?;
    Ok((shape, n))
}

fn parse_duration_or_zero(s: &str) -> Result<std::time::Duration, String> {
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    parse_duration(s)
}

/// Which store: `--store`, else `$UPSTREAM_STORE`, else the nearest `.upstream/` above.
#[derive(Debug, Args, Clone)]
pub struct StoreArg {
    /// The store directory (default: `$UPSTREAM_STORE`, else the nearest `.upstream/` above
    /// the document, or above the current directory).
    #[arg(long, value_name = "DIR", global = true)]
    pub store: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Only turns of this context.
    #[arg(long, short)]
    pub context: Option<String>,
    /// Only the last N turns.
    #[arg(short = 'n', long = "last", value_name = "N")]
    pub last: Option<u64>,
    /// Print JSON (one array) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArg,
    #[command(flatten)]
    pub daemon: DaemonArg,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The turn's number (or its id, or the start of it).
    #[arg(value_name = "TURN")]
    pub turn: String,
    /// Print this step's whole output: stdout to stdout, stderr to stderr, as printed (to a
    /// terminal, with control characters shown escaped, as `\x1b`).
    #[arg(long, value_name = "N")]
    pub step: Option<i64>,
    /// Print the document as the turn left it, with its results (to a terminal, with control
    /// characters shown escaped).
    #[arg(long, conflicts_with = "step")]
    pub document: bool,
    /// Print JSON.
    #[arg(long, conflicts_with = "document")]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArg,
    #[command(flatten)]
    pub daemon: DaemonArg,
}

#[derive(Debug, Args)]
pub struct ArtifactsArgs {
    #[command(subcommand)]
    pub get: Option<ArtifactsCommand>,
    #[command(flatten)]
    pub scope: ArtifactScope,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArg,
    #[command(flatten)]
    pub daemon: DaemonArg,
}

/// Whose artifacts: a context's latest (the default: the context of the last turn), or what
/// one turn saved.
#[derive(Debug, Args, Clone)]
pub struct ArtifactScope {
    /// The artifacts a new turn of this context would start with.
    #[arg(long, short, global = true, conflicts_with = "turn")]
    pub context: Option<String>,
    /// The artifacts this turn saved.
    #[arg(long, global = true, value_name = "TURN")]
    pub turn: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// Write an artifact's content to a file or stdout.
    Get {
        /// Its path in the workspace.
        path: String,
        /// Write here instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ContextCommand {
    /// List contexts: turns, the last one, the artifacts a new turn would get.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Remove a context and the records of its turns (`upstream gc` then frees their content).
    Rm {
        name: String,
        #[command(flatten)]
        store: StoreArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// The cached images: tags, digest, layers, disk use.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pull an image (again: its tag is resolved at the registry).
    Pull {
        /// `python:3.12`, `ghcr.io/org/tool@sha256:…`
        reference: String,
        /// A registry to reach over plain HTTP (loopback ones always are); may be repeated.
        #[arg(long, value_name = "HOST[:PORT]")]
        insecure_registry: Vec<String>,
    },
    /// Forget a tag; the image goes once no tag names it.
    Rm { reference: String },
    /// Remove images no tag names, and layers no image uses.
    Prune {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArg,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Markdown documents to run, one turn each, in order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Stream the steps' output to stderr as they run.
    #[arg(short, long)]
    pub verbose: bool,
    /// Print each turn's record as one line of JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Run again from the step that stopped the document's last turn, with the workspace as
    /// the steps before it left it; their result blocks stay as they are.
    #[arg(long)]
    pub resume: bool,
    /// Resolve the image's tag at its registry even if the cache has it.
    #[arg(long)]
    pub pull: bool,
    /// A registry to reach over plain HTTP (loopback ones always are); may be repeated.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
    /// Go on with the next document after one that did not pass (by default the run stops
    /// there, so that a pipeline never goes on from an older context).
    #[arg(long)]
    pub keep_going: bool,
    /// Run here even when `$UPSTREAM_URL` names a daemon.
    #[arg(long, conflicts_with_all = ["daemon", "url"])]
    pub local: bool,
    #[command(flatten)]
    pub store: StoreArg,
    #[command(flatten)]
    pub daemon: DaemonArg,
}

/// Which daemon, if any, runs turns or holds their records: a context lives in one store,
/// and a daemon is used only when asked, never because one happens to be listening.
#[derive(Debug, Args, Clone)]
pub struct DaemonArg {
    /// Use the daemon of this machine, through its local socket (in the state directory).
    #[arg(long, conflicts_with = "url")]
    pub daemon: bool,
    /// Use the daemon at this URL, with the API key in `$UPSTREAM_API_KEY` (default:
    /// `$UPSTREAM_URL`, when set and neither --store nor --local is given).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    #[command(flatten)]
    pub state: StateArg,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The image to run in.
    #[arg(long, default_value = "host")]
    pub image: String,
    /// Memory limit, such as 512M or 2GiB (at least 4M).
    #[arg(long, value_parser = parse_memory)]
    pub memory: Option<u64>,
    /// CPU limit as a number of CPUs, such as 0.5 (0.01 to 1024).
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<f64>,
    /// `none` (loopback only) or `host`.
    #[arg(long, default_value = "none")]
    pub network: upstream_doc::Network,
    /// `namespaces` (the host's kernel) or `vm` (a microVM with a kernel of its own).
    #[arg(long, default_value = "namespaces")]
    pub isolation: upstream_doc::Isolation,
    /// Kill the command after this long, such as 30s.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Working directory inside the sandbox [default: the image's, else /workspace].
    #[arg(long)]
    pub workdir: Option<String>,
    /// Keep what the command writes on disk rather than in memory (for commands that write
    /// more than the sandbox's memory should hold).
    #[arg(long)]
    pub disk: bool,
    /// Set an environment variable (KEY=VALUE); may be repeated.
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Give the command nothing on its standard input, whatever upstream's is (for a script
    /// that runs `upstream exec` in a loop reading its own stdin, as `ssh -n`).
    #[arg(short = 'n', long)]
    pub no_stdin: bool,
    /// The command and its arguments. A pipe or file on upstream's standard input is read to
    /// its end (at most 15 MiB) and given to the command as its standard input (unless
    /// `--no-stdin`); a terminal is not.
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    upstream_doc::front_matter::parse_size(s)
}

/// A size from `min` to `max` bytes.
fn size_within(s: &str, min: u64, max: u64) -> Result<u64, String> {
    use upstream_doc::front_matter::format_size;
    let bytes = parse_size(s)?;
    if !(min..=max).contains(&bytes) {
        return Err(format!(
            "`{s}` is out of range: give from {} to {}",
            format_size(min),
            format_size(max)
        ));
    }
    Ok(bytes)
}

fn parse_memory(s: &str) -> Result<u64, String> {
    use upstream_doc::front_matter::{MAX_MEMORY, MIN_MEMORY};
    size_within(s, MIN_MEMORY, MAX_MEMORY)
}

fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    if s == "0" {
        return Ok(0);
    }
    parse_memory(s)
}

fn parse_disk(s: &str) -> Result<u64, String> {
    use upstream_doc::front_matter::{MAX_DISK, MIN_DISK};
    size_within(s, MIN_DISK, MAX_DISK)
}

fn parse_cpus(s: &str) -> Result<f64, String> {
    use upstream_doc::front_matter::{MAX_CPUS, MIN_CPUS};
    match s.trim().parse::<f64>() {
        Ok(c) if (MIN_CPUS..=MAX_CPUS).contains(&c) => Ok(c),
        _ => Err(format!(
            "`{s}` is not a number of CPUs from {MIN_CPUS} to {MAX_CPUS}"
        )),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    upstream_doc::front_matter::parse_duration(s)
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

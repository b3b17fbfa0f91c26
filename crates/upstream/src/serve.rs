//! `upstream serve` and `upstream keys`.

use std::io::{self, Write};
use std::path::PathBuf;

use upstream_store::Store;

use crate::cli::{KeysCommand, LogFormat, ServeArgs, StateArg};
use crate::exit;
use crate::table::{Align, Table};

/// The daemon's state directory: `--state-dir`, else `$UPSTREAM_STATE_DIR`, else the
/// system's or the user's data directory.
pub fn state_dir(arg: &StateArg) -> PathBuf {
    if let Some(dir) = &arg.state_dir {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os("UPSTREAM_STATE_DIR") {
        return PathBuf::from(dir);
    }
    if nix::unistd::Uid::effective().is_root() {
        return PathBuf::from("/var/lib/upstream");
    }
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir)
        .join("upstream")
}

/// Sends the daemon's log to stderr, as `format` says, filtered by `level` (else
/// `$RUST_LOG`, else `info`).
fn start_log(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    let directives = level
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "info".to_string());
    let refused = |why: String| {
        format!(
            "the log level `{directives}`: {why}; give a level (error, warn, info, debug, trace, off) or directives such as `info,upstream_server=debug`"
        )
    };
    // A bare word is a level: `loud` would otherwise be taken for a target's name and
    // quietly show everything of it and nothing else.
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    if let Some(word) = directives
        .split(',')
        .map(str::trim)
        .find(|d| !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str()))
    {
        return Err(refused(format!("`{word}` is not a level")));
    }
    let filter: tracing_subscriber::filter::Targets =
        directives.parse().map_err(|e| refused(format!("{e}")))?;
    let layer = tracing_subscriber::fmt::layer().with_writer(io::stderr);
    let layer = match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let subscriber = tracing_subscriber::registry().with(layer.with_filter(filter));
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|e| format!("cannot start the log: {e}"))
}

pub fn serve(args: ServeArgs) -> u8 {
    if let Err(e) = start_log(args.log_format, args.log_level.as_deref()) {
        eprintln!("error: {e}");
        return exit::BAD_INPUT;
    }
    let state = state_dir(&args.state);
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| state.join("upstream.sock"));
    let init_exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: cannot find this program's path: {e}");
            return exit::SANDBOX;
        }
    };
    let backend = match crate::backends::open(init_exe) {
        Ok(backend) => backend,
        Err(e) => return crate::run::sandbox_failed(&e),
    };
    let mut images = crate::run::image_source(&args.insecure_registry, false);
    // Tenants name the images: only public registries, and those the operator names.
    images.pull.registries = upstream_image::RegistryPolicy::Public {
        allowed: args
            .registry
            .iter()
            .chain(&args.insecure_registry)
            .cloned()
            .collect(),
    };
    if let Some(refused) = images.pull.credentials.refused() {
        eprintln!("error: {refused}");
        return exit::BAD_INPUT;
    }
    let pools: Vec<String> = args
        .pool
        .iter()
        .map(|(shape, n)| format!("{}={n}", shape.key()))
        .collect();
    let config = upstream_server::Config {
        listen: args.listen,
        socket: socket.clone(),
        state_dir: state,
        pools: args.pool,
        max_sandboxes: args.max_sandboxes,
        max_per_tenant: args.max_per_tenant,
        max_concurrent_per_tenant: args.max_concurrent_per_tenant as usize,
        host_network: upstream_server::daemon::HostNetwork {
            every_tenant: args.allow_host_network,
            tenants: args.allow_host_network_for.into_iter().collect(),
        },
        operators: args.operator_tenant.into_iter().collect(),
        default_idle_timeout: (!args.idle_timeout.is_zero()).then_some(args.idle_timeout),
        default_lifetime: (!args.lifetime.is_zero()).then_some(args.lifetime),
        default_memory: (args.default_memory != 0).then_some(args.default_memory),
        default_disk: args.default_disk,
        max_disk: args.max_disk,
        max_body: args.max_body.min(usize::MAX as u64) as usize,
        images,
    };
    let served = upstream_server::serve(config, backend, |addresses| {
        let listening: Vec<String> = addresses.iter().map(|a| format!("http://{a}")).collect();
        let pools = if pools.is_empty() {
            "no warm pools".to_string()
        } else {
            format!("warm pools {}", pools.join(", "))
        };
        eprintln!(
            "upstream serve: listening on {} and unix:{} ({pools})",
            listening.join(", "),
            socket.display()
        );
    });
    match served {
        Ok(()) => {
            eprintln!("upstream serve: stopped; every sandbox was torn down");
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::SANDBOX
        }
    }
}

fn open_keys(state: &StateArg) -> Result<Store, u8> {
    let dir = state_dir(state).join("keys");
    Store::open(&dir).map_err(|e| {
        eprintln!("error: {e}");
        exit::SANDBOX
    })
}

pub fn keys(command: KeysCommand) -> u8 {
    match command {
        KeysCommand::Create {
            name,
            tenant,
            state,
        } => {
            if tenant.is_empty()
                || !tenant
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                eprintln!("error: tenant `{tenant}`: use letters, digits, `-` and `_`");
                return exit::BAD_INPUT;
            }
            let mut store = match open_keys(&state) {
                Ok(s) => s,
                Err(code) => return code,
            };
            match store.create_key(&name, &tenant) {
                Ok(made) => {
                    let _ = writeln!(io::stdout().lock(), "{}", made.secret);
                    eprintln!(
                        "Key {} ({name}, tenant {tenant}) made; it is shown only this once",
                        made.key.id
                    );
                    exit::OK
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    exit::SANDBOX
                }
            }
        }
        KeysCommand::Ls { json, state } => {
            let store = match open_keys(&state) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let keys = match store.keys() {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("error: {e}");
                    return exit::SANDBOX;
                }
            };
            if json {
                let _ = serde_json::to_writer_pretty(io::stdout().lock(), &keys);
                let _ = writeln!(io::stdout());
                return exit::OK;
            }
            let mut table = Table::new(&[
                ("ID", Align::Right),
                ("NAME", Align::Left),
                ("TENANT", Align::Left),
                ("KEY", Align::Left),
                ("CREATED", Align::Left),
                ("REVOKED", Align::Left),
            ]);
            for key in keys {
                table.row(vec![
                    key.id.to_string(),
                    key.name,
                    key.tenant,
                    format!("{}…", key.prefix),
                    crate::table::time(key.created_at as f64 / 1000.0),
                    key.revoked_at
                        .map_or("-".into(), |t| crate::table::time(t as f64 / 1000.0)),
                ]);
            }
            let _ = table.print(&mut io::stdout().lock());
            exit::OK
        }
        KeysCommand::Revoke { key, state } => {
            let mut store = match open_keys(&state) {
                Ok(s) => s,
                Err(code) => return code,
            };
            match store.revoke_key(&key) {
                Ok(0) => {
                    eprintln!(
                        "error: no key `{key}` that is not revoked; `upstream keys ls` lists them"
                    );
                    exit::STEP_FAILED
                }
                Ok(n) => {
                    eprintln!("Revoked {n} key{}", if n == 1 { "" } else { "s" });
                    exit::OK
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    exit::SANDBOX
                }
            }
        }
    }
}

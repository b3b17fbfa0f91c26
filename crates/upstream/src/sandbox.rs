//! `upstream sandbox`: sandboxes of a running daemon.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use upstream_client::{Client, ClientError, CreateSandbox, Exec, Limits, Stream};

use crate::cli::{SandboxArgs, SandboxCommand};
use crate::exit;
use crate::table::{Align, Table};

/// The daemon to talk to, or why there is none.
pub fn client(state: &crate::cli::StateArg) -> Result<Client, String> {
    let socket = crate::serve::state_dir(state).join("upstream.sock");
    match Client::from_env(&socket) {
        Ok(Some(client)) => Ok(client),
        Ok(None) => Err(format!(
            "no daemon: start `upstream serve`, or set UPSTREAM_URL (and UPSTREAM_API_KEY) \
             to one elsewhere (looked for {})",
            socket.display()
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn failed(e: &ClientError) -> u8 {
    // The daemon's answer may quote what a sandbox named (a file's path).
    eprintln!("error: {}", upstream_doc::terminal::line(&e.to_string()));
    match e {
        ClientError::Api { status, .. } if (400..500).contains(status) => exit::BAD_INPUT,
        _ => exit::SANDBOX,
    }
}

pub fn sandbox(args: SandboxArgs) -> u8 {
    let client = match client(&args.state) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("error: {message}");
            return exit::SANDBOX;
        }
    };
    match args.command {
        SandboxCommand::Create {
            image,
            memory,
            disk,
            cpus,
            network,
            timeout,
            lifetime,
            env,
            metadata,
            json,
        } => {
            let request = CreateSandbox {
                image: Some(image),
                env: env.into_iter().collect(),
                limits: Some(Limits {
                    memory,
                    cpus,
                    pids: None,
                    disk,
                }),
                network: Some(network),
                timeout: timeout.map(|t| t.as_secs_f64()),
                lifetime: lifetime.map(|t| t.as_secs_f64()),
                metadata: metadata.into_iter().collect(),
            };
            match client.create(&request) {
                Ok(sandbox) => {
                    let mut out = io::stdout().lock();
                    let _ = if json {
                        serde_json::to_writer_pretty(&mut out, &sandbox)
                            .map_err(io::Error::other)
                            .and_then(|()| writeln!(out))
                    } else {
                        writeln!(out, "{}", sandbox.id)
                    };
                    exit::OK
                }
                Err(e) => failed(&e),
            }
        }
        SandboxCommand::Exec {
            id,
            env,
            cwd,
            timeout,
            stdin,
            command,
        } => {
            // Text goes as it is, other bytes as base64.
            let (stdin, stdin_base64) = if stdin {
                let mut data = Vec::new();
                if let Err(e) = io::stdin().lock().read_to_end(&mut data) {
                    eprintln!("upstream: cannot read standard input: {e}");
                    return exit::BAD_INPUT;
                }
                match String::from_utf8(data) {
                    Ok(text) => (Some(text), None),
                    Err(e) => {
                        use base64::Engine;
                        let bytes = e.into_bytes();
                        let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
                        (None, Some(encoded))
                    }
                }
            } else {
                (None, None)
            };
            let request = Exec {
                cmd: command,
                stdin,
                stdin_base64,
                env: env.into_iter().collect::<BTreeMap<_, _>>(),
                cwd,
                timeout: timeout.map(|t| t.as_secs_f64()),
            };
            let mut stdout = io::stdout().lock();
            let mut stderr = io::stderr();
            let ran = client.exec(&id, &request, &mut |stream, text| {
                let _ = match stream {
                    Stream::Stdout => stdout
                        .write_all(text.as_bytes())
                        .and_then(|()| stdout.flush()),
                    Stream::Stderr => stderr.write_all(text.as_bytes()),
                };
            });
            if let Ok(exit) = &ran {
                if exit.out_of_memory {
                    eprintln!(
                        "upstream: the sandbox ran out of memory: the kernel killed a process of it"
                    );
                }
                if let Some(limit) = exit.out_of_disk {
                    eprintln!(
                        "upstream: the command ran out of disk space (limit {})",
                        upstream_doc::format_size(limit)
                    );
                }
            }
            match ran {
                Ok(exit) if exit.timed_out => {
                    eprintln!("upstream: the command timed out");
                    124
                }
                Ok(exit) => match (exit.exit_code, exit.signal) {
                    (Some(code), _) => code.clamp(0, 255) as u8,
                    (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
                    _ => exit::SANDBOX,
                },
                Err(e) => failed(&e),
            }
        }
        SandboxCommand::Ls { json } => {
            let sandboxes = match client.list() {
                Ok(s) => s,
                Err(e) => return failed(&e),
            };
            let mut out = io::stdout().lock();
            if json {
                let _ = serde_json::to_writer_pretty(&mut out, &sandboxes);
                let _ = writeln!(out);
                return exit::OK;
            }
            let mut table = Table::new(&[
                ("ID", Align::Left),
                ("IMAGE", Align::Left),
                ("CREATED", Align::Left),
                ("STATE", Align::Left),
                ("EXPIRES IN", Align::Right),
                ("LABELS", Align::Left),
            ]);
            for s in sandboxes {
                let labels: Vec<String> =
                    s.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
                table.row(vec![
                    s.id,
                    s.image,
                    crate::table::time(s.created_at as f64 / 1000.0),
                    s.state,
                    s.expires_in
                        .map_or("never".into(), |e| format!("{}s", e.round())),
                    labels.join(","),
                ]);
            }
            let _ = table.print(&mut out);
            exit::OK
        }
        SandboxCommand::Rm { ids } => {
            let mut code = exit::OK;
            for id in ids {
                if let Err(e) = client.delete(&id) {
                    code = failed(&e);
                }
            }
            code
        }
        SandboxCommand::Cp { source, target } => copy(&client, &source, &target),
    }
}

/// `ID:/path` → (ID, path).
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    id.starts_with("sbx_").then_some((id, path))
}

fn copy(client: &Client, source: &str, target: &str) -> u8 {
    match (remote(source), remote(target)) {
        (Some(_), Some(_)) | (None, None) => {
            eprintln!(
                "error: one side of `cp` is a sandbox path (sbx_…:/path), the other a local path"
            );
            exit::BAD_INPUT
        }
        (None, Some((id, path))) => {
            let name = std::path::Path::new(source)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            // `ID:/dir/` takes the source's name, as cp does.
            let path = match (path.ends_with('/'), name) {
                (true, Some(name)) if source != "-" => format!("{path}{name}"),
                _ => path.to_string(),
            };
            let sent = if source == "-" {
                client.upload(id, &path, io::stdin())
            } else {
                match std::fs::File::open(source) {
                    Ok(file) => client.upload(id, &path, file),
                    Err(e) => {
                        eprintln!("error: cannot read {source}: {e}");
                        return exit::BAD_INPUT;
                    }
                }
            };
            match sent {
                Ok(n) => {
                    eprintln!("Copied {} to {id}:{path}", upstream_doc::format_size(n));
                    exit::OK
                }
                Err(e) => failed(&e),
            }
        }
        (Some((id, path)), None) => {
            if target == "-" {
                return match client.download(id, path, &mut io::stdout().lock()) {
                    Ok(_) => exit::OK,
                    Err(e) => failed(&e),
                };
            }
            let mut local = std::path::PathBuf::from(target);
            if local.is_dir() {
                let name = path.rsplit('/').next().unwrap_or(path);
                local = local.join(name);
            }
            // Written aside and renamed: a failed copy leaves no half file.
            let temp = local.with_extension("upstream-partial");
            let result = std::fs::File::create(&temp)
                .map_err(ClientError::Io)
                .and_then(|mut file| {
                    let n = client.download(id, path, &mut file)?;
                    file.sync_all()?;
                    Ok(n)
                })
                .and_then(|n| {
                    std::fs::rename(&temp, &local)?;
                    Ok(n)
                });
            match result {
                Ok(n) => {
                    eprintln!(
                        "Copied {id}:{path} to {} ({})",
                        local.display(),
                        upstream_doc::format_size(n)
                    );
                    exit::OK
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&temp);
                    failed(&e)
                }
            }
        }
    }
}

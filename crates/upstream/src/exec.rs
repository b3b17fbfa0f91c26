//! `upstream exec`: one command in a fresh sandbox, its output streamed, its exit code passed on.

use std::io::Write;

use upstream_sandbox::{
    ExecRequest, ExitStatus, Limits, NetworkMode, SandboxError, SandboxSpec, Stream,
};

use crate::cli::ExecArgs;

/// `upstream exec` could not run the command (as `docker run` answers 125).
const EXEC_FAILED: u8 = 125;
/// The command ran past `--timeout` (as `timeout(1)` answers).
const TIMED_OUT: u8 = 124;

pub fn exec(args: ExecArgs) -> u8 {
    // From the cache when it has the image; pulled otherwise.
    let source = crate::run::image_source(&[], false);
    let prepared = match upstream_turn::image::prepare(
        &args.image,
        Some(&source),
        &mut upstream_image::NoProgress,
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return EXEC_FAILED;
        }
    };
    let image = prepared.image.clone();
    let backend = match crate::backends::open_here() {
        Ok(b) => b,
        Err(e) => return failed(&e),
    };
    let spec = SandboxSpec {
        image,
        limits: Limits {
            memory: args.memory,
            cpus: args.cpus,
            pids: Some(Limits::DEFAULT_PIDS),
            // An in-memory root is bounded by memory; one on disk (`--disk`) by a disk of its
            // own of the default size.
            disk: None,
        },
        network: match args.network {
            upstream_doc::Network::None => NetworkMode::None,
            upstream_doc::Network::Host => NetworkMode::Host,
        },
        scratch_in_memory: !args.disk,
        isolation: upstream_turn::isolation(args.isolation),
        ..SandboxSpec::default()
    };
    if let Err(e) = backend.make_root(&spec, &mut |what| eprintln!("{what} ...")) {
        return failed(&e);
    }
    let mut sandbox = match backend.create(&spec) {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    for warning in &sandbox.info().unenforced {
        eprintln!("warning: {warning}");
    }
    crate::interrupt::stop_on_signal(sandbox.interrupter());
    // The image's user, when the sandbox has its ids (a rootless one maps only its root).
    let (user, warning) = prepared.user_in(sandbox.info().ids);
    if let Some(warning) = warning {
        eprintln!("warning: {warning}");
    }
    // Later settings win: the image's over the defaults, `--env` over the image's.
    let mut env = prepared.env(user.as_ref());
    env.extend(args.env);
    let cwd = args.workdir.unwrap_or_else(|| prepared.workdir());
    let stdin = match (!args.no_stdin).then(piped_stdin).unwrap_or(Ok(Vec::new())) {
        Ok(data) => data,
        Err(message) => {
            eprintln!("error: {message}");
            eprintln!(
                "hint: let the command fetch its data itself (with --network host), or give it \
                 to a turn as an artifact of its context"
            );
            return EXEC_FAILED;
        }
    };
    let request = ExecRequest {
        argv: args.command,
        stdin,
        env: env.into_iter().collect(),
        cwd,
        timeout_ms: args.timeout.map(|t| t.as_millis().max(1) as u64),
        files: Vec::new(),
        collect: None,
        user: user.map(|u| (u.uid, u.gid)),
        ..Default::default()
    };
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let outcome = sandbox.exec(&request, &mut |stream, data| {
        // A reader that went away (`| head`) is not an error.
        let _ = match stream {
            Stream::Stdout => stdout.write_all(data).and_then(|()| stdout.flush()),
            Stream::Stderr => stderr.write_all(data),
        };
    });
    let code = match outcome {
        Ok(o) if o.timed_out => {
            eprintln!("upstream: the command ran past --timeout and was killed");
            TIMED_OUT
        }
        Ok(o) => {
            if o.out_of_memory && !o.status.success() {
                eprintln!(
                    "upstream: the command ran out of memory (limit {})",
                    args.memory.map_or("none".into(), upstream_doc::format_size)
                );
            }
            match o.status {
                ExitStatus::Code(c) => c.clamp(0, 255) as u8,
                ExitStatus::Signal(s) => (128 + s).clamp(0, 255) as u8,
            }
        }
        Err(SandboxError::Interrupted) => crate::exit::INTERRUPTED,
        Err(SandboxError::Agent(upstream_sandbox::ClientError::Refused(why))) => {
            eprintln!("upstream: {why}");
            127
        }
        Err(e) => return failed(&e),
    };
    if let Err(e) = sandbox.destroy() {
        eprintln!("warning: {e}");
    }
    code
}

/// The most `upstream exec` passes on from its standard input: it goes to the sandbox in the
/// request, one frame of the agent's protocol (at most 16 MiB), with room left for the rest.
const MAX_STDIN: u64 = 15 << 20;

/// What a pipe or file on upstream's standard input holds, read to its end, for the command
/// (as `docker run -i` passes it on); nothing from a terminal or anything else, which the
/// command then sees as empty (`/dev/null`).
fn piped_stdin() -> Result<Vec<u8>, String> {
    use std::io::Read;
    let Ok(st) = nix::sys::stat::fstat(std::io::stdin()) else {
        return Ok(Vec::new());
    };
    let kind = nix::sys::stat::SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT);
    if kind != nix::sys::stat::SFlag::S_IFIFO && kind != nix::sys::stat::SFlag::S_IFREG {
        return Ok(Vec::new());
    }
    let mut data = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_STDIN + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read standard input: {e}"))?;
    if data.len() as u64 > MAX_STDIN {
        return Err(format!(
            "standard input holds more than {}, the most `upstream exec` gives a command",
            upstream_doc::format_size(MAX_STDIN)
        ));
    }
    Ok(data)
}

fn failed(e: &SandboxError) -> u8 {
    crate::run::sandbox_failed(e);
    EXEC_FAILED
}

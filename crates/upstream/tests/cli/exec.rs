//! `upstream exec` and `upstream doctor`.

use crate::util::{Env, code, stderr, stdout};

#[test]
fn exec_streams_output_and_passes_the_exit_code() {
    crate::require_sandbox!();
    let env = Env::new();
    let out = env.upstream(&[
        "exec",
        "-e",
        "X=42",
        "--",
        "sh",
        "-c",
        "echo out $X; echo err >&2; exit 7",
    ]);
    assert_eq!(code(&out), 7);
    assert_eq!(stdout(&out), "out 42\n");
    assert_eq!(stderr(&out), "err\n");
}

#[test]
fn exec_timeout_answers_124() {
    crate::require_sandbox!();
    let env = Env::new();
    let out = env.upstream(&["exec", "--timeout", "300ms", "--", "sleep", "20"]);
    assert_eq!(code(&out), 124, "{}", stderr(&out));
}

#[test]
fn exec_of_a_missing_program_answers_127() {
    crate::require_sandbox!();
    let env = Env::new();
    let out = env.upstream(&["exec", "--", "no-such-program"]);
    assert_eq!(code(&out), 127);
    assert!(stderr(&out).contains("not found"));
}

#[test]
fn doctor_reports_each_facility() {
    let env = Env::new();
    let out = env.upstream(&["doctor"]);
    let text = stdout(&out);
    for name in [
        "user namespaces",
        "overlayfs",
        "cgroups",
        "seccomp",
        "runtime directory",
        "kvm",
        "vmms",
        "sandbox",
    ] {
        assert!(
            text.lines()
                .any(|l| l.get(4..).is_some_and(|rest| rest.starts_with(name))),
            "doctor names {name}:\n{text}"
        );
    }
    // As root, the id ranges it names are the ones sandboxes get.
    if crate::util::is_root() {
        assert!(text.contains("a host id range of its own"), "{text}");
    }
    let runtime = text
        .lines()
        .find(|l| {
            l.get(4..)
                .is_some_and(|r| r.starts_with("runtime directory"))
        })
        .unwrap();
    assert!(runtime.contains(env.runtime.to_str().unwrap()), "{runtime}");
    let sandbox_ok = text.lines().any(|l| l.starts_with("ok  sandbox"));
    assert_eq!(sandbox_ok, crate::util::sandboxes_available(), "{text}");
    assert_eq!(code(&out), if sandbox_ok { 0 } else { 3 });
}

#[test]
fn ctrl_c_stops_exec_and_its_sandbox() {
    use std::io::{BufRead, BufReader};
    crate::require_sandbox!();
    let env = Env::new();
    let marker = format!("8{}.5", std::process::id());
    let script = format!("echo started; sleep {marker} & sleep {marker}");
    let mut child = env
        .command()
        .args(["exec", "--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "started");
    if !crate::util::wait_for_processes(&marker, 2, 10) {
        let _ = child.kill();
        panic!("the command never started");
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    env.assert_gone(&marker);
}

#[test]
fn a_sandbox_that_cannot_be_set_up_says_why_and_what_to_do() {
    // overlayfs refuses an upper layer on overlayfs, as in a runtime directory inside a
    // container, and an overlayfs cannot be idmapped: make one and point upstream at it.
    crate::require_root_sandbox!();
    let env = Env::new();
    for dir in ["l", "u", "w", "m"] {
        std::fs::create_dir(env.path(dir)).unwrap();
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        env.path("l").display(),
        env.path("u").display(),
        env.path("w").display()
    );
    let merged = env.path("m");
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .unwrap();
    let doc = env.write("doc.md", "```bash\ntrue\n```\n");
    let runtime = merged.join("runtime");
    let exec = env
        .command()
        .env("UPSTREAM_RUNTIME_DIR", &runtime)
        .args(["exec", "--disk", "--", "true"])
        .output()
        .unwrap();
    let run = env
        .command()
        .env("UPSTREAM_RUNTIME_DIR", &runtime)
        .args(["run", "doc.md"])
        .output()
        .unwrap();
    let _ = nix::mount::umount(&merged);
    for (out, expected) in [(&exec, 125), (&run, 3)] {
        let err = stderr(out);
        assert_eq!(code(out), expected, "{err}");
        // As root the sandbox directory is idmapped before the overlay is mounted.
        assert!(
            err.contains("cannot set up the sandbox: cannot make an idmapped mount of ")
                && err.contains("its filesystem does not support them"),
            "{err}"
        );
        assert!(
            err.contains("hint: ") && err.contains("UPSTREAM_RUNTIME_DIR"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(doc).unwrap(),
        "```bash\ntrue\n```\n"
    );
}

#[test]
fn exec_writes_go_to_memory_within_the_memory_limit() {
    crate::require_sandbox!();
    let env = Env::new();
    let out = env.upstream(&[
        "exec",
        "--memory",
        "64M",
        "--",
        "sh",
        "-c",
        "head -c 32M /dev/zero > /workspace/fits && echo fits; head -c 100M /dev/zero > /workspace/big || echo refused",
    ]);
    let text = stdout(&out);
    assert!(text.contains("fits"), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("refused"),
        "a layer in memory holds no more than the limit allows: {text}"
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // Nothing of it reached the host's runtime directory.
    let mut pending = vec![env.runtime.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                assert!(
                    meta.len() < 1 << 20,
                    "{} is on the host",
                    entry.path().display()
                );
            }
        }
    }
    // With --disk the same write lands in the sandbox's directory on disk and fits.
    let out = env.upstream(&[
        "exec",
        "--disk",
        "--",
        "sh",
        "-c",
        "head -c 100M /dev/zero > /workspace/big && echo written",
    ]);
    assert!(stdout(&out).contains("written"), "{}", stderr(&out));
}

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
    let sandbox_ok = text.lines().any(|l| l.starts_with("ok  sandbox"));
    assert_eq!(sandbox_ok, crate::util::sandboxes_available(), "{text}");
    assert_eq!(code(&out), if sandbox_ok { 0 } else { 3 });
}

//! Timeouts: a command past its time is killed, and its scope says what goes with it.

use std::time::{Duration, Instant};

use upstream_sandbox::{ExitStatus, Scope};

use crate::harness::{Bench, check, exec, sh};

pub fn a_command_past_its_timeout_is_killed(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    // Within its time, a command is not touched.
    let mut request = sh("sleep 0.1; echo done");
    request.timeout_ms = Some(10_000);
    let ran = exec(sandbox.as_mut(), &request).unwrap();
    assert!(!ran.outcome.timed_out);
    assert_eq!(
        (ran.outcome.status, ran.stdout().as_str()),
        (ExitStatus::Code(0), "done\n")
    );

    for scope in [Scope::Sandbox, Scope::Command] {
        let mut request = sh("echo started; sleep 600");
        request.timeout_ms = Some(300);
        request.timeout_kills = scope;
        let started = Instant::now();
        let ran = exec(sandbox.as_mut(), &request).unwrap();
        assert!(ran.outcome.timed_out, "{scope:?}: {:?}", ran.outcome);
        assert!(!ran.outcome.status.success());
        assert!(ran.outcome.duration >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(10), "{scope:?}");
        assert_eq!(ran.stdout(), "started\n", "output before the kill is kept");
        // The sandbox goes on.
        assert_eq!(check(sandbox.as_mut(), "echo next"), "next\n");
    }
}

/// `Scope::Command` kills the command's process group; `Scope::Sandbox` every process of the
/// sandbox, background commands and what left the group included.
pub fn a_sandbox_timeout_kills_everything_a_command_timeout_only_its_group(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    let background = sandbox.spawn(&sh("sleep 600"), "/tmp/o", "/tmp/e").unwrap();
    let alive = |sandbox: &mut dyn upstream_sandbox::Sandbox, pid: &str| {
        let ran = exec(sandbox, &sh(&format!("kill -0 {pid}"))).unwrap();
        ran.outcome.status.success()
    };

    // Time enough for the command to start what escapes its group, on a guest under TCG
    // too.
    let mut request = sh("setsid sleep 600 & echo $! > /tmp/escaped; sleep 600");
    request.timeout_ms = Some(2_000);
    request.timeout_kills = Scope::Command;
    assert!(exec(sandbox.as_mut(), &request).unwrap().outcome.timed_out);
    let escaped = check(sandbox.as_mut(), "cat /tmp/escaped")
        .trim()
        .to_string();
    assert_eq!(
        sandbox.wait(background, Some(Duration::ZERO)).unwrap(),
        None,
        "a command's timeout killed a background command"
    );
    assert!(
        alive(sandbox.as_mut(), &escaped),
        "its own session survives"
    );

    let mut request = sh("sleep 600");
    request.timeout_ms = Some(300);
    request.timeout_kills = Scope::Sandbox;
    assert!(exec(sandbox.as_mut(), &request).unwrap().outcome.timed_out);
    assert!(
        matches!(
            sandbox
                .wait(background, Some(Duration::from_secs(5)))
                .unwrap(),
            Some(ExitStatus::Signal(_))
        ),
        "the background command outlived a sandbox timeout"
    );
    // Killed, it may be a zombie for a moment, until the agent reaps it.
    let gone = check(
        sandbox.as_mut(),
        &format!(
            "for i in $(seq 100); do grep -qs '^State:.*[RSD]' /proc/{escaped}/status || {{ echo gone; exit; }}; sleep 0.05; done"
        ),
    );
    assert_eq!(gone, "gone\n", "a process of its own session outlived it");
}

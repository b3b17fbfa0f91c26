//! Background commands: started, waited for, signalled, and their output in files.

use std::time::{Duration, Instant};

use upstream_sandbox::ExitStatus;

use crate::harness::{Bench, check, sh};

pub fn background_commands_spawn_write_their_output_and_are_waited_for(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    let pid = sandbox
        .spawn(
            &sh("echo out; echo err >&2; sleep 0.3; echo more; exit 7"),
            "/tmp/bg/out",
            "/tmp/bg/err",
        )
        .unwrap();
    assert!(pid > 1, "pid {pid}");
    // A command in the foreground runs meanwhile.
    assert_eq!(check(sandbox.as_mut(), "echo alongside"), "alongside\n");
    assert_eq!(sandbox.wait(pid, None).unwrap(), Some(ExitStatus::Code(7)));
    assert_eq!(
        sandbox.read_file("/tmp/bg/out", 1 << 20).unwrap(),
        b"out\nmore\n"
    );
    assert_eq!(sandbox.read_file("/tmp/bg/err", 1 << 20).unwrap(), b"err\n");
    // Its end is kept: asking again answers the same.
    assert_eq!(
        sandbox.wait(pid, Some(Duration::ZERO)).unwrap(),
        Some(ExitStatus::Code(7))
    );

    // Output files are appended to.
    let again = sandbox
        .spawn(&sh("echo second"), "/tmp/bg/out", "/tmp/bg/err")
        .unwrap();
    assert_eq!(
        sandbox.wait(again, None).unwrap(),
        Some(ExitStatus::Code(0))
    );
    assert_eq!(
        sandbox.read_file("/tmp/bg/out", 1 << 20).unwrap(),
        b"out\nmore\nsecond\n"
    );

    // A pid never spawned is an error, not a wait for ever.
    assert!(sandbox.wait(999_999, Some(Duration::ZERO)).is_err());
}

pub fn a_signal_reaches_a_background_commands_process_group(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    // A shell with a child of its own: the signal reaches both.
    let pid = sandbox
        .spawn(
            &sh("sleep 600 & echo $! > /tmp/child; wait"),
            "/tmp/out",
            "/tmp/err",
        )
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        sandbox.wait(pid, Some(Duration::from_millis(300))).unwrap(),
        None,
        "still running"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "wait did not wait"
    );
    let child = check(sandbox.as_mut(), "cat /tmp/child").trim().to_string();
    check(sandbox.as_mut(), &format!("kill -0 {child}"));
    sandbox.signal(pid, libc::SIGTERM).unwrap();
    assert_eq!(
        sandbox.wait(pid, Some(Duration::from_secs(20))).unwrap(),
        Some(ExitStatus::Signal(libc::SIGTERM))
    );
    check(
        sandbox.as_mut(),
        &format!(
            "for i in $(seq 100); do kill -0 {child} 2>/dev/null || exit 0; sleep 0.05; done; exit 1"
        ),
    );
}

pub fn stop_processes_ends_every_command_and_keeps_the_sandbox(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    let first = sandbox.spawn(&sh("sleep 600"), "/tmp/o", "/tmp/e").unwrap();
    let second = sandbox
        .spawn(&sh("setsid sleep 600 & wait"), "/tmp/o", "/tmp/e")
        .unwrap();
    check(sandbox.as_mut(), "echo kept > /tmp/file");
    sandbox.stop_processes().unwrap();
    for pid in [first, second] {
        let ended = sandbox.wait(pid, Some(Duration::from_secs(5))).unwrap();
        assert!(
            matches!(ended, Some(ExitStatus::Signal(_))),
            "{pid}: {ended:?}"
        );
    }
    // Nothing but the agent is left, and the sandbox still runs commands and keeps files.
    let left = check(
        sandbox.as_mut(),
        "for p in /proc/[0-9]*; do n=${p#/proc/}; [ $n = 1 ] || [ $n = $$ ] || cat $p/comm; done 2>/dev/null",
    );
    assert!(!left.contains("sleep"), "left running: {left}");
    assert_eq!(check(sandbox.as_mut(), "cat /tmp/file"), "kept\n");
}

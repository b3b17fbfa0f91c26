//! Sessions: more ways into one sandbox, each running commands alongside the others.

use std::time::Duration;

use upstream_sandbox::ExitStatus;

use crate::harness::{Bench, check, exec_in, sh};

pub fn sessions_run_commands_alongside_the_sandbox_and_each_other(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    let mut first = sandbox.session().unwrap();
    let mut second = sandbox.session().unwrap();
    // Each waits for a file only another way in makes: run one after the other, they would
    // time out.
    let waiting = |name: &str, then: &str| {
        let mut request = sh(&format!(
            "while [ ! -e /tmp/{name} ]; do sleep 0.01; done; {then}; echo {name} seen"
        ));
        request.timeout_ms = Some(20_000);
        request
    };
    let first_request = waiting("go-first", "touch /tmp/go-second");
    let second_request = waiting("go-second", "true");
    let a = std::thread::spawn(move || {
        let ran = exec_in(first.as_mut(), &first_request).unwrap();
        (first, ran)
    });
    let b = std::thread::spawn(move || {
        let ran = exec_in(second.as_mut(), &second_request).unwrap();
        (second, ran)
    });
    std::thread::sleep(Duration::from_millis(100));
    check(sandbox.as_mut(), "touch /tmp/go-first");
    let (mut first, a) = a.join().unwrap();
    let (_second, b) = b.join().unwrap();
    assert!(!a.outcome.timed_out && !b.outcome.timed_out);
    assert_eq!(a.stdout(), "go-first seen\n");
    assert_eq!(b.stdout(), "go-second seen\n");

    // A session's timeout kills its command only: the sandbox's background commands and
    // the session itself go on.
    let background = sandbox.spawn(&sh("sleep 600"), "/tmp/o", "/tmp/e").unwrap();
    let mut request = sh("sleep 600");
    request.timeout_ms = Some(200);
    let ran = exec_in(first.as_mut(), &request).unwrap();
    assert!(ran.outcome.timed_out);
    assert_eq!(
        sandbox.wait(background, Some(Duration::ZERO)).unwrap(),
        None
    );
    let ran = exec_in(first.as_mut(), &sh("exit 4")).unwrap();
    assert_eq!(ran.outcome.status, ExitStatus::Code(4));
}

/// A sandbox holds many sessions at once, each running a command while all the others are
/// open: more than a VM boots with ports for (its QEMU adds the rest as they are taken), and
/// those of sessions that ended are taken again.
pub fn many_sessions_are_open_at_once_and_taken_again(bench: &Bench) {
    const AT_ONCE: usize = 8;
    let mut sandbox = bench.default_sandbox();
    for round in 0..2 {
        let mut sessions: Vec<_> = (0..AT_ONCE).map(|_| sandbox.session().unwrap()).collect();
        // Every command waits until all have started: none ends before each session ran one.
        let runs: Vec<_> = sessions
            .drain(..)
            .enumerate()
            .map(|(n, mut session)| {
                let mut request = sh(&format!(
                    "touch /tmp/started-{round}-{n}; \
                     while [ $(ls /tmp | grep -c '^started-{round}-') -lt {AT_ONCE} ]; do sleep 0.01; done; \
                     echo session {n}"
                ));
                request.timeout_ms = Some(60_000);
                std::thread::spawn(move || {
                    let ran = exec_in(session.as_mut(), &request).unwrap();
                    (session, ran)
                })
            })
            .collect();
        for (n, run) in runs.into_iter().enumerate() {
            let (_session, ran) = run.join().unwrap();
            assert!(
                !ran.outcome.timed_out,
                "session {n} of round {round} waited out"
            );
            assert_eq!(ran.stdout(), format!("session {n}\n"));
        }
    }
    // The sandbox's own connection still serves.
    assert_eq!(check(sandbox.as_mut(), "echo still"), "still\n");
}

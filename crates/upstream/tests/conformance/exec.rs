//! Running commands: how they end, what they get, what they print and as whom they run.

use std::time::Duration;

use upstream_sandbox::{Collect, ExitStatus, FileSpec, SandboxError, Stream};

use crate::harness::{Bench, Lack, check, command, exec, sh, skip};

pub fn exit_codes_and_signals(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    for (script, status) in [
        ("true", ExitStatus::Code(0)),
        ("exit 3", ExitStatus::Code(3)),
        ("exit 255", ExitStatus::Code(255)),
        ("kill -TERM $$", ExitStatus::Signal(libc::SIGTERM)),
        ("kill -KILL $$", ExitStatus::Signal(libc::SIGKILL)),
    ] {
        let ran = exec(sandbox.as_mut(), &sh(script)).unwrap();
        assert_eq!(ran.outcome.status, status, "`{script}`");
        assert!(
            !ran.outcome.timed_out && !ran.outcome.out_of_memory,
            "`{script}`"
        );
    }
    // A program that does not exist is no success, and the sandbox goes on.
    match exec(sandbox.as_mut(), &command(&["/no/such/program"])) {
        Ok(ran) => assert!(!ran.outcome.status.success(), "{:?}", ran.outcome),
        Err(SandboxError::Agent(_)) => {}
        Err(e) => panic!("a missing program ended the sandbox: {e}"),
    }
    assert_eq!(check(sandbox.as_mut(), "echo still here"), "still here\n");
}

pub fn stdin_environment_and_working_directory(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    // Every byte value, and more than a pipe holds at once.
    let stdin: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let mut request = command(&["cat"]);
    request.stdin = stdin.clone();
    let ran = exec(sandbox.as_mut(), &request).unwrap();
    assert!(ran.outcome.status.success());
    assert!(ran.stdout == stdin, "stdin came back altered");
    // Empty stdin is /dev/null: a reader sees its end at once.
    let ran = exec(sandbox.as_mut(), &command(&["cat"])).unwrap();
    assert!(ran.outcome.status.success() && ran.stdout.is_empty());

    // The request's environment is the whole environment.
    let mut request = command(&["env"]);
    request
        .env
        .push(("GREETING".into(), "hello world=1 'quoted'".into()));
    let ran = exec(sandbox.as_mut(), &request).unwrap();
    let mut lines: Vec<&str> = ran.stdout_str_lines();
    lines.sort_unstable();
    assert_eq!(
        lines,
        vec![
            "GREETING=hello world=1 'quoted'",
            "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        ]
    );

    // The working directory, made when missing.
    let mut request = command(&["pwd"]);
    request.cwd = "/tmp/a/new/dir".into();
    let ran = exec(sandbox.as_mut(), &request).unwrap();
    assert!(ran.outcome.status.success(), "{}", ran.stderr());
    assert_eq!(ran.stdout(), "/tmp/a/new/dir\n");
}

trait Lines {
    fn stdout_str_lines(&self) -> Vec<&str>;
}

impl Lines for crate::harness::Ran {
    fn stdout_str_lines(&self) -> Vec<&str> {
        std::str::from_utf8(&self.stdout).unwrap().lines().collect()
    }
}

pub fn a_command_runs_as_a_user_of_the_sandbox(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    let ids = sandbox.info().ids;
    if ids <= 1000 {
        skip(
            Lack::Root,
            &format!(
                "{}: the sandbox has {ids} ids, none for a user but its root",
                bench.case.name
            ),
        );
        return;
    }
    // Its root, first: what tells the user apart.
    assert_eq!(check(sandbox.as_mut(), "id -u; id -g"), "0\n0\n");
    let mut request = sh("id -u; id -g; id -G; touch here && stat -c %u:%g here");
    request.user = Some((1000, 1000));
    request.cwd = "/tmp/home".into();
    let ran = exec(sandbox.as_mut(), &request).unwrap();
    assert!(ran.outcome.status.success(), "{}", ran.stderr());
    assert_eq!(ran.stdout(), "1000\n1000\n1000\n1000:1000\n");
    // The user cannot do what only root may.
    let mut request = sh("touch /etc-of-root 2>/dev/null");
    request.user = Some((1000, 1000));
    request.cwd = "/tmp/home".into();
    let ran = exec(sandbox.as_mut(), &request).unwrap();
    assert_eq!(ran.outcome.status, ExitStatus::Code(1));
    check(sandbox.as_mut(), "touch /root-may && test -e /root-may");
}

pub fn output_streams_in_order_as_it_arrives(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    // Lines to both streams, alternating, then a burst larger than any one chunk.
    let script = "i=0; while [ $i -lt 2000 ]; do echo out-$i; echo err-$i >&2; i=$((i+1)); done; \
                  head -c 3000000 /dev/zero | tr '\\0' x";
    let ran = exec(sandbox.as_mut(), &sh(script)).unwrap();
    assert!(ran.outcome.status.success());
    let mut want_out: String = (0..2000).map(|i| format!("out-{i}\n")).collect();
    want_out.push_str(&"x".repeat(3_000_000));
    let want_err: String = (0..2000).map(|i| format!("err-{i}\n")).collect();
    assert!(
        ran.stdout() == want_out,
        "stdout out of order or incomplete"
    );
    assert_eq!(ran.stderr(), want_err);
    assert!(
        ran.chunks.iter().filter(|c| c.0 == Stream::Stdout).count() > 1,
        "3 MB came in one chunk"
    );
    assert!(ran.chunks.iter().all(|c| !c.1.is_empty()), "an empty chunk");

    // Output comes while the command runs, not at its end.
    let ran = exec(sandbox.as_mut(), &sh("echo first; sleep 1; echo second")).unwrap();
    let first = ran.chunks.first().unwrap();
    let last = ran.chunks.last().unwrap();
    assert_eq!(first.1, b"first\n");
    assert!(
        last.2.duration_since(first.2) >= Duration::from_millis(700),
        "the first line waited for the command to end"
    );
}

pub fn request_files_go_in_first_and_collect_reads_one_back(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    let mut request = sh("test -x /run/steps/one.sh && /run/steps/one.sh");
    request.files = vec![
        FileSpec {
            path: "/run/steps/one.sh".into(),
            data: b"#!/bin/sh\necho ran; echo key=value >> /run/out/file\n".to_vec(),
            mode: 0o755,
        },
        FileSpec {
            path: "/run/out/file".into(),
            data: b"first=1\n".to_vec(),
            mode: 0o666,
        },
    ];
    request.collect = Some(Collect {
        path: "/run/out/file".into(),
        limit: 1 << 20,
    });
    let ran = exec(sandbox.as_mut(), &request).unwrap();
    assert!(ran.outcome.status.success(), "{}", ran.stderr());
    assert_eq!(ran.stdout(), "ran\n");
    assert_eq!(
        ran.outcome.collected,
        Some(Ok(b"first=1\nkey=value\n".to_vec()))
    );

    // A file over the limit is not collected, and says why.
    let mut request = sh("head -c 5000 /dev/zero > /run/out/big");
    request.collect = Some(Collect {
        path: "/run/out/big".into(),
        limit: 4096,
    });
    let ran = exec(sandbox.as_mut(), &request).unwrap();
    assert!(ran.outcome.status.success());
    assert!(
        matches!(ran.outcome.collected, Some(Err(_))),
        "{:?}",
        ran.outcome.collected.map(|c| c.map(|b| b.len()))
    );
    // Nor is a FIFO in its place waited on.
    let mut request = sh("mkfifo /run/out/fifo");
    request.collect = Some(Collect {
        path: "/run/out/fifo".into(),
        limit: 4096,
    });
    let ran = exec(sandbox.as_mut(), &request).unwrap();
    assert!(matches!(ran.outcome.collected, Some(Err(_))));
}

pub fn an_interrupt_stops_a_running_command(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    assert_eq!(check(sandbox.as_mut(), "echo before"), "before\n");
    let interrupter = sandbox.interrupter();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        interrupter.interrupt();
    });
    let started = std::time::Instant::now();
    let result = exec(sandbox.as_mut(), &sh("sleep 600"));
    stopper.join().unwrap();
    assert!(
        matches!(result, Err(SandboxError::Interrupted)),
        "{:?}",
        result.map(|r| r.outcome)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // Once interrupted, nothing more runs.
    assert!(matches!(
        exec(sandbox.as_mut(), &sh("true")),
        Err(SandboxError::Interrupted)
    ));
}

/// The turn engine makes each step's `$UPSTREAM_OUTPUT` file with a request's `files`, mode
/// 0666, so that a step running as the image's user can publish outputs.
pub fn request_files_get_their_mode_and_a_user_may_write_one_made_for_all(bench: &Bench) {
    let mut sandbox = bench.default_sandbox();
    let mut request = sh("stat -c %a /run/out/outputs /run/out/script");
    request.files = vec![
        FileSpec {
            path: "/run/out/outputs".into(),
            data: Vec::new(),
            mode: 0o666,
        },
        FileSpec {
            path: "/run/out/script".into(),
            data: Vec::new(),
            mode: 0o700,
        },
    ];
    let ran = exec(sandbox.as_mut(), &request).unwrap();
    assert!(ran.outcome.status.success(), "{}", ran.stderr());
    let ids = sandbox.info().ids;
    if ids > 1000 {
        let mut request = sh("echo key=value >> /run/out/outputs");
        request.user = Some((1000, 1000));
        request.cwd = "/tmp/home".into();
        request.files = vec![FileSpec {
            path: "/run/out/outputs".into(),
            data: Vec::new(),
            mode: 0o666,
        }];
        request.collect = Some(Collect {
            path: "/run/out/outputs".into(),
            limit: 4096,
        });
        let as_user = exec(sandbox.as_mut(), &request).unwrap();
        assert!(
            as_user.outcome.status.success(),
            "user 1000 cannot write a file made for all: {}",
            as_user.stderr()
        );
        assert_eq!(as_user.outcome.collected, Some(Ok(b"key=value\n".to_vec())));
    }
    assert_eq!(ran.stdout(), "666\n700\n", "the modes asked for");
}

/// A sandbox outlives the thread that made it: what dies with upstream (a parent-death
/// signal, which the kernel ties to the *thread* that forked) must not die with one of
/// upstream's threads, such as a daemon's blocking thread let go when idle.
pub fn a_sandbox_made_on_a_thread_that_ends_keeps_running(bench: &Bench) {
    let mut sandbox = std::thread::scope(|s| {
        s.spawn(|| {
            let mut sandbox = bench.default_sandbox();
            assert_eq!(check(sandbox.as_mut(), "echo made"), "made\n");
            sandbox
        })
        .join()
        .unwrap()
    });
    // The thread is gone: a child it forked got SIGKILL as it ended.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(check(sandbox.as_mut(), "echo still here"), "still here\n");
    let ran = exec(sandbox.as_mut(), &sh("sleep 1; echo later")).unwrap();
    assert_eq!(ran.stdout(), "later\n");
}

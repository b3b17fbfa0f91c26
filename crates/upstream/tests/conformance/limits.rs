//! Limits: memory and processes are bounded, and the sandbox says when it hit one.
//!
//! Output is not bounded by backends: the engine keeps a bounded head and tail of each step
//! and a bounded log (`upstream_turn::MAX_STEP_LOG`), whatever the backend streams.

use upstream_sandbox::{Limits, SandboxError, SandboxSpec};

use crate::harness::{Bench, Lack, exec, sh, skip};

const MIB: u64 = 1 << 20;

/// Whether the sandbox enforces `what` (as its info says); skips the test if not.
fn enforced(bench: &Bench, sandbox: &dyn upstream_sandbox::Sandbox, what: &str) -> bool {
    let unenforced = &sandbox.info().unenforced;
    if unenforced.iter().any(|u| u.contains(what)) {
        skip(
            Lack::Root,
            &format!(
                "{}: {what} limits are not enforced here: {unenforced:?}",
                bench.case.name
            ),
        );
        return false;
    }
    true
}

pub fn a_command_over_the_memory_limit_is_out_of_memory(bench: &Bench) {
    let spec = SandboxSpec {
        limits: Limits {
            memory: Some(64 * MIB),
            ..SandboxSpec::default().limits
        },
        ..SandboxSpec::default()
    };
    let mut sandbox = bench.sandbox(&spec);
    if !enforced(bench, sandbox.as_ref(), "memory") {
        return;
    }
    // Well under the limit: no kill.
    let small = exec(
        sandbox.as_mut(),
        &sh("python3 -c 'b = b\"x\" * (8 << 20); print(len(b))'"),
    )
    .unwrap();
    assert!(small.outcome.status.success(), "{}", small.stderr());
    assert!(!small.outcome.out_of_memory);
    // Far over it.
    let big = exec(
        sandbox.as_mut(),
        &sh("python3 -c 'b = b\"x\" * (512 << 20); print(len(b))'"),
    );
    match big {
        Ok(ran) => {
            assert!(
                !ran.outcome.status.success(),
                "512 MiB fit in a 64 MiB sandbox"
            );
            assert!(ran.outcome.out_of_memory, "{:?}", ran.outcome);
            // The sandbox lives on.
            let after = exec(sandbox.as_mut(), &sh("echo alive")).unwrap();
            assert_eq!(after.stdout(), "alive\n");
        }
        // Where the kernel took the agent too, the backend says it was for memory.
        Err(SandboxError::OutOfMemory) => {}
        Err(e) => panic!("{e}"),
    }
}

pub fn a_fork_bomb_stays_within_the_process_limit(bench: &Bench) {
    let spec = SandboxSpec {
        limits: Limits {
            pids: Some(64),
            ..SandboxSpec::default().limits
        },
        ..SandboxSpec::default()
    };
    let mut sandbox = bench.sandbox(&spec);
    if !enforced(bench, sandbox.as_ref(), "process") {
        return;
    }
    // Forks until the kernel refuses, up to 2,000; each child waits to be killed.
    let bomb = r#"python3 -c '
import os, signal, time
children = []
for _ in range(2000):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    children.append(pid)
print(len(children))
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
'"#;
    let mut request = sh(bomb);
    request.timeout_ms = Some(60_000);
    let ran = exec(sandbox.as_mut(), &request).unwrap();
    assert!(ran.outcome.status.success(), "{}", ran.stderr());
    let forked: u64 = ran.stdout().trim().parse().unwrap();
    assert!(forked >= 8, "too few forks to tell anything: {forked}");
    assert!(forked < 64, "{forked} processes in a sandbox limited to 64");
    // With the bomb gone, the sandbox runs commands again.
    assert_eq!(
        exec(sandbox.as_mut(), &sh("echo ok")).unwrap().stdout(),
        "ok\n"
    );

    // A sandbox with the default limit forks past 64: the limit above was the one asked for.
    let mut sandbox = bench.default_sandbox();
    let ran = exec(sandbox.as_mut(), &request).unwrap();
    let forked: u64 = ran.stdout().trim().parse().unwrap();
    assert!(forked >= 200, "default limit: {forked} forks");
}

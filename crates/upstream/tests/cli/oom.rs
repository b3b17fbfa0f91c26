//! A step that runs its sandbox out of memory ends as `out of memory`; the turn goes on as
//! `continue_on_error` says and writes every result, because the kernel never picks the
//! agent. These need root: the memory limit is a cgroup, and only root can protect the agent.

use std::fs;

use crate::util::{Env, code, result_block, stderr};

/// Many small processes: the biggest process is no longer a command but, with equal scores,
/// might be the agent. 1,100 of them stay under the process cap of 1,024 per sandbox only
/// until the memory runs out; either way the step fails and the turn goes on.
const MANY_PROCESSES: &str = "for i in $(seq 1100); do sleep 300 & done; wait";

/// One process far past the limit.
const ONE_BIG: &str = "python3 -c \"x = b'x' * (300 << 20); print('survived', len(x))\"";

#[test]
fn an_out_of_memory_step_does_not_take_the_turn_with_it() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let doc = format!(
        "---\nmemory: 64M\n---\n# First\n```bash\necho first\n```\n# Many\n```bash continue_on_error\n\
         {MANY_PROCESSES}\n```\n# Big\n```bash continue_on_error\n{ONE_BIG}\n```\n# After\n\
         ```bash\necho after\n```\n"
    );
    let path = env.write("oom.md", doc);
    let out = env.upstream(&["run", "oom.md"]);
    let text = fs::read_to_string(&path).unwrap();
    let err = stderr(&out);
    assert!(
        !err.contains("agent went away") && !err.contains("agent was killed"),
        "the agent was killed:\n{err}"
    );
    // A step failed, so the turn did; but every step has its result.
    assert_eq!(code(&out), 1, "{err}\n{text}");
    assert!(result_block(&text, 1).contains("exit 0"), "{text}");
    let many = result_block(&text, 2);
    assert!(
        many.contains("**Result:**") && !many.contains("not run") && !many.contains("exit 0"),
        "the step that ran out of memory has no failed result:\n{many}"
    );
    assert!(
        result_block(&text, 3).contains("**Result:** out of memory (limit 64.0 MiB)"),
        "{text}"
    );
    assert!(
        !result_block(&text, 3).contains("survived 314572800"),
        "{text}"
    );
    let after = result_block(&text, 4);
    assert!(
        after.contains("exit 0") && after.contains("after"),
        "the step after did not run:\n{after}\n{err}"
    );
}

#[test]
fn the_agent_is_the_last_process_the_kernel_picks() {
    crate::require_root_sandbox!();
    let env = Env::new();
    // What the test above relies on, read from inside: the agent's score and the commands'.
    let doc = "---\nmemory: 64M\n---\n```bash\necho \"agent $(cat /proc/1/oom_score_adj)\"\n\
               echo \"step $(cat /proc/self/oom_score_adj)\"\n\
               (echo \"child $(cat /proc/self/oom_score_adj)\")\n\
               (echo -1000 > /proc/self/oom_score_adj) 2>/dev/null || true; echo \"lowered $(cat /proc/self/oom_score_adj)\"\n```\n";
    let path = env.write("score.md", doc);
    let out = env.upstream(&["run", "score.md"]);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let block = result_block(&text, 1);
    // Lowering a score needs CAP_SYS_RESOURCE, which a container runtime may take from root:
    // then the agent keeps upstream's own score, still below every command's.
    let agent = if has_sys_resource() { "-999" } else { "0" };
    assert!(block.contains(&format!("agent {agent}\n")), "{block}");
    assert!(block.contains("step 1000"), "{block}");
    assert!(block.contains("child 1000"), "{block}");
    // A step may lower its own score back (the kernel allows it down to the agent's); that
    // only stalls its own sandbox until its timeout. Said here so a change to it is seen.
    assert!(block.contains("lowered "), "{block}");
}

/// Whether this process may lower OOM scores (`CAP_SYS_RESOURCE` in its effective set).
fn has_sys_resource() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap();
    effective & (1 << 24) != 0
}

/// However the agent goes (here the host kills it mid-step, as the kernel would where it
/// cannot be protected), the turn records the step that was running, marks the rest not
/// run and writes every result it has.
#[test]
fn a_turn_whose_agent_goes_writes_what_it_has() {
    crate::require_sandbox!();
    let env = Env::new();
    let marker = format!("7{}", std::process::id());
    let doc = format!(
        "---\n---\n# First\n```bash\necho first\n```\n# Held\n```bash continue_on_error\n\
         sleep {marker}\n```\n# Later\n```bash\necho later\n```\n"
    );
    let path = env.write("lost.md", doc);
    let child = env
        .command()
        .args(["run", "lost.md"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let agent = crate::util::agent_above(&format!("sleep {marker}"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = fs::read_to_string(&path).unwrap();
    let err = stderr(&out);
    assert_eq!(code(&out), 1, "{err}\n{text}");
    assert!(result_block(&text, 1).contains("exit 0"), "{text}");
    let held = result_block(&text, 2);
    assert!(held.contains("agent"), "{held}\n{err}");
    assert!(result_block(&text, 3).contains("not run"), "{text}");
    env.assert_gone(&marker);
}

/// A step that lowers its own score to the agent's and then runs out of memory may cost
/// its sandbox its agent: that ends the sandbox, never the turn's record or its document.
#[test]
fn a_step_that_lowers_its_score_costs_only_its_own_sandbox() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let doc = "---\nmemory: 64M\n---\n# Low\n```bash continue_on_error\n\
               cat /proc/1/oom_score_adj > /proc/self/oom_score_adj\n\
               for i in $(seq 2000); do sleep 1000 & done; exec sleep 1000\n```\n\
               # Last\n```bash\necho last ran\n```\n";
    let path = env.write("low.md", doc);
    let out = env.upstream(&["run", "low.md"]);
    let text = fs::read_to_string(&path).unwrap();
    let err = stderr(&out);
    assert_eq!(code(&out), 1, "{err}\n{text}");
    let low = result_block(&text, 1);
    assert!(low.contains("out of memory"), "{low}\n{err}");
    // Either the kernel took a command (and the next step ran) or the agent (and it did not).
    let last = result_block(&text, 2);
    assert!(
        last.contains("last ran") || last.contains("not run"),
        "{last}\n{err}"
    );
}

/// The agent raises its own score to start a command only while nothing else runs in the
/// sandbox: a process already running could stop the child before it puts the agent's score
/// back, and keep the agent at the commands' score for the kernel to pick. A process
/// started by the first step watches the agent's score while the steps after it start
/// their commands; the control is that it read the score at all, and that the last step
/// sees it still running.
#[test]
fn the_agent_never_has_the_commands_score_while_another_process_runs() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let watcher = "( end=$((SECONDS + 30)); while (( SECONDS < end )); do \
                   read -r s < /proc/1/oom_score_adj; echo \"$s\" >> /tmp/scores.new; \
                   [[ $s == 1000 ]] && echo raised >> /tmp/raised; \
                   [[ -e /tmp/stop ]] && break; done; sort -u /tmp/scores.new > /tmp/scores ) \
                   >/dev/null 2>&1 &";
    let mut doc = format!("---\nmemory: 256M\n---\n```bash\n{watcher}\n```\n");
    for _ in 0..40 {
        doc.push_str("```bash\ntrue\n```\n");
    }
    doc.push_str(
        "```bash\ntouch /tmp/stop; sleep 0.5; echo \"raised=$(cat /tmp/raised 2>/dev/null | wc -l)\"; \
         echo \"read=$(cat /tmp/scores.new | wc -l)\"; echo \"scores=$(tr '\\n' ' ' < /tmp/scores)\"\n```\n",
    );
    let path = env.write("watch.md", doc);
    let out = env.upstream(&["run", "watch.md"]);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let block = result_block(&text, 42);
    let read: usize = block
        .lines()
        .find_map(|l| l.strip_prefix("read="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in:\n{block}"));
    assert!(read > 100, "the watcher read the agent's score: {block}");
    assert!(block.contains("raised=0\n"), "{block}");
    let agent = if has_sys_resource() { "-999" } else { "0" };
    assert!(block.contains(&format!("scores={agent} \n")), "{block}");
}

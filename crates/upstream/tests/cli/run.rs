//! `upstream run`: steps, results written back, failures, timeouts, outputs, interruptions.

use std::fs;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::util::{Env, code, result_block, stderr, stdout};

#[test]
fn quickstart_runs_and_writes_results() {
    crate::require_sandbox!();
    let env = Env::new();
    let original = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/quickstart.md"
    ))
    .unwrap();
    let path = env.write("quickstart.md", &original);
    let out = env.upstream(&["run", "quickstart.md"]);
    let err = stderr(&out);
    assert_eq!(code(&out), 0, "{err}");
    assert!(
        err.starts_with("Store: .upstream (new)\nSandbox: host image, namespaces"),
        "{err}"
    );
    assert!(err.contains("Step 1: Count files"), "{err}");
    assert!(err.contains("done (20 records"), "{err}");
    assert!(err.contains("2 steps passed in "), "{err}");
    let doc = fs::read_to_string(&path).unwrap();
    assert!(result_block(&doc, 1).contains("**Result:** exit 0"));
    assert!(result_block(&doc, 1).contains("Found 20 files"));
    assert!(result_block(&doc, 2).contains("20 files, 20 records"));
    // Everything the user wrote is still there, byte for byte, in order.
    let mut rest = doc.as_str();
    for piece in original.split("```\n") {
        let at = rest
            .find(piece)
            .unwrap_or_else(|| panic!("lost text: {piece}"));
        rest = &rest[at + piece.len()..];
    }
}

#[test]
fn running_again_replaces_results() {
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write("doc.md", "# Hello\n\n```bash\necho \"run $(cat /workspace/n 2>/dev/null || echo 1)\"\n```\n\nafter\n");
    assert_eq!(code(&env.upstream(&["run", "doc.md"])), 0);
    let first = fs::read_to_string(&path).unwrap();
    assert_eq!(code(&env.upstream(&["run", "doc.md"])), 0);
    let second = fs::read_to_string(&path).unwrap();
    assert_eq!(
        second.matches("<!-- upstream:result -->").count(),
        1,
        "{second}"
    );
    let mask = |s: &str| {
        s.split("**Result:**")
            .map(|p| p.split_once('\n').map_or("", |x| x.1))
            .collect::<Vec<_>>()
            .join("")
    };
    assert_eq!(mask(&first), mask(&second));
    assert!(
        second.ends_with("<!-- /upstream:result -->\n\nafter\n"),
        "{second}"
    );
}

#[test]
fn failing_step_stops_the_turn_unless_told_to_continue() {
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write(
        "doc.md",
        "# One\n```bash continue_on_error\necho soft; exit 4\n```\n# Two\n```bash\necho hard >&2; false\necho unreachable\n```\n# Three\n```bash\necho never\n```\n",
    );
    let out = env.upstream(&["run", "doc.md"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let doc = fs::read_to_string(&path).unwrap();
    assert!(result_block(&doc, 1).contains("exit 4"));
    let two = result_block(&doc, 2);
    assert!(
        two.contains("exit 1") && two.contains("hard") && !two.contains("unreachable"),
        "{two}"
    );
    assert!(result_block(&doc, 3).contains("**Result:** not run"));
    assert!(
        stderr(&out).contains("\n  | hard\n"),
        "the failure's output is shown: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("Step 2 failed: exit 1"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn step_timeout_kills_the_whole_process_tree() {
    crate::require_sandbox!();
    let env = Env::new();
    let marker = format!("3{}.25", std::process::id());
    let path = env.write(
        "doc.md",
        format!("---\nstep_timeout: 1s\n---\n# Slow\n```bash\n(sleep {marker}; echo child) &\nsetsid sleep {marker} &\nsleep {marker}\n```\n# Next\n```bash\ntrue\n```\n"),
    );
    let start = Instant::now();
    let out = env.upstream(&["run", "doc.md"]);
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let doc = fs::read_to_string(&path).unwrap();
    assert!(
        result_block(&doc, 1).contains("**Result:** timed out after 1s"),
        "{doc}"
    );
    assert!(result_block(&doc, 2).contains("not run"));
    assert!(
        crate::util::processes_with(&marker).is_empty(),
        "{:?}",
        crate::util::processes_with(&marker)
    );
}

#[test]
fn turn_timeout_bounds_all_steps() {
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write(
        "doc.md",
        // Step A leaves most of the turn's time to the sandbox's setup on a busy machine.
        "---\ntimeout: 4s\n---\n# A\n```bash\nsleep 1\n```\n# B\n```bash\nsleep 30\n```\n",
    );
    let start = Instant::now();
    let out = env.upstream(&["run", "doc.md"]);
    assert!(start.elapsed() < Duration::from_secs(15));
    let doc = fs::read_to_string(&path).unwrap();
    assert_eq!(code(&out), 1, "{}\n{doc}", stderr(&out));
    assert!(result_block(&doc, 1).contains("exit 0"), "{doc}");
    assert!(result_block(&doc, 2).contains("timed out"), "{doc}");
}

#[test]
fn json_record_has_every_step() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write(
        "doc.md",
        "---\nenv:\n  GREETING: hello\n---\n# Greet\n```bash\necho \"$GREETING from $PWD\"; echo oops >&2\necho 'count=3' >> \"$UPSTREAM_OUTPUT\"\n```\n# Py\n```python\nimport sys; print(sys.version_info[0]); sys.exit(2)\n```\n# Skipped\n```sh\ntrue\n```\n",
    );
    let out = env.upstream(&["run", "--json", "doc.md"]);
    assert_eq!(code(&out), 1);
    let record: serde_json::Value =
        serde_json::from_str(stdout(&out).trim()).expect("one JSON line");
    assert_eq!(record["status"], "failed");
    let steps = record["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[0]["title"], "Greet");
    assert_eq!(steps[0]["status"], "passed");
    assert_eq!(steps[0]["exit_code"], 0);
    assert_eq!(steps[0]["stdout"], "hello from /workspace\n");
    assert_eq!(steps[0]["stderr"], "oops\n");
    assert_eq!(steps[0]["outputs"]["count"], "3");
    assert!(steps[0]["duration_ms"].is_u64());
    assert_eq!(steps[1]["language"], "python");
    assert_eq!(steps[1]["exit_code"], 2);
    assert_eq!(steps[1]["stdout"], "3\n");
    assert_eq!(steps[2]["status"], "not_run");
    assert_eq!(record["sandbox"]["image"], "host");
}

#[test]
fn steps_share_the_sandbox_filesystem_but_not_processes() {
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write(
        "doc.md",
        "---\nworkdir: /data/work\n---\n```bash\necho kept > note; echo $$ > /tmp/pid\n```\n```bash\ncat note; pwd; test \"$(cat /tmp/pid)\" != \"$$\" && echo fresh\n```\n",
    );
    let out = env.upstream(&["run", "doc.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let two = result_block(&fs::read_to_string(path).unwrap(), 2);
    assert!(two.contains("kept\n/data/work\nfresh"), "{two}");
}

#[test]
fn secrets_are_redacted_everywhere() {
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write(
        "doc.md",
        "---\nsecrets: [UPSTREAM_TEST_TOKEN]\n---\n```bash\necho \"token=$UPSTREAM_TEST_TOKEN\"; echo \"$UPSTREAM_TEST_TOKEN\" >&2\necho \"leak=$UPSTREAM_TEST_TOKEN\" >> $UPSTREAM_OUTPUT\n```\n",
    );
    let out = env
        .command()
        .args(["run", "--json", "-v", "doc.md"])
        .env("UPSTREAM_TEST_TOKEN", "s3cr3t-value")
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = fs::read_to_string(path).unwrap();
    for (what, text) in [
        ("document", doc.clone()),
        ("json", stdout(&out)),
        ("progress", stderr(&out)),
    ] {
        assert!(
            !text.contains("s3cr3t-value"),
            "{what} leaks the secret:\n{text}"
        );
    }
    assert!(doc.contains("token=***"), "{doc}");
    // Nothing in the store holds it: not the logs, not the records.
    let mut files = 0;
    let mut pending = vec![env.path(".upstream")];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            files += 1;
            let bytes = fs::read(&path).unwrap();
            let leaked = bytes.windows(12).any(|w| w == b"s3cr3t-value");
            assert!(!leaked, "{} leaks the secret", path.display());
        }
    }
    assert!(
        files >= 3,
        "the store holds the document, the log and the records"
    );
    let log = env.upstream(&["show", "1", "--step", "1"]);
    assert!(stdout(&log).contains("token=***"), "{}", stdout(&log));
    assert!(stderr(&log).contains("***"), "{}", stderr(&log));
}

#[test]
fn long_output_is_cut_in_the_document_and_kept_whole_in_the_log() {
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write("doc.md", "```bash\nseq 1 100000\n```\n");
    let out = env.upstream(&["run", "doc.md"]);
    assert_eq!(code(&out), 0);
    let block = result_block(&fs::read_to_string(path).unwrap(), 1);
    assert!(
        block.contains("\n1\n2\n") && block.contains("\n100000\n"),
        "head and tail kept"
    );
    let notice = block
        .lines()
        .find(|l| l.contains("not shown"))
        .expect("a line says output was cut");
    assert!(notice.contains("99800 lines"), "{notice}");
    let command = notice
        .split("the whole output: ")
        .nth(1)
        .unwrap()
        .trim_end_matches(" …]");
    assert_eq!(command, "upstream show 1 --step 1");
    let args: Vec<&str> = command.split(' ').skip(1).collect();
    let whole = env.upstream(&args);
    assert_eq!(code(&whole), 0, "{}", stderr(&whole));
    assert_eq!(stdout(&whole).lines().count(), 100000);
    assert!(block.lines().count() < 220);
}

#[test]
fn document_edited_during_the_turn_is_not_overwritten() {
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write("doc.md", "```bash\necho ready; sleep 2; echo done\n```\n");
    let mut child = env
        .command()
        .args(["run", "-v", "doc.md"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line == "ready" {
            break;
        }
    }
    let edited = "```bash\necho ready; sleep 2; echo done\n```\n\nA note written while it ran.\n";
    fs::write(&path, edited).unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    let err = format!("{seen}{}", rest.join("\n"));
    assert_eq!(status.code(), Some(0), "{err}");
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        edited,
        "the edit survives"
    );
    assert!(err.contains("changed while the turn ran"), "{err}");
    assert!(
        err.contains("hint: the document with this turn's results: `upstream show 1 --document`"),
        "{err}"
    );
    let saved = env.upstream(&["show", "1", "--document"]);
    assert!(stdout(&saved).contains("ready\ndone"), "{}", stdout(&saved));
}

#[test]
fn ctrl_c_tears_the_sandbox_down_and_leaves_the_document_alone() {
    crate::require_sandbox!();
    let env = Env::new();
    let marker = format!("4{}.5", std::process::id());
    let text = format!(
        "# Long\n```bash\necho started\nsleep {marker} &\nsleep {marker}\n```\n# After\n```bash\ntrue\n```\n"
    );
    let path = env.write("doc.md", &text);
    let mut child = env
        .command()
        .args(["run", "-v", "doc.md"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap() == "started" {
            break;
        }
    }
    if !crate::util::wait_for_processes(&marker, 2, 10) {
        let _ = child.kill();
        panic!("the step never started");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains("Interrupted") && l.contains("not modified")),
        "{rest:?}"
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), text);
    crate::util::wait_for_processes(&marker, 0, 5);
    assert!(
        crate::util::processes_with(&marker).is_empty(),
        "sandbox processes remain"
    );
    assert!(
        env.leftover_sandboxes().is_empty(),
        "{:?}",
        env.leftover_sandboxes()
    );
    assert!(crate::util::cgroups_of(child.id()).is_empty());
}

#[test]
fn progress_is_plain_lines_without_a_terminal() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write("doc.md", "# Only\n```bash\necho hi\n```\n");
    let out = env.upstream(&["run", "doc.md"]);
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert_eq!(lines[0], "Store: .upstream (new)", "{err}");
    assert!(
        lines[2].starts_with("Step 1: Only ....") && lines[2].contains(" done ("),
        "{err}"
    );
    assert!(!err.contains('\x1b'), "no escape codes: {err:?}");
    assert!(lines[3].ends_with("results written to doc.md"), "{err}");
}

#[test]
fn several_documents_run_in_order() {
    crate::require_sandbox!();
    let env = Env::new();
    let a = env.write("a.md", "```bash\necho a\n```\n");
    let b = env.write("b.md", "```bash\nexit 3\n```\n");
    let out = env.upstream(&["run", "--json", "a.md", "b.md"]);
    assert_eq!(code(&out), 1);
    assert_eq!(stdout(&out).lines().count(), 2);
    assert!(fs::read_to_string(a).unwrap().contains("exit 0"));
    assert!(fs::read_to_string(b).unwrap().contains("exit 3"));
}

#[test]
fn oci_image_is_refused_without_touching_the_document() {
    crate::require_sandbox!();
    let env = Env::new();
    let text = "---\nimage: python:3.12\n---\n```bash\ntrue\n```\n";
    let path = env.write("doc.md", text);
    let out = env.upstream(&["run", "doc.md"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("python:3.12"));
    assert_eq!(fs::read_to_string(path).unwrap(), text);
}

#[test]
fn killing_upstream_kills_its_sandbox_and_the_next_run_cleans_up() {
    crate::require_sandbox!();
    let env = Env::new();
    let marker = format!("6{}.25", std::process::id());
    let text = format!("```bash\nsleep {marker} &\nsetsid sleep {marker}\n```\n");
    let path = env.write("doc.md", &text);
    let mut child = env
        .command()
        .args(["run", "doc.md"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    if !crate::util::wait_for_processes(&marker, 2, 10) {
        let _ = child.kill();
        panic!("the step never started");
    }
    assert_eq!(
        crate::util::processes_with(&marker).len(),
        2,
        "the step is running"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    crate::util::wait_for_processes(&marker, 0, 5);
    assert!(
        crate::util::processes_with(&marker).is_empty(),
        "the sandbox died with upstream"
    );
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        text,
        "the document is untouched"
    );
    assert_eq!(
        env.leftover_sandboxes().len(),
        1,
        "a killed upstream cannot clean up"
    );
    assert_eq!(code(&env.upstream(&["exec", "--", "true"])), 0);
    assert!(
        env.leftover_sandboxes().is_empty(),
        "the next run removed it: {:?}",
        env.leftover_sandboxes()
    );
}

#[test]
fn a_crash_of_upstream_still_tears_the_sandbox_down() {
    crate::require_sandbox!();
    let env = Env::new();
    let marker = format!("7{}.25", std::process::id());
    let text = format!("```bash\nsleep {marker} &\necho started\nsleep {marker}\n```\n");
    let path = env.write("doc.md", &text);
    let out = env
        .command()
        .args(["run", "doc.md"])
        .env("UPSTREAM_FAILPOINT", "panic-on-output")
        .output()
        .unwrap();
    assert_eq!(code(&out), 101, "a panic: {}", stderr(&out));
    assert!(stderr(&out).contains("panicked"), "{}", stderr(&out));
    env.assert_gone(&marker);
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        text,
        "the document is untouched"
    );
}

#[test]
fn a_reexecuted_init_makes_the_same_sandbox() {
    // A multi-threaded upstream re-executes itself as the init instead of cloning; force it.
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write(
        "doc.md",
        "---\nmemory: 128M\n---\n```bash\ncat /proc/1/cmdline | tr '\\0' ' '; echo\nid -u\nmount -t tmpfs none /mnt 2>/dev/null && echo MOUNTED || echo refused\nls /proc | grep -c '^[0-9]'\n```\n",
    );
    let out = env
        .command()
        .args(["run", "doc.md"])
        .env("UPSTREAM_INIT", "exec")
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let block = result_block(&fs::read_to_string(&path).unwrap(), 1);
    assert!(
        block.contains("__sandbox-init"),
        "pid 1 is the re-executed init: {block}"
    );
    assert!(block.contains("\n0\nrefused\n"), "{block}");
    assert!(env.leftover_sandboxes().is_empty());
}

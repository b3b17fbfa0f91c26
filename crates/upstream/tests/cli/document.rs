//! The user's side of a turn: turns of one context that start at once, what a sandbox's text
//! may do to the terminal, the document as the user's file, and the small things a first hour
//! trips over.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::util::{Env, code, stderr, stdout};

/// A turn that appends `line` to the context's `log.txt` after a pause long enough for the
/// other turn to start meanwhile.
fn appending(line: &str, pause: &str) -> String {
    format!(
        "---\ncontext: race\nartifacts: [log.txt]\n---\n```bash\ncat log.txt 2>/dev/null || true\nsleep {pause}\necho {line} >> log.txt\n```\n"
    )
}

/// Waits until a turn holds the lock of `context` in the test's store.
fn wait_for_holder(env: &Env, context: &str) -> upstream_store::LockHolder {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(store) = upstream_store::Store::open(&env.path(".upstream")) {
            if let Ok(Some(holder)) = store.context_holder(context) {
                if holder.turn.is_some() {
                    return holder;
                }
            }
        }
        assert!(Instant::now() < deadline, "no turn of {context} started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_turns_of_one_context_at_once_run_one_after_the_other_and_keep_both_artifacts() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write("first.md", appending("first", "4"));
    env.write("second.md", appending("second", "0"));
    let first = env
        .command()
        .args(["run", "first.md"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let holder = wait_for_holder(&env, "race");
    assert_eq!(holder.pid, Some(first.id()));
    let second = env.upstream(&["run", "second.md"]);
    let first = first.wait_with_output().unwrap();
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    let err = stderr(&second);
    assert_eq!(code(&second), 0, "{err}");
    assert!(
        err.contains(&format!(
            "Waiting for turn {} of context race (pid {}) to finish",
            holder.turn.unwrap(),
            holder.pid.unwrap()
        )),
        "the second turn says it waited: {err}"
    );
    // The second turn started from the first's artifact, and the chain has both lines.
    assert!(
        err.contains("Context loaded: 1 artifact from previous turns (race, turn 1)"),
        "{err}"
    );
    let out = env.upstream(&["artifacts", "get", "log.txt", "--context", "race"]);
    assert_eq!(stdout(&out), "first\nsecond\n", "{}", stderr(&out));
    // What the second turn's step read is the first turn's line.
    let doc = fs::read_to_string(env.path("second.md")).unwrap();
    assert!(
        crate::util::result_block(&doc, 1).contains("first"),
        "{doc}"
    );
}

#[test]
fn a_turn_waiting_for_its_context_stops_at_ctrl_c_and_records_nothing() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write("first.md", appending("first", "3"));
    env.write("second.md", appending("second", "0"));
    let first = env
        .command()
        .args(["run", "first.md"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_holder(&env, "race");
    // Nor is the context removed from under the running turn.
    let out = env.upstream(&["context", "rm", "race"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("error: a turn of context `race` is running; try again when it has finished"),
        "{}",
        stderr(&out)
    );
    let mut second = env
        .command()
        .args(["run", "second.md"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once it says it waits, Ctrl-C.
    let mut err = second.stderr.take().unwrap();
    let mut said = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&said).contains("Waiting for turn") {
        let n = err.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "ended without waiting: {}",
            String::from_utf8_lossy(&said)
        );
        said.extend_from_slice(&buf[..n]);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let started = Instant::now();
    let status = second.wait().unwrap();
    err.read_to_end(&mut said).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "it went on waiting"
    );
    assert_eq!(
        status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&said)
    );
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success());
    // Only the first turn is recorded, and the second document is as it was.
    let log = env.upstream(&["log", "--json"]);
    let turns: serde_json::Value = serde_json::from_slice(&log.stdout).unwrap();
    assert_eq!(turns.as_array().map(Vec::len), Some(1), "{turns}");
    assert_eq!(
        fs::read_to_string(env.path("second.md")).unwrap(),
        appending("second", "0")
    );
}

/// A step whose summary, output and artifact names steer a terminal: a window title (OSC),
/// a clear screen and cursor home (CSI), a bell and a right-to-left override.
const HOSTILE: &str = r#"---
context: hostile
artifacts: ["*"]
---
## Hostile

```bash
printf 'summary=\033]0;owned\007\033[2J\033[Hdone\342\200\256gnp.txt\n' >> $UPSTREAM_OUTPUT
printf 'note=\033[31mred\033[0m\n' >> $UPSTREAM_OUTPUT
printf 'out \033]0;title\007 \033[2J \342\200\256 \233 end\n'
printf 'x' > "$(printf 'name\033[2J\342\200\256txt.exe')"
ln -sfn "$(printf '\033]0;t\007')" link
rm -f "$(printf 'fifo\033[2J')"; mkfifo "$(printf 'fifo\033[2J')"
exit 0
```
"#;

fn has_escape(text: &[u8]) -> bool {
    text.iter().any(|&b| b == 0x1b || b == 0x07)
        || String::from_utf8_lossy(text)
            .chars()
            .any(|c| ('\u{80}'..='\u{9f}').contains(&c) || ('\u{202a}'..='\u{202e}').contains(&c))
}

#[test]
fn a_sandboxs_terminal_escapes_never_reach_the_terminal() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write("hostile.md", HOSTILE);
    for verbose in [false, true] {
        let args: &[&str] = if verbose {
            &["run", "-v", "hostile.md"]
        } else {
            &["run", "hostile.md"]
        };
        env.write("hostile.md", HOSTILE);
        let out = env.upstream(args);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(!has_escape(&out.stderr), "run {args:?}: {:?}", stderr(&out));
        // It is shown, escaped.
        assert!(
            stderr(&out).contains("done (\\x1b]0;owned\\x07\\x1b[2J\\x1b[Hdone\\u{202e}gnp.txt,"),
            "{}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("warning: artifact fifo\\x1b[2J was not saved"),
            "{}",
            stderr(&out)
        );
        if verbose {
            assert!(
                stderr(&out).contains("out \\x1b]0;title\\x07 \\x1b[2J \\u{202e} \\x9b end"),
                "{}",
                stderr(&out)
            );
        }
    }
    for args in [
        &["log"][..],
        &["show", "1"],
        &["artifacts"],
        &["artifacts", "--turn", "1"],
        &["context", "ls"],
    ] {
        let out = env.upstream(args);
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
        assert!(
            !has_escape(&out.stdout) && !has_escape(&out.stderr),
            "{args:?}: {:?}",
            stdout(&out)
        );
    }
    let out = env.upstream(&["artifacts"]);
    assert!(
        stdout(&out).contains("name\\x1b[2J\\u{202e}txt.exe"),
        "{}",
        stdout(&out)
    );
    let out = env.upstream(&["show", "1"]);
    assert!(
        stdout(&out).contains("output note=\\x1b[31mred\\x1b[0m"),
        "{}",
        stdout(&out)
    );
    // The store has the bytes as printed: `show --step` to a pipe passes them on as they
    // are, for what reads them; to a terminal they are escaped.
    let out = env.upstream(&["show", "1", "--step", "1"]);
    assert!(
        stdout(&out).contains("out \x1b]0;title\x07 \x1b[2J \u{202e} "),
        "{:?}",
        stdout(&out)
    );
    let shown = on_a_terminal(&env, &["show", "1", "--step", "1"]);
    assert!(!has_escape(&shown), "{:?}", String::from_utf8_lossy(&shown));
    assert!(
        String::from_utf8_lossy(&shown).contains("out \\x1b]0;title\\x07 \\x1b[2J \\u{202e} "),
        "{:?}",
        String::from_utf8_lossy(&shown)
    );
    let shown = on_a_terminal(&env, &["show", "1", "--document"]);
    assert!(!has_escape(&shown), "{:?}", String::from_utf8_lossy(&shown));
}

/// What `upstream args` prints with a terminal (a pseudo-terminal) for stdout and stderr.
fn on_a_terminal(env: &Env, args: &[&str]) -> Vec<u8> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the integers given; no name, settings or
    // window size are passed (null pointers are allowed for each).
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just made by openpty and are owned here alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = env
        .command()
        .args(args)
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let mut master = fs::File::from(master);
    let mut shown = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => shown.extend_from_slice(&buf[..n]),
            // The terminal's other end closed: everything was read.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => panic!("reading the terminal: {e}"),
        }
    }
    assert!(child.wait().unwrap().success(), "{shown:?}");
    shown
}

#[test]
fn piped_stdin_reaches_the_command_of_exec() {
    crate::require_sandbox!();
    let env = Env::new();
    let mut child = env
        .command()
        .args(["exec", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hi\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "hi\n");
    // Unless told not to: a pipe that never ends is then not read at all.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    let out = env
        .command()
        .args(["exec", "--no-stdin", "--", "cat"])
        .stdin(Stdio::from(reader))
        .output()
        .unwrap();
    drop(writer);
    assert_eq!(
        (code(&out), stdout(&out).as_str()),
        (0, ""),
        "{}",
        stderr(&out)
    );
    // Without anything on stdin, the command reads nothing and is not left waiting.
    let out = env.upstream(&["exec", "--", "cat"]);
    assert_eq!((code(&out), stdout(&out).as_str()), (0, ""));
    // A file on stdin too; one past what a request carries is refused before anything runs.
    let big = env.write("big", vec![b'x'; 16 << 20]);
    let out = env
        .command()
        .args(["exec", "--", "wc", "-c"])
        .stdin(fs::File::open(&big).unwrap())
        .output()
        .unwrap();
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("standard input holds more than 15.0 MiB"),
        "{}",
        stderr(&out)
    );
    let small = env.write("small", vec![b'x'; 1 << 20]);
    let out = env
        .command()
        .args(["exec", "--", "wc", "-c"])
        .stdin(fs::File::open(&small).unwrap())
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "1048576", "{}", stderr(&out));
}

#[test]
fn the_document_stays_the_users_file() {
    crate::require_sandbox!();
    let env = Env::new();
    let doc = "```bash\necho hello\n```\n";
    // Through a symlink to its target; the link stays a link.
    env.write("real/doc.md", doc);
    std::os::unix::fs::symlink("real/doc.md", env.path("link.md")).unwrap();
    let out = env.upstream(&["run", "link.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        fs::symlink_metadata(env.path("link.md"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(
        fs::read_to_string(env.path("real/doc.md"))
            .unwrap()
            .contains("hello\n```\n<!-- /upstream:result -->")
    );
    // Its owner and mode stay (as root: a document of another user's).
    let path = env.write("owned.md", doc);
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let owner = if crate::util::is_root() {
        std::os::unix::fs::chown(&path, Some(4321), Some(8765)).unwrap();
        (4321, 8765)
    } else {
        let m = fs::metadata(&path).unwrap();
        (m.uid(), m.gid())
    };
    let out = env.upstream(&["run", "owned.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (owner.0, owner.1, 0o640)
    );
    assert!(
        fs::read_to_string(&path)
            .unwrap()
            .contains("**Result:** exit 0")
    );
    // A hard link is broken, and said so; the other name keeps the document whole.
    let path = env.write("linked.md", doc);
    fs::hard_link(&path, env.path("other-name.md")).unwrap();
    let out = env.upstream(&["run", "linked.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "warning: linked.md had another hard link: it keeps the document as it was before this turn, and linked.md is a file of its own now"
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read_to_string(env.path("other-name.md")).unwrap(), doc);
    assert!(
        fs::read_to_string(&path)
            .unwrap()
            .contains("**Result:** exit 0")
    );
}

#[test]
fn a_turn_that_did_not_pass_says_its_artifacts_are_not_handed_on() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write(
        "failing.md",
        "---\ncontext: c\nartifacts: [out.txt]\n---\n```bash continue_on_error\necho made > out.txt\nexit 3\n```\n",
    );
    let out = env.upstream(&["run", "failing.md"]);
    let err = stderr(&out);
    assert_eq!(code(&out), 1, "{err}");
    assert!(
        err.contains(
            "Context: 1 artifact recorded, not handed on: the turn did not pass (c, turn 1)"
        ),
        "{err}"
    );
    assert!(!err.contains("1 artifact saved"), "{err}");
    // Indeed: the next turn gets nothing; the failed turn's artifact is in its record.
    env.write(
        "next.md",
        "---\ncontext: c\n---\n```bash\ntest ! -e out.txt\n```\n",
    );
    let out = env.upstream(&["run", "next.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!stderr(&out).contains("Context loaded"), "{}", stderr(&out));
    let out = env.upstream(&["artifacts", "get", "out.txt", "--turn", "1"]);
    assert_eq!(stdout(&out), "made\n", "{}", stderr(&out));
    // A passed turn's are.
    env.write(
        "passing.md",
        "---\ncontext: c\nartifacts: [out.txt]\n---\n```bash\necho made > out.txt\n```\n",
    );
    let out = env.upstream(&["run", "passing.md"]);
    assert!(
        stderr(&out).contains("Context: 1 artifact saved (c, turn 3)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn commands_that_read_the_store_say_where_they_looked_and_what_they_found() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write(
        "examples/quick.md",
        "---\ncontext: quick\n---\n```bash\necho hi\n```\n",
    );
    // A turn run from examples/ makes its store there.
    let out = env
        .command()
        .env_remove("UPSTREAM_STORE")
        .args(["run", "examples/quick.md"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(env.path("examples/.upstream/store.db").is_file());
    let out = env
        .command()
        .env_remove("UPSTREAM_STORE")
        .args(["log"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    let here = fs::canonicalize(env.dir.path()).unwrap();
    assert!(
        err.contains(&format!(
            "error: no store in {} or any directory above it",
            here.display()
        )) || err.contains(&format!(
            "error: no store in {} or any directory above it",
            env.dir.path().display()
        )),
        "{err}"
    );
    assert!(
        err.contains("hint: stores below here: examples/.upstream; e.g. `upstream log --store examples/.upstream`"),
        "{err}"
    );
    // The store named, and its turn found.
    let out = env.upstream(&["log", "--store", "examples/.upstream"]);
    assert!(stdout(&out).contains("examples/quick.md") || stdout(&out).contains("quick.md"));
    // An explicit store that is not there is named as such.
    let out = env.upstream(&["log", "--store", "nowhere"]);
    assert!(
        stderr(&out).contains("error: no store at nowhere (named by --store)"),
        "{}",
        stderr(&out)
    );

    // `artifacts get` names the context it looked in.
    let out = env.upstream(&[
        "artifacts",
        "--store",
        "examples/.upstream",
        "get",
        "missing.txt",
    ]);
    assert!(
        stderr(&out).contains(
            "error: no artifact missing.txt among the artifacts of context quick, as its next turn gets them"
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_turn_id_prefix_of_several_turns_is_ambiguous_and_lists_them() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write("a.md", "```bash\ntrue\n```\n");
    for _ in 0..2 {
        assert_eq!(code(&env.upstream(&["run", "a.md"])), 0);
    }
    let log: serde_json::Value =
        serde_json::from_slice(&env.upstream(&["log", "--json"]).stdout).unwrap();
    let ids: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    // Ids made a moment apart start alike (they begin with the time).
    let common = ids[0]
        .chars()
        .zip(ids[1].chars())
        .take_while(|(a, b)| a == b)
        .count();
    assert!(common >= 4, "{ids:?}");
    let prefix = &ids[0][..common];
    let out = env.upstream(&["show", prefix]);
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(
        err.contains(&format!(
            "error: `{prefix}` is the start of more than one turn's id: turn 1 ({}), turn 2 ({})",
            ids[0], ids[1]
        )),
        "{err}"
    );
    assert!(err.contains("hint: give more of the id"), "{err}");
    let out = env.upstream(&["show", &ids[1][..common + 1]]);
    assert!(stdout(&out).starts_with("Turn 2 ("), "{}", stdout(&out));
}

#[test]
fn a_damaged_result_block_is_an_error_at_its_place_and_the_document_is_left_alone() {
    crate::require_sandbox!();
    let env = Env::new();
    let damaged = "```bash\necho hi\n```\n\n**Result:** exit 0 (0.01s)\n\n```text\nhi\n```\n<!-- /upstream:result -->\n";
    env.write("damaged.md", damaged);
    let out = env.upstream(&["run", "damaged.md"]);
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(
        err.contains(
            "damaged.md:10:1: this `<!-- /upstream:result -->` marker closes no result block"
        ),
        "{err}"
    );
    assert_eq!(fs::read_to_string(env.path("damaged.md")).unwrap(), damaged);
}

/// Waits until a turn holds the lock of `context` in the daemon's store of `tenant`.
fn wait_for_daemon_holder(daemon: &crate::serve::Daemon, tenant: &str, context: &str) {
    let store = daemon.state.join("tenants").join(tenant);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = upstream_store::Store::open(&store) {
            if s.context_holder(context)
                .ok()
                .flatten()
                .is_some_and(|h| h.turn.is_some())
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no turn of {context} started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn turns_of_one_context_through_the_daemon_wait_for_one_another_and_a_gone_client_stops_waiting() {
    crate::require_sandbox!();
    let env = Env::new();
    let daemon = crate::serve::Daemon::start(&env, &[]);
    let key = daemon.key("alice", "alice");
    let api = daemon.client(&key);
    let first = {
        let api = daemon.client(&key);
        std::thread::spawn(move || {
            api.post(
                "/v1/turns",
                serde_json::json!({ "document": appending("first", "3"), "name": "first.md" }),
            )
        })
    };
    wait_for_daemon_holder(&daemon, "alice", "race");
    // A client that gives up while its turn waits: the wait ends with it, no turn runs.
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap()
        .post(format!("{}/v1/turns", daemon.url))
        .bearer_auth(&key)
        .json(&serde_json::json!({ "document": appending("gone", "0"), "name": "gone.md" }))
        .send();
    assert!(impatient.is_err(), "answered while the first turn ran");
    // A streamed turn says it waits, then starts from what the first left.
    let response = api
        .request(reqwest::Method::POST, "/v1/turns")
        .header("Accept", "application/x-ndjson")
        .json(&serde_json::json!({ "document": appending("second", "0"), "name": "second.md" }))
        .send()
        .unwrap();
    let lines: Vec<serde_json::Value> = response
        .text()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (status, body) = first.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        lines[0],
        serde_json::json!({ "event": "waiting", "context": "race", "turn": 1 }),
        "{lines:?}"
    );
    let result = &lines.last().unwrap()["result"];
    assert_eq!(result["turn"]["status"], "passed", "{lines:?}");
    assert!(
        crate::util::result_block(result["document"].as_str().unwrap(), 1).contains("first"),
        "{result}"
    );
    // The turn whose client went away never ran: the chain is the first and the second.
    let (_, turns) = api.get("/v1/turns?context=race");
    let documents: Vec<&str> = turns["turns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["document"].as_str().unwrap())
        .collect();
    assert!(
        documents.len() == 2
            && documents[0].ends_with("first.md")
            && documents[1].ends_with("second.md"),
        "{turns}"
    );
}

/// The lock is the kernel's: a turn killed outright (kill -9) lets go of it, and the next
/// turn of the context neither waits nor starts from the killed one.
#[test]
fn a_turn_killed_outright_leaves_its_context_free() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write("first.md", appending("first", "60"));
    env.write("second.md", appending("second", "0"));
    let mut first = env
        .command()
        .args(["run", "first.md"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_holder(&env, "race");
    first.kill().unwrap();
    first.wait().unwrap();
    let started = Instant::now();
    let out = env.upstream(&["run", "second.md"]);
    let err = stderr(&out);
    assert_eq!(code(&out), 0, "{err}");
    assert!(!err.contains("Waiting"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "{err}");
    let log = env.upstream(&["log", "--json"]);
    let turns: serde_json::Value = serde_json::from_slice(&log.stdout).unwrap();
    assert_eq!(turns[0]["status"], "interrupted", "{turns}");
    assert_eq!(turns[1]["status"], "passed", "{turns}");
}

/// Two `--resume` of one failed turn at once: the first resumes it; the second waits for it
/// and then finds nothing left to resume, instead of running on the same kept workspace.
#[test]
fn two_resumes_at_once_resume_once() {
    crate::require_sandbox!();
    let env = Env::new();
    let failing =
        "---\ncontext: fix\n---\n```bash\necho one > a.txt\n```\n\n```bash\nexit 1\n```\n";
    let path = env.write("fix.md", failing);
    assert_eq!(code(&env.upstream(&["run", "fix.md"])), 1);
    let failed = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        failed.replace("```bash\nexit 1\n```", "```bash\nsleep 3; cat a.txt\n```"),
    )
    .unwrap();
    let first = env
        .command()
        .args(["run", "--resume", "fix.md"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_holder(&env, "fix");
    let second = env.upstream(&["run", "--resume", "fix.md"]);
    let first = first.wait_with_output().unwrap();
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    assert!(
        stderr(&first).contains("Resuming turn 1 at step 2"),
        "{}",
        stderr(&first)
    );
    let err = stderr(&second);
    assert_eq!(code(&second), 2, "{err}");
    assert!(err.contains("Waiting for turn 2 of context fix"), "{err}");
    assert!(
        err.contains("nothing to resume: its last turn (2) passed"),
        "{err}"
    );
    assert!(
        crate::util::result_block(&fs::read_to_string(&path).unwrap(), 2).contains("one"),
        "the first resume's results are in the document"
    );
}

/// An output's value goes into the document as a step's output does: escape sequences
/// removed whole (no ` ]0;PWNED2  [2J` left behind), a bidi override shown escaped; an
/// output key that is not a name (one holding ESC) is refused with a warning and the step's
/// message, not kept. Control: a plain output shows as written.
#[test]
fn output_values_and_keys_cannot_steer_a_terminal_or_leave_debris() {
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write(
        "outs.md",
        "```bash\nprintf 'v=\\033]0;PWNED2\\007\\033[2Jx\\342\\200\\256y\\n' >> $UPSTREAM_OUTPUT\n\
         printf 'k\\033[31m=red\\n' >> $UPSTREAM_OUTPUT\n\
         echo plain=hello >> $UPSTREAM_OUTPUT\n```\n",
    );
    let out = env.upstream(&["run", "outs.md"]);
    let err = stderr(&out);
    assert_eq!(code(&out), 0, "{err}");
    let doc = fs::read_to_string(&path).unwrap();
    let line = doc
        .lines()
        .find(|l| l.starts_with("**Outputs:**"))
        .unwrap_or_else(|| panic!("{doc}"));
    assert_eq!(
        line, "**Outputs:** `plain` = `hello` · `v` = `x\\u{202e}y`",
        "{doc}"
    );
    assert!(
        !doc.contains('\u{1b}') && !doc.contains('\u{202e}'),
        "{doc}"
    );
    assert!(
        err.contains("warning: step 1: output key `k\\x1b[31m` not kept"),
        "{err}"
    );
    assert!(!err.contains('\u{1b}'), "{err}");
    let show = stdout(&env.upstream(&["show", "1", "--json"]));
    assert!(
        show.contains("output key `k\\\\x1b[31m` not kept"),
        "{show}"
    );
    assert!(!show.contains("\"k\\u001b[31m\""), "{show}");
}

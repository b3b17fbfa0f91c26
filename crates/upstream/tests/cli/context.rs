//! Contexts: turns that start where the last one ended, and the commands that read the store.

use std::fs;

use crate::util::{Env, code, result_block, stderr, stdout};

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(out)))
}

const RESEARCH: &str = r#"---
context: research-pipeline
artifacts:
  - results/
  - notes.md
  - "*.csv"
---
## Search papers

```bash
mkdir -p results/deep
for i in 1 2 3; do echo "paper $i" > results/paper-$i.txt; done
echo deep > results/deep/file
ln -s paper-1.txt results/latest
printf 'a,b\n1,2\n' > table.csv
chmod 0750 results/deep
chmod 0600 results/paper-3.txt
echo "summary=14 results" >> $UPSTREAM_OUTPUT
echo "paper_count=3" >> $UPSTREAM_OUTPUT
```

## Summarize findings

```python
import os
assert os.environ["UPSTREAM_CTX_PAPER_COUNT"] == "3", "an earlier step's output"
open("notes.md", "w").write("notes\n")
```
"#;

const ANALYSIS: &str = r#"---
context: research-pipeline
artifacts: [report.md, results/]
---
## Cross-reference

```bash
set -x
test "$(cat results/paper-2.txt)" = "paper 2"
test "$(cat results/deep/file)" = deep
test "$(readlink results/latest)" = paper-1.txt
test "$(stat -c %a results/deep)" = 750
test "$(stat -c %a results/paper-3.txt)" = 600
test "$(cat notes.md)" = notes
test -f table.csv
test "$UPSTREAM_CTX_PAPER_COUNT" = 3
test "$UPSTREAM_CTX_SUMMARY" = "14 results"
python3 -c '
import json
h = json.load(open("/context/turns.json"))
assert h["context"] == "research-pipeline", h
[t] = h["turns"]
assert t["number"] == 1 and t["status"] == "passed" and t["document"] == "research.md", t
assert t["steps"][0]["outputs"]["paper_count"] == "3", t
paths = {a["path"]: a for a in t["artifacts"]}
assert paths["notes.md"]["size"] == 6 and len(paths["notes.md"]["blake3"]) == 64, paths
'
rm results/paper-2.txt
echo "report" > report.md
```
"#;

#[test]
fn a_turn_starts_where_the_last_one_of_its_context_ended() {
    crate::util::each_files_way(|| {
        crate::require_sandbox!();
        let env = Env::new();
        env.write("research.md", RESEARCH);
        env.write("analysis.md", ANALYSIS);
        let out = env.upstream(&["run", "research.md"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("Context: 9 artifacts saved (research-pipeline, turn 1)"),
            "{err}"
        );

        let out = env.upstream(&["run", "analysis.md"]);
        let err = stderr(&out);
        assert_eq!(
            code(&out),
            0,
            "{err}\n{}",
            result_block(&fs::read_to_string(env.path("analysis.md")).unwrap(), 1)
        );
        assert!(
            err.contains(
                "Context loaded: 9 artifacts, 2 outputs from previous turns (research-pipeline, turn 1)"
            ),
            "{err}"
        );
        assert!(
            err.contains("Context: 7 artifacts saved, 1 deleted (research-pipeline, turn 2)"),
            "{err}"
        );

        // The third turn gets the latest of each, without what the second deleted.
        env.write(
            "check.md",
            "---\ncontext: research-pipeline\n---\n```bash\ntest ! -e results/paper-2.txt\ncat report.md notes.md results/paper-1.txt\n```\n",
        );
        let out = env.upstream(&["run", "check.md"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let block = result_block(&fs::read_to_string(env.path("check.md")).unwrap(), 1);
        assert!(block.contains("report\nnotes\npaper 1"), "{block}");

        // Another context starts empty.
        env.write(
            "other.md",
            "---\ncontext: other\n---\n```bash\ntest ! -e notes.md && test -z \"$UPSTREAM_CTX_PAPER_COUNT\"\npython3 -c 'import json; assert json.load(open(\"/context/turns.json\"))[\"turns\"] == []'\n```\n",
        );
        let out = env.upstream(&["run", "other.md"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(!stderr(&out).contains("Context loaded"), "{}", stderr(&out));
    });
}

#[test]
fn log_show_artifacts_and_contexts_read_the_store() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write("research.md", RESEARCH);
    assert_eq!(code(&env.upstream(&["run", "research.md"])), 0);
    env.write(
        "fail.md",
        "---\ncontext: scratch\n---\n# Fails\n```bash\necho out; echo err >&2; exit 3\n```\n",
    );
    assert_eq!(code(&env.upstream(&["run", "fail.md"])), 1);

    let log = env.upstream(&["log"]);
    assert_eq!(code(&log), 0, "{}", stderr(&log));
    let text = stdout(&log);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("TURN  STARTED"), "{text}");
    assert!(
        lines[1].contains("research-pipeline  research.md  passed"),
        "{text}"
    );
    assert!(lines[1].contains("2/2"), "{text}");
    assert!(
        lines[2].contains("scratch") && lines[2].contains("failed"),
        "{text}"
    );
    let columns: Vec<usize> = lines
        .iter()
        .map(|l| l.find("STATUS").unwrap_or(0))
        .collect();
    assert!(columns[0] > 0);

    let log = json(&env.upstream(&["log", "--context", "scratch", "--json"]));
    assert_eq!(log.as_array().unwrap().len(), 1);
    assert_eq!(log[0]["number"], 2);
    assert_eq!(log[0]["status"], "failed");

    let show = env.upstream(&["show", "2"]);
    assert!(stdout(&show).contains("Fails"), "{}", stdout(&show));
    let step = env.upstream(&["show", "2", "--step", "1"]);
    assert_eq!(stdout(&step), "out\n");
    assert_eq!(stderr(&step), "err\n");
    let step = json(&env.upstream(&["show", "2", "--step", "1", "--json"]));
    assert_eq!(step["exit_code"], 3);
    assert_eq!(step["stdout"], "out\n");
    let turn = json(&env.upstream(&["show", "1", "--json"]));
    assert_eq!(turn["steps"][0]["outputs"]["paper_count"], "3");
    assert_eq!(turn["artifact_list"].as_array().unwrap().len(), 9);
    let missing = env.upstream(&["show", "99"]);
    assert_eq!(code(&missing), 1);
    assert!(
        stderr(&missing).contains("no turn 99"),
        "{}",
        stderr(&missing)
    );

    let list = env.upstream(&["artifacts", "--context", "research-pipeline"]);
    assert!(
        stdout(&list).contains("results/latest"),
        "{}",
        stdout(&list)
    );
    assert!(
        stdout(&list).contains("-> paper-1.txt"),
        "{}",
        stdout(&list)
    );
    let list = json(&env.upstream(&["artifacts", "--turn", "1", "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 9);
    let got = env.upstream(&[
        "artifacts",
        "get",
        "notes.md",
        "--context",
        "research-pipeline",
    ]);
    assert_eq!(stdout(&got), "notes\n");
    let out = env.upstream(&[
        "artifacts",
        "get",
        "results/paper-3.txt",
        "--turn",
        "1",
        "-o",
        "copy.txt",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        fs::read_to_string(env.path("copy.txt")).unwrap(),
        "paper 3\n"
    );
    let dir = env.upstream(&["artifacts", "get", "results", "--turn", "1"]);
    assert_eq!(code(&dir), 1);
    assert!(stderr(&dir).contains("is a dir"), "{}", stderr(&dir));

    let contexts = stdout(&env.upstream(&["context", "ls"]));
    assert!(contexts.contains("research-pipeline"), "{contexts}");
    assert!(contexts.contains("scratch"), "{contexts}");
    let kept = || fs::read_dir(env.runtime.join("kept")).map_or(0, |d| d.count());
    assert_eq!(kept(), 1, "the failed turn kept its workspace");
    let out = env.upstream(&["context", "rm", "scratch"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(kept(), 0, "removing its context removes what it kept");
    let contexts = json(&env.upstream(&["context", "ls", "--json"]));
    assert_eq!(contexts.as_array().unwrap().len(), 1);

    // The removed turn's log is now unreferenced: gc takes it, and nothing referenced.
    let gc = json(&env.upstream(&["gc", "--json"]));
    assert!(gc["removed"].as_u64().unwrap() >= 1, "{gc}");
    let got = env.upstream(&["artifacts", "get", "notes.md"]);
    assert_eq!(stdout(&got), "notes\n", "{}", stderr(&got));
}

#[test]
fn artifacts_never_follow_links_out_of_the_workspace() {
    crate::util::each_files_way(|| {
        crate::require_sandbox!();
        let env = Env::new();
        env.write(
            "escape.md",
            "---\nartifacts: [leak, escape/etc/hostname, up]\n---\n```bash\nln -s /etc/hostname leak\nln -s / escape\nln -s .. up\n```\n",
        );
        let out = env.upstream(&["run", "escape.md"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let list = json(&env.upstream(&["artifacts", "--json"]));
        let list = list.as_array().unwrap();
        assert_eq!(
            list.len(),
            2,
            "the two links, nothing through them: {list:?}"
        );
        assert!(
            list.iter()
                .all(|a| a["kind"] == "symlink" && a["blob"].is_null())
        );
        // Restored, they are links again, pointing where they did inside the sandbox.
        env.write(
            "next.md",
            "```bash\ntest \"$(readlink leak)\" = /etc/hostname\ntest \"$(readlink up)\" = ..\n```\n",
        );
        let out = env.upstream(&["run", "next.md"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    });
}

#[test]
fn a_failed_turn_keeps_its_artifacts_but_does_not_pass_them_on() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write(
        "one.md",
        "---\nartifacts: [state]\n---\n```bash\necho good > state\n```\n",
    );
    assert_eq!(code(&env.upstream(&["run", "one.md"])), 0);
    env.write(
        "two.md",
        "---\nartifacts: [state]\n---\n```bash\necho broken > state\nexit 1\n```\n",
    );
    assert_eq!(code(&env.upstream(&["run", "two.md"])), 1);
    let two = json(&env.upstream(&["artifacts", "--turn", "2", "--json"]));
    assert_eq!(two[0]["path"], "state");
    env.write("three.md", "```bash\ncat state\n```\n");
    assert_eq!(code(&env.upstream(&["run", "three.md"])), 0);
    let block = result_block(&fs::read_to_string(env.path("three.md")).unwrap(), 1);
    assert!(block.contains("good"), "{block}");
}

#[test]
fn a_damaged_blob_is_reported_and_never_reaches_a_sandbox() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write(
        "one.md",
        "---\nartifacts: [data.txt]\n---\n```bash\necho precious > data.txt\n```\n",
    );
    assert_eq!(code(&env.upstream(&["run", "one.md"])), 0);
    let list = json(&env.upstream(&["artifacts", "--json"]));
    let hash = list[0]["blob"].as_str().unwrap().to_string();
    let path = env.path(&format!(".upstream/blobs/{}/{}", &hash[..2], &hash[2..]));
    let mut bytes = fs::read(&path).unwrap();
    bytes[0] ^= 0x20;
    fs::write(&path, &bytes).unwrap();

    let original = "```bash\ncat data.txt\n```\n";
    env.write("two.md", original);
    let out = env.upstream(&["run", "two.md"]);
    let err = stderr(&out);
    assert_eq!(code(&out), 3, "{err}");
    assert!(
        err.contains("corrupt") && err.contains(path.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(fs::read_to_string(env.path("two.md")).unwrap(), original);
    let get = env.upstream(&["artifacts", "get", "data.txt"]);
    assert_ne!(code(&get), 0);
    assert!(stderr(&get).contains("corrupt"), "{}", stderr(&get));
}

#[test]
fn two_runs_at_once_on_one_store_are_both_recorded() {
    crate::require_sandbox!();
    let env = Env::new();
    for name in ["a", "b"] {
        env.write(
            &format!("{name}.md"),
            format!(
                "---\ncontext: shared\nartifacts: [{name}.txt]\n---\n```bash\nfor i in $(seq 20); do echo $i >> {name}.txt; done\n```\n```bash\ntrue\n```\n"
            ),
        );
    }
    let runs: Vec<_> = (0..6)
        .map(|i| {
            let name = if i % 2 == 0 { "a.md" } else { "b.md" };
            env.command()
                .args(["run", name])
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut run in runs {
        assert!(run.wait().unwrap().success());
    }
    let log = json(&env.upstream(&["log", "--json"]));
    let turns = log.as_array().unwrap();
    assert_eq!(turns.len(), 6, "{log}");
    let mut numbers: Vec<i64> = turns
        .iter()
        .map(|t| t["number"].as_i64().unwrap())
        .collect();
    numbers.dedup();
    assert_eq!(numbers, vec![1, 2, 3, 4, 5, 6]);
    assert!(
        turns
            .iter()
            .all(|t| t["status"] == "passed" && t["steps"] == 2)
    );
}

/// A document whose turn saves many fresh files, all stamped with `iter`.
fn stamped(iter: usize) -> String {
    format!(
        "---\ncontext: crash\nartifacts: [files/, marker]\nenv:\n  ITER: \"{iter}\"\n---\n# Write\n```bash\nrm -rf files; mkdir files\nfor i in $(seq 150); do {{ echo $ITER; head -c 32768 /dev/urandom; }} > files/$i; done\necho $ITER > marker\necho iter=$ITER >> $UPSTREAM_OUTPUT\n```\n"
    )
}

const CHECK: &str = "---\ncontext: crash\n---\n```bash\nm=$(cat marker)\nfor f in files/*; do test \"$(head -n1 $f)\" = \"$m\" || { echo torn: $f; exit 1; }; done\ntest $(ls files | wc -l) = 150\necho seen=$m >> $UPSTREAM_OUTPUT\n```\n";

#[test]
fn kill_9_while_saving_artifacts_loses_nothing() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    crate::require_sandbox!();
    let env = Env::new();
    // How long the save (and the rest after the step) takes here, to spread the kills over
    // it and a little past it.
    env.write("doc.md", stamped(0));
    let mut child = env
        .command()
        .args(["run", "doc.md"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("Step 1: Write") {
            break;
        }
    }
    let step_done = Instant::now();
    lines.for_each(drop);
    assert!(child.wait().unwrap().success());
    let whole = step_done.elapsed() * 13 / 10;
    let mut last_passed = 0;
    let mut seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut random = move |below: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % below.max(1)
    };
    let mut interrupted = 0;
    for iter in 1..=50 {
        env.write("doc.md", stamped(iter));
        let mut child = env
            .command()
            .args(["run", "doc.md"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        // The step is done when its line is printed; the save follows.
        for line in lines.by_ref() {
            if line.unwrap().starts_with("Step 1: Write") {
                break;
            }
        }
        let delay = random(whole.as_micros() as u64);
        std::thread::sleep(Duration::from_micros(delay));
        let _ = child.kill();
        let status = child.wait().unwrap();
        drop(lines);

        let store = upstream_store::Store::open(&env.path(".upstream")).unwrap();
        assert!(
            store.dangling_blobs().unwrap().is_empty(),
            "iteration {iter}: a record names a missing blob"
        );
        let turn = store.turns(Some("crash"), Some(1)).unwrap().pop().unwrap();
        match turn.status {
            upstream_store::TurnState::Passed => last_passed = iter,
            upstream_store::TurnState::Interrupted => interrupted += 1,
            other => panic!("iteration {iter}: turn is {other:?} after kill ({status:?})"),
        }
        drop(store);
        let log = env.upstream(&["log", "--context", "crash", "--last", "1", "--json"]);
        assert_eq!(code(&log), 0, "iteration {iter}: {}", stderr(&log));
        let shown = json(&log)[0]["status"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(
            shown,
            turn.status.as_str(),
            "iteration {iter}: `upstream log` shows the turn as the store has it"
        );
        if iter % 10 == 0 {
            env.write("check.md", CHECK);
            let out = env.upstream(&["run", "check.md"]);
            let block = result_block(&fs::read_to_string(env.path("check.md")).unwrap(), 1);
            assert_eq!(code(&out), 0, "iteration {iter}: {}\n{block}", stderr(&out));
            let check =
                json(&env.upstream(&["log", "--context", "crash", "--last", "1", "--json"]));
            let number = check[0]["number"].to_string();
            let check = json(&env.upstream(&["show", &number, "--json"]));
            assert_eq!(
                check["steps"][0]["outputs"]["seen"],
                last_passed.to_string(),
                "iteration {iter}: the next turn sees the last complete turn's artifacts"
            );
        }
    }
    eprintln!("kill -9: {interrupted} of 50 turns killed before they finished saving");
    assert!(
        interrupted >= 5,
        "the kills should land mid-save: only {interrupted} of 50 did"
    );
}

const PIPELINE: &str = "# Pipeline\n\n## Fetch\n\n```bash\necho one > data.txt\nmkdir -p /root/tool && echo made > /root/tool/mark\necho n=1 >> $UPSTREAM_OUTPUT\n```\n\n## Transform\n\n```bash\necho two >> data.txt\necho junk > junk.txt\nexit 1\n```\n\n## Report\n\n```bash\ncat data.txt\n```\n";

const FIXED_STEP: &str = "```bash\ncat data.txt; test ! -e junk.txt\ntest \"$UPSTREAM_CTX_N\" = 1\ncat /root/tool/mark\necho two >> data.txt\n```";

fn fix(doc: &str) -> String {
    doc.replace(
        "```bash\necho two >> data.txt\necho junk > junk.txt\nexit 1\n```",
        FIXED_STEP,
    )
}

#[test]
fn resume_runs_from_the_failed_step_with_the_workspace_before_it() {
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write("pipe.md", PIPELINE);
    assert_eq!(code(&env.upstream(&["run", "pipe.md"])), 1);
    let failed = fs::read_to_string(&path).unwrap();
    let step_one = result_block(&failed, 1);

    fs::write(&path, fix(&failed)).unwrap();
    let out = env.upstream(&["run", "--resume", "pipe.md"]);
    let doc = fs::read_to_string(&path).unwrap();
    assert_eq!(code(&out), 0, "{}\n{doc}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("Resuming turn 1 at step 2"), "{err}");
    assert!(
        err.contains("Step 1: Fetch ..................... kept from turn 1"),
        "{err}"
    );
    // The failed attempt's writes are gone; what step 1 wrote, inside and outside the
    // workspace, is there.
    assert!(result_block(&doc, 2).contains("one\nmade"), "{doc}");
    assert!(result_block(&doc, 3).contains("one\ntwo"), "{doc}");
    assert_eq!(
        result_block(&doc, 1),
        step_one,
        "step 1's result is left as it was"
    );

    let log = json(&env.upstream(&["log", "--json"]));
    assert_eq!(log[1]["resumed_from"], 1);
    assert_eq!(log[1]["status"], "passed");
    let kept: Vec<_> = fs::read_dir(env.runtime.join("kept"))
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(
        kept.is_empty(),
        "a resumed turn that passed leaves nothing kept: {kept:?}"
    );

    let again = env.upstream(&["run", "--resume", "pipe.md"]);
    assert_eq!(code(&again), 2);
    assert!(
        stderr(&again).contains("nothing to resume"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        doc,
        "a refused resume touches nothing"
    );
}

#[test]
fn resume_refuses_when_an_earlier_step_changed() {
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write("pipe.md", PIPELINE);
    assert_eq!(code(&env.upstream(&["run", "pipe.md"])), 1);
    let edited = fix(&fs::read_to_string(&path).unwrap()).replace("echo one", "echo uno");
    fs::write(&path, &edited).unwrap();
    let out = env.upstream(&["run", "--resume", "pipe.md"]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("step 1 changed since turn 1"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), edited);
    // A plain run supersedes the kept workspace.
    assert_eq!(code(&env.upstream(&["run", "pipe.md"])), 0);
    let kept: Vec<_> = fs::read_dir(env.runtime.join("kept")).unwrap().collect();
    assert!(kept.is_empty(), "{kept:?}");
}

#[test]
fn a_resume_killed_midway_can_be_resumed_again() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write("pipe.md", PIPELINE);
    assert_eq!(code(&env.upstream(&["run", "pipe.md"])), 1);
    let slow = fix(&fs::read_to_string(&path).unwrap()).replace(
        "echo two >> data.txt\n```",
        "echo two >> data.txt\necho waiting; sleep 30\n```",
    );
    fs::write(&path, &slow).unwrap();
    let mut child = env
        .command()
        .args(["run", "-v", "--resume", "pipe.md"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines {
        if line.unwrap() == "waiting" {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The killed attempt wrote to data.txt; the kept workspace must not show it.
    fs::write(&path, fix(&slow.replace("echo waiting; sleep 30\n", ""))).unwrap();
    let out = env.upstream(&["run", "--resume", "pipe.md"]);
    let doc = fs::read_to_string(&path).unwrap();
    assert_eq!(code(&out), 0, "{}\n{doc}", stderr(&out));
    assert!(
        stderr(&out).contains("Resuming turn 1 at step 2"),
        "{}",
        stderr(&out)
    );
    assert!(result_block(&doc, 3).contains("one\ntwo\n"), "{doc}");
}

#[test]
fn an_unprivileged_user_saves_restores_and_resumes_too() {
    crate::util::each_files_way(|| {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;

        crate::require_root_sandbox!();
        let env = Env::new();
        let nobody = 65534;
        let work = env.path("nobody");
        fs::create_dir(&work).unwrap();
        fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&work, Some(nobody), Some(nobody)).unwrap();
        let bin = crate::util::binary_for_nobody(&env);
        let run = |args: &[&str]| {
            std::process::Command::new(&bin)
                .args(args)
                .current_dir(&work)
                .env("UPSTREAM_RUNTIME_DIR", work.join("runtime"))
                .env("UPSTREAM_STORE", work.join(".upstream"))
                .env("HOME", &work)
                .uid(nobody)
                .gid(nobody)
                .output()
                .unwrap()
        };
        let write = |name: &str, text: &str| {
            let path = work.join(name);
            fs::write(&path, text).unwrap();
            std::os::unix::fs::chown(&path, Some(nobody), Some(nobody)).unwrap();
            path
        };
        write(
            "one.md",
            "---\nartifacts: [kept.txt]\n---\n```bash\necho saved > kept.txt\n```\n",
        );
        let out = run(&["run", "one.md"]);
        if stderr(&out).contains("cannot create a user namespace") {
            crate::util::skip(
                "SKIPPED: rootless: this kernel does not allow unprivileged user namespaces".into(),
            );
            return;
        }
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let path = write(
            "two.md",
            "```bash\ncat kept.txt > seen.txt\n```\n```bash\necho more >> seen.txt; exit 1\n```\n",
        );
        let out = run(&["run", "two.md"]);
        assert_eq!(code(&out), 1, "{}", stderr(&out));
        // Rootless, the one warning is that the disk limit does not hold.
        let said = stderr(&out);
        let warnings: Vec<&str> = said
            .lines()
            .filter(|l| l.starts_with("warning") && !l.contains("disk limit (10G) is not enforced"))
            .collect();
        assert!(warnings.is_empty(), "{}", stderr(&out));
        let fixed = fs::read_to_string(&path)
            .unwrap()
            .replace("echo more >> seen.txt; exit 1", "cat seen.txt");
        write("two.md", &fixed);
        let out = run(&["run", "--resume", "two.md"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let block = result_block(&fs::read_to_string(&path).unwrap(), 2);
        assert!(block.contains("```text\nsaved\n```"), "{block}");
    });
}

/// A store under directories only root may enter (`/root/project`, `mktemp -d`): the
/// sandbox's own host uid could not read a blob there, so upstream reads blobs as itself
/// and writes into the sandbox as the sandbox's owner.
#[test]
fn a_context_in_a_private_directory_carries_its_artifacts() {
    crate::util::each_files_way(|| {
        use std::os::unix::fs::PermissionsExt;
        crate::require_root_sandbox!();
        let env = Env::new();
        let project = env.path("private/project");
        fs::create_dir_all(&project).unwrap();
        for dir in [env.path("private"), project.clone()] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        }
        let store = project.join(".upstream");
        let run = |name: &str, text: &str| {
            fs::write(project.join(name), text).unwrap();
            env.command()
                .current_dir(&project)
                .env("UPSTREAM_STORE", &store)
                .args(["run", name])
                .output()
                .unwrap()
        };
        let first = run(
            "first.md",
            "---\ncontext: private\nartifacts: [kept.txt]\n---\n```bash\necho carried > kept.txt\n\
             echo \"host uid $(awk '$1 == 0 {print $2}' /proc/self/uid_map)\"\n```\n",
        );
        assert_eq!(code(&first), 0, "{}", stderr(&first));
        // The premise: the sandbox's root is not the host's, so it could not enter the store.
        let doc = fs::read_to_string(project.join("first.md")).unwrap();
        let host_uid: u32 = result_block(&doc, 1)
            .lines()
            .find_map(|l| l.strip_prefix("host uid "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{doc}"));
        assert_ne!(host_uid, 0, "the sandbox runs as host root:\n{doc}");
        let second = run(
            "second.md",
            "---\ncontext: private\n---\n```bash\ncat kept.txt\n```\n",
        );
        let doc = fs::read_to_string(project.join("second.md")).unwrap();
        assert_eq!(code(&second), 0, "{}\n{doc}", stderr(&second));
        assert!(result_block(&doc, 1).contains("carried"), "{doc}");
    });
}

//! One history: a context's turns go to one store, whatever listens on the machine; a
//! daemon runs them only when asked, records the document as the client named it, and its
//! records read as a local store's do. A run of several documents stops where one fails,
//! and says which store it used.

use std::path::Path;

use serde_json::{Value, json};

use crate::serve::{Daemon, unix_request};
use crate::util::{Env, code, stderr, stdout};

const CHAINED: &str = "---\ncontext: chain\nartifacts: [log.txt]\n---\n# Append\n```bash\necho turn >> log.txt\nwc -l < log.txt\n```\n";

fn lines_of(env: &Env, args: &[&str]) -> String {
    let out = env.upstream(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stdout(&out)
}

fn turns(json: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(json)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Runs a turn through the daemon's local socket.
fn post_turn(daemon: &Daemon, body: Value) -> (u16, Value) {
    let (status, text) = unix_request(&daemon.socket, "POST", "/v1/turns", &body.to_string());
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

#[test]
fn a_turn_through_the_daemon_is_in_its_log_under_the_clients_path() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let doc = env.write("project/chained.md", CHAINED);
    let out = env.upstream(&["run", "--daemon", "project/chained.md"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.starts_with("Daemon: unix:"),
        "the first line says where the turn runs: {said}"
    );
    // The daemon's record names the document as the client has it, not a path of its own.
    let absolute = doc.to_str().unwrap();
    let listed = turns(&lines_of(&env, &["log", "--daemon", "--json"]));
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["document"], absolute, "{listed:?}");
    let table = lines_of(&env, &["log", "--daemon"]);
    assert!(table.contains(absolute), "{table}");
    // The local store has none of it: `log` without --daemon reads the store here.
    let local = env.upstream(&["log"]);
    assert!(!stdout(&local).contains("chained.md"), "{}", stdout(&local));
    // show, show --step, show --document and artifacts read the daemon's records too.
    let shown = lines_of(&env, &["show", "--daemon", "1"]);
    assert!(shown.contains(&format!("document  {absolute}")), "{shown}");
    assert!(shown.contains("log.txt"), "{shown}");
    let step = lines_of(&env, &["show", "--daemon", "1", "--step", "1"]);
    assert_eq!(step.trim(), "1");
    let document = lines_of(&env, &["show", "--daemon", "1", "--document"]);
    assert!(document.contains("**Result:** exit 0"), "{document}");
    let listed = lines_of(&env, &["artifacts", "--daemon"]);
    assert!(
        listed.contains("Artifacts of context chain") && listed.contains("log.txt"),
        "{listed}"
    );
    let content = lines_of(&env, &["artifacts", "--daemon", "get", "log.txt"]);
    assert_eq!(content, "turn\n");
    let saved = env.path("got.txt");
    lines_of(
        &env,
        &[
            "artifacts",
            "--daemon",
            "get",
            "log.txt",
            "-o",
            saved.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read_to_string(&saved).unwrap(), "turn\n");
    // The same through --url with a key: the key's tenant has a store of its own.
    let key = daemon.key("reader", "team");
    let by_url = env
        .command()
        .env("UPSTREAM_API_KEY", &key)
        .args(["run", "--url", &daemon.url, "project/chained.md"])
        .output()
        .unwrap();
    assert!(by_url.status.success(), "{}", stderr(&by_url));
    let team = env
        .command()
        .env("UPSTREAM_API_KEY", &key)
        .args(["log", "--url", &daemon.url, "--json"])
        .output()
        .unwrap();
    let team = turns(&stdout(&team));
    assert_eq!(team.len(), 1, "{team:?}");
    assert_eq!(team[0]["document"], absolute);
    // A turn the daemon does not have is a clear error that says where to look.
    let missing = env.upstream(&["show", "--daemon", "7"]);
    assert_eq!(code(&missing), 1, "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("upstream log --daemon"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn the_daemon_records_the_clients_path_as_a_label_and_never_opens_it() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    // A label naming a file of the daemon's host that a step must never see: the record
    // carries the name, the turn runs the document sent, nothing of the file is read.
    let document = "# Hello\n```bash\necho from-the-client\n```\n";
    let (status, body) = post_turn(
        &daemon,
        json!({ "document": document, "path": "/etc/shadow" }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["turn"]["document"], "/etc/shadow", "{body}");
    let result = body["document"].as_str().unwrap();
    assert!(result.contains("from-the-client"), "{result}");
    assert!(!result.contains("root:"), "{result}");
    // A document sent by file name only is recorded by that name, not under a directory of
    // the daemon's host (its working directory).
    let (status, body) = post_turn(&daemon, json!({ "document": document, "name": "plain.md" }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["turn"]["document"], "plain.md", "{body}");
    let (_, listed) = unix_request(&daemon.socket, "GET", "/v1/turns", "");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let names: Vec<&str> = listed["turns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["document"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["/etc/shadow", "plain.md"], "{listed}");
    // Labels a record cannot show are refused with a sentence saying what to send.
    for bad in [
        "relative/doc.md",
        "/a/../etc/passwd",
        "/a/./b.md",
        "/dir/",
        "/a\u{1b}]0;pwned\u{7}.md",
    ] {
        let (status, body) = post_turn(&daemon, json!({ "document": document, "path": bad }));
        assert_eq!(status, 400, "{bad:?}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("absolute path"), "{message}");
    }
    let long = format!("/{}", "a".repeat(5000));
    let (status, _) = post_turn(&daemon, json!({ "document": document, "path": long }));
    assert_eq!(status, 400);
}

#[test]
fn with_a_daemon_up_a_plain_run_continues_the_local_chain() {
    crate::require_root_sandbox!();
    let env = Env::new();
    env.write("chained.md", CHAINED);
    let first = env.upstream(&["run", "chained.md"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let _daemon = Daemon::start(&env, &[]);
    // A socket appearing changes nothing: the second turn continues the local chain.
    let second = env.upstream(&["run", "chained.md"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(!stderr(&second).contains("Daemon:"), "{}", stderr(&second));
    assert!(
        stderr(&second).starts_with("Store: .upstream\n"),
        "{}",
        stderr(&second)
    );
    let written = std::fs::read_to_string(env.path("chained.md")).unwrap();
    assert!(
        written.contains("\n2\n"),
        "the second turn saw the first's: {written}"
    );
    let local = turns(&lines_of(&env, &["log", "--json"]));
    assert_eq!(local.len(), 2, "{local:?}");
    // Positive control: asked to, the run goes to the daemon, whose chain is its own.
    let remote = env.upstream(&["run", "--daemon", "chained.md"]);
    assert!(remote.status.success(), "{}", stderr(&remote));
    assert!(stderr(&remote).starts_with("Daemon: unix:"));
    assert!(
        stderr(&remote).contains("note: context chain has 2 turns in the store here"),
        "{}",
        stderr(&remote)
    );
    let written = std::fs::read_to_string(env.path("chained.md")).unwrap();
    assert!(written.contains("\n1\n"), "{written}");
    assert_eq!(
        turns(&lines_of(&env, &["log", "--daemon", "--json"])).len(),
        1
    );
    assert_eq!(turns(&lines_of(&env, &["log", "--json"])).len(), 2);
}

#[test]
fn a_daemon_asked_for_that_is_not_there_is_an_error_not_a_local_run() {
    let env = Env::new();
    env.write("doc.md", "# A\n```bash\ntrue\n```\n");
    let before = std::fs::read_to_string(env.path("doc.md")).unwrap();
    for args in [
        &["run", "--daemon", "doc.md"][..],
        &["run", "--daemon", "--resume", "doc.md"][..],
        &["log", "--daemon"][..],
    ] {
        let out = env.upstream(args);
        assert_eq!(code(&out), 3, "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no daemon listens at unix:"),
            "{}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("upstream serve"), "{}", stderr(&out));
    }
    assert_eq!(std::fs::read_to_string(env.path("doc.md")).unwrap(), before);
    assert!(!env.path(".upstream").exists(), "nothing ran here");
    // A store named here and a daemon are one or the other.
    let both = env.upstream(&["run", "--daemon", "--store", ".upstream", "doc.md"]);
    assert_eq!(code(&both), 2, "{}", stderr(&both));
    assert!(stderr(&both).contains("--store"), "{}", stderr(&both));
}

#[test]
fn resume_through_the_daemon_resumes_on_the_daemon() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let _daemon = Daemon::start(&env, &[]);
    let failing =
        "# Make\n```bash\necho made > made.txt\n```\n# Use\n```bash\ntest -f fixed\n```\n";
    env.write("resume.md", failing);
    let out = env.upstream(&["run", "--daemon", "resume.md"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    // The second step changes; the first keeps what it made in the daemon's workspace.
    let text = std::fs::read_to_string(env.path("resume.md")).unwrap();
    let text = text.replace("test -f fixed", "cat made.txt");
    assert!(text.contains("cat made.txt"), "{text}");
    std::fs::write(env.path("resume.md"), &text).unwrap();
    let resumed = env.upstream(&["run", "--daemon", "--resume", "resume.md"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(
        stderr(&resumed).starts_with("Daemon: unix:"),
        "{}",
        stderr(&resumed)
    );
    let turns = turns(&lines_of(&env, &["log", "--daemon", "--json"]));
    assert_eq!(turns.len(), 2, "{turns:?}");
    assert_eq!(turns[1]["resumed_from"], 1, "{turns:?}");
    let step = lines_of(&env, &["show", "--daemon", "2", "--step", "2"]);
    assert_eq!(step, "made\n");
    // Nothing ran here: the local store was never made.
    assert!(!env.path(".upstream").exists());
    // Resuming what the daemon does not have is refused with a sentence, not run here.
    env.write("other.md", "# A\n```bash\ntrue\n```\n");
    let nothing = env.upstream(&["run", "--daemon", "--resume", "other.md"]);
    assert_eq!(code(&nothing), 2, "{}", stderr(&nothing));
    assert!(
        stderr(&nothing).contains("nothing to resume"),
        "{}",
        stderr(&nothing)
    );
}

#[test]
fn a_run_of_several_documents_stops_at_the_first_that_does_not_pass() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write("a.md", "# A\n```bash\nexit 3\n```\n");
    env.write("b.md", "# B\n```bash\necho b\n```\n");
    env.write("c.md", "# C\n```bash\necho c\n```\n");
    let out = env.upstream(&["run", "a.md", "b.md", "c.md"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains("Not run: b.md, c.md (a.md did not pass"),
        "{said}"
    );
    assert!(said.contains("--keep-going"), "{said}");
    assert!(
        !std::fs::read_to_string(env.path("b.md"))
            .unwrap()
            .contains("Result")
    );
    assert_eq!(turns(&lines_of(&env, &["log", "--json"])).len(), 1);
    // --keep-going runs the rest, and the exit code is still the failure's.
    let out = env.upstream(&["run", "--keep-going", "a.md", "b.md", "c.md"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(!stderr(&out).contains("Not run"), "{}", stderr(&out));
    assert!(
        std::fs::read_to_string(env.path("c.md"))
            .unwrap()
            .contains("**Result:** exit 0")
    );
    assert_eq!(turns(&lines_of(&env, &["log", "--json"])).len(), 4);
    // Documents that all pass all run.
    let out = env.upstream(&["run", "b.md", "c.md"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `upstream run` as a user whose home is `home`, the store found by walking up.
fn run_at_home(env: &Env, home: &Path, dir: &Path, doc: &str) -> String {
    let out = env
        .command()
        .env_remove("UPSTREAM_STORE")
        .env("HOME", home)
        .current_dir(dir)
        .args(["run", doc])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    stderr(&out)
}

#[test]
fn a_run_says_which_store_it_uses_and_warns_of_one_every_project_shares() {
    crate::require_sandbox!();
    let env = Env::new();
    let home = env.path("home");
    std::fs::create_dir_all(home.join(".upstream")).unwrap();
    let doc = "# A\n```bash\ntrue\n```\n";
    env.write("home/project/a.md", doc);
    // A store in the home directory, found from a project below it: said, and warned of.
    let said = run_at_home(&env, &home, &home.join("project"), "a.md");
    let shown = home.join(".upstream");
    assert!(
        said.starts_with(&format!("Store: {} (new)\n", shown.display())),
        "{said}"
    );
    assert!(said.contains("warning: this store is in"), "{said}");
    assert!(said.contains("every project below it shares"), "{said}");
    assert!(said.contains("mkdir"), "{said}");
    // A document in the home directory itself uses it without a warning.
    env.write("home/notes.md", doc);
    let said = run_at_home(&env, &home, &home, "notes.md");
    assert!(said.starts_with("Store: .upstream\n"), "{said}");
    assert!(!said.contains("warning"), "{said}");
    // A project with a store of its own: that one, shortened, and no warning.
    std::fs::create_dir_all(home.join("project/.upstream")).unwrap();
    let said = run_at_home(&env, &home, &home.join("project"), "a.md");
    assert!(said.starts_with("Store: .upstream (new)\n"), "{said}");
    assert!(!said.contains("warning"), "{said}");
    // A store named with --store is the user's choice: said, not warned of.
    let out = env
        .command()
        .env_remove("UPSTREAM_STORE")
        .env("HOME", &home)
        .current_dir(home.join("project"))
        .args(["run", "--store"])
        .arg(home.join(".upstream"))
        .arg("a.md")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
}

#[test]
fn a_tenant_reads_blobs_of_its_own_store_only() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let alice = daemon.client(&daemon.key("a", "alice"));
    let bob = daemon.client(&daemon.key("b", "bob"));
    let (status, ran) = alice.post(
        "/v1/turns",
        json!({
            "document": "---\nartifacts: [secret.txt]\n---\n# Make\n```bash\necho alice-only > secret.txt\n```\n",
            "path": "/home/alice/make.md",
        }),
    );
    assert_eq!(status, 200, "{ran}");
    let (_, turn) = alice.get("/v1/turns/1");
    let hash = turn["artifacts"][0]["blob"].as_str().unwrap().to_string();
    // The owner gets the content (the positive control)…
    let mine = alice
        .request(reqwest::Method::GET, &format!("/v1/blobs/{hash}"))
        .send()
        .unwrap();
    assert_eq!(mine.status().as_u16(), 200);
    assert_eq!(mine.text().unwrap(), "alice-only\n");
    // …another tenant, naming the same hash, gets nothing of it.
    let (status, body) = bob.get(&format!("/v1/blobs/{hash}"));
    assert_eq!(status, 404, "{body}");
    assert!(!body.to_string().contains("alice-only"));
    // Only a hash names a blob: nothing else reaches a file.
    for bad in [
        "..%2F..%2Fkeys%2Fstore.db",
        "store.db",
        &hash[..63],
        &format!("{hash}0"),
    ] {
        let (status, body) = alice.get(&format!("/v1/blobs/{bad}"));
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

/// A resume with no store here refuses without making one, and says the turn may have run
/// on a daemon. Control: a resume whose store is here says nothing of daemons.
#[test]
fn a_local_resume_with_no_store_makes_none_and_names_the_daemon() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write("b.md", "```bash\nfalse\n```\n");
    let out = env.upstream(&["run", "--resume", "b.md"]);
    let said = stderr(&out);
    assert_eq!(code(&out), 2, "{said}");
    assert!(
        !env.path(".upstream").exists(),
        "a refused resume made a store"
    );
    assert!(!said.contains("(new)"), "{said}");
    assert!(said.contains("nothing to resume"), "{said}");
    assert!(said.contains("--daemon (or --url URL)"), "{said}");
    // Control: the turn that did not pass is here, and resumes without a word of daemons.
    let out = env.upstream(&["run", "b.md"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let out = env.upstream(&["run", "--resume", "b.md"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(!stderr(&out).contains("--daemon"), "{}", stderr(&out));
}

/// Bad input in one document stops them all, and the run names those it did not run.
#[test]
fn bad_front_matter_names_the_documents_not_run() {
    let env = Env::new();
    env.write("bad.md", "---\nmemory: 4K\n---\n```bash\ntrue\n```\n");
    env.write("b.md", "```bash\ntrue\n```\n");
    env.write("c.md", "```bash\ntrue\n```\n");
    let out = env.upstream(&["run", "bad.md", "b.md", "c.md"]);
    let said = stderr(&out);
    assert_eq!(code(&out), 2, "{said}");
    assert!(said.contains("bad.md:2:9"), "{said}");
    assert!(said.contains("Not run: b.md, c.md"), "{said}");
    assert!(!env.path(".upstream").exists(), "{said}");
    // Control: a single bad document has no others to name.
    let out = env.upstream(&["run", "bad.md"]);
    assert!(!stderr(&out).contains("Not run"), "{}", stderr(&out));
}

/// A project moved after a turn kept its workspace, resumed before any other turn runs: the
/// store that records the kept set adopts it, and the resume starts from it.
#[test]
fn a_moved_project_resumes_from_its_kept_workspace() {
    crate::require_sandbox!();
    let env = Env::new();
    let run_in = |dir: &Path, args: &[&str]| {
        env.command()
            .current_dir(dir)
            .env("UPSTREAM_STORE", dir.join(".upstream"))
            .args(args)
            .output()
            .unwrap()
    };
    let p = env.path("p");
    std::fs::create_dir(&p).unwrap();
    let failing = "```bash\necho x > x\n```\n```bash\nfalse\n```\n";
    std::fs::write(p.join("f.md"), failing).unwrap();
    let out = run_in(&p, &["run", "f.md"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let q = env.path("q");
    std::fs::rename(&p, &q).unwrap();
    let text = std::fs::read_to_string(q.join("f.md")).unwrap();
    std::fs::write(q.join("f.md"), text.replace("false", "cat x")).unwrap();
    let out = run_in(&q, &["run", "--resume", "f.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = std::fs::read_to_string(q.join("f.md")).unwrap();
    assert!(
        crate::util::result_block(&doc, 2).contains("```text\nx\n```"),
        "{doc}"
    );
}

/// A project moved after a turn kept its workspace: a run elsewhere reclaims the set (its
/// store is gone from where it was), and the resume says what clears a kept workspace, not
/// only a reboot.
#[test]
fn a_moved_projects_resume_says_why_its_workspace_is_gone() {
    crate::require_sandbox!();
    let env = Env::new();
    let p = env.path("p");
    std::fs::create_dir(&p).unwrap();
    std::fs::write(
        p.join("f.md"),
        "```bash\necho x > x\n```\n```bash\nfalse\n```\n",
    )
    .unwrap();
    let out = env
        .command()
        .current_dir(&p)
        .env("UPSTREAM_STORE", p.join(".upstream"))
        .args(["run", "f.md"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let q = env.path("q");
    std::fs::rename(&p, &q).unwrap();
    env.write("other.md", "```bash\ntrue\n```\n");
    let out = env.upstream(&["run", "other.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = env
        .command()
        .current_dir(&q)
        .env("UPSTREAM_STORE", q.join(".upstream"))
        .args(["run", "--resume", "f.md"])
        .output()
        .unwrap();
    let said = stderr(&out);
    assert_eq!(code(&out), 2, "{said}");
    assert!(
        said.contains("is gone: a reboot clears kept workspaces, and `upstream gc` or a turn of another store clears one whose store was moved or removed; run it without --resume"),
        "{said}"
    );
}

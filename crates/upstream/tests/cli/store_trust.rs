//! The store is trusted with nothing it cannot check: a blob is checked against its name
//! before a byte of it is written anywhere, and nothing in a blob's place but a regular file
//! is read (no link followed out of the store, no FIFO waited on).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use upstream_store::log::{LogStream, LogWriter};
use upstream_store::{ArtifactKind, FinishTurn, NewArtifact, NewStep, NewTurn, Store, TurnState};

use crate::util::{Env, code, stderr, stdout};

/// A store made as `upstream run` makes one: a passed turn whose artifact `data.txt` holds
/// `content`, and whose step printed `log` to stdout. Returns the paths of the artifact's
/// and the log's blobs.
fn store_with(env: &Env, content: &[u8], log: &[u8]) -> (PathBuf, PathBuf) {
    let mut store = Store::open(&env.path(".upstream")).unwrap();
    let turn = store
        .begin_turn(&NewTurn {
            id: "0190a0a0-0000-7000-8000-000000000001",
            context: "default",
            document: "doc.md",
            source: b"```bash\ntrue\n```\n",
            started_at: 1.0,
            resumed_from: None,
        })
        .unwrap();
    let mut writer = LogWriter::new(Vec::new());
    writer.chunk(LogStream::Stdout, log).unwrap();
    let log_blob = store.blobs().put(&writer.into_inner()).unwrap();
    store
        .record_step(
            turn,
            &NewStep {
                number: 1,
                title: "Step 1".into(),
                language: "bash".into(),
                status: "passed".into(),
                exit_code: Some(0),
                stdout_bytes: log.len() as u64,
                log: Some(log_blob.clone()),
                ..NewStep::default()
            },
        )
        .unwrap();
    let blob = store.blobs().put(content).unwrap();
    store
        .finish_turn(
            turn,
            &FinishTurn {
                status: TurnState::Passed,
                finished_at: 2.0,
                duration_ms: 1000,
                sandbox: None,
                result: None,
                artifacts: vec![NewArtifact {
                    path: "data.txt".into(),
                    kind: ArtifactKind::File,
                    mode: 0o640,
                    size: content.len() as u64,
                    mtime_ns: 0,
                    blob: Some(blob.clone()),
                    target: None,
                }],
                kept: None,
                resume_step: None,
            },
        )
        .unwrap();
    (store.blobs().path(&blob), store.blobs().path(&log_blob))
}

/// Megabytes of distinct lines: a stream that checked only at its end would print most of
/// them before finding a damaged byte at the end.
fn big_content() -> Vec<u8> {
    (0..100_000)
        .flat_map(|i| format!("line {i:08}\n").into_bytes())
        .collect()
}

#[test]
fn artifacts_get_of_a_damaged_blob_prints_nothing() {
    let env = Env::new();
    let content = big_content();
    let (blob, log) = store_with(&env, &content, b"step output\n");
    // Positive control: the intact blob prints whole, and is written whole with its mode.
    let got = env.upstream(&["artifacts", "get", "data.txt"]);
    assert_eq!(code(&got), 0, "{}", stderr(&got));
    assert!(got.stdout == content, "the intact artifact prints as it is");
    let out = env.path("out.txt");
    let got = env.upstream(&["artifacts", "get", "data.txt", "-o", out.to_str().unwrap()]);
    assert_eq!(code(&got), 0, "{}", stderr(&got));
    assert_eq!(fs::read(&out).unwrap(), content);
    assert_eq!(
        fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o640
    );
    fs::remove_file(&out).unwrap();

    // The last byte flipped: only a check of the whole blob before output finds it in time.
    for path in [&blob, &log] {
        let mut bytes = fs::read(path).unwrap();
        *bytes.last_mut().unwrap() ^= 0x01;
        fs::write(path, &bytes).unwrap();
    }
    let got = env.upstream(&["artifacts", "get", "data.txt"]);
    let err = stderr(&got);
    assert_ne!(code(&got), 0, "{err}");
    assert!(got.stdout.is_empty(), "{} bytes printed", got.stdout.len());
    assert!(
        err.contains("corrupt") && err.contains(blob.to_str().unwrap()) && err.contains("hint:"),
        "{err}"
    );
    let got = env.upstream(&["artifacts", "get", "data.txt", "-o", out.to_str().unwrap()]);
    assert_ne!(code(&got), 0);
    let left: Vec<_> = fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with("out.txt"))
        .collect();
    assert!(left.is_empty(), "nothing written: {left:?}");
    // A step's log is checked before it is shown too.
    let shown = env.upstream(&["show", "1", "--step", "1"]);
    assert_ne!(code(&shown), 0);
    assert!(shown.stdout.is_empty(), "{}", stdout(&shown));
    assert!(stderr(&shown).contains("corrupt"), "{}", stderr(&shown));
}

#[test]
fn artifacts_get_never_follows_a_blob_replaced_by_a_link() {
    let env = Env::new();
    let (blob, log) = store_with(&env, b"the artifact\n", b"the log\n");
    let outside = env.write("outside", "DISTINCTIVE-CONTENT-OUTSIDE-THE-STORE\n");
    for path in [&blob, &log] {
        fs::remove_file(path).unwrap();
        std::os::unix::fs::symlink(&outside, path).unwrap();
    }
    let got = env.upstream(&["artifacts", "get", "data.txt"]);
    let err = stderr(&got);
    assert_ne!(code(&got), 0, "{err}");
    assert!(
        !String::from_utf8_lossy(&got.stdout).contains("DISTINCTIVE"),
        "the link's target was printed"
    );
    assert!(got.stdout.is_empty());
    assert!(err.contains("symbolic link"), "{err}");
    let shown = env.upstream(&["show", "1", "--step", "1"]);
    assert_ne!(code(&shown), 0);
    assert!(!stdout(&shown).contains("DISTINCTIVE"));

    // A shard directory replaced by a link is refused the same way.
    let env = Env::new();
    let (blob, _) = store_with(&env, b"the artifact\n", b"the log\n");
    let shard = blob.parent().unwrap();
    let elsewhere = env.path("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::write(
        elsewhere.join(blob.file_name().unwrap()),
        "DISTINCTIVE-CONTENT-OUTSIDE-THE-STORE\n",
    )
    .unwrap();
    fs::remove_dir_all(shard).unwrap();
    std::os::unix::fs::symlink(&elsewhere, shard).unwrap();
    let got = env.upstream(&["artifacts", "get", "data.txt"]);
    assert_ne!(code(&got), 0);
    assert!(got.stdout.is_empty(), "{}", stdout(&got));
    assert!(stderr(&got).contains("symbolic link"), "{}", stderr(&got));
}

#[test]
fn artifacts_get_refuses_a_fifo_in_a_blobs_place_at_once() {
    let env = Env::new();
    let (blob, _) = store_with(&env, b"the artifact\n", b"the log\n");
    fs::remove_file(&blob).unwrap();
    nix::unistd::mkfifo(&blob, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut child = env
        .command()
        .args(["artifacts", "get", "data.txt"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("artifacts get blocked on a FIFO");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = child.wait_with_output().unwrap();
    assert_ne!(code(&got), 0);
    assert!(got.stdout.is_empty());
    assert!(stderr(&got).contains("a FIFO"), "{}", stderr(&got));
}

/// A local user who is not the owner: a uid no account has.
const STRANGER: u32 = 54321;

/// Runs `program args` as [`STRANGER`] (no groups); returns whether it succeeded and what it
/// printed.
fn as_stranger(program: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(program)
        .args(args)
        .uid(STRANGER)
        .gid(STRANGER)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `env`'s command, run with umask 000: nothing upstream makes may depend on the umask.
fn with_umask_000(mut command: std::process::Command) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    command
}

/// Every directory and file in `dir` (itself included) that is not 0700 or 0600.
fn not_private(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut wrong = Vec::new();
    let meta = fs::symlink_metadata(dir).unwrap();
    let want = if meta.is_dir() { 0o700 } else { 0o600 };
    if meta.mode() & 0o7777 != want {
        wrong.push(format!("{} {:o}", dir.display(), meta.mode() & 0o7777));
    }
    if meta.is_dir() {
        for entry in fs::read_dir(dir).unwrap() {
            wrong.extend(not_private(&entry.unwrap().path()));
        }
    }
    wrong
}

/// What a stranger tries on a store: list it, read its database, read a blob (the
/// document's source is one).
fn assert_stranger_reads_nothing(store: &std::path::Path, blob: &std::path::Path) {
    let (ok, text) = as_stranger("ls", &[store.as_os_str()]);
    assert!(!ok, "a stranger listed the store: {text}");
    for file in [store.join("store.db"), blob.to_path_buf()] {
        let (ok, text) = as_stranger("cat", &[file.as_os_str()]);
        assert!(!ok, "a stranger read {}: {text}", file.display());
        assert!(text.contains("Permission denied"), "{text}");
    }
}

#[test]
fn a_store_made_under_umask_000_is_private_to_its_owner() {
    crate::require_root_sandbox!();
    let env = Env::new();
    // The way to the store is open, so only the store's own modes can stop a stranger.
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let doc = env.write(
        "doc.md",
        "---\nartifacts: [notes.txt]\n---\n```bash\necho TENANT-SECRET-NOTES > notes.txt\n```\n",
    );
    fs::set_permissions(&doc, fs::Permissions::from_mode(0o644)).unwrap();
    let mut run = with_umask_000(env.command());
    let out = run.args(["run", "doc.md"]).output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let store = env.path(".upstream");
    let wrong = not_private(&store);
    assert!(wrong.is_empty(), "not private: {wrong:?}");
    let listed = env.upstream(&["artifacts", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let hash = list[0]["blob"].as_str().unwrap();
    let blob = store.join(format!("blobs/{}/{}", &hash[..2], &hash[2..]));
    assert_stranger_reads_nothing(&store, &blob);
    // Positive controls: the stranger reaches the directory the store is in, and the owner
    // reads the store.
    let (ok, text) = as_stranger("cat", &[doc.as_os_str()]);
    assert!(ok, "the stranger can read beside the store: {text}");
    let log = env.upstream(&["log"]);
    assert_eq!(code(&log), 0, "{}", stderr(&log));
    assert!(stdout(&log).contains("doc.md"), "{}", stdout(&log));
    let got = env.upstream(&["artifacts", "get", "notes.txt"]);
    assert_eq!(stdout(&got), "TENANT-SECRET-NOTES\n");
}

#[test]
fn a_world_readable_store_of_an_older_upstream_is_tightened_when_opened() {
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (blob, _) = store_with(&env, b"TENANT-SECRET-NOTES\n", b"log\n");
    let store = env.path(".upstream");
    // As an older upstream left it: directories 0755, files 0644.
    fn loosen(path: &std::path::Path) {
        let meta = fs::symlink_metadata(path).unwrap();
        let mode = if meta.is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
        if meta.is_dir() {
            for entry in fs::read_dir(path).unwrap() {
                loosen(&entry.unwrap().path());
            }
        }
    }
    loosen(&store);
    // The attack works on such a store (so its failure below is the tightening's doing).
    let (ok, text) = as_stranger("cat", &[blob.as_os_str()]);
    assert!(ok && text.contains("TENANT-SECRET-NOTES"), "{text}");

    let log = env.upstream(&["log"]);
    assert_eq!(code(&log), 0, "{}", stderr(&log));
    let wrong = not_private(&store);
    assert!(wrong.is_empty(), "not tightened: {wrong:?}");
    assert_stranger_reads_nothing(&store, &blob);
    // The directory the store is in is the user's: left as it was.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(env.dir.path()).unwrap().mode() & 0o777, 0o755);
}

#[test]
fn the_daemons_state_key_store_and_tenant_stores_are_private() {
    use std::io::BufRead;
    crate::require_root_sandbox!();
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let state = env.path("state");
    let mut create = with_umask_000(env.command());
    let out = create
        .args([
            "keys",
            "create",
            "--name",
            "ci",
            "--tenant",
            "acme",
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let key = stdout(&out).trim().to_string();
    // A state directory an older upstream left open: the daemon closes it when it starts.
    fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
    let mut serve = with_umask_000(env.command());
    let mut daemon = serve
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .env("UPSTREAM_CACHE_DIR", env.path("cache"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(daemon.stderr.take().unwrap());
    let mut first = String::new();
    lines.read_line(&mut first).unwrap();
    std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .map(|w| w.trim_end_matches(',').to_string());
    let contexts = url.as_ref().map(|url| {
        reqwest::blocking::Client::new()
            .get(format!("{url}/v1/contexts"))
            .bearer_auth(&key)
            .send()
            .map(|r| r.status().as_u16())
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
    assert!(url.is_some(), "the daemon did not start: {first}");
    assert_eq!(contexts.unwrap().unwrap(), 200);
    assert!(state.join("tenants/acme/store.db").is_file());
    let wrong: Vec<String> = not_private(&state)
        .into_iter()
        // The socket is 0600 too, by its own means; the cache is the image cache's.
        .filter(|w| !w.contains("upstream.sock"))
        .collect();
    assert!(wrong.is_empty(), "not private: {wrong:?}");
    let (ok, text) = as_stranger("cat", &[state.join("keys/store.db").as_os_str()]);
    assert!(!ok, "a stranger read the key store: {text}");
    let (ok, text) = as_stranger("ls", &[state.join("tenants").as_os_str()]);
    assert!(!ok, "a stranger listed the tenants: {text}");
}

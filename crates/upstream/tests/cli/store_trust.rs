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

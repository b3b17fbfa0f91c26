//! The store's records: turns, steps, artifacts, contexts, and what survives concurrency.

use std::collections::BTreeMap;

use upstream_store::{
    ArtifactKind, FinishTurn, NewArtifact, NewStep, NewTurn, Store, StoreError, TurnState,
};

fn begin(store: &mut Store, context: &str) -> i64 {
    let id = format!("{:032x}", rand_id());
    store
        .begin_turn(&NewTurn {
            id: &id,
            context,
            document: "doc.md",
            source: b"# doc\n",
            started_at: 1.0,
            resumed_from: None,
        })
        .unwrap()
}

fn rand_id() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    (std::process::id() as u128) << 64
        | N.fetch_add(1, Ordering::Relaxed) as u128
        | (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            << 80)
}

fn file(store: &Store, path: &str, content: &[u8]) -> NewArtifact {
    let blob = store.blobs().put(content).unwrap();
    NewArtifact {
        path: path.into(),
        kind: ArtifactKind::File,
        mode: 0o644,
        size: content.len() as u64,
        mtime_ns: 0,
        blob: Some(blob),
        target: None,
    }
}

fn finish(store: &mut Store, turn: i64, status: TurnState, artifacts: Vec<NewArtifact>) {
    store
        .finish_turn(
            turn,
            &FinishTurn {
                status,
                finished_at: 2.0,
                duration_ms: 1000,
                sandbox: None,
                result: None,
                artifacts,
                kept: None,
                resume_step: None,
            },
        )
        .unwrap();
}

fn step(number: i64, outputs: &[(&str, &str)]) -> NewStep {
    NewStep {
        number,
        title: format!("Step {number}"),
        language: "bash".into(),
        status: "passed".into(),
        exit_code: Some(0),
        outputs: outputs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        ..NewStep::default()
    }
}

#[test]
fn a_context_carries_the_latest_artifacts_and_outputs_of_its_passed_turns() {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = Store::open(tmp.path()).unwrap();

    let t1 = begin(&mut store, "research");
    store
        .record_step(t1, &step(1, &[("count", "14"), ("topic", "rust")]))
        .unwrap();
    let a = file(&store, "a.txt", b"first a");
    let b = file(&store, "data/b.txt", b"b");
    finish(&mut store, t1, TurnState::Passed, vec![a, b]);

    // A failed turn's artifacts and outputs are kept but do not carry forward.
    let t2 = begin(&mut store, "research");
    store.record_step(t2, &step(1, &[("count", "99")])).unwrap();
    let bad = file(&store, "a.txt", b"broken");
    finish(&mut store, t2, TurnState::Failed, vec![bad]);

    // Another context is separate.
    let other = begin(&mut store, "other");
    let o = file(&store, "a.txt", b"other a");
    finish(&mut store, other, TurnState::Passed, vec![o]);

    let t3 = begin(&mut store, "research");
    store.record_step(t3, &step(2, &[("count", "15")])).unwrap();
    let a3 = file(&store, "a.txt", b"second a");
    let gone = NewArtifact {
        path: "data/b.txt".into(),
        kind: ArtifactKind::Deleted,
        mode: 0,
        size: 0,
        mtime_ns: 0,
        blob: None,
        target: None,
    };
    finish(&mut store, t3, TurnState::Passed, vec![a3, gone]);

    let state = store.context_artifacts("research").unwrap();
    assert_eq!(state.len(), 1, "{state:?}");
    assert_eq!(state[0].path, "a.txt");
    assert_eq!(state[0].turn, t3);
    let data = store.blobs().read(state[0].blob.as_ref().unwrap()).unwrap();
    assert_eq!(data, b"second a");

    let outputs = store.context_outputs("research").unwrap();
    let map: BTreeMap<_, _> = outputs
        .iter()
        .map(|o| (o.key.as_str(), o.value.as_str()))
        .collect();
    assert_eq!(map, BTreeMap::from([("count", "15"), ("topic", "rust")]));

    let turns = store.turns(Some("research"), None).unwrap();
    let numbers: Vec<i64> = turns.iter().map(|t| t.number).collect();
    assert_eq!(numbers, vec![t1, t2, t3]);
    assert_eq!(turns[0].artifacts, 2);
    assert_eq!(turns[1].status, TurnState::Failed);
    assert_eq!(store.turns(None, Some(2)).unwrap().len(), 2);

    let detail = store.turn(&t1.to_string()).unwrap();
    assert_eq!(detail.steps[0].outputs["topic"], "rust");
    assert_eq!(detail.artifact_list.len(), 2);
    let by_id = store.turn(&detail.summary.id[..8]).unwrap();
    assert_eq!(by_id.summary.number, t1);
    assert!(matches!(store.turn("12345"), Err(StoreError::NoTurn(_))));
    assert!(store.dangling_blobs().unwrap().is_empty());
}

#[test]
fn a_turn_whose_process_died_reads_as_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = Store::open(tmp.path()).unwrap();
    let turn = begin(&mut store, "default");
    assert_eq!(
        store.turn(&turn.to_string()).unwrap().summary.status,
        TurnState::Running
    );
    drop(store);
    // Pretend its owner died: the same row with a token no live process has.
    let conn = rusqlite_open(tmp.path());
    conn.execute("UPDATE turns SET owner = '999999999:1'", [])
        .unwrap();
    drop(conn);
    let mut store = Store::open(tmp.path()).unwrap();
    assert_eq!(
        store.turn(&turn.to_string()).unwrap().summary.status,
        TurnState::Interrupted
    );
    // The next turn marks it so for good.
    let next = begin(&mut store, "default");
    assert!(next > turn);
    let conn = rusqlite_open(tmp.path());
    let status: String = conn
        .query_row("SELECT status FROM turns WHERE number = ?1", [turn], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(status, "interrupted");
}

fn rusqlite_open(dir: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("store.db")).unwrap()
}

#[test]
fn gc_removes_only_what_nothing_refers_to_and_waits_for_no_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = Store::open(tmp.path()).unwrap();
    let turn = begin(&mut store, "default");
    let kept = file(&store, "kept.txt", b"kept");
    let kept_id = kept.blob.clone().unwrap();
    finish(&mut store, turn, TurnState::Passed, vec![kept]);
    let loose = store.blobs().put(b"nothing refers to me").unwrap();

    // This store began a turn, so it holds the writers' lock: another handle's gc refuses.
    let mut other = Store::open(tmp.path()).unwrap();
    assert!(matches!(other.gc(), Err(StoreError::Busy)));
    drop(store);

    let report = other.gc().unwrap();
    assert_eq!(report.removed, 1);
    assert!(!other.blobs().contains(&loose));
    assert!(other.blobs().contains(&kept_id));
    // The document the turn ran is referenced too.
    assert_eq!(report.kept, 2);
    assert!(other.dangling_blobs().unwrap().is_empty());
}

#[test]
fn removing_a_context_removes_its_turns() {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = Store::open(tmp.path()).unwrap();
    let t = begin(&mut store, "scratch");
    store.record_step(t, &step(1, &[("k", "v")])).unwrap();
    let a = file(&store, "a", b"a");
    finish(&mut store, t, TurnState::Passed, vec![a]);
    begin(&mut store, "keep");
    assert_eq!(store.remove_context("scratch").unwrap().0, 1);
    assert!(matches!(
        store.remove_context("scratch"),
        Err(StoreError::NoContext(_))
    ));
    let names: Vec<String> = store
        .contexts()
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["keep"]);
    assert!(store.turns(Some("scratch"), None).unwrap().is_empty());
}

#[test]
fn concurrent_writers_lose_no_turn() {
    let tmp = tempfile::tempdir().unwrap();
    Store::open(tmp.path()).unwrap();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let dir = tmp.path().to_path_buf();
            std::thread::spawn(move || {
                let mut store = Store::open(&dir).unwrap();
                for i in 0..25 {
                    let t = begin(&mut store, &format!("ctx-{}", w % 2));
                    store
                        .record_step(t, &step(1, &[("i", &i.to_string())]))
                        .unwrap();
                    let a = file(&store, &format!("w{w}-{i}"), format!("{w}/{i}").as_bytes());
                    finish(&mut store, t, TurnState::Passed, vec![a]);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let store = Store::open(tmp.path()).unwrap();
    let turns = store.turns(None, None).unwrap();
    assert_eq!(turns.len(), 100);
    assert!(
        turns
            .iter()
            .all(|t| t.status == TurnState::Passed && t.artifacts == 1)
    );
    assert_eq!(store.context_artifacts("ctx-0").unwrap().len(), 50);
    assert!(store.dangling_blobs().unwrap().is_empty());
}

#[test]
fn a_store_made_by_an_older_schema_is_migrated_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    // A store as version 1 of the schema made it, with a turn in it.
    let old = Store::open_at_version(tmp.path(), 1).unwrap();
    assert_eq!(old.schema_version().unwrap(), 1);
    let conn = rusqlite_open(tmp.path());
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('turns')")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        !columns.contains(&"steps".to_string()),
        "version 1 has no counts"
    );
    drop(conn);
    // Version-1 code wrote its rows without counts: write them as it did.
    let turn = {
        let conn = rusqlite_open(tmp.path());
        conn.execute(
            "INSERT INTO contexts (name, created_at) VALUES ('old', 1.0)",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO turns (id, context_id, document, status, started_at)
             VALUES ('old-turn', 1, 'old.md', 'passed', 1.0)",
            [],
        )
        .unwrap();
        let turn = conn.last_insert_rowid();
        for (n, status) in [(1, "passed"), (2, "failed")] {
            conn.execute(
                "INSERT INTO steps (turn, number, title, language, status, stdout_bytes, stderr_bytes)
                 VALUES (?1, ?2, 'a step', 'bash', ?3, 0, 0)",
                rusqlite::params![turn, n, status],
            )
            .unwrap();
        }
        let blob = old.blobs().put(b"old artifact").unwrap();
        conn.execute(
            "INSERT INTO artifacts (turn, path, kind, mode, size, mtime_ns, blob)
             VALUES (?1, 'a.txt', 'file', 420, 12, 0, ?2)",
            rusqlite::params![turn, blob.as_str()],
        )
        .unwrap();
        turn
    };
    drop(old);

    let mut store = Store::open(tmp.path()).unwrap();
    assert_eq!(
        store.schema_version().unwrap(),
        upstream_store::schema::VERSION
    );
    let turns = store.turns(None, None).unwrap();
    assert_eq!(turns.len(), 1);
    assert_eq!(
        (turns[0].steps, turns[0].steps_passed),
        (2, 1),
        "counted by the migration"
    );
    assert_eq!((turns[0].artifacts, turns[0].artifact_bytes), (1, 12));
    assert_eq!(store.context_artifacts("old").unwrap()[0].turn, turn);
    // And it keeps working: a new turn is counted as it goes.
    let next = begin(&mut store, "old");
    store.record_step(next, &step(1, &[])).unwrap();
    let a = file(&store, "b.txt", b"new");
    finish(&mut store, next, TurnState::Passed, vec![a]);
    let turns = store.turns(None, None).unwrap();
    assert_eq!((turns[1].steps, turns[1].artifacts), (1, 1));
    // Opening again migrates nothing more.
    drop(store);
    assert_eq!(
        Store::open(tmp.path()).unwrap().schema_version().unwrap(),
        upstream_store::schema::VERSION
    );
}

#[test]
fn a_store_from_a_newer_upstream_is_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    Store::open(tmp.path()).unwrap();
    let conn = rusqlite_open(tmp.path());
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = Store::open(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("newer than this upstream knows"), "{err}");
}

fn begin_with_id(store: &mut Store, id: &str) -> i64 {
    store
        .begin_turn(&NewTurn {
            id,
            context: "c",
            document: "doc.md",
            source: b"# doc\n",
            started_at: 1.0,
            resumed_from: None,
        })
        .unwrap()
}

#[test]
fn an_id_prefix_of_several_turns_is_ambiguous_and_names_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = Store::open(&tmp.path().join(".upstream")).unwrap();
    let a = begin_with_id(&mut store, "0193aaaa-0000-7000-8000-000000000001");
    let b = begin_with_id(&mut store, "0193aaab-0000-7000-8000-000000000002");
    match store.turn("0193aaa") {
        Err(e @ StoreError::AmbiguousTurn { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains(&format!("turn {a} (0193aaaa-"))
                    && message.contains(&format!("turn {b} (0193aaab-")),
                "{message}"
            );
        }
        other => panic!("not ambiguous: {other:?}"),
    }
    // One more character, one turn; upper case is the same id; `%` and `_` match nothing.
    assert_eq!(store.turn("0193aaab").unwrap().summary.number, b);
    assert_eq!(store.turn("0193AAAA").unwrap().summary.number, a);
    assert!(matches!(store.turn("0193%"), Err(StoreError::NoTurn(_))));
    assert!(matches!(store.turn("0193____"), Err(StoreError::NoTurn(_))));
}

#[test]
fn a_context_with_a_turn_running_is_not_removed_under_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = Store::open(&tmp.path().join(".upstream")).unwrap();
    let turn = begin(&mut store, "busy");
    finish(&mut store, turn, TurnState::Passed, Vec::new());
    let other = Store::open(&tmp.path().join(".upstream")).unwrap();
    let lock = other
        .lock_context("busy", &mut |_| {}, &|| false)
        .unwrap()
        .expect("free");
    assert!(matches!(
        store.remove_context("busy"),
        Err(StoreError::ContextBusy(c)) if c == "busy"
    ));
    assert_eq!(store.contexts().unwrap().len(), 1);
    drop(lock);
    assert_eq!(store.remove_context("busy").unwrap().0, 1);
}

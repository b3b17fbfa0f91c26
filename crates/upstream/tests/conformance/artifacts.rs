//! Artifacts and resume: what the turn engine saves and restores through a sandbox's files,
//! and the workspace a sandbox keeps for the next to resume from.

use upstream_sandbox::files::{At, Kind};
use upstream_sandbox::{Backend, Kept, SandboxSpec, WorkspaceSpec};
use upstream_store::{ArtifactKind, ArtifactRow, Store};
use upstream_turn::artifacts::{self, Known, Patterns};

use crate::harness::{Bench, check};

const MADE: &str = "mkdir -p /workspace/results/deep /workspace/results/empty && cd /workspace \
    && echo one > results/a.txt && printf 'x,y\\n1,2\\n' > t.csv && echo deep > results/deep/f \
    && echo not saved > notes.txt && ln -s a.txt results/latest && ln -s /etc/passwd results/escape \
    && mkfifo results/fifo \
    && chmod 0600 results/a.txt && chmod 0755 results/deep/f && chmod 0750 results/deep \
    && touch -d @1400000000 results/a.txt && touch -h -d @1500000000 results/latest \
    && touch -d @1300000000 results/deep";

pub fn artifacts_round_trip_with_modes_times_links_and_directories(bench: &Bench) {
    let store = Store::open(&bench.host_path("store")).unwrap();
    let blobs = store.blobs();
    let patterns = Patterns::new(&["results/".into(), "*.csv".into()]).unwrap();

    let mut first = bench.default_sandbox();
    check(first.as_mut(), MADE);
    let files = first.files().unwrap();
    let saved = artifacts::save(
        &*files,
        "/workspace",
        &patterns,
        blobs,
        &Known::new(),
        &artifacts::never,
    )
    .unwrap();
    let before: Vec<_> = saved
        .artifacts
        .iter()
        .map(|a| {
            (
                a.path.clone(),
                files.stat(&at(&a.path), None).unwrap().unwrap(),
            )
        })
        .collect();
    drop(files);
    drop(first);
    let paths: Vec<&str> = saved.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "results",
            "results/a.txt",
            "results/deep",
            "results/deep/f",
            "results/empty",
            "results/escape",
            "results/latest",
            "t.csv"
        ]
    );
    assert_eq!(
        saved.skipped,
        [("results/fifo".to_string(), "a FIFO".to_string())]
    );
    let escape = &saved.artifacts[5];
    assert_eq!(
        (escape.kind, escape.target.as_deref(), escape.blob.as_ref()),
        (ArtifactKind::Symlink, Some("/etc/passwd"), None),
        "a link is saved as a link, not what it leads to"
    );
    assert_eq!((saved.files_read, saved.bytes_read), (3, 4 + 8 + 5));
    blobs.commit(saved.pending).unwrap();
    let rows: Vec<ArtifactRow> = saved
        .artifacts
        .iter()
        .map(|a| ArtifactRow {
            turn: 1,
            path: a.path.clone(),
            kind: a.kind,
            mode: a.mode,
            size: a.size,
            mtime_ns: a.mtime_ns,
            blob: a.blob.clone(),
            target: a.target.clone(),
        })
        .collect();

    let mut second = bench.default_sandbox();
    let owner = if second.info().ids > 1000 {
        (1000, 1000)
    } else {
        (0, 0)
    };
    let files = second.files().unwrap();
    files
        .make_dir(&At::Root("/workspace".into()), 0o755, true, (0, 0))
        .unwrap();
    // As the turn engine does: the workspace is the user's first.
    files.give(&At::Root("/workspace".into()), owner).unwrap();
    let known = artifacts::restore(
        &*files,
        "/workspace",
        &rows,
        blobs,
        owner,
        &artifacts::never,
    )
    .unwrap();
    assert_eq!(known.len(), 3, "the restored files");
    for (path, was) in &before {
        let now = files.stat(&at(path), None).unwrap().unwrap();
        assert_eq!(
            (now.kind, now.mode, now.mtime_ns),
            (was.kind, was.mode, was.mtime_ns),
            "{path}"
        );
        if now.kind == Kind::File {
            assert_eq!(now.size, was.size, "{path}");
        }
    }
    let owners = check(
        second.as_mut(),
        "cd /workspace && stat -c %u:%g results results/a.txt results/deep/f results/latest t.csv",
    );
    assert_eq!(owners, format!("{0}:{1}\n", owner.0, owner.1).repeat(5));
    assert_eq!(
        check(
            second.as_mut(),
            "cd /workspace && cat results/a.txt results/deep/f t.csv \
             && stat -c '%a %Y' results/a.txt results/deep && stat -c %Y results/latest \
             && readlink results/latest results/escape \
             && test -d results/empty && test ! -e notes.txt && test ! -e results/fifo && echo ok"
        ),
        "one\ndeep\nx,y\n1,2\n600 1400000000\n750 1300000000\n1500000000\na.txt\n/etc/passwd\nok\n"
    );

    // Saved again, unchanged files are not read: their blobs are known.
    let again = artifacts::save(
        &*files,
        "/workspace",
        &patterns,
        blobs,
        &known,
        &artifacts::never,
    )
    .unwrap();
    assert_eq!(again.files_read, 0);
    drop(files);
    check(second.as_mut(), "echo changed >> /workspace/results/a.txt");
    let files = second.files().unwrap();
    let changed = artifacts::save(
        &*files,
        "/workspace",
        &patterns,
        blobs,
        &known,
        &artifacts::never,
    )
    .unwrap();
    assert_eq!(changed.files_read, 1, "a changed file is read again");
}

fn at(path: &str) -> At {
    At::Beneath {
        dir: "/workspace".into(),
        path: path.into(),
    }
}

fn layered(resume: Option<Kept>) -> SandboxSpec {
    SandboxSpec {
        workspace: Some(WorkspaceSpec {
            dir: "/workspace".into(),
            resume,
        }),
        ..SandboxSpec::default()
    }
}

pub fn a_kept_workspace_is_where_the_next_sandbox_resumes(bench: &Bench) {
    let backend: &dyn Backend = &*bench.backend;
    if !bench.case.keeps {
        // A backend that cannot keep a workspace says so, in a sentence, both ways: nothing
        // is lost silently, and no turn resumes from what was never kept.
        let mut first = bench.sandbox(&layered(None));
        check(first.as_mut(), "echo one > /workspace/a.txt");
        first.checkpoint().unwrap();
        let e = first.destroy_keeping().unwrap_err();
        assert!(e.to_string().contains("--resume"), "{e}");
        let elsewhere = Kept::new(backend.name(), "never-kept").unwrap();
        let mut spec = layered(Some(elsewhere));
        (bench.case.adapt)(&mut spec);
        match backend.create(&spec) {
            Ok(_) => panic!("{}: a sandbox resumed what was never kept", bench.case.name),
            Err(e) => assert!(e.to_string().contains("resume"), "{e}"),
        }
        return;
    }
    let mut first = bench.sandbox(&layered(None));
    check(
        first.as_mut(),
        "cd /workspace && echo one > a.txt && mkdir d && echo x > d/f",
    );
    first.checkpoint().unwrap();
    // What the step that failed wrote, after the checkpoint.
    check(
        first.as_mut(),
        "cd /workspace && echo two > b.txt && echo changed > a.txt && rm d/f && test -e b.txt",
    );
    let kept = first.destroy_keeping().unwrap();
    assert_eq!(kept.backend(), backend.name());
    assert_eq!(Kept::parse(&kept.to_string()), Some(kept.clone()));
    assert!(backend.kept().contains(&kept), "{:?}", backend.kept());

    let mut second = bench.sandbox(&layered(Some(kept.clone())));
    assert_eq!(
        check(
            second.as_mut(),
            "cd /workspace && cat a.txt d/f && test ! -e b.txt && echo resumed"
        ),
        "one\nx\nresumed\n"
    );
    // A resumed workspace is kept again when its turn fails again.
    check(second.as_mut(), "echo three > /workspace/c.txt");
    second.checkpoint().unwrap();
    let again = second.destroy_keeping().unwrap();
    let mut third = bench.sandbox(&layered(Some(again.clone())));
    assert_eq!(
        check(third.as_mut(), "cd /workspace && cat a.txt c.txt"),
        "one\nthree\n"
    );
    // A sandbox that ends well lets its kept set go.
    third.destroy().unwrap();
    assert!(!backend.kept().contains(&again), "{:?}", backend.kept());

    // Discarded, a set is gone; another backend's name is no error.
    let mut fourth = bench.sandbox(&layered(None));
    check(fourth.as_mut(), "touch /workspace/x");
    fourth.checkpoint().unwrap();
    let kept = fourth.destroy_keeping().unwrap();
    assert!(backend.kept().contains(&kept));
    backend.discard_kept(&Kept::new("elsewhere", "x").unwrap());
    assert!(backend.kept().contains(&kept));
    backend.discard_kept(&kept);
    assert!(!backend.kept().contains(&kept));
}

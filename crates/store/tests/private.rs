//! A store is its owner's alone, whatever the umask: 0700 directories, 0600 files. This
//! binary sets the process umask, so it holds only these tests.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use upstream_store::{FinishTurn, NewTurn, Store, TurnState};

/// The umask is the process's: tests that set it take turns.
static UMASK: Mutex<()> = Mutex::new(());

fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    let _turn = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    let value = f();
    nix::sys::stat::umask(old);
    value
}

/// Every directory and file below `dir` (itself included), with its mode, links not followed.
fn modes(dir: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut all = Vec::new();
    let meta = fs::symlink_metadata(dir).unwrap();
    all.push((dir.to_path_buf(), meta.mode() & 0o7777, meta.is_dir()));
    if meta.is_dir() {
        for entry in fs::read_dir(dir).unwrap() {
            all.extend(modes(&entry.unwrap().path()));
        }
    }
    all
}

/// A store with a finished turn and an API key: every kind of file a store has (its -wal and
/// -shm files exist while it is open).
fn fill(dir: &Path) -> Store {
    let mut store = Store::open(dir).unwrap();
    let turn = store
        .begin_turn(&NewTurn {
            id: "0190a0a0-0000-7000-8000-00000000000a",
            context: "default",
            document: "doc.md",
            source: b"# a tenant's document\n```bash\ntrue\n```\n",
            started_at: 1.0,
            resumed_from: None,
        })
        .unwrap();
    let result = store.blobs().put(b"# the document with results\n").unwrap();
    store
        .finish_turn(
            turn,
            &FinishTurn {
                status: TurnState::Passed,
                finished_at: 2.0,
                duration_ms: 1,
                sandbox: None,
                result: Some(result),
                artifacts: Vec::new(),
                kept: None,
                resume_step: None,
            },
        )
        .unwrap();
    store.create_key("ci", "acme").unwrap();
    store
}

fn assert_private(dir: &Path) {
    let all = modes(dir);
    let names: Vec<String> = all
        .iter()
        .map(|(p, _, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "store.db",
        "store.db-wal",
        "store.db-shm",
        "lock",
        "blobs",
        "tmp",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    assert!(all.iter().filter(|(_, _, d)| !d).count() > 6, "{all:?}");
    for (path, mode, is_dir) in all {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:o}", path.display());
    }
}

#[test]
fn a_store_made_under_umask_000_is_private_to_its_owner() {
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("project/.upstream");
    let store = with_umask(0o000, || {
        fs::create_dir(tmp.path().join("project")).unwrap();
        fill(&dir)
    });
    assert_private(&dir);
    drop(store);
    // The user's project directory is theirs: left as the umask made it.
    let project = fs::metadata(tmp.path().join("project")).unwrap().mode() & 0o777;
    assert_eq!(project, 0o777);
    // A store whose parents were missing: each made private.
    let nested = tmp.path().join("state/tenants/acme");
    let store = with_umask(0o000, || fill(&nested));
    assert_private(&nested);
    drop(store);
    for parent in ["state", "state/tenants"] {
        let mode = fs::metadata(tmp.path().join(parent)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "{parent}");
    }
}

#[test]
fn a_strange_umask_does_not_lock_the_owner_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(".upstream");
    // A umask that takes the owner's own bits: modes are set, not left to it.
    let store = with_umask(0o700, || fill(&dir));
    assert_private(&dir);
    assert_eq!(store.turns(None, None).unwrap().len(), 1);
}

#[test]
fn a_world_readable_store_of_an_older_upstream_is_tightened_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    fs::create_dir(&project).unwrap();
    fs::set_permissions(&project, fs::Permissions::from_mode(0o755)).unwrap();
    let dir = project.join(".upstream");
    let _open = fill(&dir);
    // As an older upstream left it: every directory 0755, every file 0644.
    for (path, _, is_dir) in modes(&dir) {
        let mode = if is_dir { 0o755 } else { 0o644 };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }
    // A link in the store to a file outside is not followed while tightening.
    let outside = tmp.path().join("outside");
    fs::write(&outside, "not the store's").unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();

    let store = Store::open(&dir).unwrap();
    assert_eq!(store.turns(None, None).unwrap().len(), 1, "still readable");
    fs::remove_file(dir.join("link")).unwrap();
    assert_private(&dir);
    drop(store);
    assert_eq!(fs::metadata(&outside).unwrap().mode() & 0o777, 0o644);
    assert_eq!(fs::metadata(&project).unwrap().mode() & 0o777, 0o755);
}

#[test]
fn make_private_dir_makes_and_tightens_only_the_directory_named() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("var/lib/upstream");
    with_umask(0o000, || upstream_store::make_private_dir(&state).unwrap());
    assert_eq!(fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        fs::metadata(tmp.path().join("var")).unwrap().mode() & 0o777,
        0o700
    );
    let old = tmp.path().join("old");
    fs::create_dir(&old).unwrap();
    fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(old.join("file"), "x").unwrap();
    fs::set_permissions(old.join("file"), fs::Permissions::from_mode(0o644)).unwrap();
    upstream_store::make_private_dir(&old).unwrap();
    assert_eq!(fs::metadata(&old).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        fs::metadata(old.join("file")).unwrap().mode() & 0o777,
        0o644
    );
}

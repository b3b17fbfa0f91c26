//! Workspaces kept for `--resume`, tied to the store whose turn kept them, so that they go
//! when that store or that turn's record goes: what a backend keeps lives with the backend
//! (its runtime directory, its disk images), far from the store, and would otherwise stay
//! there for ever once its store is removed (`rm -rf .upstream`).
//!
//! What was kept carries a label ([`Backend::label_kept`]) naming its owner: the store's
//! directory and the turn's number, one a line. [`reclaim`] drops everything kept whose
//! store has no database any more, or whose store records no turn that kept it; a set
//! without a label (kept by an older upstream) is left alone, and one labelled less than
//! [`GRACE`] ago too, since the turn that kept it records it only after it was kept.
//!
//! A store that was moved (`mv p q`) names a set its turn recorded by a path no longer
//! there: [`adopt`], run before [`reclaim`] by every turn and by `gc`, makes the store there
//! its owner again, so a moved project resumes if it runs before a turn elsewhere reclaims
//! the set. There is no grace for a store that is gone: a move and a removal look alike from
//! the set, and a removed store's sets are what fills the backend's room.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use upstream_sandbox::{Backend, Kept};
use upstream_store::Store;

/// How long a kept set may stay unrecorded: the turn that kept it records it right after.
pub const GRACE: Duration = Duration::from_secs(120);

/// Labels `kept` as the turn `number` of the store in `store_dir`'s.
pub fn mark(backend: &dyn Backend, kept: &Kept, store_dir: &Path, number: i64) {
    let store = fs::canonicalize(store_dir).unwrap_or_else(|_| store_dir.to_path_buf());
    let _ = backend.label_kept(kept, &format!("{}\n{number}\n", store.display()));
}

/// What the store at `store_dir` records as kept by its turns, as names.
fn recorded(store_dir: &Path) -> Option<Vec<Kept>> {
    let names = Store::kept_workspaces_at(store_dir).ok()?;
    Some(names.iter().filter_map(|n| Kept::parse(n)).collect())
}

/// Makes the store in `store_dir` the owner of each of `kept` one of its turns records but
/// whose label names another store: the project was moved (`mv p q`), and its sets are
/// still its own, not a removed store's. Returns how many were adopted.
pub fn adopt(backend: &dyn Backend, kept: &[Kept], store_dir: &Path) -> usize {
    if kept.is_empty() || !store_dir.join("store.db").is_file() {
        return 0;
    }
    let Some(recorded) = recorded(store_dir) else {
        return 0;
    };
    let here = fs::canonicalize(store_dir).unwrap_or_else(|_| store_dir.to_path_buf());
    let mut adopted = 0;
    for kept in kept.iter().filter(|k| recorded.contains(k)) {
        let Some((label, _)) = backend.kept_label(kept) else {
            continue;
        };
        let mut lines = label.lines();
        let (Some(owner), Some(number)) = (lines.next(), lines.next()) else {
            continue;
        };
        if Path::new(owner) == here {
            continue;
        }
        if let Ok(number) = number.parse::<i64>() {
            mark(backend, kept, &here, number);
            adopted += 1;
        }
    }
    adopted
}

/// Why `kept` is no longer wanted, if it is not.
fn unwanted(backend: &dyn Backend, kept: &Kept, now: SystemTime) -> Option<String> {
    let (label, labelled) = backend.kept_label(kept)?;
    let young = now
        .duration_since(labelled)
        .ok()
        .is_none_or(|age| age < GRACE);
    let mut lines = label.lines();
    let store_dir = PathBuf::from(lines.next()?);
    if !store_dir.join("store.db").is_file() {
        return Some(format!("its store {} is gone", store_dir.display()));
    }
    if young {
        return None;
    }
    if recorded(&store_dir)?.contains(kept) {
        return None;
    }
    Some(format!(
        "no turn of the store {} keeps it any more",
        store_dir.display()
    ))
}

/// Drops (through the backend) each of `kept` that no turn of an existing store keeps any
/// more; returns how many went.
pub fn reclaim(backend: &dyn Backend, kept: &[Kept]) -> usize {
    let now = SystemTime::now();
    let mut dropped = 0;
    for kept in kept {
        if unwanted(backend, kept, now).is_some() {
            backend.discard_kept(kept);
            dropped += 1;
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use upstream_sandbox::{Sandbox, SandboxError, SandboxSpec};

    /// A backend that only keeps labels, and notes what it was asked to discard.
    #[derive(Default)]
    struct Labels {
        labels: Mutex<BTreeMap<Kept, (String, SystemTime)>>,
        discarded: Mutex<Vec<Kept>>,
    }

    impl Backend for Labels {
        fn name(&self) -> &str {
            "fake"
        }
        fn create(&self, _: &SandboxSpec) -> Result<Box<dyn Sandbox>, SandboxError> {
            Err(SandboxError::setup("makes no sandboxes", None))
        }
        fn discard_kept(&self, kept: &Kept) {
            self.discarded.lock().unwrap().push(kept.clone());
        }
        fn label_kept(&self, kept: &Kept, label: &str) -> std::io::Result<()> {
            let mut labels = self.labels.lock().unwrap();
            labels.insert(kept.clone(), (label.to_string(), SystemTime::now()));
            Ok(())
        }
        fn kept_label(&self, kept: &Kept) -> Option<(String, SystemTime)> {
            self.labels.lock().unwrap().get(kept).cloned()
        }
    }

    fn kept(id: &str) -> Kept {
        Kept::new("fake", id).unwrap()
    }

    #[test]
    fn a_set_goes_when_its_store_is_gone_or_no_longer_records_it() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Labels::default();
        let store_dir = dir.path().join("store");
        Store::open(&store_dir).unwrap();
        let (legacy, young, orphan, unrecorded) = (kept("a"), kept("b"), kept("c"), kept("d"));
        mark(&backend, &young, &store_dir, 1);
        mark(&backend, &orphan, &dir.path().join("gone"), 1);
        // Past the grace, a set its store does not record is no one's.
        mark(&backend, &unrecorded, &store_dir, 7);
        backend
            .labels
            .lock()
            .unwrap()
            .get_mut(&unrecorded)
            .unwrap()
            .1 = SystemTime::now() - 2 * GRACE;
        let n = reclaim(
            &backend,
            &[
                legacy.clone(),
                young.clone(),
                orphan.clone(),
                unrecorded.clone(),
            ],
        );
        assert_eq!(n, 2);
        let discarded = std::mem::take(&mut *backend.discarded.lock().unwrap());
        assert_eq!(discarded, vec![orphan, unrecorded]);
    }
}

//! Workspaces kept for `--resume`, tied to the store whose turn kept them, so that they go
//! when that store or that turn's record goes: a kept set lives in the backend's runtime
//! directory, far from the store, and would otherwise stay there for ever once its store is
//! removed (`rm -rf .upstream`).
//!
//! A kept set names its owner in a file of its own, `owner`: the store's directory and the
//! turn's number, one a line. [`reclaim`] drops every kept set whose store has no database
//! any more, or whose store records no turn that kept it; a set without an owner (kept by an
//! older upstream) is left alone, and one younger than [`GRACE`] too, since the turn that
//! kept it records it only after it was kept.
//!
//! A store that was moved (`mv p q`) names a set its turn recorded by a path no longer
//! there: [`adopt`], run before [`reclaim`] by every turn and by `gc`, makes the store there
//! its owner again, so a moved project resumes if it runs before a turn elsewhere reclaims
//! the set. There is no grace for a store that is gone: a move and a removal look alike from
//! the set, and a removed store's sets are what fills the runtime directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use upstream_store::Store;

/// The file in a kept set that names its owner.
const OWNER: &str = "owner";

/// How long a kept set may stay unrecorded: the turn that kept it records it right after.
pub const GRACE: Duration = Duration::from_secs(120);

/// Names the turn `number` of the store in `store_dir` as the owner of the set kept at
/// `kept`.
pub fn mark(kept: &Path, store_dir: &Path, number: i64) {
    let store = fs::canonicalize(store_dir).unwrap_or_else(|_| store_dir.to_path_buf());
    let _ = fs::write(kept.join(OWNER), format!("{}\n{number}\n", store.display()));
}

/// Makes the store in `store_dir` the owner of each of `kept_sets` one of its turns records
/// but whose owner names another store: the project was moved (`mv p q`), and its sets are
/// still its own, not a removed store's. Returns how many were adopted.
pub fn adopt(kept_sets: &[PathBuf], store_dir: &Path) -> usize {
    if kept_sets.is_empty() || !store_dir.join("store.db").is_file() {
        return 0;
    }
    let Ok(recorded) = Store::kept_workspaces_at(store_dir) else {
        return 0;
    };
    let here = fs::canonicalize(store_dir).unwrap_or_else(|_| store_dir.to_path_buf());
    let mut adopted = 0;
    for kept in kept_sets.iter().filter(|k| recorded.contains(k)) {
        let Ok(text) = fs::read_to_string(kept.join(OWNER)) else {
            continue;
        };
        let mut lines = text.lines();
        let (Some(owner), Some(number)) = (lines.next(), lines.next()) else {
            continue;
        };
        if Path::new(owner) == here {
            continue;
        }
        if let Ok(number) = number.parse::<i64>() {
            mark(kept, &here, number);
            adopted += 1;
        }
    }
    adopted
}

/// Why a kept set is no longer wanted, if it is not.
fn unwanted(kept: &Path, now: SystemTime) -> Option<String> {
    let owner = kept.join(OWNER);
    let text = fs::read_to_string(&owner).ok()?;
    let young = fs::metadata(&owner)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| now.duration_since(t).ok())
        .is_none_or(|age| age < GRACE);
    let mut lines = text.lines();
    let store_dir = PathBuf::from(lines.next()?);
    if !store_dir.join("store.db").is_file() {
        return Some(format!("its store {} is gone", store_dir.display()));
    }
    if young {
        return None;
    }
    let recorded = Store::kept_workspaces_at(&store_dir).ok()?;
    if recorded.iter().any(|k| k == kept) {
        return None;
    }
    Some(format!(
        "no turn of the store {} keeps it any more",
        store_dir.display()
    ))
}

/// Drops each of `kept_sets` (through `discard`) that no turn of an existing store keeps any
/// more; returns how many went.
pub fn reclaim(kept_sets: &[PathBuf], discard: &dyn Fn(&Path)) -> usize {
    let now = SystemTime::now();
    let mut dropped = 0;
    for kept in kept_sets {
        if unwanted(kept, now).is_some() {
            discard(kept);
            dropped += 1;
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_goes_when_its_store_is_gone_or_no_longer_records_it() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("kept/a");
        fs::create_dir_all(&legacy).unwrap();
        let store_dir = dir.path().join("store");
        Store::open(&store_dir).unwrap();
        let young = dir.path().join("kept/b");
        fs::create_dir_all(&young).unwrap();
        mark(&young, &store_dir, 1);
        let orphan = dir.path().join("kept/c");
        fs::create_dir_all(&orphan).unwrap();
        mark(&orphan, &dir.path().join("gone"), 1);
        // Past the grace, a set its store does not record is no one's.
        let unrecorded = dir.path().join("kept/d");
        fs::create_dir_all(&unrecorded).unwrap();
        mark(&unrecorded, &store_dir, 7);
        fs::File::options()
            .write(true)
            .open(unrecorded.join(OWNER))
            .unwrap()
            .set_modified(SystemTime::now() - 2 * GRACE)
            .unwrap();
        let dropped = std::cell::RefCell::new(Vec::new());
        let n = reclaim(
            &[
                legacy.clone(),
                young.clone(),
                orphan.clone(),
                unrecorded.clone(),
            ],
            &|p: &Path| dropped.borrow_mut().push(p.to_path_buf()),
        );
        assert_eq!(n, 2);
        assert_eq!(dropped.into_inner(), vec![orphan, unrecorded]);
    }
}

//! The context store's speed, against `cp -a` of the same files in the same run.
//!
//! `cargo bench -p upstream-turn --bench store` saves an artifact set of 1,000 files / 200 MB
//! into a store and restores it, each against `cp -a` of the tree; then saves the restored,
//! unchanged set again. `-- --make-log-store DIR N` instead fills a store with N turns, for
//! timing `upstream log` on it (bench/run does).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use upstream_sandbox::files::Tree;
use upstream_store::{FinishTurn, NewArtifact, NewStep, NewTurn, Store, TurnState};
use upstream_turn::artifacts::{self, Patterns};

const FILES: usize = 1000;
const FILE_SIZE: usize = 200 * 1024;
const ROUNDS: usize = 7;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--make-log-store") {
        let dir = Path::new(&args[i + 1]);
        let turns: usize = args[i + 2].parse().expect("a number of turns");
        make_log_store(dir, turns);
        return;
    }
    // `cargo test --all-targets` runs bench targets too, without `--bench`: then there is
    // nothing to measure.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    artifacts_bench();
}

/// Fills `dir` with files of pseudo-random bytes (no two alike, so nothing dedupes).
fn make_tree(dir: &Path) {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut buf = vec![0u8; FILE_SIZE];
    for i in 0..FILES {
        let sub = dir.join(format!("d{:02}", i % 20));
        fs::create_dir_all(&sub).unwrap();
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        fs::File::create(sub.join(format!("f{i:04}.bin")))
            .unwrap()
            .write_all(&buf)
            .unwrap();
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// The median of `cp[i] / ours[i]`: each round's own ratio, so a burst of load on a shared
/// machine that slows one round moves both sides of that round, not the comparison.
fn median_ratio(cp: &[Duration], ours: &[Duration]) -> f64 {
    let mut ratios: Vec<f64> = cp
        .iter()
        .zip(ours)
        .map(|(c, o)| c.as_secs_f64() / o.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

/// Times `f`, which starts with memory the guest has just used, for every side alike.
///
/// On a virtual machine whose host takes back the memory the guest leaves free (free page
/// reporting, proactive reclaim), the first touch of such a page is a fault in the host: here
/// 400 MB took 820 ms to touch the first time and 150 ms just after. Each measured side would
/// otherwise get whatever its place in the round left it: `cp -a` reuses the pages of the copy
/// deleted a moment before, while the restore, whose files are the most the round holds at
/// once (tree, blobs and restored tree), starts on pages the host took back. Beside two busy
/// loops it then read 0.2–0.6x cp, its CPU time two to four times its time on a quiet
/// machine; with 1 GB touched before each side, 1.8–2.7x. 400 MB was not enough: new pages of
/// the page cache do not all come from the ones just let go.
fn timed(f: impl FnOnce()) -> Duration {
    touch_memory(5 * FILES * FILE_SIZE);
    let start = Instant::now();
    f();
    start.elapsed()
}

/// Touches `bytes` of fresh memory, page by page, and lets it go: the next allocations, of
/// the page cache too, get pages the guest holds.
fn touch_memory(bytes: usize) {
    let mut memory = vec![0u8; bytes];
    for i in (0..bytes).step_by(4096) {
        memory[i] = 1;
    }
    std::hint::black_box(&memory);
}

/// `cp -a from to`, which must succeed.
fn cp_a(from: &Path, to: &Path) {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status();
    assert!(status.unwrap().success(), "cp -a {}", from.display());
}

fn artifacts_bench() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    fs::create_dir(&tree).unwrap();
    let ws = tree.join("ws");
    fs::create_dir(&ws).unwrap();
    make_tree(&ws.join("data"));
    // Everything read below comes from the page cache, for cp as for upstream.
    Command::new("sync").status().unwrap();
    let patterns = Patterns::new(&["data/".to_string()]).unwrap();
    // The host's own files, as a sandbox's are reached from the host.
    let host = Tree::inside().unwrap();
    let ws_path = ws.to_str().unwrap();

    let (mut cp, mut cp_sync, mut save, mut restore, mut again) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut again_read = 0;
    let mut again_new_blobs = 0;
    // One round more than measured: the first warms the filesystem (on a fresh one, ext4
    // reads each block group's bitmaps the first time it allocates there), for both sides.
    for round in 0..=ROUNDS {
        // cp runs first in even rounds and last in odd ones (A B, B A), so that a machine
        // getting busier or quieter during a round moves both sides alike.
        let mut copy_round = || {
            let copy = work.path().join(format!("copy-{round}"));
            cp.push(timed(|| cp_a(&ws, &copy)));
            fs::remove_dir_all(&copy).unwrap();
            cp_sync.push(timed(|| {
                cp_a(&ws, &copy);
                Command::new("sync").status().unwrap();
            }));
            fs::remove_dir_all(&copy).unwrap();
        };
        if round % 2 == 0 {
            copy_round();
        }
        let store_dir = work.path().join(format!("store-{round}"));
        let store = Store::open(&store_dir).unwrap();
        let mut saved = None;
        save.push(timed(|| {
            let s = artifacts::save(
                &host,
                ws_path,
                &patterns,
                store.blobs(),
                &Default::default(),
                &artifacts::never,
            )
            .unwrap();
            let list = s.artifacts.clone();
            store.blobs().commit(s.pending).unwrap();
            saved = Some(list);
        }));
        let saved = saved.unwrap();
        assert_eq!(saved.iter().filter(|a| a.blob.is_some()).count(), FILES);

        let rows: Vec<upstream_store::ArtifactRow> = saved
            .iter()
            .map(|a: &NewArtifact| upstream_store::ArtifactRow {
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
        let target = work.path().join(format!("restored-{round}"));
        fs::create_dir(&target).unwrap();
        let target_path = target.to_str().unwrap();
        let mut known = None;
        restore.push(timed(|| {
            known = Some(
                artifacts::restore(
                    &host,
                    target_path,
                    &rows,
                    store.blobs(),
                    (0, 0),
                    &artifacts::never,
                )
                .unwrap(),
            );
        }));
        let known = known.unwrap();

        let blobs_before = store.blobs().list().unwrap().len();
        again.push(timed(|| {
            let s = artifacts::save(
                &host,
                target_path,
                &patterns,
                store.blobs(),
                &known,
                &artifacts::never,
            )
            .unwrap();
            again_read += s.files_read;
            store.blobs().commit(s.pending).unwrap();
        }));
        again_new_blobs += store.blobs().list().unwrap().len() - blobs_before;
        drop(store);
        fs::remove_dir_all(&store_dir).unwrap();
        fs::remove_dir_all(&target).unwrap();
        if round % 2 == 1 {
            copy_round();
        }
    }
    for times in [&mut cp, &mut cp_sync, &mut save, &mut restore, &mut again] {
        times.remove(0);
    }
    let save_ratio = median_ratio(&cp, &save);
    let restore_ratio = median_ratio(&cp, &restore);
    let sync_ratio = median_ratio(&cp_sync, &save);
    let (cp, cp_sync) = (median(cp), median(cp_sync));
    let (save, restore, again) = (median(save), median(restore), median(again));
    let verdict = |ok: bool| if ok { "meets target" } else { "MISSES target" };
    let mb = (FILES * FILE_SIZE) as f64 / 1e6;
    let rate = |d: Duration| mb / d.as_secs_f64();
    println!(
        "artifact set: {FILES} files, {mb:.0} MB (medians of {ROUNDS} rounds; ratios: the median of each round's own)"
    );
    println!(
        "  cp -a           {:8.1} ms  {:7.0} MB/s   (cp -a; sync: {:.1} ms)",
        cp.as_secs_f64() * 1e3,
        rate(cp),
        cp_sync.as_secs_f64() * 1e3
    );
    println!(
        "  save            {:8.1} ms  {:7.0} MB/s   {:.2}x cp's throughput (target >= 0.5) {}; {:.2}x cp -a; sync",
        save.as_secs_f64() * 1e3,
        rate(save),
        save_ratio,
        verdict(save_ratio >= 0.5),
        sync_ratio
    );
    println!(
        "  restore         {:8.1} ms  {:7.0} MB/s   {:.2}x cp's throughput (target >= 0.8) {}",
        restore.as_secs_f64() * 1e3,
        rate(restore),
        restore_ratio,
        verdict(restore_ratio >= 0.8)
    );
    println!(
        "  save unchanged  {:8.1} ms  {:5.1}% of the first save (target <= 10%) {}; files read {again_read}, new blobs {again_new_blobs}",
        again.as_secs_f64() * 1e3,
        100.0 * again.as_secs_f64() / save.as_secs_f64(),
        verdict(again.as_secs_f64() <= 0.1 * save.as_secs_f64() && again_new_blobs == 0)
    );
}

/// A store of `turns` turns of two steps and a few artifacts each, across five contexts.
fn make_log_store(dir: &Path, turns: usize) {
    let mut store = Store::open(dir).unwrap();
    for i in 0..turns {
        let context = format!("context-{}", i % 5);
        let id = format!("bench-{i:08}");
        let number = store
            .begin_turn(&NewTurn {
                id: &id,
                context: &context,
                document: "pipeline.md",
                source: b"# pipeline\n",
                started_at: 1.7e9 + i as f64,
                resumed_from: None,
            })
            .unwrap();
        for step in 1..=2 {
            store
                .record_step(
                    number,
                    &NewStep {
                        number: step,
                        title: format!("Step {step}"),
                        language: "bash".into(),
                        status: "passed".into(),
                        exit_code: Some(0),
                        duration_ms: Some(10),
                        outputs: [("n".to_string(), i.to_string())].into(),
                        ..NewStep::default()
                    },
                )
                .unwrap();
        }
        let blob = store
            .blobs()
            .put(format!("artifact {}", i % 100).as_bytes())
            .unwrap();
        store
            .finish_turn(
                number,
                &FinishTurn {
                    status: TurnState::Passed,
                    finished_at: 1.7e9 + i as f64 + 1.0,
                    duration_ms: 1000,
                    sandbox: None,
                    result: None,
                    artifacts: vec![NewArtifact {
                        path: "out.txt".into(),
                        kind: upstream_store::ArtifactKind::File,
                        mode: 0o644,
                        size: 12,
                        mtime_ns: 0,
                        blob: Some(blob),
                        target: None,
                    }],
                    kept: None,
                    resume_step: None,
                },
            )
            .unwrap();
    }
}

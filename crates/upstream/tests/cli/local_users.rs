//! What other local users of the host cannot do to upstream's users or their sandboxes. These
//! run as root in CI: they act as other users.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Output;

use crate::util::{Env, code, stderr};

/// The uid upstream runs as in the rootless tests, and another local user.
const USER: u32 = 65534;
const OTHER: u32 = 65533;

/// Runs `upstream exec -- true` as [`USER`] with `TMPDIR=<tmp>` and the given
/// `XDG_RUNTIME_DIR`, no `UPSTREAM_RUNTIME_DIR`.
fn exec_as_user(env: &Env, tmp: &Path, xdg: Option<&Path>) -> Output {
    let work = env.path("work");
    let mut cmd = std::process::Command::new(crate::util::binary_for_nobody(env));
    cmd.args(["exec", "--", "true"])
        .current_dir(&work)
        .env_remove("UPSTREAM_RUNTIME_DIR")
        .env_remove("XDG_RUNTIME_DIR")
        .env("TMPDIR", tmp)
        .env("UPSTREAM_STORE", work.join(".upstream"))
        .env("UPSTREAM_STATE_DIR", work.join("state"))
        .env("HOME", &work)
        .uid(USER)
        .gid(USER);
    if let Some(xdg) = xdg {
        cmd.env("XDG_RUNTIME_DIR", xdg);
    }
    cmd.output().unwrap()
}

/// A directory owned by `uid` with `mode`.
fn dir_of(path: &Path, uid: u32, mode: u32) {
    fs::create_dir_all(path).unwrap();
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn assert_private_of(path: &Path, uid: u32) {
    let meta = fs::symlink_metadata(path).unwrap();
    assert!(meta.is_dir(), "{}", path.display());
    assert_eq!(meta.uid(), uid, "{}", path.display());
    assert_eq!(meta.mode() & 0o777, 0o700, "{}", path.display());
}

fn rootless_unavailable(out: &Output) -> bool {
    if stderr(out).contains("cannot create a user namespace") {
        crate::util::skip(
            "SKIPPED: rootless: this kernel does not allow unprivileged user namespaces".into(),
        );
        return true;
    }
    false
}

#[test]
fn a_runtime_dir_another_user_made_first_is_refused_never_used() {
    crate::require_root_sandbox!();
    let env = Env::new();
    dir_of(&env.path("work"), USER, 0o755);
    let tmp = env.path("tmp");
    dir_of(&tmp, 0, 0o1777);
    // Another user makes the user's fallback directory first, open to all.
    let taken = tmp.join(format!("upstream-{USER}"));
    dir_of(&taken, OTHER, 0o777);
    let out = exec_as_user(&env, &tmp, None);
    let err = stderr(&out);
    assert_ne!(code(&out), 0, "{err}");
    assert!(
        err.contains(&taken.display().to_string())
            && err.contains(&format!("belongs to uid {OTHER}, not to you (uid {USER})")),
        "{err}"
    );
    assert!(
        err.contains("hint: ") && err.contains("UPSTREAM_RUNTIME_DIR"),
        "{err}"
    );
    assert_eq!(
        fs::read_dir(&taken).unwrap().count(),
        0,
        "nothing was put in it"
    );
    // A link to a directory of the other user's, likewise.
    fs::remove_dir(&taken).unwrap();
    let elsewhere = tmp.join("elsewhere");
    dir_of(&elsewhere, OTHER, 0o777);
    std::os::unix::fs::symlink(&elsewhere, &taken).unwrap();
    let out = exec_as_user(&env, &tmp, None);
    let err = stderr(&out);
    assert_ne!(code(&out), 0, "{err}");
    assert!(
        err.contains("is a symbolic link or not a directory"),
        "{err}"
    );
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    // An XDG_RUNTIME_DIR of another user's does not count: the fallback is still refused.
    let foreign_xdg = env.path("xdg-other");
    dir_of(&foreign_xdg, OTHER, 0o700);
    let out = exec_as_user(&env, &tmp, Some(&foreign_xdg));
    assert!(
        stderr(&out).contains("is a symbolic link"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read_dir(&foreign_xdg).unwrap().count(), 0);
    // The user's own XDG_RUNTIME_DIR is used instead of the taken name.
    let xdg = env.path("xdg");
    dir_of(&xdg, USER, 0o700);
    let out = exec_as_user(&env, &tmp, Some(&xdg));
    if rootless_unavailable(&out) {
        return;
    }
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_private_of(&xdg.join("upstream"), USER);
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    // The control: once the name is free, the fallback is made, the user's and private.
    fs::remove_file(&taken).unwrap();
    let out = exec_as_user(&env, &tmp, None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_private_of(&taken, USER);
    assert!(taken.join("sandboxes").is_dir());
}

#[test]
fn as_root_the_runtime_dir_is_one_no_user_can_make() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let tmp = env.path("tmp");
    dir_of(&tmp, 0, 0o1777);
    // The name root's sandboxes used to take in the temporary directory, made by a user.
    let old = tmp.join("upstream-0");
    dir_of(&old, OTHER, 0o777);
    let run = |runtime: Option<&Path>| {
        let mut cmd = env.command();
        cmd.env("TMPDIR", &tmp).args(["exec", "--", "true"]);
        match runtime {
            Some(dir) => cmd.env("UPSTREAM_RUNTIME_DIR", dir),
            None => cmd.env_remove("UPSTREAM_RUNTIME_DIR"),
        };
        cmd.output().unwrap()
    };
    let out = run(None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        fs::read_dir(&old).unwrap().count(),
        0,
        "the user's directory is unused"
    );
    assert_private_of(Path::new("/var/lib/upstream"), 0);
    // UPSTREAM_RUNTIME_DIR gets the same checks.
    let out = run(Some(&old));
    let err = stderr(&out);
    assert_ne!(code(&out), 0, "{err}");
    assert!(
        err.contains(&format!("belongs to uid {OTHER}, not to you (uid 0)")),
        "{err}"
    );
    assert_eq!(fs::read_dir(&old).unwrap().count(), 0);
    // The control: a directory of root's own there works.
    let own = env.path("own/runtime");
    let out = run(Some(&own));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_private_of(&own, 0);
}

/// The ranges of a subordinate id file, as `newuidmap` reads it.
fn subordinate_ranges(path: &str) -> Vec<std::ops::Range<u64>> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut f = line.trim().split(':');
            let (_, start, count) = (f.next()?, f.next()?, f.next()?);
            let start: u64 = start.trim().parse().ok()?;
            Some(start..start + count.trim().parse::<u64>().ok()?)
        })
        .collect()
}

/// A sandbox process's host uid and its user namespace's map (`inside host count`).
fn host_ids(pid: &str) -> (u64, (u64, u64, u64)) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let map = fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    let fields: Vec<u64> = map.split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert_eq!(fields.len(), 3, "one line: {map}");
    (uid, (fields[0], fields[1], fields[2]))
}

/// `kill(pid, 0)` for each pid, as host uid `uid`: `<pid> SIGNALLED` or `<pid> EPERM`.
fn signal_as(uid: u32, pids: &[String]) -> String {
    let script = "import os, sys\nfor p in sys.argv[1:]:\n    try:\n        os.kill(int(p), 0)\n        print(p, 'SIGNALLED')\n    except PermissionError:\n        print(p, 'EPERM')\n";
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(pids)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    crate::util::stdout(&out)
}

#[test]
fn live_sandboxes_have_host_ids_of_their_own_outside_every_subordinate_range() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let marker = format!("7{}.25", std::process::id());
    // Two sandboxes at once, one of them through a re-executed init.
    let mut runs: Vec<_> = [None, Some("exec")]
        .into_iter()
        .map(|mode| {
            let mut cmd = env.command();
            if let Some(mode) = mode {
                cmd.env("UPSTREAM_INIT", mode);
            }
            cmd.args(["exec", "--", "sleep", &marker])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let sleeps = || -> Vec<String> {
        crate::util::processes_with(&marker)
            .into_iter()
            .filter(|p| {
                p.split_once(": ")
                    .is_some_and(|(_, cmd)| cmd.starts_with("sleep "))
            })
            .map(|p| p.split_once(": ").unwrap().0.to_string())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while sleeps().len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pids = sleeps();
    let check = || {
        assert_eq!(pids.len(), 2, "{pids:?}");
        let (a, b) = (host_ids(&pids[0]), host_ids(&pids[1]));
        for (uid, (inside, host, count)) in [a, b] {
            assert_eq!((inside, count), (0, 65_536));
            assert_eq!(uid, host, "the command runs as the sandbox's root");
            assert!(host >= 65_536, "not a host user's id: {host}");
            for file in ["/etc/subuid", "/etc/subgid"] {
                for r in subordinate_ranges(file) {
                    assert!(
                        host + count <= r.start || r.end <= host,
                        "{host}..{} overlaps {r:?} of {file}",
                        host + count
                    );
                }
            }
        }
        let ((_, (_, a, n)), (_, (_, b, _))) = (a, b);
        assert!(a + n <= b || b + n <= a, "the ranges {a} and {b} overlap");
        // A process as one sandbox's root host id cannot signal the other sandbox's
        // processes; as Debian gives the first user's subordinate range (100000..165535),
        // neither can a process as an id of that range. The control: each can signal a
        // process of its own id.
        for (attacker, victim) in [
            (a as u32, &pids[1]),
            (b as u32, &pids[0]),
            (100_000, &pids[0]),
        ] {
            let mut own = std::process::Command::new("sleep")
                .arg("30")
                .uid(attacker)
                .gid(attacker)
                .spawn()
                .unwrap();
            let answer = signal_as(attacker, &[victim.clone(), own.id().to_string()]);
            let _ = own.kill();
            let _ = own.wait();
            assert!(
                answer.contains(&format!("{victim} EPERM")),
                "{attacker}: {answer}"
            );
            assert!(
                answer.contains(&format!("{} SIGNALLED", own.id())),
                "{attacker}: {answer}"
            );
        }
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check));
    for run in &mut runs {
        let _ = run.kill();
        let _ = run.wait();
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(
        crate::util::wait_for_processes(&marker, 0, 10),
        "the sandboxes ended"
    );
}

//! Limits on what a sandbox takes from the host: its disk (a filesystem of its own, so a write
//! past the limit gets "no space"), its /run and /dev/shm (memory, sized inside the memory
//! limit), bad limits refused where they are written, and kept workspaces that go with their
//! store. Each attack comes with a control that the same thing within the limit works.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::serve::{Daemon, id};
use crate::util::{Env, code, result_block, stderr};

/// The sets of layers kept for resuming in a test's runtime directory.
fn kept_sets(runtime: &Path) -> Vec<PathBuf> {
    match fs::read_dir(runtime.join("kept")) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// A step that writes 300 MB to /tmp in a sandbox with a 64 MiB disk gets "no space" from
/// the filesystem, not an out-of-memory kill (its memory limit is 64 MiB too, and /tmp is no
/// longer memory); the step says why it failed, the turn goes on, and the disk's space comes
/// back when the file is removed.
#[test]
fn a_step_that_fills_its_disk_gets_no_space_and_says_so() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let doc = "---\nmemory: 64M\ndisk: 64M\n---\n# Small\n```bash\n\
               head -c 20000000 /dev/zero > /tmp/small && echo small-ok\n```\n\
               # Big\n```bash continue_on_error\nhead -c 300000000 /dev/zero > /tmp/big\n```\n\
               # After\n```bash\nrm -f /tmp/big /tmp/small\n\
               head -c 40000000 /dev/zero > /workspace/again && echo after-ok\n```\n";
    let path = env.write("disk.md", doc);
    let out = env.upstream(&["run", "disk.md"]);
    let err = stderr(&out);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(code(&out), 1, "{err}\n{text}");
    assert!(!err.contains("agent went away"), "{err}");
    assert!(!err.contains("out of memory"), "{err}");
    // Control: a write inside the limit goes through.
    assert!(result_block(&text, 1).contains("small-ok"), "{text}");
    assert!(
        result_block(&text, 2).contains("No space left on device"),
        "{text}"
    );
    assert!(
        result_block(&text, 2).contains("**Result:** exit 1, out of disk space (limit 64.0 MiB)"),
        "{text}"
    );
    assert!(
        err.contains("Step 2: Big")
            && err.contains("failed: exit 1 — out of disk space (limit 64.0 MiB)"),
        "{err}"
    );
    // Deleting gives the space back: the next step writes 40 MB again.
    assert!(result_block(&text, 3).contains("after-ok"), "{err}\n{text}");
    // The sandbox's disk is unmounted and gone with it.
    assert!(env.leftover_sandboxes().is_empty());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let runtime = env.runtime.display().to_string();
    assert!(
        !mounts.contains(&runtime),
        "a sandbox's disk is still mounted:\n{mounts}"
    );
}

/// /run and /dev/shm are memory that the host's writes for a sandbox are not charged for:
/// each is sized inside the memory limit (a sixteenth and a quarter), and a write past that
/// gets "no space" rather than the sandbox's memory.
#[test]
fn run_and_dev_shm_hold_no_more_than_their_share_of_the_memory_limit() {
    crate::require_sandbox!();
    let env = Env::new();
    let doc = "---\nmemory: 64M\n---\n```bash\n\
               df -B1 --output=size /run /dev/shm | tail -n +2 | tr -s ' \\n' ' '; echo\n\
               head -c 8000000 /dev/zero > /dev/shm/fits && echo shm-fits\n\
               head -c 1000000 /dev/zero > /run/fits && echo run-fits\n\
               head -c 40000000 /dev/zero > /dev/shm/big || echo shm-full\n\
               head -c 8000000 /dev/zero > /run/big || echo run-full\n```\n";
    let path = env.write("tmpfs.md", doc);
    let out = env.upstream(&["run", "tmpfs.md"]);
    let text = fs::read_to_string(&path).unwrap();
    let block = result_block(&text, 1);
    assert_eq!(code(&out), 0, "{}\n{text}", stderr(&out));
    assert!(block.contains(" 4194304 16777216 "), "{block}");
    for said in ["shm-fits", "run-fits", "shm-full", "run-full"] {
        assert!(block.contains(said), "{said}: {block}");
    }
}

/// Without a memory limit, /run and /dev/shm are 64 MiB and 256 MiB: a step cannot put more
/// of the host's memory there.
#[test]
fn without_a_memory_limit_run_and_dev_shm_have_fixed_sizes() {
    crate::require_sandbox!();
    let env = Env::new();
    let doc = "```bash\ndf -B1 --output=size /run /dev/shm | tail -n +2 | tr -s ' \\n' ' '; echo\n\
               head -c 300000000 /dev/zero > /dev/shm/big || echo shm-full\n\
               rm -f /dev/shm/big\n```\n";
    let path = env.write("fixed.md", doc);
    let out = env.upstream(&["run", "fixed.md"]);
    let text = fs::read_to_string(&path).unwrap();
    let block = result_block(&text, 1);
    assert_eq!(code(&out), 0, "{}\n{text}", stderr(&out));
    assert!(block.contains(" 67108864 268435456 "), "{block}");
    assert!(block.contains("shm-full"), "{block}");
}

/// `--resume` keeps /tmp (it is on the sandbox's disk) with the workspace.
#[test]
fn resume_keeps_tmp_with_the_workspace() {
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write(
        "resume.md",
        "```bash\necho kept > /tmp/t; echo ws > /workspace/w\n```\n```bash\nfalse\n```\n",
    );
    let out = env.upstream(&["run", "resume.md"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let fixed = fs::read_to_string(&path).unwrap().replace(
        "```bash\nfalse\n```",
        "```bash\ncat /tmp/t /workspace/w\n```",
    );
    fs::write(&path, fixed).unwrap();
    let out = env.upstream(&["run", "--resume", "resume.md"]);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(code(&out), 0, "{}\n{text}", stderr(&out));
    assert!(result_block(&text, 2).contains("kept\nws"), "{text}");
}

/// A workspace kept for resuming goes when its store goes: at the start of the next turn,
/// and with `gc`. Control: one kept by a store that is still there stays.
#[test]
fn kept_workspaces_go_when_their_store_goes() {
    crate::require_sandbox!();
    let env = Env::new();
    let failing = "```bash\necho x > /workspace/x\n```\n```bash\nfalse\n```\n";
    // The control: another project, whose store stays.
    let other = env.path("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("keep.md"), failing).unwrap();
    let out = env
        .command()
        .current_dir(&other)
        .env("UPSTREAM_STORE", other.join(".upstream"))
        .args(["run", "keep.md"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let control = kept_sets(&env.runtime);
    assert_eq!(control.len(), 1, "{control:?}");

    env.write("fail.md", failing);
    let out = env.upstream(&["run", "fail.md"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let kept: Vec<PathBuf> = kept_sets(&env.runtime)
        .into_iter()
        .filter(|k| !control.contains(k))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    fs::remove_dir_all(env.path(".upstream")).unwrap();
    env.write("next.md", "```bash\ntrue\n```\n");
    let out = env.upstream(&["run", "next.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        !kept[0].exists(),
        "{} stayed behind its store",
        kept[0].display()
    );
    assert!(control[0].exists(), "a kept set whose store is there went");

    // gc: the same, with no turn run after the store went.
    let out = env.upstream(&["run", "fail.md"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let kept: Vec<PathBuf> = kept_sets(&env.runtime)
        .into_iter()
        .filter(|k| !control.contains(k))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    fs::remove_dir_all(env.path(".upstream")).unwrap();
    let out = env.upstream(&["gc"]);
    assert!(
        stderr(&out).contains("Removed 1 workspace kept for resuming"),
        "{}",
        stderr(&out)
    );
    assert!(!kept[0].exists(), "{} stayed after gc", kept[0].display());
    assert!(
        control[0].exists(),
        "gc removed a kept set whose store is there"
    );
}

/// Limits out of range are errors at their place in the document, naming the range, not a
/// sandbox that cannot start ("the agent went away").
#[test]
fn bad_limits_are_errors_at_their_place() {
    let env = Env::new();
    for (line, column, range) in [
        ("memory: 4K", 9, "from 4M to 1024T"),
        ("disk: 1K", 7, "from 16M to 8T"),
        ("cpus: 1e9", 7, "from 0.01 to 1024"),
    ] {
        env.write("bad.md", format!("---\n{line}\n---\n```bash\ntrue\n```\n"));
        let out = env.upstream(&["run", "bad.md"]);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{line}: {err}");
        assert!(
            err.contains(&format!("bad.md:2:{column}:")),
            "{line}: {err}"
        );
        assert!(err.contains(range), "{line}: {err}");
        assert!(!err.contains("agent"), "{line}: {err}");
    }
    // Control: the smallest limits a sandbox starts with run.
    env.write(
        "least.md",
        "---\nmemory: 4M\ndisk: 16M\ncpus: 0.01\n---\n```bash\necho ran\n```\n",
    );
    let out = env.upstream(&["run", "least.md"]);
    if crate::util::sandboxes_available() {
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
}

/// Through the daemon: a sandbox's disk bounds what the daemon writes into its /tmp for it
/// (an upload), a sandbox that names no limits gets the operator's defaults, and limits out
/// of range are a 400 naming the field.
#[test]
fn the_daemons_sandboxes_have_a_disk_limit_and_default_limits() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &["--default-memory", "512M", "--default-disk", "2G"]);
    let api = daemon.client(&daemon.key("t", "t"));
    let plain = api.create(json!({}));
    assert_eq!(plain["limits"]["memory"], 512 << 20, "{plain}");
    assert_eq!(plain["limits"]["disk"], 2u64 << 30, "{plain}");
    assert_eq!(plain["unenforced"], json!([]), "{plain}");
    let sandbox = api.create(json!({ "limits": { "disk": "64M" } }));
    assert_eq!(sandbox["limits"]["disk"], 64 << 20, "{sandbox}");
    let sid = id(&sandbox);
    let put = |path: &str, size: usize| api.upload_zeros(&sid, path, size);
    // Control: a file inside the limit goes in.
    assert_eq!(put("/tmp/small", 8 << 20), 201);
    let status = put("/tmp/big", 256 << 20);
    let held = api.file_size(&sid, "/tmp/big");
    assert!(
        held < 64 << 20,
        "a sandbox with a 64 MiB disk holds {held} bytes in its /tmp (PUT answered {status})"
    );
    assert_ne!(status, 201, "the upload past the disk limit was taken");
    for (body, field) in [
        (json!({ "limits": { "disk": "1K" } }), "`limits.disk`"),
        (json!({ "limits": { "disk": "9T" } }), "`limits.disk`"),
        (json!({ "limits": { "disk": [1] } }), "`limits.disk`"),
        (json!({ "limits": { "memory": "4K" } }), "`limits.memory`"),
    ] {
        let (status, answer) = api.post("/v1/sandboxes", body.clone());
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer.to_string().contains(field),
            "{body}: names {field}: {answer}"
        );
    }
}

/// Whether a disk of a sandbox of this test's runtime directory is mounted on the host.
fn disk_mounted(env: &Env) -> bool {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    mounts.contains(&env.runtime.display().to_string())
}

/// An upstream killed mid-turn leaves its sandbox's disk mounted on the host; the next one to
/// start unmounts it and removes the sandbox's directory, image and all.
#[test]
fn a_disk_left_by_a_killed_upstream_goes_at_the_next_start() {
    crate::require_root_sandbox!();
    let env = Env::new();
    env.write("slow.md", "```bash\nsleep 120\n```\n");
    let mut child = env.command().args(["run", "slow.md"]).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !disk_mounted(&env) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        disk_mounted(&env),
        "the turn's sandbox never had its disk mounted"
    );
    // Give the step time to start, then kill upstream as the OOM killer or a reboot would.
    std::thread::sleep(std::time::Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        disk_mounted(&env),
        "a killed upstream unmounted its disk itself"
    );
    assert!(!env.leftover_sandboxes().is_empty());
    env.write("next.md", "```bash\ntrue\n```\n");
    let out = env.upstream(&["run", "next.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        !disk_mounted(&env),
        "the dead upstream's disk is still mounted"
    );
    assert!(
        env.leftover_sandboxes().is_empty(),
        "{:?}",
        env.leftover_sandboxes()
    );
}

/// A resumed turn whose upstream is killed gives the kept disk back: the next start puts it
/// where it came from, and `--resume` works again from the same state.
#[test]
fn a_kept_disk_survives_a_killed_resume() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let path = env.write(
        "resume.md",
        "```bash\necho kept > /tmp/t; echo ws > /workspace/w\n```\n```bash\nfalse\n```\n",
    );
    let out = env.upstream(&["run", "resume.md"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replace("```bash\nfalse\n```", "```bash\nsleep 120\n```"),
    )
    .unwrap();
    let mut child = env
        .command()
        .args(["run", "--resume", "resume.md"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the resumed step runs: its sandbox has taken the kept disk.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while kept_sets(&env.runtime)
        .iter()
        .any(|k| k.join("disk.img").exists())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replace(
            "```bash\nsleep 120\n```",
            "```bash\ncat /tmp/t /workspace/w\n```",
        ),
    )
    .unwrap();
    let out = env.upstream(&["run", "--resume", "resume.md"]);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(code(&out), 0, "{}\n{text}", stderr(&out));
    assert!(result_block(&text, 2).contains("kept\nws"), "{text}");
    assert!(!disk_mounted(&env));
}

/// A rootless daemon cannot bound a sandbox's disk (nor, without a delegated cgroup, its
/// memory): the sandbox's JSON says so, with why, instead of showing limits that do not hold.
/// Control: the same request to a daemon as root lists nothing unenforced.
#[test]
fn a_rootless_daemon_says_which_limits_do_not_hold() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    crate::require_root_sandbox!();
    let env = Env::new();
    let body = json!({ "limits": { "memory": "128M", "disk": "1G" } }).to_string();
    let root = Daemon::start(&env, &[]);
    let (status, made) = crate::serve::unix_request(&root.socket, "POST", "/v1/sandboxes", &body);
    assert_eq!(status, 201, "{made}");
    let made: serde_json::Value = serde_json::from_str(&made).unwrap();
    assert_eq!(made["unenforced"], json!([]), "{made}");
    drop(root);

    let nobody = 65534;
    let work = env.path("nobody");
    fs::create_dir(&work).unwrap();
    std::os::unix::fs::chown(&work, Some(nobody), Some(nobody)).unwrap();
    fs::set_permissions(&work, fs::Permissions::from_mode(0o755)).unwrap();
    let mut command = std::process::Command::new(crate::util::binary_for_nobody(&env));
    command
        .current_dir(&work)
        .env("UPSTREAM_RUNTIME_DIR", work.join("runtime"))
        .env("UPSTREAM_CACHE_DIR", work.join("cache"))
        .env("HOME", &work)
        .uid(nobody)
        .gid(nobody);
    let daemon = Daemon::start_with(command, work.join("state"), work.join("runtime"), &[]);
    let (status, made) = crate::serve::unix_request(&daemon.socket, "POST", "/v1/sandboxes", &body);
    if status != 201 && made.contains("cannot create a user namespace") {
        crate::util::skip(
            "SKIPPED: rootless daemon: this kernel does not allow unprivileged user namespaces"
                .into(),
        );
        return;
    }
    assert_eq!(status, 201, "{made}");
    let made: serde_json::Value = serde_json::from_str(&made).unwrap();
    let unenforced = made["unenforced"].to_string();
    assert!(
        unenforced.contains("disk limit (1G) is not enforced: only root may mount"),
        "{made}"
    );
    // Memory holds only under a delegated cgroup, which a test's nobody does not have.
    assert!(
        unenforced.contains("memory limit is not enforced"),
        "{made}"
    );
}

/// A sandbox's disk takes from the host only what its steps keep there: the image is sparse,
/// the kernel does not fill its inode tables, and a deleted file gives its space back
/// (`discard`). Seen on a kept disk, after a step wrote 100 MB and removed it, and kept 5 MB.
#[test]
fn a_disk_takes_from_the_host_only_what_is_kept_on_it() {
    use std::os::unix::fs::MetadataExt;
    crate::require_root_sandbox!();
    let env = Env::new();
    env.write(
        "sparse.md",
        "```bash\nhead -c 100000000 /dev/urandom > /tmp/big && rm /tmp/big\n\
         head -c 5000000 /dev/urandom > /workspace/kept && sleep 1\n```\n```bash\nfalse\n```\n",
    );
    let out = env.upstream(&["run", "sparse.md"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let kept = kept_sets(&env.runtime);
    assert_eq!(kept.len(), 1, "{kept:?}");
    let image = fs::metadata(kept[0].join("disk.img")).unwrap();
    assert_eq!(image.len(), 10 << 30, "the default disk is 10G");
    let used = image.blocks() * 512;
    assert!(
        (5 << 20..48 << 20).contains(&used),
        "a kept 10G disk holding 5 MB takes {used} bytes of the host's disk"
    );
}

/// A tenant cannot ask for more disk than the operator allows (`--max-disk`): a disk's
/// metadata is paid by the host for every sandbox. Control: a disk within it is made.
#[test]
fn the_daemon_refuses_more_disk_than_its_max() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &["--max-disk", "1G", "--default-disk", "256M"]);
    let api = daemon.client(&daemon.key("t", "t"));
    let (status, answer) = api.post("/v1/sandboxes", json!({ "limits": { "disk": "2G" } }));
    assert_eq!(status, 400, "{answer}");
    assert!(answer.to_string().contains("--max-disk"), "{answer}");
    let (status, made) = api.post("/v1/sandboxes", json!({ "limits": { "disk": "512M" } }));
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["limits"]["disk"], 512 << 20, "{made}");
}

/// The bytes of the files under `dir`, as they take the disk.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            disk_usage(&entry.path())
        } else {
            meta.blocks() * 512
        };
    }
    total
}

/// A step that prints without end cannot fill the host's disk through its log: the store
/// keeps its first 64 MiB, counts the rest, and the record, the document and `show --step`
/// say what was not kept. Control: what was kept is the output as printed.
#[test]
fn a_step_printing_past_the_log_bound_keeps_its_first_64_mib_and_says_so() {
    crate::require_sandbox!();
    let env = Env::new();
    let path = env.write(
        "loud.md",
        "```bash\nhead -c 100000000 /dev/zero | tr '\\0' a\n```\n",
    );
    let out = env.upstream(&["run", "loud.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let bound = 64u64 << 20;
    let store = disk_usage(&env.path(".upstream"));
    assert!(
        store < bound + (8 << 20),
        "the store holds {store} bytes for a log bound of {bound}"
    );
    let doc = fs::read_to_string(&path).unwrap();
    let block = result_block(&doc, 1);
    assert!(
        block.contains(
            "its first 64.0 MiB: upstream show 1 --step 1 (the rest was not kept; 95.4 MiB in all)"
        ),
        "{block}"
    );
    let show = env.upstream(&["show", "1", "--json"]);
    assert!(
        crate::util::stdout(&show).contains("output past 64.0 MiB was not kept (95.4 MiB in all)"),
        "{}",
        crate::util::stdout(&show)
    );
    let step = env.upstream(&["show", "1", "--step", "1"]);
    assert_eq!(code(&step), 0, "{}", stderr(&step));
    assert_eq!(step.stdout.len() as u64, bound);
    assert!(step.stdout.iter().all(|&b| b == b'a'));
    assert!(
        stderr(&step).contains("note: output past 64.0 MiB was not kept (95.4 MiB in all)"),
        "{}",
        stderr(&step)
    );
}

/// A step's output within the bound is kept whole, and nothing says otherwise.
#[test]
fn a_step_printing_within_the_log_bound_keeps_it_all() {
    crate::require_sandbox!();
    let env = Env::new();
    env.write(
        "quiet.md",
        "```bash\nhead -c 3000000 /dev/zero | tr '\\0' a\n```\n",
    );
    let out = env.upstream(&["run", "quiet.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let step = env.upstream(&["show", "1", "--step", "1"]);
    assert_eq!(step.stdout.len(), 3_000_000);
    assert!(!stderr(&step).contains("not kept"), "{}", stderr(&step));
}

/// Deleting a file an earlier step of the turn wrote to the workspace frees nothing until
/// the turn ends (its layer is what --resume starts from): the step that runs out of disk
/// says so. Control: the same writes in one step, delete first, fit.
#[test]
fn out_of_disk_after_deleting_an_earlier_steps_file_says_the_space_is_held() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let path = env.write(
        "layers.md",
        "---\ndisk: 100M\n---\n```bash\nhead -c 70000000 /dev/zero > big\n```\n\
         ```bash\nrm big && head -c 70000000 /dev/zero > big\n```\n",
    );
    let out = env.upstream(&["run", "layers.md"]);
    let err = stderr(&out);
    assert_eq!(code(&out), 1, "{err}");
    assert!(
        err.contains("what earlier steps of this turn wrote to the workspace takes disk space until the turn ends, even once deleted"),
        "{err}\n{}",
        fs::read_to_string(&path).unwrap()
    );
    env.write(
        "one.md",
        "---\ndisk: 100M\n---\n```bash\nhead -c 70000000 /dev/zero > big && rm big && head -c 70000000 /dev/zero > big\n```\n",
    );
    let out = env.upstream(&["run", "one.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

/// Rootless, `doctor` says only memory and cpu limits need writable cgroups: the process
/// limit is RLIMIT_NPROC and holds without them. Control: it does say cgroups are missing.
#[test]
fn rootless_doctor_does_not_say_the_process_limit_needs_cgroups() {
    use std::os::unix::process::CommandExt;
    crate::require_root_sandbox!();
    let env = Env::new();
    let bin = crate::util::binary_for_nobody(&env);
    let out = std::process::Command::new(&bin)
        .arg("doctor")
        .env("UPSTREAM_RUNTIME_DIR", env.path("nobody-runtime"))
        .env("HOME", env.dir.path())
        .current_dir(env.dir.path())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let said = format!("{}{}", crate::util::stdout(&out), stderr(&out));
    assert!(
        said.contains("memory and cpu limits need writable cgroups"),
        "{said}"
    );
    assert!(!said.contains("process limits need"), "{said}");
}

/// Through the daemon the same bound protects the tenant's store, and `show --step` read
/// from the daemon says what was not kept.
#[test]
fn a_daemons_turn_printing_past_the_log_bound_keeps_its_first_64_mib() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    env.write(
        "loud.md",
        "```bash\nhead -c 100000000 /dev/zero | tr '\\0' a\n```\n",
    );
    let out = env.upstream(&["run", "--daemon", "loud.md"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let bound = 64u64 << 20;
    let state = disk_usage(&env.path("state"));
    assert!(
        state < bound + (8 << 20),
        "the daemon's state holds {state} bytes for a log bound of {bound}"
    );
    let step = env.upstream(&["show", "--daemon", "1", "--step", "1"]);
    assert_eq!(code(&step), 0, "{}", stderr(&step));
    assert_eq!(step.stdout.len() as u64, bound);
    assert!(
        stderr(&step).contains("note: output past 64.0 MiB was not kept (95.4 MiB in all)"),
        "{}",
        stderr(&step)
    );
    drop(daemon);
}

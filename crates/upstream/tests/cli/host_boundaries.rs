//! Attacks from outside on what the daemon does on the host for a sandbox, each with a control
//! that the same operation on an ordinary case works, so a refusal for the wrong reason fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::serve::{Api, Daemon, id};
use crate::util::{BIN, Env};

/// A directory tree `depth` levels deep under `/workspace/deep`, made from inside the sandbox
/// (relative `mkdir`/`chdir`, so no path is ever longer than `PATH_MAX`).
fn deep_tree(depth: u32) -> String {
    format!(
        "import os\nos.makedirs('/workspace/deep', exist_ok=True)\nos.chdir('/workspace/deep')\n\
         for _ in range({depth}):\n    os.mkdir('a'); os.chdir('a')\nprint('made')\n"
    )
}

/// Removes the test's runtime directory with `rm -rf`, which walks deep trees without
/// recursion, before the harness's own removal (which recurses) gets to it.
struct RemoveRuntime(PathBuf);

impl Drop for RemoveRuntime {
    fn drop(&mut self) {
        let _ = Command::new("rm").arg("-rf").arg(&self.0).status();
    }
}

fn alive(api: &Api, sid: &str) -> Result<u16, String> {
    api.request(reqwest::Method::GET, &format!("/v1/sandboxes/{sid}"))
        .send()
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// A sandbox writes a directory tree deeper than the daemon's stack can recurse through; the
/// files API's recursive delete and the sandbox's teardown must neither crash the daemon
/// (every other tenant's sandboxes die with it) nor leave a directory that crashes it again
/// at every restart.
#[test]
fn a_deep_directory_tree_does_not_crash_the_daemon() {
    crate::util::each_files_way(|| {
        crate::require_root_sandbox!();
        if !Path::new("/usr/bin/python3").exists() {
            crate::util::skip(
                "SKIPPED: host_boundaries: needs /usr/bin/python3 for the sandbox".into(),
            );
            return;
        }
        let env = Env::new();
        let _cleanup = RemoveRuntime(env.runtime.clone());
        let daemon = Daemon::start(&env, &[]);
        let attacker = daemon.client(&daemon.key("a", "attacker"));
        let victim = daemon.client(&daemon.key("v", "victim"));
        let theirs = id(&victim.create(json!({})));

        // Control: a shallow tree goes with a recursive delete, and so does its sandbox.
        let sid = id(&attacker.create(json!({})));
        let made = attacker.exec(&sid, &["python3", "-c", &deep_tree(10)]);
        assert_eq!(made["stdout"], "made\n", "{made}");
        let response = attacker
            .request(
                reqwest::Method::DELETE,
                &format!("/v1/sandboxes/{sid}/files?path=/workspace/deep&recursive=true"),
            )
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 204);

        // The files API's recursive delete of a deep tree.
        let made = attacker.exec(&sid, &["python3", "-c", &deep_tree(30_000)]);
        assert_eq!(made["stdout"], "made\n", "{made}");
        let deleted = attacker
            .request(
                reqwest::Method::DELETE,
                &format!("/v1/sandboxes/{sid}/files?path=/workspace/deep&recursive=true"),
            )
            .send()
            .map(|r| r.status().as_u16());
        assert_eq!(
            alive(&victim, &theirs),
            Ok(200),
            "the daemon died on a recursive delete ({deleted:?})"
        );

        // The sandbox's teardown with the tree still in its layer.
        let sid = id(&attacker.create(json!({})));
        let made = attacker.exec(&sid, &["python3", "-c", &deep_tree(30_000)]);
        assert_eq!(made["stdout"], "made\n", "{made}");
        let deleted = attacker
            .request(reqwest::Method::DELETE, &format!("/v1/sandboxes/{sid}"))
            .send()
            .map(|r| r.status().as_u16());
        assert_eq!(
            alive(&victim, &theirs),
            Ok(200),
            "the daemon died tearing down a sandbox with a deep tree ({deleted:?})"
        );
    });
}

/// A sandbox's `/dev/shm` and `/run` are memory (its `/tmp` is on its disk). A write the
/// sandbox makes there counts against its memory limit; a write the daemon makes there for it
/// (files API) must not hold more than that limit either.
#[test]
fn an_upload_into_tmpfs_is_bounded_by_the_sandboxs_memory() {
    crate::util::each_files_way(|| {
        crate::require_root_sandbox!();
        let env = Env::new();
        let daemon = Daemon::start(&env, &[]);
        let api = daemon.client(&daemon.key("t", "t"));
        let sid = id(&api.create(json!({ "limits": { "memory": "64M" } })));
        let put = |path: &str, size: usize| api.upload_zeros(&sid, path, size);
        // Control: a small file goes in.
        assert_eq!(put("/dev/shm/small", 1 << 20), 201);
        let status = put("/dev/shm/big", 256 << 20);
        let held = api.file_size(&sid, "/dev/shm/big");
        assert!(
            held < 64 << 20,
            "a sandbox limited to 64 MiB holds {held} bytes in its /dev/shm, written by the daemon \
             (PUT answered {status})"
        );
    });
}

/// A daemon started in a mount namespace of its own, where the host's `/etc` is an overlay
/// (as it is when upstream runs in a container), with a file only host root may read.
struct OverlayDaemon {
    child: Child,
    url: String,
    state: PathBuf,
}

impl OverlayDaemon {
    fn start(env: &Env) -> OverlayDaemon {
        for dir in ["upper", "work", "state"] {
            std::fs::create_dir_all(env.path(dir)).unwrap();
        }
        let script = format!(
            "set -e\nmount --make-rprivate /\n\
             mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc\n\
             printf 'host-root-only-7f3a\\n' > /etc/upstream-host-secret\n\
             chmod 0400 /etc/upstream-host-secret\n\
             exec \"$0\" serve --listen 127.0.0.1:0 --state-dir {state}\n",
            upper = env.path("upper").display(),
            work = env.path("work").display(),
            state = env.path("state").display(),
        );
        let mut child = Command::new("unshare")
            .args(["-m", "sh", "-c", &script, BIN])
            .env("UPSTREAM_RUNTIME_DIR", &env.runtime)
            .env("UPSTREAM_CACHE_DIR", env.path("cache"))
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (url, _log) = crate::serve::listening(&mut child);
        OverlayDaemon {
            child,
            url,
            state: env.path("state"),
        }
    }

    fn client(&self, tenant: &str) -> Api {
        let out = Command::new(BIN)
            .args(["keys", "create", "--name", tenant, "--tenant", tenant])
            .arg("--state-dir")
            .arg(&self.state)
            .output()
            .unwrap();
        assert!(out.status.success());
        Api {
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            base: self.url.clone(),
            key: Some(String::from_utf8(out.stdout).unwrap().trim().to_string()),
        }
    }
}

impl Drop for OverlayDaemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn turn(api: &Api, document: &str) -> String {
    let (status, body) = api.post("/v1/turns", json!({ "document": document }));
    match body.get("document").and_then(Value::as_str) {
        Some(doc) => doc.to_string(),
        None => format!("{status} {body}"),
    }
}

/// Where the host's `/etc` is on overlayfs, a tenant's artifact save with `workdir: /etc` must
/// not read the host's files as host root, and the next turn must not get them back.
#[test]
fn an_artifact_save_does_not_read_the_hosts_etc_on_an_overlay_host() {
    crate::util::each_files_way(|| {
        crate::require_root_sandbox!();
        let env = Env::new();
        let daemon = OverlayDaemon::start(&env);
        let api = daemon.client("t");
        // Control: a step sees the host's /etc, and cannot read the file itself.
        let probe = turn(
            &api,
            "---\nworkdir: /etc\ncontext: probe\n---\n\n\
             ```bash\ncat /etc/upstream-host-secret || echo step-cannot-read\n\
             test -r /etc/hostname && echo sees-etc\n```\n",
        );
        assert!(probe.contains("step-cannot-read"), "{probe}");
        assert!(probe.contains("sees-etc"), "{probe}");
        // The save may refuse (the turn then fails); what matters is what comes back.
        turn(
            &api,
            "---\nworkdir: /etc\nartifacts: [upstream-host-secret]\ncontext: leak\n---\n\n\
             ```bash\ntrue\n```\n",
        );
        let second = turn(
            &api,
            "---\nartifacts: [upstream-host-secret, mine.txt]\ncontext: leak\n---\n\n\
             ```bash\ncat upstream-host-secret 2>/dev/null || true\necho saved > mine.txt\n```\n",
        );
        assert!(
            !second.contains("host-root-only-7f3a"),
            "a host file only root may read came back to the tenant:\n{second}"
        );
        // Control: an artifact of the workspace goes to the next turn.
        let third = turn(
            &api,
            "---\nartifacts: [mine.txt]\ncontext: leak\n---\n\n```bash\ncat mine.txt\n```\n",
        );
        assert!(third.contains("saved"), "{third}");
    });
}

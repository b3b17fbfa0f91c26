//! Attacks on what upstream does on the host for a sandbox: the files API, artifact saves and
//! restores, `/context`. Each tries to make the host read or write something that is not a
//! file of the sandbox's own (the host's kernel settings through the sandbox's `/proc`, a
//! device, a FIFO that never answers), and each has a control that the same operation on an
//! ordinary file of the sandbox still works, so a refusal for the wrong reason fails the test.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::serve::{Daemon, error_code, id};
use crate::util::{Env, code, stderr};

fn host_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string()
}

/// Whether any blob of the store at `store` holds `needle`.
fn store_holds(store: &std::path::Path, needle: &str) -> bool {
    fn walk(dir: &std::path::Path, needle: &[u8]) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        entries.flatten().any(|e| {
            let path = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&path, needle),
                Ok(t) if t.is_file() => std::fs::read(&path)
                    .is_ok_and(|data| data.windows(needle.len()).any(|w| w == needle)),
                _ => false,
            }
        })
    }
    walk(&store.join("blobs"), needle.as_bytes())
}

#[test]
fn the_files_api_never_touches_the_hosts_kernel_settings() {
    crate::util::each_files_way(|| {
        crate::require_root_sandbox!();
        let env = Env::new();
        let daemon = Daemon::start(&env, &[]);
        let api = daemon.client(&daemon.key("t", "t"));
        let sid = id(&api.create(json!({})));
        let hostname = host_hostname();
        let core_pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
        // Through the sandbox's /proc directly, and through a link the sandbox plants to it.
        let plant = "ln -s /proc/sys/kernel /workspace/k";
        assert_eq!(api.exec(&sid, &["sh", "-c", plant])["exit_code"], 0);
        for path in [
            "/proc/sys/kernel/hostname",
            "/proc/sys/kernel/core_pattern",
            "k/hostname",
            "/proc/sys/vm/drop_caches",
        ] {
            let response = api
                .request(
                    reqwest::Method::PUT,
                    &format!("/v1/sandboxes/{sid}/files?path={path}"),
                )
                .body("pwned-by-a-tenant")
                .send()
                .unwrap();
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().unwrap();
            assert_eq!(status, 403, "PUT {path}: {body}");
            assert_eq!(error_code(&body), "not_a_file", "{body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("procfs"), "{message}");
        }
        assert_eq!(host_hostname(), hostname, "the host's hostname changed");
        assert_eq!(
            std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap(),
            core_pattern
        );
        // Reads: the host's hostname and boot id, the sandbox's init as the host sees it, a
        // device that never ends, sysfs. (`/proc/self` would name the daemon, a pid the
        // sandbox's procfs does not have.)
        for path in [
            "/proc/sys/kernel/hostname",
            "/proc/sys/kernel/random/boot_id",
            "/proc/1/environ",
            "/proc/1/status",
            "/dev/zero",
            "/sys/kernel/uevent_seqnum",
        ] {
            let (status, body) = api.get(&format!("/v1/sandboxes/{sid}/files?path={path}"));
            assert_eq!(status, 403, "GET {path}: {body}");
            assert_eq!(error_code(&body), "not_a_file", "{body}");
        }
        let (status, body) = api.get(&format!("/v1/sandboxes/{sid}/files/list?path=/proc/sys"));
        assert_eq!(status, 403, "{body}");
        let status = api.delete(&format!(
            "/v1/sandboxes/{sid}/files?path=/proc/sys/kernel/hostname"
        ));
        assert_eq!(status, 403);
        // Positive controls: the sandbox's own files, on its root, its workspace and its /tmp.
        for path in [
            "/workspace/ok.txt",
            "/tmp/ok.txt",
            "/root/ok.txt",
            "relative.txt",
        ] {
            let response = api
                .request(
                    reqwest::Method::PUT,
                    &format!("/v1/sandboxes/{sid}/files?path={path}"),
                )
                .body("fine")
                .send()
                .unwrap();
            assert_eq!(response.status().as_u16(), 201, "PUT {path}");
            let response = api
                .request(
                    reqwest::Method::GET,
                    &format!("/v1/sandboxes/{sid}/files?path={path}"),
                )
                .send()
                .unwrap();
            assert_eq!(response.status().as_u16(), 200, "GET {path}");
            assert_eq!(response.text().unwrap(), "fine");
        }
        let (status, body) = api.get(&format!("/v1/sandboxes/{sid}/files/list?path=/tmp"));
        assert_eq!(status, 200, "{body}");
        // Inside, the sandbox's own hostname is what a command sees and may set.
        let out = api.exec(&sid, &["cat", "/proc/sys/kernel/hostname"]);
        assert_eq!(out["stdout"].as_str().unwrap().trim(), "sandbox", "{out}");
    });
}

#[test]
fn fifos_in_a_sandbox_never_hold_the_daemon() {
    crate::util::each_files_way(|| {
        crate::require_root_sandbox!();
        let env = Env::new();
        let daemon = Daemon::start(&env, &[]);
        let attacker = daemon.client(&daemon.key("a", "attacker"));
        let other = daemon.client(&daemon.key("o", "other"));
        let sid = id(&attacker.create(json!({})));
        let fifos = "for i in $(seq 1 40); do mkfifo /workspace/p$i; done; mkfifo /tmp/q";
        assert_eq!(attacker.exec(&sid, &["sh", "-c", fifos])["exit_code"], 0);
        let started = Instant::now();
        let reads: Vec<_> = (1..=40)
            .map(|i| {
                let url = format!("{}/v1/sandboxes/{sid}/files?path=p{i}", attacker.base);
                let key = attacker.key.clone().unwrap();
                std::thread::spawn(move || {
                    reqwest::blocking::Client::new()
                        .get(url)
                        .bearer_auth(key)
                        .timeout(Duration::from_secs(30))
                        .send()
                        .map(|r| r.status().as_u16())
                })
            })
            .collect();
        for read in reads {
            assert_eq!(read.join().unwrap().unwrap(), 403);
        }
        for method in [reqwest::Method::PUT, reqwest::Method::GET] {
            let response = attacker
                .request(
                    method.clone(),
                    &format!("/v1/sandboxes/{sid}/files?path=/tmp/q"),
                )
                .body("x")
                .send()
                .unwrap();
            assert_eq!(response.status().as_u16(), 403, "{method} of a FIFO");
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "FIFOs took {:?}",
            started.elapsed()
        );
        // Another tenant, and the attacker itself, are served at once.
        let theirs = id(&other.create(json!({})));
        assert_eq!(other.exec(&theirs, &["true"])["exit_code"], 0);
        assert_eq!(attacker.exec(&sid, &["true"])["exit_code"], 0);
        // Control: a regular file in the same place is read.
        attacker.exec(&sid, &["sh", "-c", "echo data > /workspace/p1.txt"]);
        let response = attacker
            .request(
                reqwest::Method::GET,
                &format!("/v1/sandboxes/{sid}/files?path=p1.txt"),
            )
            .send()
            .unwrap();
        assert_eq!(response.text().unwrap(), "data\n");
        assert_eq!(attacker.delete(&format!("/v1/sandboxes/{sid}")), 204);
    });
}

#[test]
fn artifacts_are_never_read_from_the_hosts_kernel() {
    crate::util::each_files_way(|| {
        crate::require_root_sandbox!();
        let env = Env::new();
        let boot = boot_id();
        let doc = env.write(
            "proc.md",
            "---\nworkdir: /proc/sys/kernel\nartifacts: [hostname, random/boot_id]\n---\n\n\
             ```bash\ntrue\n```\n",
        );
        let before = std::fs::read(&doc).unwrap();
        let out = env.upstream(&["run", doc.to_str().unwrap()]);
        assert_ne!(code(&out), 0, "{}", stderr(&out));
        assert!(stderr(&out).contains("procfs"), "{}", stderr(&out));
        assert!(
            !store_holds(&env.path(".upstream"), &boot),
            "the host's boot id is in the store"
        );
        assert!(
            !store_holds(&env.path(".upstream"), host_hostname().trim()),
            "the host's hostname is in the store"
        );
        assert_eq!(std::fs::read(&doc).unwrap(), before, "the document changed");
        // Control: the same bytes, written by a step into the workspace, are found in the store.
        let doc = env.write(
            "ok.md",
            format!("---\nartifacts: [id.txt]\n---\n\n```bash\necho {boot} > id.txt\n```\n"),
        );
        let out = env.upstream(&["run", doc.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(store_holds(&env.path(".upstream"), &boot));
    });
}

#[test]
fn background_processes_cannot_swap_artifacts_for_fifos_and_hang_the_turn() {
    crate::util::each_files_way(|| {
        crate::require_sandbox!();
        let env = Env::new();
        // The last step leaves a process that, once the step has ended, swaps every artifact
        // for a FIFO again and again; the step also leaves a FIFO of its own among them.
        let doc = env.write(
            "swap.md",
            "---\nartifacts: [\"out/*\"]\ntimeout: 60s\n---\n\n\
             ```bash\nmkdir -p out && echo a > out/a.txt && echo b > out/b.txt && mkfifo out/pipe\n\
             (sleep 0.2; while true; do for f in out/a.txt out/b.txt; do rm -f $f; mkfifo $f; \
             done; done) >/dev/null 2>&1 &\n```\n",
        );
        let started = Instant::now();
        let out = env.upstream(&["run", doc.to_str().unwrap()]);
        let took = started.elapsed();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(took < Duration::from_secs(30), "the turn took {took:?}");
        assert!(
            stderr(&out).contains("artifact out/pipe was not saved: it is a FIFO"),
            "{}",
            stderr(&out)
        );
        // What the steps left was saved: the swapper was stopped before the save.
        let got = env.upstream(&["artifacts", "get", "out/a.txt"]);
        assert_eq!(code(&got), 0, "{}", stderr(&got));
        assert_eq!(String::from_utf8_lossy(&got.stdout), "a\n");
    });
}

#[test]
fn the_turns_timeout_bounds_the_artifact_save() {
    crate::util::each_files_way(|| {
        crate::require_sandbox!();
        let env = Env::new();
        // A sparse 64 GiB artifact: saving it whole would take minutes and the disk.
        let doc = env.write(
            "big.md",
            "---\nartifacts: [big]\ntimeout: 3s\n---\n\n```bash\ntruncate -s 64G big\n```\n",
        );
        let started = Instant::now();
        let out = env.upstream(&["run", doc.to_str().unwrap()]);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(20), "the turn took {took:?}");
        assert_ne!(code(&out), 0, "{}", stderr(&out));
        assert!(
            stderr(&out).contains("timeout (3s) ran out while its artifacts were saved"),
            "{}",
            stderr(&out)
        );
        // The step's result is written back all the same, and nothing half-saved is left.
        let text = std::fs::read_to_string(&doc).unwrap();
        assert!(text.contains("**Result:** exit 0"), "{text}");
        let tmp_bytes: u64 = walk_sizes(&env.path(".upstream/tmp"));
        assert!(
            tmp_bytes < 1 << 20,
            "{tmp_bytes} bytes left in the store's tmp"
        );
        // Control: with room, the same artifact (smaller) is saved.
        let doc = env.write(
            "small.md",
            "---\nartifacts: [big]\ntimeout: 60s\n---\n\n```bash\ntruncate -s 1M big\n```\n",
        );
        let out = env.upstream(&["run", doc.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    });
}

fn walk_sizes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk_sizes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

#[test]
fn ctrl_c_stops_a_turn_in_its_artifact_save() {
    crate::util::each_files_way(|| {
        crate::require_sandbox!();
        let env = Env::new();
        let doc = env.write(
            "big.md",
            "---\nartifacts: [big]\ntimeout: 10m\n---\n\n```bash\ntruncate -s 64G big\n```\n",
        );
        let before = std::fs::read(&doc).unwrap();
        let mut child = env
            .command()
            .args(["run", doc.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The step ends at once; the save of 64 GiB would take minutes.
        std::thread::sleep(Duration::from_secs(3));
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let stopped = Instant::now();
        let deadline = stopped + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("upstream went on for 15 s after the first Ctrl-C");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(130), "{err}");
        assert!(err.contains("Interrupted"), "{err}");
        assert_eq!(std::fs::read(&doc).unwrap(), before, "the document changed");
        assert!(
            walk_sizes(&env.path(".upstream/tmp")) < 1 << 20,
            "a half-saved blob was left"
        );
    });
}

#[test]
fn a_client_that_goes_away_stops_a_turn_in_its_save_and_the_daemon_stops_at_once() {
    crate::util::each_files_way(|| {
        crate::require_root_sandbox!();
        let env = Env::new();
        let daemon = Daemon::start(&env, &[]);
        let api = daemon.client(&daemon.key("t", "t"));
        let doc = "---\nartifacts: [big]\n---\n\n```bash\ntruncate -s 64G big; echo made\n```\n";
        let response = api
            .request(reqwest::Method::POST, "/v1/turns")
            .header("Accept", "application/x-ndjson")
            .json(&json!({ "document": doc }))
            .send()
            .unwrap();
        let mut events = std::io::BufRead::lines(std::io::BufReader::new(response))
            .map(|l| serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap());
        assert!(
            events.by_ref().any(|e| e["event"] == "step_finished"),
            "the step ran"
        );
        // The save has begun (its sandbox is there); the client goes.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(daemon.sandbox_dirs(), 1);
        drop(events);
        crate::serve::assert_turn_stopped(&daemon, &api);
        let started = Instant::now();
        assert!(daemon.stop().success());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "shutdown took {:?}",
            started.elapsed()
        );
    });
}

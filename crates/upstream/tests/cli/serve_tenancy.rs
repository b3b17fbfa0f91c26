//! `upstream serve` under tenants that attack each other or the daemon: limits that hold
//! under concurrency, shares of the daemon's threads, host networking, metrics, metadata
//! and internal errors.

use std::io::Write;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::serve::{Daemon, error_code, id};
use crate::util::Env;

#[test]
fn concurrent_creates_never_pass_the_per_tenant_limit() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &["--max-per-tenant", "20", "--idle-timeout", "0"]);
    let key = daemon.key("r", "racer");
    let start = Arc::new(Barrier::new(200));
    let creates: Vec<_> = (0..200)
        .map(|_| {
            let api = daemon.client(&key);
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let (status, body) = api.post("/v1/sandboxes", json!({}));
                if status == 429 {
                    assert_eq!(error_code(&body), "limit_reached", "{body}");
                    assert!(
                        body["error"]["message"]
                            .as_str()
                            .unwrap()
                            .contains("--max-per-tenant")
                    );
                }
                status
            })
        })
        .collect();
    let statuses: Vec<u16> = creates.into_iter().map(|t| t.join().unwrap()).collect();
    let made = statuses.iter().filter(|s| **s == 201).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((made, refused), (20, 180), "{statuses:?}");
    let api = daemon.client(&key);
    let (_, listed) = api.get("/v1/sandboxes");
    assert_eq!(listed["sandboxes"].as_array().unwrap().len(), 20);
    // The limit is the tenant's: another tenant still makes one, and a place freed is
    // taken again.
    let other = daemon.client(&daemon.key("o", "other"));
    other.create(json!({}));
    let first = id(&listed["sandboxes"][0]);
    assert_eq!(api.delete(&format!("/v1/sandboxes/{first}")), 204);
    api.create(json!({}));
    assert_eq!(api.post("/v1/sandboxes", json!({})).0, 429);
}

/// Sends a request on a connection of its own and leaves it unanswered.
fn send_and_leave(daemon: &Daemon, key: &str, path: &str, body: &str) -> std::net::TcpStream {
    let host = daemon.url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream
}

#[test]
fn a_tenant_that_pins_its_share_of_threads_holds_up_only_itself() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &["--max-concurrent-per-tenant", "4"]);
    let alice_key = daemon.key("a", "alice");
    let alice = daemon.client(&alice_key);
    let bob = daemon.client(&daemon.key("b", "bob"));
    // Room for more processes than the daemon has threads, over three sandboxes: without
    // a share, alice's commands alone would hold every blocking thread.
    let roomy = json!({ "limits": { "pids": 4096 } });
    let pinned: Vec<String> = (0..3).map(|_| id(&alice.create(roomy.clone()))).collect();
    let other = id(&alice.create(json!({})));
    let theirs = id(&bob.create(json!({})));

    // More slow commands than the daemon has blocking threads (1,024).
    let marker = "3599.25";
    let body = json!({ "cmd": ["sleep", marker] }).to_string();
    let flood: Vec<_> = (0..1100)
        .map(|i| {
            let path = format!("/v1/sandboxes/{}/exec", pinned[i % 3]);
            send_and_leave(&daemon, &alice_key, &path, &body)
        })
        .collect();
    assert!(
        crate::util::wait_for_processes(marker, 4, 30),
        "alice's commands did not start"
    );
    std::thread::sleep(Duration::from_millis(500));
    let running = crate::util::processes_with(marker).len();
    assert_eq!(
        running, 4,
        "alice runs as many commands at once as her share"
    );

    // Bob's exec, upload, download and deletes answer at once.
    let started = Instant::now();
    assert_eq!(bob.exec(&theirs, &["true"])["exit_code"], 0);
    let response = bob
        .request(
            reqwest::Method::PUT,
            &format!("/v1/sandboxes/{theirs}/files?path=/workspace/x.txt"),
        )
        .body("hello")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let read = bob
        .request(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{theirs}/files?path=/workspace/x.txt"),
        )
        .send()
        .unwrap();
    assert_eq!(read.text().unwrap(), "hello");
    assert_eq!(
        bob.delete(&format!(
            "/v1/sandboxes/{theirs}/files?path=/workspace/x.txt"
        )),
        204
    );
    assert_eq!(bob.delete(&format!("/v1/sandboxes/{theirs}")), 204);
    let again = id(&bob.create(json!({})));
    assert_eq!(bob.exec(&again, &["true"])["exit_code"], 0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bob waited {:?}",
        started.elapsed()
    );

    // Alice's own next command is the one that waits (on her other sandbox too).
    let waiting = alice
        .request(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{other}/exec"),
        )
        .json(&json!({ "cmd": ["true"] }))
        .timeout(Duration::from_secs(2))
        .send();
    assert!(
        waiting.as_ref().is_err_and(|e| e.is_timeout()),
        "alice's command past her share ran: {waiting:?}"
    );

    // Deleting the pinned sandboxes ends her commands and frees her share.
    for sandbox in &pinned {
        assert_eq!(alice.delete(&format!("/v1/sandboxes/{sandbox}")), 204);
    }
    assert!(crate::util::wait_for_processes(marker, 0, 20));
    drop(flood);
    let started = Instant::now();
    let (status, ran) = alice.post(
        &format!("/v1/sandboxes/{other}/exec"),
        json!({ "cmd": ["true"] }),
    );
    assert_eq!(status, 200, "{ran}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn tenants_get_the_host_network_only_where_the_operator_allows_it() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let turn = "---\nnetwork: host\n---\n# Look\n```bash\necho looked\n```\n";
    let daemon = Daemon::start(&env, &["--allow-host-network-for", "alice"]);
    let alice = daemon.client(&daemon.key("a", "alice"));
    let bob = daemon.client(&daemon.key("b", "bob"));
    // A tenant not named is refused, for a sandbox and for a turn, with how to allow it.
    for (status, body) in [
        bob.post("/v1/sandboxes", json!({ "network": "host" })),
        bob.post("/v1/turns", json!({ "document": turn })),
    ] {
        assert_eq!((status, error_code(&body)), (403, "forbidden"), "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("--allow-host-network-for bob") && message.contains("network: none"),
            "{message}"
        );
    }
    let (_, listed) = bob.get("/v1/sandboxes");
    assert_eq!(listed["sandboxes"], json!([]), "nothing was made");
    // The same tenant without the host's network, the tenant named, and the local socket
    // (the operator) are not refused.
    bob.create(json!({ "network": "none" }));
    let host = alice.create(json!({ "network": "host" }));
    assert_eq!(host["network"], "host");
    let (status, ran) = alice.post("/v1/turns", json!({ "document": turn }));
    assert_eq!(status, 200, "{ran}");
    assert_eq!(ran["turn"]["status"], "passed", "{ran}");
    let (status, local) = crate::serve::unix_request(
        &daemon.socket,
        "POST",
        "/v1/sandboxes",
        r#"{"network": "host"}"#,
    );
    assert_eq!(status, 201, "{local}");
    drop(daemon);

    // --allow-host-network lets every tenant.
    let env = Env::new();
    let daemon = Daemon::start(&env, &["--allow-host-network"]);
    let bob = daemon.client(&daemon.key("b", "bob"));
    assert_eq!(bob.create(json!({ "network": "host" }))["network"], "host");
    drop(daemon);

    // A pool with the host's network needs the opt-in at start.
    let env = Env::new();
    let out = std::process::Command::new(crate::util::BIN)
        .env("UPSTREAM_RUNTIME_DIR", &env.runtime)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pool",
            "host,network=host=1",
        ])
        .arg("--state-dir")
        .arg(env.path("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = crate::util::stderr(&out);
    assert!(
        stderr.contains("network=host") && stderr.contains("--allow-host-network"),
        "{stderr}"
    );
}

fn metrics(api: &crate::serve::Api) -> String {
    let response = api
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.text().unwrap()
}

#[test]
fn a_tenant_sees_only_its_own_metrics_and_the_operator_sees_all() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &["--operator-tenant", "ops", "--pool", "host=1"]);
    let alice = daemon.client(&daemon.key("a", "alice-corp"));
    let bob = daemon.client(&daemon.key("b", "bob-corp"));
    let ops = daemon.client(&daemon.key("o", "ops"));
    let a1 = id(&alice.create(json!({})));
    alice.create(json!({}));
    alice.exec(&a1, &["true"]);
    let b1 = id(&bob.create(json!({})));
    bob.exec(&b1, &["true"]);
    bob.exec(&b1, &["true"]);
    assert_eq!(bob.get("/v1/sandboxes/sbx_nothing").0, 404);

    let theirs = metrics(&bob);
    assert!(!theirs.contains("alice"), "{theirs}");
    assert!(!theirs.contains("tenant="), "{theirs}");
    assert!(!theirs.contains("upstream_pool"), "{theirs}");
    assert!(
        theirs.contains("upstream_sandboxes{state=\"active\"} 1\n"),
        "{theirs}"
    );
    assert!(
        theirs.contains("upstream_exec_seconds_count 2\n"),
        "{theirs}"
    );
    assert!(
        theirs.contains("upstream_errors_total{code=\"not_found\"} 1\n"),
        "{theirs}"
    );
    let mine = metrics(&alice);
    assert!(!mine.contains("bob"), "{mine}");
    assert!(
        mine.contains("upstream_sandboxes{state=\"active\"} 2\n"),
        "{mine}"
    );
    assert!(mine.contains("upstream_exec_seconds_count 1\n"), "{mine}");
    assert!(!mine.contains("not_found"), "bob's errors are his: {mine}");

    // The operator: the local socket, and keys of an --operator-tenant.
    let (status, local) = crate::serve::unix_request(&daemon.socket, "GET", "/metrics", "");
    assert_eq!(status, 200);
    for all in [local, metrics(&ops)] {
        assert!(
            all.contains("upstream_tenant_sandboxes{tenant=\"alice-corp\"} 2"),
            "{all}"
        );
        assert!(
            all.contains("upstream_tenant_sandboxes{tenant=\"bob-corp\"} 1"),
            "{all}"
        );
        assert!(
            all.contains("upstream_sandboxes{state=\"active\"} 3\n"),
            "{all}"
        );
        assert!(
            all.contains("upstream_pool_target{pool=\"host\"} 1"),
            "{all}"
        );
        assert!(all.contains("upstream_exec_seconds_count 3\n"), "{all}");
    }
}

#[test]
fn metadata_environments_and_command_lines_are_bounded() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "t"));
    let too_many: serde_json::Map<String, serde_json::Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let ok: serde_json::Map<String, serde_json::Value> = (0..64)
        .map(|i| (format!("k{i}"), json!("v".repeat(200))))
        .collect();
    for (body, names) in [
        (json!({ "metadata": too_many }), "at most 64"),
        (json!({ "metadata": { "k".repeat(200): "v" } }), "128"),
        (
            json!({ "metadata": { "job": "x".repeat(4 << 20) } }),
            "1024",
        ),
        (
            json!({ "metadata": (0..20).map(|i| (format!("k{i}"), json!("v".repeat(1000)))).collect::<serde_json::Map<_, _>>() }),
            "16384",
        ),
        (json!({ "env": { "A=B": "c" } }), "variable name"),
        (json!({ "env": { "A": "x".repeat(200 << 10) } }), "131072"),
        (json!({ "image": "x".repeat(5000) }), "1024"),
    ] {
        let (status, answer) = api.post("/v1/sandboxes", body);
        assert_eq!(
            (status, error_code(&answer)),
            (400, "bad_request"),
            "{answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{message} should name {names}");
    }
    let (_, listed) = api.get("/v1/sandboxes");
    assert_eq!(listed["sandboxes"], json!([]), "nothing refused was kept");
    // Within the bounds, metadata is kept and found.
    let sandbox = api.create(json!({ "metadata": ok }));
    assert_eq!(sandbox["metadata"]["k7"], "v".repeat(200));
    let sid = id(&sandbox);
    for (body, names) in [
        (json!({ "cmd": ["echo", "a\u{0}b"] }), "cmd[1]"),
        (json!({ "cmd": vec!["x"; 5000] }), "4096"),
        (
            json!({ "cmd": ["true"], "env": { "": "v" } }),
            "variable name",
        ),
        (json!({ "cmd": ["true"], "cwd": "/tmp/\u{0}" }), "cwd"),
    ] {
        let (status, answer) = api.post(&format!("/v1/sandboxes/{sid}/exec"), body);
        assert_eq!(
            (status, error_code(&answer)),
            (400, "bad_request"),
            "{answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{message} should name {names}");
    }
    assert_eq!(api.exec(&sid, &["echo", "fine"])["stdout"], "fine\n");
}

#[test]
fn durations_and_sizes_past_their_bounds_are_400s_and_reaping_goes_on() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "t"));
    for (body, field) in [
        (json!({ "timeout": 1e19 }), "`timeout`"),
        (json!({ "lifetime": 1e19 }), "`lifetime`"),
        (json!({ "lifetime": 1e300 }), "`lifetime`"),
        (json!({ "timeout": -1 }), "`timeout`"),
        (json!({ "limits": { "cpus": 1e300 } }), "`limits.cpus`"),
        (json!({ "limits": { "cpus": 0 } }), "`limits.cpus`"),
        (
            json!({ "limits": { "memory": 18_446_744_073_709_551_615u64 } }),
            "`limits.memory`",
        ),
        (
            json!({ "limits": { "memory": "1e300" } }),
            "`limits.memory`",
        ),
        (json!({ "limits": { "memory": 1 } }), "`limits.memory`"),
        (
            json!({ "limits": { "pids": 18_446_744_073_709_551_615u64 } }),
            "`limits.pids`",
        ),
        (json!({ "limits": { "pids": 0 } }), "`limits.pids`"),
    ] {
        let (status, answer) = api.post("/v1/sandboxes", body.clone());
        assert_eq!(
            (status, error_code(&answer)),
            (400, "bad_request"),
            "{body}: {answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{message} should name {field}");
    }
    let (status, answer) = api.post("/v1/sandboxes", json!({ "timeout": 1e19 }));
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("31536000"),
        "{status} {answer}"
    );
    let sid = id(&api.create(json!({ "timeout": 0 })));
    let (status, answer) = api.post(
        &format!("/v1/sandboxes/{sid}/exec"),
        json!({ "cmd": ["true"], "timeout": 1e19 }),
    );
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = api.post(
        &format!("/v1/sandboxes/{sid}/timeout"),
        json!({ "timeout": 1e19 }),
    );
    assert_eq!(status, 400, "{answer}");
    let (status, started) = api.post(
        &format!("/v1/sandboxes/{sid}/processes"),
        json!({ "cmd": ["sleep", "30"] }),
    );
    assert_eq!(status, 201, "{started}");
    let pid = started["pid"].as_i64().unwrap();
    let (status, answer) = api.get(&format!("/v1/sandboxes/{sid}/processes/{pid}?timeout=1e19"));
    assert_eq!(status, 400, "{answer}");
    // A signal number that would wrap into SIGKILL is refused; the command runs on.
    let (status, answer) = api.post(
        &format!("/v1/sandboxes/{sid}/processes/{pid}/signal"),
        json!({ "signal": 4_294_967_305u64 }),
    );
    assert_eq!(status, 400, "{answer}");
    let (_, process) = api.get(&format!("/v1/sandboxes/{sid}/processes/{pid}"));
    assert_eq!(process["state"], "running", "{process}");
    // The largest bound is taken, and listing shows it.
    let far = api.create(json!({ "timeout": 31_536_000, "lifetime": 31_536_000 }));
    let (status, listed) = api.get("/v1/sandboxes");
    assert_eq!(status, 200, "{listed}");
    assert!(
        listed["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == far["id"])
    );
    // The reaper is alive: a short idle timeout is still kept to.
    let brief = id(&api.create(json!({ "timeout": 0.3 })));
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.get(&format!("/v1/sandboxes/{brief}")).0 == 200 {
        assert!(
            Instant::now() < deadline,
            "the idle sandbox was never reaped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_turn_whose_numbers_are_past_their_bounds_is_a_400_at_its_place() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "t"));
    for doc in [
        "---\ntimeout: 1e300\n---\n# Go\n```bash\ntrue\n```\n",
        "---\nstep_timeout: 1e19\n---\n# Go\n```bash\ntrue\n```\n",
        "---\nmemory: 1e300\n---\n# Go\n```bash\ntrue\n```\n",
    ] {
        let (status, answer) = api.post("/v1/turns", json!({ "document": doc, "name": "big.md" }));
        assert_eq!(
            (status, error_code(&answer)),
            (400, "bad_request"),
            "{answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("big.md:2:"),
            "file:line:column: {message}"
        );
    }
    // The daemon carries on, and a turn within the bounds runs.
    let (status, ran) = api.post(
        "/v1/turns",
        json!({ "document": "---\ntimeout: 1h\n---\n# Go\n```bash\ntrue\n```\n" }),
    );
    assert_eq!(status, 200, "{ran}");
    assert_eq!(ran["turn"]["status"], "passed");
}

#[test]
fn internal_errors_name_no_host_path_and_are_logged_for_the_operator() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let mallory = daemon.client(&daemon.key("m", "mallory"));
    let alice = daemon.client(&daemon.key("a", "alice"));
    // The tenant's store cannot be opened: its place is taken by a file.
    std::fs::create_dir_all(daemon.state.join("tenants")).unwrap();
    std::fs::write(daemon.state.join("tenants/mallory"), "not a store").unwrap();
    let state = daemon.state.to_str().unwrap().to_string();
    for path in ["/v1/contexts", "/v1/turns", "/v1/artifacts"] {
        let (status, answer) = mallory.get(path);
        assert_eq!((status, error_code(&answer)), (500, "internal"), "{answer}");
        let text = answer.to_string();
        assert!(
            !text.contains(&state) && !text.contains("/tenants/"),
            "{text}"
        );
        let message = answer["error"]["message"].as_str().unwrap();
        let reference = message
            .split("reference ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .unwrap_or_else(|| panic!("no reference in {message}"));
        assert_eq!(
            answer["request_id"], reference,
            "the request's id: {answer}"
        );
        // The daemon's stderr is read by a thread of the harness: the line may come a
        // moment after the answer.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let line = loop {
            let log = daemon.log.lock().unwrap().clone();
            if let Some(line) = log
                .lines()
                .find(|l| l.contains(reference) && l.contains("ERROR"))
            {
                break line.to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line for {reference} in {log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(line.contains(&state), "the log has the detail: {line}");
    }
    let (status, turned) = mallory.post(
        "/v1/turns",
        json!({ "document": "# Go\n```bash\ntrue\n```\n" }),
    );
    assert_eq!((status, error_code(&turned)), (500, "internal"), "{turned}");
    assert!(!turned.to_string().contains(&state), "{turned}");
    // Another tenant's store is fine.
    assert_eq!(alice.get("/v1/contexts").0, 200);
}

//! What the daemon says it does: one JSON object per line with `--log-format json`, a line
//! for each request (its id, route, status, tenant) and for each sandbox made, claimed,
//! torn down and reaped; every error body carries the request's id, the one its log line
//! bears; nothing secret is logged.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::serve::Daemon;
use crate::util::Env;

/// The daemon's log lines so far, each parsed as JSON (a line that is not JSON fails).
fn lines(daemon: &Daemon) -> Vec<Value> {
    let log = daemon.log.lock().unwrap().clone();
    log.lines()
        .filter(|l| !l.starts_with("upstream serve:"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits up to 20 s for a log line that `wanted` accepts.
fn wait_for(daemon: &Daemon, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(line) = lines(daemon).into_iter().find(&wanted) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no log line {what}:\n{}",
            daemon.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_daemons_log_is_json_lines_with_each_requests_id_route_and_status() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(
        &env,
        &[
            "--log-format",
            "json",
            "--pool",
            "host=1",
            "--idle-timeout",
            "2s",
        ],
    );
    let key = daemon.key("logged", "team");
    let api = daemon.client(&key);
    // A client's own id is kept, and names the request in the log and the error body.
    let answer = api
        .request(reqwest::Method::GET, "/v1/turns/77")
        .header("x-request-id", "probe-1")
        .send()
        .unwrap();
    assert_eq!(answer.status().as_u16(), 404);
    assert_eq!(answer.headers()["x-request-id"], "probe-1");
    let body: Value = answer.json().unwrap();
    assert_eq!(body["request_id"], "probe-1", "{body}");
    let line = wait_for(&daemon, "for probe-1", |l| l["request_id"] == "probe-1");
    assert_eq!(line["route"], "/v1/turns/{turn}", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["status"], 404, "{line}");
    assert_eq!(line["tenant"], "team", "{line}");
    assert!(line["duration_ms"].is_number(), "{line}");
    assert!(line["timestamp"].is_string(), "{line}");
    // An id that is too long or not printable is replaced by one of the daemon's, which
    // the answer's header, its body and the log all carry.
    for sent in ["x".repeat(65), "two words".to_string()] {
        let answer = api
            .request(reqwest::Method::GET, "/v1/sandboxes/sbx_nope")
            .header("x-request-id", &sent)
            .send()
            .unwrap();
        assert_eq!(answer.status().as_u16(), 404);
        let id = answer.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        assert_ne!(id, sent);
        assert_eq!(id.len(), 36, "a UUID: {id}");
        let body: Value = answer.json().unwrap();
        assert_eq!(body["request_id"], id.as_str(), "{body}");
        let line = wait_for(&daemon, "for the daemon's id", |l| {
            l["request_id"] == id.as_str()
        });
        assert_eq!(
            line["route"], "/v1/sandboxes/{id}",
            "the pattern, not the path: {line}"
        );
    }
    // A request refused before any route (no key) is logged and answered with its id too.
    let anonymous = reqwest::blocking::Client::new()
        .get(format!("{}/v1/sandboxes", daemon.url))
        .send()
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    let id = anonymous.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = anonymous.json().unwrap();
    assert_eq!(body["request_id"], id.as_str());
    wait_for(&daemon, "for the refusal", |l| {
        l["request_id"] == id.as_str() && l["status"] == 401
    });
    // Sandboxes' lives: made (here from the warm pool), the pool refilled, torn down.
    wait_for(&daemon, "of the pool filled", |l| {
        l["message"] == "pool refilled" && l["pool"] == "host"
    });
    let sandbox = api.create(json!({ "timeout": 600 }));
    let sid = sandbox["id"].as_str().unwrap().to_string();
    let made = wait_for(&daemon, "of the sandbox made", |l| {
        l["sandbox"] == sid.as_str()
    });
    assert_eq!(made["tenant"], "team", "{made}");
    assert_eq!(
        made["message"], "sandbox claimed from a warm pool",
        "{made}"
    );
    assert_eq!(api.delete(&format!("/v1/sandboxes/{sid}")), 204);
    wait_for(&daemon, "of the teardown", |l| {
        l["sandbox"] == sid.as_str() && l["message"] == "sandbox torn down"
    });
    // One left idle is reaped, and the log says so.
    let idle = api.create(json!({}));
    let idle = idle["id"].as_str().unwrap().to_string();
    wait_for(&daemon, "of the reaping", |l| {
        l["sandbox"] == idle.as_str()
            && l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("reaping the sandbox"))
    });
    // A turn with a secret: its end is logged, and neither the secret nor the key is.
    let (status, ran) = api.post(
        "/v1/turns",
        json!({
            "document": "---\nsecrets: [TOKEN]\n---\n# Use\n```bash\ntest -n \"$TOKEN\"\n```\n",
            "path": "/home/someone/project/secret.md",
            "secrets": { "TOKEN": "hunter2-never-logged" },
        }),
    );
    assert_eq!(status, 200, "{ran}");
    wait_for(&daemon, "of the turn's end", |l| {
        l["message"] == "turn finished" && l["tenant"] == "team"
    });
    let log = daemon.log.lock().unwrap().clone();
    assert!(!log.contains("hunter2-never-logged"), "{log}");
    assert!(!log.contains(&key), "the API key is never logged");
    // Every line is JSON (`lines` fails on one that is not).
    assert!(lines(&daemon).len() >= 8);
}

#[test]
fn an_internal_error_names_the_request_whose_log_line_has_its_details() {
    crate::require_root_sandbox!();
    let env = Env::new();
    // The local tenant's store cannot be opened: a file is where its directory goes.
    std::fs::create_dir_all(env.path("state/tenants")).unwrap();
    std::fs::write(env.path("state/tenants/local"), "not a store").unwrap();
    let daemon = Daemon::start(&env, &["--log-format", "json"]);
    let (status, body) = crate::serve::unix_request(&daemon.socket, "GET", "/v1/turns", "");
    assert_eq!(status, 500, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let id = body["request_id"].as_str().unwrap().to_string();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("reference {id}")), "{message}");
    assert!(
        !message.contains(env.path("state").to_str().unwrap()),
        "host paths stay in the log: {message}"
    );
    // The log line under that reference has what the operator needs.
    let line = wait_for(&daemon, "of the internal error", |l| {
        l["level"] == "ERROR" && l["reference"] == id.as_str()
    });
    assert!(
        line["message"].as_str().unwrap().contains("tenants/local"),
        "{line}"
    );
}

#[test]
fn the_log_level_and_format_are_the_operators_to_choose() {
    let env = Env::new();
    for bad in [&["--log-level", "loud"][..], &["--log-format", "xml"][..]] {
        let out = env
            .command()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(
            crate::util::code(&out),
            2,
            "{bad:?}: {}",
            crate::util::stderr(&out)
        );
    }
    crate::require_root_sandbox!();
    // `error` shows no request lines; the same request at the default level does.
    let quiet = Daemon::start(&env, &["--log-format", "json", "--log-level", "error"]);
    let (status, _) = crate::serve::unix_request(&quiet.socket, "GET", "/v1/sandboxes", "");
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        lines(&quiet).iter().all(|l| l["level"] == "ERROR"),
        "{}",
        quiet.log.lock().unwrap()
    );
    drop(quiet);
    let env = Env::new();
    let text = Daemon::start(&env, &[]);
    let (status, _) = crate::serve::unix_request(&text.socket, "GET", "/v1/sandboxes", "");
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = text.log.lock().unwrap().clone();
        if log.contains("route=/v1/sandboxes") && log.contains("status=200") {
            assert!(log.contains("INFO"), "{log}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no text line for the request: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_pool_that_cannot_fill_says_why_in_the_log() {
    crate::require_root_sandbox!();
    let env = Env::new();
    // A pool of an image from a registry the daemon may not reach: once only kept for
    // `/metrics`, now a warning naming the pool and the reason.
    let daemon = Daemon::start(
        &env,
        &["--log-format", "json", "--pool", "127.0.0.1:9/nothing:1=1"],
    );
    let line = wait_for(&daemon, "of the pool's failure", |l| {
        l["level"] == "WARN" && l["pool"] == "127.0.0.1:9/nothing:1"
    });
    let message = line["message"].as_str().unwrap();
    assert!(
        message.contains("cannot prepare the pool's sandboxes"),
        "{line}"
    );
    assert!(message.contains("not public"), "{line}");
}

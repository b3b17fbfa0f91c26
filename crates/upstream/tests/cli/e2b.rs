//! E2B's control plane on `upstream serve`, driven over HTTP as the `e2b` SDKs drive it
//! (docs/e2b-wire.md, section 2): `X-API-Key`, E2B's paths and bodies, and its error shape.

use std::time::Duration;

use serde_json::{Value, json};

use crate::serve::Daemon;
use crate::util::Env;

/// A client that speaks as the SDKs do: the key as `X-API-Key`.
struct E2b {
    http: reqwest::blocking::Client,
    base: String,
    key: Option<String>,
}

impl E2b {
    fn new(daemon: &Daemon, key: Option<String>) -> E2b {
        E2b {
            http: reqwest::blocking::Client::new(),
            base: daemon.url.clone(),
            key,
        }
    }

    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            request = request.header("X-API-Key", key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, value)
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (status, _, value) = self.send(reqwest::Method::POST, path, Some(body));
        (status, value)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let (status, _, value) = self.send(reqwest::Method::GET, path, None);
        (status, value)
    }

    fn delete(&self, path: &str) -> (u16, Value) {
        let (status, _, value) = self.send(reqwest::Method::DELETE, path, None);
        (status, value)
    }
}

/// An E2B error: `{"code": <the status>, "message": <a sentence>}`.
fn assert_e2b_error(status: u16, body: &Value, expected: u16, words: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(
        body["code"], expected,
        "the body's code is the status: {body}"
    );
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(words), "{message}");
}

#[test]
fn e2b_sandboxes_are_made_found_listed_extended_and_killed() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let key = daemon.key("agent", "team");
    let e2b = E2b::new(&daemon, Some(key.clone()));

    // Made as the current SDKs make one, and as older ones do.
    let (status, made) = e2b.post(
        "/v2/sandboxes",
        json!({
            "templateID": "base", "timeout": 120, "metadata": {"user": "a&b", "run": "1"},
            "envVars": {"GREETING": "hi"}, "autoPause": false, "secure": true,
            "network": {"allowOut": []},
        }),
    );
    assert_eq!(status, 201, "{made}");
    let first = made["sandboxID"].as_str().unwrap().to_string();
    assert!(
        !first.contains('-'),
        "E2B's proxy splits host names on `-`: {first}"
    );
    assert_eq!(made["templateID"], "base");
    assert_eq!(made["envdVersion"], upstream_server::e2b::ENVD_VERSION);
    assert!(made["clientID"].is_string());
    let (status, older) = e2b.post(
        "/sandboxes",
        json!({"templateID": "base", "metadata": {"run": "2"}}),
    );
    assert_eq!(status, 201, "{older}");
    let second = older["sandboxID"].as_str().unwrap().to_string();

    // The same tenant sees it through upstream's own API, its environment in its commands.
    let api = daemon.client(&key);
    let (status, own) = api.get(&format!("/v1/sandboxes/{first}"));
    assert_eq!(status, 200, "{own}");
    assert_eq!(
        api.exec(&first, &["sh", "-c", "echo $GREETING"])["stdout"],
        "hi\n"
    );

    // Its detail: every field the SDKs require, the timeout as its end.
    let (status, detail) = e2b.get(&format!("/sandboxes/{first}"));
    assert_eq!(status, 200, "{detail}");
    for field in [
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "envdVersion",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
    ] {
        assert!(!detail[field].is_null(), "{field} missing: {detail}");
    }
    assert_eq!(detail["state"], "running");
    assert_eq!(detail["metadata"]["user"], "a&b");
    let end = |detail: &Value| {
        humantime::parse_rfc3339(detail["endAt"].as_str().unwrap())
            .unwrap()
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .as_secs()
    };
    assert!((100..=120).contains(&end(&detail)), "{detail}");

    // Listed: filtered by metadata as the SDK encodes it (each part, then the whole), and
    // paged a sandbox at a time.
    let (status, listed) = e2b.get("/v2/sandboxes?metadata=user%3Da%2526b%26run%3D1");
    assert_eq!(status, 200, "{listed}");
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [first.as_str()]);
    let (status, headers, page) = e2b.send(reqwest::Method::GET, "/v2/sandboxes?limit=1", None);
    assert_eq!(status, 200, "{page}");
    assert_eq!(page.as_array().unwrap().len(), 1);
    let token = headers["x-next-token"].to_str().unwrap().to_string();
    let (status, headers, rest) = e2b.send(
        reqwest::Method::GET,
        &format!("/v2/sandboxes?limit=1&nextToken={token}"),
        None,
    );
    assert_eq!(status, 200, "{rest}");
    assert!(
        headers.get("x-next-token").is_none(),
        "two sandboxes, two pages"
    );
    let mut both = vec![
        page[0]["sandboxID"].as_str().unwrap().to_string(),
        rest[0]["sandboxID"].as_str().unwrap().to_string(),
    ];
    both.sort();
    let mut expected = vec![first.clone(), second.clone()];
    expected.sort();
    assert_eq!(both, expected);
    let (status, paused) = e2b.get("/v2/sandboxes?state=paused");
    assert_eq!((status, paused), (200, json!([])));
    let (status, old_list) = e2b.get("/sandboxes");
    assert_eq!(status, 200);
    assert_eq!(old_list.as_array().unwrap().len(), 2);

    // Connect answers the running sandbox; a timeout lengthens its life, never shortens it.
    let (status, connected) = e2b.post(
        &format!("/v2/sandboxes/{first}/connect"),
        json!({"timeout": 600}),
    );
    assert_eq!(status, 200, "{connected}");
    assert_eq!(connected["sandboxID"], first.as_str());
    assert!(end(&e2b.get(&format!("/sandboxes/{first}")).1) > 500);
    e2b.post(
        &format!("/v2/sandboxes/{first}/connect"),
        json!({"timeout": 10}),
    );
    assert!(end(&e2b.get(&format!("/sandboxes/{first}")).1) > 500);

    // A timeout set is its life from now: past it, the sandbox is gone.
    let (status, body) = e2b.post(
        &format!("/sandboxes/{second}/timeout"),
        json!({"timeout": 1}),
    );
    assert_eq!(status, 204, "{body}");
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while e2b.get(&format!("/sandboxes/{second}")).0 == 200 {
        assert!(
            std::time::Instant::now() < until,
            "still there past its timeout"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = e2b.get(&format!("/sandboxes/{second}"));
    assert_e2b_error(status, &body, 404, "not found");

    // Killed: 204, then 404 for it, which the SDKs' kill takes as false.
    let (status, _) = e2b.delete(&format!("/sandboxes/{first}"));
    assert_eq!(status, 204);
    let (status, body) = e2b.delete(&format!("/sandboxes/{first}"));
    assert_e2b_error(status, &body, 404, "not found");
    assert_eq!(api.get(&format!("/v1/sandboxes/{first}")).0, 404);
    assert_eq!(daemon.sandbox_dirs(), 0, "nothing is left of them");
}

#[test]
fn e2b_calls_get_e2b_errors_and_other_tenants_sandboxes_stay_out_of_reach() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let mine = E2b::new(&daemon, Some(daemon.key("mine", "one")));
    let theirs = E2b::new(&daemon, Some(daemon.key("theirs", "two")));

    // No key, or a wrong one: 401 in E2B's shape, which the SDKs raise as an authentication
    // error; the control is the same call with a key, which gets in.
    let (status, body) = E2b::new(&daemon, None).get("/v2/sandboxes");
    assert_e2b_error(status, &body, 401, "X-API-Key");
    let (status, body) = E2b::new(&daemon, Some("upk_not-a-key".into())).get("/v2/sandboxes");
    assert_e2b_error(status, &body, 401, "not valid");
    assert_eq!(mine.get("/v2/sandboxes").0, 200);

    let (status, made) = mine.post("/v2/sandboxes", json!({"templateID": "base"}));
    assert_eq!(status, 201, "{made}");
    let id = made["sandboxID"].as_str().unwrap().to_string();
    // Another tenant's key finds nothing of it, kills nothing of it.
    let (status, body) = theirs.get(&format!("/sandboxes/{id}"));
    assert_e2b_error(status, &body, 404, "not found");
    let (status, body) = theirs.delete(&format!("/sandboxes/{id}"));
    assert_e2b_error(status, &body, 404, "not found");
    assert_eq!(theirs.get("/v2/sandboxes").1, json!([]));
    assert_eq!(mine.get(&format!("/sandboxes/{id}")).0, 200, "still there");

    // Bad input: a 400 that says what is wrong.
    let (status, body) = mine.post(
        "/v2/sandboxes",
        json!({"templateID": "base", "timeout": "soon"}),
    );
    assert_e2b_error(status, &body, 400, "body");
    let (status, body) = mine.post(
        "/v2/sandboxes",
        json!({"templateID": "base", "autoPause": true}),
    );
    assert_e2b_error(status, &body, 400, "autoPause");
    let (status, body) = mine.get("/v2/sandboxes?limit=0");
    assert_e2b_error(status, &body, 400, "limit");
    let (status, body) = mine.get("/v2/sandboxes?state=hibernating");
    assert_e2b_error(status, &body, 400, "state");
    let (status, body) = mine.get("/v2/sandboxes?metadata=novalue");
    assert_e2b_error(status, &body, 400, "metadata");
    let (status, body) = mine.post(&format!("/sandboxes/{id}/timeout"), json!({}));
    assert_e2b_error(status, &body, 400, "timeout");
    // What upstream does not have is named, not pretended.
    for (path, words) in [
        (format!("/sandboxes/{id}/snapshots"), "snapshots"),
        (format!("/sandboxes/{id}/fork"), "forking"),
        (format!("/sandboxes/{id}/pause"), "pausing"),
    ] {
        let (status, body) = mine.post(&path, json!({}));
        assert_e2b_error(status, &body, 501, words);
    }
    let (status, _, _) = mine.send(
        reqwest::Method::POST,
        &format!("/sandboxes/{id}/fork"),
        None,
    );
    assert_eq!(status, 501);
    assert_eq!(mine.delete(&format!("/sandboxes/{id}")).0, 204);
}

/// The Python interpreter of the virtual environment `scripts/test` installs E2B's SDK in,
/// or `None` (said why: a failure as root or in CI) where there is none.
fn e2b_python() -> Option<String> {
    match std::env::var("UPSTREAM_TEST_E2B_PYTHON") {
        Ok(python) if std::path::Path::new(&python).is_file() => Some(python),
        _ => {
            crate::util::skip(
                "SKIPPED: no E2B Python SDK: scripts/test installs it and sets $UPSTREAM_TEST_E2B_PYTHON"
                    .into(),
            );
            None
        }
    }
}

/// E2B's own Python SDK, unmodified, given only `E2B_API_URL`, `E2B_SANDBOX_URL` and
/// `E2B_API_KEY`: it makes a sandbox, reads it back, lists it, extends it and kills it, and
/// raises its own not-found exception for one killed.
#[test]
fn the_e2b_python_sdk_makes_finds_lists_extends_and_kills_sandboxes() {
    crate::require_root_sandbox!();
    let Some(python) = e2b_python() else { return };
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let key = daemon.key("sdk", "sdk");
    let script = r#"
import json
from e2b import Sandbox, SandboxQuery
from e2b.exceptions import NotFoundException
s = Sandbox.create("base", timeout=120, metadata={"who": "sdk"})
info = s.get_info()
found = Sandbox.list(query=SandboxQuery(metadata={"who": "sdk"})).next_items()
none = Sandbox.list(query=SandboxQuery(metadata={"who": "nobody"})).next_items()
s.set_timeout(600)
after = Sandbox.get_info(s.sandbox_id)
killed = s.kill()
again = Sandbox.kill(s.sandbox_id)
try:
    Sandbox.get_info(s.sandbox_id)
    gone = "still there"
except NotFoundException as e:
    gone = type(e).__name__
print(json.dumps({
    "id": s.sandbox_id, "state": info.state.value if hasattr(info.state, "value") else str(info.state),
    "metadata": info.metadata, "listed": [x.sandbox_id for x in found], "none": len(none),
    "left_before": (info.end_at - info.started_at).total_seconds(),
    "left_after": (after.end_at - info.started_at).total_seconds(),
    "killed": killed, "again": again, "gone": gone,
}))
"#;
    let out = std::process::Command::new(&python)
        .args(["-c", script])
        .env("E2B_API_URL", &daemon.url)
        .env("E2B_SANDBOX_URL", &daemon.url)
        .env("E2B_API_KEY", &key)
        .env_remove("E2B_DOMAIN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    let id = seen["id"].as_str().unwrap();
    assert!(id.starts_with("sbx_"), "{seen}");
    assert!(
        seen["state"].as_str().unwrap().contains("running"),
        "{seen}"
    );
    assert_eq!(seen["metadata"], json!({"who": "sdk"}));
    assert_eq!(seen["listed"], json!([id]));
    assert_eq!(seen["none"], 0);
    let before = seen["left_before"].as_f64().unwrap();
    let after = seen["left_after"].as_f64().unwrap();
    assert!((110.0..=121.0).contains(&before), "{seen}");
    assert!(after > 590.0, "the timeout was set: {seen}");
    assert_eq!(seen["killed"], true);
    assert_eq!(seen["again"], false, "a killed sandbox is killed no more");
    assert_eq!(seen["gone"], "SandboxNotFoundException");
    assert_eq!(daemon.sandbox_dirs(), 0);
}

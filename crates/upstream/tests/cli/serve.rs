//! `upstream serve` driven over real HTTP: a daemon per test on a free port of 127.0.0.1
//! and its own local socket, stopped (SIGTERM) at the end.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{BIN, Env};

/// A running daemon.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) url: String,
    pub(crate) socket: PathBuf,
    pub(crate) state: PathBuf,
    runtime: PathBuf,
    /// What it wrote on stderr after its first line (its log).
    pub(crate) log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    pub(crate) fn start(env: &Env, args: &[&str]) -> Daemon {
        let mut command = Command::new(BIN);
        command
            .env("UPSTREAM_RUNTIME_DIR", &env.runtime)
            .env("UPSTREAM_CACHE_DIR", env.path("cache"));
        Daemon::start_with(command, env.path("state"), env.runtime.clone(), args)
    }

    /// A daemon started by `command` (the binary, with its environment and user), its state
    /// in `state`, its sandboxes under `runtime`.
    pub(crate) fn start_with(
        mut command: Command,
        state: PathBuf,
        runtime: PathBuf,
        args: &[&str],
    ) -> Daemon {
        let socket = state.join("upstream.sock");
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (url, log) = listening(&mut child);
        Daemon {
            child,
            url,
            socket,
            state,
            runtime,
            log,
        }
    }

    pub(crate) fn key(&self, name: &str, tenant: &str) -> String {
        let out = Command::new(BIN)
            .args([
                "keys",
                "create",
                "--name",
                name,
                "--tenant",
                tenant,
                "--state-dir",
            ])
            .arg(&self.state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub(crate) fn client(&self, key: &str) -> Api {
        Api {
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            base: self.url.clone(),
            key: Some(key.to_string()),
        }
    }

    pub(crate) fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }

    pub(crate) fn sandbox_dirs(&self) -> usize {
        std::fs::read_dir(self.runtime.join("sandboxes")).map_or(0, |d| d.count())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// The address a daemon started as `child` (its stderr piped) listens on, from the line that
/// says so, and what else it writes on stderr (its log), drained so that it never blocks on
/// a full pipe.
pub(crate) fn listening(child: &mut Child) -> (String, std::sync::Arc<std::sync::Mutex<String>>) {
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    // Log lines may come before it (a socket a dead daemon left, removed): they are log.
    let mut before = String::new();
    let url = loop {
        let mut line = String::new();
        let n = lines.read_line(&mut line).unwrap();
        assert!(n > 0, "the daemon did not start: {before}");
        if line.starts_with("upstream serve: listening on ") {
            break line
                .split_whitespace()
                .find(|w| w.starts_with("http://"))
                .unwrap_or_else(|| panic!("the daemon did not start: {line}"))
                .trim_end_matches(',')
                .to_string();
        }
        before.push_str(&line);
    };
    let log = std::sync::Arc::new(std::sync::Mutex::new(before));
    let kept = log.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
            kept.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    (url, log)
}

/// A client of the API with one key.
pub(crate) struct Api {
    pub(crate) http: reqwest::blocking::Client,
    pub(crate) base: String,
    pub(crate) key: Option<String>,
}

impl Api {
    pub(crate) fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::blocking::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => builder.bearer_auth(k),
            None => builder,
        }
    }

    pub(crate) fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let text = response.text().unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub(crate) fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body))
    }

    pub(crate) fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None)
    }

    pub(crate) fn delete(&self, path: &str) -> u16 {
        self.send(reqwest::Method::DELETE, path, None).0
    }

    pub(crate) fn create(&self, body: Value) -> Value {
        let (status, sandbox) = self.post("/v1/sandboxes", body);
        assert_eq!(status, 201, "{sandbox}");
        sandbox
    }

    pub(crate) fn exec(&self, id: &str, cmd: &[&str]) -> Value {
        let (status, result) =
            self.post(&format!("/v1/sandboxes/{id}/exec"), json!({ "cmd": cmd }));
        assert_eq!(status, 200, "{result}");
        result
    }

    /// Uploads `size` zero bytes to `path` in sandbox `id`; the answer's status, or 0 when
    /// the daemon answered "no space" and closed before the whole body was sent.
    pub(crate) fn upload_zeros(&self, id: &str, path: &str, size: usize) -> u16 {
        self.request(
            reqwest::Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path={path}"),
        )
        .body(vec![0u8; size])
        .send()
        .map_or(0, |r| r.status().as_u16())
    }

    /// The size of file `path` in sandbox `id`, as `stat` there sees it (0 when missing).
    pub(crate) fn file_size(&self, id: &str, path: &str) -> u64 {
        self.exec(id, &["stat", "-c", "%s", path])["stdout"]
            .as_str()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Waits up to 20 s for a turn whose client went away to be stopped: its sandbox gone, its
/// record `interrupted`.
pub(crate) fn assert_turn_stopped(daemon: &Daemon, api: &Api) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.sandbox_dirs() > 0 {
        assert!(
            Instant::now() < deadline,
            "the turn's sandbox is still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, turns) = api.get("/v1/turns");
    let last = turns["turns"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["status"], "interrupted", "{turns}");
}

pub(crate) fn id(sandbox: &Value) -> String {
    sandbox["id"].as_str().unwrap().to_string()
}

pub(crate) fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}

#[test]
fn a_sandbox_is_made_used_listed_and_torn_down() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "acme"));
    let sandbox = api.create(json!({
        "env": { "GREETING": "hello" },
        "metadata": { "job": "build-7" },
        "limits": { "memory": "256M" },
    }));
    let sid = id(&sandbox);
    assert!(sid.starts_with("sbx_"));
    assert_eq!(sandbox["limits"]["memory"], 256 << 20);
    assert_eq!(sandbox["network"], "none");
    let ran = api.exec(
        &sid,
        &["sh", "-c", "echo $GREETING; pwd; echo oops >&2; exit 7"],
    );
    assert_eq!(ran["exit_code"], 7);
    assert_eq!(ran["stdout"], "hello\n/workspace\n");
    assert_eq!(ran["stderr"], "oops\n");
    // State carries from one exec to the next, and stdin reaches the command.
    let (_, wrote) = api.post(
        &format!("/v1/sandboxes/{sid}/exec"),
        json!({ "cmd": ["sh", "-c", "cat > kept.txt"], "stdin": "piped in" }),
    );
    assert_eq!(wrote["exit_code"], 0, "{wrote}");
    assert_eq!(api.exec(&sid, &["cat", "kept.txt"])["stdout"], "piped in");
    // Bytes as base64; not both forms, and not bad base64.
    let (_, bytes) = api.post(
        &format!("/v1/sandboxes/{sid}/exec"),
        json!({ "cmd": ["od", "-An", "-tx1"], "stdin_base64": "AP8K" }),
    );
    assert_eq!(
        bytes["stdout"].as_str().unwrap().trim(),
        "00 ff 0a",
        "{bytes}"
    );
    for body in [
        json!({ "cmd": ["cat"], "stdin": "a", "stdin_base64": "YQ==" }),
        json!({ "cmd": ["cat"], "stdin_base64": "not base64!" }),
    ] {
        let (status, refused) = api.post(&format!("/v1/sandboxes/{sid}/exec"), body);
        assert_eq!(
            (status, error_code(&refused)),
            (400, "bad_request"),
            "{refused}"
        );
    }
    // A timeout kills the command, not the sandbox.
    let (_, slow) = api.post(
        &format!("/v1/sandboxes/{sid}/exec"),
        json!({ "cmd": ["sleep", "30"], "timeout": 0.3 }),
    );
    assert_eq!(slow["timed_out"], true, "{slow}");
    assert_eq!(api.exec(&sid, &["true"])["exit_code"], 0);

    let other = api.create(json!({ "metadata": { "job": "other" } }));
    let (_, listed) = api.get("/v1/sandboxes?metadata.job=build-7");
    let ids: Vec<&str> = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![sid.as_str()]);
    let (_, all) = api.get("/v1/sandboxes");
    assert_eq!(all["sandboxes"].as_array().unwrap().len(), 2);
    let (status, got) = api.get(&format!("/v1/sandboxes/{sid}"));
    assert_eq!((status, got["id"].clone()), (200, json!(sid)));
    // A directory is deleted whole, names that are not UTF-8 included.
    let made = api.exec(
        &sid,
        &[
            "sh",
            "-c",
            "mkdir -p tree/sub && touch tree/sub/$(printf 'x\\377') tree/a",
        ],
    );
    assert_eq!(made["exit_code"], 0, "{made}");
    let status = api.delete(&format!(
        "/v1/sandboxes/{sid}/files?path=tree&recursive=true"
    ));
    assert_eq!(status, 204);
    assert_eq!(api.exec(&sid, &["ls", "-A"])["stdout"], "kept.txt\n");

    assert_eq!(api.delete(&format!("/v1/sandboxes/{sid}")), 204);
    let (status, gone) = api.get(&format!("/v1/sandboxes/{sid}"));
    assert_eq!((status, error_code(&gone)), (404, "not_found"));
    assert_eq!(api.delete(&format!("/v1/sandboxes/{sid}")), 404);
    assert_eq!(daemon.sandbox_dirs(), 1, "only the other sandbox is left");
    drop(other);
    // Stopping the daemon tears the rest down.
    assert!(daemon.stop().success());
    env.assert_gone("upstream-init");
}

#[test]
fn keys_and_tenants_keep_sandboxes_apart() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let alice = daemon.client(&daemon.key("a", "alice"));
    let bob = daemon.client(&daemon.key("b", "bob"));
    let sandbox = id(&alice.create(json!({})));

    // Bob cannot see, use, read or delete it: it does not exist for him.
    for (status, body) in [
        bob.get(&format!("/v1/sandboxes/{sandbox}")),
        bob.post(
            &format!("/v1/sandboxes/{sandbox}/exec"),
            json!({ "cmd": ["true"] }),
        ),
        bob.get(&format!("/v1/sandboxes/{sandbox}/files?path=/etc/hostname")),
        bob.post(
            &format!("/v1/sandboxes/{sandbox}/timeout"),
            json!({ "timeout": 5 }),
        ),
    ] {
        assert_eq!((status, error_code(&body)), (404, "not_found"), "{body}");
    }
    assert_eq!(bob.delete(&format!("/v1/sandboxes/{sandbox}")), 404);
    let (_, listed) = bob.get("/v1/sandboxes");
    assert_eq!(listed["sandboxes"], json!([]));
    assert_eq!(alice.exec(&sandbox, &["true"])["exit_code"], 0);

    // No key, a made-up key, a revoked key: 401 with a JSON error that says what to do.
    let anonymous = Api {
        key: None,
        ..daemon.client("")
    };
    let (status, body) = anonymous.get("/v1/sandboxes");
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Bearer")
    );
    let forged = daemon.client("ups_0000000000000000000000000000000000000000000000000");
    assert_eq!(forged.get("/v1/sandboxes").0, 401);
    let out = Command::new(BIN)
        .args(["keys", "revoke", "b", "--state-dir"])
        .arg(&daemon.state)
        .output()
        .unwrap();
    assert!(out.status.success());
    let (status, _) = bob.get("/v1/sandboxes");
    assert_eq!(status, 401, "a revoked key stops working at once");
    // The keys file never holds a key.
    let listed = Command::new(BIN)
        .args(["keys", "ls", "--json", "--state-dir"])
        .arg(&daemon.state)
        .output()
        .unwrap();
    let keys: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    assert!(keys[1]["revoked_at"].is_number());

    // The local socket needs no key, and is its own tenant; it is the daemon user's only.
    let mode = std::fs::metadata(&daemon.socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    let (status, local) = unix_request(&daemon.socket, "GET", "/v1/sandboxes", "");
    assert_eq!(status, 200, "{local}");
    assert_eq!(
        serde_json::from_str::<Value>(&local).unwrap()["sandboxes"],
        json!([])
    );
}

/// One HTTP/1.1 request over a Unix socket; (status, body).
pub(crate) fn unix_request(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: local\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn streamed_output_comes_in_order_and_ends_with_the_exit() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "t"));
    let sid = id(&api.create(json!({})));
    let started = Instant::now();
    let response = api
        .request(reqwest::Method::POST, &format!("/v1/sandboxes/{sid}/exec"))
        .header("Accept", "application/x-ndjson")
        .json(&json!({ "cmd": ["sh", "-c",
            "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; sleep 0.2; done; exit 2"] }))
        .send()
        .unwrap();
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let mut lines = Vec::new();
    let mut first_at = None;
    for line in BufReader::new(response).lines() {
        let line = line.unwrap();
        first_at.get_or_insert_with(|| started.elapsed());
        lines.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    // The first line arrived while the command still ran (it takes a second).
    assert!(
        first_at.unwrap() < Duration::from_millis(800),
        "{first_at:?}"
    );
    let out: Vec<&str> = lines.iter().filter_map(|l| l["stdout"].as_str()).collect();
    assert_eq!(out.concat(), "out1\nout2\nout3\nout4\nout5\n");
    let err: Vec<&str> = lines.iter().filter_map(|l| l["stderr"].as_str()).collect();
    assert_eq!(err.concat(), "err1\nerr2\nerr3\nerr4\nerr5\n");
    // out1 comes before err2 comes before out3: the streams interleave as written.
    let position = |key: &str, text: &str| {
        lines
            .iter()
            .position(|l| l[key].as_str().is_some_and(|s| s.contains(text)))
            .unwrap()
    };
    assert!(position("stdout", "out1") < position("stderr", "err2"));
    assert!(position("stderr", "err2") < position("stdout", "out3"));
    let last = lines.last().unwrap();
    assert_eq!(last["exit"]["exit_code"], 2, "{last}");

    // The same as server-sent events: each object a `data:` line under an `event:` naming
    // its kind, an empty line after each.
    let response = api
        .request(reqwest::Method::POST, &format!("/v1/sandboxes/{sid}/exec"))
        .header("Accept", "text/event-stream")
        .json(&json!({ "cmd": ["sh", "-c", "echo 'a\nb'; echo e >&2; exit 1"] }))
        .send()
        .unwrap();
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let text = response.text().unwrap();
    let events: Vec<(&str, Value)> = text
        .split_terminator("\n\n")
        .map(|block| {
            let (event, data) = block.split_once('\n').unwrap();
            let kind = event.strip_prefix("event: ").unwrap();
            let data = data.strip_prefix("data: ").unwrap();
            (kind, serde_json::from_str(data).unwrap())
        })
        .collect();
    let stdout: String = events
        .iter()
        .filter(|(kind, _)| *kind == "stdout")
        .map(|(_, v)| v["stdout"].as_str().unwrap())
        .collect();
    assert_eq!(stdout, "a\nb\n", "{text}");
    assert!(
        events
            .iter()
            .any(|(kind, v)| *kind == "stderr" && v["stderr"] == "e\n")
    );
    let (kind, exit) = events.last().unwrap();
    assert_eq!(
        (*kind, &exit["exit"]["exit_code"]),
        ("exit", &json!(1)),
        "{text}"
    );
}

#[test]
fn background_processes_run_on_and_are_read_signalled_and_waited_for() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "t"));
    let sid = id(&api.create(json!({})));
    let (status, process) = api.post(
        &format!("/v1/sandboxes/{sid}/processes"),
        json!({ "cmd": ["sh", "-c", "echo ready; echo warn >&2; exec sleep 60"] }),
    );
    assert_eq!(status, 201, "{process}");
    let pid = process["pid"].as_i64().unwrap();
    // Other commands run meanwhile.
    assert_eq!(
        api.exec(&sid, &["echo", "meanwhile"])["stdout"],
        "meanwhile\n"
    );
    let read = |stream: &str, offset: u64| {
        api.request(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{sid}/processes/{pid}/output?stream={stream}&offset={offset}"),
        )
        .send()
        .unwrap()
        .text()
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while read("stdout", 0).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(read("stdout", 0), "ready\n");
    assert_eq!(read("stdout", 2), "ady\n");
    assert_eq!(read("stderr", 0), "warn\n");
    let (_, state) = api.get(&format!("/v1/sandboxes/{sid}/processes/{pid}"));
    assert_eq!(state["state"], "running");
    let (status, _) = api.post(
        &format!("/v1/sandboxes/{sid}/processes/{pid}/signal"),
        json!({ "signal": "TERM" }),
    );
    assert_eq!(status, 204);
    let (_, ended) = api.get(&format!("/v1/sandboxes/{sid}/processes/{pid}?timeout=10"));
    assert_eq!(ended["state"], "exited", "{ended}");
    assert_eq!(ended["signal"], 15);
    let (_, listed) = api.get(&format!("/v1/sandboxes/{sid}/processes"));
    assert_eq!(listed["processes"][0]["pid"], pid);
    let (status, body) = api.get(&format!("/v1/sandboxes/{sid}/processes/99999"));
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = api.post(
        &format!("/v1/sandboxes/{sid}/processes/{pid}/signal"),
        json!({ "signal": "NOPE" }),
    );
    assert_eq!((status, error_code(&body)), (400, "bad_request"));
}

#[test]
fn commands_in_one_sandbox_run_side_by_side_and_waiting_blocks_nothing() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "t"));
    let sid = id(&api.create(json!({})));
    // Four commands that each wait for all four to have started: they end only if they run
    // at once.
    let script = "touch /tmp/started.$N; \
                  until [ $(ls /tmp | grep -c '^started') -ge 4 ]; do sleep 0.01; done; echo $N";
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..4)
            .map(|n| {
                let (api, sid) = (&api, &sid);
                scope.spawn(move || {
                    api.post(
                        &format!("/v1/sandboxes/{sid}/exec"),
                        json!({ "cmd": ["sh", "-c", script], "env": { "N": n.to_string() },
                                "timeout": 30 }),
                    )
                })
            })
            .collect();
        for (n, run) in runs.into_iter().enumerate() {
            let (status, result) = run.join().unwrap();
            assert_eq!(status, 200, "{result}");
            assert_eq!(result["exit_code"], 0, "{result}");
            assert_eq!(result["stdout"], format!("{n}\n"));
        }
    });
    // The helpers of the sessions closed after them are reaped as they end: no zombie waits
    // for the agent's next request.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ps = api.exec(&sid, &["ps", "-e", "-o", "stat=,pid=,comm="]);
        let text = ps["stdout"].as_str().unwrap().to_string();
        if !text.lines().any(|l| l.trim_start().starts_with('Z')) {
            break;
        }
        assert!(Instant::now() < deadline, "zombies are left: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A client waiting for a background command holds nothing up: other commands, files and
    // signals go through meanwhile, and the wait sees the end.
    let (status, process) = api.post(
        &format!("/v1/sandboxes/{sid}/processes"),
        json!({ "cmd": ["sleep", "60"] }),
    );
    assert_eq!(status, 201, "{process}");
    let pid = process["pid"].as_i64().unwrap();
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| {
            let started = Instant::now();
            let (_, ended) = api.get(&format!("/v1/sandboxes/{sid}/processes/{pid}?timeout=30"));
            (ended, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        assert_eq!(
            api.exec(&sid, &["echo", "meanwhile"])["stdout"],
            "meanwhile\n"
        );
        let (status, _) = api.get(&format!("/v1/sandboxes/{sid}/files/list?path=/tmp"));
        assert_eq!(status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the exec waited for the wait: {:?}",
            started.elapsed()
        );
        assert!(
            !waiting.is_finished(),
            "the wait ended before the command did"
        );
        let (status, _) = api.post(
            &format!("/v1/sandboxes/{sid}/processes/{pid}/signal"),
            json!({ "signal": "KILL" }),
        );
        assert_eq!(status, 204);
        let (ended, took) = waiting.join().unwrap();
        assert_eq!(ended["state"], "exited", "{ended}");
        assert_eq!(ended["signal"], 9);
        assert!(took < Duration::from_secs(20), "the wait took {took:?}");
    });
    // Commands that came and went leave no helper behind but the two kept for the next
    // (one of them runs ps) beside the agent.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ps = api.exec(&sid, &["ps", "-e", "-o", "pid=,comm="]);
        let text = ps["stdout"].as_str().unwrap();
        let ours = text.lines().filter(|l| l.contains("upstream")).count();
        assert!(ours >= 2, "the agent and a helper run: {text}");
        if ours <= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "helpers are left: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(api.delete(&format!("/v1/sandboxes/{sid}")), 204);
    drop(api);
    assert!(daemon.stop().success());
    env.assert_gone("upstream-init");
}

#[test]
fn the_agent_and_its_helpers_are_out_of_reach_of_commands() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "t"));
    let sid = id(&api.create(json!({})));
    // The command's parent is the helper serving its session; pid 1 is the agent. Neither
    // their descriptors (the host connections), memory, environment nor ptrace are reachable.
    let script = r#"for pid in 1 $PPID; do
  for p in /proc/$pid/fd /proc/$pid/root/etc; do
    ls "$p" >/dev/null 2>&1 && echo "OPENED $p" || echo "refused $p"
  done
  for p in /proc/$pid/environ /proc/$pid/maps /proc/$pid/mem; do
    head -c 1 "$p" >/dev/null 2>&1 && echo "OPENED $p" || echo "refused $p"
  done
  for fd in 3 4 5 6 7 8; do
    { echo frame > /proc/$pid/fd/$fd; } 2>/dev/null && echo "OPENED $pid fd $fd"
  done
  python3 -c "
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
print('OPENED ptrace' if libc.ptrace(16, int(sys.argv[1]), 0, 0) == 0 else 'refused ptrace')
" $pid
done
ps -o comm= -p $PPID"#;
    let (status, ran) = api.post(
        &format!("/v1/sandboxes/{sid}/exec"),
        json!({ "cmd": ["bash", "-c", script] }),
    );
    assert_eq!(status, 200, "{ran}");
    let out = ran["stdout"].as_str().unwrap();
    assert!(!out.contains("OPENED"), "{out}");
    assert_eq!(out.matches("refused").count(), 12, "{out}");
    assert!(
        out.trim_end().ends_with("upstream"),
        "the parent is a helper: {out}"
    );
    // The sandbox still works after the attempts.
    assert_eq!(api.exec(&sid, &["echo", "fine"])["stdout"], "fine\n");
}

#[test]
fn a_daemon_runs_rootless_as_an_unprivileged_user() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    crate::require_root_sandbox!();
    let env = Env::new();
    let nobody = 65534;
    let work = env.path("nobody");
    std::fs::create_dir(&work).unwrap();
    std::os::unix::fs::chown(&work, Some(nobody), Some(nobody)).unwrap();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut command = Command::new(crate::util::binary_for_nobody(&env));
    command
        .current_dir(&work)
        .env("UPSTREAM_RUNTIME_DIR", work.join("runtime"))
        .env("UPSTREAM_CACHE_DIR", work.join("cache"))
        .env("HOME", &work)
        .uid(nobody)
        .gid(nobody);
    let daemon = Daemon::start_with(command, work.join("state"), work.join("runtime"), &[]);
    let call = |method: &str, path: &str, body: &str| {
        let (status, text) = unix_request(&daemon.socket, method, path, body);
        (
            status,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
        )
    };
    let (status, made) = call("POST", "/v1/sandboxes", "{}");
    if status != 201 && made.to_string().contains("cannot create a user namespace") {
        crate::util::skip(
            "SKIPPED: rootless daemon: this kernel does not allow unprivileged user namespaces"
                .into(),
        );
        return;
    }
    assert_eq!(status, 201, "{made}");
    let sid = id(&made);
    let exec = |cmd: &str| {
        let (status, ran) = call(
            "POST",
            &format!("/v1/sandboxes/{sid}/exec"),
            &json!({ "cmd": ["sh", "-c", cmd] }).to_string(),
        );
        assert_eq!(status, 200, "{ran}");
        ran
    };
    // Root inside, nobody outside: the host's secrets stay unreadable.
    assert_eq!(exec("id -u")["stdout"], "0\n");
    let shadow = exec("cat /etc/shadow");
    assert_ne!(shadow["exit_code"], 0, "{shadow}");
    // Files go in and out through the host side, as the sandbox's root.
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    let body = "rootless data\n";
    write!(
        stream,
        "PUT /v1/sandboxes/{sid}/files?path=/workspace/in.txt HTTP/1.1\r\nHost: local\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 20"), "{answer}");
    assert_eq!(
        exec("cat /workspace/in.txt; stat -c %u /workspace/in.txt")["stdout"],
        "rootless data\n0\n"
    );
    let (status, listed) = call(
        "GET",
        &format!("/v1/sandboxes/{sid}/files/list?path=/workspace"),
        "",
    );
    assert_eq!(status, 200, "{listed}");
    assert!(listed.to_string().contains("in.txt"), "{listed}");
    let (status, _) = call("DELETE", &format!("/v1/sandboxes/{sid}"), "");
    assert_eq!(status, 204);
    assert_eq!(daemon.sandbox_dirs(), 0);
    assert!(daemon.stop().success());
}

/// A body of `len` bytes made as it is read: nothing of it is held in memory.
struct Pattern {
    left: u64,
    hasher: blake3::Hasher,
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = ((self.left as usize - i) % 251) as u8;
        }
        self.hasher.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_gigabyte_file_goes_in_and_out_streamed_with_memory_flat() {
    crate::util::each_files_way(|| {
        crate::require_root_sandbox!();
        const SIZE: u64 = 1 << 30;
        let env = Env::new();
        let daemon = Daemon::start(&env, &[]);
        let api = daemon.client(&daemon.key("t", "t"));
        let sid = id(&api.create(json!({})));
        let mut pattern = Pattern {
            left: SIZE,
            hasher: blake3::Hasher::new(),
        };
        let sent_hash = {
            let (reader, writer) = std::io::pipe().unwrap();
            let feeder = std::thread::spawn(move || {
                let mut writer = writer;
                std::io::copy(&mut pattern, &mut writer).unwrap();
                pattern.hasher.finalize()
            });
            let response = api
                .request(
                    reqwest::Method::PUT,
                    &format!("/v1/sandboxes/{sid}/files?path=big/blob.bin"),
                )
                .body(reqwest::blocking::Body::new(reader))
                .send()
                .unwrap();
            assert_eq!(response.status().as_u16(), 201);
            let written: Value = response.json().unwrap();
            assert_eq!(written["size"], SIZE);
            feeder.join().unwrap()
        };
        // The command in the sandbox sees it whole.
        let size = api.exec(&sid, &["stat", "-c", "%s", "big/blob.bin"]);
        assert_eq!(size["stdout"], format!("{SIZE}\n"));
        let mut response = api
            .request(
                reqwest::Method::GET,
                &format!("/v1/sandboxes/{sid}/files?path=/workspace/big/blob.bin"),
            )
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = response.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got += n as u64;
            hasher.update(&buf[..n]);
        }
        assert_eq!(got, SIZE);
        assert_eq!(hasher.finalize(), sent_hash);
        let peak = peak_rss_kib(daemon.child.id());
        assert!(
            peak < 128 * 1024,
            "the daemon peaked at {peak} KiB moving 1 GiB"
        );

        // Listing, deleting, and what cannot be done.
        let (_, listing) = api.get(&format!("/v1/sandboxes/{sid}/files/list?path=big"));
        assert_eq!(listing["entries"][0]["name"], "blob.bin");
        assert_eq!(listing["entries"][0]["size"], SIZE);
        let (status, body) = api.send(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{sid}/files?path=big"),
            None,
        );
        assert_eq!((status, error_code(&body)), (409, "conflict"));
        assert_eq!(
            api.delete(&format!(
                "/v1/sandboxes/{sid}/files?path=big&recursive=true"
            )),
            204
        );
        let (status, body) = api.get(&format!("/v1/sandboxes/{sid}/files?path=big/blob.bin"));
        assert_eq!((status, error_code(&body)), (404, "not_found"));
    });
}

#[test]
fn files_never_lead_out_of_the_sandbox() {
    crate::util::each_files_way(|| {
        crate::require_root_sandbox!();
        let env = Env::new();
        let secret = env.write("host-secret.txt", "host only\n");
        let daemon = Daemon::start(&env, &[]);
        let api = daemon.client(&daemon.key("t", "t"));
        let sid = id(&api.create(json!({})));
        // Links planted in the sandbox, pointing at the host's file and at the host's root.
        let plant = format!(
            "ln -s {} /workspace/escape && ln -s / /workspace/root && ln -s ../../../../.. /workspace/up",
            secret.display()
        );
        assert_eq!(api.exec(&sid, &["sh", "-c", &plant])["exit_code"], 0);
        for path in [
            "escape".to_string(),
            format!("root{}", secret.display()),
            format!("up{}", secret.display()),
            format!("../../..{}", secret.display()),
            secret.display().to_string(),
        ] {
            let (status, body) = api.get(&format!("/v1/sandboxes/{sid}/files?path={path}"));
            assert_ne!(status, 200, "{path} read the host's file: {body}");
        }
        // Writes through them land inside the sandbox, if anywhere.
        for path in ["escape", "root/tmp/planted", "up/tmp/planted2"] {
            let _ = api
                .request(
                    reqwest::Method::PUT,
                    &format!("/v1/sandboxes/{sid}/files?path={path}"),
                )
                .body("overwritten")
                .send()
                .unwrap();
        }
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host only\n");
        assert!(!std::path::Path::new("/tmp/planted").exists());
        assert!(!std::path::Path::new("/tmp/planted2").exists());
    });
}

#[test]
fn the_warm_pool_hands_out_ready_sandboxes_and_refills() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(
        &env,
        &[
            "--pool",
            "host=2",
            "--pool",
            "host,memory=256M,network=none=1",
        ],
    );
    let api = daemon.client(&daemon.key("t", "t"));
    // Pools are the operator's figures: the local socket sees them.
    let socket = daemon.socket.clone();
    let pool_ready = |_: &Api| {
        let (_, text) = unix_request(&socket, "GET", "/metrics", "");
        text.lines()
            .find_map(|l| l.strip_prefix("upstream_pool_ready{pool=\"host\"} "))
            .map(|n| n.parse::<usize>().unwrap())
            .unwrap()
    };
    let wait_full = |api: &Api| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while pool_ready(api) < 2 {
            assert!(Instant::now() < deadline, "the pool never filled");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_full(&api);
    let first = api.create(json!({}));
    let second = api.create(json!({}));
    assert_eq!(first["from_pool"], true, "{first}");
    assert_eq!(second["from_pool"], true, "{second}");
    // A sandbox of another shape is made on the spot; one of the second pool's comes
    // from that pool.
    let other = api.create(json!({ "limits": { "memory": "128M" } }));
    assert_eq!(other["from_pool"], false);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut given_back = 0;
    loop {
        let shaped = api.create(json!({ "limits": { "memory": 256 << 20 } }));
        if shaped["from_pool"] == true {
            break;
        }
        // Not filled yet: this one was made, and is given back.
        api.delete(&format!("/v1/sandboxes/{}", id(&shaped)));
        given_back += 1;
        assert!(Instant::now() < deadline, "the shaped pool never filled");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The pool refills by itself, and pooled sandboxes work.
    wait_full(&api);
    let third = api.create(json!({}));
    assert_eq!(third["from_pool"], true);
    assert_eq!(api.exec(&id(&third), &["echo", "ok"])["stdout"], "ok\n");
    // A turn takes its sandbox from the pool too.
    wait_full(&api);
    let (status, turn) = api.post(
        "/v1/turns",
        json!({ "document": "# T\n```bash\necho turn-ran\n```\n" }),
    );
    assert_eq!(status, 200, "{turn}");
    assert!(turn["document"].as_str().unwrap().contains("turn-ran"));
    let metrics = api
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .unwrap()
        .text()
        .unwrap();
    // Four API sandboxes and the turn's from the pools; the rest made on the spot.
    assert!(
        metrics.contains("upstream_sandboxes_handed_out_total{source=\"pool\"} 5"),
        "{metrics}"
    );
    let made = format!(
        "upstream_sandboxes_handed_out_total{{source=\"made\"}} {}",
        1 + given_back
    );
    assert!(metrics.contains(&made), "{metrics}");
    assert!(
        metrics.contains("upstream_sandboxes{state=\"active\"} 5"),
        "{metrics}"
    );
    let (_, operator) = unix_request(&daemon.socket, "GET", "/metrics", "");
    assert!(
        operator.contains("upstream_pool_target{pool=\"host memory=268435456\"} 1"),
        "{operator}"
    );
}

#[test]
fn idle_sandboxes_and_ones_past_their_lifetime_are_reaped() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "t"));
    let idle = id(&api.create(json!({ "timeout": 0.5 })));
    let lifetime = id(&api.create(json!({ "timeout": 0, "lifetime": 1 })));
    let forever = id(&api.create(json!({ "timeout": 0 })));
    let busy = id(&api.create(json!({ "timeout": 2 })));
    // A command longer than the idle timeout keeps its sandbox.
    assert_eq!(api.exec(&busy, &["sleep", "3"])["exit_code"], 0);
    let (status, _) = api.get(&format!("/v1/sandboxes/{idle}"));
    assert_eq!(status, 404, "idle past its timeout");
    assert_eq!(
        api.get(&format!("/v1/sandboxes/{lifetime}")).0,
        404,
        "past its lifetime"
    );
    let (status, _) = api.get(&format!("/v1/sandboxes/{busy}"));
    assert_eq!(status, 200, "in use until a moment ago");
    // Extending the timeout.
    let (status, extended) = api.post(
        &format!("/v1/sandboxes/{busy}/timeout"),
        json!({ "timeout": 60 }),
    );
    assert_eq!(status, 200);
    assert_eq!(extended["timeout"], 60.0);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(api.get(&format!("/v1/sandboxes/{busy}")).0, 200);
    assert_eq!(api.get(&format!("/v1/sandboxes/{forever}")).0, 200);
    assert_eq!(
        daemon.sandbox_dirs(),
        2,
        "the reaped ones left nothing behind"
    );
}

#[test]
fn limits_on_sandboxes_answer_429() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &["--max-per-tenant", "2", "--max-sandboxes", "3"]);
    let a = daemon.client(&daemon.key("a", "a"));
    let b = daemon.client(&daemon.key("b", "b"));
    a.create(json!({}));
    a.create(json!({}));
    let (status, body) = a.post("/v1/sandboxes", json!({}));
    assert_eq!((status, error_code(&body)), (429, "limit_reached"));
    b.create(json!({}));
    let (status, body) = b.post("/v1/sandboxes", json!({}));
    assert_eq!((status, error_code(&body)), (429, "limit_reached"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-sandboxes")
    );
}

#[test]
fn bad_requests_get_clear_4xx_and_the_server_carries_on() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &["--max-body", "1M"]);
    let key = daemon.key("t", "t");
    let api = daemon.client(&key);
    let raw = |body: &str, content_type: &str| {
        let response = api
            .request(reqwest::Method::POST, "/v1/sandboxes")
            .header("Content-Type", content_type)
            .body(body.to_string())
            .send()
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().unwrap())
    };
    let (status, body) = raw("{not json", "application/json");
    assert_eq!((status, error_code(&body)), (400, "bad_request"), "{body}");
    let (status, body) = raw(r#"{"imag": "host"}"#, "application/json");
    assert!(status == 400 || status == 422, "{status}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("imag"),
        "names the unknown field: {body}"
    );
    let (status, body) = raw("{}", "text/plain");
    assert_eq!(status, 415, "{body}");
    let (status, body) = raw(r#"{"network": "wifi"}"#, "application/json");
    assert_eq!((status, error_code(&body)), (400, "bad_request"));
    let (status, body) = raw(r#"{"limits": {"cpus": -1}}"#, "application/json");
    assert_eq!((status, error_code(&body)), (400, "bad_request"));
    let huge = format!(r#"{{"metadata": {{"x": "{}"}}}}"#, "a".repeat(2 << 20));
    let (status, body) = raw(&huge, "application/json");
    assert_eq!((status, error_code(&body)), (413, "too_large"), "{body}");
    // The unread rest of the body ends the connection, and the answer says so.
    let response = api
        .request(reqwest::Method::POST, "/v1/sandboxes")
        .header("Content-Type", "application/json")
        .body(huge.clone())
        .send()
        .unwrap();
    assert_eq!(response.headers()["connection"], "close");
    let (status, body) = api.get("/v1/nothing-here");
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let sid = id(&api.create(json!({})));
    let (status, body) = api.post(&format!("/v1/sandboxes/{sid}/exec"), json!({ "cmd": [] }));
    assert_eq!((status, error_code(&body)), (400, "bad_request"));
    let (status, body) = api.post(
        &format!("/v1/sandboxes/{sid}/exec"),
        json!({ "cmd": ["no-such-program"] }),
    );
    assert!(status >= 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-program")
    );

    // Slow clients: connections that send half a request and wait do not hold others up.
    let host = daemon.url.trim_start_matches("http://").to_string();
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut s = std::net::TcpStream::connect(&host).unwrap();
        s.write_all(b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            .unwrap();
        stalled.push(s);
    }
    let started = Instant::now();
    assert_eq!(api.exec(&sid, &["true"])["exit_code"], 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(stalled);
    let (status, _) = api.get("/v1/sandboxes");
    assert_eq!(status, 200);
}

#[test]
fn turns_run_over_http_with_their_own_secrets_and_records_per_tenant() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let alice = daemon.client(&daemon.key("a", "alice"));
    let bob = daemon.client(&daemon.key("b", "bob"));
    let doc = "---\ncontext: research\nsecrets: [TOKEN]\nartifacts: [notes.txt]\n---\n# Fetch\n```bash\necho \"token $TOKEN\" > notes.txt; cat notes.txt\n```\n";
    // A secret the request does not give is missing, even if the daemon's environment has
    // one of that name (HOME, here): a tenant never reads the daemon's environment.
    let leaky = doc.replace("TOKEN", "HOME");
    let (status, body) = alice.post("/v1/turns", json!({ "document": leaky }));
    assert_eq!((status, error_code(&body)), (400, "bad_request"), "{body}");
    let (status, ran) = alice.post(
        "/v1/turns",
        json!({ "document": doc, "secrets": { "TOKEN": "s3cret" }, "name": "fetch.md" }),
    );
    assert_eq!(status, 200, "{ran}");
    let written = ran["document"].as_str().unwrap();
    assert!(
        written.starts_with(doc),
        "the document comes back with results after it"
    );
    assert!(
        written.contains("token [redacted]") || !written.contains("s3cret"),
        "{written}"
    );
    assert_eq!(ran["turn"]["status"], "passed");
    assert_eq!(
        ran["turn"]["store"], "tenants/alice",
        "no path of the daemon's host"
    );
    let (_, turns) = alice.get("/v1/turns?context=research");
    assert_eq!(turns["turns"].as_array().unwrap().len(), 1);
    assert!(
        turns["turns"][0]["document"]
            .as_str()
            .unwrap()
            .ends_with("fetch.md")
    );
    let (_, artifacts) = alice.get("/v1/artifacts?context=research");
    assert_eq!(
        artifacts["artifacts"][0]["path"], "notes.txt",
        "{artifacts}"
    );
    let (status, one) = alice.get("/v1/turns/1");
    assert_eq!(status, 200, "{one}");
    let host_path = daemon.state.to_str().unwrap();
    for answer in [&one, &turns, &artifacts] {
        assert!(!answer.to_string().contains(host_path), "{answer}");
    }
    let (_, contexts) = alice.get("/v1/contexts");
    assert_eq!(contexts["contexts"][0]["name"], "research", "{contexts}");
    // The same as a multipart form, the document as a file; and as raw markdown.
    let form = reqwest::blocking::multipart::Form::new()
        .part(
            "document",
            reqwest::blocking::multipart::Part::text(doc.to_string()).file_name("fetch.md"),
        )
        .text("secrets", r#"{"TOKEN": "again"}"#);
    let response = alice
        .request(reqwest::Method::POST, "/v1/turns")
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let ran: Value = response.json().unwrap();
    assert_eq!(ran["turn"]["status"], "passed", "{ran}");
    assert!(
        ran["turn"]["document"]
            .as_str()
            .unwrap()
            .ends_with("fetch.md")
    );
    let response = alice
        .request(reqwest::Method::POST, "/v1/turns")
        .header("Content-Type", "text/markdown")
        .body("# Plain\n```sh\necho plain\n```\n")
        .send()
        .unwrap();
    let ran: Value = response.json().unwrap();
    assert_eq!(ran["turn"]["status"], "passed", "{ran}");
    let (_, turns) = alice.get("/v1/turns");
    assert_eq!(turns["turns"].as_array().unwrap().len(), 3);
    // Bob's store is his own.
    let (_, none) = bob.get("/v1/turns");
    assert_eq!(none["turns"], json!([]));
    let (status, _) = bob.get("/v1/turns/1");
    assert_eq!(status, 404);
    // A bad document is a 400 naming the line.
    let (status, bad) = alice.post("/v1/turns", json!({ "document": "---\nimage: [\n---\n" }));
    assert_eq!((status, error_code(&bad)), (400, "bad_request"));
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("turn.md:"),
        "{bad}"
    );
}

#[test]
fn a_streamed_turn_shows_its_progress_as_it_runs_and_stops_when_the_client_goes() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "t"));
    let lines = |response: reqwest::blocking::Response| {
        BufReader::new(response)
            .lines()
            .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap())
    };
    let doc = "# Count\n```bash\necho one; echo '::' >&2\n```\n# Fail\n```bash\nexit 3\n```\n";
    let response = api
        .request(reqwest::Method::POST, "/v1/turns")
        .header("Accept", "application/x-ndjson")
        .json(&json!({ "document": doc }))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let seen: Vec<Value> = lines(response).collect();
    let kinds: Vec<String> = seen
        .iter()
        .map(|e| match e["event"].as_str() {
            Some(kind) => kind.to_string(),
            None => e.as_object().unwrap().keys().next().unwrap().clone(),
        })
        .filter(|k| k != "output")
        .collect();
    assert_eq!(
        kinds,
        [
            "sandbox_ready",
            "step_started",
            "step_finished",
            "step_started",
            "step_finished",
            "result"
        ],
        "{seen:?}"
    );
    let outputs: String = seen
        .iter()
        .filter(|e| e["event"] == "output" && e["stream"] == "stdout")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(outputs, "one\n");
    let second = seen
        .iter()
        .find(|e| e["event"] == "step_finished" && e["record"]["number"] == 2)
        .unwrap();
    assert_eq!(second["record"]["exit_code"], 3, "{seen:?}");
    let result = seen.last().unwrap();
    assert_eq!(result["result"]["turn"]["status"], "failed");
    assert!(
        result["result"]["document"]
            .as_str()
            .unwrap()
            .contains("exit 3")
    );

    // As server-sent events, each event is named by its kind.
    let response = api
        .request(reqwest::Method::POST, "/v1/turns")
        .header("Accept", "text/event-stream")
        .json(&json!({ "document": doc }))
        .send()
        .unwrap();
    let text = response.text().unwrap();
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .filter(|k| *k != "output")
        .collect();
    assert_eq!(
        kinds,
        [
            "sandbox_ready",
            "step_started",
            "step_finished",
            "step_started",
            "step_finished",
            "result"
        ],
        "{text}"
    );

    // A client that goes away mid-turn stops it: its sandbox is torn down at once, not when
    // the step would have ended.
    let slow = "# Wait\n```bash\necho waiting; sleep 600\n```\n";
    let response = api
        .request(reqwest::Method::POST, "/v1/turns")
        .json(&json!({ "document": slow, "stream": true }))
        .send()
        .unwrap();
    let mut events = lines(response);
    assert!(
        events
            .by_ref()
            .any(|e| e["event"] == "output" && e["text"] == "waiting\n"),
        "the step started"
    );
    assert_eq!(daemon.sandbox_dirs(), 1);
    drop(events);
    crate::serve::assert_turn_stopped(&daemon, &api);
    drop(api);
    assert!(daemon.stop().success());
    env.assert_gone("upstream-init");
}

#[test]
fn a_daemon_killed_hard_leaves_nothing_after_its_restart() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let mut daemon = Daemon::start(&env, &["--pool", "host=2"]);
    let api = daemon.client(&daemon.key("t", "t"));
    for _ in 0..3 {
        // With limits: cgroups to leave behind too.
        let sid =
            id(&api.create(json!({ "timeout": 0, "limits": { "memory": "64M", "cpus": 0.5 } })));
        let (status, _) = api.post(
            &format!("/v1/sandboxes/{sid}/processes"),
            json!({ "cmd": ["sleep", "600"] }),
        );
        assert_eq!(status, 201);
    }
    assert!(daemon.sandbox_dirs() >= 3);
    let owner = daemon.child.id();
    // The sandboxes' cgroups, wherever the hierarchies put them (four levels deep at most).
    let cgroups = || {
        fn walk(dir: &std::path::Path, depth: usize, prefix: &str, found: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let path = e.path();
                if !path.is_dir() || path.is_symlink() {
                    continue;
                }
                if e.file_name().to_string_lossy().starts_with(prefix) {
                    found.push(path);
                } else if depth > 0 {
                    walk(&path, depth - 1, prefix, found);
                }
            }
        }
        let mut found = Vec::new();
        let prefix = format!("upstream-{owner}-");
        walk(
            std::path::Path::new("/sys/fs/cgroup"),
            4,
            &prefix,
            &mut found,
        );
        found
    };
    let had = cgroups();
    assert!(!had.is_empty(), "the limits made cgroups");
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    std::mem::forget(daemon);
    // The next daemon, on the same socket and state, cleans what is left and serves. It
    // starts at once: the old sandboxes may still be on their way out, and are removed
    // when they are gone.
    let daemon = Daemon::start(&env, &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while daemon.sandbox_dirs() > 0 || !cgroups().is_empty() {
        assert!(
            Instant::now() < deadline,
            "leftovers remain: {} directories, cgroups {:?} (had {had:?})",
            daemon.sandbox_dirs(),
            cgroups()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let api = daemon.client(&daemon.key("t2", "t"));
    let sid = id(&api.create(json!({})));
    assert_eq!(api.exec(&sid, &["true"])["exit_code"], 0);
    // The old sandboxes' processes died with their daemon.
    assert!(crate::util::processes_with("sleep 600").is_empty());
    drop(api);
    assert!(daemon.stop().success());
    env.assert_gone("upstream-init");
}

#[test]
fn the_openapi_document_describes_every_route_and_is_checked_in() {
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let served: Value = reqwest::blocking::get(format!("{}/v1/openapi.json", daemon.url))
        .unwrap()
        .json()
        .unwrap();
    let paths = served["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/sandboxes", "post"),
        ("/v1/sandboxes", "get"),
        ("/v1/sandboxes/{id}", "get"),
        ("/v1/sandboxes/{id}", "delete"),
        ("/v1/sandboxes/{id}/timeout", "post"),
        ("/v1/sandboxes/{id}/exec", "post"),
        ("/v1/sandboxes/{id}/processes", "post"),
        ("/v1/sandboxes/{id}/processes/{pid}", "get"),
        ("/v1/sandboxes/{id}/processes/{pid}/signal", "post"),
        ("/v1/sandboxes/{id}/processes/{pid}/output", "get"),
        ("/v1/sandboxes/{id}/files", "put"),
        ("/v1/sandboxes/{id}/files", "get"),
        ("/v1/sandboxes/{id}/files", "delete"),
        ("/v1/sandboxes/{id}/files/list", "get"),
        ("/v1/turns", "post"),
        ("/v1/turns", "get"),
        ("/v1/turns/{turn}", "get"),
        ("/v1/contexts", "get"),
        ("/v1/artifacts", "get"),
    ] {
        assert!(
            paths.get(path).is_some_and(|p| p.get(method).is_some()),
            "{method} {path} is not described"
        );
    }
    // docs/openapi.json is the served document: a change to the API shows in review.
    let checked_in =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let text = std::fs::read_to_string(&checked_in).unwrap_or_default();
    let expected = serde_json::to_string_pretty(&served).unwrap() + "\n";
    if text != expected {
        if std::env::var_os("UPSTREAM_BLESS").is_some() {
            std::fs::write(&checked_in, &expected).unwrap();
        } else {
            panic!(
                "docs/openapi.json differs from the served document; run the test with \
                 UPSTREAM_BLESS=1 to update it"
            );
        }
    }
}

#[test]
fn the_cli_uses_the_daemon_for_sandboxes_copies_and_turns() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &["--pool", "host=1"]);
    // Over the local socket (found in the state directory), no key needed.
    let cli = |args: &[&str]| env.command().args(args).output().unwrap();
    let made = cli(&["sandbox", "create", "--meta", "job=cli", "--timeout", "5m"]);
    assert!(made.status.success(), "{}", crate::util::stderr(&made));
    let sid = crate::util::stdout(&made).trim().to_string();
    assert!(sid.starts_with("sbx_"), "{sid}");
    let ran = cli(&[
        "sandbox",
        "exec",
        &sid,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 5",
    ]);
    assert_eq!(crate::util::code(&ran), 5);
    assert_eq!(crate::util::stdout(&ran), "out\n");
    assert_eq!(crate::util::stderr(&ran), "err\n");
    // -i gives the command upstream's standard input; without it the command reads nothing.
    let piped = |args: &[&str], input: &[u8]| {
        let mut child = env
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let upper = piped(
        &["sandbox", "exec", "-i", &sid, "--", "tr", "a-z", "A-Z"],
        b"hello\n",
    );
    assert!(upper.status.success(), "{}", crate::util::stderr(&upper));
    assert_eq!(crate::util::stdout(&upper), "HELLO\n");
    let nothing = piped(&["sandbox", "exec", &sid, "--", "wc", "-c"], b"hello\n");
    assert_eq!(crate::util::stdout(&nothing).trim(), "0");
    // Bytes that are not text go as base64 and arrive as they were.
    let binary = piped(
        &["sandbox", "exec", "-i", &sid, "--", "od", "-An", "-tx1"],
        &[0xff, 0xfe, 0x00, 0x0a],
    );
    assert!(binary.status.success(), "{}", crate::util::stderr(&binary));
    assert_eq!(crate::util::stdout(&binary).trim(), "ff fe 00 0a");
    // Files both ways.
    let local = env.write("data.csv", "a,b\n1,2\n");
    let up = cli(&[
        "sandbox",
        "cp",
        local.to_str().unwrap(),
        &format!("{sid}:/workspace/"),
    ]);
    assert!(up.status.success(), "{}", crate::util::stderr(&up));
    let counted = cli(&["sandbox", "exec", &sid, "--", "wc", "-l", "data.csv"]);
    assert_eq!(crate::util::stdout(&counted), "2 data.csv\n");
    let back = env.path("back.csv");
    let down = cli(&[
        "sandbox",
        "cp",
        &format!("{sid}:data.csv"),
        back.to_str().unwrap(),
    ]);
    assert!(down.status.success(), "{}", crate::util::stderr(&down));
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "a,b\n1,2\n");
    let missing = cli(&[
        "sandbox",
        "cp",
        &format!("{sid}:nope"),
        back.to_str().unwrap(),
    ]);
    assert_eq!(
        crate::util::code(&missing),
        2,
        "{}",
        crate::util::stderr(&missing)
    );
    assert_eq!(
        std::fs::read_to_string(&back).unwrap(),
        "a,b\n1,2\n",
        "left whole"
    );
    let listed = cli(&["sandbox", "ls"]);
    assert!(crate::util::stdout(&listed).contains("job=cli"));
    let removed = cli(&["sandbox", "rm", &sid]);
    assert!(removed.status.success());
    assert_eq!(crate::util::code(&cli(&["sandbox", "rm", &sid])), 2);

    // `upstream run --daemon` sends the document to the daemon and writes the results back
    // here.
    let doc = env.write(
        "remote.md",
        "---\nsecrets: [TOKEN]\n---\n# Greet\n```bash\necho \"hi $TOKEN\"\n```\n",
    );
    let out = env
        .command()
        .env("TOKEN", "abc")
        .args(["run", "--daemon", "-v", "remote.md"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", crate::util::stderr(&out));
    // Progress as a local run shows it, the step's output (secrets redacted) included.
    let shown = crate::util::stderr(&out);
    assert!(shown.contains("Daemon: unix:"), "{shown}");
    assert!(shown.contains("Sandbox: host image, namespaces"), "{shown}");
    assert!(shown.contains("\nhi "), "{shown}");
    assert!(!shown.contains("abc"), "{shown}");
    assert!(shown.contains("Step 1: Greet ..."), "{shown}");
    assert!(shown.contains("1 step passed in"), "{shown}");
    assert!(shown.contains("(turn 1 on the daemon)"), "{shown}");
    let written = std::fs::read_to_string(&doc).unwrap();
    assert!(written.contains("**Result:** exit 0"), "{written}");
    assert!(
        !written.contains("abc"),
        "the secret is redacted: {written}"
    );
    // Over TCP with a key, too; without one, a clear refusal and the document untouched.
    let key = daemon.key("cli", "team");
    let before = std::fs::read_to_string(&doc).unwrap();
    let refused = env
        .command()
        .env("UPSTREAM_URL", &daemon.url)
        .env("TOKEN", "abc")
        .args(["run", "remote.md"])
        .output()
        .unwrap();
    assert_eq!(
        crate::util::code(&refused),
        2,
        "{}",
        crate::util::stderr(&refused)
    );
    assert!(crate::util::stderr(&refused).contains("API key"));
    assert_eq!(std::fs::read_to_string(&doc).unwrap(), before);
    let keyed = env
        .command()
        .env("UPSTREAM_URL", &daemon.url)
        .env("UPSTREAM_API_KEY", &key)
        .env("TOKEN", "abc")
        .args(["run", "remote.md", "--json"])
        .output()
        .unwrap();
    assert!(keyed.status.success(), "{}", crate::util::stderr(&keyed));
    let record: Value = serde_json::from_str(crate::util::stdout(&keyed).trim()).unwrap();
    assert_eq!(record["status"], "passed");
    // Ctrl-C stops the turn on the daemon too, and leaves the document as it was.
    let slow_text = "# Wait\n```bash\nsleep 600\n```\n";
    let slow = env.write("slow.md", slow_text);
    let mut child = env
        .command()
        .args(["run", "--daemon", "slow.md"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut progress = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("Sandbox:") {
        line.clear();
        assert!(
            progress.read_line(&mut line).unwrap() > 0,
            "no sandbox line"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut rest = String::new();
    progress.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("Interrupted"), "{rest}");
    assert_eq!(std::fs::read_to_string(&slow).unwrap(), slow_text);
    // What is left is the pool's one sandbox.
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.sandbox_dirs() > 1 {
        assert!(
            Instant::now() < deadline,
            "the turn's sandbox is still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // `--local` runs here even with `$UPSTREAM_URL` set.
    let local_run = env
        .command()
        .env("UPSTREAM_URL", &daemon.url)
        .env("TOKEN", "abc")
        .args(["run", "--local", "remote.md"])
        .output()
        .unwrap();
    assert!(local_run.status.success());
    assert!(!crate::util::stderr(&local_run).contains("Daemon:"));
}

/// A sandbox whose agent is gone answers every later operation with 410 and a sentence
/// saying so and what to do; its listing says it is gone; it is deleted as any other. A
/// sandbox beside it runs on (the positive control: the daemon is fine, only the one
/// sandbox is gone).
#[test]
fn a_sandbox_whose_agent_is_gone_says_so_and_is_deleted() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "t"));
    let sid = id(&api.create(json!({})));
    let beside = id(&api.create(json!({})));
    // A session is kept from this exec: the next one goes to its helper, which is gone too.
    assert_eq!(api.exec(&sid, &["true"])["exit_code"], 0);
    let marker = format!("9{}", std::process::id());
    let (status, started) = api.post(
        &format!("/v1/sandboxes/{sid}/processes"),
        json!({ "cmd": ["sleep", marker] }),
    );
    assert_eq!(status, 201, "{started}");
    let agent = crate::util::agent_above(&format!("sleep {marker}"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !crate::util::processes_with(&format!("sleep {marker}")).is_empty() {
        assert!(Instant::now() < deadline, "the sandbox's processes stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let exec = format!("/v1/sandboxes/{sid}/exec");
    for _ in 0..2 {
        let (status, body) = api.post(&exec, json!({ "cmd": ["true"] }));
        assert_eq!((status, error_code(&body)), (410, "sandbox_gone"), "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("agent is gone") && message.contains("delete it"),
            "{message}"
        );
    }
    // Every other use of it says the same, streamed or not, files and processes alike.
    let (status, body) = api.post(&exec, json!({ "cmd": ["true"], "stream": true }));
    assert_eq!(status, 200);
    assert!(body.to_string().contains("sandbox_gone"), "{body}");
    let (status, body) = api.get(&format!("/v1/sandboxes/{sid}/files?path=x"));
    assert_eq!((status, error_code(&body)), (410, "sandbox_gone"), "{body}");
    let (status, body) = api.get(&format!("/v1/sandboxes/{sid}/processes"));
    assert_eq!((status, error_code(&body)), (410, "sandbox_gone"), "{body}");
    let (_, listed) = api.get(&format!("/v1/sandboxes/{sid}"));
    assert_eq!(listed["state"], "gone", "{listed}");
    assert!(
        listed["gone"].as_str().unwrap().contains("agent is gone"),
        "{listed}"
    );
    let (_, fine) = api.get(&format!("/v1/sandboxes/{beside}"));
    assert_eq!(fine["state"], "running", "{fine}");
    let listed = env
        .command()
        .env("UPSTREAM_URL", &daemon.url)
        .env("UPSTREAM_API_KEY", api.key.as_deref().unwrap())
        .args(["sandbox", "ls"])
        .output()
        .unwrap();
    let listed = crate::util::stdout(&listed);
    let state_of = |id: &str| {
        let line = listed.lines().find(|l| l.starts_with(id)).unwrap_or("");
        line.split_whitespace().any(|w| w == "gone")
    };
    assert!(state_of(&sid) && !state_of(&beside), "{listed}");
    assert!(fine.get("gone").is_none(), "{fine}");
    assert_eq!(api.exec(&beside, &["echo", "on"])["stdout"], "on\n");
    assert_eq!(api.delete(&format!("/v1/sandboxes/{sid}")), 204);
    let (status, _) = api.get(&format!("/v1/sandboxes/{sid}"));
    assert_eq!(status, 404);
    assert!(
        daemon.log.lock().unwrap().contains("agent is gone"),
        "the daemon's log does not say it"
    );
}

/// A command the kernel kills for the sandbox's memory limit is answered as out of memory,
/// whole and streamed, and `upstream sandbox exec` says so; one that fills the disk is
/// answered as out of disk. The commands beside them (the controls) are neither.
#[test]
fn an_exec_out_of_memory_or_disk_says_so() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "t"));
    let sid = id(&api.create(json!({ "limits": { "memory": "64M", "disk": "32M" } })));
    let big = ["python3", "-c", "x = b'x' * (300 << 20); print('survived')"];
    let ran = api.exec(&sid, &big);
    assert_eq!(ran["signal"], 9, "{ran}");
    assert_eq!(ran["out_of_memory"], true, "{ran}");
    assert!(ran["out_of_disk"].is_null(), "{ran}");
    let (status, streamed) = api.post(
        &format!("/v1/sandboxes/{sid}/exec"),
        json!({ "cmd": big, "stream": true }),
    );
    assert_eq!(status, 200);
    assert!(
        streamed.to_string().contains(r#""out_of_memory":true"#),
        "{streamed}"
    );
    let fine = api.exec(&sid, &["true"]);
    assert_eq!(
        (fine["out_of_memory"].clone(), fine["out_of_disk"].clone()),
        (json!(false), Value::Null),
        "{fine}"
    );
    let full = api.exec(
        &sid,
        &["dd", "if=/dev/zero", "of=fill", "bs=1M", "count=64"],
    );
    assert_ne!(full["exit_code"], 0, "{full}");
    assert_eq!(full["out_of_disk"], 32 << 20, "{full}");
    assert_eq!(full["out_of_memory"], false, "{full}");
    assert_eq!(api.exec(&sid, &["rm", "fill"])["exit_code"], 0);
    // The CLI says it in words.
    let key = api.key.clone().unwrap();
    let cli = env
        .command()
        .env("UPSTREAM_URL", &daemon.url)
        .env("UPSTREAM_API_KEY", &key)
        .args(["sandbox", "exec", &sid, "--"])
        .args(big)
        .output()
        .unwrap();
    assert_eq!(
        crate::util::code(&cli),
        137,
        "{}",
        crate::util::stderr(&cli)
    );
    assert!(
        crate::util::stderr(&cli).contains("ran out of memory"),
        "{}",
        crate::util::stderr(&cli)
    );
    let cli = env
        .command()
        .env("UPSTREAM_URL", &daemon.url)
        .env("UPSTREAM_API_KEY", &key)
        .args(["sandbox", "exec", &sid, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(crate::util::stderr(&cli), "");
}

/// Bytes of the sandbox's disk in use, as `df` inside it sees them.
fn disk_used(api: &Api, sid: &str) -> u64 {
    let df = api.exec(sid, &["sh", "-c", "sync; df -B1 --output=used . | tail -1"]);
    df["stdout"].as_str().unwrap().trim().parse().unwrap()
}

/// An upload is all or nothing: past the disk limit it is refused with 507 and leaves no
/// file and the disk as free as before; broken off by the client it leaves no file; a
/// complete one replaces the file there in one step (a reader sees the old file or the new
/// one, never part of it).
#[test]
fn an_upload_is_all_or_nothing() {
    crate::util::each_files_way(|| {
        crate::require_root_sandbox!();
        let env = Env::new();
        let daemon = Daemon::start(&env, &[]);
        let api = daemon.client(&daemon.key("t", "t"));
        let sid = id(&api.create(json!({ "limits": { "disk": "20M" } })));
        let put = |path: &str, body: reqwest::blocking::Body| {
            api.request(
                reqwest::Method::PUT,
                &format!("/v1/sandboxes/{sid}/files?path={path}"),
            )
            .body(body)
            .send()
        };
        let listing = || {
            let (status, listing) = api.get(&format!("/v1/sandboxes/{sid}/files/list?path=."));
            assert_eq!(status, 200, "{listing}");
            let names: Vec<String> = listing["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap().to_string())
                .collect();
            names
        };
        let before = disk_used(&api, &sid);
        // The daemon may answer "no space" and close before the whole body is sent.
        let status = put("big.bin", vec![7u8; 30 << 20].into()).map_or(0, |r| r.status().as_u16());
        assert!(
            status == 507 || status == 0,
            "the upload was answered {status}"
        );
        assert_eq!(
            listing(),
            Vec::<String>::new(),
            "the failed upload left a file"
        );
        let after = disk_used(&api, &sid);
        assert!(
            after <= before + (1 << 20),
            "the disk stays full: {before} bytes used before, {after} after"
        );

        // A client that goes away mid-body: the daemon sees the body end short.
        let (reader, mut writer) = std::io::pipe().unwrap();
        let sender = std::thread::spawn(move || {
            writer.write_all(&[1u8; 1 << 20]).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            // Dropped without an end: a body of a declared length that never comes.
        });
        let mut socket =
            std::net::TcpStream::connect(daemon.url.trim_start_matches("http://")).unwrap();
        let key = api.key.clone().unwrap();
        write!(
            socket,
            "PUT /v1/sandboxes/{sid}/files?path=cut.bin HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n",
            8 << 20
        )
        .unwrap();
        let mut reader = reader;
        std::io::copy(&mut reader, &mut socket).unwrap();
        sender.join().unwrap();
        drop(socket);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let names = listing();
            if names.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the broken-off upload left {names:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }

        // Control: a complete upload replaces the file; a reader meanwhile sees the old file
        // whole or the new one whole, never part of either.
        const SIZE: usize = 4 << 20;
        assert_eq!(
            put("whole.bin", vec![b'a'; SIZE].into()).unwrap().status(),
            201
        );
        let read = || {
            let response = api
                .request(
                    reqwest::Method::GET,
                    &format!("/v1/sandboxes/{sid}/files?path=whole.bin"),
                )
                .send()
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
            response.bytes().unwrap().to_vec()
        };
        let (reader, mut writer) = std::io::pipe().unwrap();
        let seen = std::thread::scope(|scope| {
            let uploading =
                scope.spawn(move || put("whole.bin", reqwest::blocking::Body::new(reader)));
            let mut seen = Vec::new();
            for _ in 0..4 {
                writer.write_all(&[b'b'; SIZE / 4]).unwrap();
                seen.push(read());
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(writer);
            assert_eq!(uploading.join().unwrap().unwrap().status(), 201);
            seen
        });
        for got in seen {
            assert!(
                got == vec![b'a'; SIZE] || got == vec![b'b'; SIZE],
                "a reader saw {} bytes of a file being replaced",
                got.len()
            );
        }
        assert_eq!(read(), vec![b'b'; SIZE]);
        assert_eq!(listing(), ["whole.bin"]);
    });
}

/// `upstream sandbox create` takes a disk limit as it takes a memory limit, within the
/// same bounds as a document's.
#[test]
fn the_cli_makes_a_sandbox_with_a_disk_limit() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let _daemon = Daemon::start(&env, &[]);
    let cli = |args: &[&str]| env.command().args(args).output().unwrap();
    let made = cli(&[
        "sandbox", "create", "--disk", "64M", "--memory", "128M", "--json",
    ]);
    assert!(made.status.success(), "{}", crate::util::stderr(&made));
    let sandbox: Value = serde_json::from_str(&crate::util::stdout(&made)).unwrap();
    assert_eq!(sandbox["limits"]["disk"], 64 << 20, "{sandbox}");
    assert_eq!(sandbox["limits"]["memory"], 128 << 20, "{sandbox}");
    let df = cli(&[
        "sandbox",
        "exec",
        sandbox["id"].as_str().unwrap(),
        "--",
        "df",
        "-B1M",
        "--output=size",
        ".",
    ]);
    let size: u64 = crate::util::stdout(&df)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}", crate::util::stdout(&df)));
    assert!(size <= 64, "the workspace has a disk of {size} MiB");
    for bad in ["1K", "9T", "lots"] {
        let refused = cli(&["sandbox", "create", "--disk", bad]);
        assert_eq!(crate::util::code(&refused), 2, "--disk {bad}");
        assert!(
            crate::util::stderr(&refused).contains("--disk"),
            "{}",
            crate::util::stderr(&refused)
        );
    }
}

/// The control for a sandbox marked gone: when only the process serving one request in the
/// sandbox ends (killed from outside it, as a command in the sandbox could), that request
/// fails with a 502 saying to try again, and the sandbox runs on, not marked gone.
#[test]
fn a_request_whose_helper_ends_fails_alone_and_the_sandbox_runs_on() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let daemon = Daemon::start(&env, &[]);
    let key = daemon.key("t", "t");
    let api = daemon.client(&key);
    let sid = id(&api.create(json!({})));
    let marker = format!("6{}", std::process::id());
    let other = daemon.client(&key);
    let path = format!("/v1/sandboxes/{sid}/exec");
    let running =
        std::thread::spawn(move || other.post(&path, json!({ "cmd": ["sleep", marker.clone()] })));
    let marker = format!("sleep 6{}", std::process::id());
    let command = crate::util::pid_of(&marker);
    let field = crate::util::status_field;
    let helper = field(&command, "PPid:");
    assert_ne!(
        field(&helper, "NSpid:").split_whitespace().last(),
        Some("1"),
        "the command's parent is the agent itself, not a helper"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper.parse().unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (status, body) = running.join().unwrap();
    assert_eq!((status, error_code(&body)), (502, "sandbox"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("try again"),
        "{body}"
    );
    assert_eq!(api.exec(&sid, &["echo", "still"])["stdout"], "still\n");
    let (_, listed) = api.get(&format!("/v1/sandboxes/{sid}"));
    assert_eq!(listed["state"], "running", "{listed}");
}

/// A step, `upstream exec` and a command over HTTP start from one environment: the base
/// one (`turn/src/image.rs`), whatever runs them.
#[test]
fn a_step_exec_and_a_command_over_http_start_with_the_same_environment() {
    crate::require_root_sandbox!();
    let env = Env::new();
    let show = r#"printf '%s|' "$PATH" "$HOME" "$USER" "$LANG" "$TERM" "$UPSTREAM""#;
    let expected =
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/root|root|C.UTF-8|dumb|1|";

    let doc = env.write("env.md", format!("```bash\n{show}\n```\n"));
    let out = env.upstream(&["run", doc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", crate::util::stderr(&out));
    let step = crate::util::result_block(&std::fs::read_to_string(&doc).unwrap(), 1);
    assert!(step.contains(expected), "the step saw: {step}");

    let out = env.upstream(&["exec", "--", "sh", "-c", show]);
    assert!(out.status.success(), "{}", crate::util::stderr(&out));
    assert_eq!(crate::util::stdout(&out), expected, "upstream exec");

    let daemon = Daemon::start(&env, &[]);
    let api = daemon.client(&daemon.key("t", "acme"));
    let sid = id(&api.create(json!({})));
    assert_eq!(
        api.exec(&sid, &["sh", "-c", show])["stdout"],
        expected,
        "over HTTP"
    );
    assert_eq!(api.delete(&format!("/v1/sandboxes/{sid}")), 204);
}

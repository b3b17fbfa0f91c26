//! `upstream serve` measured at its HTTP client.
//!
//! - claim: `POST /v1/sandboxes` with the warm pool full, against the same with no pool
//!   (made on the spot), interleaved, at concurrency 1;
//! - exec: `true` in an existing sandbox over HTTP at concurrency 1 (latency), then 10,000
//!   execs at concurrency 32 over 32 sandboxes (errors and throughput);
//! - idle memory: the daemon and the host with 1,000 idle sandboxes, each having run a
//!   command (`$UPSTREAM_BENCH_IDLE` changes the count): the daemon's RSS, the sandboxes'
//!   own processes (their PSS), and what the host's available memory dropped by, per
//!   sandbox.
//!
//! Needs root (as sandboxes do); prints what it measured.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Daemon {
    child: Child,
    url: String,
    key: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let exe = env!("CARGO_BIN_EXE_upstream");
        let state = dir.path().join("state");
        let key = Command::new(exe)
            .args(["keys", "create", "--name", "bench", "--tenant", "bench"])
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap();
        let key = String::from_utf8(key.stdout).unwrap().trim().to_string();
        let mut child = Command::new(exe)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--idle-timeout",
                "0",
                "--state-dir",
            ])
            .arg(&state)
            // The benchmark reads the pools' figures, which only the operator sees.
            .args(["--operator-tenant", "bench"])
            .args(args)
            .env("UPSTREAM_RUNTIME_DIR", dir.path().join("runtime"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        lines.read_line(&mut first).unwrap();
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("the daemon did not start: {first}"))
            .to_string();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = lines.read_to_string(&mut rest);
        });
        Daemon {
            child,
            url,
            key,
            _dir: dir,
        }
    }

    fn client(&self) -> Client {
        Client {
            http: reqwest::blocking::Client::new(),
            url: self.url.clone(),
            key: self.key.clone(),
        }
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

struct Client {
    http: reqwest::blocking::Client,
    url: String,
    key: String,
}

impl Client {
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    fn delete(&self, id: &str) {
        let _ = self
            .http
            .delete(format!("{}/v1/sandboxes/{id}", self.url))
            .bearer_auth(&self.key)
            .send();
    }

    fn pool_ready(&self) -> usize {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .bearer_auth(&self.key)
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("upstream_pool_ready{"))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(_, n)| n.parse::<usize>().unwrap_or(0))
            .sum()
    }

    fn create(&self) -> (Duration, String, bool) {
        let start = Instant::now();
        let (status, sandbox) = self.post("/v1/sandboxes", &json!({}));
        let took = start.elapsed();
        assert_eq!(status, 201, "{sandbox}");
        (
            took,
            sandbox["id"].as_str().unwrap().to_string(),
            sandbox["from_pool"].as_bool().unwrap(),
        )
    }
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let i = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("serve: needs root (sandboxes with the uid range); nothing measured");
        return;
    }
    let runs: usize = std::env::var("UPSTREAM_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200);
    claim(runs);
    exec(runs);
    let idle: usize = std::env::var("UPSTREAM_BENCH_IDLE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1000);
    idle_memory(idle);
}

/// Claims with the pool full against claims with no pool, interleaved.
fn claim(runs: usize) {
    let pooled = Daemon::start(&["--pool", "host=4"]);
    let bare = Daemon::start(&[]);
    let (p, b) = (pooled.client(), bare.client());
    let wait_full = || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.pool_ready() < 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // Warm both up: connections, caches.
    for _ in 0..5 {
        wait_full();
        let (_, id, _) = p.create();
        p.delete(&id);
        let (_, id, _) = b.create();
        b.delete(&id);
    }
    let (mut from_pool, mut made) = (Vec::new(), Vec::new());
    let mut misses = 0;
    for _ in 0..runs {
        wait_full();
        let (took, id, hit) = p.create();
        if hit {
            from_pool.push(ms(took));
        } else {
            misses += 1;
        }
        p.delete(&id);
        let (took, id, _) = b.create();
        made.push(ms(took));
        b.delete(&id);
    }
    let (p50, p99) = (
        percentile(&mut from_pool, 0.5),
        percentile(&mut from_pool, 0.99),
    );
    let (m50, m99) = (percentile(&mut made, 0.5), percentile(&mut made, 0.99));
    println!(
        "claim from the warm pool: p50 {p50:.3} ms, p99 {p99:.3} ms ({} claims, {misses} missed the pool); \
         made without a pool: p50 {m50:.2} ms, p99 {m99:.2} ms; pool/made at p50 {:.3} \
         (target p50 <= 1 ms, p99 <= 5 ms)",
        from_pool.len(),
        p50 / m50
    );
}

/// Exec of `true` over HTTP: latency at concurrency 1, then 10,000 at concurrency 32.
fn exec(runs: usize) {
    let daemon = Daemon::start(&[]);
    let client = daemon.client();
    let (_, id, _) = client.create();
    let body = json!({ "cmd": ["true"] });
    let path = format!("/v1/sandboxes/{id}/exec");
    for _ in 0..20 {
        client.post(&path, &body);
    }
    let mut latencies = Vec::new();
    for _ in 0..runs.max(200) {
        let start = Instant::now();
        let (status, result) = client.post(&path, &body);
        latencies.push(ms(start.elapsed()));
        assert_eq!((status, result["exit_code"].as_i64()), (200, Some(0)));
    }
    let (p50, p99) = (
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99),
    );
    println!(
        "exec `true` over HTTP: p50 {p50:.2} ms, p99 {p99:.2} ms (concurrency 1; target p50 <= 2 ms)"
    );

    const TOTAL: usize = 10_000;
    const CONCURRENCY: usize = 32;
    let sandboxes: Vec<String> = (0..CONCURRENCY).map(|_| client.create().1).collect();
    let start = Instant::now();
    let (errors, done): (usize, usize) = std::thread::scope(|s| {
        let workers: Vec<_> = sandboxes
            .iter()
            .enumerate()
            .map(|(n, id)| {
                // 10,000 in all: the first workers take the remainder.
                let share = TOTAL / CONCURRENCY + usize::from(n < TOTAL % CONCURRENCY);
                let client = daemon.client();
                let path = format!("/v1/sandboxes/{id}/exec");
                let body = body.clone();
                s.spawn(move || {
                    let (mut errors, mut done) = (0, 0);
                    for _ in 0..share {
                        let (status, result) = client.post(&path, &body);
                        if status != 200 || result["exit_code"].as_i64() != Some(0) {
                            errors += 1;
                        }
                        done += 1;
                    }
                    (errors, done)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .fold((0, 0), |(e, d), (we, wd)| (e + we, d + wd))
    });
    let took = start.elapsed();
    println!(
        "exec `true` x {done} at concurrency {CONCURRENCY}: {errors} errors, {:.0} execs/s ({:.1} s)",
        done as f64 / took.as_secs_f64(),
        took.as_secs_f64()
    );
}

fn meminfo_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The daemon's child processes and theirs: the sandboxes' inits and what runs in them.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some(after) = stat.rsplit_once(')').map(|(_, a)| a.to_string()) else {
            continue;
        };
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(p) = queue.pop() {
        for c in children.get(&p).cloned().unwrap_or_default() {
            found.push(c);
            queue.push(c);
        }
    }
    found
}

fn idle_memory(count: usize) {
    let settle = || {
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
        std::thread::sleep(Duration::from_millis(500));
    };
    let daemon = Daemon::start(&[
        "--max-sandboxes",
        &count.to_string(),
        "--max-per-tenant",
        &count.to_string(),
    ]);
    let client = daemon.client();
    // Each has run a command, as a sandbox left idle by its user has: the session it ran on
    // is kept for the next one.
    let used = |id: &str| {
        let (status, result) = client.post(
            &format!("/v1/sandboxes/{id}/exec"),
            &json!({ "cmd": ["true"] }),
        );
        assert_eq!(status, 200, "{result}");
    };
    // One sandbox first, so that the daemon's own start-up is not counted per sandbox.
    let (_, first, _) = client.create();
    used(&first);
    settle();
    let before = meminfo_available_kib();
    let daemon_before = status_kib(daemon.child.id(), "VmRSS:");
    let start = Instant::now();
    for _ in 1..count {
        let (_, id, _) = client.create();
        used(&id);
    }
    let made_in = start.elapsed();
    settle();
    let after = meminfo_available_kib();
    let daemon_after = status_kib(daemon.child.id(), "VmRSS:");
    let inits = descendants(daemon.child.id());
    let pss: u64 = inits.iter().map(|p| pss_kib(*p)).sum();
    let added = (count - 1) as f64;
    let host_per = (before.saturating_sub(after)) as f64 / added;
    println!(
        "{count} idle sandboxes, each having run a command (made in {:.1} s): daemon RSS {:.1} MiB ({:+.1} MiB for them); \
         sandbox processes {} with PSS {:.2} MiB total, {:.0} KiB each; host memory used per \
         sandbox (agent + kernel: namespaces, mounts, page tables) {:.0} KiB = {:.2} MiB (target <= 2 MiB)",
        made_in.as_secs_f64(),
        daemon_after as f64 / 1024.0,
        (daemon_after as f64 - daemon_before as f64) / 1024.0,
        inits.len(),
        pss as f64 / 1024.0,
        pss as f64 / inits.len().max(1) as f64,
        host_per,
        host_per / 1024.0
    );
    client.delete(&first);
}

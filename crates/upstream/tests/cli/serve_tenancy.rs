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
    let pinned = id(&alice.create(json!({})));
    let other = id(&alice.create(json!({})));
    let theirs = id(&bob.create(json!({})));

    // More slow commands than the daemon has blocking threads (1,024).
    let marker = "3599.25";
    let body = json!({ "cmd": ["sleep", marker] }).to_string();
    let flood: Vec<_> = (0..1100)
        .map(|_| {
            send_and_leave(
                &daemon,
                &alice_key,
                &format!("/v1/sandboxes/{pinned}/exec"),
                &body,
            )
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

    // Deleting the pinned sandbox ends her commands and frees her share.
    assert_eq!(alice.delete(&format!("/v1/sandboxes/{pinned}")), 204);
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

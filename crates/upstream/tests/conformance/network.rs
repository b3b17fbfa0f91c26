//! Network: a sandbox without network has loopback only, and the host is out of its reach.

use std::io::Read;
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use upstream_sandbox::{NetworkMode, SandboxSpec};

use crate::harness::{Bench, check, exec, sh};

/// Connects to 127.0.0.1:`port` and sends `hello`; fails after 3 s.
fn connect(port: u16) -> String {
    format!(
        "python3 -c 'import socket; s = socket.create_connection((\"127.0.0.1\", {port}), timeout=3); s.sendall(b\"hello\"); s.close()'"
    )
}

pub fn without_network_only_loopback_and_the_host_is_unreachable(bench: &Bench) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut text = String::new();
            if let Ok(mut stream) = stream {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = stream.read_to_string(&mut text);
            }
            if tx.send(text).is_err() {
                break;
            }
        }
    });

    let mut sandbox = bench.default_sandbox();
    let interfaces = check(
        sandbox.as_mut(),
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '",
    );
    assert_eq!(interfaces, "lo\n");
    // Loopback works inside: the refusal below is no broken Python or socket.
    check(
        sandbox.as_mut(),
        "python3 -c '
import socket
server = socket.socket(); server.bind((\"127.0.0.1\", 0)); server.listen(1)
client = socket.create_connection(server.getsockname(), timeout=3)
conn, _ = server.accept(); client.sendall(b\"ping\"); assert conn.recv(4) == b\"ping\"
'",
    );
    let ran = exec(sandbox.as_mut(), &sh(&connect(port))).unwrap();
    assert!(
        !ran.outcome.status.success(),
        "the host's loopback was reached from a sandbox without network"
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "the listener got a connection"
    );

    // The positive control: with the host's network, the same command reaches the listener;
    // a backend without it shows the listener answers from the host itself.
    if bench.case.host_network {
        let spec = SandboxSpec {
            network: NetworkMode::Host,
            ..SandboxSpec::default()
        };
        let mut host = bench.sandbox(&spec);
        check(host.as_mut(), &connect(port));
    } else {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(b"hello").unwrap();
    }
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "hello");
}

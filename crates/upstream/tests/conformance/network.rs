//! Network: a sandbox without network has loopback only, and the host is out of its reach; a
//! sandbox with the host's network reaches a server on the host's loopback (at the case's
//! `host_address`) and names a resolver it can ask.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::mpsc;
use std::time::Duration;

use upstream_sandbox::{NetworkMode, SandboxSpec};

use crate::harness::{Bench, check, exec, nameservers, sh};

/// Connects to `address`:`port` and sends `hello`; fails after 3 s.
fn connect(address: Ipv4Addr, port: u16) -> String {
    format!(
        "python3 -c 'import socket; s = socket.create_connection((\"{address}\", {port}), timeout=3); s.sendall(b\"hello\"); s.close()'"
    )
}

/// A server on the host's 127.0.0.1 that sends what each connection sent it down `tx`, and
/// its port. It stops when the receiver is gone.
fn listen_on_the_hosts_loopback() -> (u16, mpsc::Receiver<String>) {
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
    (port, rx)
}

fn with_the_hosts_network() -> SandboxSpec {
    SandboxSpec {
        network: NetworkMode::Host,
        ..SandboxSpec::default()
    }
}

pub fn without_network_only_loopback_and_the_host_is_unreachable(bench: &Bench) {
    let (port, rx) = listen_on_the_hosts_loopback();
    let host = bench.case.host_address;

    let mut sandbox = bench.default_sandbox();
    let interfaces = check(
        sandbox.as_mut(),
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '",
    );
    assert_eq!(interfaces, "lo\n");
    // Loopback works inside: the refusals below are no broken Python or socket.
    check(
        sandbox.as_mut(),
        "python3 -c '
import socket
server = socket.socket(); server.bind((\"127.0.0.1\", 0)); server.listen(1)
client = socket.create_connection(server.getsockname(), timeout=3)
conn, _ = server.accept(); client.sendall(b\"ping\"); assert conn.recv(4) == b\"ping\"
'",
    );
    // Neither at the sandbox's own 127.0.0.1 nor where a sandbox with network finds the host.
    for address in [Ipv4Addr::LOCALHOST, host] {
        let ran = exec(sandbox.as_mut(), &sh(&connect(address, port))).unwrap();
        assert!(
            !ran.outcome.status.success(),
            "the host's loopback was reached at {address} from a sandbox without network"
        );
    }
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "the listener got a connection"
    );

    // The positive controls: the listener answers the host itself, and a sandbox with the
    // host's network reaches it with the same command.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(b"from the host").unwrap();
    drop(stream);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        "from the host"
    );
    let mut networked = bench.sandbox(&with_the_hosts_network());
    check(networked.as_mut(), &connect(host, port));
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "hello");
}

pub fn with_the_hosts_network_the_host_answers_and_a_resolver_is_named(bench: &Bench) {
    // A server on the host's loopback that answers each line with it upper-cased: the reply
    // shows packets come back, not only go out.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut line = [0u8; 5];
        stream.read_exact(&mut line).unwrap();
        stream.write_all(&line.to_ascii_uppercase()).unwrap();
        line
    });
    let mut sandbox = bench.sandbox(&with_the_hosts_network());
    let host = bench.case.host_address;
    let reply = check(
        sandbox.as_mut(),
        &format!(
            "python3 -c '
import socket
s = socket.create_connection((\"{host}\", {port}), timeout=5)
s.sendall(b\"hello\")
print(s.recv(5).decode())
'"
        ),
    );
    assert_eq!(reply, "HELLO\n");
    assert_eq!(&server.join().unwrap(), b"hello");
    let resolv_conf = check(sandbox.as_mut(), "cat /etc/resolv.conf");
    assert_eq!(
        nameservers(&resolv_conf),
        (bench.case.resolvers)(),
        "{resolv_conf}"
    );
}

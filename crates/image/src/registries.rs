//! Which addresses a pull may connect to, and the proxy that holds a pull to them.
//!
//! A daemon pulls what its tenants name, so a tenant's `image:` must not make it send
//! requests to the daemon's own loopback, the host's network or a cloud's metadata
//! address. Under [`RegistryPolicy::Public`] every connection of a pull (to the registry,
//! to the token service its challenge names, to wherever a redirect leads) goes through a
//! proxy in the pulling process, on 127.0.0.1 and serving only its own user. The proxy resolves
//! the name once, admits it only if every address it resolves to is public (or the
//! operator named the host), and connects to exactly the addresses it checked: a name that
//! answers one address to a check and another to the connection cannot exist, because
//! there is one lookup. Nothing is sent anywhere for a refused host, so nothing of what a
//! refused address would answer can come back to the tenant.
//!
//! HTTPS goes through the proxy as `CONNECT` (TLS stays end to end); plain HTTP (loopback
//! and `--insecure-registry` registries) as one request per connection, each checked.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Which registries a pull may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryPolicy {
    /// Any address: a pull for the user on their own machine (`upstream run`, `images
    /// pull`), loopback registries included.
    Any,
    /// Public addresses only, and the registries named here (`host` for any port, or
    /// `host:port`) whatever they resolve to: a daemon pulling what tenants name.
    Public { allowed: Vec<String> },
}

/// Why a connection of a pull was not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The host is not public and not allowed; nothing was sent to it.
    Refused { host: String },
    /// The host was allowed but could not be reached.
    Unreachable { host: String, why: String },
    /// The pull's registries sent more than it may take in (see [`Guard::expect`]).
    TooMuch { host: String },
}

/// Whether an address is one anyone on the internet could reach: not loopback, private,
/// link-local, CGNAT, unique-local, multicast, unspecified, reserved for documentation or
/// benchmarks, nor an IPv6 form of such an IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let not_public = a == 0 // "this network", 0.0.0.0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 169 && b == 254) // link-local, cloud metadata
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2) // TEST-NET-1
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast
        || (a == 192 && b == 168)
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || (a == 198 && b == 51 && c == 100) // TEST-NET-2
        || (a == 203 && b == 0 && c == 113) // TEST-NET-3
        || a >= 224; // multicast, reserved, broadcast
    !not_public
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d) addresses reach the
    // IPv4 address they carry; so do NAT64 (64:ff9b::/96) and 6to4 (2002::/16).
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    if s[..6] == [0; 6] {
        return ip.to_ipv4().is_some_and(is_public_v4) && !ip.is_loopback();
    }
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        return is_public_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return is_public_v4(embedded(s[1], s[2]));
    }
    let not_public = (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64
        || (s[0] == 0x100 && s[1..4] == [0; 3]) // discard-only
        || (s[0] == 0x2001 && s[1] < 0x200) // IETF protocol assignments, Teredo
        || (s[0] == 0x2001 && s[1] == 0xdb8) // documentation
        || (s[0] & 0xfff0) == 0x3ff0 // documentation 3fff::/20
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local
        || (s[0] & 0xff00) == 0xff00; // multicast
    !not_public
}

/// A host and maybe a port, as written in an allow-list or a request: the host in
/// lowercase, an IPv6 address without brackets and in its usual form.
fn split_authority(text: &str) -> Option<(String, Option<u16>)> {
    let text = text.trim();
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?.parse().ok()?)),
        }
    } else {
        match text.rsplit_once(':') {
            // An IPv6 address without brackets and without a port.
            Some((host, _)) if host.contains(':') => (text, None),
            Some((host, port)) => (host, Some(port.parse().ok()?)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let host = match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.to_ascii_lowercase(),
    };
    Some((host, port))
}

/// Whether the operator named `host:port`.
fn is_allowed(allowed: &[String], host: &str, port: u16) -> bool {
    allowed.iter().any(|entry| {
        split_authority(entry).is_some_and(|(h, p)| h == host && p.is_none_or(|p| p == port))
    })
}

/// The proxy of one pull.
pub(crate) struct Guard {
    /// The proxy's URL, for the registry client.
    pub url: String,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

/// What the proxy's connections share.
struct Shared {
    allowed: Vec<String>,
    stops: Mutex<Vec<Stop>>,
    /// Bytes the pull's registries may still send, over every connection.
    budget: AtomicI64,
}

impl Shared {
    fn stop(&self, stop: Stop) {
        self.stops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stop);
    }

    /// Takes `n` bytes from the budget; false once it is spent.
    fn spend(&self, n: usize) -> bool {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.budget.fetch_sub(n, Ordering::Relaxed) >= n
    }
}

/// What a pull may take in before its manifest says how large its layers are: the
/// manifest, the configuration, token and error answers (the registry client holds each
/// in memory whole).
const METADATA_BUDGET: i64 = 64 << 20;

impl Drop for Guard {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// How long one connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The most a request or response head may take.
const MAX_HEAD: usize = 64 << 10;

impl Guard {
    /// Starts the proxy on the current tokio runtime (its connections live as long as the
    /// runtime, the listener as long as the guard).
    pub async fn start(allowed: Vec<String>) -> io::Result<Guard> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let proxy = listener.local_addr()?;
        let url = format!("http://{proxy}");
        let shared = Arc::new(Shared {
            allowed,
            stops: Mutex::new(Vec::new()),
            budget: AtomicI64::new(METADATA_BUDGET),
        });
        let accept = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Ok((client, peer)) = listener.accept().await {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if peer_is_ours(peer, proxy).await {
                            let _ = serve(client, &shared).await;
                        }
                    });
                }
            })
        };
        Ok(Guard {
            url,
            shared,
            accept,
        })
    }

    /// The pull will take in `bytes` more (its layers): the budget grows by that, and a
    /// hundredth more for what TLS adds.
    pub fn expect(&self, bytes: u64) {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        let more = bytes.saturating_add(bytes / 100);
        let _ = self
            .shared
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_add(more))
            });
    }

    /// The first connection the proxy refused or could not make, if any.
    pub fn stopped(&self) -> Option<Stop> {
        let stops = self.shared.stops.lock().unwrap_or_else(|e| e.into_inner());
        stops
            .iter()
            .find(|s| matches!(s, Stop::Refused { .. }))
            .or(stops.first())
            .cloned()
    }
}

/// Whether the connection from `peer` to the proxy at `proxy` was opened by this user: the
/// proxy serves only its own pull (a process of another user cannot use it to reach what
/// the pull may). TCP has no peer credentials, so the kernel's socket table says whose
/// socket it is.
async fn peer_is_ours(peer: SocketAddr, proxy: SocketAddr) -> bool {
    let (SocketAddr::V4(peer), SocketAddr::V4(proxy)) = (peer, proxy) else {
        return false;
    };
    let Ok(table) = tokio::fs::read_to_string("/proc/net/tcp").await else {
        return false;
    };
    let address = |field: &str| -> Option<(Ipv4Addr, u16)> {
        let (ip, port) = field.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        // The kernel prints the address as the number its bytes in memory make.
        Some((
            Ipv4Addr::from(ip.to_ne_bytes()),
            u16::from_str_radix(port, 16).ok()?,
        ))
    };
    let ours = nix::unistd::geteuid().as_raw();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 7
            && address(fields[1]) == Some((*peer.ip(), peer.port()))
            && address(fields[2]) == Some((*proxy.ip(), proxy.port()))
            && fields[7].parse::<u32>() == Ok(ours)
    })
}

/// A request or response head and what came after it in the same reads.
struct Head {
    lines: Vec<String>,
    rest: Vec<u8>,
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Ok(Head {
                lines: head.split("\r\n").map(str::to_string).collect(),
                rest: buf[end + 4..].to_vec(),
            });
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::other("head too large"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Headers that describe one hop, not the request: never passed on.
fn hop_by_hop(line: &str) -> bool {
    let name = line.split(':').next().unwrap_or("").trim();
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

async fn answer(client: &mut TcpStream, status: &str) -> io::Result<()> {
    client
        .write_all(
            format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
}

async fn serve(mut client: TcpStream, shared: &Shared) -> io::Result<()> {
    let head = read_head(&mut client).await?;
    let mut parts = head.lines[0].split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (authority, path, default_port) = if method == "CONNECT" {
        (target, None, 443)
    } else if let Some(rest) = target.strip_prefix("http://") {
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        (authority, Some(path), 80)
    } else {
        return answer(&mut client, "400 Bad Request").await;
    };
    let Some((host, port)) = split_authority(authority) else {
        return answer(&mut client, "400 Bad Request").await;
    };
    let port = port.unwrap_or(default_port);
    let shown = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let addresses = match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(found) => found.collect::<Vec<SocketAddr>>(),
        Err(e) => {
            shared.stop(Stop::Unreachable {
                host: shown,
                why: e.to_string(),
            });
            return answer(&mut client, "502 Bad Gateway").await;
        }
    };
    let admitted = is_allowed(&shared.allowed, &host, port)
        || (!addresses.is_empty() && addresses.iter().all(|a| is_public(a.ip())));
    if !admitted {
        shared.stop(Stop::Refused { host: shown });
        return answer(&mut client, "403 Forbidden").await;
    }
    let mut origin = None;
    let mut last = io::Error::other("no address");
    for address in &addresses {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                origin = Some(stream);
                break;
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = io::ErrorKind::TimedOut.into(),
        }
    }
    let Some(mut origin) = origin else {
        shared.stop(Stop::Unreachable {
            host: shown,
            why: last.to_string(),
        });
        return answer(&mut client, "502 Bad Gateway").await;
    };
    let Some(path) = path else {
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        origin.write_all(&head.rest).await?;
        let (mut origin_read, mut origin_write) = origin.into_split();
        let (mut client_read, mut client_write) = client.into_split();
        let upload = async {
            let _ = tokio::io::copy(&mut client_read, &mut origin_write).await;
            let _ = origin_write.shutdown().await;
        };
        let download = async {
            metered(&mut origin_read, &mut client_write, shared, &shown).await?;
            client_write.shutdown().await
        };
        return until_download_ends(upload, download).await;
    };
    // Plain HTTP: this one request, then the connection closes.
    let version = parts.next().unwrap_or("HTTP/1.1");
    let mut out = format!("{method} {path} {version}\r\n");
    for line in head.lines.iter().skip(1).filter(|l| !hop_by_hop(l)) {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    origin.write_all(out.as_bytes()).await?;
    origin.write_all(&head.rest).await?;
    let (mut origin_read, mut origin_write) = origin.into_split();
    let (mut client_read, mut client_write) = client.into_split();
    let upload = async {
        let _ = tokio::io::copy(&mut client_read, &mut origin_write).await;
    };
    let download = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            if buf.len() > MAX_HEAD {
                return Err(io::Error::other("response head too large"));
            }
            let n = origin_read.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if !shared.spend(n) {
                shared.stop(Stop::TooMuch {
                    host: shown.clone(),
                });
                return Err(io::Error::other("over the pull's budget"));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let text = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut out = String::new();
        for line in text.split("\r\n").filter(|l| !hop_by_hop(l)) {
            out.push_str(line);
            out.push_str("\r\n");
        }
        out.push_str("Connection: close\r\n\r\n");
        client_write.write_all(out.as_bytes()).await?;
        client_write.write_all(&buf[end + 4..]).await?;
        metered(&mut origin_read, &mut client_write, shared, &shown).await?;
        client_write.shutdown().await
    };
    until_download_ends(upload, download).await
}

/// Runs both directions of an exchange until the answer ends, whatever the upload is
/// doing.
async fn until_download_ends(
    upload: impl std::future::Future<Output = ()>,
    download: impl std::future::Future<Output = io::Result<()>>,
) -> io::Result<()> {
    futures::pin_mut!(upload, download);
    match futures::future::select(upload, download).await {
        futures::future::Either::Left(((), download)) => download.await,
        futures::future::Either::Right((done, _)) => done,
    }
}

/// Copies what `host` sends to the client, within the pull's budget.
async fn metered(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    shared: &Shared,
    host: &str,
) -> io::Result<()> {
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        if !shared.spend(n) {
            shared.stop(Stop::TooMuch {
                host: host.to_string(),
            });
            return Err(io::Error::other("over the pull's budget"));
        }
        to.write_all(&chunk[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2002:a00:1::",
            "2001:db8::1",
            "2001::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "100::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "193.0.2.1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::",
            "2606:4700::1111",
            "2a00:1450:4001::1",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn the_proxy_knows_its_own_users_connections() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
            let proxy = listener.local_addr().unwrap();
            let client = TcpStream::connect(proxy).await.unwrap();
            let (_, peer) = listener.accept().await.unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            assert!(peer_is_ours(peer, proxy).await);
            let elsewhere = SocketAddr::from((Ipv4Addr::LOCALHOST, peer.port() ^ 1));
            assert!(!peer_is_ours(elsewhere, proxy).await);
        });
    }

    #[test]
    fn the_allow_list_names_hosts_and_ports_exactly() {
        let list = vec![
            "Registry.Internal:5000".to_string(),
            "10.0.0.7".to_string(),
            "[::1]:5001".to_string(),
        ];
        assert!(is_allowed(&list, "registry.internal", 5000));
        assert!(!is_allowed(&list, "registry.internal", 5001));
        assert!(!is_allowed(&list, "registry.internal.evil.test", 5000));
        assert!(!is_allowed(&list, "internal", 5000));
        assert!(is_allowed(&list, "10.0.0.7", 443));
        assert!(is_allowed(&list, "10.0.0.7", 80));
        assert!(!is_allowed(&list, "10.0.0.70", 80));
        assert!(is_allowed(&list, "::1", 5001));
        assert!(!is_allowed(&list, "::1", 5000));
        assert_eq!(
            split_authority("[::1]:5000"),
            Some(("::1".to_string(), Some(5000)))
        );
        assert_eq!(split_authority("[0:0::1]"), Some(("::1".to_string(), None)));
        assert_eq!(split_authority("host:x"), None);
        assert_eq!(split_authority(""), None);
    }
}

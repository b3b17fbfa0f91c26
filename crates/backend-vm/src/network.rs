//! A VM sandbox's network, both sides of it.
//!
//! `network: none` (the default): the VM has no network device at all, so its guest has only
//! `lo` and no networking code of the VMM is reachable from it; the guest loads no network
//! driver and boots as fast as it would without this module.
//!
//! `network: host`: a virtio-net device (a MAC of the sandbox's own) backed by QEMU's
//! user-mode network stack (libslirp), a NAT inside the QEMU process. The guest is
//! [`GUEST_ADDRESS`] on a network of its own; what it sends anywhere else leaves as
//! connections and datagrams of the QEMU process, so it reaches what the host reaches; the
//! NAT's gateway, [`HOST_ADDRESS`], is the host's own loopback (as a namespace sandbox with
//! the host's network reaches 127.0.0.1), and [`RESOLVER`] forwards DNS queries to the
//! host's resolvers. Nothing reaches the guest from outside but replies (no port is
//! forwarded), and it has IPv4 only.
//!
//! The host side is [`Network`]: QEMU's arguments and the kernel command line word
//! (`upstream.net=`) that tells the guest its addresses. The guest side, run by the guest's
//! init ([`crate::guest`]) only when that word is there, is [`GuestNetwork`]: it loads the
//! network driver the initramfs carries ([`MODULES_ORDER`]), configures the interface and its
//! default route with ioctls ([`upstream_agent::net::configure`]: an image needs no `ip`), and
//! names the NAT's resolver in the sandbox's `/etc/resolv.conf`, bound over the image's from
//! `/run/upstream` as the namespace backend binds `/etc/hosts`.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use upstream_sandbox::NetworkMode;

/// The guest's address on the NAT's network.
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// The length of the NAT network's prefix (`10.0.2.0/24`).
pub const PREFIX: u8 = 24;

/// The NAT's gateway: to the guest, the host's loopback (`10.0.2.2:80` is the host's
/// `127.0.0.1:80`).
pub const HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// The NAT's DNS forwarder, which asks the host's resolvers.
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

/// The file of the initramfs naming the network driver's modules in load order (after those
/// of [`crate::guest::MODULES_ORDER`], which every guest loads).
pub const MODULES_ORDER: &str = "/upstream/modules/order.net";

/// The kernel command line word's prefix: `upstream.net=ADDRESS/PREFIX,GATEWAY,RESOLVER`.
const WORD: &str = "upstream.net=";

/// QEMU's id of the network backend.
const NETDEV_ID: &str = "net0";

/// What a sandbox's VM is given to reach the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// No device: the guest has loopback only.
    None,
    /// A virtio-net device on QEMU's user-mode NAT, with this MAC.
    Nat { mac: [u8; 6] },
}

impl Network {
    /// The network of a sandbox whose spec asks for `mode`: for the host's, a NAT with a MAC
    /// of its own.
    pub fn of(mode: NetworkMode) -> Network {
        match mode {
            NetworkMode::None => Network::None,
            NetworkMode::Host => Network::Nat { mac: new_mac() },
        }
    }

    /// QEMU's arguments for it: none for no network.
    pub fn qemu_args(&self) -> Vec<String> {
        let Network::Nat { mac } = self else {
            return Vec::new();
        };
        let network = Ipv4Addr::from(u32::from(GUEST_ADDRESS) & mask(PREFIX));
        vec![
            "-netdev".into(),
            format!(
                "user,id={NETDEV_ID},net={network}/{PREFIX},host={HOST_ADDRESS},\
                 dns={RESOLVER},dhcpstart={GUEST_ADDRESS},ipv4=on,ipv6=off"
            ),
            "-device".into(),
            format!("virtio-net-device,netdev={NETDEV_ID},mac={}", mac_text(mac)),
        ]
    }

    /// The host's files QEMU reads for it, which its root of its own holds: for the NAT, the
    /// resolver's configuration, whose name servers the NAT's resolver (`10.0.2.3`) asks.
    pub fn host_files(&self) -> Vec<&'static Path> {
        let resolv = Path::new("/etc/resolv.conf");
        match self {
            Network::None => Vec::new(),
            Network::Nat { .. } if resolv.is_file() => vec![resolv],
            Network::Nat { .. } => Vec::new(),
        }
    }

    /// The kernel command line word that tells the guest to bring its network up, if any.
    pub fn kernel_word(&self) -> Option<String> {
        match self {
            Network::None => None,
            Network::Nat { .. } => Some(
                GuestNetwork {
                    address: GUEST_ADDRESS,
                    prefix: PREFIX,
                    gateway: HOST_ADDRESS,
                    resolver: RESOLVER,
                }
                .word(),
            ),
        }
    }
}

/// The netmask of a prefix `prefix` bits long, as a number.
fn mask(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

/// `52:54:00:12:34:56`.
fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A MAC for a new sandbox: QEMU's locally administered prefix `52:54:00`, then three bytes
/// of its own (from the kernel's random source; else from the time, the process and a
/// count, which still differ between sandboxes).
fn new_mac() -> [u8; 6] {
    use std::io::Read;
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut own = [0u8; 3];
    let random = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut own));
    if random.is_err() {
        let mut hash = blake3::Hasher::new();
        hash.update(&std::process::id().to_le_bytes());
        hash.update(
            &MADE
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_le_bytes(),
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        hash.update(&now.to_le_bytes());
        own.copy_from_slice(&hash.finalize().as_bytes()[..3]);
    }
    [0x52, 0x54, 0x00, own[0], own[1], own[2]]
}

/// What the guest is told about its network, and brings up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNetwork {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub resolver: Ipv4Addr,
}

/// How long the guest waits for its network interface to appear once its driver is loaded.
const INTERFACE_WITHIN: Duration = Duration::from_secs(5);

impl GuestNetwork {
    fn word(&self) -> String {
        format!(
            "{WORD}{}/{},{},{}",
            self.address, self.prefix, self.gateway, self.resolver
        )
    }

    /// The network the kernel's command line tells of, if it tells of one; a word that is
    /// not one the host writes is an error.
    pub fn from_cmdline(cmdline: &str) -> Result<Option<GuestNetwork>, String> {
        let Some(value) = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(WORD))
        else {
            return Ok(None);
        };
        let bad = || format!("the kernel command line's {WORD}{value} is no network");
        let mut parts = value.split(',');
        let (address, prefix) = parts
            .next()
            .and_then(|a| a.split_once('/'))
            .ok_or_else(bad)?;
        let mut next_address = || -> Result<Ipv4Addr, String> {
            parts.next().and_then(|a| a.parse().ok()).ok_or_else(bad)
        };
        let network = GuestNetwork {
            address: address.parse().map_err(|_| bad())?,
            prefix: prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?,
            gateway: next_address()?,
            resolver: next_address()?,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Some(network))
    }

    /// Loads the network driver with `load` (given [`MODULES_ORDER`]), waits for its
    /// interface and configures it: address, default route. Before the guest moves into the
    /// sandbox's root.
    pub fn bring_up(&self, load: impl FnOnce(&str) -> Result<(), String>) -> Result<(), String> {
        load(MODULES_ORDER)?;
        let name = wait_for_interface(Path::new("/sys/class/net"), INTERFACE_WITHIN)?;
        upstream_agent::net::configure(&name, self.address, self.prefix, self.gateway)
            .map_err(|e| format!("cannot configure the network interface {name}: {e}"))
    }

    /// Names the NAT's resolver in `/etc/resolv.conf`: written to `/run/upstream` and bound
    /// over the image's file (made in the sandbox's writable layer where the image has none,
    /// or has a link there, which would lead the bind elsewhere). Run inside the sandbox's
    /// root, where a link the image has cannot lead out of it.
    pub fn name_resolver(&self) -> Result<(), String> {
        let ours = "/run/upstream/resolv.conf";
        fs::create_dir_all("/run/upstream")
            .map_err(|e| format!("cannot make /run/upstream: {e}"))?;
        fs::write(ours, resolv_conf(self.resolver))
            .map_err(|e| format!("cannot write {ours}: {e}"))?;
        let target = "/etc/resolv.conf";
        match fs::symlink_metadata(target) {
            Ok(meta) if meta.is_file() => {}
            Ok(meta) if meta.is_dir() => {
                return Err(format!(
                    "the image's {target} is a directory; a sandbox with network needs it a file"
                ));
            }
            found => {
                if found.is_ok() {
                    fs::remove_file(target)
                        .map_err(|e| format!("cannot replace the image's {target}: {e}"))?;
                }
                fs::create_dir_all("/etc").map_err(|e| format!("cannot make /etc: {e}"))?;
                fs::write(target, "").map_err(|e| format!("cannot make {target}: {e}"))?;
            }
        }
        nix::mount::mount(
            Some(ours),
            target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("cannot bind {ours} over {target}: {e}"))
    }
}

/// `/etc/resolv.conf` naming `resolver`.
fn resolv_conf(resolver: Ipv4Addr) -> String {
    format!("nameserver {resolver}\n")
}

/// The name of the first interface under `class` (`/sys/class/net`) that is not `lo`, once
/// there is one.
fn wait_for_interface(class: &Path, within: Duration) -> Result<String, String> {
    let until = Instant::now() + within;
    loop {
        let mut found: Vec<String> = fs::read_dir(class)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| name != "lo")
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        if let Some(name) = found.into_iter().next() {
            return Ok(name);
        }
        if Instant::now() >= until {
            return Err(format!(
                "no network interface appeared within {} s of loading virtio_net",
                within.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_network_is_no_device_and_no_word() {
        let none = Network::of(NetworkMode::None);
        assert!(none.qemu_args().is_empty());
        assert_eq!(none.kernel_word(), None);
    }

    #[test]
    fn the_hosts_network_is_a_nat_with_a_mac_of_the_sandboxs_own() {
        let a = Network::of(NetworkMode::Host);
        let b = Network::of(NetworkMode::Host);
        let (Network::Nat { mac: mac_a }, Network::Nat { mac: mac_b }) = (a, b) else {
            panic!("no NAT: {a:?} {b:?}");
        };
        assert_ne!(mac_a, mac_b, "two sandboxes share a MAC");
        // Unicast, locally administered, and QEMU's default (52:54:00:12:34:56) is no one's.
        assert_eq!(mac_a[0] & 1, 0);
        assert_eq!(mac_a[0] & 2, 2);
        let args = a.qemu_args().join(" ");
        assert!(
            args.contains(
                "-netdev user,id=net0,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,dhcpstart=10.0.2.15,ipv4=on,ipv6=off"
            ),
            "{args}"
        );
        assert!(
            args.contains(&format!(
                "-device virtio-net-device,netdev=net0,mac={}",
                mac_text(&mac_a)
            )),
            "{args}"
        );
        // No port of the host is forwarded in, nor any of the NAT's extras served.
        for word in ["hostfwd", "guestfwd", "smb", "tftp", "bootfile"] {
            assert!(!args.contains(word), "{args}");
        }
    }

    #[test]
    fn the_guest_reads_back_what_the_host_writes_and_refuses_anything_else() {
        let word = Network::of(NetworkMode::Host).kernel_word().unwrap();
        assert_eq!(word, "upstream.net=10.0.2.15/24,10.0.2.2,10.0.2.3");
        let cmdline = format!("quiet {word} upstream.hostname=sandbox");
        assert_eq!(
            GuestNetwork::from_cmdline(&cmdline),
            Ok(Some(GuestNetwork {
                address: GUEST_ADDRESS,
                prefix: PREFIX,
                gateway: HOST_ADDRESS,
                resolver: RESOLVER,
            }))
        );
        assert_eq!(GuestNetwork::from_cmdline("quiet panic=-1"), Ok(None));
        for bad in [
            "upstream.net=",
            "upstream.net=10.0.2.15,10.0.2.2,10.0.2.3",
            "upstream.net=10.0.2.15/33,10.0.2.2,10.0.2.3",
            "upstream.net=10.0.2.15/24,10.0.2.2",
            "upstream.net=10.0.2.15/24,10.0.2.2,10.0.2.3,1.1.1.1",
            "upstream.net=10.0.2.15/24,gateway,10.0.2.3",
        ] {
            let e = GuestNetwork::from_cmdline(bad).unwrap_err();
            assert!(e.contains("is no network"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_resolver_is_named_and_the_interface_found_beside_loopback() {
        assert_eq!(resolv_conf(RESOLVER), "nameserver 10.0.2.3\n");
        let class = tempfile::tempdir().unwrap();
        fs::create_dir(class.path().join("lo")).unwrap();
        let e = wait_for_interface(class.path(), Duration::from_millis(20)).unwrap_err();
        assert!(e.contains("no network interface"), "{e}");
        fs::create_dir(class.path().join("eth0")).unwrap();
        assert_eq!(
            wait_for_interface(class.path(), Duration::from_millis(20)).unwrap(),
            "eth0"
        );
    }

    #[test]
    fn masks_are_as_long_as_their_prefix() {
        assert_eq!(mask(24), 0xffff_ff00);
        assert_eq!(mask(32), u32::MAX);
        assert_eq!(mask(0), 0);
    }
}

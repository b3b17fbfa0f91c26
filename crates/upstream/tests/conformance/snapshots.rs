//! Sandboxes restored from a snapshot of a booted VM (what a warm pool of VMs is filled
//! with): each must be a machine of its own, with nothing of the snapshot's that another
//! restored from it also has — random state, identity, clock, disk.

use std::time::{Duration, SystemTime};

use upstream_sandbox::{Backend, Sandbox, SandboxSpec};

use crate::harness::{Lack, check, skip, vm_backend, vm_spec};

/// A VM backend in a directory of the test's, or `None` (said why) where the machine has none.
fn backend(dir: &tempfile::TempDir) -> Option<upstream_backend_vm::VmBackend> {
    match vm_backend(&dir.path().join("runtime")) {
        Ok(backend) => Some(backend),
        Err(e) => {
            skip(
                Lack::Setup,
                &format!("snapshots: this machine cannot run VMs: {e}"),
            );
            None
        }
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("upstream-conformance-")
        .tempdir()
        .unwrap()
}

/// What makes a machine itself, as a command in it reads it: the kernel's boot id (made
/// from its random generator when first read), 32 bytes of that generator, the hostname
/// and the clock, one per line.
const IDENTITY: &str = "cat /proc/sys/kernel/random/boot_id; \
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; date +%s";

struct Identity {
    boot_id: String,
    random: String,
    hostname: String,
    clock: u64,
}

fn identity(sandbox: &mut dyn Sandbox) -> Identity {
    let out = check(sandbox, IDENTITY);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    Identity {
        boot_id: lines[0].into(),
        random: lines[1].into(),
        hostname: lines[2].into(),
        clock: lines[3].parse().unwrap(),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn named(name: &str) -> SandboxSpec {
    SandboxSpec {
        hostname: name.into(),
        ..vm_spec()
    }
}

#[test]
fn restored_vms_draw_their_own_random_bytes_and_have_their_own_names_and_clocks() {
    let dir = tempdir();
    let Some(backend) = backend(&dir) else { return };
    backend.prepare(&vm_spec()).unwrap();
    // The snapshot ages, as a pool's does: a restored clock would be this far behind.
    std::thread::sleep(Duration::from_secs(3));

    let mut first = backend.create(&named("first")).unwrap();
    let mut second = backend.create(&named("second")).unwrap();
    let (a, b) = (identity(first.as_mut()), identity(second.as_mut()));
    assert_ne!(a.boot_id, b.boot_id, "two restored VMs share a boot id");
    assert_ne!(
        a.random, b.random,
        "two restored VMs drew the same random bytes"
    );
    assert_eq!(
        (a.hostname.as_str(), b.hostname.as_str()),
        ("first", "second")
    );
    for clock in [a.clock, b.clock] {
        assert!(
            now().abs_diff(clock) <= 2,
            "a restored VM's clock reads {clock}, the host's {}",
            now()
        );
    }

    // The control: restored with nothing renewed, two VMs are one machine twice over — the
    // same boot id (the generator's first draw), the snapshot's name and its clock — so the
    // checks above would catch a renewal that did not happen. (Their later draws part soon
    // without it too, once the kernel reseeds from interrupts timed apart: the boot id,
    // drawn first, is the sharp test.) The guest's kernel reseeds its generator on a draw
    // when its seed is older than half its uptime, mixing in RDRAND and interrupt timings of
    // each VM's own: a draw that a loaded host delays past that (a second or two after a
    // snapshot taken early in a boot) parts the two even unrenewed. So the control is tried
    // on fresh pairs until one pair draws in time; that such a pair is one machine twice
    // over is what it shows.
    let mut attempts = Vec::new();
    let (c, _) = loop {
        let mut third = backend.restore_unrenewed(&vm_spec()).unwrap();
        let mut fourth = backend.restore_unrenewed(&vm_spec()).unwrap();
        let (c, d) = (identity(third.as_mut()), identity(fourth.as_mut()));
        third.destroy().unwrap();
        fourth.destroy().unwrap();
        if c.boot_id == d.boot_id {
            break (c, d);
        }
        attempts.push((c.boot_id, d.boot_id));
        assert!(
            attempts.len() < 6,
            "the control's VMs differ, pair after pair: the test shows nothing: {attempts:?}"
        );
    };
    assert_eq!(c.hostname, upstream_sandbox::DEFAULT_HOSTNAME);
    assert!(
        now() >= c.clock + 2,
        "the snapshot's clock reads {}, the host's {}",
        c.clock,
        now()
    );
    for sandbox in [first, second] {
        sandbox.destroy().unwrap();
    }
}

#[test]
fn restored_vms_have_disks_of_their_own() {
    let dir = tempdir();
    let Some(backend) = backend(&dir) else { return };
    backend.prepare(&vm_spec()).unwrap();
    let mut first = backend.create(&vm_spec()).unwrap();
    let mut second = backend.create(&vm_spec()).unwrap();
    check(
        first.as_mut(),
        "echo mine > /workspace/note && echo mine > /etc/note && sync",
    );
    let seen = check(second.as_mut(), "ls /workspace /etc/note 2>&1; true");
    assert!(
        !seen.contains("note\n") && seen.contains("No such file"),
        "{seen}"
    );
    first.destroy().unwrap();
    // A sandbox restored after another wrote and went starts from the snapshot's disk.
    let mut third = backend.create(&vm_spec()).unwrap();
    let seen = check(third.as_mut(), "cat /workspace/note /etc/note 2>&1; true");
    assert!(!seen.contains("mine"), "{seen}");
    // And it works as a sandbox: what it writes it reads back.
    assert_eq!(
        check(third.as_mut(), "echo ok > /tmp/t && cat /tmp/t"),
        "ok\n"
    );
    for sandbox in [second, third] {
        sandbox.destroy().unwrap();
    }
}

//! The Firecracker driver against a fake Firecracker: a test-side HTTP server on the API
//! socket that answers as Firecracker does (204, or 400 with a `fault_message`) and records
//! every request, and on the vsock socket serves the `CONNECT <port>` handshake with a fake
//! agent behind it. The "firecracker" the driver starts is a shell script that notes its
//! arguments and sleeps, so the driver's process handling is real: it is spawned, watched
//! and killed. Runs anywhere: no KVM, no Firecracker. The "jailer" is a script too: it
//! enters the jail as the real one does and drops to the uid and gid it is given before it
//! becomes the fake Firecracker (`setpriv`), which clears its parent-death signal as the real
//! jailer's drop does.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use upstream_agent::protocol::{
    ExecRequest, ExitStatus, Request, Response, Stream, read_frame, read_hello, write_frame,
    write_hello,
};
use upstream_backend_vm::confine::{Host, VmmLimits};
use upstream_backend_vm::firecracker::jail::{self, Keeper};
use upstream_backend_vm::firecracker::{Firecracker, Jailer};
use upstream_backend_vm::network::Network;
use upstream_backend_vm::vmm::{MachineSpec, Snapshot, Vmm, VmmError};
use upstream_sandbox::AgentClient;
use upstream_sandbox::cgroup::Controller;

/// What the fake saw and how it answers.
#[derive(Default)]
struct Fake {
    /// Every API request: method, path, body.
    requests: Vec<(String, String, Value)>,
    /// The guest ports `CONNECT`ed to, in order, whether taken or refused.
    connects: Vec<u32>,
    /// Requests answered with a fault: `"PUT /boot-source"` → its `fault_message`.
    faults: HashMap<String, String>,
    /// How many `CONNECT`s are refused first, as by a guest still booting.
    refuse_first: usize,
}

type Shared = Arc<Mutex<Fake>>;

/// Starts a fake Firecracker for the VM in `dir`: once the driver's process has started
/// (its script wrote `fake.args`), it serves the API on `fc.sock` there.
fn fake_firecracker(dir: &Path, fake: Fake) -> Shared {
    let shared = Arc::new(Mutex::new(fake));
    let state = shared.clone();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(20);
        while !dir.join("fake.args").exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        let listener = UnixListener::bind(dir.join("fc.sock")).unwrap();
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (state, dir) = (state.clone(), dir.clone());
            std::thread::spawn(move || serve_api(stream, &state, &dir));
        }
    });
    shared
}

/// Answers API requests on one connection (kept alive, as micro_http does).
fn serve_api(mut stream: UnixStream, state: &Shared, dir: &Path) {
    loop {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let (method, path, head, length) = loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut request = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(head)) = request.parse(&buf) {
                let length = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |h| {
                        std::str::from_utf8(h.value).unwrap().parse().unwrap()
                    });
                break (
                    request.method.unwrap().to_string(),
                    request.path.unwrap().to_string(),
                    head,
                    length,
                );
            }
        };
        while buf.len() < head + length {
            let n = stream.read(&mut chunk).unwrap();
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Value = match length {
            0 => Value::Null,
            _ => serde_json::from_slice(&buf[head..head + length]).unwrap(),
        };
        let call = format!("{method} {path}");
        let fault = {
            let mut fake = state.lock().unwrap();
            fake.requests
                .push((method.clone(), path.clone(), body.clone()));
            fake.faults.get(&call).cloned()
        };
        let answer = match fault {
            Some(fault) => {
                let body = json!({ "fault_message": fault }).to_string();
                format!(
                    "HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            }
            None => {
                act(&call, &body, state, dir);
                "HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n"
                    .to_string()
            }
        };
        if stream.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// What Firecracker does for a call: opens the vsock socket, writes a snapshot's files.
fn act(call: &str, body: &Value, state: &Shared, dir: &Path) {
    match call {
        "PUT /vsock" => listen_vsock(&dir.join(body["uds_path"].as_str().unwrap()), state),
        "PUT /snapshot/create" => {
            for key in ["snapshot_path", "mem_file_path"] {
                let path = dir.join(body[key].as_str().unwrap());
                std::fs::write(path, key).unwrap();
            }
        }
        // The vsock device comes back with the name it had, in this Firecracker's directory.
        "PUT /snapshot/load" => listen_vsock(&dir.join("v.sock"), state),
        _ => {}
    }
}

fn listen_vsock(path: &Path, state: &Shared) {
    let listener = UnixListener::bind(path).unwrap();
    let state = state.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let state = state.clone();
            std::thread::spawn(move || serve_vsock(stream, &state));
        }
    });
}

/// The `CONNECT` handshake, then a fake agent on the stream.
fn serve_vsock(mut stream: UnixStream, state: &Shared) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).unwrap();
    let port: u32 = line.strip_prefix("CONNECT ").unwrap().parse().unwrap();
    {
        let mut fake = state.lock().unwrap();
        fake.connects.push(port);
        if fake.refuse_first > 0 {
            fake.refuse_first -= 1;
            return;
        }
    }
    stream.write_all(b"OK 1073741824\n").unwrap();
    fake_agent(stream, &format!("port {port}"));
}

/// An agent that greets, then answers each `Exec` with its argv and exit 0, and attaches a
/// vsock session.
fn fake_agent(mut conn: UnixStream, label: &str) {
    write_hello(&mut conn).unwrap();
    write_frame(&mut conn, &Response::Ready).unwrap();
    if !read_hello(&mut conn).unwrap_or(false) {
        return;
    }
    while let Ok(Some(request)) = read_frame::<_, Request>(&mut conn) {
        let answers = match request {
            Request::Exec(exec) => vec![
                Response::Started { pid: 2 },
                Response::Output {
                    stream: Stream::Stdout,
                    data: format!("{label}: {}", exec.argv.join(" ")).into_bytes(),
                },
                Response::Exited {
                    status: ExitStatus::Code(0),
                    timed_out: false,
                    micros: 1,
                    collected: None,
                    oom_kills: None,
                    disk_full: None,
                },
            ],
            Request::Attach { port } if port == upstream_agent::vsock::ATTACH_NAME => {
                vec![Response::Done]
            }
            other => vec![Response::Error {
                message: format!("the fake agent does not do {other:?}"),
            }],
        };
        for answer in answers {
            write_frame(&mut conn, &answer).unwrap();
        }
    }
}

/// A sandbox's directory with the files a machine names, and the script that stands in for
/// Firecracker (it notes its working directory and arguments, then sleeps).
struct Setup {
    _temp: tempfile::TempDir,
    root: PathBuf,
    script: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    root_disk: PathBuf,
}

impl Setup {
    fn new(script: &str) -> Setup {
        Setup::in_dir(script, &std::env::temp_dir())
    }

    /// A setup in a temporary directory under `parent`.
    fn in_dir(script: &str, parent: &Path) -> Setup {
        let temp = tempfile::tempdir_in(parent).unwrap();
        let root = temp.path().to_path_buf();
        for name in ["vmlinux", "initramfs", "root.ext4"] {
            std::fs::write(root.join(name), name).unwrap();
        }
        let path = root.join("firecracker");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Setup {
            _temp: temp,
            kernel: root.join("vmlinux"),
            initramfs: root.join("initramfs"),
            root_disk: root.join("root.ext4"),
            root,
            script: path,
        }
    }

    fn sandbox(&self, name: &str) -> PathBuf {
        let dir = self.root.join("sandboxes").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("scratch.ext4"), "scratch").unwrap();
        dir
    }

    fn firecracker(&self) -> Firecracker {
        Firecracker {
            binary: self.script.clone(),
            jailer: None,
        }
    }
}

/// The fake Firecracker: notes its pid, working directory and arguments (whole when the file
/// appears: the fake API starts then), and sleeps.
const SLEEPS: &str =
    "#!/bin/sh\necho \"$$ $PWD $*\" > fake.args.new\nmv fake.args.new fake.args\nexec sleep 600\n";

fn machine<'a>(
    setup: &'a Setup,
    dir: &'a Path,
    scratch: &'a Path,
    cmdline: &'a [String],
) -> MachineSpec<'a> {
    MachineSpec {
        kernel: &setup.kernel,
        initramfs: &setup.initramfs,
        root_disk: &setup.root_disk,
        scratch_disk: scratch,
        memory_mib: 704,
        cpus: 2,
        cmdline,
        network: Network::None,
        dir,
        snapshot_memory: None,
        confinement: None,
    }
}

fn requests(fake: &Shared) -> Vec<(String, String, Value)> {
    std::mem::take(&mut fake.lock().unwrap().requests)
}

fn exec(client: &mut AgentClient<UnixStream>, argv: &[&str]) -> String {
    let request = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        cwd: "/".into(),
        ..Default::default()
    };
    let mut out = Vec::new();
    let exited = client
        .exec(&request, &mut |_, data| out.extend_from_slice(data))
        .unwrap();
    assert!(exited.status.success());
    String::from_utf8(out).unwrap()
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[test]
fn a_vm_is_configured_booted_connected_snapshotted_restored_and_killed() {
    let setup = Setup::new(SLEEPS);
    let dir = setup.sandbox("1-a-0");
    let scratch = dir.join("scratch.ext4");
    let cmdline = vec![
        "console=ttyS0".to_string(),
        "upstream.hostname=box".to_string(),
    ];
    let fake = fake_firecracker(
        &dir,
        Fake {
            refuse_first: 3,
            ..Default::default()
        },
    );
    let fc = setup.firecracker();
    let mut vm = fc
        .start(&machine(&setup, &dir, &scratch, &cmdline))
        .unwrap();
    // Started in the sandbox's directory, its API and log named there.
    let args = std::fs::read_to_string(dir.join("fake.args")).unwrap();
    let (pid, rest) = args.trim().split_once(' ').unwrap();
    assert_eq!(pid.parse::<i32>().unwrap(), vm.pid());
    assert_eq!(
        rest,
        format!(
            "{} --id upstream-1-a-0 --api-sock fc.sock --log-path fc.log --level Warning",
            dir.display()
        )
    );
    let root = |name: &str| setup.root.join(name).display().to_string();
    let expected = vec![
        (
            "PUT",
            "/machine-config",
            json!({ "vcpu_count": 2, "mem_size_mib": 704, "smt": false }),
        ),
        (
            "PUT",
            "/boot-source",
            json!({
                "kernel_image_path": root("vmlinux"),
                "initrd_path": root("initramfs"),
                "boot_args": "console=ttyS0 upstream.hostname=box reboot=k upstream.stop=reboot upstream.disks=by-mode",
            }),
        ),
        (
            "PUT",
            "/drives/root",
            json!({ "drive_id": "root", "path_on_host": root("root.ext4"), "is_root_device": false, "is_read_only": true }),
        ),
        (
            "PUT",
            "/drives/scratch",
            json!({ "drive_id": "scratch", "path_on_host": "scratch.ext4", "is_root_device": false, "is_read_only": false }),
        ),
        (
            "PUT",
            "/vsock",
            json!({ "guest_cid": 3, "uds_path": "v.sock" }),
        ),
        ("PUT", "/actions", json!({ "action_type": "InstanceStart" })),
    ];
    let seen = requests(&fake);
    assert_eq!(seen.len(), expected.len(), "{seen:#?}");
    for ((method, path, body), (m, p, b)) in seen.iter().zip(&expected) {
        assert_eq!((method.as_str(), path.as_str(), body), (*m, *p, b));
    }

    // The agent's port, through a guest that refused the first tries while it booted.
    let until = Instant::now() + Duration::from_secs(10);
    let stream = vm.connect_agent(until).unwrap();
    let mut agent = AgentClient::new(stream);
    agent.wait_ready().unwrap();
    assert_eq!(exec(&mut agent, &["echo", "hi"]), "port 700: echo hi");
    // A session: its own connection to the session port, then Attach by name.
    let (stream, name) = vm.connect_session(1, until).unwrap();
    assert_eq!(name, "vsock");
    let mut session = agent.attach(&name, stream).unwrap();
    assert_eq!(exec(&mut session, &["true"]), "port 701: true");
    assert_eq!(fake.lock().unwrap().connects, [700, 700, 700, 700, 701]);
    assert!(vm.session_channels() > 15);

    // A snapshot: paused and made whole; then resumed.
    let snapshots = setup.root.join("snapshots");
    std::fs::create_dir_all(&snapshots).unwrap();
    let snapshot = Snapshot {
        state: snapshots.join("vm.state"),
        memory: snapshots.join("vm.mem"),
    };
    vm.snapshot(&snapshot).unwrap();
    vm.resume().unwrap();
    let seen = requests(&fake);
    assert_eq!(
        seen,
        vec![
            ("PATCH".into(), "/vm".into(), json!({ "state": "Paused" })),
            (
                "PUT".into(),
                "/snapshot/create".into(),
                json!({
                    "snapshot_type": "Full",
                    "snapshot_path": snapshot.state.display().to_string(),
                    "mem_file_path": snapshot.memory.display().to_string(),
                })
            ),
            ("PATCH".into(), "/vm".into(), json!({ "state": "Resumed" })),
        ]
    );
    assert!(snapshot.state.is_file() && snapshot.memory.is_file());

    // Restored in another sandbox's directory: loaded and resumed, nothing configured, and
    // its agent is connected to afresh.
    let dir2 = setup.sandbox("2-b-0");
    let scratch2 = dir2.join("scratch.ext4");
    let fake2 = fake_firecracker(&dir2, Fake::default());
    let mut restored = fc
        .restore(&snapshot, &machine(&setup, &dir2, &scratch2, &cmdline))
        .unwrap();
    assert_eq!(
        requests(&fake2),
        vec![(
            "PUT".into(),
            "/snapshot/load".into(),
            json!({
                "snapshot_path": snapshot.state.display().to_string(),
                "mem_backend": { "backend_type": "File", "backend_path": snapshot.memory.display().to_string() },
                "resume_vm": true,
            })
        )]
    );
    let mut agent2 = AgentClient::new(restored.connect_agent(until).unwrap());
    assert_eq!(exec(&mut agent2, &["uname"]), "port 700: uname");

    // Killed: both processes are gone at once.
    let (pid, pid2) = (vm.pid(), restored.pid());
    vm.kill();
    restored.kill();
    assert!(!pid_alive(pid) && !pid_alive(pid2));
    assert!(vm.process().try_wait().unwrap().is_some());
}

#[test]
fn a_refusal_of_firecrackers_is_its_fault_message_and_the_vm_is_gone() {
    let setup = Setup::new(SLEEPS);
    let dir = setup.sandbox("3-c-0");
    let scratch = dir.join("scratch.ext4");
    let fault = "Invalid kernel path: No such file or directory (os error 2)";
    let fake = fake_firecracker(
        &dir,
        Fake {
            faults: [("PUT /boot-source".to_string(), fault.to_string())].into(),
            ..Default::default()
        },
    );
    let cmdline = Vec::new();
    let e = setup
        .firecracker()
        .start(&machine(&setup, &dir, &scratch, &cmdline))
        .unwrap_err();
    assert!(matches!(e, VmmError::Api(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("Firecracker refused PUT /boot-source: {fault}")
    );
    // Nothing is asked after the refusal, and the process is killed.
    let paths: Vec<String> = requests(&fake).into_iter().map(|(_, p, _)| p).collect();
    assert_eq!(paths, ["/machine-config", "/boot-source"]);
    let args = std::fs::read_to_string(dir.join("fake.args")).unwrap();
    let pid: i32 = args.split_whitespace().next().unwrap().parse().unwrap();
    assert!(!pid_alive(pid), "the refused VM's process lives on");

    // A refused snapshot load is one too.
    let dir = setup.sandbox("4-d-0");
    let scratch = dir.join("scratch.ext4");
    let fault = "Load snapshot error: Failed to restore from snapshot: cannot open memory file";
    fake_firecracker(
        &dir,
        Fake {
            faults: [("PUT /snapshot/load".to_string(), fault.to_string())].into(),
            ..Default::default()
        },
    );
    let snapshot = Snapshot {
        state: setup.root.join("none.state"),
        memory: setup.root.join("none.mem"),
    };
    let e = setup
        .firecracker()
        .restore(&snapshot, &machine(&setup, &dir, &scratch, &cmdline))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Firecracker refused PUT /snapshot/load: {fault}")
    );
}

/// Firecracker has no user-mode NAT: a machine with the host's network is refused with a
/// sentence before any Firecracker starts; the same machine without it starts (the control).
#[test]
fn a_machine_with_the_hosts_network_is_refused_before_firecracker_starts() {
    let setup = Setup::new(SLEEPS);
    let dir = setup.sandbox("7-g-0");
    let scratch = dir.join("scratch.ext4");
    let fake = fake_firecracker(&dir, Fake::default());
    let cmdline = Vec::new();
    let networked = MachineSpec {
        network: Network::of(upstream_sandbox::NetworkMode::Host),
        ..machine(&setup, &dir, &scratch, &cmdline)
    };
    let e = setup.firecracker().start(&networked).unwrap_err();
    assert!(matches!(e, VmmError::Unsupported(_)), "{e:?}");
    assert!(e.to_string().contains("UPSTREAM_VMM=qemu"), "{e}");
    assert!(requests(&fake).is_empty());
    assert!(!dir.join("fake.args").exists(), "Firecracker was started");
    let mut vm = setup
        .firecracker()
        .start(&machine(&setup, &dir, &scratch, &cmdline))
        .unwrap();
    assert!(dir.join("fake.args").exists());
    assert!(!requests(&fake).is_empty());
    vm.kill();
}

#[test]
fn a_firecracker_that_exits_at_once_is_told_apart_from_one_that_is_slow() {
    let setup = Setup::new("#!/bin/sh\necho 'Error: no /dev/kvm' >&2\nexit 3\n");
    let dir = setup.sandbox("5-e-0");
    let scratch = dir.join("scratch.ext4");
    let cmdline = Vec::new();
    let e = setup
        .firecracker()
        .start(&machine(&setup, &dir, &scratch, &cmdline))
        .unwrap_err();
    assert!(matches!(e, VmmError::Exited), "{e:?}");
    // A guest that never takes the agent's connection is a sentence, not a hang.
    let setup = Setup::new(SLEEPS);
    let dir = setup.sandbox("6-f-0");
    let scratch = dir.join("scratch.ext4");
    fake_firecracker(
        &dir,
        Fake {
            refuse_first: usize::MAX,
            ..Default::default()
        },
    );
    let mut vm = setup
        .firecracker()
        .start(&machine(&setup, &dir, &scratch, &cmdline))
        .unwrap();
    let e = vm
        .connect_agent(Instant::now() + Duration::from_millis(300))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("did not take a connection on vsock port 700"),
        "{e}"
    );
    vm.kill();
}

/// A jailer that does what the real one does to the process and the jail, as far as a test
/// sees: it notes its arguments in the jail (`jailer.args`), enters the jail's root, and
/// becomes Firecracker as the uid and gid it was given, with no other group.
const JAILER: &str = "#!/bin/sh\n\
     args=\"$*\"\n\
     while [ \"$1\" != -- ]; do\n\
       case \"$1\" in\n\
         --id) id=$2;; --chroot-base-dir) base=$2;; --uid) uid=$2;; --gid) gid=$2;;\n\
       esac\n\
       shift 2\n\
     done\n\
     shift\n\
     cd \"$base/firecracker/$id/root\" || exit 9\n\
     echo \"$args\" > ../jailer.args\n\
     echo \"$$ $PWD $*\" > fake.args.new\n\
     mv fake.args.new fake.args\n\
     exec setpriv --reuid=\"$uid\" --regid=\"$gid\" --clear-groups sleep 600\n";

/// As root: a jailer drops to other users, and VMs' monitors get users of their own. Not
/// root, the test says so and passes, as nothing can be jailed.
fn as_root(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED (needs root): {test}");
    false
}

/// The keeper of the jailed VMs' pid namespace in these tests: this test binary, running
/// [`jail_keeper`] (upstream's binary runs the same code with `KEEPER_ARG`).
fn keeper() -> Keeper {
    Keeper {
        program: std::env::current_exe().unwrap(),
        args: ["jail_keeper", "--exact", "--test-threads=1", "--quiet"]
            .map(Into::into)
            .to_vec(),
    }
}

/// The keeper's code, as this binary runs it when the driver starts it as pid 1 of the jailed
/// VMs' namespace ([`keeper`]): it returns once upstream (the test process) is gone. Run as
/// a test, not as pid 1, it shows that it refuses to be anything but that namespace's first
/// process.
#[test]
fn jail_keeper() {
    let kept = jail::keep();
    if std::process::id() != 1 {
        assert!(matches!(kept, Err(jail::KeeperError::NotInit)), "{kept:?}");
    }
}

/// A jailed setup: the fake Firecracker, the fake jailer, and where jails go.
struct Jailed {
    setup: Setup,
    jailer: PathBuf,
    base: PathBuf,
}

impl Jailed {
    fn new(parent: &Path) -> Jailed {
        let setup = Setup::in_dir(SLEEPS, parent);
        let jailer = setup.root.join("jailer");
        std::fs::write(&jailer, JAILER).unwrap();
        std::fs::set_permissions(&jailer, std::fs::Permissions::from_mode(0o755)).unwrap();
        let base = setup.root.join("jail");
        Jailed {
            setup,
            jailer,
            base,
        }
    }

    fn firecracker(&self, shared_ids: Option<(u32, u32)>) -> Firecracker {
        Firecracker {
            binary: self.setup.root.join("firecracker"),
            jailer: Some(Jailer {
                binary: self.jailer.clone(),
                shared_ids,
                chroot_base: self.base.clone(),
                keeper: keeper(),
            }),
        }
    }

    /// The jail of the VM whose sandbox's directory is named `name`.
    fn jail(&self, name: &str) -> PathBuf {
        self.base.join(format!("firecracker/upstream-{name}"))
    }
}

/// The limits lib.rs gives a VM of this test's machine: its RAM and Firecracker's stated
/// overhead.
fn limits(fc: &Firecracker) -> VmmLimits {
    VmmLimits::for_guest(704 << 20, fc.memory_overhead(), 2, None)
}

/// A field of `/proc/<pid>/status` (its first word).
fn status_field(pid: i32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// The uid and gid process `pid` runs as, once the fake jailer (which notes where it is
/// before it drops to them) has become the fake Firecracker.
fn ids_of(pid: i32) -> (String, String) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let ids = (status_field(pid, "Uid:"), status_field(pid, "Gid:"));
        if ids.0 != "0" || Instant::now() >= until {
            return ids;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` is still there (and not a zombie waiting to be reaped).
fn runs(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s[s.rfind(')')? + 2..].chars().next()?;
            Some(state != 'Z')
        })
        .unwrap_or(false)
}

fn gone_within(pid: i32, within: Duration) -> bool {
    let until = Instant::now() + within;
    while runs(pid) {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Whether the id range whose first id is `base` is free (its lock can be taken).
fn range_is_free(base: u32) -> bool {
    use std::os::fd::AsRawFd;
    let slot = (base - upstream_sandbox::ids::FIRST_ID) / upstream_sandbox::ids::RANGE_SIZE;
    let path = upstream_sandbox::runtime::ids_dir()
        .unwrap()
        .join(format!("{slot}.lock"));
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: flock on a descriptor of this function's; released when it is closed.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Through the jailer: it is given the VM's id, Firecracker, the VM's own ids and the jails'
/// base, and no cgroup of its own (it is in the VM's before it runs); Firecracker is told the
/// files by their names in the jail, where they are links to the machine's; the jail goes
/// with the VM.
#[test]
fn a_jailed_vm_sees_its_files_by_their_names_in_the_jail_and_its_jail_goes_with_it() {
    if !as_root("a_jailed_vm_sees_its_files_by_their_names_in_the_jail_and_its_jail_goes_with_it") {
        return;
    }
    let jailed = Jailed::new(&std::env::temp_dir());
    let setup = &jailed.setup;
    let dir = setup.sandbox("7-g-0");
    let scratch = dir.join("scratch.ext4");
    let jail = jailed.jail("7-g-0");
    let fake = fake_firecracker(&jail.join("root"), Fake::default());
    let fc = jailed.firecracker(None);
    let confinement = Host::new().confine(&dir, &limits(&fc)).unwrap();
    let cmdline = Vec::new();
    let mut vm = fc
        .start(&MachineSpec {
            confinement: Some(&confinement),
            ..machine(setup, &dir, &scratch, &cmdline)
        })
        .unwrap();
    let args = std::fs::read_to_string(jail.join("jailer.args")).unwrap();
    let id = confinement.user().unwrap();
    assert_eq!(
        args.trim(),
        format!(
            "--id upstream-7-g-0 --exec-file {} --uid {id} --gid {id} --chroot-base-dir {} \
             -- --api-sock fc.sock --log-path fc.log --level Warning",
            setup.root.join("firecracker").display(),
            jailed.base.display()
        )
    );
    let named: HashMap<String, Value> = requests(&fake)
        .into_iter()
        .map(|(_, path, body)| (path, body))
        .collect();
    assert_eq!(named["/boot-source"]["kernel_image_path"], "vmlinux");
    assert_eq!(named["/boot-source"]["initrd_path"], "initramfs");
    assert_eq!(named["/drives/root"]["path_on_host"], "root.ext4");
    assert_eq!(named["/drives/scratch"]["path_on_host"], "scratch.ext4");
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&jail.join("root/root.ext4")), ino(&setup.root_disk));
    assert_eq!(ino(&jail.join("root/scratch.ext4")), ino(&scratch));
    // The agent through the jail's vsock socket.
    let until = Instant::now() + Duration::from_secs(10);
    let mut agent = AgentClient::new(vm.connect_agent(until).unwrap());
    assert_eq!(exec(&mut agent, &["id"]), "port 700: id");
    // A snapshot is made in the jail, by its names there, and moved out to where it was
    // asked for: upstream's and read-only, for every VM restored from it to read as its own
    // user.
    let snapshot = Snapshot {
        state: setup.root.join("jailed.state"),
        memory: setup.root.join("jailed.mem"),
    };
    vm.snapshot(&snapshot).unwrap();
    let seen = requests(&fake);
    assert_eq!(
        seen[1].2,
        json!({ "snapshot_type": "Full", "snapshot_path": "snapshot.state", "mem_file_path": "snapshot.mem" })
    );
    for (file, written) in [
        (&snapshot.state, "snapshot_path"),
        (&snapshot.memory, "mem_file_path"),
    ] {
        assert_eq!(std::fs::read_to_string(file).unwrap(), written);
        let meta = std::fs::metadata(file).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o444));
    }
    assert!(!jail.join("root/snapshot.state").exists());
    let pid = vm.pid();
    vm.kill();
    assert!(!pid_alive(pid));
    assert!(!jail.exists(), "the jail outlived its VM");
    // The machine's own files are where they were.
    assert!(setup.root_disk.is_file() && scratch.is_file());
}

/// Two jailed VMs drop to users of their own — no two alike, each its confinement's, the
/// first id of a host range held for the VM — and the jail's files Firecracker writes are
/// that user's; each runs in the VM's own cgroups, sized for its guest's RAM and
/// Firecracker's overhead, in the keeper's pid namespace rather than upstream's. A VM ended
/// leaves no process, no jail, no cgroup, and its ids are free again. With
/// `$UPSTREAM_JAILER_IDS` (the control) every VM is given those.
#[test]
fn jailed_vms_run_as_users_of_their_own_in_cgroups_sized_for_their_guests() {
    if !as_root("jailed_vms_run_as_users_of_their_own_in_cgroups_sized_for_their_guests") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let jailed = Jailed::new(&std::env::temp_dir());
    let fc = jailed.firecracker(None);
    let host = Host::new();
    let cmdline = Vec::new();
    let mut vms = Vec::new();
    for name in ["8-h-0", "8-h-1"] {
        let dir = jailed.setup.sandbox(name);
        let jail = jailed.jail(name);
        fake_firecracker(&jail.join("root"), Fake::default());
        let confinement = host.confine(&dir, &limits(&fc)).unwrap();
        let scratch = dir.join("scratch.ext4");
        let vm = fc
            .start(&MachineSpec {
                confinement: Some(&confinement),
                ..machine(&jailed.setup, &dir, &scratch, &cmdline)
            })
            .unwrap();
        vms.push((vm, confinement, jail, dir));
    }
    let mut ids = Vec::new();
    for (vm, confinement, jail, dir) in &vms {
        let pid = vm.pid();
        let id = confinement.user().unwrap();
        assert!(id >= upstream_sandbox::ids::FIRST_ID, "{id}");
        // The jailer was told the VM's ids, and Firecracker runs as them.
        let args = std::fs::read_to_string(jail.join("jailer.args")).unwrap();
        assert!(args.contains(&format!("--uid {id} --gid {id} ")), "{args}");
        assert_eq!(ids_of(pid), (id.to_string(), id.to_string()));
        // What Firecracker writes in its jail is its own; the sandbox's disk is the same file.
        for name in ["scratch.ext4", "fc.log"] {
            let meta = std::fs::metadata(jail.join("root").join(name)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (id, id), "{name}");
        }
        assert_eq!(
            std::fs::metadata(dir.join("scratch.ext4")).unwrap().uid(),
            id
        );
        assert!(!range_is_free(id), "a running VM's range is free");
        // In the VM's own cgroups: memory for the guest's RAM and Firecracker's overhead.
        let memory = confinement.cgroup(Controller::Memory).unwrap();
        let procs = std::fs::read_to_string(memory.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
        let limit = ["memory.limit_in_bytes", "memory.max"]
            .iter()
            .find_map(|f| std::fs::read_to_string(memory.join(f)).ok())
            .unwrap();
        assert_eq!(limit.trim(), ((704u64 + 128) << 20).to_string());
        let pids = confinement.cgroup(Controller::Pids).unwrap();
        let procs = std::fs::read_to_string(pids.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
        // In the keeper's pid namespace, not upstream's: its pid there is another.
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
        assert_ne!(ns(&pid.to_string()), ns("self"));
        // Nor upstream's network, IPC or host-name namespace (its guest has no network);
        // the control: its mount namespace is the jailer's, which a fake jailer does not
        // change, so the same look tells a shared namespace.
        for kind in ["net", "ipc", "uts", "mnt"] {
            let of = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
            let shared = of(&pid.to_string()) == of("self");
            assert_eq!(
                shared,
                kind == "mnt",
                "the jailed VM shares upstream's {kind}"
            );
        }
        let nspid = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let nspid = nspid.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        assert_eq!(nspid.split_whitespace().count(), 3, "{nspid}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "two VMs share a user");
    let (vm0, vm1) = (&vms[0].0, &vms[1].0);
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    assert_eq!(ns(vm0.pid()), ns(vm1.pid()), "one keeper's namespace");
    // Ended: no process, no jail; once its confinement goes, no cgroup, and its ids are free.
    for ((mut vm, confinement, jail, _), id) in vms.into_iter().zip(ids) {
        let pid = vm.pid();
        let cgroups: Vec<PathBuf> = [Controller::Memory, Controller::Pids, Controller::Cpu]
            .iter()
            .filter_map(|c| confinement.cgroup(*c).map(Path::to_path_buf))
            .collect();
        vm.kill();
        assert!(!runs(pid), "the VM's Firecracker outlived it");
        assert!(!jail.exists(), "the jail outlived its VM");
        drop(confinement);
        for cgroup in cgroups {
            assert!(!cgroup.exists(), "{} outlived its VM", cgroup.display());
        }
        let until = Instant::now() + Duration::from_secs(10);
        // A child another test forks holds the lock's descriptor until it execs.
        while !range_is_free(id) {
            assert!(Instant::now() < until, "the ended VM's ids are still held");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // The control: ids named for all VMs are every VM's, whatever its confinement.
    let shared = jailed.firecracker(Some((65533, 65532)));
    let dir = jailed.setup.sandbox("8-h-2");
    let jail = jailed.jail("8-h-2");
    fake_firecracker(&jail.join("root"), Fake::default());
    let confinement = host.confine(&dir, &limits(&shared)).unwrap();
    let scratch = dir.join("scratch.ext4");
    let mut vm = shared
        .start(&MachineSpec {
            confinement: Some(&confinement),
            ..machine(&jailed.setup, &dir, &scratch, &cmdline)
        })
        .unwrap();
    assert_eq!(ids_of(vm.pid()), ("65533".into(), "65532".into()));
    assert!(shared.unenforced()[0].contains("65533:65532"));
    vm.kill();
}

/// A jailed Firecracker owns its jail's root, so what upstream reads or reaches there once it
/// ran may be a link it planted there: its log is read as a regular file only, never through
/// a link, and its sockets are reached only as sockets, so a link to another VM's socket (or
/// any of the host's) leads nowhere. The controls: the log's own words are read, the link
/// does lead to the other VM's agent when followed, and that VM's own socket reaches it.
#[test]
fn links_a_jailed_firecracker_plants_in_its_jail_lead_nowhere() {
    if !as_root("links_a_jailed_firecracker_plants_in_its_jail_lead_nowhere") {
        return;
    }
    let jailed = Jailed::new(&std::env::temp_dir());
    let fc = jailed.firecracker(None);
    let host = Host::new();
    let cmdline = Vec::new();
    let mut vms = Vec::new();
    for name in ["9-i-0", "9-i-1"] {
        let dir = jailed.setup.sandbox(name);
        fake_firecracker(&jailed.jail(name).join("root"), Fake::default());
        let confinement = host.confine(&dir, &limits(&fc)).unwrap();
        let scratch = dir.join("scratch.ext4");
        let vm = fc
            .start(&MachineSpec {
                confinement: Some(&confinement),
                ..machine(&jailed.setup, &dir, &scratch, &cmdline)
            })
            .unwrap();
        vms.push((vm, confinement));
    }
    let (root, other) = (
        jailed.jail("9-i-0").join("root"),
        jailed.jail("9-i-1").join("root"),
    );
    // Its log: its own words are read; a link to a host file is not followed.
    std::fs::write(root.join("fc.log"), "the log's own words\n").unwrap();
    assert!(vms[0].0.last_words().contains("the log's own words"));
    let secret = jailed.setup.root.join("secret");
    std::fs::write(&secret, "the host's secret\n").unwrap();
    std::fs::remove_file(root.join("fc.log")).unwrap();
    std::os::unix::fs::symlink(&secret, root.join("fc.log")).unwrap();
    let said = vms[0].0.last_words();
    assert!(!said.contains("secret"), "{said}");
    // Its vsock socket: a link to the other VM's leads there if followed, and nowhere here.
    std::fs::remove_file(root.join("v.sock")).unwrap();
    std::os::unix::fs::symlink(other.join("v.sock"), root.join("v.sock")).unwrap();
    let mut followed = UnixStream::connect(root.join("v.sock")).unwrap();
    followed.write_all(b"CONNECT 700\n").unwrap();
    let mut ok = [0u8; 3];
    followed.read_exact(&mut ok).unwrap();
    assert_eq!(
        &ok, b"OK ",
        "the link does not lead to the other VM's agent"
    );
    let until = Instant::now() + Duration::from_millis(300);
    let e = vms[0].0.connect_agent(until).unwrap_err();
    assert!(e.to_string().contains("no socket"), "{e}");
    let until = Instant::now() + Duration::from_secs(10);
    let mut agent = AgentClient::new(vms[1].0.connect_agent(until).unwrap());
    assert_eq!(exec(&mut agent, &["true"]), "port 700: true");
    for (mut vm, _) in vms {
        vm.kill();
    }
}

/// Set for this binary run again to kill its own keeper, which would end the VMs of every
/// other test running beside it.
const ALONE: &str = "UPSTREAM_TEST_FIRECRACKER_ALONE";

/// A keeper killed by hand takes its namespace's VMs with it (none outlives it), and the
/// next jailed VM starts under a new keeper, in a new namespace. Run in this binary started
/// again, alone.
#[test]
fn a_keeper_killed_takes_its_vms_with_it_and_the_next_vm_gets_a_new_one() {
    let name = "a_keeper_killed_takes_its_vms_with_it_and_the_next_vm_gets_a_new_one";
    if std::env::var_os(ALONE).is_some() {
        return keeper_killed();
    }
    if !as_root(name) {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(ALONE, "1")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("1 passed"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn keeper_killed() {
    let jailed = Jailed::new(&std::env::temp_dir());
    let fc = jailed.firecracker(None);
    let host = Host::new();
    let cmdline = Vec::new();
    let start = |name: &str| {
        let dir = jailed.setup.sandbox(name);
        fake_firecracker(&jailed.jail(name).join("root"), Fake::default());
        let confinement = host.confine(&dir, &limits(&fc)).unwrap();
        let scratch = dir.join("scratch.ext4");
        let vm = fc
            .start(&MachineSpec {
                confinement: Some(&confinement),
                ..machine(&jailed.setup, &dir, &scratch, &cmdline)
            })
            .unwrap();
        (vm, confinement)
    };
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let (first, _held) = start("10-j-0");
    let namespace = ns(&first.pid().to_string()).unwrap();
    // The keeper: the process of that namespace that is pid 1 there.
    let keeper = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|&pid| {
            ns(&pid.to_string()).as_ref() == Some(&namespace)
                && std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                    s.lines()
                        .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1"))
                })
        })
        .expect("no keeper in the VM's namespace");
    assert!(runs(first.pid()));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keeper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        gone_within(first.pid(), Duration::from_secs(5)),
        "a VM outlived its keeper"
    );
    let (mut second, _held) = start("10-j-1");
    assert!(runs(second.pid()));
    assert_ne!(ns(&second.pid().to_string()).unwrap(), namespace);
    second.kill();
}

/// What stands in for upstream in
/// [`a_jailed_vm_is_gone_within_seconds_of_upstream_killed_outright`]: where it writes what
/// it started, in the environment of this binary run again as that test.
const STAND_IN: &str = "UPSTREAM_TEST_FIRECRACKER_STAND_IN";

/// Upstream killed outright (SIGKILL: no teardown, no signal handler) takes its jailed VM
/// with it within seconds, although the jailer cleared the parent-death signal; the next
/// upstream removes the cgroups and the jail it left. "Upstream" is this test binary run
/// again, which starts a jailed VM the way the backend does. The controls: while it lives its
/// VM lives; and a fake Firecracker it started through the same jailer in its own pid
/// namespace, with only the parent-death signal to end it (as jailed VMs were before the
/// keeper), outlives it — the jailer's drop cleared the signal, so it is the keeper's
/// namespace that ends the jailed one.
#[test]
fn a_jailed_vm_is_gone_within_seconds_of_upstream_killed_outright() {
    if let Some(out) = std::env::var_os(STAND_IN) {
        return stand_in(Path::new(&out));
    }
    if !as_root("a_jailed_vm_is_gone_within_seconds_of_upstream_killed_outright") {
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let mut upstream = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "a_jailed_vm_is_gone_within_seconds_of_upstream_killed_outright",
            "--exact",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(STAND_IN, temp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = temp.path().join("started");
    let until = Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        if let Some(status) = upstream.try_wait().unwrap() {
            let mut said = String::new();
            let _ = upstream.stderr.take().unwrap().read_to_string(&mut said);
            panic!("the stand-in for upstream ended ({status}): {said}");
        }
        assert!(Instant::now() < until, "the stand-in started no VM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&started).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let [jailed, unkept] = [lines[0], lines[1]].map(|p| p.parse::<i32>().unwrap());
    let (cgroup, jail) = (PathBuf::from(lines[2]), PathBuf::from(lines[3]));
    // While upstream lives, its VM lives.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        runs(jailed) && runs(unkept),
        "a VM died with upstream alive"
    );
    assert!(cgroup.is_dir() && jail.is_dir());

    upstream.kill().unwrap();
    upstream.wait().unwrap();
    let jailed_gone = gone_within(jailed, Duration::from_secs(5));
    let unkept_lives = runs(unkept);
    for pid in [jailed, unkept] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(jailed_gone, "the jailed VM outlived upstream");
    assert!(
        unkept_lives,
        "the control died with upstream: the jailer kept its parent-death signal, and the \
         test shows nothing"
    );
    // What upstream could not remove goes when the next one opens the VM backend (its
    // cgroup, when any upstream does: another test of this binary's may be first).
    assert!(jail.is_dir());
    let _next = Host::new();
    jail::remove_stale_jails(jail.parent().unwrap().parent().unwrap());
    assert!(!cgroup.exists(), "{} remains", cgroup.display());
    assert!(!jail.exists(), "{} remains", jail.display());
}

/// The stand-in for upstream: starts a jailed VM as the backend does (its confinement, the
/// keeper's namespace) and the control, writes their pids, its VM's memory cgroup and jail
/// to `out`/`started`, and waits to be killed (a minute at most).
fn stand_in(out: &Path) {
    let jailed = Jailed::new(out);
    let name = format!("{}-s-0", std::process::id());
    let dir = jailed.setup.sandbox(&name);
    let jail = jailed.jail(&name);
    fake_firecracker(&jail.join("root"), Fake::default());
    let fc = jailed.firecracker(None);
    let confinement = Host::new().confine(&dir, &limits(&fc)).unwrap();
    let scratch = dir.join("scratch.ext4");
    let cmdline = Vec::new();
    let vm = fc
        .start(&MachineSpec {
            confinement: Some(&confinement),
            ..machine(&jailed.setup, &dir, &scratch, &cmdline)
        })
        .unwrap();
    // The control: the same jailer, forked by upstream's spawning thread with SIGKILL as its
    // parent-death signal and nothing else to end it.
    let unkept_jail = jailed.jail("0-control-0");
    std::fs::create_dir_all(unkept_jail.join("root")).unwrap();
    let mut command = std::process::Command::new(&jailed.jailer);
    command
        .args([
            "--id",
            "upstream-0-control-0",
            "--uid",
            "65534",
            "--gid",
            "65534",
        ])
        .arg("--chroot-base-dir")
        .arg(&jailed.base)
        .args(["--", "--api-sock", "fc.sock"]);
    let mut unkept = upstream_backend_vm::confine::spawn(command, None).unwrap();
    let fake_args = unkept_jail.join("root/fake.args");
    let until = Instant::now() + Duration::from_secs(20);
    while !fake_args.exists() {
        assert!(Instant::now() < until, "the control did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let unkept_pid = std::fs::read_to_string(&fake_args).unwrap();
    let unkept_pid = unkept_pid.split_whitespace().next().unwrap();
    let memory = confinement.cgroup(Controller::Memory).unwrap();
    let text = format!(
        "{}\n{unkept_pid}\n{}\n{}\n",
        vm.pid(),
        memory.display(),
        jail.display()
    );
    std::fs::write(out.join("started.new"), text).unwrap();
    std::fs::rename(out.join("started.new"), out.join("started")).unwrap();
    std::thread::sleep(Duration::from_secs(60));
    // Not killed: nothing is left behind.
    let _ = unkept.kill();
    let _ = unkept.wait();
}

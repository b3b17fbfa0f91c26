//! The Firecracker driver against a fake Firecracker: a test-side HTTP server on the API
//! socket that answers as Firecracker does (204, or 400 with a `fault_message`) and records
//! every request, and on the vsock socket serves the `CONNECT <port>` handshake with a fake
//! agent behind it. The "firecracker" the driver starts is a shell script that notes its
//! arguments and sleeps, so the driver's process handling is real: it is spawned, watched
//! and killed. Runs anywhere: no KVM, no Firecracker.

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
use upstream_backend_vm::firecracker::Firecracker;
use upstream_backend_vm::network::Network;
use upstream_backend_vm::vmm::{MachineSpec, Snapshot, Vmm, VmmError};
use upstream_sandbox::AgentClient;

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
        let temp = tempfile::tempdir().unwrap();
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

const SLEEPS: &str = "#!/bin/sh\necho \"$$ $PWD $*\" > fake.args\nexec sleep 600\n";

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

/// Through the jailer: it is given the VM's id, Firecracker, the ids to drop to, the jails'
/// base and a memory cgroup; Firecracker is told the files by their names in the jail, where
/// they are links to the machine's; the jail goes with the VM. The "jailer" here is a script
/// that makes the jail its working directory, as the real one does, and becomes the fake.
#[test]
fn a_jailed_vm_sees_its_files_by_their_names_in_the_jail_and_its_jail_goes_with_it() {
    let setup = Setup::new(SLEEPS);
    let jailer = setup.root.join("jailer");
    std::fs::write(
        &jailer,
        "#!/bin/sh\n\
         echo \"$*\" > \"$(dirname \"$0\")/jailer.args\"\n\
         while [ \"$1\" != -- ]; do\n\
           case \"$1\" in --id) id=$2;; --chroot-base-dir) base=$2;; esac\n\
           shift 2\n\
         done\n\
         shift\n\
         cd \"$base/firecracker/$id/root\" || exit 9\n\
         echo \"$$ $PWD $*\" > fake.args\n\
         exec sleep 600\n",
    )
    .unwrap();
    std::fs::set_permissions(&jailer, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = setup.sandbox("7-g-0");
    let scratch = dir.join("scratch.ext4");
    let base = setup.root.join("jail");
    let jail = base.join("firecracker/upstream-7-g-0");
    let fake = fake_firecracker(&jail.join("root"), Fake::default());
    let fc = Firecracker {
        binary: setup.root.join("firecracker"),
        jailer: Some(upstream_backend_vm::firecracker::Jailer {
            binary: jailer.clone(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            chroot_base: base.clone(),
        }),
    };
    let cmdline = Vec::new();
    let mut vm = fc
        .start(&machine(&setup, &dir, &scratch, &cmdline))
        .unwrap();
    let args = std::fs::read_to_string(setup.root.join("jailer.args")).unwrap();
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    let start = format!(
        "--id upstream-7-g-0 --exec-file {} --uid {uid} --gid {gid} --chroot-base-dir {} --cgroup-version ",
        setup.root.join("firecracker").display(),
        base.display()
    );
    assert!(args.starts_with(&start), "{args}");
    assert!(
        args.contains(&format!(
            "={} -- --api-sock fc.sock --log-path fc.log --level Warning",
            (704u64 + 128) << 20
        )),
        "{args}"
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
    // asked for.
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
    assert_eq!(
        std::fs::read_to_string(&snapshot.state).unwrap(),
        "snapshot_path"
    );
    assert_eq!(
        std::fs::read_to_string(&snapshot.memory).unwrap(),
        "mem_file_path"
    );
    assert!(!jail.join("root/snapshot.state").exists());
    let pid = vm.pid();
    vm.kill();
    assert!(!pid_alive(pid));
    assert!(!jail.exists(), "the jail outlived its VM");
    // The machine's own files are where they were.
    assert!(setup.root_disk.is_file() && scratch.is_file());
}

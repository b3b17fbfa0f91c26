//! The host side of the agent protocol against a hostile agent: what a VM's guest, root of
//! a kernel of its own, may write to its agent's port. Seeded random and mutated frames go
//! to the decoder ([`read_frame`]), and whole answers from a fake agent go over a socketpair
//! to the client ([`AgentClient`], [`AgentFiles`]): nothing panics, memory stays bounded
//! whatever sizes the frames claim, and every error is a short sentence.
//!
//! The same decoder is fuzzed without end by `fuzz/` (`cargo +nightly fuzz run frames`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use upstream_agent::protocol::{
    DATA_CHUNK, ENTRIES_PER_FRAME, ExitStatus, FrameError, Kind, MAX_FRAME, Meta, Response, Stream,
    read_frame, write_frame, write_hello,
};
use upstream_sandbox::files::{At, is_out_of_protocol};
use upstream_sandbox::{AgentClient, AgentFiles, ClientError, Collect, ExecRequest, Files};

/// The allocator of this test binary, counting the bytes live and the most live at once.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator as it came; the counts are only
// numbers kept beside.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller's contract for `alloc`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: as the caller's contract for `dealloc`.
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as the caller's contract for `realloc`.
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            if new_size > layout.size() {
                let grown = new_size - layout.size();
                let live = LIVE.fetch_add(grown, Ordering::Relaxed) + grown;
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One test at a time: the counts are the whole process's, and any test's allocations would
/// count in another's.
static MEASURING: Mutex<()> = Mutex::new(());

/// The most memory `f` took beyond what was live when it started, with its result.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let value = f();
    (value, PEAK.load(Ordering::SeqCst).saturating_sub(base))
}

const MIB: usize = 1 << 20;

/// xorshift64*: the same numbers for the same seed, on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, in_n: u64) -> bool {
        self.below(in_n) == 0
    }

    fn bytes(&mut self, most: usize) -> Vec<u8> {
        let n = self.below(most as u64 + 1) as usize;
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// A name or text as a hostile guest would choose one.
    fn text(&mut self) -> String {
        const HOSTILE: &[&str] = &[
            "",
            ".",
            "..",
            "../../etc/passwd",
            "/etc/shadow",
            "a/b",
            "nul\0inside",
            "\u{1b}]0;title\u{7}",
            "\u{202e}txt.exe",
            "plain",
            "with space",
            "ümlaut",
        ];
        match self.below(4) {
            0 => "x".repeat(self.below(600) as usize),
            1 => String::from_utf8_lossy(&self.bytes(40)).into_owned(),
            _ => HOSTILE[self.below(HOSTILE.len() as u64) as usize].to_string(),
        }
    }

    fn meta(&mut self) -> Meta {
        const KINDS: [Kind; 7] = [
            Kind::File,
            Kind::Dir,
            Kind::Symlink,
            Kind::Fifo,
            Kind::Socket,
            Kind::CharDevice,
            Kind::BlockDevice,
        ];
        Meta {
            kind: KINDS[self.below(7) as usize],
            mode: match self.chance(4) {
                true => self.next() as u32,
                false => self.below(0o10000) as u32,
            },
            size: match self.chance(3) {
                true => self.next(),
                false => self.below(1000),
            },
            mtime_ns: self.next() as i64,
            ctime_ns: self.next() as i64,
            ino: self.next(),
            uid: self.next() as u32,
            gid: self.next() as u32,
        }
    }

    fn status(&mut self) -> ExitStatus {
        match self.chance(2) {
            true => ExitStatus::Code(self.next() as i32),
            false => ExitStatus::Signal(self.next() as i32),
        }
    }

    /// Any answer the protocol has, with contents chosen to hurt.
    fn response(&mut self) -> Response {
        match self.below(15) {
            0 => Response::Ready,
            1 => Response::SetupFailed {
                message: self.text(),
            },
            2 => Response::Started {
                pid: self.next() as i32,
            },
            3 => Response::Output {
                stream: if self.chance(2) {
                    Stream::Stdout
                } else {
                    Stream::Stderr
                },
                data: self.bytes(300),
            },
            4 => Response::Exited {
                status: self.status(),
                timed_out: self.chance(2),
                micros: self.next(),
                collected: match self.below(3) {
                    0 => None,
                    1 => Some(Ok(self.bytes(200))),
                    _ => Some(Err(self.text())),
                },
                oom_kills: self.chance(2).then(|| self.next()),
                disk_full: self.chance(2).then(|| self.chance(2)),
            },
            5 => Response::File {
                data: self.bytes(200),
            },
            6 => Response::Waited {
                status: self.chance(2).then(|| self.status()),
            },
            7 => Response::Done,
            8 => Response::Error {
                message: self.text(),
            },
            9 => Response::Meta(self.chance(3).then(|| self.meta())),
            10 => {
                let n = self.below(6);
                Response::Entries((0..n).map(|_| (self.text(), self.meta())).collect())
            }
            11 => Response::Link(self.text()),
            12 => Response::Opened(self.meta()),
            13 => Response::Data(self.bytes(300)),
            _ => Response::Failed {
                errno: self.chance(2).then(|| self.next() as i32),
                refused: self.chance(2).then(|| self.text()),
                message: self.text(),
            },
        }
    }

    /// `frame` (a length prefix and a body) damaged one way or another.
    fn mutate(&mut self, mut frame: Vec<u8>) -> Vec<u8> {
        let body = frame.len() - 4;
        match self.below(8) {
            // Bytes of the body flipped.
            0 if body > 0 => {
                for _ in 0..=self.below(4) {
                    let at = 4 + self.below(body as u64) as usize;
                    frame[at] ^= 1 << self.below(8);
                }
            }
            // Cut short, anywhere (the prefix too).
            1 => frame.truncate(self.below(frame.len() as u64) as usize),
            // A length prefix that lies: small, the largest allowed, past it, 4 GiB.
            2 => {
                let len = match self.below(5) {
                    0 => self.below(body as u64 + 8) as u32,
                    1 => MAX_FRAME as u32,
                    2 => MAX_FRAME as u32 + 1,
                    3 => u32::MAX,
                    _ => self.next() as u32,
                };
                frame[..4].copy_from_slice(&len.to_le_bytes());
            }
            // A length of 2^60 (a Vec's, a string's) put in after the tag.
            3 => {
                let at = 4 + 1 + self.below(body.saturating_sub(1) as u64 + 1) as usize;
                let at = at.min(frame.len());
                let huge = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10];
                frame.splice(at..at, huge);
                let len = (frame.len() - 4) as u32;
                frame[..4].copy_from_slice(&len.to_le_bytes());
            }
            // A tag no answer has.
            4 if body > 0 => frame[4] = 15 + self.below(241) as u8,
            // Garbage after a good frame.
            5 => frame.extend(self.bytes(20)),
            // A frame of random bytes under a true length.
            6 => {
                let garbage = self.bytes(64);
                frame = (garbage.len() as u32).to_le_bytes().to_vec();
                frame.extend(garbage);
            }
            // As it was: a good frame among the bad.
            _ => {}
        }
        frame
    }
}

fn encode(response: &Response) -> Vec<u8> {
    let mut frame = Vec::new();
    write_frame(&mut frame, response).unwrap();
    frame
}

/// Every frame of `wire` as the decoder reads them, each outcome's name.
fn decode_all(wire: &[u8]) -> Vec<&'static str> {
    let mut reader = wire;
    let mut outcomes = Vec::new();
    loop {
        match read_frame::<_, Response>(&mut reader) {
            Ok(Some(_)) => outcomes.push("frame"),
            Ok(None) => return outcomes,
            Err(e) => {
                let what = match e {
                    FrameError::Io(_) => "cut short",
                    FrameError::TooLarge(_) => "too large",
                    FrameError::Decode(_) => "malformed",
                    _ => "other",
                };
                assert!(e.to_string().len() < 300, "{e}");
                outcomes.push(what);
                return outcomes;
            }
        }
    }
}

#[test]
fn seeded_random_and_mutated_frames_never_panic_the_decoder_nor_take_memory_they_claim() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut rng = Rng(0x005e_ed0f_a6e7);
    let mut seen = std::collections::BTreeMap::new();
    let mut worst = 0;
    for _ in 0..20_000 {
        let mut wire = Vec::new();
        for _ in 0..=rng.below(3) {
            let frame = encode(&rng.response());
            wire.extend(rng.mutate(frame));
        }
        let (outcomes, peak) = peak_of(|| decode_all(&wire));
        worst = worst.max(peak);
        for outcome in outcomes {
            *seen.entry(outcome).or_insert(0) += 1;
        }
    }
    // Every way a frame can be bad came up, and good ones too.
    for outcome in ["frame", "cut short", "too large", "malformed"] {
        assert!(seen.get(outcome).is_some_and(|n| *n > 100), "{seen:?}");
    }
    // The inputs are small: whatever their prefixes claim (up to 16 MiB), the decoder took
    // in at most its first read and what came.
    assert!(
        worst <= 2 * MIB,
        "{worst} bytes for a frame of at most a few hundred"
    );
    // A few seconds on an idle machine: a minute means something waited.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn sizes_a_frame_claims_are_bounded_before_anything_is_taken_in() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    // A length prefix of 4 GiB.
    let wire = u32::MAX.to_le_bytes();
    let (result, peak) = peak_of(|| read_frame::<_, Response>(&mut &wire[..]));
    assert!(matches!(result, Err(FrameError::TooLarge(_))), "{result:?}");
    assert!(peak < 64 << 10, "{peak}");
    // The largest frame there may be, said and not sent: what came is what it costs.
    let mut wire = (MAX_FRAME as u32).to_le_bytes().to_vec();
    wire.extend_from_slice(&[7, 1, 2]);
    let (result, peak) = peak_of(|| read_frame::<_, Response>(&mut &wire[..]));
    let Err(FrameError::Io(e)) = result else {
        panic!("{result:?}");
    };
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(
        e.to_string().contains("3 bytes into a frame of 16777216"),
        "{e}"
    );
    assert!(peak <= 2 * MIB, "{peak} bytes for a frame that sent 3");
    // A Vec (of entries, of bytes) and a string of 2^60 inside a frame of a few bytes.
    let huge = [0x80u8, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10];
    for answer in [
        Response::Entries(Vec::new()),
        Response::Data(Vec::new()),
        Response::Link(String::new()),
    ] {
        let tag = encode(&answer)[4];
        let mut body = vec![tag];
        body.extend_from_slice(&huge);
        body.extend_from_slice(&[0; 32]);
        let mut wire = (body.len() as u32).to_le_bytes().to_vec();
        wire.extend(body);
        let (result, peak) = peak_of(|| read_frame::<_, Response>(&mut &wire[..]));
        assert!(
            matches!(result, Err(FrameError::Decode(_))),
            "{}: {result:?}",
            answer.name()
        );
        assert!(peak < 2 * MIB, "{}: {peak}", answer.name());
    }
    // More entries in one frame than the agent ever puts in one: refused as decoded.
    let many = Response::Entries(
        (0..=ENTRIES_PER_FRAME)
            .map(|i| (format!("e{i}"), plain(Kind::File)))
            .collect(),
    );
    let result = read_frame::<_, Response>(&mut &encode(&many)[..]);
    assert!(matches!(result, Err(FrameError::Decode(_))), "{result:?}");
    // The control: as many as it does put in one are read.
    let full = Response::Entries(
        (0..ENTRIES_PER_FRAME)
            .map(|i| (format!("e{i}"), plain(Kind::File)))
            .collect(),
    );
    let read = read_frame::<_, Response>(&mut &encode(&full)[..]).unwrap();
    assert_eq!(read, Some(full));
}

fn plain(kind: Kind) -> Meta {
    Meta {
        kind,
        mode: 0o644,
        size: 10,
        mtime_ns: 0,
        ctime_ns: 0,
        ino: 1,
        uid: 0,
        gid: 0,
    }
}

/// A fake agent on the other end of a socketpair: it greets, says it is ready, then sends
/// `say` (whatever the host asks) and closes; what the host sends it is read and dropped.
fn agent_saying(say: Vec<u8>) -> AgentClient<UnixStream> {
    agent_doing(move |conn| {
        let _ = conn.write_all(&say);
    })
}

/// [`agent_saying`] with what the agent does after its first word done by `act`.
fn agent_doing(act: impl FnOnce(&mut UnixStream) + Send + 'static) -> AgentClient<UnixStream> {
    let (host, mut agent) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut drain = agent.try_clone().unwrap();
    std::thread::spawn(move || io::copy(&mut drain, &mut io::sink()));
    std::thread::spawn(move || {
        let mut first = Vec::new();
        write_hello(&mut first).unwrap();
        write_frame(&mut first, &Response::Ready).unwrap();
        if agent.write_all(&first).is_ok() {
            act(&mut agent);
        }
        // Said all it says; what the host sends is still taken (and dropped).
        let _ = agent.shutdown(std::net::Shutdown::Write);
    });
    AgentClient::new(host)
}

fn frames(answers: &[Response]) -> Vec<u8> {
    answers.iter().flat_map(encode).collect()
}

fn exec_request(collect: Option<u64>) -> ExecRequest {
    ExecRequest {
        argv: vec!["true".into()],
        collect: collect.map(|limit| Collect {
            path: "/out".into(),
            limit,
        }),
        ..Default::default()
    }
}

/// Asserts that `e` is the client's word for a broken protocol, mentioning `what`.
fn assert_protocol(e: &ClientError, what: &str) {
    assert!(matches!(e, ClientError::Protocol(_)), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(what), "{text}");
    assert!(text.len() < 1000, "{text}");
}

#[test]
fn answers_out_of_turn_are_errors_that_put_the_connection_out_of_use() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let exited = Response::Exited {
        status: ExitStatus::Code(0),
        timed_out: false,
        micros: 1,
        collected: None,
        oom_kills: None,
        disk_full: None,
    };
    let started = Response::Started { pid: 7 };
    // A command answered with a listing of a megabyte of names: the error names the kind,
    // not the megabyte.
    let listing = Response::Entries(vec![("n".repeat(1 << 20), plain(Kind::File))]);
    let mut client = agent_saying(frames(&[listing]));
    let e = client
        .exec(&exec_request(None), &mut |_, _| {})
        .unwrap_err();
    assert_protocol(&e, "answered Entries to a command");
    // The connection is out of use: the next request fails at once, with the same words,
    // and never takes what follows as its answer.
    let e = client.read_file("/etc/hostname", 10).unwrap_err();
    assert_protocol(&e, "answered Entries to a command");
    // Output before the command started, and its end before it started.
    let out = Response::Output {
        stream: Stream::Stdout,
        data: b"early".to_vec(),
    };
    for wrong in [vec![out.clone(), exited.clone()], vec![exited.clone()]] {
        let mut client = agent_saying(frames(&wrong));
        let e = client
            .exec(&exec_request(None), &mut |_, _| {})
            .unwrap_err();
        assert_protocol(&e, "to a command");
    }
    // `Ready` twice, and a second `Started`.
    for wrong in [
        vec![Response::Ready],
        vec![started.clone(), started.clone(), exited.clone()],
    ] {
        let mut client = agent_saying(frames(&wrong));
        let e = client
            .exec(&exec_request(None), &mut |_, _| {})
            .unwrap_err();
        assert_protocol(&e, "to a command");
    }
    // A refusal after the command started is no refusal any more.
    let refusal = Response::Error {
        message: "no".into(),
    };
    let mut client = agent_saying(frames(&[started.clone(), refusal.clone()]));
    let e = client
        .exec(&exec_request(None), &mut |_, _| {})
        .unwrap_err();
    assert_protocol(&e, "answered Error to a command");
    // The control: in turn, the same frames are a command's run, and a refusal before it
    // started is the agent's refusal.
    let mut client = agent_saying(frames(&[started.clone(), out, exited.clone()]));
    let mut seen = Vec::new();
    let done = client
        .exec(&exec_request(None), &mut |_, d| seen.extend_from_slice(d))
        .unwrap();
    assert_eq!(
        (done.status, seen),
        (ExitStatus::Code(0), b"early".to_vec())
    );
    let mut client = agent_saying(frames(&[refusal]));
    let e = client
        .exec(&exec_request(None), &mut |_, _| {})
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Refused(ref m) if m == "no"),
        "{e:?}"
    );
    // A frame that does not decode leaves nothing to find the next one by.
    let mut wire = encode(&started);
    wire[4] = 200;
    wire.extend(frames(&[exited]));
    let mut client = agent_saying(wire);
    let e = client
        .exec(&exec_request(None), &mut |_, _| {})
        .unwrap_err();
    assert_protocol(&e, "malformed");
    assert_protocol(&client.read_file("/x", 1).unwrap_err(), "malformed");
}

#[test]
fn an_agent_sends_no_more_than_was_asked_for() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    // A read answered with more than its limit.
    let mut client = agent_saying(frames(&[Response::File { data: vec![1; 100] }]));
    let e = client.read_file("/etc/hostname", 10).unwrap_err();
    assert_protocol(&e, "100 bytes of a file read up to 10");
    // The control: as much as the limit is taken.
    let mut client = agent_saying(frames(&[Response::File { data: vec![1; 10] }]));
    assert_eq!(client.read_file("/etc/hostname", 10).unwrap(), vec![1; 10]);
    // A collected file larger than the command asked for, and one it did not ask for.
    let exited = |collected: Option<Result<Vec<u8>, String>>| Response::Exited {
        status: ExitStatus::Code(0),
        timed_out: false,
        micros: 1,
        collected,
        oom_kills: None,
        disk_full: None,
    };
    let started = Response::Started { pid: 7 };
    let mut client = agent_saying(frames(&[started.clone(), exited(Some(Ok(vec![0; 2048])))]));
    let e = client
        .exec(&exec_request(Some(1024)), &mut |_, _| {})
        .unwrap_err();
    assert_protocol(&e, "2048 bytes of a file collected after a command");
    let mut client = agent_saying(frames(&[started.clone(), exited(Some(Ok(vec![0; 8])))]));
    let e = client
        .exec(&exec_request(None), &mut |_, _| {})
        .unwrap_err();
    assert_protocol(&e, "asked for none");
    let mut client = agent_saying(frames(&[started, exited(Some(Ok(vec![0; 1024])))]));
    let done = client
        .exec(&exec_request(Some(1024)), &mut |_, _| {})
        .unwrap();
    assert_eq!(done.collected, Some(Ok(vec![0; 1024])));
    // Words of a megabyte, as a refusal and as why setup failed: cut, and said.
    let long = "\u{1b}[2J".repeat(1 << 18);
    let mut client = agent_saying(frames(&[Response::Error {
        message: long.clone(),
    }]));
    let e = client.read_file("/x", 1).unwrap_err();
    assert!(matches!(&e, ClientError::Refused(m) if m.len() < 4200 && m.ends_with("[cut]")));
    let (host, mut agent) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        write_hello(&mut agent).unwrap();
        write_frame(&mut agent, &Response::SetupFailed { message: long }).unwrap();
    });
    let e = AgentClient::new(host).wait_ready().unwrap_err();
    assert!(
        matches!(&e, ClientError::SetupFailed(m) if m.len() < 4200),
        "{e:?}"
    );
}

#[test]
fn endless_output_streams_in_flat_memory() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let chunk = Response::Output {
        stream: Stream::Stdout,
        data: vec![b'x'; 64 << 10],
    };
    let chunk = encode(&chunk);
    let exited = encode(&Response::Exited {
        status: ExitStatus::Code(0),
        timed_out: false,
        micros: 1,
        collected: None,
        oom_kills: None,
        disk_full: None,
    });
    let mut client = agent_doing(move |conn| {
        let _ = conn.write_all(&encode(&Response::Started { pid: 7 }));
        for _ in 0..2048 {
            if conn.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = conn.write_all(&exited);
    });
    let mut got = 0usize;
    let (result, peak) = peak_of(|| {
        client.exec(&exec_request(None), &mut |_, data| {
            got += data.len();
        })
    });
    result.unwrap();
    assert_eq!(got, 128 * MIB);
    assert!(
        peak < 8 * MIB,
        "{peak} bytes for output passed on as it came"
    );
}

/// The files of an agent that answers every request with `say`.
fn files_saying(say: Vec<u8>) -> AgentFiles {
    AgentFiles::new(vec![agent_saying(say)])
}

fn dir() -> At {
    At::Root("/workspace".into())
}

#[test]
fn names_a_listing_cannot_hold_are_refused_and_plain_ones_pass() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    for bad in [
        "",
        ".",
        "..",
        "../escape",
        "/etc/passwd",
        "a/b",
        "nul\0",
        &"n".repeat(256),
    ] {
        let listing = Response::Entries(vec![
            ("fine".to_string(), plain(Kind::File)),
            (bad.to_string(), plain(Kind::Dir)),
        ]);
        let files = files_saying(frames(&[listing, Response::Done]));
        let e = files.list(&dir(), None).unwrap_err();
        assert!(is_out_of_protocol(&e), "{bad:?}: {e}");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("it listed"), "{e}");
        assert!(e.to_string().len() < 1000, "{e}");
        // The connection it came on is closed: no operation takes the rest of it.
        let e = files.stat(&dir(), None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }
    // A mode past the permission bits.
    let mut odd = plain(Kind::File);
    odd.mode = 0o104755 | 0o170000;
    let files = files_saying(frames(&[
        Response::Entries(vec![("x".into(), odd)]),
        Response::Done,
    ]));
    assert!(is_out_of_protocol(&files.list(&dir(), None).unwrap_err()));
    // The control: names that are odd but names (dots, spaces, escapes, 255 bytes) pass.
    let names = [
        "...",
        ".hidden",
        "with space",
        "\u{1b}[31mred",
        "ümlaut",
        &"n".repeat(255),
    ];
    let listing = Response::Entries(
        names
            .iter()
            .map(|n| (n.to_string(), plain(Kind::File)))
            .collect(),
    );
    let files = files_saying(frames(&[listing, Response::Done]));
    let listed = files.list(&dir(), None).unwrap();
    assert_eq!(
        listed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        names
    );
}

#[test]
fn an_endless_listing_stops_at_its_bound() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let frame = encode(&Response::Entries(
        (0..ENTRIES_PER_FRAME)
            .map(|i| (format!("entry-{i:06}"), plain(Kind::File)))
            .collect(),
    ));
    // Until the host goes away.
    let client = agent_doing(move |conn| while conn.write_all(&frame).is_ok() {});
    let files = AgentFiles::new(vec![client]);
    let (result, peak) = peak_of(|| files.list(&dir(), None));
    let e = result.unwrap_err();
    assert!(is_out_of_protocol(&e), "{e}");
    assert!(e.to_string().contains("more than 1048576 entries"), "{e}");
    // 2^20 entries of short names: some 100 MiB at most, never more.
    assert!(peak < 256 * MIB, "{peak}");
}

#[test]
fn a_file_is_read_no_further_than_the_size_it_was_opened_at() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let opened = |size: u64| {
        Response::Opened(Meta {
            size,
            ..plain(Kind::File)
        })
    };
    // More bytes than the size it said.
    let files = files_saying(frames(&[
        opened(10),
        Response::Data(vec![1; 8]),
        Response::Data(vec![2; 8]),
        Response::Done,
    ]));
    let (mut reader, _) = files.open(&At::Root("/f".into()), 0, None).unwrap();
    let mut got = Vec::new();
    let e = reader.read_to_end(&mut got).unwrap_err();
    assert!(is_out_of_protocol(&e), "{e}");
    assert!(
        e.to_string()
            .contains("8 bytes of \"/f\" where 2 were left"),
        "{e}"
    );
    assert_eq!(got, vec![1; 8], "what it may send is passed on");
    // From an offset, the size left is what counts.
    let files = files_saying(frames(&[
        opened(10),
        Response::Data(vec![1; 5]),
        Response::Done,
    ]));
    let (mut reader, _) = files.open(&At::Root("/f".into()), 6, None).unwrap();
    assert!(is_out_of_protocol(
        &reader.read_to_end(&mut Vec::new()).unwrap_err()
    ));
    // A piece larger than a piece may be.
    let files = files_saying(frames(&[
        opened(1 << 30),
        Response::Data(vec![0; DATA_CHUNK + 1]),
    ]));
    let (mut reader, _) = files.open(&At::Root("/f".into()), 0, None).unwrap();
    assert!(is_out_of_protocol(
        &reader.read_to_end(&mut Vec::new()).unwrap_err()
    ));
    // A directory, or a FIFO, opened to be read as a file; data before it was opened.
    for wrong in [
        vec![Response::Opened(plain(Kind::Dir))],
        vec![Response::Opened(plain(Kind::Fifo))],
        vec![Response::Data(vec![1; 4])],
    ] {
        let files = files_saying(frames(&wrong));
        let e = files.open(&At::Root("/f".into()), 0, None).err().unwrap();
        assert!(is_out_of_protocol(&e), "{e}");
    }
    // The control: the size it said, in pieces, is read whole.
    let files = files_saying(frames(&[
        opened(10),
        Response::Data(vec![1; 6]),
        Response::Data(vec![2; 4]),
        Response::Done,
    ]));
    let (mut reader, meta) = files.open(&At::Root("/f".into()), 0, None).unwrap();
    let mut got = Vec::new();
    reader.read_to_end(&mut got).unwrap();
    assert_eq!((got.len(), meta.size), (10, 10));
}

#[test]
fn link_targets_are_ones_a_kernel_could_hold() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    for bad in [String::new(), "a\0b".into(), "x".repeat(4096)] {
        let files = files_saying(frames(&[Response::Link(bad.clone())]));
        let e = files.read_link(&At::Root("/l".into()), None).unwrap_err();
        assert!(is_out_of_protocol(&e), "{}: {e}", bad.len());
    }
    let files = files_saying(frames(&[Response::Link("../../etc/passwd".into())]));
    assert_eq!(
        files.read_link(&At::Root("/l".into()), None).unwrap(),
        "../../etc/passwd",
        "the control: a link may point anywhere (it is never followed out)"
    );
}

#[test]
fn seeded_hostile_agents_never_panic_the_client() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut rng = Rng(0x00a6_e70f_f1ce);
    let mut outcomes = std::collections::BTreeMap::new();
    let mut worst = 0;
    for round in 0..1000u32 {
        let mut say = Vec::new();
        for _ in 0..=rng.below(6) {
            let frame = encode(&rng.response());
            say.extend(match rng.chance(3) {
                true => rng.mutate(frame),
                false => frame,
            });
        }
        let operation = round % 8;
        let (outcome, peak) = peak_of(|| {
            let mut client = agent_saying(say);
            let result: Result<(), String> = match operation {
                0 => client
                    .exec(&exec_request(Some(64)), &mut |_, _| {})
                    .map(drop)
                    .map_err(|e| e.to_string()),
                1 => client
                    .read_file("/f", 64)
                    .map(drop)
                    .map_err(|e| e.to_string()),
                2 => client
                    .wait(1, Some(Duration::ZERO))
                    .map(drop)
                    .map_err(|e| e.to_string()),
                3 => client.signal(1, 9).map_err(|e| e.to_string()),
                files_op => {
                    let files = AgentFiles::new(vec![client]);
                    let at = At::Root("/f".into());
                    let result = match files_op {
                        4 => files.stat(&at, None).map(drop),
                        5 => files.list(&at, None).map(drop),
                        6 => files.read_link(&at, None).map(drop),
                        _ => files
                            .open(&at, 0, None)
                            .and_then(|(mut r, _)| r.read_to_end(&mut Vec::new()).map(drop)),
                    };
                    result.map_err(|e| e.to_string())
                }
            };
            result
        });
        worst = worst.max(peak);
        let key = match &outcome {
            Ok(()) => "answered".to_string(),
            Err(e) => {
                assert!(e.len() < 5000, "{e}");
                assert!(
                    !e.contains("temporarily unavailable") && !e.contains("timed out"),
                    "the client waited on: {e}"
                );
                e.split(':').next().unwrap_or_default().to_string()
            }
        };
        *outcomes.entry(key).or_insert(0u32) += 1;
    }
    assert!(outcomes.contains_key("answered"), "{outcomes:#?}");
    assert!(
        outcomes
            .keys()
            .any(|k| k.starts_with("the sandbox's agent broke upstream's protocol")),
        "{outcomes:#?}"
    );
    assert!(worst < 8 * MIB, "{worst}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

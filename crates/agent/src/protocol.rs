//! The agent protocol: length-prefixed frames, each one message encoded with postcard.
//!
//! A frame is a little-endian `u32` byte count followed by that many bytes. The host sends
//! [`Request`]s; the agent answers each with one or more [`Response`]s. Frames above
//! [`MAX_FRAME`] are refused, so a broken peer cannot make the other side allocate at will.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 16 << 20;

/// The most output bytes one [`Response::Output`] carries.
pub const OUTPUT_CHUNK: usize = 64 << 10;

/// What the host asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Run a command; answered by `Started`, any number of `Output`, then `Exited` (or `Error`).
    Exec(ExecRequest),
    /// Read a file, up to `limit` bytes; answered by `File` or `Error`.
    ReadFile { path: String, limit: u64 },
    /// Create or replace a file (and its parent directories); answered by `Done` or `Error`.
    WriteFile {
        path: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        mode: u32,
    },
    /// Start a command in the background, its stdout and stderr appended to these files of
    /// the sandbox; answered by `Started` (or `Error`) at once. Its end is kept for `Wait`.
    Spawn {
        exec: ExecRequest,
        stdout: String,
        stderr: String,
    },
    /// Wait up to `timeout_ms` (`None`: for ever, `Some(0)`: not at all) for a background
    /// command to end; answered by `Waited` (or `Error` for a pid never spawned).
    Wait { pid: i32, timeout_ms: Option<u64> },
    /// Send `signal` to a background command's process group; answered by `Done` or `Error`.
    Signal { pid: i32, signal: i32 },
    /// Kill every process of the sandbox but the agent (background commands, what steps left
    /// running, helpers and their commands) and wait until they are gone, so nothing changes
    /// the sandbox's files any more; answered by `Done` (or `Error` on another connection).
    StopProcesses,
    /// Kill every process of the sandbox and exit; answered by `Done`.
    Shutdown,
    /// Serve another connection alongside this one: right after this frame the host sends
    /// one byte carrying a Unix socket (SCM_RIGHTS). The agent forks a helper that serves
    /// it (`Ready` first, then `Exec`, `ReadFile` and `WriteFile`; commands there run
    /// alongside those of every other connection) and answers `Done` here.
    Connect,
    /// Serve another connection alongside this one, on the VM's virtio port `port` (one the
    /// host connected to first): the agent forks a helper that opens it and serves it as
    /// for `Connect`, and answers `Done` here. No descriptor crosses: this is how a second
    /// connection reaches an agent the host shares no socket with.
    Attach { port: String },
    /// What is at a path, not following a last link; answered by `Meta` (`None` where
    /// nothing is, or a directory on the way is missing or no directory) or `Failed`.
    Stat { at: At, reader: Option<Owner> },
    /// A directory's entries, each with what it is, in name order; answered by any number of
    /// `Entries`, then `Done` (or `Failed`).
    List { at: At, reader: Option<Owner> },
    /// Where a symlink points; answered by `Link` or `Failed`.
    ReadLink { at: At, reader: Option<Owner> },
    /// A regular file's bytes from `offset` up to the size it had when opened; answered by
    /// `Opened`, any number of `Data`, then `Done` (or `Failed` instead of `Opened`, or
    /// after some `Data` when a read fails).
    Read {
        at: At,
        offset: u64,
        reader: Option<Owner>,
    },
    /// Make a regular file; the host then sends its bytes as any number of `Data` and an
    /// `End` (or an `Abort`, which leaves nothing of it), and the agent answers `Meta` of
    /// what was made, or `Failed` — once, after `End` or `Abort`, whenever the failure
    /// happened (no answer comes before, so a small file costs one round trip).
    Create {
        at: At,
        /// Made with this mode (the umask does not apply), until `End` sets another.
        mode: u32,
        how: Create,
        owner: Owner,
    },
    /// Bytes of the file a `Create` makes, at most [`DATA_CHUNK`].
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The end of a `Create`'s bytes: the file gets `mode` and `mtime_ns` where given.
    End {
        mode: Option<u32>,
        mtime_ns: Option<i64>,
    },
    /// The end of a `Create` that is not to be: nothing of the file stays.
    Abort,
    /// Make a directory with `mode` (that of a directory there already is left), and with
    /// `parents` the directories above it that are missing (0755); answered by `Done` or
    /// `Failed`.
    MakeDir {
        at: At,
        mode: u32,
        parents: bool,
        owner: Owner,
    },
    /// Make a symlink, replacing a file or link of that name, with its own modification
    /// time; answered by `Done` or `Failed`.
    Symlink {
        at: At,
        target: String,
        mtime_ns: i64,
        owner: Owner,
    },
    /// Set a file's or directory's mode and modification time (never through a last link);
    /// answered by `Done` or `Failed`.
    SetMeta {
        at: At,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        owner: Owner,
    },
    /// Remove a file, a link or an empty directory — with `recursive`, a directory and all
    /// below it; answered by `Done` or `Failed`.
    Remove {
        at: At,
        recursive: bool,
        owner: Owner,
    },
    /// Give a directory of the sandbox's root to `owner` (one of someone else's is left as
    /// it is); answered by `Done` or `Failed`.
    Give { at: At, owner: Owner },
    /// Make this machine one of its own: a VM restored from a snapshot starts with the
    /// snapshot's random state, clock and name, which every VM restored from it shares. The
    /// agent mixes `entropy` (from the host's random source) into the kernel's pool and
    /// reseeds its generator, sets the clock to `unix_nanos` and the hostname to `hostname`;
    /// answered by `Done` (or `Error`). Only on the first connection.
    Renew {
        hostname: String,
        #[serde(with = "serde_bytes")]
        entropy: Vec<u8>,
        unix_nanos: u64,
    },
    /// Flush the sandbox's own disk and hold every write to it (`FIFREEZE`), so that the host
    /// can copy the disk whole and consistent (a VM's checkpoint); answered by `Done` once
    /// frozen (or `Error` where there is no disk of the sandbox's own). Only on the first
    /// connection; writers wait until `Thaw`.
    Freeze,
    /// Let writes to the sandbox's disk go on (`FITHAW`); answered by `Done` (or `Error`).
    Thaw,
}

/// The largest piece of a file in one `Data` frame.
pub const DATA_CHUNK: usize = 256 << 10;

/// Whom files belong to, and whose permissions a file operation obeys: a uid and gid of
/// the sandbox (`(0, 0)`: its root). A `reader` of `None` reads with every permission, as
/// a save of artifacts does.
pub type Owner = (u32, u32);

/// Where a file operation works.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum At {
    /// An absolute path of the sandbox, resolved as in the sandbox but never out of it
    /// (every link, the last name's too, leads back inside its root), which may cross its
    /// mounts but must end on one of its own filesystems.
    Root(String),
    /// A path relative to a directory (itself resolved as `Root`), resolved below it with
    /// no link on the way (nor as its last name) and no other mount.
    Beneath { dir: String, path: String },
}

impl At {
    /// The path as a user would name it.
    pub fn display(&self) -> String {
        match self {
            At::Root(path) => path.clone(),
            At::Beneath { dir, path } if path.is_empty() || path == "." => dir.clone(),
            At::Beneath { dir, path } => format!("{}/{path}", dir.trim_end_matches('/')),
        }
    }
}

/// What a `Create` does with what is at its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Create {
    /// Write beside the name and rename over it at `End`: a reader sees the old file or all
    /// of the new one, and a create that fails leaves the old one. A regular file or nothing
    /// may be there (a link is refused: files are not written through links).
    Atomic,
    /// Like `Atomic`, but a file, link or FIFO there is replaced, never followed, and the
    /// file gets `mode` whatever was there.
    AtomicReplacing,
    /// Make the file in place (what is there, a file or a link, removed first): the fastest,
    /// for a restore into a workspace nothing else uses.
    InPlace,
}

/// What kind of entry a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl Kind {
    /// The kind of a `st_mode`.
    pub fn of_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            _ => Kind::BlockDevice,
        }
    }

    /// The kind in words: `a FIFO`, `a regular file`, …
    pub fn what(self) -> &'static str {
        match self {
            Kind::File => "a regular file",
            Kind::Dir => "a directory",
            Kind::Symlink => "a symlink",
            Kind::Fifo => "a FIFO",
            Kind::Socket => "a socket",
            Kind::CharDevice => "a character device",
            Kind::BlockDevice => "a block device",
        }
    }
}

/// What a file is, as `lstat` tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub size: u64,
    pub mtime_ns: i64,
    /// Moved by the kernel on every change to the file; nothing in a sandbox can set it.
    pub ctime_ns: i64,
    pub ino: u64,
    pub uid: u32,
    pub gid: u32,
}

impl Meta {
    pub fn of(st: &nix::sys::stat::FileStat) -> Meta {
        Meta {
            kind: Kind::of_mode(st.st_mode),
            mode: st.st_mode & 0o7777,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
            ino: st.st_ino,
            uid: st.st_uid,
            gid: st.st_gid,
        }
    }
}

/// What a command's timeout kills.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// Every process of the sandbox (a turn's step: nothing it started outlives it).
    #[default]
    Sandbox,
    /// The command's process group only; background commands keep running.
    Command,
}

/// A command to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// The whole environment of the command.
    pub env: Vec<(String, String)>,
    /// Working directory, created when missing.
    pub cwd: String,
    /// Kill the command, and everything else in the sandbox, after this long.
    pub timeout_ms: Option<u64>,
    /// Files written (with their parent directories) before the command starts, such as
    /// the script it runs: one round trip instead of several.
    pub files: Vec<FileSpec>,
    /// A file read after the command ends (such as the outputs it published), answered in
    /// `Exited`: another round trip saved.
    pub collect: Option<Collect>,
    /// Run the command as this uid and gid of the sandbox instead of its root; the working
    /// directory is given to them.
    pub user: Option<(u32, u32)>,
    /// The command's standard input; empty: `/dev/null`.
    #[serde(with = "serde_bytes")]
    pub stdin: Vec<u8>,
    /// What the timeout kills.
    pub timeout_kills: Scope,
}

/// A file to read back after a command, up to `limit` bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collect {
    pub path: String,
    pub limit: u64,
}

/// A file to create or replace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    pub path: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub mode: u32,
}

/// Which stream output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

/// What the agent tells the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The sandbox is set up and the agent is serving.
    Ready,
    /// The sandbox could not be set up; the agent exits after sending this.
    SetupFailed {
        message: String,
    },
    /// The command started with this pid (as seen inside the sandbox).
    Started {
        pid: i32,
    },
    Output {
        stream: Stream,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Exited {
        status: ExitStatus,
        timed_out: bool,
        micros: u64,
        /// The file the request asked to collect: its bytes, or why it could not be read.
        collected: Option<Result<Vec<u8>, String>>,
        /// How many processes the kernel has killed for want of memory in the agent's
        /// cgroup so far, where the agent can tell (a VM's guest, whose limits the agent's
        /// cgroup holds); `None` where the host tells instead.
        oom_kills: Option<u64>,
        /// For a command that failed, whether the filesystem of the sandbox's root (its
        /// writable layer's) was then full (`sandboxfs::is_full`): what the host of a VM,
        /// which cannot look, reports as out of disk. `None` for a command that passed.
        disk_full: Option<bool>,
    },
    File {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// How a background command ended, or `None` while it still runs.
    Waited {
        status: Option<ExitStatus>,
    },
    Done,
    Error {
        message: String,
    },
    /// What is at a path (`Stat`), or what a `Create` made.
    Meta(Option<Meta>),
    /// Some of a directory's entries.
    Entries(Vec<(String, Meta)>),
    /// Where a symlink points.
    Link(String),
    /// The file a `Read` opened, as it was then: its bytes follow.
    Opened(Meta),
    /// Bytes of a file being read, at most [`DATA_CHUNK`].
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A file operation failed: with the error number the kernel gave, or, where upstream
    /// refused to touch the entry, what it is (`a FIFO`, `on procfs`, …).
    Failed {
        errno: Option<i32>,
        refused: Option<String>,
        message: String,
    },
}

/// The version of this protocol. Any change to [`Request`], [`Response`] or what they
/// carry that an older peer would decode differently takes the next number.
pub const PROTOCOL_VERSION: u32 = 5;

/// What a greeting ([`write_hello`]) starts with, so that a peer that speaks something else
/// entirely is told apart from one of another version.
const HELLO_MAGIC: &[u8; 14] = b"upstream-agent";

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    #[error("agent frame of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("agent frame is malformed: {0}")]
    Decode(#[from] postcard::Error),
    /// The peer's greeting names another version of the protocol.
    #[error(
        "the sandbox's agent speaks protocol version {theirs} and this upstream speaks \
         version {ours}: the agent comes from another build of upstream (a guest image or \
         snapshot made by an older one?); make it again with this build"
    )]
    Version { ours: u32, theirs: u32 },
    /// The peer's first frame is no greeting at all.
    #[error(
        "the sandbox's agent did not greet first: it is not an upstream agent, or one from before protocol versions"
    )]
    NoGreeting,
}

/// Sends this side's greeting: the first frame each side sends on a connection, before any
/// [`Request`] or [`Response`]. Its layout never changes, whatever the version.
pub fn write_hello<W: Write>(w: &mut W) -> Result<(), FrameError> {
    let mut frame = Vec::with_capacity(4 + HELLO_MAGIC.len() + 4);
    frame.extend_from_slice(&((HELLO_MAGIC.len() + 4) as u32).to_le_bytes());
    frame.extend_from_slice(HELLO_MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    w.write_all(&frame)?;
    Ok(())
}

/// Reads the peer's greeting and checks its version against this side's: `Ok(false)` when
/// the peer closed the connection before greeting.
pub fn read_hello<R: Read>(r: &mut R) -> Result<bool, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    if u32::from_le_bytes(len) as usize != HELLO_MAGIC.len() + 4 {
        return Err(FrameError::NoGreeting);
    }
    let mut body = [0u8; HELLO_MAGIC.len() + 4];
    r.read_exact(&mut body)?;
    let (magic, version) = body.split_at(HELLO_MAGIC.len());
    if magic != HELLO_MAGIC {
        return Err(FrameError::NoGreeting);
    }
    let theirs = u32::from_le_bytes(version.try_into().expect("four bytes"));
    if theirs != PROTOCOL_VERSION {
        return Err(FrameError::Version {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    Ok(true)
}

/// Writes one message as a frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, message: &T) -> Result<(), FrameError> {
    let body = postcard::to_stdvec(message)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    Ok(())
}

/// Reads one message; `None` when the peer closed the stream between frames.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(postcard::from_bytes(&body)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let messages = vec![
            Response::Ready,
            Response::Output {
                stream: Stream::Stderr,
                data: b"\x00\xffhello".to_vec(),
            },
            Response::Exited {
                status: ExitStatus::Signal(9),
                timed_out: true,
                micros: 12,
                collected: Some(Ok(b"k=v".to_vec())),
                oom_kills: Some(1),
                disk_full: Some(true),
            },
        ];
        let mut wire = Vec::new();
        for m in &messages {
            write_frame(&mut wire, m).unwrap();
        }
        let mut reader = &wire[..];
        let mut got = Vec::new();
        while let Some(m) = read_frame::<_, Response>(&mut reader).unwrap() {
            got.push(m);
        }
        assert_eq!(got, messages);
    }

    #[test]
    fn a_greeting_of_this_version_is_taken_and_any_other_named() {
        let mut wire = Vec::new();
        write_hello(&mut wire).unwrap();
        assert!(read_hello(&mut &wire[..]).unwrap());
        // The same greeting one version on.
        let mut newer = wire.clone();
        let at = newer.len() - 4;
        newer[at..].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        let e = read_hello(&mut &newer[..]).unwrap_err();
        assert!(
            matches!(e, FrameError::Version { ours, theirs } if ours == PROTOCOL_VERSION && theirs == ours + 1),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains(&format!("version {}", PROTOCOL_VERSION + 1))
        );
        // A message where the greeting should be, as an agent from before greetings sends.
        let mut old = Vec::new();
        write_frame(&mut old, &Response::Ready).unwrap();
        assert!(matches!(
            read_hello(&mut &old[..]).unwrap_err(),
            FrameError::NoGreeting
        ));
        // Of the right length but another magic.
        let mut other = wire.clone();
        other[4] ^= 0xff;
        assert!(matches!(
            read_hello(&mut &other[..]).unwrap_err(),
            FrameError::NoGreeting
        ));
        assert!(!read_hello(&mut &[][..]).unwrap(), "closed before greeting");
    }

    #[test]
    fn oversized_frame_is_refused() {
        let mut wire = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&[0; 16]);
        let err = read_frame::<_, Response>(&mut &wire[..]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)));
    }

    #[test]
    fn truncated_frame_is_an_error_not_eof() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &Request::Shutdown).unwrap();
        wire.extend_from_slice(&100u32.to_le_bytes());
        wire.extend_from_slice(&[1, 2, 3]);
        let mut reader = &wire[..];
        assert_eq!(
            read_frame::<_, Request>(&mut reader).unwrap(),
            Some(Request::Shutdown)
        );
        assert!(read_frame::<_, Request>(&mut reader).is_err());
    }
}

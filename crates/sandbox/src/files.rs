//! Moving files in and out of a sandbox, whatever the backend: one capability ([`Files`]) —
//! stat, list, read, create, mkdir, symlink, set mode and times, remove — used by artifact
//! save and restore, `/context` and the HTTP files API.
//!
//! Two ways provide it, with the same rules ([`Tree`], on [`crate::sandboxfs`]): the host
//! works on the sandbox's root itself where it can reach it (the namespace backend: no copy
//! through the agent, several threads at once), and otherwise asks the agent to do the same
//! work inside ([`AgentFiles`], over the agent protocol: what a VM needs). Bytes stream both
//! ways in frames of [`DATA_CHUNK`], so a file of any size moves in flat memory.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

pub use upstream_agent::protocol::{At, Create, DATA_CHUNK, Kind, Meta, Owner};
use upstream_agent::protocol::{Request, Response};
pub use upstream_agent::tree::Tree;

use crate::client::{AgentClient, ClientError, bounded_message, out_of_turn};

/// The most entries one listing through the agent holds ...
pub const MAX_LISTING: usize = 1 << 20;

/// ... and the most bytes their names take, together: a sandbox's agent cannot make the host
/// hold more of a directory than this, however many frames it sends.
pub const MAX_LISTING_NAMES: usize = 64 << 20;

/// The longest name of a directory entry the kernel makes (`NAME_MAX`).
const MAX_NAME: usize = 255;

/// The longest path, and symlink target, the kernel takes (`PATH_MAX` less its NUL).
const MAX_PATH: usize = 4095;

/// The files of one sandbox. Every path is an [`At`]; `reader` (`None`: with every
/// permission) and `owner` are users of the sandbox ([`Owner`]).
pub trait Files: Send + Sync {
    /// What is at `at`, not following a last link: `None` where nothing is, or where a
    /// directory on the way is missing, a link or no directory.
    fn stat(&self, at: &At, reader: Option<Owner>) -> io::Result<Option<Meta>>;

    /// Directory `at`'s entries with what each is, sorted by name.
    fn list(&self, at: &At, reader: Option<Owner>) -> io::Result<Vec<(String, Meta)>>;

    /// Where symlink `at` points.
    fn read_link(&self, at: &At, reader: Option<Owner>) -> io::Result<String>;

    /// Regular file `at` from `offset` on: its bytes up to the size it had when opened
    /// (however it grows meanwhile), and what it was then.
    fn open(
        &self,
        at: &At,
        offset: u64,
        reader: Option<Owner>,
    ) -> io::Result<(Box<dyn Read + Send>, Meta)>;

    /// Starts regular file `at` (and the directories above it that are missing); its bytes
    /// are written to what this returns, and [`FileWriter::finish`] puts it in place.
    /// Dropped unfinished, it leaves nothing of itself ([`Create::InPlace`]: an empty or
    /// partial file).
    fn create(
        &self,
        at: &At,
        mode: u32,
        how: Create,
        owner: Owner,
    ) -> io::Result<Box<dyn FileWriter>>;

    /// Makes directory `at` (one there stays as it is), with `parents` those above it.
    fn make_dir(&self, at: &At, mode: u32, parents: bool, owner: Owner) -> io::Result<()>;

    /// Makes symlink `at` to `target`, replacing a file or link, with mtime `mtime_ns`.
    fn symlink(&self, at: &At, target: &str, mtime_ns: i64, owner: Owner) -> io::Result<()>;

    /// Sets the mode and modification time of file or directory `at`.
    fn set_meta(
        &self,
        at: &At,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        owner: Owner,
    ) -> io::Result<()>;

    /// Removes a file, link or empty directory; with `recursive`, any directory.
    fn remove(&self, at: &At, recursive: bool, owner: Owner) -> io::Result<()>;

    /// Gives directory `at` to `owner` if the sandbox's root has it.
    fn give(&self, at: &At, owner: Owner) -> io::Result<()>;

    /// Lets go of what the calling thread kept open for its work (the end of a restore).
    fn forget(&self) {}
}

/// A regular file being made ([`Files::create`]).
pub trait FileWriter: Write + Send {
    /// The file itself where it is open in this process, for a copy that writes straight to
    /// it; `None` where its bytes go through [`Write`].
    fn file(&self) -> Option<&std::fs::File>;

    /// Gives the file `mode` and `mtime_ns` where given and puts it in place.
    fn finish(self: Box<Self>, mode: Option<u32>, mtime_ns: Option<i64>) -> io::Result<Meta>;
}

impl Files for Tree {
    fn stat(&self, at: &At, reader: Option<Owner>) -> io::Result<Option<Meta>> {
        Tree::stat(self, at, reader)
    }

    fn list(&self, at: &At, reader: Option<Owner>) -> io::Result<Vec<(String, Meta)>> {
        Tree::list(self, at, reader)
    }

    fn read_link(&self, at: &At, reader: Option<Owner>) -> io::Result<String> {
        Tree::read_link(self, at, reader)
    }

    fn open(
        &self,
        at: &At,
        offset: u64,
        reader: Option<Owner>,
    ) -> io::Result<(Box<dyn Read + Send>, Meta)> {
        let (file, meta) = Tree::open(self, at, offset, reader)?;
        Ok((Box::new(file.take(meta.size.saturating_sub(offset))), meta))
    }

    fn create(
        &self,
        at: &At,
        mode: u32,
        how: Create,
        owner: Owner,
    ) -> io::Result<Box<dyn FileWriter>> {
        Ok(Box::new(HostWriter(Tree::create(
            self, at, mode, how, owner,
        )?)))
    }

    fn make_dir(&self, at: &At, mode: u32, parents: bool, owner: Owner) -> io::Result<()> {
        Tree::make_dir(self, at, mode, parents, owner)
    }

    fn symlink(&self, at: &At, target: &str, mtime_ns: i64, owner: Owner) -> io::Result<()> {
        Tree::symlink(self, at, target, mtime_ns, owner)
    }

    fn set_meta(
        &self,
        at: &At,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        owner: Owner,
    ) -> io::Result<()> {
        Tree::set_meta(self, at, mode, mtime_ns, owner)
    }

    fn remove(&self, at: &At, recursive: bool, owner: Owner) -> io::Result<()> {
        Tree::remove(self, at, recursive, owner)
    }

    fn give(&self, at: &At, owner: Owner) -> io::Result<()> {
        Tree::give(self, at, owner)
    }

    fn forget(&self) {
        Tree::forget(self)
    }
}

struct HostWriter(upstream_agent::tree::Creating);

impl Write for HostWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut file = self.0.file();
        file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FileWriter for HostWriter {
    fn file(&self) -> Option<&std::fs::File> {
        Some(self.0.file())
    }

    fn finish(self: Box<Self>, mode: Option<u32>, mtime_ns: Option<i64>) -> io::Result<Meta> {
        self.0.finish(mode, mtime_ns)
    }
}

/// The error of a failed file operation as the agent reported it: the refusal or the
/// error number it names, so callers tell them apart as they would the host's own.
fn failure(errno: Option<i32>, refused: Option<String>, message: String) -> io::Error {
    match (refused, errno) {
        (Some(what), _) => upstream_agent::sandboxfs::refused(what),
        (None, Some(errno)) => io::Error::from_raw_os_error(errno),
        (None, None) => io::Error::other(message),
    }
}

fn lost(e: ClientError) -> io::Error {
    match e {
        ClientError::Gone => io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the sandbox's agent went away while files were moved",
        ),
        ClientError::Protocol(why) => {
            io::Error::new(io::ErrorKind::InvalidData, OutOfProtocol(why))
        }
        other => io::Error::other(other.to_string()),
    }
}

/// What a file operation's error holds when the sandbox's agent broke the protocol: the
/// words of [`ClientError::Protocol`].
#[derive(Debug)]
pub struct OutOfProtocol(String);

impl std::fmt::Display for OutOfProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        ClientError::Protocol(self.0.clone()).fmt(f)
    }
}

impl std::error::Error for OutOfProtocol {}

/// Whether `e` is a file operation's whose sandbox's agent broke the protocol.
pub fn is_out_of_protocol(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<OutOfProtocol>())
}

/// An answer of the agent's that breaks the protocol (`why`), as an error of a file
/// operation: [`io::ErrorKind::InvalidData`], and the words of [`ClientError::Protocol`].
fn broken(why: String) -> io::Error {
    lost(ClientError::Protocol(bounded_message(why)))
}

/// Whether an answer ends its request's answers, whatever it is: one that does not leaves
/// the connection out of step, and it is closed rather than used again.
fn is_final(response: &Response) -> bool {
    matches!(response, Response::Failed { .. } | Response::Error { .. })
}

/// The error of answer `response` to `what`: the agent's refusal or failure, or an answer
/// out of turn.
fn unexpected(response: Response, what: &str) -> io::Error {
    match response {
        Response::Failed {
            errno,
            refused,
            message,
        } => failure(
            errno,
            refused.map(bounded_message),
            bounded_message(message),
        ),
        Response::Error { message } => io::Error::other(bounded_message(message)),
        other => broken(out_of_turn(&other, what)),
    }
}

/// Why `name`, an entry of a directory as the agent listed it, can be no such entry: it
/// would name another place (`..`, `a/b`, the directory itself) or none the kernel makes.
fn bad_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("an empty name")
    } else if name == "." || name == ".." {
        Some("`.` or `..`")
    } else if name.contains('/') {
        Some("a name with `/` in it")
    } else if name.contains('\0') {
        Some("a name with a NUL in it")
    } else if name.len() > MAX_NAME {
        Some("a name longer than 255 bytes")
    } else {
        None
    }
}

/// Why `meta`, as the agent told it, can be no file's.
fn bad_meta(meta: &Meta) -> Option<String> {
    (meta.mode & !0o7777 != 0)
        .then(|| format!("a mode of {:#o}, past the permission bits", meta.mode))
}

/// Some of `text` from the sandbox, for an error: at most 64 characters, escaped.
fn quoted(text: &str) -> String {
    let cut: String = text.chars().take(64).collect();
    format!("{cut:?}")
}

type Client = AgentClient<UnixStream>;

/// Connections to an agent, each used by one operation at a time.
struct Pool {
    state: Mutex<PoolState>,
    returned: Condvar,
}

struct PoolState {
    idle: Vec<Client>,
    /// Connections idle or in use: one let go (broken, or closed in the middle of a file)
    /// is gone for good.
    open: usize,
}

impl Pool {
    /// A connection to use, once one is free; an error when none is left.
    fn take(&self) -> io::Result<Client> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(client) = state.idle.pop() {
                return Ok(client);
            }
            if state.open == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "no connection to the sandbox's agent is left to move files on",
                ));
            }
            state = self.returned.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn give_back(&self, client: Client) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .idle
            .push(client);
        self.returned.notify_one();
    }

    /// Lets a connection taken go (closed: its helper in the sandbox ends with it).
    fn let_go(&self, client: Client) {
        drop(client);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.open = state.open.saturating_sub(1);
        drop(state);
        self.returned.notify_all();
    }
}

/// [`Files`] done by the agent inside the sandbox, over connections of its own: as many
/// operations at once as there are connections (a reader or writer holds one until it
/// ends).
pub struct AgentFiles {
    pool: Arc<Pool>,
    /// Whatever the connections need to stay theirs (a VM's ports), let go with the files.
    _held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl AgentFiles {
    /// Files moved over `connections`, each a connection to the sandbox's agent that
    /// nothing else uses.
    pub fn new(connections: Vec<Client>) -> AgentFiles {
        AgentFiles {
            pool: Arc::new(Pool {
                state: Mutex::new(PoolState {
                    open: connections.len(),
                    idle: connections,
                }),
                returned: Condvar::new(),
            }),
            _held: None,
        }
    }

    /// These files, holding `held` until they are dropped (the ports their connections use).
    pub fn holding(self, held: Box<dyn std::any::Any + Send + Sync>) -> AgentFiles {
        AgentFiles {
            _held: Some(held),
            ..self
        }
    }

    /// Sends `request` (`what`) on a connection of the pool and picks its one answer.
    fn call<T>(
        &self,
        request: &Request,
        what: &str,
        pick: impl FnOnce(Response) -> Result<T, Response>,
    ) -> io::Result<T> {
        let mut client = self.pool.take()?;
        let result = client.post(request).and_then(|()| client.next());
        match result {
            Ok(response) => match pick(response) {
                Ok(value) => {
                    self.pool.give_back(client);
                    Ok(value)
                }
                Err(other) => {
                    // An answer out of turn may have more behind it: the connection is
                    // closed, not given back to answer another request with them.
                    match is_final(&other) {
                        true => self.pool.give_back(client),
                        false => self.pool.let_go(client),
                    }
                    Err(unexpected(other, what))
                }
            },
            // A connection that broke is not given back: the agent's helper went with it.
            Err(e) => {
                self.pool.let_go(client);
                Err(lost(e))
            }
        }
    }
}

fn done(response: Response) -> Result<(), Response> {
    match response {
        Response::Done => Ok(()),
        other => Err(other),
    }
}

impl Files for AgentFiles {
    fn stat(&self, at: &At, reader: Option<Owner>) -> io::Result<Option<Meta>> {
        let request = Request::Stat {
            at: at.clone(),
            reader,
        };
        let meta = self.call(&request, "`Stat`", |r| match r {
            Response::Meta(meta) => Ok(meta),
            other => Err(other),
        })?;
        if let Some(why) = meta.as_ref().and_then(bad_meta) {
            return Err(broken(format!(
                "it told {why} of {}",
                quoted(&at.display())
            )));
        }
        Ok(meta)
    }

    fn list(&self, at: &At, reader: Option<Owner>) -> io::Result<Vec<(String, Meta)>> {
        let mut client = self.pool.take()?;
        let request = Request::List {
            at: at.clone(),
            reader,
        };
        let mut all: Vec<(String, Meta)> = Vec::new();
        let mut names = 0usize;
        let mut next = client.post(&request).and_then(|()| client.next());
        loop {
            match next {
                Ok(Response::Entries(entries)) => {
                    let why = entries.iter().find_map(|(name, meta)| {
                        bad_name(name)
                            .map(|why| format!("{why} ({})", quoted(name)))
                            .or_else(|| bad_meta(meta))
                    });
                    names += entries.iter().map(|(name, _)| name.len()).sum::<usize>();
                    let why = why.or_else(|| {
                        (all.len() + entries.len() > MAX_LISTING || names > MAX_LISTING_NAMES).then(
                            || {
                                format!(
                                    "more than {MAX_LISTING} entries or {} MiB of names, the \
                                     most a listing holds",
                                    MAX_LISTING_NAMES >> 20
                                )
                            },
                        )
                    });
                    if let Some(why) = why {
                        // What else it sends of this listing is not read.
                        self.pool.let_go(client);
                        return Err(broken(format!(
                            "it listed {why} in {}",
                            quoted(&at.display())
                        )));
                    }
                    all.extend(entries);
                }
                Ok(Response::Done) => break,
                Ok(other) => {
                    match is_final(&other) {
                        true => self.pool.give_back(client),
                        false => self.pool.let_go(client),
                    }
                    return Err(unexpected(other, "`List`"));
                }
                Err(e) => {
                    self.pool.let_go(client);
                    return Err(lost(e));
                }
            }
            next = client.next();
        }
        self.pool.give_back(client);
        Ok(all)
    }

    fn read_link(&self, at: &At, reader: Option<Owner>) -> io::Result<String> {
        let request = Request::ReadLink {
            at: at.clone(),
            reader,
        };
        let target = self.call(&request, "`ReadLink`", |r| match r {
            Response::Link(target) => Ok(target),
            other => Err(other),
        })?;
        if target.is_empty() || target.len() > MAX_PATH || target.contains('\0') {
            return Err(broken(format!(
                "it told a link target of {} bytes{} for {}, which no symlink has",
                target.len(),
                if target.contains('\0') {
                    " with a NUL"
                } else {
                    ""
                },
                quoted(&at.display())
            )));
        }
        Ok(target)
    }

    fn open(
        &self,
        at: &At,
        offset: u64,
        reader: Option<Owner>,
    ) -> io::Result<(Box<dyn Read + Send>, Meta)> {
        let mut client = self.pool.take()?;
        let request = Request::Read {
            at: at.clone(),
            offset,
            reader,
        };
        let opened = client.post(&request).and_then(|()| client.next());
        match opened {
            Err(e) => {
                self.pool.let_go(client);
                Err(lost(e))
            }
            Ok(Response::Opened(meta)) => {
                let why = match bad_meta(&meta) {
                    Some(why) => Some(why),
                    None if meta.kind != Kind::File => Some(meta.kind.what().to_string()),
                    None => None,
                };
                if let Some(why) = why {
                    self.pool.let_go(client);
                    return Err(broken(format!(
                        "it opened {why} to be read as the regular file {}",
                        quoted(&at.display())
                    )));
                }
                let reading = AgentReader {
                    client: Some(client),
                    pool: self.pool.clone(),
                    chunk: Vec::new(),
                    at: 0,
                    left: meta.size.saturating_sub(offset),
                    path: at.display(),
                };
                Ok((Box::new(reading), meta))
            }
            Ok(other) => {
                match is_final(&other) {
                    true => self.pool.give_back(client),
                    false => self.pool.let_go(client),
                }
                Err(unexpected(other, "`Read`"))
            }
        }
    }

    fn create(
        &self,
        at: &At,
        mode: u32,
        how: Create,
        owner: Owner,
    ) -> io::Result<Box<dyn FileWriter>> {
        let mut client = self.pool.take()?;
        let request = Request::Create {
            at: at.clone(),
            mode,
            how,
            owner,
        };
        if let Err(e) = client.post(&request) {
            self.pool.let_go(client);
            return Err(lost(e));
        }
        Ok(Box::new(AgentWriter {
            client: Some(client),
            pool: self.pool.clone(),
            buffer: Vec::new(),
        }))
    }

    fn make_dir(&self, at: &At, mode: u32, parents: bool, owner: Owner) -> io::Result<()> {
        let request = Request::MakeDir {
            at: at.clone(),
            mode,
            parents,
            owner,
        };
        self.call(&request, "`MakeDir`", done)
    }

    fn symlink(&self, at: &At, target: &str, mtime_ns: i64, owner: Owner) -> io::Result<()> {
        let request = Request::Symlink {
            at: at.clone(),
            target: target.to_string(),
            mtime_ns,
            owner,
        };
        self.call(&request, "`Symlink`", done)
    }

    fn set_meta(
        &self,
        at: &At,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        owner: Owner,
    ) -> io::Result<()> {
        let request = Request::SetMeta {
            at: at.clone(),
            mode,
            mtime_ns,
            owner,
        };
        self.call(&request, "`SetMeta`", done)
    }

    fn remove(&self, at: &At, recursive: bool, owner: Owner) -> io::Result<()> {
        let request = Request::Remove {
            at: at.clone(),
            recursive,
            owner,
        };
        self.call(&request, "`Remove`", done)
    }

    fn give(&self, at: &At, owner: Owner) -> io::Result<()> {
        let request = Request::Give {
            at: at.clone(),
            owner,
        };
        self.call(&request, "`Give`", done)
    }
}

/// A file's bytes as the agent streams them, no more than the size it said the file had
/// when opened; its connection goes back to the pool at the end of the file (read to its
/// end; closed when dropped before).
struct AgentReader {
    client: Option<Client>,
    pool: Arc<Pool>,
    chunk: Vec<u8>,
    at: usize,
    /// What is left of the file as it was opened.
    left: u64,
    /// The file, as a user would name it.
    path: String,
}

impl AgentReader {
    /// The next piece of the file; `false` at its end.
    fn fill(&mut self) -> io::Result<bool> {
        let Some(client) = self.client.as_mut() else {
            return Ok(false);
        };
        let next = match client.next() {
            Ok(next) => next,
            Err(e) => {
                let client = self.client.take().expect("checked above");
                self.pool.let_go(client);
                return Err(lost(e));
            }
        };
        match next {
            Response::Data(data) if data.len() <= DATA_CHUNK && data.len() as u64 <= self.left => {
                self.left -= data.len() as u64;
                self.chunk = data;
                self.at = 0;
                Ok(true)
            }
            Response::Data(data) => {
                let client = self.client.take().expect("checked above");
                self.pool.let_go(client);
                Err(broken(format!(
                    "it sent {} bytes of {} where {} were left of the size it said the file \
                     had (and at most {DATA_CHUNK} come at once)",
                    data.len(),
                    quoted(&self.path),
                    self.left
                )))
            }
            Response::Done => {
                let client = self.client.take().expect("checked above");
                self.pool.give_back(client);
                Ok(false)
            }
            other => {
                // A failure ends the read, and the connection is free again; anything else
                // leaves it out of step.
                let client = self.client.take().expect("checked above");
                match is_final(&other) {
                    true => self.pool.give_back(client),
                    false => self.pool.let_go(client),
                }
                Err(unexpected(other, "`Read`"))
            }
        }
    }
}

impl Read for AgentReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            if !self.fill()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Drop for AgentReader {
    fn drop(&mut self) {
        // Stopped before the end of the file (the turn's time ran out, the client went
        // away): the connection is closed, which ends its helper's sending, rather than
        // read to the end of a file that may be of any size.
        if let Some(client) = self.client.take() {
            self.pool.let_go(client);
        }
    }
}

/// A file the agent makes from the bytes written here, sent in pieces of [`DATA_CHUNK`].
struct AgentWriter {
    client: Option<Client>,
    pool: Arc<Pool>,
    buffer: Vec<u8>,
}

impl AgentWriter {
    fn send(&mut self, request: &Request) -> io::Result<()> {
        match self.client.as_mut() {
            Some(client) => {
                let sent = client.post(request);
                if sent.is_err() {
                    let client = self.client.take().expect("matched above");
                    self.pool.let_go(client);
                }
                sent.map_err(lost)
            }
            None => Err(lost(ClientError::Gone)),
        }
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buffer);
        self.send(&Request::Data(data))
    }

    /// Ends the file with `end` and reads the agent's one answer.
    fn end(&mut self, end: &Request) -> io::Result<Response> {
        self.send(end)?;
        let mut client = self.client.take().ok_or_else(|| lost(ClientError::Gone))?;
        match client.next() {
            Ok(answer) => {
                let in_turn = match end {
                    Request::Abort => matches!(answer, Response::Done),
                    _ => matches!(answer, Response::Meta(Some(_))),
                };
                match in_turn || is_final(&answer) {
                    true => self.pool.give_back(client),
                    false => self.pool.let_go(client),
                }
                Ok(answer)
            }
            Err(e) => {
                self.pool.let_go(client);
                Err(lost(e))
            }
        }
    }
}

impl Write for AgentWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = DATA_CHUNK - self.buffer.len();
        let n = buf.len().min(room);
        self.buffer.extend_from_slice(&buf[..n]);
        if self.buffer.len() == DATA_CHUNK {
            self.send_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

impl FileWriter for AgentWriter {
    fn file(&self) -> Option<&std::fs::File> {
        None
    }

    fn finish(mut self: Box<Self>, mode: Option<u32>, mtime_ns: Option<i64>) -> io::Result<Meta> {
        self.send_buffer()?;
        match self.end(&Request::End { mode, mtime_ns })? {
            Response::Meta(Some(meta)) => match bad_meta(&meta) {
                None => Ok(meta),
                Some(why) => Err(broken(format!("it told {why} of a file it made"))),
            },
            other => Err(unexpected(other, "`End` of a file")),
        }
    }
}

impl Drop for AgentWriter {
    fn drop(&mut self) {
        if self.client.is_some() {
            self.buffer.clear();
            let _ = self.end(&Request::Abort);
        }
    }
}

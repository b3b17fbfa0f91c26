//! The fake sandbox's files: a tree in memory with modes, times, owners and symlinks, served
//! as [`Files`] with the rules of [`At`]: `Root` paths resolve inside the root (links and
//! `..` never leave it), `Beneath` paths take no link and no `..` at all.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use upstream_sandbox::files::{At, Create, FileWriter, Files, Kind, Meta, Owner};

/// One entry of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File(Vec<u8>),
    Dir,
    Symlink(String),
}

#[derive(Debug, Clone)]
struct Entry {
    node: Node,
    mode: u32,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    owner: Owner,
}

/// The whole tree, by absolute path (`/` is the root). Cloning it is a snapshot.
#[derive(Debug, Clone)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
    /// The fake clock of changes: every change moves it, as the kernel moves a ctime.
    clock: i64,
    next_ino: u64,
}

impl Default for Tree {
    fn default() -> Tree {
        let mut tree = Tree {
            entries: BTreeMap::new(),
            clock: 1,
            next_ino: 1,
        };
        tree.put("/", Node::Dir, 0o755, (0, 0));
        for dir in ["/tmp", "/run", "/etc"] {
            tree.put(dir, Node::Dir, 0o755, (0, 0));
        }
        tree
    }
}

fn error(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// The most links one resolution follows, as the kernel's `ELOOP`.
const MAX_LINKS: usize = 40;

impl Tree {
    fn put(&mut self, path: &str, node: Node, mode: u32, owner: Owner) {
        self.clock += 1;
        self.next_ino += 1;
        let entry = Entry {
            node,
            mode,
            mtime_ns: self.clock,
            ctime_ns: self.clock,
            ino: self.next_ino,
            owner,
        };
        self.entries.insert(path.to_string(), entry);
    }

    fn touch(&mut self, path: &str) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) = self.entries.get_mut(path) {
            e.ctime_ns = clock;
        }
    }

    /// An absolute path of the sandbox to the entry it names, every link on the way (and the
    /// last one with `follow_last`) resolved inside the root.
    fn resolve_root(&self, path: &str, follow_last: bool) -> io::Result<String> {
        let mut pending: Vec<String> = path
            .split('/')
            .rev()
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect();
        let mut at = String::from("/");
        let mut links = 0;
        while let Some(name) = pending.pop() {
            match name.as_str() {
                "." => continue,
                ".." => {
                    at = parent(&at).to_string();
                    continue;
                }
                _ => {}
            }
            // A missing directory on the way names where it would be: whoever asked finds
            // nothing there, or makes it.
            match self.entries.get(&at).map(|e| &e.node) {
                Some(Node::Dir) | None => {}
                Some(_) => return Err(error(libc::ENOTDIR)),
            }
            let next = join(&at, &name);
            let last = pending.is_empty();
            match self.entries.get(&next).map(|e| &e.node) {
                Some(Node::Symlink(target)) if !last || follow_last => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(error(libc::ELOOP));
                    }
                    if target.starts_with('/') {
                        at = String::from("/");
                    }
                    pending.extend(
                        target
                            .split('/')
                            .rev()
                            .filter(|c| !c.is_empty())
                            .map(str::to_string),
                    );
                }
                _ => at = next,
            }
        }
        Ok(at)
    }

    /// The absolute path `at` names: `Beneath` paths below their directory, with no link and
    /// no `..` on the way (a link last only without `follow_last`).
    fn resolve(&self, at: &At, follow_last: bool) -> io::Result<String> {
        match at {
            At::Root(path) => self.resolve_root(path, follow_last),
            At::Beneath { dir, path } => {
                let mut here = self.resolve_root(dir, true)?;
                let names: Vec<&str> = path
                    .split('/')
                    .filter(|c| !c.is_empty() && *c != ".")
                    .collect();
                for (i, name) in names.iter().enumerate() {
                    if *name == ".." {
                        return Err(error(libc::EXDEV));
                    }
                    match self.entries.get(&here).map(|e| &e.node) {
                        Some(Node::Dir) => {}
                        Some(Node::Symlink(_)) => return Err(error(libc::ELOOP)),
                        Some(_) => return Err(error(libc::ENOTDIR)),
                        None => return Err(error(libc::ENOENT)),
                    }
                    here = join(&here, name);
                    let last = i + 1 == names.len();
                    if let Some(Node::Symlink(_)) = self.entries.get(&here).map(|e| &e.node) {
                        if !last || follow_last {
                            return Err(error(libc::ELOOP));
                        }
                    }
                }
                Ok(here)
            }
        }
    }

    fn meta(e: &Entry) -> Meta {
        let (kind, size) = match &e.node {
            Node::File(data) => (Kind::File, data.len() as u64),
            Node::Dir => (Kind::Dir, 0),
            Node::Symlink(target) => (Kind::Symlink, target.len() as u64),
        };
        Meta {
            kind,
            mode: e.mode,
            size,
            mtime_ns: e.mtime_ns,
            ctime_ns: e.ctime_ns,
            ino: e.ino,
            uid: e.owner.0,
            gid: e.owner.1,
        }
    }

    fn need_dir(&self, path: &str) -> io::Result<()> {
        match self.entries.get(path).map(|e| &e.node) {
            Some(Node::Dir) => Ok(()),
            Some(_) => Err(error(libc::ENOTDIR)),
            None => Err(error(libc::ENOENT)),
        }
    }

    fn make_dirs(&mut self, path: &str, mode: u32, owner: Owner) -> io::Result<()> {
        if self.entries.contains_key(path) {
            return self.need_dir(path);
        }
        self.make_dirs(parent(path), 0o755, owner)?;
        self.put(path, Node::Dir, mode, owner);
        Ok(())
    }

    /// The file at absolute `path` (links followed inside), as a command would read it.
    pub fn read(&self, path: &str) -> Option<Vec<u8>> {
        let at = self.resolve_root(path, true).ok()?;
        match &self.entries.get(&at)?.node {
            Node::File(data) => Some(data.clone()),
            _ => None,
        }
    }

    /// What is at absolute `path`, not following a last link.
    pub fn node(&self, path: &str) -> Option<Node> {
        let at = self.resolve_root(path, false).ok()?;
        Some(self.entries.get(&at)?.node.clone())
    }

    /// Writes file `path` as a command would (parents made, a link followed inside).
    pub fn write(&mut self, path: &str, data: &[u8], mode: u32) -> io::Result<()> {
        let at = self.resolve_root(path, true)?;
        self.make_dirs(parent(&at), 0o755, (0, 0))?;
        match self.entries.get_mut(&at) {
            Some(Entry {
                node: Node::File(old),
                ..
            }) => {
                *old = data.to_vec();
                self.touch(&at);
            }
            Some(_) => return Err(error(libc::EISDIR)),
            None => self.put(&at, Node::File(data.to_vec()), mode, (0, 0)),
        }
        Ok(())
    }

    /// Makes directory `path` and those above it, as `mkdir -p` would.
    pub fn make_dir_all(&mut self, path: &str) -> io::Result<()> {
        let at = self.resolve_root(path, true)?;
        self.make_dirs(&at, 0o755, (0, 0))
    }

    /// Appends to file `path`, making it if it is missing.
    pub fn append(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        let mut old = self.read(path).unwrap_or_default();
        old.extend_from_slice(data);
        self.write(path, &old, 0o644)
    }

    /// Makes a symlink at absolute `path`, as `ln -s` would.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let at = self.resolve_root(parent(path), true)?;
        self.need_dir(&at)?;
        let name = path.rsplit('/').next().unwrap_or_default();
        self.put(
            &join(&at, name),
            Node::Symlink(target.into()),
            0o777,
            (0, 0),
        );
        Ok(())
    }

    /// Removes `path` and everything below it, as `rm -rf` would.
    pub fn remove_all(&mut self, path: &str) {
        let Ok(at) = self.resolve_root(path, false) else {
            return;
        };
        let below = format!("{}/", at.trim_end_matches('/'));
        self.entries
            .retain(|p, _| p != &at && !(p.starts_with(&below) && at != "/"));
    }
}

/// A tree several handles share: the sandbox, its sessions and its [`Files`].
pub type Shared = Arc<Mutex<Tree>>;

pub(crate) fn lock(tree: &Shared) -> std::sync::MutexGuard<'_, Tree> {
    tree.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`Files`] over a shared [`Tree`].
pub struct TreeFiles(pub Shared);

impl Files for TreeFiles {
    fn stat(&self, at: &At, _reader: Option<Owner>) -> io::Result<Option<Meta>> {
        let tree = lock(&self.0);
        match tree.resolve(at, false) {
            Ok(path) => Ok(tree.entries.get(&path).map(Tree::meta)),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn list(&self, at: &At, _reader: Option<Owner>) -> io::Result<Vec<(String, Meta)>> {
        let tree = lock(&self.0);
        let dir = tree.resolve(at, true)?;
        tree.need_dir(&dir)?;
        let below = format!("{}/", dir.trim_end_matches('/'));
        Ok(tree
            .entries
            .iter()
            .filter_map(|(p, e)| {
                let name = p.strip_prefix(&below)?;
                (!name.is_empty() && !name.contains('/')).then(|| (name.to_string(), Tree::meta(e)))
            })
            .collect())
    }

    fn read_link(&self, at: &At, _reader: Option<Owner>) -> io::Result<String> {
        let tree = lock(&self.0);
        let path = tree.resolve(at, false)?;
        match tree.entries.get(&path).map(|e| &e.node) {
            Some(Node::Symlink(target)) => Ok(target.clone()),
            Some(_) => Err(error(libc::EINVAL)),
            None => Err(error(libc::ENOENT)),
        }
    }

    fn open(
        &self,
        at: &At,
        offset: u64,
        _reader: Option<Owner>,
    ) -> io::Result<(Box<dyn Read + Send>, Meta)> {
        let tree = lock(&self.0);
        let path = tree.resolve(at, true)?;
        let entry = tree.entries.get(&path).ok_or_else(|| error(libc::ENOENT))?;
        match &entry.node {
            Node::File(data) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let bytes = data[start..].to_vec();
                Ok((Box::new(io::Cursor::new(bytes)), Tree::meta(entry)))
            }
            Node::Dir => Err(error(libc::EISDIR)),
            Node::Symlink(_) => Err(error(libc::ELOOP)),
        }
    }

    fn create(
        &self,
        at: &At,
        mode: u32,
        how: Create,
        owner: Owner,
    ) -> io::Result<Box<dyn FileWriter>> {
        let mut tree = lock(&self.0);
        let path = tree.resolve(at, false)?;
        tree.make_dirs(parent(&path), 0o755, owner)?;
        match (tree.entries.get(&path).map(|e| &e.node), how) {
            (Some(Node::Dir), _) => return Err(error(libc::EISDIR)),
            (Some(Node::Symlink(_)), Create::Atomic) => return Err(error(libc::ELOOP)),
            _ => {}
        }
        Ok(Box::new(Writer {
            tree: self.0.clone(),
            path,
            mode,
            owner,
            data: Vec::new(),
        }))
    }

    fn make_dir(&self, at: &At, mode: u32, parents: bool, owner: Owner) -> io::Result<()> {
        let mut tree = lock(&self.0);
        let path = tree.resolve(at, true)?;
        if parents {
            return tree.make_dirs(&path, mode, owner);
        }
        tree.need_dir(parent(&path))?;
        match tree.entries.get(&path) {
            Some(_) => tree.need_dir(&path),
            None => {
                tree.put(&path, Node::Dir, mode, owner);
                Ok(())
            }
        }
    }

    fn symlink(&self, at: &At, target: &str, mtime_ns: i64, owner: Owner) -> io::Result<()> {
        let mut tree = lock(&self.0);
        let path = tree.resolve(at, false)?;
        tree.need_dir(parent(&path))?;
        if let Some(Node::Dir) = tree.entries.get(&path).map(|e| &e.node) {
            return Err(error(libc::EISDIR));
        }
        tree.put(&path, Node::Symlink(target.into()), 0o777, owner);
        if let Some(e) = tree.entries.get_mut(&path) {
            e.mtime_ns = mtime_ns;
        }
        Ok(())
    }

    fn set_meta(
        &self,
        at: &At,
        mode: Option<u32>,
        mtime_ns: Option<i64>,
        _owner: Owner,
    ) -> io::Result<()> {
        let mut tree = lock(&self.0);
        let path = tree.resolve(at, false)?;
        tree.touch(&path);
        let entry = tree
            .entries
            .get_mut(&path)
            .ok_or_else(|| error(libc::ENOENT))?;
        if let Node::Symlink(_) = entry.node {
            return Err(error(libc::ELOOP));
        }
        if let Some(mode) = mode {
            entry.mode = mode;
        }
        if let Some(mtime) = mtime_ns {
            entry.mtime_ns = mtime;
        }
        Ok(())
    }

    fn remove(&self, at: &At, recursive: bool, _owner: Owner) -> io::Result<()> {
        let mut tree = lock(&self.0);
        let path = tree.resolve(at, false)?;
        if !tree.entries.contains_key(&path) {
            return Err(error(libc::ENOENT));
        }
        let below = format!("{}/", path.trim_end_matches('/'));
        let has_children = tree.entries.keys().any(|p| p.starts_with(&below));
        if has_children && !recursive {
            return Err(error(libc::ENOTEMPTY));
        }
        tree.entries
            .retain(|p, _| p != &path && !p.starts_with(&below));
        Ok(())
    }

    fn give(&self, at: &At, owner: Owner) -> io::Result<()> {
        let mut tree = lock(&self.0);
        let path = tree.resolve(at, true)?;
        let entry = tree
            .entries
            .get_mut(&path)
            .ok_or_else(|| error(libc::ENOENT))?;
        if entry.owner == (0, 0) {
            entry.owner = owner;
        }
        Ok(())
    }
}

/// A file being made: its bytes are put in the tree, whole, when it is finished.
struct Writer {
    tree: Shared,
    path: String,
    mode: u32,
    owner: Owner,
    data: Vec<u8>,
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FileWriter for Writer {
    fn file(&self) -> Option<&std::fs::File> {
        None
    }

    fn finish(self: Box<Self>, mode: Option<u32>, mtime_ns: Option<i64>) -> io::Result<Meta> {
        let Writer {
            tree,
            path,
            mode: made_with,
            owner,
            data,
        } = *self;
        let mut tree = lock(&tree);
        tree.put(&path, Node::File(data), mode.unwrap_or(made_with), owner);
        let entry = tree
            .entries
            .get_mut(&path)
            .ok_or_else(|| error(libc::ENOENT))?;
        if let Some(mtime) = mtime_ns {
            entry.mtime_ns = mtime;
        }
        Ok(Tree::meta(entry))
    }
}

//! Messages between the host and the sandbox init before the agent takes over the connection.

use serde::{Deserialize, Serialize};

/// How the sandbox's user namespace gets its uid and gid maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdMap {
    /// The host (root) maps sandbox ids 0..count to host ids base..base+count.
    Range { base: u32, count: u32 },
    /// The init maps sandbox root to its own uid and gid: the only map an unprivileged user
    /// may write.
    Own,
}

/// What the init needs to build the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    /// The sandbox's directory on the host: `root`, `upper`, `work`, `workspace`.
    pub sandbox_dir: String,
    /// The shared lower layer of host-image sandboxes.
    pub skeleton: Option<String>,
    /// Read-only image layers, lowest first; empty for the host image.
    pub layers: Vec<String>,
    pub id_map: IdMap,
    /// A network namespace of its own (only loopback).
    pub new_net: bool,
    pub hostname: String,
    /// The most processes (and threads) the sandbox may have.
    pub max_processes: Option<u64>,
    /// Read-only layers of the root kept from an earlier turn, `rootlayers/0` (bottom) to
    /// `rootlayers/<n-1>`, stacked on the image.
    pub root_layers: u32,
    /// The workspace as an overlay of its own, one layer per step (see `layers`).
    pub workspace: Option<WorkspaceLayers>,
    /// The root's writable layer on a tmpfs of the sandbox's own, not in `upper/`.
    pub upper_in_memory: bool,
    /// The tmpfs's size, when there is a memory limit.
    pub memory: Option<u64>,
    /// The host sends idmapped mounts (see `idmap`) of the sandbox directory, the skeleton
    /// (when there is one) and each layer, in that order, with one byte right after the
    /// configuration (cloned init) or the `Mapped` message (re-executed init); the init
    /// attaches each over its path.
    pub idmapped: bool,
}

/// The workspace's layers: `layers/0` (bottom) .. `layers/<below-1>` read-only, the writable
/// one `layers/<below>` (with `layers/<below>.work`), all in the sandbox directory, over what
/// the root has at `dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceLayers {
    /// The workspace, inside the sandbox.
    pub dir: String,
    pub below: u32,
}

/// Host to init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToInit {
    Config(InitConfig),
    /// The uid and gid maps are written.
    Mapped,
}

/// Init to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromInit {
    /// The user namespace exists; write its maps.
    MapIds,
}

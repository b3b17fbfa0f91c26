//! The agent: the process that runs inside every sandbox as its init, whatever the backend.
//!
//! It speaks one framed protocol ([`protocol`]) over a byte stream — a Unix socket for the
//! namespace backend, a virtio port or a vsock stream for VMs — and does what the host asks: run a command and
//! stream its output and exit status, signal it, read and write files, shut down.

mod files;
pub mod net;
pub mod ports;
pub mod protocol;
pub mod renew;
pub mod sandboxfs;
mod server;
pub mod tree;
pub mod vsock;

pub use server::{AgentError, Ended, Sessions, serve, serve_with};

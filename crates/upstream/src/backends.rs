//! The backend that isolates sandboxes, chosen at run time: the rest of the CLI holds it as a
//! [`SharedBackend`] and never names its type.

use std::path::PathBuf;

use upstream_sandbox::{SandboxError, SharedBackend};

/// The backend for this host, its sandboxes running `init_exe` (this program) as their init.
pub fn open(init_exe: PathBuf) -> Result<SharedBackend, SandboxError> {
    upstream_backend_ns::open(init_exe)
}

/// [`open`] with this process's own binary, as the CLI runs it.
pub fn open_here() -> Result<SharedBackend, SandboxError> {
    open(PathBuf::from("/proc/self/exe"))
}

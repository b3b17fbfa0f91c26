//! End-to-end tests of the `upstream` binary: real sandboxes, real documents.
//!
//! Tests that need sandboxes skip loudly (a `SKIPPED:` line naming the reason) where the
//! machine cannot make them; tests that attack isolation also need root, as CI runs them.

// Tests report skips on stderr by design.
#![allow(clippy::print_stderr)]

mod util;

mod bad_input;
mod context;
mod document;
mod e2b;
mod exec;
mod history;
mod host_boundaries;
mod hostside;
mod image;
mod isolation;
mod limits;
mod local_users;
mod oom;
mod run;
mod serve;
mod serve_fuzz;
mod serve_log;
mod serve_tenancy;
mod store_trust;
mod vm;
mod vm_limits;

//! The `upstream` binary: turns command lines into engine calls and shows the results.

// The binary is where output is decided; the libraries below it never print.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod backends;
mod cli;
mod daemon_records;
mod doctor;
mod exec;
mod images;
mod interrupt;
mod layer_bars;
mod progress;
mod run;
mod sandbox;
mod serve;
mod store_cmd;
mod table;

use std::process::ExitCode;

use clap::Parser;

/// Exit codes: what happened, for scripts.
pub mod exit {
    /// Every step passed.
    pub const OK: u8 = 0;
    /// A step failed, timed out or ran out of memory.
    pub const STEP_FAILED: u8 = 1;
    /// The input is bad: the document was not touched.
    pub const BAD_INPUT: u8 = 2;
    /// The sandbox could not be set up.
    pub const SANDBOX: u8 = 3;
    /// Ctrl-C.
    pub const INTERRUPTED: u8 = 130;
}

fn main() -> ExitCode {
    // A VM's init is this same binary, started by the guest's kernel from its initramfs.
    if upstream_backend_vm::guest::is_vm_init() {
        upstream_backend_vm::guest::main();
    }
    // The keeper of the pid namespace jailed Firecrackers run in is this same binary too:
    // it ends, and the kernel kills the namespace's VMs, when upstream does.
    if upstream_backend_vm::firecracker::jail::is_keeper() {
        return match upstream_backend_vm::firecracker::jail::keep() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("upstream: {e}");
                ExitCode::from(exit::BAD_INPUT)
            }
        };
    }
    // The sandbox init is this same binary, started again inside the new namespaces.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == upstream_backend_ns::INIT_ARG)
    {
        return ExitCode::from(upstream_backend_ns::init::main().clamp(0, 255) as u8);
    }
    let cli = cli::Cli::parse();
    let code = match cli.command {
        cli::Command::Run(args) => run::run(args),
        cli::Command::Exec(args) => exec::exec(args),
        cli::Command::Log(args) => store_cmd::log(args),
        cli::Command::Show(args) => store_cmd::show(args),
        cli::Command::Artifacts(args) => store_cmd::artifacts(args),
        cli::Command::Context(command) => store_cmd::context(command),
        cli::Command::Gc(args) => store_cmd::gc(args),
        cli::Command::Images(command) => images::images(command),
        cli::Command::Serve(args) => serve::serve(args),
        cli::Command::Keys(command) => serve::keys(command),
        cli::Command::Sandbox(command) => sandbox::sandbox(command),
        cli::Command::Doctor => doctor::doctor(),
    };
    ExitCode::from(code)
}

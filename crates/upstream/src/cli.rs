//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run markdown turns in isolated sandboxes and write the results back into them.
#[derive(Debug, Parser)]
#[command(name = "upstream", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the steps of one or more documents and write each step's result after it.
    Run(RunArgs),
    /// Run one command in a fresh sandbox, like `docker run --rm`.
    Exec(ExecArgs),
    /// Show what this host supports and what upstream will use.
    Doctor,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Markdown documents to run, one turn each, in order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Stream the steps' output to stderr as they run.
    #[arg(short, long)]
    pub verbose: bool,
    /// Print each turn's record as one line of JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The image to run in.
    #[arg(long, default_value = "host")]
    pub image: String,
    /// Memory limit, such as 512M or 2GiB.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// CPU limit as a number of CPUs, such as 0.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// `none` (loopback only) or `host`.
    #[arg(long, default_value = "none")]
    pub network: upstream_doc::Network,
    /// Kill the command after this long, such as 30s.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Working directory inside the sandbox.
    #[arg(long, default_value = upstream_doc::front_matter::DEFAULT_WORKDIR)]
    pub workdir: String,
    /// Set an environment variable (KEY=VALUE); may be repeated.
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    upstream_doc::front_matter::parse_size(s)
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    upstream_doc::front_matter::parse_duration(s)
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

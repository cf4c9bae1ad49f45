//! `moeshard-worker`: see the crate documentation of `moeshard_worker`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use moeshard_worker::cli::Args;
use moeshard_worker::server;
use tracing_subscriber::EnvFilter;

/// The environment variable with the log filter (tracing `EnvFilter` syntax; default `info`).
const LOG_ENV: &str = "MOESHARD_LOG";

fn main() -> ExitCode {
    moeshard_kernels::allocator::limit_malloc_arenas();
    let args = Args::parse();
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match args.resolve().and_then(server::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("moeshard-worker: {err:#}");
            ExitCode::FAILURE
        }
    }
}

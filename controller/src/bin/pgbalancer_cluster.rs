//! `pgbalancer-cluster`: the origin cluster manager's command line over the seed JSON.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use pgbalancer_controller::cli::seed::{run, SeedCli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = SeedCli::parse();
    let level = if cli.verbose { "debug" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: container logs stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    run(cli).await
}

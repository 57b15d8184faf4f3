//! `pgbalancer`: the command-line entry point.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use pgbalancer_controller::cli::{run, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: container logs stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if pgbalancer_controller::cli::kubectl::invoked_as_plugin() {
        return pgbalancer_controller::cli::kubectl::run(
            pgbalancer_controller::cli::kubectl::Plugin::parse(),
        )
        .await;
    }
    run(Cli::parse()).await
}

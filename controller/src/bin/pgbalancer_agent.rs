//! `pgbalancer-agent`: runs in the balancer container, supervises pgpool and serves the REST API.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use pgbalancer_controller::agent::{run, AgentConfig};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(AgentConfig::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgbalancer-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

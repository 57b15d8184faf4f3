//! `pgbalancer-agent`: runs in the balancer container, supervises pgpool and serves the REST API.
//! As the container's first process it runs itself as a child and starts it again when it dies.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use pgbalancer_controller::agent::{drain, init, run, AgentConfig};
use pgbalancer_controller::plan::BALANCER_PORT;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: container logs stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = AgentConfig::parse();
    if config.drain {
        let (took, arrived) = drain::run(drain::BALANCER, BALANCER_PORT).await;
        tracing::info!(
            seconds = took.as_secs_f64(),
            new_connections = arrived,
            "drained"
        );
        return ExitCode::SUCCESS;
    }
    if init::wanted() {
        return match init::run().await {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => {
                eprintln!("pgbalancer-agent: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(n) = std::env::var(init::RESTARTS_ENV).ok().filter(|n| n != "0") {
        tracing::warn!(restarts = %n, "the agent was started again after it ended");
    }
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgbalancer-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

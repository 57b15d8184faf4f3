//! The `pgbalancer` command: local Docker mode (`up`, `status`, `scale`, `switchover`,
//! `down`, `images build`, `controller run`) and `crd`.

pub mod kubectl;
mod output;
pub mod seed;

use std::error::Error as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use kube::CustomResourceExt;
use pgbalancer_crd::{parse_documents, PgBalancerCluster};

use crate::backend::docker::images;
use crate::local::ops::{Local, OpError};
use crate::local::state::StateDir;

pub use output::{status_document, status_table, StatusDocument};

/// Run PostgreSQL (one primary, N streaming replicas) behind pgBalancer, on Docker or Kubernetes.
#[derive(Parser, Debug)]
#[command(name = "pgbalancer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create or converge the clusters of a YAML file (one or more PgBalancerCluster documents).
    Up {
        /// Cluster file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Seconds to wait for every instance and balancer to be ready.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Show instances, roles, health, ports, replication lag and the balancer.
    Status {
        /// Cluster name; all clusters when absent.
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        output: Format,
        /// Include passwords and ready-to-use connection URIs.
        #[arg(long)]
        show_secrets: bool,
    },
    /// Change the number of streaming replicas (the primary is never removed).
    Scale {
        /// Cluster name.
        name: String,
        /// New replica count.
        #[arg(long)]
        replicas: i32,
        /// Seconds to wait for the cluster to be ready.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Move the primary to another instance: waits for it to catch up, shuts the old primary
    /// down cleanly, promotes the target, and the old primary follows it as a replica.
    Switchover {
        /// Cluster name.
        name: String,
        /// Instance to promote (name or ordinal); the most caught-up replica when absent.
        #[arg(long)]
        to: Option<String>,
        /// Seconds to wait for the cluster to be ready again.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Remove a cluster's containers, volumes and network.
    Down {
        /// Cluster names.
        #[arg(required = true)]
        names: Vec<String>,
        /// Keep the data volumes and credentials so a later `up` finds the data again.
        #[arg(long)]
        keep_data: bool,
    },
    /// Build the PostgreSQL and balancer images.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// The local controller, which keeps clusters converged and fails them over with no
    /// command running; `up` starts it in a container.
    Controller {
        #[command(subcommand)]
        command: ControllerCommand,
    },
    /// Print the PgBalancerCluster CustomResourceDefinition.
    Crd,
    /// Run the Kubernetes operator (in a pod, or against the current kubeconfig).
    Operator(crate::backend::kube::operator::OperatorConfig),
}

#[derive(Subcommand, Debug)]
enum ControllerCommand {
    /// Run the controller loop in the foreground until SIGTERM or SIGINT (what the
    /// `pgbalancer-controller-*` container runs).
    Run {
        /// State directory whose clusters to keep (default: as for every command).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ImagesCommand {
    /// Build the images (creating the Debian base with debootstrap where it cannot be pulled).
    Build {
        /// PostgreSQL major versions to build.
        #[arg(long = "postgres-version", value_delimiter = ',', default_value = "17")]
        versions: Vec<u32>,
    },
}

/// Output formats of `status`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Format {
    /// Human-readable table.
    Table,
    /// JSON document.
    Json,
    /// YAML document.
    Yaml,
}

/// Runs the command line; the exit code to return.
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error and its causes.
pub fn print_error(e: &(dyn std::error::Error + 'static)) {
    eprintln!("error: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
}

async fn dispatch(cli: Cli) -> Result<(), OpError> {
    match cli.command {
        Command::Up { file, timeout } => up(&file, timeout).await,
        Command::Status {
            name,
            output,
            show_secrets,
        } => status(name, output, show_secrets).await,
        Command::Scale {
            name,
            replicas,
            timeout,
        } => scale(&name, replicas, timeout).await,
        Command::Switchover { name, to, timeout } => {
            switchover(&name, to.as_deref(), timeout).await
        }
        Command::Down { names, keep_data } => down(&names, keep_data).await,
        Command::Images {
            command: ImagesCommand::Build { versions },
        } => build_images(&versions).await,
        Command::Controller {
            command: ControllerCommand::Run { state_dir },
        } => {
            let state = state_dir.map_or_else(StateDir::from_env, StateDir::at);
            let docker = crate::backend::docker::connect().await?;
            crate::local::controller::run(docker, state).await
        }
        Command::Crd => {
            print!("{}", crd_yaml());
            Ok(())
        }
        Command::Operator(config) => {
            crate::backend::kube::operator::run(config)
                .await
                .map_err(|e| {
                    OpError::Input(format!(
                        "operator: {e}{}",
                        e.source().map(|s| format!(": {s}")).unwrap_or_default()
                    ))
                })
        }
    }
}

/// The CRD as YAML, as `manifests/crd.yaml` holds it.
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&PgBalancerCluster::crd())
        .expect("the CRD, a plain data type, serialises")
}

fn progress(started: Instant) -> impl Fn(&str, &str) + Sync {
    move |cluster, line| {
        eprintln!(
            "[{:>5.1}s] {cluster}: {line}",
            started.elapsed().as_secs_f64()
        )
    }
}

async fn up(file: &PathBuf, timeout: u64) -> Result<(), OpError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| OpError::Input(format!("{}: cannot read: {e}", file.display())))?;
    let clusters =
        parse_documents(&text).map_err(|e| OpError::Input(format!("{}: {e}", file.display())))?;
    pgbalancer_crd::validate::validate_set(&clusters)
        .map_err(|e| OpError::Input(format!("{} is invalid:\n{e}", file.display())))?;
    let local = Local::connect().await?;
    let started = Instant::now();
    let views = local
        .apply(
            clusters,
            None,
            Duration::from_secs(timeout),
            &progress(started),
        )
        .await?;
    for view in &views {
        println!("{}", output::ready_summary(view, started.elapsed()));
    }
    Ok(())
}

async fn status(name: Option<String>, format: Format, show_secrets: bool) -> Result<(), OpError> {
    let local = Local::connect().await?;
    let names = match name {
        Some(n) => vec![n],
        None => local.state().names()?,
    };
    let mut docs = Vec::new();
    for name in &names {
        let view = local.view(name).await?;
        docs.push(status_document(&view, show_secrets));
    }
    let print = |text: String| print!("{text}");
    // The status documents are our own plain data: serialising them cannot fail.
    const SERIALISES: &str = "a status document serialises";
    match (format, docs.len()) {
        (Format::Table, 0) => println!("no clusters; start one with `pgbalancer up -f FILE`"),
        (Format::Table, _) => docs.iter().for_each(|d| print(status_table(d))),
        (Format::Json, 1) => println!(
            "{}",
            serde_json::to_string_pretty(&docs[0]).expect(SERIALISES)
        ),
        (Format::Json, _) => println!("{}", serde_json::to_string_pretty(&docs).expect(SERIALISES)),
        (Format::Yaml, 1) => print(serde_yaml::to_string(&docs[0]).expect(SERIALISES)),
        (Format::Yaml, _) => print(serde_yaml::to_string(&docs).expect(SERIALISES)),
    }
    Ok(())
}

async fn scale(name: &str, replicas: i32, timeout: u64) -> Result<(), OpError> {
    let local = Local::connect().await?;
    let stored = local.stored(name)?;
    let mut cluster = stored.cluster.clone();
    cluster.spec.replicas = replicas;
    pgbalancer_crd::validate::validate(&cluster)
        .map_err(|e| OpError::Input(format!("--replicas: {e}")))?;
    let started = Instant::now();
    let views = local
        .apply(
            vec![cluster],
            None,
            Duration::from_secs(timeout),
            &progress(started),
        )
        .await?;
    for view in &views {
        println!("{}", output::ready_summary(view, started.elapsed()));
    }
    Ok(())
}

async fn switchover(name: &str, to: Option<&str>, timeout: u64) -> Result<(), OpError> {
    let local = Local::connect().await?;
    let started = Instant::now();
    let view = local
        .switchover(name, to, Duration::from_secs(timeout), &progress(started))
        .await?;
    println!(
        "{name}: primary is {} ({:.1} s)",
        view.plan.primary().name,
        started.elapsed().as_secs_f64()
    );
    println!("{}", output::ready_summary(&view, started.elapsed()));
    Ok(())
}

async fn down(names: &[String], keep_data: bool) -> Result<(), OpError> {
    let local = Local::connect().await?;
    for name in names {
        let report = local.down(name, keep_data).await?;
        println!(
            "{name}: removed {} container(s), {} volume(s), {} network(s){}{}",
            report.containers.len(),
            report.volumes.len(),
            report.networks.len(),
            if report.kept_networks.is_empty() {
                String::new()
            } else {
                format!(
                    "; kept network {} (still in use)",
                    report.kept_networks.join(", ")
                )
            },
            if keep_data {
                "; data volumes and credentials kept"
            } else {
                ""
            },
        );
        if report.controller_removed {
            println!("controller removed: no cluster left in this state directory");
        }
    }
    Ok(())
}

async fn build_images(versions: &[u32]) -> Result<(), OpError> {
    for v in versions {
        if images::suite_for(*v).is_none() {
            return Err(OpError::Input(format!(
                "--postgres-version {v}: not supported; use one of {:?}",
                pgbalancer_crd::SUPPORTED_POSTGRES_VERSIONS
            )));
        }
    }
    let docker = crate::backend::docker::connect().await?;
    let started = Instant::now();
    let mut report =
        |line: &str| eprintln!("[{:>5.1}s] images: {line}", started.elapsed().as_secs_f64());
    images::build(&docker, versions, &mut report).await?;
    Ok(())
}

//! `pgbalancer-cluster`: the origin tool's command line over the seed JSON, kept working.
//!
//! `--init | --destroy | --status | --add-replica --balancer B [--count N]` with `--config FILE`
//! (default `pgbalancer_cluster.json`). Each `balancers[]` entry is one cluster. Fixed against
//! the origin: replicas really stream, `--add-replica` reconfigures the balancer and writes the
//! new topology back to the file, `--destroy` removes volumes, `load_balance_mode` is honoured.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use pgbalancer_crd::seed::{cluster_name, SeedConfig};

use crate::local::ops::{Local, OpError};

/// pgBalancer cluster manager (JSON configuration).
#[derive(Parser, Debug)]
#[command(name = "pgbalancer-cluster", version)]
pub struct SeedCli {
    /// Configuration file.
    #[arg(long, default_value = "pgbalancer_cluster.json")]
    config: PathBuf,
    /// Log every engine step.
    #[arg(short, long)]
    pub verbose: bool,
    /// Create the whole cluster from the configuration.
    #[arg(long)]
    init: bool,
    /// Remove every container, volume and network of the configuration.
    #[arg(long)]
    destroy: bool,
    /// Show the state of every balancer and node.
    #[arg(long)]
    status: bool,
    /// Add replicas to one balancer's cluster (needs --balancer).
    #[arg(long)]
    add_replica: bool,
    /// Balancer name for --add-replica.
    #[arg(long)]
    balancer: Option<String>,
    /// Number of replicas to add.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Seconds to wait for readiness.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
}

/// Runs the seed command line.
pub async fn run(cli: SeedCli) -> ExitCode {
    if !(cli.init || cli.destroy || cli.status || cli.add_replica) {
        let _ = SeedCli::command().print_help();
        return ExitCode::SUCCESS;
    }
    if !cli.init && !cli.destroy && !cli.status && cli.balancer.is_none() {
        eprintln!("❌ --balancer required for --add-replica");
        return ExitCode::FAILURE;
    }
    match dispatch(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("❌ ");
            super::print_error(&e);
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> Result<SeedConfig, OpError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        OpError::Input(format!(
            "Configuration file not found: {} ({e})",
            path.display()
        ))
    })?;
    let seed =
        SeedConfig::parse(&text).map_err(|e| OpError::Input(format!("{}: {e}", path.display())))?;
    println!("📖 Configuration loaded: {}", seed.cluster_name);
    for b in &seed.balancers {
        println!("   - {}: 1 primary + {} replicas", b.name, b.replicas.len());
    }
    Ok(seed)
}

async fn dispatch(cli: &SeedCli) -> Result<(), OpError> {
    let seed = load(&cli.config)?;
    let clusters = seed
        .clusters()
        .map_err(|e| OpError::Input(format!("{}: {e}", cli.config.display())))?;
    let timeout = Duration::from_secs(cli.timeout);
    let started = Instant::now();
    let report = move |cluster: &str, line: &str| {
        println!(
            "   [{:>5.1}s] {cluster}: {line}",
            started.elapsed().as_secs_f64()
        )
    };
    if cli.init {
        let local = Local::connect().await?;
        local
            .apply(clusters, Some(absolute(&cli.config)), timeout, &report)
            .await?;
        println!(
            "✅ Cluster ready in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        return print_status(&local, &seed).await;
    }
    if cli.destroy {
        let local = Local::connect().await?;
        for b in &seed.balancers {
            match local.down(&cluster_name(&b.name), false).await {
                Ok(r) => println!(
                    "🗑️  {}: removed {} containers, {} volumes, {} networks",
                    b.name,
                    r.containers.len(),
                    r.volumes.len(),
                    r.networks.len()
                ),
                Err(OpError::Input(_)) => println!("   {}: nothing to remove", b.name),
                Err(e) => return Err(e),
            }
        }
        println!("✅ Cluster destroyed");
        return Ok(());
    }
    if cli.status {
        let local = Local::connect().await?;
        return print_status(&local, &seed).await;
    }
    let balancer = cli.balancer.clone().unwrap_or_default();
    add_replicas(cli, seed, &balancer, timeout, &report).await
}

async fn add_replicas(
    cli: &SeedCli,
    mut seed: SeedConfig,
    balancer: &str,
    timeout: Duration,
    report: &(dyn Fn(&str, &str) + Sync),
) -> Result<(), OpError> {
    let entry = seed.balancer_mut(balancer).ok_or_else(|| {
        OpError::Input(format!(
            "Balancer {balancer} not found in {}",
            cli.config.display()
        ))
    })?;
    let added = entry
        .add_replicas(cli.count)
        .map_err(|e| OpError::Input(format!("{}: {e}", cli.config.display())))?;
    let clusters = seed.clusters().map_err(|e| OpError::Input(e.to_string()))?;
    let name = cluster_name(balancer);
    let cluster = clusters
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some(name.as_str()))
        .ok_or_else(|| OpError::Input(format!("balancer {balancer} has no cluster")))?;
    let local = Local::connect().await?;
    let result = local
        .apply(vec![cluster], Some(absolute(&cli.config)), timeout, report)
        .await;
    if !matches!(result, Err(OpError::Input(_))) {
        // Containers may exist now: record them so --status and --destroy see them.
        write_atomically(&cli.config, &seed.to_json())?;
    }
    result?;
    println!(
        "✅ Added replica(s) {added:?} to {balancer}; the balancer routes to them; {} updated",
        cli.config.display()
    );
    print_status(&local, &seed).await
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn write_atomically(path: &Path, text: &str) -> Result<(), OpError> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| OpError::Input(format!("cannot write {}: {e}", path.display())))
}

async fn print_status(local: &Local, seed: &SeedConfig) -> Result<(), OpError> {
    println!("📊 Status:");
    for b in &seed.balancers {
        let name = cluster_name(&b.name);
        let doc = match local.view(&name).await {
            Ok(view) => Some(super::status_document(&view, false)),
            Err(OpError::Input(_)) => None,
            Err(e) => return Err(e),
        };
        let balancer = doc.as_ref().and_then(|d| d.balancer.instances.first());
        println!("Balancer {}", b.name);
        println!("   Container: {}", b.container_name);
        println!(
            "   Status: {} | Health: {}",
            balancer.map(|x| x.state.as_str()).unwrap_or("not_found"),
            balancer
                .map(|x| if x.ready {
                    "healthy (routing)"
                } else {
                    "not routing"
                })
                .unwrap_or("unknown")
        );
        println!(
            "   Ports: {} (main), {} (PCP), {} (REST)",
            b.port, b.pcp_port, b.rest_api_port
        );
        println!("   IP: {}", b.ip_address);
        let nodes =
            std::iter::once((None, &b.primary)).chain(b.replicas.iter().map(|r| (r.node_id, r)));
        for (id, node) in nodes {
            let inst = doc.as_ref().and_then(|d| {
                d.primary
                    .iter()
                    .chain(&d.replicas)
                    .find(|i| i.container == node.container_name)
            });
            let label = match id {
                None => "[PRIMARY]".to_owned(),
                Some(id) => format!("[REPLICA {id}]"),
            };
            let lag = inst
                .and_then(|i| i.lag_bytes)
                .map(|l| format!(" | Lag: {l} B"))
                .unwrap_or_default();
            println!(
                "   {label} {}  Host: {}:{} | IP: {}  Status: {} | Health: {} | Role: {}{lag}",
                node.container_name,
                node.host,
                node.port,
                node.ip_address,
                inst.map(|i| i.state.as_str()).unwrap_or("not_found"),
                inst.map(|i| if i.health.is_empty() {
                    "unknown"
                } else {
                    i.health.as_str()
                })
                .unwrap_or("unknown"),
                inst.map(|i| i.role.as_str()).unwrap_or("-"),
            );
        }
    }
    Ok(())
}

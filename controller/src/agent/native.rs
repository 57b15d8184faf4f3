//! Runs the native engine from the same files pgpool reads: the listen port, the backends
//! and the lag bound from `pgpool.conf`, the users from `secrets/pool_passwd`, the monitoring
//! password from `secrets/monitor-password`; the files are followed, so scaling and changed
//! credentials take effect without a restart.

use std::sync::Arc;
use std::time::Duration;

use crate::balancer::monitor::MonitorConfig;
use crate::balancer::{self, Settings};
use crate::plan::MONITOR_USER;

use super::AgentConfig;

/// What the native engine reads from `pgpool.conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conf {
    /// Client port.
    pub port: u16,
    /// Backends: slot, host, port.
    pub backends: Vec<(u32, String, u16)>,
    /// Replicas further behind than this take no reads.
    pub max_lag_bytes: Option<u64>,
    /// Reads may go to replicas (`load_balance_mode`).
    pub load_balance: bool,
}

/// Parses the settings the native engine uses from `pgpool.conf`.
pub fn parse_conf(conf: &str) -> Conf {
    let mut port = crate::plan::BALANCER_PORT;
    let mut max_lag_bytes = None;
    let mut load_balance = true;
    let mut hosts = std::collections::BTreeMap::new();
    let mut ports = std::collections::BTreeMap::new();
    for line in conf.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim().trim_matches('\''));
        if key == "port" {
            port = value.parse().unwrap_or(port);
        } else if key == "load_balance_mode" {
            load_balance = !matches!(value, "off" | "false" | "0");
        } else if key == "delay_threshold" {
            max_lag_bytes = value.parse().ok();
        } else if let Some(slot) = key.strip_prefix("backend_hostname") {
            if let Ok(slot) = slot.parse::<u32>() {
                hosts.insert(slot, value.to_owned());
            }
        } else if let Some(slot) = key.strip_prefix("backend_port") {
            if let (Ok(slot), Ok(p)) = (slot.parse::<u32>(), value.parse::<u16>()) {
                ports.insert(slot, p);
            }
        }
    }
    let backends = hosts
        .into_iter()
        .map(|(slot, host)| {
            let p = ports
                .get(&slot)
                .copied()
                .unwrap_or(crate::plan::POSTGRES_PORT);
            (slot, host, p)
        })
        .collect();
    Conf {
        port,
        backends,
        max_lag_bytes,
        load_balance,
    }
}

/// Parses `pool_passwd`: `user:TEXTpassword` lines (other forms are skipped: the native
/// engine needs the password to authenticate to the servers).
pub fn parse_pool_passwd(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let (user, secret) = line.split_once(':')?;
            let password = secret.strip_prefix("TEXT")?;
            Some((user.to_owned(), password.to_owned()))
        })
        .collect()
}

/// Starts the engine: listens on the configured port and follows the files.
pub async fn start(
    config: &AgentConfig,
    settings: Settings,
) -> std::io::Result<Arc<balancer::Engine>> {
    let conf = parse_conf(&std::fs::read_to_string(config.path("pgpool.conf")).unwrap_or_default());
    let settings = Settings {
        max_lag_bytes: conf.max_lag_bytes.unwrap_or(settings.max_lag_bytes),
        load_balance: conf.load_balance,
        ..settings
    };
    let interval = settings.check_interval;
    let engine = balancer::Engine::new(
        settings,
        MonitorConfig {
            user: MONITOR_USER.into(),
            password: config.secret("monitor-password"),
            interval,
        },
    );
    apply(config, &engine);
    let listener = std::net::TcpListener::bind(("0.0.0.0", conf.port))?;
    listener.set_nonblocking(true)?;
    data_plane(engine.clone(), listener)?;
    tracing::info!(port = conf.port, "native balancer serving");
    tokio::spawn(follow(config.clone(), engine.clone()));
    Ok(engine)
}

/// Client sessions run on a thread of their own with a single-threaded runtime: a proxied
/// query then wakes no other thread on its way (the monitors, the follower and the REST API
/// stay on the agent's runtime).
fn data_plane(
    engine: Arc<balancer::Engine>,
    listener: std::net::TcpListener,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("data-plane".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => engine.serve(listener).await,
                    Err(e) => tracing::error!(error = %e, "the balancer port cannot be served"),
                }
            })
        })?;
    Ok(())
}

/// Applies the files as they are now.
pub fn apply(config: &AgentConfig, engine: &balancer::Engine) {
    if let Ok(conf) = std::fs::read_to_string(config.path("pgpool.conf")) {
        engine.configure_backends(&parse_conf(&conf).backends);
    }
    let users = std::fs::read_to_string(config.path("secrets/pool_passwd")).unwrap_or_default();
    engine.configure_users(&parse_pool_passwd(&users));
}

async fn follow(config: AgentConfig, engine: Arc<balancer::Engine>) {
    let interval = Duration::from_secs(config.sync_interval.max(1));
    loop {
        tokio::time::sleep(interval).await;
        apply(&config, &engine);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendered_pgpool_conf_gives_port_backends_and_lag_bound() {
        let conf = "port = 9999\n\
                    delay_threshold = 10000000\n\
                    backend_hostname0 = 'demo-0'\n\
                    backend_port0 = 5432\n\
                    backend_hostname1 = 'demo-1' # a comment\n\
                    backend_port1 = 6543\n\
                    backend_hostname2 = 'demo-2'\n";
        assert_eq!(
            parse_conf(conf),
            Conf {
                port: 9999,
                backends: vec![
                    (0, "demo-0".into(), 5432),
                    (1, "demo-1".into(), 6543),
                    (2, "demo-2".into(), 5432)
                ],
                max_lag_bytes: Some(10_000_000),
                load_balance: true,
            }
        );
    }

    #[test]
    fn the_golden_rendering_is_read_whole() {
        let conf = parse_conf(include_str!("../render/golden/pgpool.conf"));
        assert_eq!(conf.port, crate::plan::BALANCER_PORT);
        assert!(conf.load_balance);
        assert!(!conf.backends.is_empty());
        assert!(conf
            .backends
            .iter()
            .all(|(_, h, p)| !h.is_empty() && *p > 0));
    }

    #[test]
    fn pool_passwd_text_entries_are_read_and_others_skipped() {
        assert_eq!(
            parse_pool_passwd("postgres:TEXTa:b\napp:md5abcdef\nmon:TEXTx\n"),
            vec![
                ("postgres".into(), "a:b".into()),
                ("mon".into(), "x".into())
            ]
        );
    }
}

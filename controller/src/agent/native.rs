//! Runs the native engine from the same files pgpool reads: the listen port, the backends
//! and the lag bound from `pgpool.conf`, the users from `secrets/pool_passwd`, the monitoring
//! password from `secrets/monitor-password`, with TLS on the certificate and key from `tls/`;
//! the files are followed, so scaling, changed credentials and a renewed certificate take
//! effect without a restart.

use std::sync::Arc;
use std::time::Duration;

use crate::balancer::monitor::MonitorConfig;
use crate::balancer::{self, Settings};
use crate::local::controller::error_chain;
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
    // Without pgpool.conf there is no port to listen on and no backend: the agent stops, as
    // pgpool would, rather than serve defaults.
    let path = config.path("pgpool.conf");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
    })?;
    let conf = parse_conf(&text);
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
    let unreadable = apply(config, &engine).err().map(|e| error_chain(&e));
    if let Some(e) = &unreadable {
        tracing::warn!(error = %e, "starting without what the file configures");
    }
    let listener = std::net::TcpListener::bind(("0.0.0.0", conf.port))?;
    listener.set_nonblocking(true)?;
    data_plane(engine.clone(), listener)?;
    tracing::info!(port = conf.port, "native balancer serving");
    tokio::spawn(follow(config.clone(), engine.clone(), unreadable));
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

/// A file the native engine follows that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}")]
pub struct ReadError {
    path: String,
    #[source]
    source: std::io::Error,
}

fn read(config: &AgentConfig, name: &str) -> Result<String, ReadError> {
    let path = config.path(name);
    std::fs::read_to_string(&path).map_err(|source| ReadError {
        path: path.display().to_string(),
        source,
    })
}

/// Applies the files as they are now. A file that cannot be read leaves what it configures
/// as it was (an unreadable `pool_passwd` must not turn every user away) and is the error.
pub fn apply(config: &AgentConfig, engine: &balancer::Engine) -> Result<(), ReadError> {
    let conf = read(config, "pgpool.conf").map(|conf| {
        engine.configure_backends(&parse_conf(&conf).backends);
    });
    let users = read(config, "secrets/pool_passwd").map(|users| {
        engine.configure_users(&parse_pool_passwd(&users));
    });
    conf.and(users).and(apply_tls(config, engine))
}

/// With TLS on, serves the certificate and key in `tls/` (a pair that cannot be read or used
/// leaves the previous one in place).
fn apply_tls(config: &AgentConfig, engine: &balancer::Engine) -> Result<(), ReadError> {
    if engine.settings.tls == balancer::TlsMode::Disabled {
        return Ok(());
    }
    let cert = read(config, crate::tls::CERT_FILE)?;
    let key = read(config, crate::tls::KEY_FILE)?;
    engine
        .configure_tls(cert.as_bytes(), key.as_bytes())
        .map_err(|e| ReadError {
            path: config.path(crate::tls::CERT_FILE).display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
}

/// Applies the files every sync interval; a read failure is logged when it starts or changes
/// (`last` is the one at start), not at every pass.
async fn follow(config: AgentConfig, engine: Arc<balancer::Engine>, mut last: Option<String>) {
    let interval = Duration::from_secs(config.sync_interval.max(1));
    loop {
        tokio::time::sleep(interval).await;
        let now = apply(&config, &engine).err().map(|e| error_chain(&e));
        if now != last {
            match &now {
                Some(e) => tracing::warn!(error = %e, "keeping the previous configuration"),
                None => tracing::info!("configuration files readable again"),
            }
            last = now;
        }
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

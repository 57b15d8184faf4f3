//! Validation of `PgBalancerCluster` specs: pure, total, and every error names its field.
//!
//! `validate` checks one cluster; `validate_set` adds the checks across the clusters of one file
//! (names, container names, host ports). Checks against what already runs (ports taken by other
//! clusters, existing networks) belong to the backends, which use [`claimed_host_ports`].
//! [`default_max_connections`] sizes `max_connections` for the balancers' pool when the spec sets
//! none; the planner renders that value, so what is checked here is what the instances get.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use thiserror::Error;

use crate::spec::*;
use crate::PgBalancerCluster;

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// Path of the field, e.g. `spec.replicas`, prefixed with the cluster name when several
    /// clusters are validated together.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// Every invalid field of a cluster or a set of clusters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ValidationErrors {}

/// `postgresql.conf` parameters the planner owns; a user value would break replication,
/// the images' paths or the balancer.
pub const MANAGED_PARAMETERS: [&str; 18] = [
    "listen_addresses",
    "port",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "unix_socket_directories",
    "primary_conninfo",
    "primary_slot_name",
    "hot_standby",
    "wal_level",
    "password_encryption",
    "cluster_name",
    "external_pid_file",
    "synchronous_standby_names",
    "ssl",
    "ssl_cert_file",
    "ssl_key_file",
];

/// Roles created by the images; the application user cannot take these names.
pub const RESERVED_ROLES: [&str; 3] = ["postgres", "replicator", "pgbalancer_monitor"];

/// Databases every instance has from `initdb`: the application's database is made, and owned
/// by the application user, so it cannot be one of these.
pub const RESERVED_DATABASES: [&str; 3] = ["postgres", "template0", "template1"];

/// Connections an explicit `max_connections` must leave free beyond the balancers' pool budget
/// (superusers, replication, monitoring).
pub const RESERVED_CONNECTIONS: u32 = 10;
/// The least `max_connections` rendered when the user sets none; see [`default_max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: u32 = 200;
/// Added to the pool budget when deriving `max_connections`: superuser sessions, base backups,
/// monitoring and the operator's own connections.
pub const MAX_CONNECTIONS_HEADROOM: u32 = 20;
/// A derived `max_connections` is a multiple of this.
pub const MAX_CONNECTIONS_STEP: u32 = 100;
/// The least explicit `max_connections` accepted.
pub const MIN_MAX_CONNECTIONS: u32 = 20;
/// PostgreSQL's upper bound for `max_connections` (`MAX_BACKENDS`).
pub const POSTGRES_MAX_CONNECTIONS: u32 = 262_143;
/// Longest cluster name, so that derived names (`<name>-<ordinal>`, `<name>-balancer-<i>`)
/// stay valid DNS labels.
pub const MAX_NAME_LEN: usize = 40;

struct Collector(Vec<ValidationError>);

impl Collector {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(ValidationError {
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Validates one cluster.
pub fn validate(cluster: &PgBalancerCluster) -> Result<(), ValidationErrors> {
    let mut c = Collector(Vec::new());
    check_cluster(cluster, &mut c);
    finish(c)
}

/// Validates the clusters of one file, separately and against each other.
pub fn validate_set(clusters: &[PgBalancerCluster]) -> Result<(), ValidationErrors> {
    let mut c = Collector(Vec::new());
    for cluster in clusters {
        let mut own = Collector(Vec::new());
        check_cluster(cluster, &mut own);
        let name = cluster.metadata.name.clone().unwrap_or_default();
        for e in own.0 {
            c.err(format!("{name}: {}", e.field), e.message);
        }
    }
    let mut names = BTreeSet::new();
    let mut containers: BTreeMap<String, String> = BTreeMap::new();
    let mut ports: BTreeMap<u16, String> = BTreeMap::new();
    for cluster in clusters {
        let name = cluster.metadata.name.clone().unwrap_or_default();
        if !names.insert(name.clone()) {
            c.err(
                format!("{name}: metadata.name"),
                "two clusters in the file have this name",
            );
        }
        for (container, field) in explicit_container_names(&cluster.spec) {
            if let Some(other) = containers.insert(container.clone(), name.clone()) {
                if other != name {
                    c.err(
                        format!("{name}: {field}"),
                        format!("container name `{container}` is also used by cluster `{other}`"),
                    );
                }
            }
        }
        for (port, field) in claimed_host_ports(&cluster.spec) {
            if let Some(other) = ports.insert(port, name.clone()) {
                if other != name {
                    c.err(
                        format!("{name}: {field}"),
                        format!("host port {port} is also claimed by cluster `{other}`"),
                    );
                }
            }
        }
    }
    finish(c)
}

fn finish(c: Collector) -> Result<(), ValidationErrors> {
    if c.0.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(c.0))
    }
}

fn check_cluster(cluster: &PgBalancerCluster, c: &mut Collector) {
    let name = cluster.metadata.name.as_deref().unwrap_or("");
    if !is_dns_label(name) || name.len() > MAX_NAME_LEN {
        c.err(
            "metadata.name",
            format!("`{name}` must be 1-{MAX_NAME_LEN} lowercase letters, digits or '-', starting with a letter"),
        );
    }
    let spec = &cluster.spec;
    if spec.replicas < 0 || spec.replicas > MAX_REPLICAS {
        c.err(
            "spec.replicas",
            format!("{} is out of range 0..={MAX_REPLICAS}", spec.replicas),
        );
    }
    check_postgres(&spec.postgres, c);
    if let Some(sync) = &spec.postgres.synchronous {
        let replicas = u32::try_from(spec.replicas).unwrap_or(0);
        if sync.number == 0 {
            c.err(
                "spec.postgres.synchronous.number",
                "must be at least 1 (remove `synchronous` for asynchronous replication)",
            );
        } else if sync.number > replicas {
            c.err(
                "spec.postgres.synchronous.number",
                format!(
                    "{} exceeds spec.replicas ({}): every commit would wait forever",
                    sync.number, spec.replicas
                ),
            );
        }
    }
    check_balancer(spec, c);
    if !(1..=300).contains(&spec.failover.delay_seconds) {
        c.err(
            "spec.failover.delaySeconds",
            format!("{} is out of range 1..=300", spec.failover.delay_seconds),
        );
    }
    if spec.failover.max_lag_bytes < 0 {
        c.err(
            "spec.failover.maxLagBytes",
            format!("{} must not be negative", spec.failover.max_lag_bytes),
        );
    }
    if let Some(local) = &spec.local {
        check_local(spec, local, c);
    }
}

fn check_postgres(pg: &PostgresSpec, c: &mut Collector) {
    if !SUPPORTED_POSTGRES_VERSIONS.contains(&pg.version) {
        c.err(
            "spec.postgres.version",
            format!(
                "{} is not supported; use one of {:?}",
                pg.version, SUPPORTED_POSTGRES_VERSIONS
            ),
        );
    }
    if !is_sql_identifier(&pg.database) {
        c.err(
            "spec.postgres.database",
            format!("`{}` must be a lowercase SQL identifier", pg.database),
        );
    } else if RESERVED_DATABASES.contains(&pg.database.as_str()) {
        c.err(
            "spec.postgres.database",
            format!(
                "`{}` is made by initdb for the cluster itself; name the application's own database",
                pg.database
            ),
        );
    }
    if !is_sql_identifier(&pg.user) {
        c.err(
            "spec.postgres.user",
            format!("`{}` must be a lowercase SQL identifier", pg.user),
        );
    } else if RESERVED_ROLES.contains(&pg.user.as_str()) {
        c.err(
            "spec.postgres.user",
            format!("`{}` is reserved for the cluster's own roles", pg.user),
        );
    }
    if !is_quantity(&pg.storage.size) {
        c.err(
            "spec.postgres.storage.size",
            format!("`{}` is not a quantity such as 1Gi", pg.storage.size),
        );
    }
    for (key, value) in &pg.parameters {
        let field = format!("spec.postgres.parameters.{key}");
        if !key
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '.')
            || key.is_empty()
        {
            c.err(field, "is not a valid parameter name");
        } else if key == "synchronous_standby_names" {
            c.err(
                field,
                "is managed by pgbalancer; use spec.postgres.synchronous",
            );
        } else if MANAGED_PARAMETERS.contains(&key.as_str()) {
            c.err(field, "is managed by pgbalancer and cannot be set");
        } else if value
            .chars()
            .any(|ch| ch == '\n' || ch == '\r' || ch == '\0')
        {
            c.err(field, "value must be a single line");
        }
    }
    if let Some(v) = pg.parameters.get("max_connections") {
        if v.parse::<u32>().map_or(true, |n| n < MIN_MAX_CONNECTIONS) {
            c.err(
                "spec.postgres.parameters.max_connections",
                format!("`{v}` must be a number of at least {MIN_MAX_CONNECTIONS}"),
            );
        }
    }
}

fn check_balancer(spec: &PgBalancerClusterSpec, c: &mut Collector) {
    let b = &spec.balancer;
    if b.instances < 1 || b.instances > MAX_BALANCER_INSTANCES {
        c.err(
            "spec.balancer.instances",
            format!(
                "{} is out of range 1..={MAX_BALANCER_INSTANCES}",
                b.instances
            ),
        );
    }
    if b.num_init_children == 0 || b.num_init_children > 2048 {
        c.err(
            "spec.balancer.numInitChildren",
            format!("{} is out of range 1..=2048", b.num_init_children),
        );
    }
    if b.max_pool == 0 || b.max_pool > 64 {
        c.err(
            "spec.balancer.maxPool",
            format!("{} is out of range 1..=64", b.max_pool),
        );
    }
    if let Some(name) = &b.tls.certificate_secret {
        if !is_dns_subdomain(name) {
            c.err(
                "spec.balancer.tls.certificateSecret",
                format!("{name:?} is not a valid Secret name (lowercase DNS subdomain)"),
            );
        } else if b.tls.mode == TlsMode::Disabled {
            c.err(
                "spec.balancer.tls.certificateSecret",
                "is set while spec.balancer.tls.mode is disabled; set mode to enabled or required",
            );
        }
    }
    let needed = pool_connections(spec);
    match spec.postgres.parameters.get("max_connections") {
        Some(value) => {
            // Not a number, or below the minimum: check_postgres has named the field already.
            let explicit = value
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= MIN_MAX_CONNECTIONS);
            if let Some(max_connections) = explicit {
                let budget = max_connections.saturating_sub(RESERVED_CONNECTIONS);
                if needed > budget {
                    c.err(
                        "spec.postgres.parameters.max_connections",
                        format!(
                            "{max_connections} is too low for the balancers: numInitChildren × maxPool × \
                             instances = {needed} backend connections, plus {RESERVED_CONNECTIONS} reserved; \
                             set at least {}, remove it to let pgbalancer size it, or lower \
                             spec.balancer.numInitChildren, maxPool or instances",
                            needed.saturating_add(RESERVED_CONNECTIONS)
                        ),
                    );
                }
            }
        }
        None => {
            let derived = default_max_connections(spec);
            if derived > POSTGRES_MAX_CONNECTIONS {
                c.err(
                    "spec.balancer.numInitChildren",
                    format!(
                        "numInitChildren × maxPool × instances = {needed} backend connections needs \
                         max_connections {derived}, beyond the {POSTGRES_MAX_CONNECTIONS} PostgreSQL \
                         allows; lower numInitChildren, maxPool or instances"
                    ),
                );
            }
        }
    }
}

/// Backend connections the balancers may open together: `numInitChildren × maxPool × instances`
/// (saturating; `instances` below 1 counts as 1).
pub fn pool_connections(spec: &PgBalancerClusterSpec) -> u32 {
    let b = &spec.balancer;
    let instances = u32::try_from(b.instances.max(1)).unwrap_or(1);
    b.num_init_children
        .saturating_mul(b.max_pool)
        .saturating_mul(instances)
}

/// The `max_connections` pgbalancer renders in `postgresql.conf`, ahead of
/// `spec.postgres.parameters`. Pure: the same spec gives the same value on Docker and Kubernetes,
/// and validation checks the very value that is rendered.
///
/// When the user sets none, it is derived from the pool budget so that the defaults are valid for
/// every allowed `spec.balancer.instances`:
///
/// ```text
/// instances' = instances rounded up to a power of two (1, 2, 4, 8)
/// value      = max(200, smallest multiple of 100 ≥ numInitChildren × maxPool × instances' + 20)
/// ```
///
/// With the default pool (32 × 4) that is 200 for one balancer, 300 for two, 600 for three or four
/// and 1100 for five to eight. `postgresql.conf` feeds the instances' config hash, so a change of
/// this value replaces (restarts) the PostgreSQL instances; the value therefore moves in coarse
/// steps rather than with every balancer added: rounding to 100 absorbs small pool changes, and
/// rounding the balancer count to a power of two lets 3 ↔ 4 and 5 ↔ 8 balancers share a value.
/// The floor of 200 is the value every cluster rendered before the default was derived, so a
/// cluster with one balancer and the default pool keeps its file byte for byte. One and two
/// balancers cannot share a value without raising that floor, which would restart every such
/// cluster's instances once on upgrade; they differ (200, 300).
///
/// When `spec.postgres.parameters` sets `max_connections`, the user's line (rendered after this
/// one) is what PostgreSQL uses; this one then stays at [`DEFAULT_MAX_CONNECTIONS`] as it always
/// was, so that the file depends on the user's value alone, not on the balancers.
pub fn default_max_connections(spec: &PgBalancerClusterSpec) -> u32 {
    if spec.postgres.parameters.contains_key("max_connections") {
        return DEFAULT_MAX_CONNECTIONS;
    }
    let b = &spec.balancer;
    let instances = u32::try_from(b.instances.clamp(1, MAX_BALANCER_INSTANCES))
        .unwrap_or(1)
        .next_power_of_two();
    let wanted = b
        .num_init_children
        .saturating_mul(b.max_pool)
        .saturating_mul(instances)
        .saturating_add(MAX_CONNECTIONS_HEADROOM);
    wanted
        .div_ceil(MAX_CONNECTIONS_STEP)
        .saturating_mul(MAX_CONNECTIONS_STEP)
        .max(DEFAULT_MAX_CONNECTIONS)
}

fn check_local(spec: &PgBalancerClusterSpec, local: &LocalSpec, c: &mut Collector) {
    if let Some(addr) = &local.bind_address {
        if addr.parse::<IpAddr>().is_err() {
            c.err(
                "spec.local.bindAddress",
                format!("`{addr}` is not an IP address"),
            );
        }
    }
    if let Some(net) = &local.network.name {
        if !is_docker_name(net) {
            c.err(
                "spec.local.network.name",
                format!("`{net}` is not a valid Docker network name"),
            );
        }
    }
    let subnet = match &local.network.subnet {
        Some(s) => match s.parse::<Ipv4Net>() {
            Ok(n) => Some(n),
            Err(_) => {
                c.err(
                    "spec.local.network.subnet",
                    format!("`{s}` is not an IPv4 CIDR such as 172.30.0.0/16"),
                );
                None
            }
        },
        None => None,
    };
    let mut ips: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut check_endpoint = |field: String,
                              name: &Option<String>,
                              host: &Option<String>,
                              ip: &Option<String>,
                              c: &mut Collector| {
        if let Some(n) = name {
            if !is_docker_name(n) {
                c.err(
                    format!("{field}.containerName"),
                    format!("`{n}` is not a valid container name"),
                );
            }
        }
        if let Some(h) = host {
            if !h.split('.').all(is_hostname_label) {
                c.err(
                    format!("{field}.hostname"),
                    format!("`{h}` is not a valid hostname"),
                );
            }
        }
        if let Some(ip) = ip {
            let ip_field = format!("{field}.ip");
            match ip.parse::<Ipv4Addr>() {
                Err(_) => c.err(ip_field, format!("`{ip}` is not an IPv4 address")),
                Ok(addr) => {
                    match subnet {
                        None if local.network.subnet.is_none() => c.err(
                            ip_field.clone(),
                            "static IPs need spec.local.network.subnet",
                        ),
                        Some(net)
                            if !net.contains(&addr)
                                || addr == net.network()
                                || addr == net.broadcast() =>
                        {
                            c.err(
                                ip_field.clone(),
                                format!("{addr} is not a host address of subnet {net}"),
                            )
                        }
                        Some(net) if addr == gateway(net) => c.err(
                            ip_field.clone(),
                            format!("{addr} is the gateway of {net}, which Docker reserves"),
                        ),
                        _ => {}
                    }
                    if let Some(other) = ips.insert(addr, ip_field.clone()) {
                        c.err(ip_field, format!("{addr} is also given to {other}"));
                    }
                }
            }
        }
    };
    let mut ordinals = BTreeSet::new();
    for (i, inst) in local.instances.iter().enumerate() {
        let field = format!("spec.local.instances[{i}]");
        if !ordinals.insert(inst.ordinal) {
            c.err(
                format!("{field}.ordinal"),
                format!("ordinal {} appears twice", inst.ordinal),
            );
        }
        check_endpoint(field, &inst.container_name, &inst.hostname, &inst.ip, c);
    }
    if let Some(b) = &local.balancer {
        check_endpoint(
            "spec.local.balancer".into(),
            &b.container_name,
            &b.hostname,
            &b.ip,
            c,
        );
    }
    let mut seen: BTreeMap<u16, String> = BTreeMap::new();
    for (port, field) in claimed_host_ports(spec) {
        if port == 0 {
            c.err(
                field,
                "port 0 is not a host port; leave it out to let Docker choose",
            );
        } else if let Some(other) = seen.insert(port, field.clone()) {
            c.err(field, format!("host port {port} is also used by {other}"));
        }
    }
    if let Some(base) = local.ports.postgres {
        if u32::from(base) + u32::try_from(spec.replicas.max(0)).unwrap_or(0) > 65535 {
            c.err(
                "spec.local.ports.postgres",
                format!("{base} + replicas goes past port 65535"),
            );
        }
    }
}

/// The gateway Docker gives a subnet: its first host address.
pub fn gateway(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + 1)
}

impl LocalSpec {
    /// Host port of PostgreSQL instance `ordinal`: its explicit port, else `ports.postgres + ordinal`.
    pub fn instance_port(&self, ordinal: u32) -> Option<u16> {
        let explicit = self
            .instances
            .iter()
            .find(|i| i.ordinal == ordinal)
            .and_then(|i| i.port);
        explicit.or_else(|| {
            self.ports
                .postgres
                .and_then(|p| u16::try_from(u32::from(p) + ordinal).ok())
        })
    }

    /// The explicit entry for instance `ordinal`, if any.
    pub fn instance(&self, ordinal: u32) -> Option<&LocalInstance> {
        self.instances.iter().find(|i| i.ordinal == ordinal)
    }
}

/// Offsets a base port by `index`, for balancer instances.
pub fn offset_port(base: Option<u16>, index: u32) -> Option<u16> {
    base.and_then(|p| u16::try_from(u32::from(p) + index).ok())
}

/// Every fixed host port a cluster publishes, with the field that asks for it.
pub fn claimed_host_ports(spec: &PgBalancerClusterSpec) -> Vec<(u16, String)> {
    let Some(local) = &spec.local else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ordinal in 0..=u32::try_from(spec.replicas.max(0)).unwrap_or(0) {
        if let Some(p) = local.instance_port(ordinal) {
            let field = match local
                .instances
                .iter()
                .position(|i| i.ordinal == ordinal && i.port.is_some())
            {
                Some(i) => format!("spec.local.instances[{i}].port"),
                None => format!("spec.local.ports.postgres (instance {ordinal})"),
            };
            out.push((p, field));
        }
    }
    for i in 0..u32::try_from(spec.balancer.instances.max(1)).unwrap_or(1) {
        for (base, name) in [
            (local.ports.balancer, "balancer"),
            (local.ports.pcp, "pcp"),
            (local.ports.rest, "rest"),
        ] {
            if let Some(p) = offset_port(base, i) {
                out.push((p, format!("spec.local.ports.{name} (balancer {i})")));
            }
        }
    }
    out
}

/// Every explicit container name of a cluster, with its field.
pub fn explicit_container_names(spec: &PgBalancerClusterSpec) -> Vec<(String, String)> {
    let Some(local) = &spec.local else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = local
        .instances
        .iter()
        .enumerate()
        .filter_map(|(i, inst)| {
            inst.container_name
                .clone()
                .map(|n| (n, format!("spec.local.instances[{i}].containerName")))
        })
        .collect();
    if let Some(n) = local
        .balancer
        .as_ref()
        .and_then(|b| b.container_name.clone())
    {
        out.push((n, "spec.local.balancer.containerName".into()));
    }
    out
}

/// A Kubernetes object name: dot-separated DNS labels, at most 253 characters.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label_or_digit_start)
}

fn is_dns_label_or_digit_start(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_hostname_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn is_docker_name(s: &str) -> bool {
    s.len() >= 2
        && s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn is_sql_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn is_quantity(s: &str) -> bool {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    !number.is_empty()
        && number.parse::<f64>().is_ok()
        && ["", "Ki", "Mi", "Gi", "Ti", "Pi", "k", "M", "G", "T", "P"].contains(&suffix)
}

#[cfg(test)]
mod tests;

/// Checks a change of an existing cluster: what bootstrap fixed in the data cannot change.
pub fn validate_update(
    old: &PgBalancerClusterSpec,
    new: &PgBalancerClusterSpec,
) -> Result<(), ValidationErrors> {
    let mut c = Collector(Vec::new());
    if old.postgres.version != new.postgres.version {
        c.err(
            "spec.postgres.version",
            format!(
                "cannot change from {} to {} on existing data (major upgrades are not supported); \
                 remove the cluster first or keep {}",
                old.postgres.version, new.postgres.version, old.postgres.version
            ),
        );
    }
    for (field, before, after) in [
        (
            "spec.postgres.database",
            &old.postgres.database,
            &new.postgres.database,
        ),
        ("spec.postgres.user", &old.postgres.user, &new.postgres.user),
    ] {
        if before != after {
            c.err(
                field,
                format!("is fixed at bootstrap (`{before}`); cannot change to `{after}`"),
            );
        }
    }
    let network = |s: &PgBalancerClusterSpec| {
        s.local
            .as_ref()
            .map(|l| l.network.clone())
            .unwrap_or_default()
    };
    if network(old) != network(new) {
        c.err(
            "spec.local.network",
            "cannot change while the cluster exists; run `pgbalancer down` first",
        );
    }
    finish(c)
}

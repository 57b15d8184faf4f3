//! `PgBalancerClusterSpec`: the desired state of one cluster, with its defaults.
//!
//! Every field is documented (the comments become the CRD's descriptions) and defaults are
//! explicit so that a minimal manifest (`spec: {}`) is a working one-primary cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::PgBalancerClusterStatus;

/// PostgreSQL major versions the project builds images for (Debian bookworm: 15, trixie: 17).
pub const SUPPORTED_POSTGRES_VERSIONS: [u32; 2] = [15, 17];
/// The version used when `spec.postgres.version` is absent.
pub const DEFAULT_POSTGRES_VERSION: u32 = 17;
/// Upper bound for `spec.replicas`: more streaming replicas than this is a typo, not a plan.
pub const MAX_REPLICAS: i32 = 32;
/// Upper bound for `spec.balancer.instances`.
pub const MAX_BALANCER_INSTANCES: i32 = 8;

/// A PostgreSQL cluster (one primary, N streaming replicas) behind pgBalancer load balancers.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pgbalancer.io",
    version = "v1alpha1",
    kind = "PgBalancerCluster",
    namespaced,
    shortname = "pgbc",
    status = "PgBalancerClusterStatus",
    derive = "PartialEq",
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Primary","type":"string","jsonPath":".status.currentPrimary"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PgBalancerClusterSpec {
    /// Number of streaming replicas, the primary not counted. Scaled by `kubectl scale` and
    /// `pgbalancer scale`.
    #[serde(default = "default_replicas")]
    pub replicas: i32,
    /// The PostgreSQL instances.
    #[serde(default)]
    pub postgres: PostgresSpec,
    /// The pgBalancer (pgpool-II) load balancers in front of the instances.
    #[serde(default)]
    pub balancer: BalancerSpec,
    /// Credentials. Generated (random, never overwritten) when no secret is named.
    #[serde(default)]
    pub auth: AuthSpec,
    /// Automated failover when the primary is lost.
    #[serde(default)]
    pub failover: FailoverSpec,
    /// Settings read only by the local Docker backend: network, host ports, explicit names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalSpec>,
}

fn default_replicas() -> i32 {
    2
}

/// Automated failover: when the primary does not answer for `delaySeconds`, it is fenced and
/// the replica with the most WAL received is promoted; the balancers follow without a restart.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailoverSpec {
    /// Fail over automatically. When off, a lost primary leaves the cluster `Failed` until it
    /// returns or a switchover is requested.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds the primary must be unreachable before failover starts (1 to 300).
    #[serde(default = "default_failover_delay")]
    pub delay_seconds: u32,
    /// A replica that had received this many bytes less WAL than the primary had written when
    /// it was last seen is not a candidate (asynchronous replication loses at most this much).
    #[serde(default = "default_max_lag")]
    pub max_lag_bytes: i64,
}

fn default_failover_delay() -> u32 {
    2
}
fn default_max_lag() -> i64 {
    16 * 1024 * 1024
}

impl Default for FailoverSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            delay_seconds: default_failover_delay(),
            max_lag_bytes: default_max_lag(),
        }
    }
}

/// The PostgreSQL instances of the cluster.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresSpec {
    /// PostgreSQL major version: 15 or 17. The default image follows it.
    #[serde(default = "default_version")]
    pub version: u32,
    /// Image override. Defaults to the project's image for `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Storage of each instance.
    #[serde(default)]
    pub storage: StorageSpec,
    /// Extra `postgresql.conf` parameters. Parameters the operator manages (ports, paths,
    /// replication settings) are refused. `max_connections`, when absent, is sized for the
    /// balancers' pool (numInitChildren × maxPool × instances, plus headroom, at least 200);
    /// when set, it must exceed that pool by at least 10.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// Compute resources of each instance (Kubernetes); on Docker the limits become
    /// the container's memory and CPU limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Database created at bootstrap, owned by `user`.
    #[serde(default = "default_database")]
    pub database: String,
    /// Application role created at bootstrap, owner of `database`.
    #[serde(default = "default_user")]
    pub user: String,
    /// Synchronous replication: a commit returns only once `number` replicas (any of them, a
    /// quorum) have flushed it, and failover promotes only a replica known to hold every
    /// acknowledged commit. Absent: asynchronous replication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synchronous: Option<SynchronousSpec>,
}

/// Quorum-based synchronous replication (`synchronous_standby_names = 'ANY number (...)'`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SynchronousSpec {
    /// Replicas that must confirm each commit, 1 to `replicas`. Commits wait while fewer are
    /// streaming, so keep `replicas` above `number` to stay writable when a replica is lost.
    #[serde(default = "default_sync_number")]
    pub number: u32,
}

fn default_sync_number() -> u32 {
    1
}

fn default_version() -> u32 {
    DEFAULT_POSTGRES_VERSION
}
fn default_database() -> String {
    "app".into()
}
fn default_user() -> String {
    "app".into()
}

impl Default for PostgresSpec {
    fn default() -> Self {
        Self {
            version: default_version(),
            image: None,
            storage: StorageSpec::default(),
            parameters: BTreeMap::new(),
            resources: None,
            database: default_database(),
            user: default_user(),
            synchronous: None,
        }
    }
}

/// Storage of one instance.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageSpec {
    /// Size of each instance's volume (Kubernetes PVC request; Docker volumes are unsized).
    #[serde(default = "default_storage_size")]
    pub size: String,
    /// StorageClass of the PVCs (Kubernetes). The cluster default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Give the volume to the PostgreSQL user with a short root init container (Kubernetes),
    /// for provisioners that ignore `fsGroup` (hostPath, local-path). Off by default: the
    /// server itself always runs unprivileged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fix_permissions: bool,
}

fn default_storage_size() -> String {
    "1Gi".into()
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
            fix_permissions: false,
        }
    }
}

/// The load balancers.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BalancerSpec {
    /// Number of balancer pods (Kubernetes) or containers (Docker).
    #[serde(default = "default_balancer_instances")]
    pub instances: i32,
    /// Image override. Defaults to the project's balancer image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// pgpool `num_init_children`: the most concurrent client sessions per balancer.
    #[serde(default = "default_num_init_children")]
    pub num_init_children: u32,
    /// pgpool `max_pool`: cached backend connections per client process.
    #[serde(default = "default_max_pool")]
    pub max_pool: u32,
    /// Send read-only queries to the replicas (pgpool `load_balance_mode`).
    #[serde(default = "default_true")]
    pub load_balance_mode: bool,
    /// The engine behind the balancer's port: `pgpool` (pgpool-II) or `native` (the built-in
    /// read/write-splitting proxy). The REST API, `bctl` and metrics are the same for both.
    #[serde(default)]
    pub engine: BalancerEngine,
    /// Native engine: which reads a replica may serve. `session` (default): a session reads
    /// its own writes; `strict`: a read sees every write acknowledged through this balancer
    /// before it began; `eventual`: any replica within the lag bound.
    #[serde(default)]
    pub consistency: ReadConsistency,
    /// Native engine: where statements calling functions it does not know run. `primary`
    /// (default: they may write) or `replica` (the application's functions do not write).
    #[serde(default)]
    pub unknown_functions: UnknownFunctions,
    /// Native engine: where read-only transactions (`BEGIN READ ONLY`, `START TRANSACTION READ
    /// ONLY`) run. `primary` (default) or `replica`: a replica chosen as for a read may hold
    /// them; a statement in one that a replica cannot run as the primary would (a write,
    /// session state, an unknown function) fails with `25006`.
    #[serde(default, skip_serializing_if = "ReadOnlyTransactions::is_default")]
    pub read_only_transactions: ReadOnlyTransactions,
    /// TLS between clients and the balancer (either engine).
    #[serde(default, skip_serializing_if = "BalancerTls::is_default")]
    pub tls: BalancerTls,
}

/// TLS between clients and the balancer.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BalancerTls {
    /// `disabled` (default): clients asking for TLS are told no and go on in plain text (or
    /// give up, as `sslmode=require` does); `enabled`: clients may use TLS; `required`:
    /// clients must (the balancer's own checks over loopback excepted).
    #[serde(default)]
    pub mode: TlsMode,
    /// Kubernetes: an existing Secret of type `kubernetes.io/tls` (`tls.crt`, `tls.key`, for
    /// example from cert-manager) the balancers present. When absent, a CA and a certificate
    /// for the balancer's names are generated once (`<cluster>-balancer-tls`, with the CA in
    /// `ca.crt`; on Docker in the cluster's state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_secret: Option<String>,
}

/// Whether clients use TLS to the balancer.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS.
    #[default]
    Disabled,
    /// TLS for the clients that ask for it.
    Enabled,
    /// TLS for every client.
    Required,
}

impl BalancerTls {
    /// TLS off and nothing else set (left out when written, so files of clusters without TLS
    /// read as before).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl TlsMode {
    /// The name the agent takes (`PGBALANCER_TLS`).
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disabled => "disabled",
            TlsMode::Enabled => "enabled",
            TlsMode::Required => "required",
        }
    }
}

/// The balancer's engine.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BalancerEngine {
    /// pgpool-II, supervised by the balancer's agent.
    #[default]
    Pgpool,
    /// The built-in engine.
    Native,
}

/// Which reads a replica may serve (native engine).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadConsistency {
    /// Any replica within the lag bound.
    Eventual,
    /// A session reads its own writes.
    #[default]
    Session,
    /// A read sees every write acknowledged through the balancer before it began.
    Strict,
}

/// Where statements calling unknown functions run (native engine).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFunctions {
    /// On the primary: the function may write.
    #[default]
    Primary,
    /// On a replica too: the application's functions do not write.
    Replica,
}

/// Where read-only transactions run (native engine).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadOnlyTransactions {
    /// On the primary, as every transaction.
    #[default]
    Primary,
    /// On a replica that may serve the session's reads.
    Replica,
}

impl ReadOnlyTransactions {
    /// Whether it is the default (not written into stored specs).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl BalancerEngine {
    /// The name the agent takes (`PGBALANCER_ENGINE`).
    pub fn as_str(self) -> &'static str {
        match self {
            BalancerEngine::Pgpool => "pgpool",
            BalancerEngine::Native => "native",
        }
    }
}

impl ReadConsistency {
    /// The name the agent takes (`PGBALANCER_CONSISTENCY`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReadConsistency::Eventual => "eventual",
            ReadConsistency::Session => "session",
            ReadConsistency::Strict => "strict",
        }
    }
}

fn default_balancer_instances() -> i32 {
    1
}
fn default_num_init_children() -> u32 {
    32
}
fn default_max_pool() -> u32 {
    4
}
fn default_true() -> bool {
    true
}

impl Default for BalancerSpec {
    fn default() -> Self {
        Self {
            instances: default_balancer_instances(),
            image: None,
            num_init_children: default_num_init_children(),
            max_pool: default_max_pool(),
            load_balance_mode: true,
            engine: BalancerEngine::default(),
            consistency: ReadConsistency::default(),
            unknown_functions: UnknownFunctions::default(),
            read_only_transactions: ReadOnlyTransactions::default(),
            tls: BalancerTls::default(),
        }
    }
}

/// Where the cluster's credentials come from.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthSpec {
    /// Name of an existing Secret (Kubernetes) holding `superuser-password`,
    /// `replication-password`, `app-password`, `monitor-password` and `pcp-password`.
    /// When absent, a Secret `<cluster>-credentials` is generated once and never overwritten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

/// Settings of the local Docker backend. Ignored on Kubernetes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalSpec {
    /// The Docker network the containers join.
    #[serde(default)]
    pub network: LocalNetwork,
    /// Host ports. An absent port is a free one chosen when the container is created, kept
    /// across restarts of the container and of the engine, and shown by `pgbalancer status`.
    #[serde(default)]
    pub ports: LocalPorts,
    /// Host address the ports are published on. Loopback unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_address: Option<String>,
    /// Explicit container names, hostnames, IPs and ports per PostgreSQL instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<LocalInstance>,
    /// Explicit container name, hostname and IP of the (first) balancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer: Option<LocalEndpoint>,
}

/// The Docker network of a cluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalNetwork {
    /// Network name. Defaults to `pgbalancer-<cluster>`. Several clusters may share one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Subnet in CIDR form, required when static IPs are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
}

/// Host ports of a cluster on Docker.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalPorts {
    /// SQL port of the balancer (balancer `i` gets `balancer + i`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer: Option<u16>,
    /// PCP port of the balancer (balancer `i` gets `pcp + i`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcp: Option<u16>,
    /// REST port of the balancer's management API (balancer `i` gets `rest + i`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rest: Option<u16>,
    /// Port of instance 0; instance `k` gets `postgres + k`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<u16>,
}

/// Explicit Docker identity of one PostgreSQL instance (the seed JSON's per-node entries).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalInstance {
    /// Instance ordinal this entry applies to (0 is the first primary).
    pub ordinal: u32,
    /// Container name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// Hostname, also registered as a network alias so other containers resolve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Static IPv4 address inside `network.subnet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Host port of this instance, instead of `ports.postgres + ordinal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Explicit container name, hostname (a network alias) and static IP.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalEndpoint {
    /// Container name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// Hostname, also registered as a network alias so other containers resolve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Static IPv4 address inside `network.subnet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

//! The plan: everything a backend needs to know about a cluster, derived purely from the
//! spec and the current primary. No IO, no clock, no environment.
//!
//! Instances are `<cluster>-<ordinal>`; ordinal 0 is the first primary and the balancer slot
//! of an instance is its ordinal. Roles come from `primary`, never from names.

mod images;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::ResourceRequirements;
use pgbalancer_crd::validate::{default_max_connections, offset_port};
use pgbalancer_crd::PgBalancerCluster;

pub use images::{
    default_balancer_image, default_postgres_image, BALANCER_IMAGE_REPO, POSTGRES_IMAGE_REPO,
};

/// Container/pod port of PostgreSQL.
pub const POSTGRES_PORT: u16 = 5432;
/// Container/pod port of the balancer's SQL endpoint.
pub const BALANCER_PORT: u16 = 9999;
/// Container/pod port of PCP.
pub const PCP_PORT: u16 = 9898;
/// Container/pod port of the balancer agent's REST API.
pub const REST_PORT: u16 = 8080;
/// PCP user of the balancer.
pub const PCP_USER: &str = "pgbalancer";
/// Role used by the balancer's health and replication checks.
pub const MONITOR_USER: &str = "pgbalancer_monitor";
/// Role used by streaming replication.
pub const REPLICATION_USER: &str = "replicator";
/// Superuser.
pub const SUPERUSER: &str = "postgres";

/// Prefix of the physical replication slot an instance streams through.
const SLOT_PREFIX: &str = "instance_";

/// The physical replication slot instance `ordinal` streams through, on whichever is primary.
pub fn slot_name(ordinal: u32) -> String {
    format!("{SLOT_PREFIX}{ordinal}")
}

/// A slot named like an instance's (`instance_<ordinal>`): ours to create and drop.
pub fn is_instance_slot(name: &str) -> bool {
    name.strip_prefix(SLOT_PREFIX)
        .is_some_and(|o| o.parse::<u32>().is_ok())
}

/// Name of instance `ordinal` of `cluster`: its identity, `application_name` and default
/// container, pod and host name.
pub fn instance_name(cluster: &str, ordinal: u32) -> String {
    format!("{cluster}-{ordinal}")
}

/// Name of the balancer Service and Deployment (Kubernetes) and of the first balancer
/// container (Docker).
pub fn balancer_name(cluster: &str) -> String {
    format!("{cluster}-balancer")
}

/// The name that always reaches the current primary: the Docker network alias the primary
/// holds, and the Kubernetes Service that selects the pod labelled primary.
pub fn rw_host(cluster: &str) -> String {
    format!("{cluster}-rw")
}

/// Name of the headless Service that gives each instance pod a DNS name (Kubernetes).
pub fn headless_service(cluster: &str) -> String {
    format!("{cluster}-hl")
}

/// Name of the one pod of StatefulSet `statefulset` (Kubernetes): it runs a single replica,
/// ordinal 0.
pub fn pod_name(statefulset: &str) -> String {
    format!("{statefulset}-0")
}

/// Name of the data volume of instance `ordinal` of `cluster` (Docker).
pub fn volume_name(cluster: &str, ordinal: u32) -> String {
    format!("pgbalancer-{cluster}-{ordinal}-data")
}

/// Role of an instance in the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Accepts writes; replicas stream from it.
    Primary,
    /// Streams from the primary, serves reads.
    Replica,
}

impl Role {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// The typed bundle every backend applies.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Cluster name.
    pub cluster: String,
    /// PostgreSQL settings shared by all instances.
    pub postgres: PostgresPlan,
    /// Instances, ordered by ordinal; exactly one is primary.
    pub instances: Vec<InstancePlan>,
    /// Balancer settings and instances.
    pub balancer: BalancerPlan,
    /// Docker-only settings.
    pub local: LocalPlan,
    /// The cluster has had a primary (the record names a current one): its database exists,
    /// so an instance given the primary role with an empty data directory must not make a
    /// new, empty one (its entrypoint refuses; a replica holding the data takes over).
    /// Runtime state, part of no object's hash.
    pub initialised: bool,
}

/// PostgreSQL settings shared by all instances.
#[derive(Clone, Debug, PartialEq)]
pub struct PostgresPlan {
    /// Major version.
    pub version: u32,
    /// Image.
    pub image: String,
    /// Database created at bootstrap.
    pub database: String,
    /// Owner of `database`.
    pub user: String,
    /// `max_connections` of the managed parameters, from
    /// [`default_max_connections`]: sized for the balancers' pool unless `parameters` sets it.
    pub max_connections: u32,
    /// User parameters, rendered after the managed ones.
    pub parameters: BTreeMap<String, String>,
    /// Resources (Kubernetes; limits also on Docker).
    pub resources: Option<ResourceRequirements>,
    /// PVC size.
    pub storage_size: String,
    /// PVC storage class.
    pub storage_class: Option<String>,
    /// Chown the data volume in a root init container (Kubernetes).
    pub fix_permissions: bool,
    /// Replicas that must confirm each commit (`spec.postgres.synchronous.number`); `None`
    /// for asynchronous replication.
    pub synchronous: Option<u32>,
}

/// One PostgreSQL instance.
#[derive(Clone, Debug, PartialEq)]
pub struct InstancePlan {
    /// Ordinal, also the balancer slot.
    pub ordinal: u32,
    /// `<cluster>-<ordinal>`: the instance's identity and `application_name`.
    pub name: String,
    /// Desired role.
    pub role: Role,
    /// Physical replication slot this instance streams through.
    pub slot: String,
    /// Hostname other containers use to reach it (Docker network alias).
    pub host: String,
    /// Docker container name.
    pub container: String,
    /// Docker volume name.
    pub volume: String,
    /// Static IP on the Docker network.
    pub ip: Option<Ipv4Addr>,
    /// Host port on Docker; `None` lets Docker choose.
    pub host_port: Option<u16>,
}

/// The balancers.
#[derive(Clone, Debug, PartialEq)]
pub struct BalancerPlan {
    /// Image.
    pub image: String,
    /// pgpool `num_init_children`.
    pub num_init_children: u32,
    /// pgpool `max_pool`.
    pub max_pool: u32,
    /// pgpool `load_balance_mode`.
    pub load_balance_mode: bool,
    /// Engine, read consistency, unknown functions and TLS mode, as the agent's environment.
    pub engine_env: Vec<(String, String)>,
    /// TLS between clients and the balancer.
    pub tls: pgbalancer_crd::TlsMode,
    /// Kubernetes: the user's `kubernetes.io/tls` Secret, instead of a generated certificate.
    pub certificate_secret: Option<String>,
    /// Kubernetes: a digest of the certificate the balancers present, as the reconcile read
    /// it (pgpool reads the certificate only when it starts: a renewed one rolls its pods).
    pub certificate_digest: Option<String>,
    /// Balancer containers (Docker) / replicas of the Deployment (Kubernetes).
    pub instances: Vec<BalancerInstancePlan>,
}

/// One balancer container.
#[derive(Clone, Debug, PartialEq)]
pub struct BalancerInstancePlan {
    /// Index, 0-based.
    pub index: u32,
    /// Container name.
    pub container: String,
    /// Hostname / network alias.
    pub host: String,
    /// Static IP.
    pub ip: Option<Ipv4Addr>,
    /// Host port of the SQL endpoint.
    pub sql_port: Option<u16>,
    /// Host port of PCP.
    pub pcp_port: Option<u16>,
    /// Host port of the REST API.
    pub rest_port: Option<u16>,
}

/// Docker network and publishing.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalPlan {
    /// Network name.
    pub network: String,
    /// Subnet, when fixed.
    pub subnet: Option<String>,
    /// Address ports are published on.
    pub bind_address: String,
}

impl Plan {
    /// Plans `cluster` with instance `primary` as the primary. The cluster must be valid.
    ///
    /// Scaling keeps the primary: the instance set is the primary plus the lowest other
    /// ordinals, so removing replicas never removes the primary whatever its ordinal.
    pub fn new(cluster: &PgBalancerCluster, primary: u32) -> Plan {
        let name = cluster.metadata.name.clone().unwrap_or_default();
        let spec = &cluster.spec;
        let local = spec.local.clone().unwrap_or_default();
        let replicas = u32::try_from(spec.replicas.max(0)).unwrap_or(0);
        let mut ordinals = vec![primary];
        ordinals.extend((0..).filter(|o| *o != primary).take(replicas as usize));
        ordinals.sort_unstable();
        let instances = ordinals
            .into_iter()
            .map(|ordinal| {
                let explicit = local.instance(ordinal);
                let inst_name = instance_name(&name, ordinal);
                InstancePlan {
                    ordinal,
                    role: if ordinal == primary {
                        Role::Primary
                    } else {
                        Role::Replica
                    },
                    slot: slot_name(ordinal),
                    host: explicit
                        .and_then(|e| e.hostname.clone())
                        .unwrap_or_else(|| inst_name.clone()),
                    container: explicit
                        .and_then(|e| e.container_name.clone())
                        .unwrap_or_else(|| inst_name.clone()),
                    volume: volume_name(&name, ordinal),
                    ip: explicit
                        .and_then(|e| e.ip.as_deref())
                        .and_then(|ip| ip.parse().ok()),
                    host_port: local.instance_port(ordinal),
                    name: inst_name,
                }
            })
            .collect();
        let balancers = (0..u32::try_from(spec.balancer.instances.max(1)).unwrap_or(1))
            .map(|index| {
                let default_name = if index == 0 {
                    balancer_name(&name)
                } else {
                    format!("{}-{index}", balancer_name(&name))
                };
                let explicit = local.balancer.as_ref().filter(|_| index == 0);
                BalancerInstancePlan {
                    index,
                    container: explicit
                        .and_then(|e| e.container_name.clone())
                        .unwrap_or_else(|| default_name.clone()),
                    host: explicit
                        .and_then(|e| e.hostname.clone())
                        .unwrap_or(default_name),
                    ip: explicit
                        .and_then(|e| e.ip.as_deref())
                        .and_then(|ip| ip.parse().ok()),
                    sql_port: offset_port(local.ports.balancer, index),
                    pcp_port: offset_port(local.ports.pcp, index),
                    rest_port: offset_port(local.ports.rest, index),
                }
            })
            .collect();
        Plan {
            postgres: PostgresPlan {
                version: spec.postgres.version,
                image: spec
                    .postgres
                    .image
                    .clone()
                    .unwrap_or_else(|| default_postgres_image(spec.postgres.version)),
                database: spec.postgres.database.clone(),
                user: spec.postgres.user.clone(),
                max_connections: default_max_connections(spec),
                parameters: spec.postgres.parameters.clone(),
                resources: spec.postgres.resources.clone(),
                storage_size: spec.postgres.storage.size.clone(),
                storage_class: spec.postgres.storage.storage_class_name.clone(),
                fix_permissions: spec.postgres.storage.fix_permissions,
                synchronous: spec.postgres.synchronous.as_ref().map(|s| s.number),
            },
            instances,
            balancer: BalancerPlan {
                image: spec
                    .balancer
                    .image
                    .clone()
                    .unwrap_or_else(default_balancer_image),
                num_init_children: spec.balancer.num_init_children,
                max_pool: spec.balancer.max_pool,
                load_balance_mode: spec.balancer.load_balance_mode,
                engine_env: engine_env(&spec.balancer),
                tls: spec.balancer.tls.mode,
                certificate_secret: spec.balancer.tls.certificate_secret.clone(),
                certificate_digest: None,
                instances: balancers,
            },
            local: LocalPlan {
                network: local
                    .network
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("pgbalancer-{name}")),
                subnet: local.network.subnet.clone(),
                bind_address: local
                    .bind_address
                    .clone()
                    .unwrap_or_else(|| "127.0.0.1".into()),
            },
            cluster: name,
            initialised: false,
        }
    }

    /// Plans `cluster` for Kubernetes: `spec.local` is ignored and every instance is reached
    /// through its pod's stable DNS name under the headless Service,
    /// `<cluster>-<ordinal>-0.<cluster>-hl` (the namespace comes from the resolver's search path).
    pub fn kubernetes(cluster: &PgBalancerCluster, primary: u32) -> Plan {
        let mut without_local = cluster.clone();
        without_local.spec.local = None;
        let mut plan = Plan::new(&without_local, primary);
        for inst in &mut plan.instances {
            inst.host = format!(
                "{}.{}",
                pod_name(&inst.name),
                headless_service(&plan.cluster)
            );
        }
        plan
    }

    /// The current primary.
    pub fn primary(&self) -> &InstancePlan {
        self.instances
            .iter()
            .find(|i| i.role == Role::Primary)
            .unwrap_or(&self.instances[0])
    }

    /// The slots instance `ordinal` should hold: one per other planned instance when it is
    /// the planned primary and `writable` (it answered as a primary), none otherwise.
    pub fn slots_on(&self, ordinal: u32, writable: bool) -> Vec<&str> {
        if !writable || self.primary().ordinal != ordinal {
            return Vec::new();
        }
        self.instances
            .iter()
            .filter(|i| i.ordinal != ordinal)
            .map(|i| i.slot.as_str())
            .collect()
    }

    /// The instance with `ordinal`, if planned.
    pub fn instance(&self, ordinal: u32) -> Option<&InstancePlan> {
        self.instances.iter().find(|i| i.ordinal == ordinal)
    }

    /// Address a host process uses to reach published ports.
    pub fn connect_address(&self) -> &str {
        match self.local.bind_address.as_str() {
            "0.0.0.0" | "::" => "127.0.0.1",
            other => other,
        }
    }
}

/// The agent's environment for the engine settings of `spec`.
fn engine_env(spec: &pgbalancer_crd::BalancerSpec) -> Vec<(String, String)> {
    let mut env = vec![
        ("PGBALANCER_ENGINE".into(), spec.engine.as_str().into()),
        (
            "PGBALANCER_CONSISTENCY".into(),
            spec.consistency.as_str().into(),
        ),
        (
            "PGBALANCER_READ_ONLY_FUNCTIONS".into(),
            (spec.unknown_functions == pgbalancer_crd::UnknownFunctions::Replica).to_string(),
        ),
    ];
    // Only when on (the agent's default is off): balancers without it keep their settings.
    if spec.read_only_transactions == pgbalancer_crd::ReadOnlyTransactions::Replica {
        env.push((
            "PGBALANCER_READ_ONLY_TRANSACTIONS_ON_REPLICAS".into(),
            "true".into(),
        ));
    }
    // Only with TLS (the agent's default is off): balancers without it keep their settings,
    // and no pod rolls for it.
    if spec.tls.mode != pgbalancer_crd::TlsMode::Disabled {
        env.push(("PGBALANCER_TLS".into(), spec.tls.mode.as_str().into()));
    }
    env
}

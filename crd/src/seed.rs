//! The origin tool's JSON configuration (`pgbalancer_cluster.json`) and its mapping to clusters.
//!
//! Each `balancers[]` entry becomes one `PgBalancerCluster` named after the balancer, on the
//! shared network, keeping the JSON's container names, hostnames, static IPs and host ports.
//! Unknown keys are kept so that rewriting the file (after `--add-replica`) loses nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::*;
use crate::PgBalancerCluster;

/// The whole JSON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedConfig {
    /// Name of the whole deployment (informational).
    pub cluster_name: String,
    /// The shared Docker network.
    pub network: SeedNetwork,
    /// One entry per balancer, each with its own primary and replicas.
    pub balancers: Vec<SeedBalancer>,
    /// Keys this project does not use, kept on rewrite.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// `network` of the seed file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedNetwork {
    /// Docker network name.
    pub name: String,
    /// Subnet in CIDR form.
    pub subnet: String,
    /// Keys this project does not use.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// One `balancers[]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedBalancer {
    /// Balancer name; also the cluster name.
    pub name: String,
    /// Container name of the balancer.
    pub container_name: String,
    /// Static IP of the balancer.
    pub ip_address: String,
    /// Host port of the SQL endpoint.
    pub port: u16,
    /// Host port of PCP.
    pub pcp_port: u16,
    /// Host port of the REST API.
    pub rest_api_port: u16,
    /// Pool settings: `num_init_children`, `max_pool`, `load_balance_mode`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, Value>,
    /// The primary node (node id 0).
    pub primary: SeedNode,
    /// The replicas.
    #[serde(default)]
    pub replicas: Vec<SeedNode>,
    /// Keys this project does not use.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A PostgreSQL node of the seed file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedNode {
    /// Replica id (1, 2, …); absent for the primary, which is node 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u32>,
    /// Hostname, resolvable on the network.
    pub host: String,
    /// Host port.
    pub port: u16,
    /// Container name.
    pub container_name: String,
    /// Static IP.
    pub ip_address: String,
    /// Keys this project does not use.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A seed file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// Not valid JSON for the schema.
    #[error("invalid configuration: {0}")]
    Json(#[from] serde_path_to_error::Error<serde_json::Error>),
    /// A value the mapping cannot use.
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

impl SeedConfig {
    /// Parses the JSON text; errors name the JSON path.
    pub fn parse(text: &str) -> Result<Self, SeedError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        Ok(serde_path_to_error::deserialize(de)?)
    }

    /// Pretty JSON with the same key order as the origin files.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// The balancer called `name`.
    pub fn balancer_mut(&mut self, name: &str) -> Option<&mut SeedBalancer> {
        self.balancers.iter_mut().find(|b| b.name == name)
    }

    /// One cluster per balancer entry.
    pub fn clusters(&self) -> Result<Vec<PgBalancerCluster>, SeedError> {
        self.balancers
            .iter()
            .enumerate()
            .map(|(i, b)| self.cluster(i, b))
            .collect()
    }

    fn cluster(&self, index: usize, b: &SeedBalancer) -> Result<PgBalancerCluster, SeedError> {
        let field = |f: &str| format!("balancers[{index}].{f}");
        let name = cluster_name(&b.name);
        let mut instances = vec![local_instance(0, &b.primary)];
        for (i, r) in b.replicas.iter().enumerate() {
            let id = r.node_id.ok_or_else(|| SeedError::Field {
                field: field(&format!("replicas[{i}].node_id")),
                message: "missing".into(),
            })?;
            if id == 0 || instances.iter().any(|inst| inst.ordinal == id) {
                return Err(SeedError::Field {
                    field: field(&format!("replicas[{i}].node_id")),
                    message: format!("{id} is 0 or used twice"),
                });
            }
            instances.push(local_instance(id, r));
        }
        // Ordinals are node ids (slot = node id), so they must be 1..=N.
        let replicas = u32::try_from(b.replicas.len()).unwrap_or(u32::MAX);
        if let Some(gap) = (1..=replicas).find(|id| !instances.iter().any(|i| i.ordinal == *id)) {
            return Err(SeedError::Field {
                field: field("replicas"),
                message: format!("node ids must run 1..={replicas}; {gap} is missing"),
            });
        }
        // The origin tool passed these to pgpool as text: numbers may be written as strings.
        let config = &self.balancers[index].config;
        let number = |key: &str, default: u32| -> Result<u32, SeedError> {
            let value = match config.get(key) {
                None | Some(Value::Null) => return Ok(default),
                Some(Value::Number(n)) => n.as_u64().and_then(|v| u32::try_from(v).ok()),
                Some(Value::String(s)) => s.trim().parse().ok(),
                Some(_) => None,
            };
            value.ok_or_else(|| SeedError::Field {
                field: field(&format!("config.{key}")),
                message: format!("{} is not a whole number", config[key]),
            })
        };
        let load_balance = match b.config.get("load_balance_mode") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(v)) => *v,
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "on" | "true" | "yes" | "1" => true,
                "off" | "false" | "no" | "0" => false,
                _ => {
                    return Err(SeedError::Field {
                        field: field("config.load_balance_mode"),
                        message: format!("`{s}` is neither on nor off"),
                    })
                }
            },
            Some(other) => {
                return Err(SeedError::Field {
                    field: field("config.load_balance_mode"),
                    message: format!("{other} is neither on nor off"),
                })
            }
        };
        let spec = PgBalancerClusterSpec {
            replicas: i32::try_from(replicas).unwrap_or(i32::MAX),
            postgres: PostgresSpec {
                // The origin tool's clients connect as postgres to `testdb`.
                database: "testdb".into(),
                ..PostgresSpec::default()
            },
            balancer: BalancerSpec {
                instances: 1,
                image: None,
                num_init_children: number("num_init_children", 32)?,
                max_pool: number("max_pool", 4)?,
                load_balance_mode: load_balance,
                ..BalancerSpec::default()
            },
            auth: AuthSpec::default(),
            failover: FailoverSpec::default(),
            local: Some(LocalSpec {
                network: LocalNetwork {
                    name: Some(self.network.name.clone()),
                    subnet: Some(self.network.subnet.clone()),
                },
                ports: LocalPorts {
                    balancer: Some(b.port),
                    pcp: Some(b.pcp_port),
                    rest: Some(b.rest_api_port),
                    postgres: Some(b.primary.port),
                },
                bind_address: None,
                instances,
                balancer: Some(LocalEndpoint {
                    container_name: Some(b.container_name.clone()),
                    hostname: Some(b.name.clone()),
                    ip: Some(b.ip_address.clone()),
                }),
            }),
        };
        Ok(PgBalancerCluster::new(&name, spec))
    }
}

impl SeedBalancer {
    /// Appends `count` replicas the way the origin tool names them, fixing its allocation:
    /// next node id, port `primary.port + node_id`, next free IP of the balancer's /24.
    pub fn add_replicas(&mut self, count: u32) -> Result<Vec<u32>, SeedError> {
        let mut added = Vec::new();
        for _ in 0..count {
            let id = self
                .replicas
                .iter()
                .filter_map(|r| r.node_id)
                .max()
                .unwrap_or(0)
                + 1;
            let port =
                u16::try_from(u32::from(self.primary.port) + id).map_err(|_| SeedError::Field {
                    field: format!("balancers.{}.primary.port", self.name),
                    message: format!("port {} + {id} is past 65535", self.primary.port),
                })?;
            let last = self
                .replicas
                .last()
                .unwrap_or(&self.primary)
                .ip_address
                .clone();
            let ip = next_ip(&last, self.used_ips()).ok_or_else(|| SeedError::Field {
                field: format!("balancers.{}.replicas", self.name),
                message: format!("no free address after {last} in its /24"),
            })?;
            self.replicas.push(SeedNode {
                node_id: Some(id),
                host: format!("{}-replica{id}", self.name),
                port,
                container_name: format!("{}_replica{id}", self.name),
                ip_address: ip,
                extra: BTreeMap::new(),
            });
            added.push(id);
        }
        Ok(added)
    }

    fn used_ips(&self) -> Vec<String> {
        let mut ips = vec![self.ip_address.clone(), self.primary.ip_address.clone()];
        ips.extend(self.replicas.iter().map(|r| r.ip_address.clone()));
        ips
    }
}

fn next_ip(after: &str, used: Vec<String>) -> Option<String> {
    let addr: std::net::Ipv4Addr = after.parse().ok()?;
    let [a, b, c, d] = addr.octets();
    (d.checked_add(1)?..=254)
        .map(|last| format!("{a}.{b}.{c}.{last}"))
        .find(|candidate| !used.contains(candidate))
}

fn local_instance(ordinal: u32, node: &SeedNode) -> LocalInstance {
    LocalInstance {
        ordinal,
        container_name: Some(node.container_name.clone()),
        hostname: Some(node.host.clone()),
        ip: Some(node.ip_address.clone()),
        port: Some(node.port),
    }
}

/// The cluster name for a seed balancer name (`lb_1` → `lb-1`).
pub fn cluster_name(balancer: &str) -> String {
    balancer
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = include_str!("../../examples/pgbalancer_cluster.json");

    #[test]
    fn each_balancer_becomes_a_cluster_with_the_json_layout() {
        let seed = SeedConfig::parse(SEED).unwrap();
        let clusters = seed.clusters().unwrap();
        assert_eq!(clusters.len(), 2);
        let lb1 = &clusters[0];
        assert_eq!(lb1.metadata.name.as_deref(), Some("lb1"));
        assert_eq!(lb1.spec.replicas, 2);
        let local = lb1.spec.local.as_ref().unwrap();
        assert_eq!(local.network.name.as_deref(), Some("pgbalancer_net"));
        assert_eq!(local.instance_port(2), Some(15434));
        assert_eq!(
            local.instance(1).unwrap().hostname.as_deref(),
            Some("lb1-replica1")
        );
        assert_eq!(
            local.instance(0).unwrap().container_name.as_deref(),
            Some("lb1_primary")
        );
        assert_eq!(clusters[1].spec.replicas, 1);
        crate::validate::validate_set(&clusters).unwrap();
    }

    #[test]
    fn add_replica_allocates_next_id_port_and_ip_without_collisions() {
        let mut seed = SeedConfig::parse(SEED).unwrap();
        let lb2 = seed.balancer_mut("lb2").unwrap();
        assert_eq!(lb2.add_replicas(2).unwrap(), [2, 3]);
        let added = &lb2.replicas[1];
        assert_eq!(
            (added.port, added.ip_address.as_str()),
            (25434, "172.30.2.22")
        );
        let back = SeedConfig::parse(&seed.to_json()).unwrap();
        assert_eq!(back, seed);
        assert_eq!(back.clusters().unwrap()[1].spec.replicas, 3);
    }

    #[test]
    fn load_balance_mode_off_is_honoured() {
        let text = SEED.replacen(
            "\"load_balance_mode\": \"on\"",
            "\"load_balance_mode\": \"off\"",
            1,
        );
        let clusters = SeedConfig::parse(&text).unwrap().clusters().unwrap();
        assert!(!clusters[0].spec.balancer.load_balance_mode);
    }

    #[test]
    fn missing_key_is_named_with_its_path() {
        let text = SEED.replacen("\"pcp_port\": 19898,", "", 1);
        let err = SeedConfig::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("balancers[0]") && err.contains("pcp_port"),
            "{err}"
        );
    }

    /// Truncated files, wrong types and duplicate names: each refused with the path or the
    /// name in the message; the list of what was tried is printed.
    #[test]
    fn bad_seed_files_are_refused_naming_what_is_wrong() {
        let cases: Vec<(String, &str)> = vec![
            (SEED[..SEED.len() / 2].to_owned(), "EOF"),
            (String::new(), "EOF"),
            ("[]".to_owned(), "expected struct"),
            (
                SEED.replacen("\"port\": 19999", "\"port\": \"19999\"", 1),
                "balancers[0].port",
            ),
            (
                SEED.replacen("\"port\": 15432", "\"port\": 99999", 1),
                "balancers[0].primary.port",
            ),
            (
                SEED.replacen("\"node_id\": 2", "\"node_id\": -2", 1),
                "balancers[0].replicas[1].node_id",
            ),
            (
                SEED.replacen(
                    "\"num_init_children\": 32",
                    "\"num_init_children\": \"many\"",
                    1,
                ),
                "balancers[0].config.num_init_children",
            ),
            (
                SEED.replacen("\"balancers\": [", "\"balancers\": {\"x\": [", 1),
                "balancers",
            ),
            (
                SEED.replacen(
                    "\"load_balance_mode\": \"on\"",
                    "\"load_balance_mode\": \"maybe\"",
                    1,
                ),
                "balancers[0].config.load_balance_mode",
            ),
            (
                SEED.replacen("\"name\": \"lb2\"", "\"name\": \"lb1\"", 1),
                "lb1",
            ),
            (
                SEED.replacen("\"node_id\": 2", "\"node_id\": 1", 1),
                "node_id",
            ),
        ];
        let mut tried = Vec::new();
        for (text, expect) in &cases {
            let message = match SeedConfig::parse(text) {
                Err(e) => e.to_string(),
                Ok(seed) => match seed.clusters().and_then(|c| {
                    crate::validate::validate_set(&c).map_err(|e| SeedError::Field {
                        field: "clusters".into(),
                        message: e.to_string(),
                    })
                }) {
                    Err(e) => e.to_string(),
                    Ok(()) => panic!("accepted a bad seed (expecting {expect})"),
                },
            };
            assert!(
                message.contains(expect),
                "expected {expect:?} in: {message}"
            );
            tried.push(format!("{expect:<40} -> {message}"));
        }
        println!(
            "tried {} bad seed files:\n{}",
            tried.len(),
            tried.join("\n")
        );
    }
}

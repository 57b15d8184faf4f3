//! What `pgbalancer status` and `up` print: a stable JSON/YAML document and a table, both
//! built purely from a cluster view. Secrets appear only when asked for.
//!
//! `let _ = write!(…)` throughout: writing to a `String` cannot fail.

use std::fmt::Write;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;

use crate::local::ops::ClusterView;
use crate::local::state::LastFailover;
use crate::plan::{Role, SUPERUSER};
use crate::status;

/// The machine-readable status of one cluster (`-o json|yaml`).
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusDocument {
    /// Cluster name.
    pub name: String,
    /// `Creating`, `Running`, `Scaling`, `SwitchingOver`, `FailingOver`, `Degraded` or
    /// `Failed`: the same phases as a `PgBalancerCluster`'s status.
    pub phase: String,
    /// `Ready`, `Progressing` and `Degraded`, with reasons and the times they last changed
    /// (kept by the local controller), as in a `PgBalancerCluster`'s status.
    pub conditions: Vec<Condition>,
    /// The primary instance.
    pub primary: Option<InstanceDoc>,
    /// The replicas.
    pub replicas: Vec<InstanceDoc>,
    /// The balancers (the first one is `balancer`).
    pub balancer: BalancerDoc,
    /// What is not ready yet.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// The controller that fails the cluster over, and its last failover.
    pub controller: ControllerDoc,
    /// Passwords and URIs, with `--show-secrets` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets: Option<SecretsDoc>,
}

/// One instance.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceDoc {
    /// Instance name.
    pub name: String,
    /// Container name.
    pub container: String,
    /// `primary` or `replica`, as observed.
    pub role: String,
    /// Serving in its role (replicas: streaming).
    pub ready: bool,
    /// Engine state.
    pub state: String,
    /// Engine health.
    pub health: String,
    /// Published host port.
    pub port: Option<u16>,
    /// Replay lag in bytes (replicas).
    pub lag_bytes: Option<i64>,
    /// This instance's node in the first balancer.
    pub balancer_node: Option<NodeDoc>,
}

/// A balancer's view of one backend.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeDoc {
    /// Slot = instance ordinal.
    pub slot: u32,
    /// `up`, `waiting`, `down`.
    pub status: String,
    /// SELECTs routed to it; `null` when the balancer does not count them.
    pub select_count: Option<i64>,
}

/// The balancers.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BalancerDoc {
    /// Every balancer routes queries.
    pub ready: bool,
    /// Host port of the first balancer.
    pub port: Option<u16>,
    /// `host:port` clients connect to.
    pub endpoint: Option<String>,
    /// Each balancer container.
    pub instances: Vec<BalancerInstanceDoc>,
    /// TLS between clients and the balancers: `disabled`, `enabled` or `required`.
    pub tls: String,
    /// The CA certificate to verify the balancers with (`sslrootcert`), while TLS is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// One balancer container.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BalancerInstanceDoc {
    /// Container name.
    pub name: String,
    /// Routes queries.
    pub ready: bool,
    /// Engine state.
    pub state: String,
    /// Published SQL port.
    pub port: Option<u16>,
    /// Published REST port of the agent (pgBalancer API, `bctl`, `/metrics`).
    pub rest_port: Option<u16>,
}

/// The controller of the state directory, as seen by this command.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ControllerDoc {
    /// `running`, `missing`, `exited`…
    pub state: String,
    /// Container name.
    pub name: String,
    /// The last failover of this cluster: `at`, `from`, `to`, `reason`.
    pub last_failover: Option<LastFailover>,
}

/// Credentials and URIs.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretsDoc {
    /// Application role.
    pub user: String,
    /// Its password.
    pub password: String,
    /// `postgres` superuser password.
    pub superuser_password: String,
    /// Replication role password.
    pub replication_password: String,
    /// PCP password of user `pgbalancer`.
    pub pcp_password: String,
    /// Bearer token of the balancer agent's mutating endpoints (`bctl --token`).
    pub api_token: String,
    /// URI through the balancer.
    pub balancer_uri: Option<String>,
    /// URI of the primary.
    pub primary_uri: Option<String>,
}

/// Builds the status document of a view.
pub fn status_document(view: &ClusterView, show_secrets: bool) -> StatusDocument {
    let ClusterView {
        stored,
        plan,
        observed,
        controller,
        ..
    } = view;
    let record = stored.record();
    let computed = status::compute(
        plan,
        observed,
        &record,
        Some(&stored.previous_status()),
        None,
        Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let first_balancer = observed.balancers.get(&0);
    let docs: Vec<InstanceDoc> = plan
        .instances
        .iter()
        .zip(&computed.instances)
        .map(|(inst, st)| {
            let seen = observed.instances.get(&inst.ordinal);
            InstanceDoc {
                name: inst.name.clone(),
                container: inst.container.clone(),
                role: st.role.clone(),
                ready: st.ready,
                state: seen
                    .map(|s| s.state.clone())
                    .unwrap_or_else(|| "missing".into()),
                health: seen.map(|s| s.health.clone()).unwrap_or_default(),
                port: seen.and_then(|s| s.host_port),
                lag_bytes: st.lag_bytes,
                balancer_node: first_balancer
                    .and_then(|b| b.nodes.iter().flatten().find(|n| n.slot == inst.ordinal))
                    .map(|n| NodeDoc {
                        slot: n.slot,
                        status: n.status.clone(),
                        select_count: n.select_count,
                    }),
            }
        })
        .collect();
    let (primary, replicas): (Vec<InstanceDoc>, Vec<InstanceDoc>) = docs
        .into_iter()
        .partition(|d| d.role == Role::Primary.as_str());
    let host = plan.connect_address();
    let balancer_port = first_balancer.and_then(|b| b.host_port);
    let primary = primary.into_iter().next();
    let uri = |user: &str, password: &str, port: Option<u16>| {
        port.map(|p| {
            format!(
                "postgresql://{user}:{password}@{host}:{p}/{}",
                plan.postgres.database
            )
        })
    };
    let secrets = show_secrets.then(|| SecretsDoc {
        user: plan.postgres.user.clone(),
        password: stored.credentials.app_password.clone(),
        superuser_password: stored.credentials.superuser_password.clone(),
        replication_password: stored.credentials.replication_password.clone(),
        pcp_password: stored.credentials.pcp_password.clone(),
        api_token: stored.credentials.api_token.clone(),
        balancer_uri: uri(
            &plan.postgres.user,
            &stored.credentials.app_password,
            balancer_port,
        ),
        primary_uri: uri(
            &plan.postgres.user,
            &stored.credentials.app_password,
            primary.as_ref().and_then(|p| p.port),
        ),
    });
    let balancers: Vec<BalancerInstanceDoc> = plan
        .balancer
        .instances
        .iter()
        .map(|b| {
            let seen = observed.balancers.get(&b.index);
            BalancerInstanceDoc {
                name: b.container.clone(),
                ready: seen.is_some_and(|s| s.routing),
                state: seen
                    .map(|s| s.state.clone())
                    .unwrap_or_else(|| "missing".into()),
                port: seen.and_then(|s| s.host_port),
                rest_port: seen.and_then(|s| s.rest_port),
            }
        })
        .collect();
    StatusDocument {
        name: plan.cluster.clone(),
        phase: computed.phase.unwrap_or_default(),
        conditions: computed.conditions,
        primary,
        replicas,
        balancer: BalancerDoc {
            ready: !balancers.is_empty() && balancers.iter().all(|b| b.ready),
            port: balancer_port,
            endpoint: balancer_port.map(|p| format!("{host}:{p}")),
            instances: balancers,
            tls: plan.balancer.tls.as_str().into(),
            ca_file: view.ca_file.as_ref().map(|p| p.display().to_string()),
        },
        pending: crate::reconcile::pending(plan, observed, &record),
        controller: ControllerDoc {
            state: controller.state.clone(),
            name: controller.name.clone(),
            last_failover: stored.last_failover.clone(),
        },
        secrets,
    }
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// The human-readable table of one cluster.
pub fn status_table(doc: &StatusDocument) -> String {
    let mut out = format!(
        "cluster {}  phase {}  primary {}\n",
        doc.name,
        doc.phase,
        doc.primary.as_ref().map(|p| p.name.as_str()).unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "  {:<20} {:<8} {:<6} {:<9} {:<9} {:<6} {:<10} BALANCER NODE",
        "INSTANCE", "ROLE", "READY", "STATE", "HEALTH", "PORT", "LAG"
    );
    for i in doc.primary.iter().chain(&doc.replicas) {
        let node = i
            .balancer_node
            .as_ref()
            .map(|n| match n.select_count {
                Some(count) => format!("{} (selects {count})", n.status),
                None => n.status.clone(),
            })
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "  {:<20} {:<8} {:<6} {:<9} {:<9} {:<6} {:<10} {}",
            i.name,
            i.role,
            if i.ready { "yes" } else { "no" },
            i.state,
            dash((!i.health.is_empty()).then_some(&i.health)),
            dash(i.port),
            i.lag_bytes
                .map(|b| format!("{b} B"))
                .unwrap_or_else(|| "-".into()),
            node
        );
    }
    let _ = writeln!(
        out,
        "  {:<20} {:<8} {:<6} {:<9} {:<9} {:<6}",
        "BALANCER", "", "READY", "STATE", "", "PORT"
    );
    for b in &doc.balancer.instances {
        let _ = writeln!(
            out,
            "  {:<20} {:<8} {:<6} {:<9} {:<9} {:<6} {}",
            b.name,
            "",
            if b.ready { "yes" } else { "no" },
            b.state,
            "",
            dash(b.port),
            dash(b.rest_port)
        );
    }
    for p in &doc.pending {
        let _ = writeln!(out, "  waiting: {p}");
    }
    let _ = writeln!(
        out,
        "  controller: {} ({})",
        doc.controller.state, doc.controller.name
    );
    if let Some(f) = &doc.controller.last_failover {
        let _ = writeln!(
            out,
            "  last failover: {} {} -> {}: {}",
            f.at, f.from, f.to, f.reason
        );
    }
    if let Some(s) = &doc.secrets {
        let _ = writeln!(out, "  balancer URI: {}", dash(s.balancer_uri.as_ref()));
        let _ = writeln!(out, "  primary URI:  {}", dash(s.primary_uri.as_ref()));
        let _ = writeln!(
            out,
            "  superuser:    {SUPERUSER} / {}",
            s.superuser_password
        );
    }
    out
}

/// The lines `up` and `scale` print once a cluster is ready: how to connect.
pub fn ready_summary(view: &ClusterView, took: Duration) -> String {
    let doc = status_document(view, false);
    let user = &view.plan.postgres.user;
    let db = &view.plan.postgres.database;
    let host = view.plan.connect_address();
    let mut out = format!(
        "cluster {} is ready in {:.1} s: primary {}, {} replica(s) streaming, balancer routing\n",
        doc.name,
        took.as_secs_f64(),
        doc.primary.as_ref().map(|p| p.name.as_str()).unwrap_or("-"),
        doc.replicas.iter().filter(|r| r.ready).count()
    );
    if let Some(port) = doc.balancer.port {
        let tls = match &doc.balancer.ca_file {
            Some(ca) => format!("?sslmode=verify-full&sslrootcert={ca}"),
            None => String::new(),
        };
        let _ = writeln!(out, "  balancer (reads spread, writes to primary): psql \"postgresql://{user}@{host}:{port}/{db}{tls}\"");
    }
    if let Some(port) = doc.primary.as_ref().and_then(|p| p.port) {
        let _ = writeln!(out, "  primary (direct):                          psql \"postgresql://{user}@{host}:{port}/{db}\"");
    }
    let _ = write!(
        out,
        "  password: pgbalancer status {} --show-secrets",
        doc.name
    );
    if view.stored.seed_file.is_none() {
        let _ = write!(out, "\n  status:   pgbalancer status {}", doc.name);
    }
    let failover = &view.stored.cluster.spec.failover;
    let _ = match (doc.controller.state.as_str(), failover.enabled) {
        ("running", true) => write!(
            out,
            "\n  failover: automatic after {} s (controller {})",
            failover.delay_seconds, doc.controller.name
        ),
        (_, true) => write!(
            out,
            "\n  failover: NOT automatic, controller {} is {}",
            doc.controller.name, doc.controller.state
        ),
        (_, false) => write!(out, "\n  failover: off (spec.failover.enabled)"),
    };
    out
}

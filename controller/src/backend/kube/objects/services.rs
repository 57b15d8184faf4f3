//! Services: per-instance DNS (headless), `-rw` (primary), `-ro` (replicas) and the balancer.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{cluster_labels, meta, with_hash, Owner};
use crate::labels;
use crate::plan::{self, Plan, BALANCER_PORT, PCP_PORT, POSTGRES_PORT, REST_PORT};

fn port(name: &str, number: u16) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port: i32::from(number),
        target_port: Some(IntOrString::Int(i32::from(number))),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn postgres_selector(plan: &Plan, role: Option<&str>) -> BTreeMap<String, String> {
    let mut s = BTreeMap::from([
        (labels::NAME.to_owned(), labels::APP.to_owned()),
        (labels::INSTANCE.to_owned(), plan.cluster.clone()),
        (labels::COMPONENT.to_owned(), labels::POSTGRES.to_owned()),
    ]);
    if let Some(role) = role {
        s.insert(labels::ROLE.to_owned(), role.to_owned());
    }
    s
}

fn service(plan: &Plan, owner: &Owner, name: &str, component: &str, spec: ServiceSpec) -> Service {
    with_hash(
        Service {
            metadata: meta(owner, name, cluster_labels(plan, component)),
            spec: Some(spec),
            ..Default::default()
        },
        |s| &mut s.metadata,
    )
}

/// Headless Service giving each instance pod a stable DNS name, ready or not (replicas clone
/// from the primary before anything is ready).
pub fn headless_service(plan: &Plan, owner: &Owner) -> Service {
    service(
        plan,
        owner,
        &plan::headless_service(&plan.cluster),
        labels::POSTGRES,
        ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(postgres_selector(plan, None)),
            ports: Some(vec![port("postgres", POSTGRES_PORT)]),
            ..Default::default()
        },
    )
}

/// `<cluster>-rw`: the primary.
pub fn rw_service(plan: &Plan, owner: &Owner) -> Service {
    service(
        plan,
        owner,
        &plan::rw_host(&plan.cluster),
        labels::POSTGRES,
        ServiceSpec {
            selector: Some(postgres_selector(plan, Some("primary"))),
            ports: Some(vec![port("postgres", POSTGRES_PORT)]),
            ..Default::default()
        },
    )
}

/// `<cluster>-ro`: the replicas.
pub fn ro_service(plan: &Plan, owner: &Owner) -> Service {
    service(
        plan,
        owner,
        &format!("{}-ro", plan.cluster),
        labels::POSTGRES,
        ServiceSpec {
            selector: Some(postgres_selector(plan, Some("replica"))),
            ports: Some(vec![port("postgres", POSTGRES_PORT)]),
            ..Default::default()
        },
    )
}

/// `<cluster>-balancer`: SQL, PCP and the REST API of the balancer pods.
pub fn balancer_service(plan: &Plan, owner: &Owner) -> Service {
    service(
        plan,
        owner,
        &plan::balancer_name(&plan.cluster),
        labels::BALANCER,
        ServiceSpec {
            selector: Some(BTreeMap::from([
                (labels::NAME.to_owned(), labels::APP.to_owned()),
                (labels::INSTANCE.to_owned(), plan.cluster.clone()),
                (labels::COMPONENT.to_owned(), labels::BALANCER.to_owned()),
            ])),
            ports: Some(vec![
                port("postgres", BALANCER_PORT),
                port("pcp", PCP_PORT),
                port("rest", REST_PORT),
            ]),
            ..Default::default()
        },
    )
}

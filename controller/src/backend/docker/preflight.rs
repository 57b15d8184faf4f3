//! Checks before anything is created: images present, container names and host ports free,
//! an existing network compatible. A failed check leaves everything as it was.

use std::collections::HashMap;
use std::net::TcpListener;

use bollard::query_parameters::ListContainersOptions;
use bollard::Docker;
use pgbalancer_crd::validate::claimed_host_ports;
use pgbalancer_crd::PgBalancerCluster;

use super::{container_name, label, DockerError};
use crate::labels;
use crate::plan::Plan;

/// Every problem found; empty when the clusters can be applied.
pub async fn check(
    docker: &Docker,
    clusters: &[(PgBalancerCluster, Plan)],
) -> Result<Vec<String>, DockerError> {
    let mut problems = Vec::new();
    let all = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            ..Default::default()
        }))
        .await
        .map_err(DockerError::api("list containers"))?;
    let owner = |c: &bollard::models::ContainerSummary| {
        if label(c, labels::MANAGED_BY) == Some(labels::MANAGER) {
            label(c, labels::INSTANCE).map(|s| format!("cluster `{s}`"))
        } else {
            None
        }
        .unwrap_or_else(|| {
            format!(
                "container `{}`, not managed by pgbalancer",
                container_name(c)
            )
        })
    };
    let mut images: Vec<(String, String)> = Vec::new();
    for (cluster, plan) in clusters {
        let name = &plan.cluster;
        let ours = |c: &bollard::models::ContainerSummary| {
            label(c, labels::INSTANCE) == Some(name.as_str())
                && label(c, labels::MANAGED_BY) == Some(labels::MANAGER)
        };
        let wanted_names = plan
            .instances
            .iter()
            .map(|i| i.container.clone())
            .chain(plan.balancer.instances.iter().map(|b| b.container.clone()));
        for wanted in wanted_names {
            if let Some(c) = all.iter().find(|c| container_name(c) == wanted && !ours(c)) {
                problems.push(format!(
                    "{name}: container name `{wanted}` is taken by {}",
                    owner(c)
                ));
            }
        }
        for (port, field) in claimed_host_ports(&cluster.spec) {
            let holder = all.iter().find(|c| {
                c.ports
                    .iter()
                    .flatten()
                    .any(|p| p.public_port == Some(port))
            });
            match holder {
                Some(c) if ours(c) => {}
                Some(c) => problems.push(format!(
                    "{name}: {field}: host port {port} is published by {}",
                    owner(c)
                )),
                None => {
                    if TcpListener::bind((plan.local.bind_address.as_str(), port)).is_err() {
                        problems.push(format!(
                            "{name}: {field}: host port {port} is in use on {}",
                            plan.local.bind_address
                        ));
                    }
                }
            }
        }
        if let Ok(net) = docker.inspect_network(&plan.local.network, None).await {
            let subnets: Vec<String> = net
                .ipam
                .and_then(|i| i.config)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|c| c.subnet)
                .collect();
            if let Some(wanted) = &plan.local.subnet {
                if !subnets.contains(wanted) {
                    problems.push(format!(
                        "{name}: spec.local.network.subnet: network `{}` exists with subnet {} instead of {wanted}",
                        plan.local.network,
                        subnets.join(", ")
                    ));
                }
            }
        }
        images.push((
            plan.postgres.image.clone(),
            format!("spec.postgres.image of {name}"),
        ));
        images.push((
            plan.balancer.image.clone(),
            format!("spec.balancer.image of {name}"),
        ));
    }
    let mut seen: HashMap<String, ()> = HashMap::new();
    for (image, field) in images {
        if seen.insert(image.clone(), ()).is_some() {
            continue;
        }
        if docker.inspect_image(&image).await.is_err() {
            problems.push(format!(
                "image `{image}` ({field}) is not in the local engine; run `pgbalancer images build`{}",
                super::images::hint_for(&image)
            ));
        }
    }
    Ok(problems)
}

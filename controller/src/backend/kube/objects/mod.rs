//! Pure builders of every Kubernetes object of a cluster, from the plan and the credentials.
//! Each object carries the cluster's labels, an ownerReference to the `PgBalancerCluster`
//! (garbage collection) and a `pgbalancer.io/config-hash` annotation of its own content, which
//! lets reconcile skip objects that are already as desired (a no-op reconcile writes nothing).

mod config;
mod services;
mod workloads;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use config::{
    balancer_config, balancer_secret, balancer_tls_name, balancer_tls_secret,
    credentials_from_secret, credentials_name, credentials_secret, postgres_config,
    postgres_secret,
};
pub use services::{balancer_service, headless_service, ro_service, rw_service};
pub use workloads::{
    balancer_deployment, balancer_pdb, data_pvc, data_pvc_name, statefulset, statefulset_name,
};

use crate::labels;
use crate::plan::Plan;

/// The owner of every child object.
#[derive(Clone, Debug, PartialEq)]
pub struct Owner {
    /// Namespace of the cluster and its children.
    pub namespace: String,
    /// The ownerReference to the `PgBalancerCluster`.
    pub reference: OwnerReference,
}

/// Metadata of a child named `name` with `labels`.
pub fn meta(owner: &Owner, name: &str, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(owner.namespace.clone()),
        labels: Some(labels),
        owner_references: Some(vec![owner.reference.clone()]),
        ..Default::default()
    }
}

/// Sets the config-hash annotation of `object` from its serialised content.
pub fn with_hash<T: Serialize>(mut object: T, metadata: impl Fn(&mut T) -> &mut ObjectMeta) -> T {
    let hash = content_hash(&object);
    metadata(&mut object)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(labels::CONFIG_HASH.to_owned(), hash);
    object
}

/// Short hash of a serialisable value.
pub fn content_hash<T: Serialize>(value: &T) -> String {
    // Serialising our own objects cannot fail (string-keyed maps, derived serializers); were
    // it to, the hash of nothing would only make reconcile apply the object again.
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(&Sha256::digest(bytes)[..12])
}

/// Labels of a cluster-wide child (services, config).
pub fn cluster_labels(plan: &Plan, component: &str) -> BTreeMap<String, String> {
    let mut l = labels::cluster(&plan.cluster);
    l.insert(labels::COMPONENT.to_owned(), component.to_owned());
    l
}

#[cfg(test)]
mod tests;

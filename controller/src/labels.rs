//! Label keys and values that mark what a cluster owns, the same on Docker and Kubernetes.

use std::collections::BTreeMap;

/// `app.kubernetes.io/name`.
pub const NAME: &str = "app.kubernetes.io/name";
/// `app.kubernetes.io/instance`: the cluster name.
pub const INSTANCE: &str = "app.kubernetes.io/instance";
/// `app.kubernetes.io/component`: `postgres` or `balancer`.
pub const COMPONENT: &str = "app.kubernetes.io/component";
/// `app.kubernetes.io/managed-by`.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// `pgbalancer.io/role`: `primary` or `replica`.
pub const ROLE: &str = "pgbalancer.io/role";
/// `pgbalancer.io/initialised`: `true` on an instance pod marked while the cluster had had a
/// primary (see [`crate::plan::Plan::initialised`]).
pub const INITIALISED: &str = "pgbalancer.io/initialised";
/// `pgbalancer.io/instance`: the PostgreSQL instance (or balancer) name.
pub const POD_INSTANCE: &str = "pgbalancer.io/instance";
/// `pgbalancer.io/ordinal`: instance ordinal, which is also its balancer slot.
pub const ORDINAL: &str = "pgbalancer.io/ordinal";
/// `pgbalancer.io/config-hash`: hash of what a change of requires a new container or pod.
pub const CONFIG_HASH: &str = "pgbalancer.io/config-hash";

/// `pgbalancer.io/switchover` on a `PgBalancerCluster`: asks the operator to move the primary
/// to the instance it names (the most caught-up replica when empty); removed once handled.
pub const SWITCHOVER_ANNOTATION: &str = "pgbalancer.io/switchover";

/// Value of `app.kubernetes.io/name`.
pub const APP: &str = "pgbalancer";
/// Value of `app.kubernetes.io/managed-by`, also the server-side-apply field manager.
pub const MANAGER: &str = "pgbalancer-operator";
/// Component value of PostgreSQL instances.
pub const POSTGRES: &str = "postgres";
/// Component value of balancers.
pub const BALANCER: &str = "balancer";

/// Labels every object of `cluster` carries.
pub fn cluster(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME.to_owned(), APP.to_owned()),
        (INSTANCE.to_owned(), cluster.to_owned()),
        (MANAGED_BY.to_owned(), MANAGER.to_owned()),
    ])
}

/// Labels of one component object (instance or balancer) named `name`.
pub fn component(cluster_name: &str, component: &str, name: &str) -> BTreeMap<String, String> {
    let mut labels = cluster(cluster_name);
    labels.insert(COMPONENT.to_owned(), component.to_owned());
    labels.insert(POD_INSTANCE.to_owned(), name.to_owned());
    labels
}

/// Selector string (`k=v,k=v`) for the PostgreSQL instances of a cluster.
pub fn postgres_selector(cluster_name: &str) -> String {
    format!("{NAME}={APP},{INSTANCE}={cluster_name},{COMPONENT}={POSTGRES}")
}

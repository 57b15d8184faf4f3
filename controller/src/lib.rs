//! pgbalancer: one `PgBalancerCluster` spec, run on Docker (`pgbalancer up`) or Kubernetes.
//!
//! `plan` and `render` are pure (spec → typed plan → config files); `reconcile` holds the
//! decisions shared by every backend and `status` the one status computation; `backend` holds
//! the code that observes and changes a cluster on Docker or Kubernetes (besides it, only
//! `local::ops` calls Docker, to list and remove a cluster's leftovers on `down`); `local` and
//! `cli` are the command-line front ends of the Docker mode; `agent` runs in each balancer
//! (REST API, supervision of pgpool or the native engine in `balancer`).
#![forbid(unsafe_code)]

pub mod agent;
pub mod backend;
pub mod balancer;
pub mod bctl;
pub mod cli;
pub mod credentials;
#[cfg(test)]
mod fixtures;
pub mod labels;
pub mod local;
pub mod pg;
pub mod plan;
pub mod pool_node;
pub mod reconcile;
pub mod render;
pub mod status;
pub mod tls;

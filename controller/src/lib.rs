//! pgbalancer: one `PgBalancerCluster` spec, run on Docker (`pgbalancer up`) or Kubernetes.
//!
//! `plan` and `render` are pure (spec → typed plan → config files); `reconcile` holds the
//! decisions shared by every backend; `backend` holds the only code that talks to an engine;
//! `local` and `cli` are the command-line front ends of the Docker mode.
#![forbid(unsafe_code)]

pub mod agent;
pub mod backend;
pub mod balancer;
pub mod bctl;
pub mod cli;
pub mod credentials;
pub mod labels;
pub mod local;
pub mod pg;
pub mod plan;
pub mod pool_node;
pub mod reconcile;
pub mod render;
pub mod status;

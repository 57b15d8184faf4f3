//! The Kubernetes backend: a kube-runtime controller over `PgBalancerCluster`.
//!
//! `objects` builds every child purely from the same plan and rendered files as the Docker
//! backend; `backend` observes and applies (`impl Backend`); `reconcile` runs one pass of the
//! shared core (validate → observe → `reconcile::decide` → apply → status → requeue), the
//! same decisions Docker's converge loop makes; `operator` wires watches, leader election,
//! metrics and health endpoints.

pub mod backend;
pub mod balancer;
pub mod leader;
pub mod metrics;
pub mod objects;
pub mod operator;
pub mod reconcile;

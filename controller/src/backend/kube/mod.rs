//! The Kubernetes backend: a kube-runtime controller over `PgBalancerCluster`.
//!
//! `objects` builds every child purely from the same plan and rendered files as the Docker
//! backend; `reconcile` validates, applies what differs (server-side apply, one field manager),
//! removes scaled-down instances and writes status; `status` computes it purely; `operator`
//! wires watches, leader election, metrics and health endpoints.
//!
//! Reconcile here is declarative: every child is applied from the plan and Kubernetes
//! controllers converge it, so the Docker backend's step-by-step `reconcile::decide` is not
//! used; the ordering it encodes is carried by the objects themselves (replicas wait for
//! `<cluster>-rw`, the agent attaches a backend once it answers, the primary is always planned).

pub mod balancer;
pub mod leader;
pub mod metrics;
pub mod objects;
pub mod operator;
pub mod reconcile;
pub mod slots;

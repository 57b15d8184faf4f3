//! Local (Docker) mode: the desired state kept between invocations, the per-cluster locks,
//! the operations the `pgbalancer` and `pgbalancer-cluster` commands share (apply, observe,
//! remove) and the controller loop that keeps clusters converged and fails over with no
//! command running.

pub mod controller;
pub mod lock;
pub mod ops;
pub mod state;

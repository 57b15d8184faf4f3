//! Local (Docker) mode: the desired state kept between invocations and the operations the
//! `pgbalancer` and `pgbalancer-cluster` commands share (apply, observe, remove).

pub mod ops;
pub mod state;

//! The `PgBalancerCluster` resource shared by the Docker and Kubernetes backends.
//!
//! Pure code only: the types (which also generate the CRD), their defaults, the validation
//! that names the offending field, the parser for local YAML files and the origin tool's seed
//! JSON format. Nothing here does IO beyond the strings it is handed.
#![forbid(unsafe_code)]

pub mod document;
pub mod seed;
pub mod spec;
pub mod status;
pub mod validate;

pub use document::{parse_documents, DocumentError};
pub use spec::*;
pub use status::*;
pub use validate::{validate, ValidationError, ValidationErrors};

/// API group of the resource.
pub const GROUP: &str = "pgbalancer.io";
/// API version of the resource.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "pgbalancer.io/v1alpha1";
/// Kind of the resource.
pub const KIND: &str = "PgBalancerCluster";

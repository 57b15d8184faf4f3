//! Errors of the Docker backend.

use thiserror::Error;

use crate::backend::BackendError;

/// A failure talking to the Docker engine or to the containers.
#[derive(Debug, Error)]
pub enum DockerError {
    /// The engine could not be reached at all.
    #[error("cannot reach the Docker engine ({hint})")]
    Connect {
        hint: String,
        #[source]
        source: bollard::errors::Error,
    },
    /// An engine API call failed.
    #[error("docker: {what}")]
    Api {
        what: String,
        #[source]
        source: bollard::errors::Error,
    },
    /// A SQL probe or statement failed.
    #[error(transparent)]
    Sql(#[from] crate::pg::PgError),
    /// Something the plan needs is missing or taken.
    #[error("{0}")]
    Conflict(String),
    /// A balancer agent refused or did not answer a node change.
    #[error(transparent)]
    Agent(#[from] crate::backend::agent_client::ChangeError),
    /// A container expected by an action does not exist (yet).
    #[error("container for {0} not found")]
    Missing(String),
}

impl DockerError {
    /// Wraps an engine error with what was being done.
    pub fn api(what: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> DockerError {
        let what = what.into();
        move |source| DockerError::Api { what, source }
    }
}

impl BackendError for DockerError {
    fn is_transient(&self) -> bool {
        if let DockerError::Agent(e) = self {
            return !e.refused;
        }
        matches!(self, DockerError::Sql(_) | DockerError::Missing(_))
    }
}

//! The cluster's generated credentials: random once, then kept (never overwritten).

use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};

/// Length of generated passwords: 32 alphanumerics ≈ 190 bits.
const PASSWORD_LEN: usize = 32;

/// Every secret a cluster needs. Field names are the keys of the Kubernetes Secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Credentials {
    /// Password of the `postgres` superuser.
    pub superuser_password: String,
    /// Password of the `replicator` role used by streaming replication.
    pub replication_password: String,
    /// Password of the application role (`spec.postgres.user`).
    pub app_password: String,
    /// Password of `pgbalancer_monitor` (pg_monitor), used by the balancer's checks.
    pub monitor_password: String,
    /// Password of the balancer's PCP user `pgbalancer`.
    pub pcp_password: String,
    /// Bearer token for the balancer agent's mutating REST endpoints.
    #[serde(default = "random_secret")]
    pub api_token: String,
    /// Docker: the balancer's generated TLS certificate, made when TLS is first enabled (on
    /// Kubernetes it is a Secret of its own, `<cluster>-balancer-tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer_tls: Option<crate::tls::TlsBundle>,
}

fn random_secret() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), PASSWORD_LEN)
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

impl Credentials {
    /// Fresh random credentials.
    pub fn generate() -> Self {
        Self {
            superuser_password: random_secret(),
            replication_password: random_secret(),
            app_password: random_secret(),
            monitor_password: random_secret(),
            pcp_password: random_secret(),
            api_token: random_secret(),
            balancer_tls: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_credentials_are_distinct_and_not_printed_by_debug() {
        let a = Credentials::generate();
        let b = Credentials::generate();
        assert_ne!(a, b);
        assert_ne!(a.superuser_password, a.replication_password);
        assert_eq!(a.app_password.len(), 32);
        assert!(!format!("{a:?}").contains(&a.superuser_password));
    }
}

//! Rendering of configuration files from the plan. Pure: same plan and credentials, same bytes.
//!
//! Files are paths under `/etc/pgbalancer` in the images. Secret files go to a Kubernetes
//! Secret or are uploaded with mode 0600; the others to a ConfigMap or uploaded with 0644.

mod pgpool;
mod postgres;
#[cfg(test)]
mod tests;

pub use pgpool::{pcp_conf, pcppass, pgpool_conf, pool_hba, pool_passwd};
pub use postgres::{pg_hba, postgresql_conf};

use crate::credentials::Credentials;
use crate::plan::Plan;

/// Directory the images read their configuration from.
pub const CONFIG_DIR: &str = "/etc/pgbalancer";
/// Path, relative to [`CONFIG_DIR`], of the file holding an instance's role (`primary` or
/// `replica`) on Docker; the entrypoint obeys it at every start.
pub const ROLE_FILE: &str = "role";
/// Present (Docker) when the cluster has had a primary: see [`crate::plan::Plan::initialised`].
pub const INITIALISED_FILE: &str = "initialised";
/// Directory of the PostgreSQL data volume in the image.
pub const DATA_VOLUME_DIR: &str = "/var/lib/pgbalancer";
/// `PGDATA` inside the data volume (a subdirectory, so a volume's `lost+found` does no harm).
pub const PGDATA: &str = "/var/lib/pgbalancer/data";
/// uid and gid the images run as.
pub const IMAGE_UID: u64 = 999;

/// One rendered file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConfigFile {
    /// Path relative to [`CONFIG_DIR`].
    pub path: &'static str,
    /// Contents.
    pub contents: String,
    /// Holds a credential: mode 0600, never in a ConfigMap or a log.
    pub secret: bool,
}

fn file(path: &'static str, contents: String) -> ConfigFile {
    ConfigFile {
        path,
        contents,
        secret: false,
    }
}

fn secret(path: &'static str, contents: String) -> ConfigFile {
    ConfigFile {
        path,
        contents,
        secret: true,
    }
}

/// Files of a PostgreSQL instance. The same for every instance: the role lives in the data.
pub fn postgres_files(plan: &Plan, creds: &Credentials) -> Vec<ConfigFile> {
    vec![
        file("postgresql.conf", postgresql_conf(plan)),
        file("pg_hba.conf", pg_hba(plan)),
        secret(
            "secrets/superuser-password",
            creds.superuser_password.clone(),
        ),
        secret(
            "secrets/replication-password",
            creds.replication_password.clone(),
        ),
        secret("secrets/app-password", creds.app_password.clone()),
        secret("secrets/monitor-password", creds.monitor_password.clone()),
        secret(
            "secrets/pgpass",
            format!(
                "*:*:*:{}:{}\n",
                crate::plan::REPLICATION_USER,
                pgpass_escape(&creds.replication_password)
            ),
        ),
    ]
}

/// Files of a balancer. With TLS on, the certificate and key when the credentials hold them
/// (Docker; on Kubernetes they come from a Secret of their own).
pub fn balancer_files(plan: &Plan, creds: &Credentials) -> Vec<ConfigFile> {
    let mut files = vec![
        file("pgpool.conf", pgpool_conf(plan)),
        file("pool_hba.conf", pool_hba(plan)),
        file("pcp.conf", pcp_conf(creds)),
        secret("secrets/pool_passwd", pool_passwd(plan, creds)),
        secret("secrets/pcppass", pcppass(creds)),
        secret("secrets/monitor-password", creds.monitor_password.clone()),
        secret("secrets/api-token", creds.api_token.clone()),
    ];
    if let (true, Some(tls)) = (
        plan.balancer.tls != pgbalancer_crd::TlsMode::Disabled,
        &creds.balancer_tls,
    ) {
        files.push(file(crate::tls::CERT_FILE, tls.cert.clone()));
        files.push(secret(crate::tls::KEY_FILE, tls.key.clone()));
    }
    files
}

/// Escapes `:` and `\` for pgpass-style files.
fn pgpass_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

/// Quotes a value for postgresql.conf / pgpool.conf (single quotes doubled).
fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

//! ConfigMaps and Secrets: rendered configuration files and the credentials.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;

use super::{cluster_labels, meta, with_hash, Owner};
use crate::credentials::Credentials;
use crate::labels;
use crate::plan::Plan;
use crate::render::{self, ConfigFile};

/// Name of the Secret whose `tls.crt` and `tls.key` the balancers present: the user's, or
/// the generated one. `None` while TLS is off.
pub fn balancer_tls_name(plan: &Plan) -> Option<String> {
    (plan.balancer.tls != pgbalancer_crd::TlsMode::Disabled).then(|| {
        plan.balancer
            .certificate_secret
            .clone()
            .unwrap_or_else(|| format!("{}-tls", crate::plan::balancer_name(&plan.cluster)))
    })
}

/// The generated balancer certificate as a `kubernetes.io/tls` Secret, with the CA that
/// signed it in `ca.crt`; created once, never overwritten.
pub fn balancer_tls_secret(
    name: &str,
    plan: &Plan,
    owner: &Owner,
    bundle: &crate::tls::TlsBundle,
) -> Secret {
    let data = [
        ("tls.crt", &bundle.cert),
        ("tls.key", &bundle.key),
        ("ca.crt", &bundle.ca_cert),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    Secret {
        metadata: meta(owner, name, labels::cluster(&plan.cluster)),
        data: Some(data),
        type_: Some("kubernetes.io/tls".into()),
        ..Default::default()
    }
}

/// Name of the generated credentials Secret.
pub fn credentials_name(cluster: &str) -> String {
    format!("{cluster}-credentials")
}

/// The credentials Secret, created once and never overwritten.
pub fn credentials_secret(plan: &Plan, owner: &Owner, creds: &Credentials) -> Secret {
    // A struct of strings always serialises.
    let value = serde_json::to_value(creds).unwrap_or_default();
    let data = value
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        ByteString(v.as_str().unwrap_or_default().as_bytes().to_vec()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Secret {
        metadata: meta(
            owner,
            &credentials_name(&plan.cluster),
            labels::cluster(&plan.cluster),
        ),
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// Credentials read back from a Secret; `None` names the first missing key.
pub fn credentials_from_secret(secret: &Secret) -> Result<Credentials, String> {
    let data = secret.data.clone().unwrap_or_default();
    let mut map = serde_json::Map::new();
    for (k, v) in data {
        map.insert(
            k,
            serde_json::Value::String(String::from_utf8_lossy(&v.0).into_owned()),
        );
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| e.to_string())
}

fn split(files: Vec<ConfigFile>) -> (BTreeMap<String, String>, BTreeMap<String, ByteString>) {
    let mut plain = BTreeMap::new();
    let mut secret = BTreeMap::new();
    for f in files {
        // Keys cannot hold '/': `secrets/x` becomes key `x`, mounted back under `secrets/`.
        let key = f.path.rsplit('/').next().unwrap_or(f.path).to_owned();
        if f.secret {
            secret.insert(key, ByteString(f.contents.into_bytes()));
        } else {
            plain.insert(key, f.contents);
        }
    }
    (plain, secret)
}

/// Name of the PostgreSQL ConfigMap.
pub fn postgres_config_name(cluster: &str) -> String {
    format!("{cluster}-postgres")
}

/// Name of the balancer ConfigMap.
pub fn balancer_config_name(cluster: &str) -> String {
    crate::plan::balancer_name(cluster)
}

/// `postgresql.conf` and `pg_hba.conf`.
pub fn postgres_config(plan: &Plan, owner: &Owner, creds: &Credentials) -> ConfigMap {
    let (plain, _) = split(render::postgres_files(plan, creds));
    with_hash(
        ConfigMap {
            metadata: meta(
                owner,
                &postgres_config_name(&plan.cluster),
                cluster_labels(plan, labels::POSTGRES),
            ),
            data: Some(plain),
            ..Default::default()
        },
        |c| &mut c.metadata,
    )
}

/// The PostgreSQL secret files (passwords, pgpass).
pub fn postgres_secret(plan: &Plan, owner: &Owner, creds: &Credentials) -> Secret {
    let (_, secret) = split(render::postgres_files(plan, creds));
    with_hash(
        Secret {
            metadata: meta(
                owner,
                &postgres_config_name(&plan.cluster),
                cluster_labels(plan, labels::POSTGRES),
            ),
            data: Some(secret),
            type_: Some("Opaque".into()),
            ..Default::default()
        },
        |s| &mut s.metadata,
    )
}

/// `pgpool.conf`, `pool_hba.conf`, `pcp.conf`.
pub fn balancer_config(plan: &Plan, owner: &Owner, creds: &Credentials) -> ConfigMap {
    let (plain, _) = split(render::balancer_files(plan, creds));
    with_hash(
        ConfigMap {
            metadata: meta(
                owner,
                &balancer_config_name(&plan.cluster),
                cluster_labels(plan, labels::BALANCER),
            ),
            data: Some(plain),
            ..Default::default()
        },
        |c| &mut c.metadata,
    )
}

/// The balancer's secret files (pool_passwd, pcppass, monitor password, API token).
pub fn balancer_secret(plan: &Plan, owner: &Owner, creds: &Credentials) -> Secret {
    let (_, secret) = split(render::balancer_files(plan, creds));
    with_hash(
        Secret {
            metadata: meta(
                owner,
                &balancer_config_name(&plan.cluster),
                cluster_labels(plan, labels::BALANCER),
            ),
            data: Some(secret),
            type_: Some("Opaque".into()),
            ..Default::default()
        },
        |s| &mut s.metadata,
    )
}

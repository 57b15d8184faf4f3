//! TLS between clients and the balancer: the certificate the balancers present when the
//! cluster does not name one of its own (a CA of the cluster's and a certificate for the
//! balancer's names, generated once; the CA's key is not kept, so nothing else can be signed
//! with it), and the engine's server configuration read from PEM files.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio_rustls::rustls;

/// Path of the certificate chain, relative to the configuration directory.
pub const CERT_FILE: &str = "tls/tls.crt";
/// Path of the private key, relative to the configuration directory.
pub const KEY_FILE: &str = "tls/tls.key";

/// Days a generated certificate is valid.
const VALID_DAYS: i64 = 3650;

/// A generated CA certificate and the balancer certificate it signed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TlsBundle {
    /// The CA certificate (PEM): what clients verify the balancer with.
    pub ca_cert: String,
    /// The balancer's certificate (PEM).
    pub cert: String,
    /// The balancer certificate's private key (PEM, PKCS#8).
    pub key: String,
    /// The names and addresses the certificate is for.
    pub names: Vec<String>,
}

impl std::fmt::Debug for TlsBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsBundle")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// Generating a certificate failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot generate the balancer's TLS certificate")]
pub struct GenerateError(#[from] rcgen::Error);

/// The names a client may reach the balancers of `cluster` by: loopback, the Docker
/// containers' names (every possible balancer index), `extra` (an explicit hostname, a bind
/// address), and with a namespace the Kubernetes Service's names.
pub fn balancer_names(cluster: &str, namespace: Option<&str>, extra: &[String]) -> Vec<String> {
    let service = crate::plan::balancer_name(cluster);
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    names.push(service.clone());
    for i in 1..pgbalancer_crd::MAX_BALANCER_INSTANCES {
        names.push(format!("{service}-{i}"));
    }
    if let Some(ns) = namespace {
        names.push(format!("{service}.{ns}"));
        names.push(format!("{service}.{ns}.svc"));
        names.push(format!("{service}.{ns}.svc.cluster.local"));
    }
    for e in extra {
        if !e.is_empty() && !names.contains(e) && !matches!(e.as_str(), "0.0.0.0" | "::") {
            names.push(e.clone());
        }
    }
    names
}

/// A new CA for `cluster` and a certificate for `names` signed by it (ECDSA P-256).
pub fn generate(cluster: &str, names: &[String]) -> Result<TlsBundle, GenerateError> {
    // A day back, so that a client whose clock is a little behind accepts it.
    let now = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let until = now + time::Duration::days(VALID_DAYS);
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name = dn(&format!("{cluster} balancer CA"));
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca.not_before = now;
    ca.not_after = until;
    let ca_cert = ca.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut leaf = rcgen::CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name = dn(&crate::plan::balancer_name(cluster));
    leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
    leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now;
    leaf.not_after = until;
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(TlsBundle {
        ca_cert: ca_cert.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
        names: names.to_vec(),
    })
}

fn dn(common_name: &str) -> rcgen::DistinguishedName {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "pgbalancer");
    dn.push(rcgen::DnType::CommonName, common_name);
    dn
}

/// The ALPN protocol name of PostgreSQL connections (PostgreSQL 17).
pub const ALPN: &[u8] = b"postgresql";

/// The TLS server configuration of the balancer's port: the certificate chain and key in PEM,
/// TLS 1.2 and 1.3, ALPN `postgresql`.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{CERT_FILE}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{CERT_FILE}: no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("{KEY_FILE}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{CERT_FILE} and {KEY_FILE}: {e}"))?;
    // PostgreSQL's protocol name: a client offering another one is refused in the handshake,
    // and one that connects with TLS directly (no `SSLRequest` first) must offer it.
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_is_for_the_balancer_names_and_signed_by_its_ca() {
        let names = balancer_names("demo", Some("prod"), &["10.1.2.3".into(), "0.0.0.0".into()]);
        for n in ["localhost", "127.0.0.1", "demo-balancer", "demo-balancer-7"] {
            assert!(names.contains(&n.to_owned()), "{n}");
        }
        assert!(names.contains(&"demo-balancer.prod.svc".to_owned()));
        assert!(names.contains(&"10.1.2.3".to_owned()));
        assert!(!names.contains(&"0.0.0.0".to_owned()));
        let a = generate("demo", &names).unwrap();
        let b = generate("demo", &names).unwrap();
        assert_ne!(a.key, b.key, "keys are random");
        assert!(!format!("{a:?}").contains("PRIVATE"), "Debug prints no key");
        // The engine's server configuration takes it, and speaks only PostgreSQL (ALPN).
        let config = server_config(a.cert.as_bytes(), a.key.as_bytes()).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"postgresql".to_vec()]);
        // The certificate verifies against its CA for each name, not against the other CA.
        use rustls::client::danger::ServerCertVerifier;
        let verify = |bundle: &TlsBundle, ca: &str, name: &str| {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
                .unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            let leaf = CertificateDer::from_pem_slice(bundle.cert.as_bytes()).unwrap();
            verifier.verify_server_cert(
                &leaf,
                &[],
                &rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                rustls_pki_types::UnixTime::now(),
            )
        };
        for name in [
            "localhost",
            "127.0.0.1",
            "demo-balancer-3",
            "demo-balancer.prod",
        ] {
            verify(&a, &a.ca_cert, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(verify(&a, &a.ca_cert, "other-host").is_err());
        assert!(verify(&a, &b.ca_cert, "localhost").is_err());
    }

    #[test]
    fn files_that_are_not_a_certificate_and_key_are_named() {
        let e = server_config(b"not pem", b"").unwrap_err();
        assert!(e.contains(CERT_FILE), "{e}");
        let bundle = generate("demo", &["localhost".into()]).unwrap();
        let e = server_config(bundle.cert.as_bytes(), b"garbage").unwrap_err();
        assert!(e.contains(KEY_FILE), "{e}");
    }
}

//! TLS between clients and the balancer, on real engines in Docker: a cluster with
//! `tls: {mode: required}` on the native engine, then on pgpool with `enabled`, then TLS
//! turned off. Clients verify the balancer with the CA `pgbalancer status` names (rustls
//! through tokio-postgres, and psql through libpq and OpenSSL), plain connections are
//! refused only while TLS is required, and a CA of another cluster is not accepted. The
//! native engine also takes PostgreSQL 17's direct TLS, only with the `postgresql` ALPN.

mod common;

use std::process::Command;

use common::*;
use pgbalancer_controller::pg;
use serde_json::Value;
use tokio_postgres::Client;

const NAME: &str = "it-tls";

fn ca_file(doc: &Value) -> String {
    doc["balancer"]["caFile"]
        .as_str()
        .unwrap_or_else(|| panic!("no CA file while TLS is on: {doc}"))
        .to_owned()
}

/// psql with `conninfo`; its output and whether it succeeded.
fn psql(conninfo: &str, password: &str) -> (bool, String) {
    let out = Command::new("psql")
        .args([conninfo, "-Atc", "SELECT 1", "-c", "\\conninfo"])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql");
    (out.status.success(), text(&out))
}

/// `SELECT n` on a connection as it was opened, or why it could not be.
async fn select(connected: Result<Client, pg::PgError>, n: i32) -> Result<i32, String> {
    let client =
        connected.map_err(|e| pgbalancer_controller::local::controller::error_chain(&e))?;
    let row = client
        .query_one("SELECT $1::int", &[&n])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

/// A query over TLS, verifying the balancer with the CA certificate `ca_pem`.
async fn over_tls(port: u16, password: &str, ca_pem: &str) -> Result<i32, String> {
    let connected = pg::connect_tls("127.0.0.1", port, "app", password, "app", ca_pem).await;
    select(connected, 7).await
}

/// A query over PostgreSQL 17's direct TLS (no `SSLRequest` first), naming the `postgresql`
/// protocol (ALPN) or not.
async fn direct_tls(port: u16, password: &str, ca_pem: &str, alpn: bool) -> Result<i32, String> {
    let mut tls = pg::tls_client_config(ca_pem).map_err(|e| e.to_string())?;
    if alpn {
        tls.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    let mut config = tokio_postgres::Config::new();
    config
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .ssl_negotiation(tokio_postgres::config::SslNegotiation::Direct);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
    let connected = pg::connect_with(config, "127.0.0.1", port, "app", password, "app", tls).await;
    select(connected, 9).await
}

async fn in_plain_text(port: u16, password: &str) -> Result<i32, String> {
    select(
        pg::connect_with(
            tokio_postgres::Config::new(),
            "127.0.0.1",
            port,
            "app",
            password,
            "app",
            tokio_postgres::NoTls,
        )
        .await,
        8,
    )
    .await
}

/// Both ways a client verifies the balancer: rustls and psql (`verify-full`, by address and
/// by name), and a CA of another cluster refused.
async fn verified(port: u16, password: &str, ca: &str) {
    let pem = std::fs::read_to_string(ca).unwrap();
    assert_eq!(over_tls(port, password, &pem).await, Ok(7));
    for host in ["127.0.0.1", "localhost"] {
        let (ok, out) = psql(
            &format!("postgresql://app@{host}:{port}/app?sslmode=verify-full&sslrootcert={ca}"),
            password,
        );
        assert!(ok, "psql verify-full to {host}: {out}");
        assert!(out.to_lowercase().contains("ssl connection"), "{out}");
    }
    let other = pgbalancer_controller::tls::generate("other", &["localhost".into()]).unwrap();
    let e = over_tls(port, password, &other.ca_cert)
        .await
        .expect_err("a certificate signed by another CA was accepted");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_verify_the_balancer_and_plain_text_is_refused_when_tls_is_required() {
    let s = Scenario::new(NAME);
    let spec =
        |balancer: &str| cluster_yaml(NAME, &format!("  replicas: 1\n  balancer: {balancer}\n"));
    let file = s.file("c.yaml", &spec("{engine: native, tls: {mode: required}}"));
    assert_success(&s.pgbalancer(&["up", "-f", file.to_str().unwrap()]));
    let doc = s.status(NAME);
    assert_eq!(doc["balancer"]["tls"], "required");
    let password = doc["secrets"]["password"].as_str().unwrap().to_owned();
    let port = doc["balancer"]["port"].as_u64().unwrap() as u16;
    let ca = ca_file(&doc);
    assert!(std::fs::read_to_string(&ca)
        .unwrap()
        .contains("BEGIN CERTIFICATE"));

    // Native engine, TLS required.
    verified(port, &password, &ca).await;
    let e = in_plain_text(port, &password)
        .await
        .expect_err("a plain-text session was accepted while TLS is required");
    assert!(e.contains("TLS"), "{e}");
    let (ok, out) = psql(
        &format!("postgresql://app@127.0.0.1:{port}/app?sslmode=disable"),
        &password,
    );
    assert!(!ok && out.contains("TLS"), "{out}");
    // Direct TLS (PostgreSQL 17's sslnegotiation=direct), which must name the protocol.
    let pem = std::fs::read_to_string(&ca).unwrap();
    assert_eq!(direct_tls(port, &password, &pem, true).await, Ok(9));
    let e = direct_tls(port, &password, &pem, false)
        .await
        .expect_err("direct TLS without ALPN was accepted");
    assert!(e.contains("ALPN"), "{e}");

    // Load over TLS: pgbench's initialisation (COPY in) and a select-only run with the
    // extended protocol, no transaction failed.
    let pgbench = |args: &[&str]| {
        let out = Command::new("pgbench")
            .args(args)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "app",
                "app",
            ])
            .env("PGPASSWORD", &password)
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", &ca)
            .output()
            .expect("pgbench");
        (out.status.success(), text(&out))
    };
    let (ok, out) = pgbench(&["-i", "-s", "1", "-q"]);
    assert!(ok, "pgbench -i over TLS: {out}");
    let (ok, out) = pgbench(&[
        "-n", "-S", "-M", "extended", "-c", "4", "-j", "2", "-T", "3",
    ]);
    assert!(ok, "pgbench over TLS: {out}");
    let failed = out
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(failed.starts_with("0 "), "{out}");
    let processed: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(processed > 100, "{out}");

    // pgpool, TLS enabled: the same certificate; plain text accepted too.
    std::fs::write(&file, spec("{engine: pgpool, tls: {mode: enabled}}")).unwrap();
    assert_success(&s.pgbalancer(&["up", "-f", file.to_str().unwrap()]));
    let doc = s.status(NAME);
    let port = doc["balancer"]["port"].as_u64().unwrap() as u16;
    assert_eq!(ca_file(&doc), ca, "the CA changed with the engine");
    verified(port, &password, &ca).await;
    assert_eq!(in_plain_text(port, &password).await, Ok(8));

    // pgpool, TLS required: plain text refused by pgpool's pool_hba.conf.
    std::fs::write(&file, spec("{engine: pgpool, tls: {mode: required}}")).unwrap();
    assert_success(&s.pgbalancer(&["up", "-f", file.to_str().unwrap()]));
    let port = s.status(NAME)["balancer"]["port"].as_u64().unwrap() as u16;
    let pem = std::fs::read_to_string(&ca).unwrap();
    assert_eq!(over_tls(port, &password, &pem).await, Ok(7));
    let e = in_plain_text(port, &password)
        .await
        .expect_err("pgpool accepted a plain-text session while TLS is required");
    assert!(e.contains("pool_hba") || e.contains("SSL off"), "{e}");

    // TLS off: plain text works, a client requiring TLS is told no, the CA file is gone.
    std::fs::write(&file, spec("{engine: native}")).unwrap();
    assert_success(&s.pgbalancer(&["up", "-f", file.to_str().unwrap()]));
    let doc = s.status(NAME);
    let port = doc["balancer"]["port"].as_u64().unwrap() as u16;
    assert_eq!(doc["balancer"]["tls"], "disabled");
    assert!(doc["balancer"]["caFile"].is_null(), "{doc}");
    assert!(!std::path::Path::new(&ca).exists(), "the CA file stayed");
    assert_eq!(in_plain_text(port, &password).await, Ok(8));
    let (ok, out) = psql(
        &format!("postgresql://app@127.0.0.1:{port}/app?sslmode=require"),
        &password,
    );
    assert!(!ok && out.contains("SSL"), "{out}");
    let e = direct_tls(port, &password, &pem, true)
        .await
        .expect_err("direct TLS was accepted with TLS off");
    assert!(!e.is_empty());

    assert_success(&s.pgbalancer(&["down", NAME]));
}

#[test]
fn a_kubernetes_certificate_secret_is_refused_on_docker_naming_the_field() {
    let s = Scenario::new("it-tls-bad");
    let file = s.file(
        "c.yaml",
        &cluster_yaml(
            "it-tls-bad",
            "  replicas: 0\n  balancer: {tls: {mode: enabled, certificateSecret: my-cert}}\n",
        ),
    );
    let out = s.pgbalancer(&["up", "-f", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("spec.balancer.tls.certificateSecret"),
        "{said}"
    );
    assert!(
        labelled("it-tls-bad").is_empty(),
        "refused input created containers"
    );
}

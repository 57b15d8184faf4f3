//! PostgreSQL access shared by every backend (IO): connect with a bounded time, read an
//! instance's role and replication position, the primary's view of its standbys, manage
//! replication slots, promote, and read a balancer's node list. Nothing here decides; the
//! reconcile core does that with what these functions return.

pub mod login_lookup;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, SimpleQueryMessage};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};

use crate::backend::WalReceiver;
use crate::pool_node::{PoolNode, RowError};

/// Longest a connection attempt may take, DNS and authentication included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// A failed connection or statement.
#[derive(Debug, Error)]
pub enum PgError {
    /// The server could not be reached or refused the login.
    #[error("cannot connect to {address} as {user}")]
    Connect {
        address: String,
        user: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// TLS could not be set up on this side.
    #[error("TLS: {0}")]
    Tls(String),
    /// The connection attempt did not finish in time.
    #[error("connecting to {address} timed out")]
    Timeout { address: String },
    /// A statement failed.
    #[error("{what}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A balancer answered `SHOW POOL_NODES` with a row that names no node.
    #[error("unreadable SHOW POOL_NODES answer")]
    PoolNodes(#[source] RowError),
}

fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |source| PgError::Query { what, source }
}

/// Opens a connection, encrypted when the server offers TLS (`sslmode=prefer`, the
/// certificate not checked, as in [`connect_encrypted`]): the instances serve TLS, so the
/// superuser's and the monitoring role's logins and queries do not cross the network in clear;
/// a balancer without `spec.balancer.tls` answers in plain text. The connection task ends
/// when the client is dropped.
pub async fn connect(
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Client, PgError> {
    connect_unverified(SslMode::Prefer, host, port, user, password, db).await
}

/// Opens a TLS connection (`sslmode=verify-full`): the server's certificate must be signed by
/// the CA `ca_pem` and be for `host`.
pub async fn connect_tls(
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    db: &str,
    ca_pem: &str,
) -> Result<Client, PgError> {
    let mut config = Config::new();
    config.ssl_mode(SslMode::Require);
    let tls = tls_client_config(ca_pem)?;
    connect_with(
        config,
        host,
        port,
        user,
        password,
        db,
        tokio_postgres_rustls::MakeRustlsConnect::new(tls),
    )
    .await
}

/// Opens an encrypted connection without checking the server's certificate
/// (`sslmode=require`): the instances serve self-signed ones. It keeps what crosses the
/// network from anyone watching it, not from one who can redirect it.
pub async fn connect_encrypted(
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Client, PgError> {
    connect_unverified(SslMode::Require, host, port, user, password, db).await
}

/// Opens a connection in TLS mode `mode`, taking any server certificate.
async fn connect_unverified(
    mode: SslMode,
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Client, PgError> {
    let mut config = Config::new();
    config.ssl_mode(mode);
    // Made once: its session store then lets the probes' later handshakes resume.
    static TLS: std::sync::OnceLock<Result<rustls::ClientConfig, String>> =
        std::sync::OnceLock::new();
    let tls = TLS
        .get_or_init(|| encrypted_client_config().map_err(|e| e.to_string()))
        .clone()
        .map_err(PgError::Tls)?;
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
    connect_with(config, host, port, user, password, db, tls).await
}

/// A TLS client configuration that takes any server certificate (its handshake signature is
/// still checked against it).
fn encrypted_client_config() -> Result<rustls::ClientConfig, PgError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Takes any server certificate: encryption without authentication.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client configuration trusting only the CA certificates in `ca_pem`.
pub fn tls_client_config(ca_pem: &str) -> Result<tokio_rustls::rustls::ClientConfig, PgError> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()).flatten() {
        // A CA that does not parse leaves the store empty: the handshake then fails, named.
        let _ = roots.add(cert);
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Opens a connection with `config`'s settings and these; the connection task ends when the
/// client is dropped.
pub async fn connect_with<T>(
    mut config: Config,
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    db: &str,
    tls: T,
) -> Result<Client, PgError>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let address = format!("{host}:{port}");
    config
        .host(host)
        .port(port)
        .user(user)
        .password(password)
        .dbname(db)
        .application_name("pgbalancer")
        .connect_timeout(CONNECT_TIMEOUT);
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT * 2, config.connect(tls))
        .await
        .map_err(|_| PgError::Timeout {
            address: address.clone(),
        })?
        .map_err(|source| PgError::Connect {
            address,
            user: user.to_owned(),
            source,
        })?;
    tokio::spawn(async move {
        // The connection ends with an error when the server goes away; the client's next
        // call reports it, so there is nothing to add here.
        let _ = connection.await;
    });
    Ok(client)
}

/// Role and replication position of one instance, read in one round trip.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// Timeline the instance writes (primary) or last received/checkpointed (standby).
    pub timeline: Option<u32>,
    /// WAL received (standby) or written (primary), in bytes from `0/0`. A standby that has
    /// not streamed since it started (its primary is gone) reports what it replayed from its
    /// own WAL, which is all it holds: it can still be chosen to replace that primary.
    pub received_lsn: Option<u64>,
    /// WAL replayed (standby) or written (primary), in bytes from `0/0`.
    pub replayed_lsn: Option<u64>,
    /// The standby's WAL receiver, when one runs.
    pub receiver: Option<WalReceiver>,
    /// The database system identifier: the same on a primary and all its standbys.
    pub system_identifier: Option<u64>,
    /// A standby whose received position is what it replayed (nothing streamed since it
    /// started): it may hold more WAL than that, not yet replayed.
    pub replay_only: bool,
}

const POSITION: &str = "\
SELECT r,
  pg_wal_lsn_diff(CASE WHEN r THEN GREATEST(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) ELSE pg_current_wal_lsn() END, '0/0')::bigint,
  pg_wal_lsn_diff(CASE WHEN r THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, '0/0')::bigint,
  CASE WHEN r THEN COALESCE(w.received_tli, (SELECT timeline_id FROM pg_control_checkpoint()))
       ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
  w.status, w.sender_host, (SELECT system_identifier FROM pg_control_system()),
  r AND pg_last_wal_receive_lsn() IS NULL
FROM (SELECT pg_is_in_recovery() AS r) s LEFT JOIN pg_stat_wal_receiver w ON true";

/// Role, timeline, LSNs and WAL receiver of the instance `client` is connected to.
pub async fn position(client: &Client) -> Result<Position, PgError> {
    let row = client
        .query_one(POSITION, &[])
        .await
        .map_err(query("reading the replication position"))?;
    let lsn = |i: usize| row.get::<_, Option<i64>>(i).map(|v| v.max(0) as u64);
    let status: Option<String> = row.get(4);
    Ok(Position {
        in_recovery: row.get(0),
        received_lsn: lsn(1),
        replayed_lsn: lsn(2),
        timeline: row.get::<_, Option<i32>>(3).map(|t| t.max(0) as u32),
        receiver: status.map(|status| WalReceiver {
            status,
            sender_host: row.get(5),
        }),
        system_identifier: row.get::<_, Option<i64>>(6).map(|v| v as u64),
        replay_only: row.get::<_, Option<bool>>(7).unwrap_or(false),
    })
}

/// Fills what SQL shows of the instance `client` answers for: it accepts connections, and,
/// when the queries answer, its role, timeline, LSNs, WAL receiver and slots. The same for
/// every backend.
pub async fn observe_instance(client: &Client, seen: &mut crate::backend::ObservedInstance) {
    seen.accepting = true;
    if let Ok(position) = position(client).await {
        seen.in_recovery = Some(position.in_recovery);
        seen.timeline = position.timeline;
        seen.received_lsn = position.received_lsn;
        seen.replayed_lsn = position.replayed_lsn;
        seen.receiver = position.receiver;
        seen.system_identifier = position.system_identifier;
        seen.replay_only = position.replay_only;
    }
    if let Ok(slots) = slots(client).await {
        seen.slots = Some(slots.into_iter().collect());
    }
    if seen.in_recovery == Some(false) {
        seen.lookup_schema = login_lookup::has_schema(client).await.ok();
    }
}

/// The primary's view of its standbys: `application_name` → (state, replay lag in bytes).
pub async fn standbys(client: &Client) -> Result<HashMap<String, (String, i64)>, PgError> {
    let rows = client
        .query(
            "SELECT application_name, state, \
             COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint \
             FROM pg_stat_replication",
            &[],
        )
        .await
        .map_err(query("reading pg_stat_replication"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                // `state` is NULL to a role that may not see the walsender; an empty state
                // reads as not streaming.
                (r.get::<_, Option<String>>(1).unwrap_or_default(), r.get(2)),
            )
        })
        .collect())
}

/// Physical replication slots: name → in use.
pub async fn slots(client: &Client) -> Result<HashMap<String, bool>, PgError> {
    let rows = client
        .query(
            "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_type = 'physical'",
            &[],
        )
        .await
        .map_err(query("reading pg_replication_slots"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Creates physical slot `slot` reserving WAL from now on, unless it exists.
pub async fn create_slot(client: &Client, slot: &str) -> Result<(), PgError> {
    client
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await
        .map_err(query("creating a replication slot"))?;
    Ok(())
}

/// Drops physical slot `slot` when it is not in use; true when no such slot remains.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<bool, PgError> {
    let rows = client
        .query(
            "SELECT active, CASE WHEN NOT active THEN pg_drop_replication_slot(slot_name) IS NULL END \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query("dropping a replication slot"))?;
    Ok(rows.iter().all(|r| !r.get::<_, bool>(0)))
}

/// Makes the physical slots on the instance `client` is connected to what its role needs:
/// on the primary `wanted` (created when missing), and no other `instance_*` slot that is not
/// in use (dropped). A slot in use is never dropped: its standby has not disconnected yet.
pub async fn reconcile_slots(client: &Client, wanted: &[&str]) -> Result<(), PgError> {
    let existing = slots(client).await?;
    for slot in wanted {
        if !existing.contains_key(*slot) {
            create_slot(client, slot).await?;
            tracing::info!(%slot, "created replication slot");
        }
    }
    for (slot, active) in existing {
        if !active && crate::plan::is_instance_slot(&slot) && !wanted.contains(&slot.as_str()) {
            drop_slot(client, &slot).await?;
            tracing::info!(%slot, "dropped replication slot");
        }
    }
    Ok(())
}

/// Promotes the standby `client` is connected to and waits (up to 30 s) until it accepts
/// writes. True when it is a primary now.
pub async fn promote(client: &Client) -> Result<bool, PgError> {
    let row = client
        .query_one("SELECT pg_promote(true, 30)", &[])
        .await
        .map_err(query("pg_promote"))?;
    Ok(row.get(0))
}

/// `SHOW POOL_NODES` through a balancer (pgpool or the native engine).
pub async fn pool_nodes(client: &Client) -> Result<Vec<PoolNode>, PgError> {
    let messages = client
        .simple_query("SHOW POOL_NODES")
        .await
        .map_err(query("SHOW POOL_NODES"))?;
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .map(|row| PoolNode::from_row(|name| row.try_get(name).ok().flatten()))
        .collect::<Result<_, _>>()
        .map_err(PgError::PoolNodes)
}

//! A client connection's first steps: TLS when the client asks and the balancer has a
//! certificate (refused cleanly with `N` otherwise, as GSS encryption always is; required of
//! every client when so configured; PostgreSQL 17's direct TLS, without `SSLRequest`, too), cancel requests passed to the server running the query,
//! the startup parameters checked, SCRAM authentication against the verifier the primary holds
//! for the user (or, without the lookup, the one made from `pool_passwd`), and the first server connection (the primary, or a replica while there
//! is none) whose parameters the client gets.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::net::TcpStream;

use super::client::ClientStream;
use super::scram::{Exchange, Keys, MECHANISM};
use super::server::{ConnectError, Login, Server};
use super::session::Session;
use super::verifiers::Lookup;
use super::wire::{self, Startup, WireError};
use super::{Engine, TlsMode};

/// Longest a client may take from connecting to being logged in (PostgreSQL's default
/// `authentication_timeout`): a client that stalls in a TLS handshake or in authentication
/// holds nothing longer.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How a connection opened.
enum Opening {
    /// A session's startup packet, on a plain or TLS connection.
    Session(ClientStream, Vec<(String, String)>),
    /// Nothing more comes on this connection: a cancel request was passed on, or a direct TLS
    /// connection was refused.
    Ended,
}

/// Serves one client connection until it ends.
pub async fn serve(engine: Arc<Engine>, tcp: TcpStream) -> Result<(), WireError> {
    // Only latency depends on it: the session works without `TCP_NODELAY`.
    let _ = tcp.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    let opened = tokio::time::timeout_at(deadline, open(&engine, tcp))
        .await
        .map_err(|_| WireError::Protocol("no startup packet in time".into()))??;
    let (mut client, params) = match opened {
        Opening::Session(client, params) => (client, params),
        Opening::Ended => return Ok(()),
    };
    if engine.settings.tls == TlsMode::Required && !client.is_tls() {
        return fatal(
            &mut client,
            "28000",
            "the balancer accepts TLS connections only: connect with sslmode=require, or \
             verify-full with the cluster's CA",
        )
        .await;
    }
    let param = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let Some(user) = param("user").filter(|u| !u.is_empty()) else {
        return fatal(
            &mut client,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
    };
    if param("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        return fatal(
            &mut client,
            "08P01",
            "replication connections are not accepted by the balancer; connect to the instance",
        )
        .await;
    }
    let mut rbuf = BytesMut::with_capacity(8192);
    let authenticated = tokio::time::timeout_at(
        deadline,
        authenticate(&engine, &mut client, &mut rbuf, &user),
    )
    .await;
    let Ok(authenticated) = authenticated else {
        return fatal(&mut client, "08006", "authentication timed out").await;
    };
    let login = match authenticated? {
        Some(login) => login,
        None => {
            let message = format!("password authentication failed for user \"{user}\"");
            return fatal(&mut client, "28P01", &message).await;
        }
    };
    let mut server_params = params.clone();
    if param("database").is_none() {
        server_params.push(("database".into(), user.clone()));
    }
    let Some(first) = engine.primary().or_else(|| engine.replica_any()) else {
        return fatal(&mut client, "57P03", "no database server is available").await;
    };
    let server = match Server::connect(first, &server_params, &user, &login).await {
        Ok(s) => s,
        Err(ConnectError::Refused(error)) => {
            client.send(&error.frame).await?;
            return Ok(());
        }
        Err(e @ ConnectError::PasswordChanged { .. }) => {
            return fatal(&mut client, "28P01", &e.to_string()).await;
        }
        Err(e) => {
            tracing::info!(error = %e, "first server connection failed");
            return fatal(&mut client, "57P03", "the database server is not available").await;
        }
    };
    let (cancel_key, slot) = engine.register_session(server.key.0);
    let mut out = BytesMut::with_capacity(1024);
    wire::put(&mut out, b'R', &0i32.to_be_bytes());
    for p in &server.parameters {
        out.extend_from_slice(&p.frame);
    }
    let mut key = Vec::with_capacity(8);
    key.put_i32(cancel_key.0);
    key.put_i32(cancel_key.1);
    wire::put(&mut out, b'K', &key);
    wire::ready(&mut out, b'I');
    client.send(&out).await?;
    let mut session = Session::new(
        engine.clone(),
        client,
        rbuf,
        server_params,
        user,
        login,
        server,
        slot,
    );
    let result = session.run().await;
    engine.unregister_session(cancel_key);
    result
}

/// Reads the startup packet, after TLS when the client asks for it and the balancer has a
/// certificate (`N` otherwise, and always to GSS encryption).
async fn open(engine: &Engine, tcp: TcpStream) -> Result<Opening, WireError> {
    let mut client = match direct_tls(engine, tcp).await? {
        Some(client) => client,
        None => return Ok(Opening::Ended),
    };
    loop {
        match wire::read_startup(&mut client).await? {
            Startup::Ssl => match (client, engine.tls_acceptor()) {
                (ClientStream::Plain(mut tcp), Some(acceptor)) => {
                    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"S").await?;
                    client = ClientStream::Tls(Box::new(acceptor.accept(tcp).await?));
                }
                (mut other, _) => {
                    other.send(b"N").await?;
                    client = other;
                }
            },
            Startup::GssEnc => client.send(b"N").await?,
            Startup::Cancel(pid, secret) => {
                engine.cancel(pid, secret).await;
                return Ok(Opening::Ended);
            }
            Startup::Params(params) => return Ok(Opening::Session(client, params)),
        }
    }
}

/// PostgreSQL 17's direct TLS (`sslnegotiation=direct`): a connection whose first byte starts
/// a TLS handshake gets TLS at once, without `SSLRequest`, when the balancer has a
/// certificate; the client must name the `postgresql` protocol (ALPN), as PostgreSQL requires
/// so that a TLS connection meant for another service is not taken for one of its own.
/// Without a certificate such a connection is closed (`None`): the client, waiting for a
/// handshake, would not read a PostgreSQL error. Any other connection is returned unchanged.
async fn direct_tls(engine: &Engine, tcp: TcpStream) -> Result<Option<ClientStream>, WireError> {
    /// The first byte of a TLS record carrying a handshake message.
    const TLS_HANDSHAKE: u8 = 0x16;
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 || first[0] != TLS_HANDSHAKE {
        return Ok(Some(ClientStream::Plain(tcp)));
    }
    let Some(acceptor) = engine.tls_acceptor() else {
        tracing::debug!("direct TLS connection refused: TLS is not on");
        return Ok(None);
    };
    let tls = acceptor.accept(tcp).await?;
    let alpn = tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN);
    let mut client = ClientStream::Tls(Box::new(tls));
    if !alpn {
        fatal(
            &mut client,
            "08P01",
            "received direct TLS connection request without ALPN protocol negotiation extension",
        )
        .await?;
        return Ok(None);
    }
    Ok(Some(client))
}

/// SCRAM-SHA-256 against the verifier the primary holds for the user: the session then logs
/// in to servers with the client key the proof yields. Without the lookup (a primary from an
/// earlier version, or none while nothing is kept for the user), against the verifier made
/// from `pool_passwd`, with that password towards servers. An unknown user goes through the
/// same exchange against a decoy verifier with a salt of its own, so neither the exchange nor
/// the answer tells which users exist.
async fn authenticate(
    engine: &Engine,
    client: &mut ClientStream,
    rbuf: &mut BytesMut,
    user: &str,
) -> Result<Option<Login>, WireError> {
    let (verifier, password) = match engine.verifiers.lookup(user, engine.primary()).await {
        Lookup::Found(verifier) => (Some(verifier), None),
        Lookup::Refused => (None, None),
        Lookup::Unavailable => match engine.user(user) {
            Some(known) => (Some(known.verifier), Some(known.password)),
            None => (None, None),
        },
    };
    let mut mechanisms = Vec::new();
    wire::cstr(&mut mechanisms, MECHANISM);
    mechanisms.push(0);
    authentication(client, 10, &mechanisms).await?;
    let first = wire::read_message(client, rbuf).await?;
    let mut b = first.body();
    let (mechanism, data) = match (first.tag, wire::take_cstr(&mut b)) {
        (b'p', Ok(m)) if b.len() >= 4 => (m.to_owned(), &b[4..]),
        _ => return Err(WireError::Protocol("expected SASLInitialResponse".into())),
    };
    if mechanism != MECHANISM {
        return Ok(None);
    }
    let checked = verifier.clone().unwrap_or_else(|| engine.decoy(user));
    let Ok((exchange, server_first)) = Exchange::start(checked, &String::from_utf8_lossy(data))
    else {
        return Ok(None);
    };
    authentication(client, 11, server_first.as_bytes()).await?;
    let last = wire::read_message(client, rbuf).await?;
    if last.tag != b'p' {
        return Err(WireError::Protocol("expected SASLResponse".into()));
    }
    let Ok((server_final, client_key)) = exchange.finish(&String::from_utf8_lossy(last.body()))
    else {
        return Ok(None);
    };
    let login = match (verifier, password) {
        (Some(_), Some(password)) => Login::Password(password),
        (Some(verifier), None) => Login::Keys(Arc::new(Keys {
            client_key,
            verifier,
        })),
        (None, _) => return Ok(None),
    };
    authentication(client, 12, server_final.as_bytes()).await?;
    Ok(Some(login))
}

/// An `Authentication` request with `code` and its data.
async fn authentication(
    client: &mut ClientStream,
    code: i32,
    data: &[u8],
) -> Result<(), WireError> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    let mut out = BytesMut::new();
    wire::put(&mut out, b'R', &body);
    client.send(&out).await?;
    Ok(())
}

/// Sends a FATAL error and ends the connection.
pub async fn fatal(client: &mut ClientStream, code: &str, message: &str) -> Result<(), WireError> {
    let mut out = BytesMut::new();
    wire::error(&mut out, "FATAL", code, message);
    client.send(&out).await?;
    // Over TLS, a close_notify: the client sees the error, not a truncated connection.
    let _ = tokio::io::AsyncWriteExt::shutdown(client).await;
    Ok(())
}

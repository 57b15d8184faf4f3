//! One connection from the balancer to a server, on behalf of one client session: startup
//! with the client's parameters, authentication as the client's user (SCRAM-SHA-256 with the
//! client key recovered from the client's own login; or, for a user from `pool_passwd`,
//! SCRAM-SHA-256, MD5 or none, whichever the server asks for, with its password), then the server's
//! parameter statuses and key data. What is prepared on it is tracked so that statements can
//! be prepared again on whichever server runs them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::backends::Backend;
use super::classify::Class;
use super::scram::{ClientExchange, Keys, ScramError};
use super::wire::{self, Message, WireError};

/// How long a server may take to accept a connection and finish startup.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a server connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server cannot be reached or broke the protocol.
    #[error("server {host}: {source}")]
    Wire {
        /// Server host.
        host: String,
        /// Cause.
        #[source]
        source: WireError,
    },
    /// The server refused the session: its `ErrorResponse`, to pass on to the client.
    #[error("server refused the session")]
    Refused(Message),
    /// The server holds another verifier for the user than the one the client logged in
    /// with: the password was changed since (pass-through logins only).
    #[error(
        "the password of user \"{user}\" was changed since this session logged in: log in again"
    )]
    PasswordChanged {
        /// The session's user.
        user: String,
    },
    /// The server asked for an authentication method the balancer does not speak.
    #[error("server {host} asks for unsupported authentication {code}")]
    Unsupported {
        /// Server host.
        host: String,
        /// Authentication request code.
        code: i32,
    },
}

/// How the balancer logs in to servers as a client's user.
#[derive(Clone)]
pub enum Login {
    /// With the client key recovered from the client's SCRAM proof (pass-through: no password
    /// is kept).
    Keys(Arc<Keys>),
    /// With the password `pool_passwd` holds for the user (a primary without the verifier
    /// function).
    Password(Arc<str>),
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Keys(_) => "Login::Keys(<redacted>)",
            Self::Password(_) => "Login::Password(<redacted>)",
        })
    }
}

/// A pass-through SCRAM failure, as the protocol error it is towards the server.
fn scram_err(e: super::scram::ScramError) -> WireError {
    WireError::Protocol(format!("SCRAM with the client's key: {e}"))
}

/// A SCRAM exchange in progress towards a server.
enum Sasl {
    /// With a password.
    Password(ScramSha256),
    /// With a client key.
    Keys(ClientExchange),
}

/// What the balancer injected into a server's stream, whose answers the client must not see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swallow {
    /// One message with this tag (`1` ParseComplete, `3` CloseComplete).
    Tag(u8),
    /// Everything up to and including the next `ReadyForQuery` (a replayed setting).
    UntilReady,
}

/// One open server connection.
pub struct Server {
    /// The server.
    pub backend: Arc<Backend>,
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read and not yet split into messages.
    pub rbuf: BytesMut,
    /// `BackendKeyData`: process id and secret, for cancel requests.
    pub key: (i32, i32),
    /// `ParameterStatus` frames of startup.
    pub parameters: Vec<Message>,
    /// Prepared statements by name, with the text they were prepared from.
    pub prepared: HashMap<String, Arc<[u8]>>,
    /// Answers to swallow, in order.
    pub swallow: VecDeque<Swallow>,
    /// Units (a simple query, a batch up to `Sync`) sent and not yet answered with
    /// `ReadyForQuery`, in order.
    pub pending: VecDeque<Pending>,
    /// Session settings replayed on it so far.
    pub settings_applied: usize,
    /// Last transaction status (`I`, `T`, `E`).
    pub status: u8,
    /// The server's epoch when this connection was opened.
    pub epoch: u64,
}

impl Server {
    /// Opens a connection for `params` (the client's startup parameters) as `user`.
    pub async fn connect(
        backend: Arc<Backend>,
        params: &[(String, String)],
        user: &str,
        login: &Login,
    ) -> Result<Self, ConnectError> {
        let host = backend.host.clone();
        let wire_err = |source| ConnectError::Wire {
            host: host.clone(),
            source,
        };
        let backend_epoch = backend.epoch.load(Ordering::Relaxed);
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((backend.host.as_str(), backend.port)),
        )
        .await
        .map_err(|_| wire_err(timed_out()))?
        .map_err(|e| wire_err(e.into()))?;
        // Only latency depends on it: the connection works without `TCP_NODELAY`.
        let _ = stream.set_nodelay(true);
        let mut server = Self {
            backend,
            stream,
            rbuf: BytesMut::with_capacity(8192),
            key: (0, 0),
            parameters: Vec::new(),
            prepared: HashMap::new(),
            swallow: VecDeque::new(),
            pending: VecDeque::new(),
            settings_applied: 0,
            status: b'I',
            epoch: backend_epoch,
        };
        server.backend.sessions.fetch_add(1, Ordering::Relaxed);
        tokio::time::timeout(CONNECT_TIMEOUT, server.startup(params, user, login))
            .await
            .map_err(|_| wire_err(timed_out()))??;
        Ok(server)
    }

    async fn startup(
        &mut self,
        params: &[(String, String)],
        user: &str,
        login: &Login,
    ) -> Result<(), ConnectError> {
        let host = self.backend.host.clone();
        let wire_err = |source| ConnectError::Wire {
            host: host.clone(),
            source,
        };
        self.stream
            .write_all(&wire::startup_packet(params))
            .await
            .map_err(|e| wire_err(e.into()))?;
        let mut scram: Option<Sasl> = None;
        let password = match login {
            Login::Password(p) => Some(&**p),
            Login::Keys(_) => None,
        };
        let unsupported = |code| ConnectError::Unsupported {
            host: host.clone(),
            code,
        };
        loop {
            let m = self.read().await.map_err(wire_err)?;
            match m.tag {
                b'R' => {
                    let body = m.body();
                    let code = i32::from_be_bytes(body[..4].try_into().unwrap_or_default());
                    let mut out = BytesMut::new();
                    match code {
                        // A server that skips SCRAM's final message proves nothing.
                        0 if scram.is_some() => {
                            return Err(wire_err(WireError::Protocol(
                                "authentication ended before SCRAM's final message".into(),
                            )))
                        }
                        0 => continue,
                        3 => {
                            let password = password.ok_or_else(|| unsupported(code))?;
                            let mut p = Vec::new();
                            wire::cstr(&mut p, password);
                            wire::put(&mut out, b'p', &p);
                        }
                        5 => {
                            let password = password.ok_or_else(|| unsupported(code))?;
                            let salt: [u8; 4] = body[4..8].try_into().unwrap_or_default();
                            let hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                password.as_bytes(),
                                salt,
                            );
                            let mut p = Vec::new();
                            wire::cstr(&mut p, &hash);
                            wire::put(&mut out, b'p', &p);
                        }
                        10 => {
                            let (sasl, first) = match login {
                                Login::Password(password) => {
                                    let s = ScramSha256::new(
                                        password.as_bytes(),
                                        ChannelBinding::unsupported(),
                                    );
                                    let first = s.message().to_vec();
                                    (Sasl::Password(s), first)
                                }
                                Login::Keys(keys) => {
                                    let (s, first) = ClientExchange::start(keys.clone());
                                    (Sasl::Keys(s), first.into_bytes())
                                }
                            };
                            let mut p = Vec::new();
                            wire::cstr(&mut p, super::scram::MECHANISM);
                            p.put_i32(first.len() as i32);
                            p.extend_from_slice(&first);
                            wire::put(&mut out, b'p', &p);
                            scram = Some(sasl);
                        }
                        11 => {
                            let data = &body[4..];
                            let next = match scram.as_mut() {
                                Some(Sasl::Password(s)) => s
                                    .update(data)
                                    .map(|()| s.message().to_vec())
                                    .map_err(|e| wire_err(e.into()))?,
                                Some(Sasl::Keys(s)) => {
                                    match s.update(&String::from_utf8_lossy(data)) {
                                        Ok(next) => next.into_bytes(),
                                        Err(ScramError::OtherVerifier) => {
                                            return Err(ConnectError::PasswordChanged {
                                                user: user.to_owned(),
                                            })
                                        }
                                        Err(e) => return Err(wire_err(scram_err(e))),
                                    }
                                }
                                None => {
                                    return Err(wire_err(WireError::Protocol(
                                        "SASL continue before start".into(),
                                    )))
                                }
                            };
                            wire::put(&mut out, b'p', &next);
                        }
                        12 => {
                            let data = &body[4..];
                            match scram.take() {
                                Some(Sasl::Password(mut s)) => {
                                    s.finish(data).map_err(|e| wire_err(e.into()))?
                                }
                                Some(Sasl::Keys(s)) => s
                                    .finish(&String::from_utf8_lossy(data))
                                    .map_err(|e| wire_err(scram_err(e)))?,
                                None => {
                                    return Err(wire_err(WireError::Protocol(
                                        "SASL final before start".into(),
                                    )))
                                }
                            }
                            continue;
                        }
                        code => {
                            return Err(unsupported(code));
                        }
                    }
                    self.stream
                        .write_all(&out)
                        .await
                        .map_err(|e| wire_err(e.into()))?;
                }
                b'S' => self.parameters.push(m),
                b'K' => {
                    let b = m.body();
                    if b.len() >= 8 {
                        self.key = (
                            i32::from_be_bytes(b[..4].try_into().unwrap_or_default()),
                            i32::from_be_bytes(b[4..8].try_into().unwrap_or_default()),
                        );
                    }
                }
                b'Z' => return Ok(()),
                b'E' => return Err(ConnectError::Refused(m)),
                // NoticeResponse and anything else during startup: nothing to do.
                _ => {}
            }
        }
    }

    /// Reads one whole message.
    pub async fn read(&mut self) -> Result<Message, WireError> {
        wire::read_message(&mut self.stream, &mut self.rbuf).await
    }

    /// Whether the server ended this connection while nothing was asked of it: it closed the
    /// socket, or sent an error (the `FATAL` of a terminated backend or an idle timeout, before
    /// it closes). Reads what has arrived without waiting; anything else (a notice) stays
    /// buffered for the session.
    pub fn ended_while_idle(&mut self) -> bool {
        if !self.pending.is_empty() {
            return false;
        }
        // Bounded: a server that keeps sending is caught at the next check.
        for _ in 0..16 {
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return true,
            }
        }
        wire::tags(&self.rbuf).contains(&b'E')
    }

    /// Writes bytes.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.stream.write_all(bytes).await.map_err(Into::into)
    }
}

/// A unit sent to a server and not answered yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Where it was allowed to run.
    pub class: Class,
    /// The session settings it makes, recorded when it succeeds outside a transaction.
    pub settings: Vec<Arc<[u8]>>,
    /// The server answered it with an error.
    pub failed: bool,
}

impl Pending {
    /// A unit of `class` making no setting.
    pub fn of(class: Class) -> Self {
        Self {
            class,
            settings: Vec::new(),
            failed: false,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.backend.sessions.fetch_sub(1, Ordering::Relaxed);
        let in_flight = self.pending.len() as u32;
        if in_flight > 0 {
            self.backend
                .in_flight
                .fetch_sub(in_flight, Ordering::Relaxed);
        }
    }
}

fn timed_out() -> WireError {
    WireError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "timed out",
    ))
}

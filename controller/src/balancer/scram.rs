//! SCRAM-SHA-256 (RFC 5802/7677, as PostgreSQL speaks it), both halves. As a server: clients
//! prove they know the password against a stored verifier; the balancer never sees the
//! password they type, and recovers from the proof the client key, which is what logs in.
//! As a client: with that key and the same verifier (the server's own), the balancer logs the
//! session in to every server without a password (pass-through). Channel binding is not
//! offered, so `p=` requests are refused.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

/// Mechanism name.
pub const MECHANISM: &str = "SCRAM-SHA-256";

/// A stored verifier: what `pg_authid.rolpassword` holds for a SCRAM password.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(<redacted>)")
    }
}

impl Verifier {
    /// A verifier for `password` with a fresh random salt.
    pub fn new(password: &str) -> Self {
        Self::parse(&postgres_protocol::password::scram_sha_256(
            password.as_bytes(),
        ))
        .expect("postgres-protocol writes valid verifiers")
    }

    /// A verifier for a user that may not log in, made from `secret` and the user name as
    /// PostgreSQL makes its mock ones: the same salt for the same name every time, another
    /// for each name, so the exchange does not tell which users exist.
    pub fn decoy(secret: &[u8; 32], user: &str) -> Self {
        let salt = hmac(secret, format!("salt\0{user}").as_bytes());
        Self {
            iterations: 4096,
            salt: salt[..16].to_vec(),
            stored_key: hmac(secret, format!("stored\0{user}").as_bytes()),
            server_key: hmac(secret, format!("server\0{user}").as_bytes()),
        }
    }

    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Self {
            iterations: iterations.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

/// A client key (`HMAC(SaltedPassword, "Client Key")`): what a client's proof is made from,
/// and enough to log in as the client where its verifier is stored. Wiped when dropped.
pub struct ClientKey([u8; 32]);

impl Drop for ClientKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKey(<redacted>)")
    }
}

/// What logs a session in to servers as its client's user: the client key recovered from the
/// client's proof, and the verifier it was checked against (whose salt and iteration count
/// the servers must present).
#[derive(Debug)]
pub struct Keys {
    /// The client key.
    pub client_key: ClientKey,
    /// The verifier the servers hold.
    pub verifier: Verifier,
}

/// Why an exchange failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The message does not follow the protocol.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// Wrong password (or wrong user: the same answer either way).
    #[error("password authentication failed")]
    Failed,
    /// The server holds another verifier for the user than the one the client logged in
    /// with (its password was changed since).
    #[error("the server's verifier for the user is not the one the client logged in with")]
    OtherVerifier,
    /// The server's final message does not prove it holds the verifier.
    #[error("the server's signature does not match")]
    ServerSignature,
}

/// The server's half of one exchange.
pub struct Exchange {
    verifier: Verifier,
    gs2_header: &'static str,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl Exchange {
    /// Starts from the client's first message; returns the server's first message to send.
    pub fn start(verifier: Verifier, client_first: &str) -> Result<(Self, String), ScramError> {
        let (gs2_header, bare) = match client_first.split_once(",,") {
            Some(("n", bare)) => ("biws", bare),
            Some(("y", bare)) => ("eSws", bare),
            Some((h, _)) if h.starts_with("p=") => {
                return Err(ScramError::Malformed("channel binding is not supported"))
            }
            _ => return Err(ScramError::Malformed("bad GS2 header")),
        };
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("no client nonce"))?;
        let mut raw = [0u8; 18];
        rand::rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            Self {
                verifier,
                gs2_header,
                client_first_bare: bare.to_owned(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client's final message; returns the server's final message to send and the
    /// client key the proof was made from.
    pub fn finish(self, client_final: &str) -> Result<(String, ClientKey), ScramError> {
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                binding = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        // Without channel binding the client echoes its GS2 header ("n,," or "y,,") in base64.
        if binding != Some(self.gs2_header) {
            return Err(ScramError::Malformed("bad channel binding"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce mismatch"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("bad proof"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key = ClientKey(xor(&proof, &signature));
        let stored: [u8; 32] = Sha256::digest(client_key.0).into();
        if !constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::Failed);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

/// The client's half of one exchange, made with a client key instead of a password.
pub struct ClientExchange {
    keys: std::sync::Arc<Keys>,
    client_first_bare: String,
    nonce: String,
    server_signature: Option<[u8; 32]>,
}

impl ClientExchange {
    /// Starts an exchange; returns the client's first message to send.
    pub fn start(keys: std::sync::Arc<Keys>) -> (Self, String) {
        let mut raw = [0u8; 18];
        rand::rng().fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        // The user name is in the startup packet; PostgreSQL ignores `n=`.
        let bare = format!("n=,r={nonce}");
        let first = format!("n,,{bare}");
        let exchange = Self {
            keys,
            client_first_bare: bare,
            nonce,
            server_signature: None,
        };
        (exchange, first)
    }

    /// Takes the server's first message; returns the client's final message to send. The
    /// server must present the salt and iteration count of the verifier the keys belong to.
    pub fn update(&mut self, server_first: &str) -> Result<String, ScramError> {
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            } else if let Some(s) = attr.strip_prefix("s=") {
                salt = B64.decode(s).ok();
            } else if let Some(i) = attr.strip_prefix("i=") {
                iterations = i.parse::<u32>().ok();
            }
        }
        let nonce = nonce
            .filter(|n| n.len() > self.nonce.len() && n.starts_with(&self.nonce))
            .ok_or(ScramError::Malformed("bad server nonce"))?;
        let (Some(salt), Some(iterations)) = (salt, iterations) else {
            return Err(ScramError::Malformed("no salt or iteration count"));
        };
        let verifier = &self.keys.verifier;
        if salt != verifier.salt || iterations != verifier.iterations {
            return Err(ScramError::OtherVerifier);
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hmac(&verifier.stored_key, auth_message.as_bytes());
        let proof = xor(&self.keys.client_key.0, &signature);
        self.server_signature = Some(hmac(&verifier.server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server's final message: it proves the server holds the verifier.
    pub fn finish(&self, server_final: &str) -> Result<(), ScramError> {
        if server_final.starts_with("e=") {
            return Err(ScramError::Failed);
        }
        let expected = self
            .server_signature
            .as_ref()
            .ok_or(ScramError::Malformed("final message before the first"))?;
        let signature: [u8; 32] = server_final
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v.trim_end_matches('\0')).ok())
            .and_then(|v| v.try_into().ok())
            .ok_or(ScramError::Malformed("bad server signature"))?;
        if constant_time_eq(&signature, expected) {
            Ok(())
        } else {
            Err(ScramError::ServerSignature)
        }
    }
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b)) {
        *o = x ^ y;
    }
    out
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs a whole exchange with postgres-protocol's client (the one tokio-postgres uses).
    fn exchange(stored: &str, typed: &str) -> Result<(), ScramError> {
        exchange_with(&Verifier::new(stored), typed)
    }

    /// [`exchange`] against a verifier.
    fn exchange_with(verifier: &Verifier, typed: &str) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(typed.as_bytes(), ChannelBinding::unsupported());
        let first = String::from_utf8(client.message().to_vec()).unwrap();
        let (server, server_first) = Exchange::start(verifier.clone(), &first)?;
        client.update(server_first.as_bytes()).unwrap();
        let client_final = String::from_utf8(client.message().to_vec()).unwrap();
        let (server_final, _) = server.finish(&client_final)?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Malformed("client refused the server signature"))
    }

    /// Logs in with a password against `verifier`, then returns the keys recovered.
    fn keys_from_login(verifier: &Verifier, typed: &str) -> std::sync::Arc<Keys> {
        let mut client = ScramSha256::new(typed.as_bytes(), ChannelBinding::unsupported());
        let first = String::from_utf8(client.message().to_vec()).unwrap();
        let (server, server_first) = Exchange::start(verifier.clone(), &first).unwrap();
        client.update(server_first.as_bytes()).unwrap();
        let client_final = String::from_utf8(client.message().to_vec()).unwrap();
        let (_, client_key) = server.finish(&client_final).unwrap();
        std::sync::Arc::new(Keys {
            client_key,
            verifier: verifier.clone(),
        })
    }

    /// Runs the keys' client half against a server holding `held`.
    fn pass_through(keys: std::sync::Arc<Keys>, held: &Verifier) -> Result<(), ScramError> {
        let (mut client, first) = ClientExchange::start(keys);
        let (server, server_first) = Exchange::start(held.clone(), &first)?;
        let client_final = client.update(&server_first)?;
        let (server_final, _) = server.finish(&client_final)?;
        client.finish(&server_final)
    }

    #[test]
    fn the_key_recovered_from_a_login_logs_in_where_the_same_verifier_is_held() {
        let verifier = Verifier::new("typed by the client");
        let keys = keys_from_login(&verifier, "typed by the client");
        assert_eq!(pass_through(keys.clone(), &verifier), Ok(()));
        // The same password under another salt (changed since) is another verifier.
        let changed = Verifier::new("typed by the client");
        assert_eq!(pass_through(keys, &changed), Err(ScramError::OtherVerifier));
    }

    #[test]
    fn a_server_without_the_verifier_is_caught() {
        let verifier = Verifier::new("pw");
        let keys = keys_from_login(&verifier, "pw");
        let (mut client, _) = ClientExchange::start(keys.clone());
        let mut impostor = verifier.clone();
        impostor.server_key = [7; 32];
        let (server, server_first) = Exchange::start(impostor, "n,,n=,r=x").unwrap();
        // The server answers with its own nonce, not one extending the client's.
        assert!(client.update(&server_first).is_err());
        let (mut client, first) = ClientExchange::start(keys);
        drop(server);
        let mut impostor = verifier;
        impostor.server_key = [7; 32];
        let (server, server_first) = Exchange::start(impostor, &first).unwrap();
        let client_final = client.update(&server_first).unwrap();
        let (server_final, _) = server.finish(&client_final).unwrap();
        assert_eq!(
            client.finish(&server_final),
            Err(ScramError::ServerSignature)
        );
        assert_eq!(client.finish("e=invalid-proof"), Err(ScramError::Failed));
    }

    #[test]
    fn the_right_password_passes_and_the_client_verifies_the_server() {
        assert_eq!(exchange("s3cret:with,commas", "s3cret:with,commas"), Ok(()));
    }

    #[test]
    fn a_wrong_password_fails() {
        assert_eq!(exchange("right", "wrong"), Err(ScramError::Failed));
    }

    #[test]
    fn malformed_messages_are_refused() {
        let v = Verifier::new("pw");
        assert!(Exchange::start(v.clone(), "p=tls-server-end-point,,n=,r=abc").is_err());
        assert!(Exchange::start(v.clone(), "n,,n=,").is_err());
        let (server, _) = Exchange::start(v.clone(), "n,,n=,r=abc").unwrap();
        assert_eq!(
            server.finish("c=biws,r=abcWRONG,p=AAAA").err(),
            Some(ScramError::Malformed("nonce mismatch"))
        );
        let (server, _) = Exchange::start(v, "n,,n=,r=abc").unwrap();
        assert!(server.finish("c=biws,r=abc").is_err());
    }

    #[test]
    fn decoys_differ_by_user_and_stay_the_same_for_one() {
        let secret = [9; 32];
        let a = Verifier::decoy(&secret, "alice");
        assert!(a == Verifier::decoy(&secret, "alice"));
        assert!(a.salt != Verifier::decoy(&secret, "bob").salt);
        assert!(a.salt != Verifier::decoy(&[8; 32], "alice").salt);
        assert_eq!((a.salt.len(), a.iterations), (16, 4096));
        assert_eq!(exchange_with(&a, "anything"), Err(ScramError::Failed));
    }

    #[test]
    fn the_channel_binding_flag_must_be_echoed() {
        let v = Verifier::new("pw");
        let (server, _) = Exchange::start(v.clone(), "n,,n=,r=abc").unwrap();
        let nonce = server.nonce.clone();
        assert_eq!(
            server.finish(&format!("c=eSws,r={nonce},p=AAAA")).err(),
            Some(ScramError::Malformed("bad channel binding"))
        );
    }

    #[test]
    fn verifiers_parse_and_do_not_print() {
        let v = Verifier::new("pw");
        assert_eq!(v.iterations, 4096);
        assert_eq!(format!("{v:?}"), "Verifier(<redacted>)");
        assert_eq!(format!("{:?}", ClientKey([1; 32])), "ClientKey(<redacted>)");
        assert!(Verifier::parse("md5abc").is_none());
    }
}

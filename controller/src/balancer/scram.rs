//! SCRAM-SHA-256 as a server (RFC 5802/7677, as PostgreSQL speaks it): clients prove they know
//! the password against a stored verifier; the balancer never sees the password they type.
//! Channel binding is not offered (no TLS), so `p=` requests are refused.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Mechanism name.
pub const MECHANISM: &str = "SCRAM-SHA-256";

/// A stored verifier: what `pg_authid.rolpassword` holds for a SCRAM password.
#[derive(Clone)]
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

/// Why an exchange failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The message does not follow the protocol.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// Wrong password (or wrong user: the same answer either way).
    #[error("password authentication failed")]
    Failed,
}

/// The server's half of one exchange.
pub struct Exchange {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl Exchange {
    /// Starts from the client's first message; returns the server's first message to send.
    pub fn start(verifier: Verifier, client_first: &str) -> Result<(Self, String), ScramError> {
        let bare = match client_first.split_once(",,") {
            Some(("n" | "y", bare)) => bare,
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
                client_first_bare: bare.to_owned(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client's final message; returns the server's final message to send.
    pub fn finish(self, client_final: &str) -> Result<String, ScramError> {
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
        // Without channel binding the client echoes its GS2 header: "n,," or "y,,".
        if !matches!(binding, Some("biws" | "eSws")) {
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
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(signature)) {
            *k = p ^ s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::Failed);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
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
        let mut client = ScramSha256::new(typed.as_bytes(), ChannelBinding::unsupported());
        let first = String::from_utf8(client.message().to_vec()).unwrap();
        let (server, server_first) = Exchange::start(Verifier::new(stored), &first)?;
        client.update(server_first.as_bytes()).unwrap();
        let client_final = String::from_utf8(client.message().to_vec()).unwrap();
        let server_final = server.finish(&client_final)?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Malformed("client refused the server signature"))
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
    fn verifiers_parse_and_do_not_print() {
        let v = Verifier::new("pw");
        assert_eq!(v.iterations, 4096);
        assert_eq!(format!("{v:?}"), "Verifier(<redacted>)");
        assert!(Verifier::parse("md5abc").is_none());
    }
}

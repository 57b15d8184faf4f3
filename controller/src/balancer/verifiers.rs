//! Users' SCRAM verifiers, read from the primary. The instance bootstrap creates
//! `pgbalancer.scram_verifier(role)` in the `postgres` database: a `SECURITY DEFINER` function
//! only the monitoring role may run, which returns what `pg_authid` holds for a role that may
//! log in now with a SCRAM password (`NULL` otherwise). Checked against the server's own
//! verifier, a client's proof yields the client key that logs the session in to every server
//! (`scram::Keys`), so the engine keeps no password, and every role made in the database logs
//! in through the balancer with the password the database has for it now.
//!
//! One connection, to the primary as the monitoring role, answers the lookups (side by side:
//! only finding or opening it is done one at a time, and opening is bounded).
//! The last verifier read for each user is kept, so logins go on while there is no primary.
//! A primary without the function (a cluster made by an earlier version) is told apart, and
//! then the engine checks users against `pool_passwd` as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

use super::backends::Backend;
use super::monitor::MonitorConfig;
use super::scram::Verifier;

/// The lookup, as the monitoring role runs it.
const QUERY: &str = "SELECT pgbalancer.scram_verifier($1::text)";

/// Longest a lookup may wait for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// After a failed connection, lookups answer from what is kept for this long before the next
/// attempt, so a burst of logins while the primary is away does not wait on each.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Longest opening the lookup connection may take (connecting, logging in, preparing).
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

/// After finding no function, how long the engine goes on without asking again.
const MISSING_RECHECK: Duration = Duration::from_secs(30);

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The verifier the database holds for the user.
    Found(Verifier),
    /// The user may not log in: no such role, `NOLOGIN`, expired, or no SCRAM password.
    Refused,
    /// No answer: the primary has no lookup function, or it cannot be reached and nothing is
    /// kept for the user.
    Unavailable,
}

/// Why a lookup got no answer.
enum NoAnswer {
    /// The primary has no lookup function (or the role may not run it).
    Missing,
    /// No primary, or it did not answer.
    Down,
    /// The server answered the lookup with an error (its plan was made before a change to
    /// the function): the link is closed, so asking again opens and prepares it anew.
    Again,
}

/// An open lookup connection: the client (shared, so lookups run side by side on it), the
/// prepared lookup, and the server it is connected to.
type Open = (Arc<Client>, Statement, Arc<Backend>);

/// The connection lookups run on, and when to try again.
#[derive(Default)]
struct Link {
    open: Option<Open>,
    retry_at: Option<Instant>,
    missing_until: Option<Instant>,
}

/// Users' verifiers, read from the primary and kept.
pub struct Verifiers {
    monitor: MonitorConfig,
    link: tokio::sync::Mutex<Link>,
    kept: Mutex<HashMap<String, Verifier>>,
}

impl Verifiers {
    /// Lookups as the monitoring role.
    pub fn new(monitor: MonitorConfig) -> Self {
        Self {
            monitor,
            link: tokio::sync::Mutex::new(Link::default()),
            kept: Mutex::new(HashMap::new()),
        }
    }

    /// The verifier of `user` on `primary` (the current one, if any).
    pub async fn lookup(&self, user: &str, primary: Option<Arc<Backend>>) -> Lookup {
        let answer = match self.ask(user, primary.clone()).await {
            Err(NoAnswer::Again) => match self.ask(user, primary).await {
                Err(NoAnswer::Again) => {
                    self.link.lock().await.retry_at = Some(Instant::now() + RETRY_AFTER);
                    Err(NoAnswer::Down)
                }
                answer => answer,
            },
            answer => answer,
        };
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        decide(&mut kept, user, answer)
    }

    /// One lookup. The link is locked only to find or open the connection (opening is
    /// bounded); the query runs outside the lock, so lookups go side by side.
    async fn ask(
        &self,
        user: &str,
        primary: Option<Arc<Backend>>,
    ) -> Result<Option<String>, NoAnswer> {
        let (client, statement) = self.connection(primary).await?;
        let answer =
            tokio::time::timeout(ANSWER_TIMEOUT, client.query_one(&statement, &[&user])).await;
        // Closes the link when it is still this client's; whether it was (an older link's
        // failure says nothing about the current primary).
        let failed = |link: &mut Link| {
            let current = link
                .open
                .as_ref()
                .is_some_and(|(c, _, _)| Arc::ptr_eq(c, &client));
            if current {
                link.open = None;
            }
            current
        };
        match answer {
            Ok(Ok(row)) => Ok(row.get::<_, Option<String>>(0)),
            Ok(Err(e)) if no_function(&e) => {
                let mut link = self.link.lock().await;
                if failed(&mut link) {
                    link.missing_until = Some(Instant::now() + MISSING_RECHECK);
                }
                tracing::warn!(
                    "pgbalancer.scram_verifier is gone from the primary: users are checked \
                     against pool_passwd"
                );
                Err(NoAnswer::Missing)
            }
            Ok(Err(e)) if e.as_db_error().is_some() => {
                tracing::info!(error = %e, "verifier lookup failed; preparing it again");
                let _ = failed(&mut *self.link.lock().await);
                Err(NoAnswer::Again)
            }
            _ => {
                let mut link = self.link.lock().await;
                if failed(&mut link) {
                    link.retry_at = Some(Instant::now() + RETRY_AFTER);
                }
                Err(NoAnswer::Down)
            }
        }
    }

    /// The open connection to `primary`, opened when there is none (at most one attempt per
    /// [`RETRY_AFTER`], each bounded by [`OPEN_TIMEOUT`]).
    async fn connection(
        &self,
        primary: Option<Arc<Backend>>,
    ) -> Result<(Arc<Client>, Statement), NoAnswer> {
        let mut link = self.link.lock().await;
        let now = Instant::now();
        if link.missing_until.is_some_and(|t| t > now) {
            return Err(NoAnswer::Missing);
        }
        let Some(primary) = primary else {
            link.open = None;
            return Err(NoAnswer::Down);
        };
        if link
            .open
            .as_ref()
            .is_some_and(|(c, _, b)| c.is_closed() || !Arc::ptr_eq(b, &primary))
        {
            link.open = None;
        }
        if let Some((client, statement, _)) = &link.open {
            return Ok((client.clone(), statement.clone()));
        }
        if link.retry_at.is_some_and(|t| t > now) {
            return Err(NoAnswer::Down);
        }
        match tokio::time::timeout(OPEN_TIMEOUT, self.open(&primary)).await {
            Ok(Ok((client, statement))) => {
                let client = Arc::new(client);
                link.open = Some((client.clone(), statement.clone(), primary));
                link.retry_at = None;
                Ok((client, statement))
            }
            Ok(Err(true)) => {
                tracing::warn!(
                    host = %primary.host,
                    "the primary has no pgbalancer.scram_verifier: users are checked against \
                     pool_passwd"
                );
                link.missing_until = Some(now + MISSING_RECHECK);
                Err(NoAnswer::Missing)
            }
            Ok(Err(false)) | Err(_) => {
                link.retry_at = Some(Instant::now() + RETRY_AFTER);
                Err(NoAnswer::Down)
            }
        }
    }

    /// Opens the lookup connection to `primary`; `Err(true)` when it has no lookup function.
    async fn open(&self, primary: &Backend) -> Result<(Client, Statement), bool> {
        let client = crate::pg::connect_encrypted(
            &primary.host,
            primary.port,
            &self.monitor.user,
            &self.monitor.password,
            "postgres",
        )
        .await
        .map_err(|e| {
            tracing::warn!(
                host = %primary.host,
                error = %crate::local::controller::error_chain(&e),
                "verifier lookups cannot connect to the primary (they require TLS)"
            );
            false
        })?;
        match client.prepare(QUERY).await {
            Ok(statement) => Ok((client, statement)),
            Err(e) => Err(no_function(&e)),
        }
    }
}

/// Whether `e` says the lookup function is not there for the monitoring role (gone, never
/// made, or not granted).
fn no_function(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        [
            SqlState::UNDEFINED_FUNCTION,
            SqlState::INVALID_SCHEMA_NAME,
            SqlState::INSUFFICIENT_PRIVILEGE,
        ]
        .contains(c)
    })
}

/// What a lookup's answer means, given what is kept (pure but for the kept map).
fn decide(
    kept: &mut HashMap<String, Verifier>,
    user: &str,
    answer: Result<Option<String>, NoAnswer>,
) -> Lookup {
    match answer {
        Ok(text) => match text.as_deref().and_then(Verifier::parse) {
            Some(verifier) => {
                kept.insert(user.to_owned(), verifier.clone());
                Lookup::Found(verifier)
            }
            None => {
                kept.remove(user);
                Lookup::Refused
            }
        },
        Err(NoAnswer::Missing) => Lookup::Unavailable,
        Err(NoAnswer::Down | NoAnswer::Again) => kept
            .get(user)
            .cloned()
            .map_or(Lookup::Unavailable, Lookup::Found),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_kept_and_used_while_the_primary_is_away() {
        let mut kept = HashMap::new();
        let text = postgres_protocol::password::scram_sha_256(b"pw");
        let read = Verifier::parse(&text).unwrap();
        assert_eq!(
            decide(&mut kept, "alice", Ok(Some(text.clone()))),
            Lookup::Found(read.clone())
        );
        // Away: the kept verifier, and nothing for a user never read.
        assert_eq!(
            decide(&mut kept, "alice", Err(NoAnswer::Down)),
            Lookup::Found(read)
        );
        assert_eq!(
            decide(&mut kept, "bob", Err(NoAnswer::Down)),
            Lookup::Unavailable
        );
        // Without the function nothing kept is used: pool_passwd decides.
        assert_eq!(
            decide(&mut kept, "alice", Err(NoAnswer::Missing)),
            Lookup::Unavailable
        );
        // Refused (dropped, NOLOGIN, expired), or an MD5 password: nothing kept any more.
        assert_eq!(decide(&mut kept, "alice", Ok(None)), Lookup::Refused);
        assert_eq!(
            decide(&mut kept, "alice", Err(NoAnswer::Down)),
            Lookup::Unavailable
        );
        assert_eq!(
            decide(&mut kept, "carol", Ok(Some("md5abc".into()))),
            Lookup::Refused
        );
    }
}

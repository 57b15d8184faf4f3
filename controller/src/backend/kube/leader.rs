//! Leader election through a `coordination.k8s.io/v1` Lease, so two operator replicas are
//! safe: only the holder reconciles; a holder that cannot renew stops the process, and a
//! standby takes over once the lease has expired.
//!
//! The Lease lives in the operator's own namespace ([`lease_namespace`]). While it cannot be
//! taken, each new situation (another holder, a missing namespace, a refusal, an unreachable
//! API) is logged once, with what to do when it will not resolve by itself; the retries every
//! two seconds that find the same situation log at debug level only.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use thiserror::Error;

/// Seconds a lease stays valid without renewal.
pub const LEASE_SECONDS: i32 = 15;
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// Pause between attempts to take the lease.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Whether `holder` may take a lease last renewed at `renewed` (pure).
pub fn can_take(lease: &LeaseSpec, me: &str, now: Timestamp) -> bool {
    match (&lease.holder_identity, &lease.renew_time) {
        (Some(holder), _) if holder == me => true,
        (None, _) | (_, None) => true,
        (Some(_), Some(renewed)) => {
            let ttl = i64::from(lease.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
            renewed.0.as_second() + ttl < now.as_second()
        }
    }
}

fn spec(me: &str, acquired: Option<MicroTime>) -> LeaseSpec {
    let now = MicroTime(Timestamp::now());
    LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(LEASE_SECONDS),
        acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
        renew_time: Some(now),
        ..Default::default()
    }
}

/// Why one attempt to take or renew the lease failed.
#[derive(Debug, Error)]
pub enum LeaseError {
    /// Creating the Lease answered 404: its namespace does not exist.
    #[error("the namespace does not exist")]
    NoNamespace(#[source] kube::Error),
    /// The API answered 403: RBAC does not let this operator use Leases there.
    #[error("not allowed to use Leases there")]
    Forbidden(#[source] kube::Error),
    /// Anything else (API server unreachable, timeouts, other statuses); usually passes.
    #[error("the Lease API request failed")]
    Api(#[source] kube::Error),
}

impl LeaseError {
    /// Classifies an API error; `creating` tells that it answered the Lease's creation, where a
    /// 404 can only mean a missing namespace.
    pub fn classify(error: kube::Error, creating: bool) -> LeaseError {
        match &error {
            kube::Error::Api(status) if status.code == 403 => LeaseError::Forbidden(error),
            kube::Error::Api(status) if status.code == 404 && creating => {
                LeaseError::NoNamespace(error)
            }
            _ => LeaseError::Api(error),
        }
    }

    /// What an operator whose Lease is in `namespace` should be told, in one message: the
    /// reason and, when it will not resolve by itself, what to do about it.
    pub fn explain(&self, namespace: &str) -> String {
        let api = |e: &kube::Error| match e {
            kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
            other => other.to_string(),
        };
        let options = format!(
            "name an existing namespace with --lease-namespace, or run a single operator \
             without a Lease with --leader-elect=false; retrying every {}s quietly",
            RETRY_EVERY.as_secs()
        );
        match self {
            LeaseError::NoNamespace(_) => format!(
                "cannot elect a leader: the lease namespace `{namespace}` does not exist. Create it \
                 (kubectl create namespace {namespace}), {options}"
            ),
            LeaseError::Forbidden(e) => format!(
                "cannot elect a leader: not allowed to get, create or update Leases in namespace \
                 `{namespace}` ({}). Grant that on leases.coordination.k8s.io in `{namespace}` \
                 (the Role in manifests/operator.yaml does), {options}",
                api(e)
            ),
            LeaseError::Api(e) => format!(
                "cannot reach the leader Lease in namespace `{namespace}` ({}); retrying every {}s",
                api(e),
                RETRY_EVERY.as_secs()
            ),
        }
    }
}

/// Tries once to hold the lease; true when this process holds it now.
pub async fn try_acquire(api: &Api<Lease>, name: &str, me: &str) -> Result<bool, LeaseError> {
    let found = api
        .get_opt(name)
        .await
        .map_err(|e| LeaseError::classify(e, false))?;
    match found {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..Default::default()
                },
                spec: Some(spec(me, None)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(LeaseError::classify(e, true)),
            }
        }
        Some(mut lease) => {
            let current = lease.spec.clone().unwrap_or_default();
            if !can_take(&current, me, Timestamp::now()) {
                return Ok(false);
            }
            let keep_acquired = (current.holder_identity.as_deref() == Some(me))
                .then(|| current.acquire_time.clone())
                .flatten();
            lease.spec = Some(spec(me, keep_acquired));
            // replace() carries resourceVersion: a concurrent taker makes this fail with 409.
            match api.replace(name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(LeaseError::classify(e, false)),
            }
        }
    }
}

/// What an attempt to take the lease found, as far as logging is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Situation {
    Waiting,
    NoNamespace,
    Forbidden,
    Unreachable,
}

impl Situation {
    fn of(result: &Result<bool, LeaseError>) -> Option<Situation> {
        match result {
            Ok(true) => None,
            Ok(false) => Some(Situation::Waiting),
            Err(LeaseError::NoNamespace(_)) => Some(Situation::NoNamespace),
            Err(LeaseError::Forbidden(_)) => Some(Situation::Forbidden),
            Err(LeaseError::Api(_)) => Some(Situation::Unreachable),
        }
    }
}

/// Remembers the last situation logged so that a retry finding the same one stays quiet.
#[derive(Default)]
struct Quiet(Option<Situation>);

impl Quiet {
    /// True when `now` differs from the last situation seen (which it becomes).
    fn is_new(&mut self, now: Situation) -> bool {
        self.0.replace(now) != Some(now)
    }
}

/// Blocks until this process holds the lease, then keeps renewing it in the background for as
/// long as the returned [`Leadership`] is kept; if renewal fails for longer than the lease
/// lasts, or another operator holds it, the process exits so that one standby leads.
pub async fn hold(client: Client, namespace: &str, name: &str, me: String) -> Leadership {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let mut quiet = Quiet::default();
    loop {
        let result = try_acquire(&api, name, &me).await;
        let Some(situation) = Situation::of(&result) else {
            break;
        };
        let new = quiet.is_new(situation);
        match (&result, new) {
            (Ok(_), true) => {
                tracing::info!(
                    lease = name,
                    namespace,
                    "another operator holds the lease; waiting"
                )
            }
            (Err(e @ (LeaseError::NoNamespace(_) | LeaseError::Forbidden(_))), true) => {
                tracing::error!(lease = name, namespace, "{}", e.explain(namespace))
            }
            (Err(e), true) => tracing::warn!(lease = name, namespace, "{}", e.explain(namespace)),
            (Ok(_), false) => tracing::debug!(lease = name, "still waiting for the lease"),
            (Err(e), false) => {
                tracing::debug!(lease = name, namespace, error = %e, "still cannot take the lease")
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    tracing::info!(lease = name, namespace, identity = %me, "leading");
    let name = name.to_owned();
    Leadership(tokio::spawn(async move {
        let mut last_renewal = std::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match try_acquire(&api, &name, &me).await {
                Ok(true) => last_renewal = std::time::Instant::now(),
                // A refusal is a loss only when someone else holds the lease now; a conflicting
                // write (409) that left it with us is retried at the next renewal.
                Ok(false) => match holder(&api, &name).await {
                    Ok(Some(h)) if h == me => {
                        tracing::debug!(lease = %name, "lease renewal raced; still held")
                    }
                    Ok(other) => {
                        tracing::error!(
                            holder = other.as_deref().unwrap_or("nobody"),
                            "lost the lease to another operator; exiting"
                        );
                        std::process::exit(1);
                    }
                    Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                },
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
            if last_renewal.elapsed() > Duration::from_secs(LEASE_SECONDS as u64) {
                tracing::error!("could not renew the lease in time; exiting");
                std::process::exit(1);
            }
        }
    }))
}

/// The renewal of a lease this process took; dropping it stops renewing (the lease then
/// expires after [`LEASE_SECONDS`] and a standby takes over).
#[must_use = "the lease is renewed only while this is kept"]
pub struct Leadership(tokio::task::JoinHandle<()>);

impl Drop for Leadership {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Who holds the lease now, as the API server says.
async fn holder(api: &Api<Lease>, name: &str) -> Result<Option<String>, kube::Error> {
    Ok(api
        .get_opt(name)
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity))
}

/// Where the lease namespace came from, for the operator's first log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamespaceSource {
    /// `--lease-namespace`, or `POD_NAMESPACE` (the downward API, as the manifests set it).
    Configured,
    /// The client's default namespace: the service account's (its
    /// `/var/run/secrets/kubernetes.io/serviceaccount/namespace`) in a pod, else the kubeconfig
    /// context's, `default` when the context names none.
    Client,
}

impl NamespaceSource {
    /// How the logs describe it.
    pub fn describe(self) -> &'static str {
        match self {
            NamespaceSource::Configured => "--lease-namespace or POD_NAMESPACE",
            NamespaceSource::Client => "the service account's or kubeconfig context's namespace",
        }
    }
}

/// Chooses the namespace of the Lease (pure): `configured` (`--lease-namespace` or
/// `POD_NAMESPACE`) when given and not blank, else `client_default`, the namespace the
/// Kubernetes client was configured with (see [`NamespaceSource::Client`]), else `default`.
pub fn lease_namespace(
    configured: Option<&str>,
    client_default: &str,
) -> (String, NamespaceSource) {
    match configured.map(str::trim).filter(|ns| !ns.is_empty()) {
        Some(ns) => (ns.to_owned(), NamespaceSource::Configured),
        None => {
            let ns = client_default.trim();
            let ns = if ns.is_empty() { "default" } else { ns };
            (ns.to_owned(), NamespaceSource::Client)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }
    }

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure(message, "")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn the_configured_namespace_wins_then_the_clients() {
        let table = [
            // (--lease-namespace / POD_NAMESPACE, client default, chosen)
            (Some("ops"), "team", ("ops", NamespaceSource::Configured)),
            (Some(" ops\n"), "team", ("ops", NamespaceSource::Configured)),
            (Some(""), "team", ("team", NamespaceSource::Client)),
            (None, "team", ("team", NamespaceSource::Client)),
            (None, "", ("default", NamespaceSource::Client)),
            (Some("  "), " ", ("default", NamespaceSource::Client)),
        ];
        for (configured, client, (name, source)) in table {
            assert_eq!(
                lease_namespace(configured, client),
                (name.to_owned(), source),
                "{configured:?} / {client:?}"
            );
        }
    }

    #[test]
    fn lasting_refusals_are_told_apart_from_passing_failures() {
        let missing = LeaseError::classify(api_error(404, "namespaces \"x\" not found"), true);
        assert!(matches!(missing, LeaseError::NoNamespace(_)));
        let text = missing.explain("x");
        for part in [
            "namespace `x` does not exist",
            "kubectl create namespace x",
            "--lease-namespace",
            "--leader-elect=false",
        ] {
            assert!(text.contains(part), "{text}");
        }
        let forbidden = LeaseError::classify(api_error(403, "leases is forbidden"), false);
        assert!(matches!(forbidden, LeaseError::Forbidden(_)));
        let text = forbidden.explain("x");
        for part in ["leases is forbidden", "`x`", "--leader-elect=false"] {
            assert!(text.contains(part), "{text}");
        }
        // A Lease that vanished between get and replace is not a missing namespace.
        assert!(matches!(
            LeaseError::classify(api_error(404, "not found"), false),
            LeaseError::Api(_)
        ));
        assert!(matches!(
            LeaseError::classify(api_error(500, "etcd"), true),
            LeaseError::Api(_)
        ));
    }

    #[test]
    fn a_situation_is_logged_once_until_it_changes() {
        let mut quiet = Quiet::default();
        let seen: Vec<bool> = [
            Situation::NoNamespace,
            Situation::NoNamespace,
            Situation::NoNamespace,
            Situation::Waiting,
            Situation::Waiting,
            Situation::NoNamespace,
        ]
        .into_iter()
        .map(|s| quiet.is_new(s))
        .collect();
        assert_eq!(seen, [true, false, false, true, false, true]);
    }

    #[test]
    fn a_fresh_lease_of_another_holder_is_not_taken() {
        let now = Timestamp::from_second(1_010).unwrap();
        assert!(!can_take(&lease("other", 1_000), "me", now));
        assert!(can_take(&lease("me", 1_000), "me", now));
        assert!(can_take(&lease("other", 990), "me", now));
        assert!(can_take(&LeaseSpec::default(), "me", now));
    }
}

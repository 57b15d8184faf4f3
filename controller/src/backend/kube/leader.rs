//! Leader election through a `coordination.k8s.io/v1` Lease, so two operator replicas are
//! safe: only the holder reconciles; a holder that cannot renew stops the process, and a
//! standby takes over once the lease has expired.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;

/// Seconds a lease stays valid without renewal.
pub const LEASE_SECONDS: i32 = 15;
const RENEW_EVERY: Duration = Duration::from_secs(5);

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

/// Tries once to hold the lease; true when this process holds it now.
pub async fn try_acquire(api: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    match api.get_opt(name).await? {
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
                Err(e) => Err(e),
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
                Err(e) => Err(e),
            }
        }
    }
}

/// Blocks until this process holds the lease, then keeps renewing it in the background; if
/// renewal fails for longer than the lease lasts, the process exits so a standby takes over.
pub async fn hold(client: Client, namespace: &str, name: &str, me: String) {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    loop {
        match try_acquire(&api, name, &me).await {
            Ok(true) => break,
            Ok(false) => tracing::info!(lease = name, "another operator holds the lease; waiting"),
            Err(e) => tracing::warn!(error = %e, "lease not reachable"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tracing::info!(lease = name, identity = %me, "leading");
    let name = name.to_owned();
    tokio::spawn(async move {
        let mut last_renewal = std::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match try_acquire(&api, &name, &me).await {
                Ok(true) => last_renewal = std::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("lost the lease to another operator; exiting");
                    std::process::exit(1);
                }
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
            if last_renewal.elapsed() > Duration::from_secs(LEASE_SECONDS as u64) {
                tracing::error!("could not renew the lease in time; exiting");
                std::process::exit(1);
            }
        }
    });
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

    #[test]
    fn a_fresh_lease_of_another_holder_is_not_taken() {
        let now = Timestamp::from_second(1_010).unwrap();
        assert!(!can_take(&lease("other", 1_000), "me", now));
        assert!(can_take(&lease("me", 1_000), "me", now));
        assert!(can_take(&lease("other", 990), "me", now));
        assert!(can_take(&LeaseSpec::default(), "me", now));
    }
}

//! One reconcile of a `PgBalancerCluster` (IO), as a table of contents: validate, make sure
//! the credentials exist, observe through the Kubernetes backend, check the record of the
//! primary (conflict, failover), `decide` (the same pure core as Docker), apply, write status
//! when it changed, requeue. Errors are classified for `error_policy`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use pgbalancer_crd::{PgBalancerCluster, PgBalancerClusterStatus};
use thiserror::Error;

use super::backend::KubeBackend;
use super::metrics::Metrics;
use super::objects::{self, Owner};
use crate::backend::{Action, Backend, BackendError, Observed};
use crate::credentials::Credentials;
use crate::labels;
use crate::plan::Plan;
use crate::reconcile::watch::{down_reason, Watch};
use crate::reconcile::{self as core, ChangeKind, FailoverPolicy, Record};
use crate::status::{self, Phase};

/// Why a reconcile failed.
#[derive(Debug, Error)]
pub enum Error {
    /// The spec is invalid: nothing is changed until it is edited.
    #[error("invalid spec: {0}")]
    Invalid(String),
    /// The API server refused or failed a request.
    #[error("kubernetes API")]
    Kube(#[from] kube::Error),
    /// The cluster changed after it was read (a newer status was written): nothing was
    /// written, and the next reconcile starts from the newer object.
    #[error("the cluster changed while it was reconciled")]
    Stale,
    /// A PostgreSQL instance refused or failed a statement.
    #[error(transparent)]
    Sql(#[from] crate::pg::PgError),
    /// A balancer agent could not be reached or refused a call.
    #[error("balancer agent: {0}")]
    Agent(String),
}

impl Error {
    /// Label value for the failures metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid_spec",
            Error::Kube(_) => "kube_api",
            Error::Stale => "stale",
            Error::Sql(_) => "postgres",
            Error::Agent(_) => "agent",
        }
    }
}

impl BackendError for Error {
    fn is_transient(&self) -> bool {
        matches!(self, Error::Sql(_) | Error::Agent(_))
    }
}

/// What every reconcile shares.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Metrics (shared with the metrics endpoint).
    pub metrics: Arc<Metrics>,
    /// Event recorder.
    pub recorder: Recorder,
    /// The API server serves `policy/v1` PodDisruptionBudgets (absent before Kubernetes 1.21).
    pub pdb_supported: bool,
    /// The operator runs inside the cluster network: SQL and the agents are reachable.
    pub in_cluster: bool,
    /// Failover watches by `namespace/name`: how long each recorded primary has been down.
    pub watches: Mutex<HashMap<String, Watch>>,
    /// The balancers' certificate by `namespace/name`, as last seen.
    pub certificates: Mutex<HashMap<String, CertificateSeen>>,
}

/// A cluster's balancer certificate as the last reconcile saw it.
#[derive(Debug, Default)]
pub struct CertificateSeen {
    /// Digest of the certificate the balancer pods were given.
    digest: Option<String>,
    /// What was wrong with the user's Secret, already reported.
    problem: Option<String>,
}

/// Reconciles one cluster.
pub async fn reconcile(
    cluster: Arc<PgBalancerCluster>,
    ctx: Arc<Context>,
) -> Result<Requeue, Error> {
    let started = Instant::now();
    let name = cluster.name_any();
    let namespace = cluster.namespace().unwrap_or_else(|| "default".into());
    let span = tracing::info_span!("reconcile", cluster = %name, namespace = %namespace);
    let _enter = span.enter();
    let result = reconcile_inner(&cluster, &ctx, &namespace).await;
    ctx.metrics.reconciled(started.elapsed());
    match &result {
        Err(Error::Stale) => {
            ctx.metrics.failed(Error::Stale.reason());
            tracing::debug!("the cluster changed while it was reconciled; again");
        }
        Err(e) => {
            ctx.metrics.failed(e.reason());
            tracing::warn!(error = %e, cause = ?std::error::Error::source(e), "reconcile failed");
        }
        Ok(_) => {}
    }
    result
}

/// What to do after a failed reconcile: wait for an edit of an invalid spec, retry others.
pub fn error_policy(
    _cluster: Arc<PgBalancerCluster>,
    error: &Error,
    _ctx: Arc<Context>,
) -> Requeue {
    match error {
        Error::Invalid(_) => Requeue::await_change(),
        Error::Stale => Requeue::requeue(Duration::from_millis(500)),
        _ => Requeue::requeue(Duration::from_secs(5)),
    }
}

async fn reconcile_inner(
    cluster: &PgBalancerCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<Requeue, Error> {
    let name = cluster.name_any();
    let previous = cluster.status.clone();
    let clusters: Api<PgBalancerCluster> = Api::namespaced(ctx.client.clone(), namespace);
    validated(cluster, ctx, &clusters, previous.as_ref()).await?;
    let owner = Owner {
        namespace: namespace.to_owned(),
        reference: cluster
            .controller_owner_ref(&())
            .ok_or_else(|| Error::Invalid("the cluster has no uid yet".into()))?,
    };
    let record = record_of(&name, previous.as_ref());
    let mut plan = Plan::kubernetes(cluster, record.target);
    plan.initialised = record.current.is_some();
    let creds = credentials(cluster, &plan, &owner, ctx).await?;
    let (problem, digest) = balancer_tls(&plan, &owner, ctx).await?;
    let (digest, report) = {
        let mut seen = ctx.certificates.lock().unwrap_or_else(|e| e.into_inner());
        let seen = seen.entry(format!("{namespace}/{name}")).or_default();
        // While the user's Secret is unusable, the pods keep the certificate they were given:
        // no roll to nothing and back.
        let digest = match &problem {
            Some(_) => digest.or_else(|| seen.digest.clone()),
            None => digest,
        };
        seen.digest = digest.clone();
        let report = problem.clone().filter(|p| seen.problem.as_ref() != Some(p));
        seen.problem = problem;
        (digest, report)
    };
    plan.balancer.certificate_digest = digest;
    if let Some(problem) = report {
        // Not an error that stops the reconcile: the Secret may come later (cert-manager
        // creates it after the cluster), and until then the balancer pods wait for it while
        // the instances, failover and status go on. Reported once, not at every pass.
        tracing::warn!(cluster = %name, "{problem}");
        event(
            ctx,
            cluster,
            EventType::Warning,
            "CertificateSecret",
            &problem,
        )
        .await;
    }
    let backend = KubeBackend {
        client: ctx.client.clone(),
        metrics: &ctx.metrics,
        creds,
        owner,
        in_cluster: ctx.in_cluster,
        pdb_supported: ctx.pdb_supported,
    };
    let observed = backend.observe(&plan).await?;
    if core::conflict(&plan, &observed, &record).is_some() {
        // `decide` changes nothing and the status says why (Degraded, PrimaryConflict).
        write_observed_status(ctx, cluster, &clusters, &plan, &observed, &record).await?;
        return Ok(Requeue::requeue(Duration::from_secs(5)));
    }
    let record = record.advance(&observed);
    let policy = FailoverPolicy::of(&cluster.spec.failover);
    let (due, down_for) = ctx
        .watches
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(format!("{namespace}/{name}"))
        .or_default()
        .failover_due(&plan, &observed, &record, &policy, Instant::now());
    if let Some(next) = due {
        // The record moves first and durably; the next reconcile acts on it.
        let reason = format!(
            "{}; promoting {}",
            down_reason(&plan, &observed, &record, down_for),
            crate::plan::instance_name(&name, next.target)
        );
        let target_plan = Plan::kubernetes(cluster, next.target);
        let new = status::compute(
            &target_plan,
            &observed,
            &next,
            previous.as_ref(),
            cluster.metadata.generation,
            now(),
        );
        write_status(&clusters, cluster, &new, ctx).await?;
        event(ctx, cluster, EventType::Warning, "FailoverStarted", &reason).await;
        ctx.metrics.failover("failover");
        return Ok(Requeue::requeue(Duration::from_millis(200)));
    }
    if let Some(requested) = cluster.annotations().get(labels::SWITCHOVER_ANNOTATION) {
        return switchover_requested(
            ctx, cluster, &clusters, &plan, &observed, &record, requested,
        )
        .await;
    }
    // A replacement pod of a lost primary gets no role while a failover may still start.
    // Unlike the local controller, the operator attaches standby nodes itself: it detaches an
    // old primary through the agent's API, which then leaves that node to whoever detached it.
    let actions = core::hold_for_failover(
        core::decide(&plan, &observed, &record),
        &observed,
        &record,
        &policy,
        down_for,
    );
    apply(&backend, &plan, &actions, ctx, cluster).await?;
    let new = write_observed_status(ctx, cluster, &clusters, &plan, &observed, &record).await?;
    let running = new.phase.as_deref() == Some(Phase::Running.as_str());
    Ok(Requeue::requeue(requeue_after(
        !actions.is_empty() || record.changing() || !down_for.is_zero(),
        running,
        ctx.in_cluster,
    )))
}

/// When to look again with nothing else happening. Every child and pod is watched, so a
/// change there starts a reconcile at once; the timer covers what only time or SQL shows:
/// - 2 s while something is being done, a change of primary runs, or the failover delay of a
///   lost primary is counting;
/// - otherwise, inside the cluster network, 5 s until Running and 10 s after (a hung server
///   or a balancer's node list shows only to SQL and the agents);
/// - outside it (no SQL), 60 s until Running and 300 s after: everything seen is watched.
fn requeue_after(busy: bool, running: bool, in_cluster: bool) -> Duration {
    let secs = match (busy, in_cluster, running) {
        (true, _, _) => 2,
        (false, true, false) => 5,
        (false, true, true) => 10,
        (false, false, false) => 60,
        (false, false, true) => 300,
    };
    Duration::from_secs(secs)
}

/// A switchover asked for with the `pgbalancer.io/switchover` annotation (`kubectl pgbalancer
/// switchover`): checked against what is observed; accepted, the record's target moves (in
/// status, durably) and the next reconciles carry it out; refused, an Event says why. Either
/// way the annotation is removed, so it acts once.
async fn switchover_requested(
    ctx: &Context,
    cluster: &PgBalancerCluster,
    clusters: &Api<PgBalancerCluster>,
    plan: &Plan,
    observed: &Observed,
    record: &Record,
    requested: &str,
) -> Result<Requeue, Error> {
    let to = Some(requested).filter(|r| !r.is_empty());
    let outcome = core::switchover_target(plan, observed, record, to);
    if let Ok(target) = outcome {
        let next = Record {
            current: record.current.or(Some(record.target)),
            target,
            kind: ChangeKind::Switchover,
        };
        let target_plan = Plan::kubernetes(cluster, target);
        let new = status::compute(
            &target_plan,
            observed,
            &next,
            cluster.status.as_ref(),
            cluster.metadata.generation,
            now(),
        );
        write_status(clusters, cluster, &new, ctx).await?;
    }
    let patch = serde_json::json!({ "metadata": { "annotations": { labels::SWITCHOVER_ANNOTATION: null } } });
    ctx.metrics.wrote("patch", "PgBalancerCluster");
    clusters
        .patch(
            &cluster.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    match outcome {
        Ok(target) => {
            ctx.metrics.failover("switchover");
            let to = crate::plan::instance_name(&plan.cluster, target);
            event(
                ctx,
                cluster,
                EventType::Normal,
                "SwitchoverStarted",
                &format!("moving the primary to {to}"),
            )
            .await;
        }
        Err(why) => {
            event(ctx, cluster, EventType::Warning, "SwitchoverRefused", &why).await;
        }
    }
    Ok(Requeue::requeue(Duration::from_millis(200)))
}

/// Refuses an invalid spec: Degraded with the field named, an Event, nothing touched.
async fn validated(
    cluster: &PgBalancerCluster,
    ctx: &Context,
    clusters: &Api<PgBalancerCluster>,
    previous: Option<&PgBalancerClusterStatus>,
) -> Result<(), Error> {
    let Err(e) = pgbalancer_crd::validate(cluster) else {
        return Ok(());
    };
    let message = e.to_string().replace('\n', "; ");
    let new = status::invalid(previous, &message, cluster.metadata.generation, now());
    if previous.is_none_or(|p| !status::same(p, &new)) {
        write_status(clusters, cluster, &new, ctx).await?;
        event(ctx, cluster, EventType::Warning, "InvalidSpec", &message).await;
    }
    Err(Error::Invalid(message))
}

/// Applies one decision in order, one action at a time, so a balancer's agent gets one node
/// change at a time: simultaneous attaches of several nodes on one pgpool are not known to be
/// safe (they may leave it without a primary; not confirmed). Steps that may succeed later are logged and retried next time; a step
/// of a change of primary that did not succeed ends the decision: the next one is never taken
/// without it. The local controller applies through the core's `apply_all` instead, where at
/// most one node is attached at a time (the agents attach standbys there).
async fn apply(
    backend: &KubeBackend<'_>,
    plan: &Plan,
    actions: &[Action],
    ctx: &Context,
    cluster: &PgBalancerCluster,
) -> Result<(), Error> {
    for &action in actions {
        tracing::info!(%action, "applying");
        match backend.apply(plan, action).await {
            Ok(()) => {}
            Err(e) if e.is_transient() => {
                tracing::info!(%action, error = %e, "will retry");
                if action.is_ordered() {
                    break;
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        let (type_, reason) = match action {
            Action::RemoveInstance(_) => (EventType::Normal, "ScaledDown"),
            Action::Fence(_) => (EventType::Warning, "Fenced"),
            Action::Promote(_) => (EventType::Normal, "Promoted"),
            _ => continue,
        };
        event(ctx, cluster, type_, reason, &action.to_string()).await;
    }
    Ok(())
}

/// Computes status from the observation and writes it when it changed.
async fn write_observed_status(
    ctx: &Context,
    cluster: &PgBalancerCluster,
    clusters: &Api<PgBalancerCluster>,
    plan: &Plan,
    observed: &Observed,
    record: &Record,
) -> Result<PgBalancerClusterStatus, Error> {
    let previous = cluster.status.as_ref();
    let mut new = status::compute(
        plan,
        observed,
        record,
        previous,
        cluster.metadata.generation,
        now(),
    );
    if let Some(b) = new.balancer.as_mut() {
        b.endpoint = Some(format!(
            "{}:{}",
            crate::plan::balancer_name(&plan.cluster),
            crate::plan::BALANCER_PORT
        ));
    }
    if previous.is_some_and(|p| status::same(p, &new)) {
        return Ok(new);
    }
    // An Event for each new conflict (even while already Degraded) and each change of phase.
    let phase_changed = previous.and_then(|p| p.phase.as_deref()) != new.phase.as_deref();
    match status::conflict_message(&new) {
        Some(note) if previous.and_then(status::conflict_message).as_ref() != Some(&note) => {
            event(ctx, cluster, EventType::Warning, "PrimaryConflict", &note).await;
        }
        None if phase_changed => {
            let phase = new.phase.clone().unwrap_or_default();
            let note = format!("cluster is {phase}");
            event(ctx, cluster, EventType::Normal, &phase, &note).await;
        }
        _ => {}
    }
    write_status(clusters, cluster, &new, ctx).await?;
    Ok(new)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Writes the status computed from `cluster` only if the cluster is still the version read:
/// a status written in between (another operator replica's, or by hand) is never overwritten
/// with one computed before it.
async fn write_status(
    api: &Api<PgBalancerCluster>,
    cluster: &PgBalancerCluster,
    status: &PgBalancerClusterStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let body = serde_json::json!({
        "apiVersion": pgbalancer_crd::API_VERSION,
        "kind": pgbalancer_crd::KIND,
        "metadata": { "resourceVersion": cluster.resource_version() },
        "status": status,
    });
    ctx.metrics.wrote("patch", "status");
    match api
        .patch_status(
            &cluster.name_any(),
            &PatchParams::apply(labels::MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Err(Error::Stale),
        Err(e) => Err(e.into()),
    }
}

async fn event(
    ctx: &Context,
    cluster: &PgBalancerCluster,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let ev = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    ctx.metrics.wrote("create", "Event");
    if let Err(e) = ctx.recorder.publish(&ev, &cluster.object_ref(&())).await {
        tracing::debug!(error = %e, "event not recorded");
    }
}

/// The cluster's credentials: the named Secret, or the generated one (created once).
async fn credentials(
    cluster: &PgBalancerCluster,
    plan: &Plan,
    owner: &Owner,
    ctx: &Context,
) -> Result<Credentials, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let wanted = cluster
        .spec
        .auth
        .secret_name
        .clone()
        .unwrap_or_else(|| objects::credentials_name(&plan.cluster));
    if let Some(existing) = secrets.get_opt(&wanted).await? {
        return objects::credentials_from_secret(&existing).map_err(|e| {
            Error::Invalid(format!(
                "spec.auth.secretName: secret {wanted} is unusable: {e}"
            ))
        });
    }
    if cluster.spec.auth.secret_name.is_some() {
        return Err(Error::Invalid(format!(
            "spec.auth.secretName: secret {wanted} does not exist"
        )));
    }
    let creds = Credentials::generate();
    ctx.metrics.wrote("create", "Secret");
    match secrets
        .create(
            &PostParams::default(),
            &objects::credentials_secret(plan, owner, &creds),
        )
        .await
    {
        Ok(_) => Ok(creds),
        // Created meanwhile (another reconcile): use that one, never overwrite it.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = secrets.get(&wanted).await?;
            objects::credentials_from_secret(&existing).map_err(Error::Invalid)
        }
        Err(e) => Err(e.into()),
    }
}

/// With TLS on, the Secret the balancers present exists: the user's (`certificateSecret`,
/// with `tls.crt` and `tls.key`), or the generated one (created once, for the balancer
/// Service's names). Returns what is wrong with the user's Secret, if anything, and a digest
/// of the certificate.
async fn balancer_tls(
    plan: &Plan,
    owner: &Owner,
    ctx: &Context,
) -> Result<(Option<String>, Option<String>), Error> {
    let Some(name) = objects::balancer_tls_name(plan) else {
        return Ok((None, None));
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let existing = secrets.get_opt(&name).await?;
    let digest = |cert: &[u8]| objects::content_hash(&hex::encode(cert));
    if plan.balancer.certificate_secret.is_some() {
        let data = existing.and_then(|s| s.data).unwrap_or_default();
        let problem = if data.is_empty() {
            Some("does not exist or holds nothing".to_owned())
        } else {
            ["tls.crt", "tls.key"]
                .iter()
                .find(|k| !data.contains_key(**k))
                .map(|missing| format!("has no {missing}"))
        };
        let problem = problem.map(|p| {
            format!(
                "spec.balancer.tls.certificateSecret: secret {name} {p}; the balancer pods \
                 wait for it"
            )
        });
        return Ok((problem, data.get("tls.crt").map(|c| digest(&c.0))));
    }
    if let Some(existing) = existing {
        let cert = existing.data.unwrap_or_default();
        return Ok((None, cert.get("tls.crt").map(|c| digest(&c.0))));
    }
    let names = crate::tls::balancer_names(&plan.cluster, Some(&owner.namespace), &[]);
    let bundle = crate::tls::generate(&plan.cluster, &names)
        .map_err(|e| Error::Invalid(format!("spec.balancer.tls: {e}")))?;
    ctx.metrics.wrote("create", "Secret");
    match secrets
        .create(
            &PostParams::default(),
            &objects::balancer_tls_secret(&name, plan, owner, &bundle),
        )
        .await
    {
        Ok(_) => Ok((None, Some(digest(bundle.cert.as_bytes())))),
        // Created meanwhile (another reconcile): that one stays.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let data = secrets.get(&name).await?.data.unwrap_or_default();
            Ok((None, data.get("tls.crt").map(|c| digest(&c.0))))
        }
        Err(e) => Err(e.into()),
    }
}

/// The record of the primary kept in the cluster's status; instance 0 before any.
fn record_of(cluster: &str, status: Option<&PgBalancerClusterStatus>) -> Record {
    let ordinal = |name: Option<&str>| -> Option<u32> {
        name?.strip_prefix(cluster)?.strip_prefix('-')?.parse().ok()
    };
    let current = ordinal(status.and_then(|s| s.current_primary.as_deref()));
    // The phase says why a change in progress started.
    let phase = status.and_then(|s| s.phase.as_deref());
    let kind = if phase == Some(Phase::FailingOver.as_str()) {
        ChangeKind::Failover
    } else {
        ChangeKind::Switchover
    };
    Record {
        current,
        target: ordinal(status.and_then(|s| s.target_primary.as_deref()))
            .or(current)
            .unwrap_or(0),
        kind,
    }
}

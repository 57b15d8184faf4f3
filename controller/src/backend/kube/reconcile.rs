//! One reconcile of a `PgBalancerCluster` (IO): validate, make sure the credentials exist,
//! apply the children that differ from the plan, remove scaled-down instances with their
//! PVCs, and write status when it changed. Errors are classified for `error_policy`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use pgbalancer_crd::{PgBalancerCluster, PgBalancerClusterStatus};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use super::metrics::Metrics;
use super::objects::{self, Owner};
use crate::backend::{Observed, ObservedBalancer, ObservedInstance, PoolNode};
use crate::credentials::Credentials;
use crate::labels;
use crate::plan::{Plan, Role};
use crate::reconcile::Record;
use crate::status;

/// Why a reconcile failed.
#[derive(Debug, Error)]
pub enum Error {
    /// The spec is invalid: nothing is changed until it is edited.
    #[error("invalid spec: {0}")]
    Invalid(String),
    /// The API server refused or failed a request.
    #[error("kubernetes API")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// Label value for the failures metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid_spec",
            Error::Kube(_) => "kube_api",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Metrics.
    pub metrics: Metrics,
    /// Event recorder.
    pub recorder: Recorder,
    /// The API server serves `policy/v1` PodDisruptionBudgets (absent before Kubernetes 1.21).
    pub pdb_supported: bool,
}

/// Reconciles one cluster.
pub async fn reconcile(
    cluster: Arc<PgBalancerCluster>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let name = cluster.name_any();
    let namespace = cluster.namespace().unwrap_or_else(|| "default".into());
    let span = tracing::info_span!("reconcile", cluster = %name, namespace = %namespace);
    let _enter = span.enter();
    let result = reconcile_inner(&cluster, &ctx, &namespace).await;
    ctx.metrics.reconciled(started.elapsed());
    if let Err(e) = &result {
        ctx.metrics.failed(e.reason());
        tracing::warn!(error = %e, cause = ?std::error::Error::source(e), "reconcile failed");
    }
    result
}

/// What to do after a failed reconcile: wait for an edit of an invalid spec, retry others.
pub fn error_policy(_cluster: Arc<PgBalancerCluster>, error: &Error, _ctx: Arc<Context>) -> Action {
    match error {
        Error::Invalid(_) => Action::await_change(),
        Error::Kube(_) => Action::requeue(Duration::from_secs(5)),
    }
}

async fn reconcile_inner(
    cluster: &PgBalancerCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<Action, Error> {
    let client = &ctx.client;
    let name = cluster.name_any();
    let clusters: Api<PgBalancerCluster> = Api::namespaced(client.clone(), namespace);
    let previous = cluster.status.clone();
    let generation = cluster.metadata.generation;
    if let Err(e) = pgbalancer_crd::validate(cluster) {
        let message = e.to_string().replace('\n', "; ");
        let new = status::invalid(previous.as_ref(), &message, generation, now());
        if previous.as_ref().is_none_or(|p| !status::same(p, &new)) {
            write_status(&clusters, &name, &new, ctx).await?;
            event(ctx, cluster, EventType::Warning, "InvalidSpec", &message).await;
        }
        return Err(Error::Invalid(message));
    }
    let owner = Owner {
        namespace: namespace.to_owned(),
        reference: cluster
            .controller_owner_ref(&())
            .ok_or_else(|| Error::Invalid("the cluster has no uid yet".into()))?,
    };
    let record = record_of(&name, previous.as_ref());
    let plan = Plan::kubernetes(cluster, record.target);
    let creds = credentials(cluster, &plan, &owner, ctx).await?;

    let backends = objects::balancer_config(&plan, &owner, &creds);
    for config in [
        objects::postgres_config(&plan, &owner, &creds),
        backends.clone(),
    ] {
        apply(client, ctx, namespace, config).await?;
    }
    for secret in [
        objects::postgres_secret(&plan, &owner, &creds),
        objects::balancer_secret(&plan, &owner, &creds),
    ] {
        apply(client, ctx, namespace, secret).await?;
    }
    for service in [
        objects::headless_service(&plan, &owner),
        objects::rw_service(&plan, &owner),
        objects::ro_service(&plan, &owner),
        objects::balancer_service(&plan, &owner),
    ] {
        apply(client, ctx, namespace, service).await?;
    }
    for inst in &plan.instances {
        apply(
            client,
            ctx,
            namespace,
            objects::statefulset(&plan, &owner, inst, &creds),
        )
        .await?;
    }
    apply(
        client,
        ctx,
        namespace,
        objects::balancer_deployment(&plan, &owner, &creds),
    )
    .await?;
    if ctx.pdb_supported && plan.balancer.instances.len() > 1 {
        apply(client, ctx, namespace, objects::balancer_pdb(&plan, &owner)).await?;
    }
    let backends_hash = backends
        .data
        .as_ref()
        .and_then(|d| d.get("pgpool.conf"))
        .map(objects::content_hash)
        .unwrap_or_default();
    super::balancer::nudge(client, ctx, namespace, &plan, &backends_hash).await?;
    let sets = instance_sets(client, namespace, &plan).await?;
    let (removed, draining) = remove_unplanned(client, ctx, namespace, &plan, &sets).await?;
    adopt_claims(client, ctx, namespace, &plan, &owner).await?;
    if !removed.is_empty() {
        event(
            ctx,
            cluster,
            EventType::Normal,
            "ScaledDown",
            &format!("removed {}", removed.join(", ")),
        )
        .await;
    }

    let kept: Vec<(u32, StatefulSet)> = sets
        .into_iter()
        .filter(|(_, sts)| !removed.contains(&sts.name_any()))
        .collect();
    let seen = observe(client, namespace, &plan, &kept).await?;
    let record = record.advance(&seen);
    let mut new = status::compute(&plan, &seen, &record, previous.as_ref(), generation, now());
    if let Some(b) = new.balancer.as_mut() {
        b.endpoint = Some(format!(
            "{}-balancer:{}",
            plan.cluster,
            crate::plan::BALANCER_PORT
        ));
    }
    if let Some(conflict) = status::conflict_message(&new) {
        if previous.as_ref().and_then(|p| p.phase.as_deref()) != new.phase.as_deref() {
            event(
                ctx,
                cluster,
                EventType::Warning,
                "PrimaryConflict",
                &conflict,
            )
            .await;
        }
    }
    if previous.as_ref().is_none_or(|p| !status::same(p, &new)) {
        if previous.as_ref().and_then(|p| p.phase.clone()) != new.phase {
            let phase = new.phase.clone().unwrap_or_default();
            event(
                ctx,
                cluster,
                EventType::Normal,
                &phase,
                &format!("cluster is {phase}"),
            )
            .await;
        }
        write_status(&clusters, &name, &new, ctx).await?;
    }
    let balancers_ready = seen.balancers.values().filter(|b| b.routing).count();
    let settling = balancers_ready > 0
        && new
            .instances
            .iter()
            .any(|i| i.balancer_node.as_deref() != Some("up"));
    let primary_ready = crate::reconcile::instance_ready(&plan, &seen, plan.primary().ordinal);
    let slots_busy = if primary_ready {
        let services: Api<k8s_openapi::api::core::v1::Service> =
            Api::namespaced(client.clone(), namespace);
        match services
            .get_opt(&format!("{}-rw", plan.cluster))
            .await?
            .and_then(|s| s.spec?.cluster_ip)
        {
            Some(ip) => super::slots::drop_stale(&plan, &ip, &creds).await,
            None => false,
        }
    } else {
        false
    };
    if draining || settling || slots_busy {
        // A removed replica is still attached, or a kept one not attached yet: look again shortly.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    Ok(if new.phase.as_deref() == Some("Running") {
        Action::requeue(Duration::from_secs(600))
    } else {
        Action::requeue(Duration::from_secs(60))
    })
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

async fn write_status(
    api: &Api<PgBalancerCluster>,
    name: &str,
    status: &PgBalancerClusterStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let body = serde_json::json!({
        "apiVersion": pgbalancer_crd::API_VERSION,
        "kind": pgbalancer_crd::KIND,
        "status": status,
    });
    ctx.metrics.wrote();
    api.patch_status(
        name,
        &PatchParams::apply(labels::MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
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
    ctx.metrics.wrote();
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
        .unwrap_or_else(|| format!("{}-credentials", plan.cluster));
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
    ctx.metrics.wrote();
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

/// Server-side applies `desired` unless the live object already carries its hash.
async fn apply<K>(client: &Client, ctx: &Context, namespace: &str, desired: K) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = desired.meta().name.clone().unwrap_or_default();
    let hash = |o: &K| {
        o.meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(labels::CONFIG_HASH))
            .cloned()
    };
    if let Some(live) = api.get_opt(&name).await? {
        if hash(&live) == hash(&desired) {
            return Ok(());
        }
    }
    ctx.metrics.wrote();
    api.patch(
        &name,
        &PatchParams::apply(labels::MANAGER).force(),
        &Patch::Apply(&desired),
    )
    .await?;
    tracing::info!(kind = %K::kind(&()), object = %name, "applied");
    Ok(())
}

/// Deletes the StatefulSets (and their PVCs) of instances no longer planned, once no balancer
/// routes to them any more; also returns whether some are still draining. The plan always
/// holds the primary, so it is never among them.
async fn remove_unplanned(
    client: &Client,
    ctx: &Context,
    namespace: &str,
    plan: &Plan,
    sets: &[(u32, StatefulSet)],
) -> Result<(Vec<String>, bool), Error> {
    let mut draining = false;
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let mut removed = Vec::new();
    for (ordinal, sts) in sets {
        if plan.instance(*ordinal).is_some() {
            continue;
        }
        if super::balancer::still_routes(client, namespace, plan, *ordinal).await? {
            draining = true;
            continue;
        }
        let name = sts.name_any();
        ctx.metrics.wrote();
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        let claim = objects::data_pvc_name(&plan.cluster, *ordinal);
        ctx.metrics.wrote();
        match claims.delete(&claim, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(statefulset = %name, pvc = %claim, "removed scaled-down instance");
        removed.push(name);
    }
    Ok((removed, draining))
}

/// PVCs made from volumeClaimTemplates have no owner; giving them the cluster as owner makes
/// `kubectl delete pgbc` remove them (and, with a Delete reclaim policy, their volumes).
async fn adopt_claims(
    client: &Client,
    ctx: &Context,
    namespace: &str,
    plan: &Plan,
    owner: &Owner,
) -> Result<(), Error> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    for claim in claims
        .list(&ListParams::default().labels(&labels::postgres_selector(&plan.cluster)))
        .await?
    {
        let refs = claim.metadata.owner_references.clone().unwrap_or_default();
        if refs.iter().any(|r| r.uid == owner.reference.uid) {
            continue;
        }
        let mut reference = owner.reference.clone();
        reference.controller = Some(false);
        let mut all = refs;
        all.push(reference);
        let patch = serde_json::json!({ "metadata": { "ownerReferences": all } });
        ctx.metrics.wrote();
        claims
            .patch(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
    }
    Ok(())
}

/// The cluster's instance StatefulSets with their ordinals, listed once per reconcile.
async fn instance_sets(
    client: &Client,
    namespace: &str,
    plan: &Plan,
) -> Result<Vec<(u32, StatefulSet)>, Error> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .list(&ListParams::default().labels(&labels::postgres_selector(&plan.cluster)))
        .await?
        .into_iter()
        .filter_map(|sts| Some((sts.labels().get(labels::ORDINAL)?.parse::<u32>().ok()?, sts)))
        .collect())
}

/// The record of the primary kept in the cluster's status; instance 0 before any.
fn record_of(cluster: &str, status: Option<&PgBalancerClusterStatus>) -> Record {
    let ordinal = |name: Option<&str>| -> Option<u32> {
        name?.strip_prefix(cluster)?.strip_prefix('-')?.parse().ok()
    };
    let current = ordinal(status.and_then(|s| s.current_primary.as_deref()));
    Record {
        current,
        target: ordinal(status.and_then(|s| s.target_primary.as_deref()))
            .or(current)
            .unwrap_or(0),
        ..Record::default()
    }
}

/// What the workloads report, in the engine-neutral shape; `sets` are the StatefulSets left
/// after scale-down. From outside the cluster network SQL is not attempted: roles come from
/// the pods' role marks and readiness from the pods' Ready condition (whose probe checks
/// streaming on standbys); what cannot be seen stays unknown.
async fn observe(
    client: &Client,
    namespace: &str,
    plan: &Plan,
    sets: &[(u32, StatefulSet)],
) -> Result<Observed, Error> {
    let mut seen = Observed {
        network: true,
        ..Observed::default()
    };
    for (ordinal, sts) in sets {
        let ready = sts
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
            >= 1;
        let role = sts
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.as_ref())
            .and_then(|l| l.get(labels::ROLE))
            .map(|r| {
                if r == "primary" {
                    Role::Primary
                } else {
                    Role::Replica
                }
            });
        seen.instances.insert(
            *ordinal,
            ObservedInstance {
                name: format!("{}-0", sts.name_any()),
                state: if ready { "running" } else { "restarting" }.into(),
                running: true,
                up_to_date: true,
                engine_ready: Some(ready),
                marked: role,
                ..ObservedInstance::default()
            },
        );
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let ready_balancers = match deployments
        .get_opt(&format!("{}-balancer", plan.cluster))
        .await?
    {
        Some(d) => d.status.and_then(|s| s.ready_replicas).unwrap_or(0),
        None => 0,
    };
    let nodes: Vec<PoolNode> = if ready_balancers > 0 {
        super::balancer::nodes(client, namespace, plan).await?
    } else {
        Vec::new()
    };
    for index in 0..u32::try_from(ready_balancers).unwrap_or(0) {
        seen.balancers.insert(
            index,
            ObservedBalancer {
                name: format!("{}-balancer", plan.cluster),
                state: "running".into(),
                running: true,
                up_to_date: true,
                routing: true,
                nodes: if index == 0 {
                    nodes.clone()
                } else {
                    Vec::new()
                },
                ..ObservedBalancer::default()
            },
        );
    }
    Ok(seen)
}

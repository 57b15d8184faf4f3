//! The Kubernetes backend (IO): observes a cluster's StatefulSets, pods, balancer pods and,
//! from inside the cluster network, PostgreSQL and the balancer agents; applies the core's
//! actions with server-side apply (one field manager), deletes, pod label patches and agent
//! calls. It decides nothing: `reconcile::decide` does, the same as for Docker.
//!
//! From outside the cluster network (an operator run against a kubeconfig) SQL and the agents
//! are not tried: roles come from the pods' role labels and readiness from their Ready
//! condition, and what cannot be seen stays unknown.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ContainerStatus, PersistentVolumeClaim, Pod};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::balancer;
use super::metrics::Metrics;
use super::objects::{self, Owner};
use super::reconcile::Error;
use crate::backend::agent_client as agent;
use crate::backend::{Action, Backend, Observed, ObservedBalancer, ObservedInstance};
use crate::credentials::Credentials;
use crate::labels;
use crate::pg;
use crate::plan::{InstancePlan, Plan, Role, POSTGRES_PORT, REST_PORT, SUPERUSER};

/// One cluster's view of the API server.
pub struct KubeBackend<'a> {
    /// API client.
    pub client: Client,
    /// Counts API writes.
    pub metrics: &'a Metrics,
    /// Namespace and ownerReference of every child.
    pub owner: Owner,
    /// The cluster's credentials.
    pub creds: Credentials,
    /// Probe PostgreSQL and the agents (the operator runs inside the cluster network).
    pub in_cluster: bool,
    /// The API server serves `policy/v1` PodDisruptionBudgets.
    pub pdb_supported: bool,
}

fn api<K>(client: &Client, namespace: &str) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    Api::namespaced(client.clone(), namespace)
}

fn hash_of<K: Resource>(o: &K) -> Option<&String> {
    o.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(labels::CONFIG_HASH))
}

/// Ordinal label of an object.
fn ordinal_of<K: Resource>(o: &K) -> Option<u32> {
    o.meta().labels.as_ref()?.get(labels::ORDINAL)?.parse().ok()
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// The `postgres` container's status in `pod`.
fn postgres_status(pod: &Pod) -> Option<&ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == "postgres")
}

/// How long the `postgres` container has been running; `None` when it does not run.
fn running_for(pod: &Pod) -> Option<std::time::Duration> {
    let started = postgres_status(pod)?
        .state
        .as_ref()?
        .running
        .as_ref()?
        .started_at
        .as_ref()?;
    let since = k8s_openapi::jiff::Timestamp::now().duration_since(started.0);
    std::time::Duration::try_from(since).ok()
}

/// The `postgres` container's termination message (the entrypoint's refusal to start) while
/// it is not running again: a start that keeps failing, named.
fn start_failure(pod: &Pod) -> Option<String> {
    let status = postgres_status(pod)?;
    let state = status.state.as_ref()?;
    if state.running.is_some() {
        return None;
    }
    let ended = state
        .terminated
        .as_ref()
        .or_else(|| status.last_state.as_ref()?.terminated.as_ref())?;
    let message = ended.message.as_deref()?.trim();
    (!message.is_empty()).then(|| message.to_owned())
}

fn role_label(pod: &Pod) -> Option<Role> {
    match pod.labels().get(labels::ROLE).map(String::as_str) {
        Some("primary") => Some(Role::Primary),
        Some("replica") => Some(Role::Replica),
        _ => None,
    }
}

impl KubeBackend<'_> {
    fn namespace(&self) -> &str {
        &self.owner.namespace
    }

    /// Server-side applies `desired` unless the live object already carries its hash.
    async fn apply_object<K>(&self, desired: K) -> Result<(), Error>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + k8s_openapi::Resource
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = api(&self.client, self.namespace());
        let name = desired.meta().name.clone().unwrap_or_default();
        if let Some(live) = api.get_opt(&name).await? {
            if hash_of(&live) == hash_of(&desired) {
                return Ok(());
            }
        }
        self.metrics
            .wrote("apply", <K as k8s_openapi::Resource>::KIND);
        api.patch(
            &name,
            &PatchParams::apply(labels::MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await?;
        tracing::info!(kind = %K::kind(&()), object = %name, "applied");
        Ok(())
    }

    /// Whether the live object named like `desired` carries `desired`'s hash.
    async fn current<K>(&self, desired: &K) -> Result<bool, Error>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = api(&self.client, self.namespace());
        let name = desired.meta().name.clone().unwrap_or_default();
        Ok(api
            .get_opt(&name)
            .await?
            .is_some_and(|live| hash_of(&live) == hash_of(desired)))
    }

    /// The shared objects: configuration, secrets, Services and the balancer PDB.
    async fn shared_current(&self, plan: &Plan) -> Result<bool, Error> {
        let (o, c) = (&self.owner, &self.creds);
        let checks = [
            self.current(&objects::postgres_config(plan, o, c)).await?,
            self.current(&objects::balancer_config(plan, o, c)).await?,
            self.current(&objects::postgres_secret(plan, o, c)).await?,
            self.current(&objects::balancer_secret(plan, o, c)).await?,
            self.current(&objects::headless_service(plan, o)).await?,
            self.current(&objects::rw_service(plan, o)).await?,
            self.current(&objects::ro_service(plan, o)).await?,
            self.current(&objects::balancer_service(plan, o)).await?,
        ];
        let pdb = !self.wants_pdb(plan) || self.current(&objects::balancer_pdb(plan, o)).await?;
        Ok(checks.iter().all(|ok| *ok) && pdb)
    }

    fn wants_pdb(&self, plan: &Plan) -> bool {
        self.pdb_supported && plan.balancer.instances.len() > 1
    }

    async fn ensure_shared(&self, plan: &Plan) -> Result<(), Error> {
        let (o, c) = (&self.owner, &self.creds);
        self.apply_object(objects::postgres_config(plan, o, c))
            .await?;
        self.update_backends(plan).await?;
        self.apply_object(objects::postgres_secret(plan, o, c))
            .await?;
        self.apply_object(objects::balancer_secret(plan, o, c))
            .await?;
        for service in [
            objects::headless_service(plan, o),
            objects::rw_service(plan, o),
            objects::ro_service(plan, o),
            objects::balancer_service(plan, o),
        ] {
            self.apply_object(service).await?;
        }
        if self.wants_pdb(plan) {
            self.apply_object(objects::balancer_pdb(plan, o)).await?;
        }
        Ok(())
    }

    /// The balancer's backend list, and a nudge so balancer pods see it within seconds.
    async fn update_backends(&self, plan: &Plan) -> Result<(), Error> {
        let config = objects::balancer_config(plan, &self.owner, &self.creds);
        let hash = balancer::backends_hash(&config);
        self.apply_object(config).await?;
        balancer::nudge(&self.client, self.metrics, self.namespace(), plan, &hash).await
    }

    fn instance<'p>(&self, plan: &'p Plan, ordinal: u32) -> Result<&'p InstancePlan, Error> {
        plan.instance(ordinal)
            .ok_or_else(|| Error::Invalid(format!("instance {ordinal} is not planned")))
    }

    /// The instance's PVC, owned by the cluster from the start (so deleting the cluster
    /// deletes it), then its StatefulSet, which adopts the PVC by name.
    async fn create_instance(&self, plan: &Plan, ordinal: u32) -> Result<(), Error> {
        let inst = self.instance(plan, ordinal)?;
        let claims: Api<PersistentVolumeClaim> = api(&self.client, self.namespace());
        self.metrics.wrote("create", "PersistentVolumeClaim");
        match claims
            .create(
                &PostParams::default(),
                &objects::data_pvc(plan, &self.owner, inst),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        self.apply_object(objects::statefulset(plan, &self.owner, inst, &self.creds))
            .await
    }

    async fn remove_instance(&self, plan: &Plan, ordinal: u32) -> Result<(), Error> {
        let name = crate::plan::instance_name(&plan.cluster, ordinal);
        let sets: Api<StatefulSet> = api(&self.client, self.namespace());
        let claims: Api<PersistentVolumeClaim> = api(&self.client, self.namespace());
        for result in [
            {
                self.metrics.wrote("delete", "StatefulSet");
                sets.delete(&name, &DeleteParams::background())
                    .await
                    .map(|_| ())
            },
            {
                self.metrics.wrote("delete", "PersistentVolumeClaim");
                claims
                    .delete(
                        &objects::data_pvc_name(&plan.cluster, ordinal),
                        &DeleteParams::background(),
                    )
                    .await
                    .map(|_| ())
            },
        ] {
            match result {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        tracing::info!(instance = %name, "removed scaled-down instance and its PVC");
        Ok(())
    }

    async fn instance_pods(&self, plan: &Plan) -> Result<BTreeMap<u32, Pod>, Error> {
        let pods: Api<Pod> = api(&self.client, self.namespace());
        Ok(pods
            .list(&ListParams::default().labels(&labels::postgres_selector(&plan.cluster)))
            .await?
            .into_iter()
            .filter_map(|p| Some((ordinal_of(&p)?, p)))
            .collect())
    }

    /// Patches the role label of instance `ordinal`'s pod to `role`.
    async fn label(&self, plan: &Plan, ordinal: u32, role: Role) -> Result<(), Error> {
        let pods: Api<Pod> = api(&self.client, self.namespace());
        let Some(pod) = self.instance_pods(plan).await?.remove(&ordinal) else {
            return Ok(());
        };
        if role_label(&pod) == Some(role) {
            return Ok(());
        }
        let mut marks = serde_json::Map::new();
        marks.insert(labels::ROLE.into(), role.as_str().into());
        if plan.initialised {
            marks.insert(labels::INITIALISED.into(), "true".into());
        }
        let patch = serde_json::json!({ "metadata": { "labels": marks } });
        self.metrics.wrote("patch", "Pod");
        pods.patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        tracing::info!(pod = %pod.name_any(), role = role.as_str(), "role label set");
        Ok(())
    }

    /// Marks the old primary a replica and deletes its pod: the new pod starts as a replica
    /// and rejoins (pg_rewind) once the new primary is promoted; the old one takes no writes.
    async fn fence(&self, plan: &Plan, ordinal: u32) -> Result<(), Error> {
        self.label(plan, ordinal, Role::Replica).await?;
        if let Some(pod) = self.delete_pod(plan, ordinal).await? {
            tracing::info!(%pod, "fenced the old primary");
        }
        Ok(())
    }

    /// Deletes instance `ordinal`'s pod (its StatefulSet starts it again on the same volume),
    /// and names it; `None` when it has none.
    async fn delete_pod(&self, plan: &Plan, ordinal: u32) -> Result<Option<String>, Error> {
        let pods: Api<Pod> = api(&self.client, self.namespace());
        let Some(pod) = self.instance_pods(plan).await?.remove(&ordinal) else {
            return Ok(None);
        };
        self.metrics.wrote("delete", "Pod");
        match pods
            .delete(&pod.name_any(), &DeleteParams::default().grace_period(10))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Some(pod.name_any()))
    }

    /// A superuser connection to instance `ordinal`'s pod.
    async fn superuser(&self, plan: &Plan, ordinal: u32) -> Result<tokio_postgres::Client, Error> {
        let ip = self
            .instance_pods(plan)
            .await?
            .remove(&ordinal)
            .and_then(|p| p.status?.pod_ip)
            .ok_or_else(|| Error::Agent(format!("instance {ordinal} has no pod address")))?;
        Ok(self.superuser_at(&ip).await?)
    }

    /// A superuser connection to the instance at pod address `ip`.
    async fn superuser_at(&self, ip: &str) -> Result<tokio_postgres::Client, pg::PgError> {
        pg::connect(
            ip,
            POSTGRES_PORT,
            SUPERUSER,
            &self.creds.superuser_password,
            "postgres",
        )
        .await
    }

    async fn ensure_slots(&self, plan: &Plan, ordinal: u32) -> Result<(), Error> {
        let client = self.superuser(plan, ordinal).await?;
        let writable = !pg::position(&client).await?.in_recovery;
        Ok(pg::reconcile_slots(&client, &plan.slots_on(ordinal, writable)).await?)
    }

    /// Creates the verifier lookup on instance `ordinal` (see [`Action::CreateLoginLookup`]).
    async fn create_login_lookup(&self, plan: &Plan, ordinal: u32) -> Result<(), Error> {
        let client = self.superuser(plan, ordinal).await?;
        if pg::login_lookup::create(&client).await? {
            tracing::info!(instance = ordinal, "created pgbalancer.scram_verifier");
        }
        Ok(())
    }

    async fn promote(&self, plan: &Plan, ordinal: u32) -> Result<(), Error> {
        let client = self.superuser(plan, ordinal).await?;
        if pg::promote(&client).await? {
            tracing::info!(instance = ordinal, "promoted");
            Ok(())
        } else {
            Err(Error::Agent(format!(
                "instance {ordinal} did not finish promotion in time"
            )))
        }
    }

    async fn observe_instance(
        &self,
        plan: &Plan,
        sts: &StatefulSet,
        pod: Option<&Pod>,
    ) -> ObservedInstance {
        let desired = plan
            .instance(ordinal_of(sts).unwrap_or(u32::MAX))
            .map(|inst| objects::statefulset(plan, &self.owner, inst, &self.creds));
        let running = pod.is_some_and(pod_running);
        let mut seen = ObservedInstance {
            name: pod.map_or_else(|| crate::plan::pod_name(&sts.name_any()), |p| p.name_any()),
            // Kubernetes restarts pods itself: a pod that does not run is "restarting".
            state: if running { "running" } else { "restarting" }.into(),
            running,
            up_to_date: desired.is_none_or(|d| hash_of(&d) == hash_of(sts)),
            engine_ready: Some(pod.is_some_and(pod_ready)),
            marked: pod.and_then(role_label),
            start_failure: pod.and_then(start_failure),
            running_for: pod.and_then(running_for),
            ..ObservedInstance::default()
        };
        let ip = pod.and_then(|p| p.status.as_ref()?.pod_ip.clone());
        if let (true, true, Some(ip)) = (self.in_cluster, running, ip) {
            seen.probed = true;
            if let Ok(client) = self.superuser_at(&ip).await {
                pg::observe_instance(&client, &mut seen).await;
            }
        }
        seen
    }
}

impl Backend for KubeBackend<'_> {
    type Error = Error;

    async fn observe(&self, plan: &Plan) -> Result<Observed, Error> {
        let sets: Api<StatefulSet> = api(&self.client, self.namespace());
        let sets = sets
            .list(&ListParams::default().labels(&labels::postgres_selector(&plan.cluster)))
            .await?;
        let pods = self.instance_pods(plan).await?;
        let pods_ref = &pods;
        let probes = sets.iter().filter_map(|sts| {
            let ordinal = ordinal_of(sts)?;
            Some(async move {
                (
                    ordinal,
                    self.observe_instance(plan, sts, pods_ref.get(&ordinal))
                        .await,
                )
            })
        });
        let mut observed = Observed {
            network: self.shared_current(plan).await?,
            instances: futures::future::join_all(probes)
                .await
                .into_iter()
                .collect(),
            balancers: BTreeMap::new(),
        };
        if self.in_cluster {
            self.replication(plan, &pods, &mut observed).await;
        }

        let deployments: Api<Deployment> = api(&self.client, self.namespace());
        let desired = objects::balancer_deployment(plan, &self.owner, &self.creds);
        let Some(live) = deployments
            .get_opt(desired.metadata.name.as_deref().unwrap_or_default())
            .await?
        else {
            return Ok(observed);
        };
        let up_to_date = hash_of(&live) == hash_of(&desired);
        for (index, pod) in balancer::pods(&self.client, self.namespace(), plan)
            .await?
            .into_iter()
            .enumerate()
        {
            let running = pod_running(&pod);
            let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
            let nodes = match (self.in_cluster, running, ip) {
                (true, true, Some(ip)) => {
                    match agent::nodes(&agent::authority(&ip, REST_PORT)).await {
                        Ok(nodes) => Some(nodes),
                        Err(e) => {
                            tracing::debug!(pod = %pod.name_any(), error = %e, "balancer nodes unseen");
                            None
                        }
                    }
                }
                _ => None,
            };
            observed.balancers.insert(
                index as u32,
                ObservedBalancer {
                    name: pod.name_any(),
                    state: if running { "running" } else { "restarting" }.into(),
                    running,
                    up_to_date,
                    routing: pod_ready(&pod),
                    nodes,
                    ..ObservedBalancer::default()
                },
            );
        }
        Ok(observed)
    }

    async fn apply(&self, plan: &Plan, action: Action) -> Result<(), Error> {
        let (o, c) = (&self.owner, &self.creds);
        match action {
            Action::EnsureNetwork => self.ensure_shared(plan).await,
            Action::CreateInstance(ordinal) => self.create_instance(plan, ordinal).await,
            Action::ReplaceInstance(ordinal) => {
                let inst = self.instance(plan, ordinal)?;
                self.apply_object(objects::statefulset(plan, o, inst, c))
                    .await
            }
            // Kubernetes restarts pods by itself; `decide` asks only for stopped ones.
            Action::StartInstance(_) | Action::StartBalancer(_) => Ok(()),
            Action::RemoveInstance(ordinal) => self.remove_instance(plan, ordinal).await,
            // One Deployment holds every balancer: applying it creates, replaces or scales.
            Action::CreateBalancer(_) | Action::ReplaceBalancer(_) | Action::RemoveBalancer(_) => {
                self.apply_object(objects::balancer_deployment(plan, o, c))
                    .await
            }
            Action::UpdateBackends(_) => self.update_backends(plan).await,
            Action::AttachBackend { balancer, slot } => {
                self.agent_call(plan, balancer, slot, "attach").await
            }
            Action::DetachBackend { balancer, slot } => {
                // The new list first, so the agent does not re-attach the slot.
                self.update_backends(plan).await?;
                // Forced: the old primary is detached before it is fenced.
                self.agent_call(plan, balancer, slot, "detach?force=true")
                    .await
            }
            Action::MarkRole(ordinal) => {
                let role = self.instance(plan, ordinal)?.role;
                if role == Role::Primary {
                    for other in plan.instances.iter().filter(|i| i.ordinal != ordinal) {
                        self.label(plan, other.ordinal, Role::Replica).await?;
                    }
                }
                self.label(plan, ordinal, role).await
            }
            Action::EnsureSlots(ordinal) => self.ensure_slots(plan, ordinal).await,
            Action::CreateLoginLookup(ordinal) => self.create_login_lookup(plan, ordinal).await,
            Action::Fence(ordinal) => self.fence(plan, ordinal).await,
            Action::Promote(ordinal) => self.promote(plan, ordinal).await,
            Action::RestartForeign(ordinal) => {
                if let Some(pod) = self.delete_pod(plan, ordinal).await? {
                    tracing::warn!(%pod, "restarted: its data belongs to another database system");
                }
                Ok(())
            }
        }
    }
}

impl KubeBackend<'_> {
    /// Streaming state and lag of each standby, as the primary that answered sees them.
    async fn replication(&self, plan: &Plan, pods: &BTreeMap<u32, Pod>, observed: &mut Observed) {
        let Some(ip) = observed
            .instances
            .iter()
            .find(|(_, s)| s.in_recovery == Some(false))
            .and_then(|(o, _)| pods.get(o)?.status.as_ref()?.pod_ip.clone())
        else {
            return;
        };
        if let Ok(client) = self.superuser_at(&ip).await {
            if let Ok(standbys) = pg::standbys(&client).await {
                observed.set_replication(plan, &standbys);
            }
        }
    }

    async fn agent_call(
        &self,
        plan: &Plan,
        index: u32,
        slot: u32,
        verb: &str,
    ) -> Result<(), Error> {
        let pod = balancer::pods(&self.client, self.namespace(), plan)
            .await?
            .into_iter()
            .nth(index as usize)
            .ok_or_else(|| Error::Agent(format!("balancer pod {index} is gone")))?;
        let ip = pod
            .status
            .and_then(|s| s.pod_ip)
            .ok_or_else(|| Error::Agent(format!("balancer pod {index} has no address")))?;
        agent::node_action(
            &agent::authority(&ip, REST_PORT),
            slot,
            verb,
            &self.creds.api_token,
        )
        .await
        .map_err(|e| Error::Agent(e.message))
    }
}

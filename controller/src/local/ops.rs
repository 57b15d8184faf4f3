//! Operations of local mode shared by both command-line front ends: apply clusters (validate,
//! check, store, converge), observe one, and remove one.
//!
//! Every input check happens before the first change, so a refused command leaves Docker and
//! the state directory exactly as they were.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::query_parameters::{ListNetworksOptions, ListVolumesOptions, RemoveVolumeOptions};
use bollard::Docker;
use futures::future::join_all;
use pgbalancer_crd::validate::validate_set;
use pgbalancer_crd::PgBalancerCluster;
use thiserror::Error;

use crate::backend::docker::{self, controller, list_owned, preflight, DockerBackend, DockerError};
use crate::backend::{Backend, Observed};
use crate::credentials::Credentials;
use crate::labels;
use crate::local::state::{StateDir, StateError, StoredCluster};
use crate::plan::Plan;
use crate::reconcile::{converge, ChangeKind, ConvergeError, Record};

/// Why a local operation failed.
#[derive(Debug, Error)]
pub enum OpError {
    /// The input is wrong; nothing was changed.
    #[error("{0}")]
    Input(String),
    /// Docker failed.
    #[error(transparent)]
    Docker(#[from] DockerError),
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A cluster did not become ready.
    #[error("cluster {cluster} did not converge")]
    Converge {
        cluster: String,
        #[source]
        source: Box<ConvergeError<DockerError>>,
    },
    /// The controller could not listen for SIGTERM and SIGINT.
    #[error("cannot install the signal handlers")]
    Signal(#[source] std::io::Error),
}

/// A cluster as stored and as observed.
pub struct ClusterView {
    /// What was stored by `up`.
    pub stored: StoredCluster,
    /// Its plan.
    pub plan: Plan,
    /// What runs.
    pub observed: Observed,
    /// The controller of the state directory.
    pub controller: ControllerView,
    /// The balancers' CA certificate file, while TLS is on.
    pub ca_file: Option<PathBuf>,
}

/// The controller container of a state directory, as seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControllerView {
    /// Container name.
    pub name: String,
    /// `running`, `missing`, `exited`…
    pub state: String,
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct DownReport {
    /// Containers removed.
    pub containers: Vec<String>,
    /// Volumes removed.
    pub volumes: Vec<String>,
    /// Networks removed.
    pub networks: Vec<String>,
    /// Networks kept because another cluster still uses them.
    pub kept_networks: Vec<String>,
    /// The controller container was removed: no cluster of the state directory is left.
    pub controller_removed: bool,
}

/// How long `down` waits for a command (or the controller's tick) holding the cluster.
const DOWN_LOCK_WAIT: Duration = Duration::from_secs(120);

/// Local mode bound to an engine and a state directory.
pub struct Local {
    docker: Docker,
    state: StateDir,
}

impl Local {
    /// Connects to Docker and opens the state directory from the environment.
    pub async fn connect() -> Result<Self, OpError> {
        Ok(Self {
            docker: docker::connect().await?,
            state: StateDir::from_env(),
        })
    }

    /// The engine client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The state directory.
    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// The stored cluster `name`, or an input error listing the known ones.
    pub fn stored(&self, name: &str) -> Result<StoredCluster, OpError> {
        self.state.load(name)?.ok_or_else(|| {
            // Only enriches the message: a listing that fails must not hide the missing cluster.
            let known = self.state.names().unwrap_or_default();
            OpError::Input(if known.is_empty() {
                format!("no cluster named `{name}` (none is running; start one with `pgbalancer up -f FILE`)")
            } else {
                format!("no cluster named `{name}`; known clusters: {}", known.join(", "))
            })
        })
    }

    /// Validates, checks, stores and converges `clusters`; returns each one's final view.
    pub async fn apply(
        &self,
        clusters: Vec<PgBalancerCluster>,
        seed_file: Option<PathBuf>,
        timeout: Duration,
        report: &(dyn Fn(&str, &str) + Sync),
    ) -> Result<Vec<ClusterView>, OpError> {
        validate_set(&clusters).map_err(|e| OpError::Input(e.to_string()))?;
        let names: Vec<String> = clusters
            .iter()
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect();
        let _locks = self.state.lock_all(&names, timeout).await?;
        let mut prepared = Vec::new();
        for cluster in clusters {
            let name = cluster.metadata.name.clone().unwrap_or_default();
            let previous = self.state.load(&name)?;
            let (mut credentials, record) = match &previous {
                Some(p) => {
                    pgbalancer_crd::validate::validate_update(&p.cluster.spec, &cluster.spec)
                        .map_err(|e| OpError::Input(format!("cluster {name}: {e}")))?;
                    (p.credentials.clone(), p.record())
                }
                None => {
                    self.refuse_foreign_data(&name).await?;
                    (Credentials::generate(), Record::default())
                }
            };
            ensure_tls(&cluster, &mut credentials)
                .map_err(|e| OpError::Input(format!("cluster {name}: {e}")))?;
            let seed_file = seed_file
                .clone()
                .or(previous.as_ref().and_then(|p| p.seed_file.clone()));
            // What an `up` over a running cluster keeps: its last failover and conditions.
            let (last_failover, conditions) = previous
                .map(|p| (p.last_failover, p.conditions))
                .unwrap_or_default();
            let mut stored = StoredCluster {
                cluster: cluster.clone(),
                credentials,
                current_primary: None,
                target_primary: 0,
                seed_file,
                failing_over: false,
                last_failover,
                stopped: false,
                conditions,
            };
            stored.set_record(&record);
            let plan = stored.plan();
            prepared.push((cluster, plan, stored));
        }
        let pairs: Vec<(PgBalancerCluster, Plan)> = prepared
            .iter()
            .map(|(c, p, _)| (c.clone(), p.clone()))
            .collect();
        let problems = preflight::check(&self.docker, &pairs).await?;
        if !problems.is_empty() {
            return Err(OpError::Input(problems.join("\n")));
        }
        for (_, _, stored) in &prepared {
            self.state.save(stored)?;
        }
        let runs = prepared.into_iter().map(|(_, plan, mut stored)| async move {
            let backend = DockerBackend::new(self.docker.clone(), stored.credentials.clone());
            let name = plan.cluster.clone();
            let mut saving = stored.clone();
            let (observed, record) = converge(
                &backend,
                &plan,
                stored.record(),
                timeout,
                |line| report(&name, line),
                |record| {
                    saving.set_record(record);
                    if let Err(e) = self.state.save(&saving) {
                        tracing::warn!(cluster = %name, error = %e, "record of the primary not saved");
                    }
                },
            )
            .await
            .map_err(|source| OpError::Converge {
                cluster: name.clone(),
                source: Box::new(source),
            })?;
            stored.set_record(&record);
            let ca_file = stored.tls_ca().map(|_| self.state.ca_file(&name));
            Ok::<_, OpError>(ClusterView {
                stored,
                plan,
                observed,
                controller: ControllerView::default(),
                ca_file,
            })
        });
        let results: Vec<Result<ClusterView, OpError>> = join_all(runs).await;
        // Whatever the outcome, the stored clusters are the controller's to keep converged.
        let controller = self.ensure_controller().await;
        results
            .into_iter()
            .map(|r| {
                r.map(|mut view| {
                    view.controller = controller.clone();
                    view
                })
            })
            .collect()
    }

    /// The state directory as an absolute path without symbolic links: what names the
    /// controller and where it is mounted.
    fn state_root(&self) -> PathBuf {
        let root = self.state.root();
        std::fs::canonicalize(root)
            .or_else(|_| std::path::absolute(root))
            .unwrap_or_else(|_| root.to_path_buf())
    }

    /// Makes the controller of the state directory run (see `backend::docker::controller`).
    /// A controller that cannot be started is reported, not fatal: the clusters serve, they
    /// only do not fail over by themselves.
    pub async fn ensure_controller(&self) -> ControllerView {
        let root = self.state_root();
        let image = crate::plan::default_balancer_image();
        let ensured = match controller::RunAs::of(&root) {
            Ok(run_as) => controller::ensure(&self.docker, &image, &root, &run_as)
                .await
                .map_err(|e| crate::local::controller::error_chain(&e)),
            Err(e) => Err(format!("{}: {e}", root.display())),
        };
        match ensured {
            Ok(outcome) => tracing::info!(?outcome, "controller"),
            Err(e) => tracing::warn!(
                error = %e,
                "the controller is not running: clusters will not fail over by themselves \
                 (`pgbalancer images build` puts it in the balancer image)"
            ),
        }
        self.controller_view(&root).await
    }

    async fn controller_view(&self, root: &Path) -> ControllerView {
        ControllerView {
            name: controller::container_name(root),
            state: controller::state(&self.docker, root).await,
        }
    }

    /// Clusters the controller keeps: stored and not stopped with `down --keep-data`.
    fn active_clusters(&self) -> Result<Vec<String>, OpError> {
        let mut active = Vec::new();
        for name in self.state.names()? {
            if self.state.load(&name)?.is_some_and(|s| !s.stopped) {
                active.push(name);
            }
        }
        Ok(active)
    }

    /// Data volumes of `name` without stored credentials would be unusable: refuse instead of
    /// generating passwords that do not match them.
    async fn refuse_foreign_data(&self, name: &str) -> Result<(), OpError> {
        let volumes = self.owned_volumes(name).await?;
        if volumes.is_empty() {
            return Ok(());
        }
        Err(OpError::Input(format!(
            "volumes of cluster `{name}` exist ({}) but its credentials are not in {}; \
             restore that directory, or delete the old data with `pgbalancer down {name}`",
            volumes.join(", "),
            self.state.root().display()
        )))
    }

    async fn owned_volumes(&self, name: &str) -> Result<Vec<String>, OpError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{}={}", labels::MANAGED_BY, labels::MANAGER),
                format!("{}={name}", labels::INSTANCE),
            ],
        )]);
        let volumes = self
            .docker
            .list_volumes(Some(ListVolumesOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(DockerError::api("list volumes"))?;
        Ok(volumes
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect())
    }

    /// Moves the primary of cluster `name` to `to` (the best caught-up replica when absent):
    /// checks the request, records the new target, then converges (fence the old primary
    /// with a clean shutdown, promote the target once it replayed everything, move
    /// `<name>-rw`, restart the old primary as a replica).
    pub async fn switchover(
        &self,
        name: &str,
        to: Option<&str>,
        timeout: Duration,
        report: &(dyn Fn(&str, &str) + Sync),
    ) -> Result<ClusterView, OpError> {
        let _lock = self.state.lock(name, timeout).await?;
        let view = self.view(name).await?;
        let mut stored = view.stored;
        let target =
            crate::reconcile::switchover_target(&view.plan, &view.observed, &stored.record(), to)
                .map_err(|e| OpError::Input(format!("switchover of {name}: {e}")))?;
        let record = Record {
            current: stored.record().current.or(Some(stored.target_primary)),
            target,
            kind: ChangeKind::Switchover,
        };
        stored.set_record(&record);
        self.state.save(&stored)?;
        let plan = stored.plan();
        let backend = DockerBackend::new(self.docker.clone(), stored.credentials.clone());
        let mut saving = stored.clone();
        let (observed, record) = converge(
            &backend,
            &plan,
            record,
            timeout,
            |line| report(name, line),
            |record| {
                saving.set_record(record);
                if let Err(e) = self.state.save(&saving) {
                    tracing::warn!(cluster = %name, error = %e, "record of the primary not saved");
                }
            },
        )
        .await
        .map_err(|source| OpError::Converge {
            cluster: name.to_owned(),
            source: Box::new(source),
        })?;
        stored.set_record(&record);
        Ok(ClusterView {
            ca_file: stored.tls_ca().map(|_| self.state.ca_file(name)),
            stored,
            plan,
            observed,
            controller: view.controller,
        })
    }

    /// Observes cluster `name`.
    pub async fn view(&self, name: &str) -> Result<ClusterView, OpError> {
        let stored = self.stored(name)?;
        let plan = stored.plan();
        let backend = DockerBackend::new(self.docker.clone(), stored.credentials.clone());
        let observed = backend.observe(&plan).await?;
        Ok(ClusterView {
            ca_file: stored.tls_ca().map(|_| self.state.ca_file(name)),
            stored,
            plan,
            observed,
            controller: self.controller_view(&self.state_root()).await,
        })
    }

    /// Removes everything cluster `name` owns; with `keep_data` its volumes and state stay.
    pub async fn down(&self, name: &str, keep_data: bool) -> Result<DownReport, OpError> {
        let _lock = self.state.lock(name, DOWN_LOCK_WAIT).await?;
        let stored = self.state.load(name)?;
        let mut report = DownReport::default();
        let containers = list_owned(&self.docker, Some(name)).await?;
        let mut networks: Vec<String> = stored
            .as_ref()
            .map(|s| s.plan().local.network)
            .into_iter()
            .collect();
        // Balancers first so no client is routed to an instance being stopped.
        let (balancers, instances): (Vec<_>, Vec<_>) = containers
            .iter()
            .partition(|c| docker::label(c, labels::COMPONENT) == Some(labels::BALANCER));
        for group in [balancers, instances] {
            let removals = group.iter().map(|c| async move {
                let id = c.id.clone().unwrap_or_default();
                // A clean shutdown first; the forced removal below stops it anyway and reports
                // what fails.
                if let Err(e) = self
                    .docker
                    .stop_container(
                        &id,
                        Some(bollard::query_parameters::StopContainerOptions {
                            t: Some(30),
                            ..Default::default()
                        }),
                    )
                    .await
                {
                    tracing::debug!(container = %docker::container_name(c), error = %e, "stop failed");
                }
                self.docker
                    .remove_container(
                        &id,
                        Some(bollard::query_parameters::RemoveContainerOptions {
                            force: true,
                            v: true,
                            ..Default::default()
                        }),
                    )
                    .await
                    .map_err(DockerError::api(format!(
                        "remove container {}",
                        docker::container_name(c)
                    )))
            });
            for result in join_all(removals).await {
                result?;
            }
            report
                .containers
                .extend(group.iter().map(|c| docker::container_name(c)));
        }
        if !keep_data {
            for volume in self.owned_volumes(name).await? {
                self.docker
                    .remove_volume(&volume, Some(RemoveVolumeOptions { force: true }))
                    .await
                    .map_err(DockerError::api(format!("remove volume {volume}")))?;
                report.volumes.push(volume);
            }
        }
        let labelled = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(HashMap::from([(
                    "label".to_owned(),
                    vec![
                        format!("{}={}", labels::MANAGED_BY, labels::MANAGER),
                        format!("{}={name}", labels::INSTANCE),
                    ],
                )])),
            }))
            .await
            .map_err(DockerError::api("list networks"))?;
        networks.extend(labelled.into_iter().filter_map(|n| n.name));
        networks.sort();
        networks.dedup();
        for network in networks {
            self.remove_network_if_unused(&network, &mut report).await?;
        }
        if stored.is_none()
            && report.containers.is_empty()
            && report.volumes.is_empty()
            && report.networks.is_empty()
        {
            return Err(self
                .stored(name)
                .err()
                .unwrap_or_else(|| OpError::Input(format!("no cluster named `{name}`"))));
        }
        match stored {
            None => {}
            Some(_) if !keep_data => self.state.remove(name)?,
            // Kept for the next `up`, left alone by the controller meanwhile.
            Some(mut stored) => {
                stored.stopped = true;
                self.state.save(&stored)?;
            }
        }
        if self.active_clusters()?.is_empty() {
            report.controller_removed =
                controller::remove(&self.docker, &self.state_root()).await?;
        }
        Ok(report)
    }

    async fn remove_network_if_unused(
        &self,
        network: &str,
        report: &mut DownReport,
    ) -> Result<(), OpError> {
        let Ok(info) = self.docker.inspect_network(network, None).await else {
            return Ok(());
        };
        let ours = info
            .labels
            .as_ref()
            .and_then(|l| l.get(labels::MANAGED_BY))
            .map(String::as_str)
            == Some(labels::MANAGER);
        if !ours {
            return Ok(());
        }
        if info.containers.as_ref().is_some_and(|c| !c.is_empty()) {
            report.kept_networks.push(network.to_owned());
            return Ok(());
        }
        match self.docker.remove_network(network).await {
            Ok(()) => report.networks.push(network.to_owned()),
            // Another cluster joined it meanwhile: keep it.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 403 | 409,
                ..
            }) => report.kept_networks.push(network.to_owned()),
            Err(e) => return Err(DockerError::api(format!("remove network {network}"))(e).into()),
        }
        Ok(())
    }
}

/// With TLS on, the credentials hold a certificate for the balancer's names: generated when
/// there is none, again when the names changed (an explicit hostname, the bind address).
fn ensure_tls(cluster: &PgBalancerCluster, creds: &mut Credentials) -> Result<(), String> {
    let tls = &cluster.spec.balancer.tls;
    if tls.mode == pgbalancer_crd::TlsMode::Disabled {
        return Ok(());
    }
    if tls.certificate_secret.is_some() {
        return Err(
            "spec.balancer.tls.certificateSecret: a Kubernetes Secret cannot be used \
             on Docker; remove it to use a generated certificate"
                .into(),
        );
    }
    let name = cluster.metadata.name.clone().unwrap_or_default();
    let local = cluster.spec.local.clone().unwrap_or_default();
    let mut extra: Vec<String> = local.bind_address.into_iter().collect();
    if let Some(b) = local.balancer {
        extra.extend([b.hostname, b.container_name, b.ip].into_iter().flatten());
    }
    let names = crate::tls::balancer_names(&name, None, &extra);
    if creds.balancer_tls.as_ref().is_none_or(|t| t.names != names) {
        let bundle = crate::tls::generate(&name, &names).map_err(|e| {
            format!(
                "spec.balancer.tls: {}",
                crate::local::controller::error_chain(&e)
            )
        })?;
        creds.balancer_tls = Some(bundle);
    }
    Ok(())
}

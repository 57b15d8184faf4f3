//! The Docker backend: containers, volumes and a network through bollard, observed through
//! the engine (labels, state, published ports) and SQL over the published ports.
//!
//! Ownership is by label (`app.kubernetes.io/instance=<cluster>` and friends), never by name,
//! so renamed or orphaned objects are still found and removed.

pub mod controller;
mod error;
pub mod images;
pub mod objects;
mod ports;
pub mod preflight;
mod start_failure;

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{
    ContainerInspectResponse, ContainerSummary, Ipam, IpamConfig, NetworkConnectRequest,
    NetworkCreateRequest, NetworkDisconnectRequest, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, RemoveVolumeOptions,
    RestartContainerOptions, StopContainerOptions, UploadToContainerOptions,
};
use bollard::Docker;
use futures::future::join_all;
use pgbalancer_crd::TlsMode;

pub use error::DockerError;

use crate::backend::{agent_client, Action, Backend, Observed, ObservedBalancer, ObservedInstance};
use crate::credentials::Credentials;
use crate::labels;
use crate::pg;
use crate::plan::{self, Plan, Role, BALANCER_PORT, POSTGRES_PORT, REST_PORT, SUPERUSER};
use crate::render::CONFIG_DIR;

/// Connects to the engine named by `DOCKER_HOST` (or the local socket) and settles the API
/// version with it.
pub async fn connect() -> Result<Docker, DockerError> {
    let hint = || {
        let at =
            std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
        format!("{at}; start dockerd or set DOCKER_HOST")
    };
    let docker = Docker::connect_with_local_defaults().map_err(|source| DockerError::Connect {
        hint: hint(),
        source,
    })?;
    let docker = docker
        .negotiate_version()
        .await
        .map_err(|source| DockerError::Connect {
            hint: hint(),
            source,
        })?;
    docker.ping().await.map_err(|source| DockerError::Connect {
        hint: hint(),
        source,
    })?;
    Ok(docker)
}

/// Longest a balancer's SQL probe (connect, `SHOW POOL_NODES`, a query) may take by default.
/// pgpool holds new sessions while it searches for a new primary: a longer bound would slow
/// every step of a change of primary by as much.
const BALANCER_PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Docker backend for one cluster's credentials.
pub struct DockerBackend {
    docker: Docker,
    creds: Credentials,
    /// Bound of a balancer's SQL probe; `None`: balancers are not probed.
    balancer_probe: Option<Duration>,
}

impl DockerBackend {
    /// A backend using `docker` with the cluster's credentials.
    pub fn new(docker: Docker, creds: Credentials) -> Self {
        Self {
            docker,
            creds,
            balancer_probe: Some(BALANCER_PROBE_TIMEOUT),
        }
    }

    /// The same, giving up on a balancer's SQL probe after `timeout`, or not probing
    /// balancers at all with `None`; either way the balancer then counts as not routing, its
    /// nodes unseen. While the primary is lost pgpool holds new sessions for seconds, and a
    /// loop that must keep observing the instances cannot wait for it.
    pub fn with_balancer_probe(mut self, timeout: Option<Duration>) -> Self {
        self.balancer_probe = timeout;
        self
    }

    /// The engine client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    async fn containers(&self, cluster: &str) -> Result<Vec<ContainerSummary>, DockerError> {
        list_owned(&self.docker, Some(cluster)).await
    }

    async fn container_of(
        &self,
        plan: &Plan,
        component: &str,
        ordinal: u32,
    ) -> Result<String, DockerError> {
        self.containers(&plan.cluster)
            .await?
            .into_iter()
            .find(|c| {
                label(c, labels::COMPONENT) == Some(component) && ordinal_of(c) == Some(ordinal)
            })
            .and_then(|c| c.id)
            .ok_or_else(|| DockerError::Missing(format!("{component} {ordinal}")))
    }

    async fn observe_instance(
        &self,
        plan: &Plan,
        c: &ContainerSummary,
        ordinal: u32,
    ) -> ObservedInstance {
        let (state, health) = state_and_health(c);
        let running = state == "running";
        let up_to_date = plan.instance(ordinal).is_none_or(|inst| {
            label(c, labels::CONFIG_HASH) == Some(objects::instance_hash(plan, inst).as_str())
        }) && self.same_image(c, &plan.postgres.image).await;
        let host_port = public_port(c, POSTGRES_PORT);
        let mut seen = ObservedInstance {
            name: container_name(c),
            state,
            health,
            running,
            up_to_date,
            host_port,
            ..Default::default()
        };
        if let Some(inspected) = self.inspect(c).await {
            seen.marked = rw_alias_of(plan, &inspected);
            seen.running_for = running_for(&inspected);
        }
        if let (true, Some(port)) = (running, host_port) {
            seen.probed = true;
            if let Ok(client) = self.superuser(plan, port).await {
                pg::observe_instance(&client, &mut seen).await;
            }
        }
        if !seen.accepting {
            if let Some(id) = c.id.as_deref() {
                seen.start_failure = start_failure::start_failure(&self.docker, id).await;
            }
        }
        seen
    }

    /// A superuser connection to the instance published on host port `port`.
    async fn superuser(
        &self,
        plan: &Plan,
        port: u16,
    ) -> Result<tokio_postgres::Client, pg::PgError> {
        pg::connect(
            plan.connect_address(),
            port,
            SUPERUSER,
            &self.creds.superuser_password,
            "postgres",
        )
        .await
    }

    /// Whether the container holds the `<cluster>-rw` alias on the cluster's network, as a
    /// role mark; `None` when the engine could not say or the container is not on the network.
    async fn holds_rw_alias(&self, plan: &Plan, c: &ContainerSummary) -> Option<Role> {
        rw_alias_of(plan, &self.inspect(c).await?)
    }

    async fn inspect(&self, c: &ContainerSummary) -> Option<ContainerInspectResponse> {
        let id = c.id.as_deref()?;
        self.docker.inspect_container(id, None).await.ok()
    }

    async fn observe_balancer(
        &self,
        plan: &Plan,
        c: &ContainerSummary,
        index: u32,
        mut cutoff: tokio::sync::watch::Receiver<bool>,
    ) -> ObservedBalancer {
        let (state, health) = state_and_health(c);
        let running = state == "running";
        let up_to_date = plan.balancer.instances.get(index as usize).is_none_or(|b| {
            let cert = objects::balancer_cert(plan, &self.creds);
            label(c, labels::CONFIG_HASH) == Some(objects::balancer_hash(plan, b, cert).as_str())
        }) && self.same_image(c, &plan.balancer.image).await;
        let host_port = public_port(c, BALANCER_PORT);
        let rest_port = public_port(c, crate::plan::REST_PORT);
        let mut seen = ObservedBalancer {
            rest_port,
            name: container_name(c),
            state,
            health,
            running,
            up_to_date,
            host_port,
            ..Default::default()
        };
        if let (true, Some(port), Some(bound)) = (running, host_port, self.balancer_probe) {
            let probe = async {
                let (host, user, db) = (
                    plan.connect_address(),
                    &plan.postgres.user,
                    &plan.postgres.database,
                );
                let password = &self.creds.app_password;
                // With TLS on, through TLS, verifying the balancer's certificate as a client
                // would: a balancer that presents a wrong one does not count as routing.
                let client = match (&self.creds.balancer_tls, plan.balancer.tls) {
                    (Some(tls), TlsMode::Enabled | TlsMode::Required) => {
                        pg::connect_tls(host, port, user, password, db, &tls.ca_cert).await
                    }
                    _ => pg::connect(host, port, user, password, db).await,
                }
                .ok()?;
                let nodes = pg::pool_nodes(&client).await.ok()?;
                Some((client.simple_query("SELECT 1").await.is_ok(), nodes))
            };
            let cut = async {
                // A dropped sender (never cut) waits for the bound instead.
                if cutoff.wait_for(|cut| *cut).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                probed = tokio::time::timeout(bound, probe) => {
                    if let Ok(Some((routing, nodes))) = probed {
                        seen.routing = routing;
                        seen.nodes = Some(nodes);
                    }
                }
                () = cut => tracing::debug!(balancer = index, "probe cut short: no primary up"),
            }
        }
        seen
    }

    /// The container runs the image its tag names now; a rebuilt image (`pgbalancer images
    /// build`) replaces it on the next `up`. An image that cannot be inspected changes nothing.
    async fn same_image(&self, c: &ContainerSummary, image: &str) -> bool {
        match (
            self.docker
                .inspect_image(image)
                .await
                .ok()
                .and_then(|i| i.id),
            c.image_id.as_deref(),
        ) {
            (Some(current), Some(running)) => current == running,
            _ => true,
        }
    }

    /// Creates instance `ordinal`; published ports Docker would pick take `previous` (those of
    /// the container it replaces) or a free one.
    async fn create_instance(
        &self,
        plan: &Plan,
        ordinal: u32,
        previous: &ports::HostPorts,
    ) -> Result<(), DockerError> {
        let inst = plan
            .instance(ordinal)
            .ok_or_else(|| DockerError::Missing(format!("instance {ordinal}")))?;
        let volume = plan::volume_name(&plan.cluster, ordinal);
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(volume.clone()),
                labels: Some(objects::instance_labels(plan, inst)),
                ..Default::default()
            })
            .await
            .map_err(DockerError::api(format!("create volume {volume}")))?;
        let body = objects::instance_container(plan, inst);
        let files = objects::instance_files(plan, inst.role, &self.creds)
            .map_err(|e| DockerError::Conflict(format!("configuration archive: {e}")))?;
        self.create_and_start(&inst.container, body, files, previous)
            .await
    }

    /// Creates balancer `index`, its ports as [`Self::create_instance`] does.
    async fn create_balancer(
        &self,
        plan: &Plan,
        index: u32,
        previous: &ports::HostPorts,
    ) -> Result<(), DockerError> {
        let b = plan
            .balancer
            .instances
            .get(index as usize)
            .ok_or_else(|| DockerError::Missing(format!("balancer {index}")))?;
        let body = objects::balancer_container(plan, b, objects::balancer_cert(plan, &self.creds));
        let files = objects::balancer_files(plan, &self.creds)
            .map_err(|e| DockerError::Conflict(format!("configuration archive: {e}")))?;
        self.create_and_start(&b.container, body, files, previous)
            .await
    }

    async fn create_and_start(
        &self,
        name: &str,
        mut body: bollard::models::ContainerCreateBody,
        files: Vec<u8>,
        previous: &ports::HostPorts,
    ) -> Result<(), DockerError> {
        ports::pin(&mut body, previous)
            .map_err(|e| DockerError::Conflict(format!("no free host port for {name}: {e}")))?;
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.to_owned()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(DockerError::api(format!("create container {name}")))?;
        self.upload(&created.id, files).await?;
        let started = self
            .docker
            .start_container(&created.id, None)
            .await
            .map_err(DockerError::api(format!("start container {name}")));
        if started.is_err() {
            // A container that cannot start (its port was taken in the meantime) would be
            // started again and again; removed, the next attempt creates it afresh.
            let _ = self.remove_container(&created.id).await;
        }
        started
    }

    async fn upload(&self, container: &str, files: Vec<u8>) -> Result<(), DockerError> {
        self.docker
            .upload_to_container(
                container,
                Some(UploadToContainerOptions {
                    path: CONFIG_DIR.into(),
                    ..Default::default()
                }),
                bollard::body_full(files.into()),
            )
            .await
            .map_err(DockerError::api(format!(
                "upload configuration to {container}"
            )))
    }

    async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        // A clean stop first: PostgreSQL checkpoints, pgpool closes its sessions. A container
        // that is already stopped answers 304 and one that will not stop is removed by force
        // below, so the outcome of the stop itself changes nothing.
        let _ = self.stop(id).await;
        self.docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
            .map_err(DockerError::api(format!("remove container {id}")))
    }

    async fn remove_instance(&self, plan: &Plan, ordinal: u32) -> Result<(), DockerError> {
        if let Ok(id) = self.container_of(plan, labels::POSTGRES, ordinal).await {
            self.remove_container(&id).await?;
        }
        let volume = plan::volume_name(&plan.cluster, ordinal);
        match self
            .docker
            .remove_volume(&volume, Some(RemoveVolumeOptions { force: true }))
            .await
        {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(DockerError::api(format!("remove volume {volume}"))(e)),
        }
        // Its slot on the primary is dropped by `EnsureSlots` once it is no longer in use.
        Ok(())
    }

    /// Stops a container cleanly (PostgreSQL: a fast shutdown that sends all WAL to the
    /// standbys still connected), waiting up to 30 s.
    async fn stop(&self, id: &str) -> Result<(), DockerError> {
        match self
            .docker
            .stop_container(
                id,
                Some(StopContainerOptions {
                    t: Some(30),
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(DockerError::api(format!("stop container {id}"))(e)),
        }
    }

    /// Gives instance `ordinal` the role `role` at runtime: the role file its entrypoint obeys
    /// at the next start, and the `<cluster>-rw` alias (only the primary holds it; the
    /// endpoint is reconnected to change it, which Docker needs to change aliases).
    async fn mark(&self, plan: &Plan, ordinal: u32, role: Role) -> Result<(), DockerError> {
        let inst = plan
            .instance(ordinal)
            .ok_or_else(|| DockerError::Missing(format!("instance {ordinal}")))?;
        let id = self.container_of(plan, labels::POSTGRES, ordinal).await?;
        let role_file = objects::files_tar(&objects::runtime_files(plan, role))
            .map_err(|e| DockerError::Conflict(format!("configuration archive: {e}")))?;
        self.upload(&id, role_file).await?;
        let network = &plan.local.network;
        let endpoint = objects::endpoint(
            objects::instance_aliases(plan, inst, role == Role::Primary),
            inst.ip,
        );
        match self
            .docker
            .disconnect_network(
                network,
                NetworkDisconnectRequest {
                    container: id.clone(),
                    force: Some(true),
                },
            )
            .await
        {
            Ok(()) => {}
            // Not connected (a stopped container that lost its endpoint): connect below.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 403,
                ..
            }) => {}
            Err(e) => {
                return Err(DockerError::api(format!("disconnect {}", inst.container))(
                    e,
                ))
            }
        }
        self.docker
            .connect_network(
                network,
                NetworkConnectRequest {
                    container: id,
                    endpoint_config: Some(endpoint),
                },
            )
            .await
            .map_err(DockerError::api(format!("connect {}", inst.container)))
    }

    /// Fences the old primary `ordinal`: stopped cleanly (a fast shutdown), then marked a
    /// replica so that no later start makes it writable. Marking a stopped container is quick
    /// (no live network endpoint to move); a controller stopped in between finds the instance
    /// still marked primary and fences it again.
    async fn fence(&self, plan: &Plan, ordinal: u32) -> Result<(), DockerError> {
        let id = self.container_of(plan, labels::POSTGRES, ordinal).await?;
        self.stop(&id).await?;
        self.mark(plan, ordinal, Role::Replica).await
    }

    /// Makes the slots on instance `ordinal` match its role (see [`Action::EnsureSlots`]).
    async fn ensure_slots(&self, plan: &Plan, ordinal: u32) -> Result<(), DockerError> {
        let port = self.instance_port(plan, ordinal).await?;
        let client = self.superuser(plan, port).await?;
        let writable = !pg::position(&client).await?.in_recovery;
        Ok(pg::reconcile_slots(&client, &plan.slots_on(ordinal, writable)).await?)
    }

    /// Creates the verifier lookup on instance `ordinal` (see [`Action::CreateLoginLookup`]).
    async fn create_login_lookup(&self, plan: &Plan, ordinal: u32) -> Result<(), DockerError> {
        let port = self.instance_port(plan, ordinal).await?;
        let client = self.superuser(plan, port).await?;
        if pg::login_lookup::create(&client).await? {
            tracing::info!(instance = ordinal, "created pgbalancer.scram_verifier");
        }
        Ok(())
    }

    async fn promote(&self, plan: &Plan, ordinal: u32) -> Result<(), DockerError> {
        let port = self.instance_port(plan, ordinal).await?;
        let client = self.superuser(plan, port).await?;
        if pg::promote(&client).await? {
            tracing::info!(instance = ordinal, "promoted");
            Ok(())
        } else {
            Err(DockerError::Conflict(format!(
                "instance {ordinal} did not finish promotion in time"
            )))
        }
    }

    async fn instance_port(&self, plan: &Plan, ordinal: u32) -> Result<u16, DockerError> {
        self.published(plan, labels::POSTGRES, ordinal, POSTGRES_PORT)
            .await
    }

    /// The host port published for container `port` of `component` `ordinal`.
    async fn published(
        &self,
        plan: &Plan,
        component: &str,
        ordinal: u32,
        port: u16,
    ) -> Result<u16, DockerError> {
        self.containers(&plan.cluster)
            .await?
            .iter()
            .find(|c| {
                label(c, labels::COMPONENT) == Some(component) && ordinal_of(c) == Some(ordinal)
            })
            .and_then(|c| public_port(c, port))
            .ok_or_else(|| {
                DockerError::Missing(format!("published port {port} of {component} {ordinal}"))
            })
    }

    /// Attaches or detaches (`verb`, with its query) a node through balancer `index`'s agent,
    /// at its published REST port: the agent knows its engine (pgpool through PCP, or the
    /// native engine's own node set) and answers once the change shows.
    async fn agent_call(
        &self,
        plan: &Plan,
        index: u32,
        slot: u32,
        verb: &str,
    ) -> Result<(), DockerError> {
        let port = self
            .published(plan, labels::BALANCER, index, REST_PORT)
            .await?;
        let agent = agent_client::authority(plan.connect_address(), port);
        agent_client::node_action(&agent, slot, verb, &self.creds.api_token)
            .await
            .map_err(DockerError::Agent)
    }

    /// Uploads the balancer's files with the planned backends. The agent notices the changed
    /// `pgpool.conf` within its sync interval and has its engine reload it (new slots appear
    /// down, then are attached once they answer).
    async fn update_backends(&self, plan: &Plan, index: u32) -> Result<(), DockerError> {
        let id = self.container_of(plan, labels::BALANCER, index).await?;
        let files = objects::balancer_files(plan, &self.creds)
            .map_err(|e| DockerError::Conflict(format!("configuration archive: {e}")))?;
        self.upload(&id, files).await
    }

    /// Removes and creates the container again; its host ports stay as they were (unless the
    /// plan now names others).
    async fn replace(&self, plan: &Plan, component: &str, ordinal: u32) -> Result<(), DockerError> {
        let mut previous = ports::HostPorts::new();
        if let Ok(id) = self.container_of(plan, component, ordinal).await {
            if let Ok(old) = self.docker.inspect_container(&id, None).await {
                previous = ports::of(&old);
            }
            self.remove_container(&id).await?;
        }
        if component == labels::POSTGRES {
            self.create_instance(plan, ordinal, &previous).await
        } else {
            self.create_balancer(plan, ordinal, &previous).await
        }
    }

    async fn start(&self, plan: &Plan, component: &str, ordinal: u32) -> Result<(), DockerError> {
        let id = self.container_of(plan, component, ordinal).await?;
        self.docker
            .start_container(&id, None)
            .await
            .map_err(DockerError::api(format!("start {component} {ordinal}")))
    }

    async fn ensure_network(&self, plan: &Plan) -> Result<(), DockerError> {
        let request = NetworkCreateRequest {
            name: plan.local.network.clone(),
            driver: Some("bridge".into()),
            labels: Some(labels::cluster(&plan.cluster).into_iter().collect()),
            ipam: plan.local.subnet.as_ref().map(|subnet| Ipam {
                config: Some(vec![IpamConfig {
                    subnet: Some(subnet.clone()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(()),
            Err(e) => {
                // Another cluster sharing the network may be creating it right now.
                for _ in 0..20 {
                    if self
                        .docker
                        .inspect_network(&plan.local.network, None)
                        .await
                        .is_ok()
                    {
                        return Ok(());
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(DockerError::api(format!(
                    "create network {}",
                    plan.local.network
                ))(e))
            }
        }
    }
}

impl Backend for DockerBackend {
    type Error = DockerError;

    async fn observe(&self, plan: &Plan) -> Result<Observed, DockerError> {
        let network = match self.docker.inspect_network(&plan.local.network, None).await {
            Ok(_) => true,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => false,
            Err(e) => return Err(DockerError::api("inspect network")(e)),
        };
        let containers = self.containers(&plan.cluster).await?;
        let instance_probes = containers
            .iter()
            .filter(|c| label(c, labels::COMPONENT) == Some(labels::POSTGRES))
            .filter_map(|c| ordinal_of(c).map(|o| (c, o)))
            .map(|(c, o)| async move { (o, self.observe_instance(plan, c, o).await) });
        // pgpool holds new sessions while no primary is up (it searches for one): once the
        // instances show no writable one, the balancers' SQL probes are cut short instead of
        // slowing every step of a change of primary by their bound.
        let (cut, cutoff) = tokio::sync::watch::channel(false);
        let balancer_probes = containers
            .iter()
            .filter(|c| label(c, labels::COMPONENT) == Some(labels::BALANCER))
            .filter_map(|c| ordinal_of(c).map(|o| (c, o)))
            .map(|(c, o)| {
                let cutoff = cutoff.clone();
                async move { (o, self.observe_balancer(plan, c, o, cutoff).await) }
            });
        let instances = async {
            let instances = join_all(instance_probes).await;
            if !instances.iter().any(|(_, i)| i.in_recovery == Some(false)) {
                let _ = cut.send(true); // no receiver left: the probes are done already
            }
            instances
        };
        let (instances, balancers) = futures::join!(instances, join_all(balancer_probes));
        let mut observed = Observed {
            network,
            instances: instances.into_iter().collect(),
            balancers: balancers.into_iter().collect(),
        };
        // Replication as the current primary sees it.
        let primary_port = observed
            .instances
            .values()
            .find(|i| i.in_recovery == Some(false))
            .and_then(|i| i.host_port);
        if let Some(port) = primary_port {
            if let Ok(client) = self.superuser(plan, port).await {
                if let Ok(standbys) = pg::standbys(&client).await {
                    observed.set_replication(plan, &standbys);
                }
            }
        }
        Ok(observed)
    }

    async fn apply(&self, plan: &Plan, action: Action) -> Result<(), DockerError> {
        match action {
            Action::EnsureNetwork => self.ensure_network(plan).await,
            Action::CreateInstance(o) => {
                self.create_instance(plan, o, &ports::HostPorts::new())
                    .await
            }
            Action::ReplaceInstance(o) => self.replace(plan, labels::POSTGRES, o).await,
            Action::StartInstance(o) => self.start(plan, labels::POSTGRES, o).await,
            Action::RemoveInstance(o) => self.remove_instance(plan, o).await,
            Action::CreateBalancer(i) => {
                self.create_balancer(plan, i, &ports::HostPorts::new())
                    .await
            }
            Action::ReplaceBalancer(i) => self.replace(plan, labels::BALANCER, i).await,
            Action::StartBalancer(i) => self.start(plan, labels::BALANCER, i).await,
            Action::RemoveBalancer(i) => {
                let id = self.container_of(plan, labels::BALANCER, i).await?;
                self.remove_container(&id).await
            }
            Action::UpdateBackends(i) => self.update_backends(plan, i).await,
            Action::AttachBackend { balancer, slot } => {
                self.agent_call(plan, balancer, slot, "attach").await
            }
            Action::DetachBackend { balancer, slot } => {
                // A slot leaving the plan: the new file first, so the balancer's agent does not
                // re-attach it. A planned one (the old primary, detached before it is fenced)
                // is released: the agent attaches it again once it answers as a standby.
                if plan.instance(slot).is_none() {
                    self.update_backends(plan, balancer).await?;
                }
                self.agent_call(plan, balancer, slot, "detach?force=true&release=true")
                    .await
            }
            Action::MarkRole(o) => {
                let role = plan.instance(o).map_or(Role::Replica, |i| i.role);
                if role == Role::Primary {
                    // The alias moves: nobody else may hold it. Only holders are touched (a
                    // network reconnect each).
                    for c in self.containers(&plan.cluster).await? {
                        if label(&c, labels::COMPONENT) != Some(labels::POSTGRES) {
                            continue;
                        }
                        let Some(other) = ordinal_of(&c).filter(|other| *other != o) else {
                            continue;
                        };
                        if self.holds_rw_alias(plan, &c).await == Some(Role::Primary) {
                            if let Err(e) = self.mark(plan, other, Role::Replica).await {
                                tracing::debug!(instance = other, error = %e, "not unmarked");
                            }
                        }
                    }
                }
                self.mark(plan, o, role).await
            }
            Action::EnsureSlots(o) => self.ensure_slots(plan, o).await,
            Action::CreateLoginLookup(o) => self.create_login_lookup(plan, o).await,
            Action::Fence(o) => self.fence(plan, o).await,
            Action::Promote(o) => self.promote(plan, o).await,
            Action::RestartForeign(o) => {
                let id = self.container_of(plan, labels::POSTGRES, o).await?;
                let options = RestartContainerOptions {
                    t: Some(10),
                    ..Default::default()
                };
                self.docker
                    .restart_container(&id, Some(options))
                    .await
                    .map_err(DockerError::api(format!("restart instance {o}")))
            }
        }
    }
}

/// Whether the inspected container holds the `<cluster>-rw` alias on the cluster's network, as
/// a role mark; `None` when it is not on the network.
fn rw_alias_of(plan: &Plan, inspected: &ContainerInspectResponse) -> Option<Role> {
    // On the network with no aliases at all: it holds none, so it is not the primary.
    let aliases = inspected
        .network_settings
        .as_ref()?
        .networks
        .as_ref()?
        .get(&plan.local.network)?
        .aliases
        .clone()
        .unwrap_or_default();
    Some(if aliases.contains(&plan::rw_host(&plan.cluster)) {
        Role::Primary
    } else {
        Role::Replica
    })
}

/// How long the inspected container has been running; `None` when it does not run.
fn running_for(inspected: &ContainerInspectResponse) -> Option<Duration> {
    let state = inspected.state.as_ref()?;
    if state.running != Some(true) {
        return None;
    }
    let started: k8s_openapi::jiff::Timestamp = state.started_at.as_deref()?.parse().ok()?;
    let since = k8s_openapi::jiff::Timestamp::now().duration_since(started);
    Duration::try_from(since).ok()
}

/// Containers managed by this project, of one cluster or of all.
pub async fn list_owned(
    docker: &Docker,
    cluster: Option<&str>,
) -> Result<Vec<ContainerSummary>, DockerError> {
    let mut label_filters = vec![format!("{}={}", labels::MANAGED_BY, labels::MANAGER)];
    if let Some(cluster) = cluster {
        label_filters.push(format!("{}={cluster}", labels::INSTANCE));
    }
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_owned(), label_filters)])),
            ..Default::default()
        }))
        .await
        .map_err(DockerError::api("list containers"))
}

/// Engine state and health of a container from its summary.
fn state_and_health(c: &ContainerSummary) -> (String, String) {
    let state = c.state.as_ref().map(|s| s.to_string()).unwrap_or_default();
    let status = c.status.clone().unwrap_or_default();
    let health = if status.contains("(healthy)") {
        "healthy"
    } else if status.contains("(unhealthy)") {
        "unhealthy"
    } else if status.contains("health: starting") {
        "starting"
    } else {
        ""
    };
    (state, health.to_owned())
}

/// Value of label `key` on a container.
pub fn label<'a>(c: &'a ContainerSummary, key: &str) -> Option<&'a str> {
    c.labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

fn ordinal_of(c: &ContainerSummary) -> Option<u32> {
    label(c, labels::ORDINAL).and_then(|o| o.parse().ok())
}

/// Name of a container without Docker's leading slash.
pub fn container_name(c: &ContainerSummary) -> String {
    c.names
        .as_ref()
        .and_then(|n| n.first())
        .map(|n| n.trim_start_matches('/').to_owned())
        .unwrap_or_default()
}

/// Host port published for `private` (TCP), if any.
pub fn public_port(c: &ContainerSummary, private: u16) -> Option<u16> {
    c.ports
        .as_ref()?
        .iter()
        .find(|p| p.private_port == private && p.public_port.is_some())
        .and_then(|p| p.public_port)
}

//! Workloads: one StatefulSet per PostgreSQL instance (replicas 1, its own PVC) and the
//! balancer Deployment. Non-root, no privilege escalation, all capabilities dropped.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, DownwardAPIVolumeFile,
    DownwardAPIVolumeSource, EmptyDirVolumeSource, EnvVar, ExecAction, HTTPGetAction, KeyToPath,
    Lifecycle, LifecycleHandler, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, SeccompProfile, SecretProjection, SecurityContext, TCPSocketAction,
    Volume, VolumeMount, VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config::{balancer_config_name, postgres_config_name};
use super::{cluster_labels, content_hash, meta, with_hash, Owner};
use crate::labels;
use crate::plan::{self, InstancePlan, Plan, BALANCER_PORT, PCP_PORT, POSTGRES_PORT, REST_PORT};
use crate::render::{self, DATA_VOLUME_DIR, IMAGE_UID};

/// Name of the claim template of an instance's data, and of the pod volume it provides.
pub(super) const DATA_CLAIM: &str = "data";

/// StatefulSet name of an instance (its pod is [`plan::pod_name`]).
pub fn statefulset_name(inst: &InstancePlan) -> String {
    inst.name.clone()
}

/// PVC name of an instance's data: the StatefulSet names it `<claim template>-<pod>`.
pub fn data_pvc_name(cluster: &str, ordinal: u32) -> String {
    let pod = plan::pod_name(&plan::instance_name(cluster, ordinal));
    format!("{DATA_CLAIM}-{pod}")
}

fn pod_security() -> PodSecurityContext {
    let id = IMAGE_UID as i64;
    PodSecurityContext {
        run_as_user: Some(id),
        run_as_group: Some(id),
        fs_group: Some(id),
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// Pod Security "restricted" for every long-running container, with a read-only root file
/// system: what the processes write goes to the data volume or to [`scratch`] directories.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        read_only_root_filesystem: Some(true),
        ..Default::default()
    }
}

/// Writable scratch directories (emptyDir) of a container whose root file system is
/// read-only: one volume `scratch-<i>` and its mount per path.
fn scratch(paths: &[&str]) -> (Vec<Volume>, Vec<VolumeMount>) {
    paths
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let name = format!("scratch-{i}");
            (
                Volume {
                    name: name.clone(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                },
                VolumeMount {
                    name,
                    mount_path: (*path).to_owned(),
                    ..Default::default()
                },
            )
        })
        .unzip()
}

/// Where PostgreSQL and its entrypoint write outside the data volume: the configuration and
/// secrets copied from the projected volume, the Unix socket, temporary files.
const POSTGRES_SCRATCH: [&str; 3] = [render::CONFIG_DIR, "/var/run/postgresql", "/tmp"];
/// Where pgpool writes: its pid and status files, its and PCP's Unix sockets.
const BALANCER_SCRATCH: [&str; 2] = ["/var/run/pgbalancer", "/tmp"];

fn projected(
    name: &str,
    config: &str,
    config_keys: &[&str],
    secret: &str,
    secret_keys: &[&str],
) -> Volume {
    let items = |keys: &[&str], prefix: &str| {
        keys.iter()
            .map(|k| KeyToPath {
                key: (*k).to_owned(),
                path: format!("{prefix}{k}"),
                mode: None,
            })
            .collect::<Vec<_>>()
    };
    Volume {
        name: name.to_owned(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o440),
            sources: Some(vec![
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: config.to_owned(),
                        items: Some(items(config_keys, "")),
                        optional: None,
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: secret.to_owned(),
                        items: Some(items(secret_keys, "secrets/")),
                        optional: None,
                    }),
                    ..Default::default()
                },
            ]),
        }),
        ..Default::default()
    }
}

/// Adds the TLS Secret's certificate and key to the balancer's configuration volume, as
/// `tls/tls.crt` and `tls/tls.key` (a renewed certificate reaches the files in place).
fn with_tls(mut volume: Volume, tls_secret: Option<String>) -> Volume {
    let (Some(name), Some(projected)) = (tls_secret, volume.projected.as_mut()) else {
        return volume;
    };
    let items = [crate::tls::CERT_FILE, crate::tls::KEY_FILE]
        .iter()
        .map(|path| KeyToPath {
            key: path.trim_start_matches("tls/").to_owned(),
            path: (*path).to_owned(),
            mode: None,
        })
        .collect();
    projected
        .sources
        .get_or_insert_with(Vec::new)
        .push(VolumeProjection {
            secret: Some(SecretProjection {
                name,
                items: Some(items),
                optional: None,
            }),
            ..Default::default()
        });
    volume
}

/// Where the pod's labels are projected: the entrypoint reads its role there, and a label
/// patched at runtime reaches the file without a restart.
const PODINFO_DIR: &str = "/etc/podinfo";

fn pod_labels_volume() -> Volume {
    Volume {
        name: "podinfo".into(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![DownwardAPIVolumeFile {
                path: "labels".into(),
                field_ref: Some(ObjectFieldSelector {
                    api_version: None,
                    field_path: "metadata.labels".into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn tcp_port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(port),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn instance_labels(plan: &Plan, inst: &InstancePlan) -> BTreeMap<String, String> {
    let mut l = labels::component(&plan.cluster, labels::POSTGRES, &inst.name);
    l.insert(labels::ORDINAL.to_owned(), inst.ordinal.to_string());
    l
}

/// Root init container that hands the data volume to the PostgreSQL user (only with
/// `spec.postgres.storage.fixPermissions`): CHOWN and FOWNER only, no escalation.
fn fix_permissions(plan: &Plan) -> Container {
    Container {
        name: "fix-permissions".into(),
        image: Some(plan.postgres.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            format!(
                "chown {IMAGE_UID}:{IMAGE_UID} {DATA_VOLUME_DIR} && chmod 0700 {DATA_VOLUME_DIR}"
            ),
        ]),
        volume_mounts: Some(vec![VolumeMount {
            name: DATA_CLAIM.into(),
            mount_path: DATA_VOLUME_DIR.into(),
            ..Default::default()
        }]),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(vec!["CHOWN".into(), "FOWNER".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The claim template of an instance's data (the StatefulSet names its PVC [`data_pvc_name`]).
fn claim_template(plan: &Plan, inst: &InstancePlan) -> PersistentVolumeClaim {
    let requests = BTreeMap::from([(
        "storage".to_owned(),
        Quantity(plan.postgres.storage_size.clone()),
    )]);
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_CLAIM.into()),
            labels: Some(instance_labels(plan, inst)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: plan.postgres.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(requests),
                limits: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The data PVC of instance `inst`, created by the operator before its StatefulSet (which
/// adopts it by name) with the cluster as owner, so deleting the cluster deletes it.
pub fn data_pvc(plan: &Plan, owner: &Owner, inst: &InstancePlan) -> PersistentVolumeClaim {
    let template = claim_template(plan, inst);
    PersistentVolumeClaim {
        metadata: meta(
            owner,
            &data_pvc_name(&plan.cluster, inst.ordinal),
            instance_labels(plan, inst),
        ),
        spec: template.spec,
        ..Default::default()
    }
}

/// The StatefulSet of instance `inst`. Replicas clone from `<cluster>-rw`.
pub fn statefulset(
    plan: &Plan,
    owner: &Owner,
    inst: &InstancePlan,
    creds: &crate::credentials::Credentials,
) -> StatefulSet {
    let selector = labels::component(&plan.cluster, labels::POSTGRES, &inst.name);
    // No role label here: the operator patches it onto the pod at runtime, so a change of
    // primary changes no template.
    let pod_labels = instance_labels(plan, inst);
    let config_hash = content_hash(&render::postgres_files(plan, creds));
    let limits_requests = plan.postgres.resources.clone();
    let (scratch_volumes, scratch_mounts) = scratch(&POSTGRES_SCRATCH);
    let container = Container {
        name: "postgres".into(),
        image: Some(plan.postgres.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        env: Some(vec![
            env("PGB_PRIMARY_HOST", plan::rw_host(&plan.cluster)),
            env("PGB_ROLE_FROM_LABELS", format!("{PODINFO_DIR}/labels")),
            env("PGB_SLOT_NAME", inst.slot.clone()),
            env("PGB_APPLICATION_NAME", inst.name.clone()),
            env("PGB_DATABASE", plan.postgres.database.clone()),
            env("PGB_APP_USER", plan.postgres.user.clone()),
            env("PGB_CONFIG_FROM", "/config"),
        ]),
        ports: Some(vec![tcp_port("postgres", POSTGRES_PORT)]),
        // Kubernetes stops with SIGTERM, which PostgreSQL takes as a "smart" shutdown that waits
        // for every client (the balancer's pooled connections) until the grace period ends. A
        // fast shutdown first: sessions end at once, the standbys get all WAL, the pod goes.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "pg_ctl".into(),
                        "stop".into(),
                        "-D".into(),
                        render::PGDATA.into(),
                        "-m".into(),
                        "fast".into(),
                        "-w".into(),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec!["/usr/local/bin/pgbalancer-ready".into()]),
            }),
            period_seconds: Some(2),
            timeout_seconds: Some(5),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        // How a primary steps down by itself: fenced (labelled replica) or cut off from the
        // API server and every standby (images/postgres/live.sh). Passes in every other state,
        // including when the server is too slow to answer: the script bounds its own queries
        // (4 s), and the kubelet's timeout is longer, so a busy node (an exec that starts
        // slowly) never counts as a failure and restarts a healthy primary.
        liveness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec!["/usr/local/bin/pgbalancer-live".into()]),
            }),
            period_seconds: Some(2),
            timeout_seconds: Some(15),
            failure_threshold: Some(2),
            ..Default::default()
        }),
        volume_mounts: Some(
            vec![
                VolumeMount {
                    name: DATA_CLAIM.into(),
                    mount_path: DATA_VOLUME_DIR.into(),
                    ..Default::default()
                },
                VolumeMount {
                    name: "config".into(),
                    mount_path: "/config".into(),
                    read_only: Some(true),
                    ..Default::default()
                },
                VolumeMount {
                    name: "podinfo".into(),
                    mount_path: PODINFO_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                },
            ]
            .into_iter()
            .chain(scratch_mounts)
            .collect(),
        ),
        resources: limits_requests,
        security_context: Some(container_security()),
        ..Default::default()
    };
    let name = statefulset_name(inst);
    with_hash(
        StatefulSet {
            metadata: meta(owner, &name, instance_labels(plan, inst)),
            spec: Some(StatefulSetSpec {
                replicas: Some(1),
                service_name: Some(plan::headless_service(&plan.cluster)),
                selector: LabelSelector {
                    match_labels: Some(selector),
                    match_expressions: None,
                },
                pod_management_policy: Some("Parallel".into()),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        annotations: Some(BTreeMap::from([(
                            labels::CONFIG_HASH.to_owned(),
                            config_hash,
                        )])),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        init_containers: plan
                            .postgres
                            .fix_permissions
                            .then(|| vec![fix_permissions(plan)]),
                        containers: vec![container],
                        security_context: Some(pod_security()),
                        termination_grace_period_seconds: Some(60),
                        enable_service_links: Some(false),
                        volumes: Some(
                            vec![
                                projected(
                                    "config",
                                    &postgres_config_name(&plan.cluster),
                                    &["postgresql.conf", "pg_hba.conf"],
                                    &postgres_config_name(&plan.cluster),
                                    &[
                                        "superuser-password",
                                        "replication-password",
                                        "app-password",
                                        "monitor-password",
                                        "pgpass",
                                    ],
                                ),
                                pod_labels_volume(),
                            ]
                            .into_iter()
                            .chain(scratch_volumes)
                            .collect(),
                        ),
                        ..Default::default()
                    }),
                },
                volume_claim_templates: Some(vec![claim_template(plan, inst)]),
                ..Default::default()
            }),
            ..Default::default()
        },
        |s| &mut s.metadata,
    )
}

/// The balancer Deployment. Its pod template does not change with the backend list: the
/// agent follows `pgpool.conf` live, so scaling never restarts the balancer.
pub fn balancer_deployment(
    plan: &Plan,
    owner: &Owner,
    creds: &crate::credentials::Credentials,
) -> Deployment {
    let mut without_backends = plan.clone();
    without_backends.instances.clear();
    let files_hash = content_hash(&render::balancer_files(&without_backends, creds));
    let pgpool = plan
        .balancer
        .engine_env
        .iter()
        .any(|(k, v)| k == "PGBALANCER_ENGINE" && v == "pgpool");
    // pgpool reads its certificate only when it starts (the native engine follows the file);
    // without TLS the hash stays what it was, so no pod rolls for it.
    let static_hash = match (&plan.balancer.certificate_digest, pgpool) {
        (Some(cert), true) => content_hash(&[files_hash, cert.clone()]),
        _ => files_hash,
    };
    let mut pod_labels = cluster_labels(plan, labels::BALANCER);
    let selector = pod_labels.clone();
    pod_labels.insert(
        labels::POD_INSTANCE.to_owned(),
        plan::balancer_name(&plan.cluster),
    );
    let (scratch_volumes, scratch_mounts) = scratch(&BALANCER_SCRATCH);
    let container = Container {
        name: "balancer".into(),
        image: Some(plan.balancer.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        env: Some(
            plan.balancer
                .engine_env
                .iter()
                .map(|(k, v)| env(k, v.clone()))
                .collect(),
        ),
        ports: Some(vec![
            tcp_port("postgres", BALANCER_PORT),
            tcp_port("pcp", PCP_PORT),
            tcp_port("rest", REST_PORT),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::Int(i32::from(REST_PORT)),
                ..Default::default()
            }),
            period_seconds: Some(2),
            // The default 1 s is short for a node with two cores under load: a balancer
            // taken out of the Service by a slow answer refuses the clients sent to it.
            timeout_seconds: Some(3),
            ..Default::default()
        }),
        // A pod being deleted leaves the Service's endpoints at once, but every node's proxy
        // takes a moment to follow: pgpool keeps accepting until clients stop arriving (at
        // least 5 s, at most 20 s: `agent::drain`), so new connections never meet a balancer
        // that is already gone.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "/usr/local/bin/pgbalancer-agent".into(),
                        "--drain".into(),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(REST_PORT)),
                host: None,
            }),
            period_seconds: Some(10),
            failure_threshold: Some(6),
            ..Default::default()
        }),
        volume_mounts: Some(
            std::iter::once(VolumeMount {
                name: "config".into(),
                mount_path: render::CONFIG_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            })
            .chain(scratch_mounts)
            .collect(),
        ),
        security_context: Some(container_security()),
        ..Default::default()
    };
    with_hash(
        Deployment {
            metadata: meta(
                owner,
                &plan::balancer_name(&plan.cluster),
                cluster_labels(plan, labels::BALANCER),
            ),
            spec: Some(DeploymentSpec {
                replicas: Some(plan.balancer.instances.len() as i32),
                selector: LabelSelector {
                    match_labels: Some(selector),
                    match_expressions: None,
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        annotations: Some(BTreeMap::from([(
                            labels::CONFIG_HASH.to_owned(),
                            static_hash,
                        )])),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![container],
                        security_context: Some(pod_security()),
                        // The drain (at most 20 s), then the agent stops pgpool (up to 11 s).
                        termination_grace_period_seconds: Some(40),
                        enable_service_links: Some(false),
                        volumes: Some(
                            std::iter::once(with_tls(
                                projected(
                                    "config",
                                    &balancer_config_name(&plan.cluster),
                                    &["pgpool.conf", "pool_hba.conf", "pcp.conf"],
                                    &balancer_config_name(&plan.cluster),
                                    &["pool_passwd", "pcppass", "monitor-password", "api-token"],
                                ),
                                super::balancer_tls_name(plan),
                            ))
                            .chain(scratch_volumes)
                            .collect(),
                        ),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            ..Default::default()
        },
        |d| &mut d.metadata,
    )
}

/// Keeps at least one balancer pod through voluntary disruptions (drains, upgrades), when
/// there are several.
pub fn balancer_pdb(
    plan: &Plan,
    owner: &Owner,
) -> k8s_openapi::api::policy::v1::PodDisruptionBudget {
    use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
    with_hash(
        PodDisruptionBudget {
            metadata: meta(
                owner,
                &plan::balancer_name(&plan.cluster),
                cluster_labels(plan, labels::BALANCER),
            ),
            spec: Some(PodDisruptionBudgetSpec {
                min_available: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(cluster_labels(plan, labels::BALANCER)),
                    match_expressions: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        |p| &mut p.metadata,
    )
}

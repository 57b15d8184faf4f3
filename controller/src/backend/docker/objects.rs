//! Pure builders of the Docker objects of a plan: container bodies, labels, the config hash
//! that decides replacement, and the tar of configuration files uploaded before start.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, EndpointIpamConfig, EndpointSettings, HealthConfig, HostConfig,
    NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use sha2::{Digest, Sha256};

use crate::credentials::Credentials;
use crate::labels;
use crate::plan::{
    self, BalancerInstancePlan, InstancePlan, Plan, Role, BALANCER_PORT, PCP_PORT, POSTGRES_PORT,
    REST_PORT,
};
use crate::render::{self, ConfigFile, DATA_VOLUME_DIR, IMAGE_UID};

/// Docker's health column is for people (`docker ps`, `pgbalancer status`); the controllers
/// check instances and balancers themselves. Every probe is a process started in the
/// container, which cost a 2-core machine about a fifth of its CPU at 2 probes a second per
/// container, so probes run every 5 s, and every half second while a container starts on
/// engines that know a start interval (API 1.44).
const HEALTH_INTERVAL_NS: i64 = 5_000_000_000;
const HEALTH_START_INTERVAL_NS: i64 = 500_000_000;
const HEALTH_START_PERIOD_NS: i64 = 30_000_000_000;

/// Labels of an instance container or volume.
pub fn instance_labels(plan: &Plan, inst: &InstancePlan) -> HashMap<String, String> {
    let mut l: HashMap<String, String> =
        labels::component(&plan.cluster, labels::POSTGRES, &inst.name)
            .into_iter()
            .collect();
    l.insert(labels::ORDINAL.into(), inst.ordinal.to_string());
    l
}

/// Labels of a balancer container.
pub fn balancer_labels(plan: &Plan, b: &BalancerInstancePlan) -> HashMap<String, String> {
    let mut l: HashMap<String, String> =
        labels::component(&plan.cluster, labels::BALANCER, &b.container)
            .into_iter()
            .collect();
    l.insert(labels::ORDINAL.into(), b.index.to_string());
    l
}

/// Environment of an instance: bootstrap inputs only, the same whatever its role. The role
/// is runtime state (the uploaded role file and the `<cluster>-rw` alias), so a change of
/// primary changes (and replaces) no container.
fn instance_env(plan: &Plan, inst: &InstancePlan) -> Vec<String> {
    vec![
        format!("PGB_PRIMARY_HOST={}", plan::rw_host(&plan.cluster)),
        format!("PGB_SLOT_NAME={}", inst.slot),
        format!("PGB_APPLICATION_NAME={}", inst.name),
        format!("PGB_DATABASE={}", plan.postgres.database),
        format!("PGB_APP_USER={}", plan.postgres.user),
    ]
}

/// Network aliases of an instance: its hostname, plus `<cluster>-rw` when it is primary.
pub fn instance_aliases(plan: &Plan, inst: &InstancePlan, primary: bool) -> Vec<String> {
    let mut aliases = vec![inst.host.clone()];
    if primary {
        aliases.push(plan::rw_host(&plan.cluster));
    }
    aliases
}

/// Hash of everything whose change needs a new instance container.
pub fn instance_hash(plan: &Plan, inst: &InstancePlan) -> String {
    let mut h = Sha256::new();
    for part in [
        plan.postgres.image.as_str(),
        &render::postgresql_conf(plan),
        &render::pg_hba(plan),
        &plan.local.network,
        &plan.local.bind_address,
        &inst.host,
        &format!("{:?}/{:?}", inst.ip, inst.host_port),
        &format!("{:?}", plan.postgres.resources),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..12])
}

/// The certificate the balancers present, while TLS is on.
pub fn balancer_cert<'a>(plan: &Plan, creds: &'a Credentials) -> Option<&'a str> {
    (plan.balancer.tls != pgbalancer_crd::TlsMode::Disabled)
        .then_some(creds.balancer_tls.as_ref())
        .flatten()
        .map(|t| t.cert.as_str())
}

/// Hash of what needs a new balancer container: everything but the backend list, which is
/// changed live (reload + attach/detach). A new certificate (`cert`) is one: pgpool reads it
/// only when it starts.
pub fn balancer_hash(plan: &Plan, b: &BalancerInstancePlan, cert: Option<&str>) -> String {
    let mut without_backends = plan.clone();
    without_backends.instances.clear();
    let mut h = Sha256::new();
    for part in [
        plan.balancer.image.as_str(),
        &render::pgpool_conf(&without_backends),
        &render::pool_hba(plan),
        &plan.local.network,
        &plan.local.bind_address,
        &b.host,
        &format!(
            "{:?}/{:?}/{:?}/{:?}",
            b.ip, b.sql_port, b.pcp_port, b.rest_port
        ),
        &format!("{:?}", plan.balancer.engine_env),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    // Only with TLS: the hash of a balancer without it stays what it was.
    if let Some(cert) = cert {
        h.update(cert.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..12])
}

fn published(
    bind: &str,
    ports: &[(u16, Option<u16>)],
) -> HashMap<String, Option<Vec<PortBinding>>> {
    ports
        .iter()
        .map(|(container, host)| {
            (
                format!("{container}/tcp"),
                Some(vec![PortBinding {
                    host_ip: Some(bind.to_owned()),
                    host_port: Some(host.map(|p| p.to_string()).unwrap_or_default()),
                }]),
            )
        })
        .collect()
}

/// The endpoint on the cluster's network: aliases and, when fixed, the IP.
pub fn endpoint(aliases: Vec<String>, ip: Option<std::net::Ipv4Addr>) -> EndpointSettings {
    EndpointSettings {
        aliases: Some(aliases),
        ipam_config: ip.map(|ip| EndpointIpamConfig {
            ipv4_address: Some(ip.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn networking(
    plan: &Plan,
    aliases: Vec<String>,
    ip: Option<std::net::Ipv4Addr>,
) -> NetworkingConfig {
    NetworkingConfig {
        endpoints_config: Some(HashMap::from([(
            plan.local.network.clone(),
            endpoint(aliases, ip),
        )])),
    }
}

fn hardened(mut host: HostConfig) -> HostConfig {
    host.restart_policy = Some(RestartPolicy {
        name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
        maximum_retry_count: None,
    });
    host.cap_drop = Some(vec!["ALL".into()]);
    host.security_opt = Some(vec!["no-new-privileges".into()]);
    host
}

fn health(test: &[&str]) -> HealthConfig {
    HealthConfig {
        test: Some(
            std::iter::once("CMD")
                .chain(test.iter().copied())
                .map(String::from)
                .collect(),
        ),
        interval: Some(HEALTH_INTERVAL_NS),
        timeout: Some(2_000_000_000),
        retries: Some(3),
        start_period: Some(HEALTH_START_PERIOD_NS),
        start_interval: Some(HEALTH_START_INTERVAL_NS),
    }
}

/// The container of PostgreSQL instance `inst`.
pub fn instance_container(plan: &Plan, inst: &InstancePlan) -> ContainerCreateBody {
    let mut labels = instance_labels(plan, inst);
    labels.insert(labels::CONFIG_HASH.into(), instance_hash(plan, inst));
    let (memory, nano_cpus) = limits(plan);
    ContainerCreateBody {
        image: Some(plan.postgres.image.clone()),
        hostname: Some(truncate_hostname(&inst.host)),
        env: Some(instance_env(plan, inst)),
        labels: Some(labels),
        exposed_ports: Some(vec![format!("{POSTGRES_PORT}/tcp")]),
        healthcheck: Some(health(&[
            "pg_isready",
            "-q",
            "-h",
            "/var/run/postgresql",
            "-p",
            "5432",
        ])),
        stop_timeout: Some(60),
        host_config: Some(hardened(HostConfig {
            binds: Some(vec![format!("{}:{DATA_VOLUME_DIR}", inst.volume)]),
            port_bindings: Some(published(
                &plan.local.bind_address,
                &[(POSTGRES_PORT, inst.host_port)],
            )),
            memory,
            nano_cpus,
            shm_size: Some(256 * 1024 * 1024),
            ..Default::default()
        })),
        networking_config: Some(networking(
            plan,
            instance_aliases(plan, inst, inst.role == Role::Primary),
            inst.ip,
        )),
        ..Default::default()
    }
}

/// The container of balancer `b`.
pub fn balancer_container(
    plan: &Plan,
    b: &BalancerInstancePlan,
    cert: Option<&str>,
) -> ContainerCreateBody {
    let mut labels = balancer_labels(plan, b);
    labels.insert(labels::CONFIG_HASH.into(), balancer_hash(plan, b, cert));
    ContainerCreateBody {
        image: Some(plan.balancer.image.clone()),
        hostname: Some(truncate_hostname(&b.host)),
        env: Some(
            plan.balancer
                .engine_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        ),
        labels: Some(labels),
        exposed_ports: Some(vec![
            format!("{BALANCER_PORT}/tcp"),
            format!("{PCP_PORT}/tcp"),
            format!("{REST_PORT}/tcp"),
        ]),
        healthcheck: Some(health(&[
            "pg_isready",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            "9999",
        ])),
        stop_timeout: Some(10),
        host_config: Some(hardened(HostConfig {
            port_bindings: Some(published(
                &plan.local.bind_address,
                &[
                    (BALANCER_PORT, b.sql_port),
                    (PCP_PORT, b.pcp_port),
                    (REST_PORT, b.rest_port),
                ],
            )),
            ..Default::default()
        })),
        networking_config: Some(networking(plan, vec![b.host.clone()], b.ip)),
        ..Default::default()
    }
}

/// Files of an instance or balancer as a tar for `/etc/pgbalancer`, owned by the image user.
/// Writing to memory fails only on a path tar cannot hold, which is reported.
pub fn files_tar(files: &[ConfigFile]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o700);
    dir.set_uid(IMAGE_UID);
    dir.set_gid(IMAGE_UID);
    dir.set_size(0);
    builder.append_data(&mut dir, "secrets/", std::io::empty())?;
    if files.iter().any(|f| f.path.starts_with("tls/")) {
        // The certificate is public; its key (0600) is what stays private.
        dir.set_mode(0o755);
        builder.append_data(&mut dir, "tls/", std::io::empty())?;
    }
    for f in files {
        let mut header = tar::Header::new_gnu();
        header.set_mode(if f.secret { 0o600 } else { 0o644 });
        header.set_uid(IMAGE_UID);
        header.set_gid(IMAGE_UID);
        header.set_size(f.contents.len() as u64);
        builder.append_data(&mut header, f.path, f.contents.as_bytes())?;
    }
    builder.into_inner()
}

/// The role file the instance's entrypoint obeys at every start (`primary` or `replica`).
pub fn role_file(role: Role) -> ConfigFile {
    ConfigFile {
        path: render::ROLE_FILE,
        contents: format!("{}\n", role.as_str()),
        secret: false,
    }
}

/// The role file, and the mark of a cluster that has had a primary when `plan` says so.
pub fn runtime_files(plan: &Plan, role: Role) -> Vec<ConfigFile> {
    let mut files = vec![role_file(role)];
    if plan.initialised {
        files.push(ConfigFile {
            path: render::INITIALISED_FILE,
            contents: "yes\n".into(),
            secret: false,
        });
    }
    files
}

/// Instance files for upload, with the runtime files of `role`.
pub fn instance_files(plan: &Plan, role: Role, creds: &Credentials) -> std::io::Result<Vec<u8>> {
    let mut files = render::postgres_files(plan, creds);
    files.extend(runtime_files(plan, role));
    files_tar(&files)
}

/// Balancer files for upload.
pub fn balancer_files(plan: &Plan, creds: &Credentials) -> std::io::Result<Vec<u8>> {
    files_tar(&render::balancer_files(plan, creds))
}

fn truncate_hostname(host: &str) -> String {
    host.chars().take(63).collect()
}

/// Memory (bytes) and CPU (nano-CPUs) limits from `spec.postgres.resources.limits`.
fn limits(plan: &Plan) -> (Option<i64>, Option<i64>) {
    let Some(limits) = plan
        .postgres
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
    else {
        return (None, None);
    };
    let memory = limits
        .get("memory")
        .and_then(|q| parse_quantity(&q.0))
        .map(|v| v as i64);
    let cpu = limits
        .get("cpu")
        .and_then(|q| parse_quantity(&q.0))
        .map(|v| (v * 1e9) as i64);
    (memory, cpu)
}

/// Parses a Kubernetes quantity (`512Mi`, `1G`, `500m`, `2`) into a number.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let n: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        _ => return None,
    };
    Some(n * factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgbalancer_crd::parse_documents;

    fn plan_n(replicas: i32, extra: &str) -> Plan {
        let text = format!(
            "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {{name: demo}}\nspec:\n  replicas: {replicas}\n{extra}"
        );
        Plan::new(&parse_documents(&text).unwrap()[0], 0)
    }

    fn plan(extra: &str) -> Plan {
        plan_n(2, extra)
    }

    #[test]
    fn every_instance_reaches_the_primary_through_the_rw_alias_which_only_the_primary_holds() {
        let p = plan("");
        let body = |o: u32| instance_container(&p, p.instance(o).unwrap());
        assert!(body(0)
            .env
            .unwrap()
            .contains(&"PGB_PRIMARY_HOST=demo-rw".to_string()));
        assert!(body(2)
            .env
            .unwrap()
            .contains(&"PGB_PRIMARY_HOST=demo-rw".to_string()));
        assert!(body(2)
            .env
            .unwrap()
            .contains(&"PGB_SLOT_NAME=instance_2".to_string()));
        let aliases = |o: u32| {
            body(o).networking_config.unwrap().endpoints_config.unwrap()["pgbalancer-demo"]
                .aliases
                .clone()
                .unwrap()
        };
        assert_eq!(aliases(0), ["demo-0", "demo-rw"]);
        assert_eq!(aliases(2), ["demo-2"]);
    }

    #[test]
    fn a_change_of_primary_changes_no_instance_hash_or_environment() {
        let text = "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {name: demo}\nspec: {replicas: 2}\n";
        let cluster = &parse_documents(text).unwrap()[0];
        let (a, b) = (Plan::new(cluster, 0), Plan::new(cluster, 1));
        for o in 0..3 {
            let (ia, ib) = (a.instance(o).unwrap(), b.instance(o).unwrap());
            assert_eq!(instance_hash(&a, ia), instance_hash(&b, ib));
            assert_eq!(
                instance_container(&a, ia).env,
                instance_container(&b, ib).env
            );
        }
    }

    #[test]
    fn balancer_hash_ignores_the_backend_list_but_not_pool_sizes() {
        let two = plan("");
        let three = plan_n(3, "");
        let b = &two.balancer.instances[0];
        assert_eq!(balancer_hash(&two, b, None), balancer_hash(&three, b, None));
        let bigger = plan("  balancer: {maxPool: 2}\n");
        assert_ne!(
            balancer_hash(&two, b, None),
            balancer_hash(&bigger, b, None)
        );
    }

    #[test]
    fn scaling_does_not_change_existing_instances() {
        let two = plan_n(2, "");
        let five = plan_n(5, "");
        assert_eq!(
            instance_hash(&two, &two.instances[1]),
            instance_hash(&five, &five.instances[1])
        );
        assert_eq!(
            instance_container(&two, &two.instances[1]),
            instance_container(&five, &five.instances[1])
        );
    }

    #[test]
    fn instance_hash_changes_with_parameters() {
        let a = plan("");
        let b = plan("  postgres: {parameters: {work_mem: 8MB}}\n");
        assert_ne!(
            instance_hash(&a, &a.instances[1]),
            instance_hash(&b, &b.instances[1])
        );
    }

    #[test]
    fn containers_are_labelled_published_on_loopback_and_hardened() {
        let p = plan("");
        let body = instance_container(&p, &p.instances[1]);
        let labels = body.labels.unwrap();
        assert_eq!(labels[labels::INSTANCE], "demo");
        assert_eq!(labels[labels::POD_INSTANCE], "demo-1");
        let host = body.host_config.unwrap();
        let binding = &host.port_bindings.unwrap()["5432/tcp"].clone().unwrap()[0];
        assert_eq!(binding.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(binding.host_port.as_deref(), Some(""));
        assert_eq!(host.cap_drop.unwrap(), ["ALL"]);
        assert_eq!(
            host.binds.unwrap(),
            ["pgbalancer-demo-1-data:/var/lib/pgbalancer"]
        );
    }

    #[test]
    fn resource_limits_become_docker_limits() {
        let p = plan("  postgres:\n    resources: {limits: {memory: 512Mi, cpu: 500m}}\n");
        let host = instance_container(&p, &p.instances[0]).host_config.unwrap();
        assert_eq!(host.memory, Some(512 * 1024 * 1024));
        assert_eq!(host.nano_cpus, Some(500_000_000));
    }

    #[test]
    fn files_tar_keeps_secrets_private() {
        let tar_bytes = files_tar(&[ConfigFile {
            path: "secrets/x",
            contents: "s".into(),
            secret: true,
        }])
        .unwrap();
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let modes: Vec<(String, u32, u64)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().mode().unwrap(),
                    e.header().uid().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            modes,
            [
                ("secrets/".into(), 0o700, 999),
                ("secrets/x".into(), 0o600, 999)
            ]
        );
    }
}

//! Tests of the Kubernetes object builders.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::*;
use crate::credentials::Credentials;
use pgbalancer_crd::parse_documents;

fn plan(replicas: i32) -> Plan {
    let text = format!("apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {{name: demo}}\nspec: {{replicas: {replicas}}}\n");
    Plan::kubernetes(&parse_documents(&text).unwrap()[0], 0)
}

fn owner() -> Owner {
    Owner {
        namespace: "ns".into(),
        reference: OwnerReference {
            api_version: "pgbalancer.io/v1alpha1".into(),
            kind: "PgBalancerCluster".into(),
            name: "demo".into(),
            uid: "u-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
    }
}

fn creds() -> Credentials {
    Credentials::generate()
}

#[test]
fn statefulsets_are_owned_labelled_and_replicas_clone_from_rw() {
    let p = plan(2);
    let c = creds();
    let sts = statefulset(&p, &owner(), &p.instances[2], &c);
    assert_eq!(sts.metadata.name.as_deref(), Some("demo-2"));
    assert_eq!(
        sts.metadata.owner_references.as_ref().unwrap()[0].uid,
        "u-1"
    );
    let labels = sts.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[crate::labels::INSTANCE], "demo");
    assert_eq!(labels[crate::labels::MANAGED_BY], "pgbalancer-operator");
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some("demo-hl"));
    let template = &spec.template;
    assert!(
        !template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap()
            .contains_key(crate::labels::ROLE),
        "the role is patched onto pods, never in the template"
    );
    let env = template.spec.as_ref().unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let value = |env: &[k8s_openapi::api::core::v1::EnvVar], name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(value(&env, "PGB_PRIMARY_HOST").as_deref(), Some("demo-rw"));
    assert_eq!(
        value(&env, "PGB_ROLE_FROM_LABELS").as_deref(),
        Some("/etc/podinfo/labels")
    );
    // The container is the same whatever the role: the role reaches it through its labels.
    let primary = statefulset(&p, &owner(), &p.instances[0], &c);
    let primary_env = primary.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert_eq!(
        value(&primary_env, "PGB_PRIMARY_HOST"),
        value(&env, "PGB_PRIMARY_HOST")
    );
    let security = template
        .spec
        .as_ref()
        .unwrap()
        .security_context
        .as_ref()
        .unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    // The primary steps down by itself through its liveness check (images/postgres/live.sh).
    let live = template.spec.as_ref().unwrap().containers[0]
        .liveness_probe
        .as_ref()
        .and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.clone());
    assert_eq!(
        live,
        Some(vec!["/usr/local/bin/pgbalancer-live".to_owned()])
    );
}

#[test]
fn scaling_changes_neither_existing_statefulsets_nor_the_balancer_pods() {
    let c = creds();
    let (two, five) = (plan(2), plan(5));
    assert_eq!(
        statefulset(&two, &owner(), &two.instances[1], &c),
        statefulset(&five, &owner(), &five.instances[1], &c)
    );
    let d2 = balancer_deployment(&two, &owner(), &c);
    let d5 = balancer_deployment(&five, &owner(), &c);
    assert_eq!(d2.spec.unwrap().template, d5.spec.unwrap().template);
    // The backend list itself does change, in the ConfigMap the agent follows.
    assert_ne!(
        balancer_config(&two, &owner(), &c).data,
        balancer_config(&five, &owner(), &c).data
    );
}

#[test]
fn pgpool_reaches_instances_through_pod_dns() {
    let c = creds();
    let cm = balancer_config(&plan(1), &owner(), &c);
    let conf = &cm.data.unwrap()["pgpool.conf"];
    assert!(
        conf.contains("backend_hostname1 = 'demo-1-0.demo-hl'"),
        "{conf}"
    );
}

#[test]
fn secrets_stay_out_of_config_maps() {
    let c = creds();
    let p = plan(1);
    for cm in [
        postgres_config(&p, &owner(), &c),
        balancer_config(&p, &owner(), &c),
    ] {
        let text = serde_json::to_string(&cm).unwrap();
        assert!(!text.contains(&c.superuser_password) && !text.contains(&c.replication_password));
    }
    let s = postgres_secret(&p, &owner(), &c);
    assert!(s.data.unwrap().contains_key("pgpass"));
    let back = credentials_from_secret(&credentials_secret(&p, &owner(), &c)).unwrap();
    assert_eq!(back, c);
}

#[test]
fn services_select_by_role() {
    let p = plan(1);
    let rw = rw_service(&p, &owner());
    assert_eq!(
        rw.spec.unwrap().selector.unwrap()[crate::labels::ROLE],
        "primary"
    );
    let hl = headless_service(&p, &owner()).spec.unwrap();
    assert_eq!(hl.cluster_ip.as_deref(), Some("None"));
    assert_eq!(hl.publish_not_ready_addresses, Some(true));
    assert!(balancer_service(&p, &owner())
        .metadata
        .annotations
        .unwrap()
        .contains_key(crate::labels::CONFIG_HASH));
}

#[test]
fn pods_meet_pod_security_restricted_with_read_only_roots() {
    let p = plan(1);
    let c = creds();
    let instance = statefulset(&p, &owner(), &p.instances[0], &c)
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    let balancer = balancer_deployment(&p, &owner(), &c)
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    for pod in [&instance, &balancer] {
        let security = pod.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_ne!(security.run_as_user, Some(0));
        assert_eq!(
            security.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        assert!(
            pod.init_containers.is_none(),
            "no root init container by default"
        );
        assert!(!pod.host_network.unwrap_or(false) && !pod.host_pid.unwrap_or(false));
        for container in &pod.containers {
            let s = container.security_context.as_ref().unwrap();
            assert_eq!(
                s.allow_privilege_escalation,
                Some(false),
                "{}",
                container.name
            );
            assert_eq!(
                s.read_only_root_filesystem,
                Some(true),
                "{}",
                container.name
            );
            assert_eq!(s.privileged, None, "{}", container.name);
            let caps = s.capabilities.as_ref().unwrap();
            assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
            assert!(caps.add.is_none(), "{}", container.name);
            // Every mount is a declared volume; the writable ones are scratch or data.
            let volumes: Vec<&str> = pod
                .volumes
                .iter()
                .flatten()
                .map(|v| v.name.as_str())
                .collect();
            for mount in container.volume_mounts.iter().flatten() {
                assert!(
                    volumes.contains(&mount.name.as_str()) || mount.name == workloads::DATA_CLAIM,
                    "{}: {} is not a volume",
                    container.name,
                    mount.name
                );
            }
        }
    }
    // The one exception, opt-in: the init container that hands the data volume to the
    // PostgreSQL user runs as root with CHOWN and FOWNER only.
    let mut fixing = plan(1);
    fixing.postgres.fix_permissions = true;
    let init = statefulset(&fixing, &owner(), &fixing.instances[0], &c)
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .init_containers
        .unwrap();
    let caps = init[0]
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .unwrap();
    assert_eq!(
        caps.add,
        Some(vec!["CHOWN".to_owned(), "FOWNER".to_owned()])
    );
}

#[test]
fn a_deleted_balancer_pod_drains_within_its_grace_period() {
    let p = plan(1);
    let d = balancer_deployment(&p, &owner(), &creds());
    let pod = d.spec.unwrap().template.spec.unwrap();
    let hook = pod.containers[0]
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.exec.as_ref())
        .and_then(|e| e.command.clone())
        .expect("a preStop command");
    assert_eq!(hook, ["/usr/local/bin/pgbalancer-agent", "--drain"]);
    let grace = pod
        .termination_grace_period_seconds
        .expect("a grace period");
    let longest = crate::agent::drain::BALANCER.at_most.as_secs() as i64;
    // After the drain the agent gives pgpool up to 10 s to stop, its init 1 s more.
    assert!(
        grace > longest + 11,
        "grace {grace} s, drain up to {longest} s"
    );
}

#[test]
fn a_balancer_is_ready_by_its_healthz_with_time_to_answer_under_load() {
    let p = plan(1);
    let d = balancer_deployment(&p, &owner(), &creds());
    let pod = d.spec.unwrap().template.spec.unwrap();
    let probe = pod.containers[0]
        .readiness_probe
        .clone()
        .expect("a readiness probe");
    let path = probe.http_get.and_then(|g| g.path);
    assert_eq!(path.as_deref(), Some("/healthz"));
    assert!(probe.timeout_seconds.unwrap_or(1) >= 3);
}

#[test]
fn with_tls_the_balancer_mounts_its_certificate_secret_and_the_agent_is_told() {
    let tls_sources = |p: &Plan| {
        let d = balancer_deployment(p, &owner(), &creds());
        let pod = d.spec.unwrap().template.spec.unwrap();
        let env = pod.containers[0].env.clone().unwrap();
        let mode = env
            .iter()
            .find(|e| e.name == "PGBALANCER_TLS")
            .and_then(|e| e.value.clone());
        let config = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "config");
        let secrets: Vec<(String, Vec<String>)> = config
            .unwrap()
            .projected
            .unwrap()
            .sources
            .unwrap()
            .into_iter()
            .filter_map(|s| s.secret)
            .map(|s| {
                let paths = s.items.unwrap().into_iter().map(|i| i.path).collect();
                (s.name, paths)
            })
            .collect();
        (mode, secrets)
    };
    let p = plan(1);
    let (mode, secrets) = tls_sources(&p);
    assert_eq!(mode, None, "TLS off: the agent's default, no variable");
    assert_eq!(secrets.len(), 1, "no TLS secret while TLS is off");
    assert_eq!(balancer_tls_name(&p), None);

    let text = "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {name: demo}\nspec: {replicas: 1, balancer: {tls: {mode: required}}}\n";
    let mut p = Plan::kubernetes(&parse_documents(text).unwrap()[0], 0);
    let (mode, secrets) = tls_sources(&p);
    assert_eq!(mode.as_deref(), Some("required"));
    assert_eq!(
        secrets[1],
        (
            "demo-balancer-tls".to_owned(),
            vec!["tls/tls.crt".to_owned(), "tls/tls.key".to_owned()]
        )
    );
    p.balancer.certificate_secret = Some("from-cert-manager".into());
    assert_eq!(tls_sources(&p).1[1].0, "from-cert-manager");

    let bundle = crate::tls::generate("demo", &["demo-balancer.ns.svc".into()]).unwrap();
    let secret = balancer_tls_secret("demo-balancer-tls", &p, &owner(), &bundle);
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let keys: Vec<&String> = secret.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
    assert_eq!(secret.metadata.owner_references.unwrap()[0].uid, "u-1");
}

#[test]
fn a_renewed_certificate_rolls_pgpool_balancers_only() {
    let c = creds();
    let hash_with = |p: &Plan| {
        balancer_deployment(p, &owner(), &c)
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[crate::labels::CONFIG_HASH]
            .clone()
    };
    let mut p = plan(1);
    let before = hash_with(&p);
    p.balancer.certificate_digest = Some("first".into());
    let first = hash_with(&p);
    p.balancer.certificate_digest = Some("renewed".into());
    let renewed = hash_with(&p);
    assert_ne!(before, first);
    assert_ne!(first, renewed, "pgpool reads its certificate only at start");
    let text = "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {name: demo}\nspec: {replicas: 1, balancer: {engine: native}}\n";
    let mut native = Plan::kubernetes(&parse_documents(text).unwrap()[0], 0);
    native.balancer.certificate_digest = Some("first".into());
    let first = hash_with(&native);
    native.balancer.certificate_digest = Some("renewed".into());
    assert_eq!(
        first,
        hash_with(&native),
        "the native engine follows the files"
    );
}

#[test]
fn read_only_transactions_on_replicas_reach_the_agent_only_when_asked_for() {
    let env_of = |text: &str| {
        let p = Plan::kubernetes(&parse_documents(text).unwrap()[0], 0);
        let d = balancer_deployment(&p, &owner(), &creds());
        let pod = d.spec.unwrap().template.spec.unwrap();
        pod.containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .find(|e| e.name == "PGBALANCER_READ_ONLY_TRANSACTIONS_ON_REPLICAS")
            .and_then(|e| e.value)
    };
    let head =
        "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {name: demo}\n";
    assert_eq!(
        env_of(&format!(
            "{head}spec: {{replicas: 1, balancer: {{engine: native}}}}\n"
        )),
        None,
        "the default: no variable, so no balancer rolls for it"
    );
    assert_eq!(
        env_of(&format!(
            "{head}spec: {{replicas: 1, balancer: {{engine: native, readOnlyTransactions: replica}}}}\n"
        )),
        Some("true".into())
    );
}

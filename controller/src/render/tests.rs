//! Golden-file tests of the rendered configuration. `UPDATE_GOLDEN=1 cargo test` rewrites them.

use std::path::PathBuf;

use super::*;
use crate::plan::Plan;
use pgbalancer_crd::parse_documents;

fn plan() -> Plan {
    let text = "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {name: demo}\n\
                spec:\n  replicas: 2\n  postgres:\n    parameters: {work_mem: 8MB, search_path: \"'$user', public\"}\n";
    Plan::new(&parse_documents(text).unwrap()[0], 0)
}

fn creds() -> Credentials {
    Credentials {
        superuser_password: "su".into(),
        replication_password: "re:pl".into(),
        app_password: "ap".into(),
        monitor_password: "mo".into(),
        pcp_password: "pc".into(),
        api_token: "to".into(),
        balancer_tls: None,
    }
}

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/render/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(actual, expected, "{name} differs from its golden file");
}

#[test]
fn postgresql_conf_matches_golden() {
    golden("postgresql.conf", &postgresql_conf(&plan()));
}

#[test]
fn pg_hba_matches_golden() {
    golden("pg_hba.conf", &pg_hba(&plan()));
}

#[test]
fn pgpool_conf_matches_golden() {
    golden("pgpool.conf", &pgpool_conf(&plan()));
}

#[test]
fn pgpool_conf_has_one_slot_per_instance_numbered_by_ordinal() {
    let conf = pgpool_conf(&plan());
    for n in 0..3 {
        assert!(
            conf.contains(&format!("backend_hostname{n} = 'demo-{n}'")),
            "{conf}"
        );
    }
    assert!(!conf.contains("backend_hostname3"));
}

#[test]
fn user_parameters_are_quoted() {
    assert!(postgresql_conf(&plan()).contains("search_path = '''$user'', public'\n"));
}

#[test]
fn secrets_are_marked_and_escaped() {
    let files = postgres_files(&plan(), &creds());
    let pgpass = files.iter().find(|f| f.path == "secrets/pgpass").unwrap();
    assert!(pgpass.secret);
    assert_eq!(pgpass.contents, "*:*:*:replicator:re\\:pl\n");
    assert!(files
        .iter()
        .filter(|f| !f.secret)
        .all(|f| !f.contents.contains("re:pl")));
    let balancer = balancer_files(&plan(), &creds());
    assert_eq!(
        balancer
            .iter()
            .find(|f| f.path == "pcp.conf")
            .unwrap()
            .contents,
        "pgbalancer:bc54f4d60f1cec0f9a6cb70e13f2127a\n"
    );
    assert!(balancer
        .iter()
        .find(|f| f.path == "secrets/pool_passwd")
        .unwrap()
        .contents
        .contains("app:TEXTap\n"));
}

fn plan_with(spec_yaml: &str) -> (Plan, Plan) {
    let text = format!(
        "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {{name: demo}}\nspec:\n{spec_yaml}"
    );
    let cluster = &parse_documents(&text).unwrap()[0];
    (Plan::new(cluster, 0), Plan::kubernetes(cluster, 0))
}

fn max_connections_lines(conf: &str) -> Vec<&str> {
    conf.lines()
        .filter(|l| l.starts_with("max_connections"))
        .collect()
}

#[test]
fn max_connections_follows_the_pool_on_both_backends() {
    for (instances, expected) in [(1, 200), (2, 300), (3, 600), (8, 1100)] {
        let (docker, kube) = plan_with(&format!("  balancer: {{instances: {instances}}}\n"));
        for plan in [docker, kube] {
            assert_eq!(
                max_connections_lines(&postgresql_conf(&plan)),
                [format!("max_connections = {expected}")],
                "instances: {instances}"
            );
        }
    }
}

#[test]
fn balancer_counts_sharing_a_step_render_the_same_postgres_files() {
    let (three, _) = plan_with("  balancer: {instances: 3}\n");
    let (four, _) = plan_with("  balancer: {instances: 4}\n");
    assert_eq!(
        postgres_files(&three, &creds()),
        postgres_files(&four, &creds())
    );
}

#[test]
fn explicit_max_connections_is_rendered_last_and_wins() {
    for instances in [1, 8] {
        let (plan, _) = plan_with(&format!(
            "  balancer: {{instances: {instances}}}\n  postgres:\n    parameters: {{max_connections: '5000'}}\n"
        ));
        assert_eq!(
            max_connections_lines(&postgresql_conf(&plan)),
            ["max_connections = 200", "max_connections = '5000'"]
        );
    }
}

#[test]
fn synchronous_replication_names_every_possible_instance_so_scaling_changes_nothing() {
    let (two, _) = plan_with("  replicas: 2\n  postgres: {synchronous: {number: 1}}");
    let (five, _) = plan_with("  replicas: 5\n  postgres: {synchronous: {number: 1}}");
    let conf = postgresql_conf(&two);
    let line = conf
        .lines()
        .find(|l| l.starts_with("synchronous_standby_names"))
        .expect("synchronous_standby_names rendered");
    assert!(line.contains("'ANY 1 (\"demo-0\", \"demo-1\""), "{line}");
    assert!(line.contains(&format!("\"demo-{}\")", pgbalancer_crd::MAX_REPLICAS)));
    assert!(conf.contains("synchronous_commit = on"));
    assert_eq!(conf, postgresql_conf(&five));
    let (async_plan, _) = plan_with("  replicas: 2");
    assert!(!postgresql_conf(&async_plan).contains("synchronous_standby_names"));
}

#[test]
fn tls_turns_on_pgpool_ssl_ships_the_certificate_and_can_require_it() {
    let mut plan = plan();
    let mut creds = creds();
    let off = balancer_files(&plan, &creds);
    assert!(off.iter().all(|f| !f.path.starts_with("tls/")));
    assert!(pgpool_conf(&plan).contains("ssl = off\n"));
    creds.balancer_tls = Some(crate::tls::TlsBundle {
        ca_cert: "CA".into(),
        cert: "CERT".into(),
        key: "KEY".into(),
        names: vec!["localhost".into()],
    });
    // Held by the credentials, but TLS is off: not shipped.
    assert!(balancer_files(&plan, &creds)
        .iter()
        .all(|f| !f.path.starts_with("tls/")));
    plan.balancer.tls = pgbalancer_crd::TlsMode::Enabled;
    let on = balancer_files(&plan, &creds);
    let get = |path: &str| on.iter().find(|f| f.path == path).cloned().unwrap();
    assert_eq!(
        (
            get("tls/tls.crt").contents.as_str(),
            get("tls/tls.crt").secret
        ),
        ("CERT", false)
    );
    assert_eq!(
        (
            get("tls/tls.key").contents.as_str(),
            get("tls/tls.key").secret
        ),
        ("KEY", true)
    );
    let conf = pgpool_conf(&plan);
    assert!(conf.contains("ssl = on\n"), "{conf}");
    assert!(conf.contains("ssl_cert = '/etc/pgbalancer/tls/tls.crt'\n"));
    assert!(conf.contains("ssl_key = '/etc/pgbalancer/tls/tls.key'\n"));
    assert!(!pool_hba(&plan).contains("hostssl"));
    plan.balancer.tls = pgbalancer_crd::TlsMode::Required;
    let hba = pool_hba(&plan);
    let network: Vec<&str> = hba
        .lines()
        .filter(|l| l.contains("0.0.0.0/0") || l.contains("::/0"))
        .collect();
    assert_eq!(network.len(), 2, "{hba}");
    assert!(network.iter().all(|l| l.starts_with("hostssl ")), "{hba}");
    // Plain text from loopback for the agent's monitoring role only.
    let plain: Vec<&str> = hba.lines().filter(|l| l.starts_with("host ")).collect();
    assert_eq!(plain.len(), 1, "{hba}");
    assert!(plain[0].contains(crate::plan::MONITOR_USER) && plain[0].contains("127.0.0.1/32"));
}

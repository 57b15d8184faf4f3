//! pgpool-II configuration of the balancer (pgpool 4.3 and 4.6 accept the same file).
//!
//! One backend slot per instance, slot = ordinal. pgpool never promotes (`failover_command`
//! is empty): failover belongs to the operator. Health and replication checks run every second
//! as `pgbalancer_monitor`, so a dead replica leaves the rotation within ~3 s even when the
//! agent's standby watch (which detaches it at once) did not see it go. pgpool's own
//! `auto_failback` is off: the balancer agent re-attaches a configured standby once it
//! answers again, and unlike auto_failback it leaves a node an operator detached alone.

use std::fmt::Write;

use md5::{Digest, Md5};

use pgbalancer_crd::TlsMode;

use super::{conf_quote, pgpass_escape, CONFIG_DIR, PGDATA};
use crate::credentials::Credentials;
use crate::plan::{
    Plan, BALANCER_PORT, MONITOR_USER, PCP_PORT, PCP_USER, POSTGRES_PORT, SUPERUSER,
};

/// `pgpool.conf`, with one backend block per planned instance.
pub fn pgpool_conf(plan: &Plan) -> String {
    let b = &plan.balancer;
    let on_off = |v: bool| if v { "on" } else { "off" };
    let mut out = format!(
        "# Rendered by pgbalancer for cluster {cluster}; changes here are overwritten.\n\
         backend_clustering_mode = 'streaming_replication'\n\
         listen_addresses = '*'\n\
         port = {BALANCER_PORT}\n\
         unix_socket_directories = '/tmp'\n\
         pcp_listen_addresses = '*'\n\
         pcp_port = {PCP_PORT}\n\
         pcp_socket_dir = '/tmp'\n\
         pid_file_name = '/var/run/pgbalancer/pgpool.pid'\n\
         logdir = '/var/run/pgbalancer'\n\
         log_destination = 'stderr'\n\
         log_min_messages = warning\n\
         # Pools.\n\
         num_init_children = {children}\n\
         max_pool = {max_pool}\n\
         child_life_time = 300\n\
         connection_life_time = 0\n\
         client_idle_limit = 0\n\
         # Read/write splitting.\n\
         load_balance_mode = {lb}\n\
         disable_load_balance_on_write = 'transaction'\n\
         statement_level_load_balance = off\n\
         # Authentication: SCRAM from clients, passwords from pool_passwd.\n\
         enable_pool_hba = on\n\
         pool_passwd = '/etc/pgbalancer/secrets/pool_passwd'\n\
         allow_clear_text_frontend_auth = off\n\
         # Checks.\n\
         sr_check_period = 1\n\
         sr_check_user = '{MONITOR_USER}'\n\
         sr_check_password = ''\n\
         sr_check_database = 'postgres'\n\
         delay_threshold = 10000000\n\
         health_check_period = 1\n\
         health_check_timeout = 3\n\
         health_check_user = '{MONITOR_USER}'\n\
         health_check_password = ''\n\
         health_check_database = 'postgres'\n\
         health_check_max_retries = 2\n\
         health_check_retry_delay = 1\n\
         connect_timeout = 3000\n\
         # Failover belongs to the operator; pgpool only follows.\n\
         failover_command = ''\n\
         follow_primary_command = ''\n\
         failover_on_backend_error = off\n\
         failover_on_backend_shutdown = off\n\
         auto_failback = off\n\
         search_primary_node_timeout = 10\n\
         use_watchdog = off\n\
         memory_cache_enabled = off\n\
         {ssl}\
         # Backends: slot = instance ordinal.\n",
        cluster = plan.cluster,
        children = b.num_init_children,
        max_pool = b.max_pool,
        lb = on_off(b.load_balance_mode),
        ssl = match b.tls {
            TlsMode::Disabled => "ssl = off\n".to_owned(),
            TlsMode::Enabled | TlsMode::Required => format!(
                "# TLS from clients (pool_hba.conf says whether it is required).\n\
                 ssl = on\n\
                 ssl_cert = '{CONFIG_DIR}/{}'\n\
                 ssl_key = '{CONFIG_DIR}/{}'\n",
                crate::tls::CERT_FILE,
                crate::tls::KEY_FILE
            ),
        },
    );
    for inst in &plan.instances {
        let n = inst.ordinal;
        let _ = write!(
            out,
            "backend_hostname{n} = {host}\n\
             backend_port{n} = {POSTGRES_PORT}\n\
             backend_weight{n} = 1\n\
             backend_flag{n} = 'ALLOW_TO_FAILOVER'\n\
             backend_application_name{n} = {app}\n\
             backend_data_directory{n} = '{PGDATA}'\n",
            host = conf_quote(&inst.host),
            app = conf_quote(&inst.name),
        );
    }
    out
}

/// Client authentication of the balancer: SCRAM over the network only; with TLS required,
/// over TLS only, except the agent's own sessions (the monitoring role, from loopback inside
/// the balancer).
pub fn pool_hba(plan: &Plan) -> String {
    match plan.balancer.tls {
        TlsMode::Disabled | TlsMode::Enabled => "# Rendered by pgbalancer.\n\
             # TYPE  DATABASE  USER  ADDRESS    METHOD\n\
             host    all       all   0.0.0.0/0  scram-sha-256\n\
             host    all       all   ::/0       scram-sha-256\n"
            .to_owned(),
        TlsMode::Required => format!(
            "# Rendered by pgbalancer: TLS required.\n\
             # TYPE   DATABASE  USER  ADDRESS       METHOD\n\
             host     all       {MONITOR_USER}  127.0.0.1/32  scram-sha-256\n\
             hostssl  all       all   0.0.0.0/0     scram-sha-256\n\
             hostssl  all       all   ::/0          scram-sha-256\n"
        ),
    }
}

/// `pool_passwd`: the roles that may connect through the balancer (clear text is what SCRAM
/// pass-through needs; the file is mode 0600).
pub fn pool_passwd(plan: &Plan, creds: &Credentials) -> String {
    format!(
        "{SUPERUSER}:TEXT{}\n{}:TEXT{}\n{MONITOR_USER}:TEXT{}\n",
        creds.superuser_password, plan.postgres.user, creds.app_password, creds.monitor_password
    )
}

/// `pcp.conf`: the PCP user with the md5 of its password.
pub fn pcp_conf(creds: &Credentials) -> String {
    let digest = Md5::digest(creds.pcp_password.as_bytes());
    format!("{PCP_USER}:{}\n", hex::encode(digest))
}

/// The PCP password file used by PCP commands run inside the balancer.
pub fn pcppass(creds: &Credentials) -> String {
    format!("*:*:{PCP_USER}:{}\n", pgpass_escape(&creds.pcp_password))
}

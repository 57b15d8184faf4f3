//! `postgresql.conf` and `pg_hba.conf` of every instance.

use std::fmt::Write;

use super::conf_quote;
use crate::plan::{Plan, POSTGRES_PORT, REPLICATION_USER};

/// WAL senders and slots: the most replicas plus room for backups, independent of the
/// replica count so that scaling never changes (and restarts) an instance.
const MAX_WAL_SENDERS: i32 = pgbalancer_crd::MAX_REPLICAS + 8;

/// Parameters the operator sets; user parameters follow and may override the tunables
/// (not the managed ones, which validation refuses). `max_connections` is the plan's, sized for
/// the balancers' pool unless the user sets it (see
/// [`pgbalancer_crd::validate::default_max_connections`]).
pub fn postgresql_conf(plan: &Plan) -> String {
    let mut out = format!(
        "# Rendered by pgbalancer for cluster {cluster}; changes here are overwritten.\n\
         listen_addresses = '*'\n\
         port = {POSTGRES_PORT}\n\
         hba_file = '{dir}/pg_hba.conf'\n\
         unix_socket_directories = '/var/run/postgresql'\n\
         password_encryption = 'scram-sha-256'\n\
         max_connections = {max_connections}\n\
         # Replication: every instance can serve as primary after a switchover.\n\
         wal_level = replica\n\
         max_wal_senders = {senders}\n\
         max_replication_slots = {senders}\n\
         wal_keep_size = '128MB'\n\
         max_slot_wal_keep_size = '2GB'\n\
         wal_log_hints = on\n\
         hot_standby = on\n\
         hot_standby_feedback = on\n\
         wal_receiver_status_interval = '1s'\n\
         # A peer that stopped answering is given up after 10 s (not 60): a standby cut off\n\
         # from its primary reconnects sooner, and a primary stepping down is not held by its\n\
         # WAL senders waiting on standbys it cannot reach.\n\
         wal_sender_timeout = '10s'\n\
         wal_receiver_timeout = '10s'\n\
         # Logs go to the container's stderr.\n\
         logging_collector = off\n\
         log_destination = 'stderr'\n\
         log_line_prefix = '%m [%p] %q%u@%d '\n\
         log_connections = off\n\
         log_checkpoints = on\n",
        cluster = plan.cluster,
        dir = super::CONFIG_DIR,
        senders = MAX_WAL_SENDERS,
        max_connections = plan.postgres.max_connections,
    );
    if let Some(number) = plan.postgres.synchronous {
        let _ = writeln!(
            out,
            "# Synchronous replication: a commit waits for {number} replica(s), any of them.\n\
             synchronous_commit = on\n\
             synchronous_standby_names = {}",
            conf_quote(&synchronous_standby_names(&plan.cluster, number))
        );
    }
    if !plan.postgres.parameters.is_empty() {
        out.push_str("# From spec.postgres.parameters.\n");
    }
    for (key, value) in &plan.postgres.parameters {
        let _ = writeln!(out, "{key} = {}", conf_quote(value));
    }
    out
}

/// `ANY number (...)` over every name an instance of `cluster` can have (ordinals up to the
/// most replicas), so that scaling changes neither the file nor any instance; a standby's
/// `application_name` is its instance name.
pub fn synchronous_standby_names(cluster: &str, number: u32) -> String {
    let names: Vec<String> = (0..=pgbalancer_crd::MAX_REPLICAS)
        .map(|o| format!("\"{}\"", crate::plan::instance_name(cluster, o as u32)))
        .collect();
    format!("ANY {number} ({})", names.join(", "))
}

/// SCRAM for every network connection; peer for the local socket (healthchecks, exec).
pub fn pg_hba(plan: &Plan) -> String {
    format!(
        "# Rendered by pgbalancer for cluster {cluster}.\n\
         # TYPE  DATABASE     USER        ADDRESS     METHOD\n\
         local   all          all                     peer\n\
         host    replication  {REPLICATION_USER}  0.0.0.0/0   scram-sha-256\n\
         host    replication  {REPLICATION_USER}  ::/0        scram-sha-256\n\
         host    all          all         0.0.0.0/0   scram-sha-256\n\
         host    all          all         ::/0        scram-sha-256\n",
        cluster = plan.cluster
    )
}

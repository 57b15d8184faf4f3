//! Replication slots of removed replicas (IO): a slot left on the primary pins WAL until
//! `max_slot_wal_keep_size`, so once a removed replica has disconnected its slot is dropped.
//! Reached at the `<cluster>-rw` Service's cluster IP (no DNS needed) with the superuser
//! password; only attempted when the primary pod is ready, and bounded to 2 s.

use std::time::Duration;

use tokio_postgres::NoTls;

use crate::credentials::Credentials;
use crate::plan::{Plan, POSTGRES_PORT, SUPERUSER};

/// Drops inactive `instance_<ordinal>` slots of instances no longer planned. Returns true
/// when a stale slot is still in use (its replica has not stopped yet).
pub async fn drop_stale(plan: &Plan, primary_address: &str, creds: &Credentials) -> bool {
    let connect = tokio::time::timeout(Duration::from_secs(2), async {
        tokio_postgres::Config::new()
            .host(primary_address)
            .port(POSTGRES_PORT)
            .user(SUPERUSER)
            .password(&creds.superuser_password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(1))
            .connect(NoTls)
            .await
    })
    .await;
    let Ok(Ok((client, conn))) = connect else {
        return false;
    };
    tokio::spawn(conn);
    let Ok(rows) = client
        .query("SELECT slot_name, active FROM pg_replication_slots WHERE slot_name LIKE 'instance\\_%'", &[])
        .await
    else {
        return false;
    };
    let mut busy = false;
    for row in rows {
        let slot: String = row.get(0);
        let active: bool = row.get(1);
        let planned = slot
            .strip_prefix("instance_")
            .and_then(|o| o.parse::<u32>().ok())
            .is_some_and(|o| plan.instance(o).is_some());
        if planned {
            continue;
        }
        if active {
            busy = true;
        } else if client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .is_ok()
        {
            tracing::info!(%slot, "dropped the replication slot of a removed replica");
        }
    }
    busy
}

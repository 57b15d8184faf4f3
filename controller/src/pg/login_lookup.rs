//! `pgbalancer.scram_verifier(role)`: the function through which the native balancer engine
//! reads the verifier a role logs in with (SCRAM pass-through). The instance bootstrap
//! creates it with the database; the controllers create it on a primary whose `postgres`
//! database has no `pgbalancer` schema at all, which is a cluster made before the function
//! existed. A schema without the function is an administrator's choice (pass-through off: the
//! engine checks users against `pool_passwd`) and is left as it is.

use tokio_postgres::Client;

use super::{query, PgError};

/// The statements that make the function, one per line, as the instance bootstrap
/// (`images/postgres/entrypoint.sh`) runs them too. Only the monitoring role may call it;
/// it answers for a role that may log in now with a SCRAM password.
pub const STATEMENTS: &str = "\
CREATE SCHEMA pgbalancer;
CREATE FUNCTION pgbalancer.scram_verifier(role_name text) RETURNS text LANGUAGE sql STABLE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = role_name AND rolcanlogin AND (rolvaliduntil IS NULL OR rolvaliduntil > now()) AND rolpassword LIKE ''SCRAM-SHA-256$%''';
REVOKE ALL ON FUNCTION pgbalancer.scram_verifier(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA pgbalancer TO pgbalancer_monitor;
GRANT EXECUTE ON FUNCTION pgbalancer.scram_verifier(text) TO pgbalancer_monitor;
";

/// Whether the connected database has the `pgbalancer` schema.
pub async fn has_schema(client: &Client) -> Result<bool, PgError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'pgbalancer')",
            &[],
        )
        .await
        .map_err(query("reading whether the pgbalancer schema exists"))?;
    Ok(row.get(0))
}

/// Creates the schema and the function in one transaction; `false` when the schema already
/// existed (nothing is changed then).
pub async fn create(client: &Client) -> Result<bool, PgError> {
    if has_schema(client).await? {
        return Ok(false);
    }
    client
        .batch_execute(&format!("BEGIN;\n{STATEMENTS}COMMIT;"))
        .await
        .map_err(query("creating pgbalancer.scram_verifier"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bootstrap's heredoc (unquoted, so `$` is written `\$`) runs the same statements.
    #[test]
    fn the_instance_bootstrap_makes_the_same_function() {
        let entrypoint = include_str!("../../../images/postgres/entrypoint.sh").replace("\\$", "$");
        for statement in STATEMENTS.lines() {
            assert!(
                entrypoint.lines().any(|l| l == statement),
                "the entrypoint lacks: {statement}"
            );
        }
        assert_eq!(STATEMENTS.lines().count(), 5);
    }
}

//! Read-only transactions held by a replica (`readOnlyTransactions: replica`). Inside one, a
//! replica runs what the primary would run the same way in a `READ ONLY` transaction: reads,
//! transaction control and the transaction's own cursors. Anything else (a write, session state, a function the engine
//! does not know) cannot move to the primary in the middle of the transaction, so it fails:
//! the engine sends the replica, instead of it, a statement that raises the error. The
//! server's transaction is then failed as the client is told, and the rest of an
//! extended-protocol batch is skipped by the server itself up to `Sync`.

use bytes::{Bytes, BytesMut};

use super::classify::Class;
use super::wire;

/// The statement sent instead of one a replica's read-only transaction cannot run.
const RAISE: &str = "DO $pgbalancer$ BEGIN RAISE EXCEPTION USING ERRCODE = '25006', \
    MESSAGE = 'cannot execute this statement in a read-only transaction on a replica', \
    HINT = 'The balancer runs read-only transactions on replicas (readOnlyTransactions: \
    replica), where only reads (calling functions known to be read-only, or any function with \
    unknownFunctions: replica), transaction control and the transaction''s cursors run. Run \
    this statement in a transaction that is not READ ONLY.'; \
    END $pgbalancer$";

/// Whether a unit of `class` may run in a read-only transaction a replica holds.
pub fn may_run(class: Class) -> bool {
    class <= Class::Cursor
}

/// Whether the session's settings leave its read-only transactions to a replica: not when
/// it set a transaction isolation (a standby refuses `SERIALIZABLE`).
pub fn settings_allow(settings: &[std::sync::Arc<[u8]>]) -> bool {
    !settings
        .iter()
        .any(|s| memchr::memmem::find(&s.to_ascii_lowercase(), b"isolation").is_some())
}

/// A simple query raising the error.
pub fn simple_query() -> Bytes {
    let mut out = BytesMut::new();
    let mut body = RAISE.as_bytes().to_vec();
    body.push(0);
    wire::put(&mut out, b'Q', &body);
    out.freeze()
}

/// The unnamed statement raising the error, bound and executed (the server answers
/// `ParseComplete` and `BindComplete`, which the client must not see, then the error).
pub fn extended() -> BytesMut {
    let mut out = BytesMut::new();
    let mut parse = vec![0];
    wire::cstr(&mut parse, RAISE);
    parse.extend_from_slice(&[0, 0]);
    wire::put(&mut out, b'P', &parse);
    // Unnamed portal and statement, no parameter formats, no parameters, no result formats.
    wire::put(&mut out, b'B', &[0, 0, 0, 0, 0, 0, 0, 0]);
    // Unnamed portal, no row limit.
    wire::put(&mut out, b'E', &[0, 0, 0, 0, 0]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_transaction_control_and_cursors_may_run_and_nothing_else() {
        for class in [
            Class::Read,
            Class::ReadOnlyBegin,
            Class::TxnControl,
            Class::Cursor,
        ] {
            assert!(may_run(class), "{class:?}");
        }
        for class in [Class::Set, Class::Write, Class::Pin] {
            assert!(!may_run(class), "{class:?}");
        }
    }

    #[test]
    fn an_isolation_setting_keeps_read_only_transactions_on_the_primary() {
        assert!(settings_allow(&[b"SET search_path = app"[..].into()]));
        assert!(!settings_allow(&[
            b"SET default_transaction_ISOLATION = serializable"[..].into()
        ]));
    }

    #[test]
    fn the_raising_statement_is_well_framed() {
        let q = simple_query();
        assert_eq!(q[0], b'Q');
        assert_eq!(
            u32::from_be_bytes([q[1], q[2], q[3], q[4]]) as usize,
            q.len() - 1
        );
        let e = extended();
        let mut rest = &e[..];
        let mut tags = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            tags.push(rest[0]);
            rest = &rest[1 + len..];
        }
        assert_eq!(tags, b"PBE");
    }
}

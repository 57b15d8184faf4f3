//! Where a statement may run (pure): a small lexer that skips comments, quoted strings,
//! dollar quotes and quoted identifiers, and a look at the keywords that matter. It never
//! guesses towards a replica: anything it does not recognise as read-only runs on the primary.
//!
//! - `Read`: `SELECT`/`VALUES`/`TABLE`/`SHOW`/`EXPLAIN` (without `ANALYZE` of a write), and
//!   `WITH` without a data-modifying part; no row locks (`FOR UPDATE`/`SHARE`), no `SELECT INTO`,
//!   and only function calls known not to write (or any call, when unknown functions are
//!   configured to be read-only).
//! - `ReadOnlyBegin`: `BEGIN`/`START TRANSACTION` `READ ONLY` (not `SERIALIZABLE` nor
//!   `DEFERRABLE`, which a standby cannot run), alone or followed in one string by reads,
//!   transaction control and cursors: a replica may hold the transaction when the engine is so
//!   configured.
//! - `TxnControl`: `COMMIT`, `ROLLBACK`, savepoints, `SET LOCAL` and a `SET TRANSACTION` a
//!   standby runs: they act on the open transaction only, wherever it is (not `COMMIT
//!   PREPARED` nor `AND CHAIN`, which write or open another transaction).
//! - `Cursor`: a cursor living only as long as its transaction (`DECLARE` without `WITH HOLD`
//!   of a read) and `FETCH`, `MOVE`, `CLOSE`: they run where the transaction is.
//! - `Set`: a session-level `SET`/`RESET`: runs on the primary and is replayed on every
//!   replica connection the session uses, so reads see the same settings.
//! - `Pin`: state that lives in one server (temporary tables, advisory locks, `LISTEN`,
//!   SQL-level `PREPARE`, cursors, `DISCARD`, `LOAD`): the session stays on the primary.
//! - `Write`: everything else, including any other `BEGIN` (the transaction then follows the
//!   server).
//!
//! Classes are ordered from the least to the most demanding: a string or a batch of several
//! statements takes its most demanding one's.

/// Where a statement may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// Read-only: a replica may run it.
    Read,
    /// Opens a read-only transaction a standby can run.
    ReadOnlyBegin,
    /// Acts on the open transaction only (outside one, it runs on the primary).
    TxnControl,
    /// A cursor of the open transaction (outside one, it runs on the primary).
    Cursor,
    /// A session setting: primary, then replayed on replicas.
    Set,
    /// Must run on the primary.
    Write,
    /// Pins the session to the primary from now on.
    Pin,
}

/// Whether calls of functions not on the built-in read-only list may run on a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownFunctions {
    /// They may write: the statement runs on the primary (the safe default).
    #[default]
    Primary,
    /// They are read-only: the statement may run on a replica.
    Replica,
}

/// Classifies a query string (one or more statements).
pub fn classify(sql: &[u8], unknown: UnknownFunctions) -> Class {
    let statements = statements(sql);
    if statements.is_empty() {
        return Class::Read;
    }
    let classes: Vec<Class> = statements.iter().map(|s| statement(s, unknown)).collect();
    let worst = classes.iter().copied().max().unwrap_or(Class::Read);
    // A read-only transaction opened and ended in one string is held by one server.
    if classes[0] == Class::ReadOnlyBegin && worst <= Class::Cursor {
        return Class::ReadOnlyBegin;
    }
    // A setting mixed with other statements cannot be replayed on its own.
    if worst == Class::Set && classes.len() > 1 {
        return Class::Pin;
    }
    worst
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// An unquoted word, upper-cased.
    Word(String),
    /// One punctuation character.
    Punct(char),
}

/// Splits into statements of tokens, skipping comments, literals and quoted identifiers.
fn statements(sql: &[u8]) -> Vec<Vec<Token>> {
    // Bytes: every byte that matters is ASCII; bytes of other characters count as letters.
    let chars = sql;
    let letter = |b: u8| b.is_ascii_alphabetic() || b == b'_' || b >= 0x80;
    let mut out = vec![Vec::new()];
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            c if c.is_ascii_whitespace() => i += 1,
            b'-' if next == Some(b'-') => {
                while i < chars.len() && chars[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if next == Some(b'*') => {
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == b'/' && chars.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == b'*' && chars.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => {
                let backslash = i > 0 && matches!(chars[i - 1], b'e' | b'E');
                i = skip_quoted(chars, i, b'\'', backslash);
                out.last_mut().unwrap().push(Token::Punct('\''));
            }
            b'"' => {
                i = skip_quoted(chars, i, b'"', false);
                out.last_mut().unwrap().push(Token::Punct('"'));
            }
            b'$' => {
                // $1 is a parameter; $tag$ … $tag$ is a string.
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == b'_') {
                    j += 1;
                }
                if chars.get(j) == Some(&b'$') && !chars.get(i + 1).is_some_and(u8::is_ascii_digit)
                {
                    let tag = &sql[i..=j];
                    i = match memchr::memmem::find(&sql[j + 1..], tag) {
                        Some(end) => j + 1 + end + tag.len(),
                        None => chars.len(),
                    };
                    out.last_mut().unwrap().push(Token::Punct('\''));
                } else {
                    i = j.max(i + 1);
                }
            }
            b';' => {
                out.push(Vec::new());
                i += 1;
            }
            c if letter(c) => {
                let start = i;
                while i < chars.len()
                    && (letter(chars[i]) || chars[i].is_ascii_digit() || chars[i] == b'$')
                {
                    i += 1;
                }
                out.last_mut().unwrap().push(Token::Word(
                    String::from_utf8_lossy(&sql[start..i]).to_ascii_uppercase(),
                ));
            }
            c => {
                out.last_mut().unwrap().push(Token::Punct(c as char));
                i += 1;
            }
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// The index after the quoted run that opens at `i`: a doubled quote is an escaped one, and
/// so, with `backslash` (`E'...'`), is any character after a backslash.
fn skip_quoted(chars: &[u8], mut i: usize, quote: u8, backslash: bool) -> usize {
    i += 1;
    while i < chars.len() {
        if backslash && chars[i] == b'\\' {
            i += 2;
        } else if chars[i] == quote {
            if chars.get(i + 1) != Some(&quote) {
                return i + 1;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    chars.len()
}

fn word(t: Option<&Token>) -> &str {
    match t {
        Some(Token::Word(w)) => w,
        _ => "",
    }
}

fn statement(tokens: &[Token], unknown: UnknownFunctions) -> Class {
    let first = word(tokens.first());
    let second = word(tokens.get(1));
    match first {
        "BEGIN" | "START" => match transaction_modes(tokens) {
            Some(true) => Class::ReadOnlyBegin,
            _ => Class::Write,
        },
        "COMMIT" | "ROLLBACK" if second == "PREPARED" => Class::Write,
        "COMMIT" | "END" | "ROLLBACK" | "ABORT" if chains(tokens) => Class::Write,
        "COMMIT" | "END" | "ROLLBACK" | "ABORT" | "SAVEPOINT" | "RELEASE" => Class::TxnControl,
        "DECLARE" => cursor(tokens, unknown),
        "FETCH" | "MOVE" | "CLOSE" => Class::Cursor,
        "SET" if second == "LOCAL" => Class::TxnControl,
        "SET" if second == "TRANSACTION" => match transaction_modes(tokens) {
            Some(_) => Class::TxnControl,
            None => Class::Write,
        },
        "SET" if second == "CONSTRAINTS" => Class::Write,
        "SET" if second == "SESSION" && word(tokens.get(2)) == "CHARACTERISTICS" => Class::Pin,
        "SET" | "RESET" => Class::Set,
        "LISTEN" | "UNLISTEN" | "PREPARE" | "DEALLOCATE" | "DISCARD" | "LOAD" => Class::Pin,
        "CREATE"
            if tokens[1..]
                .iter()
                .take(3)
                .any(|t| matches!(word(Some(t)), "TEMP" | "TEMPORARY")) =>
        {
            Class::Pin
        }
        "SELECT" | "VALUES" | "TABLE" | "WITH" | "SHOW" | "EXPLAIN" => read_only(tokens, unknown),
        _ if tokens.first() == Some(&Token::Punct('(')) => read_only(tokens, unknown),
        _ => Class::Write,
    }
}

/// `AND CHAIN` (not `AND NO CHAIN`): the transaction's end opens another one.
fn chains(tokens: &[Token]) -> bool {
    tokens
        .windows(2)
        .any(|w| word(Some(&w[1])) == "CHAIN" && word(Some(&w[0])) == "AND")
}

/// `DECLARE`: a cursor `WITH HOLD` outlives its transaction on one server (`Pin`); any
/// other lives in its transaction (`Cursor`), unless its query writes, locks or holds state.
fn cursor(tokens: &[Token], unknown: UnknownFunctions) -> Class {
    let hold = tokens
        .windows(2)
        .any(|w| word(Some(&w[0])) == "WITH" && word(Some(&w[1])) == "HOLD");
    let query = tokens
        .iter()
        .position(|t| word(Some(t)) == "FOR")
        .map_or(&[][..], |i| &tokens[i + 1..]);
    if hold || query.is_empty() {
        return Class::Pin;
    }
    match statement(query, unknown) {
        Class::Read => Class::Cursor,
        other => other.max(Class::Write),
    }
}

/// The transaction modes of a `BEGIN` or `SET TRANSACTION`: `None` when a standby cannot run
/// them (`READ WRITE`, `SERIALIZABLE`, `DEFERRABLE`, a snapshot import), else whether they
/// say `READ ONLY`.
fn transaction_modes(tokens: &[Token]) -> Option<bool> {
    let mut read_only = false;
    for (i, t) in tokens.iter().enumerate() {
        let w = word(Some(t));
        let prev = if i > 0 { word(tokens.get(i - 1)) } else { "" };
        match w {
            "ONLY" if prev == "READ" => read_only = true,
            "WRITE" | "SERIALIZABLE" | "SNAPSHOT" => return None,
            "DEFERRABLE" if prev != "NOT" => return None,
            _ => {}
        }
    }
    Some(read_only)
}

/// A query that only reads, unless something in it writes, locks or holds session state.
fn read_only(tokens: &[Token], unknown: UnknownFunctions) -> Class {
    let mut class = Class::Read;
    for (i, t) in tokens.iter().enumerate() {
        let Token::Word(w) = t else { continue };
        let prev = if i > 0 { word(tokens.get(i - 1)) } else { "" };
        match w.as_str() {
            "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "INTO" | "ANALYZE" | "ANALYSE" | "COPY"
            | "TRUNCATE" => {
                // `FOR UPDATE`, `FOR NO KEY UPDATE` lock rows: primary as well.
                return Class::Write;
            }
            "SHARE" if matches!(prev, "FOR" | "KEY") => return Class::Write,
            _ => {}
        }
        if tokens.get(i + 1) == Some(&Token::Punct('(')) {
            match function(w) {
                Function::ReadOnly => {}
                Function::Session => class = class.max(Class::Pin),
                Function::Writes => return Class::Write,
                Function::Unknown if unknown == UnknownFunctions::Replica => {}
                Function::Unknown => return Class::Write,
            }
        }
    }
    class
}

enum Function {
    ReadOnly,
    Session,
    Writes,
    Unknown,
}

fn function(name: &str) -> Function {
    if name.starts_with("PG_ADVISORY") || name.starts_with("PG_TRY_ADVISORY") {
        return if name.contains("XACT") {
            Function::Writes
        } else {
            Function::Session
        };
    }
    // A session that asks for its process id will use it (to signal or terminate that process
    // from another session): the process must be the one that runs its queries.
    if name == "PG_BACKEND_PID" {
        return Function::Session;
    }
    match name {
        // Keywords that take parentheses, not functions.
        "IN" | "EXISTS" | "ANY" | "ALL" | "SOME" | "ARRAY" | "ROW" | "CAST" | "VALUES" | "OVER"
        | "FILTER" | "WITHIN" | "AS" | "ON" | "USING" | "SELECT" | "FROM" | "WHERE" | "AND"
        | "OR" | "NOT" | "LATERAL" | "JOIN" | "BY" | "CASE" | "WHEN" | "THEN" | "ELSE" | "IS"
        | "LIKE" | "ILIKE" | "BETWEEN" | "LIMIT" | "OFFSET" | "HAVING" | "UNION" | "INTERSECT"
        | "EXCEPT" | "RETURNING" | "WITH" | "RECURSIVE" | "MATERIALIZED" | "SET" | "TABLE"
        | "EXPLAIN" | "VARCHAR" | "CHAR" | "NUMERIC" | "DECIMAL" | "TIMESTAMP" | "TIME"
        | "INTERVAL" | "BIT" | "FLOAT" => Function::ReadOnly,
        "NEXTVAL"
        | "SETVAL"
        | "PG_NOTIFY"
        | "LO_IMPORT"
        | "LO_EXPORT"
        | "LO_CREATE"
        | "LO_UNLINK"
        | "PG_SWITCH_WAL"
        | "PG_CREATE_RESTORE_POINT"
        | "PG_TERMINATE_BACKEND"
        | "PG_CANCEL_BACKEND"
        | "PG_RELOAD_CONF"
        | "SET_CONFIG"
        | "TXID_CURRENT"
        | "PG_CURRENT_XACT_ID" => Function::Writes,
        "COUNT"
        | "SUM"
        | "AVG"
        | "MIN"
        | "MAX"
        | "COALESCE"
        | "NULLIF"
        | "GREATEST"
        | "LEAST"
        | "LOWER"
        | "UPPER"
        | "LENGTH"
        | "CHAR_LENGTH"
        | "SUBSTRING"
        | "SUBSTR"
        | "TRIM"
        | "BTRIM"
        | "LTRIM"
        | "RTRIM"
        | "CONCAT"
        | "CONCAT_WS"
        | "REPLACE"
        | "POSITION"
        | "STRPOS"
        | "LEFT"
        | "RIGHT"
        | "LPAD"
        | "RPAD"
        | "MD5"
        | "ABS"
        | "ROUND"
        | "CEIL"
        | "CEILING"
        | "FLOOR"
        | "TRUNC"
        | "MOD"
        | "POWER"
        | "SQRT"
        | "RANDOM"
        | "NOW"
        | "CURRENT_TIMESTAMP"
        | "CLOCK_TIMESTAMP"
        | "STATEMENT_TIMESTAMP"
        | "DATE_TRUNC"
        | "DATE_PART"
        | "EXTRACT"
        | "TO_CHAR"
        | "TO_DATE"
        | "TO_TIMESTAMP"
        | "TO_NUMBER"
        | "AGE"
        | "ARRAY_AGG"
        | "STRING_AGG"
        | "JSON_AGG"
        | "JSONB_AGG"
        | "JSON_BUILD_OBJECT"
        | "JSONB_BUILD_OBJECT"
        | "JSON_OBJECT_AGG"
        | "JSONB_OBJECT_AGG"
        | "ROW_NUMBER"
        | "RANK"
        | "DENSE_RANK"
        | "LAG"
        | "LEAD"
        | "FIRST_VALUE"
        | "LAST_VALUE"
        | "BOOL_AND"
        | "BOOL_OR"
        | "EVERY"
        | "ARRAY_LENGTH"
        | "UNNEST"
        | "GENERATE_SERIES"
        | "FORMAT"
        | "VERSION"
        | "CURRENT_SETTING"
        | "CURRENT_DATABASE"
        | "CURRENT_SCHEMA"
        | "CURRENT_USER"
        | "SESSION_USER"
        | "PG_IS_IN_RECOVERY"
        | "PG_LAST_WAL_REPLAY_LSN"
        | "PG_LAST_WAL_RECEIVE_LSN"
        | "INET_SERVER_ADDR"
        | "HAS_TABLE_PRIVILEGE"
        | "PG_RELATION_SIZE"
        | "PG_TOTAL_RELATION_SIZE"
        | "PG_DATABASE_SIZE"
        | "PG_SIZE_PRETTY"
        | "PG_TYPEOF"
        | "OBJ_DESCRIPTION"
        | "COL_DESCRIPTION"
        | "FORMAT_TYPE"
        | "PG_GET_EXPR"
        | "PG_GET_INDEXDEF"
        | "PG_GET_CONSTRAINTDEF"
        | "PG_TABLE_IS_VISIBLE"
        | "PG_TYPE_IS_VISIBLE"
        | "QUOTE_IDENT"
        | "QUOTE_LITERAL"
        | "REGEXP_REPLACE"
        | "REGEXP_MATCHES"
        | "SPLIT_PART"
        | "ENCODE"
        | "DECODE"
        | "GEN_RANDOM_UUID"
        | "JSONB_EXTRACT_PATH"
        | "JSON_EXTRACT_PATH"
        | "TO_JSON"
        | "TO_JSONB"
        | "ARRAY_TO_STRING"
        | "STRING_TO_ARRAY"
        | "EXP"
        | "LN"
        | "LOG"
        | "SIGN"
        | "PG_SLEEP" => Function::ReadOnly,
        _ => Function::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Class::*;

    #[test]
    fn statements_are_classified() {
        let safe = UnknownFunctions::Primary;
        let cases: &[(&str, Class)] = &[
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
                Read,
            ),
            ("select 1", Read),
            ("  -- comment\n SELECT * FROM t", Read),
            ("/* a /* nested */ comment */ select 1", Read),
            ("VALUES (1), (2)", Read),
            ("TABLE t", Read),
            ("SHOW search_path", Read),
            ("(SELECT 1) UNION (SELECT 2)", Read),
            ("WITH x AS (SELECT 1) SELECT * FROM x", Read),
            ("SELECT count(*), max(id) FROM t WHERE id IN (1,2)", Read),
            ("SELECT 'insert into t' AS s", Read),
            ("SELECT $$delete from t$$", Read),
            ("SELECT $tag$ update $tag$, $1", Read),
            ("SELECT \"update\" FROM t", Read),
            ("SELECT E'it\\'s delete'", Read),
            ("SELECT 'ünïcode', naïve FROM tëst", Read),
            ("INSERT INTO tëst VALUES ('é')", Write),
            ("SELECT pg_catalog.count(*) FROM t", Read),
            ("", Read),
            ("INSERT INTO t VALUES (1)", Write),
            ("update t set a = 1", Write),
            ("DELETE FROM t", Write),
            (
                "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
                Write,
            ),
            ("SELECT * FROM t FOR UPDATE", Write),
            ("SELECT * FROM t FOR SHARE", Write),
            ("SELECT * FROM t FOR NO KEY UPDATE", Write),
            ("SELECT * INTO new_t FROM t", Write),
            ("SELECT nextval('s')", Write),
            ("SELECT my_function(1)", Write),
            ("SELECT public.my_function(1)", Write),
            ("EXPLAIN ANALYZE DELETE FROM t", Write),
            ("BEGIN", Write),
            ("BEGIN ISOLATION LEVEL REPEATABLE READ", Write),
            ("START TRANSACTION READ ONLY", ReadOnlyBegin),
            ("begin read only", ReadOnlyBegin),
            (
                "BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                ReadOnlyBegin,
            ),
            ("BEGIN READ ONLY NOT DEFERRABLE", ReadOnlyBegin),
            ("BEGIN READ ONLY ISOLATION LEVEL SERIALIZABLE", Write),
            (
                "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE",
                Write,
            ),
            ("BEGIN READ ONLY DEFERRABLE", Write),
            ("BEGIN READ ONLY, READ WRITE", Write),
            ("BEGIN READ ONLY; SELECT 1; COMMIT", ReadOnlyBegin),
            (
                "BEGIN READ ONLY; SELECT 1; SAVEPOINT a; ROLLBACK",
                ReadOnlyBegin,
            ),
            (
                "BEGIN READ ONLY; DECLARE c CURSOR FOR SELECT 1",
                ReadOnlyBegin,
            ),
            ("BEGIN READ ONLY; INSERT INTO t VALUES (1); COMMIT", Write),
            ("BEGIN READ ONLY; SELECT pg_advisory_xact_lock(1)", Write),
            ("SELECT 1; BEGIN READ ONLY", ReadOnlyBegin),
            ("COMMIT", TxnControl),
            ("end", TxnControl),
            ("ROLLBACK TO SAVEPOINT a", TxnControl),
            ("RELEASE SAVEPOINT a", TxnControl),
            ("CREATE TABLE t (a int)", Write),
            ("SET LOCAL work_mem = '1MB'", TxnControl),
            (
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
                TxnControl,
            ),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", Write),
            ("SET TRANSACTION READ WRITE", Write),
            ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", Write),
            ("SET CONSTRAINTS ALL DEFERRED", Write),
            ("SELECT 1; INSERT INTO t VALUES (1)", Write),
            ("SET search_path = app", Set),
            ("set application_name to 'x'", Set),
            ("RESET ALL", Set),
            ("SET a = 1; SELECT 1", Pin),
            ("CREATE TEMP TABLE x (a int)", Pin),
            ("create temporary table x (a int)", Pin),
            ("LISTEN channel", Pin),
            ("PREPARE p AS SELECT 1", Pin),
            ("DISCARD ALL", Pin),
            ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", Pin),
            (
                "DECLARE c NO SCROLL CURSOR WITHOUT HOLD FOR SELECT * FROM t",
                Cursor,
            ),
            ("declare c cursor for select 1", Cursor),
            ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", Write),
            ("DECLARE c CURSOR FOR SELECT pg_advisory_lock(1)", Pin),
            ("DECLARE c CURSOR FOR SELECT my_function(1)", Write),
            ("FETCH FORWARD 10 FROM c", Cursor),
            ("MOVE 5 IN c", Cursor),
            ("CLOSE c", Cursor),
            ("COMMIT PREPARED 'x'", Write),
            ("ROLLBACK PREPARED 'x'", Write),
            ("COMMIT AND CHAIN", Write),
            ("COMMIT AND NO CHAIN", TxnControl),
            ("PREPARE TRANSACTION 'x'", Pin),
            ("SELECT pg_advisory_lock(1)", Pin),
            ("SELECT pg_try_advisory_lock(1)", Pin),
            ("select pg_backend_pid()", Pin),
            ("SELECT pg_advisory_xact_lock(1)", Write),
        ];
        for (sql, want) in cases {
            assert_eq!(classify(sql.as_bytes(), safe), *want, "{sql}");
        }
    }

    #[test]
    fn unknown_functions_may_be_declared_read_only() {
        assert_eq!(
            classify(b"SELECT my_function(1)", UnknownFunctions::Replica),
            Read
        );
        // Known writers stay on the primary whatever the setting.
        assert_eq!(
            classify(b"SELECT nextval('s')", UnknownFunctions::Replica),
            Write
        );
    }

    #[test]
    fn unterminated_literals_do_not_panic() {
        for sql in [
            "SELECT 'abc",
            "SELECT $$abc",
            "SELECT \"abc",
            "/* open",
            "SELECT $",
            "$",
            "SELECT $é$ x",
            "é",
            "SELECT $a$ é",
        ] {
            let _ = classify(sql.as_bytes(), UnknownFunctions::Primary);
        }
    }
}

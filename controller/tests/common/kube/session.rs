//! A long-lived psql session run in the client pod (`kubectl exec -i sql-client -- psql`):
//! statements go one at a time to psql's input, and each is answered, or fails, within a bounded
//! time. A test holds such sessions through a Service while the cluster changes and sees which
//! of them survive, with every packet to the Service and pod addresses inside the cluster.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What psql echoes after each statement (`\echo`), followed by the statement's number, whether
/// it failed (`:ERROR`) and psql's last error message (`:LAST_ERROR_MESSAGE`).
const END: &str = "@@pgbalancer-test-statement-end";

/// How long a statement may take before its session counts as lost.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The answer to one statement: column names and rows, each field as psql prints it unaligned
/// (`|` between fields, so fields must hold neither `|` nor a line break). A statement that
/// returns no rows (INSERT, CREATE) has no columns.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Answer {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Answer {
    /// psql's lines for one statement: the header line, then one line per row.
    fn parse(lines: &[String]) -> Self {
        let split = |l: &String| l.split('|').map(str::to_owned).collect::<Vec<_>>();
        match lines.split_first() {
            Some((header, rows)) => Answer {
                columns: split(header),
                rows: rows.iter().map(split).collect(),
            },
            None => Answer::default(),
        }
    }

    /// Each row as a map from column name to field.
    pub fn records(&self) -> impl Iterator<Item = HashMap<&str, &str>> + '_ {
        self.rows.iter().map(|row| {
            self.columns
                .iter()
                .map(String::as_str)
                .zip(row.iter().map(String::as_str))
                .collect()
        })
    }

    /// The first field of the first row (`SELECT count(*)`, `SHOW name`).
    pub fn first(&self) -> Option<&str> {
        self.rows.first()?.first().map(String::as_str)
    }
}

/// One psql session as the application user, run in the client pod `sql-client` (see
/// `start_sql_client`) and held open until dropped; dropping it ends psql and the exec.
pub struct PodSession {
    child: Child,
    stdin: Option<ChildStdin>,
    /// psql's standard output, line by line; closed when psql (or the exec) ended.
    lines: Receiver<String>,
    /// All psql and kubectl printed on standard error so far.
    stderr: Arc<Mutex<String>>,
    /// How much of `stderr` was there when the current statement was sent.
    stderr_seen: usize,
    /// Why the session ended, once it has: the answer to every later statement.
    ended: Option<String>,
    /// Statements sent so far: the number that the next end line must carry.
    sent: u64,
}

impl PodSession {
    /// Opens a session as `app` on database `app` at `host`:`port` from the client pod of
    /// `ns`, checked with `SELECT 1`; what went wrong otherwise. The password goes through
    /// the environment of the exec.
    pub fn open(ns: &str, host: &str, port: u16, password: &str) -> Result<Self, String> {
        let mut child = Command::new("kubectl")
            .args(["-n", ns, "exec", "-i", "sql-client", "--", "env"])
            .arg(format!("PGPASSWORD={password}"))
            // Unaligned with a header and no footer: `Answer::parse` reads that. Errors do
            // not stop psql; each statement's own end line says whether it failed.
            .args([
                "PGCONNECT_TIMEOUT=5",
                "psql",
                "-X",
                "-q",
                "-A",
                "-P",
                "footer=off",
            ])
            .args(["-v", "ON_ERROR_STOP=0", "-h", host, "-p", &port.to_string()])
            .args(["-U", "app", "-d", "app"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("kubectl exec: {e}"))?;
        let (send, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                if send
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut session = PodSession {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            stderr_seen: 0,
            ended: None,
            sent: 0,
        };
        session.query("SELECT 1")?;
        Ok(session)
    }

    /// Runs one SQL statement, waiting at most 30 s; its answer, or else psql's error
    /// message, or what psql said last when the session ended (psql leaves on a lost
    /// connection), or that no answer came in time.
    pub fn query(&mut self, sql: &str) -> Result<Answer, String> {
        if let Some(why) = &self.ended {
            return Err(why.clone());
        }
        // Lines left from an earlier statement that timed out are not this one's.
        while self.lines.try_recv().is_ok() {}
        self.sent += 1;
        let n = self.sent;
        self.stderr_seen = self.stderr.lock().unwrap().len();
        let statement = sql.trim().trim_end_matches(';');
        let input = format!("{statement};\n\\echo {END} {n} :ERROR :LAST_ERROR_MESSAGE\n");
        let written = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(input.as_bytes())
                .and_then(|()| stdin.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        if written.is_err() {
            return Err(self.ended());
        }
        let deadline = Instant::now() + STATEMENT_TIMEOUT;
        let mut output = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no answer within {} s to `{statement}`",
                        STATEMENT_TIMEOUT.as_secs()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.ended()),
            };
            let Some(end) = line.strip_prefix(END) else {
                output.push(line);
                continue;
            };
            let mut fields = end.trim_start().splitn(3, ' ');
            if fields.next().and_then(|f| f.parse::<u64>().ok()) != Some(n) {
                // The end of an earlier statement that timed out: what came so far was its.
                output.clear();
                continue;
            }
            return match (fields.next(), fields.next()) {
                (Some("false"), _) => Ok(Answer::parse(&output)),
                (_, message) => Err(format!(
                    "`{statement}` failed: {}",
                    message.unwrap_or_default().trim()
                )),
            };
        }
    }

    /// The session ended: what psql and kubectl said on standard error since the statement
    /// was sent, once they have exited (waiting at most 2 s for that).
    fn ended(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // The reader of standard error may lag behind the exit by a moment.
        std::thread::sleep(Duration::from_millis(100));
        let said = self.stderr.lock().unwrap()[self.stderr_seen..]
            .trim()
            .to_owned();
        let why = format!("the session ended: {said}");
        self.ended = Some(why.clone());
        why
    }
}

impl Drop for PodSession {
    /// Closes psql's input, so that psql ends the session and the exec returns, and kills the
    /// exec if it is still there after 2 s.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

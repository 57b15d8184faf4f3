//! The live backend set: each configured server with what its monitor last saw (up, role,
//! WAL position), whether it is attached, and its load. Routing reads from here; the monitor
//! tasks, the configuration follower and the agent's attach/detach write to it.
//!
//! The choice of servers is pure (`choose_primary`, `choose_replica`) and table-tested.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// What a monitor last saw of one server.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// The last check answered, recently.
    pub up: bool,
    /// `Some(true)` in recovery (standby), `Some(false)` writable, `None` never seen.
    pub in_recovery: Option<bool>,
    /// Current WAL position of a primary, replayed position of a standby.
    pub lsn: u64,
    /// When the check that produced `lsn` was sent (before the server answered).
    pub sampled: Option<Instant>,
    /// When `up` last changed.
    pub changed: SystemTime,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            up: false,
            in_recovery: None,
            lsn: 0,
            sampled: None,
            changed: SystemTime::now(),
        }
    }
}

/// One configured server.
#[derive(Debug)]
pub struct Backend {
    /// Slot (the instance ordinal).
    pub id: u32,
    /// Host name.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Monitor's view.
    pub seen: Mutex<Seen>,
    /// Detached through the API: takes no new queries.
    pub detached: std::sync::atomic::AtomicBool,
    /// Detached and released: the monitor attaches it again once it answers as a standby.
    pub released: std::sync::atomic::AtomicBool,
    /// Query batches running on it now.
    pub in_flight: AtomicU32,
    /// Read batches sent to it.
    pub selects: AtomicU64,
    /// Client sessions using it.
    pub sessions: AtomicU32,
    /// Client sessions that read from it (hold a [`Reader`] for it). Counted when the replica
    /// is chosen, before its connection opens, so sessions that start reading at the same
    /// moment spread instead of all taking the first replica.
    pub readers: AtomicU32,
    /// Moves on when the server went down or changed role: connections opened before are
    /// not used again.
    pub epoch: AtomicU64,
}

impl Backend {
    /// A server not seen yet.
    pub fn new(id: u32, host: &str, port: u16) -> Self {
        Self {
            id,
            host: host.to_owned(),
            port,
            seen: Mutex::new(Seen::default()),
            detached: Default::default(),
            released: Default::default(),
            in_flight: AtomicU32::new(0),
            selects: AtomicU64::new(0),
            sessions: AtomicU32::new(0),
            readers: AtomicU32::new(0),
            epoch: AtomicU64::new(0),
        }
    }

    /// A copy of the monitor's view.
    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether it takes new queries.
    pub fn attached(&self) -> bool {
        !self.detached.load(Ordering::Relaxed)
    }
}

/// The routing inputs of one server, for the pure choices.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Index into the set.
    pub index: usize,
    /// Attached and seen up.
    pub usable: bool,
    /// Seen in recovery.
    pub in_recovery: Option<bool>,
    /// WAL position.
    pub lsn: u64,
    /// Batches in flight.
    pub in_flight: u32,
    /// Sessions reading from it.
    pub readers: u32,
    /// Open session connections.
    pub sessions: u32,
    /// Reads sent so far (spreads ties).
    pub selects: u64,
    /// When the check that gave `lsn` was sent.
    pub sampled: Option<Instant>,
}

/// The one usable writable server; `None` when there is none or more than one (a write never
/// goes to a server that may be an old primary).
pub fn choose_primary(candidates: &[Candidate]) -> Option<usize> {
    let mut writable = candidates
        .iter()
        .filter(|c| c.usable && c.in_recovery == Some(false));
    let first = writable.next()?;
    writable.next().is_none().then_some(first.index)
}

/// A usable standby that has replayed `min_lsn` and lags the primary by at most `max_lag`
/// bytes: `keep` (the one the session reads from now) while it qualifies, else the one with
/// the least load.
///
/// Keeping a session on one replica spreads load by sessions, as pgpool does: moving every
/// read to the least-loaded replica would give each session a server connection on every
/// replica, which costs the servers a process each and measured twice the servers' CPU per
/// read.
pub fn choose_replica(
    candidates: &[Candidate],
    primary_lsn: Option<u64>,
    min_lsn: u64,
    max_lag: u64,
    keep: Option<usize>,
) -> Option<usize> {
    let eligible = candidates
        .iter()
        .filter(|c| c.usable && c.in_recovery == Some(true) && c.lsn >= min_lsn)
        .filter(|c| primary_lsn.is_none_or(|p| p.saturating_sub(c.lsn) <= max_lag));
    if let Some(keep) = keep {
        if eligible.clone().any(|c| c.index == keep) {
            return Some(keep);
        }
    }
    eligible
        .min_by_key(|c| (c.in_flight, c.readers, c.sessions, c.selects, c.index))
        .map(|c| c.index)
}

/// How fresh a monitor's answer must be for its server to count as up.
pub const FRESH: Duration = Duration::from_secs(3);

/// A session's claim on the replica it reads from: counted in [`Backend::readers`] while it
/// lives.
#[derive(Debug)]
pub struct Reader(Arc<Backend>);

impl Reader {
    /// Claims `backend` for one session's reads.
    pub fn new(backend: Arc<Backend>) -> Self {
        backend.readers.fetch_add(1, Ordering::Relaxed);
        Self(backend)
    }

    /// The replica's slot.
    pub fn id(&self) -> u32 {
        self.0.id
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The whole set, replaced as a unit when the configuration changes.
#[derive(Debug, Default)]
pub struct Backends {
    set: RwLock<Arc<Vec<Arc<Backend>>>>,
}

impl Backends {
    /// The current set.
    pub fn all(&self) -> Arc<Vec<Arc<Backend>>> {
        self.set.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the set with `configured` (slot, host, port), keeping the servers whose slot
    /// and address did not change (their state and connections live on). Returns the servers
    /// that are new.
    pub fn configure(&self, configured: &[(u32, String, u16)]) -> Vec<Arc<Backend>> {
        let mut set = self.set.write().unwrap_or_else(|e| e.into_inner());
        let mut fresh = Vec::new();
        let next: Vec<Arc<Backend>> = configured
            .iter()
            .map(|(id, host, port)| {
                set.iter()
                    .find(|b| b.id == *id && b.host == *host && b.port == *port)
                    .cloned()
                    .unwrap_or_else(|| {
                        let b = Arc::new(Backend::new(*id, host, *port));
                        fresh.push(b.clone());
                        b
                    })
            })
            .collect();
        *set = Arc::new(next);
        fresh
    }

    /// Whether `backend` is still configured (its monitor stops when not).
    pub fn contains(&self, backend: &Arc<Backend>) -> bool {
        self.all().iter().any(|b| Arc::ptr_eq(b, backend))
    }

    /// The routing inputs of every server.
    pub fn candidates(&self, set: &[Arc<Backend>]) -> Vec<Candidate> {
        let now = Instant::now();
        set.iter()
            .enumerate()
            .map(|(index, b)| {
                let seen = b.seen();
                Candidate {
                    index,
                    usable: b.attached()
                        && seen.up
                        && seen.sampled.is_some_and(|t| now.duration_since(t) < FRESH),
                    in_recovery: seen.in_recovery,
                    lsn: seen.lsn,
                    in_flight: b.in_flight.load(Ordering::Relaxed),
                    readers: b.readers.load(Ordering::Relaxed),
                    sessions: b.sessions.load(Ordering::Relaxed),
                    selects: b.selects.load(Ordering::Relaxed),
                    sampled: seen.sampled,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(index: usize, usable: bool, rec: Option<bool>, lsn: u64, load: u32) -> Candidate {
        Candidate {
            index,
            usable,
            in_recovery: rec,
            lsn,
            in_flight: load,
            readers: 0,
            sessions: 0,
            selects: 0,
            sampled: None,
        }
    }

    #[test]
    fn exactly_one_writable_server_is_the_primary() {
        let cases: &[(&[Candidate], Option<usize>)] = &[
            (
                &[c(0, true, Some(false), 9, 0), c(1, true, Some(true), 9, 0)],
                Some(0),
            ),
            (
                &[c(0, false, Some(false), 9, 0), c(1, true, Some(true), 9, 0)],
                None,
            ),
            (
                &[c(0, true, Some(false), 9, 0), c(1, true, Some(false), 9, 0)],
                None,
            ),
            (
                &[
                    c(0, false, Some(false), 9, 0),
                    c(1, true, Some(false), 9, 0),
                ],
                Some(1),
            ),
            (&[c(0, true, None, 0, 0)], None),
            (&[], None),
        ];
        for (set, want) in cases {
            assert_eq!(choose_primary(set), *want, "{set:?}");
        }
    }

    #[test]
    fn replicas_are_chosen_by_position_lag_and_load() {
        let set = [
            c(0, true, Some(false), 100, 0),
            c(1, true, Some(true), 90, 3),
            c(2, true, Some(true), 100, 5),
            c(3, false, Some(true), 100, 0),
        ];
        // Least load among those caught up enough.
        assert_eq!(choose_replica(&set, Some(100), 0, 1000, None), Some(1));
        // Read-your-writes: only a replica that replayed position 95.
        assert_eq!(choose_replica(&set, Some(100), 95, 1000, None), Some(2));
        // Lag bound: 10 bytes behind is too far.
        assert_eq!(choose_replica(&set, Some(100), 0, 5, None), Some(2));
        // Nobody has replayed 101: the primary must serve the read.
        assert_eq!(choose_replica(&set, Some(101), 101, 1000, None), None);
        // An unknown primary position does not hold reads back.
        assert_eq!(choose_replica(&set, None, 0, 0, None), Some(1));
    }

    #[test]
    fn a_session_keeps_its_replica_while_it_qualifies() {
        let mut set = [
            c(0, true, Some(false), 100, 0),
            c(1, true, Some(true), 100, 0),
            c(2, true, Some(true), 100, 4),
        ];
        // Kept although another replica has less load.
        assert_eq!(choose_replica(&set, Some(100), 0, 1000, Some(2)), Some(2));
        // Not kept once it lags too far, or has not replayed what the read must see.
        set[2].lsn = 90;
        assert_eq!(choose_replica(&set, Some(100), 0, 5, Some(2)), Some(1));
        assert_eq!(choose_replica(&set, Some(100), 95, 1000, Some(2)), Some(1));
        // Not kept once it is no longer usable; the primary is never "kept" as a replica.
        set[2].lsn = 100;
        set[2].usable = false;
        assert_eq!(choose_replica(&set, Some(100), 0, 1000, Some(2)), Some(1));
        assert_eq!(choose_replica(&set, Some(100), 0, 1000, Some(0)), Some(1));
        // A new session goes to the replica with fewer sessions when loads are equal.
        set[2].usable = true;
        set[2].in_flight = 0;
        set[1].sessions = 3;
        assert_eq!(choose_replica(&set, Some(100), 0, 1000, None), Some(2));
        // Sessions that chose a replica but have not connected yet count first.
        set[2].readers = 1;
        assert_eq!(choose_replica(&set, Some(100), 0, 1000, None), Some(1));
    }

    #[test]
    fn sessions_choosing_at_once_spread_over_the_replicas() {
        let set = Backends::default();
        set.configure(&[
            (0, "p".into(), 5432),
            (1, "r1".into(), 5432),
            (2, "r2".into(), 5432),
        ]);
        let all = set.all();
        let mut candidates = set.candidates(&all);
        candidates[0].usable = true;
        candidates[0].in_recovery = Some(false);
        let mut readers = Vec::new();
        for _ in 0..6 {
            for c in &mut candidates[1..] {
                c.usable = true;
                c.in_recovery = Some(true);
                c.readers = all[c.index].readers.load(Ordering::Relaxed);
            }
            let i = choose_replica(&candidates, Some(0), 0, 0, None).unwrap();
            readers.push(Reader::new(all[i].clone()));
        }
        let on = |id| readers.iter().filter(|r| r.id() == id).count();
        assert_eq!((on(1), on(2)), (3, 3));
        readers.truncate(1);
        assert_eq!(all[1].readers.load(Ordering::Relaxed), 1);
        assert_eq!(all[2].readers.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn reconfiguring_keeps_unchanged_servers() {
        let set = Backends::default();
        let fresh = set.configure(&[(0, "a".into(), 5432), (1, "b".into(), 5432)]);
        assert_eq!(fresh.len(), 2);
        let kept = set.all()[0].clone();
        let fresh = set.configure(&[(0, "a".into(), 5432), (2, "c".into(), 5432)]);
        assert_eq!(fresh.iter().map(|b| b.id).collect::<Vec<_>>(), vec![2]);
        assert!(Arc::ptr_eq(&set.all()[0], &kept));
        assert!(set.contains(&kept));
        assert_eq!(set.all().len(), 2);
    }
}

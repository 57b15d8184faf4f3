//! A deleted balancer pod's wait before it stops (`pgbalancer-agent --drain`, its preStop
//! hook). The pod leaves its Service's endpoints at once, but every node's proxy takes a
//! moment to follow, longer on a busy cluster; stopping pgpool before that refuses the new
//! connections still sent here. So the pod keeps serving at least [`Drain::at_least`], then
//! until no client has opened a connection to the balancer's port for [`Drain::quiet`]
//! (traffic moved elsewhere), and never longer than [`Drain::at_most`], well inside the pod's
//! termination grace period. Connections are read from the pod's socket tables
//! (`/proc/net/tcp` and `tcp6`: the hook runs in the container's network namespace) every
//! 20 ms, so that short sessions show too; connections from the pod itself (the agent's own
//! SQL sessions to pgpool for its health answer and node list) do not count.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long a drain lasts.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// Shortest drain, even with no traffic at all.
    pub at_least: Duration,
    /// How long no new connection must arrive before it ends.
    pub quiet: Duration,
    /// Longest drain.
    pub at_most: Duration,
    /// Connections from a loopback address count too (only tests want that).
    pub count_loopback: bool,
}

/// A balancer pod's drain; its grace period must exceed `at_most` plus pgpool's stop.
pub const BALANCER: Drain = Drain {
    at_least: Duration::from_secs(5),
    quiet: Duration::from_secs(2),
    at_most: Duration::from_secs(20),
    count_loopback: false,
};

/// Time between two looks at the socket tables.
const SAMPLE: Duration = Duration::from_millis(20);

impl Drain {
    /// Whether the drain is over, `elapsed` after it began and `since_new` after the last
    /// new connection (or its beginning).
    pub fn over(&self, elapsed: Duration, since_new: Duration) -> bool {
        elapsed >= self.at_most || (elapsed >= self.at_least && since_new >= self.quiet)
    }
}

/// One client connection to the balancer: (local, remote) address.
type Conn = (SocketAddr, SocketAddr);

/// Client connections to `port` now, listening sockets left out.
fn connections(port: u16, count_loopback: bool) -> HashSet<Conn> {
    let mut out = HashSet::new();
    for table in [procfs::net::tcp(), procfs::net::tcp6()] {
        // A table that cannot be read (no IPv6) has no connections to add.
        for e in table.into_iter().flatten() {
            let client = e.remote_address.ip().to_canonical();
            if e.local_address.port() == port
                && e.state != procfs::net::TcpState::Listen
                && (count_loopback || !client.is_loopback())
            {
                out.insert((e.local_address, e.remote_address));
            }
        }
    }
    out
}

/// Waits as `drain` says for connections to `port`; what it saw, for the log.
pub async fn run(drain: Drain, port: u16) -> (Duration, usize) {
    let started = Instant::now();
    let mut before = connections(port, drain.count_loopback);
    let mut last_new = started;
    let mut arrived = 0;
    while !drain.over(started.elapsed(), last_new.elapsed()) {
        tokio::time::sleep(SAMPLE).await;
        let now = connections(port, drain.count_loopback);
        let new = now.difference(&before).count();
        if new > 0 {
            arrived += new;
            last_new = Instant::now();
        }
        before = now;
    }
    (started.elapsed(), arrived)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn a_drain_lasts_its_minimum_then_until_traffic_stops_at_most_its_maximum() {
        let d = BALANCER;
        // No traffic: the minimum.
        assert!(!d.over(s(4.9), s(4.9)));
        assert!(d.over(s(5.0), s(5.0)));
        // Traffic until 6 s: 2 s of quiet after it.
        assert!(!d.over(s(7.9), s(1.9)));
        assert!(d.over(s(8.0), s(2.0)));
        // Traffic that never stops: the maximum.
        assert!(!d.over(s(19.9), s(0.1)));
        assert!(d.over(s(20.0), s(0.1)));
    }

    #[tokio::test]
    async fn new_connections_keep_a_drain_going() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accept = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                held.push(c);
            }
        });
        // Ten connections 50 ms apart, each kept open (so no look can miss it).
        let client = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..10 {
                held.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            held
        });
        let drain = Drain {
            at_least: s(0.1),
            quiet: s(1.0),
            at_most: s(30.0),
            count_loopback: true,
        };
        let (took, arrived) = run(drain, port).await;
        accept.abort();
        let held = client.await.unwrap();
        assert!(held.iter().all(Result::is_ok));
        // The last connection came at least 450 ms after the drain began (the client starts
        // after the drain's first look, on this single-threaded runtime), then 1 s of quiet:
        // the drain outlasted the traffic and saw each connection.
        assert_eq!(arrived, 10, "new connections seen");
        assert!(took >= s(0.45 + 1.0), "ended after {took:?}");
        assert!(took < s(30.0), "ran to its maximum: {took:?}");
    }
}

//! Supervision of the pgpool process: start it, restart it when it exits (after a backoff
//! from 100 ms, doubling up to 5 s while it keeps exiting within 2 s of its start), ending
//! whatever it left behind first, and stop it cleanly (`pgpool -m fast stop`) when the agent
//! stops.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::AgentConfig;

/// Pause before restarting a pgpool that exited after running for [`STABLE_AFTER`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between restarts of a pgpool that keeps exiting.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A pgpool that ran this long is restarted after [`FIRST_BACKOFF`] again: one that served a
/// while costs 100 ms however often it exits; only one failing at its start is slowed down.
const STABLE_AFTER: Duration = Duration::from_secs(2);

/// Handle to the supervised pgpool.
pub struct Supervisor {
    running: Arc<AtomicBool>,
    restarts: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
}

impl Supervisor {
    /// Starts pgpool and the task that keeps it running.
    pub fn start(config: &AgentConfig) -> Self {
        let running = Arc::new(AtomicBool::new(false));
        let restarts = Arc::new(AtomicU64::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let (r, n, s, cfg) = (
            running.clone(),
            restarts.clone(),
            stopping.clone(),
            config.clone(),
        );
        tokio::spawn(async move {
            let mut first = true;
            let mut backoff = FIRST_BACKOFF;
            let mut started = std::time::Instant::now();
            while !s.load(Ordering::SeqCst) {
                if !first {
                    n.fetch_add(1, Ordering::SeqCst);
                    // Quick after a pgpool that ran a while; slower when it keeps failing.
                    if started.elapsed() > STABLE_AFTER {
                        backoff = FIRST_BACKOFF;
                    }
                    tracing::warn!(
                        in_ms = backoff.as_millis() as u64,
                        "pgpool exited; restarting"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                first = false;
                // No pgpool of this agent runs now (none yet, or its group was ended), so a pid
                // file is stale: left by a pgpool killed with its container, whose restart kept
                // the file. pgpool refuses to start while the pid in it is alive, and in a
                // restarted container that pid is often another process.
                remove_stale_pid_file(pid_file(&cfg.path("pgpool.conf")));
                remove_orphaned_ipc().await;
                started = std::time::Instant::now();
                // Its own process group: when the parent dies its children must go with it.
                let child = tokio::process::Command::new(&cfg.pgpool)
                    .process_group(0)
                    .args(["-n", "-D", "-f"])
                    .arg(cfg.path("pgpool.conf"))
                    .arg("-F")
                    .arg(cfg.path("pcp.conf"))
                    .arg("-a")
                    .arg(cfg.path("pool_hba.conf"))
                    .spawn();
                match child {
                    Ok(mut child) => {
                        r.store(true, Ordering::SeqCst);
                        let group = child.id();
                        let pid_file = pid_file(&cfg.path("pgpool.conf"));
                        let status = tokio::select! {
                            status = child.wait() => status,
                            () = lost_pid_file(pid_file) => {
                                tracing::error!(
                                    "pgpool's pid file is gone while it runs (it is no longer \
                                     whole): restarting it"
                                );
                                if let Err(e) = child.start_kill() {
                                    tracing::warn!(error = %e, "cannot kill pgpool");
                                }
                                child.wait().await
                            }
                        };
                        r.store(false, Ordering::SeqCst);
                        tracing::info!(?status, "pgpool exited");
                        if let Some(group) = group {
                            end_orphans(group).await;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start pgpool");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        });
        Self {
            running,
            restarts,
            stopping,
        }
    }

    /// The pgpool process is alive.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Times pgpool was restarted after exiting.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::SeqCst)
    }

    /// Stops pgpool (fast shutdown) and waits up to 10 s for it.
    pub async fn stop(&self, config: &AgentConfig) {
        self.stopping.store(true, Ordering::SeqCst);
        // Whether the stop command itself succeeded matters less than whether pgpool is gone,
        // which the loop below checks.
        let _ = tokio::process::Command::new(&config.pgpool)
            .args(["-f"])
            .arg(config.path("pgpool.conf"))
            .args(["-m", "fast", "stop"])
            .status()
            .await;
        for _ in 0..100 {
            if !self.is_running() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Ends what is left of a pgpool whose main process exited: its children (sessions, PCP,
/// health checks) keep the listening sockets and serve on without failover handling, and a new
/// pgpool could not bind. Killed, and reaped here when they were handed to this process, or by
/// the container's first process (the agent's init) otherwise.
async fn end_orphans(group: u32) {
    use nix::sys::signal::{killpg, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag};
    use nix::unistd::Pid;

    let group = Pid::from_raw(group as i32);
    if killpg(group, Signal::SIGKILL).is_ok() {
        tracing::warn!("killed the processes pgpool left behind");
    }
    // Until every process of the group is gone (they hold pgpool's ports until then): reaped
    // here when they are this process's children, else by the container's init.
    let negative = Pid::from_raw(-group.as_raw());
    for _ in 0..2_000 {
        let _ = waitpid(negative, Some(WaitPidFlag::WNOHANG));
        if killpg(group, None).is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Removes the System V shared memory segments nobody is attached to and the semaphore sets
/// of this user: what a pgpool killed without its exit handlers left (it removes them only
/// when it exits cleanly). Without this each kill would leave its memory charged to the
/// container. Called when no pgpool of this agent runs, and nothing else in the container uses
/// them.
async fn remove_orphaned_ipc() {
    use std::os::unix::fs::MetadataExt;
    // This process's user: the owner of its /proc entry.
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return;
    };
    let read = |path| std::fs::read_to_string(path).unwrap_or_default();
    let shm = read("/proc/sysvipc/shm");
    let sem = read("/proc/sysvipc/sem");
    let (segments, sets) = orphaned_ipc(&shm, &sem, uid);
    if segments.is_empty() && sets.is_empty() {
        return;
    }
    let mut ipcrm = tokio::process::Command::new("ipcrm");
    for id in &segments {
        ipcrm.args(["-m", id]);
    }
    for id in &sets {
        ipcrm.args(["-s", id]);
    }
    match ipcrm.status().await {
        Ok(s) if s.success() => tracing::warn!(
            segments = segments.len(),
            semaphore_sets = sets.len(),
            "removed the shared memory a killed pgpool left"
        ),
        Ok(s) => tracing::warn!(status = %s, "ipcrm failed"),
        Err(e) => tracing::warn!(error = %e, "cannot run ipcrm"),
    }
}

/// From `/proc/sysvipc/shm` and `/proc/sysvipc/sem`: the ids of `uid`'s shared memory segments
/// with no process attached, and of its semaphore sets.
fn orphaned_ipc(shm: &str, sem: &str, uid: u32) -> (Vec<String>, Vec<String>) {
    // shm columns: key shmid perms size cpid lpid nattch uid ...; sem: key semid perms nsems uid ...
    let rows = |text: &str, uid_at: usize, detached: Option<usize>| -> Vec<String> {
        text.lines()
            .skip(1)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let owned = f.get(uid_at)?.parse::<u32>().ok()? == uid;
                let unused = detached.is_none_or(|at| f.get(at) == Some(&"0"));
                (owned && unused).then(|| f.get(1).map(|id| (*id).to_owned()))?
            })
            .collect()
    };
    (rows(shm, 7, Some(6)), rows(sem, 4, None))
}

/// Removes the pid file at `path`, if any, saying so.
fn remove_stale_pid_file(path: Option<std::path::PathBuf>) {
    let Some(path) = path else { return };
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed a stale pgpool pid file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale pgpool pid file")
        }
    }
}

/// `pid_file_name` of the pgpool.conf at `conf`, if set.
fn pid_file(conf: &std::path::Path) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(conf).ok()?;
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "pid_file_name")
            .then(|| value.trim().trim_matches('\'').into())
            .filter(|p: &std::path::PathBuf| !p.as_os_str().is_empty())
    })
}

/// Returns once the pid file of a running pgpool has been missing at two checks 5 s apart: a
/// child that ran the main process's exit handler (seen with pgpool-II 4.6.1 when it restarts
/// its children) removes it and the Unix sockets, and pgpool then fails on its semaphore.
/// Never returns without a pid file to watch.
async fn lost_pid_file(path: Option<std::path::PathBuf>) {
    let Some(path) = path else {
        return std::future::pending().await;
    };
    let mut missing = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if path.exists() {
            missing = 0;
        } else {
            missing += 1;
            if missing >= 2 {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unattached_segments_and_the_users_semaphores_are_orphaned() {
        let shm = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap
         0         12   600              10485760    40    40      0   999   999   999   999          0          0 1700000000              1048576                     0
         0         13   600              10485760    50    50      3   999   999   999   999          0          0 1700000000              1048576                     0
         0         14   600                  1024    60    60      0     0     0     0     0          0          0 1700000000                 4096                     0
";
        let sem =
            "       key      semid perms      nsems   uid   gid  cuid  cgid      otime      ctime
         0          3   600         10   999   999   999   999          0 1700000000
         0          4   600         10     0     0     0     0          0 1700000000
";
        let (segments, sets) = orphaned_ipc(shm, sem, 999);
        assert_eq!(segments, vec!["12"]);
        assert_eq!(sets, vec!["3"]);
        assert_eq!(orphaned_ipc("", "", 999), (vec![], vec![]));
    }

    #[test]
    fn a_stale_pid_file_is_removed_and_a_missing_one_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("pgpool.pid");
        std::fs::write(&pid, "8\n").unwrap();
        remove_stale_pid_file(Some(pid.clone()));
        assert!(!pid.exists());
        remove_stale_pid_file(Some(pid.clone()));
        remove_stale_pid_file(None);
        assert!(!pid.exists());
    }

    #[test]
    fn the_pid_file_is_read_from_pgpool_conf() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("pgpool.conf");
        std::fs::write(
            &conf,
            "port = 9999\npid_file_name = '/var/run/pgbalancer/pgpool.pid'\n",
        )
        .unwrap();
        assert_eq!(
            pid_file(&conf),
            Some("/var/run/pgbalancer/pgpool.pid".into())
        );
        std::fs::write(&conf, "port = 9999\n").unwrap();
        assert_eq!(pid_file(&conf), None);
    }
}

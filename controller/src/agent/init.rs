//! The balancer container's first process. It runs the agent as its child and starts it again
//! when it dies (after 100 ms, doubling up to 5 s while it keeps dying within 2 s of its
//! start), so that a crashed or killed agent costs the clients a process start, not a container
//! restart (on Docker, about two seconds: the container's network and published ports are set
//! up again). An agent that cannot get going (five deaths in a row, each within 2 s of its
//! start) ends the container instead, so that Docker and Kubernetes show it failing. As process
//! 1 it also passes `SIGTERM` and `SIGINT` on to the agent, reaps orphans, and after an agent's
//! death ends what it left behind (a pgpool whose parent is gone: asked to stop first, so that
//! it removes its shared memory, then killed), which a new agent would otherwise find holding
//! the balancer's port.
//!
//! Only process 1 of a container is an init: run anywhere else (a test, a shell), the agent
//! serves by itself. The agent's process id is written to [`PID_FILE`].

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

/// Set in the agent's environment by the init: the agent serves, it does not supervise.
pub const WORKER_ENV: &str = "PGBALANCER_AGENT_WORKER";
/// How many times the init has started the agent again, in the agent's environment.
pub const RESTARTS_ENV: &str = "PGBALANCER_AGENT_RESTARTS";
/// Where the init writes the running agent's process id.
pub const PID_FILE: &str = "/var/run/pgbalancer/agent.pid";

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// An agent that ran this long is started again after [`FIRST_BACKOFF`]: one that served a
/// while and then died costs its clients 100 ms however often it happens, and only one that
/// dies as it starts is started ever more slowly.
const STABLE_AFTER: Duration = Duration::from_secs(2);
/// Deaths in a row, each within [`STABLE_AFTER`] of the start, after which the container ends.
const GIVE_UP_AFTER: u32 = 5;

/// Whether this process is to be the init: process 1, and not an agent it started.
pub fn wanted() -> bool {
    std::process::id() == 1 && std::env::var_os(WORKER_ENV).is_none()
}

/// Runs the agent (this program, same arguments) until a signal stops it; its exit code.
pub async fn run() -> std::io::Result<i32> {
    let exe = std::env::current_exe()?;
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    // Registered before the first agent starts, so that no death goes unnoticed.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut child = signal(SignalKind::child())?;
    let mut backoff = FIRST_BACKOFF;
    let mut restarts = 0u64;
    let mut short_runs = 0;
    loop {
        let started = Instant::now();
        let agent = std::process::Command::new(&exe)
            .args(&args)
            .env(WORKER_ENV, "1")
            .env(RESTARTS_ENV, restarts.to_string())
            .spawn()?;
        let pid = Pid::from_raw(agent.id() as i32);
        // Dropping the handle does not wait: this process reaps every child itself below.
        drop(agent);
        if let Err(e) = std::fs::write(PID_FILE, format!("{pid}\n")) {
            tracing::warn!(path = PID_FILE, error = %e, "cannot write the agent's pid file");
        }
        let mut stopping = false;
        let code = loop {
            tokio::select! {
                _ = term.recv() => {
                    stopping = true;
                    let _ = kill(pid, Signal::SIGTERM);
                }
                _ = int.recv() => {
                    stopping = true;
                    let _ = kill(pid, Signal::SIGINT);
                }
                _ = child.recv() => {
                    if let Some(code) = reap(pid) {
                        break code;
                    }
                }
            }
        };
        let _ = std::fs::remove_file(PID_FILE);
        end_orphans().await;
        if stopping {
            return Ok(code);
        }
        if started.elapsed() > STABLE_AFTER {
            backoff = FIRST_BACKOFF;
            short_runs = 0;
        } else {
            short_runs += 1;
            if short_runs >= GIVE_UP_AFTER {
                tracing::error!(
                    exit = code,
                    "the agent keeps ending at its start; giving up"
                );
                return Ok(code);
            }
        }
        restarts += 1;
        tracing::warn!(
            exit = code,
            restarts,
            in_ms = backoff.as_millis() as u64,
            "the agent ended; starting it again"
        );
        // Asked to stop while no agent runs: nothing is left to stop.
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = term.recv() => return Ok(0),
            _ = int.recv() => return Ok(0),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Reaps every child that ended; the agent's exit code (128 + signal when killed) if it was
/// among them.
fn reap(agent: Pid) -> Option<i32> {
    let mut ended = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => ended = Some(code),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == agent => {
                ended = Some(128 + signal as i32)
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return ended,
            Ok(_) => {}
        }
    }
}

/// Ends what the dead agent left: the processes handed to this one (their parent is gone).
/// The leader of a process group of its own (pgpool's main process: its children share its
/// group) is asked to stop with its group first (`SIGINT`, pgpool's fast stop, which removes
/// its shared memory), then whatever still runs after a second is killed. Processes that are
/// not this one's (a `docker exec` shell) are left alone.
async fn end_orphans() {
    for signal in [Signal::SIGINT, Signal::SIGKILL] {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut first = true;
        loop {
            reap(Pid::from_raw(-1));
            let orphans = orphans();
            let leaders: Vec<Pid> = orphans
                .iter()
                .filter(|&&(pid, group)| group == pid && group.as_raw() > 1)
                .map(|&(pid, _)| pid)
                .collect();
            if orphans.is_empty() || (signal == Signal::SIGINT && leaders.is_empty()) {
                break;
            }
            if first || signal == Signal::SIGKILL {
                for &group in &leaders {
                    let _ = killpg(group, signal);
                }
                if signal == Signal::SIGKILL {
                    for &(pid, _) in &orphans {
                        let _ = kill(pid, signal);
                    }
                }
                if first {
                    tracing::warn!(
                        processes = orphans.len(),
                        %signal,
                        "ending the processes the agent left behind"
                    );
                }
                first = false;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Processes whose parent is this one, except the agent: (id, process group).
fn orphans() -> Vec<(Pid, Pid)> {
    let me = Pid::this();
    processes(Path::new("/proc"))
        .into_iter()
        .filter(|&(pid, parent, _)| pid != me && parent == me)
        .map(|(pid, _, group)| (pid, group))
        .collect()
}

/// Every process under `proc`: its id, its parent's and its process group.
fn processes(proc: &Path) -> Vec<(Pid, Pid, Pid)> {
    let Ok(entries) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (parent, group) = parent_and_group(&stat)?;
            Some((
                Pid::from_raw(pid),
                Pid::from_raw(parent),
                Pid::from_raw(group),
            ))
        })
        .collect()
}

/// The parent and process group fields of a `/proc/PID/stat` line (after the command name,
/// which may hold spaces and parentheses).
fn parent_and_group(stat: &str) -> Option<(i32, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    let parent = fields.next()?.parse().ok()?;
    let group = fields.next()?.parse().ok()?;
    Some((parent, group))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_and_group_are_read_after_the_command_name() {
        assert_eq!(
            parent_and_group("42 (pgpool: a (b) c) S 1 42 42 0 -1 4194560"),
            Some((1, 42))
        );
        assert_eq!(parent_and_group("7 (sh) R 0 7 7"), Some((0, 7)));
        assert_eq!(parent_and_group("garbage"), None);
    }

    #[test]
    fn this_process_is_found_with_its_parent() {
        let me = Pid::this();
        let found = processes(Path::new("/proc"));
        let entry = found.iter().find(|(pid, _, _)| *pid == me).expect("self");
        assert_eq!(entry.1, nix::unistd::getppid());
        assert_eq!(entry.2, nix::unistd::getpgrp());
    }

    #[test]
    fn only_process_one_is_an_init() {
        // Tests never run as process 1.
        assert!(!wanted());
    }
}

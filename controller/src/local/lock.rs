//! Per-cluster advisory locks in the state directory (IO). A command that changes a cluster
//! (`up`, `scale`, `switchover`, `down`) holds the cluster's lock for its whole run and the
//! controller holds it for each tick, so the two never act on one cluster at the same time.
//!
//! The locks are `flock(2)` locks (`std::fs::File::lock`) on `locks/<name>.lock`: the kernel
//! releases them when the holder exits, so a crashed command or controller never leaves a
//! cluster locked. Lock files are never deleted: unlinking a lock file while another process
//! waits on it would let two holders lock two different files.

use std::fs::{File, TryLockError};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::state::{StateDir, StateError};

/// How often a waiting command tries the lock again.
const RETRY: Duration = Duration::from_millis(100);

/// A held cluster lock; released when dropped.
#[derive(Debug)]
pub struct ClusterLock {
    // Held only for the lock it carries.
    _file: File,
}

impl StateDir {
    fn lock_path(&self, name: &str) -> PathBuf {
        self.root().join("locks").join(format!("{name}.lock"))
    }

    fn open_lock(&self, name: &str) -> Result<File, StateError> {
        let path = self.lock_path(name);
        let io = |source| StateError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)
    }

    /// The lock of cluster `name` if nobody holds it; `None` when it is held.
    pub fn try_lock(&self, name: &str) -> Result<Option<ClusterLock>, StateError> {
        let file = self.open_lock(name)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(ClusterLock { _file: file })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(source)) => Err(StateError::Io {
                path: self.lock_path(name).display().to_string(),
                source,
            }),
        }
    }

    /// The lock of cluster `name`, waiting up to `wait` for its holder (the controller holds
    /// it for one tick; another command for its whole run).
    pub async fn lock(&self, name: &str, wait: Duration) -> Result<ClusterLock, StateError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(lock) = self.try_lock(name)? {
                return Ok(lock);
            }
            if Instant::now() >= deadline {
                return Err(StateError::Busy {
                    name: name.to_owned(),
                    seconds: wait.as_secs(),
                });
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Locks of every cluster in `names`, taken in sorted order so that two commands locking
    /// overlapping sets cannot wait on each other.
    pub async fn lock_all(
        &self,
        names: &[String],
        wait: Duration,
    ) -> Result<Vec<ClusterLock>, StateError> {
        let mut sorted: Vec<&String> = names.iter().collect();
        sorted.sort();
        sorted.dedup();
        let mut locks = Vec::with_capacity(sorted.len());
        for name in sorted {
            locks.push(self.lock(name, wait).await?);
        }
        Ok(locks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_cluster_lock_excludes_others_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path());
        let held = state.try_lock("demo").unwrap().expect("free at first");
        assert!(state.try_lock("demo").unwrap().is_none());
        assert!(state.try_lock("other").unwrap().is_some());
        let err = state
            .lock("demo", Duration::from_millis(250))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("demo"), "{err}");
        drop(held);
        assert!(state.lock("demo", Duration::from_millis(250)).await.is_ok());
    }
}

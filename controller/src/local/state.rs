//! Desired state of local clusters, kept between invocations and reboots: the spec as last
//! applied, the generated credentials and the current primary, one file per cluster (mode
//! 0600 in a 0700 directory). Docker stays the truth for what actually runs.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use pgbalancer_crd::{PgBalancerCluster, PgBalancerClusterStatus};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::credentials::Credentials;
use crate::plan::{instance_name, Plan};
use crate::reconcile::{ChangeKind, Record};

/// A state file that cannot be read or written.
#[derive(Debug, Error)]
pub enum StateError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A file that is not a state file.
    #[error("{path}: not a pgbalancer state file: {message}")]
    Format { path: String, message: String },
    /// Another command (or the controller) kept the cluster locked.
    #[error("cluster {name} is busy: another pgbalancer command held it for {seconds} s")]
    Busy { name: String, seconds: u64 },
}

/// What `up` stored about one cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCluster {
    /// The cluster as last applied.
    pub cluster: PgBalancerCluster,
    /// Generated credentials; created once, never replaced.
    pub credentials: Credentials,
    /// Ordinal of the instance known to be primary; absent until the first one was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_primary: Option<u32>,
    /// Ordinal of the instance that should be primary; differs from `currentPrimary` while a
    /// change of primary is in progress. (`primary` in files written by earlier versions.)
    #[serde(default, alias = "primary")]
    pub target_primary: u32,
    /// Seed JSON file the cluster came from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_file: Option<PathBuf>,
    /// The change of primary in progress was started by the controller because the primary
    /// was lost (a failover), not asked for.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub failing_over: bool,
    /// The last failover the controller started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<LastFailover>,
    /// Removed with `down --keep-data`: the controller leaves it alone until the next `up`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
    /// The cluster's conditions as the controller last computed them, kept for their
    /// transition times (the same conditions as a `PgBalancerCluster`'s status).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A failover the controller started: when, between which instances, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastFailover {
    /// When the new target was recorded (RFC 3339, UTC).
    pub at: String,
    /// The primary that was lost.
    pub from: String,
    /// The instance promoted in its place.
    pub to: String,
    /// What was seen, e.g. `primary demo-0 not running (exited) for 3.0 s`.
    pub reason: String,
}

impl LastFailover {
    /// The record of the failover the controller starts, as stored and shown by `status`:
    /// from the recorded primary to `record`'s target.
    pub fn new(plan: &Plan, record: &Record, reason: String, at: String) -> LastFailover {
        LastFailover {
            at,
            from: instance_name(&plan.cluster, record.current.unwrap_or(record.target)),
            to: instance_name(&plan.cluster, record.target),
            reason,
        }
    }
}

impl StoredCluster {
    /// The balancers' CA certificate (PEM) while TLS is on.
    pub fn tls_ca(&self) -> Option<&str> {
        (self.cluster.spec.balancer.tls.mode != pgbalancer_crd::TlsMode::Disabled)
            .then_some(self.credentials.balancer_tls.as_ref())
            .flatten()
            .map(|t| t.ca_cert.as_str())
    }

    /// The status the conditions were last computed into, for `status::compute` to keep
    /// their transition times.
    pub fn previous_status(&self) -> PgBalancerClusterStatus {
        PgBalancerClusterStatus {
            conditions: self.conditions.clone(),
            ..PgBalancerClusterStatus::default()
        }
    }

    /// The durable record of the primary.
    pub fn record(&self) -> Record {
        Record {
            current: self.current_primary,
            target: self.target_primary,
            kind: if self.failing_over {
                ChangeKind::Failover
            } else {
                ChangeKind::Switchover
            },
        }
    }

    /// Takes `record` as the record of the primary.
    pub fn set_record(&mut self, record: &Record) {
        self.current_primary = record.current;
        self.target_primary = record.target;
        self.failing_over = record.changing() && record.kind == ChangeKind::Failover;
    }

    /// The plan of this cluster, with the target primary as primary.
    pub fn plan(&self) -> crate::plan::Plan {
        let mut plan = crate::plan::Plan::new(&self.cluster, self.target_primary);
        plan.initialised = self.current_primary.is_some();
        plan
    }
}

/// The directory holding every cluster's state.
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// `$PGBALANCER_STATE_DIR`, else `$XDG_STATE_HOME/pgbalancer`, else `~/.local/state/pgbalancer`.
    pub fn from_env() -> Self {
        let root = std::env::var_os("PGBALANCER_STATE_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_STATE_HOME").map(|d| PathBuf::from(d).join("pgbalancer"))
            })
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/pgbalancer"))
            })
            .unwrap_or_else(|| PathBuf::from("/var/lib/pgbalancer"));
        Self { root }
    }

    /// A state directory at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Where the state lives.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn file(&self, name: &str) -> PathBuf {
        self.root.join("clusters").join(format!("{name}.yaml"))
    }

    /// Names of every stored cluster, sorted.
    pub fn names(&self) -> Result<Vec<String>, StateError> {
        let dir = self.root.join("clusters");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Io {
                    path: dir.display().to_string(),
                    source,
                })
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".yaml")
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// The stored cluster `name`, if any.
    pub fn load(&self, name: &str) -> Result<Option<StoredCluster>, StateError> {
        let path = self.file(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        serde_yaml::from_str(&text)
            .map(Some)
            .map_err(|e| StateError::Format {
                path: path.display().to_string(),
                message: e.to_string(),
            })
    }

    /// Writes `stored` atomically (temp file + rename), private to the user.
    pub fn save(&self, stored: &StoredCluster) -> Result<(), StateError> {
        let name = stored.cluster.metadata.name.clone().unwrap_or_default();
        let path = self.file(&name);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |source| StateError::Io { path: p, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        let text = serde_yaml::to_string(stored).map_err(|e| StateError::Format {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let tmp = path.with_extension("yaml.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        // The balancer's CA next to it, for clients to verify the balancer with.
        let ca = self.ca_file(&name);
        match stored.tls_ca() {
            Some(pem) => std::fs::write(&ca, pem).map_err(io(&ca)),
            None => match std::fs::remove_file(&ca) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&ca)(e)),
                _ => Ok(()),
            },
        }
    }

    /// The CA certificate of cluster `name`'s balancers, written while TLS is on.
    pub fn ca_file(&self, name: &str) -> PathBuf {
        self.root.join("clusters").join(format!("{name}-ca.crt"))
    }

    /// Forgets cluster `name`.
    pub fn remove(&self, name: &str) -> Result<(), StateError> {
        let _ = std::fs::remove_file(self.ca_file(name));
        let path = self.file(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn saved_state_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path());
        let cluster = pgbalancer_crd::parse_documents(
            "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {name: demo}\n",
        )
        .unwrap()
        .remove(0);
        let stored = StoredCluster {
            cluster,
            credentials: Credentials::generate(),
            current_primary: None,
            target_primary: 0,
            seed_file: None,
            failing_over: false,
            last_failover: None,
            stopped: false,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Running".into(),
                message: "every instance and balancer serves".into(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    "2026-11-30T05:00:00Z".parse().unwrap(),
                ),
                observed_generation: None,
            }],
        };
        state.save(&stored).unwrap();
        let back = state.load("demo").unwrap().unwrap();
        assert_eq!(back.credentials, stored.credentials);
        assert_eq!(back.conditions, stored.conditions);
        assert_eq!(back.cluster.spec, stored.cluster.spec);
        assert_eq!(state.names().unwrap(), ["demo"]);
        let mode = std::fs::metadata(state.file("demo"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        state.remove("demo").unwrap();
        assert!(state.load("demo").unwrap().is_none());
    }

    const OLD_FILE: &str = "cluster:\n  apiVersion: pgbalancer.io/v1alpha1\n  kind: PgBalancerCluster\n  metadata: {name: demo}\n  spec: {}\ncredentials:\n  superuser-password: s\n  replication-password: r\n  app-password: a\n  monitor-password: m\n  pcp-password: p\n  api-token: t\nprimary: 1\n";

    #[test]
    fn state_files_of_earlier_versions_load_with_no_failover_and_not_stopped() {
        let old: StoredCluster = serde_yaml::from_str(OLD_FILE).unwrap();
        assert_eq!(old.last_failover, None);
        assert!(!old.failing_over && !old.stopped);
        assert_eq!(
            old.record(),
            Record {
                current: None,
                target: 1,
                kind: ChangeKind::Switchover
            }
        );
        assert_eq!(old.record().kind, ChangeKind::Switchover);
        // Written back, nothing new appears until there is something to say.
        let text = serde_yaml::to_string(&old).unwrap();
        assert!(
            !text.contains("lastFailover") && !text.contains("failingOver"),
            "{text}"
        );
        assert!(!text.contains("stopped"), "{text}");
    }

    #[test]
    fn a_failover_in_progress_and_the_last_one_round_trip() {
        let mut stored: StoredCluster = serde_yaml::from_str(OLD_FILE).unwrap();
        let moving = Record {
            current: Some(1),
            target: 2,
            kind: ChangeKind::Failover,
        };
        stored.set_record(&moving);
        let last = LastFailover::new(
            &stored.plan(),
            &moving,
            "primary demo-1 not running (exited) for 3.0 s".into(),
            "2026-11-29T16:00:00Z".into(),
        );
        assert_eq!((last.from.as_str(), last.to.as_str()), ("demo-1", "demo-2"));
        stored.last_failover = Some(last);
        let text = serde_yaml::to_string(&stored).unwrap();
        assert!(text.contains("failingOver: true"), "{text}");
        assert!(text.contains("lastFailover:"), "{text}");
        let back: StoredCluster = serde_yaml::from_str(&text).unwrap();
        assert_eq!(back.record().kind, ChangeKind::Failover);
        assert_eq!(back.last_failover, stored.last_failover);
        // Once settled the kind is forgotten, the last failover kept.
        let mut settled = back;
        settled.set_record(&Record::settled(2));
        assert!(!settled.failing_over);
        assert!(settled.last_failover.is_some());
    }
}

//! The container of the local controller (`pgbalancer controller run`): one per state
//! directory on the engine, so clusters fail over and stay converged with no command running.
//!
//! `container_body` is pure; `ensure`, `remove` and `state` talk to the engine. The container
//! runs the `pgbalancer` binary shipped in the balancer image, on the host network (the
//! instances' ports are published on the host's loopback, which is how every command reaches
//! them), with the Docker socket and the state directory (at the same path) mounted. It
//! restarts with the engine like the instances, and is replaced when its image or settings
//! change.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use bollard::Docker;
use sha2::{Digest, Sha256};

use super::DockerError;
use crate::labels;

/// The Docker socket mounted into the controller, at the same path.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Component label value of the controller container.
pub const COMPONENT: &str = "controller";
/// Label holding the state directory a controller serves.
pub const STATE_DIR_LABEL: &str = "pgbalancer.io/state-dir";

/// Who the controller runs as, and which group opens the Docker socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// `uid:gid` of the state directory's owner, so the files the controller writes stay
    /// theirs.
    pub user: String,
    /// Group owning the Docker socket, when it is not the user's own.
    pub socket_group: Option<u32>,
}

impl RunAs {
    /// The owner of `state_root` and the group of the local Docker socket.
    pub fn of(state_root: &Path) -> std::io::Result<RunAs> {
        let dir = std::fs::metadata(state_root)?;
        let socket_group = std::fs::metadata(DOCKER_SOCKET)
            .ok()
            .map(|m| m.gid())
            .filter(|gid| *gid != dir.gid());
        Ok(RunAs {
            user: format!("{}:{}", dir.uid(), dir.gid()),
            socket_group,
        })
    }
}

/// The short hash naming the controller of `state_root`.
pub fn state_hash(state_root: &Path) -> String {
    let digest = Sha256::digest(state_root.as_os_str().as_encoded_bytes());
    hex::encode(digest)[..8].to_owned()
}

/// Name of the controller container of `state_root`.
pub fn container_name(state_root: &Path) -> String {
    format!("pgbalancer-controller-{}", state_hash(state_root))
}

/// The controller container for the (absolute) state directory `state_root`, running
/// `image`. Labelled with a hash of everything else, so a changed body replaces it.
pub fn container_body(image: &str, state_root: &Path, run_as: &RunAs) -> ContainerCreateBody {
    let root = state_root.display().to_string();
    let labels: HashMap<String, String> = HashMap::from([
        (labels::NAME.to_owned(), labels::APP.to_owned()),
        (labels::MANAGED_BY.to_owned(), labels::MANAGER.to_owned()),
        (labels::COMPONENT.to_owned(), COMPONENT.to_owned()),
        (STATE_DIR_LABEL.to_owned(), root.clone()),
    ]);
    let mut body = ContainerCreateBody {
        image: Some(image.to_owned()),
        entrypoint: Some(vec!["/usr/local/bin/pgbalancer".into()]),
        cmd: Some(vec!["controller".into(), "run".into()]),
        // Whoever may use the Docker socket is root on the host anyway: the socket, not the
        // user, is what this container is trusted with. It runs as the state directory's
        // owner (root when root owns it) so the files it rewrites keep their owner.
        user: Some(run_as.user.clone()),
        env: Some(vec![
            format!("PGBALANCER_STATE_DIR={root}"),
            "RUST_LOG=warn,pgbalancer_controller=info".into(),
        ]),
        labels: Some(labels),
        stop_timeout: Some(10),
        host_config: Some(HostConfig {
            // The instances and balancers publish their ports on the host's loopback.
            network_mode: Some("host".into()),
            binds: Some(vec![
                format!("{DOCKER_SOCKET}:{DOCKER_SOCKET}"),
                format!("{root}:{root}"),
            ]),
            group_add: run_as.socket_group.map(|gid| vec![gid.to_string()]),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                maximum_retry_count: None,
            }),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            // It runs for months: keep its log bounded.
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), "10m".to_owned()),
                    ("max-file".to_owned(), "3".to_owned()),
                ])),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let hash = settings_hash(&body);
    if let Some(l) = body.labels.as_mut() {
        l.insert(labels::CONFIG_HASH.to_owned(), hash);
    }
    body
}

/// Hash of what the controller is made of, in a fixed order (labels sorted).
fn settings_hash(body: &ContainerCreateBody) -> String {
    let mut labels: Vec<_> = body.labels.iter().flatten().collect();
    labels.sort();
    let host = body.host_config.as_ref();
    let parts = format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{labels:?}|{:?}|{:?}|{:?}",
        body.image,
        body.entrypoint,
        body.cmd,
        body.user,
        body.env,
        host.and_then(|h| h.network_mode.as_ref()),
        host.and_then(|h| h.binds.as_ref()),
        host.and_then(|h| h.group_add.as_ref()),
    );
    hex::encode(Sha256::digest(parts.as_bytes()))
}

/// What `ensure` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ensured {
    /// It was running as wanted.
    Running,
    /// It existed, stopped, and was started.
    Started,
    /// It was created.
    Created,
    /// It ran another image or other settings and was replaced.
    Replaced,
}

/// Makes the controller of `state_root` run `image`: created when missing, started when
/// stopped, replaced when its image was rebuilt or its settings changed.
pub async fn ensure(
    docker: &Docker,
    image: &str,
    state_root: &Path,
    run_as: &RunAs,
) -> Result<Ensured, DockerError> {
    let name = container_name(state_root);
    let body = container_body(image, state_root, run_as);
    let wanted_hash = body
        .labels
        .as_ref()
        .and_then(|l| l.get(labels::CONFIG_HASH))
        .cloned();
    let current_image = docker.inspect_image(image).await.ok().and_then(|i| i.id);
    let outcome = match docker.inspect_container(&name, None).await {
        Ok(existing) => {
            let hash = existing
                .config
                .as_ref()
                .and_then(|c| c.labels.as_ref())
                .and_then(|l| l.get(labels::CONFIG_HASH))
                .cloned();
            let same_image = match (&current_image, &existing.image) {
                (Some(current), Some(running)) => current == running,
                _ => true,
            };
            if hash == wanted_hash && same_image {
                let running = existing
                    .state
                    .as_ref()
                    .and_then(|s| s.running)
                    .unwrap_or(false);
                if running {
                    return Ok(Ensured::Running);
                }
                Ensured::Started
            } else {
                remove_by_name(docker, &name).await?;
                create(docker, &name, body).await?;
                Ensured::Replaced
            }
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {
            create(docker, &name, body).await?;
            Ensured::Created
        }
        Err(e) => return Err(DockerError::api(format!("inspect container {name}"))(e)),
    };
    match docker.start_container(&name, None).await {
        // 304: another command started it meanwhile.
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(outcome),
        Err(e) => Err(DockerError::api(format!("start container {name}"))(e)),
    }
}

async fn create(docker: &Docker, name: &str, body: ContainerCreateBody) -> Result<(), DockerError> {
    match docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.to_owned()),
                ..Default::default()
            }),
            body,
        )
        .await
    {
        // 409: another command created it meanwhile; it is started below all the same.
        Ok(_)
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 409, ..
        }) => Ok(()),
        Err(e) => Err(DockerError::api(format!("create container {name}"))(e)),
    }
}

async fn remove_by_name(docker: &Docker, name: &str) -> Result<bool, DockerError> {
    match docker
        .remove_container(
            name,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
    {
        Ok(()) => Ok(true),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(e) => Err(DockerError::api(format!("remove container {name}"))(e)),
    }
}

/// Removes the controller of `state_root`; whether there was one.
pub async fn remove(docker: &Docker, state_root: &Path) -> Result<bool, DockerError> {
    remove_by_name(docker, &container_name(state_root)).await
}

/// The controller's engine state: `running`, `exited`, `restarting`…, or `missing`.
pub async fn state(docker: &Docker, state_root: &Path) -> String {
    match docker
        .inspect_container(&container_name(state_root), None)
        .await
    {
        Ok(c) => c
            .state
            .and_then(|s| s.status)
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unknown".into()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => "missing".into(),
        Err(_) => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_as() -> RunAs {
        RunAs {
            user: "1000:1000".into(),
            socket_group: Some(998),
        }
    }

    #[test]
    fn one_controller_per_state_directory_with_the_socket_and_the_state_at_the_same_path() {
        let root = Path::new("/home/u/.local/state/pgbalancer");
        let body = container_body("pgbalancer/balancer:0.1.0", root, &run_as());
        let host = body.host_config.as_ref().unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("host"));
        assert_eq!(
            host.binds.as_ref().unwrap(),
            &[
                "/var/run/docker.sock:/var/run/docker.sock".to_owned(),
                format!("{0}:{0}", root.display())
            ]
        );
        assert_eq!(host.group_add.as_ref().unwrap(), &["998"]);
        assert_eq!(host.cap_drop.as_ref().unwrap(), &["ALL"]);
        assert_eq!(
            host.restart_policy.as_ref().unwrap().name,
            Some(RestartPolicyNameEnum::UNLESS_STOPPED)
        );
        assert_eq!(body.user.as_deref(), Some("1000:1000"));
        assert!(body
            .env
            .as_ref()
            .unwrap()
            .contains(&format!("PGBALANCER_STATE_DIR={}", root.display())));
        let labels = body.labels.as_ref().unwrap();
        assert_eq!(labels[labels::COMPONENT], COMPONENT);
        assert_eq!(labels[STATE_DIR_LABEL], root.display().to_string());
        assert!(
            !labels.contains_key(labels::INSTANCE),
            "not part of a cluster"
        );

        let other = Path::new("/tmp/x/state");
        assert_ne!(container_name(root), container_name(other));
        assert_eq!(container_name(root), container_name(root));
        assert_eq!(
            container_name(root).len(),
            "pgbalancer-controller-".len() + 8
        );
    }

    #[test]
    fn the_config_hash_follows_the_settings() {
        let root = Path::new("/s");
        let hash =
            |body: &ContainerCreateBody| body.labels.as_ref().unwrap()[labels::CONFIG_HASH].clone();
        let a = container_body("img:1", root, &run_as());
        assert_eq!(hash(&a), hash(&container_body("img:1", root, &run_as())));
        assert_ne!(hash(&a), hash(&container_body("img:2", root, &run_as())));
        let root_user = RunAs {
            user: "0:0".into(),
            socket_group: None,
        };
        assert_ne!(hash(&a), hash(&container_body("img:1", root, &root_user)));
    }
}

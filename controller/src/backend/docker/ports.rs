//! Host ports that stay put. A published port left to Docker (no host port given) gets a new
//! ephemeral port every time its container starts, so a balancer restarted by its restart
//! policy or by the engine would move, and every client's connection string with it. Before a
//! container is created, each such port is fixed: to the port the container it replaces had,
//! or to one that is free now (the controller runs on the host network, so "free" means free
//! on the host).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, TcpListener};

use bollard::models::{ContainerCreateBody, ContainerInspectResponse};

/// Published ports of a container as it was: `"5432/tcp"` → host port.
pub type HostPorts = HashMap<String, u16>;

/// The host ports `container` publishes (running) or was created with (stopped).
pub fn of(container: &ContainerInspectResponse) -> HostPorts {
    let running = container
        .network_settings
        .as_ref()
        .and_then(|n| n.ports.as_ref());
    let created = container
        .host_config
        .as_ref()
        .and_then(|h| h.port_bindings.as_ref());
    let mut ports = HostPorts::new();
    for map in [created, running].into_iter().flatten() {
        for (private, bindings) in map {
            let host = bindings
                .iter()
                .flatten()
                .find_map(|b| b.host_port.as_deref()?.parse::<u16>().ok())
                .filter(|p| *p != 0);
            if let Some(port) = host {
                ports.insert(private.clone(), port);
            }
        }
    }
    ports
}

/// Gives every published port of `body` without a host port the one in `previous`, else a
/// port free on its host address now.
pub fn pin(body: &mut ContainerCreateBody, previous: &HostPorts) -> std::io::Result<()> {
    let Some(bindings) = body
        .host_config
        .as_mut()
        .and_then(|h| h.port_bindings.as_mut())
    else {
        return Ok(());
    };
    for (private, list) in bindings.iter_mut() {
        for binding in list.iter_mut().flatten() {
            if binding.host_port.as_deref().is_some_and(|p| !p.is_empty()) {
                continue;
            }
            let port = match previous.get(private) {
                Some(port) => *port,
                None => free_port(binding.host_ip.as_deref())?,
            };
            binding.host_port = Some(port.to_string());
        }
    }
    Ok(())
}

/// A TCP port nobody listens on at `ip` (loopback when unset) right now.
fn free_port(ip: Option<&str>) -> std::io::Result<u16> {
    let ip: IpAddr = ip
        .and_then(|ip| ip.parse().ok())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{HostConfig, PortBinding};

    fn body(host_port: &str) -> ContainerCreateBody {
        ContainerCreateBody {
            host_config: Some(HostConfig {
                port_bindings: Some(HashMap::from([(
                    "9999/tcp".to_owned(),
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".into()),
                        host_port: Some(host_port.into()),
                    }]),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn port_of(body: &ContainerCreateBody) -> String {
        body.host_config
            .as_ref()
            .unwrap()
            .port_bindings
            .as_ref()
            .unwrap()["9999/tcp"]
            .as_ref()
            .unwrap()[0]
            .host_port
            .clone()
            .unwrap()
    }

    #[test]
    fn an_unset_port_gets_the_previous_one_else_a_free_one_and_a_set_one_stays() {
        let mut b = body("");
        pin(&mut b, &HostPorts::from([("9999/tcp".to_owned(), 40123)])).unwrap();
        assert_eq!(port_of(&b), "40123");

        let mut b = body("");
        pin(&mut b, &HostPorts::new()).unwrap();
        let port: u16 = port_of(&b).parse().unwrap();
        assert_ne!(port, 0);
        // It was free: it can be bound now.
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());

        let mut b = body("15432");
        pin(&mut b, &HostPorts::from([("9999/tcp".to_owned(), 40123)])).unwrap();
        assert_eq!(port_of(&b), "15432");
    }

    #[test]
    fn ports_are_read_from_what_the_container_was_created_with() {
        let inspected = ContainerInspectResponse {
            host_config: body("40999").host_config,
            ..Default::default()
        };
        assert_eq!(of(&inspected).get("9999/tcp"), Some(&40999));
        let unset = ContainerInspectResponse {
            host_config: body("").host_config,
            ..Default::default()
        };
        assert!(of(&unset).is_empty());
    }
}

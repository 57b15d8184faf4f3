//! Commands run inside a container through the engine's exec API (PCP tools in the balancer).

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::Docker;
use futures::StreamExt;

use super::error::DockerError;

/// Runs `cmd` in `container`; its output on success, an error with the output otherwise.
pub async fn run(docker: &Docker, container: &str, cmd: &[&str]) -> Result<String, DockerError> {
    let command = cmd.join(" ");
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions {
                cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .map_err(DockerError::api(format!("exec `{command}` in {container}")))?;
    let mut output = String::new();
    if let StartExecResults::Attached {
        output: mut stream, ..
    } = docker
        .start_exec(&exec.id, None)
        .await
        .map_err(DockerError::api(format!("exec `{command}` in {container}")))?
    {
        while let Some(chunk) = stream.next().await {
            if let Ok(chunk) = chunk {
                output.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            }
        }
    }
    let code = docker
        .inspect_exec(&exec.id)
        .await
        .map_err(DockerError::api(format!("inspect exec in {container}")))?
        .exit_code
        .unwrap_or(-1);
    if code != 0 {
        return Err(DockerError::Exec {
            container: container.to_owned(),
            command,
            code,
            output: output.trim().to_owned(),
        });
    }
    Ok(output)
}

//! Why an instance's last start failed, in the entrypoint's own words, read from the tail of
//! its container log: shown next to an instance that does not accept connections (`status`,
//! and `up`'s progress and timeout), so a start the entrypoint refuses (data made by another
//! cluster, no role given) is named where the user looks instead of only "not running".

use std::time::Duration;

use bollard::query_parameters::LogsOptionsBuilder;
use bollard::Docker;
use futures::StreamExt;

/// How the entrypoint's lines start, and how its refusal to start goes on.
const ENTRYPOINT: &str = "pgbalancer-postgres: ";
const REFUSAL: &str = "cannot start: ";

/// The refusal that ended the container's last start, when the entrypoint's last line in
/// its log is one (a later start that got further says something else last).
pub(super) async fn start_failure(docker: &Docker, container: &str) -> Option<String> {
    let options = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .tail("200")
        .build();
    let read = async {
        let mut text = String::new();
        let mut logs = docker.logs(container, Some(options));
        while let Some(Ok(chunk)) = logs.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        text
    };
    let text = tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()?;
    refusal(&text)
}

/// The refusal in the entrypoint's last line of `log`, if that line is one.
fn refusal(log: &str) -> Option<String> {
    let last = log
        .lines()
        .rev()
        .find_map(|line| line.trim_end().strip_prefix(ENTRYPOINT))?;
    last.strip_prefix(REFUSAL).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::refusal;

    #[test]
    fn the_entrypoints_last_line_counts() {
        let failed = "pgbalancer-postgres: role: replica\n\
                      pgbalancer-postgres: cannot start: the data directory belongs to another system\n";
        assert_eq!(
            refusal(failed).as_deref(),
            Some("the data directory belongs to another system")
        );
        // Server lines after it do not hide it.
        let with_server = format!("{failed}2026-12-02 LOG:  database system is shut down\n");
        assert!(refusal(&with_server).is_some());
        // A later start that got further says something else last.
        let later = format!("{failed}pgbalancer-postgres: role: replica\n");
        assert_eq!(refusal(&later), None);
        assert_eq!(refusal("LOG:  database system is ready\n"), None);
        assert_eq!(refusal(""), None);
    }
}

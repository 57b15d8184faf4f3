//! `bctl`: pgBalancer's command-line client for the agent's REST API.
//!
//! Commands as pgBalancer's (`status`, `nodes [ID]`, `nodes-attach ID`, …) plus the spaced
//! forms its documentation shows (`nodes list`, `nodes info ID`, `nodes attach ID`). Global
//! options go anywhere. Exit 0 on success, 1 with a readable message otherwise.

mod format;

use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

/// pgBalancer control.
#[derive(Parser, Debug)]
#[command(
    name = "bctl",
    version,
    about = "pgBalancer control: status and nodes of a balancer"
)]
pub struct Bctl {
    /// Agent host.
    #[arg(
        short = 'H',
        long,
        global = true,
        env = "BCTL_HOST",
        default_value = "localhost"
    )]
    host: String,
    /// Agent REST port.
    #[arg(
        short = 'p',
        long,
        global = true,
        env = "BCTL_PORT",
        default_value_t = 8080
    )]
    port: u16,
    /// Accepted for compatibility with pgBalancer's bctl; the API uses a bearer token.
    #[arg(short = 'U', long, global = true)]
    username: Option<String>,
    /// Bearer token for changes (default: read from --token-file).
    #[arg(long, global = true, env = "PGBALANCER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token (present inside the balancer container).
    #[arg(
        long,
        global = true,
        default_value = "/etc/pgbalancer/secrets/api-token"
    )]
    token_file: String,
    /// Print the JSON the API returned.
    #[arg(short = 'j', long, global = true)]
    json: bool,
    /// Print tables.
    #[arg(short = 't', long, global = true)]
    table: bool,
    /// Print each request.
    #[arg(short = 'v', long, global = true)]
    verbose: bool,
    /// Print nothing on success.
    #[arg(short = 'q', long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Balancer status.
    Status,
    /// Nodes: `nodes`, `nodes ID`, `nodes list`, `nodes info ID`, `nodes attach|detach ID`, `nodes count`.
    Nodes {
        /// Sub-command and node id.
        args: Vec<String>,
    },
    /// Attach node ID.
    #[command(name = "nodes-attach")]
    NodesAttach { id: String },
    /// Detach node ID.
    #[command(name = "nodes-detach")]
    NodesDetach { id: String },
    /// Number of nodes.
    #[command(name = "nodes-count")]
    NodesCount,
    /// Reload pgpool's configuration.
    Reload,
    /// Health checks and statistics.
    Health,
    /// Pool processes.
    Processes,
}

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum BctlError {
    /// The API answered with an error status.
    #[error("{method} {path} failed (HTTP {code}): {message}")]
    Http {
        method: String,
        path: String,
        code: u16,
        message: String,
    },
    /// No answer.
    #[error("cannot reach the agent at {url}: {message}")]
    Connect { url: String, message: String },
    /// Wrong usage.
    #[error("{0}")]
    Usage(String),
    /// No `--token` and the token file cannot be read.
    #[error("cannot read the token file {path}: {message}")]
    Token { path: String, message: String },
}

enum Request {
    Get(String),
    Post(String),
}

impl Bctl {
    fn base(&self) -> String {
        format!("http://{}:{}/api/v1", self.host, self.port)
    }

    /// `--token`, or else the contents of `--token-file`. No such file (outside a balancer
    /// container, where the default path exists) means no token: the agent then answers 401
    /// and says so. A file that exists but cannot be read is an error naming it.
    fn token(&self) -> Result<String, BctlError> {
        let token = match &self.token {
            Some(token) => token.clone(),
            None => match std::fs::read_to_string(&self.token_file) {
                Ok(token) => token,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => {
                    return Err(BctlError::Token {
                        path: self.token_file.clone(),
                        message: e.to_string(),
                    })
                }
            },
        };
        Ok(token.trim().to_owned())
    }

    fn send(&self, request: Request) -> Result<Value, BctlError> {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .build();
        let (method, path) = match &request {
            Request::Get(p) => ("GET", p.clone()),
            Request::Post(p) => ("POST", p.clone()),
        };
        let url = format!("{}{path}", self.base());
        if self.verbose {
            eprintln!("{method} {url}");
        }
        let response = match request {
            Request::Get(_) => agent.get(&url).call(),
            Request::Post(_) => agent
                .post(&url)
                .set("Authorization", &format!("Bearer {}", self.token()?))
                .call(),
        };
        match response {
            Ok(r) => r.into_json().map_err(|e| BctlError::Connect {
                url,
                message: format!("invalid JSON: {e}"),
            }),
            Err(ureq::Error::Status(code, r)) => {
                let body: Value = r.into_json().unwrap_or(Value::Null);
                let message = body["error"]
                    .as_str()
                    .unwrap_or("no error message")
                    .to_owned();
                Err(BctlError::Http {
                    method: method.into(),
                    path,
                    code,
                    message,
                })
            }
            Err(e) => Err(BctlError::Connect {
                url: format!("http://{}:{}", self.host, self.port),
                message: e.to_string(),
            }),
        }
    }

    /// Runs the command; the text to print.
    pub fn run(&self) -> Result<String, BctlError> {
        let (value, render): (Value, fn(&Value, bool) -> String) = match &self.command {
            Command::Status => (self.send(Request::Get("/status".into()))?, format::status),
            Command::Nodes { args } => match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
                [] | ["list"] => (self.send(Request::Get("/nodes".into()))?, format::nodes),
                ["count"] => (self.send(Request::Get("/nodes".into()))?, format::count),
                ["info", id] | [id] if !matches!(*id, "attach" | "detach" | "info") => {
                    (self.send(Request::Get(format!("/nodes/{id}")))?, format::node)
                }
                ["attach", id] => (self.send(Request::Post(format!("/nodes/{id}/attach")))?, format::message),
                ["detach", id] => (self.send(Request::Post(format!("/nodes/{id}/detach")))?, format::message),
                other => {
                    return Err(BctlError::Usage(format!(
                        "unknown nodes command `{}`; use nodes [list|count|ID|info ID|attach ID|detach ID]",
                        other.join(" ")
                    )))
                }
            },
            Command::NodesAttach { id } => (self.send(Request::Post(format!("/nodes/{id}/attach")))?, format::message),
            Command::NodesDetach { id } => (self.send(Request::Post(format!("/nodes/{id}/detach")))?, format::message),
            Command::NodesCount => (self.send(Request::Get("/nodes".into()))?, format::count),
            Command::Reload => (self.send(Request::Post("/control/reload".into()))?, format::message),
            Command::Health => (self.send(Request::Get("/health/stats".into()))?, format::health),
            Command::Processes => (self.send(Request::Get("/processes".into()))?, format::processes),
        };
        if self.quiet {
            return Ok(String::new());
        }
        if self.json {
            return Ok(serde_json::to_string_pretty(&value).unwrap_or_default() + "\n");
        }
        Ok(render(&value, self.table))
    }
}

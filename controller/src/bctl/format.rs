//! Plain and table renderings of the API's JSON for `bctl`. Pure.
//!
//! `let _ = write!(…)` throughout: writing to a `String` cannot fail.

use std::fmt::Write;

use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `bctl status`.
pub fn status(v: &Value, _table: bool) -> String {
    let mut out = format!(
        "Status: {}\nUptime: {} seconds\n",
        s(&v["status"]),
        s(&v["uptime"])
    );
    if v.get("error").is_some() {
        let _ = writeln!(out, "Error: {}", s(&v["error"]));
        return out;
    }
    let _ = write!(
        out,
        "Version: {}\nActive Connections: {}\nTotal Nodes: {}\nHealthy Nodes: {}\n",
        s(&v["version"]),
        s(&v["connections"]),
        s(&v["nodes"]),
        s(&v["healthy_nodes"])
    );
    out
}

const COLUMNS: [&str; 7] = ["ID", "Host", "Port", "Status", "Weight", "Role", "Rep Lag"];

fn row(n: &Value) -> [String; 7] {
    [
        s(&n["id"]),
        s(&n["host"]),
        s(&n["port"]),
        s(&n["status"]),
        s(&n["weight"]),
        s(&n["role"]),
        s(&n["replication_lag"]),
    ]
}

fn table(rows: &[[String; 7]]) -> String {
    let mut widths = COLUMNS.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |l: &str, m: &str, r: &str| {
        let parts: Vec<String> = widths.iter().map(|w| "─".repeat(w + 2)).collect();
        format!("{l}{}{r}\n", parts.join(m))
    };
    let cells = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!(" {c:<w$} "))
            .collect();
        format!("│{}│\n", parts.join("│"))
    };
    let mut out = line("┌", "┬", "┐");
    out.push_str(&cells(&COLUMNS.map(String::from)));
    out.push_str(&line("├", "┼", "┤"));
    for r in rows {
        out.push_str(&cells(r));
    }
    out.push_str(&line("└", "┴", "┘"));
    out
}

/// `bctl nodes`.
pub fn nodes(v: &Value, as_table: bool) -> String {
    let rows: Vec<[String; 7]> = v["nodes"]
        .as_array()
        .map(|a| a.iter().map(row).collect())
        .unwrap_or_default();
    if as_table {
        return table(&rows);
    }
    rows.iter()
        .map(|r| {
            format!(
                "Node {}: {}:{} {} {} weight {} lag {}\n",
                r[0], r[1], r[2], r[3], r[5], r[4], r[6]
            )
        })
        .collect()
}

/// `bctl nodes ID` / `nodes info ID`.
pub fn node(v: &Value, as_table: bool) -> String {
    if as_table {
        return table(&[row(v)]);
    }
    let mut out = String::new();
    for key in [
        "id",
        "host",
        "port",
        "status",
        "role",
        "weight",
        "replication_lag",
        "replication_state",
        "select_count",
        "last_status_change",
    ] {
        let _ = writeln!(out, "{key}: {}", s(&v[key]));
    }
    out
}

/// `bctl nodes-count`.
pub fn count(v: &Value, _table: bool) -> String {
    format!("{}\n", v["nodes"].as_array().map(Vec::len).unwrap_or(0))
}

/// Messages of changes.
pub fn message(v: &Value, _table: bool) -> String {
    format!("{}\n", s(&v["message"]))
}

/// `bctl health`.
pub fn health(v: &Value, _table: bool) -> String {
    let mut out = format!("Health: {}\n", s(&v["health"]));
    for section in ["checks", "stats"] {
        if let Some(map) = v[section].as_object() {
            for (k, val) in map {
                let _ = writeln!(out, "  {k}: {}", s(val));
            }
        }
    }
    out
}

/// `bctl processes`.
pub fn processes(v: &Value, _table: bool) -> String {
    v["processes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| format!("{} {}\n", s(&p["pid"]), s(&p["status"])))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nodes_table_has_the_pgbalancer_columns() {
        let v = json!({"nodes": [{"id": 0, "host": "db-0", "port": 5432, "status": "up", "weight": 0.5, "role": "primary", "replication_lag": 0}]});
        let t = nodes(&v, true);
        assert!(
            t.contains("│ ID │ Host │ Port │ Status │ Weight │ Role    │ Rep Lag │"),
            "{t}"
        );
        assert!(
            t.contains("│ 0  │ db-0 │ 5432 │ up     │ 0.5    │ primary │ 0       │"),
            "{t}"
        );
        assert_eq!(count(&v, false), "1\n");
    }

    #[test]
    fn status_prints_the_pgbalancer_lines() {
        let v = json!({"status": "running", "uptime": 5, "version": "4.6.1", "connections": 1, "nodes": 3, "healthy_nodes": 3});
        assert_eq!(
            status(&v, false),
            "Status: running\nUptime: 5 seconds\nVersion: 4.6.1\nActive Connections: 1\nTotal Nodes: 3\nHealthy Nodes: 3\n"
        );
    }
}

//! Parsing of local cluster files: one or more YAML documents, each a `PgBalancerCluster`.
//!
//! Errors name the document and the field path (`spec.postgres.verison: unknown field`), so a
//! user can find the mistake without reading serde's output.

use kube::core::ObjectMeta;
use serde::Deserialize;
use thiserror::Error;

use crate::{PgBalancerCluster, PgBalancerClusterSpec, API_VERSION, KIND};

/// A document of a cluster file that could not be read as a `PgBalancerCluster`.
#[derive(Debug, Error, PartialEq)]
pub enum DocumentError {
    /// Not YAML at all.
    #[error("document {doc}: invalid YAML: {message}")]
    Yaml { doc: usize, message: String },
    /// A field that does not exist or has the wrong type.
    #[error("document {doc}: {path}: {message}")]
    Field {
        doc: usize,
        path: String,
        message: String,
    },
    /// The file holds no document.
    #[error("no PgBalancerCluster document found")]
    Empty,
}

const TOP_LEVEL_KEYS: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];

/// Parses every non-empty YAML document of `text` into a `PgBalancerCluster`.
pub fn parse_documents(text: &str) -> Result<Vec<PgBalancerCluster>, DocumentError> {
    let mut out = Vec::new();
    for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = index + 1;
        let value = serde_yaml::Value::deserialize(de).map_err(|e| DocumentError::Yaml {
            doc,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        out.push(parse_one(doc, value)?);
    }
    if out.is_empty() {
        return Err(DocumentError::Empty);
    }
    Ok(out)
}

fn field(doc: usize, path: &str, message: impl Into<String>) -> DocumentError {
    DocumentError::Field {
        doc,
        path: path.into(),
        message: message.into(),
    }
}

fn parse_one(doc: usize, value: serde_yaml::Value) -> Result<PgBalancerCluster, DocumentError> {
    let map = value.as_mapping().ok_or_else(|| {
        field(
            doc,
            "(document)",
            "expected a mapping with apiVersion, kind, metadata and spec",
        )
    })?;
    for key in map.keys() {
        let key = key.as_str().unwrap_or("");
        if !TOP_LEVEL_KEYS.contains(&key) {
            return Err(field(
                doc,
                key,
                "unknown field (expected apiVersion, kind, metadata, spec)",
            ));
        }
    }
    let text = |k: &str| map.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    match text("apiVersion") {
        Some(v) if v == API_VERSION => {}
        Some(v) => {
            return Err(field(
                doc,
                "apiVersion",
                format!("`{v}` is not supported, use `{API_VERSION}`"),
            ))
        }
        None => {
            return Err(field(
                doc,
                "apiVersion",
                format!("missing, use `{API_VERSION}`"),
            ))
        }
    }
    match text("kind") {
        Some(k) if k == KIND => {}
        Some(k) => {
            return Err(field(
                doc,
                "kind",
                format!("`{k}` is not supported, use `{KIND}`"),
            ))
        }
        None => return Err(field(doc, "kind", format!("missing, use `{KIND}`"))),
    }
    let metadata: ObjectMeta = typed(doc, "metadata", map.get("metadata").cloned())?;
    if metadata.name.as_deref().unwrap_or("").is_empty() {
        return Err(field(doc, "metadata.name", "missing"));
    }
    let spec: PgBalancerClusterSpec = typed(
        doc,
        "spec",
        Some(
            map.get("spec")
                .cloned()
                .unwrap_or(serde_yaml::Value::Mapping(Default::default())),
        ),
    )?;
    let mut cluster = PgBalancerCluster::new(metadata.name.as_deref().unwrap_or_default(), spec);
    cluster.metadata = metadata;
    Ok(cluster)
}

fn typed<T: serde::de::DeserializeOwned>(
    doc: usize,
    prefix: &str,
    value: Option<serde_yaml::Value>,
) -> Result<T, DocumentError> {
    let value = value.ok_or_else(|| field(doc, prefix, "missing"))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." || inner.is_empty() {
            prefix.to_owned()
        } else {
            format!("{prefix}.{inner}")
        };
        field(doc, &path, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {name: demo}\n";

    #[test]
    fn minimal_document_gets_defaults() {
        let c = &parse_documents(MINIMAL).unwrap()[0];
        assert_eq!(c.spec.replicas, 2);
        assert_eq!(c.spec.postgres.version, 17);
        assert_eq!(c.spec.balancer.num_init_children, 32);
        assert!(c.spec.balancer.load_balance_mode);
    }

    #[test]
    fn several_documents_are_read_in_order() {
        let text = format!("{MINIMAL}---\n{}", MINIMAL.replace("demo", "other"));
        let names: Vec<_> = parse_documents(&text)
            .unwrap()
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect();
        assert_eq!(names, ["demo", "other"]);
    }

    #[test]
    fn unknown_spec_field_is_named_with_its_path() {
        let text = format!("{MINIMAL}spec:\n  postgres:\n    verison: 16\n");
        let err = parse_documents(&text).unwrap_err().to_string();
        assert!(err.contains("spec.postgres"), "{err}");
        assert!(err.contains("verison"), "{err}");
    }

    #[test]
    fn negative_number_for_unsigned_field_is_named() {
        let text = format!("{MINIMAL}spec:\n  balancer:\n    maxPool: -1\n");
        let err = parse_documents(&text).unwrap_err().to_string();
        assert!(err.contains("spec.balancer.maxPool"), "{err}");
    }

    #[test]
    fn wrong_kind_and_invalid_yaml_are_refused() {
        let err = parse_documents(&MINIMAL.replace("PgBalancerCluster", "Deployment")).unwrap_err();
        assert!(err.to_string().contains("kind"));
        assert!(matches!(
            parse_documents("a: [b"),
            Err(DocumentError::Yaml { .. })
        ));
        assert_eq!(parse_documents("\n"), Err(DocumentError::Empty));
    }
}

//! Generated and hand-written manifests stay in step: the CRD in `manifests/` and in the chart
//! is what `pgbalancer crd` prints, and the chart's template renders (with its default values)
//! to the same objects as `manifests/operator.yaml`.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn docs(text: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect()
}

#[test]
fn crd_files_match_the_generated_crd() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgbalancer"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        read("manifests/crd.yaml"),
        generated,
        "manifests/crd.yaml drifted: run `pgbalancer crd > manifests/crd.yaml`"
    );
    assert_eq!(
        read("charts/pgbalancer-operator/crds/crd.yaml"),
        generated,
        "the chart's CRD drifted: run `pgbalancer crd > charts/pgbalancer-operator/crds/crd.yaml`"
    );
    let crd = &docs(&generated)[0];
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "pgbc");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(
        version["subresources"]["scale"]["specReplicasPath"],
        ".spec.replicas"
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Replicas", "Ready", "Primary", "Phase", "Age"]);
}

/// Renders the chart's simple `{{ .Values.a.b }}` / `{{ .Release.Namespace }}` placeholders.
fn render(template: &str, values: &serde_yaml::Value, namespace: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("unclosed placeholder") + start;
        let expr = rest[start + 2..end].trim();
        let value = if expr == ".Release.Namespace" {
            namespace.to_owned()
        } else {
            let path = expr
                .strip_prefix(".Values.")
                .unwrap_or_else(|| panic!("unsupported placeholder {expr}"));
            let v = path.split('.').fold(values, |v, k| &v[k]);
            match v {
                serde_yaml::Value::String(s) => s.clone(),
                serde_yaml::Value::Number(n) => n.to_string(),
                other => panic!("value {path} is {other:?}"),
            }
        };
        out.push_str(&value);
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

#[test]
fn chart_renders_the_same_operator_as_the_manifests() {
    let values: serde_yaml::Value =
        serde_yaml::from_str(&read("charts/pgbalancer-operator/values.yaml")).unwrap();
    let rendered = render(
        &read("charts/pgbalancer-operator/templates/operator.yaml"),
        &values,
        "pgbalancer-system",
    );
    let manifests: Vec<_> = docs(&read("manifests/operator.yaml"))
        .into_iter()
        .filter(|d| d["kind"] != "Namespace")
        .collect();
    assert_eq!(docs(&rendered), manifests);
}

#[test]
fn operator_runs_unprivileged() {
    let deployment = docs(&read("manifests/operator.yaml"))
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0]["securityContext"];
    assert_eq!(container["allowPrivilegeEscalation"], false);
    assert_eq!(container["capabilities"]["drop"][0], "ALL");
}

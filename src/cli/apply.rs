//! `previewd apply -f FILE|-`: create or update every object of a manifest.
//!
//! The manifest owns `spec`: fields removed from the file are removed on the server (sent as
//! `null` in a merge patch), while metadata merges, so labels and annotations that others
//! (e.g. kubectl's last-applied annotation) set are kept.

use http::Request;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{CliError, Connection, display_name, url};
use crate::store::kinds::{self, Kind};

/// Applies every document of `manifest`; returns one kubectl-style line per object
/// (`previewlink.previewd.dev/web created|configured|unchanged`).
pub async fn apply(conn: &Connection, manifest: &str) -> Result<Vec<String>, CliError> {
    let mut lines = Vec::new();
    for doc in parse_manifest(manifest)? {
        lines.push(apply_one(conn, doc).await?);
    }
    Ok(lines)
}

/// Splits a multi-document YAML stream into objects (empty documents are skipped).
pub fn parse_manifest(manifest: &str) -> Result<Vec<Value>, CliError> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(manifest).enumerate() {
        let doc = Value::deserialize(de)
            .map_err(|e| CliError::Input(format!("document {}: invalid YAML: {e}", i + 1)))?;
        match doc {
            Value::Null => {}
            Value::Object(_) => docs.push(doc),
            _ => {
                return Err(CliError::Input(format!(
                    "document {}: not an object",
                    i + 1
                )));
            }
        }
    }
    if docs.is_empty() {
        return Err(CliError::Input("no objects passed to apply".into()));
    }
    Ok(docs)
}

fn kind_of(doc: &Value) -> Result<Kind, CliError> {
    let api_version = doc["apiVersion"].as_str().unwrap_or("");
    let kind = doc["kind"].as_str().unwrap_or("");
    kinds::all()
        .into_iter()
        .find(|k| k.api_version() == api_version && k.kind == kind)
        .ok_or_else(|| {
            CliError::Input(format!(
                "no kind {kind:?} is registered for version {api_version:?}"
            ))
        })
}

async fn apply_one(conn: &Connection, doc: Value) -> Result<String, CliError> {
    let kind = kind_of(&doc)?;
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if name.is_empty() {
        return Err(CliError::Input(format!(
            "a {} in the manifest has no metadata.name",
            kind.kind
        )));
    }
    let ns = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or(conn.namespace())
        .to_owned();
    let item = url(&kind, Some(&ns), Some(&name));
    let get = Request::get(&item)
        .body(Vec::new())
        .map_err(|e| CliError::Input(e.to_string()))?;
    let current = match conn.send(get).await {
        Ok(obj) => obj,
        Err(CliError::Server { reason, .. }) if reason == "NotFound" => {
            let create = Request::post(url(&kind, Some(&ns), None))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(&doc).unwrap_or_default())
                .map_err(|e| CliError::Input(e.to_string()))?;
            conn.send(create).await?;
            return Ok(format!("{} created", display_name(&kind, &name)));
        }
        Err(e) => return Err(e),
    };
    let patch = spec_owning_patch(&doc, &current);
    let req = Request::patch(format!("{item}?fieldManager=previewd-apply"))
        .header(http::header::CONTENT_TYPE, "application/merge-patch+json")
        .body(serde_json::to_vec(&patch).unwrap_or_default())
        .map_err(|e| CliError::Input(e.to_string()))?;
    let updated = conn.send(req).await?;
    let rv = |o: &Value| o.pointer("/metadata/resourceVersion").cloned();
    let verb = if rv(&updated) == rv(&current) {
        "unchanged"
    } else {
        "configured"
    };
    Ok(format!("{} {verb}", display_name(&kind, &name)))
}

/// The merge patch that makes the server's `spec` equal the manifest's: the manifest, plus
/// `null` for every spec field the server has and the manifest lacks.
pub fn spec_owning_patch(desired: &Value, current: &Value) -> Value {
    let mut patch = desired.clone();
    if let (Some(d), Some(c)) = (desired.get("spec"), current.get("spec")) {
        patch["spec"] = with_removals(d, c);
    }
    patch
}

fn with_removals(desired: &Value, current: &Value) -> Value {
    match (desired, current) {
        (Value::Object(d), Value::Object(c)) => {
            let mut out: Map<String, Value> = d
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        c.get(k)
                            .map_or_else(|| v.clone(), |cv| with_removals(v, cv)),
                    )
                })
                .collect();
            for k in c.keys().filter(|k| !d.contains_key(*k)) {
                out.insert(k.clone(), Value::Null);
            }
            Value::Object(out)
        }
        _ => desired.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn removed_spec_fields_become_nulls() {
        let desired = json!({"metadata": {"name": "a"}, "spec": {"port": 80, "target": {"docker": {"container": "x"}}}});
        let current = json!({"metadata": {"name": "a", "labels": {"k": "v"}}, "spec": {"port": 81, "ttl": "1h", "target": {"pod": {"name": "p"}}}});
        let patch = spec_owning_patch(&desired, &current);
        assert_eq!(
            patch["spec"],
            json!({"port": 80, "ttl": null, "target": {"docker": {"container": "x"}, "pod": null}})
        );
        assert!(
            patch["metadata"].get("labels").is_none(),
            "metadata merges, labels are kept"
        );
    }

    #[test]
    fn manifests_split_and_bad_documents_are_reported() {
        let docs = parse_manifest(
            "---\napiVersion: v1\nkind: Secret\nmetadata: {name: a}\n---\n---\nkind: X\n",
        );
        assert_eq!(docs.map(|d| d.len()).ok(), Some(2));
        assert!(parse_manifest("- a list").is_err());
        assert!(parse_manifest("a: [unclosed").is_err());
        assert!(parse_manifest("").is_err());
    }
}

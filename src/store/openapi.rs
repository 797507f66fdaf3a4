//! OpenAPI v3 documents, generated from the CRD schemas.
//!
//! kubectl's `--validate=strict` (its default) first asks `/openapi/v3` whether the server
//! validates fields itself: it looks for a PATCH operation tagged with the kind's
//! `x-kubernetes-group-version-kind` that takes a `fieldValidation` query parameter. This
//! server does (see `fieldValidation` in the API), so each document declares that, and carries
//! the kinds' schemas for `kubectl explain` and other tools.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::kinds::Kind;

/// The index at `/openapi/v3`: one entry per group version.
pub fn index(kinds: &[Kind]) -> Value {
    let mut paths = serde_json::Map::new();
    for gv in group_versions(kinds) {
        if let Some(doc) = document(kinds, &gv) {
            let hash = hex(&Sha256::digest(doc.to_string().as_bytes())[..8]);
            paths.insert(
                gv.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={hash}")}),
            );
        }
    }
    json!({"paths": paths})
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// `api/v1` or `apis/{group}/{version}` of every served kind.
fn group_versions(kinds: &[Kind]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for k in kinds {
        let gv = prefix(k).trim_start_matches('/').to_owned();
        if !out.contains(&gv) {
            out.push(gv);
        }
    }
    out
}

fn prefix(k: &Kind) -> String {
    if k.group.is_empty() {
        format!("/api/{}", k.version)
    } else {
        format!("/apis/{}/{}", k.group, k.version)
    }
}

/// The schema name the API server uses: reversed group, version, kind.
fn schema_name(k: &Kind) -> String {
    let group: Vec<&str> = if k.group.is_empty() {
        vec!["io", "k8s", "api", "core"]
    } else {
        k.group.rsplit('.').collect()
    };
    format!("{}.{}.{}", group.join("."), k.version, k.kind)
}

/// The document for one group version (`api/v1`, `apis/previewd.dev/v1alpha1`), or `None`.
pub fn document(kinds: &[Kind], group_version: &str) -> Option<Value> {
    let gv = group_version
        .split('?')
        .next()
        .unwrap_or("")
        .trim_matches('/');
    let served: Vec<&Kind> = kinds
        .iter()
        .filter(|k| prefix(k).trim_start_matches('/') == gv)
        .collect();
    if served.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for k in served {
        let gvk = json!({"group": k.group, "version": k.version, "kind": k.kind});
        let reference = json!({"$ref": format!("#/components/schemas/{}", schema_name(k))});
        let body = json!({"content": {"application/json": {"schema": reference}}});
        let field_validation = json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}});
        let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}});
        let patch_body = json!({"content": {
            "application/json-patch+json": {"schema": {"type": "object"}},
            "application/merge-patch+json": {"schema": {"type": "object"}},
            "application/apply-patch+yaml": {"schema": {"type": "object"}},
        }});
        let item = format!(
            "{}/namespaces/{{namespace}}/{}/{{name}}",
            prefix(k),
            k.plural
        );
        paths.insert(
            item,
            json!({
                "get": {"x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk, "responses": ok},
                "put": {"x-kubernetes-action": "put", "x-kubernetes-group-version-kind": gvk, "parameters": [field_validation], "requestBody": body, "responses": ok},
                "patch": {"x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk, "parameters": [field_validation], "requestBody": patch_body, "responses": ok},
                "delete": {"x-kubernetes-action": "delete", "x-kubernetes-group-version-kind": gvk, "responses": ok},
            }),
        );
        paths.insert(
            format!("{}/namespaces/{{namespace}}/{}", prefix(k), k.plural),
            json!({
                "get": {"x-kubernetes-action": "list", "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}},
                "post": {"x-kubernetes-action": "post", "x-kubernetes-group-version-kind": gvk, "parameters": [field_validation], "requestBody": body, "responses": ok},
            }),
        );
        let mut schema = k
            .crd
            .as_ref()
            .and_then(|c| c.spec.versions.first())
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or_else(
                || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            );
        schema["x-kubernetes-group-version-kind"] = json!([gvk]);
        schemas.insert(schema_name(k), schema);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "previewd embedded API", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kinds;

    #[test]
    fn patch_operations_declare_server_side_field_validation() {
        let kinds = kinds::all();
        let idx = index(&kinds);
        let url = idx["paths"]["apis/previewd.dev/v1alpha1"]["serverRelativeURL"]
            .as_str()
            .unwrap_or("");
        assert!(url.starts_with("/openapi/v3/apis/previewd.dev/v1alpha1?hash="));
        let doc = document(&kinds, url.trim_start_matches("/openapi/v3/")).unwrap_or_default();
        let patch = &doc["paths"]["/apis/previewd.dev/v1alpha1/namespaces/{namespace}/previewlinks/{name}"]
            ["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "PreviewLink"
        );
        assert_eq!(patch["parameters"][0]["name"], "fieldValidation");
        assert!(
            doc["components"]["schemas"]["dev.previewd.v1alpha1.PreviewLink"]["properties"]["spec"]
                .is_object()
        );
        assert!(idx["paths"]["api/v1"].is_object());
        assert!(document(&kinds, "apis/nope/v1").is_none());
    }
}

//! Discovery documents (`/version`, `/api`, `/apis`, group and resource lists), which
//! kubectl and kube-rs read to map kinds and short names to URLs.

use serde_json::{Value, json};

use super::kinds::Kind;

const VERBS: [&str; 7] = [
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// `/version`: the Kubernetes version whose API this server follows. Minor 32 also makes
/// version-dispatching kubectl wrappers (Cloud SDK) pick a matching client.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": format!("v1.32.0+previewd.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}

/// `/api`: the legacy core group's versions.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// The named groups, in first-seen order.
fn groups(kinds: &[Kind]) -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for k in kinds.iter().filter(|k| !k.group.is_empty()) {
        if !out.iter().any(|(g, _)| *g == k.group) {
            out.push((k.group, k.version));
        }
    }
    out
}

fn group(name: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{name}/{version}"), "version": version});
    json!({"name": name, "versions": [gv.clone()], "preferredVersion": gv})
}

/// `/apis`: every named group.
pub fn group_list(kinds: &[Kind]) -> Value {
    let groups: Vec<Value> = groups(kinds)
        .into_iter()
        .map(|(g, v)| group(g, v))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`, or `None` for an unknown group.
pub fn api_group(kinds: &[Kind], name: &str) -> Option<Value> {
    groups(kinds)
        .into_iter()
        .find(|(g, _)| *g == name)
        .map(|(g, v)| {
            let mut doc = group(g, v);
            doc["kind"] = json!("APIGroup");
            doc["apiVersion"] = json!("v1");
            doc
        })
}

/// `/api/v1` or `/apis/{group}/{version}`: the resources of one group version, with their
/// `status` subresources; `None` when nothing is served there.
pub fn resource_list(kinds: &[Kind], group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for k in kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
    {
        resources.push(json!({
            "name": k.plural,
            "singularName": k.singular,
            "namespaced": true,
            "kind": k.kind,
            "verbs": VERBS,
            "shortNames": k.short_names,
            "categories": k.categories,
        }));
        if k.has_status {
            resources.push(json!({
                "name": format!("{}/status", k.plural),
                "singularName": "",
                "namespaced": true,
                "kind": k.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kinds;

    #[test]
    fn previewd_group_lists_both_kinds_and_their_status() {
        let kinds = kinds::all();
        let list = resource_list(&kinds, "previewd.dev", "v1alpha1").unwrap_or_default();
        let names: Vec<&str> = list["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "previewlinks",
                "previewlinks/status",
                "daemoninjections",
                "daemoninjections/status"
            ]
        );
        assert_eq!(list["resources"][0]["shortNames"][0], "pl");
        assert!(resource_list(&kinds, "nope.io", "v1").is_none());
        assert!(api_group(&kinds, "events.k8s.io").is_some());
    }
}

//! An audit log of the embedded API: one JSON line per resource request, naming the verb,
//! API group, resource and subresource as RBAC sees them. It shows which calls a client
//! makes; the tests check previewd's own calls against the ClusterRole in `deploy/`.

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use axum::http::Method;
use serde::{Deserialize, Serialize};

/// One request, in RBAC's terms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete` or `deletecollection`.
    pub verb: String,
    /// The API group (`""` for core).
    pub api_group: String,
    /// The resource's plural.
    pub resource: String,
    /// `status`, or empty.
    pub subresource: String,
    /// The namespace, or empty for cluster-wide requests.
    pub namespace: String,
    /// The object's name, or empty for collections.
    pub name: String,
    /// The client's `User-Agent`.
    pub user_agent: String,
}

/// The RBAC verb of a request.
pub fn verb(method: &Method, has_name: bool, watch: bool) -> &'static str {
    match (method.as_str(), has_name) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

/// Where audit entries go.
pub struct AuditLog {
    out: Mutex<LineWriter<File>>,
}

impl AuditLog {
    /// Appends to `path`, creating it.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog {
            out: Mutex::new(LineWriter::new(file)),
        })
    }

    /// Writes one entry; a failing write is logged, never fails the request.
    pub fn record(&self, entry: &AuditEntry) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.write_all(&line) {
            tracing::warn!(error = %e, "cannot write the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_follow_rbac() {
        assert_eq!(verb(&Method::GET, false, true), "watch");
        assert_eq!(verb(&Method::GET, true, false), "get");
        assert_eq!(verb(&Method::GET, false, false), "list");
        assert_eq!(verb(&Method::PATCH, true, false), "patch");
        assert_eq!(verb(&Method::DELETE, false, false), "deletecollection");
    }

    #[test]
    fn entries_are_json_lines() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let entry = AuditEntry {
            verb: "patch".into(),
            api_group: "previewd.dev".into(),
            resource: "previewlinks".into(),
            subresource: "status".into(),
            namespace: "default".into(),
            name: "a".into(),
            user_agent: "t".into(),
        };
        log.record(&entry);
        log.record(&entry);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let back: Vec<AuditEntry> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert_eq!(back, vec![entry.clone(), entry]);
    }
}

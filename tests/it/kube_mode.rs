//! `previewd serve --store kube` end to end on a real Docker engine: a replica talks to an
//! API server over HTTP (a previewd serving only its embedded API, with an audit log, stands
//! in for kube-apiserver), serves a backend's preview of a loopback-only app, writes the same
//! status as in local mode, and makes only calls that deploy/'s RBAC allows, all within the
//! namespace it watches.

use std::time::Duration;

use bollard::models::HostConfig;
use kube::api::Api;
use previewd::resources::PreviewLink;
use previewd::resources::preview_link::LinkPhase;
use previewd::store::audit::AuditEntry;
use serde_json::json;

use crate::common::{API_ONLY, Server};
use crate::containers::{TestContainer, docker, images};
use crate::deploy::{Call, not_allowed, own_namespace_rules};
use crate::rest::{call, fetch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_mode_replica_serves_previews_within_its_rbac() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let app = TestContainer::testapp(rt.client(), "127.0.0.1:8080", HostConfig::default()).await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let audit = dir.path().join("audit.jsonl");
    let audit_env = audit.to_string_lossy().into_owned();
    let apiserver = Server::start_with(
        &dir.path().join("apiserver"),
        &[API_ONLY, ("PREVIEWD_AUDIT_LOG", audit_env.as_str())],
    );
    let kc = crate::leader::kubeconfig(dir.path(), &apiserver.url);
    let replica = crate::leader::kube_replica(
        &dir.path().join("replica"),
        &kc,
        &[
            ("PREVIEWD_IDENTITY", "replica-0"),
            ("POD_NAMESPACE", "previewd"),
            // Scoped like a replica with a namespaced Role: nothing may be read cluster-wide.
            ("PREVIEWD_WATCH_NAMESPACE", "default"),
        ],
    );
    assert!(
        !dir.path().join("replica").join("objects").exists(),
        "kube mode wrote a local store"
    );
    let api = replica.url.as_str();
    let base = format!("/api/daemon-proxy/container/{}", app.name);

    // The backend's calls, answered by the replica from the API server's objects.
    let (code, preview) = call(api, "POST", &format!("{base}/preview/8080"), "").await;
    assert_eq!(code, 200, "{preview}\n{}", replica.log_text());
    let path_url = preview["path_url"].as_str().unwrap_or("").to_owned();
    let (code, page) = fetch(replica.proxy, &path_url).await;
    assert_eq!((code, page.as_str()), (200, "hello from testapp\n"));
    let (code, status) = call(api, "GET", &format!("{base}/status"), "").await;
    assert_eq!(
        (code, &status["daemon_status"]),
        (200, &json!("running")),
        "{status}"
    );

    // The same status as in local mode: Ready through the agent, token only as a hash.
    let links: Api<PreviewLink> = Api::default_namespaced(apiserver.client());
    let name = preview["link"].as_str().unwrap_or("");
    let link = links.get(name).await.unwrap_or_else(|e| panic!("{e}"));
    let st = link.status.unwrap_or_default();
    assert_eq!(st.phase, Some(LinkPhase::Ready));
    assert!(
        st.upstream
            .as_deref()
            .is_some_and(|u| u.starts_with("agent://")),
        "{:?}",
        st.upstream
    );
    assert_eq!(
        st.path_url.as_deref().map(|u| format!(
            "{u}?previewd_token={}",
            preview["token"].as_str().unwrap_or("")
        )),
        Some(path_url.clone())
    );
    assert!(st.token_hash.is_some_and(|h| h.len() == 64));

    let (code, removed) = call(api, "POST", &format!("{base}/remove"), "").await;
    assert_eq!(
        (code, &removed["status"]),
        (200, &json!("removed")),
        "{removed}"
    );
    assert!(replica.terminate(Duration::from_secs(10)));

    // Every call the replica made is one deploy/'s roles allow.
    let text = std::fs::read_to_string(&audit).unwrap_or_else(|e| panic!("{e}"));
    let entries: Vec<AuditEntry> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let calls: Vec<(String, String, String)> = entries
        .iter()
        .filter(|e| !e.user_agent.starts_with("kubectl"))
        .map(|e| {
            let resource = if e.subresource.is_empty() {
                e.resource.clone()
            } else {
                format!("{}/{}", e.resource, e.subresource)
            };
            (e.api_group.clone(), resource, e.verb.clone())
        })
        .collect();
    assert!(calls.len() > 20, "too few calls recorded: {calls:?}");
    let calls: Vec<Call<'_>> = calls
        .iter()
        .map(|(g, r, v)| (g.as_str(), r.as_str(), v.as_str()))
        .collect();
    let mut missing = not_allowed(&own_namespace_rules(), &calls);
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), "calls RBAC does not allow: {missing:?}");
    // The replica's own calls (the stand-in's in-process ones carry no user agent).
    let replica_calls = entries
        .iter()
        .filter(|e| e.user_agent == previewd::serve::USER_AGENT);
    assert!(replica_calls.clone().count() > 20, "{text}");
    for e in replica_calls {
        let expected = if e.resource == "leases" {
            "previewd"
        } else {
            "default"
        };
        assert_eq!(e.namespace, expected, "{e:?}");
    }
    assert!(
        entries
            .iter()
            .any(|e| e.resource == "leases" && e.verb == "patch"),
        "the replica took no lease"
    );
}

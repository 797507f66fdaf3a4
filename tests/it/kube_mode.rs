//! `previewd serve --store kube` end to end on a real Docker engine: a replica talks to an
//! API server over HTTP (a previewd serving only its embedded API, with an audit log, stands
//! in for kube-apiserver), serves a backend's preview of a loopback-only app, writes the same
//! status as in local mode, and makes only calls that deploy/'s RBAC allows where it makes
//! them: as deploy/ runs it (one namespace, a Role there) and as the cluster-wide overlay does.

use std::time::Duration;

use bollard::models::HostConfig;
use kube::api::Api;
use previewd::resources::PreviewLink;
use previewd::resources::preview_link::LinkPhase;
use previewd::store::audit::AuditEntry;
use serde_json::json;

use crate::common::{API_ONLY, Server};
use crate::containers::{TestContainer, docker, images};
use crate::deploy::{CLUSTER_WIDE, Call, Manifests, NAMESPACED, built, not_allowed};
use crate::rest::{call, fetch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_mode_replica_serves_previews_within_its_rbac() {
    let Some(rbac) = built(NAMESPACED) else {
        return;
    };
    serves_previews_within(&rbac).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_wide_replica_serves_previews_within_the_overlays_rbac() {
    let Some(rbac) = built(CLUSTER_WIDE) else {
        return;
    };
    serves_previews_within(&rbac).await;
}

/// A replica configured as `rbac`'s Deployment (watching its namespace, or all) serves a
/// preview, and every call it makes is one `rbac` grants in the namespace it is made in.
async fn serves_previews_within(rbac: &Manifests) {
    let Some(rt) = docker().await else { return };
    let watch = rbac.watch_namespace();
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
    let mut env = vec![
        ("PREVIEWD_IDENTITY", "replica-0"),
        ("POD_NAMESPACE", "previewd"),
    ];
    env.extend(watch.as_deref().map(|ns| ("PREVIEWD_WATCH_NAMESPACE", ns)));
    let replica = crate::leader::kube_replica(&dir.path().join("replica"), &kc, &env);
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

    // The same status as in local mode: Ready inside the container's network namespace
    // (previewd runs beside the engine here) or else through the agent, token only as a hash.
    let links: Api<PreviewLink> = Api::default_namespaced(apiserver.client());
    let name = preview["link"].as_str().unwrap_or("");
    let link = links.get(name).await.unwrap_or_else(|e| panic!("{e}"));
    let st = link.status.unwrap_or_default();
    assert_eq!(st.phase, Some(LinkPhase::Ready));
    let scheme = if previewd::runtime::netns::may_enter() {
        "netns://"
    } else {
        "agent://"
    };
    assert!(
        st.upstream
            .as_deref()
            .is_some_and(|u| u.starts_with(scheme)),
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

    // Every call the replica made is one the roles allow in the namespace it was made in (the
    // stand-in's own in-process calls carry no user agent); scoped to one namespace, it made
    // them all there, but for the Lease in previewd's.
    let text = std::fs::read_to_string(&audit).unwrap_or_else(|e| panic!("{e}"));
    let entries: Vec<AuditEntry> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let replica_calls: Vec<&AuditEntry> = entries
        .iter()
        .filter(|e| e.user_agent == previewd::serve::USER_AGENT)
        .collect();
    assert!(replica_calls.len() > 20, "too few calls recorded: {text}");
    let mut missing = Vec::new();
    for e in &replica_calls {
        let resource = if e.subresource.is_empty() {
            e.resource.clone()
        } else {
            format!("{}/{}", e.resource, e.subresource)
        };
        let call: Call<'_> = (&e.api_group, &resource, &e.verb);
        let scope = Some(e.namespace.as_str()).filter(|ns| !ns.is_empty());
        if !not_allowed(&rbac.rules_in(scope), &[call]).is_empty() {
            missing.push(format!(
                "{} {resource} {} in {scope:?}",
                e.api_group, e.verb
            ));
        }
        if e.resource == "leases" {
            assert_eq!(e.namespace, "previewd", "{e:?}");
        } else if let Some(ns) = &watch {
            assert_eq!(&e.namespace, ns, "{e:?}");
        }
    }
    if watch.is_none() {
        assert!(
            replica_calls
                .iter()
                .any(|e| e.namespace.is_empty() && e.verb == "watch"),
            "a cluster-wide replica watches across namespaces: {text}"
        );
    }
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), "calls RBAC does not allow: {missing:?}");
    assert!(
        entries
            .iter()
            .any(|e| e.resource == "leases" && e.verb == "patch"),
        "the replica took no lease"
    );
}

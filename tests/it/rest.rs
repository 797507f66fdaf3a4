//! The REST shim (`/api/daemon-proxy/…`) on a real Docker engine: every call, its errors,
//! the Bearer token beyond loopback, an unchanged Python backend client, and schemathesis
//! against the served OpenAPI document.

use std::net::SocketAddr;
use std::time::Duration;

use bollard::models::HostConfig;
use kube::api::{Api, ListParams};
use previewd::resources::{DaemonInjection, PreviewLink};
use serde_json::Value;

use crate::common::{Server, exchange, require_tool};
use crate::containers::{BUSYBOX_IMAGE, TestContainer, docker, images};
use crate::docker::{agent_processes, server, sh};

/// Calls the API at `base` (`http://host:port`): status and JSON body.
pub async fn call(base: &str, method: &str, path: &str, headers: &str) -> (u16, Value) {
    let addr = base.trim_start_matches("http://");
    let (code, head, body) = exchange(
        addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n{headers}\r\n"
        ),
    )
    .await;
    let json = serde_json::from_str(&body).unwrap_or_else(|_| {
        panic!("{method} {path}: not JSON ({code}):\n{head}\n\n{body}");
    });
    (code, json)
}

/// GET of a full URL through the proxy (the host part is sent as `Host`, the connection goes
/// to `proxy`, as a browser resolving `*.localhost` to loopback does).
pub async fn fetch(proxy: SocketAddr, url: &str) -> (u16, String) {
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (code, _, body) = exchange(
        &proxy.to_string(),
        &format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    (code, body)
}

fn s<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_inject_preview_revoke_and_remove() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    // The app listens on the container's loopback only: reachable through the daemon alone.
    let app = TestContainer::testapp(rt.client(), "127.0.0.1:8080", HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let srv = server(state.path());
    let api = srv.url.as_str();
    let id = app.name.as_str();
    let base = format!("/api/daemon-proxy/container/{id}");

    let (code, svc) = call(api, "GET", "/api/daemon-proxy/service/status", "").await;
    assert_eq!((code, s(&svc, "status")), (200, "ok"));
    assert_eq!(svc["is_running"], true);
    assert_eq!(svc["managed_containers"], serde_json::json!([]));
    assert_eq!(s(&svc, "service_url"), api);

    let (code, st) = call(api, "GET", &format!("{base}/status"), "").await;
    assert_eq!((code, s(&st, "daemon_status")), (200, "not_managed"));
    assert_eq!(st["service_running"], true);

    // inject, twice: both answer "injected", one agent runs.
    for _ in 0..2 {
        let (code, inj) = call(api, "POST", &format!("{base}/inject"), "").await;
        assert_eq!(code, 200, "{inj}");
        assert_eq!(
            (s(&inj, "status"), s(&inj, "container_id")),
            ("injected", id)
        );
    }
    assert_eq!(agent_processes(&rt, id).await, 1);
    let (_, st) = call(api, "GET", &format!("{base}/status"), "").await;
    assert_eq!(s(&st, "daemon_status"), "running", "{st}");
    let ports = st["ports"].as_array().cloned().unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p["port"] == 8080 && p["address"] == "127.0.0.1"),
        "{st}"
    );
    let (_, svc) = call(api, "GET", "/api/daemon-proxy/service/status", "").await;
    // By the id the backend used (here the container's name), full ids beside.
    assert_eq!(svc["managed_containers"], serde_json::json!([id]), "{svc}");
    let full = svc["managed_container_ids"][0].as_str().unwrap_or_default();
    assert!(
        full.len() == 64 && full.bytes().all(|b| b.is_ascii_hexdigit()),
        "{svc}"
    );

    // preview: self-authenticating URLs that reach the loopback-only app.
    let (code, p1) = call(api, "POST", &format!("{base}/preview/8080"), "").await;
    assert_eq!(code, 200, "{p1}");
    let token = s(&p1, "token").to_owned();
    assert!(
        s(&p1, "url").ends_with(&format!("?previewd_token={token}")),
        "{p1}"
    );
    assert!(s(&p1, "path_url").contains("/p/"), "{p1}");
    assert_eq!(p1["port"], 8080);
    let expires = p1["expires_at"].as_i64().unwrap_or(0);
    assert!((expires - now() - 24 * 3600).abs() < 60, "{p1}");
    for url in [s(&p1, "url"), s(&p1, "path_url")] {
        let (code, body) = fetch(srv.proxy, url).await;
        assert_eq!(
            (code, body.as_str()),
            (200, "hello from testapp\n"),
            "{url}"
        );
    }
    let plain = s(&p1, "path_url")
        .split('?')
        .next()
        .unwrap_or("")
        .to_owned();
    assert_eq!(fetch(srv.proxy, &plain).await.0, 401);
    // The same (container, port) gives the same live link; a ttl renews its expiry only.
    let (_, p2) = call(api, "POST", &format!("{base}/preview/8080"), "").await;
    assert_eq!(
        (s(&p2, "url"), s(&p2, "token")),
        (s(&p1, "url"), token.as_str())
    );
    let (_, p3) = call(
        api,
        "POST",
        &format!("{base}/preview/8080?ttl_seconds=120"),
        "",
    )
    .await;
    assert_eq!(s(&p3, "token"), token);
    assert!(
        (p3["expires_at"].as_i64().unwrap_or(0) - now() - 120).abs() < 10,
        "{p3}"
    );
    // kubectl users see the same objects.
    let links: Api<PreviewLink> = Api::default_namespaced(srv.client());
    let listed = links
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        listed.items[0].metadata.name.as_deref(),
        Some(s(&p1, "link"))
    );
    let (_, st) = call(api, "GET", &format!("{base}/status"), "").await;
    assert_eq!(st["links"][0]["port"], 8080, "{st}");
    assert_eq!(st["links"][0]["phase"], "Ready", "{st}");

    // A public link needs no token.
    let (code, public) = call(api, "POST", &format!("{base}/preview/8080?public=true"), "").await;
    assert_eq!(
        (code, public["token"].clone()),
        (200, Value::Null),
        "{public}"
    );
    assert_eq!(fetch(srv.proxy, &plain).await.0, 200);

    // Revoke: the URL answers 404 at once; revoking again is 404.
    let (code, rv) = call(api, "DELETE", &format!("{base}/preview/8080"), "").await;
    assert_eq!((code, s(&rv, "status")), (200, "revoked"), "{rv}");
    assert_eq!(fetch(srv.proxy, s(&p1, "path_url")).await.0, 404);
    let (code, err) = call(api, "DELETE", &format!("{base}/preview/8080"), "").await;
    assert_eq!((code, s(&err, "code")), (404, "LINK_NOT_FOUND"));
    // The explicitly injected daemon outlives its links.
    assert_eq!(agent_processes(&rt, id).await, 1);

    // A new preview has a new token; remove stops the daemon, deletes its files, revokes.
    let (_, p4) = call(api, "POST", &format!("{base}/preview/8080"), "").await;
    assert_ne!(s(&p4, "token"), token);
    let (code, rm) = call(api, "POST", &format!("{base}/remove"), "").await;
    assert_eq!((code, s(&rm, "status")), (200, "removed"), "{rm}");
    assert_eq!(agent_processes(&rt, id).await, 0);
    assert_eq!(
        sh(&rt, id, &["/bin/ls", "-A", "/.previewd"]).await.trim(),
        ""
    );
    assert_eq!(fetch(srv.proxy, s(&p4, "path_url")).await.0, 404);
    let (_, st) = call(api, "GET", &format!("{base}/status"), "").await;
    assert_eq!(s(&st, "daemon_status"), "not_managed");
    let (code, rm) = call(api, "POST", &format!("{base}/remove"), "").await;
    assert_eq!((code, s(&rm, "status")), (200, "not_managed"));

    // preview alone injects as needed.
    let (code, p5) = call(api, "POST", &format!("{base}/preview/8080"), "").await;
    assert_eq!(code, 200, "{p5}");
    assert_eq!(fetch(srv.proxy, s(&p5, "url")).await.0, 200);
    // Removing the container's last link through the API also removes the daemon it needed.
    let (code, _) = call(api, "DELETE", &format!("{base}/preview/8080"), "").await;
    assert_eq!(code, 200);
    let dis: Api<DaemonInjection> = Api::default_namespaced(srv.client());
    crate::common::eventually(Duration::from_secs(20), "the link's injection goes", || {
        let dis = dis.clone();
        async move {
            dis.list(&ListParams::default())
                .await
                .ok()
                .filter(|l| l.items.is_empty())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_4xx_and_leaves_nothing_behind() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let stopped = TestContainer::run(
        rt.client(),
        BUSYBOX_IMAGE,
        Some(vec!["/bin/sleep", "600"]),
        HostConfig::default(),
        None,
        false,
    )
    .await;
    let read_only = TestContainer::run(
        rt.client(),
        BUSYBOX_IMAGE,
        Some(vec!["/bin/sleep", "600"]),
        HostConfig {
            readonly_rootfs: Some(true),
            ..Default::default()
        },
        None,
        true,
    )
    .await;
    // Docker resolves a short id by prefix; two of our own containers whose ids begin
    // alike make that prefix name more than one (at most 17 are needed, by pigeonhole).
    let mut alike = Vec::new();
    let shared_prefix = loop {
        let c = TestContainer::run(
            rt.client(),
            BUSYBOX_IMAGE,
            Some(vec!["/bin/sleep", "600"]),
            HostConfig::default(),
            None,
            false,
        )
        .await;
        let id = rt
            .client()
            .inspect_container(&c.name, None)
            .await
            .ok()
            .and_then(|i| i.id)
            .unwrap_or_else(|| panic!("no id for {}", c.name));
        let first = id.get(..1).unwrap_or_default().to_owned();
        alike.push((first.clone(), c));
        if alike.iter().filter(|(f, _)| *f == first).count() == 2 {
            break first;
        }
    };
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let srv = server(state.path());
    let api = srv.url.as_str();
    let p = "/api/daemon-proxy/container";

    let long = "a".repeat(300);
    for (path, want, code) in [
        (format!("{p}/a%2Fb/inject"), 400, "INVALID_CONTAINER_ID"),
        (format!("{p}/../inject"), 400, "INVALID_CONTAINER_ID"),
        (format!("{p}/a%00b/inject"), 400, "INVALID_CONTAINER_ID"),
        (format!("{p}/{long}/inject"), 400, "INVALID_CONTAINER_ID"),
        (format!("{p}/web/preview/0"), 400, "INVALID_PORT"),
        (format!("{p}/web/preview/65536"), 400, "INVALID_PORT"),
        (format!("{p}/web/preview/http"), 400, "INVALID_PORT"),
        (
            format!("{p}/web/preview/80?tll_seconds=5"),
            422,
            "INVALID_QUERY",
        ),
        (
            format!("{p}/web/preview/80?ttl_seconds=0"),
            422,
            "INVALID_QUERY",
        ),
        (
            format!("{p}/web/preview/80?public=maybe"),
            422,
            "INVALID_QUERY",
        ),
        (format!("{p}/web/inject?force=1"), 422, "INVALID_QUERY"),
        (
            format!("{p}/{shared_prefix}/inject"),
            400,
            "AMBIGUOUS_CONTAINER_ID",
        ),
        (
            format!("{p}/{shared_prefix}/preview/80"),
            400,
            "AMBIGUOUS_CONTAINER_ID",
        ),
        (
            format!("{p}/no-such-container-xyz/inject"),
            404,
            "CONTAINER_NOT_FOUND",
        ),
        (
            format!("{p}/no-such-container-xyz/preview/80"),
            404,
            "CONTAINER_NOT_FOUND",
        ),
        (
            format!("{p}/{}/inject", stopped.name),
            409,
            "CONTAINER_NOT_RUNNING",
        ),
        (
            format!("{p}/{}/preview/80", stopped.name),
            409,
            "CONTAINER_NOT_RUNNING",
        ),
        (
            format!("{p}/{}/inject", read_only.name),
            500,
            "INJECTION_FAILED",
        ),
    ] {
        let (got, body) = call(api, "POST", &path, "").await;
        assert_eq!((got, s(&body, "code")), (want, code), "{path}: {body}");
        assert!(!s(&body, "detail").is_empty(), "{path}: {body}");
    }
    let (code, body) = call(api, "POST", &format!("{p}/{}/inject", read_only.name), "").await;
    assert!(
        s(&body, "detail").contains("ReadOnlyRootfs"),
        "{code} {body}"
    );
    let (code, body) = call(
        api,
        "DELETE",
        &format!("{p}/no-such-container-xyz/preview/80"),
        "",
    )
    .await;
    assert_eq!((code, s(&body, "code")), (404, "LINK_NOT_FOUND"));
    let (code, body) = call(api, "GET", &format!("{p}/no-such-container-xyz/status"), "").await;
    assert_eq!((code, s(&body, "daemon_status")), (200, "not_managed"));
    let (code, body) = call(
        api,
        "POST",
        &format!("{p}/no-such-container-xyz/remove"),
        "",
    )
    .await;
    assert_eq!((code, s(&body, "status")), (200, "not_managed"));

    // Failed calls leave no objects.
    let dis: Api<DaemonInjection> = Api::default_namespaced(srv.client());
    let links: Api<PreviewLink> = Api::default_namespaced(srv.client());
    crate::common::eventually(Duration::from_secs(20), "failed calls' objects go", || {
        let (dis, links) = (dis.clone(), links.clone());
        async move {
            let d = dis.list(&ListParams::default()).await.ok()?;
            let l = links.list(&ListParams::default()).await.ok()?;
            (d.items.is_empty() && l.items.is_empty()).then_some(())
        }
    })
    .await;
}

#[test]
fn a_rest_namespace_the_controllers_do_not_watch_is_refused_at_start() {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let refused = Server::try_start(
        state.path(),
        &[
            ("PREVIEWD_WATCH_NAMESPACE", "team-a"),
            ("PREVIEWD_REST_NAMESPACE", "default"),
        ],
    );
    let Err(log) = refused else {
        panic!("previewd started with a REST namespace its controllers do not watch")
    };
    assert!(log.contains("--rest-namespace default"), "{log}");
}

#[test]
fn beyond_loopback_the_api_needs_its_bearer_token() {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let refused = Server::try_start_on(state.path(), "0.0.0.0:0", &[]);
    let Err(log) = refused else {
        panic!("previewd served 0.0.0.0 without a token")
    };
    assert!(log.contains("PREVIEWD_API_TOKEN"), "{log}");

    let token = "test-token-0123456789";
    let srv = Server::try_start_on(state.path(), "0.0.0.0:0", &[("PREVIEWD_API_TOKEN", token)])
        .unwrap_or_else(|e| panic!("{e}"));
    let port = srv.url.rsplit(':').next().unwrap_or("");
    let api = format!("http://127.0.0.1:{port}");
    let rt = tokio::runtime::Runtime::new().unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        let svc = "/api/daemon-proxy/service/status";
        let (code, body) = call(&api, "GET", svc, "").await;
        assert_eq!((code, s(&body, "code")), (401, "UNAUTHORIZED"));
        let (code, _) = call(
            &api,
            "GET",
            svc,
            "Authorization: Bearer wrong-token-0123456789\r\n",
        )
        .await;
        assert_eq!(code, 401);
        let (code, _) = call(
            &api,
            "GET",
            svc,
            &format!("Authorization: Bearer {token}\r\n"),
        )
        .await;
        assert_eq!(code, 200);
        // The embedded Kubernetes API is behind the same token; health probes are not.
        let (code, _) = call(&api, "GET", "/apis", "").await;
        assert_eq!(code, 401);
        let (code, head, _) = exchange(
            &api[7..],
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(code, 200, "{head}");
    });
    // The CLI passes the token on.
    let out = std::process::Command::new(crate::common::previewd_bin())
        .args(["get", "pl", "--server", &api])
        .env("PREVIEWD_API_TOKEN", token)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Python tool (`aiohttp`, `schemathesis`), or `None` with a loud message unless
/// PREVIEWD_REQUIRE_PYTHON=1 makes its absence a failure.
fn python_with(module: &str) -> Option<()> {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(());
    }
    let msg = format!("python3 with {module} is missing (pip install {module})");
    if std::env::var("PREVIEWD_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("required (PREVIEWD_REQUIRE_PYTHON=1): {msg}");
    }
    eprintln!(
        "\n!!!!! SKIPPED: {msg}; set PREVIEWD_REQUIRE_PYTHON=1 to make this a failure !!!!!\n"
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_aiohttp_backend_gets_the_apps_page() {
    let Some(rt) = docker().await else { return };
    let Some(()) = python_with("aiohttp") else {
        return;
    };
    images(rt.client()).await;
    let app = TestContainer::testapp(rt.client(), "127.0.0.1:3000", HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let srv = server(state.path());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/backend_client.py");
    let out = tokio::process::Command::new("python3")
        .args([script, &srv.url, &app.name, "3000"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("page: hello from testapp"), "{stdout}");
    assert!(stdout.contains("removed"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_call_answers_as_its_openapi_document_says() {
    let Some(rt) = docker().await else { return };
    let Some(()) = python_with("schemathesis") else {
        return;
    };
    let Some(st) = require_tool("schemathesis", "PREVIEWD_REQUIRE_PYTHON") else {
        return;
    };
    images(rt.client()).await;
    let app = TestContainer::testapp(rt.client(), "127.0.0.1:3000", HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let srv = crate::docker::server_with(state.path(), &[("PREVIEWD_REST_WAIT_SECONDS", "20")]);
    let (code, doc) = call(&srv.url, "GET", "/api/openapi.json", "").await;
    assert_eq!(code, 200);
    assert_eq!(doc["paths"].as_object().map(|p| p.len()), Some(5), "{doc}");
    // Everything the document allows and forbids, with generated ids (mostly unknown
    // containers), then valid calls on a real container (its id given in a config file).
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // Not named schemathesis.toml: that name is picked up from the working directory.
    let config = work.path().join("fixed-container.toml");
    std::fs::write(
        &config,
        format!("[parameters]\n\"id\" = \"{}\"\n", app.name),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let doc_url = format!("{}/api/openapi.json", srv.url);
    for (mode, config) in [("all", None), ("positive", Some(&config))] {
        let mut cmd = tokio::process::Command::new(&st);
        // Its caches go to the test's directory, not the checkout.
        cmd.current_dir(work.path());
        if let Some(c) = config {
            cmd.arg("--config-file").arg(c);
        }
        let out = cmd
            .args(["run", &doc_url, "--checks", "all", "--mode", mode])
            .args([
                "--max-examples",
                "20",
                "--seed",
                "1",
                "--generation-database",
                "none",
            ])
            .output()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis ({mode}):\n{report}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(report.contains("6 selected / 6 total"), "{report}");
    }
}

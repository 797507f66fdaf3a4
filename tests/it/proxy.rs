//! The preview proxy on a real Docker engine: routing, tokens, revocation, and refusals.

use std::net::SocketAddr;
use std::time::Duration;

use bollard::models::HostConfig;
use kube::api::{Api, DeleteParams, PostParams};
use previewd::resources::PreviewLink;
use previewd::resources::preview_link::LinkPhase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Server, eventually, exchange};
use crate::containers::{TestContainer, docker, images};
use crate::docker::{link, wait_link};

async fn get(proxy: SocketAddr, host: &str, path: &str, extra: &str) -> (u16, String, String) {
    exchange(
        proxy,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n"),
    )
    .await
}

/// previewd with links to loopback ports through the agent, as without the privilege to
/// enter containers' network namespaces.
pub const RELAY: &[(&str, &str)] = &[
    ("PREVIEWD_ENTER_NETNS", "false"),
    ("PREVIEWD_SOCKET_HANDOFF", "false"),
];

async fn ready(api: &Api<PreviewLink>, name: &str) {
    wait_link(api, name, LinkPhase::Ready).await;
}

fn token_of(server: &Server, link: &str) -> String {
    let out = std::process::Command::new(crate::common::previewd_bin())
        .args(["token", link, "--server", &server.url])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_serves_links_with_tokens_and_refuses_everything_else() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let local =
        TestContainer::httpd(rt.client(), "127.0.0.1:3000", None, HostConfig::default()).await;
    let public =
        TestContainer::httpd(rt.client(), "0.0.0.0:8080", None, HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = crate::docker::server(state.path());
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    for l in [
        link("app", &local.name, 3000, serde_json::json!({})),
        link("other", &local.name, 3000, serde_json::json!({})),
        link(
            "direct",
            &public.name,
            8080,
            serde_json::json!({"via": "direct", "access": "public"}),
        ),
        link(
            "closed",
            &local.name,
            3999,
            serde_json::json!({"access": "public"}),
        ),
    ] {
        links
            .create(&PostParams::default(), &l)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    for name in ["app", "other", "direct", "closed"] {
        ready(&links, name).await;
    }
    let proxy = server.proxy;
    let token = token_of(&server, "app");
    let hello = "hello from busybox httpd";

    // Path routing through the agent to a server bound to 127.0.0.1 in the container.
    let (code, _, body) = get(
        proxy,
        "127.0.0.1",
        "/p/app.default/",
        &format!("X-Previewd-Token: {token}\r\n"),
    )
    .await;
    assert_eq!(code, 200);
    assert!(body.contains(hello), "{body}");
    // Host routing.
    let (code, _, body) = get(
        proxy,
        "app.default.preview.localhost",
        "/",
        &format!("X-Previewd-Token: {token}\r\n"),
    )
    .await;
    assert_eq!((code, body.contains(hello)), (200, true));
    // No token, a wrong one, another link's.
    assert_eq!(get(proxy, "127.0.0.1", "/p/app.default/", "").await.0, 401);
    assert_eq!(
        get(
            proxy,
            "127.0.0.1",
            "/p/app.default/",
            "X-Previewd-Token: wrong\r\n"
        )
        .await
        .0,
        403
    );
    assert_eq!(
        get(
            proxy,
            "127.0.0.1",
            "/p/other.default/",
            &format!("X-Previewd-Token: {token}\r\n")
        )
        .await
        .0,
        403,
        "a token for one link does not open another"
    );
    // The query form sets an HttpOnly cookie scoped to the link (a browser is sent on to the
    // URL without the token); the cookie then works alone.
    let (code, head, _) = get(
        proxy,
        "127.0.0.1",
        &format!("/p/app.default/?previewd_token={token}"),
        "Accept: text/html\r\n",
    )
    .await;
    assert_eq!(code, 303, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\nlocation: /p/app.default/\r\n"),
        "{head}"
    );
    let cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("Path=/p/app.default/"),
        "{cookie}"
    );
    assert_eq!(
        get(
            proxy,
            "127.0.0.1",
            "/p/app.default/",
            &format!("Cookie: theme=dark; previewd_token={token}\r\n")
        )
        .await
        .0,
        200
    );
    // Browsers get a small HTML page with the code; API clients JSON.
    let (code, _, page) = get(
        proxy,
        "127.0.0.1",
        "/p/app.default/",
        "Accept: text/html\r\n",
    )
    .await;
    assert_eq!(code, 401);
    assert!(
        page.contains("TOKEN_MISSING") && page.contains("<h1>"),
        "{page}"
    );
    let (_, _, json) = get(proxy, "127.0.0.1", "/p/app.default/", "").await;
    assert!(json.contains("\"error\":\"TOKEN_MISSING\""), "{json}");

    // A public, direct link; a link to a closed port.
    let (code, _, body) = get(proxy, "127.0.0.1", "/p/direct.default/", "").await;
    assert_eq!((code, body.contains(hello)), (200, true), "{body}");
    let (code, _, body) = get(proxy, "127.0.0.1", "/p/closed.default/", "").await;
    assert_eq!(code, 502);
    assert!(body.contains("PORT_CLOSED"), "{body}");

    // No open proxy: unknown hosts, absolute-form targets and unknown links go nowhere.
    assert_eq!(get(proxy, "evil.example.com", "/", "").await.0, 404);
    let (code, _, _) = exchange(proxy, "GET http://evil.example.com/ HTTP/1.1\r\nHost: evil.example.com\r\nConnection: close\r\n\r\n").await;
    assert_eq!(code, 404);
    assert_eq!(
        get(proxy, "127.0.0.1", "/p/../p/app.default/", "").await.0,
        404
    );
    assert_eq!(
        get(proxy, "127.0.0.1", "/p/missing.default/", "").await.0,
        404
    );

    // Requests are counted by status code, without per-link labels.
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .unwrap_or_default();
    let metrics = server
        .client()
        .request_text(req)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for line in [
        r#"previewd_proxy_requests_total{code="200"}"#,
        r#"previewd_proxy_requests_total{code="401"}"#,
        "previewd_proxy_upstream_latency_seconds_count",
    ] {
        assert!(metrics.contains(line), "{line} missing from {metrics}");
    }
    assert!(!metrics.contains("app.default"), "no per-link labels");

    // Deleting a link revokes it at once.
    links
        .delete("app", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = std::time::Instant::now();
    eventually(
        Duration::from_secs(5),
        "the deleted link to answer 404",
        || async {
            (get(
                proxy,
                "127.0.0.1",
                "/p/app.default/",
                &format!("X-Previewd-Token: {token}\r\n"),
            )
            .await
            .0 == 404)
                .then_some(())
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "revocation took {:?}",
        started.elapsed()
    );
}

/// A WebSocket to `path` on `proxy`, authenticated by the token header.
async fn token_websocket(
    proxy: SocketAddr,
    path: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://127.0.0.1:{}{path}", proxy.port())
        .into_client_request()
        .unwrap_or_else(|e| panic!("{e}"));
    request.headers_mut().insert(
        "x-previewd-token",
        token.parse().unwrap_or_else(|e| panic!("{e}")),
    );
    let tcp = TcpStream::connect(proxy)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (ws, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .unwrap_or_else(|e| panic!("websocket handshake: {e}"));
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_sse_and_large_bodies_stream_through_the_agent() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let app = TestContainer::testapp(rt.client(), "127.0.0.1:3000", HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // The agent's relay, as previewd uses it without the privilege to enter namespaces.
    let server = crate::docker::server_with(state.path(), RELAY);
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    links
        .create(
            &PostParams::default(),
            &link("live", &app.name, 3000, serde_json::json!({})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ready(&links, "live").await;
    let proxy = server.proxy;
    let token = token_of(&server, "live");
    let auth = format!("X-Previewd-Token: {token}\r\n");

    // What the app sees: Host rewritten for dev servers, forwarding headers, no previewd token,
    // its own Authorization untouched.
    let (code, _, seen) = get(
        proxy,
        "127.0.0.1",
        "/p/live.default/headers",
        &format!("{auth}Authorization: Bearer app-own\r\n"),
    )
    .await;
    assert_eq!(code, 200);
    assert!(seen.contains("host: localhost:3000"), "{seen}");
    assert!(
        seen.contains("x-forwarded-for: 127.0.0.1") && seen.contains("x-forwarded-proto: http"),
        "{seen}"
    );
    assert!(
        seen.contains("authorization: Bearer app-own") && !seen.contains("x-previewd-token"),
        "{seen}"
    );

    // WebSocket echo, text and binary, 1 MiB messages.
    let mut ws = token_websocket(proxy, "/p/live.default/ws", &token).await;
    let text = "t".repeat(1 << 20);
    let binary: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    ws.send(Message::text(text.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ws.send(Message::binary(binary.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let echoed_text = ws
        .next()
        .await
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no text echo"));
    let echoed_binary = ws
        .next()
        .await
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no binary echo"));
    assert_eq!(
        echoed_text.into_text().map(|t| t.len()).ok(),
        Some(text.len())
    );
    assert_eq!(echoed_binary.into_data().as_ref(), binary.as_slice());
    let _ = ws.close(None).await;

    // Server-sent events arrive one by one, not when the stream ends.
    let mut s = TcpStream::connect(proxy)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = std::time::Instant::now();
    s.write_all(format!("GET /p/live.default/sse?n=4&ms=400 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}\r\n").as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut seen = Vec::new();
    let mut first_event = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if first_event.is_none() && String::from_utf8_lossy(&seen).contains("data: event 0") {
            first_event = Some(started.elapsed());
        }
    }
    let total = started.elapsed();
    let first =
        first_event.unwrap_or_else(|| panic!("no event: {}", String::from_utf8_lossy(&seen)));
    assert!(String::from_utf8_lossy(&seen).contains("data: event 3"));
    assert!(
        total >= Duration::from_millis(1200) && first < total - Duration::from_millis(800),
        "first event at {first:?}, stream ended at {total:?}"
    );

    // 1 GiB down and 1 GiB up through the proxy and the agent, with flat memory.
    const GIB: u64 = 1 << 30;
    let mut s = TcpStream::connect(proxy)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(format!("GET /p/live.default/download?bytes={GIB} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}\r\n").as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut received = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    assert!(
        received > GIB,
        "received {received} bytes (head + 1 GiB body)"
    );
    let mut s = TcpStream::connect(proxy)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(format!("POST /p/live.default/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {GIB}\r\n{auth}\r\n").as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    let chunk = vec![b'u'; 256 * 1024];
    let mut sent = 0u64;
    while sent < GIB {
        s.write_all(&chunk)
            .await
            .unwrap_or_else(|e| panic!("upload: {e}"));
        sent += chunk.len() as u64;
    }
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(answer.ends_with(&GIB.to_string()), "{answer}");
    let peak = server.peak_rss();
    assert!(
        peak > 0 && peak < 256 << 20,
        "previewd peaked at {} MiB while 2 GiB streamed through it",
        peak >> 20
    );

    // A container restart: the link serves again without anyone touching it.
    rt.client()
        .restart_container(&app.name, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eventually(
        Duration::from_secs(60),
        "the link to serve again after the restart",
        || async {
            (get(proxy, "127.0.0.1", "/p/live.default/", &auth).await.0 == 200).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_without_a_network_are_served_through_exec() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let host = HostConfig {
        network_mode: Some("none".into()),
        ..Default::default()
    };
    let isolated = TestContainer::testapp(rt.client(), "127.0.0.1:3000", host).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = crate::docker::server_with(state.path(), RELAY);
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    links
        .create(
            &PostParams::default(),
            &link("isolated", &isolated.name, 3000, serde_json::json!({})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ready(&links, "isolated").await;
    let upstream = links
        .get("isolated")
        .await
        .ok()
        .and_then(|l| l.status?.upstream)
        .unwrap_or_default();
    assert!(upstream.starts_with("agent+exec://"), "{upstream}");
    let token = token_of(&server, "isolated");
    let auth = format!("X-Previewd-Token: {token}\r\n");
    for _ in 0..3 {
        let (code, _, body) = get(server.proxy, "127.0.0.1", "/p/isolated.default/", &auth).await;
        assert_eq!(
            (code, body.contains("hello from testapp")),
            (200, true),
            "{body}"
        );
    }
    // Streams that pause keep flowing, also after the shared agent is reconciled again
    // (re-injection must not stop live stdio tunnels).
    let mut s = TcpStream::connect(server.proxy)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(format!("GET /p/isolated.default/sse?n=4&ms=500 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let injections: Api<previewd::resources::DaemonInjection> =
        Api::default_namespaced(server.client());
    let di = injections
        .list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .items;
    let di_name = di
        .first()
        .and_then(|d| d.metadata.name.clone())
        .unwrap_or_default();
    // A label change is a spec-less write that makes the injection reconcile now.
    injections
        .patch(
            &di_name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"metadata": {"labels": {"poke": "1"}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut seen = String::new();
    s.read_to_string(&mut seen)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(seen.contains("data: event 3"), "the stream was cut: {seen}");
    drop(s);

    // Each WebSocket is an exec of its own, owed only while it is open: closed, none stays
    // (the pool may keep the idle keep-alive ones above for a while; those are counted first).
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let pooled = crate::docker::stdio_agent_processes(&rt, &isolated.name).await;
    let mut sockets = Vec::new();
    for _ in 0..5 {
        let mut ws = token_websocket(server.proxy, "/p/isolated.default/ws", &token).await;
        ws.send(Message::text("ping"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(ws.next().await.is_some_and(|m| m.is_ok()), "no echo");
        sockets.push(ws);
    }
    assert!(crate::docker::stdio_agent_processes(&rt, &isolated.name).await >= 5);
    for mut ws in sockets {
        let _ = ws.close(None).await;
    }
    eventually(
        Duration::from_secs(15),
        "the WebSockets' exec'd agents to exit with their connections",
        || async {
            (crate::docker::stdio_agent_processes(&rt, &isolated.name).await <= pooled)
                .then_some(())
        },
    )
    .await;
}

/// The local addresses (hex, as the kernel writes them) of the IPv4 sockets listening on
/// `port` in this network namespace.
fn listening_v4(port: u16) -> Vec<String> {
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, p) = f.get(1)?.split_once(':')?;
            (f.get(3) == Some(&"0A") && u16::from_str_radix(p, 16).ok()? == port)
                .then(|| addr.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_containers_are_reached_on_loopback_and_leave_nothing_behind() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    // The app shares the host's network: it needs a port free here.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let host = HostConfig {
        network_mode: Some("host".into()),
        ..Default::default()
    };
    let app = TestContainer::testapp(rt.client(), &format!("127.0.0.1:{port}"), host).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = crate::docker::server(state.path());
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    links
        .create(
            &PostParams::default(),
            &link("hostnet", &app.name, i32::from(port), serde_json::json!({})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ready(&links, "hostnet").await;
    let injections: Api<previewd::resources::DaemonInjection> =
        Api::default_namespaced(server.client());
    let di = injections
        .list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .items;
    let endpoint: SocketAddr = di
        .first()
        .and_then(|d| d.status.as_ref()?.endpoint.as_deref()?.parse().ok())
        .unwrap_or_else(|| panic!("no TCP endpoint: {di:?}"));
    assert!(endpoint.ip().is_loopback(), "{endpoint}");
    // The agent listens on the host's loopback only, not on its other interfaces.
    assert_eq!(listening_v4(endpoint.port()), vec!["0100007F".to_owned()]);

    let token = token_of(&server, "hostnet");
    let auth = format!("X-Previewd-Token: {token}\r\n");
    let mut sockets = Vec::new();
    for _ in 0..20 {
        sockets.push(token_websocket(server.proxy, "/p/hostnet.default/ws", &token).await);
    }
    for ws in &mut sockets {
        ws.send(Message::text("ping"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let echo = ws
            .next()
            .await
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("no echo"));
        assert_eq!(echo.into_text().ok().as_deref(), Some("ping"));
    }
    let (code, _, body) = get(server.proxy, "127.0.0.1", "/p/hostnet.default/", &auth).await;
    assert_eq!(
        (code, body.contains("hello from testapp")),
        (200, true),
        "{body}"
    );
    // No tunnel was an exec of its own.
    assert_eq!(
        crate::docker::stdio_agent_processes(&rt, &app.name).await,
        0
    );
    for mut ws in sockets {
        let _ = ws.close(None).await;
    }
    assert_eq!(crate::docker::agent_processes(&rt, &app.name).await, 1);
}

/// A testapp listening on 0.0.0.0:8080, a previewd server (with `env`) and a Ready public
/// `via: direct` link `name` to it: what the tests of the proxy's own behaviour stand on.
/// `None` without Docker (when the tests may skip).
struct DirectLink {
    server: Server,
    _state: tempfile::TempDir,
    _app: TestContainer,
}

async fn testapp_behind_direct_link(name: &str, env: &[(&str, &str)]) -> Option<DirectLink> {
    let rt = docker().await?;
    images(rt.client()).await;
    let app = TestContainer::testapp(rt.client(), "0.0.0.0:8080", HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = crate::docker::server_with(state.path(), env);
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    links
        .create(
            &PostParams::default(),
            &link(
                name,
                &app.name,
                8080,
                serde_json::json!({"via": "direct", "access": "public"}),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ready(&links, name).await;
    Some(DirectLink {
        server,
        _state: state,
        _app: app,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_but_long_streams_are_not() {
    let Some(linked) =
        testapp_behind_direct_link("slow", &[("PREVIEWD_PROXY_HEADER_TIMEOUT_MS", "1000")]).await
    else {
        return;
    };
    let proxy = linked.server.proxy;

    // A head that never ends: the connection is closed once the limit has passed (hyper may
    // first answer 408).
    let mut s = TcpStream::connect(proxy)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = std::time::Instant::now();
    s.write_all(b"GET /p/slow.default/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "a partial head was not cut within 10 s");
    let answer = String::from_utf8_lossy(&out);
    assert!(
        out.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "cut after {took:?}, before the limit"
    );

    // A stream that outlives the limit many times over is not cut by it.
    let (code, _, body) = get(proxy, "127.0.0.1", "/p/slow.default/sse?n=4&ms=800", "").await;
    assert_eq!(code, 200);
    for i in 0..4 {
        assert!(body.contains(&format!("data: event {i}\n")), "{body}");
    }
}

/// One request on a kept-alive client connection to the proxy, sent with hyper's client.
async fn send_on(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    method: &str,
    path: &str,
    body: &'static [u8],
) -> (u16, String) {
    use http_body_util::BodyExt;
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(body)))
        .unwrap_or_else(|e| panic!("{e}"));
    // The previous response's end reaches the connection's task a moment after its body.
    sender
        .ready()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: the connection closed: {e}"));
    let resp = sender
        .send_request(req)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let code = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{method} {path} body: {e}"))
        .to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// The upstream drops a kept-alive connection without notice between two requests of one
/// client connection: the next requests are still answered, whether bodyless (the proxy's
/// own HTTP/1.1 client) or with a body (hyper's, which takes over a plain connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_closed_while_kept_alive_are_replaced() {
    let Some(linked) = testapp_behind_direct_link("keep", &[]).await else {
        return;
    };
    let stream = TcpStream::connect(linked.server.proxy)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(conn);
    let upload = &[b'u'; 100_000][..];
    for round in 0..3 {
        let bye = send_on(&mut sender, "GET", "/p/keep.default/bye", b"").await;
        assert_eq!(bye, (200, "bye\n".into()), "round {round}");
        // The upstream has closed the connection the proxy keeps for this client.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let hello = send_on(&mut sender, "GET", "/p/keep.default/", b"").await;
        assert_eq!(hello, (200, "hello from testapp\n".into()), "round {round}");
        // A body: the kept plain connection goes to hyper's client.
        let counted = send_on(&mut sender, "POST", "/p/keep.default/upload", upload).await;
        assert_eq!(counted, (200, "100000".into()), "round {round}");
        let hello = send_on(&mut sender, "GET", "/p/keep.default/", b"").await;
        assert_eq!(hello, (200, "hello from testapp\n".into()), "round {round}");
        // The upstream drops the connection hyper now drives.
        let bye = send_on(&mut sender, "GET", "/p/keep.default/bye", b"").await;
        assert_eq!(bye, (200, "bye\n".into()), "round {round}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let counted = send_on(&mut sender, "POST", "/p/keep.default/upload", upload).await;
        assert_eq!(counted, (200, "100000".into()), "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_links_go_direct_to_wildcard_ports_and_follow_the_binding() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let public = TestContainer::testapp(rt.client(), "0.0.0.0:8080", HostConfig::default()).await;
    // busybox httpd started (and later moved) by exec, so the container keeps running.
    let moving = TestContainer::run(
        rt.client(),
        crate::containers::BUSYBOX_IMAGE,
        Some(vec!["/bin/sleep", "3600"]),
        HostConfig::default(),
        None,
        true,
    )
    .await;
    // A killed httpd holds its port until it has exited: the next one binds only after
    // nothing listens on port 3000 (0BB8) any more, and says whether it started.
    let httpd = |addr: &str| {
        format!(
            "ps -o pid,args | while read p a; do case \"$a\" in httpd*) kill $p;; esac; done; \
             i=0; while grep -q ':0BB8 00000000:0000 0A' /proc/net/tcp && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; \
             httpd -p {addr} -h /www && echo started"
        )
    };
    let start_httpd = |addr: &'static str| {
        let (rt, container) = (&rt, moving.name.clone());
        async move {
            let out = crate::docker::sh(rt, &container, &["/bin/sh", "-c", &httpd(addr)]).await;
            assert!(out.contains("started"), "httpd on {addr}: {out:?}");
        }
    };
    start_httpd("127.0.0.1:3000").await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = crate::docker::server(state.path());
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    for l in [
        link(
            "wide",
            &public.name,
            8080,
            serde_json::json!({"access": "public"}),
        ),
        link(
            "narrow",
            &moving.name,
            3000,
            serde_json::json!({"access": "public"}),
        ),
    ] {
        links
            .create(&PostParams::default(), &l)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // The route a link settles on (the agent reads the ports once it runs).
    let route_of = |name: &'static str, route: &'static str| {
        let links = links.clone();
        async move {
            eventually(
                Duration::from_secs(60),
                &format!("{name}'s route to be {route:?}"),
                || {
                    let links = links.clone();
                    async move {
                        let st = links.get(name).await.ok()?.status?;
                        st.route.as_deref()?.starts_with(route).then_some(st)
                    }
                },
            )
            .await
        }
    };
    let wide = route_of("wide", "direct: port 8080 listens on 0.0.0.0").await;
    assert!(
        wide.upstream
            .as_deref()
            .is_some_and(|u| u.starts_with("http://")),
        "{wide:?}"
    );
    // Bound to loopback: from inside the container's network namespace when previewd may
    // enter it, else through the agent.
    let (route, scheme) = if previewd::runtime::netns::may_enter() {
        ("netns: port 3000 listens on 127.0.0.1 only", "netns://")
    } else {
        ("agent: port 3000 listens on 127.0.0.1 only", "agent://")
    };
    let narrow = route_of("narrow", route).await;
    assert!(
        narrow
            .upstream
            .as_deref()
            .is_some_and(|u| u.starts_with(scheme)),
        "{narrow:?}"
    );
    for id in ["wide", "narrow"] {
        serves(
            server.proxy,
            &format!("{id}.default.preview.localhost"),
            "/",
            "",
        )
        .await;
    }
    // The app moves to the wildcard address: the link follows, and still serves.
    start_httpd("0.0.0.0:3000").await;
    let moved = route_of("narrow", "direct: port 3000 listens on 0.0.0.0").await;
    assert!(
        moved
            .upstream
            .as_deref()
            .is_some_and(|u| u.starts_with("http://")),
        "{moved:?}"
    );
    let body = serves(server.proxy, "narrow.default.preview.localhost", "/", "").await;
    assert!(body.contains("hello from busybox httpd"), "{body}");
}

/// The body of `path` on `host` once the proxy answers 200. The proxy routes from its watch
/// of the links, which follows a status write by moments (as an ingress controller follows
/// the API server): a test that has just read a status waits here for the proxy to hold it.
async fn serves(proxy: SocketAddr, host: &str, path: &str, extra: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (code, _, body) = get(proxy, host, path, extra).await;
        if code == 200 {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{host} still answers {code} {body} after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether previewd may enter containers' network namespaces here; required with the Docker
/// tests (CI runs them as root beside the engine).
fn netns_or_skip() -> bool {
    if previewd::runtime::netns::may_enter() {
        return true;
    }
    assert!(
        std::env::var("PREVIEWD_REQUIRE_DOCKER").as_deref() != Ok("1"),
        "the Docker tests are required (PREVIEWD_REQUIRE_DOCKER=1) but this user cannot enter network namespaces (run them as root)"
    );
    eprintln!("\n!!!!! SKIPPED: cannot enter network namespaces (not root) !!!!!\n");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_to_loopback_ports_connect_inside_the_containers_network_namespace() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let Some(rt) = docker().await else { return };
    if !netns_or_skip() {
        return;
    }
    images(rt.client()).await;
    let app = TestContainer::testapp(rt.client(), "127.0.0.1:3000", HostConfig::default()).await;
    let none = HostConfig {
        network_mode: Some("none".into()),
        ..Default::default()
    };
    let isolated = TestContainer::testapp(rt.client(), "127.0.0.1:3000", none).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = crate::docker::server(state.path());
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    for l in [
        link("app", &app.name, 3000, serde_json::json!({})),
        link(
            "pinned",
            &app.name,
            3000,
            serde_json::json!({"via": "agent"}),
        ),
        link("isolated", &isolated.name, 3000, serde_json::json!({})),
    ] {
        links
            .create(&PostParams::default(), &l)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let pid_of = |name: String| {
        let rt = rt.clone();
        async move {
            rt.client()
                .inspect_container(&name, None)
                .await
                .ok()
                .and_then(|c| c.state?.pid)
                .unwrap_or_default()
        }
    };
    let netns_upstream = |name: &'static str| {
        let links = links.clone();
        async move {
            let upstream = |l: PreviewLink| l.status?.upstream;
            eventually(
                Duration::from_secs(60),
                &format!("{name} to connect inside the namespace"),
                || {
                    let links = links.clone();
                    async move {
                        let u = links.get(name).await.ok().and_then(upstream)?;
                        u.starts_with("netns://").then_some(u)
                    }
                },
            )
            .await
        }
    };
    for (name, container, why) in [
        ("app", &app.name, "port 3000 listens on 127.0.0.1 only"),
        ("pinned", &app.name, "spec.via is agent"),
        (
            "isolated",
            &isolated.name,
            "the container has no routable address",
        ),
    ] {
        let upstream = netns_upstream(name).await;
        let pid = pid_of(container.clone()).await;
        assert!(
            upstream.starts_with(&format!("netns://{pid}/3000?ns=")),
            "{name}: {upstream} (container pid {pid})"
        );
        let route = links
            .get(name)
            .await
            .ok()
            .and_then(|l| l.status?.route)
            .unwrap_or_default();
        assert!(
            route.starts_with(&format!("netns: {why};")),
            "{name}: {route}"
        );
        let token = token_of(&server, name);
        let auth = format!("X-Previewd-Token: {token}\r\n");
        let (code, _, seen) = get(
            server.proxy,
            "127.0.0.1",
            &format!("/p/{name}.default/headers"),
            &auth,
        )
        .await;
        assert_eq!(code, 200, "{name}: {seen}");
        // As through the agent, the app is addressed as localhost.
        assert!(seen.contains("host: localhost:3000"), "{name}: {seen}");
    }

    // WebSockets and large bodies stream through the namespace's loopback.
    let token = token_of(&server, "app");
    let mut ws = token_websocket(server.proxy, "/p/app.default/ws", &token).await;
    ws.send(Message::Text("through the namespace".into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    assert!(
        matches!(&echoed, Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "through the namespace"),
        "{echoed:?}"
    );
    let auth = format!("X-Previewd-Token: {token}\r\n");
    let (code, _, body) = get(
        server.proxy,
        "127.0.0.1",
        "/p/app.default/download?bytes=8388608",
        &auth,
    )
    .await;
    let streamed = body.bytes().filter(|b| *b == b'x').count();
    assert_eq!((code, streamed), (200, 8 << 20));

    // The agent is not on the way: with it gone, the link still serves.
    let ps = crate::docker::sh(&rt, &app.name, &["/bin/ps", "-o", "pid,args"]).await;
    let agents: Vec<&str> = ps
        .lines()
        .filter(|l| l.contains("previewd-agent serve"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(agents.len(), 1, "{ps}");
    let kill: Vec<&str> = ["/bin/kill", "-9"].into_iter().chain(agents).collect();
    crate::docker::sh(&rt, &app.name, &kill).await;
    eventually(Duration::from_secs(10), "the agent to be gone", || async {
        (crate::docker::agent_processes(&rt, &app.name).await == 0).then_some(())
    })
    .await;
    let (code, _, body) = get(server.proxy, "127.0.0.1", "/p/app.default/", &auth).await;
    assert_eq!((code, body.as_str()), (200, "hello from testapp\n"));

    // A restarted container has a new pid: the link follows it, and never enters the old one.
    let before = netns_upstream("app").await;
    rt.client()
        .restart_container(&app.name, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = pid_of(app.name.clone()).await;
    eventually(
        Duration::from_secs(60),
        "the link to follow the restarted container",
        || async {
            let u = links.get("app").await.ok()?.status?.upstream?;
            (u != before && u.starts_with(&format!("netns://{pid}/"))).then_some(())
        },
    )
    .await;
    let body = serves(server.proxy, "127.0.0.1", "/p/app.default/", &auth).await;
    assert_eq!(body, "hello from testapp\n");
}

/// previewd as a member of the engine's group, not root (it may not enter namespaces): a
/// link to an app bound to 127.0.0.1 gets sockets the agent's helper connected in the
/// container and handed over, not the relay; the helper runs as previewd's user and goes
/// with the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_privilege_links_to_loopback_ports_get_sockets_handed_over() {
    use std::os::unix::fs::MetadataExt;

    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let app = TestContainer::testapp(rt.client(), "127.0.0.1:3000", HostConfig::default()).await;
    // Nobody, in the group that may use the engine's socket: a developer in `docker`.
    const NOBODY: u32 = 65534;
    let engine_group = std::fs::metadata("/var/run/docker.sock")
        .map(|m| m.gid())
        .unwrap_or_else(|e| panic!("the engine's socket: {e}"));
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::chown(state.path(), Some(NOBODY), Some(NOBODY))
        .unwrap_or_else(|e| panic!("{e}"));
    let wrapper: Vec<String> = vec![
        "setpriv".into(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        format!("--groups={engine_group}"),
        "--inh-caps=-all".into(),
        "--bounding-set=-all".into(),
    ];
    let env = [(
        "PREVIEWD_AGENT_BINARY",
        env!("CARGO_BIN_EXE_previewd-agent"),
    )];
    let server = Server::try_start_as(&wrapper, state.path(), "127.0.0.1:0", &env)
        .unwrap_or_else(|e| panic!("previewd serve did not start as nobody: {e}"));
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    links
        .create(
            &PostParams::default(),
            &link("app", &app.name, 3000, serde_json::json!({})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = eventually(
        Duration::from_secs(60),
        "app to get handed-over sockets",
        || {
            let links = links.clone();
            async move {
                let st = links.get("app").await.ok()?.status?;
                (st.phase == Some(LinkPhase::Ready)
                    && st.upstream.as_deref()?.starts_with("handoff://"))
                .then_some(st)
            }
        },
    )
    .await;
    assert!(
        status
            .route
            .as_deref()
            .is_some_and(|r| r.starts_with("handoff: port 3000 listens on 127.0.0.1 only")),
        "{status:?}"
    );
    let token = token_of(&server, "app");
    let auth = format!("X-Previewd-Token: {token}\r\n");
    // The app answers, and sees a connection from its own loopback (no relay in between
    // would look different: the relay's connections come from loopback too, so the route
    // above is what says which path it was; this says the path works, repeatedly).
    for _ in 0..3 {
        let (code, _, seen) = get(server.proxy, "127.0.0.1", "/p/app.default/headers", &auth).await;
        assert_eq!(code, 200, "{seen}");
        assert!(
            seen.to_ascii_lowercase().contains("localhost:3000"),
            "{seen}"
        );
    }
    // A closed port is said to be closed, as the relay says it.
    links
        .create(
            &PostParams::default(),
            &link(
                "closed",
                &app.name,
                3999,
                serde_json::json!({"via": "agent"}),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ready(&links, "closed").await;
    let closed_token = token_of(&server, "closed");
    let (code, _, body) = get(
        server.proxy,
        "127.0.0.1",
        "/p/closed.default/",
        &format!("X-Previewd-Token: {closed_token}\r\n"),
    )
    .await;
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("PORT_CLOSED"), "{body}");
    // One helper, running as previewd's user (named `nobody` where the image has it).
    assert_eq!(crate::docker::handoff_helpers(&rt, &app.name).await, 1);
    let owners = crate::docker::sh(&rt, &app.name, &["/bin/ps", "-o", "user,args"]).await;
    assert!(
        owners.lines().any(|l| l.contains("previewd-agent handoff")
            && ["nobody ", "65534 "]
                .iter()
                .any(|u| l.trim_start().starts_with(u))),
        "{owners}"
    );
    // Deleting the links takes the agent, and its helper, away.
    for name in ["app", "closed"] {
        links
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    eventually(
        Duration::from_secs(30),
        "the agent and its helper to go",
        || {
            let rt = rt.clone();
            let name = app.name.clone();
            async move {
                (crate::docker::agent_processes(&rt, &name).await == 0
                    && crate::docker::handoff_helpers(&rt, &name).await == 0)
                    .then_some(())
            }
        },
    )
    .await;
}

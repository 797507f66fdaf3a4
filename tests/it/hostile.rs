//! Hostile clients against the real `previewd serve`, through real sockets: what a web page in
//! the user's browser, a tenant writing objects, or a malformed message can try.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bollard::models::HostConfig;
use futures::{SinkExt, StreamExt};
use kube::api::{Api, PostParams};
use previewd::resources::PreviewLink;
use previewd::resources::preview_link::LinkPhase;
use serde_json::{Value, json};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Server, eventually, exchange};
use crate::containers::{TestContainer, docker, images};
use crate::docker::{link, wait_link};

/// One raw request to the API listener of `server`: status, head and body as JSON
/// (`Value::Null` when the body is not JSON).
async fn api(server: &Server, request: &str) -> (u16, String, Value) {
    let addr = server.url.trim_start_matches("http://");
    let (code, head, body) = exchange(addr, request).await;
    (
        code,
        head,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

const INJECTION: &str = r#"{"apiVersion":"previewd.dev/v1alpha1","kind":"DaemonInjection","metadata":{"name":"evil"},"spec":{"target":{"docker":{"container":"victim"}},"daemon":{"source":{"hostPath":"/etc/shadow"}}}}"#;

/// The object `name` of the DaemonInjections, as the API answers a local GET for it.
async fn injection_code(server: &Server, name: &str) -> u16 {
    let addr = server.url.trim_start_matches("http://");
    let path = format!("/apis/previewd.dev/v1alpha1/namespaces/default/daemoninjections/{name}");
    api(
        server,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_drive_the_loopback_api() {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = Server::api_only(state.path());
    let addr = server.url.trim_start_matches("http://").to_owned();
    let secrets = "/api/v1/namespaces/default/secrets";

    // DNS rebinding: evil.example resolves to 127.0.0.1, the browser sends its own name.
    for host in [
        "rebound.evil.example",
        "rebound.evil.example:8001",
        "localhost.evil.example",
    ] {
        let (code, _, body) = api(
            &server,
            &format!("GET {secrets} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(code, 403, "{host}: {body}");
        assert_eq!(body["kind"], "Status", "{body}");
        assert_eq!(body["reason"], "Forbidden", "{body}");
    }
    // The listener's own names are served.
    let port = addr.rsplit_once(':').map_or("", |(_, p)| p).to_owned();
    for host in [
        addr.clone(),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        let (code, _, body) = api(
            &server,
            &format!("GET {secrets} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(code, 200, "{host}: {body}");
    }

    // A cross-site "simple request" (no preflight): text/plain, a form.
    let create = "/apis/previewd.dev/v1alpha1/namespaces/default/daemoninjections";
    for content_type in [
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
    ] {
        let (code, _, body) = api(
            &server,
            &format!(
                "POST {create} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{INJECTION}",
                INJECTION.len()
            ),
        )
        .await;
        assert_eq!(code, 415, "{content_type}: {body}");
        assert_eq!(body["reason"], "UnsupportedMediaType", "{body}");
    }
    // No Content-Type at all is no JSON either.
    let (code, _, _) = api(
        &server,
        &format!(
            "POST {create} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{INJECTION}",
            INJECTION.len()
        ),
    )
    .await;
    assert_eq!(code, 415);
    // The same write from another site's page with a JSON body (a CORS request: Origin).
    let (code, _, body) = api(
        &server,
        &format!(
            "POST {create} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nOrigin: https://evil.example\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{INJECTION}",
            INJECTION.len()
        ),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        injection_code(&server, "evil").await,
        404,
        "nothing was created"
    );

    // Fetch metadata: a cross-site GET (an <img>, a no-cors fetch) is refused too.
    let (code, _, _) = api(
        &server,
        &format!(
            "GET {secrets} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nSec-Fetch-Site: cross-site\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(code, 403);

    // The REST shim: the same rules, its own error shape.
    let inject = "/api/daemon-proxy/container/victim/inject";
    let (code, _, body) = api(
        &server,
        &format!(
            "POST {inject} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nOrigin: https://evil.example\r\nContent-Length: 0\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(
        (code, body["code"].as_str()),
        (403, Some("FORBIDDEN")),
        "{body}"
    );
    let (code, _, body) = api(
        &server,
        &format!(
            "POST {inject} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
        ),
    )
    .await;
    assert_eq!(
        (code, body["code"].as_str()),
        (415, Some("UNSUPPORTED_MEDIA_TYPE")),
        "{body}"
    );
    let (code, _, body) = api(
        &server,
        "GET /api/daemon-proxy/service/status HTTP/1.1\r\nHost: rebound.evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 403, "{body}");
    // A backend (no Origin, no body) is served as before.
    let (code, _, body) = api(
        &server,
        &format!(
            "GET /api/daemon-proxy/service/status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_add_the_names_and_origins_they_serve() {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = Server::start_with(
        state.path(),
        &[
            crate::common::API_ONLY,
            ("PREVIEWD_API_ACCEPT_HOSTS", "previewd.internal,api.lan"),
            ("PREVIEWD_API_ACCEPT_ORIGINS", "https://console.example.com"),
        ],
    );
    let secrets = "/api/v1/namespaces/default/secrets";
    for (extra, want) in [
        ("Host: previewd.internal:8001\r\n", 200),
        ("Host: api.lan\r\n", 200),
        ("Host: other.lan\r\n", 403),
    ] {
        let (code, _, body) = api(
            &server,
            &format!("GET {secrets} HTTP/1.1\r\n{extra}Connection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(code, want, "{extra}: {body}");
    }
    let addr = server.url.trim_start_matches("http://");
    for (origin, want) in [
        ("https://console.example.com", 200),
        ("https://evil.example", 403),
    ] {
        let (code, _, body) = api(
            &server,
            &format!(
                "GET {secrets} HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(code, want, "{origin}: {body}");
    }
}

/// A container serving the test app on 8080 and its misbehaving raw upstream on 8081, a
/// previewd server with `env`, and links to them: `raw` (public, direct to 8081), `app`
/// (token, through the agent to 8080) and the `extra` ones (name, port, spec fields).
struct Fixture {
    server: Server,
    links: Api<PreviewLink>,
    _state: tempfile::TempDir,
    _app: TestContainer,
}

impl Fixture {
    async fn new(env: &[(&str, &str)], extra: &[(&str, i32, Value)]) -> Option<Fixture> {
        let rt = docker().await?;
        images(rt.client()).await;
        let app = TestContainer::testapp_with_raw(
            rt.client(),
            "0.0.0.0:8080",
            "0.0.0.0:8081",
            HostConfig::default(),
        )
        .await;
        let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let server = crate::docker::server_with(state.path(), env);
        let links: Api<PreviewLink> = Api::default_namespaced(server.client());
        let mut all = vec![
            ("raw", 8081, json!({"via": "direct", "access": "public"})),
            ("app", 8080, json!({})),
        ];
        all.extend(extra.iter().map(|(n, p, v)| (*n, *p, v.clone())));
        for (name, port, spec) in &all {
            links
                .create(
                    &PostParams::default(),
                    &link(name, &app.name, *port, spec.clone()),
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        for (name, _, _) in &all {
            wait_link(&links, name, LinkPhase::Ready).await;
        }
        Some(Fixture {
            server,
            links,
            _state: state,
            _app: app,
        })
    }

    fn token(&self, link: &str) -> String {
        let out = std::process::Command::new(crate::common::previewd_bin())
            .args(["token", link, "--server", &self.server.url])
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// One raw exchange with the proxy (the request as given, which should close).
    async fn send(&self, request: &str) -> (u16, String, String) {
        exchange(self.server.proxy, request).await
    }

    /// `GET path` of the link `id`'s host, with `extra` header lines.
    async fn get(&self, id: &str, path: &str, extra: &str) -> (u16, String, String) {
        self.send(&format!(
            "GET {path} HTTP/1.1\r\nHost: {id}.default.preview.localhost\r\nConnection: close\r\n{extra}\r\n"
        ))
        .await
    }

    /// `POST path` with a small body: the proxy's hyper path, on both sides.
    async fn post(&self, id: &str, path: &str) -> (u16, String, String) {
        self.send(&format!(
            "POST {path} HTTP/1.1\r\nHost: {id}.default.preview.localhost\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"
        ))
        .await
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_and_upstream_answers_never_reach_the_other_side_as_they_came() {
    let Some(f) = Fixture::new(
        &[("PREVIEWD_PUBLIC_URL", "https://preview.example.com")],
        &[],
    )
    .await
    else {
        return;
    };
    // No Host, two Hosts: on the proxy's own loop (GET) and on hyper's (a body).
    for request in [
        "GET /raw/204-length HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: raw.default.preview.localhost\r\nHost: app.default.preview.localhost\r\nConnection: close\r\n\r\n",
        "POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
        "POST / HTTP/1.1\r\nHost: raw.default.preview.localhost\r\nHost: app.default.preview.localhost\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
    ] {
        let (code, head, body) = f.send(request).await;
        assert_eq!(code, 400, "{request:?}: {head}\n{body}");
    }

    for (method, sent) in [("GET", true), ("POST", false)] {
        let f = &f;
        let call = |path: &'static str| async move {
            if sent {
                f.get("raw", path, "").await
            } else {
                f.post("raw", path).await
            }
        };
        // 204 and 304 carry no length and no body, whatever the upstream sent.
        for path in ["/raw/204-length", "/raw/304-length"] {
            let (code, head, body) = call(path).await;
            assert!(code == 204 || code == 304, "{method} {path}: {head}");
            assert_eq!(
                header(&head, "content-length"),
                None,
                "{method} {path}: {head}"
            );
            assert_eq!(
                header(&head, "transfer-encoding"),
                None,
                "{method} {path}: {head}"
            );
            assert_eq!(body, "", "{method} {path}");
        }
        // An upgrade announced on a 200 is no upgrade.
        let (code, head, body) = call("/raw/upgrade-headers").await;
        assert_eq!((code, body.as_str()), (200, "ok"), "{method}: {head}");
        assert_eq!(header(&head, "upgrade"), None, "{method}: {head}");
        assert!(
            header(&head, "connection").is_none_or(|c| !c.to_ascii_lowercase().contains("upgrade")),
            "{method}: {head}"
        );
        // A body cut short is seen cut short: fewer bytes than announced, or no last chunk.
        let (code, head, body) = call("/raw/cut-length").await;
        if code == 0 && !sent {
            assert_eq!(body, "", "{method}");
        } else if code == 200 {
            assert_eq!(
                header(&head, "content-length"),
                Some("100"),
                "{method}: {head}"
            );
            assert!(body.len() < 100, "{method}: {body:?}");
        } else {
            assert_eq!(code, 502, "{method}: {head}");
        }
        for path in ["/raw/cut-chunked", "/raw/lf-chunk"] {
            let (code, head, body) = call(path).await;
            // hyper's server (the POST) closes without a word when the body fails before
            // its head went out: an empty reply, which clients report as an error too.
            assert!(
                code == 200 || code == 502 || (code == 0 && !sent),
                "{method} {path}: {head}"
            );
            if code == 200 {
                assert!(
                    header(&head, "content-length").is_none() && !body.ends_with("0\r\n\r\n"),
                    "{method} {path}: the client was shown a whole body: {head}\n{body:?}"
                );
            }
        }
        // A switch of protocols nobody asked for.
        let (code, head, _) = call("/raw/101").await;
        assert_eq!(code, 502, "{method}: {head}");
    }

    // One parser decides what the token is and what is stripped: an encoded name
    // authenticates and never reaches the app.
    let token = f.token("app");
    for name in ["previewd%5Ftoken", "previewd%5ftoken", "%70reviewd_token"] {
        let (code, head, seen) = f
            .get("app", &format!("/headers?a=1&{name}={token}"), "")
            .await;
        // The query token is traded for a cookie.
        assert!(code == 200 || code == 303, "{name}: {head}");
        assert!(!seen.contains(&token), "{name} reached the app: {seen}");
    }
    // Cookies as browsers send them: a UTF-8 cookie beside the token cookie.
    let cookie = format!("Cookie: pref=\u{e9}t\u{e9}; previewd_token={token}; b=2\r\n");
    let (code, _, seen) = f.get("app", "/headers", &cookie).await;
    assert_eq!(code, 200, "{seen}");
    assert!(!seen.contains(&token), "{seen}");
    assert!(seen.contains("cookie: pref=\u{e9}t\u{e9}; b=2"), "{seen}");
    // Behind https, the token cookie is Secure.
    let (_, head, _) = f
        .get("app", &format!("/headers?previewd_token={token}"), "")
        .await;
    let set_cookie = header(&head, "set-cookie").unwrap_or_default();
    assert!(
        set_cookie.starts_with("previewd_token=") && set_cookie.contains("Secure"),
        "{head}"
    );
}

/// A connection to the proxy for the link `id` that has sent `request_line_and_headers` and
/// read the response head.
async fn streaming(proxy: SocketAddr, id: &str, path: &str, extra: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {id}.default.preview.localhost\r\n{extra}\r\n")
            .as_bytes(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            other => panic!(
                "no response head for {path} ({other:?}): {}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    s
}

/// A WebSocket to the test app's echo through the link `id`, with `token`.
async fn websocket(
    proxy: SocketAddr,
    id: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{id}.default.preview.localhost/ws")
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
        .unwrap_or_else(|e| panic!("websocket handshake through {id}: {e}"));
    ws
}

/// Reads `s` until the proxy closes it, at most `limit`: when it closed (`None`: it did not).
async fn closed_by(s: &mut TcpStream, limit: Duration) -> Option<Instant> {
    let read = async {
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()
}

/// Reads (and echoes nothing to) `ws` until the proxy closes it, at most `limit`.
async fn ws_closed_by(
    ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
    limit: Duration,
) -> Option<Instant> {
    let read = async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return Instant::now(),
                Some(Ok(m)) if m.is_close() => return Instant::now(),
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upstreams_time_out_and_slow_or_idle_clients_are_let_go() {
    let Some(f) = Fixture::new(
        &[
            ("PREVIEWD_PROXY_RESPONSE_TIMEOUT_SECONDS", "3"),
            ("PREVIEWD_PROXY_BODY_TIMEOUT_SECONDS", "1"),
            ("PREVIEWD_PROXY_IDLE_TIMEOUT_SECONDS", "2"),
        ],
        &[
            (
                "patient",
                8081,
                json!({"via": "direct", "access": "public", "timeouts": {"response": "10s"}}),
            ),
            (
                "hasty",
                8081,
                json!({"via": "direct", "access": "public", "timeouts": {"response": "1s", "connect": "1s"}}),
            ),
            (
                "quiet",
                8080,
                json!({"via": "direct", "access": "public", "timeouts": {"idle": "1s"}}),
            ),
        ],
    )
    .await
    else {
        return;
    };
    let timed = |id: &'static str, path: &'static str| {
        let f = &f;
        async move {
            let started = Instant::now();
            let (code, head, body) = f.get(id, path, "").await;
            (code, head, body, started.elapsed())
        }
    };
    // A silent upstream: 504 at the server's default, on both client paths.
    let (code, head, body, took) = timed("raw", "/raw/silent").await;
    assert_eq!(code, 504, "{head}\n{body}");
    assert!(body.contains("UPSTREAM_TIMEOUT"), "{body}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "{took:?}"
    );
    let started = Instant::now();
    let (code, _, _) = f.post("raw", "/raw/silent").await;
    assert_eq!(code, 504);
    assert!(started.elapsed() < Duration::from_secs(8));
    // Per link: a long poll that takes 5 s is waited for, or not.
    let (code, _, body, _) = timed("patient", "/raw/slow?ms=5000").await;
    assert_eq!((code, body.as_str()), (200, "slow"));
    let (code, _, _, took) = timed("hasty", "/raw/slow?ms=5000").await;
    assert_eq!(code, 504);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // A stream is not cut by the response timeout…
    let (code, _, body, _) = timed("raw", "/sse?n=1").await;
    assert_eq!(code, 404, "the raw upstream serves no /sse: {body}");
    let proxy = f.server.proxy;
    let mut sse = streaming(
        proxy,
        "app",
        "/sse?n=3&ms=1500",
        &format!("X-Previewd-Token: {}\r\n", f.token("app")),
    )
    .await;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), sse.read_to_end(&mut all))
        .await
        .unwrap_or_else(|_| panic!("the stream did not end"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        String::from_utf8_lossy(&all).contains("data: event 2"),
        "{}",
        String::from_utf8_lossy(&all)
    );
    // …but a link's idle limit closes a quiet one.
    let mut quiet = streaming(proxy, "quiet", "/sse?n=3&ms=4000", "").await;
    let opened = Instant::now();
    let closed = closed_by(&mut quiet, Duration::from_secs(10)).await;
    let after = closed.map(|c| c - opened);
    assert!(
        after.is_some_and(|a| a >= Duration::from_millis(900) && a < Duration::from_secs(3)),
        "the quiet stream was closed after {after:?}"
    );

    // A request body that stops coming ends the request.
    let mut slow = TcpStream::connect(proxy)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    slow.write_all(
        b"POST /upload HTTP/1.1\r\nHost: quiet.default.preview.localhost\r\nContent-Length: 1000\r\n\r\n0123456789",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let ended = closed_by(&mut slow, Duration::from_secs(10)).await;
    assert!(
        ended.is_some_and(|e| e - started < Duration::from_secs(5)),
        "a stalled body held the request for {:?}",
        ended.map(|e| e - started)
    );

    // A connection that says nothing is closed after the idle limit, without a word.
    let mut idle = TcpStream::connect(proxy)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("an idle connection was kept"))
        .unwrap_or_else(|e| panic!("{e}"));
    let took = started.elapsed();
    assert!(
        out.is_empty() && took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "{took:?} {out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_rotating_or_expiring_a_link_closes_its_open_streams_within_a_second() {
    let Some(f) = Fixture::new(
        &[],
        &[
            ("gone", 8080, json!({})),
            ("rotated", 8080, json!({})),
            ("expiring", 8080, json!({"ttl": "12s"})),
        ],
    )
    .await
    else {
        return;
    };
    let proxy = f.server.proxy;
    let open = |id: &'static str| {
        let f = &f;
        async move {
            let token = f.token(id);
            let ws = websocket(proxy, id, &token).await;
            let sse = streaming(
                proxy,
                id,
                "/sse?n=100000&ms=200",
                &format!("X-Previewd-Token: {token}\r\n"),
            )
            .await;
            (ws, sse, token)
        }
    };
    let (mut control_ws, mut control_sse, _) = open("app").await;
    let limit = Duration::from_secs(1);

    // Deleted.
    let (mut ws, mut sse, _) = open("gone").await;
    let asked = Instant::now();
    f.links
        .delete("gone", &Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (w, s) = (
        ws_closed_by(&mut ws, Duration::from_secs(5)).await,
        closed_by(&mut sse, Duration::from_secs(5)).await,
    );
    for (what, at) in [("websocket", w), ("event stream", s)] {
        let after = at.map(|t| t - asked);
        assert!(
            after.is_some_and(|a| a <= limit),
            "deleted: the {what} closed after {after:?}"
        );
    }

    // The token is rotated: its Secret is deleted, previewd issues a new one.
    let (mut ws, mut sse, old) = open("rotated").await;
    let old_hash = f
        .links
        .get("rotated")
        .await
        .ok()
        .and_then(|l| l.status.and_then(|s| s.token_hash))
        .unwrap_or_default();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::default_namespaced(f.server.client());
    secrets
        .delete("previewd-link-rotated", &Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rotated = eventually(Duration::from_secs(15), "a new token hash", || {
        let links = f.links.clone();
        let old_hash = old_hash.clone();
        async move {
            let hash = links.get("rotated").await.ok()?.status?.token_hash?;
            (hash != old_hash).then(Instant::now)
        }
    })
    .await;
    let (w, s) = (
        ws_closed_by(&mut ws, Duration::from_secs(5)).await,
        closed_by(&mut sse, Duration::from_secs(5)).await,
    );
    for (what, at) in [("websocket", w), ("event stream", s)] {
        // Measured from when the new hash was seen (polled): up to a poll before it.
        let after = at.map(|t| t.saturating_duration_since(rotated));
        assert!(
            after.is_some_and(|a| a <= limit),
            "rotated: the {what} closed after {after:?}"
        );
    }
    let (code, _, _) = f
        .get("rotated", "/", &format!("X-Previewd-Token: {old}\r\n"))
        .await;
    assert_eq!(code, 403, "the old token still opens the link");

    // Expired.
    let expiring = f
        .links
        .get("expiring")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let expires = expiring
        .status
        .and_then(|s| s.expires_at)
        .map(|t| std::time::SystemTime::from(t.0))
        .unwrap_or_else(|| panic!("no expiresAt"));
    let (mut ws, mut sse, _) = open("expiring").await;
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_else(|_| panic!("the link expired before its streams opened"));
    let (w, s) = (
        ws_closed_by(&mut ws, left + Duration::from_secs(5)).await,
        closed_by(&mut sse, left + Duration::from_secs(5)).await,
    );
    let expired_at = Instant::now() - expires.elapsed().unwrap_or_default();
    for (what, at) in [("websocket", w), ("event stream", s)] {
        let after = at.map(|t| t.saturating_duration_since(expired_at));
        assert!(
            after.is_some_and(|a| a <= limit)
                && at.is_some_and(|t| t + Duration::from_millis(50) >= expired_at),
            "expired: the {what} closed {after:?} after expiry"
        );
    }

    // The link nobody touched still streams.
    control_ws
        .send(tokio_tungstenite::tungstenite::Message::text("still here"))
        .await
        .unwrap_or_else(|e| panic!("the control websocket was closed: {e}"));
    let echo = tokio::time::timeout(Duration::from_secs(5), control_ws.next()).await;
    assert!(matches!(echo, Ok(Some(Ok(_)))), "{echo:?}");
    let mut b = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), control_sse.read(&mut b))
        .await
        .unwrap_or_else(|_| panic!("the control stream stalled"))
        .unwrap_or(0);
    assert!(n > 0, "the control stream was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_locks_nobody_else_out() {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = Server::api_only(state.path());
    let proxy = server.proxy;
    // The soft open-files limit was raised to the hard one.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid()))
        .unwrap_or_else(|e| panic!("{e}"));
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().skip(3).take(2).collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(files.len() == 2 && files[0] == files[1], "{limits}");
    assert!(
        server.log_text().contains("open-files limit"),
        "{}",
        server.log_text()
    );

    // 1,127 connections that send nothing, from one address.
    let mut flood = Vec::new();
    for _ in 0..1127 {
        match TcpStream::connect(proxy).await {
            Ok(s) => flood.push(s),
            Err(e) => panic!("connect {}: {e}", flood.len()),
        }
    }
    // Those over the per-client cap (256 by default) were told so at once.
    let mut refused = 0;
    for s in flood.iter_mut().skip(256) {
        let mut b = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await
            && String::from_utf8_lossy(&b[..n]).contains("TOO_MANY_CONNECTIONS")
        {
            refused += 1;
        }
    }
    assert!(
        refused >= 1127 - 256 - 8,
        "only {refused} connections were refused"
    );
    // Another client is served at once.
    let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
    socket
        .bind("127.0.0.2:0".parse().unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let mut other = tokio::time::timeout(Duration::from_secs(2), socket.connect(proxy))
        .await
        .unwrap_or_else(|_| panic!("connect timed out"))
        .unwrap_or_else(|e| panic!("{e}"));
    other
        .write_all(b"GET /p/none.default/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), other.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("another client was locked out"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!server.log_text().contains("Too many open files"));
}

/// A DaemonInjection of `container` whose daemon is the host file `path`, as JSON.
fn host_path_injection(name: &str, container: &str, path: &str) -> String {
    json!({
        "apiVersion": "previewd.dev/v1alpha1", "kind": "DaemonInjection",
        "metadata": {"name": name},
        "spec": {"target": {"docker": {"container": container}},
                 "daemon": {"source": {"hostPath": path}}}
    })
    .to_string()
}

/// Creates `body` through the API listener of `server`: status and body.
async fn create_injection(server: &Server, body: &str) -> (u16, Value) {
    let addr = server.url.trim_start_matches("http://");
    let (code, _, json) = api(
        server,
        &format!(
            "POST /apis/previewd.dev/v1alpha1/namespaces/default/daemoninjections HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    (code, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_path_daemons_come_only_from_directories_the_operator_allows() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let allowed = dir.path().join("daemons");
    std::fs::create_dir_all(&allowed).unwrap_or_else(|e| panic!("{e}"));
    let write = |name: &str, mode: u32| {
        let path = allowed.join(name);
        std::fs::write(&path, b"\x7fELF").unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("{e}"));
        path.display().to_string()
    };
    let ok = write("daemon", 0o755);
    let plain = write("notes", 0o600);
    let link = allowed.join("shadow");
    std::os::unix::fs::symlink("/etc/shadow", &link).unwrap_or_else(|e| panic!("{e}"));
    let link = link.display().to_string();

    // By default no host file at all.
    let state = dir.path().join("default");
    let server = Server::api_only(&state);
    let (code, body) =
        create_injection(&server, &host_path_injection("a", "victim", "/etc/shadow")).await;
    assert_eq!(code, 422, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("--daemon-source-dir"), "{body}");
    let (code, _) = create_injection(&server, &host_path_injection("b", "victim", &ok)).await;
    assert_eq!(code, 422, "no directory is allowed by default");
    drop(server);

    // With a directory: its executables, nothing else, symlinks resolved first.
    let allowed_env = allowed.display().to_string();
    let server = Server::start_with(
        &dir.path().join("allowing"),
        &[
            crate::common::API_ONLY,
            ("PREVIEWD_DAEMON_SOURCE_DIRS", &allowed_env),
        ],
    );
    let escape = format!("{allowed_env}/../../../etc/shadow");
    for (path, why) in [
        (plain.as_str(), "not executable"),
        (link.as_str(), "not inside"),
        (escape.as_str(), "not inside"),
        ("/etc/shadow", "not inside"),
    ] {
        let (code, body) =
            create_injection(&server, &host_path_injection("x", "victim", path)).await;
        assert_eq!(code, 422, "{path}: {body}");
        assert!(body.to_string().contains(why), "{path}: {body}");
    }
    let (code, body) = create_injection(&server, &host_path_injection("ok", "victim", &ok)).await;
    assert_eq!(code, 201, "{body}");
    drop(server);

    // Restarted without the directory: the admitted object stays writable (its source is
    // unchanged), and a change of source is judged anew.
    let server = Server::api_only(&dir.path().join("allowing"));
    let client = server.client();
    let dis: Api<previewd::resources::DaemonInjection> = Api::default_namespaced(client);
    let labelled = dis
        .patch(
            "ok",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {"team": "a"}}})),
        )
        .await;
    assert!(labelled.is_ok(), "{labelled:?}");
    let moved = dis
        .patch(
            "ok",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"spec": {"daemon": {"source": {"hostPath": "/etc/shadow"}}}}),
            ),
        )
        .await;
    assert!(
        matches!(moved, Err(kube::Error::Api(ref e)) if e.code == 422),
        "{moved:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_no_host_file_is_ever_a_daemon() {
    // The flag is refused at start-up with a Kubernetes API server.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let kc = crate::leader::kubeconfig(dir.path(), "http://127.0.0.1:1");
    let out = std::process::Command::new(crate::common::previewd_bin())
        .args(["serve", "--store", "kube", "--daemon-source-dir", "/bin"])
        .arg("--kubeconfig")
        .arg(&kc)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--daemon-source-dir is refused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An object naming a host file (admitted by an API server that knows no such policy) is
    // refused by the kube-mode controller.
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let app = TestContainer::httpd(rt.client(), "0.0.0.0:8080", None, HostConfig::default()).await;
    let apiserver = Server::start_with(
        &dir.path().join("apiserver"),
        &[
            crate::common::API_ONLY,
            ("PREVIEWD_DAEMON_SOURCE_DIRS", "/bin"),
        ],
    );
    let kc = crate::leader::kubeconfig(dir.path(), &apiserver.url);
    let _replica = crate::leader::kube_replica(
        &dir.path().join("replica"),
        &kc,
        &[
            ("PREVIEWD_IDENTITY", "replica-0"),
            ("POD_NAMESPACE", "default"),
        ],
    );
    let (code, body) = create_injection(
        &apiserver,
        &host_path_injection("tenant", &app.name, "/bin/busybox"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let dis: Api<previewd::resources::DaemonInjection> =
        Api::default_namespaced(apiserver.client());
    let failed = crate::docker::wait_phase(
        &dis,
        "tenant",
        previewd::resources::daemon_injection::DaemonPhase::Failed,
        Duration::from_secs(60),
    )
    .await;
    let ready = failed
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.reason.clone(), c.message.clone()));
    assert!(
        ready
            .as_ref()
            .is_some_and(|(r, m)| r == "DaemonSourceRefused" && m.contains("cluster")),
        "{ready:?}"
    );
}

/// `GET /readyz` of `server`: status and body.
async fn readyz(server: &Server) -> (u16, String) {
    let addr = server.url.trim_start_matches("http://");
    let (code, _, body) = exchange(
        addr,
        &format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_object_that_does_not_decode_stops_nothing_else() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let app = TestContainer::testapp(rt.client(), "0.0.0.0:8080", HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = crate::docker::server(state.path());
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    links
        .create(
            &PostParams::default(),
            &link(
                "good",
                &app.name,
                8080,
                json!({"via": "direct", "access": "public"}),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_link(&links, "good", LinkPhase::Ready).await;
    assert!(server.terminate(Duration::from_secs(10)));

    // An object the embedded API would refuse, as a file (or an API server whose CRD
    // schema let it through) puts it in front of the watches.
    let dir = state
        .path()
        .join("objects/previewlinks.previewd.dev/default");
    let good = std::fs::read_to_string(dir.join("good.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let bad = good
        .replace("name: good", "name: bad")
        .replace("port: 8080", "port: 8080\n  ttl: banana");
    assert!(bad.contains("ttl: banana"), "{bad}");
    std::fs::write(dir.join("bad.yaml"), bad).unwrap_or_else(|e| panic!("{e}"));

    let server = crate::docker::server(state.path());
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    let served = eventually(
        Duration::from_secs(20),
        "the good link to serve",
        || async {
            let (code, _, body) = exchange(
            server.proxy,
            "GET / HTTP/1.1\r\nHost: good.default.preview.localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
            (code == 200).then_some(body)
        },
    )
    .await;
    assert_eq!(served, "hello from testapp\n");
    let (code, _, _) = exchange(
        server.proxy,
        "GET / HTTP/1.1\r\nHost: bad.default.preview.localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 404);
    assert_eq!(readyz(&server).await, (200, "ok".to_owned()));
    // The controllers go on too: a new link is served.
    links
        .create(
            &PostParams::default(),
            &link(
                "new",
                &app.name,
                8080,
                json!({"via": "direct", "access": "public"}),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_link(&links, "new", LinkPhase::Ready).await;
    let (code, _, text) = exchange(
        server.url.trim_start_matches("http://"),
        &format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            server.url.trim_start_matches("http://")
        ),
    )
    .await;
    assert_eq!(code, 200);
    assert!(
        text.contains(r#"previewd_undecodable_objects_total{kind="PreviewLink"}"#),
        "{text}"
    );
    let logs = server.log_text();
    assert!(logs.contains("does not decode"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_when_the_watches_fail_and_when_they_are_back() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let apiserver = Server::api_only(&dir.path().join("apiserver"));
    let listen = apiserver.url.trim_start_matches("http://").to_owned();
    let kc = crate::leader::kubeconfig(dir.path(), &apiserver.url);
    let replica = crate::leader::kube_replica(
        &dir.path().join("replica"),
        &kc,
        &[
            ("PREVIEWD_IDENTITY", "replica-0"),
            ("POD_NAMESPACE", "default"),
        ],
    );
    eventually(Duration::from_secs(20), "ready", || async {
        (readyz(&replica).await.0 == 200).then_some(())
    })
    .await;
    apiserver.kill9();
    let why = eventually(
        Duration::from_secs(60),
        "not ready without its API server",
        || async {
            let (code, body) = readyz(&replica).await;
            (code == 503).then_some(body)
        },
    )
    .await;
    assert!(why.contains("failing"), "{why}");
    let back = Server::try_start_on(
        &dir.path().join("apiserver"),
        &listen,
        &[crate::common::API_ONLY],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // A change reaches both watches at once (a resumed watch with nothing new says nothing;
    // then readiness comes back 35 s after the last error).
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "nudge", "labels": {"app.kubernetes.io/managed-by": "previewd"}}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    Api::<k8s_openapi::api::core::v1::Secret>::default_namespaced(back.client())
        .create(&PostParams::default(), &secret)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    Api::<PreviewLink>::default_namespaced(back.client())
        .create(
            &PostParams::default(),
            &link("nudge", "none", 80, json!({})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = readyz(&replica).await;
    while last.0 != 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = readyz(&replica).await;
    }
    assert_eq!(
        last.0,
        200,
        "not ready again: {}\n{}",
        last.1,
        replica.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_links_on_one_container_keep_their_shared_agent_until_the_last_goes() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let app = TestContainer::testapp(rt.client(), "127.0.0.1:8080", HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = crate::docker::server(state.path());
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    let names: Vec<String> = (0..50).map(|i| format!("l{i}")).collect();
    // All at once, as a backend opening previews of one sandbox does.
    let created = futures::future::join_all(names.iter().map(|n| {
        let links = links.clone();
        let l = link(n, &app.name, 8080, json!({"access": "public"}));
        async move { links.create(&PostParams::default(), &l).await }
    }))
    .await;
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    for n in &names {
        wait_link(&links, n, LinkPhase::Ready).await;
    }
    let injections: Api<previewd::resources::DaemonInjection> =
        Api::default_namespaced(server.client());
    let shared = previewd::controller::link::injection_name_for(
        &previewd::resources::Target::docker(&app.name),
    );
    // One shared injection, created once; links do not list themselves in it.
    let di = injections
        .get(&shared)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        di.metadata
            .owner_references
            .as_ref()
            .is_none_or(Vec::is_empty)
    );

    let deleted = futures::future::join_all(names.iter().skip(1).map(|n| {
        let links = links.clone();
        let n = n.clone();
        async move { links.delete(&n, &Default::default()).await }
    }))
    .await;
    assert!(deleted.iter().all(Result::is_ok));
    eventually(Duration::from_secs(60), "49 links to be gone", || {
        let links = links.clone();
        async move {
            let left = links.list(&Default::default()).await.ok()?.items.len();
            (left == 1).then_some(())
        }
    })
    .await;
    let di = injections
        .get(&shared)
        .await
        .unwrap_or_else(|e| panic!("the shared agent went: {e}"));
    assert!(di.metadata.deletion_timestamp.is_none());
    let (code, _, body) = exchange(
        server.proxy,
        "GET / HTTP/1.1\r\nHost: l0.default.preview.localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "hello from testapp\n"));
    // With the last link, the shared agent goes.
    links
        .delete("l0", &Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eventually(
        Duration::from_secs(60),
        "the shared injection to go",
        || {
            let injections = injections.clone();
            let shared = shared.clone();
            async move {
                injections
                    .get_opt(&shared)
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            }
        },
    )
    .await;
}

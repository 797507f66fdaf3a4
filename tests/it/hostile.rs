//! Hostile clients against the real `previewd serve`, through real sockets: what a web page in
//! the user's browser, a tenant writing objects, or a malformed message can try.

use serde_json::Value;

use crate::common::{Server, exchange};

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

//! What real apps behind a link rely on, without a browser (the browser tests are in
//! `browser.rs`): same-origin requests stay same-origin across the Host rewrite, redirects and
//! cookies come back to the link, path links keep or strip their prefix, the token leaves
//! the URL, a link's CORS policy, the waiting page, and apps bound to `[::1]` only.

use std::time::Duration;

use bollard::models::HostConfig;
use kube::api::{Api, PostParams};
use previewd::resources::PreviewLink;
use previewd::resources::preview_link::LinkPhase;
use serde_json::json;

use crate::common::{Server, exchange};
use crate::containers::{TestContainer, docker, images};
use crate::docker::{link, wait_link};

fn header<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

async fn get(server: &Server, host: &str, path: &str, extra: &str) -> (u16, String, String) {
    exchange(
        server.proxy,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n"),
    )
    .await
}

fn token_of(server: &Server, link: &str) -> String {
    let out = std::process::Command::new(crate::common::previewd_bin())
        .args(["token", link, "--server", &server.url])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_behind_a_link_see_their_own_origin_and_answer_for_the_link() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let app = TestContainer::testapp(rt.client(), "127.0.0.1:8080", HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = crate::docker::server(state.path());
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    for (name, spec) in [
        ("web", json!({})),
        ("keep", json!({"pathPrefix": "keep"})),
        ("strip", json!({"access": "public"})),
        (
            "api",
            json!({"access": "public", "cors": {"allowOrigins": ["https://console.example.com"], "allowCredentials": true}}),
        ),
        (
            "tokened-api",
            json!({"cors": {"allowOrigins": ["https://console.example.com"]}}),
        ),
    ] {
        links
            .create(&PostParams::default(), &link(name, &app.name, 8080, spec))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    for name in ["web", "keep", "strip", "api", "tokened-api"] {
        wait_link(&links, name, LinkPhase::Ready).await;
    }
    let token = token_of(&server, "web");
    let auth = format!("X-Previewd-Token: {token}\r\n");
    let port = server.proxy.port();
    let host = format!("web.default.preview.localhost:{port}");
    let public = format!("http://{host}");

    // Its own origin reaches the app as the one it was told it is at; others as they came.
    let (code, _, seen) = get(
        &server,
        &host,
        "/headers",
        &format!("{auth}Origin: {public}\r\nReferer: {public}/lab?x=1\r\n"),
    )
    .await;
    assert_eq!(code, 200, "{seen}");
    assert!(seen.contains("origin: http://localhost:8080\n"), "{seen}");
    assert!(
        seen.contains("referer: http://localhost:8080/lab?x=1\n"),
        "{seen}"
    );
    let (_, _, seen) = get(
        &server,
        &host,
        "/headers",
        &format!("{auth}Origin: https://evil.example\r\nReferer: https://evil.example/x\r\n"),
    )
    .await;
    assert!(seen.contains("origin: https://evil.example\n"), "{seen}");
    assert!(seen.contains("referer: https://evil.example/x\n"), "{seen}");

    // Redirects and cookies naming the app's host point back at the link.
    let (code, head, _) = get(&server, &host, "/redirect?to=self", &auth).await;
    assert_eq!(code, 302);
    assert_eq!(header(&head, "location"), [format!("{public}/landed")]);
    let (_, head, _) = get(&server, &host, "/cookie", &auth).await;
    assert_eq!(header(&head, "set-cookie"), ["app=1; Path=/; HttpOnly"]);

    // The token leaves the URL: a browser is sent on without it, with the cookie.
    let (code, head, _) = get(
        &server,
        &host,
        &format!("/headers?a=1&previewd_token={token}"),
        "Accept: text/html,application/xhtml+xml\r\n",
    )
    .await;
    assert_eq!(code, 303, "{head}");
    assert_eq!(header(&head, "location"), ["/headers?a=1"]);
    assert_eq!(header(&head, "referrer-policy"), ["no-referrer"]);
    let cookie = header(&head, "set-cookie").join("");
    assert!(
        cookie.starts_with(&format!("previewd_token={token}; Path=/; HttpOnly"))
            && cookie.contains("SameSite=None; Secure; Partitioned"),
        "{cookie}"
    );
    // A program asking with the token in the query gets the answer (and the header that keeps
    // the URL out of any Referer).
    let (code, head, _) = get(&server, &host, &format!("/?previewd_token={token}"), "").await;
    assert_eq!(code, 200, "{head}");
    assert_eq!(header(&head, "referrer-policy"), ["no-referrer"]);

    // Path links: stripped, the app's root-relative redirects and cookie paths get the prefix
    // back; kept, the app sees the whole path; both are told the prefix.
    let here = format!("127.0.0.1:{port}");
    let (_, _, seen) = get(&server, &here, "/p/strip.default/headers", "").await;
    assert!(seen.starts_with("target: /headers\n"), "{seen}");
    assert!(
        seen.contains("x-forwarded-prefix: /p/strip.default\n"),
        "{seen}"
    );
    let (_, head, _) = get(&server, &here, "/p/strip.default/redirect?to=/tree", "").await;
    assert_eq!(header(&head, "location"), ["/p/strip.default/tree"]);
    let (_, _, seen) = get(
        &server,
        &here,
        "/p/keep.default/headers",
        &format!("X-Previewd-Token: {}\r\n", token_of(&server, "keep")),
    )
    .await;
    assert!(
        seen.starts_with("target: /p/keep.default/headers\n"),
        "{seen}"
    );
    assert!(
        seen.contains("x-forwarded-prefix: /p/keep.default\n"),
        "{seen}"
    );

    // The capability host opens the link with no token and no cookie (manifests, Safari's
    // cross-site frames), and keeps its name out of other sites' Referers.
    let out = std::process::Command::new(crate::common::previewd_bin())
        .args(["url", "web", "--embed", "--server", &server.url])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let embed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        embed.starts_with("http://web--")
            && embed.ends_with(&format!(".default.preview.localhost:{port}/")),
        "{embed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cap_host = embed
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let (code, head, body) = get(&server, &cap_host, "/manifest.json", "").await;
    assert_eq!(code, 404, "the app's own 404: {head}");
    assert_eq!(body, "not found\n");
    let (code, head, seen) = get(&server, &cap_host, "/headers", "").await;
    assert_eq!(code, 200, "{head}");
    assert!(!seen.contains(&token));
    assert_eq!(header(&head, "referrer-policy"), ["same-origin"]);
    assert!(header(&head, "set-cookie").is_empty());
    let cap = &cap_host["web--".len().."web--".len() + 26];
    let flipped = if cap.starts_with('a') { 'b' } else { 'a' };
    let wrong = format!(
        "web--{flipped}{}{}",
        &cap[1..],
        &cap_host["web--".len() + 26..]
    );
    let (code, _, _) = get(&server, &wrong, "/", "").await;
    assert_eq!(code, 404, "a wrong capability opens nothing");
    // A capability host of no link at all is simply unknown.
    let (code, _, _) = get(&server, &cap_host.replacen("web--", "nobody--", 1), "/", "").await;
    assert_eq!(code, 404);
    let other = cap_host.replacen("web--", "keep--", 1);
    let (code, _, _) = get(&server, &other, "/", "").await;
    assert_eq!(code, 404, "a link's capability opens no other link");
    let st = links
        .get("web")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .status
        .unwrap_or_default();
    assert_eq!(st.embed_url.as_deref(), Some(format!("{public}/").as_str()));
    let json = serde_json::to_string(&st).unwrap_or_default();
    assert!(
        !json.contains(cap),
        "the capability is in the status: {json}"
    );

    // A link's CORS policy: the preflight is answered by the proxy, before any token.
    let api_host = format!("api.default.preview.localhost:{port}");
    let (code, head, _) = exchange(
        server.proxy,
        &format!(
            "OPTIONS /headers HTTP/1.1\r\nHost: {api_host}\r\nOrigin: https://console.example.com\r\nAccess-Control-Request-Method: PUT\r\nAccess-Control-Request-Headers: content-type\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(code, 204, "{head}");
    assert_eq!(
        header(&head, "access-control-allow-origin"),
        ["https://console.example.com"]
    );
    assert_eq!(header(&head, "access-control-allow-methods"), ["PUT"]);
    assert_eq!(header(&head, "access-control-allow-credentials"), ["true"]);
    let (_, head, _) = get(
        &server,
        &api_host,
        "/headers",
        "Origin: https://console.example.com\r\n",
    )
    .await;
    assert_eq!(
        header(&head, "access-control-allow-origin"),
        ["https://console.example.com"]
    );
    let (_, head, _) = get(
        &server,
        &api_host,
        "/headers",
        "Origin: https://evil.example\r\n",
    )
    .await;
    assert!(
        header(&head, "access-control-allow-origin").is_empty(),
        "{head}"
    );
    let (code, _, _) = exchange(
        server.proxy,
        &format!(
            "OPTIONS /headers HTTP/1.1\r\nHost: tokened-api.default.preview.localhost:{port}\r\nOrigin: https://console.example.com\r\nAccess-Control-Request-Method: GET\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(code, 204, "a preflight needs no token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_links_are_off_by_default_and_waiting_browsers_get_a_page_that_retries() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    // Docker turns IPv6 off in containers of networks without it; the app's own loopback
    // needs it on.
    let v6 = HostConfig {
        sysctls: Some([("net.ipv6.conf.all.disable_ipv6".to_owned(), "0".to_owned())].into()),
        ..HostConfig::default()
    };
    let app = TestContainer::testapp(rt.client(), "[::1]:8080", v6).await;
    let stopped = TestContainer::run(
        rt.client(),
        crate::containers::BUSYBOX_IMAGE,
        Some(vec!["sleep", "3600"]),
        HostConfig::default(),
        None,
        false,
    )
    .await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = crate::docker::server_with(state.path(), &[("PREVIEWD_PATH_URLS", "false")]);
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    links
        .create(
            &PostParams::default(),
            &link("v6", &app.name, 8080, json!({"access": "public"})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    links
        .create(
            &PostParams::default(),
            &link("later", &stopped.name, 8080, json!({"access": "public"})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ready = wait_link(&links, "v6", LinkPhase::Ready).await;
    assert_eq!(
        ready.status.and_then(|s| s.path_url),
        None,
        "no path URL when they are off"
    );
    let port = server.proxy.port();
    // An app bound to [::1] only (Vite's default) is reached through the agent (once the
    // proxy's own watch has seen the link Ready).
    let host = format!("v6.default.preview.localhost:{port}");
    let body = crate::common::eventually(Duration::from_secs(10), "the [::1] app", || async {
        let (code, _, body) = get(&server, &host, "/", "").await;
        (code == 200).then_some(body)
    })
    .await;
    assert_eq!(body, "hello from testapp\n");
    let (code, _, _) = get(&server, &format!("127.0.0.1:{port}"), "/p/v6.default/", "").await;
    assert_eq!(code, 404, "path links are opt-in");

    // Its container is stopped: a browser gets a page that reloads itself, a program JSON.
    let host = format!("later.default.preview.localhost:{port}");
    let (code, head, body) =
        crate::common::eventually(Duration::from_secs(30), "a 503", || async {
            let r = get(&server, &host, "/", "Accept: text/html\r\n").await;
            (r.0 == 503).then_some(r)
        })
        .await;
    assert_eq!(code, 503);
    assert_eq!(header(&head, "retry-after"), ["2"]);
    assert!(body.contains("http-equiv=refresh"), "{body}");
    let (_, head, body) = get(&server, &host, "/", "").await;
    assert!(
        header(&head, "content-type")
            .join("")
            .starts_with("application/json"),
        "{head}"
    );
    assert!(body.contains("TARGET_NOT_READY"), "{body}");
}

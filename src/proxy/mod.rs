//! The preview proxy (data plane): routes requests by host or path to the upstream a Ready
//! PreviewLink's status names, after checking its token.
//!
//! Routes come from reflectors over PreviewLinks and previewd's Secrets (kube-rs's
//! version-rs shape: a watch-fed store read by axum handlers), so a request costs no API
//! call, and a deleted link stops routing as soon as the watch delivers it.

pub mod auth;
pub mod errors;
pub mod forward;
pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::serve::ListenerExt;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::controller::link::{MANAGED_BY, injection_name};
use crate::metrics::Metrics;
use crate::resources::{PreviewLink, Target};
use errors::ProxyError;
use routes::Upstream;

/// What the proxy serves.
struct Proxy {
    metrics: Arc<Metrics>,
    links: Store<PreviewLink>,
    secrets: Store<Secret>,
    domain: String,
    upstreams: forward::Clients,
}

/// Starts the reflectors and serves `listener` until `shutdown` resolves.
pub async fn run(
    metrics: Arc<Metrics>,
    client: Client,
    listener: tokio::net::TcpListener,
    domain: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (links, writer) = reflector::store();
    let link_feed = watcher(
        Api::<PreviewLink>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    tokio::spawn(reflector::reflector(writer, link_feed).for_each(|_| async {}));
    let (secrets, writer) = reflector::store();
    let secret_feed = watcher(
        Api::<Secret>::all(client),
        watcher::Config::default().labels(&format!("{MANAGED_BY}=previewd")),
    )
    .default_backoff();
    tokio::spawn(reflector::reflector(writer, secret_feed).for_each(|_| async {}));
    let proxy = Arc::new(Proxy {
        metrics,
        links,
        secrets,
        domain,
        upstreams: forward::Clients::default(),
    });
    let app = Router::new().fallback(handle).with_state(proxy);
    let listener = listener.tap_io(|tcp| {
        // Small writes (WebSocket frames, SSE events) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn handle(
    State(proxy): State<Arc<Proxy>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    req: Request<Body>,
) -> Response<Body> {
    let in_flight = proxy.metrics.in_flight();
    let browser = errors::wants_html(req.headers());
    let resp = match serve(&proxy, client, req).await {
        Ok(resp) => resp,
        Err(e) => e.respond(browser),
    };
    proxy.metrics.proxied(resp.status().as_u16());
    // A streaming body stays in flight until it is sent.
    resp.map(|body| {
        Body::new(http_body_util::BodyExt::map_frame(body, move |f| {
            let _ = &in_flight;
            f
        }))
    })
}

/// The agent secret of the shared injection a link's traffic goes through.
fn agent_secret(proxy: &Proxy, link: &PreviewLink) -> Option<String> {
    let Target::Docker(target) = &link.spec.target else {
        return None;
    };
    let ns = link.metadata.namespace.as_deref().unwrap_or("default");
    let name = format!("previewd-agent-{}", injection_name(target));
    let secret = proxy.secrets.get(&ObjectRef::new(&name).within(ns))?;
    secret
        .data
        .as_ref()?
        .get("secret")
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

async fn serve(
    proxy: &Proxy,
    client: SocketAddr,
    req: Request<Body>,
) -> Result<Response<Body>, ProxyError> {
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let routed = routes::route(host.as_deref(), req.uri().path(), &proxy.domain)
        .ok_or(ProxyError::LinkNotFound)?;
    let link = proxy
        .links
        .get(&ObjectRef::new(&routed.name).within(&routed.namespace))
        .ok_or(ProxyError::LinkNotFound)?;
    let (upstream, token_hash) = routes::admit(&link, k8s_openapi::jiff::Timestamp::now())?;
    // `/p/{id}` without its slash: redirect, so the app's relative URLs stay under the prefix.
    if routed.prefix != "/" && req.uri().path() == routed.prefix.trim_end_matches('/') {
        let target = match req.uri().query() {
            Some(q) => format!("{}?{q}", routed.prefix),
            None => routed.prefix.clone(),
        };
        return Response::builder()
            .status(StatusCode::PERMANENT_REDIRECT)
            .header(header::LOCATION, target)
            .body(Body::empty())
            .map_err(|e| ProxyError::UpstreamUnreachable(e.to_string()));
    }
    let (mut parts, body) = req.into_parts();
    let query = parts.uri.query().map(str::to_owned);
    let mut set_cookie = None;
    if let Some(hash) = token_hash {
        let (token, source) =
            auth::presented(&parts.headers, query.as_deref()).ok_or(ProxyError::TokenMissing)?;
        if !auth::matches(&token, &hash) {
            return Err(ProxyError::TokenInvalid);
        }
        if source == auth::TokenSource::Query {
            set_cookie = Some(auth::cookie(&token, &routed.prefix));
        }
    }
    let query = auth::strip(&mut parts.headers, query.as_deref());
    let uri = match query {
        Some(q) => format!("{}?{q}", routed.path),
        None => routed.path.clone(),
    };
    parts.uri = uri.parse().map_err(|_| ProxyError::LinkNotFound)?;
    let original_host = parts.headers.get(header::HOST).cloned();
    forward::strip_hop_by_hop(&mut parts.headers);
    forward::add_forwarded(&mut parts.headers, Some(client), original_host.as_ref());
    let rewritten = match (&link.spec.host_rewrite, &upstream) {
        (Some(h), _) => HeaderValue::from_str(h).ok(),
        // Dev servers check Host; through the agent the app is at localhost:{port}.
        (None, Upstream::Agent { port, .. }) => {
            HeaderValue::from_str(&format!("localhost:{port}")).ok()
        }
        (None, Upstream::Direct(_)) => original_host,
    };
    if let Some(h) = rewritten {
        parts.headers.insert(header::HOST, h);
    }
    let secret = match upstream {
        Upstream::Agent { .. } => agent_secret(proxy, &link),
        Upstream::Direct(_) => None,
    };
    let asked = std::time::Instant::now();
    let mut resp = proxy
        .upstreams
        .forward(
            &upstream,
            secret.as_deref(),
            Request::from_parts(parts, body),
        )
        .await?;
    proxy.metrics.upstream_answered(asked.elapsed());
    if let Some(c) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(resp)
}

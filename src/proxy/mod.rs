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
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::controller::link::injection_name_for;
use crate::controller::shared::MANAGED_BY;
use crate::metrics::Metrics;
use crate::resources::PreviewLink;
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
    docker: Option<crate::runtime::docker::DockerRuntime>,
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
        upstreams: forward::Clients::new(docker),
    });
    let app = Router::new().fallback(handle).with_state(proxy);
    accept_loop(listener, app, shutdown).await
}

/// How long a client may take to send a request head: slow-header clients cannot hold
/// connections open forever. Bodies and upgraded streams have no such bound.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves connections with hyper directly (axum::serve cannot bound header reads): HTTP/1.1
/// with upgrades, TCP_NODELAY, the client address for `X-Forwarded-For`, and a graceful
/// shutdown that lets requests in flight finish (for up to 5 s).
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::pin!(shutdown);
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: back off instead of spinning.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a proxy connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Small writes (WebSocket frames, SSE events) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone().layer(axum::Extension(ConnectInfo(client))),
        );
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .with_upgrades();
        let (mut stop, open) = (stop_rx.clone(), open.clone());
        open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
                    // Finish the request in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "proxy connection ended");
            }
            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    let _ = stop_tx.send(true);
    // Requests in flight get a moment; long streams are cut after it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while open.load(std::sync::atomic::Ordering::SeqCst) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
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
    let ns = link.metadata.namespace.as_deref().unwrap_or("default");
    let name = format!("previewd-agent-{}", injection_name_for(&link.spec.target));
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
        (None, Upstream::Agent { port, .. } | Upstream::Exec { port, .. }) => {
            HeaderValue::from_str(&format!("localhost:{port}")).ok()
        }
        (None, Upstream::Direct(_)) => original_host,
    };
    if let Some(h) = rewritten {
        parts.headers.insert(header::HOST, h);
    }
    let secret = match upstream {
        Upstream::Agent { .. } | Upstream::Exec { .. } => agent_secret(proxy, &link),
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

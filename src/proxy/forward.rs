//! Forwarding requests upstream over pooled keep-alive connections: streaming bodies both
//! ways (no buffering), WebSocket and any other `Upgrade` spliced after the 101, hop-by-hop
//! headers removed, `X-Forwarded-*` set.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::agent::client::{self as agent, AgentError};
use crate::agent::protocol::SECRET_ENV;
use crate::proxy::errors::ProxyError;
use crate::proxy::routes::Upstream;
use crate::runtime::docker::DockerRuntime;
use crate::runtime::{ContainerRuntime, ExecSpec, ExecStdio};

/// Buffer size for spliced upgraded connections (WebSocket frames up to this size move in one
/// read).
const SPLICE_BUFFER: usize = 64 * 1024;

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether the request asks for a protocol upgrade (WebSocket, h2c, …).
fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    connection_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Removes hop-by-hop headers (and those named in `Connection`), keeping an upgrade request's
/// `Connection: upgrade` + `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let upgrade = upgrade_of(headers);
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| {
            v.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for h in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(h);
    }
    if let Some(proto) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto);
    }
}

/// Sets `X-Forwarded-For/-Proto/-Host` (appending to a forwarded-for chain).
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: Option<SocketAddr>,
    original_host: Option<&HeaderValue>,
) {
    if let Some(c) = client {
        let chain = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {}", c.ip()),
            None => c.ip().to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&chain) {
            headers.insert("x-forwarded-for", v);
        }
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(h) = original_host {
        headers.insert("x-forwarded-host", h.clone());
    }
}

/// Why a connection to an upstream could not be opened, carried through hyper's client
/// error so the response can say which (`PORT_CLOSED` vs `UPSTREAM_UNREACHABLE`).
#[derive(Debug, thiserror::Error)]
#[error("{0:?}")]
struct OpenFailed(ProxyError);

/// A connection to an upstream: TCP (direct, or a tunnel through the agent), or the agent's
/// stdio through an exec.
pub enum UpstreamStream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// An exec's stdin and stdout.
    Exec(ExecStdio),
}

impl tokio::io::AsyncRead for UpstreamStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Exec(s) => s.as_mut().poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Exec(s) => s.as_mut().poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            UpstreamStream::Exec(s) => s.as_mut().poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Exec(s) => s.as_mut().poll_shutdown(cx),
        }
    }
}

impl hyper_util::client::legacy::connect::Connection for UpstreamStream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

/// Opens connections to one upstream: straight to the container, through its agent's
/// tunnel, or through the agent's stdio over exec. The pooled client above it keeps them
/// alive between requests.
#[derive(Clone)]
struct UpstreamConnector {
    upstream: Upstream,
    secret: Option<Arc<str>>,
    docker: Option<DockerRuntime>,
}

impl tower::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = OpenFailed;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.open().await.map(TokioIo::new).map_err(OpenFailed) })
    }
}

fn agent_failure(e: AgentError) -> ProxyError {
    match e {
        AgentError::PortClosed { port } => ProxyError::PortClosed(port),
        other => ProxyError::UpstreamUnreachable(format!("agent: {other}")),
    }
}

impl UpstreamConnector {
    async fn open(&self) -> Result<UpstreamStream, ProxyError> {
        let secret = || {
            self.secret.as_deref().ok_or_else(|| {
                ProxyError::TargetNotReady("the agent's secret is not known yet".into())
            })
        };
        match &self.upstream {
            Upstream::Direct(addr) => Ok(UpstreamStream::Tcp(connect(*addr).await?)),
            Upstream::Agent { agent, port } => {
                let stream = connect(*agent).await?;
                agent::connect(stream, secret()?, *port)
                    .await
                    .map(UpstreamStream::Tcp)
                    .map_err(agent_failure)
            }
            Upstream::Exec {
                container,
                agent_path,
                port,
            } => {
                let docker = self.docker.as_ref().ok_or_else(|| {
                    ProxyError::UpstreamUnreachable("the Docker engine is unavailable".into())
                })?;
                let spec = ExecSpec {
                    argv: vec![agent_path.clone(), "stdio".into()],
                    env: vec![format!("{SECRET_ENV}={}", secret()?)],
                    user: None,
                };
                let stdio = docker
                    .exec_stdio(container, &spec)
                    .await
                    .map_err(|e| ProxyError::UpstreamUnreachable(e.to_string()))?;
                agent::connect(stdio, secret()?, *port)
                    .await
                    .map(UpstreamStream::Exec)
                    .map_err(agent_failure)
            }
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, ProxyError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| ProxyError::UpstreamUnreachable(format!("{addr}: {e}")))?;
    // Small writes (WebSocket frames, SSE events) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

type UpstreamClient = Client<UpstreamConnector, Body>;
/// The agent secret a client's connections use, and the client.
type SecretAndClient = (Option<Arc<str>>, UpstreamClient);

/// One pooled HTTP client per upstream, created on first use.
pub struct Clients {
    /// For exec upstreams (containers previewd cannot route to).
    docker: Option<DockerRuntime>,
    /// Per upstream: the agent secret its connections use, and the client. A new secret (a
    /// re-injected agent) replaces the entry.
    clients: Mutex<HashMap<Upstream, SecretAndClient>>,
}

/// Upstream endpoints change only when agents are re-injected; past this many, the map is
/// cleared rather than kept forever.
const MAX_CLIENTS: usize = 1024;

impl Clients {
    /// An empty set of clients; `docker` serves exec upstreams.
    pub fn new(docker: Option<DockerRuntime>) -> Self {
        Clients {
            docker,
            clients: Mutex::default(),
        }
    }

    fn get(&self, upstream: &Upstream, secret: Option<&str>) -> UpstreamClient {
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        // The hot path: a client for this upstream and secret exists; no allocation.
        if let Some((s, client)) = map.get(upstream)
            && s.as_deref() == secret
        {
            return client.clone();
        }
        if map.len() >= MAX_CLIENTS {
            map.clear();
        }
        let secret: Option<Arc<str>> = secret.map(Arc::from);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build(UpstreamConnector {
                upstream: upstream.clone(),
                secret: secret.clone(),
                docker: self.docker.clone(),
            });
        map.insert(upstream.clone(), (secret, client.clone()));
        client
    }

    /// Sends `req` (already rewritten: path, headers) upstream and returns the response with
    /// its body streaming. For an upgrade, the two connections are spliced after the 101.
    pub async fn forward(
        &self,
        upstream: &Upstream,
        agent_secret: Option<&str>,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        let client = self.get(upstream, agent_secret);
        // The pooled client wants an absolute URI (its pool key); the connector ignores it.
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *req.uri_mut() = format!("http://upstream{path}")
            .parse()
            .map_err(|_| ProxyError::LinkNotFound)?;
        let client_upgrade = upgrade_of(req.headers()).map(|_| hyper::upgrade::on(&mut req));
        let mut resp = client.request(req).await.map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if let Some(OpenFailed(p)) = err.downcast_ref::<OpenFailed>() {
                    return p.clone();
                }
                source = err.source();
            }
            ProxyError::UpstreamUnreachable(e.to_string())
        })?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        let (mut c, mut u) = (TokioIo::new(client), TokioIo::new(upstream));
                        if let Err(e) = tokio::io::copy_bidirectional_with_sizes(
                            &mut c,
                            &mut u,
                            SPLICE_BUFFER,
                            SPLICE_BUFFER,
                        )
                        .await
                        {
                            tracing::debug!(error = %e, "upgraded connection ended");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
        }
        let (mut parts, body) = resp.into_parts();
        if parts.status != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(&mut parts.headers);
        }
        let body = http_body_util::BodyExt::map_err(body, |e| {
            tracing::debug!(error = %e, source = ?std::error::Error::source(&e), "upstream body failed");
            e
        });
        Ok(Response::from_parts(parts, Body::new(body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_but_upgrades_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer app"),
        );
        strip_hop_by_hop(&mut h);
        assert!(
            h.get("x-secret").is_none()
                && h.get("keep-alive").is_none()
                && h.get(header::CONNECTION).is_none()
        );
        assert!(h.get(header::AUTHORIZATION).is_some());

        let mut ws = HeaderMap::new();
        ws.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        ws.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut ws);
        assert_eq!(
            ws.get(header::UPGRADE).map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            ws.get(header::CONNECTION).map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
    }

    #[test]
    fn forwarded_headers_chain() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
        add_forwarded(
            &mut h,
            "127.0.0.1:5555".parse().ok(),
            Some(&HeaderValue::from_static(
                "web.default.preview.localhost:8002",
            )),
        );
        assert_eq!(
            h.get("x-forwarded-for").map(|v| v.as_bytes()),
            Some(&b"10.1.1.1, 127.0.0.1"[..])
        );
        assert_eq!(
            h.get("x-forwarded-host").map(|v| v.as_bytes()),
            Some(&b"web.default.preview.localhost:8002"[..])
        );
    }
}

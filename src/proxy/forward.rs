//! Forwarding requests upstream over pooled keep-alive connections: streaming bodies both
//! ways (no buffering), WebSocket and any other `Upgrade` spliced after the 101, hop-by-hop
//! headers removed, `X-Forwarded-*` set. Bodyless requests to TCP upstreams are exchanged by
//! [`super::h1`] on the client connection's task; the rest go through hyper's client.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::agent::client::{self as agent, AgentError};
use crate::agent::handoff::{self, HandoffError};
use crate::agent::protocol::SECRET_ENV;
use crate::proxy::errors::ProxyError;
use crate::proxy::h1::{self, H1Body, H1Conn, H1Error};
use crate::proxy::revoke::{Active, Activity, StreamGuard};
use crate::proxy::routes::Upstream;
use crate::runtime::docker::DockerRuntime;
use crate::runtime::netns;
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
/// `Connection: upgrade` + `Upgrade`; returns whether it kept them (the request asks for an
/// upgrade).
#[must_use]
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    // Most requests and responses carry none (headers named in `Connection` need one, and
    // so does an upgrade): comparing the names present costs far less than hashing eight
    // names to remove.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return false;
    }
    let upgrade = upgrade_of(headers);
    remove_hop_by_hop(headers);
    match upgrade {
        Some(proto) => {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, proto);
            true
        }
        None => false,
    }
}

/// Removes every hop-by-hop header of a response that switches no protocol (anything but
/// a 101 to an upgrade): its `Connection: upgrade` and `Upgrade` too, which would tell the
/// client an upgrade it never asked for happened.
pub fn strip_response_hop_by_hop(headers: &mut HeaderMap) {
    if headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        remove_hop_by_hop(headers);
    }
}

/// Removes the headers `Connection` names, then the hop-by-hop ones.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| h1::items(v.as_bytes()))
        .filter_map(|t| HeaderName::from_bytes(&t.to_ascii_lowercase()).ok())
        .collect();
    for h in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(h);
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The client's address as an `X-Forwarded-For` entry: built once per connection, so a
/// request only clones it.
pub fn client_ip_header(client: SocketAddr) -> Option<HeaderValue> {
    HeaderValue::from_str(&client.ip().to_string()).ok()
}

/// Sets `X-Forwarded-For/-Proto/-Host` (appending `client_ip`, from [`client_ip_header`],
/// to a forwarded-for chain); `https` when users reach the proxy over https.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client_ip: Option<&HeaderValue>,
    original_host: Option<&HeaderValue>,
    https: bool,
) {
    // Room for the three at once: hyper sizes a request's map to the headers it came with,
    // and growing it one insert at a time reallocated it twice per request.
    headers.reserve(3);
    if let Some(ip) = client_ip {
        let chain = match headers.get(X_FORWARDED_FOR).map(|v| v.to_str()) {
            Some(Ok(prev)) => {
                let mut chain = Vec::with_capacity(prev.len() + 2 + ip.len());
                chain.extend_from_slice(prev.as_bytes());
                chain.extend_from_slice(b", ");
                chain.extend_from_slice(ip.as_bytes());
                HeaderValue::from_bytes(&chain).ok()
            }
            _ => Some(ip.clone()),
        };
        if let Some(v) = chain {
            headers.insert(X_FORWARDED_FOR, v);
        }
    }
    let proto = if https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(h) = original_host {
        headers.insert(X_FORWARDED_HOST, h.clone());
    }
}

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

/// Opens connections to one upstream: straight to the container, through its agent's
/// tunnel, or through the agent's stdio over exec. The [`Pool`] above it keeps them alive
/// between requests.
struct UpstreamConnector {
    upstream: Upstream,
    secret: Option<Arc<str>>,
    docker: Option<DockerRuntime>,
}

fn agent_failure(e: AgentError) -> ProxyError {
    match e {
        AgentError::PortClosed { port } => ProxyError::PortClosed(port),
        other => ProxyError::UpstreamUnreachable(format!("agent: {other}")),
    }
}

impl UpstreamConnector {
    /// A connection within `limit`, or the 502 that says it did not come.
    async fn open_within(&self, limit: Duration) -> Result<UpstreamStream, ProxyError> {
        match tokio::time::timeout(limit, self.open()).await {
            Ok(opened) => opened,
            Err(_) => Err(ProxyError::UpstreamUnreachable(format!(
                "no connection within {limit:?} (spec.timeouts.connect raises it)"
            ))),
        }
    }

    async fn open(&self) -> Result<UpstreamStream, ProxyError> {
        let secret = || {
            self.secret
                .as_deref()
                .ok_or_else(|| ProxyError::TargetNotReady(super::AGENT_SECRET_UNKNOWN.into()))
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
            Upstream::Netns { pid, inode, port } => connect_in(*pid, *inode, *port)
                .await
                .map(UpstreamStream::Tcp),
            Upstream::Handoff {
                pid,
                inode,
                dir,
                port,
            } => {
                // A pid reused after the container stopped is not the helper.
                netns::in_container_namespace(*pid, *inode).map_err(|e| {
                    ProxyError::UpstreamUnreachable(format!("the agent's handoff helper: {e}"))
                })?;
                let dir = PathBuf::from(format!("/proc/{pid}/root{dir}"));
                match handoff::connect(&dir, secret()?, *port).await {
                    Ok(stream) => Ok(UpstreamStream::Tcp(stream)),
                    Err(HandoffError::Agent(e)) => Err(agent_failure(e)),
                    Err(e) => Err(ProxyError::UpstreamUnreachable(e.to_string())),
                }
            }
        }
    }
}

/// A connection to `port` on the container's loopback, from a socket made in its network
/// namespace: 127.0.0.1, else [::1] (as the agent dials `localhost`).
async fn connect_in(pid: u32, inode: u64, port: u16) -> Result<TcpStream, ProxyError> {
    let mut refused = false;
    for ip in [
        IpAddr::from(Ipv4Addr::LOCALHOST),
        Ipv6Addr::LOCALHOST.into(),
    ] {
        let addr = SocketAddr::new(ip, port);
        let socket = match netns::socket_in(pid, inode, addr).await {
            Ok(socket) => socket,
            Err(_) if refused => break,
            Err(e) => return Err(ProxyError::UpstreamUnreachable(e.to_string())),
        };
        match socket.connect(addr).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused = true,
            // No IPv6 in the container: what IPv4 said stands.
            Err(_) if refused => break,
            Err(e) => return Err(ProxyError::UpstreamUnreachable(format!("{addr}: {e}"))),
        }
    }
    Err(ProxyError::PortClosed(port))
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, ProxyError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| ProxyError::UpstreamUnreachable(format!("{addr}: {e}")))?;
    // Small writes (WebSocket frames, SSE events) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The request body sent upstream: the client's, streamed as it arrives (a request hyper's
/// server read), or none (a request [`super::server`] read: it serves only bodyless ones).
pub enum Outgoing {
    /// The body of a request read by hyper.
    Client(Box<ClientBody>),
    /// No body.
    Empty,
}

/// A client's request body on its way upstream.
pub struct ClientBody {
    body: Incoming,
    /// Told once the body has all been read (the response-head timeout counts from then).
    ended: Option<tokio::sync::oneshot::Sender<()>>,
    /// Longest wait for the next piece of the body.
    patience: Duration,
    /// Made on the first wait, reset by each piece.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

/// Why a client's request body stopped short.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// Reading it failed.
    #[error(transparent)]
    Read(#[from] hyper::Error),
    /// The client sent nothing for too long.
    #[error("the client sent no part of the request body for {0:?}")]
    Stalled(Duration),
}

impl Outgoing {
    /// The body of a request hyper's server read; a client that sends no piece of it for
    /// `patience` ends the request.
    pub fn client(body: Incoming, patience: Duration) -> Outgoing {
        Outgoing::Client(Box::new(ClientBody {
            body,
            ended: None,
            patience,
            stalled: None,
        }))
    }

    /// Resolves once the whole body has been read (at once for none).
    fn sent(&mut self) -> impl Future<Output = ()> + use<> {
        let rx = match self {
            Outgoing::Client(c) if !c.body.is_end_stream() => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                c.ended = Some(tx);
                Some(rx)
            }
            _ => None,
        };
        async move {
            if let Some(rx) = rx {
                // Dropped unsent: the request is over either way.
                let _ = rx.await;
            }
        }
    }
}

impl hyper::body::Body for Outgoing {
    type Data = bytes::Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, ClientBodyError>>> {
        use std::task::Poll;
        let c = match self.get_mut() {
            Outgoing::Client(c) => c,
            Outgoing::Empty => return Poll::Ready(None),
        };
        let polled = std::pin::Pin::new(&mut c.body).poll_frame(cx);
        match &polled {
            Poll::Pending => {
                let patience = c.patience;
                let stalled = c
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(patience)));
                if stalled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(ClientBodyError::Stalled(patience))));
                }
                return Poll::Pending;
            }
            Poll::Ready(Some(Ok(_))) => {
                if let Some(stalled) = c.stalled.as_mut() {
                    stalled
                        .as_mut()
                        .reset(tokio::time::Instant::now() + c.patience);
                }
            }
            Poll::Ready(_) => {}
        }
        if (matches!(polled, Poll::Ready(None)) || c.body.is_end_stream())
            && let Some(tx) = c.ended.take()
        {
            let _ = tx.send(());
        }
        polled.map(|f| f.map(|r| r.map_err(ClientBodyError::Read)))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Outgoing::Client(c) => c.body.is_end_stream(),
            Outgoing::Empty => true,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Outgoing::Client(c) => c.body.size_hint(),
            Outgoing::Empty => hyper::body::SizeHint::with_exact(0),
        }
    }
}

/// How long a request may wait on its upstream: the server's defaults, or a link's own
/// (`spec.timeouts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// For a connection (TCP, the agent's tunnel, an exec): then 502.
    pub connect: Duration,
    /// For the response head, counted once the request has been sent: then 504.
    pub response: Duration,
}

impl Default for Timeouts {
    /// nginx's `proxy_connect_timeout` is 60 s, but an upstream on this machine or its
    /// cluster answers a connect at once or not at all; its `proxy_read_timeout` is 60 s.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            response: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// These defaults, with what a link sets instead.
    pub fn with(self, link: Option<&crate::resources::preview_link::LinkTimeouts>) -> Self {
        let pick = |d: Option<&kube::core::Duration>, default: Duration| {
            d.map(|d| Duration::from(*d))
                .filter(|d| !d.is_zero())
                .unwrap_or(default)
        };
        match link {
            None => self,
            Some(l) => Timeouts {
                connect: pick(l.connect.as_ref(), self.connect),
                response: pick(l.response.as_ref(), self.response),
            },
        }
    }
}

/// `work`, or the 504 after `limit` (counted from when `started` resolves).
async fn head_within<T>(
    limit: Duration,
    started: impl Future<Output = ()>,
    work: impl Future<Output = Result<T, ProxyError>>,
) -> Result<T, ProxyError> {
    let expired = async {
        started.await;
        tokio::time::sleep(limit).await;
    };
    tokio::select! {
        r = work => r,
        () = expired => Err(ProxyError::UpstreamTimeout(format!(
            "no response within {limit:?} (spec.timeouts.response raises it)"
        ))),
    }
}

/// Idle connections kept per upstream; more are closed when they finish.
const MAX_IDLE: usize = 64;
/// How long a connection may sit idle in a pool before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// An upstream connection between requests: driven by hyper on a task of its own (it
/// carried a request with a body, an upgrade, or runs over exec), or a plain socket that
/// client connections' tasks speak HTTP/1.1 on themselves ([`h1`]).
enum Idle {
    Hyper(SendRequest<Outgoing>),
    H1(H1Conn),
}

impl Idle {
    /// Whether the connection may still carry a request (without waiting).
    fn may_be_open(&self) -> bool {
        match self {
            Idle::Hyper(sender) => !sender.is_closed(),
            Idle::H1(conn) => conn.is_idle_alive(),
        }
    }
}

/// The keep-alive connections to one upstream (with one agent secret): a LIFO stack of idle
/// connections. A request takes one (or opens a connection), and its response body gives it
/// back once the body has been read to its end. hyper-util's pooled client did the same
/// with a spawned task, a boxed connect future and a key lookup per request; this costs one
/// short lock.
pub struct Pool {
    connector: UpstreamConnector,
    /// The `Host` sent upstream through the agent (`localhost:{port}`, what dev servers
    /// accept), or to a direct upstream when the client sent none; built once per upstream.
    pub default_host: Option<HeaderValue>,
    idle: Mutex<Vec<(Idle, Instant)>>,
}

/// A client connection's own upstream connection: the one its last response came on, kept
/// for its next request. A browser or load generator on a keep-alive connection then talks to
/// one upstream connection, as nginx's keepalive does, and its requests skip the shared pool
/// (its map lookup, its lock and the reference counts other threads touch too).
#[derive(Default)]
pub struct Affinity(Mutex<Option<Lent>>);

impl Affinity {
    /// The connection kept for `upstream` with `secret`, with its pool; one kept for another
    /// upstream goes back to its pool.
    fn take(&self, upstream: &Upstream, secret: Option<&str>) -> Option<Lent> {
        let kept = self.0.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        let connector = &kept.pool.connector;
        if connector.upstream == *upstream && connector.secret.as_deref() == secret {
            Some(kept)
        } else {
            kept.pool.put(kept.conn);
            None
        }
    }
}

impl Drop for Affinity {
    fn drop(&mut self) {
        // The client connection is gone: its upstream connection serves others.
        if let Some(kept) = self.0.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            kept.pool.put(kept.conn);
        }
    }
}

/// A connection lent to one request: goes back to its client connection's [`Affinity`] (or
/// its pool) when its response body ends.
pub struct Lent {
    conn: Idle,
    pool: Arc<Pool>,
}

impl Lent {
    /// A plain connection whose response body ended cleanly, to give back.
    pub fn h1(conn: H1Conn, pool: Arc<Pool>) -> Lent {
        Lent {
            conn: Idle::H1(conn),
            pool,
        }
    }

    /// Keeps the connection for the next request of `home`'s client connection (the response
    /// body was read to its end, so the connection is about to accept another request).
    pub fn give_back(self, home: &Affinity) {
        let previous = home
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(self);
        if let Some(previous) = previous {
            previous.pool.put(previous.conn);
        }
    }
}

/// What came back from upstream, its body still streaming.
pub enum Upstreamed {
    /// Through hyper: the response and, unless the connection was upgraded, the connection
    /// to give back once the body has ended.
    Hyper(Response<Incoming>, Option<Lent>),
    /// Through [`h1`]: the body holds the connection; it goes back to this pool.
    H1(Response<H1Body>, Arc<Pool>),
}

fn h1_failure(e: H1Error) -> ProxyError {
    ProxyError::UpstreamUnreachable(e.to_string())
}

impl Pool {
    /// Keeps an idle connection for any client connection.
    fn put(&self, conn: Idle) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }

    fn new(connector: UpstreamConnector) -> Arc<Pool> {
        let default_host = match &connector.upstream {
            Upstream::Agent { port, .. }
            | Upstream::Exec { port, .. }
            | Upstream::Netns { port, .. }
            | Upstream::Handoff { port, .. } => {
                HeaderValue::from_str(&format!("localhost:{port}")).ok()
            }
            Upstream::Direct(addr) => HeaderValue::from_str(&addr.to_string()).ok(),
        };
        let pool = Arc::new(Pool {
            connector,
            default_host,
            idle: Mutex::default(),
        });
        // Closes connections idle too long; ends with the pool.
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_TIMEOUT / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.retain(|(c, since)| c.may_be_open() && since.elapsed() < IDLE_TIMEOUT);
            }
        });
        pool
    }

    /// `own` (the client connection's kept connection) if it is still usable, else the most
    /// recently used live idle one, if any.
    async fn reuse(&self, own: Option<Idle>) -> Option<Idle> {
        // The client connection's own was in use a moment ago: no need to ask the clock.
        let mut candidate = own;
        loop {
            let conn = match candidate.take() {
                Some(conn) => conn,
                None => {
                    let (conn, since) =
                        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
                    if since.elapsed() >= IDLE_TIMEOUT {
                        continue;
                    }
                    conn
                }
            };
            if !conn.may_be_open() {
                continue;
            }
            match conn {
                Idle::H1(conn) => return Some(Idle::H1(conn)),
                // A returned connection turns ready once its task has finished the last
                // response.
                Idle::Hyper(mut sender) => {
                    if sender.ready().await.is_ok() {
                        return Some(Idle::Hyper(sender));
                    }
                }
            }
        }
    }

    /// Runs hyper's HTTP/1 client on `stream`, with upgrades, on its own task.
    async fn drive(&self, stream: UpstreamStream) -> Result<SendRequest<Outgoing>, ProxyError> {
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::UpstreamUnreachable(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends `req` on `own` (the client connection's kept connection), a pooled connection or
    /// a new one: a plain request ([`h1::is_plain`]) over a TCP upstream through [`h1`],
    /// anything else through hyper.
    async fn send(
        self: Arc<Self>,
        own: Option<Idle>,
        req: Request<Outgoing>,
        upgrade: bool,
        timeouts: Timeouts,
    ) -> Result<Upstreamed, ProxyError> {
        let (parts, body) = req.into_parts();
        let plain = h1::is_plain(&parts.method, body.is_end_stream(), upgrade)
            && !matches!(self.connector.upstream, Upstream::Exec { .. });
        let (sender, reused) = match self.reuse(own).await {
            Some(Idle::H1(conn)) if plain => {
                return self.send_h1(conn, true, parts, timeouts).await;
            }
            Some(Idle::H1(conn)) => (self.drive(UpstreamStream::Tcp(conn.into_io())).await?, true),
            Some(Idle::Hyper(sender)) => (sender, true),
            None => match self.connector.open_within(timeouts.connect).await? {
                UpstreamStream::Tcp(stream) if plain => {
                    return self
                        .send_h1(H1Conn::new(stream), false, parts, timeouts)
                        .await;
                }
                stream => (self.drive(stream).await?, false),
            },
        };
        let req = Request::from_parts(parts, body);
        self.send_hyper(sender, reused, req, timeouts).await
    }

    /// Sends a plain request on `conn`; when a `reused` connection turns out closed before
    /// answering, an idempotent request is sent again once, on a new connection.
    async fn send_h1(
        self: Arc<Self>,
        mut conn: H1Conn,
        reused: bool,
        parts: http::request::Parts,
        timeouts: Timeouts,
    ) -> Result<Upstreamed, ProxyError> {
        let exchange = async {
            match conn.exchange(&parts).await {
                Ok(head) => Ok(head),
                Err(H1Error::NoAnswer(_)) if reused && h1::is_idempotent(&parts.method) => {
                    conn = match self.connector.open_within(timeouts.connect).await? {
                        UpstreamStream::Tcp(stream) => H1Conn::new(stream),
                        UpstreamStream::Exec(_) => {
                            return Err(ProxyError::UpstreamUnreachable(
                                "an exec upstream cannot carry a plain exchange".into(),
                            ));
                        }
                    };
                    conn.exchange(&parts).await.map_err(h1_failure)
                }
                Err(e) => Err(h1_failure(e)),
            }
        };
        let head = head_within(timeouts.response, async {}, exchange).await?;
        let mut resp = Response::new(head.body(conn));
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        Ok(Upstreamed::H1(resp, self))
    }

    /// Sends `req` through hyper on `sender`; a `reused` connection that turns out closed
    /// before the request left is replaced by a new one, once.
    async fn send_hyper(
        self: Arc<Self>,
        mut sender: SendRequest<Outgoing>,
        reused: bool,
        mut req: Request<Outgoing>,
        timeouts: Timeouts,
    ) -> Result<Upstreamed, ProxyError> {
        let failed = |e: hyper::Error| ProxyError::UpstreamUnreachable(e.to_string());
        let sent = req.body_mut().sent();
        let exchange = async {
            match sender.try_send_request(req).await {
                Ok(resp) => Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(req) if reused => {
                        sender = self
                            .drive(self.connector.open_within(timeouts.connect).await?)
                            .await?;
                        sender.send_request(req).await.map_err(failed)
                    }
                    _ => Err(failed(e.into_error())),
                },
            }
        };
        let resp = head_within(timeouts.response, sent, exchange).await?;
        let lent = Lent {
            conn: Idle::Hyper(sender),
            pool: self,
        };
        Ok(Upstreamed::Hyper(resp, Some(lent)))
    }
}

/// Where a request goes upstream: a pool, and the client connection's own connection to it
/// when it has one.
pub struct Destination {
    /// The upstream's pool.
    pub pool: Arc<Pool>,
    own: Option<Idle>,
}

/// The agent secret a pool's connections use, and the pool.
type SecretAndPool = (Option<Arc<str>>, Arc<Pool>);

/// One connection pool per upstream, created on first use.
pub struct Clients {
    /// For exec upstreams (containers previewd cannot route to).
    docker: Option<DockerRuntime>,
    /// Per upstream: the agent secret its connections use, and the pool. A new secret (a
    /// re-injected agent) replaces the entry.
    pools: Mutex<HashMap<Upstream, SecretAndPool>>,
}

/// Upstream endpoints change only when agents are re-injected; past this many, the map is
/// cleared rather than kept forever.
const MAX_CLIENTS: usize = 1024;

impl Clients {
    /// An empty set of pools; `docker` serves exec upstreams.
    pub fn new(docker: Option<DockerRuntime>) -> Self {
        Clients {
            docker,
            pools: Mutex::default(),
        }
    }

    /// Where requests to `upstream` (whose agent wants `secret`) go from the client
    /// connection `affinity` belongs to: its own connection when it has one there, else the
    /// pool.
    pub fn destination(
        &self,
        affinity: &Affinity,
        upstream: &Upstream,
        secret: Option<&str>,
    ) -> Destination {
        match affinity.take(upstream, secret) {
            Some(Lent { conn, pool }) => Destination {
                pool,
                own: Some(conn),
            },
            None => Destination {
                pool: self.pool(upstream, secret),
                own: None,
            },
        }
    }

    /// The pool of `upstream` whose connections use `secret`.
    fn pool(&self, upstream: &Upstream, secret: Option<&str>) -> Arc<Pool> {
        let mut map = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        // The hot path: a pool for this upstream and secret exists; no allocation.
        if let Some((s, pool)) = map.get(upstream)
            && s.as_deref() == secret
        {
            return pool.clone();
        }
        if map.len() >= MAX_CLIENTS {
            map.clear();
        }
        let secret: Option<Arc<str>> = secret.map(Arc::from);
        let pool = Pool::new(UpstreamConnector {
            upstream: upstream.clone(),
            secret: secret.clone(),
            docker: self.docker.clone(),
        });
        map.insert(upstream.clone(), (secret, pool.clone()));
        pool
    }

    /// Sends `req` (already rewritten: origin-form URI, headers; `upgrade` as
    /// [`strip_hop_by_hop`] found) to `to` and returns the response with its body streaming.
    /// For an upgrade, the two connections are spliced after the 101.
    pub async fn forward(
        to: Destination,
        mut req: Request<Outgoing>,
        upgrade: bool,
        timeouts: Timeouts,
        tunnel: StreamGuard,
    ) -> Result<Upstreamed, ProxyError> {
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut resp, lent) = match to.pool.send(to.own, req, upgrade, timeouts).await? {
            Upstreamed::Hyper(resp, lent) => (resp, lent),
            Upstreamed::H1(mut resp, pool) => {
                strip_response_hop_by_hop(resp.headers_mut());
                return Ok(Upstreamed::H1(resp, pool));
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // A switch nobody asked for: the client would be told its connection now speaks
            // another protocol, and the upstream connection is unusable for anything else.
            let Some(client_upgrade) = client_upgrade else {
                return Err(ProxyError::UpstreamUnreachable(
                    "the upstream switched protocols (101) for a request that asked for no upgrade"
                        .into(),
                ));
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        let activity = Activity::new();
                        let mut c = Active {
                            io: TokioIo::new(client),
                            activity: activity.clone(),
                        };
                        let mut u = TokioIo::new(upstream);
                        let splice = async {
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
                        };
                        // Revocation or idleness drops both connections, closing them.
                        if let Err(why) = tunnel.run_tunnel(activity, splice).await {
                            tracing::debug!(%why, "ending an upgraded connection");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
            // The connection now belongs to the tunnel.
            return Ok(Upstreamed::Hyper(resp, None));
        }
        strip_response_hop_by_hop(resp.headers_mut());
        Ok(Upstreamed::Hyper(resp, lent))
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
        assert!(!strip_hop_by_hop(&mut h));
        assert!(
            h.get("x-secret").is_none()
                && h.get("keep-alive").is_none()
                && h.get(header::CONNECTION).is_none()
        );
        assert!(h.get(header::AUTHORIZATION).is_some());

        let mut ws = HeaderMap::new();
        ws.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        ws.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(strip_hop_by_hop(&mut ws));
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
    fn headers_without_hop_by_hop_ones_stay_as_they_are() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app.local"));
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.insert("x-keep-alive-ish", HeaderValue::from_static("1"));
        let before = h.clone();
        assert!(!strip_hop_by_hop(&mut h));
        assert_eq!(h, before);

        // One hop-by-hop header among them is enough to take the full path.
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        assert!(!strip_hop_by_hop(&mut h));
        assert_eq!(h, before);
    }

    #[tokio::test]
    async fn a_connect_that_hangs_is_given_up_at_the_limit() {
        // A listener whose accept queue is full: the kernel drops further SYNs, so a connect
        // neither succeeds nor fails.
        let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
        socket
            .bind("127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
        let listener = socket.listen(0).unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let mut queued = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
            {
                queued.push(s);
            }
        }
        let connector = UpstreamConnector {
            upstream: Upstream::Direct(addr),
            secret: None,
            docker: None,
        };
        let started = Instant::now();
        let opened = connector.open_within(Duration::from_millis(300)).await;
        let took = started.elapsed();
        match opened {
            Err(ProxyError::UpstreamUnreachable(why)) => {
                assert!(why.contains("no connection within"), "{why}");
            }
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("connected through a full accept queue"),
        }
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
        drop(queued);
    }

    #[test]
    fn a_response_keeps_no_upgrade_it_did_not_make() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_response_hop_by_hop(&mut h);
        assert!(h.get(header::CONNECTION).is_none() && h.get(header::UPGRADE).is_none());
        assert!(h.get(header::CONTENT_TYPE).is_some());
    }

    #[test]
    fn forwarded_headers_chain() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
        let client = "127.0.0.1:5555".parse().unwrap_or_else(|e| panic!("{e}"));
        add_forwarded(
            &mut h,
            client_ip_header(client).as_ref(),
            Some(&HeaderValue::from_static(
                "web.default.preview.localhost:8002",
            )),
            false,
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

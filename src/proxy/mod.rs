//! The preview proxy (data plane): routes requests by host or path to the upstream a Ready
//! PreviewLink's status names, after checking its token.
//!
//! Routes come from reflectors over PreviewLinks and previewd's Secrets (kube-rs's
//! version-rs shape: a watch-fed store read by axum handlers), so a request costs no API
//! call, and a deleted link stops routing as soon as the watch delivers it.

pub mod auth;
pub mod body;
pub mod cors;
pub mod errors;
pub mod forward;
pub mod h1;
pub mod limits;
pub mod revoke;
pub mod rewrite;
pub mod routes;
pub mod secrets;
pub mod server;

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::oneshot;

use crate::controller::injection::agent_secret_name;
use crate::controller::link::injection_name_for;
use crate::controller::shared::MANAGED_BY;
use crate::metrics::Metrics;
use crate::resources::preview_link::PathPrefix;
use crate::resources::{PreviewLink, scoped_api};
use crate::watching::{self, Readiness, SharedCache, Undecodable};
use body::ProxyBody;
use errors::ProxyError;
use forward::Outgoing;
use kube::core::DeserializeGuard;
use routes::Upstream;

/// The proxy's view of the API: reflector stores of PreviewLinks and previewd's Secrets.
///
/// Made apart from the proxy so that the REST shim can ask it [`Routes::check`]: a preview
/// is answered only once this replica's proxy serves the link, a revoke only once it
/// refuses it.
#[derive(Clone)]
pub struct Routes {
    /// The links, shared with the link controller (one cache of them per process).
    links: SharedCache<PreviewLink>,
    secrets: secrets::SecretValues,
    /// What admitted requests hold, revoked as the links change.
    revocations: revoke::Revocations,
}

impl Routes {
    /// Starts the two reflectors on the current runtime, over `namespace` (`None`: all, which
    /// needs cluster-wide read access); they run for the process's life. Objects that do
    /// not decode are skipped and reported to `undecodable`; the watches' health goes to
    /// `readiness`.
    pub fn watch(
        client: Client,
        namespace: Option<&str>,
        undecodable: &Undecodable,
        readiness: &Readiness,
    ) -> Self {
        let (links, writer) = reflector::store();
        let links = SharedCache::new(links);
        let noted = links.clone();
        let link_feed = watching::decoded(
            watcher(
                scoped_api::<DeserializeGuard<PreviewLink>>(client.clone(), namespace),
                watcher::Config::default(),
            )
            .default_backoff()
            .inspect(move |event| noted.note(event)),
            "PreviewLink",
            undecodable.clone(),
            |metadata| PreviewLink {
                metadata,
                spec: crate::resources::PreviewLinkSpec::new(
                    crate::resources::Target::docker("-"),
                    1,
                ),
                status: None,
            },
        )
        .modify(watching::prune);
        let revocations = revoke::Revocations::default();
        let observer = revocations.clone();
        let health = readiness.watch("previewlinks");
        let cache = links.clone();
        tokio::spawn(
            reflector::reflector(writer, link_feed).for_each(move |event| {
                health.observe(&event);
                if let Ok(event) = &event {
                    observer.observe(event);
                    cache.observe(event);
                }
                async {}
            }),
        );
        let secrets = secrets::SecretValues::default();
        let values = secrets.clone();
        let secret_feed = watching::decoded(
            watcher(
                scoped_api::<DeserializeGuard<Secret>>(client, namespace),
                watcher::Config::default().labels(&format!("{MANAGED_BY}=previewd")),
            )
            .default_backoff(),
            "Secret",
            undecodable.clone(),
            |metadata| Secret {
                metadata,
                ..Secret::default()
            },
        );
        let health = readiness.watch("secrets");
        tokio::spawn(secret_feed.for_each(move |event| {
            health.observe(&event);
            if let Ok(event) = &event {
                values.observe(event);
            }
            async {}
        }));
        Routes {
            links,
            secrets,
            revocations,
        }
    }

    /// The links this replica watches, for the link controller to reconcile from.
    pub fn link_cache(&self) -> SharedCache<PreviewLink> {
        self.links.clone()
    }

    /// Whether the proxy forwards requests for the link `key` now, or the error it answers
    /// with: the link must be admitted and, through the agent, its secret known.
    pub fn check(&self, key: &ObjectRef<PreviewLink>) -> Result<(), ProxyError> {
        let link = self
            .links
            .store()
            .get(key)
            .ok_or(ProxyError::LinkNotFound)?;
        let (upstream, _) = routes::admit(&link, k8s_openapi::jiff::Timestamp::now())?;
        match routes::parse_upstream(upstream)? {
            Upstream::Direct(_) | Upstream::Netns { .. } => Ok(()),
            Upstream::Agent { .. } | Upstream::Exec { .. } | Upstream::Handoff { .. } => self
                .agent_secret(&link)
                .map(|_| ())
                .ok_or_else(|| ProxyError::TargetNotReady(AGENT_SECRET_UNKNOWN.into())),
        }
    }

    /// The capability of `link` (from its token Secret), once the proxy knows it.
    fn capability(&self, link: &PreviewLink) -> Option<Arc<str>> {
        let ns = link.metadata.namespace.as_deref().unwrap_or("default");
        let name = &link.status.as_ref()?.token_secret_ref.as_ref()?.name;
        self.secrets.capability(ns, name)
    }

    /// The agent secret of the shared injection a link's traffic goes through.
    fn agent_secret(&self, link: &PreviewLink) -> Option<Arc<str>> {
        let ns = link.metadata.namespace.as_deref().unwrap_or("default");
        let name = agent_secret_name(&injection_name_for(&link.spec.target));
        self.secrets.agent(ns, &name)
    }
}

/// Why a link through the agent cannot be served before the proxy has its secret.
const AGENT_SECRET_UNKNOWN: &str = "the agent's secret is not known yet";

/// What the proxy serves, shared by its workers.
struct Proxy {
    metrics: Arc<Metrics>,
    routes: Routes,
    domain: String,
    /// Whether users reach the proxy over https (its token cookie is then `Secure`).
    https: bool,
    /// How long requests wait on upstreams, unless a link says otherwise.
    timeouts: forward::Timeouts,
    /// Whether links are served by path too (`/p/{id}/`).
    path_urls: bool,
}

/// One proxy worker: a thread with its own single-threaded runtime and upstream pools.
struct Worker {
    proxy: Arc<Proxy>,
    upstreams: forward::Clients,
    /// How long it waits on clients.
    clients: server::ClientTimeouts,
    /// The connections of all workers, against the caps.
    connections: Arc<limits::Connections>,
}

/// How the proxy serves: its listener and names, how long it waits on clients and on
/// upstreams, how many connections it holds, and how many worker threads accept on it.
pub struct Serving {
    /// The bound proxy listener.
    pub listener: tokio::net::TcpListener,
    /// The wildcard domain of host-routed links.
    pub domain: String,
    /// Whether users reach the proxy over https (`--public-url https://…`).
    pub https: bool,
    /// How long requests wait on upstreams, unless a link's `spec.timeouts` says otherwise.
    pub timeouts: forward::Timeouts,
    /// How long the proxy waits on clients.
    pub clients: server::ClientTimeouts,
    /// Whether links are served by path too (`/p/{id}/`: one shared origin).
    pub path_urls: bool,
    /// How many client connections it holds open.
    pub limits: limits::ConnectionLimits,
    /// Worker threads (the machine's cores, in production).
    pub workers: usize,
}

/// Serves the links `routes` holds until `shutdown` resolves.
///
/// The proxy runs the way nginx's worker processes do: `workers` threads, each with a
/// single-threaded runtime, accept on the same socket, and a client connection, the upstream
/// connection it uses and the response bodies between them then live on one thread. A
/// request costs no wake-up of another thread, no work stealing and no pool shared between
/// cores (bench/proxy.sh measured about 8 % less CPU per request than on the multi-threaded
/// runtime).
pub async fn run(
    metrics: Arc<Metrics>,
    docker: Option<crate::runtime::docker::DockerRuntime>,
    routes: Routes,
    serving: Serving,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let proxy = Arc::new(Proxy {
        metrics,
        routes,
        domain: serving.domain,
        https: serving.https,
        timeouts: serving.timeouts,
        path_urls: serving.path_urls,
    });
    let listener = serving.listener.into_std()?;
    let connections = limits::Connections::new(serving.limits);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut finished = Vec::new();
    for i in 0..serving.workers.max(1) {
        let listener = listener.try_clone()?;
        let worker = Arc::new(Worker {
            proxy: proxy.clone(),
            upstreams: forward::Clients::new(docker.clone()),
            clients: serving.clients,
            connections: connections.clone(),
        });
        let mut stop = stop_rx.clone();
        let (done, finish) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("proxy-{i}"))
            .spawn(move || {
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .and_then(|rt| {
                        rt.block_on(async move {
                            let listener = tokio::net::TcpListener::from_std(listener)?;
                            let stopped = async move {
                                let _ = stop.wait_for(|s| *s).await;
                            };
                            accept_loop(listener, worker, stopped).await
                        })
                    });
                let _ = done.send(served);
            })?;
        finished.push(finish);
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    for finish in finished {
        finish.await.map_err(std::io::Error::other)??;
    }
    Ok(())
}

/// One client connection: what its requests share.
struct Conn {
    worker: Arc<Worker>,
    /// The client's address as an `X-Forwarded-For` entry, formatted once.
    client_ip: Option<HeaderValue>,
    /// The upstream connection its last response came on, for its next request.
    affinity: Arc<forward::Affinity>,
    /// What its last request's link resolved to.
    memo: Mutex<Memo>,
}

/// What a client connection's last request resolved to, for its next one: a browser or a
/// load generator asks one connection for the same link again and again. The store lookup
/// and [`routes::admit`] still run on every request, so a changed or deleted link is seen at
/// once; what is kept is only what follows from the same id or the same link object.
#[derive(Default)]
struct Memo {
    /// A link id and its store key.
    key: Option<(String, ObjectRef<PreviewLink>)>,
    /// A link object (as the store holds it: a changed link is a new object), the upstream
    /// its status names, and the grant requests admitted under it hold.
    upstream: Option<(Arc<PreviewLink>, Upstream, revoke::Grant)>,
}

impl Memo {
    /// The link `id` names, from `links`.
    fn link(
        &mut self,
        links: &Store<PreviewLink>,
        id: &str,
    ) -> Result<Arc<PreviewLink>, ProxyError> {
        if self.key.as_ref().is_none_or(|(known, _)| known != id) {
            let key = routes::link_of(id).ok_or(ProxyError::LinkNotFound)?;
            self.key = Some((id.to_owned(), key));
        }
        self.key
            .as_ref()
            .and_then(|(_, key)| links.get(key))
            .ok_or(ProxyError::LinkNotFound)
    }

    /// The upstream `link`'s status names (`status_upstream`, as [`routes::admit`] gave it),
    /// and the grant of `link`'s present state from `revocations`.
    fn upstream(
        &mut self,
        link: &Arc<PreviewLink>,
        status_upstream: &str,
        revocations: &revoke::Revocations,
    ) -> Result<(Upstream, revoke::Grant), ProxyError> {
        if let Some((known, upstream, grant)) = &self.upstream
            && Arc::ptr_eq(known, link)
        {
            return Ok((upstream.clone(), grant.clone()));
        }
        let upstream = routes::parse_upstream(status_upstream)?;
        let grant = revocations.grant(link);
        self.upstream = Some((link.clone(), upstream.clone(), grant.clone()));
        Ok((upstream, grant))
    }
}

/// Serves connections (no router: a request goes straight to [`handle`]) with
/// [`server`]'s loop for bodyless requests, and hyper's HTTP/1.1 server, with upgrades, from
/// the first request that loop leaves to it: a bound on reading each request head,
/// TCP_NODELAY, and a graceful shutdown that lets requests in flight finish (for up to 5 s).
async fn accept_loop(
    listener: tokio::net::TcpListener,
    worker: Arc<Worker>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let clients = worker.clients;
    let refusing = Arc::new(AtomicUsize::new(0));
    // One stop signal per connection, dropped to ask for a graceful shutdown: polling a
    // oneshot receiver is an atomic load, where a shared watch channel took a lock on every
    // poll of every connection.
    let stops = Arc::new(Mutex::new(HashMap::<u64, oneshot::Sender<()>>::new()));
    let mut next_id = 0u64;
    let open = Arc::new(AtomicUsize::new(0));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(clients.header);
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
        let admitted = match worker.connections.admit(client.ip()) {
            Ok(admitted) => admitted,
            Err(over) => {
                refuse(stream, over, &refusing);
                continue;
            }
        };
        // Small writes (WebSocket frames, SSE events) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn {
            worker: worker.clone(),
            client_ip: forward::client_ip_header(client),
            affinity: Arc::default(),
            memo: Mutex::default(),
        });
        let (stop_tx, mut stop) = oneshot::channel::<()>();
        let id = next_id;
        next_id += 1;
        lock(&stops).insert(id, stop_tx);
        let (stops, open, http) = (stops.clone(), open.clone(), http.clone());
        open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let _admitted = admitted;
            let plain = |parts| handle(&conn, parts, Outgoing::Empty);
            if let server::Ended::HandOff(rest) =
                server::serve(stream, plain, clients, &mut stop).await
            {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let conn = conn.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = Outgoing::client(body, clients.body);
                        Ok::<_, Infallible>(handle(&conn, parts, body).await)
                    }
                });
                let served = http
                    .serve_connection(hyper_util::rt::TokioIo::new(rest), service)
                    .with_upgrades();
                tokio::pin!(served);
                let result = tokio::select! {
                    biased;
                    r = served.as_mut() => r,
                    _ = &mut stop => {
                        // Finish the request in flight, then close.
                        served.as_mut().graceful_shutdown();
                        served.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "proxy connection ended");
                }
            }
            lock(&stops).remove(&id);
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
    lock(&stops).clear();
    // Requests in flight get a moment; long streams are cut after it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while open.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Answers a connection over a cap with a short 503 and closes it: the answer is written,
/// the write side shut, and what the client sent read and dropped for a moment, so that the
/// close does not reset the connection before the client read why. At most
/// [`MAX_REFUSING`] connections per worker linger like this; past that the answer is written
/// only if the socket takes it at once, and the connection closed.
fn refuse(stream: tokio::net::TcpStream, over: limits::OverLimit, refusing: &Arc<AtomicUsize>) {
    if refusing.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSING {
        refusing.fetch_sub(1, Ordering::SeqCst);
        // No lingering: the answer goes out if the socket takes it now (a client that sent
        // nothing still reads it before the close).
        let _ = stream.try_write(over.response());
        return;
    }
    let refusing = refusing.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = stream;
        let linger = async {
            stream.write_all(over.response()).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            let mut left: usize = 64 * 1024;
            while left > 0 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => left = left.saturating_sub(n),
                }
            }
            Ok::<_, std::io::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), linger).await;
        refusing.fetch_sub(1, Ordering::SeqCst);
    });
}

/// How many refused connections one worker lets linger at once (see [`refuse`]).
const MAX_REFUSING: usize = 64;

/// Locks `m`, also after a panic elsewhere (the map stays usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Answers one request (its body, if any, in `body`): the upstream's response, or the
/// proxy's error page; counted in the metrics.
async fn handle(conn: &Conn, parts: http::request::Parts, body: Outgoing) -> Response<ProxyBody> {
    let proxy = &conn.worker.proxy;
    let in_flight = proxy.metrics.in_flight();
    let browser = errors::wants_html(&parts.headers);
    let resp = match serve(proxy, conn, parts, body).await {
        Ok(resp) => resp,
        Err(e) => e.respond(browser),
    };
    proxy.metrics.proxied(resp.status().as_u16());
    // A streaming body stays in flight until it is sent.
    resp.map(|body| body.in_flight(in_flight))
}

async fn serve(
    proxy: &Proxy,
    conn: &Conn,
    mut parts: http::request::Parts,
    body: Outgoing,
) -> Result<Response<ProxyBody>, ProxyError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let original_host = hosts.next().cloned();
    // HTTP/1.1 requires exactly one Host (RFC 9112 §3.2); HTTP/1.0 may have none.
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("the request has two Host headers"));
    }
    if original_host.is_none() && parts.version != http::Version::HTTP_10 {
        return Err(ProxyError::BadRequest("the request has no Host header"));
    }
    let host = match parts.uri.authority() {
        Some(a) => Some(a.as_str()),
        None => original_host.as_ref().and_then(|h| h.to_str().ok()),
    };
    let path = parts.uri.path();
    let routed = routes::route(host, path, &proxy.domain, proxy.path_urls)
        .ok_or(ProxyError::LinkNotFound)?;
    // A link's own id, or its capability host (`{name}--{capability}.{namespace}`).
    let found = lock(&conn.memo).link(proxy.routes.links.store(), &routed.id);
    let (link, capability) = match found {
        Ok(link) => (link, None),
        Err(not_found) => match crate::resources::capability::split(&routed.id) {
            Some((id, cap)) if !routed.prefix.starts_with("/p/") => (
                lock(&conn.memo).link(proxy.routes.links.store(), &id)?,
                Some(cap.to_owned()),
            ),
            _ => return Err(not_found),
        },
    };
    let (status_upstream, token_hash) = routes::admit(&link, k8s_openapi::jiff::Timestamp::now())?;
    if let Some(presented) = &capability {
        // A wrong capability names no link at all, as an unknown host does.
        let expected = proxy
            .routes
            .capability(&link)
            .ok_or(ProxyError::LinkNotFound)?;
        if !crate::resources::capability::matches(presented, &expected) {
            return Err(ProxyError::LinkNotFound);
        }
    }
    let (upstream, grant) =
        lock(&conn.memo).upstream(&link, status_upstream, &proxy.routes.revocations)?;
    // `/p/{id}` without its slash: redirect, so the app's relative URLs stay under the prefix.
    let path_routed = routed.prefix != "/";
    if path_routed && path == routed.prefix.trim_end_matches('/') {
        let target = match parts.uri.query() {
            Some(q) => format!("{}?{q}", routed.prefix),
            None => routed.prefix.into_owned(),
        };
        return redirect(StatusCode::PERMANENT_REDIRECT, &target);
    }
    let public_host = host.unwrap_or_default();
    // A CORS preflight carries no credentials: a link's policy answers it before the token.
    let cors = link
        .spec
        .cors
        .as_ref()
        .and_then(|policy| cors::Cors::of(policy, &parts.headers));
    if let Some(c) = &cors
        && c.is_preflight(&parts.method, &parts.headers)
    {
        return Ok(c.preflight(&parts.headers));
    }
    let query = parts.uri.query();
    let mut set_cookie = None;
    if let Some(hash) = token_hash.filter(|_| capability.is_none()) {
        let (token, source) =
            auth::presented(&parts.headers, query).ok_or(ProxyError::TokenMissing)?;
        if !auth::matches(&token, hash) {
            return Err(ProxyError::TokenInvalid);
        }
        // The token matched, so it is the link's own (URL-safe base64).
        if source == auth::TokenSource::Query
            && let Ok(token) = std::str::from_utf8(&token)
        {
            let context = auth::CookieContext::of(public_host, proxy.https);
            set_cookie = HeaderValue::try_from(auth::cookie(token, &routed.prefix, context)).ok();
            // A browser opening the self-authenticating URL is sent on without the token,
            // so it leaves the address bar, the history and every Referer.
            if matches!(parts.method, http::Method::GET | http::Method::HEAD)
                && errors::wants_html(&parts.headers)
            {
                let kept = auth::strip(&mut parts.headers, query);
                let target = match kept {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_owned(),
                };
                let mut resp = redirect(StatusCode::SEE_OTHER, &target)?;
                if let Some(c) = set_cookie {
                    resp.headers_mut().append(header::SET_COOKIE, c);
                }
                resp.headers_mut().insert(
                    header::REFERRER_POLICY,
                    HeaderValue::from_static("no-referrer"),
                );
                return Ok(resp);
            }
        }
    }
    // What goes upstream: the path under the link's prefix (or all of it, for `keep`), and
    // the query less the token.
    let keep_prefix = path_routed && link.spec.path_prefix == PathPrefix::Keep;
    let forward_path = if keep_prefix { path } else { routed.path };
    let stripped =
        (path_routed && !keep_prefix).then(|| routed.prefix.trim_end_matches('/').to_owned());
    // The link's own origin as the client addressed it, where anything is mapped to and from
    // it: the Host is rewritten (through the agent, or spec.hostRewrite), or a prefix is
    // stripped. A direct host-routed link (most requests) builds none. Through the agent or
    // the container's namespace, the app is at localhost:{port}.
    let host_rewritten =
        link.spec.host_rewrite.is_some() || !matches!(upstream, Upstream::Direct(_));
    let public_origin = (host_rewritten || stripped.is_some()).then(|| {
        let scheme = if proxy.https { "https" } else { "http" };
        format!("{scheme}://{}", public_host.to_ascii_lowercase())
    });
    let forwarded_prefix = path_routed
        .then(|| HeaderValue::from_str(routed.prefix.trim_end_matches('/')).ok())
        .flatten();
    let kept = auth::strip(&mut parts.headers, query);
    let query_as_it_came = match &kept {
        Some(q) => matches!(q, Cow::Borrowed(_)),
        None => query.is_none(),
    };
    let uri = match kept {
        // The forwarded target is the end of the request's: the path under the prefix and
        // the query. Host-routed origin-form targets go as they came.
        _ if query_as_it_came && path.ends_with(forward_path) => {
            let skipped = path.len() - forward_path.len();
            let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            if skipped == 0 && parts.uri.scheme().is_none() {
                None
            } else {
                Some(Uri::try_from(target.get(skipped..).unwrap_or(forward_path)))
            }
        }
        Some(q) => Some(Uri::try_from(format!("{forward_path}?{q}"))),
        None => Some(Uri::try_from(forward_path)),
    };
    if let Some(uri) = uri {
        parts.uri = uri.map_err(|_| ProxyError::LinkNotFound)?;
    }
    let upgrade = forward::strip_hop_by_hop(&mut parts.headers);
    forward::add_forwarded(
        &mut parts.headers,
        conn.client_ip.as_ref(),
        original_host.as_ref(),
        proxy.https,
    );
    if let Some(prefix) = forwarded_prefix {
        parts.headers.insert(X_FORWARDED_PREFIX, prefix);
    }
    let secret = match upstream {
        Upstream::Agent { .. } | Upstream::Exec { .. } | Upstream::Handoff { .. } => {
            proxy.routes.agent_secret(&link)
        }
        Upstream::Direct(_) | Upstream::Netns { .. } => None,
    };
    let to = conn
        .worker
        .upstreams
        .destination(&conn.affinity, &upstream, secret.as_deref());
    let rewritten = match (&link.spec.host_rewrite, &upstream) {
        (Some(h), _) => HeaderValue::from_str(h).ok(),
        // Dev servers check Host; the app is at localhost:{port}.
        (
            None,
            Upstream::Agent { .. }
            | Upstream::Exec { .. }
            | Upstream::Netns { .. }
            | Upstream::Handoff { .. },
        ) => to.pool.default_host.clone(),
        (None, Upstream::Direct(_)) => None,
    };
    let host = rewritten
        .clone()
        .or_else(|| original_host.clone())
        .or_else(|| to.pool.default_host.clone());
    if let Some(h) = host {
        parts.headers.insert(header::HOST, h);
    }
    let origins = public_origin.map(|public| rewrite::Origins {
        public,
        upstream: rewritten
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .map(|h| format!("http://{}", h.to_ascii_lowercase())),
        stripped: stripped.as_deref(),
    });
    if let Some(o) = &origins {
        o.request(&mut parts.headers);
    }
    let asked = std::time::Instant::now();
    let timeouts = proxy.timeouts.with(link.spec.timeouts.as_ref());
    let idle = link
        .spec
        .timeouts
        .as_ref()
        .and_then(|t| t.idle)
        .map(Duration::from)
        .filter(|d| !d.is_zero());
    let upstreamed = forward::Clients::forward(
        to,
        Request::from_parts(parts, body),
        upgrade,
        timeouts,
        revoke::StreamGuard::new(grant.clone(), idle),
    )
    .await?;
    proxy.metrics.upstream_answered(asked.elapsed());
    let home = conn.affinity.clone();
    let guard = revoke::StreamGuard::new(grant, idle);
    let mut resp = match upstreamed {
        forward::Upstreamed::Hyper(resp, lent) => {
            resp.map(|body| ProxyBody::upstream(body, lent, home).guarded(guard))
        }
        forward::Upstreamed::H1(resp, pool) => {
            resp.map(|body| ProxyBody::h1(body, pool, home).guarded(guard))
        }
    };
    if matches!(
        resp.status(),
        StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
    ) {
        // No body follows, so nothing may frame one (RFC 9110 §8.6): an upstream's length
        // would make a client wait for bytes that never come.
        let headers = resp.headers_mut();
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::TRANSFER_ENCODING);
    }
    let headers = resp.headers_mut();
    if let Some(o) = &origins {
        o.response(headers);
    }
    if let Some(c) = &cors {
        c.answer(headers);
    }
    if let Some(c) = set_cookie {
        headers.append(header::SET_COOKIE, c);
        // The request's URL held the token: it must not travel on as a Referer.
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    } else if capability.is_some() {
        // The origin itself is the credential: no other site may see it as a Referer.
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        );
    }
    Ok(resp)
}

/// The header telling a path-routed app the prefix it is served under.
const X_FORWARDED_PREFIX: http::HeaderName = http::HeaderName::from_static("x-forwarded-prefix");

/// A redirect answered by the proxy itself.
fn redirect(status: StatusCode, target: &str) -> Result<Response<ProxyBody>, ProxyError> {
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = status;
    let location = HeaderValue::try_from(target)
        .map_err(|e| ProxyError::UpstreamUnreachable(e.to_string()))?;
    resp.headers_mut().insert(header::LOCATION, location);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::target::Target;
    use crate::resources::{PreviewLinkSpec, PreviewLinkStatus};
    use kube::runtime::watcher::Event;

    fn link(upstream: &str) -> PreviewLink {
        let mut link = PreviewLink::new("web", PreviewLinkSpec::new(Target::docker("c"), 80));
        link.metadata.namespace = Some("default".into());
        link.status = Some(PreviewLinkStatus {
            upstream: Some(upstream.into()),
            ..Default::default()
        });
        link
    }

    #[test]
    fn a_connections_memo_follows_changed_and_deleted_links() {
        let (links, mut writer) = reflector::store::<PreviewLink>();
        let mut memo = Memo::default();
        let revocations = revoke::Revocations::default();
        let resolve = |memo: &mut Memo| {
            let link = memo.link(&links, "web.default")?;
            let upstream = link.status.as_ref().and_then(|s| s.upstream.clone());
            memo.upstream(&link, upstream.as_deref().unwrap_or_default(), &revocations)
                .map(|(upstream, _)| upstream)
        };
        assert_eq!(resolve(&mut memo), Err(ProxyError::LinkNotFound));
        writer.apply_watcher_event(&Event::Apply(link("http://10.0.0.1:80")));
        let first = Upstream::Direct(([10, 0, 0, 1], 80).into());
        assert_eq!(resolve(&mut memo), Ok(first.clone()));
        assert_eq!(resolve(&mut memo), Ok(first));
        // The container restarted: the same link, a new object, a new upstream.
        writer.apply_watcher_event(&Event::Apply(link("http://10.0.0.2:80")));
        assert_eq!(
            resolve(&mut memo),
            Ok(Upstream::Direct(([10, 0, 0, 2], 80).into()))
        );
        writer.apply_watcher_event(&Event::Delete(link("http://10.0.0.2:80")));
        assert_eq!(resolve(&mut memo), Err(ProxyError::LinkNotFound));
        assert_eq!(
            memo.link(&links, "nodot").map(|_| ()),
            Err(ProxyError::LinkNotFound)
        );
    }
}

//! `previewd serve`: find where objects live (the embedded API over the local YAML store, or
//! a Kubernetes API server), serve the API listener and the proxy, and run the controllers
//! (under leader election against a real API server), until told to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::api::auth::ApiAuth;
use crate::api::shim::{Shim, ShimConfig};
use crate::controller::leader::{self, LeaseConfig};
use crate::controller::link::LinkConfig;
use crate::controller::{self, ControllerConfig};
use crate::metrics::Metrics;
use crate::store::audit::AuditLog;
use crate::store::disk::OpenError;
use crate::store::{Store, kinds};

/// Where the objects live.
#[derive(Clone, Debug)]
pub enum StoreChoice {
    /// The embedded API over the local YAML store in this directory.
    Local(PathBuf),
    /// A Kubernetes API server: this kubeconfig, or the in-cluster service account.
    Kube {
        /// The kubeconfig file; `None` uses the in-cluster configuration.
        kubeconfig: Option<PathBuf>,
    },
}

impl StoreChoice {
    /// Auto-detection: an explicit kubeconfig, or a pod's service-account environment, means
    /// a real API server; otherwise the local store in the directory `state_dir` gives (asked
    /// for only then, since finding it can fail).
    pub fn detect<E>(
        kubeconfig: Option<PathBuf>,
        state_dir: impl FnOnce() -> Result<PathBuf, E>,
    ) -> Result<Self, E> {
        if kubeconfig.is_some() || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            Ok(StoreChoice::Kube { kubeconfig })
        } else {
            state_dir().map(StoreChoice::Local)
        }
    }
}

/// What `serve` needs to run.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address of the API listener (Kubernetes API when local, REST shim, health, metrics).
    pub api_listen: SocketAddr,
    /// Where the objects live.
    pub store: StoreChoice,
    /// Where and how preview links are served (the proxy's listen address and domain).
    pub links: LinkConfig,
    /// How the controllers run; `None` serves the API (and the proxy) alone.
    pub controller: Option<ControllerConfig>,
    /// Leader election (used with a Kubernetes API server, where replicas share objects).
    pub lease: LeaseConfig,
    /// The token API callers must present (required beyond loopback).
    pub api_token: Option<String>,
    /// Host names the API serves besides its own (`localhost`, loopback, the listen address,
    /// the public URL's host), when it serves without a token.
    pub api_accept_hosts: Vec<String>,
    /// Origins (`https://console.example.com`) whose pages may call the API.
    pub api_accept_origins: Vec<String>,
    /// Where user-named daemons may be read from (the embedded API admits objects by it).
    pub daemon_sources: crate::resources::daemon_source::DaemonSourcePolicy,
    /// Namespace of the objects the REST shim creates.
    pub rest_namespace: String,
    /// Longest a REST shim call waits for status.
    pub rest_wait: std::time::Duration,
    /// Where the embedded API records each resource request (local store only).
    pub audit_log: Option<PathBuf>,
    /// How long the proxy waits on its clients.
    pub proxy_clients: crate::proxy::server::ClientTimeouts,
    /// Most proxy client connections at once (`None`: as many as the open-files limit
    /// allows).
    pub proxy_max_connections: Option<usize>,
    /// Most proxy client connections from one address (0: no such cap).
    pub proxy_max_connections_per_client: usize,
    /// How long the proxy waits on upstreams, unless a link's `spec.timeouts` says otherwise.
    pub proxy_timeouts: crate::proxy::forward::Timeouts,
    /// How long the embedded API keeps Events (local store only).
    pub event_ttl: std::time::Duration,
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The API would be open beyond loopback without a token.
    #[error(transparent)]
    Auth(#[from] crate::api::auth::AuthConfigError),
    /// The state directory is locked or unusable.
    #[error(transparent)]
    State(#[from] OpenError),
    /// The Kubernetes client could not be configured.
    #[error("cannot configure the Kubernetes client: {0}")]
    Kube(String),
    /// The audit log cannot be opened.
    #[error("cannot open the audit log {path}: {source}")]
    Audit {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Leader election is misconfigured.
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("the API server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// The REST shim would create objects in a namespace the controllers do not watch.
    #[error(
        "--rest-namespace {rest} is not the namespace the controllers watch (--namespace \
         {watched}): links the REST shim made there would never be reconciled, and its calls \
         would wait and answer 503; leave --rest-namespace unset or give both the same"
    )]
    RestNamespaceUnwatched {
        /// The REST shim's namespace.
        rest: String,
        /// The namespace the controllers watch.
        watched: String,
    },
}

/// The namespace the REST shim creates objects in: `explicit` (`--rest-namespace`), else
/// `watched` (the one namespace the controllers watch, if they are limited to one), else
/// `default`. A namespace the controllers do not watch is refused at start-up rather than
/// found out from calls that time out.
pub fn rest_namespace(
    explicit: Option<String>,
    watched: Option<&str>,
) -> Result<String, ServeError> {
    match (explicit, watched) {
        (Some(rest), Some(watched)) if rest != watched => Err(ServeError::RestNamespaceUnwatched {
            rest,
            watched: watched.to_owned(),
        }),
        (Some(rest), _) => Ok(rest),
        (None, Some(watched)) => Ok(watched.to_owned()),
        (None, None) => Ok("default".to_owned()),
    }
}

/// The proxy's connection caps: the open-files limit is raised to its hard limit first, and
/// the total cap is what fits in it (or less, when asked).
fn proxy_limits(max: Option<usize>, per_client: usize) -> crate::proxy::limits::ConnectionLimits {
    use crate::proxy::limits;
    let fits = match limits::raise_open_files_limit() {
        Ok((now, before)) => {
            tracing::info!(open_files = now, was = before, "open-files limit");
            limits::total_for(now)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-files limit");
            limits::total_for(1024)
        }
    };
    let total = match max {
        Some(m) if m > fits => {
            tracing::warn!(
                asked = m,
                fits,
                "--proxy-max-connections exceeds what the open-files limit allows; using the limit"
            );
            fits
        }
        Some(m) => m.max(1),
        None => fits,
    };
    tracing::info!(
        max_connections = total,
        max_connections_per_client = per_client,
        "proxy connection caps"
    );
    limits::ConnectionLimits { total, per_client }
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client, ServeError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| ServeError::Kube(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| ServeError::Kube(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::incluster()
            .map_err(|e| ServeError::Kube(format!("in-cluster configuration: {e}")))?,
    };
    // The API server's audit log then names previewd as the caller.
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    kube::Client::try_from(config).map_err(|e| ServeError::Kube(e.to_string()))
}

/// How long the controllers get to finish their reconciles when previewd stops.
const CONTROLLERS_STOP: std::time::Duration = std::time::Duration::from_secs(5);

/// What previewd calls itself on a Kubernetes API server.
pub const USER_AGENT: &str = concat!("previewd/", env!("CARGO_PKG_VERSION"));

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Serves until `shutdown` resolves, then stops the controllers (releasing the lease), ends
/// open watches and stops accepting requests.
pub async fn run(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let auth = ApiAuth::new(config.api_listen, config.api_token.as_deref())?;
    // Before anything opens files: the limit decides the proxy's connection cap.
    let connection_limits = proxy_limits(
        config.proxy_max_connections,
        config.proxy_max_connections_per_client,
    );
    config.lease.validate()?;
    let metrics = Metrics::new();
    let readiness = crate::watching::Readiness::default();
    let undecodable = crate::watching::Undecodable::new(metrics.clone());
    // Locally, the controllers, the proxy and the shim talk to the embedded API in-process
    // (no socket, one implementation); in a cluster, to the API server.
    let (client, store, base) = match &config.store {
        StoreChoice::Local(dir) => {
            let store = Arc::new(Store::open(dir, kinds::all())?.with_admission(
                kinds::daemon_source_admission(config.daemon_sources.clone()),
            ));
            tracing::info!(
                state_dir = %dir.display(),
                objects_revision = store.revision(),
                skipped_files = store.skipped().len(),
                "state directory loaded"
            );
            let audit = match &config.audit_log {
                Some(path) => Some(Arc::new(AuditLog::open(path).map_err(|source| {
                    ServeError::Audit {
                        path: path.clone(),
                        source,
                    }
                })?)),
                None => None,
            };
            let internal = crate::api::internal_router(
                store.clone(),
                metrics.clone(),
                readiness.clone(),
                audit,
            );
            let client = kube::Client::new(internal.clone(), "default");
            (client, Some(store), internal)
        }
        StoreChoice::Kube { kubeconfig } => {
            let client = kube_client(kubeconfig.as_ref()).await?;
            tracing::info!(
                kubeconfig = kubeconfig.as_ref().map(|p| p.display().to_string()),
                "objects live on the Kubernetes API server"
            );
            (
                client,
                None,
                crate::api::probes(metrics.clone(), readiness.clone()),
            )
        }
    };
    let listener = bind(config.api_listen).await?;
    let addr = listener.local_addr().map_err(ServeError::Serve)?;
    if store.is_some() {
        tracing::info!(%addr, "API listening (kubectl --server http://{addr})");
    } else {
        tracing::info!(%addr, "API listening (REST shim, health, metrics)");
    }
    let proxy_listener = bind(config.links.proxy_addr).await?;
    let proxy_addr = proxy_listener.local_addr().map_err(ServeError::Serve)?;
    tracing::info!(%proxy_addr, "preview proxy listening");
    // Link URLs name the address actually bound (port 0 picks one).
    let links = LinkConfig {
        proxy_addr,
        ..config.links
    };

    let guard = crate::api::guard::BrowserGuard::new(
        addr,
        auth.requires_token(),
        links.public_url.as_ref().map(|p| p.host()),
        &config.api_accept_hosts,
        &config.api_accept_origins,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // The proxy reaches containers without a routable address through exec.
    let docker = crate::runtime::docker::DockerRuntime::connect().await.ok();
    // The proxy routes the links of the namespace the controllers reconcile.
    let watched = config
        .controller
        .as_ref()
        .and_then(|c| c.namespace.as_deref());
    let routes = crate::proxy::Routes::watch(client.clone(), watched, &undecodable, &readiness);
    let shim = Shim::new(
        client.clone(),
        docker.clone(),
        routes.clone(),
        ShimConfig {
            namespace: config.rest_namespace,
            wait: config.rest_wait,
            api_url: format!("http://{addr}"),
            links: links.clone(),
        },
    );
    let link_cache = routes.link_cache();
    let proxy = tokio::spawn(crate::proxy::run(
        metrics.clone(),
        docker,
        routes,
        crate::proxy::Serving {
            listener: proxy_listener,
            domain: links.preview_domain.clone(),
            https: links.public_url.as_ref().is_some_and(|p| p.is_https()),
            timeouts: config.proxy_timeouts,
            clients: config.proxy_clients,
            path_urls: links.path_urls,
            limits: connection_limits,
            workers: std::thread::available_parallelism().map_or(1, usize::from),
        },
        stopped(stop_rx.clone()),
    ));
    // A real API server expires Events itself; the embedded one needs this, and its watch
    // history lets old changes go.
    let expiry = store.clone().map(|store| {
        tokio::spawn(futures::future::join(
            crate::store::expiry::run(client.clone(), config.event_ttl, stopped(stop_rx.clone())),
            crate::store::expiry::prune_history(store, stopped(stop_rx.clone())),
        ))
    });
    let controllers = config.controller.map(|c| {
        let metrics = metrics.clone();
        let stop = stopped(stop_rx.clone());
        if store.is_some() {
            // The store's lock already makes this the only server of its objects.
            tokio::spawn(async move {
                controller::run(client, c, (links, link_cache), metrics, stop).await;
            })
        } else {
            let lease = config.lease.clone();
            let elector = client.clone();
            tokio::spawn(async move {
                let work = move |mut stop: tokio::sync::watch::Receiver<bool>| {
                    let (client, c, links, metrics) =
                        (client.clone(), c.clone(), links.clone(), metrics.clone());
                    let link_cache = link_cache.clone();
                    async move {
                        let stop = async move {
                            let _ = stop.wait_for(|s| *s).await;
                        };
                        controller::run(client, c, (links, link_cache), metrics, stop).await;
                    }
                };
                if let Err(e) = leader::run_while_leader(elector, lease, stop, work).await {
                    tracing::error!(error = %e, "leader election failed: this replica does not reconcile");
                }
            })
        }
    });
    if controllers.is_none() {
        tracing::info!("controllers are off: serving the API and the proxy only");
    }

    let app = crate::api::router(base, shim, guard, auth);
    let closing = store.clone();
    // The controllers stop first, while the store still serves them: a controller whose
    // first list had not completed when the store closed would wait for it forever.
    let (controllers_done, controllers_stopped) = tokio::sync::oneshot::channel::<()>();
    let controllers = controllers.map(|c| {
        tokio::spawn(async move {
            let _ = c.await;
            let _ = controllers_done.send(());
        })
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            if tokio::time::timeout(CONTROLLERS_STOP, controllers_stopped)
                .await
                .is_err()
            {
                tracing::warn!(
                    "the controllers did not stop within {CONTROLLERS_STOP:?}; stopping anyway"
                );
            }
            if let Some(s) = closing {
                s.close();
            }
        })
        .await
        .map_err(ServeError::Serve);
    if let Some(c) = controllers {
        c.abort();
        let _ = c.await;
    }
    if let Some(e) = expiry {
        let _ = e.await;
    }
    match proxy.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "the preview proxy failed"),
        Err(e) => tracing::warn!(error = %e, "the preview proxy task failed"),
        Ok(Ok(())) => {}
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_shim_creates_objects_where_the_controllers_look() {
        let ns = |explicit: Option<&str>, watched| {
            rest_namespace(explicit.map(str::to_owned), watched).map_err(|e| e.to_string())
        };
        assert_eq!(ns(None, None), Ok("default".into()));
        assert_eq!(ns(None, Some("team-a")), Ok("team-a".into()));
        assert_eq!(ns(Some("team-b"), None), Ok("team-b".into()));
        assert_eq!(ns(Some("team-a"), Some("team-a")), Ok("team-a".into()));
        let refused = ns(Some("default"), Some("team-a")).unwrap_err();
        assert!(
            refused.contains("--rest-namespace default") && refused.contains("team-a"),
            "{refused}"
        );
    }
}

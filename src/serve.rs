//! `previewd serve`: open the state directory, serve the API, and run the controllers
//! against it in-process, until told to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::controller::link::LinkConfig;
use crate::controller::{self, ControllerConfig};
use crate::metrics::Metrics;
use crate::store::disk::OpenError;
use crate::store::{Store, kinds};

/// What `serve` needs to run.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address of the API listener (Kubernetes API, health, metrics).
    pub api_listen: SocketAddr,
    /// The local YAML store's directory.
    pub state_dir: PathBuf,
    /// Where and how preview links are served (the proxy's listen address and domain).
    pub links: LinkConfig,
    /// How the controllers run; `None` serves the API (and the proxy) alone.
    pub controller: Option<ControllerConfig>,
    /// How long a proxy client may take to send a request head (tests shorten it).
    pub proxy_header_timeout: std::time::Duration,
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The state directory is locked or unusable.
    #[error(transparent)]
    State(#[from] OpenError),
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
}

/// Serves until `shutdown` resolves, then stops the controllers, ends open watches and stops
/// accepting requests.
pub async fn run(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let store = Arc::new(Store::open(&config.state_dir, kinds::all())?);
    tracing::info!(
        state_dir = %config.state_dir.display(),
        objects_revision = store.revision(),
        skipped_files = store.skipped().len(),
        "state directory loaded"
    );
    let metrics = Metrics::new();
    let listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.api_listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Serve)?;
    tracing::info!(%addr, "API listening (kubectl --server http://{addr})");
    let proxy_listener = tokio::net::TcpListener::bind(config.links.proxy_addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.links.proxy_addr,
            source,
        })?;
    let proxy_addr = proxy_listener.local_addr().map_err(ServeError::Serve)?;
    tracing::info!(%proxy_addr, "preview proxy listening");
    // Link URLs name the address actually bound (port 0 picks one).
    let links = LinkConfig {
        proxy_addr,
        ..config.links
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // The controllers and the proxy talk to the same router in-process: no socket, one
    // implementation.
    // The proxy reaches containers without a routable address through exec.
    let docker = crate::runtime::docker::DockerRuntime::connect().await.ok();
    let client = kube::Client::new(
        crate::api::router(store.clone(), metrics.clone()),
        "default",
    );
    let proxy = tokio::spawn(crate::proxy::run(
        metrics.clone(),
        docker,
        client.clone(),
        proxy_listener,
        links.preview_domain.clone(),
        config.proxy_header_timeout,
        stopped(stop_rx.clone()),
    ));
    let controllers = config.controller.map(|c| {
        tokio::spawn(controller::run(
            client,
            c,
            links,
            metrics.clone(),
            stopped(stop_rx.clone()),
        ))
    });
    if controllers.is_none() {
        tracing::info!("controllers are off: serving the API and the proxy only");
    }

    let app = crate::api::router(store.clone(), metrics);
    let closing = store.clone();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            closing.close();
        })
        .await
        .map_err(ServeError::Serve);
    if let Some(c) = controllers {
        let _ = c.await;
    }
    match proxy.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "the preview proxy failed"),
        Err(e) => tracing::warn!(error = %e, "the preview proxy task failed"),
        Ok(Ok(())) => {}
    }
    served
}

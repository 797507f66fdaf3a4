//! `previewd serve`: open the state directory and serve the API until told to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::store::disk::OpenError;
use crate::store::{Store, kinds};

/// What `serve` needs to run.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address of the API listener (Kubernetes API, health).
    pub api_listen: SocketAddr,
    /// The local YAML store's directory.
    pub state_dir: PathBuf,
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

/// Serves until `shutdown` resolves, then ends open watches and stops accepting requests.
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
    let listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.api_listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Serve)?;
    tracing::info!(%addr, "API listening (kubectl --server http://{addr})");
    let app = crate::api::router(store.clone());
    let closing = store.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down");
            closing.close();
        })
        .await
        .map_err(ServeError::Serve)
}

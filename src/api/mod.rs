//! The API listener: the embedded Kubernetes API plus the endpoints operators probe.

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

use crate::store::{Store, api};

/// Everything served on `--api-listen`.
pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .merge(api::router(store))
}

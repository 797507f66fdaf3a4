//! The API listener: the embedded Kubernetes API, the REST shim for backends, and the
//! endpoints operators probe, behind a Bearer token when bound beyond loopback.

pub mod auth;
pub mod shim;

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;
use crate::store::audit::AuditLog;
use crate::store::{Store, api};

/// Health probes and metrics: served in every mode.
pub fn probes(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                        .into_response()
                }
            }),
        )
}

/// The embedded Kubernetes API with the probes: what in-process clients (the controllers,
/// the proxy, the shim) talk to outside a cluster, with no token in between.
/// `audit` records every resource request (`--audit-log`).
pub fn internal_router(
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    audit: Option<Arc<AuditLog>>,
) -> Router {
    probes(metrics).merge(api::audited_router(store, audit))
}

/// Everything served on `--api-listen`: `base` (the probes, plus the embedded API outside a
/// cluster) and the REST shim, all behind `auth`.
pub fn router(base: Router, shim: shim::Shim, auth: auth::ApiAuth) -> Router {
    base.merge(shim::router(shim))
        .layer(axum::middleware::from_fn_with_state(auth, auth::require))
}

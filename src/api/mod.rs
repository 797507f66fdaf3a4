//! The API listener: the embedded Kubernetes API, the REST shim for backends, and the
//! endpoints operators probe, behind a Bearer token when bound beyond loopback.

pub mod auth;
pub mod guard;
pub mod shim;

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::metrics::Metrics;
use crate::store::audit::AuditLog;
use crate::store::{Store, api};
use crate::watching::Readiness;

/// Health probes and metrics: served in every mode. `/readyz` answers 503 with the reason
/// until the watches previewd serves from have synced, and while one is failing.
pub fn probes(metrics: Arc<Metrics>, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    match readiness.check() {
                        Ok(()) => (StatusCode::OK, "ok".to_owned()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
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
    readiness: Readiness,
    audit: Option<Arc<AuditLog>>,
) -> Router {
    probes(metrics, readiness).merge(api::audited_router(store, audit))
}

/// Everything served on `--api-listen`: `base` (the probes, plus the embedded API outside a
/// cluster) and the REST shim, behind `guard` (no browser gets in), then `auth`.
pub fn router(
    base: Router,
    shim: shim::Shim,
    guard: guard::BrowserGuard,
    auth: auth::ApiAuth,
) -> Router {
    base.merge(shim::router(shim))
        .layer(axum::middleware::from_fn_with_state(auth, auth::require))
        .layer(axum::middleware::from_fn_with_state(guard, guard::require))
}

/// Whether `path` is one of the REST shim's (which answer errors in its own shape).
fn is_shim_path(path: &str) -> bool {
    path.starts_with("/api/daemon-proxy/") || path == "/api/openapi.json"
}

/// A refusal before any handler ran: the REST shim's error body on its paths (backends read
/// `detail`), a Kubernetes `Status` elsewhere (kubectl and kube-rs read those).
pub fn refusal(path: &str, status: StatusCode, reason: &'static str, message: &str) -> Response {
    if is_shim_path(path) {
        let body = shim::error::ErrorBody {
            detail: message.to_owned(),
            code: reason_code(reason),
        };
        return (status, axum::Json(body)).into_response();
    }
    crate::store::status::ApiError::new(status.as_u16(), reason, message).into_response()
}

/// `UnsupportedMediaType` → `UNSUPPORTED_MEDIA_TYPE`: the shim's codes are upper snake case.
fn reason_code(reason: &str) -> String {
    let mut code = String::with_capacity(reason.len() + 4);
    for (i, c) in reason.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            code.push('_');
        }
        code.push(c.to_ascii_uppercase());
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_take_the_shape_their_callers_parse() {
        assert_eq!(
            reason_code("UnsupportedMediaType"),
            "UNSUPPORTED_MEDIA_TYPE"
        );
        assert_eq!(reason_code("Forbidden"), "FORBIDDEN");
        assert!(is_shim_path("/api/daemon-proxy/service/status"));
        assert!(!is_shim_path("/api/v1/namespaces/default/secrets"));
        assert!(!is_shim_path("/api"));
    }
}

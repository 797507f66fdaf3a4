//! The REST shim for backends (DESIGN §5): the old daemon-proxy's `/api/daemon-proxy/…`
//! calls, answered by creating and watching PreviewLink and DaemonInjection objects, and an
//! OpenAPI document generated from the handlers' own types.

pub mod error;
mod handlers;
pub mod input;
pub mod model;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use crate::controller::link::REQUESTED_LABEL;
use crate::controller::link::{LinkConfig, container_key};
use crate::proxy::Routes;
use crate::runtime::docker::DockerRuntime;

/// Label on PreviewLinks made through the shim; its value names the container's shared
/// injection, so a container's links are one label query away.
pub const SHIM_LINK_LABEL: &str = "previewd.dev/rest-container";
/// Annotation with the container's name, so a vanished container can still be found by it.
pub const CONTAINER_NAME_ANNOTATION: &str = "previewd.dev/container-name";
/// Annotation with the id or name a backend named the container by (what it looks for in
/// `service/status`).
pub const REQUESTED_AS_ANNOTATION: &str = "previewd.dev/requested-as";
/// Annotation the shim sets to ask for a prompt re-reconcile of a failed or waiting injection.
pub const RETRY_ANNOTATION: &str = "previewd.dev/retry-requested-at";

/// The PreviewLink name for (container, port): a DNS label, short enough for a host name.
pub fn link_name(container: &str, port: u16) -> String {
    format!("{}-{port}", container_key(container, 12))
}

/// What the shim's handlers share.
#[derive(Clone)]
pub struct Shim(Arc<ShimInner>);

/// See [`Shim`].
pub struct ShimInner {
    client: kube::Client,
    namespace: String,
    links_config: LinkConfig,
    api_url: String,
    docker: Option<DockerRuntime>,
    routes: Routes,
    wait: Duration,
}

impl std::ops::Deref for Shim {
    type Target = ShimInner;
    fn deref(&self) -> &ShimInner {
        &self.0
    }
}

/// How the shim is set up.
#[derive(Clone, Debug)]
pub struct ShimConfig {
    /// Namespace of the objects it creates.
    pub namespace: String,
    /// Longest a call waits for an object's status before answering 503.
    pub wait: Duration,
    /// This API's base URL, reported by `service/status`.
    pub api_url: String,
    /// How links are addressed.
    pub links: LinkConfig,
}

impl Shim {
    /// A shim creating objects through `client`, checking containers with `docker`, and
    /// answering a preview or a revoke once `routes` (the proxy's) serves or refuses the link.
    pub fn new(
        client: kube::Client,
        docker: Option<DockerRuntime>,
        routes: Routes,
        config: ShimConfig,
    ) -> Self {
        Shim(Arc::new(ShimInner {
            client,
            routes,
            namespace: config.namespace,
            links_config: config.links,
            api_url: config.api_url,
            docker,
            wait: config.wait,
        }))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "previewd REST shim",
        description = "The daemon-proxy calls of agent-platform backends: inject previewd's daemon into a container, and get preview links to its ports. Every call creates or reads DaemonInjection and PreviewLink objects, which kubectl shows too.",
    ),
    components(schemas(error::ErrorBody)),
    tags((name = "daemon-proxy", description = "The old /api/daemon-proxy contract"))
)]
struct ShimDoc;

/// The routes and the document, from the same list: a handler cannot be served undocumented.
fn parts() -> (axum::Router<Shim>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ShimDoc::openapi())
        .routes(routes!(handlers::inject))
        .routes(routes!(handlers::remove))
        .routes(routes!(handlers::preview, handlers::revoke))
        .routes(routes!(handlers::container_status))
        .routes(routes!(handlers::service_status))
        .split_for_parts()
}

/// The OpenAPI document of the shim, as served at `/api/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    parts().1
}

/// The shim's routes and `/api/openapi.json`.
pub fn router(shim: Shim) -> axum::Router {
    let (router, doc) = parts();
    let doc = Arc::new(doc);
    router
        .route(
            "/api/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .with_state(shim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_every_call_with_its_method() {
        let doc = serde_json::to_value(openapi()).unwrap_or_default();
        let ops: Vec<String> = doc["paths"]
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(path, item)| {
                item.as_object()
                    .into_iter()
                    .flatten()
                    .map(move |(method, _)| format!("{method} {path}"))
            })
            .collect();
        let p = "/api/daemon-proxy";
        for want in [
            format!("post {p}/container/{{id}}/inject"),
            format!("post {p}/container/{{id}}/remove"),
            format!("post {p}/container/{{id}}/preview/{{port}}"),
            format!("delete {p}/container/{{id}}/preview/{{port}}"),
            format!("get {p}/container/{{id}}/status"),
            format!("get {p}/service/status"),
        ] {
            assert!(ops.contains(&want), "{want} missing from {ops:?}");
        }
        assert_eq!(ops.len(), 6, "{ops:?}");
        assert!(
            doc["components"]["schemas"]["PreviewAnswer"]["properties"]["expires_at"].is_object()
        );
    }

    #[test]
    fn link_names_are_short_dns_labels() {
        let name = link_name(&"f".repeat(64), 65535);
        assert!(name.len() <= 63, "{name}");
        assert!(crate::resources::validation::dns1123_label("n", &name).is_ok());
        assert_ne!(link_name("web", 80), link_name("Web", 80));
    }
}

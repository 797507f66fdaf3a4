//! The two custom resources previewd serves and reconciles, in group `previewd.dev`.
//!
//! The Rust types are the source of truth: the CRDs in `crds/` are generated from them
//! ([`crd`]), the embedded API validates objects with them ([`validation`]), and the
//! controllers read and write them through `kube::Api`.

pub mod capability;
pub mod conditions;
pub mod crd;
pub mod daemon_injection;
pub mod daemon_source;
pub mod go_duration;
pub mod preview_link;
#[cfg(test)]
mod schema_agreement;
pub mod target;
pub mod validation;

pub use daemon_injection::{DaemonInjection, DaemonInjectionSpec, DaemonInjectionStatus};
pub use preview_link::{PreviewLink, PreviewLinkSpec, PreviewLinkStatus};
pub use target::Target;

/// The API group of every previewd resource.
pub const GROUP: &str = "previewd.dev";
/// The only served (and stored) version of the previewd resources.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as it appears in objects.
pub const API_VERSION: &str = "previewd.dev/v1alpha1";
/// The `kubectl get previewd` category both kinds belong to.
pub const CATEGORY: &str = "previewd";

/// Objects of a namespaced kind in `namespace`, or in all namespaces (`None`, which needs
/// cluster-wide access): how every watch follows `--namespace`.
pub fn scoped_api<K>(client: kube::Client, namespace: Option<&str>) -> kube::Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => kube::Api::namespaced(client, ns),
        None => kube::Api::all(client),
    }
}

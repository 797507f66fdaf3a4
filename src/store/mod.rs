//! The embedded, Kubernetes-compatible API over a local YAML store.
//!
//! Outside a cluster this is where PreviewLinks and DaemonInjections live. It is faithful to
//! the parts of the API server that kube-rs and kubectl depend on, so the controllers run
//! unmodified on `kube::Client` over [`api::router`], and users use plain `kubectl`.

pub mod api;
pub mod audit;
pub mod discovery;
pub mod disk;
pub mod error;
pub mod expiry;
pub mod fields;
pub mod kinds;
pub mod media;
pub mod meta;
pub mod openapi;
pub mod patch;
pub mod selector;
pub mod state;
pub mod status;
pub mod stored;
pub mod table;

pub use error::StoreError;
pub use state::Store;

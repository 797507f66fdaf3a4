//! previewd: preview links to ports inside containers, declared as Kubernetes-style objects.
//!
//! The library holds everything but argument parsing: the resource model, the embedded
//! Kubernetes-compatible API over a local YAML store, and the client used by the CLI.

pub mod agent;
pub mod allocator;
pub mod api;
pub mod cli;
pub mod controller;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod metrics;
pub mod proxy;
pub mod resources;
pub mod runtime;
pub mod serve;
pub mod store;
pub mod watching;

//! previewd's integration tests: one test binary, one module per area.

mod agent;
mod browser;
mod cli;
mod common;
mod containers;
mod deploy;
mod docker;
mod durability;
mod embedded_api;
mod hostile;
mod kube_mode;
mod kubectl;
mod leader;
mod origins;
mod podexec;
mod proxy;
mod rest;

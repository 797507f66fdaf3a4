//! previewd's integration tests: one test binary, one module per area.

mod agent;
mod cli;
mod common;
mod containers;
mod docker;
mod durability;
mod embedded_api;
mod kubectl;
mod podexec;
mod proxy;
mod rest;

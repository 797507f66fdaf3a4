//! Fuzz harnesses: one function per target, taking arbitrary bytes and panicking on any
//! property violation (a differential mismatch with hyper, a token found but not stripped,
//! a round trip that fails, …), not only on crashes.
//!
//! They live in the library so that both drivers run the same code: cargo-fuzz's targets in
//! `fuzz/` (built with `--cfg fuzzing`) and the bounded run of `cargo test`, where each
//! harness gets its seeds (`fuzz/seeds/{target}/`) and 10,000 deterministic mutations.

mod agent;
mod auth;
pub mod drive;
mod h1_facts;
mod h1_response;
#[cfg(test)]
mod mutate;
mod routes;
mod server_head;
mod shim;
mod store;

pub use agent::{agent_http, proc_net};
pub use auth::auth_token;
pub use h1_response::h1_response;
pub use routes::routes;
pub use server_head::server_head;
pub use shim::shim_input;
pub use store::store_yaml;

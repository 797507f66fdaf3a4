//! `previewd-agent`, the small static daemon previewd injects into containers, and the client
//! previewd talks to it with.
//!
//! Apps in containers often listen only on 127.0.0.1, which nothing outside the container's
//! network namespace can reach. The agent runs inside that namespace (via exec), lists the
//! listening ports and tunnels authenticated `CONNECT`s to loopback, over TCP (`serve`) or
//! over the exec's stdio (`stdio`) where the container IP is not routable (DESIGN §4).
//!
//! Both sides share [`protocol`]; [`client`] is what previewd uses, everything else is the
//! agent binary's (`src/bin/previewd-agent.rs` only calls [`cli::run`]).

pub mod backoff;
pub mod cli;
pub mod client;
pub mod daemon_state;
pub mod handoff;
pub mod http;
pub mod output_log;
pub mod proc_net;
pub mod process;
pub mod protocol;
pub mod secret;
pub mod server;
pub mod stop;
pub mod supervise;

pub use client::AgentError;
pub use protocol::{Health, ListeningPort};

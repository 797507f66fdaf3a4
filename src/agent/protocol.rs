//! The wire contract between previewd and its agent: names, paths, limits and JSON shapes.
//!
//! Both sides import these so a rename can never split them. The protocol is a small
//! HTTP/1.1 subset (one request per connection, `Connection: close`), so it can be spoken
//! over TCP and over an exec's stdio alike, and debugged with `curl` or `nc`.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Request header carrying the per-injection secret; every request must have it.
pub const SECRET_HEADER: &str = "X-Previewd-Agent-Secret";
/// Environment variable the agent reads its secret from. Never argv: argv is world-readable
/// in `/proc/<pid>/cmdline`, and `docker exec` can pass env without a shell.
pub const SECRET_ENV: &str = "PREVIEWD_AGENT_SECRET";
/// Shortest secret the agent accepts, so a forgotten or empty variable can't open it up.
pub const MIN_SECRET_LEN: usize = 16;

/// Where agents live inside a container (one subdirectory per injection): on the rootfs,
/// because tmpfs mounts are usually `noexec` and uploads into them silently vanish.
pub const INSTALL_DIR: &str = "/.previewd";

/// Health and version: lets previewd check it talks to the agent build it injected.
pub const HEALTH_PATH: &str = "/v1/health";
/// The sockets listening inside the container.
pub const PORTS_PATH: &str = "/v1/ports";
/// Asks a `serve` daemon to exit (there is no exec-kill API in Docker).
pub const SHUTDOWN_PATH: &str = "/v1/shutdown";

/// Largest request or response head either side reads, so a hostile peer can't make the
/// other buffer without bound.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest response body the client reads. A host-network container can list every socket
/// of the host, so this leaves room for a few thousand listeners.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// How long either side waits for a complete head, so idle connections can't pin the agent.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Buffer size for each direction of a tunnel splice: large buffers mean fewer syscalls for
/// bulk transfers such as dev-server bundles.
pub const SPLICE_BUFFER_BYTES: usize = 64 * 1024;

/// The answer to `GET /v1/health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The agent's `CARGO_PKG_VERSION`, to detect a stale injected binary.
    pub version: String,
    /// The agent's pid in the container's pid namespace.
    pub pid: u32,
}

/// One listening TCP socket inside the container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListeningPort {
    /// The bound address: loopback ones are reachable only through the agent, wildcard ones
    /// (`0.0.0.0`, `::`) also through the container IP.
    pub address: IpAddr,
    /// The port.
    pub port: u16,
}

/// The answer to `GET /v1/ports`: an object rather than a bare array so fields can be added.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortsResponse {
    /// Listeners, deduplicated and sorted by (port, address).
    pub ports: Vec<ListeningPort>,
}

/// The body of every non-2xx answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What went wrong, for people reading logs.
    pub error: String,
}

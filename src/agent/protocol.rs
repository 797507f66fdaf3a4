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
    /// The inode of the agent's network namespace (`/proc/self/ns/net`): previewd, on the
    /// engine's host, enters the container's namespace only once it names the same one.
    /// Absent from older agents and where `/proc` is not mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_namespace: Option<u64>,
    /// The pid (in the container) of the agent's handoff helper while it runs: previewd
    /// finds it on its host to reach the helper's socket (see `agent::handoff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_pid: Option<u32>,
}

/// The body of every non-2xx answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What went wrong, for people reading logs.
    pub error: String,
}

/// The directory, beside the agent in an injection's own directory, where `supervise` keeps
/// its child's state and output for `daemon-status` to read.
pub const DAEMON_STATE_DIR: &str = "daemon-state";
/// The supervisor's state file (a [`SupervisorState`]), replaced whole by a rename so a reader
/// never sees half of one.
pub const STATE_FILE: &str = "state.json";
/// The child's stdout and stderr, interleaved as written; rotated into
/// [`ROTATED_OUTPUT_FILE`] at [`OUTPUT_FILE_BYTES`], so at most twice that is ever kept.
pub const OUTPUT_FILE: &str = "output.log";
/// The previous [`OUTPUT_FILE`], replaced at each rotation.
pub const ROTATED_OUTPUT_FILE: &str = "output.log.1";
/// Size at which the output file is rotated.
pub const OUTPUT_FILE_BYTES: u64 = 32 * 1024;
/// How many of the most recent exits a [`SupervisorState`] records.
pub const MAX_RECORDED_EXITS: usize = 10;
/// Most lines of output `daemon-status` reports.
pub const STATUS_OUTPUT_LINES: usize = 10;
/// Most bytes of output `daemon-status` reports (the end of the last lines).
pub const STATUS_OUTPUT_BYTES: usize = 2048;

/// What `supervise` writes to [`STATE_FILE`] whenever its child starts or exits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupervisorState {
    /// The supervisor's pid, so a reader can tell a live supervisor from a killed one's
    /// last words.
    pub supervisor_pid: u32,
    /// How often the child was started again after it exited.
    pub restarts: u32,
    /// The child while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child: Option<ChildRun>,
    /// When the next start is due (Unix milliseconds) while the supervisor backs off after
    /// an exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_start_ms: Option<u64>,
    /// The most recent exits (at most [`MAX_RECORDED_EXITS`]), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exits: Vec<DaemonExit>,
}

/// One run of the supervised child.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChildRun {
    /// Its pid.
    pub pid: u32,
    /// When it started (Unix milliseconds).
    pub started_ms: u64,
}

/// How one run of the supervised child ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonExit {
    /// Which run it was: 0 for the first start, then the restart count.
    pub run: u32,
    /// Its exit code, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// When it ended (Unix milliseconds).
    pub at_ms: u64,
    /// How long it ran (milliseconds).
    pub ran_ms: u64,
}

/// What `previewd-agent daemon-status --dir DIR` prints: the supervisor's state checked
/// against the live processes, and the end of the child's output.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonStatus {
    /// Whether the supervisor that wrote the state still runs; if not, nothing restarts the
    /// child.
    pub supervisor_running: bool,
    /// Whether the child runs now.
    pub daemon_running: bool,
    /// The state file, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<SupervisorState>,
    /// The last lines of the child's output (at most [`STATUS_OUTPUT_LINES`] lines and
    /// [`STATUS_OUTPUT_BYTES`] bytes), invalid UTF-8 replaced.
    pub output: String,
}

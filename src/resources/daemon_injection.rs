//! `DaemonInjection`: "this daemon runs in that container".

// kube's `printcolumn(...)` lists repeat `type_ = "string"`, which clippy mistakes for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::target::Target;
use super::validation::{
    ABSOLUTE_PATH_PATTERN, ENV_NAME_PATTERN, ENV_VALUE_PATTERN, INSTALL_PATH_PATTERN,
    INSTALL_PATH_RULE, NEEDS_SOURCE_MESSAGE, USER_PATTERN,
};

/// Desired state: which container, and which daemon (the built-in `previewd-agent` when
/// `daemon` is omitted).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "previewd.dev",
    version = "v1alpha1",
    kind = "DaemonInjection",
    plural = "daemoninjections",
    singular = "daemoninjection",
    shortname = "di",
    category = "previewd",
    namespaced,
    status = "DaemonInjectionStatus",
    derive = "PartialEq",
    doc = "A daemon that previewd keeps running inside a container.",
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".status.target",
        description = "The container the daemon runs in"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Injecting, Running, Failed or Removing"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "How the proxy reaches the daemon"
    ),
    printcolumn(
        name = "Restarts",
        type_ = "integer",
        json_path = ".status.restarts",
        priority = "1",
        description = "Re-injections after container restarts"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DaemonInjectionSpec {
    /// The container to inject into.
    pub target: Target,
    /// The daemon to run; the built-in previewd-agent when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<DaemonSpec>,
}

impl DaemonInjectionSpec {
    /// The built-in agent in `target`: what links and the REST shim ask for.
    pub fn new(target: Target) -> Self {
        DaemonInjectionSpec {
            target,
            daemon: None,
        }
    }
}

// Each field's schema carries the checks `validation::daemon_injection_spec` makes (patterns as
// `#[schemars(...)]`, CEL rules as `#[x_kube(validation = ...)]`), so a cluster refuses what the
// embedded store refuses. The struct's rules: every setting but `user` needs a `source`.
/// A user-named static daemon, injected exactly like the built-in agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.source) || !has(self.args) || size(self.args) == 0")
        .message(NEEDS_SOURCE_MESSAGE)
        .field_path(".args")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new("has(self.source) || !has(self.env) || size(self.env) == 0")
        .message(NEEDS_SOURCE_MESSAGE)
        .field_path(".env")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new("has(self.source) || !has(self.port)")
        .message(NEEDS_SOURCE_MESSAGE)
        .field_path(".port")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new("has(self.source) || !has(self.installPath)")
        .message(NEEDS_SOURCE_MESSAGE)
        .field_path(".installPath")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new("has(self.source) || !has(self.readinessProbe)")
        .message(NEEDS_SOURCE_MESSAGE)
        .field_path(".readinessProbe")
        .reason(Reason::FieldValueForbidden)
)]
pub struct DaemonSpec {
    /// Where the binary comes from; the built-in previewd-agent when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<DaemonSource>,
    /// Arguments passed to the daemon.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables set for the daemon (secrets belong here, never in args).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// The TCP port the daemon listens on inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Absolute path of the binary in the container; defaults to a file under `/.previewd/`
    /// on the root filesystem (never `/tmp` or `/dev/shm`, often tmpfs or noexec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(INSTALL_PATH_PATTERN))]
    #[x_kube(validation = Rule::new(INSTALL_PATH_RULE)
        .message("/tmp, /dev, /proc, /sys and /run are often tmpfs or noexec in containers; use a path on the root filesystem such as /.previewd/"))]
    pub install_path: Option<String>,
    /// How to tell that the daemon is up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    /// `uid:gid` to run as; the container's own user when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(USER_PATTERN))]
    pub user: Option<String>,
}

/// Where a daemon binary is read from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DaemonSource {
    /// An absolute path on the machine previewd runs on; the file must be a static executable.
    #[schemars(schema_with = "absolute_path")]
    HostPath(String),
}

/// The schema of an absolute path: schemars takes validation attributes on fields, not on
/// enum variants.
fn absolute_path(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "pattern": ABSOLUTE_PATH_PATTERN })
}

/// One environment variable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EnvVar {
    /// Variable name.
    #[schemars(pattern(ENV_NAME_PATTERN))]
    pub name: String,
    /// Variable value.
    #[serde(default)]
    #[schemars(pattern(ENV_VALUE_PATTERN))]
    pub value: String,
}

/// A readiness check of the injected daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Probe {
    /// Ready when `GET path` answers 2xx.
    Http(HttpProbe),
    /// Ready when the port accepts a TCP connection.
    Tcp(TcpProbe),
}

/// An HTTP GET readiness check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpProbe {
    /// Request path, starting with `/`.
    #[schemars(pattern(ABSOLUTE_PATH_PATTERN))]
    pub path: String,
    /// Port to probe; the daemon's `port` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// A TCP connect readiness check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpProbe {
    /// Port to probe; the daemon's `port` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// Where an injection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DaemonPhase {
    /// Accepted; waiting for the target (e.g. a stopped container).
    Pending,
    /// Copying or starting the daemon.
    Injecting,
    /// The daemon runs and passed its readiness check.
    Running,
    /// Injection failed; the Ready condition says why.
    Failed,
    /// Being deleted: the daemon is stopped and its files removed.
    Removing,
}

/// Observed state, written only by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DaemonInjectionStatus {
    /// Coarse state for people; conditions carry the details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<DaemonPhase>,
    /// Standard conditions; `Ready` says whether the daemon serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Human form of the target (`docker/web`), for printer columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The resolved full container id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// How the proxy reaches the daemon (`ip:port`, or `exec` for the stdio tunnel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Version the running daemon reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_version: Option<String>,
    /// When the running daemon was injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injected_at: Option<Time>,
    /// How often the daemon was re-injected after the container restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<i32>,
    /// The sockets listening inside the container, as the agent reads them (refreshed while
    /// links use the injection): links with `via: auto` go straight to a port bound to a
    /// wildcard address, and through the agent to one bound to loopback.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ListeningSocket>,
    /// The container's network namespace as previewd's host numbers it. Set when previewd
    /// may enter namespaces (it runs as root beside the engine) and the agent reported the
    /// same one: links to loopback ports then connect from inside it, not through the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_namespace: Option<NetworkNamespace>,
    /// The agent's handoff helper as previewd's host numbers it: its pid, and its network
    /// namespace (the container's). Set when previewd may not enter the namespace but runs
    /// beside the engine: links to loopback ports then get a socket the helper connected
    /// inside the container, reached through `/proc/{pid}/root`, rather than a relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_handoff: Option<NetworkNamespace>,
}

/// A network namespace on previewd's host: a pid in it, and its identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkNamespace {
    /// A host pid in the namespace (the container's main process).
    pub pid: u32,
    /// The namespace's inode (of `/proc/{pid}/ns/net`), checked before every entry, so a
    /// pid reused after the container stopped is never entered.
    pub inode: u64,
}

/// One socket listening inside a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ListeningSocket {
    /// The bound address (`0.0.0.0`, `::`, `127.0.0.1`, `::1`, …).
    pub address: String,
    /// The port.
    pub port: i32,
}

impl ListeningSocket {
    /// Whether it accepts connections on every address, the container's own included.
    pub fn is_wildcard(&self) -> bool {
        self.address
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_unspecified())
    }
}

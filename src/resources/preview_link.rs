//! `PreviewLink`: "this port of that container is reachable at this URL by these people".

// kube's `printcolumn(...)` lists repeat `type_ = "string"`, which clippy mistakes for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::target::Target;
use super::validation::{
    CORS_CREDENTIALS_RULE, CORS_ORIGIN_PATTERN, HOST_REWRITE_PATTERN, POSITIVE_DURATION_PATTERN,
    POSITIVE_DURATION_RULE, TTL_OR_EXPIRY_RULE,
};

// Each field's schema carries the checks `validation::preview_link_spec` makes (patterns as
// `#[schemars(...)]`, CEL rules as `#[x_kube(validation = ...)]`), so a cluster refuses what the
// embedded store refuses; a new field gets its check in both places and cases in
// `schema_agreement`'s table. (Doc comments here become the CRD's descriptions.)
/// Desired state of a preview link.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "previewd.dev",
    version = "v1alpha1",
    kind = "PreviewLink",
    plural = "previewlinks",
    singular = "previewlink",
    shortname = "pl",
    category = "previewd",
    namespaced,
    status = "PreviewLinkStatus",
    derive = "PartialEq",
    doc = "A URL that reverse-proxies to a port inside a container.",
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".status.target",
        description = "The container the link reaches"
    ),
    printcolumn(
        name = "Port",
        type_ = "integer",
        json_path = ".spec.port",
        description = "Port inside the container"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Ready, Expired or Failed"
    ),
    printcolumn(
        name = "URL",
        type_ = "string",
        json_path = ".status.url",
        description = "Where the link is served"
    ),
    printcolumn(
        name = "Expires",
        type_ = "string",
        json_path = ".status.expiresAt",
        priority = "1",
        description = "When the link stops working"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(TTL_OR_EXPIRY_RULE)
    .message("ttl may not be set together with expiresAt")
    .field_path(".ttl")
    .reason(Reason::FieldValueForbidden))]
pub struct PreviewLinkSpec {
    /// The container whose port is previewed.
    pub target: Target,
    /// The TCP port inside the container.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Who may open the link.
    #[serde(default)]
    pub access: Access,
    /// Absolute expiry time; exclusive with `ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Lifetime counted from creation (a positive Go duration, e.g. `90m`); exclusive with
    /// `expiresAt`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::go_duration::deserialize_option"
    )]
    #[schemars(pattern(POSITIVE_DURATION_PATTERN))]
    #[x_kube(validation = Rule::new(POSITIVE_DURATION_RULE).message("must be a positive duration"))]
    pub ttl: Option<kube::core::Duration>,
    /// How the proxy reaches the port.
    #[serde(default)]
    pub via: Via,
    /// `Host` header sent upstream; `localhost:{port}` through the agent when omitted, so
    /// dev servers' host checks pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 261), pattern(HOST_REWRITE_PATTERN))]
    pub host_rewrite: Option<String>,
    /// CORS answers added by the proxy; none when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsPolicy>,
    /// How long the proxy waits for the upstream; the server's defaults when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<LinkTimeouts>,
    /// What a path-routed request (`/p/{name}.{namespace}/…`) sends upstream: the path
    /// under the prefix (`strip`, the default), or the whole path (`keep`, for apps with a
    /// base-path setting: Jupyter's `base_url`, Gradio's `root_path`). Either way the app is
    /// told the prefix in `X-Forwarded-Prefix`.
    #[serde(default)]
    pub path_prefix: PathPrefix,
}

/// What a path-routed request sends upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PathPrefix {
    /// The path under `/p/{name}.{namespace}`; root-relative redirects and cookie paths
    /// the app answers with get the prefix back.
    #[default]
    Strip,
    /// The whole path, prefix included.
    Keep,
}

/// Bounds on waiting for a link's upstream, for apps that need others than the server's
/// defaults (a long-polling endpoint answers late; a quiet stream may be worth closing).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkTimeouts {
    /// Longest wait for a connection to the upstream (Go duration; server default 10s),
    /// then 502 `UPSTREAM_UNREACHABLE`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::go_duration::deserialize_option"
    )]
    #[schemars(pattern(POSITIVE_DURATION_PATTERN))]
    #[x_kube(validation = Rule::new(POSITIVE_DURATION_RULE).message("must be a positive duration"))]
    pub connect: Option<kube::core::Duration>,
    /// Longest wait for the response head once the request was sent (server default 60s,
    /// as nginx's `proxy_read_timeout`; raise it for long polling), then 504
    /// `UPSTREAM_TIMEOUT`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::go_duration::deserialize_option"
    )]
    #[schemars(pattern(POSITIVE_DURATION_PATTERN))]
    #[x_kube(validation = Rule::new(POSITIVE_DURATION_RULE).message("must be a positive duration"))]
    pub response: Option<kube::core::Duration>,
    /// Longest a streaming response or an upgraded connection (WebSocket) may carry no byte
    /// before the proxy closes it; none when omitted (streams stay open while they live).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::go_duration::deserialize_option"
    )]
    #[schemars(pattern(POSITIVE_DURATION_PATTERN))]
    #[x_kube(validation = Rule::new(POSITIVE_DURATION_RULE).message("must be a positive duration"))]
    pub idle: Option<kube::core::Duration>,
}

impl PreviewLinkSpec {
    /// A link to `port` of `target` with the defaults a manifest would get: token access,
    /// through the agent, no expiry.
    pub fn new(target: Target, port: i32) -> Self {
        PreviewLinkSpec {
            target,
            port,
            access: Access::default(),
            expires_at: None,
            ttl: None,
            via: Via::default(),
            host_rewrite: None,
            cors: None,
            timeouts: None,
            path_prefix: PathPrefix::default(),
        }
    }
}

/// Who may use a link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Access {
    /// Requests must carry the link's token (header, query or cookie).
    #[default]
    Token,
    /// Anyone with the URL.
    Public,
}

/// Which path the proxy takes to the port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Via {
    /// Straight to the container when the port listens on a wildcard address and the
    /// container has a routable one, else through the agent (the agent is injected either
    /// way: it says how the port is bound); follows the binding as it changes.
    #[default]
    Auto,
    /// Through the injected agent, so servers bound to 127.0.0.1 work.
    Agent,
    /// Straight to the container IP; the server must listen on a routable address.
    Direct,
}

/// CORS headers the proxy answers with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(CORS_CREDENTIALS_RULE)
    .message("allowCredentials may not be true with allowOrigins \"*\"")
    .field_path(".allowCredentials")
    .reason(Reason::FieldValueForbidden))]
pub struct CorsPolicy {
    /// Origins allowed (`*` for any).
    #[serde(default)]
    #[schemars(inner(pattern(CORS_ORIGIN_PATTERN)))]
    pub allow_origins: Vec<String>,
    /// Whether credentials may be sent cross-origin.
    #[serde(default)]
    pub allow_credentials: bool,
}

/// Where a link is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LinkPhase {
    /// Waiting for its target or its daemon.
    Pending,
    /// Serving.
    Ready,
    /// Past `expiresAt`; the proxy answers 410.
    Expired,
    /// Cannot be served; the Ready condition says why.
    Failed,
}

/// A reference to the Secret holding a link's token under key `token`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretRef {
    /// Secret name, in the link's namespace.
    pub name: String,
}

/// Observed state, written only by the controller. Holds the token's hash, never the token.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreviewLinkStatus {
    /// Coarse state for people; conditions carry the details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<LinkPhase>,
    /// The link in the configured URL style.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The path-routed form, which works with any resolver (when the server serves path
    /// URLs: they share one origin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_url: Option<String>,
    /// The link's own origin, the URL to embed in an `<iframe>` (with `?previewd_token=`
    /// once: the token cookie is then partitioned into the embedding site). The capability
    /// URL, which needs no cookie, is a credential and so only in the link's Secret
    /// (`previewd url --embed`, the REST answer's `embed_url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_url: Option<String>,
    /// Standard conditions; `Ready` says whether the link serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Human form of the target (`docker/web`), for printer columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// When the link stops working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// The resolved upstream the proxy connects to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Which path the proxy takes now (`agent` or `direct`), and why (`spec.via: auto`
    /// chooses by how the port is bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// SHA-256 (hex) of the link's token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_hash: Option<String>,
    /// The Secret holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretRef>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kube's Duration parser panics on `1h-2m` and past Go's range, and reads `1h0` and
    /// `+-1h` as an hour: a spec carrying one must be a plain decode error.
    #[test]
    fn ttls_that_are_not_go_durations_do_not_decode() {
        for ttl in ["1h-2m", "99999999999999999999h", "1h0", "+-1h", "banana"] {
            let spec = serde_json::json!({
                "target": {"docker": {"container": "web"}}, "port": 80, "ttl": ttl,
            });
            let decoded = std::panic::catch_unwind(|| {
                serde_json::from_value::<PreviewLinkSpec>(spec).is_err()
            });
            assert_eq!(decoded.ok(), Some(true), "{ttl:?}");
        }
        let spec = serde_json::json!({
            "target": {"docker": {"container": "web"}}, "port": 80, "ttl": "1.5h",
        });
        let ttl = serde_json::from_value::<PreviewLinkSpec>(spec)
            .ok()
            .and_then(|s| s.ttl);
        assert_eq!(
            ttl.map(std::time::Duration::from),
            Some(std::time::Duration::from_secs(5400))
        );
    }
}

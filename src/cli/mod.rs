//! The kubectl-like client commands (`apply`, `get`, `delete`), talking to a previewd API
//! server over HTTP exactly as kubectl would, so they exercise the same API users script.

pub mod apply;
pub mod delete;
pub mod get;
pub mod link;

use http::Request;
use serde_json::Value;

use crate::store::kinds::{self, Kind};

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server answered with a Kubernetes `Status` error.
    #[error("Error from server ({reason}): {message}")]
    Server {
        /// The Status reason (NotFound, Invalid, …).
        reason: String,
        /// The Status message.
        message: String,
    },
    /// The server could not be reached or answered nonsense.
    #[error("cannot talk to the previewd API at {server}: {source}")]
    Connect {
        /// The server URL.
        server: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The user's input is wrong (unknown kind, bad YAML, missing name).
    #[error("error: {0}")]
    Input(String),
    /// Reading a manifest failed.
    #[error("error: cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A connection to one previewd API server.
pub struct Connection {
    client: kube::Client,
    server: String,
    namespace: String,
}

impl Connection {
    /// Connects to `server` (e.g. `http://127.0.0.1:8001`), defaulting to `namespace`, with
    /// the Bearer `token` of an API served beyond loopback.
    pub fn new(server: &str, namespace: &str, token: Option<&str>) -> Result<Self, CliError> {
        let uri = server
            .parse::<http::Uri>()
            .map_err(|e| CliError::Input(format!("invalid --server {server:?}: {e}")))?;
        let mut config = kube::Config::new(uri);
        config.auth_info.token = token.map(|t| t.to_owned().into());
        let client = kube::Client::try_from(config).map_err(|source| CliError::Connect {
            server: server.to_owned(),
            source,
        })?;
        Ok(Connection {
            client,
            server: server.to_owned(),
            namespace: namespace.to_owned(),
        })
    }

    /// The default namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Sends a request; Kubernetes `Status` errors become [`CliError::Server`].
    pub async fn send(&self, req: Request<Vec<u8>>) -> Result<Value, CliError> {
        self.client
            .request::<Value>(req)
            .await
            .map_err(|e| match e {
                kube::Error::Api(status) => CliError::Server {
                    reason: status.reason.clone(),
                    message: status.message.clone(),
                },
                source => CliError::Connect {
                    server: self.server.clone(),
                    source,
                },
            })
    }
}

/// Finds a kind by any of its names (plural, singular, kind, short name, `name.group`).
pub fn resolve_kind(name: &str) -> Result<Kind, CliError> {
    kinds::all()
        .into_iter()
        .find(|k| k.is_named(name))
        .ok_or_else(|| CliError::Input(format!("the server doesn't have a resource type {name:?}")))
}

/// The URL of a collection (`name` = None) or of one object.
pub fn url(kind: &Kind, namespace: Option<&str>, name: Option<&str>) -> String {
    let prefix = if kind.group.is_empty() {
        format!("/api/{}", kind.version)
    } else {
        format!("/apis/{}/{}", kind.group, kind.version)
    };
    let mut u = match namespace {
        Some(ns) => format!("{prefix}/namespaces/{ns}/{}", kind.plural),
        None => format!("{prefix}/{}", kind.plural),
    };
    if let Some(n) = name {
        u.push('/');
        u.push_str(n);
    }
    u
}

/// How kubectl names an object in messages: `previewlink.previewd.dev/web`.
pub fn display_name(kind: &Kind, name: &str) -> String {
    if kind.group.is_empty() {
        format!("{}/{name}", kind.singular)
    } else {
        format!("{}.{}/{name}", kind.singular, kind.group)
    }
}

//! Errors of the embedded API, each mapped to the Kubernetes `Status` a real API server sends.

use crate::resources::validation::FieldError;

/// Why a store operation failed. The variants mirror the Kubernetes `StatusReason`s that
/// clients (kube-rs, kubectl) act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        /// `plural.group` of the resource.
        resource: String,
        /// Object name.
        name: String,
    },
    /// A create found the name taken.
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists {
        /// `plural.group` of the resource.
        resource: String,
        /// Object name.
        name: String,
    },
    /// Optimistic concurrency: the caller's resourceVersion is stale.
    #[error("Operation cannot be fulfilled on {resource} \"{name}\": {reason}")]
    Conflict {
        /// `plural.group` of the resource.
        resource: String,
        /// Object name.
        name: String,
        /// Why, e.g. that the object was modified.
        reason: String,
    },
    /// The object fails validation.
    #[error("{kind}.{group} \"{name}\" is invalid: {}", causes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", "))]
    Invalid {
        /// Kind of the object.
        kind: String,
        /// API group of the object ("" for core).
        group: String,
        /// Object name.
        name: String,
        /// One entry per bad field.
        causes: Vec<FieldError>,
    },
    /// The request itself is malformed (bad patch, bad selector, bad body).
    #[error("{0}")]
    BadRequest(String),
    /// A watch or list asked for history that is no longer kept.
    #[error("too old resource version: {requested} ({oldest})")]
    Gone {
        /// The resourceVersion the client asked for.
        requested: u64,
        /// The oldest resourceVersion still served.
        oldest: u64,
    },
    /// A malformed state file holds this object's name; previewd never overwrites it.
    #[error(
        "the state file {path} for {resource} \"{name}\" could not be read ({reason}); fix or move it away, previewd will not overwrite it"
    )]
    Unreadable {
        /// `plural.group` of the resource.
        resource: String,
        /// Object name.
        name: String,
        /// The state file.
        path: String,
        /// The parse error.
        reason: String,
    },
    /// Persisting to the state directory failed; nothing was changed in memory.
    #[error("writing the state directory failed: {0}")]
    Storage(#[source] std::io::Error),
    /// Serializing an object failed.
    #[error("encoding the object failed: {0}")]
    Encode(#[source] serde_yaml::Error),
    /// An object's JSON (as the store keeps it in memory) did not encode or decode.
    #[error("encoding or decoding the object as JSON failed: {0}")]
    Json(#[source] serde_json::Error),
}

impl StoreError {
    /// HTTP status code and Kubernetes `reason` for this error.
    pub fn code_and_reason(&self) -> (u16, &'static str) {
        match self {
            StoreError::NotFound { .. } => (404, "NotFound"),
            StoreError::AlreadyExists { .. } => (409, "AlreadyExists"),
            StoreError::Conflict { .. } => (409, "Conflict"),
            StoreError::Invalid { .. } => (422, "Invalid"),
            StoreError::BadRequest(_) => (400, "BadRequest"),
            StoreError::Gone { .. } => (410, "Expired"),
            StoreError::Unreadable { .. } => (500, "InternalError"),
            StoreError::Storage(_) | StoreError::Encode(_) | StoreError::Json(_) => {
                (500, "InternalError")
            }
        }
    }

    /// A short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        self.code_and_reason().1
    }
}

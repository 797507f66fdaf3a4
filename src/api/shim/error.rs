//! The shim's failures, each with an HTTP status and a machine-readable code. Backends of the
//! old daemon-proxy read `detail`, as FastAPI wrote it; `code` is for programs.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub detail: String,
    /// What went wrong, for programs (`CONTAINER_NOT_FOUND`, `INVALID_PORT`, …).
    pub code: String,
}

/// Why a shim call failed.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The container id is not a Docker id or name.
    #[error("{0}")]
    InvalidContainerId(String),
    /// The port is not 1–65535.
    #[error("{0}")]
    InvalidPort(String),
    /// The query has unknown or malformed fields.
    #[error("{0}")]
    InvalidQuery(String),
    /// The id is a prefix of more than one container's id.
    #[error("{0}")]
    AmbiguousContainerId(String),
    /// No such container.
    #[error("{0}")]
    ContainerNotFound(String),
    /// The container exists but is not running (exec needs a running container).
    #[error("{0}")]
    ContainerNotRunning(String),
    /// No preview link for that container and port.
    #[error("{0}")]
    LinkNotFound(String),
    /// The object the call would create or change belongs to someone else (e.g. made with
    /// kubectl), or is in use by such objects.
    #[error("{0}")]
    Conflict(String),
    /// Injection or link set-up failed; `reason` is the object's Ready condition reason.
    #[error("{reason}: {message}")]
    Failed {
        /// The condition reason.
        reason: String,
        /// The condition message.
        message: String,
    },
    /// The Docker engine cannot be reached.
    #[error("{0}")]
    DockerUnavailable(String),
    /// The objects did not reach the wanted state within the call's time limit; they stay,
    /// and a later call picks them up.
    #[error("{0}")]
    Timeout(String),
    /// Reading or writing the objects failed.
    #[error("API request failed: {0}")]
    Kube(#[source] kube::Error),
    /// Missing or wrong `Authorization: Bearer` token.
    #[error("{0}")]
    Unauthorized(String),
}

impl ShimError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ShimError::InvalidContainerId(_)
            | ShimError::AmbiguousContainerId(_)
            | ShimError::InvalidPort(_) => StatusCode::BAD_REQUEST,
            ShimError::InvalidQuery(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ShimError::ContainerNotFound(_) | ShimError::LinkNotFound(_) => StatusCode::NOT_FOUND,
            ShimError::ContainerNotRunning(_) | ShimError::Conflict(_) => StatusCode::CONFLICT,
            ShimError::Failed { .. } | ShimError::Kube(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ShimError::DockerUnavailable(_) | ShimError::Timeout(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ShimError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        }
    }

    /// The machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ShimError::InvalidContainerId(_) => "INVALID_CONTAINER_ID",
            ShimError::AmbiguousContainerId(_) => "AMBIGUOUS_CONTAINER_ID",
            ShimError::InvalidPort(_) => "INVALID_PORT",
            ShimError::InvalidQuery(_) => "INVALID_QUERY",
            ShimError::ContainerNotFound(_) => "CONTAINER_NOT_FOUND",
            ShimError::ContainerNotRunning(_) => "CONTAINER_NOT_RUNNING",
            ShimError::LinkNotFound(_) => "LINK_NOT_FOUND",
            ShimError::Conflict(_) => "CONFLICT",
            ShimError::Failed { .. } => "INJECTION_FAILED",
            ShimError::DockerUnavailable(_) => "DOCKER_UNAVAILABLE",
            ShimError::Timeout(_) => "TIMEOUT",
            ShimError::Kube(_) => "API_ERROR",
            ShimError::Unauthorized(_) => "UNAUTHORIZED",
        }
    }
}

impl IntoResponse for ShimError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "REST shim call failed");
        }
        let body = ErrorBody {
            detail: self.to_string(),
            code: self.code().to_owned(),
        };
        let mut res = (status, Json(body)).into_response();
        match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            }
            StatusCode::UNAUTHORIZED => {
                res.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_mistakes_are_4xx_and_carry_a_code() {
        let cases = [
            (ShimError::InvalidContainerId("x".into()), 400),
            (ShimError::AmbiguousContainerId("x".into()), 400),
            (ShimError::InvalidPort("x".into()), 400),
            (ShimError::InvalidQuery("x".into()), 422),
            (ShimError::ContainerNotFound("x".into()), 404),
            (ShimError::ContainerNotRunning("x".into()), 409),
            (ShimError::Timeout("x".into()), 503),
        ];
        for (e, code) in cases {
            let res = e.into_response();
            assert_eq!(res.status().as_u16(), code);
            assert_eq!(
                res.headers().get(header::CONTENT_TYPE),
                Some(&HeaderValue::from_static("application/json"))
            );
        }
    }
}

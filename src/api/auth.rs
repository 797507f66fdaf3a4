//! Bearer-token protection of the API listener. On loopback only local processes reach it,
//! so no token is needed; bound anywhere else, every call but the health probes must carry
//! `Authorization: Bearer <PREVIEWD_API_TOKEN>`, and previewd refuses to start without one.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::shim::error::ShimError;
use crate::controller::link::token_hash;
use crate::proxy::auth::matches;

/// Paths answered without a token: orchestrators probe them unauthenticated.
const OPEN_PATHS: [&str; 3] = ["/healthz", "/livez", "/readyz"];

/// Shortest API token accepted: guessing it must be hopeless.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why the API cannot be served as configured.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// Bound beyond loopback with no token.
    #[error(
        "--api-listen {0} is not a loopback address: set PREVIEWD_API_TOKEN (at least {MIN_TOKEN_LEN} characters) so that only callers holding it are served"
    )]
    TokenRequired(SocketAddr),
    /// The token is too short.
    #[error("PREVIEWD_API_TOKEN must be at least {MIN_TOKEN_LEN} characters long")]
    TokenTooShort,
}

/// Who may call the API: anyone (loopback, no token) or holders of the token.
#[derive(Clone, Debug)]
pub struct ApiAuth {
    /// SHA-256 (hex) of the token, when one is required.
    token_hash: Option<Arc<str>>,
}

impl ApiAuth {
    /// Decides from the listen address and the configured token: a token, when given, is
    /// always required; without one, only a loopback address may be served.
    pub fn new(listen: SocketAddr, token: Option<&str>) -> Result<Self, AuthConfigError> {
        match token.filter(|t| !t.is_empty()) {
            Some(t) if t.len() < MIN_TOKEN_LEN => Err(AuthConfigError::TokenTooShort),
            Some(t) => Ok(ApiAuth {
                token_hash: Some(token_hash(t).into()),
            }),
            None if listen.ip().is_loopback() => Ok(ApiAuth { token_hash: None }),
            None => Err(AuthConfigError::TokenRequired(listen)),
        }
    }

    /// Whether every call needs the token (then the token, not the `Host`, keeps browsers
    /// out: see [`super::guard`]).
    pub fn requires_token(&self) -> bool {
        self.token_hash.is_some()
    }

    /// Whether a request with these headers to this path is let through.
    pub fn allows(&self, path: &str, authorization: Option<&str>) -> bool {
        let Some(expected) = &self.token_hash else {
            return true;
        };
        if OPEN_PATHS.contains(&path) {
            return true;
        }
        authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| matches(t.trim().as_bytes(), expected))
    }
}

/// The middleware: refuses calls without the token with 401.
pub async fn require(State(auth): State<ApiAuth>, req: Request, next: Next) -> Response {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth.allows(req.uri().path(), authorization) {
        return next.run(req).await;
    }
    ShimError::Unauthorized(
        "this API needs the header 'Authorization: Bearer <PREVIEWD_API_TOKEN>'".into(),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn beyond_loopback_a_token_is_required() {
        assert!(ApiAuth::new(addr("127.0.0.1:8001"), None).is_ok());
        assert!(ApiAuth::new(addr("[::1]:8001"), None).is_ok());
        assert!(matches!(
            ApiAuth::new(addr("0.0.0.0:8001"), None),
            Err(AuthConfigError::TokenRequired(_))
        ));
        assert!(matches!(
            ApiAuth::new(addr("0.0.0.0:8001"), Some("short")),
            Err(AuthConfigError::TokenTooShort)
        ));
        assert!(ApiAuth::new(addr("0.0.0.0:8001"), Some("0123456789abcdef")).is_ok());
    }

    #[test]
    fn only_the_token_opens_and_probes_stay_open() {
        let auth = ApiAuth::new(addr("0.0.0.0:1"), Some("0123456789abcdef"))
            .unwrap_or_else(|e| panic!("{e}"));
        let p = "/api/daemon-proxy/service/status";
        assert!(auth.allows(p, Some("Bearer 0123456789abcdef")));
        assert!(!auth.allows(p, Some("Bearer 0123456789abcdeX")));
        assert!(!auth.allows(p, Some("0123456789abcdef")));
        assert!(!auth.allows(p, None));
        assert!(!auth.allows("/apis", None));
        assert!(auth.allows("/healthz", None));
        let open = ApiAuth::new(addr("127.0.0.1:1"), None).unwrap_or_else(|e| panic!("{e}"));
        assert!(open.allows(p, None));
    }
}

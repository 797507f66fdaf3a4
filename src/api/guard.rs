//! What keeps a web page out of the API listener.
//!
//! On loopback the API serves without a token, as `kubectl proxy` does, so every local
//! process may call it — and so may every web page in the user's browser, which can reach any
//! loopback port. Three rules close that, before authentication and before any handler:
//! - **Host**: without a token only the listener's own names are served (`kubectl proxy
//!   --accept-hosts`), so a page on a rebound DNS name (`evil.example` resolving to
//!   127.0.0.1) reads nothing. With a token, the token is the defence (a browser never holds
//!   it) and the names clients use in a cluster vary, so any `Host` is served.
//! - **Origin**: browsers send `Origin` on every cross-origin write and WebSocket, and
//!   `Sec-Fetch-Site` on every request; a request from another site is refused.
//! - **Media types**: a body is read only in the media types kube-apiserver accepts
//!   ([`MediaType`]), so the one write a page can send without a CORS preflight (`text/plain`,
//!   a form) is refused.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::Body as _;

use super::refusal;
use crate::store::media::{MediaType, MediaTypeError};

/// Which hosts and origins the API listener serves.
#[derive(Clone, Debug)]
pub struct BrowserGuard(Arc<Policy>);

#[derive(Debug)]
struct Policy {
    /// Host names (lowercase, without port) served; `None` serves any (a token guards).
    hosts: Option<Vec<String>>,
    /// Origins (`scheme://host[:port]`, lowercase) allowed besides the listener's own.
    origins: Vec<String>,
    /// The listener's port: its own origin is `http://{host}:{port}` for a served host.
    port: u16,
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `Host` names no host this listener serves.
    #[error(
        "the Host {0:?} is not served by this API (DNS rebinding protection); add it with --api-accept-hosts"
    )]
    Host(String),
    /// No `Host`, or more than one.
    #[error("the request needs exactly one Host")]
    HostCount,
    /// A browser sent it from another site.
    #[error("requests from the origin {0:?} are refused; add it with --api-accept-origins")]
    Origin(String),
    /// `Sec-Fetch-Site` says another site made the request.
    #[error("cross-site requests are refused (Sec-Fetch-Site: {0})")]
    CrossSite(String),
    /// A body in a media type the API does not read.
    #[error(transparent)]
    MediaType(#[from] MediaTypeError),
}

impl Refused {
    /// The status code: 415 for media types, 400 for a malformed `Host`, else 403.
    pub fn status(&self) -> StatusCode {
        match self {
            Refused::MediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refused::HostCount => StatusCode::BAD_REQUEST,
            _ => StatusCode::FORBIDDEN,
        }
    }
}

/// `host` without its port (`[::1]:8001` → `[::1]`), lowercase.
fn host_name(host: &str) -> String {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    };
    name.to_ascii_lowercase()
}

impl BrowserGuard {
    /// The policy for a listener on `listen`: with `token_required`, any host; else
    /// `localhost`, `127.0.0.1`, `[::1]`, the listen address, `public_host` and `extra_hosts`.
    /// `extra_origins` are allowed besides the listener's own origin.
    pub fn new(
        listen: SocketAddr,
        token_required: bool,
        public_host: Option<&str>,
        extra_hosts: &[String],
        extra_origins: &[String],
    ) -> Self {
        let hosts = (!token_required).then(|| {
            let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
                .into_iter()
                .map(str::to_owned)
                .collect();
            if !listen.ip().is_unspecified() {
                hosts.push(host_name(&listen.to_string()));
            }
            hosts.extend(public_host.map(str::to_ascii_lowercase));
            hosts.extend(extra_hosts.iter().map(|h| host_name(h.trim())));
            hosts.sort();
            hosts.dedup();
            hosts
        });
        BrowserGuard(Arc::new(Policy {
            hosts,
            origins: extra_origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            port: listen.port(),
        }))
    }

    /// Whether a request with these parts may be served. `host` is the request target's
    /// authority, if it had one (else the `Host` header counts); `has_body` whether a body
    /// follows.
    pub fn check(
        &self,
        host: Option<&str>,
        headers: &HeaderMap,
        has_body: bool,
    ) -> Result<(), Refused> {
        let policy = &self.0;
        let mut hosts = headers.get_all(header::HOST).iter();
        let host = match (host, hosts.next(), hosts.next()) {
            (_, _, Some(_)) | (None, None, None) => return Err(Refused::HostCount),
            (Some(h), _, None) => h.to_owned(),
            (None, Some(h), None) => String::from_utf8_lossy(h.as_bytes()).into_owned(),
        };
        let name = host_name(&host);
        if let Some(served) = &policy.hosts
            && !served.contains(&name)
        {
            return Err(Refused::Host(host));
        }
        if let Some(site) = headers.get("sec-fetch-site") {
            let site = String::from_utf8_lossy(site.as_bytes()).to_ascii_lowercase();
            if site != "same-origin" && site != "none" {
                return Err(Refused::CrossSite(site));
            }
        }
        for origin in headers.get_all(header::ORIGIN) {
            let origin = String::from_utf8_lossy(origin.as_bytes()).to_ascii_lowercase();
            if !self.origin_allowed(&origin) {
                return Err(Refused::Origin(origin));
            }
        }
        if has_body {
            MediaType::of(headers)?;
        }
        Ok(())
    }

    /// An origin is allowed when it is listed, or is the listener's own
    /// (`http://{served host}:{port}`).
    fn origin_allowed(&self, origin: &str) -> bool {
        let policy = &self.0;
        if policy.origins.iter().any(|o| o == origin) {
            return true;
        }
        let Some(authority) = origin.strip_prefix("http://") else {
            return false;
        };
        let Some((name, port)) = authority.rsplit_once(':') else {
            return false;
        };
        let served = match &policy.hosts {
            Some(hosts) => hosts.iter().any(|h| h == name),
            None => false,
        };
        served && port.parse() == Ok(policy.port)
    }
}

/// The middleware: refuses what [`BrowserGuard::check`] refuses, with a Kubernetes `Status`
/// (or the REST shim's error body on its paths).
pub async fn require(State(guard): State<BrowserGuard>, req: Request, next: Next) -> Response {
    let has_body = !req.body().is_end_stream();
    let authority = req.uri().authority().map(|a| a.as_str().to_owned());
    match guard.check(authority.as_deref(), req.headers(), has_body) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            tracing::info!(path = req.uri().path(), refused = %e, "API request refused");
            let reason = match e.status() {
                StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaType",
                StatusCode::BAD_REQUEST => "BadRequest",
                _ => "Forbidden",
            };
            refusal(req.uri().path(), e.status(), reason, &e.to_string()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn loopback() -> BrowserGuard {
        let listen = "127.0.0.1:8001".parse().unwrap_or_else(|e| panic!("{e}"));
        BrowserGuard::new(
            listen,
            false,
            Some("preview.example.com"),
            &["api.internal".into()],
            &["https://console.example.com".into()],
        )
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_the_listeners_own_names_are_served_without_a_token() {
        let g = loopback();
        for ok in [
            "127.0.0.1:8001",
            "localhost:8001",
            "LOCALHOST",
            "[::1]:8001",
            "preview.example.com",
            "api.internal:9",
        ] {
            assert_eq!(
                g.check(None, &headers(&[("host", ok)]), false),
                Ok(()),
                "{ok}"
            );
        }
        for rebound in [
            "rebound.evil.example",
            "rebound.evil.example:8001",
            "127.0.0.1.nip.io:8001",
            "localhost.evil.example",
        ] {
            assert!(
                matches!(
                    g.check(None, &headers(&[("host", rebound)]), false),
                    Err(Refused::Host(_))
                ),
                "{rebound}"
            );
        }
        assert_eq!(g.check(None, &headers(&[]), false), Err(Refused::HostCount));
        assert_eq!(
            g.check(
                None,
                &headers(&[("host", "localhost"), ("host", "evil.example")]),
                false
            ),
            Err(Refused::HostCount)
        );
        // An absolute-form target's authority is the host.
        assert!(matches!(
            g.check(
                Some("evil.example"),
                &headers(&[("host", "localhost")]),
                false
            ),
            Err(Refused::Host(_))
        ));
        // With a token, any name (a cluster's Service names vary; the token guards).
        let tokened = BrowserGuard::new(
            "0.0.0.0:8001".parse().unwrap_or_else(|e| panic!("{e}")),
            true,
            None,
            &[],
            &[],
        );
        assert_eq!(
            tokened.check(
                None,
                &headers(&[("host", "previewd-api.previewd.svc:8001")]),
                false
            ),
            Ok(())
        );
    }

    #[test]
    fn other_sites_are_refused_and_only_kube_media_types_carry_bodies() {
        let g = loopback();
        let host = ("host", "127.0.0.1:8001");
        assert!(matches!(
            g.check(
                None,
                &headers(&[host, ("origin", "https://evil.example")]),
                false
            ),
            Err(Refused::Origin(_))
        ));
        assert!(matches!(
            g.check(None, &headers(&[host, ("origin", "null")]), false),
            Err(Refused::Origin(_))
        ));
        assert!(matches!(
            g.check(
                None,
                &headers(&[host, ("origin", "http://localhost:3000")]),
                false
            ),
            Err(Refused::Origin(_)),
        ));
        assert_eq!(
            g.check(
                None,
                &headers(&[host, ("origin", "http://localhost:8001")]),
                false
            ),
            Ok(())
        );
        assert_eq!(
            g.check(
                None,
                &headers(&[host, ("origin", "https://console.example.com")]),
                false
            ),
            Ok(())
        );
        assert!(matches!(
            g.check(
                None,
                &headers(&[host, ("sec-fetch-site", "cross-site")]),
                false
            ),
            Err(Refused::CrossSite(_))
        ));
        assert_eq!(
            g.check(None, &headers(&[host, ("sec-fetch-site", "none")]), false),
            Ok(())
        );
        assert!(matches!(
            g.check(
                None,
                &headers(&[host, ("content-type", "text/plain")]),
                true
            ),
            Err(Refused::MediaType(MediaTypeError::Unsupported(_)))
        ));
        assert!(matches!(
            g.check(None, &headers(&[host]), true),
            Err(Refused::MediaType(MediaTypeError::Missing))
        ));
        assert_eq!(
            g.check(
                None,
                &headers(&[host, ("content-type", "application/yaml")]),
                true
            ),
            Ok(())
        );
        // No body: no media type needed (the REST shim's POSTs carry none).
        assert_eq!(g.check(None, &headers(&[host]), false), Ok(()));
        assert_eq!(Refused::HostCount.status(), StatusCode::BAD_REQUEST);
    }
}

//! The proxy's explicit errors: a machine-readable code, JSON for API clients and a small
//! HTML page for browsers. Never a silent fallback to somewhere else.

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::proxy::body::ProxyBody;

/// Why the proxy did not forward a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// The request is malformed (e.g. no `Host`, or two).
    BadRequest(&'static str),
    /// No link answers to this host or path.
    LinkNotFound,
    /// A token link was asked without a token.
    TokenMissing,
    /// The token does not match the link.
    TokenInvalid,
    /// The link is past `expiresAt`.
    LinkExpired,
    /// The link is not Ready (its container or agent is not there yet).
    TargetNotReady(String),
    /// The upstream (or the agent) cannot be reached.
    UpstreamUnreachable(String),
    /// The upstream took too long to answer.
    UpstreamTimeout(String),
    /// The agent is there, but nothing listens on the port.
    PortClosed(u16),
}

impl ProxyError {
    /// Status code and machine-readable code.
    pub fn code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BAD_REQUEST"),
            ProxyError::LinkNotFound => (StatusCode::NOT_FOUND, "LINK_NOT_FOUND"),
            ProxyError::TokenMissing => (StatusCode::UNAUTHORIZED, "TOKEN_MISSING"),
            ProxyError::TokenInvalid => (StatusCode::FORBIDDEN, "TOKEN_INVALID"),
            ProxyError::LinkExpired => (StatusCode::GONE, "LINK_EXPIRED"),
            ProxyError::TargetNotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "TARGET_NOT_READY"),
            ProxyError::UpstreamUnreachable(_) => (StatusCode::BAD_GATEWAY, "UPSTREAM_UNREACHABLE"),
            ProxyError::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "UPSTREAM_TIMEOUT"),
            ProxyError::PortClosed(_) => (StatusCode::BAD_GATEWAY, "PORT_CLOSED"),
        }
    }

    fn message(&self) -> String {
        match self {
            ProxyError::BadRequest(why) => (*why).into(),
            ProxyError::LinkNotFound => "no preview link answers here".into(),
            ProxyError::TokenMissing => {
                "this preview link needs a token: the X-Previewd-Token header or ?previewd_token="
                    .into()
            }
            ProxyError::TokenInvalid => "the token does not match this preview link".into(),
            ProxyError::LinkExpired => "this preview link has expired".into(),
            ProxyError::TargetNotReady(why) => format!("the preview target is not ready: {why}"),
            ProxyError::UpstreamUnreachable(why) => {
                format!("the preview target cannot be reached: {why}")
            }
            ProxyError::UpstreamTimeout(why) => format!("the preview target is too slow: {why}"),
            ProxyError::PortClosed(port) => {
                format!("nothing listens on port {port} in the container")
            }
        }
    }

    /// The response, as HTML for a browser (see [`wants_html`]), else JSON.
    pub fn respond(&self, browser: bool) -> Response<ProxyBody> {
        let (status, code) = self.code();
        let message = self.message();
        let waiting = matches!(self, ProxyError::TargetNotReady(_));
        let (content_type, body) = if browser && waiting {
            // A person waits for the app to come up: the page tries again by itself.
            let page = format!(
                "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content={RETRY_SECONDS}><title>Starting…</title><h1>The preview is starting</h1><p>{}</p><p>This page reloads by itself every {RETRY_SECONDS} seconds.</p><p><code>{code}</code></p>\n",
                html_escape(&message)
            );
            ("text/html; charset=utf-8", page.into_bytes())
        } else if browser {
            let page = format!(
                "<!doctype html><meta charset=utf-8><title>{code}</title><h1>{status}</h1><p>{}</p><p><code>{code}</code></p>\n",
                html_escape(&message)
            );
            ("text/html; charset=utf-8", page.into_bytes())
        } else {
            let body = json!({"error": code, "message": message}).to_string();
            ("application/json", body.into_bytes())
        };
        let mut resp = Response::new(ProxyBody::full(body));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if waiting {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_SECONDS));
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }
}

/// How long a client waiting for a target that is not ready should wait before asking again.
const RETRY_SECONDS: &str = "2";

/// Whether the client prefers HTML (a browser): decided before the request is consumed, so
/// the proxy keeps no copy of the headers for the error path.
pub fn wants_html(request_headers: &HeaderMap) -> bool {
    request_headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_get_html_and_clients_json() {
        let mut browser = HeaderMap::new();
        browser.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/html,application/xhtml+xml"),
        );
        let r = ProxyError::TargetNotReady("<agent>".into()).respond(wants_html(&browser));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers().get(header::RETRY_AFTER).map(|v| v.as_bytes()),
            Some(&b"2"[..])
        );
        assert!(
            r.headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/html"))
        );
        let r = ProxyError::TokenInvalid.respond(wants_html(&HeaderMap::new()));
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(
            r.headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
        );
    }
}

//! A link's CORS policy (`spec.cors`), answered by the proxy.
//!
//! Without a policy the proxy adds nothing and passes CORS headers through as the app sends
//! them. With one, the proxy answers for the app: a preflight (`OPTIONS` with
//! `Access-Control-Request-Method`) from an allowed origin is answered at once, before the
//! token check (browsers send preflights without credentials), and every response to an
//! allowed origin carries `Access-Control-Allow-Origin` (and `-Credentials` when the policy
//! allows them). Other origins get no CORS headers from the proxy, so the browser refuses
//! them.

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

use crate::proxy::body::ProxyBody;
use crate::resources::preview_link::CorsPolicy;

/// What a link's policy says about one request's origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cors {
    /// The `Access-Control-Allow-Origin` value: the request's origin, or `*`.
    allow_origin: HeaderValue,
    credentials: bool,
}

/// How long a browser may cache a preflight answer (seconds).
const MAX_AGE: &str = "600";

impl Cors {
    /// The answer for a request from an allowed origin; `None` without an `Origin` or for an
    /// origin the policy does not allow.
    pub fn of(policy: &CorsPolicy, headers: &HeaderMap) -> Option<Self> {
        let origin = headers.get(header::ORIGIN)?;
        let origin_str = origin.to_str().ok()?;
        let listed = policy
            .allow_origins
            .iter()
            .any(|o| o.trim_end_matches('/').eq_ignore_ascii_case(origin_str));
        let any = policy.allow_origins.iter().any(|o| o == "*");
        if !listed && !any {
            return None;
        }
        // With credentials the origin is named: browsers refuse `*` then.
        let allow_origin = if any && !listed && !policy.allow_credentials {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        };
        Some(Cors {
            allow_origin,
            credentials: policy.allow_credentials,
        })
    }

    /// Whether the request is a preflight.
    pub fn is_preflight(&self, method: &Method, headers: &HeaderMap) -> bool {
        *method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// The proxy's answer to a preflight: the method and headers asked for are allowed.
    pub fn preflight(&self, request: &HeaderMap) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        self.answer(h);
        for (asked, allowed) in [
            (
                header::ACCESS_CONTROL_REQUEST_METHOD,
                header::ACCESS_CONTROL_ALLOW_METHODS,
            ),
            (
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                header::ACCESS_CONTROL_ALLOW_HEADERS,
            ),
        ] {
            if let Some(v) = request.get(&asked) {
                h.insert(allowed, v.clone());
            }
        }
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(MAX_AGE),
        );
        resp
    }

    /// Adds the policy's headers to a response (replacing the app's own).
    pub fn answer(&self, headers: &mut HeaderMap) {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin.clone(),
        );
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        } else {
            headers.remove(header::ACCESS_CONTROL_ALLOW_CREDENTIALS);
        }
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str], credentials: bool) -> CorsPolicy {
        CorsPolicy {
            allow_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
            allow_credentials: credentials,
        }
    }

    fn from(origin: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_static(origin));
        h
    }

    #[test]
    fn listed_origins_are_answered_and_others_are_not() {
        let p = policy(&["https://app.example.com"], true);
        assert!(Cors::of(&p, &from("https://evil.example")).is_none());
        assert!(Cors::of(&p, &HeaderMap::new()).is_none());
        let Some(c) = Cors::of(&p, &from("https://app.example.com")) else {
            panic!("a listed origin was refused")
        };
        let mut h = HeaderMap::new();
        c.answer(&mut h);
        assert_eq!(
            h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                .map(|v| v.as_bytes()),
            Some(&b"https://app.example.com"[..])
        );
        assert!(h.get(header::ACCESS_CONTROL_ALLOW_CREDENTIALS).is_some());
        // Any origin, without credentials: `*`.
        let any = Cors::of(&policy(&["*"], false), &from("https://x.example"));
        assert_eq!(
            any.map(|c| c.allow_origin),
            Some(HeaderValue::from_static("*"))
        );
    }

    #[test]
    fn preflights_allow_what_they_ask() {
        let p = policy(&["https://app.example.com"], false);
        let mut req = from("https://app.example.com");
        req.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("PUT"),
        );
        req.insert(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            HeaderValue::from_static("content-type, x-csrf"),
        );
        let Some(c) = Cors::of(&p, &req) else {
            panic!("allowed origin refused")
        };
        assert!(c.is_preflight(&Method::OPTIONS, &req));
        assert!(!c.is_preflight(&Method::GET, &req));
        let resp = c.preflight(&req);
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        let h = resp.headers();
        assert_eq!(
            h.get(header::ACCESS_CONTROL_ALLOW_METHODS)
                .map(|v| v.as_bytes()),
            Some(&b"PUT"[..])
        );
        assert_eq!(
            h.get(header::ACCESS_CONTROL_ALLOW_HEADERS)
                .map(|v| v.as_bytes()),
            Some(&b"content-type, x-csrf"[..])
        );
        assert!(h.get(header::ACCESS_CONTROL_ALLOW_CREDENTIALS).is_none());
    }
}

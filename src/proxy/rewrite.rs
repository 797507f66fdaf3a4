//! Same-origin stays same-origin across what the proxy changes.
//!
//! Through the agent the app is told it is at `localhost:{port}` (dev servers check `Host`),
//! and a path-routed link's app may see its path without the `/p/{id}` prefix. Apps that
//! check `Origin` against `Host` (Jupyter, Streamlit, Django's CSRF) would then refuse every
//! request their own page makes, and redirects they answer would leave the link. As nginx's
//! `proxy_redirect default` and `proxy_cookie_path` do, the proxy maps both ways:
//! - requests: an `Origin` that **equals the link's own public origin**, and a `Referer`
//!   under it, are rewritten to the origin the app was told; any other origin passes as it
//!   came, so the app's CSRF and WebSocket-origin checks still refuse other sites (rewriting
//!   every origin would be a CSRF bypass);
//! - responses: `Location`, `Content-Location` and `Refresh` URLs naming the app's origin
//!   point back at the public one, a root-relative one gets a stripped prefix back, a
//!   `Set-Cookie` `Domain` naming the app's host is dropped (the cookie stays the link's)
//!   and its `Path` gets the prefix back.

use http::{HeaderMap, HeaderValue, header};

/// The two sides of a link's traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origins<'a> {
    /// The origin the client addressed (`http://web.default.preview.localhost:8002`),
    /// lowercase.
    pub public: String,
    /// The origin the app was told it is at (`http://localhost:3000`), when the proxy
    /// rewrote `Host`; lowercase.
    pub upstream: Option<String>,
    /// The path prefix the proxy took off (`/p/web.default`), when it did.
    pub stripped: Option<&'a str>,
}

/// `url`'s part after `origin` when `url` is under it (the origin compared ignoring ASCII
/// case, and followed by a path, query, fragment or nothing).
fn under<'u>(url: &'u str, origin: &str) -> Option<&'u str> {
    let head = url.get(..origin.len())?;
    let rest = &url[origin.len()..];
    (head.eq_ignore_ascii_case(origin) && (rest.is_empty() || rest.starts_with(['/', '?', '#'])))
        .then_some(rest)
}

/// `origin` without its scheme (`localhost:3000`).
fn authority(origin: &str) -> &str {
    origin.split_once("://").map_or(origin, |(_, a)| a)
}

/// A host without its port (`[::1]:3000` → `[::1]`).
fn host_name(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => authority,
    }
}

impl Origins<'_> {
    /// Rewrites the request's `Origin` and `Referer` when they are the link's own.
    pub fn request(&self, headers: &mut HeaderMap) {
        if let Some(upstream) = &self.upstream
            && let Some(origin) = headers.get(header::ORIGIN)
            && origin
                .as_bytes()
                .eq_ignore_ascii_case(self.public.as_bytes())
            && let Ok(v) = HeaderValue::from_str(upstream)
        {
            headers.insert(header::ORIGIN, v);
        }
        let referer = headers
            .get(header::REFERER)
            .and_then(|r| r.to_str().ok())
            .and_then(|r| under(r, &self.public))
            .map(|rest| {
                let rest = match self.stripped {
                    Some(prefix) => rest
                        .strip_prefix(prefix)
                        .filter(|r| r.is_empty() || r.starts_with(['/', '?', '#'])),
                    None => Some(rest),
                };
                rest.map(|rest| {
                    let origin = self.upstream.as_deref().unwrap_or(&self.public);
                    let rest = if rest.is_empty() { "/" } else { rest };
                    format!("{origin}{rest}")
                })
            });
        match referer {
            // A referrer from another link on a shared (path) origin is not this app's.
            Some(None) => {}
            Some(Some(mapped)) => {
                if let Ok(v) = HeaderValue::from_str(&mapped) {
                    headers.insert(header::REFERER, v);
                }
            }
            None => {}
        }
    }

    /// Where a URL the app answered with points for the client: its own origin mapped to the
    /// public one, a root-relative path given the stripped prefix back; `None` when it
    /// stays as it is.
    fn map_url(&self, url: &str) -> Option<String> {
        let prefix = self.stripped.unwrap_or("");
        if let Some(upstream) = &self.upstream {
            let host = authority(upstream);
            for scheme in ["http://", "https://"] {
                if let Some(rest) = under(url, &format!("{scheme}{host}")) {
                    let rest = if rest.is_empty() { "/" } else { rest };
                    return Some(format!("{}{prefix}{rest}", self.public));
                }
            }
        }
        if self.stripped.is_some() && url.starts_with('/') && !url.starts_with("//") {
            return Some(format!("{prefix}{url}"));
        }
        None
    }

    /// Maps the response's `Location`, `Content-Location`, `Refresh` and `Set-Cookie`.
    pub fn response(&self, headers: &mut HeaderMap) {
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            if let Some(mapped) = headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| self.map_url(v.trim()))
                && let Ok(v) = HeaderValue::from_str(&mapped)
            {
                headers.insert(name, v);
            }
        }
        if let Some(mapped) = headers
            .get(header::REFRESH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| self.map_refresh(v))
            && let Ok(v) = HeaderValue::from_str(&mapped)
        {
            headers.insert(header::REFRESH, v);
        }
        if headers.contains_key(header::SET_COOKIE) {
            let cookies: Vec<HeaderValue> = headers
                .get_all(header::SET_COOKIE)
                .iter()
                .map(|c| {
                    c.to_str()
                        .ok()
                        .map(|c| self.map_cookie(c))
                        .and_then(|c| HeaderValue::from_str(&c).ok())
                        .unwrap_or_else(|| c.clone())
                })
                .collect();
            headers.remove(header::SET_COOKIE);
            for c in cookies {
                headers.append(header::SET_COOKIE, c);
            }
        }
    }

    /// `Refresh: 5; url=…` with its URL mapped.
    fn map_refresh(&self, value: &str) -> Option<String> {
        let lower = value.to_ascii_lowercase();
        let at = lower.find("url=")? + "url=".len();
        let url = value[at..].trim().trim_matches(['\'', '"']);
        Some(format!("{}{}", &value[..at], self.map_url(url)?))
    }

    /// A `Set-Cookie` with a `Domain` naming the app's host dropped and its `Path` under
    /// the stripped prefix.
    fn map_cookie(&self, cookie: &str) -> String {
        let app_host = self.upstream.as_deref().map(|u| host_name(authority(u)));
        let mut parts: Vec<String> = Vec::new();
        for (i, part) in cookie.split(';').enumerate() {
            let trimmed = part.trim();
            if i > 0
                && let Some((name, value)) = trimmed.split_once('=')
            {
                let name = name.trim();
                let value = value.trim();
                if name.eq_ignore_ascii_case("domain")
                    && app_host
                        .is_some_and(|h| value.trim_start_matches('.').eq_ignore_ascii_case(h))
                {
                    continue;
                }
                if name.eq_ignore_ascii_case("path")
                    && let Some(prefix) = self.stripped
                    && value.starts_with('/')
                {
                    parts.push(format!("{name}={prefix}{value}"));
                    continue;
                }
            }
            parts.push(trimmed.to_owned());
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_link() -> Origins<'static> {
        Origins {
            public: "http://web.default.preview.localhost:8002".into(),
            upstream: Some("http://localhost:3000".into()),
            stripped: None,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn get<'h>(h: &'h HeaderMap, name: &str) -> Vec<&'h str> {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    }

    #[test]
    fn only_the_links_own_origin_becomes_the_apps() {
        let o = agent_link();
        let mut own = headers(&[
            ("origin", "http://WEB.default.preview.localhost:8002"),
            (
                "referer",
                "http://web.default.preview.localhost:8002/lab?x=1",
            ),
        ]);
        o.request(&mut own);
        assert_eq!(get(&own, "origin"), ["http://localhost:3000"]);
        assert_eq!(get(&own, "referer"), ["http://localhost:3000/lab?x=1"]);
        for foreign in [
            "https://evil.example",
            "http://other.default.preview.localhost:8002",
            "http://web.default.preview.localhost:8003",
            "https://web.default.preview.localhost:8002",
            "null",
        ] {
            let mut h = HeaderMap::new();
            h.insert("origin", HeaderValue::from_static(foreign));
            h.insert("referer", HeaderValue::from_static(foreign));
            o.request(&mut h);
            assert_eq!(
                get(&h, "origin"),
                [foreign],
                "a foreign origin was rewritten"
            );
            assert_eq!(get(&h, "referer"), [foreign]);
        }
        // A longer host that starts with the link's is another origin.
        let mut h = headers(&[("referer", "http://web.default.preview.localhost:80021/")]);
        o.request(&mut h);
        assert_eq!(
            get(&h, "referer"),
            ["http://web.default.preview.localhost:80021/"]
        );
    }

    #[test]
    fn answers_naming_the_app_point_back_at_the_link() {
        let o = agent_link();
        let mut h = headers(&[
            ("location", "http://localhost:3000/lab?"),
            ("content-location", "https://LOCALHOST:3000"),
            ("refresh", "0; url=http://localhost:3000/tree"),
            (
                "set-cookie",
                "_xsrf=abc; Domain=localhost; Path=/; SameSite=Lax",
            ),
            ("set-cookie", "other=1; Domain=.example.com"),
        ]);
        o.response(&mut h);
        assert_eq!(
            get(&h, "location"),
            ["http://web.default.preview.localhost:8002/lab?"]
        );
        assert_eq!(
            get(&h, "content-location"),
            ["http://web.default.preview.localhost:8002/"]
        );
        assert_eq!(
            get(&h, "refresh"),
            ["0; url=http://web.default.preview.localhost:8002/tree"]
        );
        assert_eq!(
            get(&h, "set-cookie"),
            [
                "_xsrf=abc; Path=/; SameSite=Lax",
                "other=1; Domain=.example.com"
            ]
        );
        // Elsewhere, and relative, stays.
        let mut h = headers(&[("location", "https://accounts.example.com/login")]);
        o.response(&mut h);
        assert_eq!(get(&h, "location"), ["https://accounts.example.com/login"]);
        let mut h = headers(&[("location", "/lab")]);
        o.response(&mut h);
        assert_eq!(
            get(&h, "location"),
            ["/lab"],
            "host links keep root-relative paths"
        );
    }

    #[test]
    fn a_stripped_prefix_comes_back_on_paths() {
        let o = Origins {
            public: "http://127.0.0.1:8002".into(),
            upstream: Some("http://localhost:8888".into()),
            stripped: Some("/p/nb.default"),
        };
        let mut h = headers(&[("location", "/lab?"), ("set-cookie", "_xsrf=1; Path=/")]);
        o.response(&mut h);
        assert_eq!(get(&h, "location"), ["/p/nb.default/lab?"]);
        assert_eq!(get(&h, "set-cookie"), ["_xsrf=1; Path=/p/nb.default/"]);
        let mut h = headers(&[("location", "http://localhost:8888/tree")]);
        o.response(&mut h);
        assert_eq!(
            get(&h, "location"),
            ["http://127.0.0.1:8002/p/nb.default/tree"]
        );
        let mut h = headers(&[("location", "//cdn.example.com/x")]);
        o.response(&mut h);
        assert_eq!(get(&h, "location"), ["//cdn.example.com/x"]);
        // The app's own page as referrer loses the prefix; another link's on the same
        // origin is not rewritten.
        let mut h = headers(&[
            ("origin", "http://127.0.0.1:8002"),
            ("referer", "http://127.0.0.1:8002/p/nb.default/lab"),
        ]);
        o.request(&mut h);
        assert_eq!(get(&h, "origin"), ["http://localhost:8888"]);
        assert_eq!(get(&h, "referer"), ["http://localhost:8888/lab"]);
        let mut h = headers(&[("referer", "http://127.0.0.1:8002/p/other.default/x")]);
        o.request(&mut h);
        assert_eq!(
            get(&h, "referer"),
            ["http://127.0.0.1:8002/p/other.default/x"]
        );
    }
}

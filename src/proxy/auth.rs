//! Token checks for `access: token` links: header, query parameter or cookie, compared in
//! constant time against the SHA-256 in the link's status. What previewd consumed is removed
//! before forwarding; the app's own `Authorization` and cookies pass untouched.

use std::borrow::Cow;

use http::{HeaderMap, HeaderValue, header};
use sha2::{Digest, Sha256};

/// Header carrying a token.
pub const TOKEN_HEADER: &str = "x-previewd-token";
/// Query parameter carrying a token (what self-authenticating URLs use).
pub const TOKEN_QUERY: &str = "previewd_token";
/// Cookie set after a token arrived in the query, so subresources and WebSockets ride it.
pub const TOKEN_COOKIE: &str = "previewd_token";

/// Where a presented token came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `X-Previewd-Token`.
    Header,
    /// `?previewd_token=` (a cookie is then set).
    Query,
    /// The cookie.
    Cookie,
}

/// The token a request presents, and where it came from (header, then query, then cookie).
pub fn presented(headers: &HeaderMap, query: Option<&str>) -> Option<(String, TokenSource)> {
    if let Some(v) = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) {
        return Some((v.trim().to_owned(), TokenSource::Header));
    }
    if let Some(v) = query.and_then(|q| query_value(q, TOKEN_QUERY)) {
        return Some((v, TokenSource::Query));
    }
    cookie_value(headers, TOKEN_COOKIE).map(|v| (v, TokenSource::Cookie))
}

fn query_value(query: &str, name: &str) -> Option<String> {
    url_pairs(query).find(|(k, _)| k == name).map(|(_, v)| v)
}

fn url_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (percent_decode(k), percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi * 16 + lo);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Whether `token` hashes to `expected_hash` (hex), compared in constant time.
pub fn matches(token: &str, expected_hash: &str) -> bool {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut actual = [0u8; 64];
    for (pair, b) in actual
        .chunks_exact_mut(2)
        .zip(Sha256::digest(token.as_bytes()))
    {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
    let expected = expected_hash.as_bytes();
    actual.len() == expected.len()
        && actual
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether a cookie pair is previewd's own.
fn is_token_cookie(pair: &str) -> bool {
    pair.split_once('=').map(|(k, _)| k) == Some(TOKEN_COOKIE)
}

/// Removes what previewd consumed: its header, its query parameter and its cookie (other
/// cookies stay, in order). Returns the query to forward: `query` itself (borrowed) when it
/// carries no token, else rebuilt without it (`None` when nothing is left). What previewd did
/// not consume is left byte for byte, and costs no allocation.
pub fn strip<'q>(headers: &mut HeaderMap, query: Option<&'q str>) -> Option<Cow<'q, str>> {
    // One pass over the names present spares the lookups when neither is there (the
    // common case for public links).
    let (mut token_header, mut cookies) = (false, false);
    for name in headers.keys() {
        token_header |= name == TOKEN_HEADER;
        cookies |= name == header::COOKIE;
    }
    if token_header {
        headers.remove(TOKEN_HEADER);
    }
    let has_token_cookie = cookies
        && headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .any(|c| is_token_cookie(c.trim()));
    if has_token_cookie {
        let cookies: Vec<String> = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| {
                v.split(';')
                    .map(|c| c.trim().to_owned())
                    .collect::<Vec<_>>()
            })
            .filter(|c| !c.is_empty() && !is_token_cookie(c))
            .collect();
        headers.remove(header::COOKIE);
        if !cookies.is_empty()
            && let Ok(v) = HeaderValue::from_str(&cookies.join("; "))
        {
            headers.insert(header::COOKIE, v);
        }
    }
    let query = query?;
    let is_token = |p: &str| p.split('=').next() == Some(TOKEN_QUERY);
    if !query.split('&').any(is_token) {
        return Some(Cow::Borrowed(query));
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !is_token(p))
        .collect();
    (!kept.is_empty()).then(|| Cow::Owned(kept.join("&")))
}

/// The `Set-Cookie` that remembers a token for this link: HttpOnly, host-only, scoped to the
/// link's path prefix (`/` for host-routed links).
pub fn cookie(token: &str, path: &str) -> String {
    format!("{TOKEN_COOKIE}={token}; Path={path}; HttpOnly; SameSite=Lax")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(t: &str) -> String {
        Sha256::digest(t.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn header_then_query_then_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; previewd_token=c"),
        );
        assert_eq!(
            presented(&h, Some("x=1&previewd_token=q")),
            Some(("q".into(), TokenSource::Query))
        );
        assert_eq!(presented(&h, None), Some(("c".into(), TokenSource::Cookie)));
        h.insert(TOKEN_HEADER, HeaderValue::from_static("hd"));
        assert_eq!(
            presented(&h, Some("previewd_token=q")),
            Some(("hd".into(), TokenSource::Header))
        );
        assert_eq!(
            presented(&HeaderMap::new(), Some("previewd_token=a%2Db")),
            Some(("a-b".into(), TokenSource::Query))
        );
    }

    #[test]
    fn comparison_uses_the_hash() {
        assert!(matches("tok", &hash("tok")));
        assert!(!matches("tok2", &hash("tok")));
        assert!(!matches("tok", "short"));
    }

    #[test]
    fn stripping_keeps_the_apps_own_credentials() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("session=abc; previewd_token=t; theme=dark"),
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer app"),
        );
        h.insert(TOKEN_HEADER, HeaderValue::from_static("t"));
        let q = strip(&mut h, Some("page=2&previewd_token=t&x=%20"));
        assert_eq!(q.as_deref(), Some("page=2&x=%20"));
        assert_eq!(
            h.get(header::COOKIE).map(|v| v.as_bytes()),
            Some(&b"session=abc; theme=dark"[..])
        );
        assert!(h.get(TOKEN_HEADER).is_none());
        assert!(h.get(header::AUTHORIZATION).is_some());
        assert_eq!(strip(&mut h, Some("previewd_token=t")), None);
        assert!(
            matches!(strip(&mut h, Some("a=1&&b")), Some(Cow::Borrowed("a=1&&b"))),
            "a query without a token is forwarded as it came"
        );
    }
}

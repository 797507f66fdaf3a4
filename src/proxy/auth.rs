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
///
/// What counts as the token parameter or cookie here is exactly what [`strip`] removes: both
/// read the request through [`query_pairs`] and [`cookie_pairs`], so a form that
/// authenticates is never one that reaches the app.
pub fn presented<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Option<(Cow<'a, [u8]>, TokenSource)> {
    if let Some(v) = headers.get(TOKEN_HEADER) {
        return Some((
            Cow::Borrowed(v.as_bytes().trim_ascii()),
            TokenSource::Header,
        ));
    }
    if let Some(pair) = query.and_then(|q| query_pairs(q).find(QueryPair::is_token)) {
        return Some((pair.value(), TokenSource::Query));
    }
    cookie_pairs(headers)
        .find(CookiePair::is_token)
        .map(|c| (Cow::Borrowed(c.value), TokenSource::Cookie))
}

/// One `name=value` of a query, as it came and as an app's framework decodes it.
#[derive(Clone, Copy, Debug)]
pub struct QueryPair<'a> {
    /// The pair as it came (`previewd%5Ftoken=abc`).
    pub raw: &'a str,
    name: &'a str,
    value: &'a str,
}

impl<'a> QueryPair<'a> {
    /// Whether this is previewd's token parameter: its name, percent-decoded (and `+` as
    /// space) the way the app's framework would decode it, is [`TOKEN_QUERY`].
    pub fn is_token(&self) -> bool {
        // Cheap first: a name of another length cannot decode to the token's name.
        self.name.len() >= TOKEN_QUERY.len()
            && self.name.len() <= 3 * TOKEN_QUERY.len()
            && percent_decode(self.name) == TOKEN_QUERY.as_bytes()
    }

    /// The value, percent-decoded.
    pub fn value(&self) -> Cow<'a, [u8]> {
        if self.value.bytes().any(|b| b == b'%' || b == b'+') {
            Cow::Owned(percent_decode(self.value))
        } else {
            Cow::Borrowed(self.value.as_bytes())
        }
    }
}

/// The pairs of a query (`a=1&b&&c=3`: empty pieces are no pairs).
pub fn query_pairs(query: &str) -> impl Iterator<Item = QueryPair<'_>> {
    query.split('&').filter(|p| !p.is_empty()).map(|raw| {
        let (name, value) = raw.split_once('=').unwrap_or((raw, ""));
        QueryPair { raw, name, value }
    })
}

/// `application/x-www-form-urlencoded` decoding: `%XX` escapes and `+` as space; a `%` not
/// followed by two hex digits stays as it is (as WHATWG URL parsing keeps it).
fn percent_decode(s: &str) -> Vec<u8> {
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
    out
}

/// One cookie of a `Cookie` header, as browsers send it: `name=value` pieces separated by
/// `;`, any bytes but `;` in a value (browsers send UTF-8 as it is).
#[derive(Clone, Copy, Debug)]
pub struct CookiePair<'a> {
    /// The piece as it came, trimmed.
    pub raw: &'a [u8],
    /// The name (cookie names are case-sensitive).
    pub name: &'a [u8],
    /// The value.
    pub value: &'a [u8],
}

impl CookiePair<'_> {
    /// Whether this is previewd's token cookie.
    pub fn is_token(&self) -> bool {
        self.name == TOKEN_COOKIE.as_bytes()
    }
}

/// Every cookie of every `Cookie` header, in order; pieces without `=` are skipped, as
/// browsers and frameworks skip them.
pub fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = CookiePair<'_>> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .filter_map(|piece| {
            let raw = piece.trim_ascii();
            let at = raw.iter().position(|b| *b == b'=')?;
            Some(CookiePair {
                raw,
                name: raw[..at].trim_ascii(),
                value: raw[at + 1..].trim_ascii(),
            })
        })
}

/// Whether `token` hashes to `expected_hash` (hex), compared in constant time.
pub fn matches(token: &[u8], expected_hash: &str) -> bool {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut actual = [0u8; 64];
    for (pair, b) in actual.chunks_exact_mut(2).zip(Sha256::digest(token)) {
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

/// Removes what previewd consumed: its header, its query parameter and its cookie (other
/// cookies stay, in order, byte for byte). Returns the query to forward: `query` itself
/// (borrowed) when it carries no token, else rebuilt without it (`None` when nothing is
/// left). What previewd did not consume is left as it came, and costs no allocation.
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
    if cookies && cookie_pairs(headers).any(|c| c.is_token()) {
        // Every other piece stays as it came, one without `=` too (the app may read it).
        let mut kept = Vec::new();
        let pieces = headers
            .get_all(header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
            .map(<[u8]>::trim_ascii)
            .filter(|p| !p.is_empty());
        for piece in pieces {
            let is_token = piece
                .iter()
                .position(|b| *b == b'=')
                .is_some_and(|at| piece[..at].trim_ascii() == TOKEN_COOKIE.as_bytes());
            if is_token {
                continue;
            }
            if !kept.is_empty() {
                kept.extend_from_slice(b"; ");
            }
            kept.extend_from_slice(piece);
        }
        headers.remove(header::COOKIE);
        // The pieces came from header values, so they make one again.
        if let Ok(v) = HeaderValue::from_bytes(&kept)
            && !kept.is_empty()
        {
            headers.insert(header::COOKIE, v);
        }
    }
    let query = query?;
    if !query_pairs(query).any(|p| p.is_token()) {
        return Some(Cow::Borrowed(query));
    }
    let kept: Vec<&str> = query_pairs(query)
        .filter(|p| !p.is_token())
        .map(|p| p.raw)
        .collect();
    (!kept.is_empty()).then(|| Cow::Owned(kept.join("&")))
}

/// Where the token cookie can be used, which decides its attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieContext {
    /// A secure context (https, or a `localhost` name, which browsers treat as one): the
    /// cookie is `SameSite=None; Secure; Partitioned`, so it is stored and sent inside an
    /// agent platform's cross-site `<iframe>` too, in that embedding's own partition
    /// (CHIPS), never shared with other sites.
    Secure,
    /// Plain http on another name: `Secure` cookies are refused there, so `SameSite=Lax`
    /// (no embedding).
    Plain,
}

impl CookieContext {
    /// The context of a link reached at `host` (as the client named it), over https or not.
    pub fn of(host: &str, https: bool) -> Self {
        let name = host
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
            .to_ascii_lowercase();
        let localhost = name == "localhost"
            || name.ends_with(".localhost")
            || name == "[::1]"
            || name.starts_with("127.");
        if https || localhost {
            CookieContext::Secure
        } else {
            CookieContext::Plain
        }
    }
}

/// The `Set-Cookie` that remembers a token for this link: HttpOnly, host-only, scoped to the
/// link's path prefix (`/` for host-routed links), with what `context` allows.
pub fn cookie(token: &str, path: &str, context: CookieContext) -> String {
    let attributes = match context {
        CookieContext::Secure => "SameSite=None; Secure; Partitioned",
        CookieContext::Plain => "SameSite=Lax",
    };
    format!("{TOKEN_COOKIE}={token}; Path={path}; HttpOnly; {attributes}")
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

    fn found(h: &HeaderMap, query: Option<&str>) -> Option<(String, TokenSource)> {
        presented(h, query).map(|(t, s)| (String::from_utf8_lossy(&t).into_owned(), s))
    }

    #[test]
    fn header_then_query_then_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; previewd_token=c"),
        );
        assert_eq!(
            found(&h, Some("x=1&previewd_token=q")),
            Some(("q".into(), TokenSource::Query))
        );
        assert_eq!(found(&h, None), Some(("c".into(), TokenSource::Cookie)));
        h.insert(TOKEN_HEADER, HeaderValue::from_static("hd"));
        assert_eq!(
            found(&h, Some("previewd_token=q")),
            Some(("hd".into(), TokenSource::Header))
        );
        assert_eq!(
            found(&HeaderMap::new(), Some("previewd_token=a%2Db")),
            Some(("a-b".into(), TokenSource::Query))
        );
    }

    #[test]
    fn comparison_uses_the_hash() {
        assert!(matches(b"tok", &hash("tok")));
        assert!(!matches(b"tok2", &hash("tok")));
        assert!(!matches(b"tok", "short"));
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

    #[test]
    fn an_encoded_token_name_is_the_token_for_checking_and_for_stripping() {
        for query in [
            "previewd%5Ftoken=T",
            "previewd%5ftoken=T",
            "%70reviewd_token=T",
            "x=1&previewd%5Ftoken=T&y=2",
        ] {
            let h = HeaderMap::new();
            assert_eq!(
                found(&h, Some(query)),
                Some(("T".into(), TokenSource::Query)),
                "{query}"
            );
            let kept = strip(&mut HeaderMap::new(), Some(query));
            assert!(
                kept.as_deref().is_none_or(|k| !k.contains('T')),
                "{query} forwarded as {kept:?}"
            );
        }
        // Names that only look alike are the app's.
        let kept = strip(
            &mut HeaderMap::new(),
            Some("previewd_tokens=1&previewd+token=2"),
        );
        assert_eq!(kept.as_deref(), Some("previewd_tokens=1&previewd+token=2"));
        assert_eq!(found(&HeaderMap::new(), Some("previewd_tokens=1")), None);
    }

    #[test]
    fn cookies_are_read_as_browsers_send_them_utf8_included() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_bytes(
                "name=\u{e9}t\u{e9}; previewd_token=tok; b=\u{1f600}".as_bytes(),
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(found(&h, None), Some(("tok".into(), TokenSource::Cookie)));
        assert_eq!(strip(&mut h, None), None);
        assert_eq!(
            h.get(header::COOKIE).map(|v| v.as_bytes()),
            Some("name=\u{e9}t\u{e9}; b=\u{1f600}".as_bytes())
        );
        // A UTF-8 cookie alone is no token (and breaks nothing).
        let mut alone = HeaderMap::new();
        alone.insert(
            header::COOKIE,
            HeaderValue::from_bytes("n=\u{e9}".as_bytes()).unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(found(&alone, None), None);
        // Only a token cookie: the header goes.
        let mut only = HeaderMap::new();
        only.insert(header::COOKIE, HeaderValue::from_static("previewd_token=t"));
        strip(&mut only, None);
        assert!(only.get(header::COOKIE).is_none());
    }

    #[test]
    fn the_cookie_is_embeddable_wherever_it_can_be_secure() {
        for (host, https, context) in [
            (
                "web.default.preview.localhost:8002",
                false,
                CookieContext::Secure,
            ),
            ("127.0.0.1:8002", false, CookieContext::Secure),
            (
                "web.default.preview.example.com",
                true,
                CookieContext::Secure,
            ),
            (
                "web.default.preview.example.com",
                false,
                CookieContext::Plain,
            ),
            ("10.0.0.5:30080", false, CookieContext::Plain),
        ] {
            assert_eq!(CookieContext::of(host, https), context, "{host}");
        }
        assert!(
            cookie("t", "/", CookieContext::Secure).ends_with("SameSite=None; Secure; Partitioned")
        );
        assert!(cookie("t", "/", CookieContext::Plain).ends_with("SameSite=Lax"));
    }
}

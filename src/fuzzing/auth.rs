//! Token, cookie and query parsing ([`crate::proxy::auth`]): what authenticates a request
//! and what is stripped before it goes to the app.
//!
//! Properties: whatever [`presented`] finds as a token is gone after [`strip`] (no header,
//! parameter or cookie of the request that reaches the app presents a token, so a form
//! that authenticates never reaches the app); the header wins, then the query, then the
//! cookie, and the token is the value that carrier holds; what is not previewd's stays as
//! it came (the other query pairs and cookies in order and byte for byte, the query itself
//! when it held no token, every other header); and the token matches its own hash.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue, header};
use sha2::{Digest, Sha256};

use crate::proxy::auth::{
    TOKEN_COOKIE, TOKEN_HEADER, TokenSource, cookie_pairs, matches, presented, query_pairs, strip,
};

use super::drive::escaped;

/// The input's request: its first line is the query (`\x01` alone: none), each further
/// line a `name: value` header (lines that make no header are skipped).
fn request(data: &[u8]) -> (Option<String>, HeaderMap) {
    let mut lines = data.split(|b| *b == b'\n');
    let query = lines
        .next()
        .filter(|q| *q != b"\x01")
        .map(|q| String::from_utf8_lossy(q).into_owned());
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    (query, headers)
}

/// Every non-empty `;`-piece of the `Cookie` headers but previewd's own cookies, trimmed:
/// what the app must still get, byte for byte (a piece without `=` too: seed
/// auth_token/nameless-cookie, which [`strip`] once dropped).
fn app_cookie_pieces(headers: &HeaderMap) -> Vec<Vec<u8>> {
    let token: Vec<&[u8]> = cookie_pairs(headers)
        .filter(|c| c.is_token())
        .map(|c| c.raw)
        .collect();
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty() && !token.contains(p))
        .map(<[u8]>::to_vec)
        .collect()
}

/// The headers other than previewd's token header and `Cookie`: each name's values in
/// order (the order between names means nothing, and a map's removal moves it).
fn others(headers: &HeaderMap) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut others = BTreeMap::<String, Vec<Vec<u8>>>::new();
    for (n, v) in headers {
        if *n != TOKEN_HEADER && *n != header::COOKIE {
            others
                .entry(n.as_str().to_owned())
                .or_default()
                .push(v.as_bytes().to_vec());
        }
    }
    others
}

/// The harness. Panics when a property in the module doc fails.
pub fn auth_token(data: &[u8]) {
    let (query, headers) = request(data);
    let query = query.as_deref();
    let context = || format!("query {query:?}, headers {headers:?}: {}", escaped(data));

    let found = presented(&headers, query).map(|(t, s)| (t.into_owned(), s));
    if let Some((token, source)) = &found {
        let expected = match source {
            TokenSource::Header => headers
                .get(TOKEN_HEADER)
                .map(|v| v.as_bytes().trim_ascii().to_vec()),
            TokenSource::Query => {
                assert!(headers.get(TOKEN_HEADER).is_none(), "{}", context());
                query.and_then(|q| {
                    query_pairs(q)
                        .find(|p| p.is_token())
                        .map(|p| p.value().into_owned())
                })
            }
            TokenSource::Cookie => {
                assert!(headers.get(TOKEN_HEADER).is_none(), "{}", context());
                assert!(
                    query.is_none_or(|q| !query_pairs(q).any(|p| p.is_token())),
                    "{}",
                    context()
                );
                cookie_pairs(&headers)
                    .find(|c| c.is_token())
                    .map(|c| c.value.to_vec())
            }
        };
        assert_eq!(expected.as_ref(), Some(token), "{}", context());
        let hash: String = Sha256::digest(token)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(matches(token, &hash), "{}", context());
        let mut wrong = hash.into_bytes();
        wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
        assert!(
            !matches(token, &String::from_utf8_lossy(&wrong)),
            "{}",
            context()
        );
    }

    if found.is_none() {
        // Nothing presents a token: no header, no parameter, and no cookie as a browser
        // sends it (any bytes in its value: the seed auth_token/utf8-cookie once hid it).
        assert!(headers.get(TOKEN_HEADER).is_none(), "{}", context());
        assert!(
            query.is_none_or(|q| !query_pairs(q).any(|p| p.is_token())),
            "{}",
            context()
        );
        let browser_token = headers
            .get_all(header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
            .filter_map(|piece| {
                piece
                    .split(|b| *b == b'=')
                    .next()
                    .filter(|_| piece.contains(&b'='))
            })
            .any(|name| name.trim_ascii() == TOKEN_COOKIE.as_bytes());
        assert!(!browser_token, "a token cookie is not found: {}", context());
    }

    let mut stripped = headers.clone();
    let kept = strip(&mut stripped, query);
    let kept = kept.as_deref();
    assert_eq!(
        presented(&stripped, kept).map(|(t, s)| (t.into_owned(), s)),
        None,
        "a token reaches the app after {found:?} authenticated; forwarded query {kept:?}, \
         headers {stripped:?}; {}",
        context()
    );

    // What is not previewd's stays as it came.
    assert_eq!(others(&stripped), others(&headers), "{}", context());
    if !cookie_pairs(&headers).any(|c| c.is_token()) {
        let values = |h: &HeaderMap| {
            h.get_all(header::COOKIE)
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect::<Vec<_>>()
        };
        assert_eq!(values(&stripped), values(&headers), "{}", context());
    } else {
        assert_eq!(
            app_cookie_pieces(&stripped),
            app_cookie_pieces(&headers),
            "the app's cookies changed: {}",
            context()
        );
    }
    match query {
        Some(q) if !query_pairs(q).any(|p| p.is_token()) => {
            assert_eq!(kept, Some(q), "{}", context());
        }
        Some(q) => {
            let others: Vec<&str> = query_pairs(q)
                .filter(|p| !p.is_token())
                .map(|p| p.raw)
                .collect();
            let forwarded: Vec<&str> = kept
                .map(|k| query_pairs(k).map(|p| p.raw).collect())
                .unwrap_or_default();
            assert_eq!(forwarded, others, "{}", context());
        }
        None => assert_eq!(kept, None, "{}", context()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_run() {
        super::super::mutate::bounded_run("auth_token", auth_token, DICTIONARY);
    }

    #[test]
    fn the_seeds_present_tokens_from_every_source() {
        let mut sources = Vec::new();
        for (_, bytes) in super::super::mutate::seeds("auth_token") {
            let (query, headers) = request(&bytes);
            if let Some((_, s)) = presented(&headers, query.as_deref()) {
                sources.push(s);
            }
        }
        for s in [TokenSource::Header, TokenSource::Query, TokenSource::Cookie] {
            assert!(sources.contains(&s), "no seed presents a token by {s:?}");
        }
    }

    /// Pieces of queries and cookie headers.
    const DICTIONARY: &[&[u8]] = &[
        b"\n",
        b"previewd_token",
        b"previewd%5Ftoken",
        b"previewd%5ftoken",
        b"%70reviewd_token",
        b"=",
        b"&",
        b";",
        b"; ",
        b"+",
        b"%",
        b"%2",
        b"\ncookie: ",
        b"\nx-previewd-token: ",
        b"\xc3\xa9",
    ];
}

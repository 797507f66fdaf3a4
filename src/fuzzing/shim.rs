//! The REST shim's checks on what a backend sends ([`crate::api::shim::input`]): container
//! ids, ports and the preview query.
//!
//! Properties: a container id is accepted exactly when it matches what the OpenAPI document
//! publishes (1-128 bytes of `[a-zA-Z0-9_.-]`, starting with a letter or digit) and has no
//! `..`, so nothing accepted can climb a path; a port is accepted exactly when it is decimal
//! digits worth 1 to 65535, and is that number; the names made from an accepted id and port
//! are DNS-1123 labels Kubernetes takes; a query that parses asks for a lifetime in bounds.

use axum::extract::Query;

use crate::api::shim::input::{self, MAX_TTL_SECONDS, PreviewQuery};
use crate::api::shim::link_name;
use crate::controller::link::injection_name;
use crate::resources::target::DockerTarget;
use crate::resources::validation::dns1123_label;

/// Whether `id` is what the OpenAPI document's `pattern` and `maxLength` allow, with no `..`.
fn is_published_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= input::MAX_ID_BYTES
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
        && !id.contains("..")
}

/// The port `raw` says in decimal, if it is only digits and from 1 to 65535.
fn decimal_port(raw: &str) -> Option<u16> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let significant = raw.trim_start_matches('0');
    if significant.len() > 5 {
        return None;
    }
    let n = significant
        .bytes()
        .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    u16::try_from(n).ok().filter(|p| *p > 0)
}

/// The harness: the input is `id NUL port NUL query`. Panics when a property in the module
/// doc fails.
pub fn shim_input(data: &[u8]) {
    let mut parts = data.splitn(3, |b| *b == 0);
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    let (id, port, query) = (text(parts.next()), text(parts.next()), text(parts.next()));

    let accepted = input::container_id(&id).ok();
    assert_eq!(
        accepted.is_some(),
        is_published_id(&id),
        "container id {id:?}: the check and the published pattern disagree"
    );
    assert!(accepted.is_none_or(|a| a == id));

    let checked = input::port(&port).ok();
    assert_eq!(checked, decimal_port(&port), "port {port:?}");

    if let (Some(id), Some(port)) = (accepted, checked) {
        let link = link_name(id, port);
        assert!(
            dns1123_label("link", &link).is_ok(),
            "{id:?}:{port} → {link:?}"
        );
        let injection = injection_name(&DockerTarget {
            container: id.to_owned(),
        });
        assert!(
            dns1123_label("injection", &injection).is_ok(),
            "{id:?} → {injection:?}"
        );
        assert_ne!(link, link_name(id, port.wrapping_add(1).max(1)));
    }

    if let Ok(uri) = format!("/api/v1/container/c/preview/80?{query}").parse::<http::Uri>()
        && let Ok(Query(q)) = Query::<PreviewQuery>::try_from_uri(&uri)
        && let Ok(Some(ttl)) = q.ttl()
    {
        assert!(
            (1..=MAX_TTL_SECONDS).contains(&ttl),
            "{query:?} → ttl {ttl}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_run() {
        super::super::mutate::bounded_run("shim_input", shim_input, DICTIONARY);
    }

    /// Pieces of ids, ports and queries.
    const DICTIONARY: &[&[u8]] = &[
        b"\0",
        b"..",
        b"/",
        b"%2F",
        b"ttl_seconds=",
        b"public=true",
        b"&",
        b"65535",
        b"65536",
        b"0",
        b"+",
        b"-",
    ];
}

//! Host and path routing ([`crate::proxy::routes`]): which link a request names, the path
//! it forwards, and the upstream a link's status names.
//!
//! Properties: a routed id always names a link's store key (`{name}.{namespace}`, the
//! namespace without dots) and is lowercase when it came from a host; the host-routed id
//! is the host's part before the preview domain; a path-routed request's id, forwarded
//! path and prefix put back together are the request's path; the forwarded path is the
//! end of the request's path (or `/`); an upstream that parses renders back to itself.

use crate::proxy::routes::{Upstream, link_of, parse_upstream, route};

use super::drive::escaped;

/// The preview domain routes are tried under.
const DOMAIN: &str = "preview.localhost";

/// Splits the input at its first NUL: host (absent when empty; `\x01` alone: none given),
/// then the request target; a third part, when there is one, is an upstream to parse.
fn pieces(data: &[u8]) -> (Option<String>, String, Option<String>) {
    let mut parts = data.splitn(3, |b| *b == 0);
    let host = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let upstream = parts.next();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let host = (host != b"\x01").then(|| text(host));
    (host, text(target), upstream.map(text))
}

/// The harness. Panics when a property in the module doc fails.
pub fn routes(data: &[u8]) {
    let (host, target, upstream) = pieces(data);
    // As the proxy calls it: the path of the request's target (when `http` takes it), the
    // authority of an absolute-form target before the Host header.
    let uri = target.parse::<http::Uri>().ok();
    let path = uri.as_ref().map_or(target.as_str(), |u| u.path());
    let host = uri
        .as_ref()
        .and_then(|u| u.authority())
        .map(|a| a.as_str())
        .or(host.as_deref());
    check_route(host, path);
    // And on the raw text, which must not panic whatever it is.
    check_route(host, &target);
    if let Some(upstream) = upstream {
        check_upstream(&upstream);
    }
}

fn check_route(host: Option<&str>, path: &str) {
    // Without path URLs, only host routing answers, and it answers the same.
    let hosts_only = route(host, path, DOMAIN, false);
    assert!(
        hosts_only.as_ref().is_none_or(|r| r.prefix == "/"),
        "path-routed with path URLs off: {hosts_only:?}"
    );
    let Some(r) = route(host, path, DOMAIN, true) else {
        assert!(hosts_only.is_none(), "{hosts_only:?}");
        return;
    };
    if r.prefix == "/" {
        assert_eq!(
            hosts_only.as_ref(),
            Some(&r),
            "host routing depends on path URLs"
        );
    }
    // A capability host names a link key too.
    if let Some((id, capability)) = crate::resources::capability::split(&r.id) {
        assert!(
            link_of(&id).is_some() && capability.len() == crate::resources::capability::LEN,
            "{id} {capability}"
        );
    }
    let context = || format!("host {host:?}, path {:?}: {r:?}", escaped(path.as_bytes()));
    let key = link_of(&r.id).unwrap_or_else(|| panic!("routed id without a link: {}", context()));
    let namespace = key.namespace.as_deref().unwrap_or_default();
    assert!(
        !key.name.is_empty() && !namespace.is_empty() && !namespace.contains('.'),
        "{}",
        context()
    );
    assert_eq!(
        format!("{}.{namespace}", key.name),
        r.id,
        "the key is not the id: {}",
        context()
    );
    if r.prefix == "/" {
        // Host routing: the whole path goes, and the id is the host's first labels.
        assert_eq!(r.path, path, "{}", context());
        assert!(
            !r.id.bytes().any(|b| b.is_ascii_uppercase()),
            "{}",
            context()
        );
        let host = host.unwrap_or_else(|| panic!("host-routed without a host: {}", context()));
        let bare = host
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h);
        assert_eq!(
            format!("{}.{DOMAIN}", r.id),
            bare.to_ascii_lowercase(),
            "{}",
            context()
        );
    } else {
        // Path routing: `/p/{id}/` then the forwarded path, or `/p/{id}` alone.
        assert_eq!(r.prefix, format!("/p/{}/", r.id), "{}", context());
        if path.len() + 1 == r.prefix.len() {
            assert_eq!(format!("{path}/"), r.prefix, "{}", context());
            assert_eq!(r.path, "/", "{}", context());
        } else {
            assert!(path.ends_with(r.path), "not a suffix: {}", context());
            assert_eq!(
                format!("{}{}", r.prefix, &r.path[1..]),
                path,
                "{}",
                context()
            );
        }
        assert!(r.path.starts_with('/'), "{}", context());
    }
}

fn check_upstream(text: &str) {
    let Ok(parsed) = parse_upstream(text) else {
        return;
    };
    let rendered = match &parsed {
        Upstream::Agent { agent, port } => format!("agent://{agent}/{port}"),
        Upstream::Direct(addr) => format!("http://{addr}"),
        Upstream::Exec {
            container,
            agent_path,
            port,
        } => format!("agent+exec://{container}/{port}?agent={agent_path}"),
        Upstream::Netns { pid, inode, port } => format!("netns://{pid}/{port}?ns={inode}"),
        Upstream::Handoff {
            pid,
            inode,
            dir,
            port,
        } => format!("handoff://{pid}/{port}?ns={inode}&dir={dir}"),
    };
    assert_eq!(
        parse_upstream(&rendered).ok().as_ref(),
        Some(&parsed),
        "{text:?} parsed as {parsed:?}, which renders as {rendered:?}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_run() {
        super::super::mutate::bounded_run("routes", routes, DICTIONARY);
    }

    /// Pieces of hosts, paths and upstreams.
    const DICTIONARY: &[&[u8]] = &[
        b"\0",
        b"/p/",
        b".default",
        b".preview.localhost",
        b".PREVIEW.localhost",
        b":8002",
        b"//",
        b"?",
        b"%2F",
        b"http://",
        b"agent://",
        b"agent+exec://",
        b"netns://",
        b"handoff://",
        b"?ns=",
        b"&dir=",
        b"?agent=/",
        b"[::1]",
        b"127.0.0.1:",
    ];
}

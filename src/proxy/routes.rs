//! From a request to a link, and from a link's status to an upstream: pure functions over
//! what the reflectors hold (no API call per request).

use std::borrow::Cow;
use std::net::SocketAddr;

use kube::runtime::reflector::ObjectRef;

use crate::proxy::errors::ProxyError;
use crate::resources::PreviewLink;
use crate::resources::conditions::{self, READY};
use crate::resources::preview_link::{Access, LinkPhase};

/// Which link a request names, and the path to forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed<'a> {
    /// The link's id, `{name}.{namespace}` (its store key is [`link_of`] it: the proxy builds
    /// that once per client connection and link, not per request).
    pub id: Cow<'a, str>,
    /// Path (and nothing else) to send upstream, starting with `/`: the end of the request's
    /// path, or `/`.
    pub path: &'a str,
    /// The prefix the link is served under (`/` for host routing, `/p/{id}/` for paths):
    /// where its cookie applies.
    pub prefix: Cow<'a, str>,
}

/// `s` split at the last `sep` (an ASCII byte). On strings this short, a byte search costs a
/// fraction of `rsplit_once`'s char searcher, and it runs on every request.
fn rsplit_at_byte(s: &str, sep: u8) -> Option<(&str, &str)> {
    let at = s.bytes().rposition(|b| b == sep)?;
    // `at` sits on an ASCII byte, so both slices are on char boundaries.
    Some((s.get(..at)?, s.get(at + 1..)?))
}

/// `{name}.{namespace}` split (namespaces have no dots), if `id` is of that form.
fn split_id(id: &str) -> Option<(&str, &str)> {
    rsplit_at_byte(id, b'.').filter(|(name, ns)| !name.is_empty() && !ns.is_empty())
}

/// The store key of the link `id` (`{name}.{namespace}`) names.
pub fn link_of(id: &str) -> Option<ObjectRef<PreviewLink>> {
    split_id(id).map(|(name, ns)| ObjectRef::new(name).within(ns))
}

/// The part of `host` before `.{domain}` (compared ignoring ASCII case), without
/// allocating: this runs on every request.
fn under_domain<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let (h, d) = (host.as_bytes(), domain.as_bytes());
    let cut = h.len().checked_sub(d.len() + 1)?;
    // `cut` sits on the ASCII '.', so slicing there is on a char boundary.
    (h[cut] == b'.' && h[cut + 1..].eq_ignore_ascii_case(d)).then(|| &host[..cut])
}

/// Routes by host (`{name}.{namespace}.{domain}`) or, when `path_urls` is on, by path
/// (`/p/{name}.{namespace}/…`). Host routing wins when the host is under the preview domain.
pub fn route<'a>(
    host: Option<&'a str>,
    path: &'a str,
    domain: &str,
    path_urls: bool,
) -> Option<Routed<'a>> {
    let host = host.map(|h| {
        rsplit_at_byte(h, b':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(h, |(h, _)| h)
    });
    if let Some(id) = host.and_then(|h| under_domain(h, domain)) {
        split_id(id)?;
        let id = if id.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(id.to_ascii_lowercase())
        } else {
            Cow::Borrowed(id)
        };
        return Some(Routed {
            id,
            path,
            prefix: Cow::Borrowed("/"),
        });
    }
    if !path_urls {
        return None;
    }
    let rest = path.strip_prefix("/p/")?;
    let Some(slash) = rest.bytes().position(|b| b == b'/') else {
        split_id(rest)?;
        return Some(Routed {
            id: Cow::Borrowed(rest),
            path: "/",
            prefix: Cow::Owned(format!("/p/{rest}/")),
        });
    };
    let id = &rest[..slash];
    split_id(id)?;
    let end_of_prefix = "/p/".len() + slash + 1;
    Some(Routed {
        id: Cow::Borrowed(id),
        path: &rest[slash..],
        prefix: Cow::Borrowed(&path[..end_of_prefix]),
    })
}

/// Where a Ready link's traffic goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// Through the agent at `agent`, to `127.0.0.1:{port}` inside the container.
    Agent {
        /// The agent's address.
        agent: SocketAddr,
        /// The port inside the container.
        port: u16,
    },
    /// Straight to the container.
    Direct(SocketAddr),
    /// Through the agent's stdio, run with exec in a container previewd cannot route to.
    Exec {
        /// Full container id.
        container: String,
        /// The agent binary's path inside the container.
        agent_path: String,
        /// The port inside the container.
        port: u16,
    },
    /// To `127.0.0.1:{port}` (else `[::1]:{port}`) from a socket made inside the container's
    /// network namespace, which host pid `pid` is in if it still has inode `inode`.
    Netns {
        /// A host pid in the namespace.
        pid: u32,
        /// The namespace's inode.
        inode: u64,
        /// The port inside the container.
        port: u16,
    },
    /// To `localhost:{port}` in the container, on a socket the agent's handoff helper
    /// connected there and handed over. The helper is host pid `pid` while that is still in
    /// network namespace `inode`; its directory is `dir` in the container.
    Handoff {
        /// The helper's host pid.
        pid: u32,
        /// Its network namespace's inode.
        inode: u64,
        /// Its directory inside the container.
        dir: String,
        /// The port inside the container.
        port: u16,
    },
}

/// Parses `status.upstream` (`agent://ip:port/{port}`, `http://ip:port`,
/// `agent+exec://{container}/{port}?agent={path}`, `netns://{pid}/{port}?ns={inode}` or
/// `handoff://{pid}/{port}?ns={inode}&dir={path}`).
pub fn parse_upstream(upstream: &str) -> Result<Upstream, ProxyError> {
    if let Some(rest) = upstream.strip_prefix("handoff://") {
        let malformed =
            || ProxyError::UpstreamUnreachable(format!("malformed upstream {upstream:?}"));
        let (target, query) = rest.split_once("?ns=").ok_or_else(malformed)?;
        let (inode, dir) = query.split_once("&dir=").ok_or_else(malformed)?;
        let (pid, port) = target.split_once('/').ok_or_else(malformed)?;
        // The directory is inside the container: absolute, and never climbing out of it.
        if !dir.starts_with('/') || dir.split('/').any(|part| part == "..") {
            return Err(malformed());
        }
        return match (pid.parse(), inode.parse(), port.parse()) {
            (Ok(pid), Ok(inode), Ok(port)) => Ok(Upstream::Handoff {
                pid,
                inode,
                dir: dir.to_owned(),
                port,
            }),
            _ => Err(malformed()),
        };
    }
    if let Some(rest) = upstream.strip_prefix("netns://") {
        let malformed =
            || ProxyError::UpstreamUnreachable(format!("malformed upstream {upstream:?}"));
        let (target, inode) = rest.split_once("?ns=").ok_or_else(malformed)?;
        let (pid, port) = target.split_once('/').ok_or_else(malformed)?;
        return match (pid.parse(), inode.parse(), port.parse()) {
            (Ok(pid), Ok(inode), Ok(port)) => Ok(Upstream::Netns { pid, inode, port }),
            _ => Err(malformed()),
        };
    }
    if let Some(rest) = upstream.strip_prefix("agent+exec://") {
        let malformed =
            || ProxyError::UpstreamUnreachable(format!("malformed upstream {upstream:?}"));
        let (target, agent_path) = rest.split_once("?agent=").ok_or_else(malformed)?;
        let (container, port) = target.split_once('/').ok_or_else(malformed)?;
        let port = port.parse().map_err(|_| malformed())?;
        if container.is_empty() || !agent_path.starts_with('/') {
            return Err(malformed());
        }
        return Ok(Upstream::Exec {
            container: container.to_owned(),
            agent_path: agent_path.to_owned(),
            port,
        });
    }
    if let Some(rest) = upstream.strip_prefix("agent://") {
        let (agent, port) = rest.rsplit_once('/').ok_or_else(|| {
            ProxyError::UpstreamUnreachable(format!("malformed upstream {upstream:?}"))
        })?;
        return match (agent.parse(), port.parse()) {
            (Ok(agent), Ok(port)) => Ok(Upstream::Agent { agent, port }),
            _ => Err(ProxyError::UpstreamUnreachable(format!(
                "malformed upstream {upstream:?}"
            ))),
        };
    }
    if let Some(addr) = upstream.strip_prefix("http://") {
        return addr
            .trim_end_matches('/')
            .parse()
            .map(Upstream::Direct)
            .map_err(|_| {
                ProxyError::UpstreamUnreachable(format!("malformed upstream {upstream:?}"))
            });
    }
    Err(ProxyError::UpstreamUnreachable(format!(
        "upstream {upstream:?} is not served by this proxy yet"
    )))
}

/// What a link allows now: its upstream (`status.upstream`, for [`parse_upstream`]) and
/// the hash of the token it needs, if any; or why not.
///
/// A link whose deletion was asked for is refused at once, before its finalizer has run:
/// deleting a link revokes it.
pub fn admit(
    link: &PreviewLink,
    now: k8s_openapi::jiff::Timestamp,
) -> Result<(&str, Option<&str>), ProxyError> {
    if link.metadata.deletion_timestamp.is_some() {
        return Err(ProxyError::LinkNotFound);
    }
    let st = link
        .status
        .as_ref()
        .ok_or_else(|| ProxyError::TargetNotReady("not reconciled yet".into()))?;
    if st.phase == Some(LinkPhase::Expired) || st.expires_at.as_ref().is_some_and(|e| e.0 <= now) {
        return Err(ProxyError::LinkExpired);
    }
    let token_hash = match link.spec.access {
        Access::Public => None,
        Access::Token => Some(
            st.token_hash
                .as_deref()
                .ok_or_else(|| ProxyError::TargetNotReady("no token issued yet".into()))?,
        ),
    };
    match (&st.phase, &st.upstream) {
        (Some(LinkPhase::Ready), Some(u)) => Ok((u, token_hash)),
        _ => {
            let why = conditions::find(&st.conditions, READY)
                .map_or_else(|| "waiting".to_owned(), |c| c.message.clone());
            Err(ProxyError::TargetNotReady(why))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::target::Target;
    use crate::resources::{PreviewLinkSpec, PreviewLinkStatus};

    #[test]
    fn hosts_and_paths() {
        let d = "preview.localhost";
        let parts = |r: Routed<'_>| {
            let link = link_of(&r.id).unwrap_or_else(|| panic!("{r:?}"));
            (
                link.namespace.unwrap_or_default(),
                link.name,
                r.path.to_owned(),
                r.prefix.into_owned(),
            )
        };
        let r = route(Some("web.default.preview.localhost:8002"), "/a?b", d, true);
        assert_eq!(
            r.map(parts),
            Some(("default".into(), "web".into(), "/a?b".into(), "/".into()))
        );
        let r = route(Some("127.0.0.1:8002"), "/p/a.b.dev/x/y", d, true);
        assert_eq!(
            r.map(parts),
            Some((
                "dev".into(),
                "a.b".into(),
                "/x/y".into(),
                "/p/a.b.dev/".into()
            ))
        );
        let r = route(Some("127.0.0.1:8002"), "/p/a.dev", d, true);
        assert_eq!(
            r.map(parts),
            Some(("dev".into(), "a".into(), "/".into(), "/p/a.dev/".into()))
        );
        assert_eq!(
            route(Some("evil.example.com"), "/", d, true),
            None,
            "foreign hosts route nowhere"
        );
        assert_eq!(route(Some("127.0.0.1"), "/p/nodot/", d, true), None);
        assert_eq!(
            route(Some("127.0.0.1:8002"), "/p/a.dev/x", d, false),
            None,
            "path links are served only when turned on"
        );
        assert_eq!(route(None, "/other", d, true), None);
        assert_eq!(
            route(Some("WEB.Default.Preview.Localhost"), "/", d, true).map(|r| r.id.into_owned()),
            Some("web.default".into())
        );
        assert_eq!(route(Some("preview.localhost"), "/", d, true), None);
        assert_eq!(route(Some("xpreview.localhost"), "/", d, true), None);
        assert_eq!(
            route(Some("é.preview.localhost"), "/", d, true),
            None,
            "non-ASCII hosts do not panic"
        );
    }

    #[test]
    fn upstreams_parse_and_unknown_forms_are_refused() {
        assert_eq!(
            parse_upstream("agent://172.17.0.2:4567/3000"),
            Ok(Upstream::Agent {
                agent: "172.17.0.2:4567".parse().unwrap_or_else(|e| panic!("{e}")),
                port: 3000
            })
        );
        assert_eq!(
            parse_upstream("http://172.17.0.3:8080"),
            Ok(Upstream::Direct(
                "172.17.0.3:8080".parse().unwrap_or_else(|e| panic!("{e}"))
            ))
        );
        assert!(
            parse_upstream("http://evil.example.com:80").is_err(),
            "names are never resolved"
        );
        assert!(parse_upstream("ftp://x").is_err());
        assert_eq!(
            parse_upstream("agent+exec://abc123/3000?agent=/.previewd/default.x/previewd-agent"),
            Ok(Upstream::Exec {
                container: "abc123".into(),
                agent_path: "/.previewd/default.x/previewd-agent".into(),
                port: 3000
            })
        );
        assert!(parse_upstream("agent+exec://abc/3000").is_err());
        assert_eq!(
            parse_upstream("netns://4242/3000?ns=4026532289"),
            Ok(Upstream::Netns {
                pid: 4242,
                inode: 4026532289,
                port: 3000
            })
        );
        for bad in [
            "netns://4242/3000",
            "netns://4242?ns=1",
            "netns://x/3000?ns=1",
            "netns://4242/70000?ns=1",
            "netns://4242/3000?ns=-1",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_upstream("handoff://4242/3000?ns=4026532289&dir=/.previewd/default.x/handoff"),
            Ok(Upstream::Handoff {
                pid: 4242,
                inode: 4026532289,
                dir: "/.previewd/default.x/handoff".into(),
                port: 3000
            })
        );
        for bad in [
            "handoff://4242/3000?ns=1",
            "handoff://4242/3000?ns=1&dir=relative",
            // Never out of the container's root, through /proc/{pid}/root/..
            "handoff://4242/3000?ns=1&dir=/../../etc",
            "handoff://4242/3000?ns=x&dir=/d",
            "handoff://4242/70000?ns=1&dir=/d",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_ready_unexpired_links_are_admitted() {
        let mut link = PreviewLink::new("web", PreviewLinkSpec::new(Target::docker("c"), 3000));
        let now = k8s_openapi::jiff::Timestamp::from_second(1000)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        assert!(matches!(
            admit(&link, now),
            Err(ProxyError::TargetNotReady(_))
        ));
        link.status = Some(PreviewLinkStatus {
            phase: Some(LinkPhase::Ready),
            upstream: Some("http://10.0.0.1:80".into()),
            token_hash: Some("h".into()),
            ..Default::default()
        });
        assert_eq!(admit(&link, now), Ok(("http://10.0.0.1:80", Some("h"))));
        if let Some(s) = link.status.as_mut() {
            s.expires_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
        }
        assert_eq!(admit(&link, now), Err(ProxyError::LinkExpired));
        link.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
        assert_eq!(admit(&link, now), Err(ProxyError::LinkNotFound));
    }
}

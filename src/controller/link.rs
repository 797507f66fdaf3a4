//! The PreviewLink reconciler: turns "this port of that container, for these people" into a
//! token, URLs and a resolved upstream in status, which the proxy routes from.
//!
//! A link through the agent (the default) shares one DaemonInjection per target container
//! with every other link to it: previewd creates it, lists each link among its owners, and
//! deletes it when the last owning link goes. The token lives only in a Secret; status holds
//! its SHA-256.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::instrument;

use super::injection::Layout;
use super::shared::{self, MANAGED_BY};
use super::{Context, Error};
use crate::resources::capability;
use crate::resources::conditions::{self, READY};
use crate::resources::daemon_injection::{DaemonPhase, NetworkNamespace};
use crate::resources::preview_link::{LinkPhase, SecretRef, Via};
use crate::resources::target::DockerTarget;
use crate::resources::{
    DaemonInjection, DaemonInjectionSpec, PreviewLink, PreviewLinkStatus, Target,
};
use crate::runtime::ContainerRuntime;
use crate::runtime::pod::PodTarget;

/// Finalizer that releases a link's token and shared injection before it goes.
pub const FINALIZER: &str = "previewd.dev/link-cleanup";
const CONTROLLER: &str = "previewlink";
/// Label of an injection asked for on its own (not only for links): it stays when its last
/// link goes.
pub const REQUESTED_LABEL: &str = "previewd.dev/requested";
/// Key of the token in its Secret.
pub const TOKEN_KEY: &str = "token";
/// How often a link that waits (for its container, its agent, a route) is re-checked when
/// nothing else happens, besides the changes it watches.
const RECHECK: Duration = Duration::from_secs(60);

/// How links are addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UrlStyle {
    /// `http://{name}.{namespace}.{domain}:{port}/`
    Subdomain,
    /// `http://{proxy}/p/{name}.{namespace}/`
    Path,
}

/// Where links are served, for building their URLs.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Wildcard domain of host-routed links (`*.localhost` resolves to loopback everywhere).
    pub preview_domain: String,
    /// Which form `status.url` takes (`status.pathUrl` is always the path form).
    pub url_style: UrlStyle,
    /// The proxy's listen address.
    pub proxy_addr: SocketAddr,
    /// How users reach the proxy when that is not its listen address (behind an Ingress or
    /// load balancer); `None` uses the listen address.
    pub public_url: Option<PublicUrl>,
    /// Whether links are also served by path (`/p/{name}.{namespace}/`). Path links share
    /// one origin, so one preview's pages can read another's: off unless asked for.
    pub path_urls: bool,
}

/// The proxy's public base URL (`--public-url`): scheme, host and optional port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicUrl {
    scheme: String,
    host: String,
    port: Option<u16>,
}

/// Why a public URL is unusable.
#[derive(Debug, thiserror::Error)]
#[error("--public-url {url:?}: {why}")]
pub struct PublicUrlError {
    url: String,
    why: String,
}

impl std::str::FromStr for PublicUrl {
    type Err = PublicUrlError;

    /// Accepts `http(s)://host[:port]` with nothing after the authority but `/`.
    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| PublicUrlError {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let uri: http::Uri = url.parse().map_err(|e| err(&format!("{e}")))?;
        let scheme = match uri.scheme_str() {
            Some(s @ ("http" | "https")) => s.to_owned(),
            _ => return Err(err("the scheme must be http or https")),
        };
        let authority = uri.authority().ok_or_else(|| err("a host is needed"))?;
        if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
            return Err(err("only scheme, host and port are allowed"));
        }
        Ok(PublicUrl {
            scheme,
            host: authority.host().to_owned(),
            port: authority.port_u16(),
        })
    }
}

impl PublicUrl {
    /// The host users reach the proxy at (the API listener serves that name too).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether users reach the proxy over https.
    pub fn is_https(&self) -> bool {
        self.scheme == "https"
    }
}

impl LinkConfig {
    /// `{name}.{namespace}`: how a link is named in hosts and paths. Unambiguous, because
    /// namespaces have no dots.
    pub fn link_id(namespace: &str, name: &str) -> String {
        format!("{name}.{namespace}")
    }

    /// The proxy's base URL as clients reach it: the public URL, else the listen address (a
    /// wildcard one is reached at loopback).
    pub fn proxy_base_url(&self) -> String {
        if let Some(p) = &self.public_url {
            return match p.port {
                Some(port) => format!("{}://{}:{port}", p.scheme, p.host),
                None => format!("{}://{}", p.scheme, p.host),
            };
        }
        let port = self.proxy_addr.port();
        match self.proxy_addr.ip() {
            ip if ip.is_unspecified() => format!("http://127.0.0.1:{port}"),
            std::net::IpAddr::V6(ip) => format!("http://[{ip}]:{port}"),
            std::net::IpAddr::V4(ip) => format!("http://{ip}:{port}"),
        }
    }

    /// The URL in the configured style and the path-routed URL, both ending in `/`.
    pub fn urls(&self, namespace: &str, name: &str) -> (String, String) {
        let id = Self::link_id(namespace, name);
        let path_url = format!("{}/p/{id}/", self.proxy_base_url());
        let url = match self.url_style {
            UrlStyle::Subdomain => self.host_url(&id),
            UrlStyle::Path => path_url.clone(),
        };
        (url, path_url)
    }

    /// The URL of a link's own origin (`{name}.{namespace}.{domain}`): the one to embed,
    /// whatever the URL style (path links share one origin).
    pub fn own_origin_url(&self, namespace: &str, name: &str) -> String {
        self.host_url(&Self::link_id(namespace, name))
    }

    /// The capability URL of a link (`{name}--{capability}.{namespace}.{domain}`), which
    /// opens it without token or cookie; `None` when the name is too long for it.
    pub fn capability_url(&self, namespace: &str, name: &str, capability: &str) -> Option<String> {
        let host = crate::resources::capability::host_name(name, capability)?;
        Some(self.host_url(&Self::link_id(namespace, &host)))
    }

    /// `{scheme}://{label}.{domain}[:port]/` for a host label under the preview domain.
    fn host_url(&self, label: &str) -> String {
        match &self.public_url {
            Some(p) => match p.port {
                Some(port) => format!("{}://{label}.{}:{port}/", p.scheme, self.preview_domain),
                None => format!("{}://{label}.{}/", p.scheme, self.preview_domain),
            },
            None => format!(
                "http://{label}.{}:{}/",
                self.preview_domain,
                self.proxy_addr.port()
            ),
        }
    }
}

/// A DNS-1123 label fragment naming a container: up to `max_len` characters of its id or
/// name, then a hash of the whole of it, so different ids or names never collide.
pub fn container_key(container: &str, max_len: usize) -> String {
    let cleaned: String = container
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let cleaned = cleaned.trim_matches('-');
    let short: String = cleaned.chars().take(max_len).collect();
    let hash = Sha256::digest(container.as_bytes());
    let short = short.trim_end_matches('-');
    let hash = format!(
        "{:02x}{:02x}{:02x}{:02x}",
        hash[0], hash[1], hash[2], hash[3]
    );
    if short.is_empty() {
        hash
    } else {
        format!("{short}-{hash}")
    }
}

/// The DaemonInjection links to a Docker container share (the REST shim's `inject` uses it
/// too, so a container has one agent however it was asked for).
pub fn injection_name(target: &DockerTarget) -> String {
    format!("link-{}", container_key(&target.container, 40))
}

/// The shared DaemonInjection of any target: a Docker container's, or a pod container's.
pub fn injection_name_for(target: &Target) -> String {
    match target {
        Target::Docker(d) => injection_name(d),
        Target::Pod(p) => {
            let key = match &p.container {
                Some(c) => format!("{}/{c}", p.name),
                None => p.name.clone(),
            };
            format!("link-pod-{}", container_key(&key, 36))
        }
    }
}

/// Name of the Secret holding a link's token.
pub fn token_secret_name(link: &str) -> String {
    format!("previewd-link-{link}")
}

/// SHA-256 of a token, hex: what status and the proxy compare against.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// When the link stops working: `spec.expiresAt`, or creation + `spec.ttl`.
pub fn expires_at(link: &PreviewLink) -> Option<k8s_openapi::jiff::Timestamp> {
    if let Some(t) = &link.spec.expires_at {
        return Some(t.0);
    }
    let ttl = link.spec.ttl.as_ref()?;
    let created = link.metadata.creation_timestamp.as_ref()?.0;
    let ttl: std::time::Duration = (*ttl).into();
    created
        .checked_add(k8s_openapi::jiff::SignedDuration::try_from(ttl).ok()?)
        .ok()
}

/// What the reconcile found, before it is written to status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkOutcome {
    /// Serving through `upstream`.
    Ready {
        /// What the proxy connects to.
        upstream: String,
        /// Which path that is, and why (`status.route`).
        route: String,
    },
    /// Waiting for the target or its agent.
    Pending {
        /// Condition reason.
        reason: String,
        /// For people.
        message: String,
    },
    /// Past `expiresAt`.
    Expired,
    /// Cannot be served.
    Failed {
        /// Condition reason.
        reason: &'static str,
        /// For people.
        message: String,
    },
}

/// The status an outcome means. Pure: the token hash, URLs and time come in.
pub fn status_for(
    link: &PreviewLink,
    outcome: &LinkOutcome,
    token_hash: &str,
    cfg: &LinkConfig,
    now: Time,
) -> PreviewLinkStatus {
    let mut st = link.status.clone().unwrap_or_default();
    let (ns, name) = (link.namespace().unwrap_or_default(), link.name_any());
    let (url, path_url) = cfg.urls(&ns, &name);
    st.url = Some(url);
    st.path_url = cfg.path_urls.then_some(path_url);
    st.embed_url = Some(cfg.own_origin_url(&ns, &name));
    st.target = Some(link.spec.target.display_name());
    st.observed_generation = link.metadata.generation;
    st.expires_at = expires_at(link).map(Time);
    st.token_hash = Some(token_hash.to_owned());
    st.token_secret_ref = Some(SecretRef {
        name: token_secret_name(&name),
    });
    let (phase, ready, reason, message) = match outcome {
        LinkOutcome::Ready { upstream, route } => {
            st.upstream = Some(upstream.clone());
            st.route = Some(route.clone());
            (
                LinkPhase::Ready,
                true,
                "Serving".to_owned(),
                format!("serving port {} through {upstream}", link.spec.port),
            )
        }
        LinkOutcome::Pending { reason, message } => {
            st.upstream = None;
            st.route = None;
            (LinkPhase::Pending, false, reason.clone(), message.clone())
        }
        LinkOutcome::Expired => {
            st.upstream = None;
            st.route = None;
            (
                LinkPhase::Expired,
                false,
                "Expired".to_owned(),
                "the link has expired".to_owned(),
            )
        }
        LinkOutcome::Failed { reason, message } => {
            st.upstream = None;
            st.route = None;
            (
                LinkPhase::Failed,
                false,
                (*reason).to_owned(),
                message.clone(),
            )
        }
    };
    st.phase = Some(phase);
    let mut cond = conditions::condition(READY, ready, &reason, message, link.metadata.generation);
    cond.last_transition_time = now;
    conditions::set_condition(&mut st.conditions, cond);
    st
}

/// Entry point for the controller.
#[instrument(skip(link, ctx), fields(namespace = link.namespace().unwrap_or_default(), name = link.name_any()))]
pub async fn reconcile<R: ContainerRuntime>(
    link: Arc<PreviewLink>,
    ctx: Arc<Context<R>>,
) -> Result<Action, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let api: Api<PreviewLink> =
        Api::namespaced(ctx.client.clone(), &link.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, link, |event| async {
        match event {
            Finalizer::Apply(l) => apply(l, &ctx).await,
            Finalizer::Cleanup(l) => cleanup(l, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Retries failures with per-object exponential backoff.
pub fn error_policy<R: ContainerRuntime>(
    link: Arc<PreviewLink>,
    err: &Error,
    ctx: Arc<Context<R>>,
) -> Action {
    shared::back_off(CONTROLLER, link.as_ref(), err, &ctx)
}

async fn apply<R: ContainerRuntime>(
    link: Arc<PreviewLink>,
    ctx: &Context<R>,
) -> Result<Action, Error> {
    let token = ensure_credentials(ctx, &link).await?;
    let now = k8s_openapi::jiff::Timestamp::now();
    let expiry = expires_at(&link);
    let outcome = if expiry.is_some_and(|e| e <= now) {
        LinkOutcome::Expired
    } else {
        resolve_upstream(ctx, &link).await?
    };
    let status = status_for(&link, &outcome, &token_hash(&token), &ctx.links, Time(now));
    shared::write_status(&ctx.client, link.as_ref(), link.status.as_ref(), &status).await?;
    let until_expiry =
        expiry.and_then(|e| std::time::Duration::try_from(e.duration_since(now)).ok());
    match outcome {
        LinkOutcome::Failed { reason, message } => Err(Error::Injection { reason, message }),
        outcome => {
            if !matches!(outcome, LinkOutcome::Expired) {
                ctx.backoff.reset(&link.uid().unwrap_or_default());
            }
            Ok(next_check(&outcome, until_expiry))
        }
    }
}

/// When a link that did not fail is reconciled again without a change to it. A Ready link
/// waits for a change: everything its status comes from is watched (the link, its Secret,
/// its injection's status, which follows the container), as a controller-runtime
/// controller with its resync off. Re-checking each Ready link every minute cost 3.6 % of a
/// core idle and a scheduler entry each (about 0.6 KiB) with 10,000 links (bench/scale.sh).
/// A waiting link is also re-checked every [`RECHECK`], and any link once it expires.
fn next_check(outcome: &LinkOutcome, until_expiry: Option<Duration>) -> Action {
    match (outcome, until_expiry) {
        (LinkOutcome::Expired, _) => Action::await_change(),
        (LinkOutcome::Ready { .. }, None) => Action::await_change(),
        (LinkOutcome::Ready { .. }, Some(left)) => Action::requeue(left),
        (_, left) => Action::requeue(left.map_or(RECHECK, |d| d.min(RECHECK))),
    }
}

/// The token (32 random bytes, URL-safe) and the capability of a link, kept in its Secret
/// and made on first use.
async fn ensure_credentials<R: ContainerRuntime>(
    ctx: &Context<R>,
    link: &PreviewLink,
) -> Result<String, Error> {
    let token: shared::Generator<'_> = Box::new(|| {
        use base64::Engine;
        use rand::Rng;
        let bytes: [u8; 32] = rand::rng().random();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    });
    let capability: shared::Generator<'_> = Box::new(capability::generate);
    let mut values = shared::secret_values(
        &ctx.client,
        link,
        &token_secret_name(&link.name_any()),
        vec![(TOKEN_KEY, token), (capability::KEY, capability)],
    )
    .await?;
    values.truncate(1);
    Ok(values.pop().unwrap_or_default())
}

async fn resolve_upstream<R: ContainerRuntime>(
    ctx: &Context<R>,
    link: &PreviewLink,
) -> Result<LinkOutcome, Error> {
    let port = link.spec.port;
    match link.spec.via {
        Via::Agent | Via::Auto => {
            let di = ensure_injection(ctx, link, &link.spec.target).await?;
            let st = di.status.clone().unwrap_or_default();
            if let (Some(DaemonPhase::Running), Some(endpoint)) = (st.phase, &st.endpoint)
                && let Some(route) = auto_route(link.spec.via, port, endpoint, &st.ports)
            {
                return Ok(route);
            }
            if let (Some(DaemonPhase::Running), Some(endpoint), Some(ns)) =
                (st.phase, &st.endpoint, st.network_namespace)
            {
                return Ok(netns_route(link.spec.via, port, endpoint, ns, &st.ports));
            }
            if let (Some(DaemonPhase::Running), Some(endpoint), Some(helper)) =
                (st.phase, &st.endpoint, st.socket_handoff)
                && endpoint != "exec"
            {
                let dir = Layout::for_object(&link.namespace().unwrap_or_default(), &di.name_any())
                    .handoff_dir();
                return Ok(handoff_route(link.spec.via, port, helper, &dir, &st.ports));
            }
            match (st.phase, st.endpoint) {
                (Some(DaemonPhase::Running), Some(endpoint))
                    if endpoint == "exec" && matches!(link.spec.target, Target::Pod(_)) =>
                {
                    Ok(LinkOutcome::Pending {
                        reason: "NoRoute".into(),
                        message: "previewd cannot reach the pod's IP; exec tunnels serve Docker containers only".into(),
                    })
                }
                (Some(DaemonPhase::Running), Some(endpoint)) if endpoint == "exec" => {
                    Ok(LinkOutcome::Ready {
                        route: agent_route(link.spec.via, NO_ROUTABLE_ADDRESS),
                        // No routable address: the proxy runs the agent's stdio mode through
                        // exec, so the upstream names the container and the agent's path.
                        upstream: format!(
                            "agent+exec://{}/{port}?agent={}",
                            st.container_id.unwrap_or_default(),
                            Layout::for_object(
                                &link.namespace().unwrap_or_default(),
                                &di.name_any()
                            )
                            .agent()
                        ),
                    })
                }
                (Some(DaemonPhase::Running), Some(endpoint)) => Ok(LinkOutcome::Ready {
                    route: agent_route(link.spec.via, &loopback_reason(port, &st.ports)),
                    upstream: format!("agent://{endpoint}/{port}"),
                }),
                _ => {
                    let why = conditions::find(&st.conditions, READY)
                        .map(|c| (c.reason.clone(), c.message.clone()));
                    let (reason, message) = why.unwrap_or_else(|| {
                        (
                            "Injecting".into(),
                            "waiting for the agent to be injected".into(),
                        )
                    });
                    Ok(LinkOutcome::Pending {
                        reason: format!("Agent{reason}"),
                        message: format!(
                            "agent {}: {message}",
                            di.metadata.name.unwrap_or_default()
                        ),
                    })
                }
            }
        }
        Via::Direct => match (&link.spec.target, &ctx.docker, &ctx.pods) {
            (Target::Docker(d), Ok(docker), _) => direct(docker, &d.container, port).await,
            (Target::Docker(_), Err(e), _) => Ok(LinkOutcome::Failed {
                reason: "DockerUnavailable",
                message: format!("the Docker engine is unavailable: {e}"),
            }),
            (Target::Pod(p), _, Some(pods)) => {
                let target = PodTarget::new(
                    &link.namespace().unwrap_or_default(),
                    &p.name,
                    p.container.as_deref(),
                );
                direct(pods, &target.to_string(), port).await
            }
            (Target::Pod(_), _, None) => Ok(LinkOutcome::Failed {
                reason: "UnsupportedTarget",
                message:
                    "pod targets are served when previewd runs in Kubernetes mode (--store kube)"
                        .into(),
            }),
        },
    }
}

/// A `via: auto` link's way straight to the container, when its port listens on a wildcard
/// address and the agent (at `endpoint`, `ip:port`) is reached at a routable one: the agent
/// hop buys nothing then. `None` otherwise (the link goes through the agent).
fn auto_route(
    via: Via,
    port: i32,
    endpoint: &str,
    ports: &[crate::resources::daemon_injection::ListeningSocket],
) -> Option<LinkOutcome> {
    if via != Via::Auto {
        return None;
    }
    let agent: SocketAddr = endpoint.parse().ok()?;
    // An agent on the host's loopback (a host-network container) gives no container address.
    if agent.ip().is_loopback() {
        return None;
    }
    let bound = ports
        .iter()
        .find(|p| p.port == port && p.is_wildcard() && family_reaches(&p.address, agent.ip()))?;
    Some(LinkOutcome::Ready {
        upstream: format!(
            "http://{}",
            SocketAddr::new(agent.ip(), u16::try_from(port).ok()?)
        ),
        route: format!(
            "direct: port {port} listens on {} and the container has a routable address",
            bound.address
        ),
    })
}

/// Whether a socket bound to the wildcard `address` accepts connections to `ip`: `::`
/// (dual-stack by default on Linux) takes both families, `0.0.0.0` only IPv4.
fn family_reaches(address: &str, ip: std::net::IpAddr) -> bool {
    address.contains(':') || ip.is_ipv4()
}

/// Why a link goes through the agent, from how its port is bound.
fn loopback_reason(
    port: i32,
    ports: &[crate::resources::daemon_injection::ListeningSocket],
) -> String {
    let bound: Vec<&str> = ports
        .iter()
        .filter(|p| p.port == port)
        .map(|p| p.address.as_str())
        .collect();
    if bound.is_empty() {
        format!("nothing listens on port {port} yet")
    } else {
        format!("port {port} listens on {} only", bound.join(" and "))
    }
}

/// A link that connects inside the container's network namespace (recorded by its
/// injection when previewd may enter it): the app's own loopback, without the agent's relay.
fn netns_route(
    via: Via,
    port: i32,
    endpoint: &str,
    ns: NetworkNamespace,
    ports: &[crate::resources::daemon_injection::ListeningSocket],
) -> LinkOutcome {
    let why = if endpoint == "exec" {
        NO_ROUTABLE_ADDRESS.to_owned()
    } else {
        loopback_reason(port, ports)
    };
    LinkOutcome::Ready {
        upstream: format!("netns://{}/{port}?ns={}", ns.pid, ns.inode),
        route: format!(
            "netns: {}; previewd connects inside the container's network namespace",
            inside_reason(via, &why)
        ),
    }
}

/// The route of a link to a loopback port through the agent's handoff helper `helper`,
/// whose directory in the container is `dir`.
fn handoff_route(
    via: Via,
    port: i32,
    helper: NetworkNamespace,
    dir: &str,
    ports: &[crate::resources::daemon_injection::ListeningSocket],
) -> LinkOutcome {
    LinkOutcome::Ready {
        upstream: format!(
            "handoff://{}/{port}?ns={}&dir={dir}",
            helper.pid, helper.inode
        ),
        route: format!(
            "handoff: {}; the agent connects inside the container and hands previewd the socket",
            inside_reason(via, &loopback_reason(port, ports))
        ),
    }
}

/// Why a container without a routable address is reached from inside it.
const NO_ROUTABLE_ADDRESS: &str = "the container has no routable address";

/// Why a link reaches its port from inside the container (through the agent or its
/// namespace): `why` when `via: auto` chose it, else that `spec.via` asked for it.
fn inside_reason(via: Via, why: &str) -> &str {
    match via {
        Via::Auto => why,
        _ => "spec.via is agent",
    }
}

/// `status.route` of a link through the agent.
fn agent_route(via: Via, why: &str) -> String {
    format!("agent: {}", inside_reason(via, why))
}

/// The upstream of a `via: direct` link: the container's own address.
async fn direct<T: ContainerRuntime>(
    rt: &T,
    container: &str,
    port: i32,
) -> Result<LinkOutcome, Error> {
    match rt.resolve(container).await {
        Ok(info) if !info.running => Ok(LinkOutcome::Pending {
            reason: "ContainerNotRunning".into(),
            message: format!("container {} is {}", info.name, info.state),
        }),
        Ok(info) => match info.ips.first() {
            Some(ip) => Ok(LinkOutcome::Ready {
                route: "direct: spec.via is direct".into(),
                upstream: format!(
                    "http://{}",
                    SocketAddr::new(*ip, u16::try_from(port).unwrap_or(0))
                ),
            }),
            None => Ok(LinkOutcome::Failed {
                reason: "NoRoute",
                message: format!(
                    "container {} has no routable address; use via: agent",
                    info.name
                ),
            }),
        },
        Err(e) if e.is_gone() => Ok(LinkOutcome::Failed {
            reason: "ContainerNotFound",
            message: e.to_string(),
        }),
        Err(e) => Ok(LinkOutcome::Failed {
            reason: "DockerUnavailable",
            message: e.to_string(),
        }),
    }
}

/// How often an update of a shared injection's owners is tried against concurrent writers
/// (each try re-reads the object; a conflict means another link's write won).
const OWNER_UPDATE_TRIES: usize = 20;

/// What to do with a shared injection, given its owners now.
enum OwnerChange {
    /// Leave it as it is.
    Keep,
    /// Write these owners.
    Set(Vec<OwnerReference>),
    /// Delete it (its last owner goes).
    Delete,
}

/// Reads the shared injection `name`, decides with `decide`, and writes the decision with the
/// read `resourceVersion` as a precondition, again on a conflict: links to one container
/// change it concurrently (injections of earlier versions list their links as owners), and
/// a write or a deletion decided on an outdated read must not win. `None` when it is gone.
async fn change_owners(
    api: &Api<DaemonInjection>,
    name: &str,
    decide: impl Fn(&DaemonInjection) -> OwnerChange,
) -> Result<Option<DaemonInjection>, Error> {
    for _ in 0..OWNER_UPDATE_TRIES {
        let Some(di) = api.get_opt(name).await.map_err(Error::Kube)? else {
            return Ok(None);
        };
        let version = di.resource_version();
        let written = match decide(&di) {
            OwnerChange::Keep => return Ok(Some(di)),
            OwnerChange::Set(owners) => {
                let patch =
                    json!({"metadata": {"ownerReferences": owners, "resourceVersion": version}});
                api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(Some)
            }
            OwnerChange::Delete => {
                let params = DeleteParams {
                    preconditions: Some(kube::api::Preconditions {
                        resource_version: version,
                        uid: di.uid(),
                    }),
                    ..DeleteParams::default()
                };
                api.delete(name, &params).await.map(|_| None)
            }
        };
        match written {
            Ok(di) => return Ok(di),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(None),
            Err(e) => return Err(Error::Kube(e)),
        }
    }
    Err(Error::Injection {
        reason: "OwnerUpdateConflict",
        message: format!(
            "the owners of DaemonInjection {name} changed under every one of {OWNER_UPDATE_TRIES} tries; retrying"
        ),
    })
}

/// The shared DaemonInjection for the link's container, created on first use. It lists no
/// owners (see [`super::users`]): the link controller keeps it while links use it.
async fn ensure_injection<R: ContainerRuntime>(
    ctx: &Context<R>,
    link: &PreviewLink,
    target: &Target,
) -> Result<DaemonInjection, Error> {
    let ns = link.namespace().unwrap_or_default();
    let api: Api<DaemonInjection> = Api::namespaced(ctx.client.clone(), &ns);
    let name = injection_name_for(target);
    ctx.users.uses(link);
    if let Some(di) = api.get_opt(&name).await.map_err(Error::Kube)? {
        return Ok(di);
    }
    let mut di = DaemonInjection::new(&name, DaemonInjectionSpec::new(target.clone()));
    di.metadata.namespace = Some(ns);
    di.metadata.labels = Some([(MANAGED_BY.to_owned(), "previewd".to_owned())].into());
    match api.create(&PostParams::default(), &di).await {
        Ok(created) => Ok(created),
        // Another link created it meanwhile: it serves both.
        Err(kube::Error::Api(e)) if e.code == 409 => api.get(&name).await.map_err(Error::Kube),
        Err(e) => Err(Error::Kube(e)),
    }
}

async fn cleanup<R: ContainerRuntime>(
    link: Arc<PreviewLink>,
    ctx: &Context<R>,
) -> Result<Action, Error> {
    let ns = link.namespace().unwrap_or_default();
    if let Some(uid) = link.uid() {
        let api: Api<DaemonInjection> = Api::namespaced(ctx.client.clone(), &ns);
        let name = injection_name_for(&link.spec.target);
        let last = ctx.users.leaves(&link);
        change_owners(&api, &name, |di| {
            // Injections of earlier versions list their links as owners: this one goes.
            let all = di.metadata.owner_references.clone().unwrap_or_default();
            let owners: Vec<OwnerReference> =
                all.iter().filter(|o| o.uid != uid).cloned().collect();
            // Injections asked for explicitly (the REST shim's `inject`) outlive their links.
            let managed = di.labels().get(MANAGED_BY).map(String::as_str) == Some("previewd")
                && !di.labels().contains_key(REQUESTED_LABEL);
            if last && owners.is_empty() && managed {
                OwnerChange::Delete
            } else if owners.len() != all.len() {
                OwnerChange::Set(owners)
            } else {
                OwnerChange::Keep
            }
        })
        .await?;
    }
    shared::delete_secret(&ctx.client, &ns, &token_secret_name(&link.name_any())).await?;
    ctx.backoff.reset(&link.uid().unwrap_or_default());
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::PreviewLinkSpec;

    /// Ready links wait for a change, or for their expiry; waiting links are re-checked
    /// within a minute, sooner when they expire sooner; expired ones are done.
    #[test]
    fn only_waiting_links_are_rechecked_on_a_timer() {
        let ready = LinkOutcome::Ready {
            upstream: "http://172.17.0.2:8080".into(),
            route: "direct".into(),
        };
        let pending = LinkOutcome::Pending {
            reason: "AgentStarting".into(),
            message: String::new(),
        };
        let soon = Duration::from_secs(5);
        let later = Duration::from_secs(3600);
        assert_eq!(next_check(&ready, None), Action::await_change());
        assert_eq!(next_check(&ready, Some(later)), Action::requeue(later));
        assert_eq!(next_check(&pending, None), Action::requeue(RECHECK));
        assert_eq!(next_check(&pending, Some(soon)), Action::requeue(soon));
        assert_eq!(next_check(&pending, Some(later)), Action::requeue(RECHECK));
        assert_eq!(
            next_check(&LinkOutcome::Expired, None),
            Action::await_change()
        );
    }

    fn cfg(style: UrlStyle) -> LinkConfig {
        LinkConfig {
            preview_domain: "preview.localhost".into(),
            url_style: style,
            proxy_addr: "127.0.0.1:8002".parse().unwrap_or_else(|e| panic!("{e}")),
            public_url: None,
            path_urls: true,
        }
    }

    #[test]
    fn a_public_url_replaces_the_listen_address() {
        let mut c = cfg(UrlStyle::Subdomain);
        c.public_url = "https://preview.example.com".parse().ok();
        assert_eq!(
            c.urls("default", "web"),
            (
                "https://web.default.preview.localhost/".to_owned(),
                "https://preview.example.com/p/web.default/".to_owned()
            )
        );
        c.public_url = "http://10.0.0.5:30080/".parse().ok();
        assert_eq!(c.urls("dev", "a").1, "http://10.0.0.5:30080/p/a.dev/");
        for bad in ["ftp://x", "https://x/base", "x", "https://x/?q=1"] {
            assert!(bad.parse::<PublicUrl>().is_err(), "{bad}");
        }
    }

    fn link() -> PreviewLink {
        let mut l = PreviewLink::new("web", PreviewLinkSpec::new(Target::docker("My_App"), 3000));
        l.metadata.namespace = Some("default".into());
        l.metadata.generation = Some(2);
        l
    }

    #[test]
    fn urls_in_both_styles() {
        assert_eq!(
            cfg(UrlStyle::Subdomain).urls("default", "web").0,
            "http://web.default.preview.localhost:8002/"
        );
        assert_eq!(
            cfg(UrlStyle::Subdomain).urls("default", "web").1,
            "http://127.0.0.1:8002/p/web.default/"
        );
        assert_eq!(
            cfg(UrlStyle::Path).urls("dev", "a.b").0,
            "http://127.0.0.1:8002/p/a.b.dev/"
        );
    }

    #[test]
    fn injection_names_are_dns_labels_and_distinct() {
        let a = injection_name(&DockerTarget {
            container: "My_App".into(),
        });
        let b = injection_name(&DockerTarget {
            container: "my-app".into(),
        });
        assert!(a.starts_with("link-my-app-") && a != b, "{a} {b}");
        let long = injection_name(&DockerTarget {
            container: "x".repeat(128),
        });
        assert!(
            crate::resources::validation::dns1123_subdomain("n", &long).is_ok() && long.len() <= 63,
            "{long}"
        );
    }

    #[test]
    fn ready_status_holds_the_hash_never_the_token() {
        let st = status_for(
            &link(),
            &LinkOutcome::Ready {
                upstream: "agent://172.17.0.2:4000/3000".into(),
                route: "agent: port 3000 listens on 127.0.0.1 only".into(),
            },
            &token_hash("secret-token"),
            &cfg(UrlStyle::Subdomain),
            Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        );
        assert_eq!(st.phase, Some(LinkPhase::Ready));
        assert_eq!(
            st.token_hash.as_deref(),
            Some(token_hash("secret-token").as_str())
        );
        assert!(
            !serde_json::to_string(&st)
                .unwrap_or_default()
                .contains("secret-token")
        );
        assert_eq!(
            st.token_secret_ref.map(|r| r.name),
            Some("previewd-link-web".into())
        );
        assert_eq!(st.observed_generation, Some(2));
        assert_eq!(st.upstream.as_deref(), Some("agent://172.17.0.2:4000/3000"));
    }

    #[test]
    fn auto_goes_direct_only_to_wildcard_ports_at_a_routable_address() {
        use crate::resources::daemon_injection::ListeningSocket;
        let socket = |address: &str, port: i32| ListeningSocket {
            address: address.into(),
            port,
        };
        let ports = [
            socket("0.0.0.0", 8080),
            socket("127.0.0.1", 3000),
            socket("::", 9000),
        ];
        let ep = "172.17.0.2:4567";
        let upstream = |o: Option<LinkOutcome>| match o {
            Some(LinkOutcome::Ready { upstream, route }) => Some((upstream, route)),
            _ => None,
        };
        let direct = upstream(auto_route(Via::Auto, 8080, ep, &ports));
        assert_eq!(
            direct.as_ref().map(|(u, _)| u.as_str()),
            Some("http://172.17.0.2:8080")
        );
        assert!(direct.is_some_and(|(_, r)| r.starts_with("direct: port 8080 listens on 0.0.0.0")));
        // `::` takes IPv4 connections too.
        assert!(upstream(auto_route(Via::Auto, 9000, ep, &ports)).is_some());
        // Loopback-bound, not listening, through exec or the host's loopback: the agent.
        assert!(auto_route(Via::Auto, 3000, ep, &ports).is_none());
        assert!(auto_route(Via::Auto, 5000, ep, &ports).is_none());
        assert!(auto_route(Via::Auto, 8080, "exec", &ports).is_none());
        assert!(auto_route(Via::Auto, 8080, "127.0.0.1:4567", &ports).is_none());
        // Only `auto` chooses.
        assert!(auto_route(Via::Agent, 8080, ep, &ports).is_none());
        assert_eq!(
            loopback_reason(3000, &ports),
            "port 3000 listens on 127.0.0.1 only"
        );
        assert_eq!(
            loopback_reason(5000, &ports),
            "nothing listens on port 5000 yet"
        );
        assert!(!family_reaches(
            "0.0.0.0",
            "fd00::2"
                .parse()
                .unwrap_or(std::net::Ipv6Addr::LOCALHOST.into())
        ));
    }

    #[test]
    fn links_enter_the_namespace_their_injection_recorded() {
        use crate::resources::daemon_injection::ListeningSocket;
        let ports = [ListeningSocket {
            address: "127.0.0.1".into(),
            port: 3000,
        }];
        let ns = NetworkNamespace {
            pid: 4242,
            inode: 4026532289,
        };
        let routed = |via, endpoint| match netns_route(via, 3000, endpoint, ns, &ports) {
            LinkOutcome::Ready { upstream, route } => (upstream, route),
            _ => panic!("not ready"),
        };
        let (upstream, route) = routed(Via::Auto, "172.17.0.2:4567");
        assert_eq!(upstream, "netns://4242/3000?ns=4026532289");
        assert_eq!(
            route,
            "netns: port 3000 listens on 127.0.0.1 only; previewd connects inside the container's network namespace"
        );
        assert!(routed(Via::Auto, "exec").1.contains("no routable address"));
        assert!(
            routed(Via::Agent, "exec")
                .1
                .starts_with("netns: spec.via is agent;")
        );
        // The proxy reads what the controller writes.
        assert_eq!(
            crate::proxy::routes::parse_upstream(&upstream),
            Ok(crate::proxy::routes::Upstream::Netns {
                pid: 4242,
                inode: 4026532289,
                port: 3000
            })
        );
    }

    #[test]
    fn ttl_counts_from_creation_and_expiry_clears_the_upstream() {
        let mut l = link();
        l.spec.ttl = "90s".parse().ok();
        l.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1000)
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        ));
        assert_eq!(expires_at(&l).map(|t| t.as_second()), Some(1090));
        l.status = Some(status_for(
            &l,
            &LinkOutcome::Ready {
                upstream: "u".into(),
                route: "direct: spec.via is direct".into(),
            },
            "h",
            &cfg(UrlStyle::Path),
            Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        ));
        let st = status_for(
            &l,
            &LinkOutcome::Expired,
            "h",
            &cfg(UrlStyle::Path),
            Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        );
        assert_eq!((st.phase, st.upstream), (Some(LinkPhase::Expired), None));
    }
}

//! The answers' shapes (the old daemon-proxy's field names, plus extras) and the decisions
//! that turn objects' status into answers. Pure: no client, unit-tested.

use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ShimError;
use crate::resources::conditions::{self, READY};
use crate::resources::daemon_injection::DaemonPhase;
use crate::resources::preview_link::{Access, LinkPhase};
use crate::resources::{DaemonInjection, PreviewLink};

/// `"injected"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Injected {
    /// The daemon runs and answered its health check.
    Injected,
}

/// Answer of `POST …/inject`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InjectAnswer {
    /// Always `injected`.
    pub status: Injected,
    /// The id the call named.
    pub container_id: String,
    /// The DaemonInjection object that keeps the daemon (visible with kubectl).
    pub injection: String,
    /// The injected agent's version.
    pub daemon_version: Option<String>,
}

/// Whether `remove` removed anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RemoveStatus {
    /// The daemon was stopped, its files deleted, and the container's links revoked.
    Removed,
    /// previewd kept no daemon in that container.
    NotManaged,
}

/// Answer of `POST …/remove`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RemoveAnswer {
    /// `removed` or `not_managed`.
    pub status: RemoveStatus,
    /// The id the call named.
    pub container_id: String,
}

/// Answer of `POST …/preview/{port}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PreviewAnswer {
    /// The link in the server's URL style, with `?previewd_token=` for token links, so it
    /// works pasted into a browser.
    pub url: String,
    /// The path-routed form (`/p/{link}/`), which works with any resolver, also with the
    /// token; only when the server serves path URLs (`--path-urls`: they share an origin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_url: Option<String>,
    /// The token (`null` for public links); also accepted as header `X-Previewd-Token`.
    pub token: Option<String>,
    /// The URL to embed in an `<iframe>` (or open anywhere): the link's capability host,
    /// which needs no token and no cookie, so it works where cookies are not kept (Safari's
    /// cross-site frames, manifests, `crossorigin` fetches). It is a credential, like the
    /// token. `null` when the link's name is too long for one host label.
    #[serde(default)]
    pub embed_url: Option<String>,
    /// The container port.
    pub port: u16,
    /// When the link stops working, in seconds since the Unix epoch.
    pub expires_at: i64,
    /// The PreviewLink object's name (visible with kubectl).
    pub link: String,
    /// Whether the link needs no token.
    pub public: bool,
}

/// `"revoked"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Revoked {
    /// The link is deleted; its URL answers 404.
    Revoked,
}

/// Answer of `DELETE …/preview/{port}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RevokeAnswer {
    /// Always `revoked`.
    pub status: Revoked,
    /// The id the call named.
    pub container_id: String,
    /// The container port.
    pub port: u16,
}

/// `"ok"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusOk {
    /// The call worked.
    Ok,
}

/// The daemon's state in a container, in the old contract's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DaemonStatus {
    /// Serving.
    Running,
    /// Waiting for the container (e.g. stopped).
    Pending,
    /// Being copied or started.
    Injecting,
    /// Injection failed; `reason` and `message` say why.
    Failed,
    /// Being removed.
    Removing,
    /// previewd keeps no daemon there.
    NotManaged,
}

impl DaemonStatus {
    /// The status a DaemonInjection (or none) means.
    pub fn of(di: Option<&DaemonInjection>) -> Self {
        let Some(di) = di else {
            return DaemonStatus::NotManaged;
        };
        if di.metadata.deletion_timestamp.is_some() {
            return DaemonStatus::Removing;
        }
        match di.status.as_ref().and_then(|s| s.phase) {
            Some(DaemonPhase::Running) => DaemonStatus::Running,
            Some(DaemonPhase::Injecting) => DaemonStatus::Injecting,
            Some(DaemonPhase::Failed) => DaemonStatus::Failed,
            Some(DaemonPhase::Removing) => DaemonStatus::Removing,
            Some(DaemonPhase::Pending) | None => DaemonStatus::Pending,
        }
    }
}

/// One of a container's preview links, as `status` reports it (no token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LinkSummary {
    /// The container port.
    pub port: u16,
    /// The PreviewLink's name.
    pub link: String,
    /// `Pending`, `Ready`, `Expired` or `Failed`.
    pub phase: Option<String>,
    /// The URL, without token.
    pub url: Option<String>,
    /// The path-routed URL, without token.
    pub path_url: Option<String>,
    /// Expiry in seconds since the Unix epoch.
    pub expires_at: Option<i64>,
    /// Whether the link needs no token.
    pub public: bool,
}

impl LinkSummary {
    /// Summarises a link.
    pub fn of(link: &PreviewLink) -> Self {
        let st = link.status.clone().unwrap_or_default();
        LinkSummary {
            port: u16::try_from(link.spec.port).unwrap_or(0),
            link: link.name_any(),
            phase: st
                .phase
                .and_then(|p| serde_json::to_value(p).ok())
                .and_then(|v| v.as_str().map(str::to_owned)),
            url: st.url,
            path_url: st.path_url,
            expires_at: st.expires_at.map(|t| t.0.as_second()),
            public: link.spec.access == Access::Public,
        }
    }
}

/// A socket listening inside the container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ListeningPort {
    /// The port.
    pub port: u16,
    /// The bound address (`127.0.0.1` ones are reachable only through the daemon).
    pub address: String,
}

/// Answer of `GET …/container/{id}/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ContainerStatus {
    /// Always `ok`: the call worked, whatever the daemon's state.
    pub status: StatusOk,
    /// The id the call named.
    pub container_id: String,
    /// The daemon's state.
    pub daemon_status: DaemonStatus,
    /// previewd itself is serving (always `true` in an answer).
    pub service_running: bool,
    /// The Ready condition's reason, when a daemon is managed.
    pub reason: Option<String>,
    /// The Ready condition's message.
    pub message: Option<String>,
    /// The container's preview links made through this API.
    pub links: Vec<LinkSummary>,
    /// Listening sockets, asked of the running daemon; `null` when it cannot be asked.
    pub ports: Option<Vec<ListeningPort>>,
}

/// Answer of `GET …/service/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceStatus {
    /// Always `ok`.
    pub status: StatusOk,
    /// Always `true` in an answer.
    pub is_running: bool,
    /// Containers with a daemon kept by previewd, each by the id or name the backend used for
    /// it (its full id when made otherwise).
    pub managed_containers: Vec<String>,
    /// The same containers' full ids.
    pub managed_container_ids: Vec<String>,
    /// This API's base URL.
    pub service_url: String,
    /// The preview proxy's base URL.
    pub proxy_url: String,
    /// previewd's version.
    pub version: String,
}

/// Where a wait for an object stands.
#[derive(Debug)]
pub enum Progress {
    /// Not there yet: keep waiting.
    Waiting,
    /// The object is in the wanted state.
    Done,
    /// It will not get there without a change in the world.
    Failed(ShimError),
}

impl Progress {
    /// Whether waiting can stop.
    pub fn is_final(&self) -> bool {
        !matches!(self, Progress::Waiting)
    }
}

/// Ready reasons that say injection cannot work now. The container's own absence or
/// stoppage is not among them: callers check the container first, so such a status is stale
/// (written before the container existed or ran) and a new reconcile is on its way.
fn failure(reason: &str, message: &str) -> Option<ShimError> {
    let failed = |reason: &str| ShimError::Failed {
        reason: reason.to_owned(),
        message: message.to_owned(),
    };
    match reason {
        "DockerUnavailable" => Some(ShimError::DockerUnavailable(message.to_owned())),
        "ReadOnlyRootfs"
        | "ExecFailed"
        | "AgentBinaryMissing"
        | "DaemonSourceRefused"
        | "UnsupportedTarget"
        | "NoRoute" => Some(failed(reason)),
        _ => None,
    }
}

/// How far an injection is, for `inject`: done when Running.
pub fn injection_progress(di: Option<&DaemonInjection>) -> Progress {
    let Some(di) = di else {
        return Progress::Failed(ShimError::Conflict(
            "the DaemonInjection was deleted while waiting for it".into(),
        ));
    };
    let Some(st) = di.status.as_ref() else {
        return Progress::Waiting;
    };
    if st.observed_generation != di.metadata.generation {
        return Progress::Waiting;
    }
    if st.phase == Some(DaemonPhase::Running) {
        return Progress::Done;
    }
    conditions::find(&st.conditions, READY)
        .and_then(|c| failure(&c.reason, &c.message))
        .map_or(Progress::Waiting, Progress::Failed)
}

/// How far a link is, for `preview`: done when Ready. A link waiting on its agent reports the
/// agent's reason behind an `Agent` prefix.
pub fn link_progress(link: Option<&PreviewLink>) -> Progress {
    let Some(link) = link else {
        return Progress::Failed(ShimError::Conflict(
            "the PreviewLink was deleted while waiting for it".into(),
        ));
    };
    let Some(st) = link.status.as_ref() else {
        return Progress::Waiting;
    };
    if st.observed_generation != link.metadata.generation {
        return Progress::Waiting;
    }
    match st.phase {
        Some(LinkPhase::Ready) => return Progress::Done,
        Some(LinkPhase::Expired) => {
            return Progress::Failed(ShimError::Conflict(
                "the link expired while waiting for it".into(),
            ));
        }
        _ => {}
    }
    conditions::find(&st.conditions, READY)
        .and_then(|c| {
            let inner = c.reason.strip_prefix("Agent").unwrap_or(&c.reason);
            failure(inner, &c.message)
        })
        .map_or(Progress::Waiting, Progress::Failed)
}

/// Appends `previewd_token=` to a link URL (they end in `/` and carry no query).
pub fn with_token(url: &str, token: Option<&str>) -> String {
    match token {
        Some(t) => format!("{url}?previewd_token={t}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::resources::daemon_injection::DaemonInjectionStatus;
    use crate::resources::preview_link::PreviewLinkStatus;
    use crate::resources::{DaemonInjectionSpec, PreviewLinkSpec, Target};

    fn di(phase: Option<DaemonPhase>, reason: &str, observed: i64) -> DaemonInjection {
        let mut di = DaemonInjection::new("d", DaemonInjectionSpec::new(Target::docker("c")));
        di.metadata.generation = Some(1);
        let mut st = DaemonInjectionStatus {
            phase,
            observed_generation: Some(observed),
            ..Default::default()
        };
        conditions::set_condition(
            &mut st.conditions,
            conditions::condition(READY, false, reason, "why", Some(1)),
        );
        di.status = Some(st);
        di
    }

    #[test]
    fn injection_waits_for_running_and_stops_at_real_failures() {
        let running = di(Some(DaemonPhase::Running), "DaemonRunning", 1);
        assert!(matches!(injection_progress(Some(&running)), Progress::Done));
        let stale = di(Some(DaemonPhase::Running), "DaemonRunning", 0);
        assert!(matches!(
            injection_progress(Some(&stale)),
            Progress::Waiting
        ));
        let ro = di(Some(DaemonPhase::Failed), "ReadOnlyRootfs", 1);
        assert!(matches!(
            injection_progress(Some(&ro)),
            Progress::Failed(ShimError::Failed { .. })
        ));
        let docker = di(Some(DaemonPhase::Failed), "DockerUnavailable", 1);
        assert!(matches!(
            injection_progress(Some(&docker)),
            Progress::Failed(ShimError::DockerUnavailable(_))
        ));
        // Checked by the caller against the engine: a stale "not found" is waited out.
        let gone = di(Some(DaemonPhase::Failed), "ContainerNotFound", 1);
        assert!(matches!(injection_progress(Some(&gone)), Progress::Waiting));
        assert!(matches!(injection_progress(None), Progress::Failed(_)));
    }

    #[test]
    fn links_report_their_agents_failures() {
        let mut l = PreviewLink::new("l", PreviewLinkSpec::new(Target::docker("c"), 80));
        l.metadata.generation = Some(1);
        let mut st = PreviewLinkStatus {
            phase: Some(LinkPhase::Pending),
            observed_generation: Some(1),
            ..Default::default()
        };
        conditions::set_condition(
            &mut st.conditions,
            conditions::condition(READY, false, "AgentReadOnlyRootfs", "ro", Some(1)),
        );
        l.status = Some(st.clone());
        match link_progress(Some(&l)) {
            Progress::Failed(ShimError::Failed { reason, .. }) => {
                assert_eq!(reason, "ReadOnlyRootfs");
            }
            other => panic!("{other:?}"),
        }
        conditions::set_condition(
            &mut st.conditions,
            conditions::condition(READY, false, "AgentInjecting", "…", Some(1)),
        );
        l.status = Some(st.clone());
        assert!(matches!(link_progress(Some(&l)), Progress::Waiting));
        st.phase = Some(LinkPhase::Ready);
        st.expires_at = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        l.status = Some(st);
        assert!(matches!(link_progress(Some(&l)), Progress::Done));
        assert_eq!(LinkSummary::of(&l).phase.as_deref(), Some("Ready"));
        assert_eq!(LinkSummary::of(&l).expires_at, Some(0));
    }

    #[test]
    fn daemon_status_words() {
        assert_eq!(DaemonStatus::of(None), DaemonStatus::NotManaged);
        let running = di(Some(DaemonPhase::Running), "DaemonRunning", 1);
        assert_eq!(DaemonStatus::of(Some(&running)), DaemonStatus::Running);
        assert_eq!(
            serde_json::to_value(DaemonStatus::NotManaged).ok(),
            Some(serde_json::json!("not_managed"))
        );
    }

    #[test]
    fn tokens_ride_the_query() {
        assert_eq!(
            with_token("http://a/p/x.default/", Some("t")),
            "http://a/p/x.default/?previewd_token=t"
        );
        assert_eq!(with_token("http://a/", None), "http://a/");
    }
}

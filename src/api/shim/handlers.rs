//! The shim's handlers. Each checks its input, looks the container up, creates or changes
//! DaemonInjection and PreviewLink objects and waits for their status, so REST, kubectl and
//! YAML users see the same objects.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::wait::await_condition;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::error::{ErrorBody, ShimError};
use super::input::{self, ContainerPath, ContainerPortPath, NoQuery, PreviewQuery};
use super::model::{
    self, ContainerStatus, DaemonStatus, InjectAnswer, Injected, LinkSummary, PreviewAnswer,
    Progress, RemoveAnswer, RemoveStatus, RevokeAnswer, Revoked, ServiceStatus, StatusOk,
};
use super::{
    CONTAINER_NAME_ANNOTATION, REQUESTED_AS_ANNOTATION, REQUESTED_LABEL, RETRY_ANNOTATION,
    SHIM_LINK_LABEL, Shim, link_name,
};
use crate::controller::link::{self, TOKEN_KEY, injection_name, token_secret_name};
use crate::controller::shared::{MANAGED_BY, secret_str};
use crate::proxy::errors::ProxyError;
use crate::resources::conditions::{self, READY};
use crate::resources::daemon_injection::DaemonPhase;
use crate::resources::preview_link::{Access, LinkPhase, Via};
use crate::resources::target::DockerTarget;
use crate::resources::{
    DaemonInjection, DaemonInjectionSpec, PreviewLink, PreviewLinkSpec, Target,
};
use crate::runtime::{ContainerInfo, ContainerRuntime, RuntimeError};

/// The checked container id of a container's call.
fn path_id(p: Result<Path<ContainerPath>, PathRejection>) -> Result<String, ShimError> {
    let Path(ContainerPath { id }) = p.map_err(|e| ShimError::InvalidContainerId(e.body_text()))?;
    input::container_id(&id)?;
    Ok(id)
}

/// The checked container id and port of a container port's call.
fn path_id_port(
    p: Result<Path<ContainerPortPath>, PathRejection>,
) -> Result<(String, u16), ShimError> {
    let Path(ContainerPortPath { id, port }) =
        p.map_err(|e| ShimError::InvalidContainerId(e.body_text()))?;
    input::container_id(&id)?;
    let port = input::port(&port)?;
    Ok((id, port))
}

/// The container's shared DaemonInjection (links and `inject` use the same one).
fn injection_of(container: &str) -> String {
    injection_name(&DockerTarget {
        container: container.to_owned(),
    })
}

fn no_query(q: Result<Query<NoQuery>, QueryRejection>) -> Result<(), ShimError> {
    q.map(|_| ()).map_err(|e| {
        ShimError::InvalidQuery(format!("{}: this call takes no query", e.body_text()))
    })
}

fn kube_err(e: kube::Error) -> ShimError {
    ShimError::Kube(e)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl Shim {
    fn injections(&self) -> Api<DaemonInjection> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn links(&self) -> Api<PreviewLink> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The running container `id` names, or why it cannot be injected.
    async fn running_container(&self, id: &str) -> Result<ContainerInfo, ShimError> {
        let docker = self.docker.as_ref().ok_or_else(|| {
            ShimError::DockerUnavailable("the Docker engine is unavailable".into())
        })?;
        match docker.resolve(id).await {
            Ok(info) if !info.running => Err(ShimError::ContainerNotRunning(format!(
                "container {id} is {}; start it first",
                info.state
            ))),
            Ok(info) => Ok(info),
            Err(RuntimeError::ContainerNotFound(_)) => {
                Err(ShimError::ContainerNotFound(format!("no container {id:?}")))
            }
            Err(e @ RuntimeError::ContainerRemoved { .. }) => {
                Err(ShimError::ContainerNotFound(e.to_string()))
            }
            Err(e @ RuntimeError::AmbiguousContainer(_)) => {
                Err(ShimError::AmbiguousContainerId(e.to_string()))
            }
            Err(e) => Err(ShimError::DockerUnavailable(e.to_string())),
        }
    }

    /// The container id previewd's objects name for `id` (a name, short or full id): asked
    /// of Docker, or, for a container that is gone, found among the injections and links.
    async fn locate(&self, id: &str) -> Result<Option<String>, ShimError> {
        if let Some(docker) = &self.docker
            && let Ok(info) = docker.resolve(id).await
        {
            return Ok(Some(info.id));
        }
        let names = |container: &str, annotations: &std::collections::BTreeMap<String, String>| {
            container == id
                || (id.len() >= 12 && container.starts_with(id))
                || annotations
                    .get(CONTAINER_NAME_ANNOTATION)
                    .map(String::as_str)
                    == Some(id)
        };
        let dis = self
            .injections()
            .list(&ListParams::default())
            .await
            .map_err(kube_err)?;
        for di in &dis {
            if let Target::Docker(d) = &di.spec.target
                && names(&d.container, di.annotations())
            {
                return Ok(Some(d.container.clone()));
            }
        }
        let links = self
            .links()
            .list(&ListParams::default().labels(SHIM_LINK_LABEL))
            .await
            .map_err(kube_err)?;
        Ok(links.iter().find_map(|l| match &l.spec.target {
            Target::Docker(d) if names(&d.container, l.annotations()) => Some(d.container.clone()),
            _ => None,
        }))
    }

    /// Waits until `progress` says the object is done or failed, within the call's limit.
    async fn wait_for<K>(
        &self,
        api: &Api<K>,
        name: &str,
        progress: fn(Option<&K>) -> Progress,
    ) -> Result<K, ShimError>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let waited = tokio::time::timeout(
            self.wait,
            await_condition(api.clone(), name, move |o: Option<&K>| {
                progress(o).is_final()
            }),
        )
        .await;
        let obj = match waited {
            Ok(Ok(obj)) => obj,
            Ok(Err(e)) => {
                return Err(ShimError::Timeout(format!("watching {name} failed: {e}")));
            }
            Err(_) => {
                return Err(ShimError::Timeout(format!(
                    "{} {name} was not ready within {}s; it stays and keeps trying, call again to wait more",
                    K::kind(&()),
                    self.wait.as_secs()
                )));
            }
        };
        match progress(obj.as_ref()) {
            Progress::Done => obj.ok_or_else(|| {
                ShimError::Conflict(format!("{name} was deleted while waiting for it"))
            }),
            Progress::Failed(e) => Err(e),
            Progress::Waiting => Err(ShimError::Timeout(format!("{name} is not ready yet"))),
        }
    }

    /// Waits until the object is gone (its finalizers done), within the call's limit.
    async fn wait_gone<K>(&self, api: &Api<K>, name: &str) -> Result<(), ShimError>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let gone = |o: Option<&K>| o.is_none();
        match tokio::time::timeout(self.wait, await_condition(api.clone(), name, gone)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ShimError::Timeout(format!("watching {name} failed: {e}"))),
            Err(_) => Err(ShimError::Timeout(format!(
                "{name} was not removed within {}s; its clean-up goes on",
                self.wait.as_secs()
            ))),
        }
    }

    /// Waits until this replica's proxy has caught up with the link `name`: serves it, or
    /// refuses it for a reason of the link's own (expired), when `serving`; refuses it when
    /// not. The API's watch and the proxy's reflector are two streams: a preview must not
    /// answer before its URL works here, nor a revoke while it still does. (Other replicas
    /// follow within their watch's delay.)
    async fn wait_for_proxy(&self, name: &str, serving: bool) -> Result<(), ShimError> {
        let key = ObjectRef::new(name).within(&self.namespace);
        let caught_up = || match self.routes.check(&key) {
            Err(ProxyError::LinkNotFound | ProxyError::TargetNotReady(_)) => !serving,
            Ok(()) => serving,
            Err(_) => true,
        };
        let settled = async {
            while !caught_up() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(self.wait, settled).await.map_err(|_| {
            let state = if serving {
                "is Ready, but the proxy did not serve it"
            } else {
                "was deleted, but the proxy still routed it"
            };
            ShimError::Timeout(format!("{name} {state} after {}s", self.wait.as_secs()))
        })
    }

    async fn delete_and_wait<K>(&self, api: &Api<K>, name: &str) -> Result<(), ShimError>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(kube_err(e)),
        }
        self.wait_gone(api, name).await
    }

    /// Asks a reconcile of an injection that failed or waits (its backoff may be long, and
    /// the container may have changed since: callers checked it runs now).
    async fn nudge(&self, di: &DaemonInjection) -> Result<(), ShimError> {
        let phase = di.status.as_ref().and_then(|s| s.phase);
        if !matches!(phase, Some(DaemonPhase::Failed | DaemonPhase::Pending)) {
            return Ok(());
        }
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let patch = json!({"metadata": {"annotations": {RETRY_ANNOTATION: now}}});
        self.injections()
            .patch(
                &di.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
            .map(|_| ())
            .map_err(kube_err)
    }

    /// The container's shared injection, created or marked as asked for through this API
    /// (so it stays when its links go). Returns whether this call created it.
    async fn ensure_requested(
        &self,
        info: &ContainerInfo,
        requested_as: &str,
    ) -> Result<bool, ShimError> {
        let api = self.injections();
        let name = injection_of(&info.id);
        if let Some(di) = api.get_opt(&name).await.map_err(kube_err)? {
            if di.metadata.deletion_timestamp.is_none() {
                if !di.labels().contains_key(REQUESTED_LABEL) {
                    let patch = json!({"metadata": {"labels": {REQUESTED_LABEL: "rest"}}});
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                        .await
                        .map_err(kube_err)?;
                }
                self.nudge(&di).await?;
                return Ok(false);
            }
            self.wait_gone(&api, &name).await?;
        }
        let mut di = DaemonInjection::new(
            &name,
            DaemonInjectionSpec::new(Target::docker(info.id.clone())),
        );
        di.metadata.namespace = Some(self.namespace.clone());
        di.metadata.labels = Some(
            [
                (MANAGED_BY.to_owned(), "previewd".to_owned()),
                (REQUESTED_LABEL.to_owned(), "rest".to_owned()),
            ]
            .into(),
        );
        di.metadata.annotations = Some(
            [
                (CONTAINER_NAME_ANNOTATION.to_owned(), info.name.clone()),
                (REQUESTED_AS_ANNOTATION.to_owned(), requested_as.to_owned()),
            ]
            .into(),
        );
        match api.create(&PostParams::default(), &di).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(kube_err(e)),
        }
    }

    /// The preview link for (container, port), created, renewed after expiry, or updated to
    /// the query. Returns whether this call created it.
    async fn ensure_link(
        &self,
        info: &ContainerInfo,
        requested_as: &str,
        port: u16,
        query: &PreviewQuery,
    ) -> Result<(String, bool), ShimError> {
        let api = self.links();
        let name = link_name(&info.id, port);
        let ttl = query.ttl()?;
        let expiry = |ttl: u64| {
            k8s_openapi::jiff::Timestamp::now()
                .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(
                    i64::try_from(ttl).unwrap_or(i64::MAX),
                ))
                .map(Time)
                .map_err(|e| ShimError::InvalidQuery(format!("ttl_seconds: {e}")))
        };
        if let Some(existing) = api.get_opt(&name).await.map_err(kube_err)? {
            if !existing.labels().contains_key(SHIM_LINK_LABEL) {
                return Err(ShimError::Conflict(format!(
                    "PreviewLink {name} exists and was not made through this API; delete it or use it directly"
                )));
            }
            let now = k8s_openapi::jiff::Timestamp::now();
            let expired = existing.status.as_ref().and_then(|s| s.phase)
                == Some(LinkPhase::Expired)
                || link::expires_at(&existing).is_some_and(|e| e <= now);
            if existing.metadata.deletion_timestamp.is_none() && !expired {
                let mut spec = serde_json::Map::new();
                if let Some(public) = query.public {
                    let access = if public {
                        Access::Public
                    } else {
                        Access::Token
                    };
                    if access != existing.spec.access {
                        spec.insert("access".into(), json!(access));
                    }
                }
                if let Some(ttl) = ttl {
                    spec.insert("expiresAt".into(), json!(expiry(ttl)?));
                }
                if !spec.is_empty() {
                    api.patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({ "spec": spec })),
                    )
                    .await
                    .map_err(kube_err)?;
                }
                return Ok((name, false));
            }
            // Expired links are replaced, with a new token: an old URL must not come back.
            self.delete_and_wait(&api, &name).await?;
        }
        let mut spec = PreviewLinkSpec::new(Target::docker(info.id.clone()), i32::from(port));
        spec.access = if query.public == Some(true) {
            Access::Public
        } else {
            Access::Token
        };
        spec.expires_at = Some(expiry(ttl.unwrap_or(input::DEFAULT_TTL_SECONDS))?);
        let mut l = PreviewLink::new(&name, spec);
        l.metadata.namespace = Some(self.namespace.clone());
        let key = injection_of(&info.id);
        l.metadata.labels = Some([(SHIM_LINK_LABEL.to_owned(), key)].into());
        l.metadata.annotations = Some(
            [
                (CONTAINER_NAME_ANNOTATION.to_owned(), info.name.clone()),
                (REQUESTED_AS_ANNOTATION.to_owned(), requested_as.to_owned()),
            ]
            .into(),
        );
        match api.create(&PostParams::default(), &l).await {
            Ok(_) => Ok((name, true)),
            // A concurrent call for the same port made it: the same link serves both.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok((name, false)),
            Err(e) => Err(kube_err(e)),
        }
    }

    async fn token(&self, link: &str) -> Result<String, ShimError> {
        self.credential(link, TOKEN_KEY).await
    }

    /// The value under `key` (the token, the capability) in a link's Secret.
    async fn credential(&self, link: &str, key: &str) -> Result<String, ShimError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret = secrets
            .get(&token_secret_name(link))
            .await
            .map_err(kube_err)?;
        secret_str(&secret, key)
            .map(str::to_owned)
            .ok_or_else(|| ShimError::Conflict(format!("the {key} of {link} is not readable")))
    }

    /// Asks the running daemon which ports listen in the container.
    fn listening_ports(&self, di: &DaemonInjection) -> Option<Vec<model::ListeningPort>> {
        let st = di.status.as_ref()?;
        st.endpoint.as_ref()?;
        Some(
            st.ports
                .iter()
                .filter_map(|p| {
                    Some(model::ListeningPort {
                        port: u16::try_from(p.port).ok()?,
                        address: p.address.clone(),
                    })
                })
                .collect(),
        )
    }
}

/// Injects the daemon into a running container and waits until it serves.
#[utoipa::path(
    post,
    path = "/api/daemon-proxy/container/{id}/inject",
    params(ContainerPath),
    responses(
        (status = 200, description = "The daemon runs (also when it already did)", body = InjectAnswer),
        (status = 400, description = "Invalid container id, or a prefix of more than one", body = ErrorBody),
        (status = 401, description = "Bearer token missing or wrong (non-loopback API)", body = ErrorBody),
        (status = 404, description = "No such container", body = ErrorBody),
        (status = 409, description = "The container is not running", body = ErrorBody),
        (status = 422, description = "Unknown query field", body = ErrorBody),
        (status = 500, description = "Injection failed (detail says why)", body = ErrorBody),
        (status = 503, description = "Docker unavailable, or not ready within the wait", body = ErrorBody),
    ),
    tag = "daemon-proxy"
)]
pub async fn inject(
    State(s): State<Shim>,
    id: Result<Path<ContainerPath>, PathRejection>,
    query: Result<Query<NoQuery>, QueryRejection>,
) -> Result<Json<InjectAnswer>, ShimError> {
    let id = path_id(id)?;
    let id = id.as_str();
    no_query(query)?;
    let info = s.running_container(id).await?;
    let created = s.ensure_requested(&info, id).await?;
    let api = s.injections();
    let name = injection_of(&info.id);
    match s.wait_for(&api, &name, model::injection_progress).await {
        Ok(di) => Ok(Json(InjectAnswer {
            status: Injected::Injected,
            container_id: id.to_owned(),
            injection: name,
            daemon_version: di.status.and_then(|s| s.daemon_version),
        })),
        Err(e) => {
            // A failed first injection leaves nothing behind; a slow one keeps going.
            if created && !matches!(e, ShimError::Timeout(_)) {
                let _ = api.delete(&name, &DeleteParams::default()).await;
            }
            Err(e)
        }
    }
}

/// Stops the daemon, deletes its files and revokes the links made through this API.
#[utoipa::path(
    post,
    path = "/api/daemon-proxy/container/{id}/remove",
    params(ContainerPath),
    responses(
        (status = 200, description = "Removed, or nothing was managed there", body = RemoveAnswer),
        (status = 400, description = "Invalid container id, or a prefix of more than one", body = ErrorBody),
        (status = 401, description = "Bearer token missing or wrong (non-loopback API)", body = ErrorBody),
        (status = 409, description = "Links made with kubectl or YAML still use the daemon", body = ErrorBody),
        (status = 422, description = "Unknown query field", body = ErrorBody),
        (status = 500, description = "The API store failed", body = ErrorBody),
        (status = 503, description = "Removal did not finish within the wait", body = ErrorBody),
    ),
    tag = "daemon-proxy"
)]
pub async fn remove(
    State(s): State<Shim>,
    id: Result<Path<ContainerPath>, PathRejection>,
    query: Result<Query<NoQuery>, QueryRejection>,
) -> Result<Json<RemoveAnswer>, ShimError> {
    let id = path_id(id)?;
    let id = id.as_str();
    no_query(query)?;
    let not_managed = Json(RemoveAnswer {
        status: RemoveStatus::NotManaged,
        container_id: id.to_owned(),
    });
    let Some(container) = s.locate(id).await? else {
        return Ok(not_managed);
    };
    let di_name = injection_of(&container);
    let links = s.links();
    let all = links.list(&ListParams::default()).await.map_err(kube_err)?;
    let uses_agent = |l: &PreviewLink| {
        l.spec.via != Via::Direct
            && matches!(&l.spec.target, Target::Docker(d) if d.container == container)
    };
    let foreign: Vec<String> = all
        .iter()
        .filter(|l| uses_agent(l) && !l.labels().contains_key(SHIM_LINK_LABEL))
        .map(|l| l.name_any())
        .collect();
    if !foreign.is_empty() {
        return Err(ShimError::Conflict(format!(
            "the daemon serves PreviewLinks not made through this API ({}); delete them first",
            foreign.join(", ")
        )));
    }
    let ours: Vec<String> = all
        .iter()
        .filter(|l| l.labels().get(SHIM_LINK_LABEL) == Some(&di_name))
        .map(|l| l.name_any())
        .collect();
    let injections = s.injections();
    let di = injections.get_opt(&di_name).await.map_err(kube_err)?;
    if di.is_none() && ours.is_empty() {
        return Ok(not_managed);
    }
    for name in &ours {
        match links.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(kube_err(e)),
        }
    }
    if di.is_some() {
        s.delete_and_wait(&injections, &di_name).await?;
    }
    for name in &ours {
        s.wait_gone(&links, name).await?;
        s.wait_for_proxy(name, false).await?;
    }
    Ok(Json(RemoveAnswer {
        status: RemoveStatus::Removed,
        container_id: id.to_owned(),
    }))
}

/// Creates (or returns the live) preview link to a port of a running container, injecting
/// the daemon as needed.
#[utoipa::path(
    post,
    path = "/api/daemon-proxy/container/{id}/preview/{port}",
    params(ContainerPortPath, PreviewQuery),
    responses(
        (status = 200, description = "The link serves; `url` and `path_url` carry the token", body = PreviewAnswer),
        (status = 400, description = "Invalid container id or port, or an id prefix of more than one container", body = ErrorBody),
        (status = 401, description = "Bearer token missing or wrong (non-loopback API)", body = ErrorBody),
        (status = 404, description = "No such container", body = ErrorBody),
        (status = 409, description = "The container is not running, or a link of that name was made otherwise", body = ErrorBody),
        (status = 422, description = "Unknown or invalid query field", body = ErrorBody),
        (status = 500, description = "Injection failed (detail says why)", body = ErrorBody),
        (status = 503, description = "Docker unavailable, or not ready within the wait", body = ErrorBody),
    ),
    tag = "daemon-proxy"
)]
pub async fn preview(
    State(s): State<Shim>,
    path: Result<Path<ContainerPortPath>, PathRejection>,
    query: Result<Query<PreviewQuery>, QueryRejection>,
) -> Result<Json<PreviewAnswer>, ShimError> {
    let (id, port) = path_id_port(path)?;
    let Query(query) = query.map_err(|e| ShimError::InvalidQuery(e.body_text()))?;
    query.ttl()?;
    let info = s.running_container(&id).await?;
    let (name, created) = s.ensure_link(&info, &id, port, &query).await?;
    let di_name = injection_of(&info.id);
    if let Some(di) = s.injections().get_opt(&di_name).await.map_err(kube_err)? {
        s.nudge(&di).await?;
    }
    let api = s.links();
    let link = match s.wait_for(&api, &name, model::link_progress).await {
        Ok(l) => l,
        Err(e) => {
            if created && !matches!(e, ShimError::Timeout(_)) {
                let _ = api.delete(&name, &DeleteParams::default()).await;
            }
            return Err(e);
        }
    };
    s.wait_for_proxy(&name, true).await?;
    let st = link.status.clone().unwrap_or_default();
    let public = link.spec.access == Access::Public;
    let token = if public {
        None
    } else {
        Some(s.token(&name).await?)
    };
    let (url, path_url) = s.links_config.urls(&s.namespace, &name);
    let capability = s
        .credential(&name, crate::resources::capability::KEY)
        .await?;
    let embed_url = s
        .links_config
        .capability_url(&s.namespace, &name, &capability);
    Ok(Json(PreviewAnswer {
        embed_url,
        url: model::with_token(&st.url.unwrap_or(url), token.as_deref()),
        path_url: s
            .links_config
            .path_urls
            .then(|| model::with_token(&st.path_url.unwrap_or(path_url), token.as_deref())),
        token,
        port,
        expires_at: st
            .expires_at
            .or(link.spec.expires_at)
            .map_or(0, |t| t.0.as_second()),
        link: name,
        public,
    }))
}

/// Revokes the preview link to a port: its URL answers 404 from then on.
#[utoipa::path(
    delete,
    path = "/api/daemon-proxy/container/{id}/preview/{port}",
    params(ContainerPortPath),
    responses(
        (status = 200, description = "Revoked", body = RevokeAnswer),
        (status = 400, description = "Invalid container id or port, or an id prefix of more than one container", body = ErrorBody),
        (status = 401, description = "Bearer token missing or wrong (non-loopback API)", body = ErrorBody),
        (status = 404, description = "No link made through this API for that container and port", body = ErrorBody),
        (status = 422, description = "Unknown query field", body = ErrorBody),
        (status = 500, description = "The API store failed", body = ErrorBody),
        (status = 503, description = "Removal did not finish within the wait", body = ErrorBody),
    ),
    tag = "daemon-proxy"
)]
pub async fn revoke(
    State(s): State<Shim>,
    path: Result<Path<ContainerPortPath>, PathRejection>,
    query: Result<Query<NoQuery>, QueryRejection>,
) -> Result<Json<RevokeAnswer>, ShimError> {
    let (id, port) = path_id_port(path)?;
    no_query(query)?;
    let missing = || ShimError::LinkNotFound(format!("no preview link to port {port} of {id}"));
    let container = s.locate(&id).await?.ok_or_else(missing)?;
    let name = link_name(&container, port);
    let api = s.links();
    match api.get_opt(&name).await.map_err(kube_err)? {
        Some(l) if l.labels().contains_key(SHIM_LINK_LABEL) => {
            s.delete_and_wait(&api, &name).await?;
            s.wait_for_proxy(&name, false).await?;
        }
        _ => return Err(missing()),
    }
    Ok(Json(RevokeAnswer {
        status: Revoked::Revoked,
        container_id: id,
        port,
    }))
}

/// The daemon's state in a container, its preview links and listening ports.
#[utoipa::path(
    get,
    path = "/api/daemon-proxy/container/{id}/status",
    params(ContainerPath),
    responses(
        (status = 200, description = "The state (`not_managed` for containers previewd keeps nothing in)", body = ContainerStatus),
        (status = 400, description = "Invalid container id, or a prefix of more than one", body = ErrorBody),
        (status = 401, description = "Bearer token missing or wrong (non-loopback API)", body = ErrorBody),
        (status = 422, description = "Unknown query field", body = ErrorBody),
        (status = 500, description = "The API store failed", body = ErrorBody),
    ),
    tag = "daemon-proxy"
)]
pub async fn container_status(
    State(s): State<Shim>,
    id: Result<Path<ContainerPath>, PathRejection>,
    query: Result<Query<NoQuery>, QueryRejection>,
) -> Result<Json<ContainerStatus>, ShimError> {
    let id = path_id(id)?;
    let id = id.as_str();
    no_query(query)?;
    let mut answer = ContainerStatus {
        status: StatusOk::Ok,
        container_id: id.to_owned(),
        daemon_status: DaemonStatus::NotManaged,
        service_running: true,
        reason: None,
        message: None,
        links: Vec::new(),
        ports: None,
    };
    let Some(container) = s.locate(id).await? else {
        return Ok(Json(answer));
    };
    let di_name = injection_of(&container);
    let di = s.injections().get_opt(&di_name).await.map_err(kube_err)?;
    answer.daemon_status = DaemonStatus::of(di.as_ref());
    if let Some(di) = &di {
        if let Some(c) = di
            .status
            .as_ref()
            .and_then(|st| conditions::find(&st.conditions, READY))
        {
            answer.reason = Some(c.reason.clone());
            answer.message = Some(c.message.clone());
        }
        if answer.daemon_status == DaemonStatus::Running {
            answer.ports = s.listening_ports(di);
        }
    }
    let links = s
        .links()
        .list(&ListParams::default().labels(&format!("{SHIM_LINK_LABEL}={di_name}")))
        .await
        .map_err(kube_err)?;
    answer.links = links.iter().map(LinkSummary::of).collect();
    answer.links.sort_by_key(|l| l.port);
    Ok(Json(answer))
}

/// previewd is up; which containers it keeps a daemon in; where its API and proxy are.
#[utoipa::path(
    get,
    path = "/api/daemon-proxy/service/status",
    responses(
        (status = 200, description = "previewd serves", body = ServiceStatus),
        (status = 401, description = "Bearer token missing or wrong (non-loopback API)", body = ErrorBody),
        (status = 422, description = "Unknown query field", body = ErrorBody),
        (status = 500, description = "The API store failed", body = ErrorBody),
    ),
    tag = "daemon-proxy"
)]
pub async fn service_status(
    State(s): State<Shim>,
    query: Result<Query<NoQuery>, QueryRejection>,
) -> Result<Json<ServiceStatus>, ShimError> {
    no_query(query)?;
    let dis = s
        .injections()
        .list(&ListParams::default())
        .await
        .map_err(kube_err)?;
    // Each container by the id the backend used for it (a backend that injected
    // `my-sandbox` looks for `my-sandbox`), and by its full id beside.
    let links = s
        .links()
        .list(&ListParams::default())
        .await
        .map_err(kube_err)?;
    let requested_as = |full: &str| {
        let named = |meta: &kube::api::ObjectMeta| {
            meta.annotations
                .as_ref()
                .and_then(|a| a.get(REQUESTED_AS_ANNOTATION))
                .cloned()
        };
        dis.iter()
            .filter(|d| matches!(&d.spec.target, Target::Docker(t) if t.container == full))
            .find_map(|d| named(&d.metadata))
            .or_else(|| {
                links
                    .iter()
                    .filter(|l| matches!(&l.spec.target, Target::Docker(t) if t.container == full))
                    .find_map(|l| named(&l.metadata))
            })
            .unwrap_or_else(|| full.to_owned())
    };
    let mut ids: Vec<String> = dis
        .iter()
        .filter(|d| d.metadata.deletion_timestamp.is_none())
        .filter_map(|d| match &d.spec.target {
            Target::Docker(t) => Some(t.container.clone()),
            Target::Pod(_) => None,
        })
        .collect();
    ids.sort();
    ids.dedup();
    let mut managed: Vec<String> = ids.iter().map(|id| requested_as(id)).collect();
    managed.sort();
    managed.dedup();
    let mut managed_ids: Vec<String> = dis
        .iter()
        .filter(|d| d.metadata.deletion_timestamp.is_none())
        .filter(|d| matches!(d.spec.target, Target::Docker(_)))
        .filter_map(|d| {
            d.status
                .as_ref()
                .and_then(|st| st.container_id.clone())
                .or_else(|| match &d.spec.target {
                    Target::Docker(t) => Some(t.container.clone()),
                    Target::Pod(_) => None,
                })
        })
        .collect();
    managed_ids.sort();
    managed_ids.dedup();
    Ok(Json(ServiceStatus {
        status: StatusOk::Ok,
        is_running: true,
        managed_containers: managed,
        managed_container_ids: managed_ids,
        service_url: s.api_url.clone(),
        proxy_url: s.links_config.proxy_base_url(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }))
}

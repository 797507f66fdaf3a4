//! The reconcilers. Written once against `kube::Api` and `kube::runtime`, they run over the
//! embedded API (outside a cluster) and over a real API server alike.

pub mod backoff;
pub mod daemon_health;
pub mod injection;
pub mod leader;
pub mod link;
pub mod shared;
pub mod users;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use kube::runtime::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client};

use crate::metrics::Metrics;
use crate::resources::daemon_source::DaemonSourcePolicy;
use crate::resources::{DaemonInjection, PreviewLink, scoped_api};
use crate::runtime::ContainerRuntime;
use crate::runtime::docker::DockerRuntime;
use crate::runtime::pod::PodRuntime;
use crate::watching::{SharedCache, Undecodable};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;

/// Why a reconcile failed. Each variant is a condition reason users can act on, and a
/// metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to the API server failed.
    #[error("API request failed: {0}")]
    Kube(#[source] kube::Error),
    /// The finalizer helper failed (it wraps the other errors).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Injection failed for a reason recorded in the object's status; retried with backoff.
    #[error("{reason}: {message}")]
    Injection {
        /// The Ready condition's reason.
        reason: &'static str,
        /// What happened.
        message: String,
    },
}

impl Error {
    /// Whether the object itself is gone: its finalizer could not be added or removed
    /// because the API no longer has it (deleted while it was reconciled).
    pub fn is_gone(&self) -> bool {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Finalizer(inner) => matches!(
                inner.as_ref(),
                F::AddFinalizer(kube::Error::Api(s)) | F::RemoveFinalizer(kube::Error::Api(s))
                    if s.code == 404
            ),
            Error::Kube(_) | Error::Injection { .. } => false,
        }
    }

    /// The label for failure metrics.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(_) => "KubeApiError".into(),
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "FinalizerError".into(),
            },
            Error::Injection { reason, .. } => (*reason).to_owned(),
        }
    }
}

/// How many injections run at once: each uploads the agent and runs a few execs, which the
/// engine serves a handful at a time on a small machine; the rest wait their turn instead of
/// all slowing down together (200 at once took 30–39 s, and the first waited 8–28 s).
const INJECTIONS_AT_ONCE: u16 = 16;

/// Where the built-in agent binary comes from.
#[derive(Clone, Debug)]
pub struct AgentBinary {
    /// Path on this machine (reported in messages).
    pub path: PathBuf,
    /// Its bytes, or why they could not be read.
    pub contents: Result<Bytes, String>,
}

impl AgentBinary {
    /// Reads the agent binary once, at start-up; a missing file is reported on each injection
    /// rather than stopping the server.
    pub fn load(path: PathBuf) -> Self {
        let contents = std::fs::read(&path)
            .map(Bytes::from)
            .map_err(|e| format!("cannot read the agent binary {}: {e}", path.display()));
        AgentBinary { path, contents }
    }

    /// The default location: `previewd-agent` beside the running executable.
    pub fn default_path() -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("previewd-agent")))
            .unwrap_or_else(|| PathBuf::from("previewd-agent"))
    }
}

/// What every reconcile needs.
pub struct Context<R: ContainerRuntime> {
    /// Client of the API the objects live in.
    pub client: Client,
    /// The Docker engine, or why it is unavailable.
    pub docker: Result<R, String>,
    /// Pod targets, through the API server's pod exec (Kubernetes mode only).
    pub pods: Option<PodRuntime>,
    /// The built-in agent.
    pub agent: AgentBinary,
    /// Kubernetes Events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Failure backoff per object.
    pub backoff: backoff::Backoff,
    /// Port the built-in agent listens on inside containers (0: a free one, chosen by the kernel).
    pub agent_port: u16,
    /// How preview links are addressed.
    pub links: link::LinkConfig,
    /// Where user-named daemons may be read from.
    pub daemon_sources: DaemonSourcePolicy,
    /// Reports objects that do not decode (they are left alone).
    pub undecodable: Undecodable,
    /// Which links use each shared injection.
    pub users: users::Users,
    /// Whether links to loopback ports may connect from inside a container's network
    /// namespace (asked for, and previewd has the privilege): injections then record the
    /// namespace for them.
    pub enter_netns: bool,
    /// Whether agents of Docker containers run a handoff helper as previewd's user, and
    /// injections record it for links (only where namespaces cannot be entered).
    pub socket_handoff: bool,
}

/// How the controllers are run.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// The built-in agent binary's path.
    pub agent_binary: PathBuf,
    /// Port the built-in agent listens on inside containers (0: a free one, chosen by the kernel).
    pub agent_port: u16,
    /// Reconcile objects of this namespace only (`None`: all namespaces).
    pub namespace: Option<String>,
    /// Serve pod targets through the API server's pod exec (a real API server has pods; the
    /// embedded one does not).
    pub pod_targets: bool,
    /// Where user-named daemons may be read from.
    pub daemon_sources: DaemonSourcePolicy,
    /// Let links to loopback ports connect from inside containers' network namespaces when
    /// previewd may enter them, instead of through the agent's relay.
    pub enter_netns: bool,
    /// Otherwise, let them get sockets the agent connected and handed over (see
    /// [`crate::agent::handoff`]), when previewd runs beside the engine.
    pub socket_handoff: bool,
}

/// Connects to Docker (when reachable) and runs the controllers until
/// `shutdown` resolves. Links are reconciled from `link_cache`, the process's one cache of
/// them (the proxy's).
pub async fn run(
    client: Client,
    config: ControllerConfig,
    (links, link_cache): (link::LinkConfig, SharedCache<PreviewLink>),
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let docker = match DockerRuntime::connect().await {
        Ok(d) => Ok(d),
        Err(e) => {
            tracing::warn!(error = %e, "Docker is unavailable: Docker targets will report DockerUnavailable");
            Err(e.to_string())
        }
    };
    let enter_netns = config.enter_netns && may_enter_netns();
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "previewd".into(),
                instance: None,
            },
        ),
        client: client.clone(),
        docker,
        pods: config
            .pod_targets
            .then(|| PodRuntime::new(client.clone(), config.namespace.as_deref())),
        agent: {
            let agent = AgentBinary::load(config.agent_binary);
            if let Err(e) = &agent.contents {
                tracing::warn!(error = %e, "injections will fail until the agent binary exists (cargo build --bins builds it)");
            }
            agent
        },
        undecodable: Undecodable::new(metrics.clone()),
        users: users::Users::default(),
        metrics,
        backoff: backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(120)),
        agent_port: config.agent_port,
        links,
        daemon_sources: config.daemon_sources,
        enter_netns,
        socket_handoff: config.socket_handoff && !enter_netns,
    });
    run_with(ctx, config.namespace.as_deref(), link_cache, shutdown).await
}

/// Whether this process may enter network namespaces, said once in the log either way: it
/// decides whether links to loopback ports pass through the agent.
fn may_enter_netns() -> bool {
    let may = crate::runtime::netns::may_enter();
    if may {
        tracing::info!(
            "links to loopback ports connect inside their container's network namespace"
        );
    } else {
        tracing::info!(
            "previewd cannot enter network namespaces (that needs root on the Docker engine's host): links to loopback ports get sockets the agent connects and hands over (--socket-handoff), else go through the agent's relay"
        );
    }
    may
}

/// Runs the DaemonInjection and PreviewLink controllers with a given context until
/// `shutdown` resolves, over one namespace or all.
pub async fn run_with<R: ContainerRuntime + Clone>(
    ctx: Arc<Context<R>>,
    namespace: Option<&str>,
    link_cache: SharedCache<PreviewLink>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = shutdown.shared();
    // Objects are read guarded: one that does not decode is skipped, not the whole watch.
    let injections: Api<DeserializeGuard<DaemonInjection>> =
        scoped_api(ctx.client.clone(), namespace);
    // Container lifecycle events re-check every injection (there are few per machine).
    let docker_events = match &ctx.docker {
        Ok(d) => d.events().boxed(),
        Err(_) => futures::stream::pending().boxed(),
    };
    let pod_events = match &ctx.pods {
        Some(p) => p.events().boxed(),
        None => futures::stream::pending().boxed(),
    };
    let triggers = futures::stream::select(docker_events, pod_events)
        .map(|ev| tracing::debug!(container = %ev.name, action = %ev.action, "container event"));
    let injection_controller = Controller::new(injections.clone(), watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(INJECTIONS_AT_ONCE))
        .reconcile_all_on(triggers)
        .graceful_shutdown_on(shutdown.clone())
        .run(
            |o, c| decoded(o, c, "DaemonInjection", injection::reconcile),
            |o, e, c| policy_decoded(o, e, c, injection::error_policy),
            ctx.clone(),
        )
        .for_each(report);
    // Links follow their shared injection (the links that use it, as the index knows them),
    // and their token Secret: one deleted (a rotation) gets a new token at once.
    let secrets: Api<DeserializeGuard<k8s_openapi::api::core::v1::Secret>> =
        scoped_api(ctx.client.clone(), namespace);
    // Links are many: the controller reads the proxy's cache of them (objects that do not
    // decode were reported and left out there) instead of keeping one of its own.
    let link_controller = Controller::for_stream(link_cache.triggers(), link_cache.store().clone());
    ctx.users.attach(link_cache.clone());
    let users = ctx.clone();
    let link_controller = link_controller
        .watches(injections, watcher::Config::default(), move |di| {
            let meta = kube::Resource::meta(&di);
            users.users.of(
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default(),
            )
        })
        .owns(
            secrets,
            watcher::Config::default().labels(&format!("{}=previewd", shared::MANAGED_BY)),
        )
        .graceful_shutdown_on(shutdown)
        .run(link::reconcile, link::error_policy, ctx)
        .for_each(report);
    futures::join!(injection_controller, link_controller);
}

/// Runs `reconcile` on an object that decoded; one that does not is reported (once per
/// version) and left alone until it changes.
async fn decoded<K, R, F, Fut>(
    obj: Arc<DeserializeGuard<K>>,
    ctx: Arc<Context<R>>,
    kind: &'static str,
    reconcile: F,
) -> Result<Action, Error>
where
    K: Clone,
    R: ContainerRuntime,
    F: FnOnce(Arc<K>, Arc<Context<R>>) -> Fut,
    Fut: Future<Output = Result<Action, Error>>,
{
    match &obj.0 {
        Ok(k) => reconcile(Arc::new(k.clone()), ctx).await,
        Err(invalid) => {
            ctx.undecodable.report(kind, invalid);
            Ok(Action::await_change())
        }
    }
}

/// The error policy of a decoded object (only those are reconciled, so only they fail).
fn policy_decoded<K: Clone, R: ContainerRuntime>(
    obj: Arc<DeserializeGuard<K>>,
    err: &Error,
    ctx: Arc<Context<R>>,
    policy: fn(Arc<K>, &Error, Arc<Context<R>>) -> Action,
) -> Action {
    match &obj.0 {
        Ok(k) => policy(Arc::new(k.clone()), err, ctx),
        Err(_) => Action::await_change(),
    }
}

async fn report<T, E: std::fmt::Display + std::fmt::Debug + 'static>(
    res: Result<T, kube::runtime::controller::Error<E, kube::runtime::watcher::Error>>,
) {
    use kube::runtime::controller::Error as ControllerError;
    match res {
        // Already reported by the error policy.
        Err(ControllerError::ReconcilerFailed(..)) | Ok(_) => {}
        // Asked to reconcile an object that was deleted meanwhile: nothing is owed.
        Err(ControllerError::ObjectNotFound(obj)) => {
            tracing::debug!(object = %obj, "an object to reconcile is gone");
        }
        Err(e) => tracing::warn!(error = %e, "controller error"),
    }
}

//! The DaemonInjection reconciler: keeps a daemon running in the target container.
//!
//! Steps, Stackable-style: dereference the target (the runtime resolves it) → decide (an
//! [`Outcome`], from what was observed) → apply (upload, verify, start, health-check) →
//! update status ([`status_for`], pure, written only when it changed). A finalizer stops the
//! daemon and removes its files before the object goes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use tracing::instrument;

use super::daemon_health::{self, DAEMON_EXITED, DaemonHealth, Judgement};
use super::shared;
use super::{Context, Error};
use crate::agent::client as agent;
use crate::agent::protocol::{DAEMON_STATE_DIR, DaemonStatus, INSTALL_DIR, SECRET_ENV};
use crate::agent::supervise::STARTED_PREFIX;
use crate::resources::conditions::{self, READY};
use crate::resources::daemon_injection::{
    DaemonPhase, DaemonSource, DaemonSpec, ListeningSocket, NetworkNamespace, Probe,
};
use crate::resources::daemon_source::DaemonSourcePolicy;
use crate::resources::{DaemonInjection, DaemonInjectionStatus, Target};
use crate::runtime::netns;
use crate::runtime::pod::PodTarget;
use crate::runtime::{ContainerInfo, ContainerRuntime, ExecSpec, FileUpload, RuntimeError};

/// Finalizer that guarantees cleanup in the container before the object goes.
pub const FINALIZER: &str = "previewd.dev/daemon-cleanup";
const CONTROLLER: &str = "daemoninjection";
/// The agent prints this (then its address) once it listens.
const READY_PREFIX: &str = "listening on ";
/// Key of the agent secret in its Secret object.
pub const SECRET_KEY: &str = "secret";
/// How often a Running injection is health-checked when nothing else happens.
const HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// How often an injection with a user daemon is re-checked: such a daemon can exit at any
/// time (the agent's own health says nothing about it), and its supervisor restarts it
/// after 1 s at first, so this bounds how long a dead daemon is reported Running and a
/// restarted one Failed, for one exec per check.
const DAEMON_RECHECK: Duration = Duration::from_secs(10);

/// Where one injection's files live inside the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The injection's own directory.
    pub dir: String,
}

impl Layout {
    /// `/.previewd/{namespace}.{name}`: one directory per injection, so several can share a
    /// container and each can be removed alone.
    pub fn for_object(namespace: &str, name: &str) -> Self {
        Layout {
            dir: format!("{INSTALL_DIR}/{namespace}.{name}"),
        }
    }

    /// The agent binary.
    pub fn agent(&self) -> String {
        format!("{}/previewd-agent", self.dir)
    }

    /// The agent's handoff helper's directory (its socket is in it).
    pub fn handoff_dir(&self) -> String {
        format!("{}/handoff", self.dir)
    }

    /// Where a user daemon's supervisor keeps its state and output.
    pub fn daemon_state(&self) -> String {
        format!("{}/{DAEMON_STATE_DIR}", self.dir)
    }
}

/// What one reconcile found and did, before it is written to status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The daemon serves.
    Running {
        /// Full container id.
        container_id: String,
        /// Where the proxy reaches the agent (`ip:port`, or `exec`).
        endpoint: String,
        /// The agent's reported version.
        version: String,
        /// Whether it was (re-)injected now rather than found running.
        injected: bool,
        /// The container's main process on the engine's host, if the engine said.
        pid: Option<u32>,
    },
    /// The agent serves, but the user daemon beside it exited (its supervisor restarts it):
    /// phase Failed, with the agent's fields kept so the next check adopts it.
    DaemonExited {
        /// Full container id.
        container_id: String,
        /// Where the agent is reached.
        endpoint: String,
        /// The agent's reported version.
        version: String,
        /// Whether it was (re-)injected now rather than found running.
        injected: bool,
        /// How the daemon exited and what it printed.
        message: String,
    },
    /// Waiting for the container (e.g. stopped): not an error.
    Waiting {
        /// Condition reason.
        reason: &'static str,
        /// For people.
        message: String,
    },
    /// Injection failed; retried with backoff.
    Failed {
        /// Condition reason.
        reason: &'static str,
        /// For people.
        message: String,
    },
}

impl Outcome {
    fn failed(reason: &'static str, message: impl Into<String>) -> Self {
        Outcome::Failed {
            reason,
            message: message.into(),
        }
    }

    fn from_runtime(e: RuntimeError) -> Self {
        let message = e.to_string();
        match e {
            RuntimeError::ContainerNotFound(_) | RuntimeError::ContainerRemoved { .. } => {
                Outcome::failed("ContainerNotFound", message)
            }
            RuntimeError::ContainerNotRunning { .. } => Outcome::Waiting {
                reason: "ContainerNotRunning",
                message,
            },
            RuntimeError::ReadOnlyRootfs(_) => Outcome::failed("ReadOnlyRootfs", message),
            RuntimeError::NoInjectionMethod { .. } => Outcome::failed("NoInjectionMethod", message),
            RuntimeError::InvalidTarget(_) | RuntimeError::AmbiguousContainer(_) => {
                Outcome::failed("InvalidTarget", message)
            }
            RuntimeError::Unavailable(_) => Outcome::failed("DockerUnavailable", message),
            RuntimeError::Engine { .. } | RuntimeError::Timeout(_) => {
                Outcome::failed("ExecFailed", message)
            }
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Outcome::Running { .. } => "DaemonRunning",
            Outcome::DaemonExited { .. } => DAEMON_EXITED,
            Outcome::Waiting { reason, .. } | Outcome::Failed { reason, .. } => reason,
        }
    }
}

/// The status an outcome means, given the previous status. Pure: no clock but `now`.
pub fn status_for(obj: &DaemonInjection, outcome: &Outcome, now: Time) -> DaemonInjectionStatus {
    let mut st = obj.status.clone().unwrap_or_default();
    let generation = obj.metadata.generation;
    st.observed_generation = generation;
    st.target = Some(obj.spec.target.display_name());
    let mut agent_serves = |container_id: &str, endpoint: &str, version: &str, injected| {
        if injected {
            if st.injected_at.is_some() {
                st.restarts = Some(st.restarts.unwrap_or(0) + 1);
            }
            st.injected_at = Some(now.clone());
        }
        st.container_id = Some(container_id.to_owned());
        st.endpoint = Some(endpoint.to_owned());
        st.daemon_version = Some(version.to_owned());
    };
    let (phase, ready, message) = match outcome {
        Outcome::Running {
            container_id,
            endpoint,
            version,
            injected,
            pid,
        } => {
            agent_serves(container_id, endpoint, version, *injected);
            // A namespace recorded for another process (the container restarted) is not
            // this one's, even before the agent is asked again.
            if st.network_namespace.is_some_and(|ns| Some(ns.pid) != *pid) {
                st.network_namespace = None;
            }
            if *injected {
                // A new agent has a new helper.
                st.socket_handoff = None;
            }
            (
                DaemonPhase::Running,
                true,
                format!("previewd-agent {version} serves at {endpoint}"),
            )
        }
        Outcome::DaemonExited {
            container_id,
            endpoint,
            version,
            injected,
            message,
        } => {
            agent_serves(container_id, endpoint, version, *injected);
            (DaemonPhase::Failed, false, message.clone())
        }
        Outcome::Waiting { message, .. } => {
            st.endpoint = None;
            st.network_namespace = None;
            st.socket_handoff = None;
            (DaemonPhase::Pending, false, message.clone())
        }
        Outcome::Failed { message, .. } => {
            st.endpoint = None;
            st.network_namespace = None;
            st.socket_handoff = None;
            (DaemonPhase::Failed, false, message.clone())
        }
    };
    st.phase = Some(phase);
    let mut cond = conditions::condition(READY, ready, outcome.reason(), message, generation);
    cond.last_transition_time = now;
    conditions::set_condition(&mut st.conditions, cond);
    st
}

/// Entry point for the controller.
#[instrument(skip(obj, ctx), fields(namespace = obj.namespace().unwrap_or_default(), name = obj.name_any()))]
pub async fn reconcile<R: ContainerRuntime>(
    obj: Arc<DaemonInjection>,
    ctx: Arc<Context<R>>,
) -> Result<Action, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let api: Api<DaemonInjection> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(o) => apply(o, &ctx).await,
            Finalizer::Cleanup(o) => cleanup(o, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Retries failures with per-object exponential backoff.
pub fn error_policy<R: ContainerRuntime>(
    obj: Arc<DaemonInjection>,
    err: &Error,
    ctx: Arc<Context<R>>,
) -> Action {
    shared::back_off(CONTROLLER, obj.as_ref(), err, &ctx)
}

async fn apply<R: ContainerRuntime>(
    obj: Arc<DaemonInjection>,
    ctx: &Context<R>,
) -> Result<Action, Error> {
    let started = Instant::now();
    // Injecting stops and starts processes: decide on the latest status, not on a cache that
    // may not have seen our own last write yet (that would inject twice).
    let api: Api<DaemonInjection> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let obj = match api.get_opt(&obj.name_any()).await.map_err(Error::Kube)? {
        // Being deleted meanwhile: the cleanup that follows is what is owed now.
        Some(fresh) if fresh.metadata.deletion_timestamp.is_none() => Arc::new(fresh),
        _ => return Ok(Action::await_change()),
    };
    let outcome = observe_and_inject(&obj, ctx).await?;
    if matches!(outcome, Outcome::Running { injected: true, .. }) {
        let took = started.elapsed();
        ctx.metrics.injected(took);
        if took > SLOW_INJECTION {
            // Links wait on it, and nothing failed: say where the time went.
            tracing::info!(injection = %obj.name_any(), took = ?took, "injecting was slow: the container runtime answered slowly");
        }
    }
    let mut status = status_for(&obj, &outcome, Time(k8s_openapi::jiff::Timestamp::now()));
    let used = !ctx
        .users
        .of(&obj.namespace().unwrap_or_default(), &obj.name_any())
        .is_empty();
    if let Outcome::Running {
        endpoint,
        container_id,
        pid,
        ..
    } = &outcome
        && obj.spec.daemon.is_none()
        && let Some(answer) = listening(ctx, &obj, endpoint, container_id).await
    {
        status.ports = answer.ports;
        status.network_namespace = ctx
            .enter_netns
            .then(|| enterable(*pid, answer.agent_namespace))
            .flatten();
        status.socket_handoff = match (answer.handoff_pid, answer.agent_namespace) {
            (Some(helper), Some(inode)) if status.network_namespace.is_none() => {
                let hint = status.socket_handoff.map(|h| h.pid);
                netns::host_pid_of(helper, inode, hint).map(|pid| NetworkNamespace { pid, inode })
            }
            _ => None,
        };
    }
    write_status(ctx, &obj, status).await?;
    announce(ctx, &obj, &outcome).await;
    let has_user_daemon = obj.spec.daemon.as_ref().is_some_and(|d| d.source.is_some());
    match outcome {
        Outcome::Running { .. } => {
            ctx.backoff.reset(&obj.uid().unwrap_or_default());
            Ok(Action::requeue(if has_user_daemon {
                DAEMON_RECHECK
            } else if used {
                // Links follow how their ports are bound.
                PORTS_RECHECK
            } else {
                HEALTH_INTERVAL
            }))
        }
        // Not an injection failure to back off from: the supervisor restarts the daemon, and
        // a recheck sees it come back.
        Outcome::DaemonExited { .. } => {
            ctx.metrics.failed(CONTROLLER, DAEMON_EXITED);
            ctx.backoff.reset(&obj.uid().unwrap_or_default());
            Ok(Action::requeue(DAEMON_RECHECK))
        }
        Outcome::Waiting { .. } => Ok(Action::requeue(HEALTH_INTERVAL)),
        Outcome::Failed { reason, message } => Err(Error::Injection { reason, message }),
    }
}

/// Publishes a Kubernetes Event when the Ready reason changes.
async fn announce<R: ContainerRuntime>(ctx: &Context<R>, obj: &DaemonInjection, outcome: &Outcome) {
    let previous = obj
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, READY))
        .map(|c| c.reason.clone());
    let injected = matches!(outcome, Outcome::Running { injected: true, .. });
    if previous.as_deref() == Some(outcome.reason()) && !injected {
        return;
    }
    let (type_, note) = match outcome {
        Outcome::Running { endpoint, .. } => {
            (EventType::Normal, format!("daemon running at {endpoint}"))
        }
        Outcome::Waiting { message, .. } => (EventType::Normal, message.clone()),
        Outcome::Failed { message, .. } | Outcome::DaemonExited { message, .. } => {
            (EventType::Warning, message.clone())
        }
    };
    let ev = Event {
        type_,
        reason: outcome.reason().into(),
        note: Some(note),
        action: "Inject".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}

async fn write_status<R: ContainerRuntime>(
    ctx: &Context<R>,
    obj: &DaemonInjection,
    status: DaemonInjectionStatus,
) -> Result<(), Error> {
    shared::write_status(&ctx.client, obj, obj.status.as_ref(), &status).await
}

/// The agent's secret, kept in a Secret next to the object (created on first use).
async fn agent_secret<R: ContainerRuntime>(
    ctx: &Context<R>,
    obj: &DaemonInjection,
) -> Result<String, Error> {
    shared::secret_value(
        &ctx.client,
        obj,
        &agent_secret_name(&obj.name_any()),
        SECRET_KEY,
        || {
            use rand::Rng;
            let bytes: [u8; 32] = rand::rng().random();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        },
    )
    .await
}

/// An injection slower than this is logged: the runtime (uploads, execs) was slow.
const SLOW_INJECTION: Duration = Duration::from_secs(10);

/// How often the listening sockets of an injection links use are read again.
const PORTS_RECHECK: Duration = Duration::from_secs(10);

/// What the agent says of its container's network: the sockets listening there, and the
/// inode of the namespace (if it could read it).
struct Listening {
    ports: Vec<ListeningSocket>,
    agent_namespace: Option<u64>,
    /// The agent's handoff helper's pid in the container, while it runs.
    handoff_pid: Option<u32>,
}

/// The container's network namespace, for links to enter: when host pid `pid` is in the
/// namespace the agent reported as its own (so previewd shares the engine's host and pid
/// namespace), and that is not previewd's own (a host-network container's agent is on
/// loopback already).
fn enterable(pid: Option<u32>, agent_namespace: Option<u64>) -> Option<NetworkNamespace> {
    let (pid, inode) = (pid?, agent_namespace?);
    netns::in_container_namespace(pid, inode)
        .is_ok()
        .then_some(NetworkNamespace { pid, inode })
}

/// The sockets listening in the container, as the agent at `endpoint` (`ip:port`, or `exec`)
/// reads them, sorted; `None` when it cannot say now (the previous reading then stays).
async fn listening<R: ContainerRuntime>(
    ctx: &Context<R>,
    obj: &DaemonInjection,
    endpoint: &str,
    container_id: &str,
) -> Option<Listening> {
    let secret = agent_secret(ctx, obj).await.ok()?;
    let ask = async {
        if endpoint == "exec" {
            let docker = ctx.docker.as_ref().ok()?;
            let layout = Layout::for_object(&obj.namespace().unwrap_or_default(), &obj.name_any());
            let spec = ExecSpec {
                argv: vec![layout.agent(), "stdio".into()],
                env: vec![format!("{SECRET_ENV}={secret}")],
                user: None,
            };
            let mut stdio = docker.exec_stdio(container_id, &spec).await.ok()?;
            agent::ports(&mut stdio, &secret).await.ok()
        } else {
            let mut stream = tokio::net::TcpStream::connect(endpoint).await.ok()?;
            agent::ports(&mut stream, &secret).await.ok()
        }
    };
    let answer = tokio::time::timeout(HEALTH_TIMEOUT, ask).await.ok()??;
    let mut ports: Vec<_> = answer
        .ports
        .into_iter()
        .map(|p| ListeningSocket {
            address: p.address.to_string(),
            port: i32::from(p.port),
        })
        .collect();
    ports.sort_by(|a, b| (a.port, &a.address).cmp(&(b.port, &b.address)));
    ports.dedup();
    Some(Listening {
        ports,
        agent_namespace: answer.network_namespace,
        handoff_pid: answer.handoff_pid,
    })
}

/// Name of the Secret holding an injection's agent secret (the proxy and the REST shim read
/// it to talk to the agent).
pub fn agent_secret_name(injection: &str) -> String {
    format!("previewd-agent-{injection}")
}

async fn observe_and_inject<R: ContainerRuntime>(
    obj: &DaemonInjection,
    ctx: &Context<R>,
) -> Result<Outcome, Error> {
    match (&obj.spec.target, &ctx.docker, &ctx.pods) {
        (Target::Docker(d), Ok(docker), _) => {
            observe_and_inject_on(obj, ctx, docker, d.container.clone()).await
        }
        (Target::Docker(_), Err(e), _) => Ok(Outcome::failed(
            "DockerUnavailable",
            format!("the Docker engine is unavailable: {e}"),
        )),
        (Target::Pod(p), _, Some(pods)) => {
            observe_and_inject_on(obj, ctx, pods, pod_target(obj, p)).await
        }
        (Target::Pod(_), _, None) => Ok(Outcome::failed(
            "UnsupportedTarget",
            "pod targets are served when previewd runs in Kubernetes mode (--store kube)",
        )),
    }
}

/// A pod target in the runtime's `NAMESPACE/POD[/CONTAINER]` form, in the object's namespace.
pub fn pod_target(obj: &DaemonInjection, p: &crate::resources::target::PodTarget) -> String {
    PodTarget::new(
        &obj.namespace().unwrap_or_default(),
        &p.name,
        p.container.as_deref(),
    )
    .to_string()
}

async fn observe_and_inject_on<R: ContainerRuntime, T: ContainerRuntime>(
    obj: &DaemonInjection,
    ctx: &Context<R>,
    docker: &T,
    container: String,
) -> Result<Outcome, Error> {
    let info = match docker.resolve(&container).await {
        Ok(info) => info,
        Err(e) => return Ok(Outcome::from_runtime(e)),
    };
    if !info.running {
        return Ok(Outcome::Waiting {
            reason: "ContainerNotRunning",
            message: format!(
                "container {} is {}; the daemon is injected when it starts",
                info.name, info.state
            ),
        });
    }
    if info.read_only_rootfs {
        return Ok(Outcome::from_runtime(RuntimeError::ReadOnlyRootfs(
            info.name.clone(),
        )));
    }
    let secret = agent_secret(ctx, obj).await?;
    let outcome = inject(obj, ctx, docker, &info, &secret).await;
    // A step failed: if the container went away or stopped meanwhile, say that instead.
    if let Outcome::Failed { .. } = outcome {
        match docker.resolve(&container).await {
            Err(e) if e.is_gone() => return Ok(Outcome::from_runtime(e)),
            Ok(now) if now.id != info.id || !now.running => {
                return Ok(Outcome::Waiting {
                    reason: "ContainerNotRunning",
                    message: format!(
                        "container {} stopped or was replaced during injection; retrying",
                        now.name
                    ),
                });
            }
            _ => {}
        }
    }
    Ok(outcome)
}

/// A user-named daemon to run beside the agent: its spec and where it is installed.
struct UserDaemon<'a> {
    spec: &'a DaemonSpec,
    host_path: &'a str,
    install_path: String,
}

impl UserDaemon<'_> {
    /// The port its readiness is checked on, and how.
    fn probe(&self) -> Option<(u16, Option<&str>)> {
        let port = |p: Option<i32>| p.or(self.spec.port).and_then(|p| u16::try_from(p).ok());
        match &self.spec.readiness_probe {
            Some(Probe::Http(h)) => port(h.port).map(|p| (p, Some(h.path.as_str()))),
            Some(Probe::Tcp(t)) => port(t.port).map(|p| (p, None)),
            None => port(None).map(|p| (p, None)),
        }
    }
}

fn user_daemon<'a>(obj: &'a DaemonInjection, layout: &Layout) -> Option<UserDaemon<'a>> {
    let spec = obj.spec.daemon.as_ref()?;
    let Some(DaemonSource::HostPath(host_path)) = &spec.source else {
        return None;
    };
    let install_path = spec
        .install_path
        .clone()
        .unwrap_or_else(|| format!("{}/daemon", layout.dir));
    Some(UserDaemon {
        spec,
        host_path,
        install_path,
    })
}

/// Uploads, verifies, starts and health-checks the agent (and the user-named daemon, if any)
/// in a running container, or adopts what already runs there.
async fn inject<R: ContainerRuntime, T: ContainerRuntime>(
    obj: &DaemonInjection,
    ctx: &Context<R>,
    rt: &T,
    info: &ContainerInfo,
    secret: &str,
) -> Outcome {
    let layout = Layout::for_object(&obj.namespace().unwrap_or_default(), &obj.name_any());
    let ip = info.ips.first().copied();
    let daemon = user_daemon(obj, &layout);
    let running = |endpoint: String, version: String, injected: bool| Outcome::Running {
        container_id: info.id.clone(),
        endpoint,
        version,
        injected,
        pid: info.pid,
    };
    let exited =
        |endpoint: String, version: String, injected: bool, message| Outcome::DaemonExited {
            container_id: info.id.clone(),
            endpoint,
            version,
            injected,
            message,
        };
    // Without a user daemon, spec.daemon.user is the agent's user.
    let agent_user = match &daemon {
        None => obj.spec.daemon.as_ref().and_then(|d| d.user.clone()),
        Some(_) => None,
    };

    // Adopt a healthy agent of this version already running in this container (e.g. after a
    // previewd restart) instead of starting a second one.
    let same_container =
        obj.status.as_ref().and_then(|s| s.container_id.as_deref()) == Some(info.id.as_str());
    let previous = obj
        .status
        .as_ref()
        .and_then(|s| s.endpoint.as_deref())
        .and_then(|e| e.parse::<SocketAddr>().ok());
    if let (Some(ep), true) = (previous.filter(|p| Some(p.ip()) == ip), same_container) {
        match health_tcp_patiently(ep, secret, true).await {
            Ok(h) if h.version == env!("CARGO_PKG_VERSION") => {
                match adopt_daemon(rt, info, &layout, daemon.as_ref(), Some(ep), secret).await {
                    Adoption::Running => return running(ep.to_string(), h.version, false),
                    Adoption::Exited(message) => {
                        return exited(ep.to_string(), h.version, false, message);
                    }
                    Adoption::Reinject(why) => tracing::info!(%why, "injecting again"),
                }
            }
            Ok(h) => tracing::info!(found = %h.version, "replacing an agent of another version"),
            Err(e) => {
                tracing::info!(endpoint = %ep, error = %e, "no healthy agent to adopt; injecting")
            }
        }
    }

    // An agent reached through exec runs no daemon: if the installed binary still answers
    // over stdio (and a user daemon's supervisor still runs), there is nothing to (re)do —
    // and re-injecting would stop live tunnels.
    let was_exec = obj.status.as_ref().and_then(|s| s.endpoint.as_deref()) == Some("exec");
    if same_container && was_exec && ip.is_none() {
        let spec = ExecSpec {
            argv: vec![layout.agent(), "stdio".into()],
            env: vec![format!("{SECRET_ENV}={secret}")],
            user: agent_user.clone(),
        };
        if let Ok(mut stdio) = rt.exec_stdio(&info.handle, &spec).await
            && let Ok(Ok(h)) =
                tokio::time::timeout(HEALTH_TIMEOUT, agent::health(&mut stdio, secret)).await
            && h.version == env!("CARGO_PKG_VERSION")
        {
            match adopt_daemon(rt, info, &layout, daemon.as_ref(), None, secret).await {
                Adoption::Running => return running("exec".into(), h.version, false),
                Adoption::Exited(message) => {
                    return exited("exec".into(), h.version, false, message);
                }
                Adoption::Reinject(why) => tracing::info!(%why, "injecting again"),
            }
        }
    }

    let binary = match &ctx.agent.contents {
        Ok(b) => b.clone(),
        Err(e) => return Outcome::failed("AgentBinaryMissing", e.clone()),
    };
    let mut upload = vec![FileUpload {
        path: layout.agent(),
        contents: binary,
        mode: 0o755,
    }];
    if let Some(d) = &daemon {
        match read_host_binary(&ctx.daemon_sources, d.host_path).await {
            Ok(contents) => upload.push(FileUpload {
                path: d.install_path.clone(),
                contents,
                mode: 0o755,
            }),
            Err(e) => return Outcome::failed("DaemonSourceRefused", e),
        }
    }
    if let Err(e) = rt.upload(&info.handle, &upload).await {
        return Outcome::from_runtime(e);
    }
    let as_agent = |argv: Vec<String>| ExecSpec {
        argv,
        env: vec![format!("{SECRET_ENV}={secret}")],
        user: agent_user.clone(),
    };
    // Replace, never duplicate: whatever this injection left running goes first. An agent
    // alone that listens on TCP as the container's user does it itself as it starts
    // (`serve --replace`: what it replaces ran as that same user), saving the engine an exec
    // per injection; otherwise a separate `stop` runs as root (a user daemon, or an agent
    // given a user, may run as another user than before) and gives a user daemon's
    // supervisor an empty state directory it can write.
    let replace_on_start = daemon.is_none() && agent_user.is_none() && ip.is_some();
    if !replace_on_start {
        let mut stop = vec![layout.agent(), "stop".into()];
        if daemon.is_some() {
            stop.extend(["--reset-dir".into(), layout.daemon_state()]);
        }
        if let Err(e) = rt.exec(&info.handle, &as_root(stop)).await {
            tracing::debug!(error = %e, "stopping a previous agent failed");
        }
    }
    let agent = match ip {
        None => {
            // No routable address (network none, …): the agent is reached through exec stdio.
            let mut stdio = match rt
                .exec_stdio(
                    &info.handle,
                    &as_agent(vec![layout.agent(), "stdio".into()]),
                )
                .await
            {
                Ok(s) => s,
                Err(e) => return Outcome::from_runtime(e),
            };
            match tokio::time::timeout(HEALTH_TIMEOUT, agent::health(&mut stdio, secret)).await {
                Ok(Ok(h)) => ("exec".to_owned(), h.version),
                Ok(Err(e)) => {
                    return Outcome::failed(
                        "DaemonUnhealthy",
                        format!("the agent does not answer over exec: {e}"),
                    );
                }
                Err(_) => {
                    return Outcome::failed(
                        "DaemonUnhealthy",
                        "the agent did not answer over exec in time",
                    );
                }
            }
        }
        Some(ip) => {
            // Port 0 (the default) lets the kernel pick a free port, so several injections
            // (and the app) share the container's network namespace without clashing. An
            // agent reached on loopback (a host-network container) listens there only, never
            // on the host's other interfaces.
            let listen = if ip.is_loopback() {
                SocketAddr::new(ip, ctx.agent_port)
            } else {
                SocketAddr::from(([0, 0, 0, 0], ctx.agent_port))
            };
            let mut argv = vec![
                layout.agent(),
                "serve".into(),
                "--listen".into(),
                listen.to_string(),
            ];
            if replace_on_start {
                argv.push("--replace".into());
            }
            if ctx.socket_handoff && matches!(obj.spec.target, Target::Docker(_)) {
                let (uid, gid) = netns::own_user();
                argv.extend([
                    "--handoff-dir".into(),
                    layout.handoff_dir(),
                    "--handoff-user".into(),
                    format!("{uid}:{gid}"),
                ]);
            }
            let line = match rt
                .exec_until_ready(&info.handle, &as_agent(argv), READY_PREFIX)
                .await
            {
                Ok(line) => line,
                Err(e) => {
                    return Outcome::failed(
                        "ExecFailed",
                        format!(
                            "the agent did not start: {e} — is {INSTALL_DIR} on a noexec or tmpfs mount, or the container another architecture?"
                        ),
                    );
                }
            };
            let Some(port) = line
                .strip_prefix(READY_PREFIX)
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                .map(|a| a.port())
            else {
                return Outcome::failed(
                    "ExecFailed",
                    format!("the agent announced an unreadable address: {line:?}"),
                );
            };
            let ep = SocketAddr::new(ip, port);
            match health_tcp_patiently(ep, secret, false).await {
                Ok(h) => (ep.to_string(), h.version),
                Err(e) => {
                    return Outcome::failed(
                        "DaemonUnhealthy",
                        format!("the agent started but does not answer at {ep}: {e}"),
                    );
                }
            }
        }
    };
    if let Some(d) = &daemon {
        let mut argv = vec![
            layout.agent(),
            "supervise".into(),
            "--state-dir".into(),
            layout.daemon_state(),
            "--".into(),
            d.install_path.clone(),
        ];
        argv.extend(d.spec.args.iter().cloned());
        let env = d
            .spec
            .env
            .iter()
            .map(|e| format!("{}={}", e.name, e.value))
            .collect();
        let spec = ExecSpec {
            argv,
            env,
            user: d.spec.user.clone(),
        };
        if let Err(e) = rt
            .exec_until_ready(&info.handle, &spec, STARTED_PREFIX)
            .await
        {
            return Outcome::failed(
                "ExecFailed",
                format!("the daemon {} did not start: {e}", d.install_path),
            );
        }
        let probed = match (d.probe(), agent.0.parse::<SocketAddr>().ok()) {
            (Some((port, path)), Some(ep)) => probe_patiently(ep, secret, port, path)
                .await
                .map_err(|e| format!("is not ready on port {port}: {e}")),
            _ => Ok(()),
        };
        // Ready or not, its supervisor knows whether it already exited.
        let status = match read_daemon_status(rt, &info.handle, &layout).await {
            Ok(status) => status,
            Err(e) => {
                return Outcome::failed(
                    "ExecFailed",
                    format!(
                        "the state of the daemon {} is unreadable: {e}",
                        d.install_path
                    ),
                );
            }
        };
        match daemon_health::judge(daemon_health::daemon_health(&status), probed) {
            Judgement::Ready => {}
            Judgement::Exited(now) => {
                let message = daemon_health::exited_message(&d.install_path, &status, &now);
                return exited(agent.0, agent.1, true, message);
            }
            Judgement::Unsupervised => {
                return Outcome::failed(
                    "ExecFailed",
                    format!("the supervisor of the daemon {} exited", d.install_path),
                );
            }
            Judgement::Unready(e) => {
                return Outcome::failed(
                    "DaemonUnhealthy",
                    format!("the daemon {} {e}", d.install_path),
                );
            }
        }
    }
    running(agent.0, agent.1, true)
}

/// What an adopted agent's user daemon needs.
enum Adoption {
    /// Nothing: it runs (and answers its probe), or there is none.
    Running,
    /// It exited and its supervisor restarts it: the status says how it ended.
    Exited(String),
    /// Its supervisor is gone (or unreadable, or the daemon never exited yet fails its
    /// probe): inject again.
    Reinject(String),
}

/// Checks the user daemon beside an adopted agent (probing it through the agent at `ep`
/// when it has a probe and the agent is reached over TCP).
async fn adopt_daemon<T: ContainerRuntime>(
    rt: &T,
    info: &ContainerInfo,
    layout: &Layout,
    daemon: Option<&UserDaemon<'_>>,
    ep: Option<SocketAddr>,
    secret: &str,
) -> Adoption {
    let Some(d) = daemon else {
        return Adoption::Running;
    };
    let status = match read_daemon_status(rt, &info.handle, layout).await {
        Ok(status) => status,
        Err(e) => return Adoption::Reinject(format!("the daemon's state is unreadable: {e}")),
    };
    let health = daemon_health::daemon_health(&status);
    // Probed only while it runs: a daemon that is down is reported as such.
    let probe = match (health, d.probe(), ep) {
        (DaemonHealth::Up { .. }, Some((port, path)), Some(ep)) => {
            probe_once(ep, secret, port, path)
                .await
                .map_err(|e| format!("is not ready on port {port}: {e}"))
        }
        _ => Ok(()),
    };
    match daemon_health::judge(health, probe) {
        Judgement::Ready => Adoption::Running,
        Judgement::Exited(now) => Adoption::Exited(daemon_health::exited_message(
            &d.install_path,
            &status,
            &now,
        )),
        Judgement::Unsupervised => {
            Adoption::Reinject("the daemon's supervisor is not running".into())
        }
        Judgement::Unready(e) => Adoption::Reinject(format!("the daemon {e}")),
    }
}

/// The user daemon's supervisor's report (`previewd-agent daemon-status`), run as root so
/// it can read the state whichever user the daemon runs as.
async fn read_daemon_status<T: ContainerRuntime>(
    rt: &T,
    handle: &str,
    layout: &Layout,
) -> Result<DaemonStatus, String> {
    let argv = vec![
        layout.agent(),
        "daemon-status".into(),
        "--dir".into(),
        layout.daemon_state(),
    ];
    match rt.exec(handle, &as_root(argv)).await {
        Ok(out) if out.exit_code == 0 => serde_json::from_str(out.stdout.trim())
            .map_err(|e| format!("daemon-status printed no status: {e}")),
        Ok(out) => Err(format!(
            "daemon-status exited with code {}: {}",
            out.exit_code,
            out.stderr.trim()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Reads a user daemon's binary from this machine, if the operator's policy allows that
/// file (checked again now: it may have changed since the object was admitted).
async fn read_host_binary(policy: &DaemonSourcePolicy, path: &str) -> Result<bytes::Bytes, String> {
    let (policy, path) = (policy.clone(), path.to_owned());
    tokio::task::spawn_blocking(move || policy.read(&path))
        .await
        .map_err(|e| format!("reading the daemon binary failed: {e}"))?
}

/// How long a user daemon gets to become ready.
const PROBE_PATIENCE: Duration = Duration::from_secs(20);

async fn probe_patiently(
    ep: SocketAddr,
    secret: &str,
    port: u16,
    path: Option<&str>,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + PROBE_PATIENCE;
    loop {
        let err = match probe_once(ep, secret, port, path).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(err);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One readiness check through the agent's tunnel (so daemons bound to 127.0.0.1 count):
/// the port accepts a connection, and for an HTTP probe `GET path` answers 2xx or 3xx.
async fn probe_once(
    ep: SocketAddr,
    secret: &str,
    port: u16,
    path: Option<&str>,
) -> Result<(), String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let check = async {
        let stream = tokio::net::TcpStream::connect(ep)
            .await
            .map_err(|e| e.to_string())?;
        let mut tunnel = agent::connect(stream, secret, port)
            .await
            .map_err(|e| e.to_string())?;
        let Some(path) = path else { return Ok(()) };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\nUser-Agent: previewd-probe\r\n\r\n"
        );
        tunnel
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        let mut head = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(tunnel, 1024));
        head.read_line(&mut line).await.map_err(|e| e.to_string())?;
        let code = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok());
        match code {
            Some(c) if (200..400).contains(&c) => Ok(()),
            _ => Err(format!("GET {path} answered {:?}", line.trim())),
        }
    };
    tokio::time::timeout(HEALTH_TIMEOUT, check)
        .await
        .map_err(|_| format!("no answer within {HEALTH_TIMEOUT:?}"))?
}

/// A command run as the container's root: stopping agents that may run as any user and
/// removing root-owned files. Only ever the root-owned agent binary previewd uploaded.
fn as_root(argv: Vec<String>) -> ExecSpec {
    ExecSpec {
        argv,
        env: Vec::new(),
        user: Some("0:0".into()),
    }
}

/// How long one health check may take in all (connect and answer).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(4);
/// How long previewd keeps asking before it gives an agent up, so a vanished container
/// cannot stall a reconcile.
const HEALTH_PATIENCE: Duration = Duration::from_secs(8);

/// Asks until the agent answers or [`HEALTH_PATIENCE`] runs out: a live agent is not replaced
/// because one answer was slow on a loaded machine, and a fresh one gets time to bind.
/// `give_up_when_refused` ends early when nothing listens (adoption: there is no agent).
async fn health_tcp_patiently(
    endpoint: SocketAddr,
    secret: &str,
    give_up_when_refused: bool,
) -> Result<crate::agent::Health, String> {
    let deadline = tokio::time::Instant::now() + HEALTH_PATIENCE;
    loop {
        let err = match health_tcp(endpoint, secret).await {
            Ok(h) => return Ok(h),
            Err(e) => e,
        };
        if (give_up_when_refused && err.contains("refused"))
            || tokio::time::Instant::now() + Duration::from_millis(150) >= deadline
        {
            return Err(err);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

async fn health_tcp(endpoint: SocketAddr, secret: &str) -> Result<crate::agent::Health, String> {
    let check = async {
        let mut stream = tokio::net::TcpStream::connect(endpoint)
            .await
            .map_err(|e| e.to_string())?;
        agent::health(&mut stream, secret)
            .await
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(HEALTH_TIMEOUT, check)
        .await
        .map_err(|_| format!("no answer within {HEALTH_TIMEOUT:?}"))?
}

async fn cleanup<R: ContainerRuntime>(
    obj: Arc<DaemonInjection>,
    ctx: &Context<R>,
) -> Result<Action, Error> {
    let mut removing = obj.status.clone().unwrap_or_default();
    removing.phase = Some(DaemonPhase::Removing);
    removing.endpoint = None;
    write_status(ctx, &obj, removing).await?;
    match (&obj.spec.target, &ctx.docker, &ctx.pods) {
        (Target::Docker(d), Ok(docker), _) => stop_agent(&obj, ctx, docker, &d.container).await?,
        (Target::Pod(p), _, Some(pods)) => {
            let target = pod_target(&obj, p);
            stop_agent(&obj, ctx, pods, &target).await?;
        }
        _ => {}
    }
    shared::delete_secret(
        &ctx.client,
        &obj.namespace().unwrap_or_default(),
        &agent_secret_name(&obj.name_any()),
    )
    .await?;
    ctx.backoff.reset(&obj.uid().unwrap_or_default());
    Ok(Action::await_change())
}

/// Stops the agent (and any user daemon) in the target and removes their files; a stopped
/// container keeps them, and an Event says so.
async fn stop_agent<R: ContainerRuntime, T: ContainerRuntime>(
    obj: &DaemonInjection,
    ctx: &Context<R>,
    rt: &T,
    container: &str,
) -> Result<(), Error> {
    match rt.resolve(container).await {
        Ok(info) if info.running => {
            let layout = Layout::for_object(&obj.namespace().unwrap_or_default(), &obj.name_any());
            let mut argv = vec![
                layout.agent(),
                "stop".into(),
                "--remove-dir".into(),
                layout.dir.clone(),
            ];
            // A user daemon installed outside the injection's directory goes too.
            if let Some(d) = user_daemon(obj, &layout)
                .filter(|d| !d.install_path.starts_with(&format!("{}/", layout.dir)))
            {
                argv.extend(["--remove-file".into(), d.install_path]);
            }
            match rt.exec(&info.handle, &as_root(argv)).await {
                Ok(out) if out.exit_code == 0 => {}
                // 126/127: the agent binary is not there, so neither are its files.
                Ok(out) if out.exit_code == 126 || out.exit_code == 127 => {}
                Ok(out) => {
                    return Err(Error::Injection {
                        reason: "CleanupFailed",
                        message: format!(
                            "stopping the agent failed (exit code {}): {}{}",
                            out.exit_code,
                            out.stdout.trim(),
                            out.stderr.trim()
                        ),
                    });
                }
                Err(e) if e.is_gone() || matches!(e, RuntimeError::ContainerNotRunning { .. }) => {}
                Err(e) => {
                    return Err(Error::Injection {
                        reason: "CleanupFailed",
                        message: e.to_string(),
                    });
                }
            }
        }
        Ok(info) => {
            // Exec needs a running container; the files stay in its stopped filesystem.
            let note = format!(
                "container {} is {}: the agent files under {INSTALL_DIR} could not be removed",
                info.name, info.state
            );
            let ev = Event {
                type_: EventType::Warning,
                reason: "FilesLeftBehind".into(),
                note: Some(note),
                action: "Remove".into(),
                secondary: None,
            };
            let _ = ctx.recorder.publish(&ev, &obj.object_ref(&())).await;
        }
        Err(e) if e.is_gone() => {}
        Err(e) => {
            return Err(Error::Injection {
                reason: "CleanupFailed",
                message: e.to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::DaemonInjectionSpec;

    fn obj(status: Option<DaemonInjectionStatus>) -> DaemonInjection {
        let mut o =
            DaemonInjection::new("web-agent", DaemonInjectionSpec::new(Target::docker("web")));
        o.metadata.generation = Some(3);
        o.status = status;
        o
    }

    fn at(secs: i64) -> Time {
        Time(
            k8s_openapi::jiff::Timestamp::from_second(secs)
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        )
    }

    fn running(injected: bool) -> Outcome {
        Outcome::Running {
            container_id: "abc".into(),
            endpoint: "172.17.0.2:19876".into(),
            version: "0.1.0".into(),
            injected,
            pid: Some(4242),
        }
    }

    #[test]
    fn layout_is_per_injection_on_the_root_filesystem() {
        let l = Layout::for_object("default", "web-agent");
        assert_eq!(l.agent(), "/.previewd/default.web-agent/previewd-agent");
    }

    #[test]
    fn running_sets_endpoint_and_ready() {
        let st = status_for(&obj(None), &running(true), at(100));
        assert_eq!(st.phase, Some(DaemonPhase::Running));
        assert_eq!(st.endpoint.as_deref(), Some("172.17.0.2:19876"));
        assert_eq!(st.observed_generation, Some(3));
        assert_eq!(st.restarts, None, "a first injection is no restart");
        let ready = conditions::find(&st.conditions, READY)
            .map(|c| (c.status.clone(), c.reason.clone(), c.observed_generation));
        assert_eq!(
            ready,
            Some(("True".into(), "DaemonRunning".into(), Some(3)))
        );
        assert_eq!(st.target.as_deref(), Some("docker/web"));
    }

    #[test]
    fn an_unchanged_outcome_gives_an_identical_status() {
        let first = status_for(&obj(None), &running(true), at(100));
        let again = status_for(&obj(Some(first.clone())), &running(false), at(200));
        assert_eq!(first, again, "no write, no event, no reconcile loop");
    }

    #[test]
    fn reinjection_counts_a_restart_and_failure_clears_the_endpoint() {
        let first = status_for(&obj(None), &running(true), at(100));
        let mut again = status_for(&obj(Some(first.clone())), &running(true), at(200));
        assert_eq!(again.restarts, Some(1));
        again.network_namespace = Some(NetworkNamespace {
            pid: 4242,
            inode: 4026532289,
        });
        let gone = status_for(
            &obj(Some(again.clone())),
            &Outcome::failed("ContainerNotFound", "container \"web\" not found"),
            at(300),
        );
        assert_eq!(gone.phase, Some(DaemonPhase::Failed));
        assert_eq!(gone.endpoint, None);
        assert_eq!(gone.network_namespace, None, "its pid may be reused");
        let restarted = Outcome::Running {
            container_id: "abc".into(),
            endpoint: "172.17.0.2:19876".into(),
            version: "0.1.0".into(),
            injected: true,
            pid: Some(4343),
        };
        let mut recorded = first.clone();
        recorded.network_namespace = again.network_namespace;
        let same = status_for(&obj(Some(recorded.clone())), &running(false), at(300));
        assert_eq!(same.network_namespace, again.network_namespace);
        let moved = status_for(&obj(Some(recorded)), &restarted, at(300));
        assert_eq!(moved.network_namespace, None, "another process now");
        let ready = conditions::find(&gone.conditions, READY);
        assert_eq!(
            ready.map(|c| (
                c.status.as_str(),
                c.reason.as_str(),
                c.last_transition_time.0.as_second()
            )),
            Some(("False", "ContainerNotFound", 300))
        );
    }

    #[test]
    fn only_a_namespace_the_agent_confirmed_and_not_previewds_own_is_entered() {
        let me = std::process::id();
        let own = netns::own_inode();
        assert_eq!(enterable(Some(me), own), None, "previewd's own namespace");
        assert_eq!(enterable(Some(me), own.map(|i| i + 1)), None, "another one");
        assert_eq!(enterable(None, own.map(|i| i + 1)), None, "no pid");
        assert_eq!(enterable(Some(me), None), None, "an agent that did not say");
    }

    #[test]
    fn an_exited_user_daemon_fails_but_keeps_the_agent_to_adopt() {
        let first = status_for(&obj(None), &running(true), at(100));
        let down = Outcome::DaemonExited {
            container_id: "abc".into(),
            endpoint: "172.17.0.2:19876".into(),
            version: "0.1.0".into(),
            injected: false,
            message: "the daemon /d exited with exit code 3".into(),
        };
        let failed = status_for(&obj(Some(first.clone())), &down, at(200));
        assert_eq!(failed.phase, Some(DaemonPhase::Failed));
        assert_eq!(failed.endpoint.as_deref(), Some("172.17.0.2:19876"));
        assert_eq!(failed.injected_at, first.injected_at);
        assert_eq!(
            failed.restarts, None,
            "the supervisor restarts it, not previewd"
        );
        let ready = conditions::find(&failed.conditions, READY).map(|c| {
            (
                c.status.as_str(),
                c.reason.as_str(),
                c.message.as_str(),
                c.last_transition_time.0.as_second(),
            )
        });
        assert_eq!(
            ready,
            Some((
                "False",
                "DaemonExited",
                "the daemon /d exited with exit code 3",
                200
            ))
        );
        // Rechecks that find it still down change nothing.
        let again = status_for(&obj(Some(failed.clone())), &down, at(300));
        assert_eq!(again, failed);
        // Back up: Running again, as the same injection.
        let back = status_for(&obj(Some(failed)), &running(false), at(400));
        assert_eq!(back.phase, Some(DaemonPhase::Running));
        assert_eq!((back.injected_at, back.restarts), (first.injected_at, None));
        let ready = conditions::find(&back.conditions, READY)
            .map(|c| (c.reason.as_str(), c.last_transition_time.0.as_second()));
        assert_eq!(ready, Some(("DaemonRunning", 400)));
    }

    #[test]
    fn runtime_errors_map_to_reasons_users_can_act_on() {
        assert_eq!(
            Outcome::from_runtime(RuntimeError::ReadOnlyRootfs("web".into())).reason(),
            "ReadOnlyRootfs"
        );
        assert_eq!(
            Outcome::from_runtime(RuntimeError::ContainerNotFound("web".into())).reason(),
            "ContainerNotFound"
        );
        assert_eq!(
            Outcome::from_runtime(RuntimeError::Unavailable("socket".into())).reason(),
            "DockerUnavailable"
        );
        assert_eq!(
            Outcome::from_runtime(RuntimeError::NoInjectionMethod {
                container: "ns/web/app".into(),
                why: "the container has neither tar nor sh".into()
            })
            .reason(),
            "NoInjectionMethod"
        );
        assert!(matches!(
            Outcome::from_runtime(RuntimeError::ContainerNotRunning {
                container: "web".into(),
                state: "exited".into()
            }),
            Outcome::Waiting { .. }
        ));
    }
}

//! Pod targets through pod exec ([`PodRuntime`]) against a test double of the API server's
//! pod endpoints, which runs every exec for real in a Docker container.
//!
//! The double serves, on 127.0.0.1 for kube-rs's `Api::<Pod>::exec` to upgrade to:
//! - `GET /api/v1/namespaces/{ns}/pods/{pod}`: a Pod built from `docker inspect` of the
//!   container backing it (phase, `podIP`, `containerStatuses[].containerID` =
//!   `docker://<id>`, `securityContext.readOnlyRootFilesystem`), or a 404 `Status`;
//! - `GET /api/v1/pods` (list, and `watch=true`: events the test triggers), for the watcher;
//! - `GET /api/v1/namespaces/{ns}/pods/{pod}/exec`: a WebSocket speaking
//!   `v5.channel.k8s.io` and/or `v4.channel.k8s.io` (as configured), bridged to a Docker
//!   exec: channel 0 → the exec's stdin, its stdout/stderr → channels 1/2, the exit → a
//!   `metav1.Status` on channel 3 (`Success`; `Failure`/`NonZeroExitCode` with an `ExitCode`
//!   cause; `InternalError` when the runtime could not start the command, as containerd
//!   reports it), then a Close frame. v5's `[255, 0]` half-closes the exec's stdin. A client
//!   Close frame or a dropped connection (the only ending v4 has) closes the exec's stdin and
//!   ends the session without a status, as the kubelet does; the exec's output is drained
//!   so a detached daemon keeps running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bollard::Docker;
use bollard::exec::StartExecResults;
use bollard::models::{ExecConfig, HostConfig};
use futures::{SinkExt, StreamExt};
use http::StatusCode;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus,
    Pod, PodIP, PodSpec, PodStatus, SecurityContext,
};
use previewd::runtime::pod::{PodRuntime, PodTarget};
use previewd::runtime::{ContainerRuntime, ExecSpec, FileUpload, RuntimeError};
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::containers::{
    BUSYBOX_NOTAR_IMAGE, BUSYBOX_TAR_IMAGE, NOSHELL_IMAGE, TestContainer, docker, images,
    podexec_images,
};

const V5: &str = "v5.channel.k8s.io";
const V4: &str = "v4.channel.k8s.io";
const NS: &str = "team";
const APP: &str = "app";

/// One exec the double served.
#[derive(Clone, Debug)]
struct ExecRecord {
    /// The negotiated subprotocol.
    protocol: String,
    /// The command.
    argv: Vec<String>,
    /// Whether the client half-closed stdin with `[255, 0]`.
    stdin_closed: bool,
}

struct Fake {
    docker: Docker,
    protocols: Vec<&'static str>,
    /// (namespace, pod) → the Docker container backing its one container `app`.
    pods: Mutex<HashMap<(String, String), String>>,
    /// Containers whose spec says `readOnlyRootFilesystem: true`.
    read_only: Mutex<Vec<String>>,
    execs: Mutex<Vec<ExecRecord>>,
    watch: tokio::sync::broadcast::Sender<String>,
}

/// The double, serving on 127.0.0.1.
struct FakeApiServer {
    state: Arc<Fake>,
    client: kube::Client,
    /// `http://127.0.0.1:PORT`.
    url: String,
}

impl FakeApiServer {
    async fn start(docker: &Docker, protocols: &[&'static str]) -> FakeApiServer {
        FakeApiServer::start_with(docker, protocols, None).await
    }

    /// The double, also serving `rest` (e.g. the embedded API's routes for everything but
    /// pods): an API server with both previewd's objects and pods.
    async fn start_with(
        docker: &Docker,
        protocols: &[&'static str],
        rest: Option<axum::Router>,
    ) -> FakeApiServer {
        let state = Arc::new(Fake {
            docker: docker.clone(),
            protocols: protocols.to_vec(),
            pods: Mutex::new(HashMap::new()),
            read_only: Mutex::new(Vec::new()),
            execs: Mutex::new(Vec::new()),
            watch: tokio::sync::broadcast::channel(64).0,
        });
        let app = axum::Router::new()
            .route("/api/v1/namespaces/{ns}/pods", get(list_or_watch))
            .route("/api/v1/namespaces/{ns}/pods/{pod}", get(get_pod))
            .route("/api/v1/namespaces/{ns}/pods/{pod}/exec", get(exec))
            .with_state(state.clone());
        let app = match rest {
            Some(r) => app.merge(r),
            None => app,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local addr: {e}"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let url = format!("http://{addr}");
        let uri: http::Uri = url.parse().unwrap_or_else(|e| panic!("uri: {e}"));
        let client = kube::Client::try_from(kube::Config::new(uri))
            .unwrap_or_else(|e| panic!("kube client: {e}"));
        FakeApiServer { state, client, url }
    }

    fn runtime(&self) -> PodRuntime {
        PodRuntime::new(self.client.clone(), Some(NS))
    }

    /// Declares pod `NS/{pod}` whose container `app` is the Docker container `backing`.
    fn add_pod(&self, pod: &str, backing: &str) {
        self.state
            .pods
            .lock()
            .unwrap_or_else(|e| panic!("{e}"))
            .insert((NS.into(), pod.into()), backing.into());
    }

    /// Tells watchers the pod changed.
    async fn touch(&self, pod: &str) {
        let object = pod_object(&self.state, NS, pod)
            .await
            .unwrap_or_else(|| panic!("no pod {pod}"));
        let line = json!({"type": "MODIFIED", "object": object}).to_string();
        let _ = self.state.watch.send(line);
    }

    fn execs(&self) -> Vec<ExecRecord> {
        self.state
            .execs
            .lock()
            .unwrap_or_else(|e| panic!("{e}"))
            .clone()
    }
}

fn status_error(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": reason, "message": message, "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

/// The Pod as an API server would show it, from the backing container's real state.
async fn pod_object(fake: &Fake, ns: &str, name: &str) -> Option<Value> {
    let backing = fake
        .pods
        .lock()
        .ok()?
        .get(&(ns.to_owned(), name.to_owned()))
        .cloned()?;
    let read_only = fake.read_only.lock().ok()?.contains(&backing);
    let inspected = fake.docker.inspect_container(&backing, None).await.ok();
    let state = inspected.as_ref().and_then(|c| c.state.clone());
    let running = state.as_ref().and_then(|s| s.running).unwrap_or(false);
    let ip = inspected
        .as_ref()
        .and_then(|c| c.network_settings.as_ref())
        .and_then(|n| n.networks.as_ref())
        .and_then(|nets| nets.values().find_map(|ep| ep.ip_address.clone()))
        .filter(|ip| !ip.is_empty());
    let container_state = if running {
        ContainerState {
            running: Some(ContainerStateRunning {
                started_at: state
                    .as_ref()
                    .and_then(|s| s.started_at.as_deref())
                    .and_then(|t| t.parse().ok())
                    .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
            }),
            ..Default::default()
        }
    } else {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: state
                    .as_ref()
                    .and_then(|s| s.exit_code)
                    .and_then(|c| i32::try_from(c).ok())
                    .unwrap_or(0),
                reason: Some("Error".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    };
    let pod = Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            uid: Some(format!("uid-{name}")),
            resource_version: Some("1".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: APP.into(),
                image: Some("busybox".into()),
                security_context: Some(SecurityContext {
                    read_only_root_filesystem: Some(read_only),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some(if running { "Running" } else { "Failed" }.into()),
            pod_ip: ip.clone(),
            pod_ips: ip.map(|ip| vec![PodIP { ip }]),
            container_statuses: Some(vec![ContainerStatus {
                name: APP.into(),
                container_id: inspected
                    .as_ref()
                    .and_then(|c| c.id.as_deref())
                    .map(|id| format!("docker://{id}")),
                image: "busybox".into(),
                image_id: String::new(),
                ready: running,
                restart_count: 0,
                state: Some(container_state),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    };
    serde_json::to_value(pod).ok()
}

async fn get_pod(
    State(fake): State<Arc<Fake>>,
    Path((ns, pod)): Path<(String, String)>,
) -> Response {
    match pod_object(&fake, &ns, &pod).await {
        Some(p) => axum::Json(p).into_response(),
        None => status_error(404, "NotFound", &format!("pods \"{pod}\" not found")),
    }
}

/// The pods of one namespace: previewd watches only the namespace it is given.
async fn list_or_watch(
    State(fake): State<Arc<Fake>>,
    Path(namespace): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let query: Vec<(String, String)> =
        serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or_default();
    if query.iter().any(|(k, v)| k == "watch" && v == "true") {
        let events = tokio_stream::wrappers::BroadcastStream::new(fake.watch.subscribe())
            .filter_map(move |line| {
                let line = line.ok().filter(|l| {
                    serde_json::from_str::<Value>(l).is_ok_and(|e| {
                        e["object"]["metadata"]["namespace"].as_str() == Some(namespace.as_str())
                    })
                });
                async move { line.map(|l| Ok::<_, std::io::Error>(format!("{l}\n"))) }
            });
        return axum::body::Body::from_stream(events).into_response();
    }
    let keys: Vec<(String, String)> = fake
        .pods
        .lock()
        .map(|p| {
            p.keys()
                .filter(|(ns, _)| *ns == namespace)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let mut items = Vec::new();
    for (ns, pod) in keys {
        if let Some(p) = pod_object(&fake, &ns, &pod).await {
            items.push(p);
        }
    }
    axum::Json(json!({
        "apiVersion": "v1", "kind": "PodList",
        "metadata": {"resourceVersion": "1"}, "items": items,
    }))
    .into_response()
}

async fn exec(
    State(fake): State<Arc<Fake>>,
    Path((ns, pod)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    let query: Vec<(String, String)> =
        serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or_default();
    let argv: Vec<String> = query
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    let flag = |name: &str| query.iter().any(|(k, v)| k == name && v == "true");
    let container = query
        .iter()
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.as_str());
    if container.is_some_and(|c| c != APP) {
        return status_error(400, "BadRequest", "container is not valid for pod");
    }
    let Some(backing) = fake
        .pods
        .lock()
        .ok()
        .and_then(|p| p.get(&(ns, pod.clone())).cloned())
    else {
        return status_error(404, "NotFound", &format!("pods \"{pod}\" not found"));
    };
    let ws = ws.protocols(fake.protocols.clone());
    let Some(protocol) = ws
        .selected_protocol()
        .and_then(|p| p.to_str().ok())
        .map(str::to_owned)
    else {
        return status_error(400, "BadRequest", "no supported exec subprotocol");
    };
    let (stdin, stdout, stderr) = (flag("stdin"), flag("stdout"), flag("stderr"));
    ws.on_upgrade(move |socket| async move {
        bridge(fake, socket, backing, protocol, argv, stdin, stdout, stderr).await;
    })
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

/// Runs one exec in Docker and speaks the channel protocol over `socket`.
#[allow(clippy::too_many_arguments)]
async fn bridge(
    fake: Arc<Fake>,
    socket: WebSocket,
    backing: String,
    protocol: String,
    argv: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
) {
    let index = {
        let Ok(mut execs) = fake.execs.lock() else {
            return;
        };
        execs.push(ExecRecord {
            protocol: protocol.clone(),
            argv: argv.clone(),
            stdin_closed: false,
        });
        execs.len() - 1
    };
    let (mut sink, mut stream) = socket.split();
    let config = ExecConfig {
        cmd: Some(argv.clone()),
        attach_stdin: Some(stdin),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        ..Default::default()
    };
    let started = match fake.docker.create_exec(&backing, config).await {
        Ok(created) => fake
            .docker
            .start_exec(&created.id, None)
            .await
            .map(|s| (created.id, s)),
        Err(e) => Err(e),
    };
    let (exec_id, output, mut input) = match started {
        Ok((id, StartExecResults::Attached { output, input })) => (id, output, input),
        Ok((_, StartExecResults::Detached)) => return,
        Err(e) => {
            let status = json!({"metadata": {}, "status": "Failure", "reason": "InternalError",
                "message": format!("error executing command in container: {e}")});
            let _ = sink.send(frame(3, status.to_string().as_bytes())).await;
            let _ = sink.close().await;
            return;
        }
    };
    // Client → exec stdin, until the client half-closes (v5) or goes away.
    let v5 = protocol == V5;
    let reader_fake = fake.clone();
    let (gone_tx, mut gone) = tokio::sync::watch::channel(false);
    let (exited_tx, mut exited) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        // Input the process no longer reads is discarded, as the kubelet does.
        let mut feeding = true;
        while let Some(Ok(message)) = stream.next().await {
            match message {
                Message::Binary(b) if b.first() == Some(&0) && feeding => {
                    feeding = tokio::select! {
                        written = input.write_all(&b[1..]) => written.is_ok(),
                        _ = exited.wait_for(|done| *done) => false,
                    };
                }
                Message::Binary(b) if v5 && b.as_ref() == [255, 0] => {
                    let _ = input.shutdown().await;
                    if let Ok(mut execs) = reader_fake.execs.lock()
                        && let Some(r) = execs.get_mut(index)
                    {
                        r.stdin_closed = true;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = input.shutdown().await;
        let _ = gone_tx.send(true);
    });
    // Exec output → client, then the status; only drained once the client is gone.
    let mut output = output;
    let mut client_here = true;
    let mut seen = Vec::new();
    while let Some(chunk) = output.next().await {
        if client_here && *gone.borrow_and_update() {
            client_here = false;
        }
        let (channel, message) = match chunk {
            Ok(bollard::container::LogOutput::StdOut { message }) if stdout => (1, message),
            Ok(bollard::container::LogOutput::StdErr { message }) if stderr => (2, message),
            Ok(_) => continue,
            Err(_) => break,
        };
        if seen.len() < 4096 {
            seen.extend_from_slice(&message);
        }
        if client_here && sink.send(frame(channel, &message)).await.is_err() {
            client_here = false;
        }
    }
    let _ = exited_tx.send(true);
    if !client_here || *gone.borrow() {
        return;
    }
    let exit = loop {
        match fake.docker.inspect_exec(&exec_id).await {
            Ok(i) if i.running != Some(true) => break i.exit_code.unwrap_or(-1),
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(_) => break -1,
        }
    };
    let text = String::from_utf8_lossy(&seen);
    let status = if exit == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else if (exit == 126 || exit == 127) && text.contains("OCI runtime exec failed") {
        json!({"metadata": {}, "status": "Failure", "reason": "InternalError",
            "message": format!("error executing command in container: {}", text.trim())})
    } else {
        json!({"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": format!("command terminated with non-zero exit code: exit code {exit}"),
            "details": {"causes": [{"reason": "ExitCode", "message": exit.to_string()}]}})
    };
    let _ = sink.send(frame(3, status.to_string().as_bytes())).await;
    let _ = sink.close().await;
}

/// Docker, the images, and a double speaking `protocols`; `None` when Docker is absent.
async fn setup(protocols: &[&'static str]) -> Option<(Docker, FakeApiServer)> {
    let runtime = docker().await?;
    let docker = runtime.client().clone();
    images(&docker).await;
    podexec_images(&docker).await;
    let fake = FakeApiServer::start(&docker, protocols).await;
    Some((docker, fake))
}

async fn container(docker: &Docker, image: &str) -> TestContainer {
    TestContainer::run(docker, image, None, HostConfig::default(), None, true).await
}

fn target(pod: &str) -> String {
    PodTarget::new(NS, pod, Some(APP)).to_string()
}

fn cmd(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        user: None,
    }
}

async fn run(rt: &PodRuntime, pod: &str, argv: &[&str]) -> String {
    let out = rt
        .exec(&target(pod), &cmd(argv))
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?}: {e}"));
    assert_eq!(out.exit_code, 0, "{argv:?}: {out:?}");
    out.stdout
}

/// A binary-ish payload that is not a multiple of any block size.
fn payload() -> bytes::Bytes {
    (0..300_001u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Uploads a payload and checks, through exec, that its bytes and mode arrived.
async fn upload_and_check(rt: &PodRuntime, pod: &str) {
    let contents = payload();
    let files = [
        FileUpload {
            path: "/.previewd/it/agent".into(),
            contents: contents.clone(),
            mode: 0o750,
        },
        FileUpload {
            path: "/.previewd/it/small".into(),
            contents: bytes::Bytes::from_static(b"tiny\n"),
            mode: 0o644,
        },
    ];
    rt.upload(&target(pod), &files)
        .await
        .unwrap_or_else(|e| panic!("upload: {e}"));
    let expected = format!("{:x}", sha2::Sha256::digest(&contents));
    let sum = run(rt, pod, &["sha256sum", "/.previewd/it/agent"]).await;
    assert!(sum.starts_with(&expected), "sha256 {sum:?} != {expected}");
    let modes = run(
        rt,
        pod,
        &[
            "stat",
            "-c",
            "%a %s %u:%g",
            "/.previewd/it/agent",
            "/.previewd/it/small",
        ],
    )
    .await;
    // The exec user is root here: tar restores the archive's root owner, sh creates as root.
    assert_eq!(modes, "750 300001 0:0\n644 5 0:0\n");
    // A second upload replaces the files (a running binary is never written into).
    rt.upload(&target(pod), &files)
        .await
        .unwrap_or_else(|e| panic!("second upload: {e}"));
}

#[tokio::test]
async fn v5_uploads_through_tar_with_a_stdin_half_close() {
    let Some((docker, fake)) = setup(&[V5, V4]).await else {
        return;
    };
    let c = container(&docker, BUSYBOX_TAR_IMAGE).await;
    fake.add_pod("web", &c.name);
    let rt = fake.runtime();
    assert!(
        rt.supports_stdin_close(&PodTarget::new(NS, "web", None))
            .await
            .unwrap_or(false)
    );
    upload_and_check(&rt, "web").await;
    let execs = fake.execs();
    assert!(execs.iter().all(|e| e.protocol == V5), "{execs:?}");
    let tars: Vec<&ExecRecord> = execs
        .iter()
        .filter(|e| e.argv.first().map(String::as_str) == Some("tar"))
        .filter(|e| e.argv.get(1).map(String::as_str) == Some("-x"))
        .collect();
    assert_eq!(tars.len(), 2, "{execs:?}");
    assert!(
        tars.iter().all(|e| e.stdin_closed),
        "tar got no [255, 0]: {execs:?}"
    );
    assert!(
        !execs
            .iter()
            .any(|e| e.argv.first().map(String::as_str) == Some("sh")),
        "{execs:?}"
    );
}

#[tokio::test]
async fn v5_uploads_through_sh_cat_when_there_is_no_tar() {
    let Some((docker, fake)) = setup(&[V5]).await else {
        return;
    };
    let c = container(&docker, BUSYBOX_NOTAR_IMAGE).await;
    fake.add_pod("notar", &c.name);
    let rt = fake.runtime();
    upload_and_check(&rt, "notar").await;
    // A large file through sh: tar's absence is found before anything is streamed.
    let big = bytes::Bytes::from(vec![7u8; 8 << 20]);
    let started = std::time::Instant::now();
    rt.upload(
        &target("notar"),
        &[FileUpload {
            path: "/.previewd/it/big".into(),
            contents: big,
            mode: 0o600,
        }],
    )
    .await
    .unwrap_or_else(|e| panic!("big upload: {e}"));
    assert!(started.elapsed() < Duration::from_secs(60));
    let size = run(&rt, "notar", &["stat", "-c", "%a %s", "/.previewd/it/big"]).await;
    assert_eq!(size, format!("600 {}\n", 8 << 20));
    let execs = fake.execs();
    let first_upload: Vec<String> = execs
        .iter()
        .filter(|e| e.argv.first().map(String::as_str) != Some("true"))
        .take(3)
        .map(|e| e.argv.join(" "))
        .collect();
    // tar and sh are looked for without input; then each file goes through sh + cat.
    assert_eq!(
        first_upload[..2],
        ["tar --help", "sh -c exit 0"],
        "{execs:?}"
    );
    assert!(first_upload[2].contains("cat >"), "{execs:?}");
    let cats: Vec<&ExecRecord> = execs
        .iter()
        .filter(|e| e.argv.get(2).is_some_and(|s| s.contains("cat >")))
        .collect();
    assert_eq!(cats.len(), 5, "{execs:?}");
    assert!(cats.iter().all(|e| e.stdin_closed), "{execs:?}");
}

#[tokio::test]
async fn no_tar_and_no_shell_is_no_injection_method() {
    for protocols in [&[V5][..], &[V4][..]] {
        let Some((docker, fake)) = setup(protocols).await else {
            return;
        };
        let c = container(&docker, NOSHELL_IMAGE).await;
        fake.add_pod("bare", &c.name);
        let rt = fake.runtime();
        let files = [FileUpload {
            path: "/.previewd/it/agent".into(),
            contents: payload(),
            mode: 0o755,
        }];
        match rt.upload(&target("bare"), &files).await {
            Err(e @ RuntimeError::NoInjectionMethod { .. }) => {
                let text = e.to_string();
                assert!(text.contains("sh"), "{text}");
            }
            other => panic!("{protocols:?}: expected NoInjectionMethod, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn uploads_into_a_read_only_root_say_so() {
    for protocols in [&[V5][..], &[V4][..]] {
        let Some((docker, fake)) = setup(protocols).await else {
            return;
        };
        let host = HostConfig {
            readonly_rootfs: Some(true),
            ..Default::default()
        };
        let c = TestContainer::run(&docker, BUSYBOX_TAR_IMAGE, None, host, None, true).await;
        fake.add_pod("ro", &c.name);
        // tar (or sh) fails at once while megabytes are still being written: the status
        // must end the write instead of leaving it pending on a pipe nobody reads.
        let files = [FileUpload {
            path: "/.previewd/it/agent".into(),
            contents: bytes::Bytes::from(vec![1u8; 8 << 20]),
            mode: 0o755,
        }];
        match fake.runtime().upload(&target("ro"), &files).await {
            Err(RuntimeError::ReadOnlyRootfs(t)) => assert_eq!(t, "team/ro/app"),
            other => panic!("{protocols:?}: expected ReadOnlyRootfs, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn v4_uploads_with_head_and_never_relies_on_half_close() {
    let Some((docker, fake)) = setup(&[V4]).await else {
        return;
    };
    let c = container(&docker, BUSYBOX_TAR_IMAGE).await;
    fake.add_pod("old", &c.name);
    let rt = fake.runtime();
    assert!(
        !rt.supports_stdin_close(&PodTarget::new(NS, "old", None))
            .await
            .unwrap_or(true)
    );
    upload_and_check(&rt, "old").await;
    let execs = fake.execs();
    assert!(execs.iter().all(|e| e.protocol == V4), "{execs:?}");
    assert!(execs.iter().all(|e| !e.stdin_closed), "{execs:?}");
    let uploads: Vec<&ExecRecord> = execs
        .iter()
        .filter(|e| e.argv.get(2).is_some_and(|s| s.contains("head -c")))
        .collect();
    assert_eq!(uploads.len(), 4, "{execs:?}");
    // The environment travels over stdin on v4 too.
    let out = rt
        .exec(
            &target("old"),
            &ExecSpec {
                env: vec!["GREETING=hello v4".into()],
                ..cmd(&["sh", "-c", "echo \"$GREETING\""])
            },
        )
        .await
        .unwrap_or_else(|e| panic!("exec with env: {e}"));
    assert_eq!((out.exit_code, out.stdout.as_str()), (0, "hello v4\n"));
}

#[tokio::test]
async fn exec_reports_exit_codes_stderr_and_environment() {
    let Some((docker, fake)) = setup(&[V5, V4]).await else {
        return;
    };
    let c = container(&docker, BUSYBOX_TAR_IMAGE).await;
    fake.add_pod("web", &c.name);
    let rt = fake.runtime();
    let out = rt
        .exec(
            &target("web"),
            &cmd(&["sh", "-c", "echo out; echo oops >&2; exit 3"]),
        )
        .await
        .unwrap_or_else(|e| panic!("exec: {e}"));
    assert_eq!(
        (out.exit_code, out.stdout.as_str(), out.stderr.as_str()),
        (3, "out\n", "oops\n")
    );
    let out = rt
        .exec(&target("web"), &cmd(&["/no/such/binary"]))
        .await
        .unwrap_or_else(|e| panic!("exec: {e}"));
    assert!(out.exit_code == 126 || out.exit_code == 127, "{out:?}");
    assert!(
        out.stderr.contains("no such file") || out.stderr.contains("not found"),
        "{out:?}"
    );
    let secret = "s3cr3t-value-for-the-test";
    let out = rt
        .exec(
            &target("web"),
            &ExecSpec {
                env: vec![
                    format!("PREVIEWD_AGENT_SECRET={secret}"),
                    "OTHER=a b".into(),
                ],
                ..cmd(&["sh", "-c", "echo \"$PREVIEWD_AGENT_SECRET|$OTHER\""])
            },
        )
        .await
        .unwrap_or_else(|e| panic!("exec with env: {e}"));
    assert_eq!(out.stdout, format!("{secret}|a b\n"));
    assert!(
        fake.execs()
            .iter()
            .all(|e| e.argv.iter().all(|a| !a.contains(secret)))
    );
}

#[tokio::test]
async fn exec_until_ready_waits_for_a_whole_line_and_leaves_the_process_running() {
    let Some((docker, fake)) = setup(&[V5, V4]).await else {
        return;
    };
    let c = container(&docker, BUSYBOX_TAR_IMAGE).await;
    fake.add_pod("web", &c.name);
    let rt = fake.runtime();
    let script = "printf 'noise\\nREADY 12'; sleep 0.5; printf '34\\nafter\\n'; exec sleep 3456";
    let line = rt
        .exec_until_ready(&target("web"), &cmd(&["sh", "-c", script]), "READY ")
        .await
        .unwrap_or_else(|e| panic!("exec_until_ready: {e}"));
    assert_eq!(line, "READY 1234");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ps = run(&rt, "web", &["ps", "-o", "args"]).await;
    assert!(
        ps.contains("sleep 3456"),
        "the daemon stopped on detach: {ps}"
    );
    // A command that exits first fails with its output.
    let err = rt
        .exec_until_ready(
            &target("web"),
            &cmd(&["sh", "-c", "echo bad config; exit 2"]),
            "READY ",
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("an exit before the ready line must fail"));
    let text = err.to_string();
    assert!(
        text.contains("code 2") && text.contains("bad config"),
        "{text}"
    );
}

#[tokio::test]
async fn exec_stdio_round_trips_bytes_and_half_closes() {
    for protocols in [&[V5][..], &[V4][..]] {
        let Some((docker, fake)) = setup(protocols).await else {
            return;
        };
        let c = container(&docker, BUSYBOX_TAR_IMAGE).await;
        fake.add_pod("web", &c.name);
        let rt = fake.runtime();
        let mut io = rt
            .exec_stdio(&target("web"), &cmd(&["cat"]))
            .await
            .unwrap_or_else(|e| panic!("exec_stdio: {e}"));
        let data = payload();
        let (mut r, mut w) = tokio::io::split(&mut io);
        let v5 = protocols == [V5];
        let write = async {
            w.write_all(&data)
                .await
                .unwrap_or_else(|e| panic!("write: {e}"));
            // v4 cannot half-close: shutting down closes the connection, and output still
            // in flight is lost, so a v4 tunnel is only closed once done with.
            if v5 {
                w.shutdown()
                    .await
                    .unwrap_or_else(|e| panic!("shutdown: {e}"));
            }
        };
        let read = async {
            let mut back = Vec::new();
            let mut buf = vec![0u8; 65536];
            while back.len() < data.len() {
                let n = r
                    .read(&mut buf)
                    .await
                    .unwrap_or_else(|e| panic!("read: {e}"));
                assert!(n > 0, "{protocols:?}: EOF after {} bytes", back.len());
                back.extend_from_slice(&buf[..n]);
            }
            back
        };
        let ((), back) =
            tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
                .await
                .unwrap_or_else(|_| panic!("{protocols:?}: echo timed out"));
        assert!(back == data.as_ref(), "{protocols:?}: echoed bytes differ");
        if v5 {
            // cat sees the half-close, exits, and the stream ends.
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut rest))
                .await
                .unwrap_or_else(|_| panic!("no EOF after the half-close"))
                .unwrap_or_else(|e| panic!("read: {e}"));
            assert!(rest.is_empty());
        }
    }
}

#[tokio::test]
async fn resolve_reads_pod_status_and_notices_a_new_container() {
    let Some((docker, fake)) = setup(&[V5, V4]).await else {
        return;
    };
    let c = container(&docker, BUSYBOX_TAR_IMAGE).await;
    fake.add_pod("web", &c.name);
    let rt = fake.runtime();
    let info = rt
        .resolve(&format!("{NS}/web"))
        .await
        .unwrap_or_else(|e| panic!("resolve: {e}"));
    let inspected = docker
        .inspect_container(&c.name, None)
        .await
        .unwrap_or_else(|e| panic!("inspect: {e}"));
    assert_eq!(
        info.id,
        format!("docker://{}", inspected.id.unwrap_or_default())
    );
    assert_eq!(info.name, "team/web/app");
    assert!(info.running, "{info:?}");
    assert_eq!(info.state, "running");
    assert!(!info.read_only_rootfs);
    assert!(!info.ips.is_empty(), "{info:?}");
    assert!(info.started_at.is_some(), "{info:?}");

    match rt.resolve(&format!("{NS}/missing")).await {
        Err(RuntimeError::ContainerNotFound(t)) => assert_eq!(t, "team/missing"),
        other => panic!("expected ContainerNotFound, got {other:?}"),
    }
    match rt.resolve(&format!("{NS}/web/sidecar")).await {
        Err(RuntimeError::ContainerNotFound(_)) => {}
        other => panic!("expected ContainerNotFound, got {other:?}"),
    }
    assert!(matches!(
        rt.resolve("web").await,
        Err(RuntimeError::InvalidTarget(_))
    ));
    match rt.exec(&target("missing"), &cmd(&["true"])).await {
        Err(RuntimeError::ContainerNotFound(_)) => {}
        other => panic!("exec in a missing pod: expected ContainerNotFound, got {other:?}"),
    }

    // A restarted container in Kubernetes is a new container: a new containerID.
    let replacement = container(&docker, BUSYBOX_TAR_IMAGE).await;
    fake.add_pod("web", &replacement.name);
    let again = rt
        .resolve(&target("web"))
        .await
        .unwrap_or_else(|e| panic!("resolve: {e}"));
    assert_ne!(again.id, info.id);
    assert!(again.running);
    drop(replacement);
    let gone = rt
        .resolve(&target("web"))
        .await
        .unwrap_or_else(|e| panic!("resolve: {e}"));
    assert!(!gone.running, "{gone:?}");

    let ro = container(&docker, BUSYBOX_TAR_IMAGE).await;
    fake.state
        .read_only
        .lock()
        .unwrap_or_else(|e| panic!("{e}"))
        .push(ro.name.clone());
    fake.add_pod("ro", &ro.name);
    let info = rt
        .resolve(&target("ro"))
        .await
        .unwrap_or_else(|e| panic!("resolve: {e}"));
    assert!(info.read_only_rootfs);
}

#[tokio::test]
async fn events_follow_pod_changes() {
    let Some((docker, fake)) = setup(&[V5]).await else {
        return;
    };
    let c = container(&docker, BUSYBOX_TAR_IMAGE).await;
    fake.add_pod("web", &c.name);
    let rt = fake.runtime();
    let mut events = rt.events();
    let first = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .unwrap_or_else(|_| panic!("no pod event"))
        .unwrap_or_else(|| panic!("the event stream ended"));
    assert_eq!(first.action, previewd::runtime::docker::RESYNC);
    // The watch is established once the list is done; retry until the change arrives.
    let changed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            fake.touch("web").await;
            if let Ok(Some(ev)) =
                tokio::time::timeout(Duration::from_millis(500), events.next()).await
            {
                break ev;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no change event"));
    assert_eq!(changed.action, "changed");
    assert_eq!(changed.name, "team/web/app");
    assert!(changed.id.starts_with("docker://"), "{changed:?}");
}

/// The injection sequence the controller runs (upload, `--version`, `serve` until its ready
/// line, health over TCP and over exec stdio), with the real agent, over both subprotocols.
#[tokio::test]
async fn the_agent_goes_in_and_answers_through_pod_exec() {
    for protocols in [&[V5, V4][..], &[V4][..]] {
        let Some((docker, fake)) = setup(protocols).await else {
            return;
        };
        let c = container(&docker, BUSYBOX_TAR_IMAGE).await;
        fake.add_pod("web", &c.name);
        let rt = fake.runtime();
        let info = rt
            .resolve(&target("web"))
            .await
            .unwrap_or_else(|e| panic!("resolve: {e}"));
        let agent = std::fs::read(env!("CARGO_BIN_EXE_previewd-agent"))
            .unwrap_or_else(|e| panic!("agent binary: {e}"));
        let path = "/.previewd/it/previewd-agent";
        rt.upload(
            &info.name,
            &[FileUpload {
                path: path.into(),
                contents: agent.into(),
                mode: 0o755,
            }],
        )
        .await
        .unwrap_or_else(|e| panic!("{protocols:?}: upload the agent: {e}"));
        let version = run(&rt, "web", &[path, "--version"]).await;
        assert!(version.starts_with("previewd-agent"), "{version}");

        let secret = "pod-exec-test-secret-0123456789";
        let as_agent = |argv: &[&str]| ExecSpec {
            env: vec![format!(
                "{}={secret}",
                previewd::agent::protocol::SECRET_ENV
            )],
            ..cmd(argv)
        };
        let line = rt
            .exec_until_ready(
                &info.name,
                &as_agent(&[path, "serve", "--listen", "0.0.0.0:0"]),
                "listening on ",
            )
            .await
            .unwrap_or_else(|e| panic!("{protocols:?}: start the agent: {e}"));
        let port = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port())
            .unwrap_or_else(|| panic!("unreadable ready line {line:?}"));
        let ip = info
            .ips
            .first()
            .copied()
            .unwrap_or_else(|| panic!("no pod IP"));
        let mut tcp = tokio::net::TcpStream::connect((ip, port))
            .await
            .unwrap_or_else(|e| panic!("connect to the agent: {e}"));
        let health = previewd::agent::client::health(&mut tcp, secret)
            .await
            .unwrap_or_else(|e| panic!("{protocols:?}: health over TCP: {e}"));
        assert_eq!(health.version, env!("CARGO_PKG_VERSION"));

        let mut stdio = rt
            .exec_stdio(&info.name, &as_agent(&[path, "stdio"]))
            .await
            .unwrap_or_else(|e| panic!("exec_stdio: {e}"));
        let health = tokio::time::timeout(
            Duration::from_secs(20),
            previewd::agent::client::health(&mut stdio, secret),
        )
        .await
        .unwrap_or_else(|_| panic!("{protocols:?}: no health answer over exec stdio"))
        .unwrap_or_else(|e| panic!("{protocols:?}: health over exec stdio: {e}"));
        assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
        let execs = fake.execs();
        assert!(
            execs.iter().all(|e| e.protocol == protocols[0]),
            "{execs:?}"
        );
        assert!(
            execs
                .iter()
                .all(|e| e.argv.iter().all(|a| !a.contains(secret))),
            "the secret reached a command line: {execs:?}"
        );
    }
}

/// The reconcilers in Kubernetes mode with a pod target, end to end: a `--store kube` replica
/// talks to one API server holding previewd's objects (the embedded API) and pods (the
/// double), injects the agent through pod exec, serves the link through the pod IP, follows
/// a restart (a new `containerID`), and removes the agent with the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_mode_replica_serves_links_to_pods() {
    use kube::api::{DeleteParams, PostParams};
    use previewd::resources::preview_link::{Access, LinkPhase};
    use previewd::resources::target::PodTarget as PodRef;
    use previewd::resources::{DaemonInjection, PreviewLink, PreviewLinkSpec, Target};

    let Some(rt) = docker().await else { return };
    crate::containers::images(rt.client()).await;
    let app = TestContainer::testapp(rt.client(), "127.0.0.1:3000", HostConfig::default()).await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store =
        previewd::store::Store::open(&dir.path().join("apiserver"), previewd::store::kinds::all())
            .unwrap_or_else(|e| panic!("{e}"));
    let rest = previewd::store::api::router(Arc::new(store));
    let fake = FakeApiServer::start_with(rt.client(), &[V5, V4], Some(rest)).await;
    fake.add_pod("web", &app.name);
    let kc = crate::leader::kubeconfig(dir.path(), &fake.url);
    let replica = crate::leader::kube_replica(&dir.path().join("replica"), &kc, &[]);

    let links: kube::Api<PreviewLink> = kube::Api::namespaced(fake.client.clone(), NS);
    let dis: kube::Api<DaemonInjection> = kube::Api::namespaced(fake.client.clone(), NS);
    let target = Target::Pod(PodRef {
        name: "web".into(),
        container: Some(APP.into()),
    });
    let mut link = PreviewLink::new("web", PreviewLinkSpec::new(target, 3000));
    link.spec.access = Access::Public;
    links
        .create(&PostParams::default(), &link)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ready = crate::docker::wait_link(&links, "web", LinkPhase::Ready).await;
    let upstream = ready.status.and_then(|s| s.upstream).unwrap_or_default();
    assert!(upstream.starts_with("agent://"), "{upstream}");
    let url = format!("http://{}/p/web.{NS}/", replica.proxy);
    let fetch = || async { crate::rest::fetch(replica.proxy, &url).await.1 };
    // The replica's proxy serves the link once its own watch has seen it Ready.
    let page = crate::common::eventually(
        Duration::from_secs(10),
        "the replica to serve the link",
        || async {
            let page = fetch().await;
            (page == "hello from testapp\n").then_some(page)
        },
    )
    .await;
    assert_eq!(page, "hello from testapp\n", "{}", replica.log_text());
    let injection = dis
        .list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .items
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no injection"));
    let first_id = injection
        .status
        .and_then(|s| s.container_id)
        .unwrap_or_default();
    assert!(first_id.starts_with("docker://"), "{first_id}");
    // The execs went through the API server, the first ones over v5.
    assert!(fake.execs().iter().any(|e| e.protocol == V5));

    // The pod's container restarts as a new container: re-injected, served again.
    let replacement =
        TestContainer::testapp(rt.client(), "127.0.0.1:3000", HostConfig::default()).await;
    fake.add_pod("web", &replacement.name);
    fake.touch("web").await;
    let di_name = injection.metadata.name.clone().unwrap_or_default();
    crate::common::eventually(Duration::from_secs(60), "re-injection", || {
        let dis = dis.clone();
        let (di_name, first_id) = (di_name.clone(), first_id.clone());
        async move {
            let st = dis.get(&di_name).await.ok()?.status?;
            (st.container_id.as_deref() != Some(first_id.as_str())
                && st.phase == Some(previewd::resources::daemon_injection::DaemonPhase::Running))
            .then_some(())
        }
    })
    .await;
    crate::common::eventually(Duration::from_secs(30), "the link serves again", || async {
        (fetch().await == "hello from testapp\n").then_some(())
    })
    .await;

    // Deleting the link removes the agent from the pod.
    links
        .delete("web", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    crate::common::eventually(Duration::from_secs(30), "the injection goes", || {
        let dis = dis.clone();
        async move {
            dis.list(&Default::default())
                .await
                .ok()
                .filter(|l| l.items.is_empty())
        }
    })
    .await;
    assert_eq!(
        crate::docker::agent_processes(&rt, &replacement.name).await,
        0
    );
}

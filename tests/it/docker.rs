//! Daemon injection against the real Docker engine, through `previewd serve`.

use std::path::Path;
use std::time::Duration;

use bollard::models::HostConfig;
use bollard::query_parameters::RemoveContainerOptionsBuilder;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, PostParams};
use previewd::agent::client as agent;
use previewd::agent::protocol::DaemonStatus;
use previewd::resources::conditions;
use previewd::resources::daemon_injection::DaemonPhase;
use previewd::resources::preview_link::LinkPhase;
use previewd::resources::target::Target;
use previewd::resources::{DaemonInjection, DaemonInjectionSpec, PreviewLink};
use previewd::runtime::docker::DockerRuntime;
use previewd::runtime::{ContainerRuntime, ExecSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Server, eventually};
use crate::containers::{BUSYBOX_IMAGE, NOSHELL_IMAGE, TestContainer, docker, images};

/// Starts `previewd serve` with the test agent binary.
pub fn server(state: &Path) -> Server {
    server_with(state, &[])
}

/// Starts `previewd serve` with the test agent binary and `extra` environment.
pub fn server_with(state: &Path, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![(
        "PREVIEWD_AGENT_BINARY",
        env!("CARGO_BIN_EXE_previewd-agent"),
    )];
    env.extend_from_slice(extra);
    Server::start_with(state, &env)
}

pub fn injection(name: &str, container: &str) -> DaemonInjection {
    DaemonInjection::new(name, DaemonInjectionSpec::new(Target::docker(container)))
}

/// Waits until the injection reports `phase` (and returns it).
pub async fn wait_phase(
    api: &Api<DaemonInjection>,
    name: &str,
    phase: DaemonPhase,
    limit: Duration,
) -> DaemonInjection {
    eventually(limit, &format!("{name} to be {phase:?}"), || {
        let api = api.clone();
        let name = name.to_owned();
        async move {
            api.get(&name)
                .await
                .ok()
                .filter(|o| o.status.as_ref().and_then(|s| s.phase) == Some(phase))
        }
    })
    .await
}

/// Runs a busybox command in a container and returns stdout.
pub async fn sh(docker: &DockerRuntime, container: &str, argv: &[&str]) -> String {
    let out = docker
        .exec(
            container,
            &ExecSpec {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                env: Vec::new(),
                user: Some("0:0".into()),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?} in {container}: {e}"));
    out.stdout
}

/// How many processes in a busybox container run `previewd-agent {command}`.
async fn agents_running(docker: &DockerRuntime, container: &str, command: &str) -> usize {
    let wanted = format!("previewd-agent {command}");
    sh(docker, container, &["/bin/ps", "-o", "args"])
        .await
        .lines()
        .filter(|l| l.contains(&wanted))
        .count()
}

/// How many agent handoff helpers run in a busybox container.
pub async fn handoff_helpers(docker: &DockerRuntime, container: &str) -> usize {
    agents_running(docker, container, "handoff").await
}

/// How many agent processes run in a busybox container.
pub async fn agent_processes(docker: &DockerRuntime, container: &str) -> usize {
    agents_running(docker, container, "serve").await
}

/// How many agents serve a single tunnel over exec stdio in a busybox container: each is
/// owed only while its connection is open.
pub async fn stdio_agent_processes(docker: &DockerRuntime, container: &str) -> usize {
    agents_running(docker, container, "stdio").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injects_into_public_local_noshell_and_nonroot_containers() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let public =
        TestContainer::httpd(rt.client(), "0.0.0.0:8080", None, HostConfig::default()).await;
    let local =
        TestContainer::httpd(rt.client(), "127.0.0.1:3000", None, HostConfig::default()).await;
    let nonroot = TestContainer::httpd(
        rt.client(),
        "127.0.0.1:3000",
        Some("1000:1000"),
        HostConfig::default(),
    )
    .await;
    let noshell = TestContainer::run(
        rt.client(),
        NOSHELL_IMAGE,
        None,
        HostConfig::default(),
        None,
        true,
    )
    .await;

    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = server(state.path());
    let api: Api<DaemonInjection> = Api::default_namespaced(server.client());
    for (name, c) in [
        ("public", &public),
        ("local", &local),
        ("nonroot", &nonroot),
        ("noshell", &noshell),
    ] {
        api.create(&PostParams::default(), &injection(name, &c.name))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    for name in ["public", "local", "nonroot", "noshell"] {
        let di = wait_phase(&api, name, DaemonPhase::Running, Duration::from_secs(60)).await;
        let st = di.status.unwrap_or_default();
        assert!(
            st.endpoint
                .as_deref()
                .is_some_and(|e| e.parse::<std::net::SocketAddr>().is_ok()),
            "{name}: {st:?}"
        );
        assert_eq!(
            st.daemon_version.as_deref(),
            Some(env!("CARGO_PKG_VERSION"))
        );
    }
    // The agent runs as the container's own user.
    let ps = sh(&rt, &nonroot.name, &["/bin/ps", "-o", "user,args"]).await;
    let agent_line = ps
        .lines()
        .find(|l| l.contains("previewd-agent serve"))
        .unwrap_or_else(|| panic!("no agent in {ps}"));
    assert!(
        agent_line.trim_start().starts_with("app") || agent_line.trim_start().starts_with("1000"),
        "{agent_line}"
    );

    // The agent in the 127.0.0.1-only container lists that port and tunnels to it.
    let endpoint: std::net::SocketAddr = api
        .get("local")
        .await
        .ok()
        .and_then(|d| d.status?.endpoint?.parse().ok())
        .unwrap_or_else(|| panic!("no endpoint"));
    let secret = agent_secret(&server, "local").await;
    let mut conn = TcpStream::connect(endpoint)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let answer = agent::ports(&mut conn, &secret)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        answer
            .ports
            .iter()
            .any(|p| p.port == 3000 && p.address.to_string() == "127.0.0.1"),
        "{answer:?}"
    );
    // The agent names the container's network namespace, not the host's.
    let own = previewd::runtime::netns::own_inode();
    assert!(
        answer.network_namespace.is_some() && answer.network_namespace != own,
        "{answer:?} (host: {own:?})"
    );
    let conn = TcpStream::connect(endpoint)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut tunnel = agent::connect(conn, &secret, 3000)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tunnel
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut page = String::new();
    tunnel
        .read_to_string(&mut page)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(page.contains("hello from busybox httpd"), "{page}");
    let conn = TcpStream::connect(endpoint)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(
            agent::connect(conn, "wrong-secret-0123456789", 3000).await,
            Err(agent::AgentError::SecretInvalid)
        ),
        "the agent refuses a wrong secret"
    );
    let _ = server.terminate(Duration::from_secs(10));
}

/// The agent secret previewd keeps for an injection.
async fn agent_secret(server: &Server, injection: &str) -> String {
    let secrets: Api<Secret> = Api::default_namespaced(server.client());
    let s = secrets
        .get(&format!("previewd-agent-{injection}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.data
        .and_then(|d| {
            d.get("secret")
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_and_stopped_containers() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let ro = TestContainer::httpd(
        rt.client(),
        "0.0.0.0:8080",
        None,
        HostConfig {
            readonly_rootfs: Some(true),
            ..Default::default()
        },
    )
    .await;
    let stopped = TestContainer::run(
        rt.client(),
        BUSYBOX_IMAGE,
        Some(vec!["/bin/httpd", "-f", "-p", "0.0.0.0:8080", "-h", "/www"]),
        HostConfig::default(),
        None,
        false,
    )
    .await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = server(state.path());
    let api: Api<DaemonInjection> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &injection("ro", &ro.name))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    api.create(&PostParams::default(), &injection("later", &stopped.name))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let failed = wait_phase(&api, "ro", DaemonPhase::Failed, Duration::from_secs(30)).await;
    let cond = ready(&failed).unwrap_or_else(|| panic!("no Ready condition"));
    assert_eq!(cond.reason, "ReadOnlyRootfs");
    assert!(
        cond.message.contains("read-only root filesystem"),
        "{}",
        cond.message
    );

    let pending = wait_phase(&api, "later", DaemonPhase::Pending, Duration::from_secs(30)).await;
    let cond = ready(&pending).unwrap_or_else(|| panic!("no Ready condition"));
    assert_eq!(cond.reason, "ContainerNotRunning");
    rt.client()
        .start_container(&stopped.name, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_phase(&api, "later", DaemonPhase::Running, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_delete_and_removal() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let web =
        TestContainer::httpd(rt.client(), "127.0.0.1:3000", None, HostConfig::default()).await;
    let other =
        TestContainer::httpd(rt.client(), "127.0.0.1:3000", None, HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = server(state.path());
    let api: Api<DaemonInjection> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &injection("web", &web.name))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    api.create(&PostParams::default(), &injection("other", &other.name))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_phase(&api, "web", DaemonPhase::Running, Duration::from_secs(60)).await;
    wait_phase(&api, "other", DaemonPhase::Running, Duration::from_secs(60)).await;

    // docker restart: the exec'd agent dies with the container; previewd re-injects.
    rt.client()
        .restart_container(&web.name, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let again = eventually(
        Duration::from_secs(30),
        "re-injection after restart",
        || {
            let api = api.clone();
            async move {
                let o = api.get("web").await.ok()?;
                let st = o.status.clone()?;
                (st.phase == Some(DaemonPhase::Running) && st.restarts == Some(1)).then_some(o)
            }
        },
    )
    .await;
    assert!(again.status.is_some());
    assert_eq!(agent_processes(&rt, &web.name).await, 1);

    // Delete: the process and the files go.
    api.delete("web", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eventually(Duration::from_secs(30), "the injection to be gone", || {
        let api = api.clone();
        async move {
            matches!(api.get("web").await, Err(kube::Error::Api(e)) if e.code == 404).then_some(())
        }
    })
    .await;
    assert_eq!(
        agent_processes(&rt, &web.name).await,
        0,
        "the agent process is gone"
    );
    let ls = sh(
        &rt,
        &web.name,
        &["/bin/sh", "-c", "ls -a /.previewd 2>&1; echo rc=$?"],
    )
    .await;
    assert!(
        ls.contains("No such file") || !ls.contains("default.web"),
        "files remain: {ls}"
    );

    // docker rm -f: the status says so.
    let other_name = other.name.clone();
    drop(other);
    let gone = wait_phase(&api, "other", DaemonPhase::Failed, Duration::from_secs(30)).await;
    assert_eq!(
        ready(&gone).map(|c| c.reason.as_str()),
        Some("ContainerNotFound")
    );

    // A new container under the same name: injected again, into the new one.
    let first_id = gone.status.and_then(|s| s.container_id);
    let again = TestContainer::run_named(
        rt.client(),
        &other_name,
        BUSYBOX_IMAGE,
        Some(vec![
            "/bin/httpd",
            "-f",
            "-p",
            "127.0.0.1:3000",
            "-h",
            "/www",
        ]),
        HostConfig::default(),
        None,
        true,
    )
    .await;
    let back = wait_phase(&api, "other", DaemonPhase::Running, Duration::from_secs(30)).await;
    assert_ne!(
        back.status.and_then(|s| s.container_id),
        first_id,
        "injected into the new container"
    );
    assert_eq!(agent_processes(&rt, &again.name).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_adopts_without_duplicates() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let mut containers = Vec::new();
    for _ in 0..5 {
        containers.push(
            TestContainer::httpd(rt.client(), "127.0.0.1:3000", None, HostConfig::default()).await,
        );
    }
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server1 = server(state.path());
    let api: Api<DaemonInjection> = Api::default_namespaced(server1.client());
    for (i, c) in containers.iter().enumerate() {
        api.create(
            &PostParams::default(),
            &injection(&format!("di-{i}"), &c.name),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut injected_at = Vec::new();
    for i in 0..5 {
        let di = wait_phase(
            &api,
            &format!("di-{i}"),
            DaemonPhase::Running,
            Duration::from_secs(60),
        )
        .await;
        injected_at.push(di.status.and_then(|s| s.injected_at));
    }
    let log1 = server1.logs.clone();
    server1.kill9();

    let server2 = server(state.path());
    let api: Api<DaemonInjection> = Api::default_namespaced(server2.client());
    // Give the restarted controller time to reconcile everything once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, c) in containers.iter().enumerate() {
        let di = wait_phase(
            &api,
            &format!("di-{i}"),
            DaemonPhase::Running,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(
            di.status.and_then(|s| s.injected_at),
            injected_at[i],
            "di-{i} was re-injected instead of adopted; server log:\n{}",
            log1.lock().map(|l| l.join("\n")).unwrap_or_default()
                + "\n--- after the restart ---\n"
                + &server2.log_text()
        );
        assert_eq!(
            agent_processes(&rt, &c.name).await,
            1,
            "di-{i} has duplicate agents"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_vanishing_mid_injection_is_reported() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = server(state.path());
    let api: Api<DaemonInjection> = Api::default_namespaced(server.client());
    let c = TestContainer::httpd(rt.client(), "0.0.0.0:8080", None, HostConfig::default()).await;
    api.create(&PostParams::default(), &injection("vanish", &c.name))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // One removal, as a user would: on fuse-overlayfs the engine sometimes fails it and
    // leaves the container `dead` (no `destroy` event), which counts as gone too.
    let removed = rt
        .client()
        .remove_container(
            &c.name,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await;
    eprintln!("docker rm -f: {removed:?}");
    // Whatever step the removal interrupted, the status ends up saying the container is gone.
    eventually(
        Duration::from_secs(30),
        "the status to say ContainerNotFound",
        || {
            let api = api.clone();
            async move {
                let o = api.get("vanish").await.ok()?;
                (ready(&o)?.reason == "ContainerNotFound").then_some(())
            }
        },
    )
    .await;
    let di = api.get("vanish").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(di.status.and_then(|s| s.phase), Some(DaemonPhase::Failed));
}

/// The Ready condition of an injection.
fn ready(di: &DaemonInjection) -> Option<&Condition> {
    conditions::find(&di.status.as_ref()?.conditions, conditions::READY)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_named_daemons_are_injected_like_the_agent() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let c = TestContainer::httpd(rt.client(), "0.0.0.0:8080", None, HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // The operator allows daemons from where the test's binaries are.
    let agent_dir = std::path::Path::new(env!("CARGO_BIN_EXE_previewd-agent"))
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let server = server_with(
        state.path(),
        &[("PREVIEWD_DAEMON_SOURCE_DIRS", &format!("{agent_dir},/bin"))],
    );
    let api: Api<DaemonInjection> = Api::default_namespaced(server.client());
    let di = |name: &str, daemon: serde_json::Value| -> DaemonInjection {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "previewd.dev/v1alpha1", "kind": "DaemonInjection",
            "metadata": {"name": name},
            "spec": {"target": {"docker": {"container": c.name}}, "daemon": daemon}
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    };
    // The static daemon an agent platform already has (here: a copy of previewd-agent),
    // configured by args and env, ready when its port accepts connections.
    let platform_daemon = di(
        "platform",
        serde_json::json!({
            "source": {"hostPath": env!("CARGO_BIN_EXE_previewd-agent")},
            "args": ["serve", "--listen", "127.0.0.1:4000"],
            "env": [{"name": "PREVIEWD_AGENT_SECRET", "value": "platform-daemon-secret"}],
            "port": 4000,
            "readinessProbe": {"tcp": {}}
        }),
    );
    // busybox httpd installed outside /.previewd, ready when GET / answers.
    let http_daemon = di(
        "http",
        serde_json::json!({
            "source": {"hostPath": "/bin/busybox"},
            "installPath": "/opt/tools/busybox",
            "args": ["httpd", "-f", "-p", "127.0.0.1:4001", "-h", "/www"],
            "readinessProbe": {"http": {"path": "/", "port": 4001}}
        }),
    );
    let missing = di(
        "missing",
        serde_json::json!({"source": {"hostPath": "/nonexistent/daemon"}}),
    );
    for d in [&platform_daemon, &http_daemon] {
        api.create(&PostParams::default(), d)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // A file that is not there is refused when the object is written.
    match api.create(&PostParams::default(), &missing).await {
        Err(kube::Error::Api(e)) if e.code == 422 => {
            assert!(e.message.contains("/nonexistent/daemon"), "{}", e.message);
        }
        other => panic!("a missing daemon source was admitted: {other:?}"),
    }
    wait_phase(
        &api,
        "platform",
        DaemonPhase::Running,
        Duration::from_secs(60),
    )
    .await;
    wait_phase(&api, "http", DaemonPhase::Running, Duration::from_secs(60)).await;

    let ps = sh(&rt, &c.name, &["/bin/ps", "-o", "args"]).await;
    assert!(
        ps.contains("/.previewd/default.platform/daemon serve --listen 127.0.0.1:4000"),
        "{ps}"
    );
    assert!(
        ps.contains("/opt/tools/busybox httpd -f -p 127.0.0.1:4001"),
        "{ps}"
    );

    delete_all_and_check_nothing_is_left(
        &api,
        &rt,
        &c.name,
        &["platform", "http"],
        "/opt/tools/busybox",
    )
    .await;
}

/// `previewd-agent daemon-status` of injection `name`'s supervisor, run in the container.
async fn daemon_status(rt: &DockerRuntime, container: &str, name: &str) -> Option<DaemonStatus> {
    let dir = format!("/.previewd/default.{name}");
    let out = sh(
        rt,
        container,
        &[
            &format!("{dir}/previewd-agent"),
            "daemon-status",
            "--dir",
            &format!("{dir}/daemon-state"),
        ],
    )
    .await;
    serde_json::from_str(out.trim()).ok()
}

/// A user daemon that exits is reported Failed (`DaemonExited`, with its exit status and
/// last output) and restarted by its supervisor with a growing backoff; once it keeps
/// running and passes its probe the injection is Running again. A daemon that keeps running
/// stays Running, and deleting the injections stops everything and removes the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_daemons_that_exit_are_failed_and_restarted_with_backoff() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let c = TestContainer::httpd(rt.client(), "0.0.0.0:8080", None, HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // The operator allows daemons from /bin (busybox).
    let server = server_with(state.path(), &[("PREVIEWD_DAEMON_SOURCE_DIRS", "/bin")]);
    let api: Api<DaemonInjection> = Api::default_namespaced(server.client());
    let di = |name: &str, daemon: serde_json::Value| -> DaemonInjection {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "previewd.dev/v1alpha1", "kind": "DaemonInjection",
            "metadata": {"name": name},
            "spec": {"target": {"docker": {"container": c.name}}, "daemon": daemon}
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    };
    // Exits at once with code 3, with no probe to notice; as a non-root user, so its
    // supervisor's files must be writable for it in the root-owned /.previewd.
    let crash = di(
        "crash",
        serde_json::json!({
            "source": {"hostPath": "/bin/busybox"},
            "installPath": "/.previewd/default.crash/busybox",
            "args": ["sh", "-c", "echo boom; echo 'it broke' >&2; exit 3"],
            "user": "1000:1000"
        }),
    );
    // Exits until /tmp/healed exists, then serves what its probe asks for.
    let flaky = di(
        "flaky",
        serde_json::json!({
            "source": {"hostPath": "/bin/busybox"},
            "installPath": "/.previewd/default.flaky/busybox",
            "args": ["sh", "-c",
                "test -e /tmp/healed && exec httpd -f -p 127.0.0.1:4002 -h /www; echo not yet; exit 1"],
            "readinessProbe": {"http": {"path": "/", "port": 4002}}
        }),
    );
    let steady = di(
        "steady",
        serde_json::json!({
            "source": {"hostPath": "/bin/busybox"},
            "installPath": "/opt/steady/busybox",
            "args": ["sleep", "3600"]
        }),
    );
    for d in [&crash, &flaky, &steady] {
        api.create(&PostParams::default(), d)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let steady_pid = eventually(Duration::from_secs(40), "steady to run", || {
        let (rt, c) = (&rt, &c);
        async move {
            let st = daemon_status(rt, &c.name, "steady").await?;
            st.daemon_running.then_some(st.state?.child?.pid)
        }
    })
    .await;
    wait_phase(
        &api,
        "steady",
        DaemonPhase::Running,
        Duration::from_secs(40),
    )
    .await;

    let failed = wait_phase(&api, "crash", DaemonPhase::Failed, Duration::from_secs(40)).await;
    let cond = ready(&failed).unwrap_or_else(|| panic!("no Ready condition: {failed:?}"));
    assert_eq!(cond.reason, "DaemonExited", "{cond:?}");
    assert_eq!(cond.status, "False");
    assert!(cond.message.contains("exit code 3"), "{}", cond.message);
    assert!(
        cond.message.contains("boom") && cond.message.contains("it broke"),
        "{}",
        cond.message
    );

    // Its supervisor restarts it, waiting longer each time; the status says so.
    let st = eventually(Duration::from_secs(30), "three exits of crash", || {
        let (rt, c) = (&rt, &c);
        async move {
            let st = daemon_status(rt, &c.name, "crash").await?;
            (st.state.as_ref()?.exits.len() >= 3).then_some(st)
        }
    })
    .await;
    assert!(st.supervisor_running, "{st:?}");
    let exits = st.state.map(|s| s.exits).unwrap_or_default();
    assert!(exits.iter().all(|e| e.code == Some(3)), "{exits:?}");
    let gap = |i: usize| exits[i + 1].at_ms - exits[i].at_ms;
    assert!(
        gap(0) >= 1000 && gap(1) >= 2000 && gap(1) > gap(0),
        "{exits:?}"
    );
    assert!(st.output.ends_with("boom\nit broke\n"), "{:?}", st.output);
    eventually(
        Duration::from_secs(30),
        "crash's status to count restarts",
        || {
            let api = api.clone();
            async move {
                let o = api.get("crash").await.ok()?;
                let c = ready(&o)?;
                (c.reason == "DaemonExited" && c.message.contains(" times)")).then_some(())
            }
        },
    )
    .await;

    // The flaky daemon fails its probe and exits; once it can run, it is Running again.
    let failed = wait_phase(&api, "flaky", DaemonPhase::Failed, Duration::from_secs(60)).await;
    let cond = ready(&failed).unwrap_or_else(|| panic!("no Ready condition: {failed:?}"));
    assert_eq!(cond.reason, "DaemonExited", "{cond:?}");
    assert!(
        cond.message.contains("exit code 1") && cond.message.contains("not yet"),
        "{}",
        cond.message
    );
    sh(&rt, &c.name, &["/bin/sh", "-c", "echo > /tmp/healed"]).await;
    let healed = wait_phase(&api, "flaky", DaemonPhase::Running, Duration::from_secs(90)).await;
    assert_eq!(
        ready(&healed).map(|c| c.reason.as_str()),
        Some("DaemonRunning")
    );
    let st = daemon_status(&rt, &c.name, "flaky")
        .await
        .unwrap_or_else(|| panic!("no status for flaky"));
    assert!(st.daemon_running && st.state.is_some_and(|s| s.restarts > 0));

    // All along, the steady daemon ran once and stayed Running.
    let st = daemon_status(&rt, &c.name, "steady")
        .await
        .unwrap_or_else(|| panic!("no status for steady"));
    let s = st.state.unwrap_or_default();
    assert_eq!(
        (s.restarts, s.exits.len(), s.child.map(|c| c.pid)),
        (0, 0, Some(steady_pid))
    );
    let steady = api.get("steady").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        steady.status.and_then(|s| s.phase),
        Some(DaemonPhase::Running)
    );

    delete_all_and_check_nothing_is_left(
        &api,
        &rt,
        &c.name,
        &["crash", "flaky", "steady"],
        "/opt/steady/busybox",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_without_a_network_are_reached_through_exec() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let host = HostConfig {
        network_mode: Some("none".into()),
        ..Default::default()
    };
    let c = TestContainer::httpd(rt.client(), "127.0.0.1:3000", None, host).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // The operator allows daemons from /bin (busybox).
    let server = server_with(state.path(), &[("PREVIEWD_DAEMON_SOURCE_DIRS", "/bin")]);
    let api: Api<DaemonInjection> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &injection("isolated", &c.name))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let di = wait_phase(
        &api,
        "isolated",
        DaemonPhase::Running,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(di.status.and_then(|s| s.endpoint).as_deref(), Some("exec"));

    // A user daemon there is checked through exec too, and its supervisor is adopted, not
    // replaced: only a supervisor that kept running counts restarts in the status.
    let crash: DaemonInjection = serde_json::from_value(serde_json::json!({
        "apiVersion": "previewd.dev/v1alpha1", "kind": "DaemonInjection",
        "metadata": {"name": "isolated-crash"},
        "spec": {"target": {"docker": {"container": c.name}}, "daemon": {
            "source": {"hostPath": "/bin/busybox"},
            "installPath": "/.previewd/default.isolated-crash/busybox",
            "args": ["sh", "-c", "echo gone; exit 5"]
        }}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    api.create(&PostParams::default(), &crash)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let failed = wait_phase(
        &api,
        "isolated-crash",
        DaemonPhase::Failed,
        Duration::from_secs(60),
    )
    .await;
    let st = failed.status.clone().unwrap_or_default();
    assert_eq!(st.endpoint.as_deref(), Some("exec"));
    assert_eq!(
        ready(&failed).map(|c| c.reason.as_str()),
        Some("DaemonExited")
    );
    let recounted = eventually(
        Duration::from_secs(40),
        "isolated-crash's status to count restarts",
        || {
            let api = api.clone();
            async move {
                let o = api.get("isolated-crash").await.ok()?;
                let c = ready(&o)?;
                (c.message.contains("exit code 5") && c.message.contains("(restarted "))
                    .then_some(o)
            }
        },
    )
    .await;
    let again = recounted.status.unwrap_or_default();
    assert_eq!(
        (again.injected_at, again.restarts),
        (st.injected_at, st.restarts),
        "injected again instead of adopted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_docker_targets_report_docker_unavailable() {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = Server::start_with(
        state.path(),
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    let api: Api<DaemonInjection> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &injection("nodocker", "web"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let di = wait_phase(
        &api,
        "nodocker",
        DaemonPhase::Failed,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        ready(&di).map(|c| c.reason.as_str()),
        Some("DockerUnavailable")
    );
    // The API keeps serving, and the failure is counted by reason (once the reconcile that
    // wrote the status has returned its error: that comes just after the write).
    let failures = r#"previewd_reconcile_failures_total{controller="daemoninjection",reason="DockerUnavailable"}"#;
    eventually(Duration::from_secs(10), "the failure to be counted", || {
        let client = server.client();
        async move {
            let req = http::Request::get("/metrics")
                .body(Vec::new())
                .unwrap_or_default();
            let text = client
                .request_text(req)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            text.contains(failures).then_some(())
        }
    })
    .await;
}

/// A PreviewLink manifest: target container and port, plus `extra` spec fields.
pub fn link(name: &str, container: &str, port: i32, extra: serde_json::Value) -> PreviewLink {
    let mut spec =
        serde_json::json!({"target": {"docker": {"container": container}}, "port": port});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "previewd.dev/v1alpha1", "kind": "PreviewLink",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until a link reports `phase` (and returns it); on timeout, says the status it had.
/// The bound is generous: on a fresh CI machine the browser tests build and import their
/// apps' image (debootstrap, pip, `docker import`) while these run, and the engine's uploads
/// and execs then crawl (a link of 83e6097's CI run was still not Ready after 60 s, with
/// nothing failed in previewd's log).
pub async fn wait_link(api: &Api<PreviewLink>, name: &str, phase: LinkPhase) -> PreviewLink {
    let limit = Duration::from_secs(120);
    let deadline = std::time::Instant::now() + limit;
    loop {
        let got = api.get(name).await;
        if let Ok(link) = &got
            && link.status.as_ref().and_then(|s| s.phase) == Some(phase)
        {
            return link.clone();
        }
        if std::time::Instant::now() > deadline {
            let last = got.map(|l| l.status);
            panic!(
                "timed out after {limit:?} waiting for link {name} to be {phase:?}; it has {last:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_links_share_an_agent_hold_a_token_hash_and_clean_up() {
    let Some(rt) = docker().await else { return };
    images(rt.client()).await;
    let local =
        TestContainer::httpd(rt.client(), "127.0.0.1:3000", None, HostConfig::default()).await;
    let public =
        TestContainer::httpd(rt.client(), "0.0.0.0:8080", None, HostConfig::default()).await;
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = server_with(state.path(), crate::proxy::RELAY);
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    let injections: Api<DaemonInjection> = Api::default_namespaced(server.client());
    for l in [
        link("app", &local.name, 3000, serde_json::json!({})),
        link("app-admin", &local.name, 3000, serde_json::json!({})),
        link(
            "direct",
            &public.name,
            8080,
            serde_json::json!({"via": "direct"}),
        ),
        link(
            "brief",
            &public.name,
            8080,
            serde_json::json!({"via": "direct", "ttl": "2s"}),
        ),
    ] {
        links
            .create(&PostParams::default(), &l)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let app = wait_link(&links, "app", LinkPhase::Ready).await;
    wait_link(&links, "app-admin", LinkPhase::Ready).await;
    let st = app.status.clone().unwrap_or_default();
    assert!(
        st.upstream
            .as_deref()
            .is_some_and(|u| u.starts_with("agent://") && u.ends_with("/3000")),
        "{st:?}"
    );
    let port = server.proxy.port();
    assert_eq!(
        st.url,
        Some(format!("http://app.default.preview.localhost:{port}/"))
    );
    assert_eq!(
        st.path_url,
        Some(format!("http://127.0.0.1:{port}/p/app.default/"))
    );

    // One shared agent for both links to the container; it lists no owners (links do not
    // rewrite a growing list: the controller keeps it while links use it).
    let shared = injections
        .list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .items;
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert!(
        shared[0]
            .metadata
            .owner_references
            .as_ref()
            .is_none_or(Vec::is_empty)
    );
    assert_eq!(agent_processes(&rt, &local.name).await, 1);

    // The token is in a Secret; status holds only its SHA-256; `previewd url` gives both.
    let out = std::process::Command::new(crate::common::previewd_bin())
        .args(["url", "app", "--server", &server.url])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let token = url
        .split_once("?previewd_token=")
        .map(|(_, t)| t.to_owned())
        .unwrap_or_else(|| panic!("no token in {url:?}"));
    assert_eq!(token.len(), 43, "32 random bytes, URL-safe base64");
    assert_eq!(
        st.token_hash.as_deref(),
        Some(previewd::controller::link::token_hash(&token).as_str())
    );
    let stored = serde_json::to_string(&app).unwrap_or_default();
    assert!(
        !stored.contains(&token),
        "the plaintext token never appears in a PreviewLink"
    );

    let direct = wait_link(&links, "direct", LinkPhase::Ready).await;
    assert!(
        direct
            .status
            .and_then(|s| s.upstream)
            .is_some_and(|u| u.starts_with("http://") && u.ends_with(":8080"))
    );
    wait_link(&links, "brief", LinkPhase::Expired).await;

    // The shared agent stays while a link uses it, and goes with the last one.
    links
        .delete("app", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eventually(
        Duration::from_secs(30),
        "app to be gone with its token",
        || {
            let (links, secrets) = (
                links.clone(),
                Api::<Secret>::default_namespaced(server.client()),
            );
            async move {
                (links.get_opt("app").await.ok()?.is_none()
                    && secrets.get_opt("previewd-link-app").await.ok()?.is_none())
                .then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        injections
            .list(&Default::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(0),
        1
    );
    links
        .delete("app-admin", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eventually(
        Duration::from_secs(30),
        "the shared injection to be gone",
        || {
            let injections = injections.clone();
            async move {
                injections
                    .list(&Default::default())
                    .await
                    .ok()
                    .filter(|l| l.items.is_empty())
                    .map(|_| ())
            }
        },
    )
    .await;
    assert_eq!(
        agent_processes(&rt, &local.name).await,
        0,
        "the agent went with the last link"
    );
}

/// Deletes the injections `names`, waits until they are gone, and checks that no daemon runs
/// in `container` and that neither `/.previewd` nor the daemon installed at `installed`
/// is left.
async fn delete_all_and_check_nothing_is_left(
    api: &Api<DaemonInjection>,
    rt: &DockerRuntime,
    container: &str,
    names: &[&str],
    installed: &str,
) {
    for name in names {
        api.delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    eventually(Duration::from_secs(30), "all injections to be gone", || {
        let api = api.clone();
        async move {
            api.list(&Default::default())
                .await
                .ok()
                .filter(|l| l.items.is_empty())
                .map(|_| ())
        }
    })
    .await;
    let ps = sh(rt, container, &["/bin/ps", "-o", "args"]).await;
    assert!(
        !ps.contains("/.previewd/") && !ps.contains(installed),
        "daemons left running: {ps}"
    );
    let files = sh(
        rt,
        container,
        &[
            "/bin/sh",
            "-c",
            &format!("ls -d /.previewd {installed} 2>&1"),
        ],
    )
    .await;
    assert!(
        files.matches("No such file").count() == 2,
        "files left behind: {files}"
    );
}

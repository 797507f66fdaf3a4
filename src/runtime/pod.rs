//! The Kubernetes implementation of [`ContainerRuntime`], over pod exec (kube `ws`).
//!
//! **Targets.** Every method takes a pod target string, `NAMESPACE/POD` or
//! `NAMESPACE/POD/CONTAINER` (see [`PodTarget`]); without a container the pod's first
//! container is meant, as with `kubectl exec`. [`ContainerInfo::name`] is the canonical
//! three-part form of what `resolve` found, which is what later calls should be given;
//! [`ContainerInfo::id`] is the container status's `containerID`, which changes when the
//! container restarts.
//!
//! **Uploads** stream the files over the exec's stdin, because the API server has no archive
//! endpoint: into `tar -x -f - -C /` when the container has tar, else into
//! `sh -c 'mkdir -p DIR && cat > TMP && chmod MODE TMP && mv -f TMP PATH'`, else they fail
//! with [`RuntimeError::NoInjectionMethod`]. Whether tar and sh exist is asked first with
//! input-less execs (`tar --help`, `sh -c 'exit 0'`; "cannot run" is an exec failure status
//! or exit code 126/127), never by streaming megabytes into a command that may be missing. tar and `cat` stop at end of input, which needs
//! the `v5.channel.k8s.io` subprotocol's stdin half-close. An API server that only speaks
//! `v4.channel.k8s.io` can only close the whole connection, losing the exit status, so there
//! every file is written by `sh -c '… head -c SIZE > TMP …'`, which stops by itself after
//! exactly the file's bytes (tar cannot: busybox tar reads to end of input and GNU tar to the
//! end of a 10 KiB record). The subprotocol is learnt once per runtime from one probe
//! connection.
//!
//! **Exec.** Kubernetes exec has no environment and no user: processes run as the
//! container's user, and [`ExecSpec::user`] is not honoured (logged at debug level). A
//! non-empty [`ExecSpec::env`] is sent over stdin to a `sh` wrapper that exports it and
//! `exec`s the command, so secrets never appear in a command line; that needs `sh`.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::api::{AttachParams, AttachedProcess};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::io::{ReadHalf, SimplexStream, WriteHalf};

use super::docker::RESYNC;
use super::{
    CALL_TIMEOUT, ContainerEvent, ContainerInfo, ContainerRuntime, EXEC_TIMEOUT, EventStream,
    ExecOutput, ExecSpec, ExecStdio, FileUpload, MAX_EXEC_OUTPUT, RuntimeError, StartupOutput,
    bounded,
};
use crate::resources::scoped_api;

/// Bound on one upload (the agent is a few MB over a WebSocket).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// Buffer between the exec's WebSocket task and previewd, per stream.
const PIPE_BYTES: usize = 64 * 1024;

/// Writes one file from stdin (v5: until end of input), replacing the old file by rename so
/// a running binary is never written into. `$1` directory, `$2` path, `$3` octal mode.
const CAT_SCRIPT: &str = r#"mkdir -p "$1" && cat > "$2.previewd-new" && chmod "$3" "$2.previewd-new" && mv -f "$2.previewd-new" "$2""#;
/// As [`CAT_SCRIPT`], but reads exactly `$4` bytes (v4: stdin is never half-closed).
const HEAD_SCRIPT: &str = r#"mkdir -p "$1" && head -c "$4" > "$2.previewd-new" && chmod "$3" "$2.previewd-new" && mv -f "$2.previewd-new" "$2""#;
/// Reads `NAME=value` lines from stdin up to an empty line, exports them, and runs the
/// command (`sh` reads a pipe byte by byte, so nothing after the empty line is consumed).
const ENV_SCRIPT: &str = r#"while IFS= read -r previewd_kv && [ -n "$previewd_kv" ]; do export "$previewd_kv"; done; exec "$@""#;

/// A container in a pod, parsed from `NAMESPACE/POD[/CONTAINER]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTarget {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The container's name; the pod's first container when `None`.
    pub container: Option<String>,
}

impl PodTarget {
    /// Names a container of a pod (the first one when `container` is `None`), so callers
    /// need not format target strings themselves.
    pub fn new(namespace: &str, pod: &str, container: Option<&str>) -> Self {
        PodTarget {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            container: container.map(str::to_owned),
        }
    }
}

impl FromStr for PodTarget {
    type Err = RuntimeError;

    /// Parses `NAMESPACE/POD` or `NAMESPACE/POD/CONTAINER`; each part non-empty.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || RuntimeError::InvalidTarget(s.to_owned());
        let mut parts = s.split('/');
        let namespace = parts.next().filter(|p| !p.is_empty()).ok_or_else(invalid)?;
        let pod = parts.next().filter(|p| !p.is_empty()).ok_or_else(invalid)?;
        let container = match parts.next() {
            None => None,
            Some(c) if !c.is_empty() => Some(c),
            Some(_) => return Err(invalid()),
        };
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(PodTarget::new(namespace, pod, container))
    }
}

impl fmt::Display for PodTarget {
    /// The target string this parses from.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.pod)?;
        match &self.container {
            Some(c) => write!(f, "/{c}"),
            None => Ok(()),
        }
    }
}

/// Pod targets reached through a Kubernetes API server's `pods/exec`.
#[derive(Clone)]
pub struct PodRuntime {
    client: Client,
    /// Where its pod watch looks (`None`: all namespaces), as `--namespace` says.
    watched: Option<String>,
    /// Whether the API server's exec subprotocol can half-close stdin (v5), once known.
    stream_close: std::sync::Arc<tokio::sync::OnceCell<bool>>,
}

impl PodRuntime {
    /// A runtime over `client` for pods in `watched` (`None`: all namespaces); it needs
    /// `pods` get/list/watch and `pods/exec` get+create there.
    pub fn new(client: Client, watched: Option<&str>) -> Self {
        PodRuntime {
            client,
            watched: watched.map(str::to_owned),
            stream_close: std::sync::Arc::new(tokio::sync::OnceCell::new()),
        }
    }

    fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Whether exec stdin can be half-closed (`v5.channel.k8s.io`), learnt once from a probe
    /// connection (running `true`, whose outcome does not matter).
    pub async fn supports_stdin_close(&self, target: &PodTarget) -> Result<bool, RuntimeError> {
        self.stream_close
            .get_or_try_init(|| async {
                let url = Pod::url_path(&(), Some(&target.namespace));
                let mut ap = AttachParams::default().stderr(false);
                if let Some(c) = &target.container {
                    ap = ap.container(c);
                }
                let request = kube::core::Request::new(url)
                    .exec(&target.pod, ["true"], &ap)
                    .map_err(|e| RuntimeError::Engine {
                        action: "probe the exec protocol",
                        message: e.to_string(),
                    })?;
                let connection = tokio::time::timeout(CALL_TIMEOUT, self.client.connect(request))
                    .await
                    .map_err(|_| RuntimeError::Timeout("probe the exec protocol"))?
                    .map_err(|e| classify(&target.to_string(), "probe the exec protocol", e))?;
                Ok(connection.supports_stream_close())
            })
            .await
            .copied()
    }

    /// Starts `argv` in the target's container with stdout and stderr attached.
    async fn start(
        &self,
        target: &PodTarget,
        argv: Vec<String>,
        stdin: bool,
        action: &'static str,
    ) -> Result<AttachedProcess, RuntimeError> {
        let mut ap = AttachParams::default()
            .stdin(stdin)
            .stdout(true)
            .stderr(true)
            .max_stdin_buf_size(PIPE_BYTES)
            .max_stdout_buf_size(PIPE_BYTES)
            .max_stderr_buf_size(PIPE_BYTES);
        if let Some(c) = &target.container {
            ap = ap.container(c);
        }
        tokio::time::timeout(
            CALL_TIMEOUT,
            self.pods(&target.namespace).exec(&target.pod, argv, &ap),
        )
        .await
        .map_err(|_| RuntimeError::Timeout(action))?
        .map_err(|e| classify(&target.to_string(), action, e))
    }

    /// Runs `spec` (with its environment) to completion.
    async fn run(
        &self,
        target: &PodTarget,
        spec: &ExecSpec,
        action: &'static str,
    ) -> Result<ExecOutput, RuntimeError> {
        let (argv, env) = with_env(spec)?;
        let half_close = match env {
            Some(_) => self.supports_stdin_close(target).await?,
            None => true,
        };
        let process = self.start(target, argv, env.is_some(), action).await?;
        finish(process, env.as_deref(), half_close, action).await
    }

    /// Whether the container can run `argv[0]` at all (any exit but "cannot run"), asked
    /// with a command that takes no input before any upload is streamed into it: kube stops
    /// reading the connection while a stdin write is blocked, so a command that is missing
    /// while megabytes are being sent to it can lose its status.
    async fn has(&self, target: &PodTarget, argv: &[&str]) -> Result<bool, RuntimeError> {
        let argv = argv.iter().map(|a| (*a).to_owned()).collect();
        let process = self
            .start(target, argv, false, "look for a command")
            .await?;
        let out = finish(process, None, true, "look for a command").await?;
        if not_found(&out) {
            tracing::debug!(stderr = %out.stderr, "a command is missing in the container");
        }
        Ok(!not_found(&out))
    }
}

/// Maps a kube error for an operation on `target`. Refused exec upgrades arrive as API
/// errors too (kube reads their `Status` bodies).
fn classify(target: &str, action: &'static str, e: kube::Error) -> RuntimeError {
    match e {
        kube::Error::Api(s)
            if s.code == 404
                || s.message.contains("is not valid for pod")
                || s.message.contains("container not found") =>
        {
            RuntimeError::ContainerNotFound(target.to_owned())
        }
        kube::Error::Api(s) => RuntimeError::Engine {
            action,
            message: s.message,
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            RuntimeError::Unavailable(e.to_string())
        }
        other => RuntimeError::Engine {
            action,
            message: other.to_string(),
        },
    }
}

/// The argv to run and the stdin prefix carrying the environment (see [`ENV_SCRIPT`]). A
/// requested user cannot be honoured (exec has no user), which is only logged.
fn with_env(spec: &ExecSpec) -> Result<(Vec<String>, Option<Vec<u8>>), RuntimeError> {
    if spec.user.is_some() {
        tracing::debug!(user = ?spec.user, "pod exec runs as the container's user");
    }
    if spec.env.is_empty() {
        return Ok((spec.argv.clone(), None));
    }
    let mut block = Vec::new();
    for kv in &spec.env {
        if kv.is_empty() || kv.contains('\n') || !kv.contains('=') {
            return Err(RuntimeError::Engine {
                action: "pass the environment",
                message: format!("{kv:?} is not a one-line NAME=value pair"),
            });
        }
        block.extend_from_slice(kv.as_bytes());
        block.push(b'\n');
    }
    block.push(b'\n');
    let mut argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        ENV_SCRIPT.to_owned(),
        "previewd-env".to_owned(),
    ];
    argv.extend(spec.argv.iter().cloned());
    Ok((argv, Some(block)))
}

/// Reads `reader` to its end, keeping at most [`MAX_EXEC_OUTPUT`] bytes (draining the rest so
/// the exec's task never blocks on a full pipe).
async fn drain(reader: Option<ReadHalf<SimplexStream>>) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut reader) = reader else {
        return kept;
    };
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = MAX_EXEC_OUTPUT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    kept
}

/// The exit code a finished exec reported: 0 for `Success`, the `ExitCode` cause for
/// `NonZeroExitCode`, and 127/126 (as Docker reports them) when the runtime could not start
/// the command at all. No status (the connection ended first) is an error.
fn exit_code(status: Option<&Status>, action: &'static str) -> Result<i64, RuntimeError> {
    let Some(status) = status else {
        return Err(RuntimeError::Engine {
            action,
            message: "the exec ended without reporting an exit status".into(),
        });
    };
    if status.status.as_deref() == Some("Success") {
        return Ok(0);
    }
    let message = status.message.clone().unwrap_or_default();
    if status.reason.as_deref() == Some("NonZeroExitCode") {
        let code = status
            .details
            .as_ref()
            .and_then(|d| d.causes.as_ref())
            .and_then(|causes| {
                causes
                    .iter()
                    .find(|c| c.reason.as_deref() == Some("ExitCode"))
                    .and_then(|c| c.message.as_deref())
                    .and_then(|m| m.trim().parse::<i64>().ok())
            });
        return code.ok_or(RuntimeError::Engine {
            action,
            message: format!("a non-zero exit without a readable exit code: {message}"),
        });
    }
    let lower = message.to_ascii_lowercase();
    if lower.contains("not found") || lower.contains("no such file") {
        Ok(127)
    } else if lower.contains("permission denied") {
        Ok(126)
    } else {
        Err(RuntimeError::Engine { action, message })
    }
}

/// Feeds `input` (if any), waits for the status while draining both outputs, and joins the
/// exec. The status channel is taken before anything is written. With `half_close` (v5)
/// stdin is closed right after the input, so commands that read to end of input finish;
/// without it (v4, where closing stdin closes the whole connection and loses the status)
/// stdin stays open until the status has arrived, so only commands that stop by themselves
/// may be given input.
async fn finish(
    mut process: AttachedProcess,
    input: Option<&[u8]>,
    half_close: bool,
    action: &'static str,
) -> Result<ExecOutput, RuntimeError> {
    let status = process.take_status().ok_or(RuntimeError::Engine {
        action,
        message: "the exec has no status channel".into(),
    })?;
    let stdin = process.stdin();
    let (stdout, stderr) = (process.stdout(), process.stderr());
    let io = async move {
        let mut status = std::pin::pin!(status);
        let mut held = None;
        if let (Some(input), Some(mut stdin)) = (input, stdin) {
            // A command that exits early (tar missing) stops kube reading the pipe, which
            // would leave this write pending forever: its status ends the write instead.
            let written = tokio::select! {
                w = stdin.write_all(input) => Ok(w),
                early = &mut status => Err(early),
            };
            match written {
                Err(early) => return early,
                Ok(Err(e)) => tracing::debug!(error = %e, "the exec stopped reading its input"),
                Ok(Ok(())) => {}
            }
            if half_close {
                // Dropping alone is not enough: the pipe's reader lives in the same
                // `SimplexStream`, so only a shutdown ends kube's stdin stream ([255, 0]).
                if let Err(e) = stdin.shutdown().await {
                    tracing::debug!(error = %e, "closing the exec's input failed");
                }
            } else {
                held = Some(stdin);
            }
        }
        let status = status.await;
        drop(held);
        status
    };
    let (status, stdout, stderr) = tokio::join!(io, drain(stdout), drain(stderr));
    if let Err(e) = process.join().await {
        tracing::debug!(error = %e, "the exec's stream ended with an error");
    }
    let exit_code = exit_code(status.as_ref(), action)?;
    let mut stderr = String::from_utf8_lossy(&stderr).into_owned();
    if exit_code >= 126
        && let Some(message) = status.as_ref().and_then(|s| s.message.as_deref())
        && status.as_ref().and_then(|s| s.reason.as_deref()) != Some("NonZeroExitCode")
    {
        stderr.push_str(message);
    }
    Ok(ExecOutput {
        exit_code,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr,
    })
}

/// Whether a finished exec says its command does not exist in the container.
fn not_found(out: &ExecOutput) -> bool {
    out.exit_code == 126 || out.exit_code == 127
}

/// The upload error for a command that ran and failed.
fn upload_failed(target: &str, how: &str, out: &ExecOutput) -> RuntimeError {
    if out
        .stderr
        .to_ascii_lowercase()
        .contains("read-only file system")
    {
        return RuntimeError::ReadOnlyRootfs(target.to_owned());
    }
    RuntimeError::Engine {
        action: "upload files",
        message: format!(
            "{how} exited with code {}: {}",
            out.exit_code,
            out.stderr.trim()
        ),
    }
}

fn parent(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((dir, _)) => dir,
    }
}

impl ContainerRuntime for PodRuntime {
    async fn resolve(&self, container: &str) -> Result<ContainerInfo, RuntimeError> {
        let target: PodTarget = container.parse()?;
        let pod = tokio::time::timeout(
            CALL_TIMEOUT,
            self.pods(&target.namespace).get_opt(&target.pod),
        )
        .await
        .map_err(|_| RuntimeError::Timeout("get the pod"))?
        .map_err(|e| classify(container, "get the pod", e))?
        .ok_or_else(|| RuntimeError::ContainerNotFound(container.to_owned()))?;
        let spec = pod
            .spec
            .as_ref()
            .ok_or_else(|| RuntimeError::ContainerNotFound(container.to_owned()))?;
        let declared = match &target.container {
            Some(name) => spec.containers.iter().find(|c| &c.name == name),
            None => spec.containers.first(),
        }
        .ok_or_else(|| RuntimeError::ContainerNotFound(container.to_owned()))?;
        let status = pod.status.as_ref();
        let phase = status
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Unknown".into());
        let cstatus = status
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|all| all.iter().find(|c| c.name == declared.name));
        let cstate = cstatus.and_then(|c| c.state.as_ref());
        let running_state = cstate.and_then(|s| s.running.as_ref());
        let state = if let Some(waiting) = cstate.and_then(|s| s.waiting.as_ref()) {
            format!(
                "waiting: {}",
                waiting.reason.as_deref().unwrap_or("unknown")
            )
        } else if let Some(done) = cstate.and_then(|s| s.terminated.as_ref()) {
            format!(
                "terminated: {}",
                done.reason.as_deref().unwrap_or("unknown")
            )
        } else if running_state.is_some() && phase == "Running" {
            "running".to_owned()
        } else {
            format!("pod {}", phase.to_ascii_lowercase())
        };
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
            .unwrap_or_default();
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            && !ips.contains(&ip)
        {
            ips.insert(0, ip);
        }
        ips.dedup();
        let canonical = PodTarget::new(&target.namespace, &target.pod, Some(&declared.name));
        Ok(ContainerInfo {
            id: cstatus
                .and_then(|c| c.container_id.clone())
                .unwrap_or_default(),
            name: canonical.to_string(),
            handle: canonical.to_string(),
            running: phase == "Running" && running_state.is_some(),
            state,
            started_at: running_state
                .and_then(|r| r.started_at.as_ref())
                .map(|t| t.0.to_string()),
            read_only_rootfs: declared
                .security_context
                .as_ref()
                .and_then(|s| s.read_only_root_filesystem)
                .unwrap_or(false),
            ips,
            // The pod's processes are on a node, not in previewd's /proc.
            pid: None,
        })
    }

    async fn upload(&self, container_id: &str, files: &[FileUpload]) -> Result<(), RuntimeError> {
        let target: PodTarget = container_id.parse()?;
        let work = async {
            let half_close = self.supports_stdin_close(&target).await?;
            if half_close && self.has(&target, &["tar", "--help"]).await? {
                let tar = super::docker::archive(files)?;
                let argv = ["tar", "-x", "-f", "-", "-C", "/"]
                    .map(str::to_owned)
                    .to_vec();
                let process = self.start(&target, argv, true, "upload files").await?;
                let out = finish(process, Some(&tar), true, "upload files").await?;
                return match out.exit_code {
                    0 => Ok(()),
                    _ => Err(upload_failed(container_id, "tar", &out)),
                };
            }
            if !self.has(&target, &["sh", "-c", "exit 0"]).await? {
                let why = if half_close {
                    "the container has neither tar nor sh"
                } else {
                    "the container has no sh, and the API server's exec protocol (v4.channel.k8s.io) cannot signal the end of an upload to tar"
                };
                return Err(RuntimeError::NoInjectionMethod {
                    container: container_id.to_owned(),
                    why: why.to_owned(),
                });
            }
            for f in files {
                let mode = format!("{:o}", f.mode);
                let size = f.contents.len().to_string();
                let (script, mut argv) = if half_close {
                    (CAT_SCRIPT, Vec::new())
                } else {
                    (HEAD_SCRIPT, vec![size])
                };
                let mut full = vec![
                    "sh".to_owned(),
                    "-c".to_owned(),
                    script.to_owned(),
                    "previewd-upload".to_owned(),
                    parent(&f.path).to_owned(),
                    f.path.clone(),
                    mode,
                ];
                full.append(&mut argv);
                let process = self.start(&target, full, true, "upload files").await?;
                let out = finish(process, Some(&f.contents), half_close, "upload files").await?;
                if out.exit_code != 0 {
                    return Err(upload_failed(container_id, "sh", &out));
                }
            }
            Ok(())
        };
        bounded(UPLOAD_TIMEOUT, "upload files", work).await
    }

    async fn exec(&self, container_id: &str, spec: &ExecSpec) -> Result<ExecOutput, RuntimeError> {
        let target: PodTarget = container_id.parse()?;
        bounded(
            EXEC_TIMEOUT,
            "finish a command",
            self.run(&target, spec, "run a command"),
        )
        .await
    }

    async fn exec_until_ready(
        &self,
        container_id: &str,
        spec: &ExecSpec,
        ready_prefix: &str,
    ) -> Result<String, RuntimeError> {
        let action = "start a daemon";
        let target: PodTarget = container_id.parse()?;
        let wait = async {
            let (argv, env) = with_env(spec)?;
            let mut process = self.start(&target, argv, env.is_some(), action).await?;
            let status = process.take_status();
            // stdin (the daemon's too) stays open until previewd detaches: a daemon needs no
            // end of input, and on v4 closing stdin would close the connection.
            let mut held_stdin = None;
            if let (Some(env), Some(mut stdin)) = (env, process.stdin()) {
                stdin
                    .write_all(&env)
                    .await
                    .map_err(|e| RuntimeError::Engine {
                        action,
                        message: format!("cannot pass the environment: {e}"),
                    })?;
                held_stdin = Some(stdin);
            }
            let mut outputs = futures::stream::select(
                tokio_util::io::ReaderStream::new(process.stdout().ok_or(
                    RuntimeError::Engine {
                        action,
                        message: "the exec has no stdout".into(),
                    },
                )?),
                tokio_util::io::ReaderStream::new(process.stderr().ok_or(
                    RuntimeError::Engine {
                        action,
                        message: "the exec has no stderr".into(),
                    },
                )?),
            );
            let mut seen = StartupOutput::default();
            while let Some(Ok(chunk)) = outputs.next().await {
                if let Some(line) = seen.push(&chunk, ready_prefix) {
                    // Dropping the process closes the connection: previewd detaches and
                    // the daemon keeps running.
                    drop(held_stdin);
                    return Ok(line);
                }
            }
            drop(held_stdin);
            let exit = match status {
                Some(status) => exit_code(status.await.as_ref(), action)
                    .map_or_else(|e| e.to_string(), |c| c.to_string()),
                None => "unknown".into(),
            };
            Err(seen.not_ready(action, &exit))
        };
        bounded(CALL_TIMEOUT, "report the daemon ready", wait).await
    }

    async fn exec_stdio(
        &self,
        container_id: &str,
        spec: &ExecSpec,
    ) -> Result<ExecStdio, RuntimeError> {
        let action = "attach to a process";
        let target: PodTarget = container_id.parse()?;
        let (argv, env) = with_env(spec)?;
        let mut process = self.start(&target, argv, true, action).await?;
        let mut stdin = process.stdin().ok_or(RuntimeError::Engine {
            action,
            message: "the exec has no stdin".into(),
        })?;
        let stdout = process.stdout().ok_or(RuntimeError::Engine {
            action,
            message: "the exec has no stdout".into(),
        })?;
        if let Some(mut stderr) = process.stderr() {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tracing::debug!(stderr = %String::from_utf8_lossy(&buf[..n]), "exec tunnel stderr");
                }
            });
        }
        if let Some(env) = env {
            tokio::time::timeout(CALL_TIMEOUT, stdin.write_all(&env))
                .await
                .map_err(|_| RuntimeError::Timeout(action))?
                .map_err(|e| RuntimeError::Engine {
                    action,
                    message: format!("cannot pass the environment: {e}"),
                })?;
        }
        Ok(Box::pin(PodStdio {
            stdout,
            stdin,
            _process: process,
        }))
    }

    fn events(&self) -> EventStream {
        let api: Api<Pod> = scoped_api(self.client.clone(), self.watched.as_deref());
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .filter_map(|event| async move {
                match event {
                    Ok(watcher::Event::Apply(pod)) => {
                        Some(futures::stream::iter(pod_events(&pod, "changed")))
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        Some(futures::stream::iter(pod_events(&pod, "deleted")))
                    }
                    // A (re-)list: events may have been missed, so everything is re-checked.
                    Ok(watcher::Event::InitDone) => {
                        Some(futures::stream::iter(vec![ContainerEvent {
                            id: String::new(),
                            name: String::new(),
                            action: RESYNC.into(),
                        }]))
                    }
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "pod watch failed; retrying");
                        None
                    }
                }
            })
            .flatten();
        Box::pin(stream)
    }
}

/// One event per container of `pod`, named by its target string, with its current
/// `containerID` (empty when it has none yet).
fn pod_events(pod: &Pod, action: &str) -> Vec<ContainerEvent> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref());
    pod.spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|c| ContainerEvent {
            id: statuses
                .and_then(|all| all.iter().find(|s| s.name == c.name))
                .and_then(|s| s.container_id.clone())
                .unwrap_or_default(),
            name: PodTarget::new(&namespace, &name, Some(&c.name)).to_string(),
            action: action.to_owned(),
        })
        .collect()
}

/// An exec's stdout and stdin as one byte stream; owns the exec, whose drop closes the
/// connection. Shutting the write side down half-closes the process's stdin (on v5; on v4
/// it closes the connection).
struct PodStdio {
    stdout: ReadHalf<SimplexStream>,
    stdin: WriteHalf<SimplexStream>,
    _process: AttachedProcess,
}

impl AsyncRead for PodStdio {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

impl AsyncWrite for PodStdio {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stdin).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{StatusCause, StatusDetails};

    #[test]
    fn targets_parse_and_print() {
        let t: PodTarget = "ns/web/app".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t, PodTarget::new("ns", "web", Some("app")));
        assert_eq!(t.to_string(), "ns/web/app");
        let t: PodTarget = "ns/web".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.container, None);
        assert_eq!(t.to_string(), "ns/web");
        for bad in [
            "",
            "web",
            "/web",
            "ns/",
            "ns//app",
            "ns/web/",
            "ns/web/app/x",
        ] {
            assert!(
                matches!(
                    bad.parse::<PodTarget>(),
                    Err(RuntimeError::InvalidTarget(_))
                ),
                "{bad:?} should not parse"
            );
        }
    }

    fn failure(reason: &str, message: &str, code: Option<&str>) -> Status {
        Status {
            status: Some("Failure".into()),
            reason: Some(reason.into()),
            message: Some(message.into()),
            details: code.map(|c| StatusDetails {
                causes: Some(vec![StatusCause {
                    reason: Some("ExitCode".into()),
                    message: Some(c.into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn statuses_become_exit_codes() {
        let ok = Status {
            status: Some("Success".into()),
            ..Default::default()
        };
        assert_eq!(exit_code(Some(&ok), "x").ok(), Some(0));
        let three = failure("NonZeroExitCode", "exit code 3", Some("3"));
        assert_eq!(exit_code(Some(&three), "x").ok(), Some(3));
        let missing = failure(
            "InternalError",
            "exec: \"tar\": executable file not found in $PATH: unknown",
            None,
        );
        assert_eq!(exit_code(Some(&missing), "x").ok(), Some(127));
        let odd = failure("InternalError", "the node is on fire", None);
        assert!(matches!(
            exit_code(Some(&odd), "x"),
            Err(RuntimeError::Engine { .. })
        ));
        assert!(exit_code(None, "x").is_err());
    }

    #[test]
    fn environments_travel_on_stdin_not_in_argv() {
        let spec = ExecSpec {
            argv: vec!["/.previewd/agent".into(), "serve".into()],
            env: vec!["SECRET=s3cr3t".into()],
            user: None,
        };
        let (argv, block) = with_env(&spec).unwrap_or_else(|e| panic!("{e}"));
        assert!(argv.iter().all(|a| !a.contains("s3cr3t")));
        assert_eq!(&argv[argv.len() - 2..], ["/.previewd/agent", "serve"]);
        assert_eq!(block.as_deref(), Some(&b"SECRET=s3cr3t\n\n"[..]));
        let bad = ExecSpec {
            env: vec!["A=1\nB=2".into()],
            ..spec
        };
        assert!(with_env(&bad).is_err());
    }

    #[test]
    fn parents_of_paths() {
        assert_eq!(parent("/.previewd/web/agent"), "/.previewd/web");
        assert_eq!(parent("/agent"), "/");
    }
}

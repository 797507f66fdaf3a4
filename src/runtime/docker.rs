//! The Docker implementation of [`ContainerRuntime`], over the Engine API (bollard).
//!
//! Files go in through the archive API (`PUT /containers/{id}/archive`): dockerd unpacks the
//! tar itself, so the container needs neither a shell nor tar. Processes are started with
//! exec. Engine errors are matched on their message where codes differ between engine
//! versions (a read-only rootfs is 500, 403 or 400 depending on the release).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::exec::StartExecResults;
use bollard::models::{ContainerStateStatusEnum, ExecConfig};
use bollard::query_parameters::{EventsOptionsBuilder, UploadToContainerOptionsBuilder};
use futures::StreamExt;
use tokio_util::io::StreamReader;

use super::{
    CALL_TIMEOUT, ContainerEvent, ContainerInfo, ContainerRuntime, EXEC_TIMEOUT, EventStream,
    ExecOutput, ExecSpec, ExecStdio, FileUpload, MAX_EXEC_OUTPUT, RuntimeError, StartupOutput,
    bounded,
};

/// A connection to a Docker engine (`DOCKER_HOST`, else the local socket).
#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    /// Connects and negotiates the API version; fails when the engine cannot be reached.
    pub async fn connect() -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_defaults()
            .map_err(|e| RuntimeError::Unavailable(e.to_string()))?;
        let docker = tokio::time::timeout(CALL_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| RuntimeError::Timeout("answer the version negotiation"))?
            .map_err(|e| RuntimeError::Unavailable(e.to_string()))?;
        Ok(DockerRuntime { docker })
    }

    /// The underlying client, for callers that need engine calls previewd does not wrap.
    pub fn client(&self) -> &Docker {
        &self.docker
    }
}

/// Maps an engine error for an operation on `container`.
fn classify(container: &str, action: &'static str, e: DockerError) -> RuntimeError {
    match e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => {
            let lower = message.to_ascii_lowercase();
            if lower.contains("read-only") || lower.contains("read only") {
                RuntimeError::ReadOnlyRootfs(container.to_owned())
            } else if lower.contains("multiple ids found with provided prefix") {
                RuntimeError::AmbiguousContainer(container.to_owned())
            } else if status_code == 404 && lower.contains("container") {
                RuntimeError::ContainerNotFound(container.to_owned())
            } else if status_code == 409
                && (lower.contains("not running")
                    || lower.contains("paused")
                    || lower.contains("restarting"))
            {
                let state = if lower.contains("paused") {
                    "paused"
                } else if lower.contains("restarting") {
                    "restarting"
                } else {
                    "not running"
                };
                RuntimeError::ContainerNotRunning {
                    container: container.to_owned(),
                    state: state.to_owned(),
                }
            } else {
                RuntimeError::Engine { action, message }
            }
        }
        DockerError::RequestTimeoutError => RuntimeError::Timeout(action),
        DockerError::IOError { .. }
        | DockerError::HyperResponseError { .. }
        | DockerError::SocketNotFoundError(_) => RuntimeError::Unavailable(e.to_string()),
        other => RuntimeError::Engine {
            action,
            message: other.to_string(),
        },
    }
}

/// Whether the process `pid` (a container's, as the engine reports it) is in previewd's own
/// network namespace. Unknowable when previewd runs in a container of its own (the pid is
/// another namespace's): callers then treat it as not shared.
fn shares_my_network(pid: i64) -> std::io::Result<bool> {
    let Ok(pid @ 1..) = u32::try_from(pid) else {
        return Ok(false);
    };
    Ok(Some(super::netns::inode_of(pid)?) == super::netns::own_inode())
}

/// The largest piece of an upload handed to the engine's HTTP client at once. hyper copies
/// each body chunk whole into its write buffer (the engine's socket takes no vectored
/// writes), and the buffer keeps its size: one chunk as large as the agent cost a copy of
/// the agent per upload in flight (heaptrack: 700 MB of `WriteBuf::buffer` at the peak of
/// 60 injections of a 23 MB debug agent).
const UPLOAD_CHUNK: usize = 64 * 1024;

/// `pieces` cut into [`UPLOAD_CHUNK`]s, as slices of the same memory.
fn in_chunks(pieces: Vec<bytes::Bytes>) -> Vec<bytes::Bytes> {
    pieces
        .into_iter()
        .flat_map(|piece| {
            (0..piece.len())
                .step_by(UPLOAD_CHUNK)
                .map(move |at| piece.slice(at..piece.len().min(at + UPLOAD_CHUNK)))
        })
        .collect()
}

/// Builds the tar unpacked at `/` (by dockerd, or by tar in a pod): parent directories
/// (0755, root-owned) and the files (root-owned, with their modes).
pub(super) fn archive(files: &[FileUpload]) -> Result<Vec<u8>, RuntimeError> {
    Ok(archive_pieces(files)?.concat())
}

/// The same tar as [`archive`], in pieces: the headers are made here, and each file's
/// contents is its own `Bytes` (shared, not copied). Two hundred containers injected at once
/// then hold one copy of the agent between them, not one each.
pub(super) fn archive_pieces(files: &[FileUpload]) -> Result<Vec<bytes::Bytes>, RuntimeError> {
    tar_pieces(files).map_err(|e| RuntimeError::Engine {
        action: "build the upload archive",
        message: e.to_string(),
    })
}

fn tar_pieces(files: &[FileUpload]) -> std::io::Result<Vec<bytes::Bytes>> {
    const BLOCK: usize = 512;
    // The builder writes the headers (and the long-name entries it needs); each file's
    // contents and padding are added as pieces of their own.
    let mut builder = tar::Builder::new(Vec::new());
    let mut pieces = Vec::new();
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut dirs: Vec<String> = Vec::new();
    for f in files {
        let rel = f.path.trim_start_matches('/');
        let mut prefix = String::new();
        for part in rel
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            prefix.push_str(part);
            prefix.push('/');
            if !dirs.contains(&prefix) {
                dirs.push(prefix.clone());
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_uid(0);
                h.set_gid(0);
                h.set_size(0);
                h.set_mtime(mtime);
                builder.append_data(&mut h, &prefix, std::io::empty())?;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(f.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(f.contents.len() as u64);
        h.set_mtime(mtime);
        // With no data given, the builder writes the header alone.
        builder.append_data(&mut h, rel, std::io::empty())?;
        pieces.push(bytes::Bytes::from(std::mem::take(builder.get_mut())));
        pieces.push(f.contents.clone());
        let padding = (BLOCK - f.contents.len() % BLOCK) % BLOCK;
        if padding > 0 {
            pieces.push(bytes::Bytes::from(vec![0u8; padding]));
        }
    }
    builder.finish()?;
    pieces.push(bytes::Bytes::from(std::mem::take(builder.get_mut())));
    Ok(pieces)
}

fn exec_config(spec: &ExecSpec, stdin: bool) -> ExecConfig {
    ExecConfig {
        cmd: Some(spec.argv.clone()),
        env: Some(spec.env.clone()),
        user: spec.user.clone(),
        attach_stdin: Some(stdin),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        ..Default::default()
    }
}

impl DockerRuntime {
    /// Creates an exec (no TTY: the output stream is multiplexed and binary-safe).
    async fn create_exec(
        &self,
        container_id: &str,
        spec: &ExecSpec,
        stdin: bool,
        action: &'static str,
    ) -> Result<bollard::exec::CreateExecResults, RuntimeError> {
        bounded(CALL_TIMEOUT, action, async {
            self.docker
                .create_exec(container_id, exec_config(spec, stdin))
                .await
                .map_err(|e| classify(container_id, action, e))
        })
        .await
    }
}

impl ContainerRuntime for DockerRuntime {
    async fn resolve(&self, container: &str) -> Result<ContainerInfo, RuntimeError> {
        let c = bounded(CALL_TIMEOUT, "inspect the container", async {
            self.docker
                .inspect_container(container, None)
                .await
                .map_err(|e| classify(container, "inspect the container", e))
        })
        .await?;
        let state = c.state.as_ref();
        if let Some(gone @ (ContainerStateStatusEnum::REMOVING | ContainerStateStatusEnum::DEAD)) =
            state.and_then(|s| s.status)
        {
            return Err(RuntimeError::ContainerRemoved {
                container: container.to_owned(),
                state: gone.to_string(),
            });
        }
        let running = state.and_then(|s| s.running).unwrap_or(false)
            && !state.and_then(|s| s.paused).unwrap_or(false)
            && !state.and_then(|s| s.restarting).unwrap_or(false);
        let state_word = state
            .and_then(|s| s.status)
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unknown".into());
        let mut ips: Vec<IpAddr> = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .map(|nets| {
                let mut named: Vec<(&String, &bollard::models::EndpointSettings)> =
                    nets.iter().collect();
                // The default bridge first, then user networks by name, for stable choices.
                named.sort_by_key(|(name, _)| (name.as_str() != "bridge", name.to_string()));
                named
                    .into_iter()
                    .filter_map(|(_, ep)| ep.ip_address.as_deref().and_then(|ip| ip.parse().ok()))
                    .collect()
            })
            .unwrap_or_default();
        ips.dedup();
        // A host-network container has no address of its own: it shares the host's network
        // namespace, so when previewd runs there too the agent is reached on loopback.
        let host_network = c
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.as_deref())
            == Some("host");
        if ips.is_empty()
            && host_network
            && state
                .and_then(|s| s.pid)
                .is_some_and(|pid| shares_my_network(pid).unwrap_or(false))
        {
            ips.push(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        }
        Ok(ContainerInfo {
            id: c.id.clone().unwrap_or_default(),
            handle: c.id.clone().unwrap_or_default(),
            name: c
                .name
                .as_deref()
                .unwrap_or("")
                .trim_start_matches('/')
                .to_owned(),
            running,
            state: state_word,
            started_at: state.and_then(|s| s.started_at.clone()),
            read_only_rootfs: c
                .host_config
                .as_ref()
                .and_then(|h| h.readonly_rootfs)
                .unwrap_or(false),
            ips,
            pid: state
                .and_then(|s| s.pid)
                .and_then(|pid| u32::try_from(pid).ok())
                .filter(|pid| *pid > 0),
        })
    }

    async fn upload(&self, container_id: &str, files: &[FileUpload]) -> Result<(), RuntimeError> {
        let pieces = in_chunks(archive_pieces(files)?);
        let options = UploadToContainerOptionsBuilder::default()
            .path("/")
            .no_overwrite_dir_non_dir("true")
            .build();
        tokio::time::timeout(
            CALL_TIMEOUT * 2,
            self.docker.upload_to_container(
                container_id,
                Some(options),
                bollard::body_stream(futures::stream::iter(pieces)),
            ),
        )
        .await
        .map_err(|_| RuntimeError::Timeout("upload files"))?
        .map_err(|e| classify(container_id, "upload files", e))
    }

    async fn exec(&self, container_id: &str, spec: &ExecSpec) -> Result<ExecOutput, RuntimeError> {
        let action = "run a command";
        let created = self.create_exec(container_id, spec, false, action).await?;
        let run = async {
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            match self
                .docker
                .start_exec(&created.id, None)
                .await
                .map_err(|e| classify(container_id, action, e))?
            {
                StartExecResults::Attached { mut output, .. } => {
                    while let Some(chunk) = output.next().await {
                        match chunk.map_err(|e| classify(container_id, action, e))? {
                            bollard::container::LogOutput::StdOut { message }
                            | bollard::container::LogOutput::Console { message } => {
                                if stdout.len() < MAX_EXEC_OUTPUT {
                                    stdout.extend_from_slice(&message);
                                }
                            }
                            bollard::container::LogOutput::StdErr { message } => {
                                if stderr.len() < MAX_EXEC_OUTPUT {
                                    stderr.extend_from_slice(&message);
                                }
                            }
                            bollard::container::LogOutput::StdIn { .. } => {}
                        }
                    }
                }
                StartExecResults::Detached => {}
            }
            // The exit code can lag the end of the output stream.
            loop {
                let inspected = self
                    .docker
                    .inspect_exec(&created.id)
                    .await
                    .map_err(|e| classify(container_id, action, e))?;
                if inspected.running != Some(true) {
                    return Ok(ExecOutput {
                        exit_code: inspected.exit_code.unwrap_or(-1),
                        stdout: String::from_utf8_lossy(&stdout).into_owned(),
                        stderr: String::from_utf8_lossy(&stderr).into_owned(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        bounded(EXEC_TIMEOUT, "finish a command", run).await
    }

    async fn exec_until_ready(
        &self,
        container_id: &str,
        spec: &ExecSpec,
        ready_prefix: &str,
    ) -> Result<String, RuntimeError> {
        let action = "start a daemon";
        let created = self.create_exec(container_id, spec, false, action).await?;
        let wait = async {
            let mut seen = StartupOutput::default();
            if let StartExecResults::Attached { mut output, .. } = self
                .docker
                .start_exec(&created.id, None)
                .await
                .map_err(|e| classify(container_id, action, e))?
            {
                while let Some(chunk) = output.next().await {
                    let bytes = match chunk.map_err(|e| classify(container_id, action, e))? {
                        bollard::container::LogOutput::StdOut { message }
                        | bollard::container::LogOutput::StdErr { message }
                        | bollard::container::LogOutput::Console { message } => message,
                        bollard::container::LogOutput::StdIn { .. } => continue,
                    };
                    if let Some(line) = seen.push(&bytes, ready_prefix) {
                        // Dropping the attached stream detaches; the daemon keeps running.
                        return Ok(line);
                    }
                }
            }
            let exit = self
                .docker
                .inspect_exec(&created.id)
                .await
                .ok()
                .and_then(|i| i.exit_code);
            Err(seen.not_ready(action, &exit.map_or("unknown".into(), |c| c.to_string())))
        };
        bounded(CALL_TIMEOUT, "report the daemon ready", wait).await
    }

    async fn exec_stdio(
        &self,
        container_id: &str,
        spec: &ExecSpec,
    ) -> Result<ExecStdio, RuntimeError> {
        let action = "attach to a process";
        let created = self.create_exec(container_id, spec, true, action).await?;
        bounded(CALL_TIMEOUT, action, async {
            match self.docker.start_exec(&created.id, None).await.map_err(|e| classify(container_id, action, e))? {
                StartExecResults::Attached { output, input } => {
                    let stdout = output.filter_map(|chunk| async move {
                        match chunk {
                            Ok(bollard::container::LogOutput::StdOut { message }) => Some(Ok(message)),
                            Ok(bollard::container::LogOutput::StdErr { message }) => {
                                tracing::debug!(stderr = %String::from_utf8_lossy(&message), "exec tunnel stderr");
                                None
                            }
                            Ok(_) => None,
                            Err(e) => {
                                tracing::debug!(error = %e, "exec tunnel output failed");
                                Some(Err(std::io::Error::other(e)))
                            }
                        }
                    });
                    let reader = StreamReader::new(Box::pin(stdout));
                    let stdio: ExecStdio = Box::pin(tokio::io::join(reader, input));
                    Ok(stdio)
                }
                StartExecResults::Detached => Err(RuntimeError::Engine { action, message: "the engine detached an attached exec".into() }),
            }
        })
        .await
    }

    fn events(&self) -> EventStream {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(follow_events(self.docker.clone(), tx));
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

/// The name of the synthetic event sent after the event stream was re-established: events
/// may have been missed, so consumers re-check everything they track.
pub const RESYNC: &str = "resync";

/// Feeds container lifecycle events into `tx` until it closes. When the stream breaks (an
/// engine restart, a socket error) it waits for the engine with backoff, resumes from the
/// last event's time, and sends a [`RESYNC`] event.
async fn follow_events(docker: Docker, tx: tokio::sync::mpsc::Sender<ContainerEvent>) {
    let mut since: Option<i64> = None;
    let mut backoff = Duration::from_millis(200);
    let mut reconnect = false;
    loop {
        if reconnect {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = tx.closed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            if docker.ping().await.is_err() {
                continue;
            }
            let resync = ContainerEvent {
                id: String::new(),
                name: String::new(),
                action: RESYNC.into(),
            };
            if tx.send(resync).await.is_err() {
                return;
            }
        }
        reconnect = true;
        let mut filters: HashMap<&str, Vec<&str>> = HashMap::new();
        filters.insert("type", vec!["container"]);
        filters.insert(
            "event",
            vec![
                "start", "die", "destroy", "restart", "pause", "unpause", "rename",
            ],
        );
        let since_text = since.map(|s| s.to_string());
        let mut options = EventsOptionsBuilder::default().filters(&filters);
        if let Some(s) = &since_text {
            options = options.since(s);
        }
        let mut stream = docker.events(Some(options.build()));
        loop {
            tokio::select! {
                next = stream.next() => match next {
                    Some(Ok(message)) => {
                        backoff = Duration::from_millis(200);
                        since = message.time.or(since);
                        if let Some(ev) = to_event(&message)
                            && tx.send(ev).await.is_err() {
                                return;
                            }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "Docker event stream failed; reconnecting");
                        break;
                    }
                    None => break,
                },
                _ = tx.closed() => return,
            }
        }
    }
}

fn to_event(m: &bollard::models::EventMessage) -> Option<ContainerEvent> {
    let actor = m.actor.as_ref()?;
    Some(ContainerEvent {
        id: actor.id.clone().unwrap_or_default(),
        name: actor
            .attributes
            .as_ref()
            .and_then(|a| a.get("name").cloned())
            .unwrap_or_default(),
        action: m.action.clone()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_go_in_small_slices_of_the_same_memory() {
        let agent = bytes::Bytes::from(vec![3u8; 3 * UPLOAD_CHUNK + 7]);
        let chunks = in_chunks(vec![bytes::Bytes::from_static(b"head"), agent.clone()]);
        assert!(
            chunks
                .iter()
                .all(|c| !c.is_empty() && c.len() <= UPLOAD_CHUNK)
        );
        assert_eq!(chunks.len(), 5);
        assert_eq!(chunks.concat(), [b"head".as_slice(), &agent].concat());
        assert_eq!(chunks.get(1).map(|c| c.as_ptr()), Some(agent.as_ptr()));
    }

    #[test]
    fn only_my_own_network_namespace_counts_as_shared() -> std::io::Result<()> {
        assert!(shares_my_network(i64::from(std::process::id()))?);
        assert!(!shares_my_network(0)?);
        assert!(shares_my_network(i64::from(u32::MAX)).is_err());
        Ok(())
    }

    #[test]
    fn an_id_prefix_of_several_containers_is_the_callers_mistake() {
        let e = DockerError::DockerResponseServerError {
            status_code: 400,
            message: "Multiple IDs found with provided prefix: 0".into(),
        };
        assert!(matches!(
            classify("0", "inspect the container", e),
            RuntimeError::AmbiguousContainer(id) if id == "0"
        ));
    }

    #[test]
    fn archive_pieces_share_the_contents_and_unpack_whole() -> Result<(), Box<dyn std::error::Error>>
    {
        use std::io::Read;
        let agent = bytes::Bytes::from(vec![7u8; 1500]);
        let long = format!("/.previewd/{}/previewd-agent", "n".repeat(150));
        let files = [
            FileUpload {
                path: long.clone(),
                contents: agent.clone(),
                mode: 0o755,
            },
            FileUpload {
                path: "/opt/d/daemon".into(),
                contents: bytes::Bytes::from_static(b"exactly 512? no"),
                mode: 0o700,
            },
        ];
        let pieces = archive_pieces(&files)?;
        assert!(
            pieces.iter().any(|p| p.as_ptr() == agent.as_ptr()),
            "the agent was copied into the archive"
        );
        let tar = pieces.concat();
        assert_eq!(tar.len() % 512, 0);
        let mut a = tar::Archive::new(tar.as_slice());
        let mut seen = Vec::new();
        for e in a.entries()? {
            let mut e = e?;
            let path = e.path()?.display().to_string();
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            seen.push((path, data.len(), e.header().mode()?));
        }
        assert!(
            seen.contains(&(long.trim_start_matches('/').to_owned(), 1500, 0o755)),
            "{seen:?}"
        );
        assert!(
            seen.contains(&("opt/d/daemon".to_owned(), 15, 0o700)),
            "{seen:?}"
        );
        Ok(())
    }

    #[test]
    fn archives_hold_parent_directories_and_modes() -> Result<(), Box<dyn std::error::Error>> {
        let files = [FileUpload {
            path: "/.previewd/web/previewd-agent".into(),
            contents: bytes::Bytes::from_static(b"\x7fELF"),
            mode: 0o755,
        }];
        let tar = archive(&files)?;
        let mut a = tar::Archive::new(tar.as_slice());
        let entries: Vec<(String, u32)> = a
            .entries()?
            .filter_map(Result::ok)
            .map(|e| {
                (
                    e.path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    e.header().mode().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                (".previewd/".into(), 0o755),
                (".previewd/web/".into(), 0o755),
                (".previewd/web/previewd-agent".into(), 0o755)
            ]
        );
        Ok(())
    }
}

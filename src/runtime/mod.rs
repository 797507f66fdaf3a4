//! Container runtimes: where injected daemons run. The reconcilers decide *what* to do; a
//! runtime does it against one engine (Docker here; pod exec in a cluster).
//!
//! The trait speaks in container terms (resolve, upload files, exec, events) rather than in
//! injection terms, so the injection sequence lives once, in the controller, for every runtime.

pub mod docker;
pub mod netns;
pub mod pod;

use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite};

/// What previewd needs to know about a target container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Full container id: it changes when the container is replaced (a pod's container
    /// restarts), which is how re-injection is noticed.
    pub id: String,
    /// What later calls (upload, exec) name this container by: Docker's full id, or a pod
    /// target's `NAMESPACE/POD/CONTAINER`.
    pub handle: String,
    /// Name without the leading `/`.
    pub name: String,
    /// Whether processes can be exec'd now (running, not paused or restarting).
    pub running: bool,
    /// The engine's state word (`running`, `exited`, `paused`, …), for messages.
    pub state: String,
    /// When the current run started; changes on every restart.
    pub started_at: Option<String>,
    /// Whether the root filesystem is read-only (uploads then fail).
    pub read_only_rootfs: bool,
    /// Addresses previewd can try to reach the container at, best first.
    pub ips: Vec<IpAddr>,
    /// The container's main process as the engine's host numbers it (Docker's `State.Pid`):
    /// when previewd runs on that host, its `/proc` entry names the container's network
    /// namespace ([`netns`]). `None` when not running, and for pods.
    pub pid: Option<u32>,
}

/// One file to place in a container.
#[derive(Clone, Debug)]
pub struct FileUpload {
    /// Absolute path in the container.
    pub path: String,
    /// Contents.
    pub contents: Bytes,
    /// Unix mode bits.
    pub mode: u32,
}

/// A command to run in a container.
#[derive(Clone, Debug, Default)]
pub struct ExecSpec {
    /// argv; `argv[0]` is an absolute path (no shell, no PATH lookup needed).
    pub argv: Vec<String>,
    /// `NAME=value` pairs; secrets go here, never in argv.
    pub env: Vec<String>,
    /// `uid:gid` (or a name from the container's passwd); the container's user when `None`.
    pub user: Option<String>,
}

/// What a finished exec printed and returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (126/127: the binary could not be run).
    pub exit_code: i64,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// A lifecycle event of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerEvent {
    /// Full container id.
    pub id: String,
    /// Container name.
    pub name: String,
    /// `start`, `die`, `destroy`, …
    pub action: String,
}

/// Both directions of an attached exec's stdio, as one byte stream.
pub type ExecStdio = Pin<Box<dyn AsyncReadWrite>>;

/// An `AsyncRead + AsyncWrite` that can be boxed.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}

/// A stream of container events that survives engine restarts.
pub type EventStream = Pin<Box<dyn Stream<Item = ContainerEvent> + Send>>;

/// Why a runtime operation failed, in terms a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No container has that id or name.
    #[error("container {0:?} not found")]
    ContainerNotFound(String),
    /// The container still exists but only until the engine removes it (Docker's `removing`
    /// and `dead` states): it can never run again, so it counts as gone. A failed removal
    /// leaves a container `dead` with no `destroy` event, so nothing would say so otherwise.
    #[error("container {container:?} is {state}: it is being removed and can never run again")]
    ContainerRemoved {
        /// Id or name.
        container: String,
        /// The engine's state word.
        state: String,
    },
    /// The id prefix names more than one container (Docker resolves short ids by prefix):
    /// the caller must give more of it, and nothing was done to any of them.
    #[error(
        "{0:?} is the prefix of more than one container's id; give more of the id, or the name"
    )]
    AmbiguousContainer(String),
    /// The container exists but cannot run an exec now.
    #[error("container {container:?} is not running ({state})")]
    ContainerNotRunning {
        /// Id or name.
        container: String,
        /// The engine's state word.
        state: String,
    },
    /// Files cannot be written to the container's root filesystem.
    #[error(
        "container {0:?} has a read-only root filesystem, so no daemon can be copied into it; run it without --read-only"
    )]
    ReadOnlyRootfs(String),
    /// The engine cannot be reached.
    #[error("the container engine is unavailable: {0}")]
    Unavailable(String),
    /// The engine refused or failed an operation.
    #[error("the container engine failed to {action}: {message}")]
    Engine {
        /// What previewd asked for.
        action: &'static str,
        /// The engine's message.
        message: String,
    },
    /// An operation took too long.
    #[error("the container engine did not {0} in time")]
    Timeout(&'static str),
    /// A target string does not have the runtime's form (pods: `NAMESPACE/POD[/CONTAINER]`).
    #[error(
        "{0:?} does not name a target (pods are named NAMESPACE/POD or NAMESPACE/POD/CONTAINER)"
    )]
    InvalidTarget(String),
    /// Nothing in the container can receive files (pod exec needs tar or a shell), so no
    /// daemon can be copied into it.
    #[error("no daemon can be copied into container {container:?}: {why}")]
    NoInjectionMethod {
        /// The target.
        container: String,
        /// What is missing.
        why: String,
    },
}

impl RuntimeError {
    /// Whether the container is gone for good (removed, or being removed): what previewd
    /// set up for it is moot, and waiting for it to start is pointless.
    pub fn is_gone(&self) -> bool {
        matches!(
            self,
            RuntimeError::ContainerNotFound(_) | RuntimeError::ContainerRemoved { .. }
        )
    }
}

/// Bound on the output kept from a command, by every runtime.
pub(crate) const MAX_EXEC_OUTPUT: usize = 64 * 1024;

/// Bound on runtime calls that should be quick (an inspect or a pod get, creating or
/// starting an exec, a daemon reporting ready), by every runtime.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a command run to completion, by every runtime.
pub(crate) const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// `fut`'s result, or [`RuntimeError::Timeout`] naming `action` once `limit` has passed.
pub(crate) async fn bounded<T>(
    limit: Duration,
    action: &'static str,
    fut: impl Future<Output = Result<T, RuntimeError>>,
) -> Result<T, RuntimeError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| RuntimeError::Timeout(action))?
}

/// The output of a daemon being started, kept (bounded) until it announces it is ready:
/// both runtimes read it the same way.
#[derive(Debug, Default)]
pub(crate) struct StartupOutput {
    seen: Vec<u8>,
}

impl StartupOutput {
    /// Adds a chunk of output; returns the first whole line that starts with `prefix`, once
    /// one has arrived (the announcement may arrive split across chunks).
    pub(crate) fn push(&mut self, chunk: &[u8], prefix: &str) -> Option<String> {
        if self.seen.len() < MAX_EXEC_OUTPUT {
            self.seen.extend_from_slice(chunk);
        }
        String::from_utf8_lossy(&self.seen)
            .split_inclusive('\n')
            .filter_map(|l| l.strip_suffix('\n'))
            .find(|l| l.starts_with(prefix))
            .map(|l| l.trim_end_matches('\r').to_owned())
    }

    /// The error for a daemon that ended (with exit code `exit`) before it was ready.
    pub(crate) fn not_ready(&self, action: &'static str, exit: &str) -> RuntimeError {
        RuntimeError::Engine {
            action,
            message: format!(
                "it exited (code {exit}) before it was ready: {}",
                String::from_utf8_lossy(&self.seen).trim()
            ),
        }
    }
}

/// A container engine previewd injects daemons through.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Looks a container up by id or name.
    fn resolve(
        &self,
        container: &str,
    ) -> impl Future<Output = Result<ContainerInfo, RuntimeError>> + Send;

    /// Places files in the container (creating parent directories), without needing a shell
    /// or tar inside it.
    fn upload(
        &self,
        container_id: &str,
        files: &[FileUpload],
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Runs a command to completion and collects its output.
    fn exec(
        &self,
        container_id: &str,
        spec: &ExecSpec,
    ) -> impl Future<Output = Result<ExecOutput, RuntimeError>> + Send;

    /// Starts a long-running command and waits until it prints a line starting with
    /// `ready_prefix` (on stdout or stderr), which it returns; the command keeps running.
    /// Fails with the command's output when it exits first.
    fn exec_until_ready(
        &self,
        container_id: &str,
        spec: &ExecSpec,
        ready_prefix: &str,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;

    /// Starts a command with its stdin and stdout joined into one byte stream (a tunnel for
    /// containers whose address previewd cannot route to).
    fn exec_stdio(
        &self,
        container_id: &str,
        spec: &ExecSpec,
    ) -> impl Future<Output = Result<ExecStdio, RuntimeError>> + Send;

    /// Container lifecycle events, reconnecting (and resuming) after engine restarts.
    fn events(&self) -> EventStream;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_line_counts_only_once_whole() {
        let mut out = StartupOutput::default();
        assert_eq!(
            out.push(b"starting\nlistening on 10.0.", "listening on "),
            None
        );
        assert_eq!(
            out.push(b"0.2:4000\r\nmore", "listening on "),
            Some("listening on 10.0.0.2:4000".to_owned())
        );
        let err = StartupOutput::default().not_ready("start a daemon", "3");
        assert!(err.to_string().contains("exited (code 3)"), "{err}");
    }
}

//! `previewd-agent supervise`: runs a user-named daemon as a child of the agent binary, so
//! the same `stop` ends it, in containers where previewd has no shell to do job control with.
//!
//! The child is started again whenever it exits (with [`RestartBackoff`]), and every start
//! and exit is recorded in a state directory together with the end of its output, so
//! `daemon-status` can tell previewd that it died, how, and what it said.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use crate::agent::backoff::RestartBackoff;
use crate::agent::daemon_state::write_state;
use crate::agent::output_log::OutputLog;
use crate::agent::process::{self, Pidfile, Signals};
use crate::agent::protocol::{ChildRun, DaemonExit, MAX_RECORDED_EXITS, SupervisorState};

/// Why the child could not be supervised.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// Installing the signal handlers failed.
    #[error("installing signal handlers failed: {0}")]
    Signals(#[source] io::Error),
    /// Writing the pidfile failed; nothing was started.
    #[error("writing the pidfile {path} failed: {source}")]
    Pidfile {
        /// The pidfile.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The state directory could not be prepared; nothing was started.
    #[error("preparing the state directory {path} failed: {source}")]
    State {
        /// The state directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The pipe collecting the child's output could not be made; nothing was started.
    #[error("creating the output pipe failed: {0}")]
    Output(#[source] io::Error),
    /// The command could not be started.
    #[error("starting {program:?} failed: {source}")]
    Spawn {
        /// The command.
        program: OsString,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Waiting for the child failed.
    #[error("waiting for the child failed: {0}")]
    Wait(#[source] io::Error),
}

/// The line `supervise` prints on stderr once the child runs (then the child's pid), so a
/// caller starting it through exec knows it started.
pub const STARTED_PREFIX: &str = "supervising pid ";

/// How much output is read at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Most chunks read after the child exited: its own output is all in the pipe by then, but a
/// descendant holding the pipe open could keep writing.
const MAX_DRAIN_CHUNKS: usize = 16;

/// Writes this process's pid to `pidfile` (when given), runs `program args` (environment
/// inherited), announces it with [`STARTED_PREFIX`], and starts it again whenever it exits,
/// after a growing delay. Its output and every start and exit go to `state_dir` (created if
/// missing). SIGTERM and SIGINT are forwarded to the child, and once it has exited this
/// returns its exit status. The child also gets SIGKILL if the supervisor dies first (e.g.
/// `stop` had to SIGKILL it), so it is never orphaned.
pub async fn supervise(
    pidfile: Option<&Path>,
    state_dir: &Path,
    program: &OsString,
    args: &[OsString],
) -> Result<ExitStatus, SuperviseError> {
    let signals = Signals::register().map_err(SuperviseError::Signals)?;
    let state = SupervisorState {
        supervisor_pid: std::process::id(),
        ..Default::default()
    };
    let log = prepare(state_dir, &state).map_err(|source| SuperviseError::State {
        path: state_dir.to_owned(),
        source,
    })?;
    // One pipe for every run's stdout and stderr, kept open here: its order is the order the
    // child wrote in, and nothing depends on the children closing it.
    let (reader, writer) = io::pipe().map_err(SuperviseError::Output)?;
    let drain_end = reader.try_clone().map_err(SuperviseError::Output)?;
    // This makes the pipe non-blocking for both read ends (they share one open file).
    let output =
        pipe::Receiver::from_owned_fd(OwnedFd::from(reader)).map_err(SuperviseError::Output)?;
    let written = pidfile
        .map(|path| {
            Pidfile::write(path, std::process::id()).map_err(|source| SuperviseError::Pidfile {
                path: path.to_owned(),
                source,
            })
        })
        .transpose()?;
    let mut supervisor = Supervisor {
        dir: state_dir.to_owned(),
        state,
        log,
        output,
        drain_end,
        output_open: true,
        writer,
        signals,
        buf: vec![0; READ_CHUNK],
    };
    let result = supervisor.run(program, args).await;
    if let Some(w) = written {
        w.remove();
    }
    result
}

/// Creates `dir` if needed (private to this user), records a first state and starts an
/// empty output log, so a directory this user cannot write fails before anything runs.
fn prepare(dir: &Path, state: &SupervisorState) -> io::Result<OutputLog> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    write_state(dir, state)?;
    OutputLog::create(dir)
}

struct Supervisor {
    dir: PathBuf,
    state: SupervisorState,
    log: OutputLog,
    output: pipe::Receiver,
    /// The same pipe, read directly: the runtime reports data only once it has polled for
    /// it, and what a child wrote just before it exited must be in the log before its exit
    /// is recorded.
    drain_end: io::PipeReader,
    /// False once the output pipe failed or ended (it cannot while `writer` is open).
    output_open: bool,
    writer: io::PipeWriter,
    signals: Signals,
    buf: Vec<u8>,
}

impl Supervisor {
    async fn run(
        &mut self,
        program: &OsString,
        args: &[OsString],
    ) -> Result<ExitStatus, SuperviseError> {
        let mut backoff = RestartBackoff::default();
        loop {
            let mut child = self.spawn(program, args)?;
            let started = Instant::now();
            let pid = child.id().and_then(|p| i32::try_from(p).ok());
            self.state.child = child.id().map(|pid| ChildRun {
                pid,
                started_ms: unix_ms(),
            });
            self.state.next_start_ms = None;
            self.save();
            // After the state names the child: whoever reads it next sees it running.
            if self.state.restarts == 0 {
                eprintln!("{STARTED_PREFIX}{}", pid.unwrap_or(0));
            }
            let (status, stopping) = self.wait_child(&mut child, pid).await;
            self.drain();
            let status = status.map_err(SuperviseError::Wait)?;
            let ran_for = started.elapsed();
            self.record_exit(status, ran_for);
            if stopping {
                self.save();
                return Ok(status);
            }
            let delay = backoff.after_exit(ran_for);
            self.state.next_start_ms =
                Some(unix_ms().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(0)));
            self.save();
            if self.pause(delay).await {
                self.state.next_start_ms = None;
                self.save();
                return Ok(status);
            }
            self.state.restarts = self.state.restarts.saturating_add(1);
        }
    }

    fn spawn(
        &self,
        program: &OsString,
        args: &[OsString],
    ) -> Result<tokio::process::Child, SuperviseError> {
        let spawn_err = |source| SuperviseError::Spawn {
            program: program.clone(),
            source,
        };
        let mut command = tokio::process::Command::new(program);
        // Not the supervisor's own stdout/stderr: that is an exec previewd stops reading once
        // it started, where a daemon would get EPIPE (or die of SIGPIPE).
        command
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(self.writer.try_clone().map_err(spawn_err)?)
            .stderr(self.writer.try_clone().map_err(spawn_err)?);
        process::die_with_parent(&mut command);
        command.spawn().map_err(spawn_err)
    }

    /// Waits for the child to exit, copying its output and forwarding signals; returns how
    /// it ended and whether a signal asked the supervisor to stop.
    async fn wait_child(
        &mut self,
        child: &mut tokio::process::Child,
        pid: Option<i32>,
    ) -> (io::Result<ExitStatus>, bool) {
        let mut stopping = false;
        loop {
            tokio::select! {
                status = child.wait() => return (status, stopping),
                sig = self.signals.recv() => {
                    stopping = true;
                    if let Some(pid) = pid {
                        // ESRCH means it is exiting anyway; wait() reports how.
                        let _ = process::send_signal(pid, sig);
                    }
                }
                read = self.output.read(&mut self.buf), if self.output_open => self.copy(read),
            }
        }
    }

    /// Waits `delay` before the next start, copying output meanwhile (a descendant may still
    /// write); returns whether a signal asked the supervisor to stop instead.
    async fn pause(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return false,
                _ = self.signals.recv() => return true,
                read = self.output.read(&mut self.buf), if self.output_open => self.copy(read),
            }
        }
    }

    fn copy(&mut self, read: io::Result<usize>) {
        match read {
            Ok(n) if n > 0 => self.append(n),
            _ => self.output_open = false,
        }
    }

    /// Copies what is already in the pipe, so the log holds the child's last words before
    /// its exit is recorded.
    fn drain(&mut self) {
        for _ in 0..MAX_DRAIN_CHUNKS {
            match self.drain_end.read(&mut self.buf) {
                Ok(n) if n > 0 => self.append(n),
                _ => return,
            }
        }
    }

    fn append(&mut self, n: usize) {
        if let Some(chunk) = self.buf.get(..n) {
            // Nowhere to report a full disk: the supervisor keeps the daemon running.
            let _ = self.log.append(chunk);
        }
    }

    fn record_exit(&mut self, status: ExitStatus, ran_for: Duration) {
        use std::os::unix::process::ExitStatusExt;
        self.state.child = None;
        self.state.exits.push(DaemonExit {
            run: self.state.restarts,
            code: status.code(),
            signal: status.signal(),
            at_ms: unix_ms(),
            ran_ms: u64::try_from(ran_for.as_millis()).unwrap_or(u64::MAX),
        });
        let excess = self.state.exits.len().saturating_sub(MAX_RECORDED_EXITS);
        self.state.exits.drain(..excess);
    }

    /// Best effort after the first write succeeded: a supervisor that cannot write keeps the
    /// daemon running, and `daemon-status` checks the pids it reads.
    fn save(&self) {
        let _ = write_state(&self.dir, &self.state);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The exit code a shell would report for `status`: the child's code, or 128 + signal.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + (sig & 0x7f)).unwrap_or(1),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exit_codes_follow_shell_conventions() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGTERM)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
    }

    #[tokio::test]
    async fn a_missing_command_is_an_error_and_leaves_no_pidfile() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("app.pid");
        let err = supervise(
            Some(&pidfile),
            &dir.path().join("state"),
            &OsString::from("/nonexistent/daemon"),
            &[],
        )
        .await
        .unwrap_err();
        assert!(matches!(err, SuperviseError::Spawn { .. }), "{err}");
        assert!(!pidfile.exists());
    }

    #[tokio::test]
    async fn an_unwritable_state_directory_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, b"").unwrap();
        let marker = dir.path().join("ran");
        let err = supervise(
            None,
            &not_a_dir,
            &OsString::from("/bin/sh"),
            &["-c".into(), format!("echo > {}", marker.display()).into()],
        )
        .await
        .unwrap_err();
        assert!(matches!(err, SuperviseError::State { .. }), "{err}");
        assert!(!marker.exists());
    }
}

//! `previewd-agent supervise`: runs a user-named daemon as a child of the agent binary, so
//! the same `stop` ends it, in containers where previewd has no shell to do job control with.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::agent::process::{self, Pidfile, Signals};

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

/// Writes this process's pid to `pidfile` (when given), runs `program args` (environment
/// inherited), announces it with [`STARTED_PREFIX`], forwards SIGTERM/SIGINT to it, and
/// returns its exit status once it ends. The child also gets SIGKILL if the supervisor dies
/// first (e.g. `stop` had to SIGKILL it), so it is never orphaned.
pub async fn supervise(
    pidfile: Option<&Path>,
    program: &OsString,
    args: &[OsString],
) -> Result<ExitStatus, SuperviseError> {
    let mut signals = Signals::register().map_err(SuperviseError::Signals)?;
    let written = pidfile
        .map(|path| {
            Pidfile::write(path, std::process::id()).map_err(|source| SuperviseError::Pidfile {
                path: path.to_owned(),
                source,
            })
        })
        .transpose()?;
    let mut command = tokio::process::Command::new(program);
    // The supervisor is started through an exec whose output previewd stops reading once it
    // started: a daemon writing there would get EPIPE (or die of SIGPIPE).
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let supervisor = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2) and
    // getppid(2), which are async-signal-safe and allocate nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The supervisor died before prctl took effect: don't start an orphan.
            if u32::try_from(libc::getppid()).ok() != Some(supervisor) {
                return Err(io::Error::other("the supervisor exited"));
            }
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(source) => {
            if let Some(w) = written {
                w.remove();
            }
            return Err(SuperviseError::Spawn {
                program: program.clone(),
                source,
            });
        }
    };
    let child_pid = child.id().and_then(|p| i32::try_from(p).ok());
    eprintln!("{STARTED_PREFIX}{}", child_pid.unwrap_or(0));
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            sig = signals.recv() => {
                if let Some(pid) = child_pid {
                    // ESRCH means it is exiting anyway; wait() reports how.
                    let _ = process::send_signal(pid, sig);
                }
            }
        }
    };
    if let Some(w) = written {
        w.remove();
    }
    status.map_err(SuperviseError::Wait)
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
    async fn the_childs_status_is_returned_and_the_pidfile_removed() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("app.pid");
        let status = supervise(
            Some(&pidfile),
            &OsString::from("/bin/sh"),
            &["-c".into(), "exit 7".into()],
        )
        .await
        .unwrap();
        assert_eq!(exit_code(status), 7);
        assert!(!pidfile.exists());
    }

    #[tokio::test]
    async fn a_missing_command_is_an_error_and_leaves_no_pidfile() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("app.pid");
        let err = supervise(Some(&pidfile), &OsString::from("/nonexistent/daemon"), &[])
            .await
            .unwrap_err();
        assert!(matches!(err, SuperviseError::Spawn { .. }), "{err}");
        assert!(!pidfile.exists());
    }
}

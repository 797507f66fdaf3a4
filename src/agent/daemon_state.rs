//! The supervisor's state file, and `previewd-agent daemon-status`, which reads it back and
//! checks it against the live processes, so previewd learns (through one exec, in Docker
//! containers and pods alike) whether a user daemon runs, how it last exited and what it
//! printed.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::agent::output_log::{self, create_private};
use crate::agent::process;
use crate::agent::protocol::{
    DaemonStatus, STATE_FILE, STATUS_OUTPUT_BYTES, STATUS_OUTPUT_LINES, SupervisorState,
};

/// Largest state file read: a [`SupervisorState`] holds a bounded list of exits.
const MAX_STATE_BYTES: u64 = 64 * 1024;

/// Why `daemon-status` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum DaemonStatusError {
    /// A file could not be read.
    #[error("reading {path} failed: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The state file holds no state.
    #[error("{path} is not a supervisor state: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// This executable's own path is unknown, so the supervisor can't be recognised.
    #[error("finding this executable failed: {0}")]
    CurrentExe(#[source] io::Error),
}

/// Replaces the state file in `dir` with `state`: written to a temporary file, then renamed
/// over it, so a reader sees the old state or the new one, never part of one.
pub fn write_state(dir: &Path, state: &SupervisorState) -> io::Result<()> {
    let json = serde_json::to_vec(state).map_err(io::Error::other)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut file = create_private(&tmp)?;
    file.write_all(&json)?;
    drop(file);
    std::fs::rename(&tmp, dir.join(STATE_FILE))
}

/// The state in `dir`, or `None` when no supervisor wrote one there.
pub fn read_state(dir: &Path) -> Result<Option<SupervisorState>, DaemonStatusError> {
    let path = dir.join(STATE_FILE);
    let read_err = |source| DaemonStatusError::Read {
        path: path.clone(),
        source,
    };
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let mut json = Vec::new();
    file.take(MAX_STATE_BYTES)
        .read_to_end(&mut json)
        .map_err(read_err)?;
    serde_json::from_slice(&json)
        .map(Some)
        .map_err(|source| DaemonStatusError::Invalid {
            path: path.clone(),
            source,
        })
}

/// What `daemon-status --dir DIR` prints: the state in `dir`, whether its supervisor (a
/// process of this very executable) and its child still run, and the end of the output.
pub fn status(dir: &Path) -> Result<DaemonStatus, DaemonStatusError> {
    let exe = std::env::current_exe().map_err(DaemonStatusError::CurrentExe)?;
    let state = read_state(dir)?;
    let supervisor_running = state
        .as_ref()
        .and_then(|s| signallable(s.supervisor_pid))
        .is_some_and(|pid| process::is_alive(pid) && process::runs_executable(pid, &exe));
    // A supervisor updates the state as soon as its child exits; checking the pid too covers
    // the moment in between, and a supervisor that could no longer write.
    let daemon_running = supervisor_running
        && state
            .as_ref()
            .and_then(|s| s.child.as_ref())
            .and_then(|c| signallable(c.pid))
            .is_some_and(process::is_alive);
    let output =
        output_log::tail(dir, STATUS_OUTPUT_LINES, STATUS_OUTPUT_BYTES).map_err(|source| {
            DaemonStatusError::Read {
                path: dir.to_owned(),
                source,
            }
        })?;
    Ok(DaemonStatus {
        supervisor_running,
        daemon_running,
        state,
        output,
    })
}

/// `pid` as a pid that names one process: 0, 1 and values beyond `i32` would name process
/// groups, the container's init, or nothing.
fn signallable(pid: u32) -> Option<i32> {
    i32::try_from(pid).ok().filter(|p| *p > 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::{ChildRun, OUTPUT_FILE};

    #[test]
    fn state_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), None);
        let state = SupervisorState {
            supervisor_pid: 42,
            restarts: 3,
            child: Some(ChildRun {
                pid: 43,
                started_ms: 1_700_000_000_000,
            }),
            ..Default::default()
        };
        write_state(dir.path(), &state).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), Some(state));
        assert!(!dir.path().join(format!("{STATE_FILE}.tmp")).exists());

        std::fs::write(dir.path().join(STATE_FILE), b"{\"supervisorPid\":").unwrap();
        assert!(matches!(
            read_state(dir.path()),
            Err(DaemonStatusError::Invalid { .. })
        ));
    }

    #[test]
    fn the_state_is_checked_against_the_live_processes() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(status(dir.path()).unwrap(), DaemonStatus::default());
        std::fs::write(dir.path().join(OUTPUT_FILE), b"one\ntwo\n").unwrap();
        let mut sleeper = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let state = |supervisor_pid| SupervisorState {
            supervisor_pid,
            child: Some(ChildRun {
                pid: sleeper.id(),
                started_ms: 0,
            }),
            ..Default::default()
        };
        // This test process runs the executable `status` runs from: a supervisor.
        write_state(dir.path(), &state(std::process::id())).unwrap();
        let st = status(dir.path()).unwrap();
        assert!(st.supervisor_running && st.daemon_running, "{st:?}");
        assert_eq!(st.state, Some(state(std::process::id())));
        assert_eq!(st.output, "one\ntwo\n");

        // A live process of another executable (a reused pid), and pids 1 and 0, are no
        // supervisor, so nothing restarts their child.
        for pid in [sleeper.id(), 1, 0] {
            write_state(dir.path(), &state(pid)).unwrap();
            let st = status(dir.path()).unwrap();
            assert!(
                !st.supervisor_running && !st.daemon_running,
                "{pid}: {st:?}"
            );
        }

        // The child is gone although the state (not yet rewritten) names it.
        write_state(dir.path(), &state(std::process::id())).unwrap();
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        let st = status(dir.path()).unwrap();
        assert!(st.supervisor_running && !st.daemon_running, "{st:?}");
    }
}

//! `previewd-agent stop`: ends a daemon named by a pidfile (or, without one, every other
//! process running this same executable) and optionally removes the agent's own directory,
//! for containers without a shell or `kill` (Docker has no exec-kill API).
//!
//! The pidfile-less form is what previewd uses: it needs no writable file next to the agent
//! (a non-root agent may not write into its root-owned directory), and it finds agents left
//! running by an earlier previewd, so a new one never runs beside them.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::agent::process::{self, PidfileError};
use crate::agent::protocol::INSTALL_DIR;

/// How long the daemon gets to exit after SIGTERM before it is killed.
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long a SIGKILLed process may take to disappear before `stop` reports failure.
const KILL_GRACE: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(20);

/// How the daemon ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// There was no pidfile, or its process was already gone.
    NotRunning,
    /// The pidfile names a process that is not an agent (the pid was reused, e.g. after a
    /// container restart, which keeps files but restarts pid numbering); it was left alone.
    Stale,
    /// It exited after SIGTERM.
    Terminated,
    /// It ignored SIGTERM and was killed.
    Killed,
}

/// Why `stop` failed.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// The pidfile is unreadable or holds no usable pid.
    #[error(transparent)]
    Pidfile(#[from] PidfileError),
    /// Signalling the process failed (typically EPERM: another user's process).
    #[error("signalling pid {pid} failed: {source}")]
    Signal {
        /// The pid.
        pid: i32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The process survived SIGKILL.
    #[error("pid {pid} is still running after SIGKILL")]
    StillRunning {
        /// The pid.
        pid: i32,
    },
    /// `--remove-dir` named a directory other than the one holding this executable.
    #[error(
        "refusing to remove {dir}: only the directory holding this executable ({exe_dir}) may be removed"
    )]
    RemoveDirRefused {
        /// What was asked.
        dir: PathBuf,
        /// The only directory that may be removed.
        exe_dir: PathBuf,
    },
    /// Removing a file or directory failed.
    #[error("removing {path} failed: {source}")]
    Remove {
        /// What could not be removed.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// This executable's own path is unknown, so `--remove-dir` can't be checked.
    #[error("finding this executable failed: {0}")]
    CurrentExe(#[source] io::Error),
}

/// Stops the process in `pidfile` (SIGTERM, up to [`TERM_GRACE`], then SIGKILL) and removes
/// the pidfile; without a pidfile, stops every other process running this executable. Then,
/// if asked, removes the agent's directory, and its parent when that is the now-empty
/// install root. `remove_dir` is checked first, so a wrong one changes nothing.
///
/// `reset_dir` (a supervisor's state directory, directly inside the agent's directory) is
/// emptied once its supervisor is stopped, ready for the next one; see [`reset`].
///
/// `remove_file` (a user daemon's binary installed outside the agent's directory) is removed
/// last; it must be an absolute path of a regular file (never a directory).
pub fn stop(
    pidfile: Option<&Path>,
    remove_dir: Option<&Path>,
    reset_dir: Option<&Path>,
    remove_file: Option<&Path>,
) -> Result<Stopped, StopError> {
    let exe = std::env::current_exe().map_err(StopError::CurrentExe)?;
    let remove_dir = remove_dir
        .map(|dir| checked_remove_dir(dir, &exe))
        .transpose()?;
    let reset_dir = reset_dir
        .map(|dir| checked_reset_dir(dir, &exe))
        .transpose()?;
    let stopped = match pidfile {
        Some(pidfile) => stop_by_pidfile(pidfile, &exe)?,
        None => stop_same_executable(&exe)?,
    };
    if let Some(dir) = reset_dir {
        reset(&dir).map_err(|source| StopError::Remove { path: dir, source })?;
    }
    if let Some(dir) = remove_dir {
        std::fs::remove_dir_all(&dir).map_err(|source| StopError::Remove {
            path: dir.clone(),
            source,
        })?;
        if let Some(parent) = dir.parent().filter(|p| *p == Path::new(INSTALL_DIR)) {
            // Fails (and that is fine) while other injections still live there.
            let _ = std::fs::remove_dir(parent);
        }
    }
    if let Some(file) = remove_file {
        remove_regular_file(file)?;
    }
    Ok(stopped)
}

/// Removes `file` if it is a regular file at an absolute path; a missing one is fine.
fn remove_regular_file(file: &Path) -> Result<(), StopError> {
    let refused = |why: &str| StopError::Remove {
        path: file.to_owned(),
        source: io::Error::other(why.to_owned()),
    };
    if !file.is_absolute() {
        return Err(refused("not an absolute path"));
    }
    match std::fs::symlink_metadata(file) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StopError::Remove {
            path: file.to_owned(),
            source,
        }),
        Ok(m) if !m.file_type().is_file() => Err(refused("not a regular file")),
        Ok(_) => std::fs::remove_file(file).map_err(|source| StopError::Remove {
            path: file.to_owned(),
            source,
        }),
    }
}

fn stop_by_pidfile(pidfile: &Path, exe: &Path) -> Result<Stopped, StopError> {
    let stopped = match process::read_pid(pidfile)? {
        None => Stopped::NotRunning,
        Some(pid) if !runs_agent(pid, exe) => Stopped::Stale,
        Some(pid) => terminate(pid)?,
    };
    match std::fs::remove_file(pidfile) {
        Ok(()) => Ok(stopped),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(stopped),
        Err(source) => Err(StopError::Remove {
            path: pidfile.to_owned(),
            source,
        }),
    }
}

/// Stops every process (but this one) whose executable is this very file.
fn stop_same_executable(exe: &Path) -> Result<Stopped, StopError> {
    let mut outcome = Stopped::NotRunning;
    for pid in same_executable_pids(exe) {
        match terminate(pid)? {
            Stopped::Killed => outcome = Stopped::Killed,
            Stopped::Terminated if outcome == Stopped::NotRunning => outcome = Stopped::Terminated,
            _ => {}
        }
    }
    Ok(outcome)
}

/// Pids (but this process's) whose `/proc/<pid>/exe` is `exe`, including a replaced
/// (" (deleted)") copy of it, except `stdio` tunnels: those are previewd's live connections
/// (they end with them), not daemons to replace.
fn same_executable_pids(exe: &Path) -> Vec<i32> {
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| u32::try_from(*pid).ok() != Some(own))
        .filter(|pid| process::runs_executable(*pid, exe))
        .filter(|pid| !is_stdio_tunnel(*pid))
        .collect()
}

/// Whether `pid` runs `… stdio` (its first argument).
fn is_stdio_tunnel(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| cmdline.split(|b| *b == 0).nth(1) == Some(b"stdio"))
}

/// SIGTERM, wait, SIGKILL, wait.
fn terminate(pid: i32) -> Result<Stopped, StopError> {
    let signal = |sig| match process::send_signal(pid, sig) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
        Err(source) => Err(StopError::Signal { pid, source }),
    };
    if !signal(libc::SIGTERM)? || wait_gone(pid, TERM_GRACE) {
        return Ok(Stopped::Terminated);
    }
    if !signal(libc::SIGKILL)? || wait_gone(pid, KILL_GRACE) {
        return Ok(Stopped::Killed);
    }
    Err(StopError::StillRunning { pid })
}

fn wait_gone(pid: i32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if !process::is_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Whether `pid` runs an executable with this one's file name (and isn't this process).
/// When `/proc/<pid>/exe` can't be read the answer is yes: signalling then either works or
/// fails loudly with EPERM.
fn runs_agent(pid: i32, exe: &Path) -> bool {
    if u32::try_from(pid).ok() == Some(std::process::id()) {
        return false;
    }
    match std::fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(target) => same_file_name(&target, exe),
        Err(_) => true,
    }
}

/// Compares file names, ignoring the " (deleted)" the kernel appends when an upgrade
/// replaced the executable of a running daemon.
fn same_file_name(running: &Path, exe: &Path) -> bool {
    let running = running.to_string_lossy();
    let running = running.strip_suffix(" (deleted)").unwrap_or(&running);
    Path::new(running).file_name() == exe.file_name()
}

/// Removes whatever is at `dir` (never following a symlink) and creates it again, empty,
/// with mode 1733: a supervisor runs as its daemon's user, which may be any user (and in
/// Docker is not the owner of the root-owned agent directory), so every user may create files
/// there; sticky, like /tmp, so none may remove or replace another's, and unlistable by
/// others. The supervisor's own files are private.
pub fn reset(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(dir)?,
        Ok(_) => std::fs::remove_file(dir)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1733))
}

/// `dir` if it names an entry directly inside the directory holding `exe` (that directory
/// canonicalized), so `--reset-dir` can never empty anything else.
fn checked_reset_dir(dir: &Path, exe: &Path) -> Result<PathBuf, StopError> {
    let refused = || StopError::RemoveDirRefused {
        dir: dir.to_owned(),
        exe_dir: exe.parent().unwrap_or(exe).to_owned(),
    };
    let name = match dir.components().next_back() {
        Some(std::path::Component::Normal(name)) => name.to_owned(),
        _ => return Err(refused()),
    };
    let exe_dir = exe
        .canonicalize()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
        .ok_or_else(refused)?;
    let parent = dir
        .parent()
        .and_then(|p| p.canonicalize().ok())
        .ok_or_else(refused)?;
    if parent != exe_dir || exe_dir.parent().is_none() {
        return Err(refused());
    }
    Ok(exe_dir.join(name))
}

/// `dir` if it is exactly the directory holding `exe` (both canonicalized), so `stop` can
/// never be pointed at anything else.
fn checked_remove_dir(dir: &Path, exe: &Path) -> Result<PathBuf, StopError> {
    let refused = || StopError::RemoveDirRefused {
        dir: dir.to_owned(),
        exe_dir: exe.parent().unwrap_or(exe).to_owned(),
    };
    let exe_dir = exe
        .canonicalize()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
        .ok_or_else(refused)?;
    let wanted = dir.canonicalize().map_err(|_| refused())?;
    if wanted != exe_dir || exe_dir.parent().is_none() {
        return Err(refused());
    }
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_executables_own_directory_may_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("previewd-agent");
        std::fs::write(&exe, b"").unwrap();
        let other = tempfile::tempdir().unwrap();

        let canonical = dir.path().canonicalize().unwrap();
        assert_eq!(checked_remove_dir(dir.path(), &exe).unwrap(), canonical);
        assert_eq!(
            checked_remove_dir(&dir.path().join("."), &exe).unwrap(),
            canonical
        );
        for wrong in [
            other.path().to_owned(),
            dir.path().join(".."),
            PathBuf::from("/"),
            dir.path().join("missing"),
        ] {
            assert!(
                matches!(
                    checked_remove_dir(&wrong, &exe),
                    Err(StopError::RemoveDirRefused { .. })
                ),
                "{wrong:?}"
            );
        }
        // An executable in / would make / its directory: never.
        assert!(checked_remove_dir(Path::new("/"), Path::new("/previewd-agent")).is_err());
    }

    #[test]
    fn only_entries_beside_the_executable_may_be_reset() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("previewd-agent");
        std::fs::write(&exe, b"").unwrap();
        let canonical = dir.path().canonicalize().unwrap();
        assert_eq!(
            checked_reset_dir(&dir.path().join("daemon-state"), &exe).unwrap(),
            canonical.join("daemon-state")
        );
        for wrong in [
            dir.path().to_owned(),
            dir.path().join("daemon-state/.."),
            dir.path().join("a/b"),
            tempfile::tempdir().unwrap().path().join("daemon-state"),
            PathBuf::from("/"),
        ] {
            assert!(
                matches!(
                    checked_reset_dir(&wrong, &exe),
                    Err(StopError::RemoveDirRefused { .. })
                ),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn a_reset_directory_is_empty_sticky_and_never_follows_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("daemon-state");
        reset(&state).unwrap();
        std::fs::write(state.join("state.json"), b"{}").unwrap();
        reset(&state).unwrap();
        assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
        let mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o1733);

        let victim = tempfile::tempdir().unwrap();
        std::fs::write(victim.path().join("keep"), b"").unwrap();
        std::fs::remove_dir(&state).unwrap();
        std::os::unix::fs::symlink(victim.path(), &state).unwrap();
        reset(&state).unwrap();
        assert!(victim.path().join("keep").exists());
        assert!(std::fs::symlink_metadata(&state).unwrap().is_dir());
    }

    #[test]
    fn file_names_compare_across_upgrades() {
        let exe = Path::new("/.previewd/previewd-agent");
        assert!(same_file_name(Path::new("/.previewd/previewd-agent"), exe));
        assert!(same_file_name(
            Path::new("/.previewd-0.2/previewd-agent (deleted)"),
            exe
        ));
        assert!(!same_file_name(Path::new("/usr/bin/node"), exe));
    }

    #[test]
    fn stop_without_a_pidfile_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let stopped = stop(Some(&dir.path().join("none.pid")), None, None, None).unwrap();
        assert_eq!(stopped, Stopped::NotRunning);
    }

    #[test]
    fn a_reused_pid_is_not_signalled() {
        // This test process is not a previewd-agent; a pidfile naming it is stale.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("agent.pid");
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30"])
            .spawn()
            .unwrap();
        std::fs::write(&pidfile, child.id().to_string()).unwrap();
        assert_eq!(
            stop(Some(&pidfile), None, None, None).unwrap(),
            Stopped::Stale
        );
        assert!(!pidfile.exists());
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child was signalled"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

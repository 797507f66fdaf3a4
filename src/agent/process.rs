//! Process plumbing shared by `serve`, `stop` and `supervise`: pidfiles, signals, liveness,
//! children that die with their parent.
//!
//! Docker has no exec-kill API, so a daemon started by exec is stopped by another exec that
//! signals the pid in its pidfile. Everything here works without a shell or /bin/kill.

use std::io;
use std::path::{Path, PathBuf};

use tokio::signal::unix::{Signal, SignalKind, signal};

/// A pidfile this process wrote; [`Pidfile::remove`] deletes it on a clean exit.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    pid: u32,
}

impl Pidfile {
    /// Writes `pid` to `path` through a temporary file and a rename, so `stop` never reads a
    /// half-written pid.
    pub fn write(path: &Path, pid: u32) -> io::Result<Pidfile> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, format!("{pid}\n"))?;
        std::fs::rename(&tmp, path)?;
        Ok(Pidfile {
            path: path.to_owned(),
            pid,
        })
    }

    /// Deletes the pidfile if it still names this pid (another daemon may have replaced it).
    pub fn remove(self) {
        let current = read_pid(&self.path).ok().flatten();
        if current.and_then(|p| u32::try_from(p).ok()) == Some(self.pid) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Why a pidfile could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    /// It could not be read.
    #[error("reading the pidfile {path} failed: {source}")]
    Read {
        /// The pidfile.
        path: PathBuf,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// It doesn't hold a pid that may be signalled (pid 0, 1 and negatives would hit process
    /// groups or the container's init).
    #[error("the pidfile {path} does not hold a usable pid: {content:?}")]
    Invalid {
        /// The pidfile.
        path: PathBuf,
        /// What it holds (truncated).
        content: String,
    },
}

/// The pid in `path`, or `None` when there is no pidfile (nothing was started, or it was
/// already stopped).
pub fn read_pid(path: &Path) -> Result<Option<i32>, PidfileError> {
    let content = match std::fs::read_to_string(path) {
        Ok(content) => content,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PidfileError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    match content.trim().parse::<i32>() {
        Ok(pid) if pid > 1 => Ok(Some(pid)),
        _ => Err(PidfileError::Invalid {
            path: path.to_owned(),
            content: content.chars().take(32).collect(),
        }),
    }
}

/// Makes `command`'s child die (SIGKILL) when this process does, and refuse to start if
/// this process is already gone: a supervised daemon or handoff helper never outlives the
/// agent that started it. The parent-death signal is set in the child after any user switch
/// (which would clear it).
pub fn die_with_parent(command: &mut tokio::process::Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2) and
    // getppid(2), which are async-signal-safe and allocate nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died before prctl took effect: don't start an orphan.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::other("the parent exited"));
            }
            Ok(())
        });
    }
}

/// Sends `sig` to `pid`.
pub fn send_signal(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours. Callers never pass
    // pid <= 1 (read_pid refuses them; child pids are > 1).
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `pid` is a live process. Zombies count as gone: a stopped daemon whose parent
/// has not reaped it yet will never run again.
pub fn is_alive(pid: i32) -> bool {
    match send_signal(pid, 0) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        Err(_) => return false,
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: comm may hold spaces and parentheses, the state follows the
        // last ')'.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X' | 'x')
        ),
        Err(_) => true,
    }
}

/// Whether `pid` runs the executable `exe` (a copy replaced since it started, which the
/// kernel shows with a " (deleted)" suffix, counts): how `stop` finds this injection's agents
/// and `daemon-status` tells a live supervisor from a reused pid.
///
/// Another user's `/proc/<pid>/exe` needs CAP_SYS_PTRACE, which Docker does not grant even
/// to root, so for a supervisor running as a daemon's user the command line is compared
/// instead: only that process can make its own look like the agent's, so a forgery gets
/// nothing but itself stopped.
pub fn runs_executable(pid: i32, exe: &Path) -> bool {
    match std::fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(target) => {
            let target = target.to_string_lossy();
            Path::new(target.strip_suffix(" (deleted)").unwrap_or(&target)) == exe
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| starts_as(&c, exe))
        }
        Err(_) => false,
    }
}

/// Whether a `/proc/<pid>/cmdline` names `exe` as the program (its first, NUL-ended field).
fn starts_as(cmdline: &[u8], exe: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    cmdline
        .split(|b| *b == 0)
        .next()
        .is_some_and(|argv0| argv0 == exe.as_os_str().as_bytes())
}

/// SIGTERM and SIGINT, the signals that ask a daemon to exit.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers; from then on these signals no longer kill the process.
    pub fn register() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next one and returns its number (to forward it).
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.int.recv() => libc::SIGINT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfiles_round_trip_and_refuse_dangerous_pids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.pid");
        assert_eq!(read_pid(&path).unwrap(), None);
        let pidfile = Pidfile::write(&path, 4242).unwrap();
        assert_eq!(read_pid(&path).unwrap(), Some(4242));
        pidfile.remove();
        assert!(!path.exists());

        for bad in ["", "0", "1", "-1", "abc", "12 13"] {
            std::fs::write(&path, bad).unwrap();
            assert!(
                matches!(read_pid(&path), Err(PidfileError::Invalid { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_replaced_pidfile_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.pid");
        let ours = Pidfile::write(&path, 4242).unwrap();
        Pidfile::write(&path, 4343).unwrap();
        ours.remove();
        assert_eq!(read_pid(&path).unwrap(), Some(4343));
    }

    #[test]
    fn a_command_line_names_its_program_first() {
        let exe = Path::new("/.previewd/default.web/previewd-agent");
        assert!(starts_as(
            b"/.previewd/default.web/previewd-agent\0supervise\0--\0x\0",
            exe
        ));
        for other in [
            &b"/.previewd/default.web/previewd-agent-2\0supervise\0"[..],
            b"/.previewd/default.web2/previewd-agent\0",
            b"sh\0/.previewd/default.web/previewd-agent\0",
            b"previewd-agent\0",
            b"",
        ] {
            assert!(!starts_as(other, exe), "{other:?}");
        }
    }

    #[test]
    fn this_process_runs_its_own_executable() {
        let exe = std::env::current_exe().unwrap();
        let me = std::process::id() as i32;
        assert!(runs_executable(me, &exe));
        assert!(!runs_executable(me, Path::new("/bin/sh")));
    }

    #[test]
    fn liveness() {
        assert!(is_alive(std::process::id() as i32));
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 0"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Exited but not yet reaped: a zombie, which counts as gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while is_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!is_alive(pid));
        child.wait().unwrap();
        assert!(!is_alive(pid));
    }
}

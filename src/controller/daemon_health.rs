//! What a user daemon's supervisor reports (`previewd-agent daemon-status`), turned into
//! what the injection's status says. Pure, so every case is tested without a container.

use k8s_openapi::jiff::Timestamp;

use crate::agent::output_log::last_lines;
use crate::agent::protocol::{DaemonExit, DaemonStatus, STATUS_OUTPUT_BYTES, STATUS_OUTPUT_LINES};

/// The Ready condition's reason while a user daemon is down (or, after a restart, not
/// ready yet): it exited, and its supervisor starts it again after a backoff.
pub const DAEMON_EXITED: &str = "DaemonExited";

/// What the supervisor's report means for the injection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonHealth {
    /// The daemon runs; `restarted` when it had exited before.
    Up {
        /// Whether it is a restarted run.
        restarted: bool,
    },
    /// It exited and its supervisor waits to start it again.
    Down,
    /// No supervisor runs (it was stopped or killed, or never started): nothing will start
    /// the daemon again, so it must be injected again.
    Unsupervised,
}

/// Reads a `daemon-status` report.
pub fn daemon_health(status: &DaemonStatus) -> DaemonHealth {
    match (
        &status.state,
        status.supervisor_running,
        status.daemon_running,
    ) {
        (Some(state), true, true) => DaemonHealth::Up {
            restarted: state.restarts > 0,
        },
        (Some(_), true, false) => DaemonHealth::Down,
        _ => DaemonHealth::Unsupervised,
    }
}

/// What the supervisor does while the daemon is down, for [`exited_message`].
const RESTARTING: &str = "its supervisor starts it again after a backoff";

/// What previewd concludes about a user daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// It runs and passes its probe (or has none).
    Ready,
    /// It exited, or runs again after exiting but is not ready yet: reported with
    /// [`DAEMON_EXITED`] and [`exited_message`], whose `now` this is, and left to its
    /// supervisor.
    Exited(String),
    /// Nothing supervises it any more.
    Unsupervised,
    /// It never exited but fails its probe (the error says how).
    Unready(String),
}

/// Concludes from the supervisor's report and the probe's result (`Ok` when there is no
/// probe, or it was not run because the daemon is down). A failed probe of a restarted run
/// is the exit's consequence, not a reason to inject again.
pub fn judge(health: DaemonHealth, probe: Result<(), String>) -> Judgement {
    match (health, probe) {
        (DaemonHealth::Unsupervised, _) => Judgement::Unsupervised,
        (DaemonHealth::Down, _) => Judgement::Exited(RESTARTING.to_owned()),
        (DaemonHealth::Up { restarted: true }, Err(e)) => {
            Judgement::Exited(format!("it was restarted and {e}"))
        }
        (DaemonHealth::Up { restarted: false }, Err(e)) => Judgement::Unready(e),
        (DaemonHealth::Up { .. }, Ok(())) => Judgement::Ready,
    }
}

/// The Ready condition's message for a daemon that exited: how and when it last ended, how
/// often it was restarted, `now` (what is happening now), and its last lines of output
/// (bounded, control characters replaced). Stable while nothing new happens, so rechecks
/// write no status.
pub fn exited_message(install_path: &str, status: &DaemonStatus, now: &str) -> String {
    let state = status.state.clone().unwrap_or_default();
    let ended = match state.exits.last() {
        Some(exit) => format!("exited with {}", describe_exit(exit)),
        None => "is not running".to_owned(),
    };
    let restarts = match state.restarts {
        0 => String::new(),
        1 => " (restarted once)".to_owned(),
        n => format!(" (restarted {n} times)"),
    };
    let output = output_tail(&status.output);
    let output = if output.is_empty() {
        "no output".to_owned()
    } else {
        format!("last output:\n{output}")
    };
    format!("the daemon {install_path} {ended}{restarts}; {now}; {output}")
}

/// `exit code 3 at 2024-05-01T10:00:00Z after 12 ms`, or `signal 9 (SIGKILL) at …`.
fn describe_exit(exit: &DaemonExit) -> String {
    let how = match (exit.code, exit.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match signal_name(sig) {
            Some(name) => format!("signal {sig} ({name})"),
            None => format!("signal {sig}"),
        },
        (None, None) => "an unknown status".to_owned(),
    };
    let at = i64::try_from(exit.at_ms / 1000)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .map_or_else(|| "an unknown time".to_owned(), |t| t.to_string());
    let ran = if exit.ran_ms < 10_000 {
        format!("{} ms", exit.ran_ms)
    } else {
        format!("{} s", exit.ran_ms / 1000)
    };
    format!("{how} at {at} after {ran}")
}

/// Names of the signals that usually end daemons.
fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return None,
    })
}

/// The end of the output (the report is bounded by the agent, but a container's root could
/// have replaced it): at most [`STATUS_OUTPUT_LINES`] lines and [`STATUS_OUTPUT_BYTES`] bytes,
/// carriage returns dropped and other control characters (terminal escapes among them) but
/// newlines and tabs replaced.
fn output_tail(output: &str) -> String {
    let tail = last_lines(output.as_bytes(), STATUS_OUTPUT_LINES, STATUS_OUTPUT_BYTES);
    String::from_utf8_lossy(tail)
        .trim_end()
        .chars()
        .filter_map(|c| match c {
            // CRLF line ends.
            '\r' => None,
            '\n' | '\t' => Some(c),
            c if c.is_control() => Some(char::REPLACEMENT_CHARACTER),
            c => Some(c),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::{ChildRun, SupervisorState};

    fn report(supervisor: bool, daemon: bool, restarts: u32) -> DaemonStatus {
        DaemonStatus {
            supervisor_running: supervisor,
            daemon_running: daemon,
            state: Some(SupervisorState {
                supervisor_pid: 10,
                restarts,
                child: daemon.then_some(ChildRun {
                    pid: 11,
                    started_ms: 0,
                }),
                ..Default::default()
            }),
            output: String::new(),
        }
    }

    #[test]
    fn reports_map_to_what_the_controller_does() {
        assert_eq!(
            daemon_health(&report(true, true, 0)),
            DaemonHealth::Up { restarted: false }
        );
        assert_eq!(
            daemon_health(&report(true, true, 2)),
            DaemonHealth::Up { restarted: true }
        );
        assert_eq!(daemon_health(&report(true, false, 2)), DaemonHealth::Down);
        // A killed supervisor's last state may still name a running child.
        assert_eq!(
            daemon_health(&report(false, true, 0)),
            DaemonHealth::Unsupervised
        );
        assert_eq!(
            daemon_health(&report(false, false, 0)),
            DaemonHealth::Unsupervised
        );
        assert_eq!(
            daemon_health(&DaemonStatus::default()),
            DaemonHealth::Unsupervised
        );
    }

    #[test]
    fn a_failed_probe_means_exited_only_after_a_restart() {
        let unready = || Err("is not ready on port 80: refused".to_owned());
        let up = |restarted| DaemonHealth::Up { restarted };
        assert_eq!(judge(up(false), Ok(())), Judgement::Ready);
        assert_eq!(judge(up(true), Ok(())), Judgement::Ready);
        assert_eq!(
            judge(up(false), unready()),
            Judgement::Unready("is not ready on port 80: refused".into())
        );
        assert_eq!(
            judge(up(true), unready()),
            Judgement::Exited("it was restarted and is not ready on port 80: refused".into())
        );
        for probe in [Ok(()), unready()] {
            assert_eq!(
                judge(DaemonHealth::Down, probe.clone()),
                Judgement::Exited(RESTARTING.into())
            );
            assert_eq!(
                judge(DaemonHealth::Unsupervised, probe),
                Judgement::Unsupervised
            );
        }
    }

    #[test]
    fn the_message_says_how_it_exited_and_what_it_printed() {
        let mut st = report(true, false, 2);
        if let Some(s) = st.state.as_mut() {
            s.exits.push(DaemonExit {
                run: 2,
                code: Some(3),
                signal: None,
                at_ms: 1_700_000_000_999,
                ran_ms: 4,
            });
        }
        st.output = "boom\nit broke\n".into();
        assert_eq!(
            exited_message("/opt/d", &st, RESTARTING),
            "the daemon /opt/d exited with exit code 3 at 2023-11-14T22:13:20Z after 4 ms \
             (restarted 2 times); its supervisor starts it again after a backoff; last \
             output:\nboom\nit broke"
        );
        if let Some(s) = st.state.as_mut() {
            s.restarts = 1;
            s.exits.push(DaemonExit {
                run: 3,
                code: None,
                signal: Some(9),
                at_ms: 1_700_000_100_000,
                ran_ms: 65_432,
            });
        }
        st.output = String::new();
        assert_eq!(
            exited_message("/opt/d", &st, "now"),
            "the daemon /opt/d exited with signal 9 (SIGKILL) at 2023-11-14T22:15:00Z after \
             65 s (restarted once); now; no output"
        );
        assert_eq!(
            exited_message("/opt/d", &report(true, false, 0), "now"),
            "the daemon /opt/d is not running; now; no output"
        );
    }

    #[test]
    fn the_output_in_the_message_is_bounded_and_has_no_terminal_escapes() {
        let mut st = report(true, false, 0);
        st.output = (0..100)
            .map(|i| format!("line {i} \u{1b}[31mred\u{1b}[0m\tok\r\n"))
            .collect();
        let message = exited_message("/d", &st, "now");
        let (_, output) = message.split_once("last output:\n").unwrap();
        assert_eq!(output.lines().count(), STATUS_OUTPUT_LINES);
        assert!(output.starts_with("line 90 "), "{output}");
        assert!(
            output.ends_with("line 99 \u{fffd}[31mred\u{fffd}[0m\tok"),
            "{output:?}"
        );
        assert!(!output.contains('\u{1b}') && !output.contains('\r'));

        st.output = "x".repeat(100_000);
        let message = exited_message("/d", &st, "now");
        assert!(
            message.len() < STATUS_OUTPUT_BYTES + 200,
            "{}",
            message.len()
        );
    }
}

//! The `previewd-agent` command line, parsed by hand (no clap: the binary is uploaded into
//! every container, so every kilobyte counts) and run on a single-threaded runtime.
//!
//! Addresses are numeric only: the agent must work in containers with no libc, no NSS and no
//! resolver configuration.

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::agent::handoff::{self, HandoffHelper};
use crate::agent::process::{Pidfile, Signals};
use crate::agent::secret::Secret;
use crate::agent::{daemon_state, server, stop, supervise};

/// The usage text printed for `--help` and after a usage error.
pub const USAGE: &str = "usage:
  previewd-agent --version
  previewd-agent serve --listen <ip:port> [--pidfile <path>] [--replace] [--handoff-dir <dir> --handoff-user <uid>:<gid>]
  previewd-agent handoff --socket <path>
  previewd-agent stdio
  previewd-agent stop [--pidfile <path>] [--remove-dir <dir>] [--reset-dir <dir>] [--remove-file <path>]
  previewd-agent supervise [--pidfile <path>] --state-dir <dir> -- <cmd> [args...]
  previewd-agent daemon-status --dir <dir>
The secret comes from the PREVIEWD_AGENT_SECRET environment variable (at least 16 characters).";

/// Exit code for usage and configuration errors, as the contract with previewd says.
const EXIT_USAGE: u8 = 2;

/// One invocation.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// `--version`.
    Version,
    /// `--help`.
    Help,
    /// `serve`: the TCP daemon.
    Serve {
        /// Address to bind (port 0 picks one; the actual one is printed).
        listen: SocketAddr,
        /// Where to write the pid for `stop`.
        pidfile: Option<PathBuf>,
        /// Stop every other process of this executable first (as `stop` does): previewd
        /// then starts an agent in one exec instead of two.
        replace: bool,
        /// Run a handoff helper as this user, with its socket in this directory.
        handoff: Option<HandoffHelper>,
    },
    /// `handoff`: hand connected sockets over the unix socket at `socket`.
    Handoff {
        /// The socket's path.
        socket: PathBuf,
    },
    /// `stdio`: one request over stdin/stdout.
    Stdio,
    /// `stop`: end a daemon by pidfile, or every process running this same executable.
    Stop {
        /// The daemon's pidfile; without one, every other process of this executable.
        pidfile: Option<PathBuf>,
        /// The agent's own directory, removed afterwards.
        remove_dir: Option<PathBuf>,
        /// A supervisor's state directory beside the agent, emptied afterwards.
        reset_dir: Option<PathBuf>,
        /// A user daemon's binary installed outside that directory, removed afterwards.
        remove_file: Option<PathBuf>,
    },
    /// `supervise`: run a user daemon as a child, restarting it when it exits.
    Supervise {
        /// Where to write the supervisor's pid, if anywhere.
        pidfile: Option<PathBuf>,
        /// Where to keep the child's state and output.
        state_dir: PathBuf,
        /// The command to run.
        program: OsString,
        /// Its arguments.
        args: Vec<OsString>,
    },
    /// `daemon-status`: print a supervisor's state as JSON.
    DaemonStatus {
        /// The supervisor's state directory.
        dir: PathBuf,
    },
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let sub = args.next().ok_or("missing command")?;
    let sub = sub.to_str().ok_or("the command is not UTF-8")?;
    match sub {
        "--version" | "-V" | "version" => no_more(args, Command::Version),
        "--help" | "-h" | "help" => no_more(args, Command::Help),
        "serve" => {
            let (flags, args): (Vec<OsString>, Vec<OsString>) =
                args.partition(|a| a == "--replace");
            if flags.len() > 1 {
                return Err("--replace given twice".into());
            }
            let mut opts = Options::parse(
                args,
                &["--listen", "--pidfile", "--handoff-dir", "--handoff-user"],
            )?;
            let listen = opts
                .take("--listen")
                .ok_or("serve needs --listen <ip:port>")?;
            let listen = listen
                .to_str()
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| format!("--listen {listen:?} is not a numeric ip:port"))?;
            let handoff = match (opts.take("--handoff-dir"), opts.take("--handoff-user")) {
                (None, None) => None,
                (Some(dir), Some(user)) => Some(HandoffHelper {
                    dir: PathBuf::from(dir),
                    user: parse_user(&user)?,
                }),
                _ => return Err("--handoff-dir and --handoff-user go together".into()),
            };
            Ok(Command::Serve {
                listen,
                pidfile: opts.take("--pidfile").map(PathBuf::from),
                replace: !flags.is_empty(),
                handoff,
            })
        }
        "handoff" => {
            let mut opts = Options::parse(args, &["--socket"])?;
            Ok(Command::Handoff {
                socket: opts
                    .take("--socket")
                    .map(PathBuf::from)
                    .ok_or("handoff needs --socket <path>")?,
            })
        }
        "stdio" => no_more(args, Command::Stdio),
        "stop" => {
            let mut opts = Options::parse(
                args,
                &["--pidfile", "--remove-dir", "--reset-dir", "--remove-file"],
            )?;
            Ok(Command::Stop {
                pidfile: opts.take("--pidfile").map(PathBuf::from),
                remove_dir: opts.take("--remove-dir").map(PathBuf::from),
                reset_dir: opts.take("--reset-dir").map(PathBuf::from),
                remove_file: opts.take("--remove-file").map(PathBuf::from),
            })
        }
        "supervise" => {
            let mut args = args.collect::<Vec<_>>();
            let split = args
                .iter()
                .position(|a| a == "--")
                .ok_or("supervise needs -- <cmd> [args...]")?;
            let mut command = args.split_off(split + 1).into_iter();
            args.truncate(split);
            let mut opts = Options::parse(args, &["--pidfile", "--state-dir"])?;
            Ok(Command::Supervise {
                pidfile: opts.take("--pidfile").map(PathBuf::from),
                state_dir: opts
                    .take("--state-dir")
                    .map(PathBuf::from)
                    .ok_or("supervise needs --state-dir <dir>")?,
                program: command.next().ok_or("supervise needs a command after --")?,
                args: command.collect(),
            })
        }
        "daemon-status" => {
            let mut opts = Options::parse(args, &["--dir"])?;
            Ok(Command::DaemonStatus {
                dir: opts
                    .take("--dir")
                    .map(PathBuf::from)
                    .ok_or("daemon-status needs --dir <dir>")?,
            })
        }
        other => Err(format!("unknown command {other:?}")),
    }
}

/// A numeric `uid:gid` (the container may have no user database).
fn parse_user(user: &std::ffi::OsStr) -> Result<(u32, u32), String> {
    user.to_str()
        .and_then(|u| u.split_once(':'))
        .and_then(|(uid, gid)| Some((uid.parse().ok()?, gid.parse().ok()?)))
        .ok_or_else(|| format!("--handoff-user {user:?} is not a numeric uid:gid"))
}

fn no_more(mut args: impl Iterator<Item = OsString>, command: Command) -> Result<Command, String> {
    match args.next() {
        None => Ok(command),
        Some(extra) => Err(format!("unexpected argument {extra:?}")),
    }
}

/// `--name value` pairs, each allowed once.
struct Options(Vec<(&'static str, OsString)>);

impl Options {
    fn parse(
        args: impl IntoIterator<Item = OsString>,
        allowed: &[&'static str],
    ) -> Result<Options, String> {
        let mut found: Vec<(&'static str, OsString)> = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let name = allowed
                .iter()
                .find(|a| arg == **a)
                .ok_or_else(|| format!("unexpected argument {arg:?}"))?;
            if found.iter().any(|(n, _)| n == name) {
                return Err(format!("{name} given twice"));
            }
            let value = args.next().ok_or_else(|| format!("{name} needs a value"))?;
            found.push((name, value));
        }
        Ok(Options(found))
    }

    fn take(&mut self, name: &str) -> Option<OsString> {
        let i = self.0.iter().position(|(n, _)| *n == name)?;
        Some(self.0.swap_remove(i).1)
    }
}

/// Runs the agent with `args` (without the program name) and returns its exit code.
pub fn run(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let command = match parse(args) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("previewd-agent: {e}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match command {
        Command::Version => {
            println!("previewd-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Help => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::Serve {
            listen,
            pidfile,
            replace,
            handoff,
        } => {
            let Some(secret) = secret() else {
                return ExitCode::from(EXIT_USAGE);
            };
            if replace && let Err(e) = stop::stop(None, None, None, None) {
                return fail(format_args!("stopping the agent it replaces failed: {e}"));
            }
            on_runtime(serve(listen, pidfile, handoff, secret))
        }
        Command::Handoff { socket } => {
            let Some(secret) = secret() else {
                return ExitCode::from(EXIT_USAGE);
            };
            on_runtime(async move {
                match handoff::serve(&socket, Arc::new(secret)).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(format_args!(
                        "handing off at {} failed: {e}",
                        socket.display()
                    )),
                }
            })
        }
        Command::Stdio => {
            let Some(secret) = secret() else {
                return ExitCode::from(EXIT_USAGE);
            };
            on_runtime(async move {
                match server::stdio(&secret).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(format_args!("stdio session failed: {e}")),
                }
            })
        }
        Command::Stop {
            pidfile,
            remove_dir,
            reset_dir,
            remove_file,
        } => match stop::stop(
            pidfile.as_deref(),
            remove_dir.as_deref(),
            reset_dir.as_deref(),
            remove_file.as_deref(),
        ) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Supervise {
            pidfile,
            state_dir,
            program,
            args,
        } => on_runtime(async move {
            match supervise::supervise(pidfile.as_deref(), &state_dir, &program, &args).await {
                Ok(status) => ExitCode::from(supervise::exit_code(status)),
                // 127, like a shell that cannot run the command. The exec that started the
                // supervisor may no longer be read (a restart failed): never panic on EPIPE.
                Err(e @ supervise::SuperviseError::Spawn { .. }) => {
                    let _ = writeln!(std::io::stderr(), "previewd-agent: {e}");
                    ExitCode::from(127)
                }
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "previewd-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::DaemonStatus { dir } => match daemon_state::status(&dir) {
            Ok(status) => match serde_json::to_string(&status) {
                Ok(json) => {
                    println!("{json}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            },
            Err(e) => fail(e),
        },
    }
}

/// The secret, or `None` after explaining on stderr why the agent won't start.
fn secret() -> Option<Secret> {
    match Secret::from_env() {
        Ok(secret) => Some(secret),
        Err(e) => {
            eprintln!("previewd-agent: {e}");
            None
        }
    }
}

/// `serve`: bind, write the pidfile, announce the address, serve until a signal or a
/// shutdown request, remove the pidfile.
async fn serve(
    listen: SocketAddr,
    pidfile: Option<PathBuf>,
    helper: Option<HandoffHelper>,
    secret: Secret,
) -> ExitCode {
    // Before announcing anything, so a SIGTERM right after start is a clean stop.
    let mut signals = match Signals::register() {
        Ok(signals) => signals,
        Err(e) => return fail(format_args!("installing signal handlers failed: {e}")),
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => return fail(format_args!("binding {listen} failed: {e}")),
    };
    let local = match listener.local_addr() {
        Ok(local) => local,
        Err(e) => return fail(format_args!("reading the bound address failed: {e}")),
    };
    let pidfile = match pidfile.map(|p| Pidfile::write(&p, std::process::id()).map_err(|e| (p, e)))
    {
        None => None,
        Some(Ok(pidfile)) => Some(pidfile),
        Some(Err((path, e))) => {
            return fail(format_args!(
                "writing the pidfile {} failed: {e}",
                path.display()
            ));
        }
    };
    if let Some(helper) = helper {
        // Started before the agent announces itself, so previewd finds it on its first look.
        let (first, started) = tokio::sync::oneshot::channel();
        tokio::spawn(handoff::run_helper(helper, first));
        let _ = started.await;
    }
    eprintln!("listening on {local}");
    let stop = async move {
        signals.recv().await;
    };
    let result = server::serve(listener, Arc::new(secret), stop).await;
    if let Some(pidfile) = pidfile {
        pidfile.remove();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format_args!("serving failed: {e}")),
    }
}

/// Runs `main` on a current-thread runtime: the agent does little at a time, and one thread
/// keeps its footprint (it counts against the container's limits) small. The runtime is shut
/// down without waiting for blocked stdin reads, which can't be cancelled.
fn on_runtime(main: impl Future<Output = ExitCode>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(format_args!("starting the runtime failed: {e}")),
    };
    let code = runtime.block_on(main);
    runtime.shutdown_background();
    code
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("previewd-agent: {e}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn commands_parse() {
        assert_eq!(parse(args(&["--version"])), Ok(Command::Version));
        assert_eq!(
            parse(args(&["serve", "--pidfile", "/p", "--listen", "[::1]:0"])),
            Ok(Command::Serve {
                listen: "[::1]:0".parse().unwrap(),
                pidfile: Some("/p".into()),
                replace: false,
                handoff: None,
            })
        );
        assert_eq!(
            parse(args(&["serve", "--replace", "--listen", "0.0.0.0:0"])),
            Ok(Command::Serve {
                listen: "0.0.0.0:0".parse().unwrap(),
                pidfile: None,
                replace: true,
                handoff: None,
            })
        );
        assert!(
            parse(args(&[
                "serve",
                "--replace",
                "--replace",
                "--listen",
                "0.0.0.0:0"
            ]))
            .is_err()
        );
        assert_eq!(
            parse(args(&[
                "serve",
                "--listen",
                "0.0.0.0:0",
                "--handoff-dir",
                "/d/handoff",
                "--handoff-user",
                "1000:100"
            ])),
            Ok(Command::Serve {
                listen: "0.0.0.0:0".parse().unwrap(),
                pidfile: None,
                replace: false,
                handoff: Some(HandoffHelper {
                    dir: "/d/handoff".into(),
                    user: (1000, 100),
                }),
            })
        );
        for half in [
            &["serve", "--listen", "0.0.0.0:0", "--handoff-dir", "/d"][..],
            &["serve", "--listen", "0.0.0.0:0", "--handoff-user", "1:1"],
            &[
                "serve",
                "--listen",
                "0.0.0.0:0",
                "--handoff-dir",
                "/d",
                "--handoff-user",
                "nobody",
            ],
        ] {
            assert!(parse(args(half)).is_err(), "{half:?}");
        }
        assert_eq!(
            parse(args(&["handoff", "--socket", "/d/socket"])),
            Ok(Command::Handoff {
                socket: "/d/socket".into()
            })
        );
        assert_eq!(parse(args(&["stdio"])), Ok(Command::Stdio));
        assert_eq!(
            parse(args(&[
                "stop",
                "--pidfile",
                "/p",
                "--remove-dir",
                "/.previewd"
            ])),
            Ok(Command::Stop {
                pidfile: Some("/p".into()),
                remove_dir: Some("/.previewd".into()),
                reset_dir: None,
                remove_file: None,
            })
        );
        assert_eq!(
            parse(args(&["stop"])),
            Ok(Command::Stop {
                pidfile: None,
                remove_dir: None,
                reset_dir: None,
                remove_file: None,
            })
        );
        assert_eq!(
            parse(args(&["stop", "--reset-dir", "/d/daemon-state"])),
            Ok(Command::Stop {
                pidfile: None,
                remove_dir: None,
                reset_dir: Some("/d/daemon-state".into()),
                remove_file: None,
            })
        );
        assert_eq!(
            parse(args(&["daemon-status", "--dir", "/d/daemon-state"])),
            Ok(Command::DaemonStatus {
                dir: "/d/daemon-state".into()
            })
        );
        assert_eq!(
            parse(args(&[
                "supervise",
                "--pidfile",
                "/p",
                "--state-dir",
                "/s",
                "--",
                "node",
                "--",
                "x"
            ])),
            Ok(Command::Supervise {
                pidfile: Some("/p".into()),
                state_dir: "/s".into(),
                program: "node".into(),
                args: args(&["--", "x"]),
            })
        );
    }

    #[test]
    fn bad_command_lines_are_refused() {
        for bad in [
            &[][..],
            &["bogus"],
            &["--version", "x"],
            &["serve"],
            &["serve", "--listen"],
            &["serve", "--listen", "localhost:80"],
            &[
                "serve",
                "--listen",
                "127.0.0.1:80",
                "--listen",
                "127.0.0.1:81",
            ],
            &["serve", "--listen", "127.0.0.1:80", "--verbose"],
            &["stdio", "extra"],
            &["stop", "--pidfile", "/p", "--remove-dir"],
            &["supervise", "--pidfile", "/p"],
            &["supervise", "--pidfile", "/p", "--"],
            &["supervise", "--", "node"],
            &[
                "supervise",
                "--state-dir",
                "/s",
                "--state-dir",
                "/t",
                "--",
                "node",
            ],
            &["daemon-status"],
            &["daemon-status", "--dir"],
            &["daemon-status", "--dir", "/d", "--verbose"],
        ] {
            assert!(parse(args(bad)).is_err(), "{bad:?}");
        }
    }
}

//! The real `previewd-agent` binary on this machine's loopback: authentication, port listing,
//! CONNECT tunnels over `serve` and over `stdio`, `stop`, `supervise`, and that it is static.
//! Only loopback traffic: 192.0.2.1 (TEST-NET) is named but must never be connected to.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use previewd::agent::client::{self, AgentError};
use previewd::agent::process::is_alive;
use previewd::agent::protocol::{DaemonStatus, ListeningPort, SECRET_ENV, SECRET_HEADER};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "test-secret-0123456789";
const WAIT: Duration = Duration::from_secs(10);

fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_previewd-agent")
}

/// A running `previewd-agent serve` (or `supervise ... serve`), killed on drop.
struct Agent {
    child: Child,
    addr: SocketAddr,
    /// Everything it printed to stderr after the `listening on` line.
    _stderr: mpsc::Receiver<String>,
}

impl Agent {
    fn serve(pidfile: Option<&Path>) -> Agent {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0"]);
        if let Some(pidfile) = pidfile {
            cmd.arg("--pidfile").arg(pidfile);
        }
        Agent::start(cmd)
    }

    /// Starts `cmd` with the secret and waits for its `listening on` line.
    fn start(mut cmd: Command) -> Agent {
        let mut child = cmd
            .env(SECRET_ENV, SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx.recv_timeout(WAIT).unwrap_or_else(|e| {
            let _ = child.kill();
            panic!("the agent printed nothing within {WAIT:?}: {e}")
        });
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first stderr line {line:?}"));
        Agent {
            child,
            addr,
            _stderr: rx,
        }
    }

    async fn stream(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        wait_exit(&mut self.child)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + WAIT;
    while is_alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} is still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_stop(pidfile: &Path, remove_dir: Option<&Path>) -> std::process::Output {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("stop").arg("--pidfile").arg(pidfile);
    if let Some(dir) = remove_dir {
        cmd.arg("--remove-dir").arg(dir);
    }
    cmd.output().unwrap()
}

/// Sends raw request bytes and returns the status code and the whole answer.
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("the agent did not answer in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    (status, answer)
}

/// An echo server on 127.0.0.1 that half-closes once the client has.
async fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// Sends 1 MiB through a tunnel to the echo server while reading the echo; then half-closes
/// and expects the echo server's half-close back. `writer` is dropped after its shutdown, so
/// pipes (whose shutdown is a no-op) see EOF too.
async fn echo_round_trip<R, W>(mut reader: R, mut writer: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writing = tokio::spawn(async move {
        writer.write_all(&sent).await.unwrap();
        writer.shutdown().await.unwrap();
        drop(writer);
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), reader.read_to_end(&mut echoed))
        .await
        .expect("no EOF came back: half-close was not propagated")
        .unwrap();
    writing.await.unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "the echo differs from what was sent");
}

#[test]
fn refuses_to_start_without_a_secret() {
    for secret in [None, Some(""), Some("fifteen-chars!!")] {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .env_remove(SECRET_ENV);
        if let Some(secret) = secret {
            cmd.env(SECRET_ENV, secret);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "secret {secret:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(SECRET_ENV), "{stderr}");
        assert!(!stderr.contains("listening on"), "{stderr}");
    }
}

#[test]
fn version_is_printed() {
    let out = Command::new(agent_bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("previewd-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn health_answers_with_version_and_pid() {
    let agent = Agent::serve(None);
    let health = client::health(&mut agent.stream().await, SECRET)
        .await
        .unwrap();
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(health.pid, agent.child.id());
}

#[tokio::test]
async fn missing_and_wrong_secrets_are_rejected() {
    let agent = Agent::serve(None);
    let port = echo_server().await;

    for request in [
        "GET /v1/health HTTP/1.1\r\n\r\n".to_owned(),
        "GET /v1/ports HTTP/1.1\r\n\r\n".to_owned(),
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n"),
        "POST /v1/shutdown HTTP/1.1\r\n\r\n".to_owned(),
    ] {
        let (status, answer) = raw(agent.addr, request.as_bytes()).await;
        assert_eq!(status, 401, "{request:?}: {answer}");
        assert!(answer.contains(r#"{"error":"#), "{answer}");
    }

    let wrong = "wrong-secret-0123456789";
    let r = client::health(&mut agent.stream().await, wrong).await;
    assert!(matches!(r, Err(AgentError::SecretInvalid)), "{r:?}");
    let r = client::ports(&mut agent.stream().await, wrong).await;
    assert!(matches!(r, Err(AgentError::SecretInvalid)), "{r:?}");
    let r = client::connect(agent.stream().await, wrong, port).await;
    assert!(matches!(r, Err(AgentError::SecretInvalid)), "{:?}", r.err());
    let r = client::shutdown(&mut agent.stream().await, wrong).await;
    assert!(matches!(r, Err(AgentError::SecretInvalid)), "{r:?}");

    // Missing a header through the client too: an empty value is a wrong secret, not none.
    let (status, _) = raw(
        agent.addr,
        format!("GET /v1/health HTTP/1.1\r\n{SECRET_HEADER}: \r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 403);

    // The agent still works with the right one.
    client::health(&mut agent.stream().await, SECRET)
        .await
        .unwrap();
}

#[tokio::test]
async fn unknown_endpoints_are_404() {
    let agent = Agent::serve(None);
    let (status, _) = raw(
        agent.addr,
        format!("GET /v1/nope HTTP/1.1\r\n{SECRET_HEADER}: {SECRET}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn ports_lists_ipv4_and_ipv6_listeners() {
    let agent = Agent::serve(None);
    let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut expected = vec![port_of(&v4)];
    let mut v6 = Vec::new();
    for addr in ["[::1]:0", "[::]:0"] {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => {
                expected.push(port_of(&listener));
                v6.push(listener);
            }
            Err(e) => eprintln!(
                "\n!!!!! SKIPPED the {addr} part of ports_lists_ipv4_and_ipv6_listeners: IPv6 is unavailable here ({e}) !!!!!\n"
            ),
        }
    }
    let answer = client::ports(&mut agent.stream().await, SECRET)
        .await
        .unwrap();
    // This agent runs beside the test, in its network namespace, and says which that is.
    assert_eq!(
        answer.network_namespace,
        previewd::runtime::netns::own_inode()
    );
    let ports = answer.ports;
    for port in &expected {
        assert!(ports.contains(port), "{port:?} missing from {ports:?}");
    }
    // The agent's own listener is there too, and the list is sorted by (port, address).
    assert!(ports.contains(&ListeningPort {
        address: agent.addr.ip(),
        port: agent.addr.port()
    }));
    let mut sorted = ports.clone();
    sorted.sort_by_key(|p| (p.port, p.address));
    sorted.dedup();
    assert_eq!(ports, sorted);
}

fn port_of(listener: &std::net::TcpListener) -> ListeningPort {
    let addr = listener.local_addr().unwrap();
    ListeningPort {
        address: addr.ip(),
        port: addr.port(),
    }
}

#[tokio::test]
async fn connect_tunnels_through_serve() {
    let agent = Agent::serve(None);
    let port = echo_server().await;
    let tunnel = client::connect(agent.stream().await, SECRET, port)
        .await
        .unwrap();
    let (reader, writer) = tokio::io::split(tunnel);
    echo_round_trip(reader, writer).await;
}

#[tokio::test]
async fn bytes_sent_with_the_connect_head_are_not_lost() {
    let agent = Agent::serve(None);
    let port = echo_server().await;
    let request = format!(
        "CONNECT 127.0.0.1:{port} HTTP/1.1\r\n{SECRET_HEADER}: {SECRET}\r\n\r\nearly bytes"
    );
    let mut stream = agent.stream().await;
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "HTTP/1.1 200 Connection established\r\n\r\nearly bytes"
    );
}

#[tokio::test]
async fn connect_to_a_closed_port_is_port_closed() {
    let agent = Agent::serve(None);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let r = client::connect(agent.stream().await, SECRET, port).await;
    assert!(
        matches!(r, Err(AgentError::PortClosed { port: p }) if p == port),
        "{:?}",
        r.err()
    );
}

#[tokio::test]
async fn connect_to_a_non_loopback_address_is_refused_without_connecting() {
    let agent = Agent::serve(None);
    for target in ["192.0.2.1:80", "[2001:db8::1]:80", "example.invalid:80"] {
        let started = Instant::now();
        let (status, answer) = raw(
            agent.addr,
            format!("CONNECT {target} HTTP/1.1\r\n{SECRET_HEADER}: {SECRET}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status, 403, "{target}: {answer}");
        assert!(answer.contains("loopback"), "{answer}");
        // A connect attempt to TEST-NET would hang until the agent's 10 s connect timeout
        // and end in 502: a prompt 403 means nothing was dialled.
        assert!(started.elapsed() < Duration::from_secs(3), "{target}");
    }
}

/// `previewd-agent stdio` with piped stdin/stdout, as `docker exec -i` runs it.
fn spawn_stdio() -> tokio::process::Child {
    tokio::process::Command::new(agent_bin())
        .arg("stdio")
        .env(SECRET_ENV, SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn wait_stdio_exit(child: &mut tokio::process::Child) -> ExitStatus {
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("previewd-agent stdio did not exit")
        .unwrap()
}

#[tokio::test]
async fn connect_tunnels_through_stdio() {
    let port = echo_server().await;
    let mut child = spawn_stdio();
    let pipes = tokio::io::join(child.stdout.take().unwrap(), child.stdin.take().unwrap());
    let tunnel = client::connect(pipes, SECRET, port).await.unwrap();
    let (stdout, stdin) = tunnel.into_inner();
    echo_round_trip(stdout, stdin).await;
    assert!(wait_stdio_exit(&mut child).await.success());
}

#[tokio::test]
async fn stdio_exits_when_the_upstream_closes_while_stdin_stays_open() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        if let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(b"bye").await;
        }
    });
    let mut child = spawn_stdio();
    let pipes = tokio::io::join(child.stdout.take().unwrap(), child.stdin.take().unwrap());
    let tunnel = client::connect(pipes, SECRET, port).await.unwrap();
    let (mut stdout, _stdin_kept_open) = tunnel.into_inner();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, stdout.read_to_end(&mut got))
        .await
        .expect("stdout did not end after the upstream closed")
        .unwrap();
    assert_eq!(got, b"bye");
    assert!(wait_stdio_exit(&mut child).await.success());
}

#[tokio::test]
async fn stdio_answers_one_request() {
    let mut child = spawn_stdio();
    let mut pipes = tokio::io::join(child.stdout.take().unwrap(), child.stdin.take().unwrap());
    let health = client::health(&mut pipes, SECRET).await.unwrap();
    assert_eq!(health.pid, child.id().unwrap());
    drop(pipes);
    assert!(wait_stdio_exit(&mut child).await.success());

    let mut child = spawn_stdio();
    let mut pipes = tokio::io::join(child.stdout.take().unwrap(), child.stdin.take().unwrap());
    let r = client::ports(&mut pipes, "wrong-secret-0123456789").await;
    assert!(matches!(r, Err(AgentError::SecretInvalid)), "{r:?}");
    drop(pipes);
    wait_stdio_exit(&mut child).await;
}

#[tokio::test]
async fn stdio_refuses_to_start_without_a_secret() {
    let out = tokio::process::Command::new(agent_bin())
        .arg("stdio")
        .env_remove(SECRET_ENV)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn shutdown_request_ends_serve_and_removes_the_pidfile() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("agent.pid");
    let mut agent = Agent::serve(Some(&pidfile));
    assert!(pidfile.exists());
    client::shutdown(&mut agent.stream().await, SECRET)
        .await
        .unwrap();
    assert!(agent.wait_exit().success());
    assert!(!pidfile.exists());
}

#[test]
fn stop_ends_serve_and_removes_the_pidfile() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("agent.pid");
    let mut agent = Agent::serve(Some(&pidfile));
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, agent.child.id());

    let out = run_stop(&pidfile, None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(agent.wait_exit().code(), Some(0), "SIGTERM is a clean exit");
    assert!(!pidfile.exists());

    // Stopping again finds nothing to stop, and that is fine.
    let out = run_stop(&pidfile, None);
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn supervise_and_stop_end_the_child_too() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("app.pid");
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let state = dir.path().join("state");
    let mut supervisor = Command::new(agent_bin())
        .arg("supervise")
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--state-dir")
        .arg(&state)
        .args(["--", agent_bin(), "serve", "--listen", &listen])
        .env(SECRET_ENV, SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The supervisor announces its child; the child's own output goes nowhere (previewd stops
    // reading the exec that started it).
    let mut first = String::new();
    BufReader::new(supervisor.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let announced: u32 = first
        .strip_prefix(previewd::agent::supervise::STARTED_PREFIX)
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected first stderr line {first:?}"));
    let supervisor_pid = supervisor.id();
    let deadline = Instant::now() + WAIT;
    let child_pid = loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await
            && let Ok(h) = client::health(&mut s, SECRET).await
        {
            break h.pid;
        }
        assert!(
            Instant::now() < deadline,
            "the supervised agent never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(child_pid, announced);
    assert_ne!(child_pid, supervisor_pid);
    let written: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(written, supervisor_pid, "the pidfile names the supervisor");

    let out = run_stop(&pidfile, None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        wait_exit(&mut supervisor).code(),
        Some(0),
        "the supervisor exits with the child's status"
    );
    wait_gone(child_pid as i32);
    assert!(!pidfile.exists());
    // A stopped child is not restarted, and its last state says so.
    let st = daemon_status(Path::new(agent_bin()), &state);
    assert!(!st.supervisor_running && !st.daemon_running, "{st:?}");
    let last = st.state.unwrap_or_default();
    assert_eq!(last.restarts, 0);
    assert_eq!(last.child, None);
    assert_eq!(last.exits.len(), 1);
    assert_eq!(last.exits[0].code, Some(0));
}

/// `previewd-agent daemon-status --dir DIR`, run by `exe`, parsed.
fn daemon_status(exe: &Path, dir: &Path) -> DaemonStatus {
    let out = Command::new(exe)
        .arg("daemon-status")
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// Polls `daemon-status` until `done` holds (or panics after `limit`).
fn wait_status(
    exe: &Path,
    dir: &Path,
    limit: Duration,
    done: impl Fn(&DaemonStatus) -> bool,
) -> DaemonStatus {
    let deadline = Instant::now() + limit;
    loop {
        let st = daemon_status(exe, dir);
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "timed out; last status {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `exe supervise --state-dir state -- argv` and waits for its announcement.
fn start_supervisor(exe: &Path, state: &Path, argv: &[&str]) -> Child {
    let mut supervisor = Command::new(exe)
        .arg("supervise")
        .arg("--state-dir")
        .arg(state)
        .arg("--")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(supervisor.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(
        first.starts_with(previewd::agent::supervise::STARTED_PREFIX),
        "{first:?}"
    );
    supervisor
}

#[test]
fn supervise_restarts_an_exiting_child_with_backoff_and_keeps_its_output() {
    let install = tempfile::tempdir().unwrap();
    let exe = install_copy(install.path());
    let state = install.path().join("daemon-state");
    // As previewd prepares it: an empty sticky directory any user may write in.
    let reset = Command::new(&exe)
        .arg("stop")
        .arg("--reset-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(reset.status.success(), "{reset:?}");
    let mut supervisor = start_supervisor(
        &exe,
        &state,
        &["/bin/sh", "-c", "echo \"run $$\"; echo oops >&2; exit 3"],
    );

    let st = wait_status(&exe, &state, Duration::from_secs(20), |st| {
        st.state.as_ref().is_some_and(|s| s.exits.len() >= 3)
    });
    assert!(st.supervisor_running, "{st:?}");
    let s = st.state.clone().unwrap_or_default();
    let exits = &s.exits[..3];
    for (run, exit) in exits.iter().enumerate() {
        assert_eq!(
            (exit.run, exit.code, exit.signal),
            (run as u32, Some(3), None)
        );
    }
    // The waits between runs double from one second.
    let gap = |i: usize| exits[i + 1].at_ms - exits[i].at_ms;
    assert!(gap(0) >= 1000, "{exits:?}");
    assert!(gap(1) >= 2000 && gap(1) > gap(0), "{exits:?}");
    assert!(s.restarts >= 2);
    // stdout and stderr, in the order written, every run's.
    assert!(st.output.ends_with("oops\n"), "{:?}", st.output);
    assert!(st.output.matches("oops\n").count() >= 3, "{:?}", st.output);
    assert!(st.output.matches("run ").count() >= 3, "{:?}", st.output);
    assert!(st.output.lines().count() <= 10);

    // `stop` ends the supervisor even while it backs off, and removes its files.
    let stop = Command::new(&exe)
        .arg("stop")
        .arg("--remove-dir")
        .arg(install.path())
        .output()
        .unwrap();
    assert!(stop.status.success(), "{stop:?}");
    // The last run's code, or SIGTERM's if `stop` caught a run.
    let code = wait_exit(&mut supervisor).code();
    assert!(matches!(code, Some(3 | 143)), "{code:?}");
    assert!(!install.path().exists());
}

#[test]
fn a_killed_child_is_recorded_with_its_signal_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut supervisor = start_supervisor(Path::new(agent_bin()), &state, &["/bin/sleep", "30"]);
    let exe = Path::new(agent_bin());
    let first = wait_status(exe, &state, WAIT, |st| st.daemon_running);
    let pid = first
        .state
        .and_then(|s| s.child)
        .map(|c| c.pid)
        .unwrap_or(0);
    assert!(pid > 1);
    previewd::agent::process::send_signal(pid as i32, libc::SIGKILL).unwrap();
    let st = wait_status(exe, &state, WAIT, |st| {
        st.daemon_running && st.state.as_ref().is_some_and(|s| s.restarts == 1)
    });
    let s = st.state.unwrap_or_default();
    assert_eq!(s.exits.len(), 1);
    assert_eq!(
        (s.exits[0].code, s.exits[0].signal),
        (None, Some(libc::SIGKILL))
    );
    assert_ne!(s.child.map(|c| c.pid), Some(pid), "a new process runs");

    // SIGTERM reaches the child (sleep dies of it) and ends the supervisor.
    previewd::agent::process::send_signal(supervisor.id() as i32, libc::SIGTERM).unwrap();
    assert_eq!(wait_exit(&mut supervisor).code(), Some(143));
    let st = daemon_status(exe, &state);
    assert!(!st.supervisor_running && !st.daemon_running, "{st:?}");
}

/// Copies the agent into `dir` (its `stop --remove-dir` and `--reset-dir` act only there).
fn install_copy(dir: &Path) -> std::path::PathBuf {
    let exe = dir.join("previewd-agent");
    std::fs::copy(agent_bin(), &exe).unwrap();
    // ETXTBSY (26): another test thread forked while the copy's write descriptor was open;
    // it goes away when that child execs.
    let mut attempts = 0;
    while let Err(e) = Command::new(&exe).arg("--version").output() {
        assert!(e.raw_os_error() == Some(26) && attempts < 100, "{e}");
        attempts += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    exe
}

/// Copies the agent into `dir` and starts `serve` from there.
fn serve_copy(dir: &Path, pidfile: &Path) -> Agent {
    let exe = install_copy(dir);
    let mut cmd = Command::new(&exe);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--pidfile"])
        .arg(pidfile);
    Agent::start(cmd)
}

#[test]
fn stop_removes_only_the_agents_own_directory() {
    let install = tempfile::tempdir().unwrap();
    let pidfile = install.path().join("agent.pid");
    let mut agent = serve_copy(install.path(), &pidfile);

    // Anything but the executable's own directory is refused, before anything is stopped.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = run_stop(&pidfile, Some(elsewhere.path()));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing"),
        "{out:?}"
    );
    assert!(elsewhere.path().exists());
    assert!(agent.child.try_wait().unwrap().is_none(), "stopped anyway");

    // The copy's own stop removes the copy's directory (the test binary's is not its own).
    let stop = Command::new(install.path().join("previewd-agent"))
        .arg("stop")
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--remove-dir")
        .arg(install.path())
        .output()
        .unwrap();
    assert!(stop.status.success(), "{stop:?}");
    assert_eq!(agent.wait_exit().code(), Some(0));
    assert!(!install.path().exists());
}

#[test]
fn the_binary_is_static() {
    let elf = std::fs::read(agent_bin()).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "not a 64-bit ELF");
    assert_eq!(elf[5], 1, "not little-endian");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    assert!(phnum > 0);
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(elf[off..off + 4].try_into().unwrap());
        assert_ne!(
            p_type,
            PT_INTERP,
            "{} has a program interpreter: it is dynamically linked",
            agent_bin()
        );
    }
}

//! Shared test helpers: running the real `previewd` binary, and skipping loudly when a tool
//! the test needs is absent (unless CI demands it).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Request;
use serde_json::Value;

/// The `previewd` binary under test.
pub fn previewd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_previewd")
}

/// Finds `tool` on PATH. When it is missing the test is skipped with a loud message, unless
/// `require_var=1` is set (CI sets it), which makes that a failure.
pub fn require_tool(tool: &str, require_var: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(tool))
                .find(|c| c.is_file())
        })
        .unwrap_or(None);
    if found.is_none() {
        if std::env::var(require_var).as_deref() == Ok("1") {
            panic!("{tool} is required ({require_var}=1) but not on PATH");
        }
        eprintln!(
            "\n!!!!! SKIPPED: {tool} is not installed; set {require_var}=1 to make this a failure !!!!!\n"
        );
    }
    found
}

/// The environment that turns the controllers off.
pub const API_ONLY: (&str, &str) = ("PREVIEWD_CONTROLLERS", "false");

/// A `previewd serve` child process on an ephemeral port.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The preview proxy's address.
    pub proxy: std::net::SocketAddr,
    /// Every log line (JSON) the server printed so far.
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts a server that serves the API alone (no controllers change objects behind the
    /// test's back) and waits until it listens.
    pub fn api_only(state_dir: &Path) -> Server {
        Server::start_with(state_dir, &[API_ONLY])
    }

    /// Starts a server with extra environment variables.
    pub fn start_with(state_dir: &Path, env: &[(&str, &str)]) -> Server {
        match Server::try_start(state_dir, env) {
            Ok(s) => s,
            Err(e) => panic!("previewd serve did not start: {e}"),
        }
    }

    /// Starts a server, or returns what it printed when it exits instead of listening.
    pub fn try_start(state_dir: &Path, env: &[(&str, &str)]) -> Result<Server, String> {
        Server::try_start_on(state_dir, "127.0.0.1:0", env)
    }

    /// Starts a server with its API on `api_listen`, or returns what it printed when it exits
    /// instead of listening.
    pub fn try_start_on(
        state_dir: &Path,
        api_listen: &str,
        env: &[(&str, &str)],
    ) -> Result<Server, String> {
        Server::try_start_as(&[], state_dir, api_listen, env)
    }

    /// Starts a server through `wrapper` (a command that runs the rest, e.g. `setpriv` to
    /// run it as another user; empty: none), or returns what it printed instead of listening.
    pub fn try_start_as(
        wrapper: &[String],
        state_dir: &Path,
        api_listen: &str,
        env: &[(&str, &str)],
    ) -> Result<Server, String> {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(previewd_bin());
                c
            }
            None => Command::new(previewd_bin()),
        };
        let mut child = command
            .args([
                "serve",
                "--api-listen",
                api_listen,
                "--proxy-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--state-dir",
            ])
            .arg(state_dir)
            .env(
                "RUST_LOG",
                std::env::var("PREVIEWD_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // Most tests address links by path; the default (off) is tested on its own.
            .env("PREVIEWD_PATH_URLS", "true")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    for field in ["addr", "proxy_addr"] {
                        if let Some(a) = v
                            .pointer(&format!("/fields/{field}"))
                            .and_then(Value::as_str)
                        {
                            let _ = tx.send((field, a.to_owned()));
                        }
                    }
                }
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        // The server announces the API address, then the proxy's.
        let mut announced = std::collections::HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while announced.len() < 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((field, addr)) => {
                    announced.insert(field, addr);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    return Err(logs.lock().unwrap_or_else(|p| p.into_inner()).join("\n"));
                }
            }
        }
        let url = format!(
            "http://{}",
            announced.get("addr").map_or("", String::as_str)
        );
        let proxy = announced
            .get("proxy_addr")
            .and_then(|a| a.parse().ok())
            .ok_or("unreadable proxy address")?;
        Ok(Server {
            child,
            url,
            proxy,
            logs,
        })
    }

    /// A kube client talking to this server over HTTP.
    pub fn client(&self) -> kube::Client {
        let uri = self
            .url
            .parse::<http::Uri>()
            .unwrap_or_else(|e| panic!("bad url {}: {e}", self.url));
        kube::Client::try_from(kube::Config::new(uri)).unwrap_or_else(|e| panic!("client: {e}"))
    }

    /// Kills the server with SIGKILL (no chance to clean up) and waits for it.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `limit` for a clean exit; returns whether it exited 0.
    pub fn terminate(mut self, limit: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory of the server process (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib * 1024)
    }

    /// All log lines so far.
    pub fn log_text(&self) -> String {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A failing test shows what the server said.
        if std::thread::panicking() {
            eprintln!(
                "--- previewd serve log ({}) ---\n{}\n--- end of log ---",
                self.url,
                self.log_text()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a raw request through a kube client and returns status code and body as JSON
/// (`Value::Null` when the body is not JSON).
pub async fn raw(client: &kube::Client, req: Request<Vec<u8>>) -> (u16, Value) {
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts, kube::client::Body::from(body));
    let resp = client
        .send(req)
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}"));
    let code = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Polls `check` until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One raw HTTP exchange on a fresh connection to `addr` (the request says
/// `Connection: close`): status, response head, body.
pub async fn exchange(
    addr: impl tokio::net::ToSocketAddrs,
    raw_request: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    s.write_all(raw_request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_owned(), body.to_owned())
}

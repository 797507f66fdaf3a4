//! The agent's side of the protocol: one request per connection, over TCP (`serve`) or over
//! the exec's stdin/stdout (`stdio`).
//!
//! What to do with a request ([`route`]) is decided without IO so it unit-tests; [`handle`]
//! then does it. Tunnels only ever reach loopback: the agent must never become an open proxy
//! into the container's networks.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::agent::http::{self, HeadError, RequestHead};
use crate::agent::proc_net;
use crate::agent::protocol::{
    ErrorResponse, HEAD_TIMEOUT, HEALTH_PATH, Health, MAX_HEAD_BYTES, PORTS_PATH, PortsResponse,
    SECRET_HEADER, SHUTDOWN_PATH, SPLICE_BUFFER_BYTES,
};
use crate::agent::secret::Secret;

/// How long the agent waits for a loopback connect; loopback answers at once unless the
/// container is wedged.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop doesn't spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a request asks for, once authenticated and validated.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Answer with this status and error message.
    Error(u16, String),
    /// `GET /v1/health`.
    Health,
    /// `GET /v1/ports`.
    Ports,
    /// `POST /v1/shutdown`.
    Shutdown,
    /// `CONNECT`: try these loopback addresses in order.
    Connect(Vec<SocketAddr>),
}

/// Decides what to do with a request: authentication first (401 missing, 403 wrong), then
/// the route. Nothing here connects anywhere.
pub fn route(head: &RequestHead, secret: &Secret) -> Route {
    let Some(presented) = head.header(SECRET_HEADER) else {
        return Route::Error(401, format!("missing {SECRET_HEADER} header"));
    };
    if !secret.matches(presented) {
        return Route::Error(403, format!("wrong {SECRET_HEADER}"));
    }
    match (head.method.as_str(), head.target.as_str()) {
        ("GET", HEALTH_PATH) => Route::Health,
        ("GET", PORTS_PATH) => Route::Ports,
        ("POST", SHUTDOWN_PATH) => Route::Shutdown,
        ("CONNECT", target) => match connect_targets(target) {
            Ok(addrs) => Route::Connect(addrs),
            Err((status, message)) => Route::Error(status, message),
        },
        (method, target) => Route::Error(404, format!("no such endpoint: {method} {target}")),
    }
}

/// The loopback addresses a `CONNECT` target names: `127.0.0.1:P`, `[::1]:P` (any loopback
/// address) or `localhost:P` (127.0.0.1, then ::1, without any resolver). Anything else is
/// refused with 403; a malformed target with 400.
fn connect_targets(target: &str) -> Result<Vec<SocketAddr>, (u16, String)> {
    let bad = || (400, format!("CONNECT target {target:?} is not host:port"));
    let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    let ip = if host.eq_ignore_ascii_case("localhost") {
        return Ok(vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
        ]);
    } else if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<Ipv6Addr>().map(IpAddr::V6).ok()
    } else {
        host.parse::<Ipv4Addr>().map(IpAddr::V4).ok()
    };
    match ip {
        Some(ip) if ip.is_loopback() => Ok(vec![SocketAddr::new(ip, port)]),
        _ => Err((
            403,
            format!("CONNECT only reaches loopback inside the container, not {host:?}"),
        )),
    }
}

/// What the connection should do after its request was answered.
#[derive(Debug)]
pub enum Action {
    /// Nothing more: close.
    Done,
    /// The agent was asked to exit (the answer is already sent).
    Shutdown,
    /// The upstream is connected, and not yet answered: the caller says so (and splices the
    /// two, or hands `upstream` over), after writing `pending` (bytes the client sent right
    /// after its head) to it.
    Connected {
        /// The loopback connection.
        upstream: TcpStream,
        /// Client bytes already read past the head.
        pending: Vec<u8>,
    },
}

/// Reads one request from `io`, answers it, and says what to do next. Malformed, oversized or
/// slow heads get a 400/431/408 answer; IO errors are returned.
pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    secret: &Secret,
) -> io::Result<Action> {
    let read =
        tokio::time::timeout(HEAD_TIMEOUT, http::read_head_buffered(io, MAX_HEAD_BYTES)).await;
    let parsed = match read {
        Err(_elapsed) => Err((408, "timed out reading the request head".to_owned())),
        Ok(Err(HeadError::Eof)) => return Ok(Action::Done),
        Ok(Err(HeadError::Io(e))) => return Err(e),
        Ok(Err(e @ HeadError::TooLarge { .. })) => Err((431, e.to_string())),
        Ok(Err(e @ HeadError::Malformed(_))) => Err((400, e.to_string())),
        Ok(Ok((head, rest))) => RequestHead::parse(&head)
            .map(|h| (h, rest))
            .map_err(|e| (400, e.to_string())),
    };
    let (head, pending) = match parsed {
        Ok(ok) => ok,
        Err((status, message)) => {
            respond_error(io, status, message).await?;
            return Ok(Action::Done);
        }
    };
    match route(&head, secret) {
        Route::Error(status, message) => respond_error(io, status, message).await?,
        Route::Health => {
            let health = Health {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
            };
            respond_json(io, 200, &health).await?;
        }
        Route::Ports => match proc_net::listening_ports().await {
            Ok(ports) => {
                let answer = PortsResponse {
                    ports,
                    network_namespace: crate::runtime::netns::own_inode(),
                    handoff_pid: crate::agent::handoff::helper_pid(),
                };
                respond_json(io, 200, &answer).await?;
            }
            Err(e) => respond_error(io, 500, format!("reading /proc/net failed: {e}")).await?,
        },
        Route::Shutdown => {
            respond_json(io, 200, &serde_json::json!({"status": "shutting down"})).await?;
            return Ok(Action::Shutdown);
        }
        Route::Connect(addrs) => match connect_first(&addrs).await {
            Ok(upstream) => return Ok(Action::Connected { upstream, pending }),
            Err(message) => respond_error(io, 502, message).await?,
        },
    }
    Ok(Action::Done)
}

/// Connects to the first address that accepts, or says why none did.
async fn connect_first(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut failures = Vec::new();
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_elapsed) => failures.push(format!("{addr}: timed out")),
        }
    }
    Err(format!(
        "nothing accepts the connection ({})",
        failures.join("; ")
    ))
}

async fn respond_json<S, T>(io: &mut S, status: u16, body: &T) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
    T: serde::Serialize,
{
    let body = serde_json::to_vec(body).map_err(io::Error::other)?;
    io.write_all(&http::json_response(status, &body)).await?;
    io.flush().await?;
    io.shutdown().await
}

async fn respond_error<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: u16,
    error: String,
) -> io::Result<()> {
    respond_json(io, status, &ErrorResponse { error }).await
}

/// Accepts connections on `listener` until `stop` resolves or a client asks for shutdown.
/// Each connection runs on its own task; open tunnels end when the process exits.
pub async fn serve(
    listener: TcpListener,
    secret: Arc<Secret>,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let shutdown = Arc::new(Notify::new());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = shutdown.notified() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tokio::spawn(connection(stream, secret.clone(), shutdown.clone()));
                }
                // Per-connection failures (e.g. EMFILE) must not end the daemon.
                Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
            },
        }
    }
}

/// Tells the client its tunnel is up.
async fn established<S: AsyncWrite + Unpin>(io: &mut S) -> io::Result<()> {
    io.write_all(http::CONNECT_ESTABLISHED).await?;
    io.flush().await
}

/// One TCP connection of `serve`.
async fn connection(mut stream: TcpStream, secret: Arc<Secret>, shutdown: Arc<Notify>) {
    let _ = stream.set_nodelay(true);
    match handle(&mut stream, &secret).await {
        Ok(Action::Connected {
            mut upstream,
            pending,
        }) => {
            let _ = upstream.set_nodelay(true);
            if established(&mut stream).await.is_ok() && upstream.write_all(&pending).await.is_ok()
            {
                // Errors here are the peers hanging up; there is no one to report them to.
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut stream,
                    &mut upstream,
                    SPLICE_BUFFER_BYTES,
                    SPLICE_BUFFER_BYTES,
                )
                .await;
            }
        }
        Ok(Action::Shutdown) => shutdown.notify_one(),
        Ok(Action::Done) | Err(_) => {}
    }
}

/// Answers one request read from stdin on stdout; for `CONNECT`, then splices stdin/stdout
/// with the upstream socket. Stdin EOF half-closes the upstream; upstream EOF ends the
/// session once stdout is flushed (an exec's stdout can't be half-closed, so waiting for
/// stdin too could leave the controller waiting forever).
pub async fn stdio(secret: &Secret) -> io::Result<()> {
    let mut io = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    let Action::Connected { upstream, pending } = handle(&mut io, secret).await? else {
        return Ok(());
    };
    established(&mut io).await?;
    let _ = upstream.set_nodelay(true);
    let (stdin, mut stdout) = io.into_inner();
    let (upstream_read, mut upstream_write) = upstream.into_split();
    tokio::spawn(async move {
        upstream_write.write_all(&pending).await?;
        let mut stdin = BufReader::with_capacity(SPLICE_BUFFER_BYTES, stdin);
        tokio::io::copy_buf(&mut stdin, &mut upstream_write).await?;
        upstream_write.shutdown().await
    });
    let mut upstream_read = BufReader::with_capacity(SPLICE_BUFFER_BYTES, upstream_read);
    tokio::io::copy_buf(&mut upstream_read, &mut stdout).await?;
    stdout.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef";

    fn request(text: &str) -> RequestHead {
        RequestHead::parse(text.as_bytes()).unwrap()
    }

    fn authed(method: &str, target: &str) -> RequestHead {
        request(&format!(
            "{method} {target} HTTP/1.1\r\n{SECRET_HEADER}: {SECRET}\r\n\r\n"
        ))
    }

    fn status(route: Route) -> Option<u16> {
        match route {
            Route::Error(status, _) => Some(status),
            _ => None,
        }
    }

    #[test]
    fn secrets_are_checked_before_anything_else() {
        let secret = Secret::new(SECRET).unwrap();
        for target in [
            "/v1/health",
            "/v1/ports",
            "/nope",
            "127.0.0.1:80",
            "192.0.2.1:80",
        ] {
            let missing = request(&format!("GET {target} HTTP/1.1\r\n\r\n"));
            assert_eq!(status(route(&missing, &secret)), Some(401));
            let wrong = request(&format!(
                "CONNECT {target} HTTP/1.1\r\n{SECRET_HEADER}: 0123456789abcdeX\r\n\r\n"
            ));
            assert_eq!(status(route(&wrong, &secret)), Some(403));
        }
    }

    #[test]
    fn endpoints_route() {
        let secret = Secret::new(SECRET).unwrap();
        assert_eq!(route(&authed("GET", "/v1/health"), &secret), Route::Health);
        assert_eq!(route(&authed("GET", "/v1/ports"), &secret), Route::Ports);
        assert_eq!(
            route(&authed("POST", "/v1/shutdown"), &secret),
            Route::Shutdown
        );
        for (method, target) in [
            ("POST", "/v1/health"),
            ("GET", "/v1/shutdown"),
            ("GET", "/"),
            ("DELETE", "/v1/ports"),
            ("GET", "/v1/health?x=1"),
        ] {
            assert_eq!(
                status(route(&authed(method, target), &secret)),
                Some(404),
                "{method} {target}"
            );
        }
    }

    #[test]
    fn connect_reaches_only_loopback() {
        let secret = Secret::new(SECRET).unwrap();
        let connect = |target: &str| route(&authed("CONNECT", target), &secret);
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            connect("127.0.0.1:3000"),
            Route::Connect(vec![addr("127.0.0.1:3000")])
        );
        assert_eq!(
            connect("[::1]:3000"),
            Route::Connect(vec![addr("[::1]:3000")])
        );
        assert_eq!(
            connect("LocalHost:8080"),
            Route::Connect(vec![addr("127.0.0.1:8080"), addr("[::1]:8080")])
        );
        for target in [
            "192.0.2.1:80",
            "0.0.0.0:80",
            "[::]:80",
            "[::ffff:127.0.0.1]:80",
            "example.com:80",
            "127.0.0.1.nip.io:80",
            "[2001:db8::1]:80",
            "10.0.0.1:22",
        ] {
            assert_eq!(status(connect(target)), Some(403), "{target}");
        }
        for target in [
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:+80",
            "[::1]:x",
        ] {
            assert_eq!(status(connect(target)), Some(400), "{target}");
        }
    }

    #[tokio::test]
    async fn bad_heads_get_an_answer() {
        let secret = Secret::new(SECRET).unwrap();
        for (input, expected) in [
            (&b"GARBAGE\r\n\r\n"[..], "HTTP/1.1 400 "),
            (&[b'a'; MAX_HEAD_BYTES + 1][..], "HTTP/1.1 431 "),
        ] {
            let (mut client, mut server) = tokio::io::duplex(MAX_HEAD_BYTES * 2);
            client.write_all(input).await.unwrap();
            let action = handle(&mut server, &secret).await.unwrap();
            assert!(matches!(action, Action::Done));
            let mut answer = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut answer)
                .await
                .unwrap();
            let answer = String::from_utf8(answer).unwrap();
            assert!(answer.starts_with(expected), "{answer}");
            assert!(answer.contains(r#"{"error":"#), "{answer}");
        }
    }
}

//! previewd's side of the agent protocol, over any byte stream: a TCP connection to the
//! agent's `serve` port, or the stdio of a `docker exec` / pod exec running `stdio`.
//!
//! The agent runs inside a container previewd does not trust, so every answer is read with a
//! size limit and a timeout, and anything unexpected is an error, never a guess.

use std::io;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::agent::http::{self, HeadError, ResponseHead};
use crate::agent::protocol::{
    ErrorResponse, HEAD_TIMEOUT, HEALTH_PATH, Health, MAX_BODY_BYTES, MAX_HEAD_BYTES, PORTS_PATH,
    PortsResponse, SECRET_HEADER, SHUTDOWN_PATH,
};
use crate::agent::secret::is_header_safe;

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The stream failed (or an answer took longer than the protocol allows).
    #[error("talking to the agent failed: {0}")]
    Io(#[from] io::Error),
    /// The agent says no secret was sent (401).
    #[error("the agent wants a secret and none was sent")]
    SecretMissing,
    /// The agent rejected the secret (403): it was injected with another one.
    #[error("the agent rejected the secret")]
    SecretInvalid,
    /// Nothing accepts connections on that port inside the container (502).
    #[error("nothing listens on port {port} inside the container")]
    PortClosed {
        /// The port asked for.
        port: u16,
    },
    /// The agent's answer was malformed or unexpected.
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
}

/// `GET /v1/health`: the agent's version and pid.
pub async fn health<S>(stream: &mut S, secret: &str) -> Result<Health, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send(stream, "GET", HEALTH_PATH, secret).await?;
    let head = read_response_head(stream).await?;
    expect_ok(stream, &head, None).await?;
    read_json(stream, &head).await
}

/// `GET /v1/ports`: the sockets listening inside the container, and the container's network
/// namespace as the agent sees it.
pub async fn ports<S>(stream: &mut S, secret: &str) -> Result<PortsResponse, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send(stream, "GET", PORTS_PATH, secret).await?;
    let head = read_response_head(stream).await?;
    expect_ok(stream, &head, None).await?;
    read_json(stream, &head).await
}

/// `CONNECT localhost:port`: on success the stream is a raw tunnel to that port inside the
/// container, ready to splice. Nothing past the agent's answer is read from it. `localhost`
/// makes the agent try 127.0.0.1 and then [::1], so apps bound only to IPv6 loopback are
/// reached too.
pub async fn connect<S>(mut stream: S, secret: &str, port: u16) -> Result<S, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send(&mut stream, "CONNECT", &format!("localhost:{port}"), secret).await?;
    let head = read_response_head(&mut stream).await?;
    expect_ok(&mut stream, &head, Some(port)).await?;
    Ok(stream)
}

/// `POST /v1/shutdown`: the agent answers, then exits and removes its pidfile.
pub async fn shutdown<S>(stream: &mut S, secret: &str) -> Result<(), AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send(stream, "POST", SHUTDOWN_PATH, secret).await?;
    let head = read_response_head(stream).await?;
    expect_ok(stream, &head, None).await
}

/// Writes a request head. The secret goes into a header, so it must not be able to end it.
async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    method: &str,
    target: &str,
    secret: &str,
) -> Result<(), AgentError> {
    if !is_header_safe(secret) {
        return Err(AgentError::Protocol(
            "the secret must be printable ASCII without spaces".to_owned(),
        ));
    }
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: previewd-agent\r\n{SECRET_HEADER}: {secret}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    stream.flush().await?;
    Ok(())
}

async fn read_response_head<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<ResponseHead, AgentError> {
    let head = tokio::time::timeout(HEAD_TIMEOUT, http::read_head_exact(stream, MAX_HEAD_BYTES))
        .await
        .map_err(|_| timed_out("the agent's answer"))?
        .map_err(|e| match e {
            HeadError::Io(e) => AgentError::Io(e),
            other => AgentError::Protocol(other.to_string()),
        })?;
    ResponseHead::parse(&head).map_err(|e| AgentError::Protocol(e.to_string()))
}

/// Maps a non-200 status to its error. `connect_port` is set for `CONNECT`, the only call
/// where 502 means a closed port.
async fn expect_ok<S: AsyncRead + Unpin>(
    stream: &mut S,
    head: &ResponseHead,
    connect_port: Option<u16>,
) -> Result<(), AgentError> {
    match (head.status, connect_port) {
        (200, _) => Ok(()),
        (401, _) => Err(AgentError::SecretMissing),
        (403, _) => Err(AgentError::SecretInvalid),
        (502, Some(port)) => Err(AgentError::PortClosed { port }),
        (status, _) => {
            let detail = match read_json::<_, ErrorResponse>(stream, head).await {
                Ok(body) => body.error,
                Err(e) => format!("(unreadable body: {e})"),
            };
            Err(AgentError::Protocol(format!("status {status}: {detail}")))
        }
    }
}

/// Reads the body (by `Content-Length`, bounded) and decodes it.
async fn read_json<S, T>(stream: &mut S, head: &ResponseHead) -> Result<T, AgentError>
where
    S: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let length = head
        .header("Content-Length")
        .ok_or_else(|| AgentError::Protocol("answer without Content-Length".to_owned()))?;
    let length: usize = length
        .parse()
        .ok()
        .filter(|l| *l <= MAX_BODY_BYTES)
        .ok_or_else(|| {
            AgentError::Protocol(format!("bad or too large Content-Length {length:?}"))
        })?;
    let mut body = vec![0u8; length];
    tokio::time::timeout(HEAD_TIMEOUT, stream.read_exact(&mut body))
        .await
        .map_err(|_| timed_out("the agent's answer body"))??;
    serde_json::from_slice(&body).map_err(|e| AgentError::Protocol(format!("bad JSON body: {e}")))
}

fn timed_out(what: &str) -> AgentError {
    AgentError::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("timed out waiting for {what}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `call` against a fake agent that answers `answer` (and returns what was sent).
    async fn against<T>(
        answer: &'static [u8],
        call: impl AsyncFnOnce(&mut tokio::io::DuplexStream) -> T,
    ) -> (T, String) {
        let (mut client, mut agent) = tokio::io::duplex(64 * 1024);
        let fake = tokio::spawn(async move {
            let (head, _) = http::read_head_buffered(&mut agent, MAX_HEAD_BYTES)
                .await
                .unwrap();
            agent.write_all(answer).await.unwrap();
            String::from_utf8(head).unwrap()
        });
        let result = call(&mut client).await;
        (result, fake.await.unwrap())
    }

    const SECRET: &str = "0123456789abcdef";

    #[tokio::test]
    async fn health_sends_the_secret_and_decodes() {
        let (health, sent) = against(
            b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n{\"version\":\"0.1.0\",\"pid\":4242}",
            async |s| health(s, SECRET).await,
        )
        .await;
        assert!(sent.starts_with("GET /v1/health HTTP/1.1\r\n"), "{sent}");
        assert!(sent.contains("X-Previewd-Agent-Secret: 0123456789abcdef\r\n"));
        let health = health.unwrap();
        assert_eq!(health.version, "0.1.0");
        assert_eq!(health.pid, 4242);
    }

    #[tokio::test]
    async fn statuses_map_to_errors() {
        let (r, _) = against(b"HTTP/1.1 401 Unauthorized\r\n\r\n", async |s| {
            ports(s, SECRET).await
        })
        .await;
        assert!(matches!(r, Err(AgentError::SecretMissing)));
        let (r, _) = against(b"HTTP/1.1 403 Forbidden\r\n\r\n", async |s| {
            shutdown(s, SECRET).await
        })
        .await;
        assert!(matches!(r, Err(AgentError::SecretInvalid)));
        let (r, sent) = against(b"HTTP/1.1 502 Bad Gateway\r\n\r\n", async |s| {
            connect(s, SECRET, 3000).await.map(|_| ())
        })
        .await;
        assert!(sent.starts_with("CONNECT localhost:3000 HTTP/1.1\r\n"));
        assert!(matches!(r, Err(AgentError::PortClosed { port: 3000 })));
        let (r, _) = against(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 16\r\n\r\n{\"error\":\"nope\"}",
            async |s| health(s, SECRET).await,
        )
        .await;
        assert!(
            matches!(r, Err(AgentError::Protocol(m)) if m.contains("404") && m.contains("nope"))
        );
    }

    #[tokio::test]
    async fn hostile_answers_are_protocol_errors() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]",
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n",
        ] {
            let (r, _) = against(answer, async |s| ports(s, SECRET).await).await;
            assert!(
                matches!(r, Err(AgentError::Protocol(_))),
                "{answer:?}: {r:?}"
            );
        }
    }

    #[tokio::test]
    async fn secrets_cannot_inject_headers() {
        let (mut client, _agent) = tokio::io::duplex(1024);
        let r = health(&mut client, "0123456789abcdef\r\nX-Other: 1").await;
        assert!(matches!(r, Err(AgentError::Protocol(_))));
    }

    #[tokio::test]
    async fn tunnels_reach_apps_bound_only_to_ipv6_loopback() {
        use std::sync::Arc;

        use tokio::net::{TcpListener, TcpStream};

        use crate::agent::secret::Secret;
        use crate::agent::server;

        let app = match TcpListener::bind("[::1]:0").await {
            Ok(l) => l,
            Err(e) => panic!("this test needs IPv6 loopback: {e}"),
        };
        let port = app.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = app.accept().await.unwrap();
            s.write_all(b"hello over ::1").await.unwrap();
        });
        let agent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent_addr = agent.local_addr().unwrap();
        let secret = Arc::new(Secret::new(SECRET).unwrap());
        tokio::spawn(server::serve(agent, secret, std::future::pending()));

        let stream = TcpStream::connect(agent_addr).await.unwrap();
        let mut tunnel = connect(stream, SECRET, port).await.unwrap();
        let mut got = String::new();
        tunnel.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello over ::1");
    }
}

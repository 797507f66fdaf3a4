//! A tiny static upstream for previewd's tests and benchmarks (`cargo test` builds it; the
//! tests put it in the containers they create). `testapp ADDR` serves:
//! - `GET /` → a short page;
//! - `GET /sse?n=N&ms=M` → N server-sent events, one every M ms;
//! - `GET /download?bytes=N` → N bytes, streamed;
//! - `POST /upload` → the number of bytes received, counted as they stream in;
//! - `GET /ws` → a WebSocket echo (text and binary);
//! - `GET /headers` → the request's headers, one per line;
//! - `GET /bye` → `bye`, then the connection is dropped 100 ms later without notice (what a
//!   kept-alive connection closed by the server's idle timeout looks like to a proxy).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = BoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(text.into()).boxed()
}

fn param(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|p| p.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// Serves one request; `bye` drops its connection when notified.
async fn serve(
    mut req: Request<Incoming>,
    bye: Arc<tokio::sync::Notify>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let resp = match (req.method().as_str(), path.as_str()) {
        ("GET", "/") => Response::new(full("hello from testapp\n")),
        ("GET", "/bye") => {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                bye.notify_one();
            });
            Response::new(full("bye\n"))
        }
        ("GET", "/headers") => {
            let lines: String = req
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
                .collect();
            Response::new(full(lines))
        }
        ("GET", "/sse") => {
            let (n, ms) = (
                param(&req, "n").unwrap_or(5),
                param(&req, "ms").unwrap_or(200),
            );
            let events = futures::stream::unfold(0, move |i| async move {
                if i >= n {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: event {i}\n\n")))),
                    i + 1,
                ))
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(events)))
                .unwrap_or_else(|_| Response::new(full("")))
        }
        ("GET", "/download") => {
            let total = param(&req, "bytes").unwrap_or(0);
            const CHUNK: u64 = 64 * 1024;
            let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
            let body = futures::stream::unfold(0u64, move |sent| {
                let chunk = chunk.clone();
                async move {
                    (sent < total).then(|| {
                        let n = CHUNK.min(total - sent);
                        (
                            Ok::<_, Infallible>(Frame::data(chunk.slice(..n as usize))),
                            sent + n,
                        )
                    })
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(body)))
        }
        ("POST", "/upload") => {
            let mut body = req.into_body();
            let mut count = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => count += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            Response::new(full(count.to_string()))
        }
        ("GET", "/ws") => {
            let Some(key) = req
                .headers()
                .get("sec-websocket-key")
                .map(|k| derive_accept_key(k.as_bytes()))
            else {
                return Ok(Response::builder()
                    .status(StatusCode::BAD_REQUEST)
                    .body(full("not a websocket request"))
                    .unwrap_or_else(|_| Response::new(full(""))));
            };
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let mut ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        None,
                    )
                    .await;
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_close() || ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, "websocket")
                .header("sec-websocket-accept", key)
                .body(full(""))
                .unwrap_or_else(|_| Response::new(full("")))
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full("not found\n"))
            .unwrap_or_else(|_| Response::new(full(""))),
    };
    Ok(resp)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("testapp listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let bye = Arc::new(tokio::sync::Notify::new());
            let service = {
                let bye = bye.clone();
                service_fn(move |req| serve(req, bye.clone()))
            };
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            // Dropping the connection closes it without a word.
            tokio::select! {
                _ = conn => {}
                _ = bye.notified() => {}
            }
        });
    }
}

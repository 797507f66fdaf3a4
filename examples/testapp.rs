//! A tiny static upstream for previewd's tests and benchmarks (`cargo test` builds it; the
//! tests put it in the containers they create). `testapp ADDR` serves:
//! - `GET /` → a short page;
//! - `GET /sse?n=N&ms=M` → N server-sent events, one every M ms;
//! - `GET /download?bytes=N` → N bytes, streamed;
//! - `POST /upload` → the number of bytes received, counted as they stream in;
//! - `GET /ws` → a WebSocket echo (text and binary);
//! - `GET /headers` → the request's target, then its headers, one per line;
//! - `GET /redirect?to=URL` → 302 to `URL` (`self` names `http://{Host}/landed`);
//! - `GET /cookie` → sets `app=1` with `Domain` the request's host name and `Path=/`;
//! - `GET /bye` → `bye`, then the connection is dropped 100 ms later without notice (what a
//!   kept-alive connection closed by the server's idle timeout looks like to a proxy);
//! - `GET /page` → an HTML page that loads `page.js` and `page.css`, does an XHR to `headers` and
//!   opens a WebSocket to `ws` (all relative, so a path prefix stays), and writes into its DOM
//!   whether each worked (`#probe-script`, `#probe-stylesheet`, `#probe-xhr`,
//!   `#probe-websocket` read `ok`; `#done` appears when all have answered): the browser tests
//!   open it top-level and inside a cross-site iframe.
//!
//! `testapp ADDR RAW_ADDR` also serves, on `RAW_ADDR`, upstreams that misbehave as no HTTP
//! library lets a server misbehave (see [`RAW`]): `GET /raw/{case}` writes that case's bytes.

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

/// The browser probe page (see the module comment).
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>testapp page</title>
<link rel="stylesheet" href="page.css">
<script src="page.js"></script>
</head><body>
<h1>testapp page</h1>
<ul>
<li>script: <span id="probe-script">pending</span></li>
<li>stylesheet: <span id="probe-stylesheet">pending</span></li>
<li>xhr: <span id="probe-xhr">pending</span></li>
<li>websocket: <span id="probe-websocket">pending</span></li>
</ul>
<p id="css-marker">styled by page.css when it loads</p>
<script>
(function () {
  const set = (id, v) => { document.getElementById('probe-' + id).textContent = v; };
  const pending = new Set(['xhr', 'websocket']);
  const finish = (id, v) => {
    if (!pending.delete(id)) return;
    set(id, v);
    if (pending.size === 0) {
      const done = document.createElement('p');
      done.id = 'done';
      done.textContent = 'done';
      document.body.appendChild(done);
    }
  };
  set('script', window.testappScript === 'loaded' ? 'ok' : 'not loaded');
  const color = getComputedStyle(document.getElementById('css-marker')).color;
  set('stylesheet', color === 'rgb(0, 128, 0)' ? 'ok' : 'not applied (' + color + ')');
  const xhr = new XMLHttpRequest();
  xhr.open('GET', 'headers');
  xhr.onload = () => finish('xhr', xhr.status === 200 && xhr.responseText.startsWith('target: ')
    ? 'ok' : 'status ' + xhr.status);
  xhr.onerror = () => finish('xhr', 'network error');
  xhr.send();
  const ws = new WebSocket(new URL('ws', location.href).href.replace(/^http/, 'ws'));
  ws.onopen = () => ws.send('ping');
  ws.onmessage = (e) => { finish('websocket', e.data === 'ping' ? 'ok' : 'echoed ' + e.data); ws.close(); };
  ws.onerror = () => finish('websocket', 'error');
  ws.onclose = (e) => finish('websocket', 'closed ' + e.code);
})();
</script>
</body></html>
"#;
const PAGE_JS: &str = "window.testappScript = 'loaded';\n";
const PAGE_CSS: &str = "#css-marker { color: rgb(0, 128, 0); }\n";

fn typed(content_type: &str, body: &'static str) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full("")))
}

/// The request's `Host`, as sent.
fn host_of(req: &Request<Incoming>) -> String {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Serves one request; `bye` drops its connection when notified.
async fn serve(
    mut req: Request<Incoming>,
    bye: Arc<tokio::sync::Notify>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    // An app served under a base path (a kept prefix) answers there too.
    let path = match path.rsplit_once('/') {
        Some((base, "headers")) if !base.is_empty() => "/headers".to_owned(),
        _ => path,
    };
    let resp = match (req.method().as_str(), path.as_str()) {
        ("GET", "/") => Response::new(full("hello from testapp\n")),
        ("GET", "/redirect") => {
            let to = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("to=")))
                .unwrap_or("/")
                .to_owned();
            let host = host_of(&req);
            let to = if to == "self" {
                format!("http://{host}/landed")
            } else {
                to
            };
            Response::builder()
                .status(StatusCode::FOUND)
                .header(header::LOCATION, to)
                .body(full(""))
                .unwrap_or_else(|_| Response::new(full("")))
        }
        ("GET", "/cookie") => {
            let host = host_of(&req);
            let name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
            Response::builder()
                .header(
                    header::SET_COOKIE,
                    format!("app=1; Domain={name}; Path=/; HttpOnly"),
                )
                .body(full("cookie set\n"))
                .unwrap_or_else(|_| Response::new(full("")))
        }
        ("GET", "/page") => typed("text/html; charset=utf-8", PAGE),
        ("GET", "/page.js") => typed("text/javascript", PAGE_JS),
        ("GET", "/page.css") => typed("text/css", PAGE_CSS),
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
            Response::new(full(format!("target: {}\n{lines}", req.uri())))
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

/// What the raw listener answers `GET /raw/{case}` with, and whether it then closes.
const RAW: &[(&str, &[u8], bool)] = &[
    // A length and a body on answers that have neither.
    (
        "204-length",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
        false,
    ),
    (
        "304-length",
        b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 5\r\n\r\n",
        false,
    ),
    // An upgrade announced on an answer that switches nothing.
    (
        "upgrade-headers",
        b"HTTP/1.1 200 OK\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nok",
        false,
    ),
    // Bodies cut short by a close.
    (
        "cut-length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
        true,
    ),
    (
        "cut-chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        true,
    ),
    // A chunk-size line ended by a bare LF.
    (
        "lf-chunk",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        false,
    ),
    // A protocol switch nobody asked for.
    (
        "101",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        false,
    ),
];

/// Serves one raw connection: reads request heads (and drops their bodies) and answers each
/// as [`RAW`] says; `/raw/silent` is never answered, `/raw/slow?ms=N` after N ms.
async fn raw(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 || buf.len() > 65536 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let length = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < end + length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..end + length);
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let case = path.strip_prefix("/raw/").unwrap_or("");
        if case == "silent" {
            // Holds the connection without a word until the client leaves.
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            return Ok(());
        }
        if case == "slow" {
            let ms = query
                .split('&')
                .find_map(|p| p.strip_prefix("ms=")?.parse().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
                .await?;
            continue;
        }
        match RAW.iter().find(|(name, _, _)| *name == case) {
            Some((_, bytes, close)) => {
                stream.write_all(bytes).await?;
                if *close {
                    return Ok(());
                }
            }
            None => {
                stream
                    .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    .await?;
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    if let Some(raw_addr) = std::env::args().nth(2) {
        let listener = tokio::net::TcpListener::bind(&raw_addr).await?;
        eprintln!("testapp raw listening on {}", listener.local_addr()?);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(raw(stream));
            }
        });
    }
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

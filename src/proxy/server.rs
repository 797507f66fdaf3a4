//! The proxy's HTTP/1.1 server for its most common request: one without a body and without
//! an upgrade (a page, an asset, an API `GET`), on a keep-alive client connection.
//!
//! Why not hyper's server for these: bench/proxy.sh's callgrind count put most of what the
//! proxy still spent per request above nginx in hyper's server side (its dispatcher, its
//! per-message state machine, the body channel). Here a connection's task reads a request
//! head, calls the handler and writes the response itself, from one input buffer and one
//! output buffer kept for the connection's life.
//!
//! Anything this loop does not take on it leaves to hyper, which then serves the connection
//! to its end: a request with a body or an upgrade, `CONNECT`, HTTP/1.0, and any head it
//! cannot parse (hyper answers those errors). The bytes already read go to hyper first
//! ([`Rewind`]), so nothing is lost at the hand-over.

use std::fmt::Display;
use std::io::{IoSlice, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, Method, Response, StatusCode, Uri, request};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::h1::{Field, items, sliced_headers};

/// The largest request head served here; a larger one goes to hyper (which allows more).
const MAX_HEAD: usize = 64 * 1024;
/// The most header lines served here (hyper's default limit); more go to hyper.
const MAX_HEADERS: usize = 100;
/// How much room a read of the client asks for.
const READ_SIZE: usize = 8 * 1024;
/// Body pieces up to this size are copied behind the head (one write); larger ones are
/// written from where they are.
const COPY_LIMIT: usize = 16 * 1024;
/// What the output buffer may hold before it is written, even while more of the body is
/// ready: a fast upstream's body does not pile up in it, and a connection keeps no more
/// than this between responses.
const OUT_LIMIT: usize = 64 * 1024;

/// How a client connection left this loop.
pub enum Ended {
    /// It is closed (by either side, an error, a timeout or the stop signal).
    Closed,
    /// A request this loop does not serve arrived: hyper serves the connection from here,
    /// starting with the bytes already read.
    HandOff(Rewind),
}

/// A request head, parsed: what the handler gets, and what the loop needs itself.
pub(crate) struct Parsed {
    pub(crate) parts: request::Parts,
    /// The client asked to close after this request (`Connection: close`).
    pub(crate) close: bool,
}

/// What the input buffer holds.
pub(crate) enum Head {
    /// A whole request head, taken from the buffer.
    Request(Box<Parsed>),
    /// Not a whole head yet.
    Partial,
    /// A request this loop leaves to hyper (see the module doc).
    HandOff,
    /// A head that parsed but has no `Host` or two, or whose target or a header value `http`
    /// refuses: answered 400.
    Invalid,
}

/// Parses the request head at the start of `buf`, taking it from `buf` when it is one this
/// loop serves (and leaving `buf` as it was otherwise); `fields` is room kept between
/// requests.
pub(crate) fn parse(buf: &mut BytesMut, fields: &mut Vec<Field>) -> Head {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Head::Partial,
        Ok(httparse::Status::Partial) | Err(_) => return Head::HandOff,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Head::HandOff;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Head::HandOff;
    };
    if method == Method::CONNECT {
        return Head::HandOff;
    }
    // Header values and the target stay slices of the head: their offsets now, the bytes
    // once the parse's borrow of the buffer ends.
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let mut close = false;
    let mut length_seen = false;
    let mut hosts = 0;
    fields.clear();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        hosts += usize::from(name.eq_ignore_ascii_case(b"host"));
        if name.eq_ignore_ascii_case(b"transfer-encoding") || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Head::HandOff;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            // `Content-Length: 0` says there is no body; any other length is one.
            if length_seen || h.value.trim_ascii() != b"0" {
                return Head::HandOff;
            }
            length_seen = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= items(h.value).any(|t| t.eq_ignore_ascii_case(b"close"));
        }
        let Ok(name) = HeaderName::from_bytes(name) else {
            return Head::HandOff;
        };
        let start = offset(h.value);
        fields.push((name, start, start + h.value.len()));
    }
    let target = offset(path.as_bytes());
    let target = target..target + path.len();
    let head = buf.split_to(len).freeze();
    // An HTTP/1.1 request names exactly one Host (RFC 9112 §3.2): with none or two, which
    // link it is for is a guess.
    if hosts != 1 {
        return Head::Invalid;
    }
    let Ok(uri) = Uri::from_maybe_shared(head.slice(target)) else {
        return Head::Invalid;
    };
    // Room for the `X-Forwarded-*` the proxy adds, so the map does not grow for them.
    let Some(headers) = sliced_headers(&head, fields, 3) else {
        return Head::Invalid;
    };
    let mut parts = request::Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.headers = headers;
    Head::Request(Box::new(Parsed { parts, close }))
}

/// How long the proxy waits on a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// For a whole request head once its first byte came (then 408, and the connection is
    /// closed).
    pub header: Duration,
    /// For the first byte of a request, on a new or a kept-alive connection (then the
    /// connection is closed without a word, as a keep-alive timeout closes it).
    pub idle: Duration,
    /// For each piece of a request body (then the request ends: a client that stops
    /// sending holds no upstream connection open).
    pub body: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            header: Duration::from_secs(30),
            idle: Duration::from_secs(15),
            body: Duration::from_secs(30),
        }
    }
}

/// Serves requests on `io` with `handler` until the connection closes, a request for hyper
/// arrives, or `stop` resolves (between requests: one in progress is finished first).
///
/// A client gets `timeouts.idle` to begin each request (a connection that sends nothing is
/// closed after it), then `timeouts.header` from its first byte for the whole head (then a
/// 408).
pub async fn serve<H, F, B>(
    mut io: TcpStream,
    handler: H,
    timeouts: ClientTimeouts,
    stop: &mut (impl Future + Unpin),
) -> Ended
where
    H: Fn(request::Parts) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Display,
{
    let mut input = BytesMut::new();
    let mut out = Vec::new();
    let mut fields = Vec::new();
    let deadline = tokio::time::sleep(timeouts.idle);
    tokio::pin!(deadline);
    loop {
        let mut waiting = false;
        let parsed = loop {
            match parse(&mut input, &mut fields) {
                Head::Request(parsed) => break parsed,
                Head::HandOff => return Ended::HandOff(Rewind::new(input.freeze(), io)),
                Head::Invalid => {
                    let _ = io.write_all(BAD_REQUEST).await;
                    return Ended::Closed;
                }
                Head::Partial => {}
            }
            if !waiting {
                waiting = true;
                let limit = if input.is_empty() {
                    timeouts.idle
                } else {
                    timeouts.header
                };
                deadline.as_mut().reset(tokio::time::Instant::now() + limit);
            }
            input.reserve(READ_SIZE);
            let was_empty = input.is_empty();
            tokio::select! {
                biased;
                _ = &mut *stop => return Ended::Closed,
                read = io.read_buf(&mut input) => match read {
                    Ok(0) | Err(_) => return Ended::Closed,
                    // The request began: the head gets its own time from here.
                    Ok(_) if was_empty => deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + timeouts.header),
                    Ok(_) => {}
                },
                () = &mut deadline => {
                    if !input.is_empty() {
                        let _ = io.write_all(REQUEST_TIMEOUT).await;
                    }
                    return Ended::Closed;
                }
            }
        };
        let Parsed { parts, close } = *parsed;
        let bodiless = parts.method == Method::HEAD;
        let answer = handler(parts);
        tokio::pin!(answer);
        // While the handler waits (for the upstream's head), a client that leaves is noticed
        // and the request abandoned, as hyper's server does. Watching costs no system call
        // until the socket turns readable: tokio clears its readiness after the head's short
        // read.
        let resp = loop {
            if !input.is_empty() {
                // A pipelined request came: it waits its turn.
                break answer.await;
            }
            make_room(&mut input);
            tokio::select! {
                biased;
                resp = &mut answer => break resp,
                read = io.read_buf(&mut input) => match read {
                    Ok(0) | Err(_) => return Ended::Closed,
                    Ok(_) => {}
                },
            }
        };
        let kept = Exchange {
            io: &mut io,
            input: &mut input,
            out: &mut out,
        }
        .respond(resp, bodiless, close)
        .await;
        if !kept {
            return Ended::Closed;
        }
    }
}

/// Makes room to read into `input` while a request is served, without moving or allocating
/// when there is some left: the request's head may still be shared with its parts.
fn make_room(input: &mut BytesMut) {
    if input.capacity() == input.len() {
        input.reserve(READ_SIZE);
    }
}

/// What a 400 answer to an unusable head is.
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
/// What a response whose upstream body broke before anything was sent becomes.
const BROKEN_UPSTREAM: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\ncontent-length: 95\r\nconnection: close\r\n\r\n{\"error\":\"UPSTREAM_UNREACHABLE\",\"message\":\"the upstream's answer broke off before it was sent\"}";
/// What a head that took too long is answered with.
const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// How a response body is framed to the client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// None is sent (a `HEAD` request, 204, 304).
    None,
    /// `Content-Length`.
    Length,
    /// `Transfer-Encoding: chunked` (a body of unknown length).
    Chunked,
}

/// One response being written on a client connection.
struct Exchange<'a> {
    io: &'a mut TcpStream,
    /// What the client sent past the request (a pipelined request), read while the body
    /// waits so that a client's close is noticed.
    input: &'a mut BytesMut,
    out: &'a mut Vec<u8>,
}

impl Exchange<'_> {
    /// Writes `resp` (with no body for a `bodiless` request), and returns whether the
    /// connection carries on: not when `close` was asked for, a write failed, the body failed
    /// part-way, or the client closed while it streamed.
    async fn respond<B>(self, resp: Response<B>, bodiless: bool, close: bool) -> bool
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Display,
    {
        let (head, mut body) = resp.into_parts();
        let length = body.size_hint().exact();
        let framing = if bodiless || is_bodiless_status(head.status) {
            Framing::None
        } else if length.is_some() {
            Framing::Length
        } else {
            Framing::Chunked
        };
        self.out.clear();
        encode_head(&head, length, framing, close, self.out);
        let ended = self.send_body(&mut body, framing).await;
        // The body goes (with it, the upstream connection goes back) before the next request.
        drop(body);
        ended && !close
    }

    /// Sends the body after the head in `out`; false when the connection cannot carry on.
    async fn send_body<B>(self, body: &mut B, framing: Framing) -> bool
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Display,
    {
        // Until the head went out, a failing body can still be answered with a 502.
        let mut head_sent = false;
        loop {
            // What is ready goes behind the head; a flush only when the body must wait.
            let polled = std::future::poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending if !self.out.is_empty() => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
                Poll::Ready(frame) => Poll::Ready(Some(frame)),
            });
            let frame = if self.out.is_empty() && self.input.is_empty() {
                make_room(self.input);
                tokio::select! {
                    biased;
                    frame = polled => frame,
                    read = self.io.read_buf(self.input) => match read {
                        // The client left (hyper's server does the same): the body is dropped.
                        Ok(0) | Err(_) => return false,
                        Ok(_) => continue,
                    },
                }
            } else {
                polled.await
            };
            match frame {
                // The body waits: what is there goes out.
                None => {
                    if self.io.write_all(self.out).await.is_err() {
                        return false;
                    }
                    head_sent = true;
                    self.out.clear();
                }
                Some(None) => break,
                Some(Some(Err(e))) => {
                    tracing::debug!(error = %e, "response body failed part-way");
                    // Nothing reached the client yet: it is told the upstream failed, as
                    // nginx answers an upstream that closed before its response was sent.
                    // Else the close cuts the body short where the client sees it.
                    if !head_sent {
                        let _ = self.io.write_all(BROKEN_UPSTREAM).await;
                    }
                    return false;
                }
                Some(Some(Ok(frame))) => {
                    // Trailers are dropped.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if framing == Framing::None || data.is_empty() {
                        continue;
                    }
                    if framing == Framing::Chunked {
                        let _ = write!(self.out, "{:x}\r\n", data.len());
                    }
                    if data.len() <= COPY_LIMIT && self.out.len() + data.len() <= OUT_LIMIT {
                        self.out.extend_from_slice(&data);
                    } else {
                        if write_both(self.io, self.out, &data).await.is_err() {
                            return false;
                        }
                        head_sent = true;
                        self.out.clear();
                    }
                    if framing == Framing::Chunked {
                        self.out.extend_from_slice(b"\r\n");
                    }
                }
            }
        }
        if framing == Framing::Chunked {
            self.out.extend_from_slice(b"0\r\n\r\n");
        }
        self.io.write_all(self.out).await.is_ok()
    }
}

/// Whether a response with this status never has a body: 204 No Content, 304 Not Modified.
fn is_bodiless_status(status: StatusCode) -> bool {
    status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
}

/// Writes `head` then `data` (vectored: one system call when the socket takes both).
async fn write_both(io: &mut TcpStream, head: &[u8], data: &[u8]) -> std::io::Result<()> {
    let (mut head, mut data) = (head, data);
    while !head.is_empty() {
        let n = io
            .write_vectored(&[IoSlice::new(head), IoSlice::new(data)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        data = &data[n - from_head..];
    }
    io.write_all(data).await
}

/// Appends the response head: the status line, the headers less any framing ones the
/// response carries, then this loop's framing (`length` for [`Framing::Length`]), `Date` when
/// the response has none, and `Connection: close` when the connection ends after it.
fn encode_head(
    head: &http::response::Parts,
    length: Option<u64>,
    framing: Framing,
    close: bool,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(head.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        head.status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    // The response's own framing headers go, except on a HEAD answer (which says what a GET
    // would have got): this loop frames the body itself, and a 204 or 304 has none to frame
    // (RFC 9110 §8.6, §15.3.5).
    let own_framing = framing != Framing::None || is_bodiless_status(head.status);
    for (name, value) in &head.headers {
        if own_framing
            && (name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING)
        {
            continue;
        }
        dated |= name == http::header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match (framing, length) {
        (Framing::Length, Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        (Framing::Chunked, _) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        http_date(out);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal (`write!` costs several times as much, on every response).
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends the current time as an HTTP date, formatted at most once a second per thread.
fn http_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

/// A client connection handed to hyper: the bytes this loop had read, then the socket.
pub struct Rewind {
    read: Bytes,
    io: TcpStream,
}

impl Rewind {
    fn new(read: Bytes, io: TcpStream) -> Self {
        Rewind { read, io }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, oneshot};
    use tokio::task::JoinHandle;

    type TestBody = UnsyncBoxBody<Bytes, Infallible>;

    /// A body the test writes as it goes, of unknown length.
    fn channel_body() -> (mpsc::Sender<Result<Frame<Bytes>, Infallible>>, TestBody) {
        let (tx, rx) = mpsc::channel(32);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        (tx, StreamBody::new(stream).boxed_unsync())
    }

    /// Answers `GET /stream` with the body `streamed` takes (once), anything else with
    /// "{method} {target} {header count}".
    struct App {
        streamed: std::sync::Mutex<Option<TestBody>>,
    }

    impl App {
        fn answer(&self, parts: request::Parts) -> Response<TestBody> {
            if parts.uri.path() == "/stream"
                && let Some(body) = self.streamed.lock().unwrap().take()
            {
                return Response::new(body);
            }
            let text = format!("{} {} {}", parts.method, parts.uri, parts.headers.len());
            Response::new(Full::new(Bytes::from(text)).boxed_unsync())
        }
    }

    /// `serve` on the first connection to a new listener, with `app`; the test's stop
    /// signal, and how the loop ended.
    async fn start(
        app: App,
        timeouts: ClientTimeouts,
    ) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<Ended>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, mut stop) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            let (io, _) = listener.accept().await.unwrap();
            let app = app;
            serve(
                io,
                |parts| std::future::ready(app.answer(parts)),
                timeouts,
                &mut stop,
            )
            .await
        });
        (addr, stop_tx, served)
    }

    /// The same limit for idling, heads and bodies.
    fn within(limit: Duration) -> ClientTimeouts {
        ClientTimeouts {
            header: limit,
            idle: limit,
            body: limit,
        }
    }

    fn app() -> App {
        App {
            streamed: std::sync::Mutex::new(None),
        }
    }

    /// A client connection that has asked for `/stream`, whose body the test writes with
    /// the sender.
    async fn streaming() -> (
        mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
        TcpStream,
        JoinHandle<Ended>,
        oneshot::Sender<()>,
    ) {
        let (tx, body) = channel_body();
        let app = App {
            streamed: std::sync::Mutex::new(Some(body)),
        };
        let (addr, stop, served) = start(app, within(Duration::from_secs(5))).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        (tx, s, served, stop)
    }

    async fn read_until(s: &mut TcpStream, seen: &mut Vec<u8>, want: &str) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !String::from_utf8_lossy(seen).contains(want) {
                let mut b = [0u8; 4096];
                let n = s.read(&mut b).await.unwrap();
                assert!(
                    n > 0,
                    "closed before {want:?}: {}",
                    String::from_utf8_lossy(seen)
                );
                seen.extend_from_slice(&b[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {want:?} in {}", String::from_utf8_lossy(seen)));
    }

    #[tokio::test]
    async fn serves_pipelined_requests_in_order_then_closes_when_asked() {
        let (addr, _stop, served) = start(app(), within(Duration::from_secs(5))).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /b?q=1 HTTP/1.1\r\nHost: x\r\nX-One: 1\r\nContent-Length: 0\r\n\r\n\
              HEAD /c HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /d HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8(all).unwrap();
        let responses: Vec<&str> = text.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(responses.len(), 4, "{text}");
        assert!(responses[0].starts_with("200 OK\r\n"), "{text}");
        assert!(responses[0].contains("content-length: 8\r\n"), "{text}");
        assert!(responses[0].contains("date: "), "{text}");
        assert!(responses[0].ends_with("\r\n\r\nGET /a 1"), "{text}");
        assert!(responses[1].ends_with("\r\n\r\nGET /b?q=1 3"), "{text}");
        // HEAD: the head alone, with nothing framing a body that is not sent.
        assert!(responses[2].ends_with("\r\n\r\n"), "{text}");
        assert!(!responses[2].contains("content-length"), "{text}");
        assert!(responses[3].contains("connection: close\r\n"), "{text}");
        assert!(responses[3].ends_with("\r\n\r\nGET /d 2"), "{text}");
        assert!(matches!(served.await.unwrap(), Ended::Closed));
    }

    #[tokio::test]
    async fn streams_a_body_of_unknown_length_chunked_as_it_comes() {
        let (tx, mut s, _served, _stop) = streaming().await;
        let mut seen = Vec::new();
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .unwrap();
        // The first piece arrives while the body is still open.
        read_until(&mut s, &mut seen, "\r\n\r\n5\r\nfirst\r\n").await;
        assert!(String::from_utf8_lossy(&seen).contains("transfer-encoding: chunked\r\n"));
        let big = Bytes::from(vec![b'x'; 100_000]);
        tx.send(Ok(Frame::data(big))).await.unwrap();
        // Pieces small enough to be copied, more of them than the output buffer holds.
        let small = Bytes::from(vec![b'y'; 10_000]);
        let writer = tokio::spawn(async move {
            for _ in 0..20 {
                tx.send(Ok(Frame::data(small.clone()))).await.unwrap();
            }
            tx.send(Ok(Frame::trailers(HeaderMap::new())))
                .await
                .unwrap();
        });
        read_until(&mut s, &mut seen, "\r\n0\r\n\r\n").await;
        writer.await.unwrap();
        let text = String::from_utf8_lossy(&seen);
        let after_first = text.split("first\r\n").nth(1).unwrap();
        let smalls = format!("2710\r\n{}\r\n", "y".repeat(10_000)).repeat(20);
        assert_eq!(
            after_first,
            format!("186a0\r\n{}\r\n{smalls}0\r\n\r\n", "x".repeat(100_000))
        );
        // The connection carries on.
        s.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut s, &mut seen, "GET /next 1").await;
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_stream_drops_the_body() {
        let (tx, mut s, served, _stop) = streaming().await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"event"))))
            .await
            .unwrap();
        let mut seen = Vec::new();
        read_until(&mut s, &mut seen, "event").await;
        drop(s);
        // The body (and with it an upstream connection) is let go without another event.
        tokio::time::timeout(Duration::from_secs(5), tx.closed())
            .await
            .unwrap();
        assert!(matches!(served.await.unwrap(), Ended::Closed));
    }

    #[tokio::test]
    async fn hands_hyper_the_requests_it_does_not_serve_with_every_byte_read() {
        let cases: [&[u8]; 7] = [
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            b"\x16\x03\x01 not http\r\n\r\n",
        ];
        for case in cases {
            let (addr, _stop, served) = start(app(), within(Duration::from_secs(5))).await;
            let mut s = TcpStream::connect(addr).await.unwrap();
            // A plain request first: the hand-over happens mid-connection.
            s.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut seen = Vec::new();
            read_until(&mut s, &mut seen, "GET /first 1").await;
            s.write_all(case).await.unwrap();
            let Ended::HandOff(mut rest) = served.await.unwrap() else {
                panic!("{} was not handed off", String::from_utf8_lossy(case));
            };
            let mut got = vec![0u8; case.len()];
            tokio::time::timeout(Duration::from_secs(5), rest.read_exact(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, case);
            // Writes reach the client.
            rest.write_all(b"from hyper").await.unwrap();
            read_until(&mut s, &mut seen, "from hyper").await;
        }
    }

    #[tokio::test]
    async fn cuts_slow_heads_with_408_and_idle_connections_without_a_word() {
        let limit = Duration::from_millis(300);
        for (sent, answer) in [
            (&b"GET / HTTP/1.1\r\nX-Slow: "[..], REQUEST_TIMEOUT),
            (&b""[..], &b""[..]),
        ] {
            let (addr, _stop, served) = start(app(), within(limit)).await;
            let mut s = TcpStream::connect(addr).await.unwrap();
            let started = std::time::Instant::now();
            s.write_all(sent).await.unwrap();
            let mut all = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
                .await
                .unwrap()
                .unwrap();
            assert!(started.elapsed() >= limit);
            assert_eq!(all, answer);
            assert!(matches!(served.await.unwrap(), Ended::Closed));
        }
    }

    #[tokio::test]
    async fn an_idle_connection_gets_the_idle_limit_and_a_begun_head_the_header_limit() {
        let timeouts = ClientTimeouts {
            header: Duration::from_millis(1500),
            idle: Duration::from_millis(200),
            body: Duration::from_secs(5),
        };
        // Nothing sent: closed at the idle limit, well before the header limit.
        let (addr, _stop, served) = start(app(), timeouts).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        let took = started.elapsed();
        assert!(
            all.is_empty() && took < Duration::from_millis(1200),
            "{took:?}"
        );
        assert!(matches!(served.await.unwrap(), Ended::Closed));
        // A head begun after a while of idling gets the header limit from its first byte.
        let (addr, _stop, _served) = start(app(), timeouts).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(b"Host: x\r\n\r\n").await.unwrap();
        let mut seen = Vec::new();
        read_until(&mut s, &mut seen, "GET / 1").await;
    }

    #[tokio::test]
    async fn requests_need_one_host_and_bodiless_answers_carry_no_length() {
        for head in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ] {
            let (addr, _stop, served) = start(app(), within(Duration::from_secs(5))).await;
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(head).await.unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            assert_eq!(all, BAD_REQUEST);
            assert!(matches!(served.await.unwrap(), Ended::Closed));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (io, _) = listener.accept().await.unwrap();
            let (_stop_tx, mut stop) = oneshot::channel::<()>();
            let handler = |parts: request::Parts| {
                let status = if parts.uri.path() == "/204" {
                    StatusCode::NO_CONTENT
                } else {
                    StatusCode::NOT_MODIFIED
                };
                let resp = http::Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_LENGTH, "5")
                    .body(Full::new(Bytes::from_static(b"hello")).boxed_unsync())
                    .unwrap();
                std::future::ready(resp)
            };
            serve(io, handler, within(Duration::from_secs(5)), &mut stop).await
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\nGET /304 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        let text = String::from_utf8(all).unwrap();
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"), "{text}");
        assert!(text.contains("HTTP/1.1 304 Not Modified\r\n"), "{text}");
        assert!(
            !text.contains("content-length") && !text.contains("hello"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_client_that_leaves_before_the_answer_abandons_the_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (abandoned_tx, abandoned) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            let (io, _) = listener.accept().await.unwrap();
            let (_stop_tx, mut stop) = oneshot::channel::<()>();
            let abandoned_tx = std::sync::Mutex::new(Some(abandoned_tx));
            // An upstream that never answers; its future holds the sender until dropped.
            let handler = |_parts| {
                let held = abandoned_tx.lock().unwrap().take();
                async move {
                    let _held = held;
                    std::future::pending::<Response<TestBody>>().await
                }
            };
            serve(io, handler, within(Duration::from_secs(5)), &mut stop).await
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s);
        let dropped = tokio::time::timeout(Duration::from_secs(5), abandoned).await;
        assert!(dropped.is_ok(), "the request was not abandoned");
        assert!(matches!(served.await.unwrap(), Ended::Closed));
    }

    #[test]
    fn decimals() {
        for n in [0, 7, 10, 100_000, u64::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
    }

    #[tokio::test]
    async fn a_target_http_refuses_is_answered_400() {
        let (addr, _stop, served) = start(app(), within(Duration::from_secs(5))).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET http:// HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, BAD_REQUEST);
        assert!(matches!(served.await.unwrap(), Ended::Closed));
    }

    #[tokio::test]
    async fn the_stop_signal_closes_between_requests() {
        let (addr, stop, served) = start(app(), within(Duration::from_secs(30))).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        read_until(&mut s, &mut seen, "GET /a 1").await;
        drop(stop);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());
        assert!(matches!(served.await.unwrap(), Ended::Closed));
    }
}

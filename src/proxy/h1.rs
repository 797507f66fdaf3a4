//! A lean HTTP/1.1 client for the proxy's most common exchange: a request without a body and
//! without an upgrade, to a TCP upstream (a container, or a tunnel through its agent).
//!
//! Why not hyper's client for these: it runs each upstream connection on a task of its own
//! and hands the request, the response head and every body chunk across channels between
//! that task and the client connection's. Under callgrind that machinery was more than a
//! third of the proxy's instructions per request. Here the client connection's task writes
//! the request head itself and reads the response on the same socket as its body is sent
//! on; requests with a body, upgrades and exec upstreams still go through hyper.
//!
//! Response framing follows RFC 9112 §6.3 strictly, because a misread length on a reused
//! connection would hand one response's bytes to the next request: `Transfer-Encoding`
//! wins over `Content-Length` (and then the connection is not reused), differing
//! `Content-Length`s are refused, a body without either ends at close, and a connection is
//! reused only when its response ended exactly at the end of what was read.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response head accepted (status line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// The most response header lines accepted.
const MAX_HEADERS: usize = 128;
/// How much room a read asks for.
const READ_SIZE: usize = 16 * 1024;
/// The longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// The most trailer bytes accepted (they are read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// The connection failed or closed before any byte of an answer: the request may not
    /// have reached the upstream (a kept-alive connection it had closed meanwhile).
    #[error("the upstream closed the connection before answering")]
    NoAnswer(#[source] Option<std::io::Error>),
    /// Reading or writing failed after the answer began.
    #[error("upstream connection failed: {0}")]
    Io(#[source] std::io::Error),
    /// The connection closed before the body's announced end.
    #[error("the upstream closed the connection before the end of the body")]
    Truncated,
    /// The answer is not valid HTTP/1.1 (or exceeds a limit).
    #[error("malformed upstream response: {0}")]
    Malformed(&'static str),
}

/// An upstream connection between messages, with what was read past the last response
/// (nothing, when it is reused). Over a TCP socket; any other byte stream (`IO`) lets the
/// fuzz harness drive the same decoding from memory.
pub struct H1Conn<IO = TcpStream> {
    io: IO,
    buf: BytesMut,
    /// The request head being written, kept for the next one.
    out: Vec<u8>,
    /// A response's header names and value offsets, kept for the next one.
    fields: Vec<Field>,
}

/// A header's name and where its value lies in the message head it was parsed from.
pub(super) type Field = (HeaderName, usize, usize);

/// The headers `fields` names, their values slices of `head` (no copy), with room for
/// `room` more; `None` when a value is not a valid header value. Empties `fields` (kept by
/// its owner for the next head).
pub(super) fn sliced_headers(
    head: &Bytes,
    fields: &mut Vec<Field>,
    room: usize,
) -> Option<HeaderMap> {
    let mut headers = HeaderMap::with_capacity(fields.len() + room);
    for (name, start, end) in fields.drain(..) {
        headers.append(
            name,
            HeaderValue::from_maybe_shared(head.slice(start..end)).ok()?,
        );
    }
    Some(headers)
}

/// A response head, and how its body is framed.
pub struct Head {
    /// The status.
    pub status: StatusCode,
    /// The headers, as the upstream sent them.
    pub headers: HeaderMap,
    body: BodyState,
    /// Whether the connection may carry another request once the body has ended.
    reusable: bool,
}

impl Head {
    /// The body that follows this head on `conn`.
    pub fn body<IO>(&self, conn: H1Conn<IO>) -> H1Body<IO> {
        H1Body {
            conn: Some(conn),
            state: self.body,
            reusable: self.reusable,
        }
    }
}

/// Whether a request can go through [`H1Conn::exchange`]: no body (`body_ended`: none
/// announced, none chunked), no upgrade, not `CONNECT`. (An `Expect: 100-continue` on a
/// bodyless request asks for nothing: the interim answer it may bring is skipped.)
pub fn is_plain(method: &Method, body_ended: bool, upgrade: bool) -> bool {
    body_ended && !upgrade && *method != Method::CONNECT
}

/// Whether a request may be sent again when a reused connection turned out closed: its
/// method is idempotent (RFC 9110 §9.2.2), as nginx's `proxy_next_upstream` requires.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Appends the request head to `out`: request line in origin form, headers as they are.
fn encode_head(parts: &request::Parts, out: &mut Vec<u8>) {
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

impl<IO> H1Conn<IO> {
    /// A fresh connection.
    pub fn new(io: IO) -> Self {
        H1Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            fields: Vec::new(),
        }
    }

    /// The socket, for a connection that hyper takes over between messages.
    pub fn into_io(self) -> IO {
        self.io
    }
}

impl H1Conn {
    /// Whether an idle connection can carry a request: the upstream has neither closed it
    /// nor sent anything unasked. Costs no system call while the socket is not readable.
    pub fn is_idle_alive(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> H1Conn<IO> {
    /// Sends a bodyless request (see [`is_plain`]) and reads the response head; the body
    /// follows on this connection ([`Head::body`]).
    pub async fn exchange(&mut self, req: &request::Parts) -> Result<Head, H1Error> {
        self.out.clear();
        encode_head(req, &mut self.out);
        self.io
            .write_all(&self.out)
            .await
            .map_err(|e| H1Error::NoAnswer(Some(e)))?;
        self.read_head(&req.method).await
    }

    /// Reads a final response head (skipping 1xx interim responses).
    async fn read_head(&mut self, method: &Method) -> Result<Head, H1Error> {
        let mut received = false;
        loop {
            if let Some(head) = self.parse_head(method)? {
                return Ok(head);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(H1Error::Malformed("response head too large"));
            }
            self.buf.reserve(READ_SIZE);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) if !received => return Err(H1Error::NoAnswer(None)),
                Ok(0) => return Err(H1Error::Truncated),
                Ok(_) => received = true,
                Err(e) if !received => return Err(H1Error::NoAnswer(Some(e))),
                Err(e) => return Err(H1Error::Io(e)),
            }
        }
    }

    /// A final response head from the buffer, consumed from it; `None` while incomplete.
    fn parse_head(&mut self, method: &Method) -> Result<Option<Head>, H1Error> {
        loop {
            if self.buf.is_empty() {
                return Ok(None);
            }
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let parsing = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut parsed,
                &self.buf,
                &mut slots,
            );
            let len = match parsing {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(H1Error::Malformed("too many headers"));
                }
                Err(_) => return Err(H1Error::Malformed("invalid response head")),
            };
            let status = parsed
                .code
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or(H1Error::Malformed("invalid status code"))?;
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(H1Error::Malformed("101 to a request without an upgrade"));
            }
            if status.is_informational() {
                // 100 Continue, 103 Early Hints: interim; the final head follows.
                self.buf.advance(len);
                continue;
            }
            // Header values are kept as slices of the head (no copy): their offsets now,
            // the bytes once the parse's borrow of the buffer ends. What framing needs is
            // noted on the way, so it costs no lookups afterwards.
            let base = self.buf.as_ptr() as usize;
            let mut framing = FramingHeaders::default();
            self.fields.clear();
            for h in parsed.headers.iter() {
                framing.note(h.name, h.value)?;
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| H1Error::Malformed("invalid header name"))?;
                let start = h.value.as_ptr() as usize - base;
                self.fields.push((name, start, start + h.value.len()));
            }
            let http11 = parsed.version == Some(1);
            let (body, reusable) = framing.decide(method, status, http11);
            let head = self.buf.split_to(len).freeze();
            let headers = sliced_headers(&head, &mut self.fields, 0)
                .ok_or(H1Error::Malformed("invalid header value"))?;
            return Ok(Some(Head {
                status,
                headers,
                body,
                reusable,
            }));
        }
    }
}

/// The comma-separated items of a header value, trimmed.
pub(super) fn items(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(<[u8]>::trim_ascii)
}

/// What a response head says about its framing (RFC 9112 §6.3, §9.3), gathered header by
/// header.
#[derive(Default)]
struct FramingHeaders {
    /// `Connection: close`.
    close: bool,
    /// Some `Transfer-Encoding`, and whether its last coding is chunked.
    transfer_encoding: Option<bool>,
    /// The `Content-Length` (every one given must agree).
    content_length: Option<u64>,
}

impl FramingHeaders {
    /// Takes one header line into account; differing or invalid lengths are refused.
    fn note(&mut self, name: &str, value: &[u8]) -> Result<(), H1Error> {
        if name.eq_ignore_ascii_case("connection") {
            self.close |= items(value).any(|t| t.eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Which coding is last decides the framing; where readers could disagree on that
            // (an empty last element, which hyper reads as no chunked coding, or bytes that
            // are no token), the answer is refused rather than guessed.
            let last = items(value).next_back().unwrap_or_default();
            if last.is_empty() || !value.is_ascii() {
                return Err(H1Error::Malformed("doubtful transfer-encoding"));
            }
            // A later line's codings come after an earlier one's.
            self.transfer_encoding = Some(last.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            for item in items(value) {
                let n =
                    (!item.is_empty() && item.len() <= 19 && item.iter().all(u8::is_ascii_digit))
                        .then(|| std::str::from_utf8(item).ok()?.parse::<u64>().ok())
                        .flatten()
                        .ok_or(H1Error::Malformed("invalid content-length"))?;
                if self.content_length.is_some_and(|l| l != n) {
                    return Err(H1Error::Malformed("conflicting content-length"));
                }
                self.content_length = Some(n);
            }
        }
        Ok(())
    }

    /// How the body is framed, and whether the connection may be reused after it.
    fn decide(&self, method: &Method, status: StatusCode, http11: bool) -> (BodyState, bool) {
        let reusable = http11 && !self.close;
        if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return (BodyState::Length(0), reusable);
        }
        match (self.transfer_encoding, self.content_length) {
            // With a Content-Length as well the message is suspect: read it as chunked,
            // then close the connection.
            (Some(true), length) => (BodyState::ChunkSize, reusable && length.is_none()),
            // A coding other than chunked last: the body runs to the connection's close.
            (Some(false), _) => (BodyState::UntilClose, false),
            (None, Some(n)) => (BodyState::Length(n), reusable),
            (None, None) => (BodyState::UntilClose, false),
        }
    }
}

/// Where a body's decoding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyState {
    /// This many bytes to go.
    Length(u64),
    /// Until the upstream closes the connection.
    UntilClose,
    /// Before a chunk-size line.
    ChunkSize,
    /// This many bytes of a chunk to go.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// In the trailer section, with this many bytes of it seen.
    Trailers(usize),
    /// Read to its end.
    Done,
}

/// A response body read from its connection as the client connection asks for it; the
/// connection is handed back by [`H1Body::finish`] when the body ended cleanly.
pub struct H1Body<IO = TcpStream> {
    /// Dropped on an error, so a failed connection is never reused.
    conn: Option<H1Conn<IO>>,
    state: BodyState,
    reusable: bool,
}

/// The length of the line at the start of `buf` (without its CRLF), once a whole one is
/// there. A line ends in CRLF and nowhere else: a bare LF, or a CR not followed by LF, is
/// refused as soon as it is seen, as hyper's decoder refuses it (a peer that reads bare LF
/// as a line end would frame the body differently).
fn line_len(buf: &[u8]) -> Result<Option<usize>, H1Error> {
    match buf.iter().position(|b| *b == b'\r' || *b == b'\n') {
        None => Ok(None),
        Some(at) if buf[at] == b'\n' => Err(H1Error::Malformed("bare LF in a chunked body")),
        Some(at) => match buf.get(at + 1) {
            None => Ok(None),
            Some(b'\n') => Ok(Some(at)),
            Some(_) => Err(H1Error::Malformed("CR without LF in a chunked body")),
        },
    }
}

/// A chunk-size line (without its CRLF), with hyper's grammar: one or more hex digits (any
/// number, as long as the size fits in 64 bits), then optional spaces or tabs, then
/// optional `;`-extensions (ignored).
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let malformed = H1Error::Malformed("invalid chunk size");
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 {
        return Err(malformed);
    }
    let rest = &line[digits..];
    let spaces = rest
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(rest.len());
    if !(rest[spaces..].is_empty() || rest[spaces] == b';') {
        return Err(malformed);
    }
    line[..digits]
        .iter()
        .try_fold(0u64, |size, b| {
            let digit = (*b as char).to_digit(16).map(u64::from)?;
            size.checked_mul(16)?.checked_add(digit)
        })
        .ok_or(malformed)
}

impl<IO: AsyncRead + Unpin> H1Body<IO> {
    /// The next piece of the body, `None` at its end.
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, H1Error>>> {
        let polled = self.poll_inner(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.conn = None;
            self.state = BodyState::Done;
        }
        polled
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, H1Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let buf = &mut conn.buf;
            match self.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(0) => self.state = BodyState::Done,
                BodyState::Length(left) | BodyState::ChunkData(left) if !buf.is_empty() => {
                    let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                    let rest = left - n as u64;
                    self.state = match self.state {
                        BodyState::ChunkData(_) if rest == 0 => BodyState::ChunkEnd,
                        BodyState::ChunkData(_) => BodyState::ChunkData(rest),
                        _ => BodyState::Length(rest),
                    };
                    return Poll::Ready(Some(Ok(buf.split_to(n).freeze())));
                }
                BodyState::UntilClose if !buf.is_empty() => {
                    return Poll::Ready(Some(Ok(buf.split().freeze())));
                }
                BodyState::ChunkSize => match line_len(buf)? {
                    Some(len) => {
                        let size = chunk_size(&buf[..len])?;
                        buf.advance(len + 2);
                        self.state = if size == 0 {
                            BodyState::Trailers(0)
                        } else {
                            BodyState::ChunkData(size)
                        };
                    }
                    None if buf.len() > MAX_CHUNK_LINE => {
                        return Poll::Ready(Some(Err(H1Error::Malformed(
                            "chunk-size line too long",
                        ))));
                    }
                    None => ready!(self.poll_fill(cx))?,
                },
                BodyState::ChunkEnd if buf.len() >= 2 => {
                    if &buf[..2] != b"\r\n" {
                        return Poll::Ready(Some(Err(H1Error::Malformed(
                            "chunk without its CRLF",
                        ))));
                    }
                    buf.advance(2);
                    self.state = BodyState::ChunkSize;
                }
                BodyState::Trailers(seen) => match line_len(buf)? {
                    Some(0) => {
                        buf.advance(2);
                        self.state = BodyState::Done;
                    }
                    Some(len) if seen + len <= MAX_TRAILERS => {
                        buf.advance(len + 2);
                        self.state = BodyState::Trailers(seen + len + 2);
                    }
                    None if seen + buf.len() <= MAX_TRAILERS => ready!(self.poll_fill(cx))?,
                    _ => return Poll::Ready(Some(Err(H1Error::Malformed("trailers too large")))),
                },
                BodyState::UntilClose => {
                    if ready!(self.poll_read(cx))? == 0 {
                        self.state = BodyState::Done;
                        self.reusable = false;
                    }
                }
                BodyState::Length(_) | BodyState::ChunkData(_) | BodyState::ChunkEnd => {
                    ready!(self.poll_fill(cx))?;
                }
            }
        }
    }

    /// Reads more of the connection; its closing here cuts the body short.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        match ready!(self.poll_read(cx)) {
            Ok(0) => Poll::Ready(Err(H1Error::Truncated)),
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, H1Error>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        conn.buf.reserve(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf)
            .map_err(H1Error::Io)
    }
}

impl<IO> H1Body<IO> {
    /// Whether the body has been read to its end.
    pub fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done | BodyState::Length(0))
    }

    /// The exact remaining length, when the upstream announced one.
    pub fn exact_len(&self) -> Option<u64> {
        match self.state {
            BodyState::Length(n) => Some(n),
            BodyState::Done => Some(0),
            _ => None,
        }
    }

    /// The connection, when the body was read to its end and nothing followed it, so it
    /// can carry the next request.
    pub fn finish(&mut self) -> Option<H1Conn<IO>> {
        let ended = self.is_end_stream();
        let reusable = self.reusable;
        self.conn
            .take()
            .filter(|c| ended && reusable && c.buf.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;
    use std::future::poll_fn;
    use std::time::Duration;
    use tokio::net::TcpListener;

    /// A real upstream on loopback that answers each request head it reads with the next of
    /// `answers` (raw bytes) and closes after the last; it returns the heads it read.
    async fn upstream(
        answers: Vec<&'static [u8]>,
    ) -> (H1Conn, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut heads = Vec::new();
            for answer in answers {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    if s.read(&mut b).await.unwrap() == 0 {
                        return heads;
                    }
                    head.push(b[0]);
                }
                heads.push(String::from_utf8(head).unwrap());
                s.write_all(answer).await.unwrap();
            }
            heads
        });
        (H1Conn::new(TcpStream::connect(addr).await.unwrap()), server)
    }

    fn request(method: Method, path: &str) -> request::Parts {
        http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "app.local")
            .header("x-two", "a")
            .header("x-two", "b")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    async fn read_body(body: &mut H1Body) -> Result<Vec<u8>, H1Error> {
        let mut out = Vec::new();
        while let Some(piece) = poll_fn(|cx| body.poll_data(cx)).await {
            out.extend_from_slice(&piece?);
        }
        Ok(out)
    }

    /// One GET answered with `answer`: the body and whether the connection was reusable.
    async fn once(answer: &'static [u8]) -> Result<(Vec<u8>, bool), H1Error> {
        let (mut conn, _server) = upstream(vec![answer]).await;
        let head = conn.exchange(&request(Method::GET, "/")).await?;
        let mut body = head.body(conn);
        let data = read_body(&mut body).await?;
        Ok((data, body.finish().is_some()))
    }

    #[tokio::test]
    async fn length_chunked_and_empty_bodies_keep_the_connection() {
        let (mut conn, server) = upstream(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ])
        .await;
        let head = conn
            .exchange(&request(Method::GET, "/a?b=c"))
            .await
            .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers.get_all(header::SET_COOKIE).iter().count(), 2);
        let mut body = head.body(conn);
        assert_eq!(body.exact_len(), Some(5));
        assert_eq!(read_body(&mut body).await.unwrap(), b"hello");
        let mut conn = body.finish().expect("reusable after a whole body");

        let head = conn
            .exchange(&request(Method::GET, "/chunked"))
            .await
            .unwrap();
        let mut body = head.body(conn);
        assert_eq!(body.exact_len(), None);
        assert_eq!(read_body(&mut body).await.unwrap(), b"hello world");
        let mut conn = body.finish().expect("reusable after the trailers");

        let head = conn.exchange(&request(Method::DELETE, "/x")).await.unwrap();
        assert_eq!(head.status, StatusCode::NO_CONTENT);
        let mut body = head.body(conn);
        assert!(body.is_end_stream());
        assert_eq!(read_body(&mut body).await.unwrap(), b"");
        assert!(body.finish().is_some());

        let heads = server.await.unwrap();
        assert_eq!(
            heads[0],
            "GET /a?b=c HTTP/1.1\r\nhost: app.local\r\nx-two: a\r\nx-two: b\r\n\r\n"
        );
        assert!(heads[2].starts_with("DELETE /x HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_head_answers_have_no_body() {
        let (mut conn, _server) = upstream(vec![
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        ])
        .await;
        let head = conn.exchange(&request(Method::GET, "/")).await.unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert!(head.headers.get("link").is_none());
        let mut body = head.body(conn);
        assert_eq!(read_body(&mut body).await.unwrap(), b"abc");
        let mut conn = body.finish().unwrap();
        let head = conn.exchange(&request(Method::HEAD, "/")).await.unwrap();
        assert_eq!(head.headers.get(header::CONTENT_LENGTH).unwrap(), "1000");
        let mut body = head.body(conn);
        assert_eq!(read_body(&mut body).await.unwrap(), b"");
        assert!(body.finish().is_some());
    }

    #[tokio::test]
    async fn doubtful_framing_is_refused_or_ends_the_connection() {
        // Read until close: whole, but the connection is done.
        let (data, reused) = once(b"HTTP/1.1 200 OK\r\n\r\nuntil close").await.unwrap();
        assert_eq!((data.as_slice(), reused), (&b"until close"[..], false));
        // Transfer-Encoding wins over Content-Length, and the connection is not reused.
        let both = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        assert_eq!(once(both).await.unwrap(), (b"abc".to_vec(), false));
        // A coding other than chunked last: the body runs to close.
        let gzip = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nraw";
        assert_eq!(once(gzip).await.unwrap(), (b"raw".to_vec(), false));
        // Codings over several lines: the last line's last coding decides.
        let split = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nzz\r\n0\r\n\r\n";
        assert_eq!(once(split).await.unwrap(), (b"zz".to_vec(), true));
        let split =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\nraw";
        assert_eq!(once(split).await.unwrap(), (b"raw".to_vec(), false));
        // Bytes past the response's end: not reused.
        let extra = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(once(extra).await.unwrap(), (b"hi".to_vec(), false));
        // Connection: close and HTTP/1.0: not reused.
        let close =
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(once(close).await.unwrap(), (b"x".to_vec(), false));
        let old = b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(once(old).await.unwrap(), (b"x".to_vec(), false));
        // hyper's grammar: leading zeros, then spaces or tabs before an extension.
        let lenient = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n000000000000000000003 \t;e=1\r\nabc\r\n0\r\n\r\n";
        assert_eq!(once(lenient).await.unwrap(), (b"abc".to_vec(), true));
        // The same length twice is one length.
        let twice = b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok";
        assert_eq!(once(twice).await.unwrap(), (b"ok".to_vec(), true));

        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            b"HTTP/1.1 2OO OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3 x\r\nabc\r\n0\r\n\r\n",
            // A last coding readers could read differently.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked,\r\n\r\n2\r\nzz\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\xc3\xa9\r\n\r\n2\r\nzz\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\nzz",
            // Lines end in CRLF only, as hyper reads them: a bare LF or a lone CR is refused.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\n;x\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\rabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\x0c\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx: 1\n\r\n",
        ] {
            let answer = String::from_utf8_lossy(bad).into_owned();
            match once(bad).await {
                Err(H1Error::Malformed(_)) => {}
                other => panic!(
                    "{answer:?}: {:?}",
                    other.map(|(d, r)| (String::from_utf8_lossy(&d).into_owned(), r))
                ),
            }
        }
    }

    #[tokio::test]
    async fn cut_answers_are_errors_and_a_closed_idle_connection_is_seen() {
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
        assert!(matches!(once(short).await, Err(H1Error::Truncated)));
        let cut_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab";
        assert!(matches!(once(cut_chunk).await, Err(H1Error::Truncated)));
        let cut_head = b"HTTP/1.1 200 OK\r\nContent-Le";
        assert!(matches!(once(cut_head).await, Err(H1Error::Truncated)));

        // The upstream closes a kept-alive connection: seen before reuse, and a request
        // sent on it anyway gets no answer (which a retry may resend).
        let (mut conn, server) = upstream(vec![]).await;
        server.await.unwrap();
        let mut alive = true;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            alive = conn.is_idle_alive();
            if !alive {
                break;
            }
        }
        assert!(!alive, "a closed connection looks alive");
        assert!(matches!(
            conn.exchange(&request(Method::GET, "/")).await,
            Err(H1Error::NoAnswer(_))
        ));

        // An open idle connection looks alive.
        let (conn, _server) = upstream(vec![b"HTTP/1.1 200 OK\r\n\r\n"]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(conn.is_idle_alive());
    }

    #[test]
    fn only_bodyless_requests_without_upgrade_are_plain() {
        assert!(is_plain(&Method::GET, true, false));
        assert!(is_plain(&Method::POST, true, false));
        assert!(!is_plain(&Method::POST, false, false), "a body is coming");
        assert!(!is_plain(&Method::GET, true, true), "an upgrade");
        assert!(!is_plain(&Method::CONNECT, true, false));
        assert!(is_idempotent(&Method::GET) && !is_idempotent(&Method::POST));
    }
}

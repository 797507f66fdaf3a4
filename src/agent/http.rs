//! The HTTP/1.1 subset the agent protocol uses, framed and parsed by hand.
//!
//! The agent is uploaded into every container, so it carries no HTTP library: heads are
//! read with a hard size limit, parsed strictly, and anything unexpected is an error rather
//! than a guess. Bodies are only ever sent by the agent, with a `Content-Length`.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Marks the end of a head.
const HEAD_END: &[u8] = b"\r\n\r\n";
/// How many bytes the server reads at once while looking for the end of a head.
const READ_CHUNK: usize = 2048;

/// Why a head could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// Reading failed.
    #[error("reading the head failed: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection before a complete head.
    #[error("connection closed before a complete head")]
    Eof,
    /// The head is longer than the limit.
    #[error("head larger than {limit} bytes")]
    TooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The head is not the HTTP/1.1 subset this protocol speaks.
    #[error("malformed head: {0}")]
    Malformed(&'static str),
}

/// Reads one head with buffered reads, for the agent's side. Returns the head (terminator
/// included) and whatever was read past it: after a `CONNECT` those bytes already belong to
/// the tunnel and must be forwarded, not dropped.
pub async fn read_head_buffered<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<(Vec<u8>, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Err(HeadError::Eof);
        }
        // Only the new bytes (plus 3 before them) can complete the terminator.
        let search_from = buf.len().saturating_sub(HEAD_END.len() - 1);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = find(&buf[search_from..], HEAD_END) {
            let end = search_from + pos + HEAD_END.len();
            if end > limit {
                return Err(HeadError::TooLarge { limit });
            }
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() >= limit {
            return Err(HeadError::TooLarge { limit });
        }
    }
}

/// Reads one head a byte at a time, for the client's side: it never reads past the head, so
/// the stream can be handed on for splicing. Heads are tiny, so the cost doesn't matter.
pub async fn read_head_exact<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Vec<u8>, HeadError> {
    let mut buf = Vec::with_capacity(256);
    while !buf.ends_with(HEAD_END) {
        if buf.len() >= limit {
            return Err(HeadError::TooLarge { limit });
        }
        let mut byte = [0u8; 1];
        if reader.read(&mut byte).await? == 0 {
            return Err(HeadError::Eof);
        }
        buf.push(byte[0]);
    }
    Ok(buf)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Header (name, value) pairs in arrival order; names keep their case.
type Headers = Vec<(String, String)>;

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// `GET`, `POST`, `CONNECT`, ...
    pub method: String,
    /// The request target: a path, or `host:port` for `CONNECT`.
    pub target: String,
    headers: Headers,
}

impl RequestHead {
    /// Parses `METHOD SP target SP HTTP/1.x CRLF (name: value CRLF)* CRLF`.
    pub fn parse(head: &[u8]) -> Result<RequestHead, HeadError> {
        let (start, headers) = split_head(head)?;
        let mut parts = start.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(HeadError::Malformed(
                "request line is not METHOD TARGET VERSION",
            ));
        };
        if !is_http1(version) {
            return Err(HeadError::Malformed("not HTTP/1.x"));
        }
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(HeadError::Malformed("bad method"));
        }
        if target.is_empty() {
            return Err(HeadError::Malformed("empty request target"));
        }
        Ok(RequestHead {
            method: method.to_owned(),
            target: target.to_owned(),
            headers,
        })
    }

    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// A parsed response head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    headers: Headers,
}

impl ResponseHead {
    /// Parses `HTTP/1.x SP code SP reason CRLF (name: value CRLF)* CRLF`.
    pub fn parse(head: &[u8]) -> Result<ResponseHead, HeadError> {
        let (start, headers) = split_head(head)?;
        let mut parts = start.splitn(3, ' ');
        let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
            return Err(HeadError::Malformed(
                "status line is not VERSION CODE REASON",
            ));
        };
        if !is_http1(version) {
            return Err(HeadError::Malformed("not HTTP/1.x"));
        }
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HeadError::Malformed("bad status code"));
        }
        let status = code
            .parse()
            .map_err(|_| HeadError::Malformed("bad status code"))?;
        Ok(ResponseHead { status, headers })
    }

    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn is_http1(version: &str) -> bool {
    version == "HTTP/1.1" || version == "HTTP/1.0"
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Splits a complete head into its start line and headers.
fn split_head(head: &[u8]) -> Result<(&str, Headers), HeadError> {
    let head = head
        .strip_suffix(HEAD_END)
        .ok_or(HeadError::Malformed("head does not end with an empty line"))?;
    let head = std::str::from_utf8(head).map_err(|_| HeadError::Malformed("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let start = lines.next().unwrap_or_default();
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or(HeadError::Malformed("header line without a colon"))?;
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(HeadError::Malformed("bad header name"));
        }
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(HeadError::Malformed("control character in a header value"));
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    if start.bytes().any(|b| b.is_ascii_control()) {
        return Err(HeadError::Malformed("control character in the start line"));
    }
    Ok((start, headers))
}

/// `tchar` of RFC 9110, so header names can't smuggle separators.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The standard reason phrase of the statuses the agent sends.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        _ => "Unknown",
    }
}

/// A complete JSON response, closing the connection after it.
pub fn json_response(status: u16, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The answer to a successful `CONNECT`; the tunnel starts right after it.
pub const CONNECT_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffered_read_keeps_bytes_past_the_head() {
        let mut input: &[u8] = b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nA: b\r\n\r\nhello";
        let (head, rest) = read_head_buffered(&mut input, 1024).await.unwrap();
        assert!(head.ends_with(b"\r\n\r\n"));
        assert_eq!(rest, b"hello");
    }

    #[tokio::test]
    async fn buffered_read_finds_a_terminator_split_across_reads() {
        let (client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut client = client;
            for piece in [&b"GET / HTTP/1.1\r"[..], b"\n\r", b"\nrest"] {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let (head, rest) = read_head_buffered(&mut server, 1024).await.unwrap();
        assert_eq!(head, b"GET / HTTP/1.1\r\n\r\n");
        let _client = writer.await.unwrap();
        assert!(rest.is_empty() || rest == b"rest");
    }

    #[tokio::test]
    async fn heads_are_bounded() {
        let big = vec![b'a'; 5000];
        let err = read_head_buffered(&mut &big[..], 4096).await.unwrap_err();
        assert!(matches!(err, HeadError::TooLarge { limit: 4096 }));
        let err = read_head_exact(&mut &big[..], 4096).await.unwrap_err();
        assert!(matches!(err, HeadError::TooLarge { limit: 4096 }));
        let err = read_head_exact(&mut &b"HTTP/1.1 200 OK\r\n"[..], 4096)
            .await
            .unwrap_err();
        assert!(matches!(err, HeadError::Eof));
    }

    #[tokio::test]
    async fn exact_read_stops_at_the_head() {
        let mut input: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\ntunnel";
        let head = read_head_exact(&mut input, 1024).await.unwrap();
        assert_eq!(ResponseHead::parse(&head).unwrap().status, 200);
        assert_eq!(input, b"tunnel");
    }

    #[test]
    fn requests_parse_strictly() {
        let head =
            RequestHead::parse(b"GET /v1/health HTTP/1.1\r\nx-previewd-agent-secret:  s3 \r\n\r\n")
                .unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.target, "/v1/health");
        assert_eq!(head.header("X-Previewd-Agent-Secret"), Some("s3"));
        assert_eq!(head.header("Host"), None);

        for bad in [
            &b"GET /v1/health HTTP/1.1\r\n"[..],
            b"GET /v1/health\r\n\r\n",
            b"GET  /v1/health HTTP/1.1\r\n\r\n",
            b"GET /v1/health HTTP/2\r\n\r\n",
            b"get /v1/health HTTP/1.1\r\n\r\n",
            b"GET /v1/health HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET /v1/health HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /v1/health HTTP/1.1\r\nA: x\ry\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
        ] {
            assert!(RequestHead::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn responses_parse_strictly() {
        let head =
            ResponseHead::parse(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!(head.status, 502);
        assert_eq!(head.header("content-length"), Some("12"));
        for bad in [
            &b"HTTP/1.1 20 OK\r\n\r\n"[..],
            b"HTTP/1.1 +20 OK\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1\r\n\r\n",
        ] {
            assert!(ResponseHead::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_responses_carry_length_and_close() {
        let out = json_response(404, b"{}");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
    }
}

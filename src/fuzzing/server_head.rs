//! The proxy's own request-head loop ([`crate::proxy::server`]) against hyper's HTTP/1.1
//! server, on the same client bytes.
//!
//! The loop serves the requests it takes on and leaves the connection to hyper from the
//! first one it does not; were the two ever to disagree on where a request ends, a client
//! could smuggle a request past the one the proxy routed. So for every request the loop
//! serves, hyper must see the same request (method, target, headers) at the same place in
//! the stream; where the loop refuses a head with 400, hyper must refuse it too (unless the
//! head lacks its one `Host`, which only the loop requires); where it
//! waits for more bytes, hyper must wait too; where it closes, hyper must close; and where
//! it hands off, hyper (which then serves the rest) has seen the same requests before it.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;

use super::drive::{AtEnd, MemIo, escaped, run};
use crate::proxy::server::{Head, parse};

/// A request as a server hands it to its service.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    method: String,
    target: String,
    /// Names and values, in the map's order.
    headers: Vec<(String, Vec<u8>)>,
}

impl Seen {
    fn of(method: &http::Method, uri: &http::Uri, headers: &http::HeaderMap) -> Self {
        Seen {
            method: method.to_string(),
            target: uri.to_string(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
        }
    }
}

/// Where the loop stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// It waits for the rest of a head (or for the next request).
    Partial,
    /// It hands the connection to hyper.
    HandOff,
    /// It answers 400 and closes.
    Invalid,
    /// The client asked to close after the last request; `opaque` when one of its
    /// `Connection` values is not visible ASCII (see [`server_head`]).
    Close { opaque: bool },
}

/// What `serve` makes of `data` arriving on a connection: the requests it serves itself,
/// in order, and why it stopped. Checks on the way that a hand-over leaves every byte.
fn through_the_loop(data: &[u8]) -> (Vec<Seen>, End) {
    let mut buf = BytesMut::from(data);
    let mut fields = Vec::new();
    let mut served = Vec::new();
    loop {
        let before = buf.clone();
        match parse(&mut buf, &mut fields) {
            Head::Request(parsed) => {
                let p = &parsed.parts;
                served.push(Seen::of(&p.method, &p.uri, &p.headers));
                if parsed.close {
                    let opaque = p
                        .headers
                        .get_all(http::header::CONNECTION)
                        .iter()
                        .any(|v| v.to_str().is_err());
                    return (served, End::Close { opaque });
                }
            }
            Head::Partial => {
                assert_eq!(buf, before, "a partial head was consumed");
                return (served, End::Partial);
            }
            Head::HandOff => {
                assert_eq!(
                    buf, before,
                    "hyper would not get every byte at the hand-over"
                );
                return (served, End::HandOff);
            }
            Head::Invalid => return (served, End::Invalid),
        }
    }
}

/// How hyper's connection ended.
enum HyperEnd {
    /// It waits for more bytes.
    Waiting,
    /// It closed cleanly.
    Closed,
    /// It refused the input (it answers an error status, or closes).
    Refused(hyper::Error),
}

impl std::fmt::Display for HyperEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HyperEnd::Waiting => f.write_str("waits for more"),
            HyperEnd::Closed => f.write_str("closed"),
            HyperEnd::Refused(e) => write!(f, "refused ({e:?})"),
        }
    }
}

/// What hyper's server (configured as the proxy's, less the timer it needs for a head
/// timeout) makes of `data`: the requests its service gets, and how it ended.
fn through_hyper(data: &[u8]) -> (Vec<Seen>, HyperEnd) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = {
        let seen = seen.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            if let Ok(mut seen) = seen.lock() {
                seen.push(Seen::of(req.method(), req.uri(), req.headers()));
            }
            std::future::ready(Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())))
        })
    };
    let io = MemIo::new(data.to_vec(), usize::MAX, AtEnd::Wait);
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    let end = match run(conn) {
        None => HyperEnd::Waiting,
        Some(Ok(())) => HyperEnd::Closed,
        Some(Err(e)) => HyperEnd::Refused(e),
    };
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    (seen, end)
}

/// The harness: `data` is what a client sends on one connection. Panics when the loop and
/// hyper disagree (see the module doc).
pub fn server_head(data: &[u8]) {
    let (ours, end) = through_the_loop(data);
    let (theirs, hyper_end) = through_hyper(data);
    let n = ours.len();
    let context = || {
        format!(
            "input {:?}\nloop: {end:?} after {ours:#?}\nhyper: {hyper_end} after {theirs:#?}",
            escaped(data)
        )
    };
    assert!(
        theirs.len() >= n && theirs[..n] == ours[..],
        "the loop served requests hyper did not see the same way\n{}",
        context()
    );
    match end {
        End::HandOff => {}
        End::Partial => assert!(
            theirs.len() == n && matches!(hyper_end, HyperEnd::Waiting),
            "the loop waits for more, hyper does not\n{}",
            context()
        ),
        // The loop also refuses a request without exactly one Host (RFC 9112 §3.2), which
        // hyper serves: then hyper must have read that same request there, Host count and
        // all; any other 400 hyper must give too.
        End::Invalid if theirs.len() > n => assert!(
            theirs[n]
                .headers
                .iter()
                .filter(|(h, _)| h == "host")
                .count()
                != 1,
            "the loop answers 400, hyper serves a request with one Host\n{}",
            context()
        ),
        End::Invalid => assert!(
            matches!(hyper_end, HyperEnd::Refused(_)),
            "the loop answers 400, hyper does not refuse\n{}",
            context()
        ),
        // Known difference (seed connection-obs-text.http): the loop finds `close` among
        // the items of a `Connection` value that also holds obs-text (bytes 0x80-0xFF);
        // hyper reads only values that are visible ASCII, so it keeps the connection and
        // serves the next request. The loop closes after serving what hyper serves: the safe
        // side, with no request seen differently, so only that continuation is let pass.
        End::Close { opaque: true } => {}
        End::Close { opaque: false } => assert!(
            theirs.len() == n && matches!(hyper_end, HyperEnd::Closed),
            "the loop closes, hyper does not\n{}",
            context()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_run() {
        super::super::mutate::bounded_run("server_head", server_head, DICTIONARY);
    }

    /// Pieces of request heads the mutator splices in.
    const DICTIONARY: &[&[u8]] = &[
        b"\r\n",
        b"\n",
        b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n",
        b"HEAD ",
        b"CONNECT ",
        b"HTTP/1.0",
        b"Host: x\r\n",
        b"Content-Length: 0\r\n",
        b"Content-Length: 5\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Connection: close\r\n",
        b"Connection: keep-alive, close",
        b"Upgrade: websocket\r\n",
        b" \t",
        b"http://a/",
        b"*",
        b"%00",
    ];

    #[test]
    fn the_harness_sees_a_mismatch() {
        // Two requests where the loop sees one would be a smuggled request: check the
        // comparison itself notices a difference.
        let (ours, end) = through_the_loop(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        let (theirs, _) = through_hyper(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(end, End::Partial);
        assert_eq!(ours.len(), 1);
        assert_ne!(ours, theirs);
    }
}

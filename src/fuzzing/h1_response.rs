//! The proxy's lean HTTP/1.1 client ([`crate::proxy::h1`]) against hyper's client, on the
//! same upstream response bytes.
//!
//! The lean client reuses upstream connections, so a misread message end would hand one
//! response's bytes to the next request. Both clients send a bodyless request and read the
//! answer twice over: first with the upstream still connected (the bytes alone), then after
//! it closes. Properties: both take the answer, or both refuse it; when both take it, the
//! same status, the same body, ending at the same moment (before the close, or only at
//! it); and the lean client reuses a connection only when hyper would too, having read
//! exactly the message (any byte past it would be another answer nobody asked for).

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};

use super::drive::{AtEnd, MemIo, Poller, escaped};
use super::h1_facts::differences;
use crate::proxy::h1::H1Conn;

/// Whether the upstream had closed the connection when something happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The response's bytes had all been sent; the connection was still open.
    Open,
    /// The upstream had closed it.
    Closed,
}

/// What a client made of the response.
#[derive(Clone, Debug, Default)]
struct Seen {
    /// The final status.
    status: Option<u16>,
    /// The body bytes delivered.
    body: Vec<u8>,
    /// When and how the exchange ended: the body complete, or an error (why).
    end: Option<(Phase, Result<(), String>)>,
    /// Whether the connection could carry another request, once that was known.
    reusable: Option<(Phase, bool)>,
    /// Whether every byte the upstream sent had been read when the lean client decided.
    read_all: bool,
    /// How hyper's connection task ended, when it did.
    connection: Option<Result<(), String>>,
}

/// A shared record: the future writes it, the harness reads it between phases.
#[derive(Clone)]
struct Record {
    seen: Rc<RefCell<Seen>>,
    phase: Rc<RefCell<Phase>>,
}

impl Record {
    fn new() -> Self {
        Record {
            seen: Rc::default(),
            phase: Rc::new(RefCell::new(Phase::Open)),
        }
    }

    fn now(&self) -> Phase {
        *self.phase.borrow()
    }

    fn end(&self, result: Result<(), String>) {
        let now = self.now();
        self.seen.borrow_mut().end = Some((now, result));
    }

    fn reusable(&self, reusable: bool) {
        let now = self.now();
        self.seen.borrow_mut().reusable = Some((now, reusable));
    }
}

/// Runs `exchange` over `io`: first until it stalls on the open connection, then with the
/// upstream closed, to its end. Returns what was recorded.
fn two_phases<F: Future<Output = ()>>(
    record: &Record,
    closer: std::sync::Arc<std::sync::atomic::AtomicBool>,
    exchange: F,
    context: &dyn Fn() -> String,
) -> Seen {
    let mut poller = Poller::new(exchange);
    if poller.settle().is_none() {
        *record.phase.borrow_mut() = Phase::Closed;
        closer.store(true, Ordering::SeqCst);
        assert!(
            poller.settle().is_some(),
            "a client still waits after the upstream closed: {}",
            context()
        );
    }
    record.seen.borrow().clone()
}

fn request(method: &Method) -> Request<Empty<Bytes>> {
    let mut req = Request::new(Empty::new());
    *req.method_mut() = method.clone();
    req.headers_mut()
        .insert(http::header::HOST, http::HeaderValue::from_static("app"));
    req
}

/// The lean client on `input`.
fn through_h1(input: &[u8], method: &Method, chunk: usize, context: &dyn Fn() -> String) -> Seen {
    let io = MemIo::answering(input.to_vec(), chunk, AtEnd::Wait);
    let closer = io.closer();
    let record = Record::new();
    let total = input.len();
    let parts = request(method).into_parts().0;
    let exchange = {
        let record = record.clone();
        async move {
            let mut conn = H1Conn::new(io);
            let head = match conn.exchange(&parts).await {
                Ok(head) => head,
                Err(e) => return record.end(Err(e.to_string())),
            };
            record.seen.borrow_mut().status = Some(head.status.as_u16());
            let mut body = head.body(conn);
            while let Some(piece) = poll_fn(|cx| body.poll_data(cx)).await {
                match piece {
                    Ok(piece) => record.seen.borrow_mut().body.extend_from_slice(&piece),
                    Err(e) => return record.end(Err(e.to_string())),
                }
            }
            record.end(Ok(()));
            let kept = body.finish();
            record.reusable(kept.is_some());
            record.seen.borrow_mut().read_all =
                kept.is_some_and(|c| c.into_io().consumed() == total);
        }
    };
    two_phases(&record, closer, exchange, context)
}

/// Hyper's client (configured as the proxy's) on `input`.
fn through_hyper(
    input: &[u8],
    method: &Method,
    chunk: usize,
    context: &dyn Fn() -> String,
) -> Seen {
    let io = MemIo::answering(input.to_vec(), chunk, AtEnd::Wait);
    let closer = io.closer();
    let record = Record::new();
    let req = request(method);
    let exchange = {
        let record = record.clone();
        async move {
            let (mut sender, conn) = match hyper::client::conn::http1::Builder::new()
                .handshake::<_, Empty<Bytes>>(io)
                .await
            {
                Ok(pair) => pair,
                Err(e) => return record.end(Err(e.to_string())),
            };
            // Dropped once it ends, as the proxy's task drops it: that closes the sender.
            let mut conn = Some(Box::pin(conn));
            let mut exchange = std::pin::pin!(async {
                let resp = match sender.send_request(req).await {
                    Ok(resp) => resp,
                    Err(e) => return record.end(Err(e.to_string())),
                };
                record.seen.borrow_mut().status = Some(resp.status().as_u16());
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(frame) => {
                            if let Ok(data) = frame.into_data() {
                                record.seen.borrow_mut().body.extend_from_slice(&data);
                            }
                        }
                        Err(e) => return record.end(Err(e.to_string())),
                    }
                }
                record.end(Ok(()));
                let ready = sender.ready().await.is_ok();
                record.reusable(ready);
            });
            // The connection's task and the exchange, polled together (as the proxy spawns
            // the one beside the other); the exchange may outlive the connection.
            poll_fn(|cx| {
                if let Some(task) = conn.as_mut()
                    && let Poll::Ready(ended) = task.as_mut().poll(cx)
                {
                    record.seen.borrow_mut().connection = Some(ended.map_err(|e| format!("{e:?}")));
                    conn = None;
                }
                exchange.as_mut().poll(cx)
            })
            .await;
        }
    };
    two_phases(&record, closer, exchange, context)
}

/// How many bytes each read gets, chosen by the input's first byte.
const CHUNKS: [usize; 8] = [usize::MAX, 1, 2, 3, 7, 16, 64, 1024];

/// The harness: byte 0 picks the request's method (bit 0: `HEAD`, else `GET`) and the size
/// of each read (bits 1-3), the rest is what the upstream answers. Panics when a property
/// in the module doc fails.
pub fn h1_response(data: &[u8]) {
    let [flags, answer @ ..] = data else {
        return;
    };
    let method = if flags & 1 == 1 {
        Method::HEAD
    } else {
        Method::GET
    };
    let chunk = CHUNKS[usize::from(flags >> 1 & 7)];
    let context = || {
        format!(
            "{method} answered with {} in reads of {chunk}",
            escaped(answer)
        )
    };
    let ours = through_h1(answer, &method, chunk, &context);
    let theirs = through_hyper(answer, &method, chunk, &context);
    let context = || format!("{}\nlean client: {ours:?}\nhyper: {theirs:?}", context());

    let (Some((our_phase, our_end)), Some((their_phase, their_end))) = (&ours.end, &theirs.end)
    else {
        panic!("an exchange did not end: {}", context());
    };
    // The proxy answers an unasked-for 101 with 502 on hyper's path too: a refusal.
    let their_end = match theirs.status {
        Some(101) => &Err("101 to a request without an upgrade".to_owned()),
        _ => their_end,
    };
    // The classes of answers the two clients are known to read differently (see
    // `Differences`): each lets pass only its own disagreement.
    let known = differences(answer, method == Method::HEAD);
    match (our_end, their_end) {
        (Ok(()), Ok(())) => {
            assert_eq!(ours.status, theirs.status, "statuses differ: {}", context());
            assert_eq!(ours.body, theirs.body, "bodies differ: {}", context());
            assert_eq!(
                our_phase,
                their_phase,
                "the message ends at different moments: {}",
                context()
            );
        }
        (Err(_), Err(_)) => {}
        (Ok(()), Err(_)) if known.transfer_encoding_in_http10 => {
            assert_ne!(ours.reusable, Some((Phase::Open, true)), "{}", context());
        }
        (Ok(()), Err(_)) if known.trailers_hyper_refuses => {
            assert_eq!(ours.body, theirs.body, "bodies differ: {}", context());
        }
        (Err(why), Ok(()))
            if ((known.length_ignored_by_hyper || known.long_length)
                && why.contains("content-length"))
                || (known.bare_lf_in_trailers && why.contains("in a chunked body"))
                || (known.opaque_transfer_encoding && why.contains("transfer-encoding")) => {}
        (Ok(()), Err(_)) => panic!("the lean client takes what hyper refuses: {}", context()),
        (Err(_), Ok(())) => panic!("the lean client refuses what hyper takes: {}", context()),
    }
    if ours.reusable == Some((Phase::Open, true)) && ours.read_all && !known.trailers_hyper_refuses
    {
        assert_eq!(
            theirs.reusable,
            Some((Phase::Open, true)),
            "the lean client reuses a connection hyper would not: {}",
            context()
        );
    }
    assert!(
        !matches!(ours.reusable, Some((Phase::Closed, true))),
        "a closed connection is kept: {}",
        context()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_run() {
        super::super::mutate::bounded_run("h1_response", h1_response, DICTIONARY);
    }

    #[test]
    fn the_seeds_reach_reuse_and_the_close() {
        let mut reused = 0;
        let mut at_close = 0;
        for (_, bytes) in super::super::mutate::seeds("h1_response") {
            let [_, answer @ ..] = &bytes[..] else {
                continue;
            };
            let ours = through_h1(answer, &Method::GET, usize::MAX, &String::new);
            reused += usize::from(ours.reusable == Some((Phase::Open, true)) && ours.read_all);
            at_close += usize::from(matches!(ours.end, Some((Phase::Closed, Ok(())))));
        }
        assert!(
            reused >= 3 && at_close >= 1,
            "{reused} reused, {at_close} ended at close"
        );
    }

    #[test]
    fn each_known_difference_has_its_seed() {
        let seeds = super::super::mutate::seeds("h1_response");
        let of = |file: &str| {
            let (_, bytes) = seeds.iter().find(|(p, _)| p.ends_with(file)).unwrap();
            differences(&bytes[1..], false)
        };
        let d = |f: fn(&mut super::super::h1_facts::Differences)| {
            let mut d = super::super::h1_facts::Differences::default();
            f(&mut d);
            d
        };
        assert_eq!(
            of("te-trailing-comma"),
            d(|d| d.opaque_transfer_encoding = true)
        );
        assert_eq!(of("cl-ignored"), d(|d| d.length_ignored_by_hyper = true));
        assert_eq!(of("cl-zeros"), d(|d| d.long_length = true));
        assert_eq!(of("trailers-bare-lf"), d(|d| d.bare_lf_in_trailers = true));
        assert_eq!(
            of("trailers-invalid"),
            d(|d| d.trailers_hyper_refuses = true)
        );
        assert_eq!(of("http10-te"), d(|d| d.transfer_encoding_in_http10 = true));
        assert_eq!(of("chunked"), d(|_| {}));
        assert_eq!(of("length"), d(|_| {}));
    }

    /// Pieces of response heads and chunked bodies.
    const DICTIONARY: &[&[u8]] = &[
        b"\r\n",
        b"\n",
        b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.0 ",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n",
        b"HTTP/1.1 304 Not Modified\r\n",
        b"Content-Length: ",
        b"Content-Length: 0\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Connection: close\r\n",
        b"0\r\n\r\n",
        b"5\r\nhello\r\n",
        b";ext=1",
        b" \t",
        b"ffffffffffffffff",
        b",",
    ];
}

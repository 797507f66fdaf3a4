//! The body of every proxy response: an upstream's, streamed as it arrives, or one the proxy
//! wrote itself (an error page, a redirect). One concrete type, so a response costs no boxed
//! body, and the place where a response's end is noticed: the in-flight gauge drops then, and
//! the upstream connection goes back to its pool.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::metrics::InFlight;
use crate::proxy::forward::{Affinity, Lent, Pool};
use crate::proxy::h1::H1Body;
use crate::proxy::revoke::StreamGuard;

/// Why a proxy response body failed (an upstream's, part-way).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A proxy response body.
pub struct ProxyBody {
    kind: Kind,
    /// Counts the response as in flight until the body is dropped (sent, or abandoned).
    in_flight: Option<InFlight>,
    /// The client connection whose next request the upstream connection is kept for, once
    /// the body has ended.
    home: Option<Arc<Affinity>>,
    /// Whether the upstream body was read to its end.
    ended: bool,
    /// Ends the body when its link is revoked or it idles too long.
    guard: Option<StreamGuard>,
}

enum Kind {
    /// Through hyper, on `lent` (none for an upgraded connection).
    Upstream(Incoming, Option<Lent>),
    /// Through [`crate::proxy::h1`]: the body holds its connection, which goes back to `pool`.
    H1(H1Body, Arc<Pool>),
    Full(Option<Bytes>),
}

impl ProxyBody {
    /// A body written by the proxy.
    pub fn full(data: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::of(Kind::Full(Some(data.into())), None)
    }

    /// No body.
    pub fn empty() -> ProxyBody {
        ProxyBody::of(Kind::Full(None), None)
    }

    /// An upstream's body through hyper, arriving on `lent` (none for an upgraded
    /// connection), which goes back to `home` afterwards.
    pub fn upstream(body: Incoming, lent: Option<Lent>, home: Arc<Affinity>) -> ProxyBody {
        ProxyBody::of(Kind::Upstream(body, lent), Some(home))
    }

    /// An upstream's body read by [`crate::proxy::h1`]; its connection goes back to `home`
    /// (or `pool`) afterwards.
    pub fn h1(body: H1Body, pool: Arc<Pool>, home: Arc<Affinity>) -> ProxyBody {
        ProxyBody::of(Kind::H1(body, pool), Some(home))
    }

    fn of(kind: Kind, home: Option<Arc<Affinity>>) -> ProxyBody {
        ProxyBody {
            kind,
            in_flight: None,
            home,
            ended: false,
            guard: None,
        }
    }

    /// Ends the body, part-way, when `guard` says so (the client then sees the response
    /// cut off: no last chunk, or fewer bytes than announced).
    pub fn guarded(mut self, guard: StreamGuard) -> ProxyBody {
        self.guard = Some(guard);
        self
    }

    /// Keeps `guard` until the body is dropped.
    pub fn in_flight(mut self, guard: InFlight) -> ProxyBody {
        self.in_flight = Some(guard);
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled: Poll<Option<Result<Frame<Bytes>, BodyError>>> = match &mut this.kind {
            Kind::Full(data) => return Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Upstream(body, _) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::from))),
            Kind::H1(body, _) => body
                .poll_data(cx)
                .map(|f| f.map(|r| r.map(Frame::data).map_err(BodyError::from))),
        };
        match &polled {
            Poll::Ready(None) => this.ended = true,
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, source = ?e.source(), "upstream body failed");
            }
            Poll::Ready(Some(Ok(_))) => {
                if let Some(guard) = &mut this.guard {
                    guard.progressed();
                }
            }
            Poll::Pending => {
                if let Some(guard) = &mut this.guard
                    && let Poll::Ready(why) = guard.poll_ended(cx)
                {
                    tracing::debug!(%why, "ending a streaming response");
                    this.guard = None;
                    this.kind = Kind::Full(None);
                    return Poll::Ready(Some(Err(Box::new(why))));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Upstream(body, _) => body.is_end_stream(),
            Kind::H1(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Upstream(body, _) => body.size_hint(),
            Kind::H1(body, _) => body
                .exact_len()
                .map_or_else(SizeHint::default, SizeHint::with_exact),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        let Some(home) = self.home.take() else { return };
        // A body abandoned half-way leaves its connection unusable: it is closed instead.
        match &mut self.kind {
            Kind::Upstream(body, lent) => {
                if (self.ended || body.is_end_stream())
                    && let Some(lent) = lent.take()
                {
                    lent.give_back(&home);
                }
            }
            Kind::H1(body, pool) => {
                if let Some(conn) = body.finish() {
                    Lent::h1(conn, pool.clone()).give_back(&home);
                }
            }
            Kind::Full(_) => {}
        }
    }
}

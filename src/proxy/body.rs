//! The body of every proxy response: an upstream's, streamed as it arrives, or one the proxy
//! wrote itself (an error page, a redirect). One concrete type, so a response costs no boxed
//! body, and the place where a response's end is noticed: the in-flight gauge drops then, and
//! the upstream connection goes back to its pool.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use std::sync::Arc;

use crate::metrics::InFlight;
use crate::proxy::forward::{Affinity, Lent};

/// A proxy response body.
pub struct ProxyBody {
    kind: Kind,
    /// Counts the response as in flight until the body is dropped (sent, or abandoned).
    in_flight: Option<InFlight>,
    /// The upstream connection the body arrives on, given back to its client connection once
    /// the body has ended.
    lent: Option<(Lent, Arc<Affinity>)>,
    /// Whether the upstream body was read to its end.
    ended: bool,
}

enum Kind {
    Upstream(Incoming),
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

    /// An upstream's body, arriving on `lent` (none for an upgraded connection), which goes
    /// back to `home` afterwards.
    pub fn upstream(body: Incoming, lent: Option<(Lent, Arc<Affinity>)>) -> ProxyBody {
        ProxyBody::of(Kind::Upstream(body), lent)
    }

    fn of(kind: Kind, lent: Option<(Lent, Arc<Affinity>)>) -> ProxyBody {
        ProxyBody {
            kind,
            in_flight: None,
            lent,
            ended: false,
        }
    }

    /// Keeps `guard` until the body is dropped.
    pub fn in_flight(mut self, guard: InFlight) -> ProxyBody {
        self.in_flight = Some(guard);
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Upstream(body) => {
                let polled = Pin::new(body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => this.ended = true,
                    Poll::Ready(Some(Err(e))) => {
                        tracing::debug!(error = %e, source = ?std::error::Error::source(e), "upstream body failed");
                    }
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Upstream(body) => body.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        let ended = self.ended
            || match &self.kind {
                Kind::Upstream(body) => body.is_end_stream(),
                Kind::Full(_) => true,
            };
        // A body abandoned half-way leaves its connection unusable: it is closed instead.
        if ended && let Some((lent, home)) = self.lent.take() {
            lent.give_back(&home);
        }
    }
}

//! Revocation of what is already flowing: the upgraded connections (WebSockets) and
//! streaming responses of a link end when the link is deleted, stops serving, changes
//! who may use it (its token is rotated, it stops being public), or expires.
//!
//! A request is checked against the link when it arrives; what it opens can outlive that
//! check by hours. Each admitted request therefore takes a [`Grant`]: a cancellation token
//! shared by everything admitted under the same state of the link, cancelled by the reflector's
//! feed the moment the link's state changes, and a deadline at the link's expiry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use crate::resources::PreviewLink;
use crate::resources::preview_link::{Access, LinkPhase};

/// What of a link decides who reaches what through it: when any of it changes, what was
/// admitted before is revoked.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    uid: Option<String>,
    serving: bool,
    access: Access,
    token_hash: Option<String>,
    upstream: Option<String>,
}

impl Fingerprint {
    fn of(link: &PreviewLink) -> Self {
        let st = link.status.as_ref();
        Fingerprint {
            uid: link.metadata.uid.clone(),
            serving: link.metadata.deletion_timestamp.is_none()
                && st.and_then(|s| s.phase) == Some(LinkPhase::Ready),
            access: link.spec.access,
            token_hash: st.and_then(|s| s.token_hash.clone()),
            upstream: st.and_then(|s| s.upstream.clone()),
        }
    }
}

/// The `resourceVersion` of an object as a number, to order two states of one object (the
/// embedded store and etcd both count up; `None` where a server uses another form).
fn revision(link: &PreviewLink) -> Option<u64> {
    link.metadata.resource_version.as_deref()?.parse().ok()
}

struct Entry {
    revision: Option<u64>,
    fingerprint: Fingerprint,
    token: CancellationToken,
}

/// The grants of every link with live traffic; shared by the proxy's workers and fed by the
/// PreviewLink reflector.
#[derive(Clone, Default)]
pub struct Revocations {
    entries: Arc<Mutex<HashMap<ObjectRef<PreviewLink>, Entry>>>,
    /// Keys seen since a re-list began (links absent from the new list are gone).
    relisting: Arc<Mutex<Option<Vec<ObjectRef<PreviewLink>>>>>,
}

/// What a request admitted under one state of a link holds: cancelled when that state ends.
#[derive(Clone, Debug)]
pub struct Grant {
    /// Cancelled on revocation.
    pub token: CancellationToken,
    /// When the link expires, if it does.
    pub expires_at: Option<std::time::SystemTime>,
}

impl Grant {
    /// Resolves when what this grant covers must end: revoked, or past the link's expiry.
    pub async fn ended(&self) {
        let expiry = async {
            match self.expires_at {
                Some(at) => {
                    let left = at
                        .duration_since(std::time::SystemTime::now())
                        .unwrap_or_default();
                    tokio::time::sleep(left).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = self.token.cancelled() => {}
            () = expiry => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Revocations {
    /// The grant for a request admitted with `link` as the proxy's store held it. A link
    /// already seen in a newer, different state gets a grant that is cancelled at once: the
    /// request was admitted on stale data.
    pub fn grant(&self, link: &PreviewLink) -> Grant {
        let expires_at = link
            .status
            .as_ref()
            .and_then(|s| s.expires_at.as_ref())
            .map(|t| std::time::SystemTime::from(t.0));
        let key = ObjectRef::from_obj(link);
        let (fingerprint, revision) = (Fingerprint::of(link), revision(link));
        let mut entries = lock(&self.entries);
        let token = match entries.get_mut(&key) {
            Some(e) if e.fingerprint == fingerprint => {
                e.revision = e.revision.max(revision);
                e.token.clone()
            }
            Some(e) if matches!((e.revision, revision), (Some(known), Some(this)) if this < known) =>
            {
                let stale = CancellationToken::new();
                stale.cancel();
                stale
            }
            _ => Self::replace(&mut entries, key, revision, fingerprint),
        };
        Grant { token, expires_at }
    }

    /// A new state of `key`: the old grant is cancelled, a new one begins.
    fn replace(
        entries: &mut HashMap<ObjectRef<PreviewLink>, Entry>,
        key: ObjectRef<PreviewLink>,
        revision: Option<u64>,
        fingerprint: Fingerprint,
    ) -> CancellationToken {
        let token = CancellationToken::new();
        let old = entries.insert(
            key,
            Entry {
                revision,
                fingerprint,
                token: token.clone(),
            },
        );
        if let Some(old) = old {
            old.token.cancel();
        }
        token
    }

    /// Takes in one event of the PreviewLink watch (after the store applied it).
    pub fn observe(&self, event: &watcher::Event<PreviewLink>) {
        match event {
            watcher::Event::Apply(link) | watcher::Event::InitApply(link) => {
                if let Some(seen) = lock(&self.relisting).as_mut() {
                    seen.push(ObjectRef::from_obj(link));
                }
                self.changed(link);
            }
            watcher::Event::Delete(link) => self.revoke(&ObjectRef::from_obj(link)),
            watcher::Event::Init => *lock(&self.relisting) = Some(Vec::new()),
            watcher::Event::InitDone => {
                let Some(seen) = lock(&self.relisting).take() else {
                    return;
                };
                let gone: Vec<_> = lock(&self.entries)
                    .keys()
                    .filter(|k| !seen.contains(k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.revoke(&key);
                }
            }
        }
    }

    fn changed(&self, link: &PreviewLink) {
        let key = ObjectRef::from_obj(link);
        let (fingerprint, revision) = (Fingerprint::of(link), revision(link));
        let mut entries = lock(&self.entries);
        let Some(e) = entries.get_mut(&key) else {
            return;
        };
        if e.fingerprint == fingerprint {
            e.revision = e.revision.max(revision);
            return;
        }
        if matches!((e.revision, revision), (Some(known), Some(this)) if this < known) {
            return;
        }
        if let Some(e) = entries.remove(&key) {
            e.token.cancel();
        }
    }

    fn revoke(&self, key: &ObjectRef<PreviewLink>) {
        if let Some(e) = lock(&self.entries).remove(key) {
            e.token.cancel();
        }
    }

    /// How many links have live grants (for tests and metrics).
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Whether no link has a live grant.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a stream was ended by the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamEnded {
    /// The link was deleted, stopped serving, changed its access or expired.
    #[error("the preview link was revoked or expired")]
    Revoked,
    /// No byte passed for the link's `spec.timeouts.idle`.
    #[error("the stream was idle longer than the link allows")]
    Idle,
}

/// What a streaming response body of a link watches while it waits for its upstream: the
/// link's [`Grant`], and its idle limit if it has one. The futures are made on the first
/// wait, so a response that never waits (most) costs none of this.
pub struct StreamGuard {
    grant: Grant,
    idle: Option<std::time::Duration>,
    ended: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
    quiet: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl StreamGuard {
    /// Guards with `grant`, closing after `idle` without a byte when given.
    pub fn new(grant: Grant, idle: Option<std::time::Duration>) -> Self {
        StreamGuard {
            grant,
            idle,
            ended: None,
            quiet: None,
        }
    }

    /// Polled while the body waits: ready when the stream must end.
    pub fn poll_ended(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<StreamEnded> {
        use std::task::Poll;
        let grant = self.grant.clone();
        let ended = self
            .ended
            .get_or_insert_with(|| Box::pin(async move { grant.ended().await }));
        if ended.as_mut().poll(cx).is_ready() {
            return Poll::Ready(StreamEnded::Revoked);
        }
        if let Some(idle) = self.idle {
            let quiet = self
                .quiet
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
            if quiet.as_mut().poll(cx).is_ready() {
                return Poll::Ready(StreamEnded::Idle);
            }
        }
        Poll::Pending
    }

    /// A byte passed: the idle limit counts again from now.
    pub fn progressed(&mut self) {
        if let (Some(idle), Some(quiet)) = (self.idle, self.quiet.as_mut()) {
            quiet.as_mut().reset(tokio::time::Instant::now() + idle);
        }
    }

    /// Runs `tunnel` (an upgraded connection's splice) until it ends, or until this guard
    /// ends it; `activity` is bumped by the tunnel's IO (see [`Activity`]).
    pub async fn run_tunnel<T>(self, activity: Arc<Activity>, tunnel: T) -> Result<(), StreamEnded>
    where
        T: Future,
    {
        let idle = async {
            let Some(idle) = self.idle else {
                return std::future::pending().await;
            };
            loop {
                let last = activity.last();
                tokio::time::sleep_until(last + idle).await;
                if activity.last() == last {
                    return;
                }
            }
        };
        tokio::select! {
            _ = tunnel => Ok(()),
            () = self.grant.ended() => Err(StreamEnded::Revoked),
            () = idle => Err(StreamEnded::Idle),
        }
    }
}

/// When an upgraded connection last carried a byte, shared between its IO and its guard.
pub struct Activity {
    origin: tokio::time::Instant,
    /// Milliseconds since `origin`.
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    /// Active now.
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            origin: tokio::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// A byte passed now.
    pub fn bump(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.origin
            + std::time::Duration::from_millis(
                self.last_ms.load(std::sync::atomic::Ordering::Relaxed),
            )
    }
}

/// An upgraded connection's client side, bumping its [`Activity`] on every byte either way.
pub struct Active<S> {
    /// The connection.
    pub io: S,
    /// Where its activity is noted.
    pub activity: Arc<Activity>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Active<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.bump();
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Active<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            this.activity.bump();
        }
        polled
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::target::Target;
    use crate::resources::{PreviewLinkSpec, PreviewLinkStatus};

    fn link(rv: u64, hash: &str) -> PreviewLink {
        let mut l = PreviewLink::new("web", PreviewLinkSpec::new(Target::docker("c"), 80));
        l.metadata.namespace = Some("default".into());
        l.metadata.uid = Some("u1".into());
        l.metadata.resource_version = Some(rv.to_string());
        l.status = Some(PreviewLinkStatus {
            phase: Some(LinkPhase::Ready),
            upstream: Some("http://10.0.0.1:80".into()),
            token_hash: Some(hash.into()),
            ..Default::default()
        });
        l
    }

    #[test]
    fn a_changed_token_revokes_what_the_old_one_admitted() {
        let r = Revocations::default();
        let first = r.grant(&link(1, "a"));
        let again = r.grant(&link(1, "a"));
        // A status write that changes nothing of who reaches what revokes nothing.
        r.observe(&watcher::Event::Apply(link(2, "a")));
        assert!(!first.token.is_cancelled() && !again.token.is_cancelled());
        r.observe(&watcher::Event::Apply(link(3, "b")));
        assert!(first.token.is_cancelled() && again.token.is_cancelled());
        // A request still holding the old state (read before the change) is refused its
        // stream at once.
        let fresh = r.grant(&link(3, "b"));
        assert!(!fresh.token.is_cancelled());
        let stale = r.grant(&link(2, "a"));
        assert!(stale.token.is_cancelled());
        assert!(
            !fresh.token.is_cancelled(),
            "a stale request revokes nothing"
        );
    }

    #[test]
    fn deletion_expiry_and_a_relist_without_the_link_revoke() {
        let r = Revocations::default();
        let g = r.grant(&link(1, "a"));
        let mut deleting = link(2, "a");
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        r.observe(&watcher::Event::Apply(deleting));
        assert!(g.token.is_cancelled());

        let g = r.grant(&link(3, "a"));
        r.observe(&watcher::Event::Delete(link(3, "a")));
        assert!(g.token.is_cancelled());
        assert!(r.is_empty());

        let g = r.grant(&link(4, "a"));
        r.observe(&watcher::Event::Init);
        r.observe(&watcher::Event::InitDone);
        assert!(g.token.is_cancelled(), "gone while the watch was down");

        let g = r.grant(&link(5, "a"));
        r.observe(&watcher::Event::Init);
        r.observe(&watcher::Event::InitApply(link(5, "a")));
        r.observe(&watcher::Event::InitDone);
        assert!(!g.token.is_cancelled(), "still there after the re-list");
    }

    #[tokio::test]
    async fn a_grant_ends_at_expiry() {
        let r = Revocations::default();
        let mut l = link(1, "a");
        let soon = k8s_openapi::jiff::Timestamp::now()
            .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(1))
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        if let Some(s) = l.status.as_mut() {
            s.expires_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(soon));
        }
        let g = r.grant(&l);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(3), g.ended()).await;
        assert!(ended.is_ok(), "the grant outlived the link's expiry");
    }
}

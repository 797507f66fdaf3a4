//! What every watch of the API shares: objects that do not decode are skipped instead of
//! failing the whole watch, and the watches' health decides `/readyz`.
//!
//! A watcher over `Api<K>` fails as a whole when one object in a list or an event does not
//! deserialize into `K` (a PreviewLink with `ttl: banana`, accepted by an API server whose
//! CRD schema did not refuse it): its store stays empty or stale, and every link stops
//! routing. Watches here read objects as [`DeserializeGuard<K>`]; a bad one is logged once
//! per version, counted in `previewd_undecodable_objects_total`, and treated as absent.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use tokio::sync::broadcast;

use crate::metrics::Metrics;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reports objects that do not decode, once per object version.
#[derive(Clone)]
pub struct Undecodable {
    metrics: Arc<Metrics>,
    seen: Arc<Mutex<HashSet<(String, String)>>>,
}

impl Undecodable {
    /// Reports into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Undecodable {
            metrics,
            seen: Arc::default(),
        }
    }

    /// Logs and counts `invalid` (a `kind`) unless this version of it was reported before.
    pub fn report(&self, kind: &'static str, invalid: &InvalidObject) {
        let m = &invalid.metadata;
        let key = (
            m.uid.clone().unwrap_or_else(|| {
                format!(
                    "{}/{}",
                    m.namespace.as_deref().unwrap_or_default(),
                    m.name.as_deref().unwrap_or_default()
                )
            }),
            m.resource_version.clone().unwrap_or_default(),
        );
        let mut seen = lock(&self.seen);
        if seen.len() > 100_000 {
            seen.clear();
        }
        if seen.insert(key) {
            tracing::warn!(
                kind,
                namespace = m.namespace.as_deref().unwrap_or_default(),
                name = m.name.as_deref().unwrap_or_default(),
                error = %invalid.error,
                "skipping an object that does not decode (fix or delete it)"
            );
            self.metrics.undecodable(kind);
        }
    }
}

/// The events of a watch over `DeserializeGuard<K>` as events of `K`: an object that does
/// not decode is reported and treated as absent (deleted, when it was there before; left out
/// of a re-list). `placeholder` makes a `K` that only carries an object's metadata, for the
/// deletion.
pub fn decoded<K, S>(
    events: S,
    kind: &'static str,
    undecodable: Undecodable,
    placeholder: fn(ObjectMeta) -> K,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>>
where
    S: Stream<Item = Result<Event<DeserializeGuard<K>>, watcher::Error>>,
{
    events.filter_map(move |event| {
        let mapped = match event {
            Err(e) => Some(Err(e)),
            Ok(Event::Init) => Some(Ok(Event::Init)),
            Ok(Event::InitDone) => Some(Ok(Event::InitDone)),
            Ok(Event::InitApply(DeserializeGuard(obj))) => match obj {
                Ok(k) => Some(Ok(Event::InitApply(k))),
                Err(invalid) => {
                    undecodable.report(kind, &invalid);
                    None
                }
            },
            Ok(Event::Apply(DeserializeGuard(obj))) => match obj {
                Ok(k) => Some(Ok(Event::Apply(k))),
                Err(invalid) => {
                    undecodable.report(kind, &invalid);
                    Some(Ok(Event::Delete(placeholder(invalid.metadata))))
                }
            },
            Ok(Event::Delete(DeserializeGuard(obj))) => Some(Ok(Event::Delete(match obj {
                Ok(k) => k,
                Err(invalid) => placeholder(invalid.metadata),
            }))),
        };
        std::future::ready(mapped)
    })
}

/// kubectl's copy of the last applied object, kept in an annotation.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops from an object what no cache reader uses and what costs the most to keep decoded:
/// its managed fields (a JSON tree per writer, several times the object itself) and
/// kubectl's last-applied copy. Caches of 10,000 links hold only what routing and
/// reconciling read; nothing writes a cached object back whole.
pub fn prune<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// How many changes a reader of a [`SharedCache`] may fall behind before it starts over
/// from the whole cache.
const SHARED_CHANGES: usize = 4_096;

/// One cache of a kind, filled by one watch and read by everyone who needs that kind: the
/// proxy routes from it, the REST shim waits on it, and the link controller reconciles from
/// it. A cache per reader held every link once per reader (10,000 links cost tens of MiB
/// each time).
pub struct SharedCache<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    changes: broadcast::Sender<Changed<K>>,
    /// The objects the API holds that do not decode (left out of `store`), by namespace and
    /// name: readers that must not act as if they were gone ask [`SharedCache::undecodable_in`].
    undecodable: Arc<Mutex<Listed<Names>>>,
}

/// Objects by namespace and name.
type Names = HashSet<(String, String)>;

/// What is kept from a watch the way a reflector keeps its store: a (re-)list fills a new
/// one, which replaces the old only once the list is done; later changes apply in place.
#[derive(Default)]
pub struct Listed<M> {
    now: M,
    listing: M,
}

impl<M: Default> Listed<M> {
    /// Applies `event`: `upsert` for an object listed or changed, `remove` for one deleted.
    pub fn apply<T>(
        &mut self,
        event: &Event<T>,
        upsert: impl FnOnce(&mut M, &T),
        remove: impl FnOnce(&mut M, &T),
    ) {
        match event {
            Event::Init => self.listing = M::default(),
            Event::InitApply(obj) => upsert(&mut self.listing, obj),
            Event::InitDone => self.now = std::mem::take(&mut self.listing),
            Event::Apply(obj) => upsert(&mut self.now, obj),
            Event::Delete(obj) => remove(&mut self.now, obj),
        }
    }

    /// What is known now (a list under way is not, until it is done).
    pub fn now(&self) -> &M {
        &self.now
    }
}

/// What a watch event changed in a [`SharedCache`].
enum Changed<K: Resource<DynamicType = ()>> {
    /// One object.
    One(ObjectRef<K>),
    /// Possibly every object: a (re-)list replaced the store's contents at once.
    All,
}

impl<K: Resource<DynamicType = ()>> Clone for Changed<K> {
    fn clone(&self) -> Self {
        match self {
            Changed::One(key) => Changed::One(key.clone()),
            Changed::All => Changed::All,
        }
    }
}

impl<K: Resource<DynamicType = ()> + 'static> Clone for SharedCache<K> {
    fn clone(&self) -> Self {
        SharedCache {
            store: self.store.clone(),
            changes: self.changes.clone(),
            undecodable: self.undecodable.clone(),
        }
    }
}

impl<K> SharedCache<K>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    /// A cache over `store`, whose watch calls [`SharedCache::observe`] with each event.
    pub fn new(store: Store<K>) -> Self {
        let (changes, _) = broadcast::channel(SHARED_CHANGES);
        SharedCache {
            store,
            changes,
            undecodable: Arc::default(),
        }
    }

    /// Notes which objects do not decode, from the watch's events as read (before
    /// [`decoded`] leaves those objects out).
    pub fn note(&self, event: &Result<Event<DeserializeGuard<K>>, watcher::Error>) {
        let Ok(event) = event else { return };
        let key = |guard: &DeserializeGuard<K>| {
            let meta = match &guard.0 {
                Ok(obj) => obj.meta(),
                Err(invalid) => &invalid.metadata,
            };
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        };
        lock(&self.undecodable).apply(
            event,
            |set, guard| {
                if guard.0.is_err() {
                    set.insert(key(guard));
                } else {
                    set.remove(&key(guard));
                }
            },
            |set, guard| {
                set.remove(&key(guard));
            },
        );
    }

    /// Whether an object in `namespace` is in the API but does not decode.
    pub fn undecodable_in(&self, namespace: &str) -> bool {
        lock(&self.undecodable)
            .now()
            .iter()
            .any(|(ns, _)| ns == namespace)
    }

    /// The cached objects.
    pub fn store(&self) -> &Store<K> {
        &self.store
    }

    /// Tells the readers of [`SharedCache::triggers`] which object an event of the watch
    /// (already applied to the store) changed. Deletions trigger nothing: what a reconcile
    /// owes a deleted object it does while the object's finalizer holds it.
    pub fn observe(&self, event: &Event<K>) {
        let changed = match event {
            Event::Apply(obj) => Changed::One(ObjectRef::from_obj(obj)),
            // A list's objects reach the store together, when it is done.
            Event::InitDone => Changed::All,
            Event::Init | Event::InitApply(_) | Event::Delete(_) => return,
        };
        // No readers is fine: the controller is not running (not the leader).
        let _ = self.changes.send(changed);
    }

    /// The objects to reconcile, for `Controller::for_stream`: every cached object once the
    /// cache has listed, then each one that changes. A reader that falls behind starts
    /// over from the whole cache, so it misses nothing; one that starts late (a new leader)
    /// begins with everything.
    pub fn triggers(&self) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
        struct State<K: Resource<DynamicType = ()> + 'static> {
            store: Store<K>,
            changes: broadcast::Sender<Changed<K>>,
            live: Option<broadcast::Receiver<Changed<K>>>,
            pending: VecDeque<ObjectRef<K>>,
        }
        let state = State {
            store: self.store.clone(),
            changes: self.changes.clone(),
            live: None,
            pending: VecDeque::new(),
        };
        futures::stream::unfold(state, |mut st| async move {
            loop {
                if st.live.is_none() {
                    // A writer gone before its first list means the watch ended: so do we.
                    st.store.wait_until_ready().await.ok()?;
                    st.live = Some(st.changes.subscribe());
                    st.pending = everything(&st.store);
                }
                while let Some(key) = st.pending.pop_front() {
                    if let Some(obj) = st.store.get(&key) {
                        return Some((Ok(K::clone(&obj)), st));
                    }
                }
                let live = st.live.as_mut()?;
                match live.recv().await {
                    Ok(Changed::One(key)) => st.pending.push_back(key),
                    Ok(Changed::All) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        st.pending = everything(&st.store);
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }
}

/// The keys of every object in `store`.
fn everything<K: Resource<DynamicType = ()> + Clone + 'static>(
    store: &Store<K>,
) -> VecDeque<ObjectRef<K>> {
    store
        .state()
        .iter()
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// Where one watch is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum WatchState {
    /// Listing for the first time.
    Syncing,
    /// Listed and watching.
    Synced,
    /// Its last attempt failed (it retries with backoff).
    Failing(String, std::time::Instant),
}

/// How long after its last error a watch that has synced before counts as recovered when no
/// event says so: longer than the watcher's longest pause between retries (30 s), so a
/// watch still failing reports again before this runs out. A watch resumed without a change
/// yields no event, so this is the only sign it is back.
const QUIET_AFTER_ERROR: std::time::Duration = std::time::Duration::from_secs(35);

/// The health of the watches previewd serves from: `/readyz` answers 503 with the reason
/// until every one has listed once, and while one is failing.
#[derive(Clone, Default)]
pub struct Readiness {
    watches: Arc<Mutex<BTreeMap<&'static str, (WatchState, bool)>>>,
}

impl Readiness {
    /// A watch named `name` (`previewlinks`, …), syncing until it reports otherwise.
    pub fn watch(&self, name: &'static str) -> WatchHealth {
        lock(&self.watches).insert(name, (WatchState::Syncing, false));
        WatchHealth {
            name,
            watches: self.watches.clone(),
        }
    }

    /// Ready, or why not.
    pub fn check(&self) -> Result<(), String> {
        let watches = lock(&self.watches);
        let not_ready: Vec<String> = watches
            .iter()
            .filter_map(|(name, (state, synced_once))| match state {
                WatchState::Synced => None,
                WatchState::Failing(_, at) if *synced_once && at.elapsed() > QUIET_AFTER_ERROR => {
                    None
                }
                WatchState::Syncing => Some(format!("the {name} watch has not synced yet")),
                WatchState::Failing(why, _) => Some(format!("the {name} watch is failing: {why}")),
            })
            .collect();
        if not_ready.is_empty() {
            Ok(())
        } else {
            Err(not_ready.join("; "))
        }
    }
}

/// One watch's reports into [`Readiness`].
#[derive(Clone)]
pub struct WatchHealth {
    name: &'static str,
    watches: Arc<Mutex<BTreeMap<&'static str, (WatchState, bool)>>>,
}

impl WatchHealth {
    /// Takes in one item of the watch's stream.
    pub fn observe<K>(&self, item: &Result<Event<K>, watcher::Error>) {
        let mut watches = lock(&self.watches);
        let Some((state, synced_once)) = watches.get_mut(self.name) else {
            return;
        };
        match item {
            Err(e) => *state = WatchState::Failing(e.to_string(), std::time::Instant::now()),
            Ok(Event::InitDone) => {
                *state = WatchState::Synced;
                *synced_once = true;
            }
            // Back after a failure: a watch resumed from where it was is synced again; a
            // re-list is once it is done.
            Ok(Event::Init) => {
                if matches!(state, WatchState::Failing(..)) {
                    *state = WatchState::Syncing;
                }
            }
            Ok(_) => {
                if *synced_once && matches!(state, WatchState::Failing(..)) {
                    *state = WatchState::Synced;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::PreviewLink;

    fn guarded(json: serde_json::Value) -> DeserializeGuard<PreviewLink> {
        serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"))
    }

    fn link(name: &str, ttl: &str) -> DeserializeGuard<PreviewLink> {
        guarded(serde_json::json!({
            "apiVersion": "previewd.dev/v1alpha1", "kind": "PreviewLink",
            "metadata": {"name": name, "namespace": "default", "uid": name, "resourceVersion": "1"},
            "spec": {"target": {"docker": {"container": "c"}}, "port": 80, "ttl": ttl}
        }))
    }

    fn placeholder(metadata: ObjectMeta) -> PreviewLink {
        PreviewLink {
            metadata,
            spec: crate::resources::PreviewLinkSpec::new(crate::resources::Target::docker("x"), 1),
            status: None,
        }
    }

    fn ok_link(name: &str) -> PreviewLink {
        match link(name, "1h").0 {
            Ok(l) => l,
            Err(e) => panic!("{}", e.error),
        }
    }

    /// Applies `event` to the cache's store, as its watch would, and tells the cache.
    fn feed(
        writer: &mut kube::runtime::reflector::store::Writer<PreviewLink>,
        cache: &SharedCache<PreviewLink>,
        event: Event<PreviewLink>,
    ) {
        writer.apply_watcher_event(&event);
        cache.observe(&event);
    }

    async fn next_names(
        triggers: &mut (impl Stream<Item = Result<PreviewLink, watcher::Error>> + Unpin),
        n: usize,
    ) -> Vec<String> {
        let mut names = Vec::new();
        for _ in 0..n {
            let next = tokio::time::timeout(std::time::Duration::from_secs(5), triggers.next())
                .await
                .unwrap_or_else(|_| panic!("no trigger within 5 s after {names:?}"));
            match next {
                Some(Ok(l)) => names.push(l.metadata.name.unwrap_or_default()),
                other => panic!("not a link: {other:?}"),
            }
        }
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_shared_cache_triggers_everything_then_each_change_and_resyncs_a_laggard() {
        let (store, mut writer) = kube::runtime::reflector::store::<PreviewLink>();
        let cache = SharedCache::new(store);
        let mut triggers = Box::pin(cache.triggers());
        // Nothing before the first list is done; then every listed object.
        feed(&mut writer, &cache, Event::Init);
        feed(&mut writer, &cache, Event::InitApply(ok_link("a")));
        feed(&mut writer, &cache, Event::InitApply(ok_link("b")));
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), triggers.next())
                .await
                .is_err(),
            "a trigger before the list was done"
        );
        feed(&mut writer, &cache, Event::InitDone);
        assert_eq!(next_names(&mut triggers, 2).await, ["a", "b"]);
        // Then each change; a deletion triggers nothing.
        feed(&mut writer, &cache, Event::Apply(ok_link("c")));
        feed(&mut writer, &cache, Event::Delete(ok_link("a")));
        feed(&mut writer, &cache, Event::Apply(ok_link("b")));
        assert_eq!(next_names(&mut triggers, 2).await, ["b", "c"]);
        // A reader that fell behind starts over from everything cached.
        for _ in 0..=SHARED_CHANGES {
            cache.observe(&Event::Apply(ok_link("c")));
        }
        assert_eq!(next_names(&mut triggers, 2).await, ["b", "c"]);
        // A reader that starts late (a new leader) begins with everything.
        let mut late = Box::pin(cache.triggers());
        assert_eq!(next_names(&mut late, 2).await, ["b", "c"]);
    }

    #[test]
    fn a_shared_cache_knows_which_objects_do_not_decode() {
        let (store, _writer) = kube::runtime::reflector::store::<PreviewLink>();
        let cache = SharedCache::new(store);
        let note = |e: Event<DeserializeGuard<PreviewLink>>| cache.note(&Ok(e));
        note(Event::Init);
        note(Event::InitApply(link("bad", "banana")));
        assert!(
            !cache.undecodable_in("default"),
            "known before its list was done"
        );
        note(Event::InitDone);
        assert!(cache.undecodable_in("default"));
        assert!(!cache.undecodable_in("other"));
        // Fixed, it is no longer undecodable; broken again, it is; deleted, it is gone.
        note(Event::Apply(link("bad", "1h")));
        assert!(!cache.undecodable_in("default"));
        note(Event::Apply(link("bad", "banana")));
        assert!(cache.undecodable_in("default"));
        note(Event::Delete(link("bad", "banana")));
        assert!(!cache.undecodable_in("default"));
        // A re-list replaces what was known.
        note(Event::Apply(link("bad", "banana")));
        note(Event::Init);
        note(Event::InitDone);
        assert!(!cache.undecodable_in("default"));
    }

    #[tokio::test]
    async fn a_bad_object_is_skipped_once_and_the_rest_flow() {
        let metrics = Metrics::new();
        let undecodable = Undecodable::new(metrics.clone());
        let events = futures::stream::iter(vec![
            Ok(Event::Init),
            Ok(Event::InitApply(link("good", "1h"))),
            Ok(Event::InitApply(link("bad", "banana"))),
            Ok(Event::InitDone),
            Ok(Event::Apply(link("bad", "banana"))),
            Ok(Event::Apply(link("good", "banana"))),
        ]);
        let out: Vec<_> = decoded(events, "PreviewLink", undecodable, placeholder)
            .collect()
            .await;
        let names: Vec<String> = out
            .iter()
            .map(|e| match e {
                Ok(Event::Init) => "init".into(),
                Ok(Event::InitApply(l)) => {
                    format!("+{}", l.metadata.name.clone().unwrap_or_default())
                }
                Ok(Event::InitDone) => "done".into(),
                Ok(Event::Apply(l)) => format!("~{}", l.metadata.name.clone().unwrap_or_default()),
                Ok(Event::Delete(l)) => format!("-{}", l.metadata.name.clone().unwrap_or_default()),
                Err(e) => format!("error {e}"),
            })
            .collect();
        // A link that turns bad leaves the store.
        assert_eq!(names, ["init", "+good", "done", "-bad", "-good"]);
        let text = metrics.render();
        assert!(
            text.contains(r#"previewd_undecodable_objects_total{kind="PreviewLink"} 2"#),
            "each bad version counts once: {text}"
        );
    }

    #[test]
    fn readiness_waits_for_every_sync_and_follows_failures() {
        let r = Readiness::default();
        let links = r.watch("previewlinks");
        let secrets = r.watch("secrets");
        assert!(r.check().is_err());
        links.observe::<PreviewLink>(&Ok(Event::InitDone));
        assert!(r.check().is_err_and(|e| e.contains("secrets")));
        secrets.observe::<PreviewLink>(&Ok(Event::InitDone));
        assert_eq!(r.check(), Ok(()));
        links.observe::<PreviewLink>(&Err(watcher::Error::NoResourceVersion));
        assert!(
            r.check()
                .is_err_and(|e| e.contains("previewlinks watch is failing"))
        );
        links.observe::<PreviewLink>(&Ok(Event::Apply(placeholder(ObjectMeta::default()))));
        assert_eq!(r.check(), Ok(()));
    }
}

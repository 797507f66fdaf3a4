//! The object store: API-server semantics over the state directory.
//!
//! All objects live in memory (the state directory is their durable copy), under one mutex
//! that serializes writes: each write gets the next resourceVersion, is persisted before it
//! is acknowledged, and is appended to a bounded history that watches resume from. The
//! methods are synchronous; the HTTP layer runs writes on the blocking pool.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::disk::{Disk, ObjectKey, OpenError, SkippedFile};
use super::error::StoreError;
use super::fields::{self, Operation};
use super::kinds::Kind;
use super::meta;
use super::patch::Patch;
use super::selector::Selectors;
use super::stored::Stored;
use crate::resources::validation::{self, FieldError};

/// How many changes are kept for watches to resume from; older resourceVersions get 410.
const HISTORY_CAPACITY: usize = 10_000;
/// How many bytes of objects those changes may hold at most (the versions they made and the
/// ones they replaced): a burst of writes (10,000 links created with their Secrets and
/// status) must not keep megabytes of old versions alive. A watcher further behind re-lists,
/// as on an API server whose watch cache moved on.
const HISTORY_BYTES: usize = 8 << 20;
/// How long a change stays in the history beyond the latest [`HISTORY_FLOOR`]: as
/// kube-apiserver's watch cache keeps 75 s of events, so once a burst is over its old
/// versions are let go (the store's memory comes back down) while a watcher that
/// reconnects at once still resumes.
const HISTORY_AGE: Duration = Duration::from_secs(75);
/// How many of the latest changes are kept whatever their age (kube-apiserver's smallest
/// watch cache).
const HISTORY_FLOOR: usize = 100;
/// How many changes a slow watcher may fall behind before its stream is ended (it then
/// resumes from its last resourceVersion, out of the history).
const BROADCAST_CAPACITY: usize = 4_096;

/// What a change did to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeType {
    /// Created.
    Added,
    /// Updated (including a deletion request that left finalizers to run).
    Modified,
    /// Removed.
    Deleted,
}

/// One committed write, as watches see it.
#[derive(Debug)]
pub struct Change {
    /// The resourceVersion the write produced.
    pub revision: u64,
    /// Which object.
    pub key: ObjectKey,
    /// What happened.
    pub change: ChangeType,
    /// The object after the change (for deletions: its final state).
    pub object: Arc<Stored>,
    /// The object before the change, so selector watches can see objects leave their set.
    pub previous: Option<Arc<Stored>>,
}

impl Change {
    /// The bytes of the versions it holds: what keeping it in the history may cost.
    fn size(&self) -> usize {
        self.object.size() + self.previous.as_ref().map_or(0, |p| p.size())
    }
}

/// Where a subresource write goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The object itself: spec and metadata change, status is kept.
    Main,
    /// The `/status` subresource: only status changes.
    Status,
}

/// A page of a list.
#[derive(Debug)]
pub struct ListPage {
    /// Matching objects, sorted by namespace and name.
    pub items: Vec<Arc<Stored>>,
    /// The resourceVersion the list is consistent with; watch from it.
    pub revision: u64,
    /// Token for the next page, when `limit` cut the list short.
    pub continue_token: Option<String>,
    /// How many more objects match beyond this page.
    pub remaining: Option<u64>,
}

/// The beginning of a watch: the events owed so far, and the live feed after them.
pub struct WatchStart {
    /// Events to send first (synthetic ADDEDs, or history after the requested version).
    pub backlog: Vec<Arc<Change>>,
    /// Changes after the backlog.
    pub live: broadcast::Receiver<Arc<Change>>,
    /// The resourceVersion the backlog brings a client up to.
    pub revision: u64,
}

/// What to do with fields the schema does not know (the `fieldValidation` parameter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FieldValidation {
    /// Drop them silently.
    Ignore,
    /// Drop them and report each as a warning (the API server's default).
    #[default]
    Warn,
    /// Refuse the write.
    Strict,
}

impl FieldValidation {
    /// Parses the query parameter; `None` for an unknown value.
    pub fn parse(value: Option<&str>) -> Option<Self> {
        match value {
            None | Some("") | Some("Warn") => Some(FieldValidation::Warn),
            Some("Ignore") => Some(FieldValidation::Ignore),
            Some("Strict") => Some(FieldValidation::Strict),
            Some(_) => None,
        }
    }
}

/// A successful write: the stored object, and warnings for the client (`Warning` headers).
#[derive(Debug)]
pub struct Written {
    /// The object as stored (or as last stored, for a removal).
    pub object: Value,
    /// Unknown fields that were dropped, under `FieldValidation::Warn`.
    pub warnings: Vec<String>,
}

/// Preconditions a DELETE may carry.
#[derive(Clone, Debug, Default)]
pub struct Preconditions {
    /// The object must have this uid.
    pub uid: Option<String>,
    /// The object must have this resourceVersion.
    pub resource_version: Option<String>,
}

struct Inner {
    objects: BTreeMap<ObjectKey, Arc<Stored>>,
    /// Keys whose state file is malformed: never overwritten, reported on access.
    unreadable: HashMap<ObjectKey, SkippedFile>,
    revision: u64,
    /// Changes to resume watches from, with when they were made, oldest first.
    history: VecDeque<(Instant, Arc<Change>)>,
    /// The bytes of the objects `history` holds (see [`HISTORY_BYTES`]).
    history_bytes: usize,
    /// Watches from any resourceVersion ≥ this can be resumed.
    floor: u64,
}

/// The embedded API's object store.
pub struct Store {
    kinds: Vec<Kind>,
    /// What the operator allows beyond an object's own validity (see [`Admission`]).
    admission: Option<Admission>,
    disk: Disk,
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Arc<Change>>,
    /// How many bytes of objects the history may hold ([`HISTORY_BYTES`]; less in tests).
    history_budget: usize,
    skipped: Vec<SkippedFile>,
    closing: tokio::sync::watch::Sender<bool>,
}

impl Store {
    /// Opens and locks a state directory and loads it. Malformed files are logged, kept in
    /// [`Store::skipped`], and left untouched.
    pub fn open(dir: &Path, kinds: Vec<Kind>) -> Result<Store, OpenError> {
        let (disk, loaded) = Disk::open(dir)?;
        let mut revision = loaded.revision;
        let mut objects = BTreeMap::new();
        for (key, obj) in loaded.objects {
            let stored = Stored::encode(&obj).map_err(|e| OpenError::Encode(e.to_string()))?;
            revision = revision.max(stored.revision());
            objects.insert(key, Arc::new(stored));
        }
        for s in &loaded.skipped {
            tracing::warn!(path = %s.path.display(), reason = %s.reason, "skipping unreadable state file (left untouched)");
        }
        let unreadable = loaded
            .skipped
            .iter()
            .filter_map(|s| s.key.clone().map(|k| (k, s.clone())))
            .collect();
        let (changes, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Store {
            kinds,
            admission: None,
            disk,
            inner: Mutex::new(Inner {
                objects,
                unreadable,
                revision,
                history: VecDeque::new(),
                history_bytes: 0,
                floor: revision,
            }),
            changes,
            history_budget: HISTORY_BYTES,
            skipped: loaded.skipped,
            closing: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Checks every create and update with `admission` too.
    pub fn with_admission(mut self, admission: Admission) -> Self {
        self.admission = Some(admission);
        self
    }

    /// Runs the admission check on a write of `next` over `current` (`None` on create).
    fn admit(
        &self,
        kind: &Kind,
        name: &str,
        current: Option<&Value>,
        next: &Value,
    ) -> Result<(), StoreError> {
        let errs = match &self.admission {
            Some(admission) => admission(kind, current, next),
            None => Vec::new(),
        };
        if errs.is_empty() {
            Ok(())
        } else {
            Err(invalid(kind, name, errs))
        }
    }

    /// The kinds this store serves.
    pub fn kinds(&self) -> &[Kind] {
        &self.kinds
    }

    /// The state files skipped at start-up.
    pub fn skipped(&self) -> &[SkippedFile] {
        &self.skipped
    }

    /// Ends every open watch (they close cleanly; clients resume elsewhere or later), so a
    /// shutting-down server is not held open by long-lived streams.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Whether [`Store::close`] was called (the server shuts down).
    pub fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    /// Resolves once [`Store::close`] was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            // An error means the store is gone, which is as closed as it gets.
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    /// The latest resourceVersion.
    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied write (every write is
        // applied to memory only after it is durable), so the data is safe to keep using.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn key(kind: &Kind, namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            resource: kind.resource_name(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    fn not_found(kind: &Kind, name: &str) -> StoreError {
        StoreError::NotFound {
            resource: kind.resource_name(),
            name: name.to_owned(),
        }
    }

    fn check_readable(&self, inner: &Inner, key: &ObjectKey) -> Result<(), StoreError> {
        match inner.unreadable.get(key) {
            Some(s) => Err(StoreError::Unreadable {
                resource: key.resource.clone(),
                name: key.name.clone(),
                path: s.path.display().to_string(),
                reason: s.reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Reads one object.
    pub fn get(&self, kind: &Kind, namespace: &str, name: &str) -> Result<Arc<Stored>, StoreError> {
        let key = Self::key(kind, namespace, name);
        let inner = self.lock();
        self.check_readable(&inner, &key)?;
        inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| Self::not_found(kind, name))
    }

    /// Lists objects of one kind, in one namespace or all (`None`), a page at a time.
    pub fn list(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        selectors: &Selectors,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<ListPage, StoreError> {
        let resource = kind.resource_name();
        let cont = continue_token
            .filter(|t| !t.is_empty())
            .map(ContinueToken::decode)
            .transpose()?;
        let inner = self.lock();
        let revision = cont.as_ref().map_or(inner.revision, |c| c.revision);
        let start = ObjectKey {
            resource: resource.clone(),
            namespace: cont.as_ref().map_or_else(
                || namespace.unwrap_or("").to_owned(),
                |c| c.namespace.clone(),
            ),
            name: cont.as_ref().map_or_else(String::new, |c| c.name.clone()),
        };
        let mut matching = inner
            .objects
            .range(start..)
            .skip_while(|(k, _)| {
                cont.as_ref()
                    .is_some_and(|c| k.namespace == c.namespace && k.name == c.name)
            })
            .take_while(|(k, _)| {
                k.resource == resource && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .filter(|(k, v)| selectors.matches_stored(&k.name, &k.namespace, v));
        let limit = limit.filter(|l| *l > 0);
        let page: Vec<(&ObjectKey, &Arc<Stored>)> = match limit {
            Some(l) => matching.by_ref().take(l).collect(),
            None => matching.by_ref().collect(),
        };
        let remaining = matching.count() as u64;
        let continue_token = match (limit, page.last()) {
            (Some(_), Some((last, _))) if remaining > 0 => Some(
                ContinueToken {
                    revision,
                    namespace: last.namespace.clone(),
                    name: last.name.clone(),
                }
                .encode(),
            ),
            _ => None,
        };
        Ok(ListPage {
            items: page.into_iter().map(|(_, v)| v.clone()).collect(),
            revision,
            remaining: continue_token.as_ref().map(|_| remaining),
            continue_token,
        })
    }

    /// Starts a watch of one kind. `from` is the client's resourceVersion: `None` (or 0)
    /// sends every current object as ADDED first; a version older than the kept history is
    /// [`StoreError::Gone`].
    pub fn watch(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        from: Option<u64>,
    ) -> Result<WatchStart, StoreError> {
        let resource = kind.resource_name();
        let inner = self.lock();
        let live = self.changes.subscribe();
        let backlog = match from.filter(|rv| *rv > 0) {
            None => inner
                .objects
                .iter()
                .filter(|(k, _)| {
                    k.resource == resource && namespace.is_none_or(|ns| k.namespace == ns)
                })
                .map(|(k, v)| {
                    Arc::new(Change {
                        revision: v.revision(),
                        key: k.clone(),
                        change: ChangeType::Added,
                        object: v.clone(),
                        previous: None,
                    })
                })
                .collect(),
            Some(rv) if rv < inner.floor => {
                return Err(StoreError::Gone {
                    requested: rv,
                    oldest: inner.floor,
                });
            }
            Some(rv) => inner
                .history
                .iter()
                .map(|(_, c)| c)
                .filter(|c| c.revision > rv && c.key.resource == resource)
                .cloned()
                .collect(),
        };
        Ok(WatchStart {
            backlog,
            live,
            revision: inner.revision,
        })
    }

    /// Creates an object (`POST` to a collection). `generateName` is honoured; status is
    /// dropped for kinds with a status subresource, as the API server does.
    pub fn create(
        &self,
        kind: &Kind,
        namespace: &str,
        body: Value,
        fields: FieldValidation,
    ) -> Result<Written, StoreError> {
        self.create_owned(kind, namespace, body, fields, None)
    }

    /// Creates an object; an apply that creates records its manager's ownership.
    fn create_owned(
        &self,
        kind: &Kind,
        namespace: &str,
        mut body: Value,
        fields: FieldValidation,
        owner: Option<Owner<'_>>,
    ) -> Result<Written, StoreError> {
        check_type(kind, &body)?;
        let body_ns = meta::namespace(&body).to_owned();
        if !body_ns.is_empty() && body_ns != namespace {
            return Err(StoreError::BadRequest(format!(
                "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({namespace})"
            )));
        }
        let mut name = meta::name(&body).to_owned();
        let generate = meta::str_at(&body, "/metadata/generateName").to_owned();
        if name.is_empty() && !generate.is_empty() {
            name = format!("{generate}{}", meta::name_suffix());
        }
        if name.is_empty() {
            return Err(invalid(
                kind,
                "",
                vec![FieldError::new(
                    "metadata.name",
                    "Required value: name or generateName is required",
                )],
            ));
        }
        if let Err(e) = validation::dns1123_subdomain("metadata.name", &name) {
            return Err(invalid(kind, &name, vec![e]));
        }
        set_type(kind, &mut body);
        if kind.has_status
            && let Some(m) = body.as_object_mut()
        {
            m.remove("status");
        }
        meta::set_meta(&mut body, "name", Some(json!(name)));
        meta::set_meta(
            &mut body,
            "namespace",
            (!namespace.is_empty()).then(|| json!(namespace)),
        );
        meta::set_meta(
            &mut body,
            "uid",
            Some(json!(uuid::Uuid::new_v4().to_string())),
        );
        meta::set_meta(
            &mut body,
            "creationTimestamp",
            Some(json!(meta::now_rfc3339())),
        );
        meta::set_meta(&mut body, "generation", kind.has_status.then(|| json!(1)));
        for server_owned in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            meta::set_meta(&mut body, server_owned, None);
        }
        let warnings = run_validation(kind, &name, &mut body, fields)?;
        self.admit(kind, &name, None, &body)?;
        if let Some(o) = owner {
            let empty = json!({"metadata": {}});
            fields::record(
                &empty,
                &mut body,
                o.manager,
                o.operation,
                o.applied,
                &meta::now_rfc3339(),
            );
        }
        let key = Self::key(kind, namespace, &name);
        let mut inner = self.lock();
        self.check_readable(&inner, &key)?;
        if inner.objects.contains_key(&key) {
            return Err(StoreError::AlreadyExists {
                resource: kind.resource_name(),
                name,
            });
        }
        let object = self.commit(&mut inner, key, Commit::Put(ChangeType::Added, body), None)?;
        Ok(Written { object, warnings })
    }

    /// Replaces an object (`PUT`), with optimistic concurrency on `metadata.resourceVersion`.
    pub fn replace(
        &self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        target: Target,
        body: Value,
        fields: FieldValidation,
    ) -> Result<Written, StoreError> {
        check_type(kind, &body)?;
        if meta::name(&body) != name {
            return Err(StoreError::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta::name(&body)
            )));
        }
        let requested_rv = meta::str_at(&body, "/metadata/resourceVersion").to_owned();
        if requested_rv.is_empty() {
            return Err(invalid(
                kind,
                name,
                vec![FieldError::new(
                    "metadata.resourceVersion",
                    "Invalid value: must be specified for an update",
                )],
            ));
        }
        let key = Self::key(kind, namespace, name);
        let mut inner = self.lock();
        self.check_readable(&inner, &key)?;
        let current = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| Self::not_found(kind, name))?;
        if requested_rv != current.revision().to_string() {
            return Err(modified_conflict(kind, name));
        }
        let current_value = current.value()?;
        let next = compose(kind, &current_value, body, target);
        self.update_locked(
            &mut inner,
            kind,
            key,
            (current, &current_value),
            next,
            (fields, None),
        )
    }

    /// Patches an object. An apply patch creates the object when it does not exist.
    pub fn patch(
        &self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        target: Target,
        patch: &Patch,
        writer: &Writer,
    ) -> Result<Written, StoreError> {
        let fields = writer.validation;
        let key = Self::key(kind, namespace, name);
        let current = {
            let inner = self.lock();
            self.check_readable(&inner, &key)?;
            inner.objects.get(&key).cloned()
        };
        let Some(current) = current else {
            if !patch.creates_missing() || target == Target::Status {
                return Err(Self::not_found(kind, name));
            }
            let mut doc = json!({"metadata": {"name": name}});
            patch.apply_to(&mut doc)?;
            if meta::name(&doc) != name {
                return Err(StoreError::BadRequest(format!(
                    "the name of the object ({}) does not match the name on the URL ({name})",
                    meta::name(&doc)
                )));
            }
            let owner = match patch {
                Patch::Apply(applied) => Some(Owner {
                    manager: &writer.manager,
                    operation: Operation::Apply,
                    applied: Some(applied),
                }),
                _ => None,
            };
            return self.create_owned(kind, namespace, doc, fields, owner);
        };
        let mut latest_value = current.value()?;
        let mut doc = latest_value.clone();
        patch.apply_to(&mut doc)?;
        let mut inner = self.lock();
        // Another writer may have won between the read above and this lock: patch again.
        let latest = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| Self::not_found(kind, name))?;
        if !Arc::ptr_eq(&latest, &current) {
            latest_value = latest.value()?;
            doc = latest_value.clone();
            patch.apply_to(&mut doc)?;
        }
        if meta::str_at(&doc, "/metadata/resourceVersion")
            != meta::str_at(&latest_value, "/metadata/resourceVersion")
        {
            return Err(modified_conflict(kind, name));
        }
        if let Patch::Apply(applied) = patch {
            let conflicts = fields::apply_conflicts(&latest_value, applied, &writer.manager);
            if !conflicts.is_empty() && !writer.force {
                return Err(apply_conflict(kind, name, &conflicts));
            }
            fields::prune_dropped(&latest_value, applied, &writer.manager, &mut doc);
        }
        let next = compose(kind, &latest_value, doc, target);
        let owner = Owner {
            manager: &writer.manager,
            operation: match patch {
                Patch::Apply(_) => Operation::Apply,
                _ => Operation::Update,
            },
            applied: match patch {
                Patch::Apply(a) => Some(a),
                _ => None,
            },
        };
        self.update_locked(
            &mut inner,
            kind,
            key,
            (latest, &latest_value),
            next,
            (fields, Some(owner)),
        )
    }

    /// Deletes an object: with finalizers it only gets a `deletionTimestamp` (and goes once
    /// they are removed); without, it is removed at once. Returns the object's last state.
    pub fn delete(
        &self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        pre: &Preconditions,
    ) -> Result<Written, StoreError> {
        let key = Self::key(kind, namespace, name);
        let mut inner = self.lock();
        self.check_readable(&inner, &key)?;
        let current = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| Self::not_found(kind, name))?;
        let current_value = current.value()?;
        if pre
            .uid
            .as_deref()
            .is_some_and(|u| u != meta::str_at(&current_value, "/metadata/uid"))
        {
            return Err(StoreError::Conflict {
                resource: kind.resource_name(),
                name: name.to_owned(),
                reason: "Precondition failed: UID in precondition does not match the object".into(),
            });
        }
        if pre
            .resource_version
            .as_deref()
            .is_some_and(|rv| rv != meta::str_at(&current_value, "/metadata/resourceVersion"))
        {
            return Err(modified_conflict(kind, name));
        }
        if meta::has_finalizers(&current_value) {
            if meta::is_terminating(&current_value) {
                return Ok(Written {
                    object: current_value,
                    warnings: Vec::new(),
                });
            }
            let mut next = current_value;
            meta::set_meta(
                &mut next,
                "deletionTimestamp",
                Some(json!(meta::now_rfc3339())),
            );
            meta::set_meta(&mut next, "deletionGracePeriodSeconds", Some(json!(0)));
            let object = self.commit(
                &mut inner,
                key,
                Commit::Put(ChangeType::Modified, next),
                Some(current),
            )?;
            return Ok(Written {
                object,
                warnings: Vec::new(),
            });
        }
        let object = self.commit(
            &mut inner,
            key,
            Commit::Remove(current_value),
            Some(current),
        )?;
        Ok(Written {
            object,
            warnings: Vec::new(),
        })
    }

    fn update_locked(
        &self,
        inner: &mut Inner,
        kind: &Kind,
        key: ObjectKey,
        (stored, current): (Arc<Stored>, &Value),
        mut next: Value,
        (fields, owner): (FieldValidation, Option<Owner<'_>>),
    ) -> Result<Written, StoreError> {
        let warnings = run_validation(kind, &key.name, &mut next, fields)?;
        self.admit(kind, &key.name, Some(current), &next)?;
        // Ownership follows what really changed, defaults and pruning included.
        if let Some(o) = owner {
            fields::record(
                current,
                &mut next,
                o.manager,
                o.operation,
                o.applied,
                &meta::now_rfc3339(),
            );
        }
        if meta::is_terminating(current) {
            let added = finalizer_names(&next)
                .into_iter()
                .filter(|f| !finalizer_names(current).contains(f))
                .count();
            if added > 0 {
                return Err(invalid(
                    kind,
                    &key.name,
                    vec![FieldError::new(
                        "metadata.finalizers",
                        "Forbidden: no new finalizers can be added if the object is being deleted",
                    )],
                ));
            }
        }
        if kind.has_status && meta::spec_part(&next) != meta::spec_part(current) {
            let generation = current
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                + 1;
            meta::set_meta(&mut next, "generation", Some(json!(generation)));
        }
        let object = if next == *current {
            next
        } else if meta::is_terminating(&next) && !meta::has_finalizers(&next) {
            self.commit(inner, key, Commit::Remove(next), Some(stored))?
        } else {
            self.commit(
                inner,
                key,
                Commit::Put(ChangeType::Modified, next),
                Some(stored),
            )?
        };
        Ok(Written { object, warnings })
    }

    /// Persists a change, then applies it to memory, the history and live watches.
    /// `previous` is the version the change replaces (none for a creation).
    fn commit(
        &self,
        inner: &mut Inner,
        key: ObjectKey,
        write: Commit,
        previous: Option<Arc<Stored>>,
    ) -> Result<Value, StoreError> {
        let revision = inner.revision + 1;
        let rv = Some(json!(revision.to_string()));
        let (change, object, stored) = match write {
            Commit::Put(change, mut obj) => {
                meta::set_meta(&mut obj, "resourceVersion", rv);
                let stored = Arc::new(Stored::encode(&obj)?);
                let yaml = serde_yaml::to_string(&obj).map_err(StoreError::Encode)?;
                self.disk
                    .write(&key, yaml.as_bytes())
                    .map_err(StoreError::Storage)?;
                inner.objects.insert(key.clone(), stored.clone());
                (change, obj, stored)
            }
            Commit::Remove(mut last) => {
                meta::set_meta(&mut last, "resourceVersion", rv);
                let stored = Arc::new(Stored::encode(&last)?);
                // Record the counter first: the deleted object may have held the highest version.
                self.disk
                    .write_revision(revision)
                    .map_err(StoreError::Storage)?;
                self.disk.remove(&key).map_err(StoreError::Storage)?;
                inner.objects.remove(&key);
                (ChangeType::Deleted, last, stored)
            }
        };
        inner.revision = revision;
        let record = Arc::new(Change {
            revision,
            key,
            change,
            object: stored,
            previous,
        });
        inner.history_bytes += record.size();
        let now = Instant::now();
        inner.history.push_back((now, record.clone()));
        self.let_history_go(inner, now);
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(record);
        Ok(object)
    }

    /// Lets go of the changes the history no longer keeps: beyond [`HISTORY_CAPACITY`] or
    /// the byte budget, and those older than [`HISTORY_AGE`] beyond the latest
    /// [`HISTORY_FLOOR`]. Watches from before what is left get 410 and re-list.
    fn let_history_go(&self, inner: &mut Inner, now: Instant) {
        while let Some((at, oldest)) = inner.history.front() {
            let over = inner.history.len() > HISTORY_CAPACITY
                || inner.history_bytes > self.history_budget
                || (inner.history.len() > HISTORY_FLOOR
                    && now.saturating_duration_since(*at) > HISTORY_AGE);
            if !over {
                break;
            }
            inner.history_bytes -= oldest.size();
            inner.floor = oldest.revision;
            inner.history.pop_front();
        }
        if inner.history.capacity() > 4 * inner.history.len().max(HISTORY_FLOOR) {
            inner.history.shrink_to(inner.history.len());
        }
    }

    /// Lets go of history that aged out while nothing was written (see
    /// [`Store::let_history_go`]); called periodically, so memory comes back down after a
    /// burst even when no write follows.
    pub fn prune_history(&self) {
        let mut inner = self.lock();
        self.let_history_go(&mut inner, Instant::now());
    }
}

/// What a commit does to an object.
enum Commit {
    /// Stores this version (created or modified).
    Put(ChangeType, Value),
    /// Removes the object, whose final state this is.
    Remove(Value),
}

fn finalizer_names(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|f| {
            f.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn invalid(kind: &Kind, name: &str, causes: Vec<FieldError>) -> StoreError {
    StoreError::Invalid {
        kind: kind.kind.to_owned(),
        group: kind.group.to_owned(),
        name: name.to_owned(),
        causes,
    }
}

fn modified_conflict(kind: &Kind, name: &str) -> StoreError {
    StoreError::Conflict {
        resource: kind.resource_name(),
        name: name.to_owned(),
        reason: "the object has been modified; please apply your changes to the latest version and try again".into(),
    }
}

/// A check of a write (`current` is `None` on create) against what the server's operator
/// allows, as an admission webhook would: it refuses with field errors (422). Unlike
/// validation it depends on the server's configuration, so it judges only what a write
/// changes, and an object admitted once can still have its status and finalizers written.
pub type Admission =
    std::sync::Arc<dyn Fn(&Kind, Option<&Value>, &Value) -> Vec<FieldError> + Send + Sync>;

/// Normalizes and validates `obj`; returns the unknown fields that were dropped, or refuses
/// them under [`FieldValidation::Strict`].
fn run_validation(
    kind: &Kind,
    name: &str,
    obj: &mut Value,
    fields: FieldValidation,
) -> Result<Vec<String>, StoreError> {
    let Some(validate) = kind.validate else {
        return Ok(Vec::new());
    };
    let before = obj.clone();
    let errs = validate(obj);
    if !errs.is_empty() {
        return Err(invalid(kind, name, errs));
    }
    let mut unknown = Vec::new();
    dropped_fields(&before, obj, "", &mut unknown);
    let warnings: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    match fields {
        FieldValidation::Strict if !warnings.is_empty() => Err(StoreError::BadRequest(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
            warnings.join(", "),
            kind = kind.kind,
            version = kind.version
        ))),
        FieldValidation::Ignore => Ok(Vec::new()),
        _ => Ok(warnings),
    }
}

/// Collects the paths present in `before` but pruned from `after` (outside `metadata`).
fn dropped_fields(before: &Value, after: &Value, prefix: &str, out: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (k, bv) in b {
                if prefix.is_empty() && k == "metadata" {
                    continue;
                }
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match a.get(k) {
                    None if !bv.is_null() => out.push(path),
                    Some(av) => dropped_fields(bv, av, &path, out),
                    None => {}
                }
            }
        }
        (Value::Array(b), Value::Array(a)) if a.len() == b.len() => {
            for (i, (bv, av)) in b.iter().zip(a).enumerate() {
                dropped_fields(bv, av, &format!("{prefix}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Refuses a body whose `apiVersion`/`kind` name another type; both may be omitted.
fn check_type(kind: &Kind, body: &Value) -> Result<(), StoreError> {
    if !body.is_object() {
        return Err(StoreError::BadRequest(
            "the request body must be a JSON or YAML object".into(),
        ));
    }
    let api_version = meta::str_at(body, "/apiVersion");
    let k = meta::str_at(body, "/kind");
    if (!api_version.is_empty() && api_version != kind.api_version())
        || (!k.is_empty() && k != kind.kind)
    {
        return Err(StoreError::BadRequest(format!(
            "the body is a {k} of {api_version}, but the URL is for {} of {}",
            kind.kind,
            kind.api_version()
        )));
    }
    Ok(())
}

fn set_type(kind: &Kind, obj: &mut Value) {
    if let Some(m) = obj.as_object_mut() {
        m.insert("apiVersion".into(), json!(kind.api_version()));
        m.insert("kind".into(), json!(kind.kind));
    }
}

/// The object a write produces: for the main resource, the body with server-owned metadata
/// (and status, when a subresource owns it) kept from `current`; for `/status`, `current`
/// with only the body's status.
/// Who writes a patch and how strictly it is checked (`?fieldManager=`, `?force=`,
/// `?fieldValidation=`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Writer {
    /// The field manager's name.
    pub manager: String,
    /// Whether an apply takes fields other managers own instead of conflicting.
    pub force: bool,
    /// What unknown fields do.
    pub validation: FieldValidation,
}

impl Default for Writer {
    fn default() -> Self {
        Writer {
            manager: "unknown".into(),
            force: false,
            validation: FieldValidation::Strict,
        }
    }
}

/// A patch's writer, for the ownership it records.
struct Owner<'a> {
    manager: &'a str,
    operation: Operation,
    applied: Option<&'a Value>,
}

/// The API server's refusal of an apply that would change fields other managers own.
fn apply_conflict(kind: &Kind, name: &str, conflicts: &[(String, String)]) -> StoreError {
    let list: Vec<String> = conflicts
        .iter()
        .map(|(manager, path)| format!("conflict with \"{manager}\": {path}"))
        .collect();
    StoreError::Conflict {
        resource: kind.resource_name(),
        name: name.to_owned(),
        reason: format!(
            "Apply failed with {} conflict{}: {}",
            conflicts.len(),
            if conflicts.len() == 1 { "" } else { "s" },
            list.join(", ")
        ),
    }
}

fn compose(kind: &Kind, current: &Value, body: Value, target: Target) -> Value {
    match target {
        Target::Status => {
            let mut next = current.clone();
            if let Some(m) = next.as_object_mut() {
                match body.get("status") {
                    Some(s) if !s.is_null() => m.insert("status".into(), s.clone()),
                    _ => m.remove("status"),
                };
            }
            next
        }
        Target::Main => {
            let mut next = body;
            set_type(kind, &mut next);
            for field in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "resourceVersion",
            ] {
                meta::set_meta(
                    &mut next,
                    field,
                    current.pointer(&format!("/metadata/{field}")).cloned(),
                );
            }
            if kind.has_status
                && let Some(m) = next.as_object_mut()
            {
                match current.get("status") {
                    Some(s) => m.insert("status".into(), s.clone()),
                    None => m.remove("status"),
                };
            }
            next
        }
    }
}

/// Where the next page of a list starts, opaque to clients.
#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    #[serde(rename = "rv")]
    revision: u64,
    #[serde(rename = "ns")]
    namespace: String,
    #[serde(rename = "n")]
    name: String,
}

impl ContinueToken {
    fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(token: &str) -> Result<Self, StoreError> {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| StoreError::BadRequest(format!("invalid continue token {token:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kinds;
    use serde_json::json;

    fn kind(plural: &str) -> Kind {
        kinds::all()
            .into_iter()
            .find(|k| k.plural == plural)
            .unwrap_or_else(|| panic!("no kind {plural}"))
    }

    fn link(name: &str, port: i64) -> Value {
        json!({
            "apiVersion": "previewd.dev/v1alpha1", "kind": "PreviewLink",
            "metadata": {"name": name},
            "spec": {"target": {"docker": {"container": "web"}}, "port": port}
        })
    }

    fn open(dir: &Path) -> Store {
        Store::open(dir, kinds::all()).unwrap_or_else(|e| panic!("open: {e}"))
    }

    fn ok<T>(r: Result<T, StoreError>) -> T {
        r.unwrap_or_else(|e| panic!("unexpected error: {e}"))
    }

    #[test]
    fn create_sets_server_fields_and_generate_name() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = open(dir.path());
        let pl = kind("previewlinks");
        let mut body = link("", 80);
        body["metadata"] = json!({"generateName": "web-"});
        body["status"] = json!({"phase": "Ready"});
        let created = ok(store.create(&pl, "default", body, FieldValidation::Strict)).object;
        let name = meta::name(&created);
        assert!(name.starts_with("web-") && name.len() == 9, "{name}");
        assert_eq!(created["metadata"]["generation"], 1);
        assert_eq!(created["metadata"]["resourceVersion"], "1");
        assert!(
            created["metadata"]["uid"]
                .as_str()
                .is_some_and(|u| u.len() == 36)
        );
        assert!(
            created.get("status").is_none(),
            "status is dropped on create"
        );
        assert!(matches!(
            store.create(&pl, "default", link(name, 80), FieldValidation::Strict),
            Err(StoreError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn applies_by_two_managers_conflict_unless_forced() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = open(dir.path());
        let leases = kind("leases");
        // `who` applies a Lease naming itself as the holder.
        let apply = |who: &str, force: bool| {
            let hold = Patch::Apply(json!({"apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease", "spec": {"holderIdentity": who}}));
            let writer = Writer {
                manager: who.into(),
                force,
                ..Writer::default()
            };
            store.patch(&leases, "default", "l", Target::Main, &hold, &writer)
        };
        let created = ok(apply("a", false));
        assert_eq!(created.object["spec"]["holderIdentity"], "a");
        match apply("b", false) {
            Err(StoreError::Conflict { reason, .. }) => {
                assert!(
                    reason.contains(r#"conflict with "a": .spec.holderIdentity"#),
                    "{reason}"
                );
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        // Re-applying its own value is fine; forcing takes the field over.
        ok(apply("a", false));
        let forced = ok(apply("b", true));
        assert_eq!(forced.object["spec"]["holderIdentity"], "b");
        assert!(apply("a", false).is_err());
    }

    #[test]
    fn generation_tracks_spec_and_status_goes_through_its_subresource() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = open(dir.path());
        let pl = kind("previewlinks");
        ok(store.create(&pl, "default", link("a", 80), FieldValidation::Strict));
        let status = Patch::Merge(json!({"status": {"phase": "Ready"}, "spec": {"port": 99}}));
        let after_status = ok(store.patch(
            &pl,
            "default",
            "a",
            Target::Status,
            &status,
            &Writer::default(),
        ))
        .object;
        assert_eq!(after_status["status"]["phase"], "Ready");
        assert_eq!(
            after_status["spec"]["port"], 80,
            "a status write does not touch spec"
        );
        assert_eq!(after_status["metadata"]["generation"], 1);
        let spec = Patch::Merge(json!({"spec": {"port": 81}, "status": {"phase": "Failed"}}));
        let after_spec =
            ok(store.patch(&pl, "default", "a", Target::Main, &spec, &Writer::default())).object;
        assert_eq!(after_spec["metadata"]["generation"], 2);
        assert_eq!(
            after_spec["status"]["phase"], "Ready",
            "a spec write does not touch status"
        );
        let label = Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}}));
        let after_label = ok(store.patch(
            &pl,
            "default",
            "a",
            Target::Main,
            &label,
            &Writer::default(),
        ))
        .object;
        assert_eq!(
            after_label["metadata"]["generation"], 2,
            "metadata changes do not bump generation"
        );
    }

    #[test]
    fn no_op_writes_keep_the_resource_version_and_emit_nothing() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = open(dir.path());
        let pl = kind("previewlinks");
        let created =
            ok(store.create(&pl, "default", link("a", 80), FieldValidation::Strict)).object;
        let mut w = ok(store.watch(&pl, None, Some(store.revision())));
        let same = Patch::Merge(json!({"spec": {"port": 80}}));
        let after =
            ok(store.patch(&pl, "default", "a", Target::Main, &same, &Writer::default())).object;
        assert_eq!(
            after["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
        let replaced = ok(store.replace(
            &pl,
            "default",
            "a",
            Target::Main,
            created.clone(),
            FieldValidation::Strict,
        ))
        .object;
        assert_eq!(replaced, created);
        assert!(w.live.try_recv().is_err(), "no watch event for a no-op");
        assert_eq!(store.revision(), 1);
    }

    #[test]
    fn stale_resource_versions_conflict() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = open(dir.path());
        let pl = kind("previewlinks");
        let v1 = ok(store.create(&pl, "default", link("a", 80), FieldValidation::Strict)).object;
        let mut v2 = v1.clone();
        v2["spec"]["port"] = json!(81);
        ok(store.replace(
            &pl,
            "default",
            "a",
            Target::Main,
            v2,
            FieldValidation::Strict,
        ));
        let mut stale = v1.clone();
        stale["spec"]["port"] = json!(82);
        assert!(matches!(
            store.replace(
                &pl,
                "default",
                "a",
                Target::Main,
                stale,
                FieldValidation::Strict
            ),
            Err(StoreError::Conflict { .. })
        ));
        let stale_patch =
            Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "spec": {"port": 83}}));
        assert!(matches!(
            store.patch(
                &pl,
                "default",
                "a",
                Target::Main,
                &stale_patch,
                &Writer::default()
            ),
            Err(StoreError::Conflict { .. })
        ));
    }

    #[test]
    fn deletion_waits_for_finalizers() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = open(dir.path());
        let pl = kind("previewlinks");
        let mut body = link("a", 80);
        body["metadata"]["finalizers"] = json!(["previewd.dev/cleanup"]);
        ok(store.create(&pl, "default", body, FieldValidation::Strict));
        let terminating = ok(store.delete(&pl, "default", "a", &Preconditions::default())).object;
        assert!(meta::is_terminating(&terminating));
        assert!(
            store.get(&pl, "default", "a").is_ok(),
            "still there while a finalizer remains"
        );
        let add =
            Patch::Merge(json!({"metadata": {"finalizers": ["previewd.dev/cleanup", "other"]}}));
        assert!(matches!(
            store.patch(&pl, "default", "a", Target::Main, &add, &Writer::default()),
            Err(StoreError::Invalid { .. })
        ));
        let remove = Patch::Json(
            serde_json::from_value(json!([{"op": "remove", "path": "/metadata/finalizers/0"}]))
                .unwrap_or_else(|e| panic!("{e}")),
        );
        ok(store.patch(
            &pl,
            "default",
            "a",
            Target::Main,
            &remove,
            &Writer::default(),
        ));
        assert!(matches!(
            store.get(&pl, "default", "a"),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn watches_resume_from_history_and_too_old_versions_are_gone() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pl = kind("previewlinks");
        {
            let store = open(dir.path());
            for (i, n) in ["a", "b", "c"].iter().enumerate() {
                ok(store.create(
                    &pl,
                    "default",
                    link(n, 80 + i as i64),
                    FieldValidation::Strict,
                ));
            }
            let w = ok(store.watch(&pl, None, Some(1)));
            let revs: Vec<u64> = w.backlog.iter().map(|c| c.revision).collect();
            assert_eq!(revs, [2, 3]);
            let fresh = ok(store.watch(&pl, Some("default"), None));
            assert_eq!(
                fresh.backlog.len(),
                3,
                "a watch without a version starts with every object"
            );
            ok(store.delete(&pl, "default", "c", &Preconditions::default()));
        }
        let store = open(dir.path());
        assert_eq!(
            store.revision(),
            4,
            "the deleted object's version is not reused after a restart"
        );
        assert!(matches!(
            store.watch(&pl, None, Some(2)),
            Err(StoreError::Gone { .. })
        ));
        assert!(
            store.watch(&pl, None, Some(4)).is_ok(),
            "watching from the current version resumes"
        );
        let created =
            ok(store.create(&pl, "default", link("d", 80), FieldValidation::Strict)).object;
        assert_eq!(created["metadata"]["resourceVersion"], "5");
        assert_eq!(
            ok(ok(store.get(&pl, "default", "a")).value())["metadata"]["resourceVersion"],
            "1",
            "versions survive restarts"
        );
    }

    #[test]
    fn the_history_holds_a_bounded_number_of_bytes() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pl = kind("previewlinks");
        let mut store = open(dir.path());
        ok(store.create(&pl, "default", link("a", 80), FieldValidation::Strict));
        let patch = |port: i64| Patch::Merge(json!({"spec": {"port": port}}));
        let patched = ok(store.patch(
            &pl,
            "default",
            "a",
            Target::Main,
            &patch(81),
            &Writer::default(),
        ));
        // Room for about four patches: each keeps the version it made and the one before.
        let size = ok(Stored::encode(&patched.object)).size();
        store.history_budget = size * 8 + size / 2;
        for port in 82..90 {
            ok(store.patch(
                &pl,
                "default",
                "a",
                Target::Main,
                &patch(port),
                &Writer::default(),
            ));
        }
        let latest = store.revision();
        assert_eq!(latest, 10);
        let oldest_kept = latest - 3;
        assert!(
            matches!(
                store.watch(&pl, None, Some(oldest_kept - 2)),
                Err(StoreError::Gone { .. })
            ),
            "a version whose successors left the history is gone"
        );
        let resumed = ok(store.watch(&pl, None, Some(oldest_kept - 1)));
        let revs: Vec<u64> = resumed.backlog.iter().map(|c| c.revision).collect();
        assert_eq!(revs, (oldest_kept..=latest).collect::<Vec<_>>());
        // Deleting releases the history too: it keeps the removal and what fits before it.
        ok(store.delete(&pl, "default", "a", &Preconditions::default()));
        assert!(store.lock().history_bytes <= store.history_budget);
    }

    #[test]
    fn the_history_lets_old_changes_go_but_keeps_the_latest() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pl = kind("previewlinks");
        let store = open(dir.path());
        let burst = HISTORY_FLOOR as u64 + 50;
        for n in 0..burst {
            ok(store.create(
                &pl,
                "default",
                link(&format!("l{n}"), 80),
                FieldValidation::Strict,
            ));
        }
        let aged = |after: Duration| {
            let mut inner = store.lock();
            store.let_history_go(&mut inner, Instant::now() + after);
            (inner.history.len(), inner.floor)
        };
        assert_eq!(
            aged(HISTORY_AGE / 2),
            (burst as usize, 0),
            "all still fresh"
        );
        assert_eq!(
            aged(HISTORY_AGE + Duration::from_secs(1)),
            (HISTORY_FLOOR, burst - HISTORY_FLOOR as u64),
            "only the latest are kept once the burst is old"
        );
        assert!(matches!(
            store.watch(&pl, None, Some(10)),
            Err(StoreError::Gone { .. })
        ));
        let resumed = ok(store.watch(&pl, None, Some(burst - 10)));
        assert_eq!(resumed.backlog.len(), 10);
    }

    #[test]
    fn lists_page_with_continue_tokens_and_filter_by_namespace() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = open(dir.path());
        let pl = kind("previewlinks");
        for n in ["a", "b", "c", "d", "e"] {
            ok(store.create(&pl, "default", link(n, 80), FieldValidation::Strict));
        }
        ok(store.create(&pl, "other", link("z", 80), FieldValidation::Strict));
        let all = Selectors::default();
        let p1 = ok(store.list(&pl, Some("default"), &all, Some(2), None));
        assert_eq!(p1.items.len(), 2);
        assert_eq!(p1.remaining, Some(3));
        let p2 = ok(store.list(
            &pl,
            Some("default"),
            &all,
            Some(2),
            p1.continue_token.as_deref(),
        ));
        let p3 = ok(store.list(
            &pl,
            Some("default"),
            &all,
            Some(2),
            p2.continue_token.as_deref(),
        ));
        let names: Vec<String> = p1
            .items
            .iter()
            .chain(&p2.items)
            .chain(&p3.items)
            .map(|o| meta::name(&ok(o.value())).to_owned())
            .collect();
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
        assert!(p3.continue_token.is_none());
        assert_eq!(ok(store.list(&pl, None, &all, None, None)).items.len(), 6);
        assert!(matches!(
            store.list(&pl, None, &all, Some(1), Some("garbage")),
            Err(StoreError::BadRequest(_))
        ));
    }

    #[test]
    fn unknown_fields_warn_or_refuse() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = open(dir.path());
        let pl = kind("previewlinks");
        let mut body = link("a", 80);
        body["spec"]["bogus"] = json!(1);
        assert!(
            matches!(store.create(&pl, "default", body.clone(), FieldValidation::Strict), Err(StoreError::BadRequest(m)) if m.contains("unknown field \"spec.bogus\""))
        );
        let written = ok(store.create(&pl, "default", body, FieldValidation::Warn));
        assert_eq!(written.warnings, ["unknown field \"spec.bogus\""]);
        assert!(written.object["spec"].get("bogus").is_none());
    }

    #[test]
    fn malformed_files_block_their_name_and_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("objects/previewlinks.previewd.dev/default");
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(path.join("broken.yaml"), "spec: [").unwrap_or_else(|e| panic!("{e}"));
        let store = open(dir.path());
        let pl = kind("previewlinks");
        assert_eq!(store.skipped().len(), 1);
        assert!(matches!(
            store.create(&pl, "default", link("broken", 80), FieldValidation::Strict),
            Err(StoreError::Unreadable { .. })
        ));
        assert!(matches!(
            store.get(&pl, "default", "broken"),
            Err(StoreError::Unreadable { .. })
        ));
        assert_eq!(
            std::fs::read_to_string(path.join("broken.yaml")).unwrap_or_default(),
            "spec: ["
        );
    }
}

//! Which links use a shared injection: what keeps it alive, and whom its changes concern.
//!
//! Links once listed themselves in their shared DaemonInjection's `ownerReferences`, so
//! every link added to or removed from a container rewrote a list that grows with the
//! container's links (and the object, and every watch event of it). Now the injection has no
//! owners: the link controller keeps this index of the links that use each injection, from
//! what it reconciles, and asks the links' cache (every link the API has) before it lets
//! the last one's injection go. Adding a link costs the same whether its container has one
//! link or a thousand.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};

use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

use super::link::injection_name_for;
use crate::resources::PreviewLink;
use crate::watching::SharedCache;

/// A shared injection: its namespace and name.
type InjectionKey = (String, String);

/// Whether `store` has been filled by its first list (it only ever is once).
fn synced(store: &Store<PreviewLink>) -> bool {
    use futures::FutureExt;
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

/// The links using each shared injection.
#[derive(Default)]
pub struct Users {
    index: Mutex<HashMap<InjectionKey, HashSet<String>>>,
    /// The links' cache, once the link controller runs.
    cache: OnceLock<SharedCache<PreviewLink>>,
}

fn injection_of(link: &PreviewLink) -> InjectionKey {
    (
        link.namespace().unwrap_or_default(),
        injection_name_for(&link.spec.target),
    )
}

impl Users {
    /// Lets the index ask the links' `cache` (every link the API holds).
    pub fn attach(&self, cache: SharedCache<PreviewLink>) {
        let _ = self.cache.set(cache);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InjectionKey, HashSet<String>>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `link` uses its target's shared injection.
    pub fn uses(&self, link: &PreviewLink) {
        self.lock()
            .entry(injection_of(link))
            .or_default()
            .insert(link.name_any());
    }

    /// `link` is gone. Returns whether no other link uses its injection: what the index
    /// knows, confirmed against the store (which also holds links not reconciled yet, e.g.
    /// right after a restart). `false` while the store has not listed yet.
    pub fn leaves(&self, link: &PreviewLink) -> bool {
        let key = injection_of(link);
        let name = link.name_any();
        {
            let mut index = self.lock();
            if let Some(users) = index.get_mut(&key) {
                users.remove(&name);
                if !users.is_empty() {
                    return false;
                }
                index.remove(&key);
            }
        }
        let Some(cache) = self.cache.get().filter(|c| synced(c.store())) else {
            return false;
        };
        // A link that does not decode may still mean this injection: keep it.
        !cache.undecodable_in(&key.0)
            && cache
                .store()
                .find(|l| {
                    l.name_any() != name
                        && l.metadata.deletion_timestamp.is_none()
                        && injection_of(l) == key
                })
                .is_none()
    }

    /// The links to reconcile when the shared injection `namespace/name` changes.
    pub fn of(&self, namespace: &str, name: &str) -> Vec<ObjectRef<PreviewLink>> {
        self.lock()
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|users| {
                users
                    .iter()
                    .map(|l| ObjectRef::new(l).within(namespace))
                    .collect()
            })
            .unwrap_or_default()
    }
}

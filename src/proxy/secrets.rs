//! The values the proxy reads from previewd's Secrets: an agent's secret (to open its
//! tunnel) and a link's capability (to admit its capability host).
//!
//! The proxy watches one Secret per token link. A reflector store of them held each as a
//! whole decoded `Secret` (metadata, a B-tree of data): about 2 KB a link, the largest cache
//! in the process at 10,000 links. This keeps only the two values it reads, by namespace and
//! name, filled from the same watch events a reflector would apply.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher::Event;

use crate::controller::injection::SECRET_KEY as AGENT_SECRET_KEY;
use crate::controller::shared::secret_str;
use crate::resources::capability;
use crate::watching::Listed;

/// What the proxy reads of one Secret.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Values {
    agent: Option<Arc<str>>,
    capability: Option<Arc<str>>,
}

impl Values {
    fn of(secret: &Secret) -> Self {
        let value = |key| secret_str(secret, key).map(Arc::from);
        Values {
            agent: value(AGENT_SECRET_KEY),
            capability: value(capability::KEY),
        }
    }
}

/// Secrets by namespace, then name (looked up by `&str`, with no key to build).
type ByName = HashMap<String, HashMap<String, Values>>;

/// The agent secrets and capabilities of previewd's Secrets, shared by the proxy's workers.
#[derive(Clone, Default)]
pub struct SecretValues {
    index: Arc<RwLock<Listed<ByName>>>,
}

fn insert(map: &mut ByName, secret: &Secret) {
    let (Some(ns), Some(name)) = (&secret.metadata.namespace, &secret.metadata.name) else {
        return;
    };
    map.entry(ns.clone())
        .or_default()
        .insert(name.clone(), Values::of(secret));
}

fn remove(map: &mut ByName, secret: &Secret) {
    let meta = &secret.metadata;
    let ns = meta.namespace.as_deref().unwrap_or_default();
    if let Some(names) = map.get_mut(ns) {
        names.remove(meta.name.as_deref().unwrap_or_default());
        if names.is_empty() {
            map.remove(ns);
        }
    }
}

impl SecretValues {
    /// Applies one event of the Secrets' watch.
    pub fn observe(&self, event: &Event<Secret>) {
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        index.apply(event, insert, remove);
    }

    fn read<T>(&self, ns: &str, name: &str, f: impl FnOnce(&Values) -> Option<T>) -> Option<T> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        index.now().get(ns)?.get(name).and_then(f)
    }

    /// The agent secret held by the Secret `ns/name`.
    pub fn agent(&self, ns: &str, name: &str) -> Option<Arc<str>> {
        self.read(ns, name, |v| v.agent.clone())
    }

    /// The link capability held by the Secret `ns/name`.
    pub fn capability(&self, ns: &str, name: &str) -> Option<Arc<str>> {
        self.read(ns, name, |v| v.capability.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("default".into());
        s.data = Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        );
        s
    }

    #[test]
    fn keeps_what_the_proxy_reads_and_follows_the_watch() {
        let values = SecretValues::default();
        let agent = secret("a", &[(AGENT_SECRET_KEY, "s3cret")]);
        let link = secret("l", &[("token", "t"), (capability::KEY, "cap")]);
        values.observe(&Event::Init);
        values.observe(&Event::InitApply(agent.clone()));
        values.observe(&Event::InitApply(link.clone()));
        assert_eq!(
            values.agent("default", "a"),
            None,
            "known before the list was done"
        );
        values.observe(&Event::InitDone);
        assert_eq!(values.agent("default", "a").as_deref(), Some("s3cret"));
        assert_eq!(values.capability("default", "l").as_deref(), Some("cap"));
        assert_eq!(values.agent("default", "l"), None);
        assert_eq!(values.capability("other", "l"), None);
        // A rotated secret replaces the value; a deleted one is gone.
        values.observe(&Event::Apply(secret("a", &[(AGENT_SECRET_KEY, "new")])));
        assert_eq!(values.agent("default", "a").as_deref(), Some("new"));
        values.observe(&Event::Delete(link));
        assert_eq!(values.capability("default", "l"), None);
        // A re-list replaces everything known.
        values.observe(&Event::Init);
        values.observe(&Event::InitDone);
        assert_eq!(values.agent("default", "a"), None);
    }
}

//! How the store keeps an object in memory: its JSON encoding, once.
//!
//! A `serde_json::Value` tree costs many times its encoding (every map is a B-tree of boxed
//! keys and 32-byte values; 10,000 token links grew previewd's RSS by 312 MiB with objects
//! kept as trees, 110 MiB with them kept as bytes: `bench/scale.sh`), and lists and watches
//! serialize every object they send anyway. So the store keeps the bytes: reads send them
//! as they are, and writes decode the one object they change.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::error::StoreError;
use super::meta;

/// One version of an object, encoded as JSON.
#[derive(Debug, PartialEq, Eq)]
pub struct Stored {
    json: Box<[u8]>,
    revision: u64,
}

impl Stored {
    /// Encodes `obj` (its `metadata.resourceVersion` is read once, here).
    pub fn encode(obj: &Value) -> Result<Stored, StoreError> {
        let json = serde_json::to_vec(obj).map_err(StoreError::Json)?;
        Ok(Stored {
            json: json.into_boxed_slice(),
            revision: meta::resource_version(obj),
        })
    }

    /// The object's JSON, to send as it is.
    pub fn json(&self) -> &[u8] {
        &self.json
    }

    /// The object, decoded (for a write, a table, or a test).
    pub fn value(&self) -> Result<Value, StoreError> {
        serde_json::from_slice(&self.json).map_err(StoreError::Json)
    }

    /// The object's resourceVersion.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The object's labels, for label selectors (decoded from the bytes: only selector
    /// watches and lists ask, and keeping them decoded beside every object would cost more
    /// than the object).
    pub fn labels(&self) -> BTreeMap<String, String> {
        #[derive(Deserialize, Default)]
        struct Meta {
            #[serde(default)]
            labels: Option<BTreeMap<String, String>>,
        }
        #[derive(Deserialize)]
        struct Object {
            #[serde(default)]
            metadata: Option<Meta>,
        }
        serde_json::from_slice::<Object>(&self.json)
            .ok()
            .and_then(|o| o.metadata)
            .and_then(|m| m.labels)
            .unwrap_or_default()
    }

    /// How many bytes the object holds (for the watch history's budget).
    pub fn size(&self) -> usize {
        self.json.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_and_reads_its_version_and_labels() {
        let obj = json!({
            "metadata": {"name": "a", "resourceVersion": "42", "labels": {"app": "web", "n": "1"}},
            "spec": {"port": 8080, "ratio": 0.5, "list": [1, "two", null]}
        });
        let stored = Stored::encode(&obj).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stored.value().ok(), Some(obj));
        assert_eq!(stored.revision(), 42);
        assert_eq!(
            stored.labels(),
            BTreeMap::from([("app".into(), "web".into()), ("n".into(), "1".into())])
        );
        assert_eq!(stored.size(), stored.json().len());
    }

    #[test]
    fn objects_without_labels_or_metadata_have_none() {
        for obj in [
            json!({}),
            json!({"metadata": {}}),
            json!({"metadata": {"labels": null}}),
        ] {
            let stored = Stored::encode(&obj).unwrap_or_else(|e| panic!("{e}"));
            assert!(stored.labels().is_empty(), "{obj}");
        }
    }
}

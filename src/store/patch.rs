//! PATCH bodies as the API server applies them.

use serde_json::Value;

use super::error::StoreError;
use super::media::MediaType;

/// The patch types the API accepts, by `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json` (RFC 7386); also used for strategic merge patches,
    /// which for these resources (no merge keys) behave the same.
    Merge,
    /// `application/json-patch+json` (RFC 6902).
    Json,
    /// `application/apply-patch+yaml`: server-side apply, approximated as a merge for a
    /// single field manager. It creates the object when it does not exist.
    Apply,
}

impl PatchKind {
    /// The patch kind a body's media type names; `None` for media types that are no patch.
    pub fn of(media: MediaType) -> Option<Self> {
        match media {
            MediaType::MergePatch | MediaType::StrategicMergePatch => Some(PatchKind::Merge),
            MediaType::JsonPatch => Some(PatchKind::Json),
            MediaType::ApplyPatch => Some(PatchKind::Apply),
            MediaType::Json | MediaType::Yaml => None,
        }
    }
}

/// A decoded patch body.
#[derive(Clone, Debug)]
pub enum Patch {
    /// A JSON document merged into the object.
    Merge(Value),
    /// A server-side apply document: merged, and creates the object when it is missing.
    Apply(Value),
    /// RFC 6902 operations.
    Json(json_patch::Patch),
}

impl Patch {
    /// Decodes a body of the given kind; a malformed body is a 400.
    pub fn decode(kind: PatchKind, body: &[u8]) -> Result<Self, StoreError> {
        match kind {
            PatchKind::Merge => serde_json::from_slice(body)
                .map(Patch::Merge)
                .map_err(|e| StoreError::BadRequest(format!("invalid merge patch: {e}"))),
            PatchKind::Apply => serde_yaml::from_slice(body)
                .map(Patch::Apply)
                .map_err(|e| StoreError::BadRequest(format!("invalid apply patch: {e}"))),
            PatchKind::Json => serde_json::from_slice(body)
                .map(Patch::Json)
                .map_err(|e| StoreError::BadRequest(format!("invalid json patch: {e}"))),
        }
    }

    /// Whether the patch creates a missing object (server-side apply does).
    pub fn creates_missing(&self) -> bool {
        matches!(self, Patch::Apply(_))
    }

    /// Applies the patch to `doc`.
    ///
    /// A JSON-patch `test` for `null` passes when the member is missing, as on a real API
    /// server (kube's finalizer helper relies on it); RFC 6902 alone would fail it.
    pub fn apply_to(&self, doc: &mut Value) -> Result<(), StoreError> {
        match self {
            Patch::Merge(p) | Patch::Apply(p) => {
                if !p.is_object() {
                    return Err(StoreError::BadRequest(
                        "a merge patch must be a JSON object".into(),
                    ));
                }
                json_patch::merge(doc, p);
                Ok(())
            }
            Patch::Json(p) => {
                let ops: Vec<_> =
                    p.0.iter()
                        .filter(|op| match op {
                            json_patch::PatchOperation::Test(t) => {
                                !(t.value.is_null() && doc.pointer(t.path.as_str()).is_none())
                            }
                            _ => true,
                        })
                        .cloned()
                        .collect();
                json_patch::patch(doc, &ops)
                    .map_err(|e| StoreError::BadRequest(format!("json patch failed: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_for_null_on_a_missing_member_passes() {
        let patch = Patch::decode(
            PatchKind::Json,
            br#"[{"op":"test","path":"/metadata/finalizers","value":null},{"op":"add","path":"/metadata/finalizers","value":["x"]}]"#,
        );
        let mut doc = json!({"metadata": {"name": "a"}});
        assert!(patch.and_then(|p| p.apply_to(&mut doc)).is_ok());
        assert_eq!(doc["metadata"]["finalizers"], json!(["x"]));
    }

    #[test]
    fn failing_test_rejects_the_whole_patch() {
        let mut doc = json!({"metadata": {"finalizers": ["y"]}});
        let before = doc.clone();
        let patch = Patch::decode(
            PatchKind::Json,
            br#"[{"op":"test","path":"/metadata/finalizers","value":null},{"op":"add","path":"/metadata/finalizers","value":["x"]}]"#,
        );
        assert!(patch.and_then(|p| p.apply_to(&mut doc)).is_err());
        assert_eq!(doc, before);
    }

    #[test]
    fn merge_and_apply_bodies() {
        let mut doc = json!({"spec": {"port": 80, "via": "agent"}});
        let merge = Patch::decode(PatchKind::Merge, br#"{"spec":{"port":81,"via":null}}"#);
        assert!(merge.and_then(|p| p.apply_to(&mut doc)).is_ok());
        assert_eq!(doc, json!({"spec": {"port": 81}}));
        let apply = Patch::decode(PatchKind::Apply, b"spec:\n  port: 82\n");
        assert!(apply.and_then(|p| p.apply_to(&mut doc)).is_ok());
        assert_eq!(doc["spec"]["port"], 82);
        assert!(Patch::decode(PatchKind::Merge, b"{not json").is_err());
        assert_eq!(
            PatchKind::of(MediaType::StrategicMergePatch),
            Some(PatchKind::Merge)
        );
        assert_eq!(
            PatchKind::of(MediaType::Json),
            None,
            "a JSON body is no patch"
        );
    }
}

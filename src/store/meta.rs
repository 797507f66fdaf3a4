//! Small accessors for `metadata` on untyped objects (the store holds every kind as JSON).

use rand::Rng;
use serde_json::{Map, Value};

/// A string at a JSON pointer, or "".
pub fn str_at<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// `metadata.name`.
pub fn name(obj: &Value) -> &str {
    str_at(obj, "/metadata/name")
}

/// `metadata.namespace`.
pub fn namespace(obj: &Value) -> &str {
    str_at(obj, "/metadata/namespace")
}

/// `metadata.resourceVersion` as a number (0 when absent or malformed).
pub fn resource_version(obj: &Value) -> u64 {
    str_at(obj, "/metadata/resourceVersion")
        .parse()
        .unwrap_or(0)
}

/// Whether `metadata.finalizers` is non-empty.
pub fn has_finalizers(obj: &Value) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

/// Whether deletion was requested (`metadata.deletionTimestamp` is set).
pub fn is_terminating(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

/// The `metadata` map, created if missing (or replaced if not a map).
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let map = match obj {
        Value::Object(m) => m,
        _ => unreachable!("obj was made an object above"),
    };
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    match meta {
        Value::Object(m) => m,
        _ => unreachable!("metadata was made an object above"),
    }
}

/// Sets or removes (`None`) one metadata field.
pub fn set_meta(obj: &mut Value, field: &str, value: Option<Value>) {
    let meta = metadata_mut(obj);
    match value {
        Some(v) => {
            meta.insert(field.to_owned(), v);
        }
        None => {
            meta.remove(field);
        }
    }
}

/// Now, as the API server writes timestamps (RFC 3339, whole seconds, UTC).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The random suffix `generateName` gets: five characters from the API server's alphabet
/// (no vowels, so no words; no look-alike digits).
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The object without `metadata` and `status`: what `generation` tracks.
pub fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metadata_helpers() {
        let mut o = json!({"spec": {}});
        set_meta(&mut o, "name", Some(json!("a")));
        set_meta(&mut o, "resourceVersion", Some(json!("12")));
        assert_eq!(name(&o), "a");
        assert_eq!(resource_version(&o), 12);
        assert!(!has_finalizers(&o));
        set_meta(&mut o, "finalizers", Some(json!(["x"])));
        assert!(has_finalizers(&o));
        assert_eq!(spec_part(&o), json!({"spec": {}}));
        let s = name_suffix();
        assert_eq!(s.len(), 5);
        assert!(now_rfc3339().ends_with('Z'));
    }
}

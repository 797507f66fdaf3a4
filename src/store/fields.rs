//! Field ownership for server-side apply, as `metadata.managedFields` records it: which
//! manager set which field, so an apply that would change a field another manager owns is
//! refused with a conflict (unless forced), and a manager's apply that drops a field removes
//! it. Leader election relies on this: two candidates applying `holderIdentity` to one Lease
//! must not both win. Pure functions over JSON; the store calls them inside its write lock.
//!
//! Simplifications: lists are owned whole (no merge keys), and only patches record ownership
//! (creates and replaces keep whatever `managedFields` the body carried).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A field's path from the object's root, e.g. `["spec", "holderIdentity"]`.
pub type FieldPath = Vec<String>;

/// How a manager wrote its fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Server-side apply: the manager declares the fields it wants to own.
    Apply,
    /// Any other write (patches, updates): the manager owns what it changed.
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// Fields the server manages, never owned by anyone.
fn ignored(path: &[String]) -> bool {
    match path {
        [first] => first == "apiVersion" || first == "kind",
        [first, second, ..] if first == "metadata" => matches!(
            second.as_str(),
            "name"
                | "namespace"
                | "uid"
                | "resourceVersion"
                | "generation"
                | "creationTimestamp"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
                | "managedFields"
                | "selfLink"
        ),
        _ => false,
    }
}

/// The leaf fields of a document: scalars, lists and empty objects, but not `null`s (which
/// mean "absent").
pub fn leaves(doc: &Value) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        match v {
            Value::Null => {}
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    path.push(k.clone());
                    walk(child, path, out);
                    path.pop();
                }
            }
            _ => {
                if !ignored(path) {
                    out.insert(path.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(doc, &mut Vec::new(), &mut out);
    out
}

fn at<'a>(doc: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |v, k| v.get(k))
}

/// The leaves whose value differs between two documents (added, changed or removed).
pub fn changed(old: &Value, new: &Value) -> BTreeSet<FieldPath> {
    leaves(old)
        .union(&leaves(new))
        .filter(|p| at(old, p) != at(new, p))
        .cloned()
        .collect()
}

/// One `managedFields` entry, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The field manager's name.
    pub manager: String,
    /// Apply or Update.
    pub operation: String,
    /// The fields it owns.
    pub fields: BTreeSet<FieldPath>,
    /// The rest of the entry (apiVersion, time, …), kept as it was.
    pub extra: Map<String, Value>,
}

fn decode_fields(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    let Value::Object(m) = v else { return };
    let mut leaf = true;
    for (k, child) in m {
        if let Some(name) = k.strip_prefix("f:") {
            leaf = false;
            path.push(name.to_owned());
            decode_fields(child, path, out);
            path.pop();
        }
    }
    if leaf && !path.is_empty() {
        out.insert(path.clone());
    }
}

fn encode_fields(fields: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in fields {
        let mut node = &mut root;
        for k in path {
            let entry = node
                .entry(format!("f:{k}"))
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(next) = entry else { break };
            node = next;
        }
    }
    Value::Object(root)
}

/// Reads `metadata.managedFields`.
pub fn entries(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| {
            let mut extra = e.as_object()?.clone();
            let manager = extra.remove("manager")?.as_str()?.to_owned();
            let operation = extra
                .remove("operation")
                .and_then(|o| o.as_str().map(str::to_owned))
                .unwrap_or_default();
            let mut fields = BTreeSet::new();
            if let Some(f) = extra.remove("fieldsV1") {
                decode_fields(&f, &mut Vec::new(), &mut fields);
            }
            Some(Entry {
                manager,
                operation,
                fields,
                extra,
            })
        })
        .collect()
}

/// Writes `metadata.managedFields` (entries that own nothing are dropped).
pub fn set_entries(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut m = e.extra.clone();
            m.insert("manager".into(), json!(e.manager));
            m.insert("operation".into(), json!(e.operation));
            m.insert("fieldsType".into(), json!("FieldsV1"));
            m.insert("fieldsV1".into(), encode_fields(&e.fields));
            Value::Object(m)
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Whether `owned` covers `path` (the same field, or one inside or around it).
fn overlaps(owned: &FieldPath, path: &FieldPath) -> bool {
    owned.starts_with(path) || path.starts_with(owned)
}

/// The conflicts an apply by `manager` would cause: fields it sets to a value other than the
/// current one while another manager owns them, as `(other manager, .dotted.path)`.
pub fn apply_conflicts(current: &Value, applied: &Value, manager: &str) -> Vec<(String, String)> {
    let changing: Vec<FieldPath> = leaves(applied)
        .into_iter()
        .filter(|p| at(current, p) != at(applied, p))
        .collect();
    let mut out = Vec::new();
    for entry in entries(current).iter().filter(|e| e.manager != manager) {
        for path in &changing {
            if entry.fields.iter().any(|o| overlaps(o, path)) {
                out.push((entry.manager.clone(), format!(".{}", path.join("."))));
            }
        }
    }
    out
}

/// Removes from `doc` the fields `manager` applied before but not now, unless another
/// manager also owns them: an apply declares the whole set of fields its manager wants.
pub fn prune_dropped(current: &Value, applied: &Value, manager: &str, doc: &mut Value) {
    let all = entries(current);
    let now = leaves(applied);
    let before = all
        .iter()
        .filter(|e| e.manager == manager && e.operation == Operation::Apply.as_str())
        .flat_map(|e| e.fields.iter().cloned());
    for path in before.filter(|p| !now.contains(p)).collect::<Vec<_>>() {
        let shared = all
            .iter()
            .any(|e| e.manager != manager && e.fields.iter().any(|o| overlaps(o, &path)));
        if shared {
            continue;
        }
        if let Some((last, parent)) = path.split_last()
            && let Some(Value::Object(m)) = parent.iter().try_fold(&mut *doc, |v, k| v.get_mut(k))
        {
            m.remove(last);
        }
    }
}

/// Records a write in `next`'s `managedFields`: an apply makes `manager` own exactly the
/// fields it applied (taking them from others when forced); an update makes it own what it
/// changed, taken from everyone else. Removed fields are owned by no one. A write that
/// changed nothing records nothing, so a no-op write stays a no-op.
pub fn record(
    previous: &Value,
    next: &mut Value,
    manager: &str,
    op: Operation,
    applied: Option<&Value>,
    now: &str,
) {
    let changed = changed(previous, next);
    if changed.is_empty() {
        return;
    }
    let mut all = entries(previous);
    let present = leaves(next);
    let taken: BTreeSet<FieldPath> = match (op, applied) {
        (Operation::Apply, Some(a)) => leaves(a),
        _ => changed.clone(),
    };
    for e in &mut all {
        let mine = e.manager == manager && e.operation == op.as_str();
        e.fields.retain(|f| {
            present.iter().any(|p| overlaps(f, p))
                && (mine || !changed.iter().any(|c| overlaps(f, c)) || !taken.contains(f))
        });
    }
    let position = all
        .iter()
        .position(|e| e.manager == manager && e.operation == op.as_str());
    let entry = match position {
        Some(i) => &mut all[i],
        None => {
            all.push(Entry {
                manager: manager.to_owned(),
                operation: op.as_str().to_owned(),
                fields: BTreeSet::new(),
                extra: Map::new(),
            });
            let last = all.len() - 1;
            &mut all[last]
        }
    };
    match op {
        Operation::Apply => entry.fields = taken,
        Operation::Update => entry.fields.extend(taken),
    }
    entry.fields.retain(|f| present.contains(f));
    entry.extra.insert("time".into(), json!(now));
    entry.extra.insert(
        "apiVersion".into(),
        next.get("apiVersion").cloned().unwrap_or(Value::Null),
    );
    set_entries(next, &all);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>) -> Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "l", "resourceVersion": "3"},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}})
    }

    fn merged(doc: &Value, patch: &Value) -> Value {
        let mut d = doc.clone();
        json_patch::merge(&mut d, patch);
        d
    }

    #[test]
    fn a_second_applier_conflicts_on_a_field_the_first_owns() {
        let base = lease(None);
        let a = json!({"spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}});
        assert!(apply_conflicts(&base, &a, "a").is_empty());
        let mut after_a = merged(&base, &a);
        record(&base, &mut after_a, "a", Operation::Apply, Some(&a), "t");
        let b = json!({"spec": {"holderIdentity": "b", "leaseDurationSeconds": 15}});
        assert_eq!(
            apply_conflicts(&after_a, &b, "b"),
            vec![("a".to_owned(), ".spec.holderIdentity".to_owned())]
        );
        // Writing what is already there records nothing.
        let mut again = after_a.clone();
        record(&after_a, &mut again, "b", Operation::Update, None, "later");
        assert_eq!(again, after_a);
        // The same value is no conflict, and a manager never conflicts with itself.
        let same = json!({"spec": {"leaseDurationSeconds": 15}});
        assert!(apply_conflicts(&after_a, &same, "b").is_empty());
        assert!(apply_conflicts(&after_a, &a, "a").is_empty());
    }

    #[test]
    fn an_update_takes_ownership_and_nulls_release_it() {
        let base = lease(None);
        let a = json!({"spec": {"holderIdentity": "a"}});
        let mut owned = merged(&base, &a);
        record(&base, &mut owned, "a", Operation::Apply, Some(&a), "t");
        // b clears the holder with a merge patch: nobody owns it any more.
        let clear = json!({"spec": {"holderIdentity": null}});
        let mut cleared = merged(&owned, &clear);
        record(&owned, &mut cleared, "b", Operation::Update, None, "t");
        assert!(entries(&cleared).iter().all(|e| e.fields.is_empty()));
        let b = json!({"spec": {"holderIdentity": "b"}});
        assert!(apply_conflicts(&cleared, &b, "b").is_empty());
        // An update of a field someone applied takes it over.
        let mut taken = merged(&owned, &json!({"spec": {"holderIdentity": "c"}}));
        record(&owned, &mut taken, "c", Operation::Update, None, "t");
        let by: Vec<(String, usize)> = entries(&taken)
            .iter()
            .map(|e| (e.manager.clone(), e.fields.len()))
            .collect();
        assert_eq!(by, vec![("c".to_owned(), 1)]);
    }

    #[test]
    fn fields_v1_round_trips() {
        let fields: BTreeSet<FieldPath> = [
            vec!["spec".into(), "holderIdentity".into()],
            vec!["metadata".into(), "labels".into(), "app".into()],
        ]
        .into();
        let mut obj = json!({"metadata": {}});
        set_entries(
            &mut obj,
            &[Entry {
                manager: "m".into(),
                operation: "Apply".into(),
                fields: fields.clone(),
                extra: Map::new(),
            }],
        );
        assert_eq!(
            obj.pointer("/metadata/managedFields/0/fieldsV1/f:spec/f:holderIdentity"),
            Some(&json!({}))
        );
        assert_eq!(entries(&obj)[0].fields, fields);
    }

    #[test]
    fn an_apply_that_drops_a_field_removes_it() {
        let base = json!({"metadata": {"name": "x"}, "spec": {"a": 1, "b": 2}});
        let first = json!({"spec": {"a": 1, "b": 2}});
        let mut doc = base.clone();
        record(
            &json!({"metadata": {}}),
            &mut doc,
            "m",
            Operation::Apply,
            Some(&first),
            "t",
        );
        let second = json!({"spec": {"a": 1}});
        let mut next = merged(&doc, &second);
        prune_dropped(&doc, &second, "m", &mut next);
        assert_eq!(next.pointer("/spec"), Some(&json!({"a": 1})));
    }
}

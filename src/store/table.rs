//! `meta.k8s.io/v1` Table responses, built from a kind's printer columns as the API server
//! builds them for CRDs, so `kubectl get` shows the same columns here and in a cluster.

use serde_json::{Value, json};

use super::kinds::Kind;

/// What each row carries besides its cells (the `includeObject` query parameter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    /// No object.
    None,
    /// `PartialObjectMetadata` (the default).
    Metadata,
    /// The whole object.
    Object,
}

impl IncludeObject {
    /// Parses the query parameter (default `Metadata`).
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// The column definitions, NAME first.
pub fn column_definitions(kind: &Kind) -> Value {
    let mut cols = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace."
    })];
    cols.extend(kind.columns.iter().map(|c| {
        json!({
            "name": c.name,
            "type": c.type_,
            "format": c.format.clone().unwrap_or_default(),
            "description": c.description.clone().unwrap_or_default(),
            "priority": c.priority.unwrap_or(0),
        })
    }));
    Value::Array(cols)
}

/// A Table of `objects`; `with_headers` is false for watch events after the first.
pub fn table<'a>(
    kind: &Kind,
    objects: impl IntoIterator<Item = &'a Value>,
    include: IncludeObject,
    with_headers: bool,
    list_meta: Value,
) -> Value {
    let rows: Vec<Value> = objects.into_iter().map(|o| row(kind, o, include)).collect();
    let mut t = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta, "rows": rows});
    if with_headers {
        t["columnDefinitions"] = column_definitions(kind);
    }
    t
}

fn row(kind: &Kind, obj: &Value, include: IncludeObject) -> Value {
    let mut cells = vec![json!(
        obj.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    )];
    cells.extend(
        kind.columns
            .iter()
            .map(|c| cell(&c.type_, lookup(obj, &c.json_path))),
    );
    let object = match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Object => obj.clone(),
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(Value::Null),
        }),
    };
    let mut r = json!({"cells": cells});
    if !object.is_null() {
        r["object"] = object;
    }
    r
}

/// Evaluates a simple JSONPath (`.status.url`) of a printer column.
fn lookup<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    path.trim_start_matches('.')
        .split('.')
        .filter(|s| !s.is_empty())
        .try_fold(obj, |v, seg| v.get(seg))
}

/// Renders one cell as the API server does for the column's type: dates become ages, and
/// missing values `null` (kubectl prints `<none>`).
fn cell(type_: &str, value: Option<&Value>) -> Value {
    let Some(v) = value.filter(|v| !v.is_null()) else {
        return Value::Null;
    };
    match type_ {
        "date" => match v.as_str().and_then(|s| s.parse::<jiff::Timestamp>().ok()) {
            Some(t) => json!(human_duration(
                jiff::Timestamp::now().as_second() - t.as_second()
            )),
            None => json!("<invalid>"),
        },
        "integer" => v.as_i64().map_or(Value::Null, |i| json!(i)),
        "number" => v.as_f64().map_or(Value::Null, |f| json!(f)),
        "boolean" => v.as_bool().map_or(Value::Null, |b| json!(b)),
        _ => match v {
            Value::String(s) => json!(s),
            other => json!(other.to_string()),
        },
    }
}

/// kubectl's age format (`apimachinery/pkg/util/duration.HumanDuration`).
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    if s < 120 {
        return format!("{s}s");
    }
    let minutes = s / 60;
    if minutes < 10 {
        return if s % 60 == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{}s", s % 60)
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = s / 3600;
    if hours < 8 {
        return if minutes % 60 == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{}m", minutes % 60)
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        return if hours % 24 == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{}h", hours / 24, hours % 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    let (years, days) = (hours / 24 / 365, (hours / 24) % 365);
    if hours < 24 * 365 * 8 && days != 0 {
        return format!("{years}y{days}d");
    }
    format!("{years}y")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kinds;

    #[test]
    fn ages_match_kubectl() {
        for (secs, want) in [
            (0, "0s"),
            (119, "119s"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (9 * 3600, "9h"),
            (50 * 3600, "2d2h"),
            (10 * 86400, "10d"),
            (800 * 86400, "2y70d"),
        ] {
            assert_eq!(human_duration(secs), want, "{secs}");
        }
    }

    #[test]
    fn rows_follow_printer_columns() {
        let kind = kinds::all()
            .into_iter()
            .find(|k| k.plural == "previewlinks");
        let Some(kind) = kind else {
            panic!("previewlinks kind missing")
        };
        let obj = json!({
            "metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"port": 8080},
            "status": {"phase": "Ready", "url": "http://x", "target": "docker/web"}
        });
        let t = table(&kind, [&obj], IncludeObject::Metadata, true, json!({}));
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "web");
        assert_eq!(cells[1], "docker/web");
        assert_eq!(cells[2], 8080);
        assert_eq!(cells[3], "Ready");
        assert_eq!(cells[5], Value::Null, "Expires is unset");
        assert!(
            cells[6]
                .as_str()
                .is_some_and(|a| a.ends_with('y') || a.contains('y'))
        );
        assert_eq!(t["columnDefinitions"][0]["name"], "Name");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}

//! Label and field selectors on list and watch, as the API server parses them.
//!
//! kubectl (`-l`, `wait`) and kube-rs send these as query strings; matching reuses kube's own
//! `Selector` so the semantics are the ones kube clients already rely on.

use std::collections::BTreeSet;

use kube::core::{Expression, Selector, SelectorExt};

use super::error::StoreError;
use super::stored::Stored;

/// A parsed `labelSelector` and `fieldSelector` pair.
#[derive(Clone, Debug, Default)]
pub struct Selectors {
    labels: Selector,
    fields: Vec<FieldRequirement>,
}

/// One `fieldSelector` term. Only the fields every resource supports are accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldRequirement {
    field: Field,
    value: String,
    equal: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
}

impl Selectors {
    /// Parses the two query parameters; a syntax error or an unsupported field is a 400.
    pub fn parse(
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Self, StoreError> {
        let labels = match label_selector {
            Some(s) if !s.trim().is_empty() => parse_labels(s)?,
            _ => Selector::default(),
        };
        let fields = match field_selector {
            Some(s) if !s.trim().is_empty() => parse_fields(s)?,
            _ => Vec::new(),
        };
        Ok(Selectors { labels, fields })
    }

    /// Whether a stored object named `name` in `namespace` passes both selectors (its labels
    /// are read only when a label selector asks).
    pub fn matches_stored(&self, name: &str, namespace: &str, obj: &Stored) -> bool {
        self.fields_match(name, namespace)
            && (self.labels.selects_all() || self.labels.matches(&obj.labels()))
    }

    fn fields_match(&self, name: &str, namespace: &str) -> bool {
        self.fields.iter().all(|r| {
            let actual = match r.field {
                Field::Name => name,
                Field::Namespace => namespace,
            };
            (actual == r.value) == r.equal
        })
    }
}

fn bad(sel: &str, why: &str) -> StoreError {
    StoreError::BadRequest(format!("unable to parse requirement {sel:?}: {why}"))
}

/// Splits on commas that are not inside `( … )`.
fn split_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(s[start..].trim());
    terms
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'/'))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn parse_labels(s: &str) -> Result<Selector, StoreError> {
    let mut exprs = Vec::new();
    for term in split_terms(s) {
        exprs.push(parse_label_term(term)?);
    }
    Ok(Selector::from_iter(exprs))
}

fn parse_label_term(term: &str) -> Result<Expression, StoreError> {
    let set_op = |rest: &str| -> Option<(String, BTreeSet<String>)> {
        let rest = rest.trim();
        let inner = rest.strip_prefix('(')?.strip_suffix(')')?;
        Some((
            String::new(),
            inner.split(',').map(|v| v.trim().to_owned()).collect(),
        ))
    };
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        return if valid_key(key) {
            Ok(Expression::DoesNotExist(key.to_owned()))
        } else {
            Err(bad(term, "invalid label key"))
        };
    }
    for (op, negate) in [(" notin ", true), (" in ", false)] {
        if let Some((key, rest)) = term.split_once(op) {
            let key = key.trim();
            let (_, values) =
                set_op(rest).ok_or_else(|| bad(term, "expected a parenthesised list of values"))?;
            if !valid_key(key) || !values.iter().all(|v| valid_value(v)) {
                return Err(bad(term, "invalid label key or value"));
            }
            return Ok(if negate {
                Expression::NotIn(key.to_owned(), values)
            } else {
                Expression::In(key.to_owned(), values)
            });
        }
    }
    for (op, equal) in [("!=", false), ("==", true), ("=", true)] {
        if let Some((key, value)) = term.split_once(op) {
            let (key, value) = (key.trim(), value.trim());
            if !valid_key(key) || !valid_value(value) {
                return Err(bad(term, "invalid label key or value"));
            }
            return Ok(if equal {
                Expression::Equal(key.into(), value.into())
            } else {
                Expression::NotEqual(key.into(), value.into())
            });
        }
    }
    if valid_key(term) {
        Ok(Expression::Exists(term.to_owned()))
    } else {
        Err(bad(term, "invalid label key"))
    }
}

fn parse_fields(s: &str) -> Result<Vec<FieldRequirement>, StoreError> {
    split_terms(s)
        .into_iter()
        .map(|term| {
            let (key, value, equal) = if let Some((k, v)) = term.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, v, true)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, v, true)
            } else {
                return Err(StoreError::BadRequest(format!("invalid field selector {term:?}: expected field=value or field!=value")));
            };
            let field = match key.trim() {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => {
                    return Err(StoreError::BadRequest(format!(
                        "field label not supported: {other} (supported: metadata.name, metadata.namespace)"
                    )));
                }
            };
            Ok(FieldRequirement { field, value: value.trim().to_owned(), equal })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Whether `selectors` match the object web in dev, labelled app=shop and tier=front.
    fn matches(selectors: &Selectors) -> bool {
        let obj = json!({"metadata": {"name": "web", "namespace": "dev", "labels": {"app": "shop", "tier": "front"}}});
        let stored = Stored::encode(&obj).unwrap_or_else(|e| panic!("{e}"));
        selectors.matches_stored("web", "dev", &stored)
    }

    fn sel(l: &str, f: &str) -> Selectors {
        Selectors::parse(Some(l), Some(f)).unwrap_or_else(|e| panic!("{l:?} {f:?}: {e}"))
    }

    #[test]
    fn label_terms() {
        for (s, want) in [
            ("app=shop", true),
            ("app==shop,tier=front", true),
            ("app!=shop", false),
            ("app in (shop, blog)", true),
            ("tier notin (front)", false),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app=shop,tier in (back)", false),
        ] {
            assert_eq!(matches(&sel(s, "")), want, "{s}");
        }
    }

    #[test]
    fn field_terms() {
        assert!(matches(&sel("", "metadata.name=web")));
        assert!(!matches(&sel("", "metadata.name=other")));
        assert!(matches(&sel("", "metadata.namespace=dev,metadata.name!=x")));
    }

    #[test]
    fn bad_selectors_are_refused() {
        assert!(Selectors::parse(Some("app in shop"), None).is_err());
        assert!(Selectors::parse(Some("a b=c"), None).is_err());
        assert!(Selectors::parse(None, Some("spec.port=80")).is_err());
        assert!(Selectors::parse(None, Some("metadata.name")).is_err());
    }
}

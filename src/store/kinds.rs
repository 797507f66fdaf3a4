//! The resource types the embedded API serves, and what it needs to know about each:
//! names for discovery and the CLI, scope, subresources, printer columns and validation.

use std::sync::Arc;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::resources::validation::{self, FieldError};
use crate::resources::{
    self, DaemonInjectionSpec, DaemonInjectionStatus, PreviewLinkSpec, PreviewLinkStatus,
};

/// Normalizes (prunes unknown fields, fills defaults) and validates an object in place.
pub type Validator = fn(&mut Value) -> Vec<FieldError>;

/// One served resource type.
#[derive(Clone, Debug)]
pub struct Kind {
    /// API group; empty for the core group.
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// `kind` as written in objects.
    pub kind: &'static str,
    /// URL segment and discovery name.
    pub plural: &'static str,
    /// Singular name (kubectl accepts it).
    pub singular: &'static str,
    /// Short names (kubectl accepts them).
    pub short_names: &'static [&'static str],
    /// Categories (`kubectl get previewd`).
    pub categories: &'static [&'static str],
    /// Whether the status subresource exists (status then only changes through it, and
    /// `generation` tracks everything but metadata and status).
    pub has_status: bool,
    /// Printer columns for Table output; NAME comes first implicitly.
    pub columns: Vec<CustomResourceColumnDefinition>,
    /// The CRD this kind was generated from (custom resources only). Shared: every API
    /// request clones its kind, and a CRD's schema is large.
    pub crd: Option<Arc<CustomResourceDefinition>>,
    /// Validation beyond the object's metadata.
    pub validate: Option<Validator>,
}

impl Kind {
    /// `apiVersion` as written in objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural.group` (just `plural` for core), the resource's unique name.
    pub fn resource_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Whether `name` (any case) is this kind's plural, singular, kind or a short name,
    /// optionally qualified with the group (`pl.previewd.dev`).
    pub fn is_named(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        let (base, group) = match name.split_once('.') {
            Some((b, g)) => (b.to_owned(), Some(g.to_owned())),
            None => (name, None),
        };
        if group.is_some_and(|g| g != self.group) {
            return false;
        }
        base == self.plural
            || base == self.singular
            || base == self.kind.to_ascii_lowercase()
            || self.short_names.contains(&base.as_str())
    }
}

fn age_column() -> CustomResourceColumnDefinition {
    CustomResourceColumnDefinition {
        name: "Age".into(),
        type_: "date".into(),
        json_path: ".metadata.creationTimestamp".into(),
        ..Default::default()
    }
}

fn column(name: &str, type_: &str, json_path: &str) -> CustomResourceColumnDefinition {
    CustomResourceColumnDefinition {
        name: name.into(),
        type_: type_.into(),
        json_path: json_path.into(),
        ..Default::default()
    }
}

fn custom_resource(
    crd: CustomResourceDefinition,
    validate: Validator,
    short: &'static [&'static str],
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
) -> Kind {
    let version = crd.spec.versions.first();
    Kind {
        group: resources::GROUP,
        version: resources::VERSION,
        kind,
        plural,
        singular,
        short_names: short,
        categories: &[resources::CATEGORY],
        has_status: true,
        columns: version
            .and_then(|v| v.additional_printer_columns.clone())
            .unwrap_or_else(|| vec![age_column()]),
        crd: Some(Arc::new(crd)),
        validate: Some(validate),
    }
}

/// Every kind the embedded API serves: the two previewd resources, and the core objects the
/// controllers use (Secrets for link tokens, Leases for leader election, events.k8s.io
/// Events from kube's `Recorder`).
pub fn all() -> Vec<Kind> {
    let [links, injections] = resources::crd::all();
    vec![
        custom_resource(
            links,
            validate_preview_link,
            &["pl"],
            "previewlinks",
            "previewlink",
            "PreviewLink",
        ),
        custom_resource(
            injections,
            validate_daemon_injection,
            &["di"],
            "daemoninjections",
            "daemoninjection",
            "DaemonInjection",
        ),
        Kind {
            group: "",
            version: "v1",
            kind: "Secret",
            plural: "secrets",
            singular: "secret",
            short_names: &[],
            categories: &[],
            has_status: false,
            columns: vec![column("Type", "string", ".type"), age_column()],
            crd: None,
            validate: None,
        },
        Kind {
            group: "coordination.k8s.io",
            version: "v1",
            kind: "Lease",
            plural: "leases",
            singular: "lease",
            short_names: &[],
            categories: &[],
            has_status: false,
            columns: vec![
                column("Holder", "string", ".spec.holderIdentity"),
                age_column(),
            ],
            crd: None,
            validate: None,
        },
        Kind {
            group: "events.k8s.io",
            version: "v1",
            kind: "Event",
            plural: "events",
            singular: "event",
            short_names: &["ev"],
            categories: &[],
            has_status: false,
            columns: vec![
                column("Type", "string", ".type"),
                column("Reason", "string", ".reason"),
                column("Object", "string", ".regarding.name"),
                column("Note", "string", ".note"),
                age_column(),
            ],
            crd: None,
            validate: None,
        },
    ]
}

/// The admission of DaemonInjections whose host-path daemon source is new or changed:
/// refused unless `policy` allows the file.
pub fn daemon_source_admission(
    policy: resources::daemon_source::DaemonSourcePolicy,
) -> super::state::Admission {
    std::sync::Arc::new(move |kind: &Kind, current: Option<&Value>, next: &Value| {
        const HOST_PATH: &str = "/spec/daemon/source/hostPath";
        if kind.plural != "daemoninjections" {
            return Vec::new();
        }
        let Some(path) = next.pointer(HOST_PATH).and_then(Value::as_str) else {
            return Vec::new();
        };
        if current
            .and_then(|c| c.pointer(HOST_PATH))
            .and_then(Value::as_str)
            == Some(path)
        {
            return Vec::new();
        }
        match policy.resolve(path) {
            Ok(_) => Vec::new(),
            Err(why) => vec![FieldError::new(
                "spec.daemon.source.hostPath",
                format!("Forbidden: {why}"),
            )],
        }
    })
}

fn validate_preview_link(obj: &mut Value) -> Vec<FieldError> {
    validate_custom::<PreviewLinkSpec, PreviewLinkStatus>(obj, validation::preview_link_spec)
}

fn validate_daemon_injection(obj: &mut Value) -> Vec<FieldError> {
    validate_custom::<DaemonInjectionSpec, DaemonInjectionStatus>(
        obj,
        validation::daemon_injection_spec,
    )
}

/// Round-trips `spec` and `status` through their Rust types, which prunes unknown fields and
/// fills defaults as a structural CRD schema does, then runs the semantic checks.
fn validate_custom<S: DeserializeOwned + Serialize, T: DeserializeOwned + Serialize>(
    obj: &mut Value,
    check: fn(&S) -> Vec<FieldError>,
) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(map) = obj.as_object_mut() {
        map.retain(|k, _| {
            matches!(
                k.as_str(),
                "apiVersion" | "kind" | "metadata" | "spec" | "status"
            )
        });
    }
    if let Some(target) = obj.pointer("/spec/target") {
        let kinds = ["docker", "pod"]
            .iter()
            .filter(|k| target.get(**k).is_some())
            .count();
        if target.is_object() && kinds != 1 {
            errs.push(FieldError::new(
                "spec.target",
                "Invalid value: exactly one of docker or pod must be set",
            ));
            return errs;
        }
    }
    match obj.get("spec").cloned() {
        None | Some(Value::Null) => errs.push(FieldError::new("spec", "Required value")),
        Some(raw) => match serde_json::from_value::<S>(raw) {
            Ok(spec) => {
                errs.extend(check(&spec));
                normalize(obj, "spec", &spec);
            }
            Err(e) => errs.push(FieldError::new("spec", format!("Invalid value: {e}"))),
        },
    }
    match obj.get("status").cloned() {
        None | Some(Value::Null) => {}
        Some(raw) => match serde_json::from_value::<T>(raw) {
            Ok(status) => normalize(obj, "status", &status),
            Err(e) => errs.push(FieldError::new("status", format!("Invalid value: {e}"))),
        },
    }
    errs
}

fn normalize<V: Serialize>(obj: &mut Value, field: &str, typed: &V) {
    if let (Some(map), Ok(v)) = (obj.as_object_mut(), serde_json::to_value(typed)) {
        map.insert(field.to_owned(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kind(plural: &str) -> Kind {
        all()
            .into_iter()
            .find(|k| k.plural == plural)
            .unwrap_or_else(|| panic!("no kind {plural}"))
    }

    #[test]
    fn names_resolve_like_kubectl() {
        let pl = kind("previewlinks");
        for n in [
            "previewlinks",
            "previewlink",
            "PreviewLink",
            "pl",
            "pl.previewd.dev",
            "previewlinks.previewd.dev",
        ] {
            assert!(pl.is_named(n), "{n}");
        }
        assert!(!pl.is_named("pl.other.io"));
        assert!(!pl.is_named("di"));
    }

    #[test]
    fn validation_prunes_unknown_fields_and_fills_defaults() {
        let mut obj =
            json!({"spec": {"target": {"docker": {"container": "web"}}, "port": 8080, "bogus": 1}});
        let errs = (kind("previewlinks").validate.unwrap_or(|_| vec![]))(&mut obj);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(obj["spec"]["access"], "token");
        assert_eq!(obj["spec"]["via"], "auto");
        assert!(obj["spec"].get("bogus").is_none());
    }

    #[test]
    fn two_targets_and_bad_ports_are_reported() {
        let validate = kind("previewlinks").validate.unwrap_or(|_| vec![]);
        let mut two = json!({"spec": {"target": {"docker": {"container": "a"}, "pod": {"name": "b"}}, "port": 80}});
        assert_eq!(validate(&mut two)[0].field, "spec.target");
        let mut zero = json!({"spec": {"target": {"docker": {"container": "a"}}, "port": 0}});
        assert_eq!(validate(&mut zero)[0].field, "spec.port");
        let mut missing = json!({"metadata": {}});
        assert_eq!(validate(&mut missing)[0].field, "spec");
    }
}

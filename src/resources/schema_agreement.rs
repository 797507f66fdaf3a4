//! The CRDs refuse what the embedded store refuses: one table of good and bad specs, each
//! run through the embedded store's validation (the same `Kind::validate` its writes call:
//! typed decoding, then `validation`) and through the generated `openAPIV3Schema`, as a
//! cluster would (its OpenAPI part through a JSON-Schema validator, its CEL rules through
//! kube's evaluator). A spec field with no case here fails `the_table_covers_every_spec_field`:
//! a new field gets its check in `validation`, that check's schema form on the type, and a
//! group of cases below.
//! (The embedded store's host-path admission, `kinds::daemon_source_admission`, judges files on
//! the machine under the operator's `--daemon-source-dir`, not the object: no schema can say
//! it, and in a cluster the controller refuses every host-path source.)
//!
//! How the apiserver's semantics are reproduced:
//! - `nullable: true` lets `null` through with no other check, as kube-openapi validates a
//!   null value only for type and enum (see `as_json_schema`).
//! - patterns run on the `regex` crate, which like the apiserver's RE2 has no lookaround, so
//!   a pattern that only a backtracking engine could run fails here.
//! - CEL sees null-valued fields as absent (`has()` is false on them), as the apiserver does:
//!   nulls are removed before the rules run.
//!
//! Where kube's CEL evaluator is not cel-go: its `duration()` does not read `µs` and
//! saturates instead of failing on a value past Go's range, so the table has no `µs` duration
//! and no overflowing one (the store's side of both is in `go_duration`'s tests; on a cluster,
//! `duration()` is Go's `time.ParseDuration` and agrees with it).

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::crd;
use super::validation::FORBIDDEN_INSTALL_DIRS;
use crate::store::kinds;

/// Which kind a case is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Link,
    Injection,
}

impl Resource {
    fn plural(self) -> &'static str {
        match self {
            Resource::Link => "previewlinks",
            Resource::Injection => "daemoninjections",
        }
    }
}

/// One row: a spec, and the field the store names when it refuses it (`None`: accepted).
struct Case {
    kind: Resource,
    spec: Value,
    refused_at: Option<&'static str>,
}

/// A link to `web:8080` with `extra`'s fields set.
fn link(extra: Value) -> Value {
    let mut spec = json!({"target": {"docker": {"container": "web"}}, "port": 8080});
    merge(&mut spec, extra);
    spec
}

/// An injection into `web` with `daemon` as its daemon.
fn injection(daemon: Value) -> Value {
    json!({"target": {"docker": {"container": "web"}}, "daemon": daemon})
}

/// An injection of a daemon with a source (so that its other settings are allowed) and
/// `extra`'s fields.
fn sourced(extra: Value) -> Value {
    let mut d = json!({"source": {"hostPath": "/usr/local/bin/d"}});
    merge(&mut d, extra);
    injection(d)
}

/// Sets `extra`'s keys on `base` (shallow: each case names whole fields, nulls included).
fn merge(base: &mut Value, extra: Value) {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
}

/// JSON strings.
fn strs<S: AsRef<str>>(values: impl IntoIterator<Item = S>) -> Vec<Value> {
    values.into_iter().map(|v| json!(v.as_ref())).collect()
}

/// The cases of one field: `make` puts a value where it belongs in a spec; the store names
/// `at` when it refuses one of `bad`.
fn field(
    kind: Resource,
    at: &'static str,
    make: impl Fn(Value) -> Value,
    good: Vec<Value>,
    bad: Vec<Value>,
) -> Vec<Case> {
    let good = good.into_iter().map(|v| (v, None));
    let bad = bad.into_iter().map(|v| (v, Some(at)));
    good.chain(bad)
        .map(|(v, refused_at)| Case {
            kind,
            spec: make(v),
            refused_at,
        })
        .collect()
}

// A table: one group a line or two, easier to read (and to extend) than rustfmt's layout.
#[rustfmt::skip]
fn cases() -> Vec<Case> {
    use Resource::{Injection as I, Link as L};
    let long = |n: usize| "a".repeat(n);
    let under_forbidden_dirs = FORBIDDEN_INSTALL_DIRS.iter().map(|d| format!("{d}/agent"));
    let mut groups = vec![
        // Targets.
        field(L, "spec.target.docker.container", |v| link(json!({"target": {"docker": {"container": v}}})),
            strs(["web", "My_app.1-x", &long(128), "0123456789abcdef"]),
            strs(["", "-x", "_x", "../etc", "a/b", "a b", "web\n", "w\u{e9}b", &long(129)])),
        field(L, "spec.target.pod.name", |v| link(json!({"target": {"pod": {"name": v}}})),
            strs(["api-0", "my.pod.v1", "0", &long(253), &format!("{}.{}", long(126), long(126))]),
            strs(["", "Upper", "-lead", "trail-", "a..b", "a.-b", "a-.b", ".a", "a.", "under_score", &long(254)])),
        field(L, "spec.target.pod.container", |v| link(json!({"target": {"pod": {"name": "p", "container": v}}})),
            vec![json!("app"), json!(long(63)), Value::Null],
            strs(["", "a.b", "App", "-a", &long(64)])),
        field(L, "spec.target", |v| link(json!({"target": v})),
            vec![],
            vec![json!({}), json!({"docker": {"container": "a"}, "pod": {"name": "b"}})]),
        field(L, "spec", |v| v,
            vec![link(json!({"access": "public", "via": "direct"})), link(json!({"access": "token", "via": "agent"})), link(json!({"via": "auto"}))],
            vec![json!({"port": 80}), link(json!({"access": "everyone"})), link(json!({"via": "magic"})), link(json!({"port": "80"}))]),
        field(L, "spec.port", |v| link(json!({"port": v})),
            vec![json!(1), json!(65535)],
            vec![json!(0), json!(-1), json!(65536)]),
        // Lifetime. The bad ttls are not Go durations, and kube's own parser takes every one of
        // them (`1h-2m` panics it); the first is the ttl that broke every watcher.
        field(L, "spec", |v| link(json!({"ttl": v})),
            strs(["90m", "1h30m", "1.5h", ".5h", "1.h", "+1h", "1us", "1ms", "10s", "1ns", "0.0000000001h", "2562047h"]),
            strs(["banana", "", "1", "1h0", "+-1h", "--1h", "1h+2m", "1h-2m", "1d", "1e3s", "1H", " 1h", "1h ", ".h", "1.5.5h", "inf"])
                .into_iter().chain([json!(90)]).collect()),
        // Go durations that are not positive (Go reads `0.1ns` as zero).
        field(L, "spec.ttl", |v| link(json!({"ttl": v})),
            vec![Value::Null],
            strs(["0", "0s", "-1h", "-0s", "0.1ns", "0.0h"])),
        field(L, "spec.ttl", |v| link(json!({"ttl": v, "expiresAt": "2030-01-01T00:00:00Z"})),
            vec![Value::Null],
            strs(["1h"])),
        field(L, "spec", |v| link(json!({"expiresAt": v})),
            strs(["2030-01-01T00:00:00Z", "2030-01-01T00:00:00.5+02:00"]),
            strs(["banana", "2030-01-01"])),
        // Upstream Host and CORS.
        field(L, "spec.hostRewrite", |v| link(json!({"hostRewrite": v})),
            strs(["localhost:3000", "[::1]:8080", "app.example", &long(261)]),
            strs(["", "a b", "evil.example/x", "h\r\nX-Injected: 1", "a@b", &long(262)])),
        field(L, "spec.cors.allowOrigins[0]", |v| link(json!({"cors": {"allowOrigins": [v], "allowCredentials": false}})),
            strs(["*", "https://app.example", "http://localhost:3000", "https://\u{e9}.example", "http://"]),
            strs(["ftp://x", "null", "**", "https://a b", "https://a\u{1}", "https://a\u{7f}", "HTTPS://x", ""])),
        field(L, "spec.cors.allowCredentials", |v| link(json!({"cors": {"allowOrigins": ["https://app.example", "*"], "allowCredentials": v}})),
            vec![json!(false)],
            vec![json!(true)]),
        field(L, "spec.cors.allowCredentials", |v| link(json!({"cors": {"allowOrigins": ["https://app.example"], "allowCredentials": v}})),
            vec![json!(true)],
            vec![]),
        // Path links.
        field(L, "spec", |v| link(json!({"pathPrefix": v})),
            strs(["strip", "keep"]),
            strs(["drop", "Keep", ""])),
        field(L, "spec", |v| link(json!({"cors": v})),
            vec![json!({}), json!({"allowOrigins": []})],
            vec![json!({"allowOrigins": "*"})]),
        // Injections: the built-in agent, and the settings that need a source.
        field(I, "spec", |v| v,
            vec![json!({"target": {"docker": {"container": "web"}}}), injection(json!({})), injection(Value::Null),
                injection(json!({"user": "1000:1000"})), injection(json!({"args": [], "env": [], "source": null}))],
            vec![json!({"daemon": {}}), injection(json!({"source": {}})), injection(json!({"source": {"image": "x"}}))]),
        field(I, "spec.target.pod.name", |v| json!({"target": {"pod": {"name": v, "container": "app"}}}),
            strs(["web"]),
            strs(["Web"])),
        field(I, "spec.daemon.args", |v| injection(json!({"args": v})), vec![json!([])], vec![json!(["-v"])]),
        field(I, "spec.daemon.env", |v| injection(json!({"env": v})), vec![json!([])], vec![json!([{"name": "A"}])]),
        field(I, "spec.daemon.port", |v| injection(json!({"port": v, "source": null})), vec![Value::Null], vec![json!(8080)]),
        field(I, "spec.daemon.installPath", |v| injection(json!({"installPath": v})), vec![Value::Null], strs(["/opt/d"])),
        field(I, "spec.daemon.readinessProbe", |v| injection(json!({"readinessProbe": v})), vec![Value::Null], vec![json!({"tcp": {}})]),
        // What a daemon with a source may set.
        field(I, "spec.daemon.source.hostPath", |v| injection(json!({"source": {"hostPath": v}})),
            strs(["/usr/local/bin/d", "/d"]),
            strs(["", "relative/d", "./d", "~/d"])),
        field(I, "spec", |v| sourced(json!({"args": v})),
            vec![json!(["-v", "--port=1", ""])],
            vec![json!("-v"), json!([1])]),
        field(I, "spec.daemon.env[0].name", |v| sourced(json!({"env": [{"name": v, "value": "x"}]})),
            strs(["A", "A_1", "_b", "lower"]),
            strs(["", "1A", "A-B", "A=B", "A B", "\u{c4}"])),
        // The store names the variable's name for a NUL in its value; the schema its value.
        field(I, "spec.daemon.env[1]", |v| sourced(json!({"env": [{"name": "A"}, {"name": "B", "value": v}]})),
            strs(["", "x y", "\u{e9}\n"]),
            strs(["x\u{0}y"])),
        field(I, "spec.daemon.port", |v| sourced(json!({"port": v})),
            vec![json!(1), json!(65535)],
            vec![json!(0), json!(65536)]),
        field(I, "spec.daemon.installPath", |v| sourced(json!({"installPath": v})),
            strs(["/.previewd/agent", "/opt/..d/.x/.../d", "/tmpfs/agent", "/runner/d"]).into_iter()
                .chain(strs(FORBIDDEN_INSTALL_DIRS)).collect(),
            strs(["", "relative", "/", "/a/../b", "/a/./b", "/a/..", "/./a", "//a", "/a/", "/a//b", "/dev/shm/agent"]).into_iter()
                .chain(strs(under_forbidden_dirs)).collect()),
        field(I, "spec.daemon.readinessProbe.http.path", |v| sourced(json!({"readinessProbe": {"http": {"path": v}}})),
            strs(["/", "/healthz?x=1"]),
            strs(["", "healthz", " /"])),
        field(I, "spec.daemon.readinessProbe.http.port", |v| sourced(json!({"readinessProbe": {"http": {"path": "/", "port": v}}})),
            vec![json!(8080), Value::Null],
            vec![json!(0), json!(65536)]),
        field(I, "spec.daemon.readinessProbe.tcp.port", |v| sourced(json!({"readinessProbe": {"tcp": {"port": v}}})),
            vec![json!(1), Value::Null],
            vec![json!(0), json!(70000)]),
        field(I, "spec", |v| sourced(json!({"readinessProbe": v})),
            vec![json!({"tcp": {}})],
            vec![json!({}), json!({"http": {"path": "/"}, "tcp": {}}), json!({"exec": {}})]),
        field(I, "spec.daemon.user", |v| injection(json!({"user": v})),
            strs(["0:0", "1000:1000", "4294967295:4294967295"]),
            strs(["", "1000", "app:app", "1000:", ":1000", "1:2:3", "12345678901:1", " 1:1", "1:1\n", "-1:0"])),
    ];
    // Upstream timeouts: positive Go durations, as ttl is.
    for (name, at) in [("connect", "spec.timeouts.connect"), ("response", "spec.timeouts.response"), ("idle", "spec.timeouts.idle")] {
        let timeouts = move |v| link(json!({"timeouts": {name: v}}));
        groups.push(field(L, "spec", timeouts,
            strs(["10s", "1.5m", "500ms", "+2h"]),
            strs(["banana", "", "10", "1h-2m", "1d", "1h0"])));
        groups.push(field(L, at, timeouts, vec![Value::Null], strs(["0s", "-1s", "0.1ns"])));
    }
    groups.push(field(L, "spec", |v| link(json!({"timeouts": v})),
        vec![json!({}), Value::Null, json!({"connect": "1s", "response": "2m", "idle": "1h"})],
        vec![json!("10s")]));
    groups.into_iter().flatten().collect()
}

/// The store's verdict: the fields it names, none when it accepts.
fn store_errors(kind: Resource, spec: &Value) -> Vec<String> {
    let validate = kinds::all()
        .into_iter()
        .find(|k| k.plural == kind.plural())
        .and_then(|k| k.validate)
        .expect("custom kinds have a validator");
    let mut obj = json!({
        "apiVersion": super::API_VERSION,
        "metadata": {"name": "x", "namespace": "default"},
        "spec": spec,
    });
    validate(&mut obj).into_iter().map(|e| e.field).collect()
}

/// The CRD's schema for `kind`, as generated from the types.
fn crd_schema(kind: Resource) -> Value {
    let crd = crd::all()
        .into_iter()
        .find(|c| c.spec.names.plural == kind.plural())
        .expect("a CRD per kind");
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("an openAPIV3Schema");
    serde_json::to_value(schema).expect("the schema serializes")
}

/// An OpenAPI v3 structural schema as JSON Schema. A `nullable` schema lets `null` through
/// with no other check, as kube-openapi does (it checks a null value for type and enum only):
/// `null` joins its `type` and `enum`, and its `oneOf` (which a null would fail, meeting every
/// branch) applies to non-null values only.
fn as_json_schema(schema: &Value) -> Value {
    let Value::Object(map) = schema else {
        return schema.clone();
    };
    let mut out = serde_json::Map::new();
    for (key, value) in map {
        let converted = match (key.as_str(), value) {
            ("nullable", _) => continue,
            // Maps of names to schemas: the names are not keywords.
            ("properties", Value::Object(props)) => Value::Object(
                props
                    .iter()
                    .map(|(k, v)| (k.clone(), as_json_schema(v)))
                    .collect(),
            ),
            (_, Value::Array(items)) => Value::Array(items.iter().map(as_json_schema).collect()),
            (_, Value::Object(_)) => as_json_schema(value),
            _ => value.clone(),
        };
        out.insert(key.clone(), converted);
    }
    if map.get("nullable") == Some(&Value::Bool(true)) {
        if let Some(t) = out.remove("type") {
            out.insert("type".into(), json!([t, "null"]));
        }
        if let Some(Value::Array(values)) = out.get_mut("enum") {
            values.push(Value::Null);
        }
        if let Some(one_of) = out.remove("oneOf") {
            assert!(!out.contains_key("anyOf"), "a schema with oneOf and anyOf");
            out.insert("anyOf".into(), json!([{"type": "null"}, {"oneOf": one_of}]));
        }
    }
    Value::Object(out)
}

/// `value` with every null-valued field removed, as CEL sees it on a cluster.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// What a CRD checks: its OpenAPI schema, and its CEL rules.
struct Crd {
    schema: Value,
    openapi: jsonschema::Validator,
    rules: kube::core::cel::CompiledSchema,
}

impl Crd {
    fn of(kind: Resource) -> Crd {
        let schema = crd_schema(kind);
        let openapi = jsonschema::options()
            .with_pattern_options(jsonschema::PatternOptions::regex())
            .should_validate_formats(true)
            .build(&as_json_schema(&schema))
            .expect("the CRD schema compiles as JSON Schema");
        let rules = kube::core::cel::compile_schema(&schema);
        Crd {
            schema,
            openapi,
            rules,
        }
    }

    /// The CRD's verdict: where its OpenAPI schema and its CEL rules refuse the object
    /// (JSON pointers), with what they say; none when both accept.
    fn errors(&self, spec: &Value) -> Vec<(String, String)> {
        let obj = json!({
            "apiVersion": super::API_VERSION,
            "kind": "X",
            "metadata": {"name": "x", "namespace": "default"},
            "spec": spec,
        });
        let mut errs: Vec<(String, String)> = self
            .openapi
            .iter_errors(&obj)
            .map(|e| (e.instance_path().to_string(), format!("openapi: {e}")))
            .collect();
        let cel = kube::core::cel::Validator::new().validate_compiled(
            &self.rules,
            &without_nulls(&obj),
            None,
        );
        if let Err(cel) = cel {
            errs.extend(cel.iter().map(|e| {
                let at = format!("/{}", e.field_path.replace('.', "/"));
                (at, format!("cel: {} ({:?})", e.message, e.kind))
            }));
        }
        errs
    }
}

/// Whether `path` is `at` or inside it, for dotted store fields (`a.b[0].c`) and JSON pointers
/// (`/a/b/0/c`) alike.
fn within(path: &str, at: &str) -> bool {
    path.strip_prefix(at)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[', '/']))
}

/// A store field (`spec.env[0].name`) as a JSON pointer (`/spec/env/0/name`).
fn pointer(field: &str) -> String {
    format!("/{}", field.replace(['.', '['], "/").replace(']', ""))
}

#[test]
fn the_crd_schema_and_the_store_refuse_the_same_specs() {
    let (links, injections) = (Crd::of(Resource::Link), Crd::of(Resource::Injection));
    let mut disagreements = Vec::new();
    let cases = cases();
    for case in &cases {
        let crd = match case.kind {
            Resource::Link => &links,
            Resource::Injection => &injections,
        };
        let store = store_errors(case.kind, &case.spec);
        let schema = crd.errors(&case.spec);
        let verdict = match case.refused_at {
            None if store.is_empty() && schema.is_empty() => continue,
            None => "should be accepted",
            Some(at)
                if store.iter().any(|f| within(f, at))
                    && schema.iter().any(|(p, _)| within(p, &pointer(at))) =>
            {
                continue;
            }
            Some(_) => "should be refused there",
        };
        disagreements.push(format!(
            "{:?} {} {verdict} (at {:?}): store {store:?}, schema {schema:?}",
            case.kind, case.spec, case.refused_at
        ));
    }
    assert!(
        disagreements.is_empty(),
        "{} of {} cases disagree:\n{}",
        disagreements.len(),
        cases.len(),
        disagreements.join("\n")
    );
}

/// Both halves of the CRD's check refuse on their own (a check that cannot fail proves
/// nothing), and every CEL rule compiles and passes kube's static analysis for CRD rules
/// (only `self` and `oldSelf` in scope, within the apiserver's cost budget).
#[test]
fn both_schema_checks_can_refuse_and_every_rule_compiles() {
    let links = Crd::of(Resource::Link);
    let banana = links.errors(&link(json!({"ttl": "banana"})));
    assert!(
        banana
            .iter()
            .any(|(p, m)| p == "/spec/ttl" && m.starts_with("openapi")),
        "{banana:?}"
    );
    let zero = links.errors(&link(json!({"ttl": "0s"})));
    assert!(
        zero.iter()
            .any(|(p, m)| p == "/spec/ttl" && m.starts_with("cel") && m.contains("positive")),
        "{zero:?}"
    );
    for kind in [Resource::Link, Resource::Injection] {
        let crd = Crd::of(kind);
        let mut rules = 0;
        each_node(&crd.schema, &mut |node| {
            let compiled = kube::core::cel::compile_schema(node);
            assert!(
                !compiled.has_errors(),
                "{:?}",
                compiled.compilation_errors()
            );
            for rule in node["x-kubernetes-validations"]
                .as_array()
                .into_iter()
                .flatten()
            {
                rules += 1;
                let text = rule["rule"].as_str().unwrap_or_default();
                let warnings = kube::core::cel::analyze_rule(
                    text,
                    &compiled,
                    kube::core::cel::ScopeContext::CrdValidation,
                );
                assert!(warnings.is_empty(), "{text}: {warnings:?}");
            }
        });
        // The walk reached every rule there is.
        let text = crd.schema.to_string();
        assert_eq!(rules, text.matches("\"rule\":").count(), "{kind:?}");
    }
}

/// Calls `f` on every schema node of `schema` that carries CEL rules.
fn each_node(schema: &Value, f: &mut impl FnMut(&Value)) {
    if schema.get("x-kubernetes-validations").is_some() {
        f(schema);
    }
    let properties = schema
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|m| m.values());
    for child in properties.chain(schema.get("items")) {
        each_node(child, f);
    }
}

/// The JSON pointers (array items without their index) of every field `value` holds, under
/// `at`.
fn fields_of(value: &Value, at: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let here = format!("{at}/{k}");
                out.insert(here.clone());
                fields_of(v, &here, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| fields_of(v, at, out)),
        _ => {}
    }
}

/// The JSON pointers (array items without their index) of every property a schema declares,
/// under `at`.
fn properties_of(schema: &Value, at: &str, out: &mut BTreeSet<String>) {
    for (k, v) in schema["properties"].as_object().into_iter().flatten() {
        let here = format!("{at}/{k}");
        out.insert(here.clone());
        properties_of(v, &here, out);
    }
    if let Some(items) = schema.get("items") {
        properties_of(items, at, out);
    }
}

/// Every spec field the CRDs declare appears in the table: a field added to a type without
/// cases here fails, so its check (or the lack of one) gets written down.
#[test]
fn the_table_covers_every_spec_field() {
    let cases = cases();
    for kind in [Resource::Link, Resource::Injection] {
        let mut declared = BTreeSet::new();
        properties_of(
            &crd_schema(kind)["properties"]["spec"],
            "/spec",
            &mut declared,
        );
        let mut covered = BTreeSet::new();
        for case in cases.iter().filter(|c| c.kind == kind) {
            fields_of(&case.spec, "/spec", &mut covered);
        }
        let missing: Vec<&String> = declared.difference(&covered).collect();
        assert!(missing.is_empty(), "{kind:?}: no case sets {missing:?}");
    }
}

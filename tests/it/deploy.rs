//! The cluster deployment, checked by machine: every manifest under `deploy/` and `crds/`
//! parses strictly into its Kubernetes type; the Deployment, Services, RBAC and the example
//! Ingress hold the properties previewd relies on; the ClusterRole grants exactly what the code
//! calls (with [`not_allowed`] for checking further calls); and the `Dockerfile` builds an image
//! that runs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    Container, Namespace, PodSecurityContext, SecurityContext, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use previewd::controller::link::{LinkConfig, UrlStyle};
use previewd::proxy::routes::route;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::common::{API_ONLY, Server, require_tool};

const NAMESPACE: &str = "previewd";
const NAME: &str = "previewd";
const TOKEN_SECRET: &str = "previewd-api-token";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// `deploy/kustomization.yaml`: only the fields previewd's kustomizations use, so an
/// unexpected one (a typo, a transformer nobody reviewed) fails to parse.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Kustomization {
    /// Matched by [`load`] before parsing, as `kind` is.
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    resources: Vec<String>,
}

/// The objects of some manifest files, typed.
#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    ingresses: Vec<Ingress>,
    crds: Vec<CustomResourceDefinition>,
    kustomizations: Vec<Kustomization>,
    /// Where each object came from and what it is.
    objects: Vec<ObjectId>,
}

/// One object of the manifests: its file, kind, namespace and name.
struct ObjectId {
    file: PathBuf,
    kind: String,
    namespace: Option<String>,
    name: String,
}

/// `value` as a `T`, refusing anything `T` does not carry over: k8s-openapi's types skip
/// unknown fields when deserializing, so the typed value is serialized back and compared with
/// the input, and the first path where they differ is the error.
fn strict<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T, String> {
    let typed: T = serde_path_to_error::deserialize(value).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match first_difference(value, &back, String::new()) {
        None => Ok(typed),
        Some(path) => Err(format!(
            "{path}: unknown to {} (or changed by it)",
            std::any::type_name::<T>()
        )),
    }
}

/// The first JSON path at which `a` and `b` differ.
fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(v), Some(w)) => first_difference(v, w, format!("{path}.{k}")),
                _ => Some(format!("{path}.{k}")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{path}[{i}]"))),
        _ => (a != b).then(|| if path.is_empty() { ".".into() } else { path }),
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(path);
        }
    }
}

/// The YAML documents of one file (empty documents left out).
fn documents(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn push<T: DeserializeOwned + Serialize>(file: &Path, doc: &Value, into: &mut Vec<T>) {
    into.push(strict(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display())));
}

/// Every YAML file under the given repository directories.
fn files_under(dirs: &[&str]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in dirs {
        yaml_files(&repo(dir), &mut files);
    }
    files.sort();
    files
}

/// Parses every YAML document of `files` into its type; an unknown kind or field fails.
fn load(files: &[PathBuf]) -> Manifests {
    let mut m = Manifests::default();
    for file in files {
        for doc in documents(file) {
            let s = |p: &str| doc.pointer(p).and_then(Value::as_str).unwrap_or_default();
            let (api_version, kind) = (s("/apiVersion"), s("/kind"));
            match (api_version, kind) {
                ("v1", "Namespace") => push(file, &doc, &mut m.namespaces),
                ("v1", "ServiceAccount") => push(file, &doc, &mut m.service_accounts),
                ("v1", "Service") => push(file, &doc, &mut m.services),
                ("apps/v1", "Deployment") => push(file, &doc, &mut m.deployments),
                ("networking.k8s.io/v1", "Ingress") => push(file, &doc, &mut m.ingresses),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    push(file, &doc, &mut m.cluster_roles)
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    push(file, &doc, &mut m.cluster_role_bindings)
                }
                ("rbac.authorization.k8s.io/v1", "Role") => push(file, &doc, &mut m.roles),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                    push(file, &doc, &mut m.role_bindings)
                }
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                    push(file, &doc, &mut m.crds)
                }
                ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                    let k = serde_path_to_error::deserialize(&doc)
                        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                    m.kustomizations.push(k);
                    continue;
                }
                _ => panic!("{}: unexpected object {api_version}/{kind}", file.display()),
            }
            m.objects.push(ObjectId {
                file: file.clone(),
                kind: kind.to_owned(),
                namespace: doc
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                name: s("/metadata/name").to_owned(),
            });
        }
    }
    m
}

/// The files `deploy/kustomization.yaml` lists: what `kubectl apply -k deploy/` applies.
fn base_files() -> Vec<PathBuf> {
    let m = load(&[repo("deploy/kustomization.yaml")]);
    let k = only(&m.kustomizations, "kustomization");
    k.resources.iter().map(|r| repo("deploy").join(r)).collect()
}

/// The objects of the base.
fn base() -> Manifests {
    load(&base_files())
}

fn only<'a, T>(items: &'a [T], what: &str) -> &'a T {
    match items {
        [one] => one,
        _ => panic!("expected exactly one {what}, found {}", items.len()),
    }
}

/// An API call as RBAC authorizes it: (apiGroup, resource or `resource/subresource`, verb),
/// e.g. `("previewd.dev", "previewlinks/status", "patch")`.
pub type Call<'a> = (&'a str, &'a str, &'a str);

/// The calls of `calls` that no rule of `rules` allows, in their order: empty when the role
/// suffices. Matching follows the API server's RBAC authorizer (`*` in groups, resources and
/// verbs; `*/sub` for a subresource of any resource). A rule limited to `resourceNames` counts
/// as not allowing: previewd's calls name objects it cannot know in advance.
pub fn not_allowed<'a>(rules: &[PolicyRule], calls: &[Call<'a>]) -> Vec<Call<'a>> {
    calls
        .iter()
        .copied()
        .filter(|call| !rules.iter().any(|rule| allows(rule, *call)))
        .collect()
}

fn allows(rule: &PolicyRule, (group, resource, verb): Call<'_>) -> bool {
    let any_of = |list: Option<&Vec<String>>, want: &str| {
        list.into_iter().flatten().any(|x| x == "*" || x == want)
    };
    let subresource = resource.split_once('/').map(|(_, sub)| format!("*/{sub}"));
    let resource_matches = rule
        .resources
        .iter()
        .flatten()
        .any(|r| r == "*" || r == resource || Some(r) == subresource.as_ref());
    any_of(rule.api_groups.as_ref(), group)
        && resource_matches
        && any_of(Some(&rule.verbs), verb)
        && rule.resource_names.as_ref().is_none_or(Vec::is_empty)
}

fn binds_previewd(subjects: Option<&Vec<k8s_openapi::api::rbac::v1::Subject>>) -> bool {
    subjects.into_iter().flatten().any(|s| {
        s.kind == "ServiceAccount" && s.name == NAME && s.namespace.as_deref() == Some(NAMESPACE)
    })
}

/// The rules previewd holds in every namespace: those of the ClusterRoles that the base's
/// ClusterRoleBindings grant to its ServiceAccount.
pub fn cluster_rules() -> Vec<PolicyRule> {
    let m = base();
    m.cluster_role_bindings
        .iter()
        .filter(|b| b.role_ref.kind == "ClusterRole" && binds_previewd(b.subjects.as_ref()))
        .flat_map(|b| {
            m.cluster_roles
                .iter()
                .filter(move |r| r.metadata.name.as_deref() == Some(b.role_ref.name.as_str()))
        })
        .flat_map(|r| r.rules.clone().unwrap_or_default())
        .collect()
}

/// The rules previewd holds in its own namespace (`previewd`, where its leader-election Lease
/// lives): the cluster-wide ones plus those of the Roles bound there to its ServiceAccount.
pub fn own_namespace_rules() -> Vec<PolicyRule> {
    let m = base();
    let mut rules = cluster_rules();
    for b in &m.role_bindings {
        if b.metadata.namespace.as_deref() != Some(NAMESPACE)
            || b.role_ref.kind != "Role"
            || !binds_previewd(b.subjects.as_ref())
        {
            continue;
        }
        rules.extend(
            m.roles
                .iter()
                .filter(|r| {
                    r.metadata.name.as_deref() == Some(b.role_ref.name.as_str())
                        && r.metadata.namespace.as_deref() == Some(NAMESPACE)
                })
                .flat_map(|r| r.rules.clone().unwrap_or_default()),
        );
    }
    rules
}

/// The API calls the code makes today, read from `src/controller/*.rs`, `src/proxy/mod.rs`
/// and `src/api/shim/*.rs`.
const CALLS_TODAY: &[Call<'static>] = &[
    // Controllers (watcher: list + watch), the proxy's reflector, the shim's lists and waits.
    ("previewd.dev", "previewlinks", "list"),
    ("previewd.dev", "previewlinks", "watch"),
    ("previewd.dev", "daemoninjections", "list"),
    ("previewd.dev", "daemoninjections", "watch"),
    // get_opt/get in the reconcilers and the shim.
    ("previewd.dev", "previewlinks", "get"),
    ("previewd.dev", "daemoninjections", "get"),
    // The shim creates both kinds; a link creates its shared injection.
    ("previewd.dev", "previewlinks", "create"),
    ("previewd.dev", "daemoninjections", "create"),
    // kube's finalizer helper (JSON patch of metadata.finalizers), owner and spec merge patches.
    ("previewd.dev", "previewlinks", "patch"),
    ("previewd.dev", "daemoninjections", "patch"),
    // The shim's revoke and remove; a link drops its injection when it was the last owner.
    ("previewd.dev", "previewlinks", "delete"),
    ("previewd.dev", "daemoninjections", "delete"),
    // write_status: a JSON patch of /status.
    ("previewd.dev", "previewlinks/status", "patch"),
    ("previewd.dev", "daemoninjections/status", "patch"),
    // Owner references with blockOwnerDeletion (controller_owner_ref) on Secrets and on the
    // shared injection.
    ("previewd.dev", "previewlinks/finalizers", "update"),
    ("previewd.dev", "daemoninjections/finalizers", "update"),
    // Token and agent Secrets: secret_value (get, create), delete_secret, the shim's reads,
    // the proxy's reflector over previewd's Secrets.
    ("", "secrets", "get"),
    ("", "secrets", "create"),
    ("", "secrets", "delete"),
    ("", "secrets", "list"),
    ("", "secrets", "watch"),
    // kube::runtime::events::Recorder: create, then patch a repeated event.
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
];

/// Leader election between the replicas (kube-lease-manager), on a Lease in previewd's
/// namespace.
const LEADER_ELECTION: &[Call<'static>] = &[
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
    ("coordination.k8s.io", "leases", "patch"),
];

/// Pod targets: read the pod, inject over exec (a WebSocket upgrade of a GET, or a POST).
const POD_TARGETS: &[Call<'static>] = &[
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "pods/exec", "get"),
    ("", "pods/exec", "create"),
];

#[test]
fn the_roles_allow_every_call_previewd_makes() {
    let everywhere = cluster_rules();
    assert!(
        !everywhere.is_empty(),
        "no ClusterRole is bound to previewd"
    );
    assert_eq!(not_allowed(&everywhere, CALLS_TODAY), vec![]);
    assert_eq!(not_allowed(&everywhere, POD_TARGETS), vec![]);
    assert_eq!(not_allowed(&own_namespace_rules(), LEADER_ELECTION), vec![]);
    // Leases are granted in previewd's namespace only.
    assert_eq!(not_allowed(&everywhere, LEADER_ELECTION), LEADER_ELECTION);
}

#[test]
fn not_allowed_names_what_a_role_lacks() {
    let rules = cluster_rules();
    let calls = [
        ("previewd.dev", "previewlinks", "get"),
        ("previewd.dev", "previewlinks/status", "delete"),
        ("", "pods/log", "get"),
        ("", "nodes", "list"),
        ("apps", "deployments", "create"),
        ("", "secrets", "deletecollection"),
        ("", "events", "create"),
    ];
    assert_eq!(not_allowed(&rules, &calls), calls[1..].to_vec());

    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str], names: &[&str]| {
        let strings = |xs: &[&str]| xs.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        PolicyRule {
            api_groups: Some(strings(groups)),
            resources: Some(strings(resources)),
            verbs: strings(verbs),
            resource_names: (!names.is_empty()).then(|| strings(names)),
            ..Default::default()
        }
    };
    let wildcards = [
        rule(&["*"], &["*/status"], &["patch"], &[]),
        rule(&["apps"], &["*"], &["*"], &[]),
        rule(&[""], &["configmaps"], &["get"], &["only-this-one"]),
    ];
    let calls = [
        ("previewd.dev", "previewlinks/status", "patch"),
        ("previewd.dev", "previewlinks", "patch"),
        ("apps", "deployments/scale", "update"),
        ("", "configmaps", "get"),
    ];
    assert_eq!(
        not_allowed(&wildcards, &calls),
        vec![calls[1], calls[3]],
        "`*/status` covers status only, `*` every resource, resourceNames no unnamed call"
    );
}

/// Every (group, resource, verb) a set of rules grants, spelled out.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        assert!(
            r.resource_names.is_none() && r.non_resource_urls.is_none(),
            "unexpected rule shape: {r:?}"
        );
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

fn spelled(table: &[(&str, &[&str], &[&str])]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (group, resources, verbs) in table {
        for r in *resources {
            for v in *verbs {
                out.insert(((*group).to_owned(), (*r).to_owned(), (*v).to_owned()));
            }
        }
    }
    out
}

#[test]
fn the_roles_grant_nothing_beyond_what_previewd_needs() {
    const RW: &[&str] = &[
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    let expected = spelled(&[
        ("previewd.dev", &["previewlinks", "daemoninjections"], RW),
        (
            "previewd.dev",
            &["previewlinks/status", "daemoninjections/status"],
            &["get", "update", "patch"],
        ),
        (
            "previewd.dev",
            &["previewlinks/finalizers", "daemoninjections/finalizers"],
            &["update"],
        ),
        ("", &["secrets"], RW),
        ("events.k8s.io", &["events"], &["create", "patch"]),
        ("", &["pods"], &["get", "list", "watch"]),
        ("", &["pods/exec"], &["get", "create"]),
    ]);
    assert_eq!(grants(&cluster_rules()), expected);
    let m = base();
    let role = only(&m.roles, "Role");
    assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(
        grants(role.rules.as_deref().unwrap_or_default()),
        spelled(&[(
            "coordination.k8s.io",
            &["leases"],
            &["get", "create", "update", "patch"]
        )])
    );
}

#[test]
fn the_bindings_name_existing_roles_and_previewds_service_account() {
    let m = base();
    let sa = only(&m.service_accounts, "ServiceAccount");
    assert_eq!(
        (
            sa.metadata.namespace.as_deref(),
            sa.metadata.name.as_deref()
        ),
        (Some(NAMESPACE), Some(NAME))
    );
    let crb = only(&m.cluster_role_bindings, "ClusterRoleBinding");
    assert_eq!(crb.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(crb.role_ref.kind, "ClusterRole");
    let cr = only(&m.cluster_roles, "ClusterRole");
    assert_eq!(
        cr.metadata.name.as_deref(),
        Some(crb.role_ref.name.as_str())
    );
    assert!(binds_previewd(crb.subjects.as_ref()), "{crb:?}");
    let rb = only(&m.role_bindings, "RoleBinding");
    let role = only(&m.roles, "Role");
    assert_eq!(
        (rb.role_ref.kind.as_str(), Some(rb.role_ref.name.as_str())),
        ("Role", role.metadata.name.as_deref())
    );
    assert_eq!(rb.metadata.namespace, role.metadata.namespace);
    assert!(binds_previewd(rb.subjects.as_ref()), "{rb:?}");
}

#[test]
fn every_manifest_parses_strictly_into_its_type() {
    let m = load(&files_under(&["deploy", "crds"]));
    let mut crds: Vec<_> = m
        .crds
        .iter()
        .filter_map(|c| c.metadata.name.as_deref())
        .collect();
    crds.sort_unstable();
    assert_eq!(
        crds,
        ["daemoninjections.previewd.dev", "previewlinks.previewd.dev"]
    );
    let kinds: BTreeSet<&str> = m.objects.iter().map(|o| o.kind.as_str()).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "Ingress",
    ] {
        assert!(kinds.contains(kind), "no {kind} under deploy/");
    }
    // The objects previewd ships in its namespace are in it.
    let namespaced = [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "Ingress",
    ];
    for o in &m.objects {
        let expected = namespaced.contains(&o.kind.as_str()).then_some(NAMESPACE);
        assert_eq!(
            o.namespace.as_deref(),
            expected,
            "{} {} in {}",
            o.kind,
            o.name,
            o.file.display()
        );
    }
    let ns = only(&m.namespaces, "Namespace");
    assert_eq!(ns.metadata.name.as_deref(), Some(NAMESPACE));
}

#[test]
fn strict_parsing_refuses_unknown_and_mistyped_fields() {
    let service = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80}]}
    });
    assert!(strict::<Service>(&service).is_ok());
    let mut typo = service.clone();
    typo["spec"]["selectr"] = serde_json::json!({"app": "x"});
    assert_eq!(
        strict::<Service>(&typo)
            .err()
            .as_deref()
            .and_then(|e| e.split(':').next()),
        Some(".spec.selectr")
    );
    let mut mistyped = service;
    mistyped["spec"]["ports"][0]["port"] = serde_json::json!("eighty");
    let err = strict::<Service>(&mistyped).err().unwrap_or_default();
    assert!(err.starts_with("spec.ports[0].port"), "{err}");
}

#[test]
fn the_kustomization_lists_the_base_and_leaves_the_examples_out() {
    let listed: BTreeSet<PathBuf> = base_files().into_iter().collect();
    for f in &listed {
        assert!(f.is_file(), "{} is listed but missing", f.display());
    }
    let beside: BTreeSet<PathBuf> = std::fs::read_dir(repo("deploy"))
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    assert_eq!(
        listed, beside,
        "every manifest beside the kustomization is in the base"
    );
    assert!(
        base().ingresses.is_empty(),
        "the Ingress is an example, not in the base"
    );
}

#[test]
fn kubectl_kustomize_builds_the_base() {
    let Some(kubectl) = require_tool("kubectl", "PREVIEWD_REQUIRE_KUBECTL") else {
        return;
    };
    let out = Command::new(kubectl)
        .args(["kustomize"])
        .arg(repo("deploy"))
        .output()
        .unwrap_or_else(|e| panic!("kubectl kustomize: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let built: BTreeSet<(String, String)> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{e}"));
            let s = |p: &str| {
                v.pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            (s("/kind"), s("/metadata/name"))
        })
        .collect();
    let files: BTreeSet<(String, String)> = base()
        .objects
        .into_iter()
        .map(|o| (o.kind, o.name))
        .collect();
    assert_eq!(built, files);
}

/// The value of `--name` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The container port a probe or Service names, by number or by name.
fn container_port(c: &Container, port: &IntOrString) -> Option<i32> {
    let ports = c.ports.iter().flatten();
    match port {
        IntOrString::Int(n) => ports.map(|p| p.container_port).find(|p| p == n),
        IntOrString::String(name) => ports
            .filter(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .next(),
    }
}

fn listen_port(args: &[String], name: &str) -> i32 {
    let addr: SocketAddr = flag(args, name)
        .unwrap_or_else(|| panic!("{name} is not in {args:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    i32::from(addr.port())
}

fn the_container(d: &Deployment) -> (&Container, Option<&PodSecurityContext>) {
    let pod = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .unwrap_or_else(|| panic!("the Deployment has no pod spec"));
    (
        only(&pod.containers, "container"),
        pod.security_context.as_ref(),
    )
}

#[test]
fn the_deployment_runs_previewd_as_designed() {
    let m = base();
    let d = only(&m.deployments, "Deployment");
    let spec = d.spec.as_ref().unwrap_or_else(|| panic!("no spec"));
    assert_eq!(spec.replicas, Some(2));
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    assert!(!selector.is_empty(), "the selector selects by labels");
    assert!(
        selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "selector {selector:?} does not match the pod labels {labels:?}"
    );
    let pod = spec
        .template
        .spec
        .as_ref()
        .unwrap_or_else(|| panic!("no pod spec"));
    let sa = pod.service_account_name.as_deref();
    assert!(
        m.service_accounts
            .iter()
            .any(|s| s.metadata.name.as_deref() == sa
                && s.metadata.namespace == d.metadata.namespace),
        "the ServiceAccount {sa:?} is not in the base"
    );

    let (c, pod_sc) = the_container(d);
    assert_eq!(c.image.as_deref(), Some("previewd:dev"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(
        args.join(" "),
        "serve --store kube --api-listen 0.0.0.0:8001 --proxy-listen 0.0.0.0:8002 --log-format json"
    );
    let env: BTreeMap<&str, &k8s_openapi::api::core::v1::EnvVar> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let token = env
        .get("PREVIEWD_API_TOKEN")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.secret_key_ref.as_ref())
        .unwrap_or_else(|| panic!("PREVIEWD_API_TOKEN does not come from a Secret"));
    assert_eq!(
        (token.name.as_str(), token.key.as_str()),
        (TOKEN_SECRET, "token")
    );
    assert_ne!(
        token.optional,
        Some(true),
        "the API listens beyond loopback: previewd cannot start without its token"
    );
    for (var, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let path = env
            .get(var)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(path, Some(field), "{var}");
    }

    // Ports: what the args listen on is what the container declares.
    let api_port = listen_port(&args, "--api-listen");
    let proxy_port = listen_port(&args, "--proxy-listen");
    let declared: BTreeSet<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(declared, BTreeSet::from([api_port, proxy_port]));

    // Probes hit the API listener.
    for (probe, paths) in [
        (&c.liveness_probe, &["/livez", "/healthz"][..]),
        (&c.readiness_probe, &["/readyz"][..]),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("a probe is missing or not an HTTP GET"));
        assert!(
            paths.contains(&get.path.as_deref().unwrap_or("")),
            "{get:?}"
        );
        assert_eq!(container_port(c, &get.port), Some(api_port), "{get:?}");
    }

    // Non-root, read-only, no privileges: the container's settings, else the pod's.
    let sc = c.security_context.clone().unwrap_or_default();
    let pod_sc = pod_sc.cloned().unwrap_or_default();
    let effective = SecurityContext {
        run_as_non_root: sc.run_as_non_root.or(pod_sc.run_as_non_root),
        run_as_user: sc.run_as_user.or(pod_sc.run_as_user),
        seccomp_profile: sc.seccomp_profile.clone().or(pod_sc.seccomp_profile),
        ..sc
    };
    assert_eq!(effective.run_as_non_root, Some(true));
    assert_eq!(effective.run_as_user, Some(65532));
    assert_eq!(effective.read_only_root_filesystem, Some(true));
    assert_eq!(effective.allow_privilege_escalation, Some(false));
    assert_eq!(
        effective.capabilities.and_then(|c| c.drop),
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(
        effective.seccomp_profile.map(|p| p.type_),
        Some("RuntimeDefault".to_owned())
    );

    let resources = c.resources.clone().unwrap_or_default();
    let requests = resources.requests.unwrap_or_default();
    assert!(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "{requests:?}"
    );
    assert!(resources.limits.unwrap_or_default().contains_key("memory"));
}

/// `GET path` on `port` at 127.0.0.1 without credentials: the status code.
fn get_status(port: u16, path: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{e}"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
    )
    .unwrap_or_else(|e| panic!("write: {e}"));
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

#[test]
fn the_probes_answer_without_the_token_beyond_loopback() {
    let m = base();
    let (c, _) = the_container(only(&m.deployments, "Deployment"));
    let args = c.args.clone().unwrap_or_default();
    let host = flag(&args, "--api-listen")
        .and_then(|a| a.rsplit_once(':'))
        .map(|(h, _)| h)
        .unwrap_or_default();
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let token = "deploy-test-token-0123456789";
    let srv = Server::try_start_on(
        state.path(),
        &format!("{host}:0"),
        &[("PREVIEWD_API_TOKEN", token), API_ONLY],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let port: u16 = srv
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {}", srv.url));
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let path = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|g| g.path.clone())
            .unwrap_or_default();
        assert_eq!(get_status(port, &path), 200, "{path}");
    }
    assert_eq!(
        get_status(port, "/metrics"),
        401,
        "the rest needs the token"
    );
}

#[test]
fn the_services_reach_the_pods_ports() {
    let m = base();
    let d = only(&m.deployments, "Deployment");
    let (c, _) = the_container(d);
    let args = c.args.clone().unwrap_or_default();
    let labels = d
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let service = |name: &str| {
        m.services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .and_then(|s| s.spec.clone())
            .unwrap_or_else(|| panic!("no Service {name}"))
    };
    for (name, port, listen) in [
        ("previewd-proxy", 80, "--proxy-listen"),
        ("previewd-api", 8001, "--api-listen"),
    ] {
        let spec = service(name);
        let selector = spec.selector.clone().unwrap_or_default();
        assert!(
            !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{name} selects {selector:?}, the pods carry {labels:?}"
        );
        let ports = spec.ports.unwrap_or_default();
        let p = only(&ports, "port");
        assert_eq!(p.port, port, "{name}");
        let target = p.target_port.clone().unwrap_or(IntOrString::Int(p.port));
        assert_eq!(
            container_port(c, &target),
            Some(listen_port(&args, listen)),
            "{name}"
        );
    }
}

/// Whether an Ingress rule's host matches `host`: exactly, or a `*.` wildcard standing for
/// exactly one DNS label.
fn ingress_host_matches(rule: &str, host: &str) -> bool {
    match rule.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => rule == host,
    }
}

#[test]
fn the_example_ingress_reaches_links_by_host_and_by_path() {
    let examples = load(&files_under(&["deploy/examples"]));
    let ingress = only(&examples.ingresses, "example Ingress");
    let rules = ingress
        .spec
        .as_ref()
        .and_then(|s| s.rules.clone())
        .unwrap_or_default();
    let hosts: Vec<&str> = rules.iter().filter_map(|r| r.host.as_deref()).collect();
    let domain = hosts
        .iter()
        .copied()
        .find(|h| !h.starts_with("*."))
        .unwrap_or_else(|| panic!("no rule for the bare preview domain in {hosts:?}"));
    let links = LinkConfig {
        preview_domain: domain.to_owned(),
        url_style: UrlStyle::Subdomain,
        proxy_addr: "0.0.0.0:8002".parse().unwrap_or_else(|e| panic!("{e}")),
        public_url: None,
        path_urls: true,
    };
    let (url, path_url) = links.urls("default", "demo");
    let split = |u: &str| {
        let rest = u.strip_prefix("http://").unwrap_or(u);
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        (host.to_owned(), format!("/{path}"))
    };
    let (link_host, _) = split(&url);
    let (_, link_path) = split(&path_url);
    assert!(
        !ingress_host_matches(&format!("*.{domain}"), &link_host),
        "a one-label wildcard cannot match {link_host}"
    );
    let base = base();
    for (host, path) in [(link_host.as_str(), "/"), (domain, link_path.as_str())] {
        let backend = rules
            .iter()
            .filter(|r| {
                r.host
                    .as_deref()
                    .is_some_and(|h| ingress_host_matches(h, host))
            })
            .flat_map(|r| r.http.iter().flat_map(|h| h.paths.iter()))
            .find(|p| {
                let prefix = p.path.as_deref().unwrap_or("/").trim_end_matches('/');
                p.path_type == "Prefix"
                    && (path == prefix || path.starts_with(&format!("{prefix}/")))
            })
            .and_then(|p| p.backend.service.clone())
            .unwrap_or_else(|| panic!("no Ingress rule serves http://{host}{path}"));
        let service = base
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(backend.name.as_str()))
            .unwrap_or_else(|| panic!("the Ingress names a Service not in the base: {backend:?}"));
        assert_eq!(backend.name, "previewd-proxy");
        let port = backend.port.unwrap_or_default();
        assert!(
            service
                .spec
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .any(|p| {
                    port.name
                        .as_deref()
                        .is_some_and(|n| p.name.as_deref() == Some(n))
                        || port.number == Some(p.port)
                }),
            "{port:?} is not a port of {}",
            backend.name
        );
        let routed = route(Some(host), path, domain, true)
            .unwrap_or_else(|| panic!("the proxy does not route http://{host}{path}"));
        assert_eq!(routed.id, "demo.default");
    }
}

/// The docker CLI with a reachable engine, or `None` (with a loud message) when there is none
/// and PREVIEWD_REQUIRE_DOCKER=1 does not make that a failure.
fn docker_cli() -> Option<PathBuf> {
    let docker = require_tool("docker", "PREVIEWD_REQUIRE_DOCKER")?;
    let version = Command::new(&docker)
        .args(["version", "--format", "{{.Server.Version}}"])
        .output();
    match version {
        Ok(out) if out.status.success() => Some(docker),
        failed => {
            let why = match failed {
                Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            if std::env::var("PREVIEWD_REQUIRE_DOCKER").as_deref() == Ok("1") {
                panic!(
                    "the Docker tests are required (PREVIEWD_REQUIRE_DOCKER=1) but no engine answers: {why}"
                );
            }
            eprintln!(
                "\n!!!!! SKIPPED: no Docker engine ({why}); set PREVIEWD_REQUIRE_DOCKER=1 to make this a failure !!!!!\n"
            );
            None
        }
    }
}

fn run(docker: &Path, args: &[&str]) -> Output {
    let out = Command::new(docker)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"));
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A test image or container, removed when dropped.
struct Removed<'a> {
    docker: &'a Path,
    args: [&'a str; 2],
    name: String,
}

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.docker)
            .args(self.args)
            .arg(&self.name)
            .output();
    }
}

#[test]
fn the_image_builds_from_scratch_and_runs_previewd_as_non_root() {
    let Some(docker) = docker_cli() else {
        return;
    };
    // The documented context: the repository root's Dockerfile and .dockerignore, the binaries
    // where `cargo build --release --bins` puts them.
    let ctx = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let bin_dir = ctx.path().join("target/x86_64-unknown-linux-gnu/release");
    std::fs::create_dir_all(&bin_dir).unwrap_or_else(|e| panic!("{e}"));
    for (from, name) in [
        (env!("CARGO_BIN_EXE_previewd"), "previewd"),
        (env!("CARGO_BIN_EXE_previewd-agent"), "previewd-agent"),
    ] {
        std::fs::copy(from, bin_dir.join(name)).unwrap_or_else(|e| panic!("{from}: {e}"));
    }
    for f in ["Dockerfile", ".dockerignore"] {
        std::fs::copy(repo(f), ctx.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let tag = format!("previewd-test/image:it-{}", suffix.get(..12).unwrap_or("x"));
    let _image = Removed {
        docker: &docker,
        args: ["rmi", "-f"],
        name: tag.clone(),
    };
    let ctx_arg = ctx.path().to_string_lossy().into_owned();
    run(&docker, &["build", "-q", "-t", &tag, &ctx_arg]);

    let version = format!("previewd {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        stdout(&run(&docker, &["run", "--rm", &tag, "--version"])),
        version
    );
    let agent = run(
        &docker,
        &[
            "run",
            "--rm",
            "--entrypoint",
            "/usr/local/bin/previewd-agent",
            &tag,
            "--version",
        ],
    );
    assert!(
        stdout(&agent).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        stdout(&agent)
    );
    let config: Value = serde_json::from_str(&stdout(&run(
        &docker,
        &["image", "inspect", "-f", "{{json .Config}}", &tag],
    )))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/previewd"])
    );
    let layers = stdout(&run(
        &docker,
        &["image", "inspect", "-f", "{{len .RootFS.Layers}}", &tag],
    ));
    assert_eq!(
        layers, "2",
        "an empty root and the two binaries, no base image"
    );

    // `serve` in the image as the cluster runs it: read-only root, no capabilities, its own
    // agent found beside it, a clean exit on SIGTERM.
    let container = format!("previewd-it-image-{}", suffix.get(..12).unwrap_or("x"));
    let _container = Removed {
        docker: &docker,
        args: ["rm", "-f"],
        name: container.clone(),
    };
    run(
        &docker,
        &[
            "run",
            "-d",
            "--name",
            &container,
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--tmpfs",
            "/state:uid=65532,gid=65532",
            &tag,
            "serve",
            "--state-dir",
            "/state",
            "--log-format",
            "json",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let logs = loop {
        let out = run(&docker, &["logs", &container]);
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        if text.contains("preview proxy listening") && text.contains("Docker is unavailable") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "previewd did not start in the image:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !logs.contains("injections will fail"),
        "the agent was not found:\n{logs}"
    );
    run(&docker, &["stop", "-t", "10", &container]);
    let code = stdout(&run(
        &docker,
        &["inspect", "-f", "{{.State.ExitCode}}", &container],
    ));
    assert_eq!(code, "0", "previewd did not exit cleanly on SIGTERM");
}

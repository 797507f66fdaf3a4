//! The cluster deployment, checked by machine: every manifest under `deploy/` and `crds/`
//! parses strictly into its Kubernetes type, and so does what `kubectl kustomize` builds of
//! both variants (`deploy/`, serving one namespace with a Role there, and
//! `deploy/overlays/cluster-wide/`, serving every namespace with a ClusterRole); the served
//! namespace is set in one place and the Deployment watches the namespace its Role is in; the
//! Deployment, Services, RBAC and the example Ingress hold the properties previewd relies on;
//! the roles grant exactly what the code calls (with [`not_allowed`] for checking further
//! calls, and [`Manifests::rules_in`] for where); and the `Dockerfile` builds an image that
//! runs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    Container, Namespace, PodSecurityContext, Probe, SecurityContext, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
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
/// The env variable behind `--namespace`: the one namespace previewd watches.
const WATCH_NAMESPACE: &str = "PREVIEWD_WATCH_NAMESPACE";

/// The default variant: previewd serves one namespace, with a Role there.
pub const NAMESPACED: &str = "deploy";
/// The overlay: previewd serves every namespace, with a ClusterRole.
pub const CLUSTER_WIDE: &str = "deploy/overlays/cluster-wide";
/// What both variants build on.
const BASE: &str = "deploy/base";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A `kustomization.yaml`: only the fields previewd's kustomizations use, so an unexpected one
/// (a typo, a transformer nobody reviewed) fails to parse. (kustomize itself refuses unknown
/// fields inside them; what they do is checked on the builds.)
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Kustomization {
    /// Matched by [`load`] before parsing, as `kind` is.
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    resources: Vec<String>,
    /// `deploy/`'s carrier of the served namespace.
    #[serde(default, rename = "configMapGenerator")]
    config_map_generator: Vec<ConfigMapGenerator>,
    /// `deploy/`'s copies of it into the Role, its binding and the Deployment.
    #[serde(default, rename = "replacements")]
    _replacements: Vec<Value>,
}

/// A `configMapGenerator` entry.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigMapGenerator {
    name: String,
    literals: Vec<String>,
    #[serde(rename = "options")]
    _options: Value,
}

/// The objects of some manifests, typed.
#[derive(Default)]
pub struct Manifests {
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

/// One object of the manifests: its source, kind, namespace and name.
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

/// The YAML documents of a stream (empty documents left out); `source` names it in errors.
fn documents(source: &Path, text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", source.display()))
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
        let text =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        m.add(file, &text);
    }
    m
}

impl Manifests {
    /// Adds the objects of one YAML stream, each parsed strictly into its type.
    fn add(&mut self, file: &Path, text: &str) {
        for doc in documents(file, text) {
            let s = |p: &str| doc.pointer(p).and_then(Value::as_str).unwrap_or_default();
            let (api_version, kind) = (s("/apiVersion"), s("/kind"));
            match (api_version, kind) {
                ("v1", "Namespace") => push(file, &doc, &mut self.namespaces),
                ("v1", "ServiceAccount") => push(file, &doc, &mut self.service_accounts),
                ("v1", "Service") => push(file, &doc, &mut self.services),
                ("apps/v1", "Deployment") => push(file, &doc, &mut self.deployments),
                ("networking.k8s.io/v1", "Ingress") => push(file, &doc, &mut self.ingresses),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    push(file, &doc, &mut self.cluster_roles)
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    push(file, &doc, &mut self.cluster_role_bindings)
                }
                ("rbac.authorization.k8s.io/v1", "Role") => push(file, &doc, &mut self.roles),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                    push(file, &doc, &mut self.role_bindings)
                }
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                    push(file, &doc, &mut self.crds)
                }
                ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                    let k = serde_path_to_error::deserialize(&doc)
                        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                    self.kustomizations.push(k);
                    continue;
                }
                _ => panic!("{}: unexpected object {api_version}/{kind}", file.display()),
            }
            self.objects.push(ObjectId {
                file: file.to_owned(),
                kind: kind.to_owned(),
                namespace: doc
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                name: s("/metadata/name").to_owned(),
            });
        }
    }

    /// The rules previewd's ServiceAccount holds for a call in `namespace` (`None`: a call
    /// across all namespaces, or on a cluster-scoped resource), as the RBAC authorizer grants
    /// them: the ClusterRoles of its ClusterRoleBindings everywhere, and in `namespace` the
    /// Roles (or ClusterRoles) its RoleBindings there name.
    pub fn rules_in(&self, namespace: Option<&str>) -> Vec<PolicyRule> {
        let cluster_role = |name: &str| -> Vec<PolicyRule> {
            self.cluster_roles
                .iter()
                .filter(|r| r.metadata.name.as_deref() == Some(name))
                .flat_map(|r| r.rules.clone().unwrap_or_default())
                .collect()
        };
        let mut rules: Vec<PolicyRule> = self
            .cluster_role_bindings
            .iter()
            .filter(|b| b.role_ref.kind == "ClusterRole" && binds_previewd(b.subjects.as_ref()))
            .flat_map(|b| cluster_role(&b.role_ref.name))
            .collect();
        let Some(ns) = namespace else {
            return rules;
        };
        for b in &self.role_bindings {
            if b.metadata.namespace.as_deref() != Some(ns) || !binds_previewd(b.subjects.as_ref()) {
                continue;
            }
            match b.role_ref.kind.as_str() {
                "ClusterRole" => rules.extend(cluster_role(&b.role_ref.name)),
                _ => rules.extend(
                    self.roles
                        .iter()
                        .filter(|r| {
                            r.metadata.name.as_deref() == Some(b.role_ref.name.as_str())
                                && r.metadata.namespace.as_deref() == Some(ns)
                        })
                        .flat_map(|r| r.rules.clone().unwrap_or_default()),
                ),
            }
        }
        rules
    }

    /// The one namespace the Deployment tells previewd to watch (`--namespace` or its env
    /// variable), or `None` for all namespaces.
    pub fn watch_namespace(&self) -> Option<String> {
        let (c, _) = the_container(only(&self.deployments, "Deployment"));
        let args = c.args.clone().unwrap_or_default();
        let from_env = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == WATCH_NAMESPACE)
            .map(|e| {
                assert!(
                    e.value_from.is_none(),
                    "{e:?}: the value is set at build time"
                );
                e.value.clone().unwrap_or_default()
            });
        flag(&args, "--namespace").map(str::to_owned).or(from_env)
    }
}

/// What `kubectl kustomize dir` builds, parsed strictly (`dir` is relative to the repository),
/// or `None`, loudly, when kubectl is missing and PREVIEWD_REQUIRE_KUBECTL=1 does not make that
/// a failure.
pub fn built(dir: &str) -> Option<Manifests> {
    built_at(&repo(dir))
}

fn built_at(dir: &Path) -> Option<Manifests> {
    let kubectl = require_tool("kubectl", "PREVIEWD_REQUIRE_KUBECTL")?;
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("kubectl kustomize: {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut m = Manifests::default();
    m.add(dir, &String::from_utf8_lossy(&out.stdout));
    Some(m)
}

/// The files a kustomization lists (kustomizations it includes in turn left as directories).
fn listed(dir: &str) -> Vec<PathBuf> {
    let m = load(&[repo(dir).join("kustomization.yaml")]);
    let k = only(&m.kustomizations, "kustomization");
    k.resources.iter().map(|r| repo(dir).join(r)).collect()
}

/// The objects of `deploy/base/`, read from its files: what both variants build on, and all
/// that the Deployment, Service and Ingress tests need.
fn base() -> Manifests {
    load(&listed(BASE))
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

fn binds_previewd(subjects: Option<&Vec<Subject>>) -> bool {
    subjects.into_iter().flatten().any(|s| {
        s.kind == "ServiceAccount" && s.name == NAME && s.namespace.as_deref() == Some(NAMESPACE)
    })
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

/// The namespace previewd serves in the default variant, and its rules there: the build of
/// `deploy/`, or `None` without kubectl.
fn namespaced() -> Option<(Manifests, String)> {
    let m = built(NAMESPACED)?;
    let served = m
        .watch_namespace()
        .unwrap_or_else(|| panic!("deploy/ watches every namespace"));
    Some((m, served))
}

#[test]
fn the_roles_allow_every_call_previewd_makes() {
    let Some((m, served)) = namespaced() else {
        return;
    };
    let there = m.rules_in(Some(&served));
    assert_eq!(not_allowed(&there, CALLS_TODAY), vec![]);
    assert_eq!(not_allowed(&there, POD_TARGETS), vec![]);
    assert_eq!(
        not_allowed(&m.rules_in(Some(NAMESPACE)), LEADER_ELECTION),
        vec![]
    );
    // Nothing across namespaces, nothing in another one, no Lease where links live.
    for (scope, calls) in [
        (None, CALLS_TODAY),
        (None, POD_TARGETS),
        (Some("kube-system"), CALLS_TODAY),
        (Some("kube-system"), POD_TARGETS),
        (Some(served.as_str()), LEADER_ELECTION),
    ] {
        assert_eq!(not_allowed(&m.rules_in(scope), calls), calls, "{scope:?}");
    }

    let Some(cw) = built(CLUSTER_WIDE) else {
        return;
    };
    assert_eq!(
        cw.watch_namespace(),
        None,
        "the overlay watches every namespace"
    );
    let everywhere = cw.rules_in(None);
    assert_eq!(not_allowed(&everywhere, CALLS_TODAY), vec![]);
    assert_eq!(not_allowed(&everywhere, POD_TARGETS), vec![]);
    assert_eq!(
        not_allowed(&cw.rules_in(Some(NAMESPACE)), LEADER_ELECTION),
        vec![]
    );
    // Leases are granted in previewd's namespace only.
    for scope in [None, Some("default"), Some("kube-system")] {
        assert_eq!(
            not_allowed(&cw.rules_in(scope), LEADER_ELECTION),
            LEADER_ELECTION,
            "{scope:?}"
        );
    }
}

#[test]
fn not_allowed_names_what_a_role_lacks() {
    let served = load(&[repo("deploy/role.yaml")]);
    let rules = only(&served.roles, "Role")
        .rules
        .clone()
        .unwrap_or_default();
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

/// `rules_in` grants as the authorizer does: a RoleBinding's rules in its namespace only,
/// whether it names a Role or a ClusterRole; a ClusterRoleBinding's everywhere; nothing bound
/// to another subject.
#[test]
fn rules_in_follows_the_bindings() {
    let rule = |resource: &str| PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec![resource.to_owned()]),
        verbs: vec!["get".to_owned()],
        ..Default::default()
    };
    let meta = |name: &str, ns: Option<&str>| ObjectMeta {
        name: Some(name.to_owned()),
        namespace: ns.map(str::to_owned),
        ..Default::default()
    };
    let role_ref = |kind: &str, name: &str| RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: kind.into(),
        name: name.into(),
    };
    let sa = |name: &str| {
        Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: name.into(),
            namespace: Some(NAMESPACE.into()),
            ..Default::default()
        }])
    };
    let m = Manifests {
        roles: vec![
            Role {
                metadata: meta("r", Some("a")),
                rules: Some(vec![rule("secrets")]),
            },
            Role {
                metadata: meta("r", Some("b")),
                rules: Some(vec![rule("pods")]),
            },
        ],
        cluster_roles: vec![
            ClusterRole {
                metadata: meta("c", None),
                rules: Some(vec![rule("configmaps")]),
                ..Default::default()
            },
            ClusterRole {
                metadata: meta("everywhere", None),
                rules: Some(vec![rule("nodes")]),
                ..Default::default()
            },
        ],
        role_bindings: vec![
            RoleBinding {
                metadata: meta("r", Some("a")),
                role_ref: role_ref("Role", "r"),
                subjects: sa(NAME),
            },
            RoleBinding {
                metadata: meta("c", Some("a")),
                role_ref: role_ref("ClusterRole", "c"),
                subjects: sa(NAME),
            },
            RoleBinding {
                metadata: meta("r", Some("b")),
                role_ref: role_ref("Role", "r"),
                subjects: sa("someone-else"),
            },
        ],
        cluster_role_bindings: vec![ClusterRoleBinding {
            metadata: meta("everywhere", None),
            role_ref: role_ref("ClusterRole", "everywhere"),
            subjects: sa(NAME),
        }],
        ..Manifests::default()
    };
    let calls = [
        ("", "secrets", "get"),
        ("", "pods", "get"),
        ("", "configmaps", "get"),
        ("", "nodes", "get"),
    ];
    let allowed = |scope| {
        let rules = m.rules_in(scope);
        let missing = not_allowed(&rules, &calls);
        calls
            .iter()
            .filter(|c| !missing.contains(c))
            .map(|c| c.1)
            .collect::<Vec<_>>()
    };
    assert_eq!(allowed(Some("a")), ["secrets", "configmaps", "nodes"]);
    assert_eq!(allowed(Some("b")), ["nodes"]);
    assert_eq!(allowed(None), ["nodes"]);
}

/// (apiGroup, resource, verb), one grant of a rule.
type Grants = BTreeSet<(String, String, String)>;

/// Every (group, resource, verb) a set of rules grants, spelled out.
fn grants(rules: &[PolicyRule]) -> Grants {
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

fn spelled(table: &[(&str, &[&str], &[&str])]) -> Grants {
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

/// What previewd may do where it serves links, in either variant.
fn serving_grants() -> Grants {
    const RW: &[&str] = &[
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    spelled(&[
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
    ])
}

fn lease_grants() -> Grants {
    spelled(&[(
        "coordination.k8s.io",
        &["leases"],
        &["get", "create", "update", "patch"],
    )])
}

/// Each role of a build, with where it applies: `(namespace, name)`, no namespace for a
/// ClusterRole.
fn roles_of(m: &Manifests) -> BTreeMap<(Option<String>, String), Grants> {
    let role = |meta: &ObjectMeta| {
        (
            meta.namespace.clone(),
            meta.name.clone().unwrap_or_default(),
        )
    };
    m.roles
        .iter()
        .map(|r| {
            (
                role(&r.metadata),
                grants(r.rules.as_deref().unwrap_or_default()),
            )
        })
        .chain(m.cluster_roles.iter().map(|r| {
            (
                role(&r.metadata),
                grants(r.rules.as_deref().unwrap_or_default()),
            )
        }))
        .collect()
}

#[test]
fn the_roles_grant_nothing_beyond_what_previewd_needs() {
    let Some((m, served)) = namespaced() else {
        return;
    };
    let leader = (
        Some(NAMESPACE.to_owned()),
        "previewd-leader-election".to_owned(),
    );
    assert_eq!(
        roles_of(&m),
        BTreeMap::from([
            ((Some(served.clone()), NAME.to_owned()), serving_grants()),
            (leader.clone(), lease_grants()),
        ]),
        "deploy/: a Role where previewd serves, a Role for its Lease, no ClusterRole"
    );
    assert!(m.cluster_role_bindings.is_empty());
    let Some(cw) = built(CLUSTER_WIDE) else {
        return;
    };
    assert_eq!(
        roles_of(&cw),
        BTreeMap::from([
            ((None, NAME.to_owned()), serving_grants()),
            (leader, lease_grants()),
        ]),
        "the overlay: the same grants in a ClusterRole, the same Lease Role"
    );
}

/// What a binding grants: its role's kind and name, and the namespace (`None`: everywhere).
type Binding = (String, String, Option<String>);

/// Checks that every binding of a build names a role of the build and previewd's
/// ServiceAccount alone, and that every role is bound: the roles each binding grants.
fn bindings_of(m: &Manifests) -> BTreeSet<Binding> {
    let sa = only(&m.service_accounts, "ServiceAccount");
    assert_eq!(
        (
            sa.metadata.namespace.as_deref(),
            sa.metadata.name.as_deref()
        ),
        (Some(NAMESPACE), Some(NAME))
    );
    let alone = |subjects: Option<&Vec<Subject>>| {
        binds_previewd(subjects) && subjects.is_some_and(|s| s.len() == 1)
    };
    let mut bound = BTreeSet::new();
    for b in &m.cluster_role_bindings {
        assert_eq!(b.role_ref.api_group, "rbac.authorization.k8s.io");
        assert_eq!(b.role_ref.kind, "ClusterRole", "{b:?}");
        assert!(alone(b.subjects.as_ref()), "{b:?}");
        bound.insert((b.role_ref.kind.clone(), b.role_ref.name.clone(), None));
    }
    for b in &m.role_bindings {
        assert_eq!(b.role_ref.api_group, "rbac.authorization.k8s.io");
        assert!(alone(b.subjects.as_ref()), "{b:?}");
        bound.insert((
            b.role_ref.kind.clone(),
            b.role_ref.name.clone(),
            b.metadata.namespace.clone(),
        ));
    }
    let roles: BTreeSet<Binding> = m
        .roles
        .iter()
        .map(|r| {
            (
                "Role".to_owned(),
                r.metadata.name.clone().unwrap_or_default(),
                r.metadata.namespace.clone(),
            )
        })
        .chain(m.cluster_roles.iter().map(|r| {
            (
                "ClusterRole".to_owned(),
                r.metadata.name.clone().unwrap_or_default(),
                None,
            )
        }))
        .collect();
    assert_eq!(
        bound, roles,
        "bindings and the roles they name, one for one"
    );
    bound
}

#[test]
fn the_bindings_name_existing_roles_and_previewds_service_account() {
    let Some((m, served)) = namespaced() else {
        return;
    };
    assert_eq!(
        bindings_of(&m),
        BTreeSet::from([
            ("Role".to_owned(), NAME.to_owned(), Some(served)),
            (
                "Role".to_owned(),
                "previewd-leader-election".to_owned(),
                Some(NAMESPACE.to_owned())
            ),
        ])
    );
    let Some(cw) = built(CLUSTER_WIDE) else {
        return;
    };
    assert_eq!(
        bindings_of(&cw),
        BTreeSet::from([
            ("ClusterRole".to_owned(), NAME.to_owned(), None),
            (
                "Role".to_owned(),
                "previewd-leader-election".to_owned(),
                Some(NAMESPACE.to_owned())
            ),
        ])
    );
}

/// The namespaced variant watches exactly the namespace its Role is in, and that is not
/// previewd's own (where its API token Secret and its own pods are, which a DaemonInjection
/// there could otherwise reach); the overlay watches them all.
#[test]
fn the_deployment_watches_the_namespace_its_role_grants() {
    let Some((m, served)) = namespaced() else {
        return;
    };
    let role = m
        .roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some(NAME));
    let binding = m
        .role_bindings
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some(NAME));
    assert_eq!(
        (
            role.and_then(|r| r.metadata.namespace.as_deref()),
            binding.and_then(|b| b.metadata.namespace.as_deref())
        ),
        (Some(served.as_str()), Some(served.as_str()))
    );
    assert_ne!(
        served, NAMESPACE,
        "previewd must not serve its own namespace"
    );
    let Some(cw) = built(CLUSTER_WIDE) else {
        return;
    };
    let (c, _) = the_container(only(&cw.deployments, "Deployment"));
    assert!(
        !c.env.iter().flatten().any(|e| e.name == WATCH_NAMESPACE),
        "{:?}",
        c.env
    );
    assert_eq!(cw.watch_namespace(), None);
}

/// Copies the repository directory `rel` to `to`.
fn copy_tree(rel: &Path, to: &Path) {
    let from = repo(&rel.to_string_lossy());
    for entry in std::fs::read_dir(&from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let name = path.file_name().unwrap_or_default();
        if path.is_dir() {
            std::fs::create_dir_all(to.join(name)).unwrap_or_else(|e| panic!("{e}"));
            copy_tree(&rel.join(name), &to.join(name));
        } else {
            std::fs::copy(&path, to.join(name))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}

/// The served namespace is one value in `deploy/kustomization.yaml`: changed there (in a copy),
/// the Role, its binding and the watched namespace all follow, and nothing stays behind.
#[test]
fn the_served_namespace_is_set_in_one_place() {
    let Some((_, served)) = namespaced() else {
        return;
    };
    // The one value: the served-namespace generator's one literal.
    let kustomizations = load(&[repo(NAMESPACED).join("kustomization.yaml")]).kustomizations;
    let generator = only(
        &only(&kustomizations, "kustomization").config_map_generator,
        "generator",
    );
    assert_eq!(generator.name, "previewd-served-namespace");
    let literal = only(&generator.literals, "literal");
    assert_eq!(literal, &format!("namespace={served}"));
    let copy = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let deploy = copy.path().join("deploy");
    std::fs::create_dir_all(&deploy).unwrap_or_else(|e| panic!("{e}"));
    copy_tree(Path::new("deploy"), &deploy);
    let file = deploy.join("kustomization.yaml");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        text.matches(literal.as_str()).count(),
        1,
        "{literal} in {text}"
    );
    std::fs::write(&file, text.replace(literal.as_str(), "namespace=team-a"))
        .unwrap_or_else(|e| panic!("{e}"));

    let Some(moved) = built_at(&deploy) else {
        return;
    };
    assert_eq!(moved.watch_namespace().as_deref(), Some("team-a"));
    let namespaces: BTreeSet<(String, Option<String>)> = moved
        .objects
        .iter()
        .map(|o| (o.kind.clone(), o.namespace.clone()))
        .collect();
    let previewds = |kind: &str| (kind.to_owned(), Some(NAMESPACE.to_owned()));
    let team = |kind: &str| (kind.to_owned(), Some("team-a".to_owned()));
    assert_eq!(
        namespaces,
        BTreeSet::from([
            ("Namespace".to_owned(), None),
            previewds("ServiceAccount"),
            previewds("Role"),
            previewds("RoleBinding"),
            previewds("Deployment"),
            previewds("Service"),
            team("Role"),
            team("RoleBinding"),
        ])
    );
    assert_eq!(
        not_allowed(&moved.rules_in(Some("team-a")), CALLS_TODAY),
        vec![]
    );
    assert_eq!(
        not_allowed(&moved.rules_in(Some(&served)), CALLS_TODAY),
        CALLS_TODAY
    );
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
    // The objects previewd ships in its namespace are in it; the Role and RoleBinding for the
    // served namespace get theirs from the kustomization (one place), so their files name none.
    let namespaced = [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "Ingress",
    ];
    for o in &m.objects {
        let served = o.file == repo("deploy/role.yaml");
        let expected = (namespaced.contains(&o.kind.as_str()) && !served).then_some(NAMESPACE);
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
    assert_eq!(
        m.kustomizations.len(),
        3,
        "deploy/, its base and the overlay"
    );
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

/// The YAML files directly in `dir`, but its kustomization.
fn manifests_beside(dir: &str) -> BTreeSet<PathBuf> {
    std::fs::read_dir(repo(dir))
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect()
}

#[test]
fn the_kustomizations_list_their_manifests_and_leave_the_examples_out() {
    // Each kustomization lists every manifest beside it, and the base it builds on.
    for (dir, base) in [
        (BASE, None),
        (NAMESPACED, Some(BASE)),
        (CLUSTER_WIDE, Some(BASE)),
    ] {
        let mut files = BTreeSet::new();
        let mut dirs = BTreeSet::new();
        for path in listed(dir) {
            let path = path
                .canonicalize()
                .unwrap_or_else(|e| panic!("{} lists {}: {e}", dir, path.display()));
            if path.is_dir() {
                dirs.insert(path);
            } else {
                files.insert(path);
            }
        }
        let beside: BTreeSet<PathBuf> = manifests_beside(dir)
            .into_iter()
            .map(|p| p.canonicalize().unwrap_or_else(|e| panic!("{e}")))
            .collect();
        assert_eq!(
            files, beside,
            "{dir}: every manifest beside the kustomization"
        );
        let base: BTreeSet<PathBuf> = base
            .map(|b| repo(b).canonicalize().unwrap_or_else(|e| panic!("{e}")))
            .into_iter()
            .collect();
        assert_eq!(dirs, base, "{dir}");
    }
    assert!(
        base().ingresses.is_empty(),
        "the Ingress is an example, not in the base"
    );
}

#[test]
fn kubectl_kustomize_builds_both_variants_from_their_files() {
    let ids = |m: Manifests| -> BTreeSet<(String, String, Option<String>)> {
        m.objects
            .into_iter()
            .map(|o| (o.kind, o.name, o.namespace))
            .collect()
    };
    let Some((m, served)) = namespaced() else {
        return;
    };
    // What the files hold, with the served namespace where the kustomization puts it.
    let mut files = ids(base());
    for (kind, name, _) in ids(load(&[repo("deploy/role.yaml")])) {
        files.insert((kind, name, Some(served.clone())));
    }
    assert_eq!(ids(m), files, "deploy/");
    let Some(cw) = built(CLUSTER_WIDE) else {
        return;
    };
    let overlay: Vec<PathBuf> = listed(CLUSTER_WIDE)
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    let mut files = ids(base());
    files.extend(ids(load(&overlay)));
    assert_eq!(ids(cw), files, "the overlay");
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
    let path_of = |probe: &Option<Probe>| {
        probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|g| g.path.clone())
            .unwrap_or_default()
    };
    let live = path_of(&c.liveness_probe);
    assert_eq!(get_status(port, &live), 200, "{live}");
    // Readiness waits for the first lists of the watches (as the kubelet keeps probing): the
    // token must never be what stands in the way.
    let ready = path_of(&c.readiness_probe);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match get_status(port, &ready) {
            200 => break,
            503 if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            code => panic!("{ready} answered {code}"),
        }
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

//! CustomResourceDefinitions generated from the Rust types.
//!
//! `previewd crd` prints them, `crds/` holds them checked in (a test fails when they drift),
//! and the embedded API reads its printer columns and OpenAPI schemas from them, so a cluster
//! and the local store describe the resources identically.

use std::sync::LazyLock;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{DaemonInjection, PreviewLink};

/// Both CRDs, PreviewLink first. Generated once and cloned: the embedded API reads them for
/// every request, and generating their schemas costs some thirty times a copy.
pub fn all() -> [CustomResourceDefinition; 2] {
    static ALL: LazyLock<[CustomResourceDefinition; 2]> =
        LazyLock::new(|| [PreviewLink::crd(), DaemonInjection::crd()]);
    ALL.clone()
}

/// The file name a CRD is checked in under, in `crds/` (`{group}_{plural}.yaml`).
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

/// One CRD as a YAML document.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(crd)
}

/// Both CRDs as one multi-document YAML stream.
pub fn all_yaml() -> Result<String, serde_yaml::Error> {
    let docs = all().iter().map(to_yaml).collect::<Result<Vec<_>, _>>()?;
    Ok(docs.iter().map(|d| format!("---\n{d}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in CRDs must be exactly what the types generate; run
    /// `cargo run -- crd --write crds/` after changing a type.
    #[test]
    fn checked_in_crds_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
        for crd in all() {
            let path = dir.join(file_name(&crd));
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            let generated = to_yaml(&crd).unwrap_or_default();
            assert!(
                !generated.is_empty() && on_disk == generated,
                "{} is out of date with the Rust types: run `cargo run -- crd --write crds/`",
                path.display()
            );
        }
    }

    #[test]
    fn crds_declare_names_scope_and_status() {
        for crd in all() {
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(
                crd.spec.names.categories.as_deref(),
                Some(&["previewd".to_owned()][..])
            );
            let v = &crd.spec.versions[0];
            assert!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some()
            );
            assert!(
                v.additional_printer_columns
                    .as_ref()
                    .is_some_and(|c| c.len() >= 4)
            );
        }
    }
}

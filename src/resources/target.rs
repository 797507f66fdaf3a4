//! What a DaemonInjection or PreviewLink points at: one Docker container or one pod container.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validation::{
    DNS1123_LABEL_PATTERN, DNS1123_SUBDOMAIN_PATTERN, DOCKER_CONTAINER_PATTERN,
};

/// The container an object refers to. Exactly one kind of target: the enum makes two (or
/// none) unrepresentable, and the generated schema says so with a `oneOf`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Target {
    /// A container of the local Docker engine.
    Docker(DockerTarget),
    /// A container of a Kubernetes pod in the object's namespace.
    Pod(PodTarget),
}

/// A Docker container, by id (full or unique prefix) or by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DockerTarget {
    /// Container id or name, as `docker ps` shows it.
    #[schemars(length(min = 1, max = 128), pattern(DOCKER_CONTAINER_PATTERN))]
    pub container: String,
}

/// A pod in the object's namespace, and optionally which of its containers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTarget {
    /// Pod name.
    #[schemars(length(min = 1, max = 253), pattern(DNS1123_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Container name; the pod's first container when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(DNS1123_LABEL_PATTERN))]
    pub container: Option<String>,
}

impl Target {
    /// A Docker container by id or name: the target most objects outside a cluster have.
    pub fn docker(container: impl Into<String>) -> Self {
        Target::Docker(DockerTarget {
            container: container.into(),
        })
    }

    /// A short human form (`docker/web`, `pod/api/app`) for status and printer columns.
    pub fn display_name(&self) -> String {
        match self {
            Target::Docker(d) => format!("docker/{}", d.container),
            Target::Pod(PodTarget {
                name,
                container: Some(c),
            }) => format!("pod/{name}/{c}"),
            Target::Pod(PodTarget {
                name,
                container: None,
            }) => format!("pod/{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_a_single_keyed_map() {
        let t = Target::Docker(DockerTarget {
            container: "web".into(),
        });
        assert_eq!(
            serde_json::to_value(&t).ok(),
            Some(serde_json::json!({"docker": {"container": "web"}}))
        );
    }

    #[test]
    fn two_target_kinds_do_not_deserialize() {
        let two = serde_json::json!({"docker": {"container": "a"}, "pod": {"name": "b"}});
        assert!(serde_json::from_value::<Target>(two).is_err());
    }

    #[test]
    fn display_names_say_the_kind() {
        let p = Target::Pod(PodTarget {
            name: "api".into(),
            container: Some("app".into()),
        });
        assert_eq!(p.display_name(), "pod/api/app");
    }
}

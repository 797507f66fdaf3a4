//! What a backend may send, checked before anything is looked up: container ids, ports and
//! query fields. Pure, so every refusal is unit-tested.

use serde::Deserialize;
use utoipa::IntoParams;

use super::error::ShimError;
use crate::resources::Target;
use crate::resources::validation;

/// Longest container id or name accepted (Docker's own limit is 128 for names, 64 for ids).
pub const MAX_ID_BYTES: usize = 128;
/// The longest `ttl_seconds` accepted: 30 days.
pub const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;
/// The lifetime of a link created without `ttl_seconds`: 24 hours.
pub const DEFAULT_TTL_SECONDS: u64 = 24 * 3600;

/// Checks a container id or name from a path: Docker's own syntax (letters, digits, `_.-`,
/// starting with a letter or digit), no `..`, at most [`MAX_ID_BYTES`] bytes. Everything
/// else (`/`, NUL, spaces, empty) is refused before it can reach a name or a path.
pub fn container_id(raw: &str) -> Result<&str, ShimError> {
    if raw.len() > MAX_ID_BYTES {
        return Err(ShimError::InvalidContainerId(format!(
            "container id is {} bytes long; at most {MAX_ID_BYTES} are accepted",
            raw.len()
        )));
    }
    if raw.contains("..") {
        return Err(ShimError::InvalidContainerId(format!(
            "container id {raw:?} contains '..'"
        )));
    }
    match validation::target("container", &Target::docker(raw)).first() {
        Some(e) => Err(ShimError::InvalidContainerId(e.message.clone())),
        None => Ok(raw),
    }
}

/// Checks a port from a path: a decimal number from 1 to 65535.
pub fn port(raw: &str) -> Result<u16, ShimError> {
    match raw.parse::<u16>() {
        Ok(p) if p > 0 && raw.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(ShimError::InvalidPort(format!(
            "port {raw:?} is not a number from 1 to 65535"
        ))),
    }
}

/// The path of a container's calls, `…/container/{id}/…`: documented here once, checked by
/// [`container_id`].
#[derive(Clone, Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ContainerPath {
    /// Docker container id (full or short) or name
    #[param(max_length = 128, pattern = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")]
    pub id: String,
}

/// The path of a container port's calls, `…/container/{id}/preview/{port}`; the port is read
/// as text so that a bad one gets [`port`]'s message.
#[derive(Clone, Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ContainerPortPath {
    /// Docker container id (full or short) or name
    #[param(max_length = 128, pattern = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")]
    pub id: String,
    /// Port inside the container
    #[param(value_type = u16, minimum = 1, maximum = 65535)]
    pub port: String,
}

/// Query of `POST …/preview/{port}`. Unknown fields are refused, so a misspelt option is
/// never silently ignored.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PreviewQuery {
    /// Seconds until the link expires (1 to 2592000, 30 days). Without it a new link lives
    /// 24 hours and an existing one keeps its expiry.
    #[param(minimum = 1, maximum = 2592000)]
    pub ttl_seconds: Option<u64>,
    /// `true`: anyone with the URL may open it, no token. Default `false`.
    pub public: Option<bool>,
}

impl PreviewQuery {
    /// The requested lifetime, checked.
    pub fn ttl(&self) -> Result<Option<u64>, ShimError> {
        match self.ttl_seconds {
            Some(t) if t == 0 || t > MAX_TTL_SECONDS => Err(ShimError::InvalidQuery(format!(
                "ttl_seconds must be from 1 to {MAX_TTL_SECONDS}, not {t}"
            ))),
            t => Ok(t),
        }
    }
}

/// The query of calls that take none: any field is refused.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoQuery {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_with_path_characters_are_refused() {
        for bad in [
            "", "a/b", "..", "a..b", "a\0b", "-lead", ".hidden", "sp ace", "%2F", "é",
        ] {
            assert!(
                matches!(container_id(bad), Err(ShimError::InvalidContainerId(_))),
                "{bad:?}"
            );
        }
        let long = "a".repeat(MAX_ID_BYTES + 1);
        assert!(container_id(&long).is_err());
        for good in [
            "web",
            "My_App.1-x",
            &"f".repeat(64),
            &"a".repeat(MAX_ID_BYTES),
        ] {
            assert_eq!(container_id(good).ok(), Some(good));
        }
    }

    #[test]
    fn ports_are_1_to_65535() {
        assert_eq!(port("1").ok(), Some(1));
        assert_eq!(port("65535").ok(), Some(65535));
        for bad in ["0", "65536", "-1", "+80", "80a", "", " 80", "99999999999"] {
            assert!(
                matches!(port(bad), Err(ShimError::InvalidPort(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ttl_bounds() {
        let q = |t| PreviewQuery {
            ttl_seconds: Some(t),
            public: None,
        };
        assert_eq!(q(60).ttl().ok(), Some(Some(60)));
        assert!(q(0).ttl().is_err());
        assert!(q(MAX_TTL_SECONDS + 1).ttl().is_err());
        assert_eq!(PreviewQuery::default().ttl().ok(), Some(None));
    }

    #[test]
    fn unknown_query_fields_are_refused() {
        let parse = |q: &str| serde_urlencoded::from_str::<PreviewQuery>(q);
        assert!(parse("ttl_seconds=5&public=true").is_ok());
        assert!(parse("ttl=5").is_err());
        assert!(parse("public=yes").is_err());
        assert!(serde_urlencoded::from_str::<NoQuery>("").is_ok());
        assert!(serde_urlencoded::from_str::<NoQuery>("x=1").is_err());
    }
}

//! Semantic validation of previewd objects, beyond what the types themselves enforce.
//!
//! The embedded API runs these checks on every write, so a bad object is refused with a clear
//! message instead of reaching a controller. A cluster runs the same checks from the CRD
//! schema: each check here has its schema form beside it (a `*_PATTERN` for the field's
//! `pattern`, a `*_RULE` for a CEL `x-kubernetes-validations` rule where a pattern cannot say
//! it), the types in this module's siblings attach them, and `schema_agreement`'s table proves
//! that both refuse the same objects. Pure functions: they unit-test without a server.

use std::fmt;

use super::DaemonInjectionSpec;
use super::daemon_injection::{DaemonSource, DaemonSpec, Probe};
use super::preview_link::PreviewLinkSpec;
use super::target::{DockerTarget, PodTarget, Target};

/// One problem with one field, in the shape of a Kubernetes `StatusCause`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `spec.port`.
    pub field: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl FieldError {
    /// Builds an error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Directories whose filesystems are usually tmpfs or noexec (or not files at all), where an
/// uploaded daemon would vanish or fail to start.
pub const FORBIDDEN_INSTALL_DIRS: [&str; 5] = ["/tmp", "/dev", "/proc", "/sys", "/run"];

/// The schema form of [`dns1123_subdomain`], with `maxLength` 253 (Kubernetes' own pattern).
pub const DNS1123_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// The schema form of [`dns1123_label`], with `maxLength` 63.
pub const DNS1123_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// The schema form of a Docker container id or name (see [`target`]), Docker's own rule.
pub const DOCKER_CONTAINER_PATTERN: &str = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$";

/// Go's duration syntax without a minus sign (see [`super::go_duration`]): what a positive
/// duration (`spec.ttl`, `spec.timeouts.*`) looks like (`\u{b5}` and `\u{3bc}` are the micro sign and the Greek mu Go both
/// accepts). Zero (`0s`) and durations outside Go's range match it; [`POSITIVE_DURATION_RULE`]
/// refuses those.
pub const POSITIVE_DURATION_PATTERN: &str =
    "^\\+?(([0-9]+(\\.[0-9]*)?|\\.[0-9]+)(ns|us|\u{b5}s|\u{3bc}s|ms|s|m|h))+$";

/// The CEL form of "a positive duration": the apiserver's `duration()` is Go's parser, so it
/// also refuses what overflows Go's range.
pub const POSITIVE_DURATION_RULE: &str = "duration(self) > duration('0s')";

/// The CEL form of "credentials are not allowed with any origin" (on `spec.cors`).
pub const CORS_CREDENTIALS_RULE: &str = "!(has(self.allowCredentials) && self.allowCredentials && has(self.allowOrigins) && '*' in self.allowOrigins)";

/// The CEL form of "`ttl` and `expiresAt` are exclusive" (on the spec).
pub const TTL_OR_EXPIRY_RULE: &str = "!has(self.ttl) || !has(self.expiresAt)";

/// The schema form of the `spec.hostRewrite` check.
pub const HOST_REWRITE_PATTERN: &str = r"^[a-zA-Z0-9.:\[\]-]{1,261}$";

/// The schema form of the `spec.cors.allowOrigins[]` check: `*`, or http(s) with no ASCII
/// control character or space.
pub const CORS_ORIGIN_PATTERN: &str = r"^(\*|https?://[^\x00-\x20\x7f]*)$";

/// The schema form of "an absolute path" (host paths, probe paths).
pub const ABSOLUTE_PATH_PATTERN: &str = "^/";

/// The schema form of the environment variable name check (a C identifier).
pub const ENV_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";

/// The schema form of "an environment value holds no NUL" (the kernel would cut it there).
pub const ENV_VALUE_PATTERN: &str = r"^[^\x00]*$";

/// The schema form of "a normalized absolute file path" (see [`install_path`]): `/` and a
/// segment, repeated, where a segment is anything but empty, `.` or `..` (spelled out, as
/// RE2 has no lookahead: no leading dot, or one dot and a non-dot, or two dots and more).
pub const INSTALL_PATH_PATTERN: &str = r"^(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+))+$";

/// The CEL form of "not under [`FORBIDDEN_INSTALL_DIRS`]" (a pattern cannot exclude).
pub const INSTALL_PATH_RULE: &str = "!self.startsWith('/tmp/') && !self.startsWith('/dev/') \
    && !self.startsWith('/proc/') && !self.startsWith('/sys/') && !self.startsWith('/run/')";

/// What the CEL rules on a daemon's settings say when a setting has no `source` to apply to.
pub const NEEDS_SOURCE_MESSAGE: &str = "applies to a user-named daemon; set spec.daemon.source (without a source the built-in agent runs)";

/// The schema form of the `uid:gid` check.
pub const USER_PATTERN: &str = "^[0-9]{1,10}:[0-9]{1,10}$";

/// Checks a DNS-1123 subdomain (object and pod names): at most 253 characters of lowercase
/// alphanumerics, `-` and `.`, starting and ending alphanumeric.
pub fn dns1123_subdomain(field: &str, value: &str) -> Result<(), FieldError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        // Kubernetes bounds the whole name, not its dot-separated parts.
        && value.split('.').all(|part| is_dns1123_label(part, 253));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "Invalid value: {value:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
                 characters, '-' or '.', and must start and end with an alphanumeric character (at most 253 characters)"
            ),
        ))
    }
}

/// Checks a DNS-1123 label (container names): at most 63 characters.
pub fn dns1123_label(field: &str, value: &str) -> Result<(), FieldError> {
    if is_dns1123_label(value, 63) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "Invalid value: {value:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric \
                 characters or '-', and must start and end with an alphanumeric character (at most 63 characters)"
            ),
        ))
    }
}

fn is_dns1123_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= max
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || *c == b'-')
}

fn positive(field: &str, d: &kube::core::Duration) -> Result<(), FieldError> {
    if d.is_negative() || std::time::Duration::from(*d).is_zero() {
        Err(FieldError::new(
            field,
            format!("Invalid value: {d:?}: must be a positive duration"),
        ))
    } else {
        Ok(())
    }
}

fn port(field: &str, value: i32) -> Result<(), FieldError> {
    if (1..=65535).contains(&value) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("Invalid value: {value}: must be between 1 and 65535, inclusive"),
        ))
    }
}

/// Checks a target: Docker ids/names as Docker accepts them, pod and container names as
/// Kubernetes does.
pub fn target(field: &str, t: &Target) -> Vec<FieldError> {
    let mut errs = Vec::new();
    match t {
        Target::Docker(DockerTarget { container }) => {
            let b = container.as_bytes();
            let ok = !b.is_empty()
                && b.len() <= 128
                && b[0].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
            if !ok {
                errs.push(FieldError::new(
                    format!("{field}.docker.container"),
                    format!(
                        "Invalid value: {container:?}: a Docker container id or name is 1-128 characters of \
                         [a-zA-Z0-9_.-], starting with a letter or digit"
                    ),
                ));
            }
        }
        Target::Pod(PodTarget { name, container }) => {
            errs.extend(dns1123_subdomain(&format!("{field}.pod.name"), name).err());
            if let Some(c) = container {
                errs.extend(dns1123_label(&format!("{field}.pod.container"), c).err());
            }
        }
    }
    errs
}

/// Validates a PreviewLink spec.
pub fn preview_link_spec(spec: &PreviewLinkSpec) -> Vec<FieldError> {
    let mut errs = target("spec.target", &spec.target);
    errs.extend(port("spec.port", spec.port).err());
    if spec.expires_at.is_some() && spec.ttl.is_some() {
        errs.push(FieldError::new(
            "spec.ttl",
            "Forbidden: may not be set together with spec.expiresAt",
        ));
    }
    if let Some(ttl) = &spec.ttl {
        errs.extend(positive("spec.ttl", ttl).err());
    }
    if let Some(t) = &spec.timeouts {
        for (name, value) in [
            ("connect", &t.connect),
            ("response", &t.response),
            ("idle", &t.idle),
        ] {
            if let Some(d) = value {
                errs.extend(positive(&format!("spec.timeouts.{name}"), d).err());
            }
        }
    }
    if let Some(host) = &spec.host_rewrite {
        let ok = !host.is_empty()
            && host.len() <= 261
            && host.bytes().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']')
            });
        if !ok {
            errs.push(FieldError::new(
                "spec.hostRewrite",
                format!(
                    "Invalid value: {host:?}: must be a host name or address, optionally with :port"
                ),
            ));
        }
    }
    if let Some(cors) = &spec.cors
        && cors.allow_credentials
        && cors.allow_origins.iter().any(|o| o == "*")
    {
        errs.push(FieldError::new(
            "spec.cors.allowCredentials",
            "Forbidden: may not be true with allowOrigins \"*\" (any site could read the app as its user); list the origins",
        ));
    }
    if let Some(cors) = &spec.cors {
        for (i, origin) in cors.allow_origins.iter().enumerate() {
            let ok =
                origin == "*" || origin.starts_with("http://") || origin.starts_with("https://");
            if !ok || origin.bytes().any(|c| c.is_ascii_control() || c == b' ') {
                errs.push(FieldError::new(
                    format!("spec.cors.allowOrigins[{i}]"),
                    format!("Invalid value: {origin:?}: must be \"*\" or an http(s) origin"),
                ));
            }
        }
    }
    errs
}

/// Validates a DaemonInjection spec.
pub fn daemon_injection_spec(spec: &DaemonInjectionSpec) -> Vec<FieldError> {
    let mut errs = target("spec.target", &spec.target);
    if let Some(d) = &spec.daemon {
        errs.extend(daemon("spec.daemon", d));
    }
    errs
}

fn daemon(field: &str, d: &DaemonSpec) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if d.source.is_none() {
        let set: Vec<&str> = [
            ("args", !d.args.is_empty()),
            ("env", !d.env.is_empty()),
            ("port", d.port.is_some()),
            ("installPath", d.install_path.is_some()),
            ("readinessProbe", d.readiness_probe.is_some()),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect();
        for name in set {
            errs.push(FieldError::new(
                format!("{field}.{name}"),
                format!("Forbidden: {NEEDS_SOURCE_MESSAGE}"),
            ));
        }
    }
    if let Some(DaemonSource::HostPath(p)) = &d.source
        && !p.starts_with('/')
    {
        errs.push(FieldError::new(
            format!("{field}.source.hostPath"),
            format!("Invalid value: {p:?}: must be an absolute path"),
        ));
    }
    if let Some(p) = d.port {
        errs.extend(port(&format!("{field}.port"), p).err());
    }
    for (i, e) in d.env.iter().enumerate() {
        let b = e.name.as_bytes();
        let ok = !b.is_empty()
            && !b[0].is_ascii_digit()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
            && !e.value.contains('\0');
        if !ok {
            errs.push(FieldError::new(
                format!("{field}.env[{i}].name"),
                format!(
                    "Invalid value: {:?}: must be a C identifier ([A-Za-z_][A-Za-z0-9_]*)",
                    e.name
                ),
            ));
        }
    }
    if let Some(path) = &d.install_path {
        errs.extend(install_path(&format!("{field}.installPath"), path).err());
    }
    match &d.readiness_probe {
        Some(Probe::Http(h)) => {
            if !h.path.starts_with('/') {
                errs.push(FieldError::new(
                    format!("{field}.readinessProbe.http.path"),
                    format!("Invalid value: {:?}: must start with '/'", h.path),
                ));
            }
            if let Some(p) = h.port {
                errs.extend(port(&format!("{field}.readinessProbe.http.port"), p).err());
            }
        }
        Some(Probe::Tcp(t)) => {
            if let Some(p) = t.port {
                errs.extend(port(&format!("{field}.readinessProbe.tcp.port"), p).err());
            }
        }
        None => {}
    }
    if let Some(u) = &d.user {
        let numeric =
            |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|c| c.is_ascii_digit());
        let ok = matches!(u.split_once(':'), Some((uid, gid)) if numeric(uid) && numeric(gid));
        if !ok {
            errs.push(FieldError::new(
                format!("{field}.user"),
                format!("Invalid value: {u:?}: must be numeric \"uid:gid\" (a bare uid would run with gid 0)"),
            ));
        }
    }
    errs
}

fn install_path(field: &str, path: &str) -> Result<(), FieldError> {
    let normal = path.starts_with('/')
        && path.len() > 1
        && path
            .split('/')
            .skip(1)
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if !normal {
        return Err(FieldError::new(
            field,
            format!("Invalid value: {path:?}: must be a normalized absolute file path"),
        ));
    }
    if let Some(dir) = FORBIDDEN_INSTALL_DIRS
        .iter()
        .find(|d| path.starts_with(&format!("{d}/")))
    {
        return Err(FieldError::new(
            field,
            format!(
                "Invalid value: {path:?}: {dir} is often tmpfs or noexec in containers; use a path on the root filesystem such as /.previewd/"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(port: i32) -> PreviewLinkSpec {
        PreviewLinkSpec::new(Target::docker("web"), port)
    }

    #[test]
    fn ports_outside_1_to_65535_are_refused() {
        assert_eq!(preview_link_spec(&link(0)).len(), 1);
        assert_eq!(preview_link_spec(&link(65536)).len(), 1);
        assert!(preview_link_spec(&link(8080)).is_empty());
        assert_eq!(preview_link_spec(&link(0))[0].field, "spec.port");
    }

    #[test]
    fn subdomain_rules() {
        assert!(dns1123_subdomain("n", "my-link.v1").is_ok());
        // Long names without dots are fine (Secrets named after long objects).
        assert!(dns1123_subdomain("n", &"a".repeat(253)).is_ok());
        for bad in [
            "",
            "Upper",
            "-lead",
            "trail-",
            "a..b",
            "under_score",
            &"a".repeat(254),
        ] {
            assert!(
                dns1123_subdomain("n", bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn docker_names_with_path_characters_are_refused() {
        for bad in ["../etc", "a/b", "", "-x", "a b"] {
            let t = Target::docker(bad);
            assert_eq!(
                target("spec.target", &t).len(),
                1,
                "{bad:?} should be refused"
            );
        }
        let ok = Target::docker("My_app.1-x");
        assert!(target("spec.target", &ok).is_empty());
    }

    #[test]
    fn ttl_and_expiry_are_exclusive() {
        let mut spec = link(80);
        spec.ttl = "1h".parse().ok();
        spec.expires_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(
            preview_link_spec(&spec)
                .iter()
                .any(|e| e.field == "spec.ttl")
        );
    }

    #[test]
    fn install_paths_on_tmpfs_or_relative_are_refused() {
        for bad in ["/tmp/agent", "/dev/shm/agent", "relative", "/a/../b", "/"] {
            assert!(install_path("p", bad).is_err(), "{bad:?} should be refused");
        }
        assert!(install_path("p", "/.previewd/agent").is_ok());
    }

    #[test]
    fn daemon_settings_need_a_source() {
        let mut d = DaemonSpec {
            args: vec!["-v".into()],
            port: Some(80),
            ..DaemonSpec::default()
        };
        let spec = |d: &DaemonSpec| DaemonInjectionSpec {
            target: Target::docker("web"),
            daemon: Some(d.clone()),
        };
        let fields: Vec<String> = daemon_injection_spec(&spec(&d))
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["spec.daemon.args", "spec.daemon.port"]);
        d.source = Some(DaemonSource::HostPath("/usr/bin/x".into()));
        assert!(daemon_injection_spec(&spec(&d)).is_empty());
    }

    #[test]
    fn user_must_be_uid_colon_gid() {
        let spec = |u: &str| DaemonInjectionSpec {
            target: Target::docker("web"),
            daemon: Some(DaemonSpec {
                user: Some(u.into()),
                ..DaemonSpec::default()
            }),
        };
        assert!(daemon_injection_spec(&spec("1000:1000")).is_empty());
        assert_eq!(daemon_injection_spec(&spec("1000")).len(), 1);
        assert_eq!(daemon_injection_spec(&spec("app:app")).len(), 1);
    }
}

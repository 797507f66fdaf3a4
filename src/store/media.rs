//! The media types request bodies may have, as kube-apiserver accepts them.
//!
//! One parser serves the API listener's guard (which refuses every other body before any
//! handler runs, so a browser's cross-site `text/plain` "simple request" never reaches the
//! store) and the handlers (which pick the decoder, and the patch kind, from it): two checks
//! that must agree cannot read the same header two ways.

use http::{HeaderMap, header};

/// A request body's media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaType {
    /// `application/json`: objects (create, replace, delete options).
    Json,
    /// `application/yaml`: objects.
    Yaml,
    /// `application/merge-patch+json` (RFC 7386).
    MergePatch,
    /// `application/strategic-merge-patch+json`: for these resources (no merge keys) the
    /// same as a merge patch.
    StrategicMergePatch,
    /// `application/json-patch+json` (RFC 6902).
    JsonPatch,
    /// `application/apply-patch+yaml`: server-side apply.
    ApplyPatch,
}

/// Every accepted media type, as named in error messages.
pub const ACCEPTED: [&str; 6] = [
    "application/json",
    "application/yaml",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
    "application/apply-patch+yaml",
];

/// Why a request's `Content-Type` is not one the API reads.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MediaTypeError {
    /// A body came without a `Content-Type`.
    #[error("a request body needs a Content-Type; accepted media types are {}", ACCEPTED.join(", "))]
    Missing,
    /// More than one `Content-Type`: which one the body is in is ambiguous.
    #[error("the request has more than one Content-Type")]
    Ambiguous,
    /// A media type the API does not parse.
    #[error("the media type {0:?} is not supported; accepted media types are {accepted}", accepted = ACCEPTED.join(", "))]
    Unsupported(String),
}

impl MediaType {
    /// The media type a `Content-Type` value names: its essence (before any `;`
    /// parameters), trimmed, compared ignoring ASCII case as RFC 9110 §8.3.1 says.
    pub fn parse(content_type: &[u8]) -> Result<MediaType, MediaTypeError> {
        let essence = content_type
            .split(|b| *b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        let is = |name: &str| essence.eq_ignore_ascii_case(name.as_bytes());
        let kinds = [
            MediaType::Json,
            MediaType::Yaml,
            MediaType::MergePatch,
            MediaType::StrategicMergePatch,
            MediaType::JsonPatch,
            MediaType::ApplyPatch,
        ];
        ACCEPTED
            .iter()
            .zip(kinds)
            .find(|(name, _)| is(name))
            .map(|(_, kind)| kind)
            .ok_or_else(|| MediaTypeError::Unsupported(String::from_utf8_lossy(essence).into()))
    }

    /// The media type of a request's body, from its headers.
    pub fn of(headers: &HeaderMap) -> Result<MediaType, MediaTypeError> {
        let mut values = headers.get_all(header::CONTENT_TYPE).iter();
        let first = values.next().ok_or(MediaTypeError::Missing)?;
        if values.next().is_some() {
            return Err(MediaTypeError::Ambiguous);
        }
        MediaType::parse(first.as_bytes())
    }

    /// Whether a body of this type is decoded as YAML (else as JSON).
    pub fn is_yaml(self) -> bool {
        matches!(self, MediaType::Yaml | MediaType::ApplyPatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn the_apiservers_media_types_are_accepted_with_parameters_and_any_case() {
        assert_eq!(
            MediaType::parse(b"application/json; charset=utf-8"),
            Ok(MediaType::Json)
        );
        assert_eq!(
            MediaType::parse(b"Application/Apply-Patch+YAML"),
            Ok(MediaType::ApplyPatch)
        );
        assert_eq!(
            MediaType::parse(b" application/merge-patch+json "),
            Ok(MediaType::MergePatch)
        );
        for name in ACCEPTED {
            assert!(MediaType::parse(name.as_bytes()).is_ok(), "{name}");
        }
    }

    #[test]
    fn what_a_browser_sends_without_a_preflight_is_refused() {
        for simple in [
            &b"text/plain"[..],
            b"text/plain;charset=UTF-8",
            b"application/x-www-form-urlencoded",
            b"multipart/form-data; boundary=x",
            b"application/jsonx",
            b"application/vnd.kubernetes.protobuf",
            b"",
        ] {
            assert!(
                matches!(
                    MediaType::parse(simple),
                    Err(MediaTypeError::Unsupported(_))
                ),
                "{}",
                String::from_utf8_lossy(simple)
            );
        }
        let mut h = HeaderMap::new();
        assert_eq!(MediaType::of(&h), Err(MediaTypeError::Missing));
        h.append(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert_eq!(MediaType::of(&h), Ok(MediaType::Json));
        h.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(MediaType::of(&h), Err(MediaTypeError::Ambiguous));
    }
}

//! The per-injection secret that every agent request must present.
//!
//! The agent may listen on an address other containers on the network can reach, so a random
//! secret (passed by previewd through the exec's environment) is what keeps it from being a
//! tunnel into the container for anyone else.

use sha2::{Digest, Sha256};

use crate::agent::protocol::{MIN_SECRET_LEN, SECRET_ENV};

/// Why the agent has no usable secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment variable is not set.
    #[error("{SECRET_ENV} is not set; the agent will not run without a secret")]
    Missing,
    /// The secret is too short to be a random per-injection secret.
    #[error("{SECRET_ENV} must be at least {MIN_SECRET_LEN} characters")]
    TooShort,
    /// The secret can't be sent in an HTTP header unchanged.
    #[error("{SECRET_ENV} must be printable ASCII without spaces")]
    NotPrintable,
}

/// A secret the agent accepts. Only its SHA-256 digest is kept, so comparisons take the
/// same time whatever the presented value's length or content.
pub struct Secret {
    digest: [u8; 32],
}

impl Secret {
    /// Accepts `value` if it is long enough and printable ASCII (it travels in a header).
    pub fn new(value: &str) -> Result<Secret, SecretError> {
        if value.chars().count() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort);
        }
        if !is_header_safe(value) {
            return Err(SecretError::NotPrintable);
        }
        Ok(Secret {
            digest: Sha256::digest(value.as_bytes()).into(),
        })
    }

    /// The secret from [`SECRET_ENV`].
    pub fn from_env() -> Result<Secret, SecretError> {
        match std::env::var(SECRET_ENV) {
            Ok(value) => Secret::new(&value),
            Err(std::env::VarError::NotPresent) => Err(SecretError::Missing),
            Err(std::env::VarError::NotUnicode(_)) => Err(SecretError::NotPrintable),
        }
    }

    /// Compares `presented` in constant time (over the digests), so response timing leaks
    /// nothing about how much of a guess was right.
    pub fn matches(&self, presented: &str) -> bool {
        let other: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.digest
            .iter()
            .zip(other.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Whether `value` can be sent as a header value byte for byte: visible ASCII only.
pub fn is_header_safe(value: &str) -> bool {
    value.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_exact_secret() {
        let secret = Secret::new("0123456789abcdef").unwrap();
        assert!(secret.matches("0123456789abcdef"));
        assert!(!secret.matches("0123456789abcdeF"));
        assert!(!secret.matches("0123456789abcde"));
        assert!(!secret.matches(""));
    }

    #[test]
    fn short_or_unprintable_secrets_are_refused() {
        assert!(matches!(Secret::new(""), Err(SecretError::TooShort)));
        assert!(matches!(
            Secret::new("0123456789abcde"),
            Err(SecretError::TooShort)
        ));
        assert!(matches!(
            Secret::new("0123456789abcdef\r\nX: y"),
            Err(SecretError::NotPrintable)
        ));
        assert!(matches!(
            Secret::new("0123456789 abcdef"),
            Err(SecretError::NotPrintable)
        ));
    }
}

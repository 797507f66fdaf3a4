//! A link's capability host: `{name}--{capability}.{namespace}.{domain}`, a name that is its
//! own credential.
//!
//! A cookie cannot open a link everywhere a preview is shown: Safari keeps no third-party
//! cookies in an agent platform's cross-site `<iframe>`, and browsers fetch web app manifests
//! (and `crossorigin` resources) without any. The capability host needs no cookie and no
//! token: the host name carries 130 random bits, kept like the token only in the link's
//! Secret (never in the PreviewLink), so whoever may read links cannot open them. Both the
//! controller (which makes it) and the proxy (which checks it) read these names from here.

/// The key of the capability in the link's token Secret.
pub const KEY: &str = "capability";

/// What separates the link's name from its capability in a host label.
const SEPARATOR: &str = "--";

/// A capability's length: 26 characters of base32, 130 bits.
pub const LEN: usize = 26;

/// The alphabet of capabilities: lowercase base32 (host names are case-insensitive, so
/// browsers may lowercase what they are given).
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A new random capability.
pub fn generate() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..LEN)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// Whether `s` is of a capability's form.
fn is_capability(s: &str) -> bool {
    s.len() == LEN && s.bytes().all(|b| ALPHABET.contains(&b))
}

/// The host label part (`{name}--{capability}`) of a link named `name`, if it fits in a DNS
/// label (63 characters for the name's last dot-separated part with the capability).
pub fn host_name(name: &str, capability: &str) -> Option<String> {
    let last = name.rsplit('.').next().unwrap_or(name);
    (last.len() + SEPARATOR.len() + capability.len() <= 63)
        .then(|| format!("{name}{SEPARATOR}{capability}"))
}

/// A link id of a capability host (`{name}--{capability}.{namespace}`) split into the link's
/// own id (`{name}.{namespace}`) and the capability; `None` for any other id.
pub fn split(id: &str) -> Option<(String, &str)> {
    let (name, namespace) = id.rsplit_once('.')?;
    let (link, capability) = name.rsplit_once(SEPARATOR)?;
    (!link.is_empty() && is_capability(capability))
        .then(|| (format!("{link}.{namespace}"), capability))
}

/// Whether `presented` is `expected`, compared in constant time.
pub fn matches(presented: &str, expected: &str) -> bool {
    presented.len() == expected.len()
        && presented
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_hosts_split_back_into_link_and_capability() {
        let cap = generate();
        assert!(is_capability(&cap), "{cap}");
        assert_ne!(cap, generate());
        let host = host_name("web", &cap).unwrap_or_default();
        let id = format!("{host}.default");
        assert_eq!(split(&id), Some(("web.default".to_owned(), cap.as_str())));
        // Names with dots and dashes of their own.
        let host = host_name("my--app.v2", &cap).unwrap_or_default();
        assert_eq!(
            split(&format!("{host}.dev")),
            Some(("my--app.v2.dev".to_owned(), cap.as_str()))
        );
        // Plain ids and look-alikes are no capability hosts.
        assert_eq!(split("web.default"), None);
        assert_eq!(split("web--short.default"), None);
        assert_eq!(split(&format!("--{cap}.default")), None);
        assert_eq!(split(&format!("web--{}.default", cap.to_uppercase())), None);
        // Too long for one label.
        assert_eq!(host_name(&"a".repeat(40), &cap), None);
        assert!(matches(&cap, &cap) && !matches(&cap, &generate()) && !matches("a", "ab"));
    }
}

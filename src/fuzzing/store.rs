//! The YAML store's loader ([`crate::store::disk`]): what it makes of a state file's text.
//!
//! Properties: it never panics, whatever the file holds; and what it accepts round-trips,
//! as a restart needs: written back the way the store writes objects, then loaded again, it
//! is the same object.

use crate::store::disk::{ObjectKey, parse_object};

use super::drive::escaped;

/// The harness: `data` is a state file's content, loaded as a namespaced object and as a
/// cluster-scoped one. Panics when a property in the module doc fails.
pub fn store_yaml(data: &[u8]) {
    // A file that is not UTF-8 is refused before parsing (unreadable as text).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for namespace in ["default", ""] {
        let key = ObjectKey {
            resource: "previewlinks.previewd.dev".into(),
            namespace: namespace.into(),
            name: "web".into(),
        };
        let Ok(obj) = parse_object(text, &key) else {
            continue;
        };
        let written = serde_yaml::to_string(&obj).unwrap_or_else(|e| {
            panic!(
                "an accepted object cannot be written back ({e}): {}",
                escaped(data)
            )
        });
        match parse_object(&written, &key) {
            Ok(again) => assert_eq!(
                again,
                obj,
                "{} was loaded, written as {written:?}, and loaded as something else",
                escaped(data)
            ),
            Err(e) => panic!(
                "{} was loaded, written as {written:?}, and then refused: {e}",
                escaped(data)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_run() {
        super::super::mutate::bounded_run("store_yaml", store_yaml, DICTIONARY);
    }

    #[test]
    fn the_seeds_reach_the_round_trip() {
        let seeds = super::super::mutate::seeds("store_yaml");
        let loads = |file: &str, namespace: &str| {
            let (_, bytes) = seeds.iter().find(|(p, _)| p.ends_with(file)).unwrap();
            let key = ObjectKey {
                resource: "previewlinks.previewd.dev".into(),
                namespace: namespace.into(),
                name: "web".into(),
            };
            parse_object(std::str::from_utf8(bytes).unwrap(), &key).map(|_| ())
        };
        assert_eq!(loads("previewlink.yaml", "default"), Ok(()));
        assert_eq!(loads("weird.yaml", "default"), Ok(()));
        assert_eq!(loads("cluster.yaml", ""), Ok(()));
        assert!(loads("bad-version.yaml", "default").is_err());
    }

    /// Pieces of YAML.
    const DICTIONARY: &[&[u8]] = &[
        b"\n",
        b": ",
        b"- ",
        b"  ",
        b"'",
        b"\"",
        b"&a ",
        b"*a",
        b"<<: ",
        b"!!binary ",
        b"!tag ",
        b"---\n",
        b"...\n",
        b"~",
        b".inf",
        b".nan",
        b"0x1F",
        b"1e400",
        b"{",
        b"[",
        b"#",
        b"? ",
        b"|\n",
        b">-\n",
        b"\\u0000",
        b"namespace: default\n",
        b"resourceVersion: '7'\n",
    ];
}

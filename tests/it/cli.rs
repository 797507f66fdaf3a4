//! `previewd apply/get/delete` against `previewd serve`.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::common::{Server, previewd_bin};

fn previewd(server: &Server, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(previewd_bin())
        .args(args)
        .args(["--server", &server.url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn previewd {args:?}: {e}"));
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.unwrap_or("").as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    child.wait_with_output().unwrap_or_else(|e| panic!("{e}"))
}

fn ok(server: &Server, args: &[&str], stdin: Option<&str>) -> String {
    let out = previewd(server, args, stdin);
    assert!(
        out.status.success(),
        "previewd {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn manifest(port: u16, ttl: Option<&str>) -> String {
    let ttl = ttl.map(|t| format!("  ttl: {t}\n")).unwrap_or_default();
    format!(
        "apiVersion: previewd.dev/v1alpha1\nkind: PreviewLink\nmetadata:\n  name: demo\nspec:\n  target:\n    docker:\n      container: web\n  port: {port}\n{ttl}---\napiVersion: previewd.dev/v1alpha1\nkind: DaemonInjection\nmetadata:\n  name: web-agent\nspec:\n  target:\n    docker:\n      container: web\n"
    )
}

#[test]
fn apply_get_delete_round_trip() {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = Server::api_only(state.path());

    let created = ok(
        &server,
        &["apply", "-f", "-"],
        Some(&manifest(8080, Some("1h"))),
    );
    assert_eq!(
        created.trim(),
        "previewlink.previewd.dev/demo created\ndaemoninjection.previewd.dev/web-agent created"
    );
    assert_eq!(
        ok(
            &server,
            &["apply", "-f", "-"],
            Some(&manifest(8080, Some("1h")))
        )
        .lines()
        .next(),
        Some("previewlink.previewd.dev/demo unchanged")
    );
    // Removing ttl from the file removes it from the object.
    assert_eq!(
        ok(&server, &["apply", "-f", "-"], Some(&manifest(9090, None)))
            .lines()
            .next(),
        Some("previewlink.previewd.dev/demo configured")
    );
    let yaml = ok(&server, &["get", "pl", "demo", "-o", "yaml"], None);
    assert!(
        yaml.contains("port: 9090") && !yaml.contains("ttl"),
        "{yaml}"
    );

    let table = ok(&server, &["get", "previewlinks"], None);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(header, ["NAME", "TARGET", "PORT", "PHASE", "URL", "AGE"]);
    let row: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(row[..3], ["demo", "<none>", "9090"]);
    assert!(ok(&server, &["get", "di", "-o", "wide"], None).contains("RESTARTS"));
    assert!(ok(&server, &["get", "pl", "-A"], None).starts_with("NAMESPACE"));

    let unknown = previewd(&server, &["get", "widgets"], None);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr)
            .contains("doesn't have a resource type \"widgets\"")
    );

    let invalid = previewd(&server, &["apply", "-f", "-"], Some(&manifest(0, None)));
    assert!(!invalid.status.success());
    assert!(
        String::from_utf8_lossy(&invalid.stderr).contains("Error from server (Invalid)"),
        "{}",
        String::from_utf8_lossy(&invalid.stderr)
    );

    let garbage = previewd(&server, &["apply", "-f", "-"], Some("kind: [unclosed"));
    assert!(!garbage.status.success());
    assert!(String::from_utf8_lossy(&garbage.stderr).contains("invalid YAML"));

    assert_eq!(
        ok(&server, &["delete", "pl", "demo"], None).trim(),
        r#"previewlink.previewd.dev "demo" deleted"#
    );
    let gone = previewd(&server, &["get", "pl", "demo"], None);
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains(
            r#"Error from server (NotFound): previewlinks.previewd.dev "demo" not found"#
        )
    );
    let empty = previewd(&server, &["get", "pl"], None);
    assert!(empty.status.success());
    assert!(
        String::from_utf8_lossy(&empty.stderr).contains("No resources found in default namespace.")
    );
}

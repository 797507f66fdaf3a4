//! The real kubectl against `previewd serve`: what a user does without a cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use http::Request;
use serde_json::json;

use crate::common::{Server, raw, require_tool};

/// kubectl with its own kubeconfig and discovery cache, so runs never share state.
struct Kubectl {
    bin: PathBuf,
    server: String,
    home: tempfile::TempDir,
}

impl Kubectl {
    fn new(bin: PathBuf, server: &str) -> Kubectl {
        let home = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(home.path().join("kubeconfig"), "").unwrap_or_else(|e| panic!("{e}"));
        Kubectl {
            bin,
            server: server.to_owned(),
            home,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("HOME", self.home.path())
            .env("KUBECONFIG", self.home.path().join("kubeconfig"))
            .arg("--kubeconfig")
            .arg(self.home.path().join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.home.path().join("cache"))
            .args(["--server", &self.server, "--request-timeout", "20s"])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    /// Runs and requires success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {stdout}\n{stderr}"
        );
        stdout
    }
}

fn manifest(dir: &Path, port: u16) -> String {
    let path = dir.join(format!("link-{port}.yaml"));
    let yaml = format!(
        "apiVersion: previewd.dev/v1alpha1\nkind: PreviewLink\nmetadata:\n  name: demo\n  labels:\n    app: shop\nspec:\n  target:\n    docker:\n      container: web\n  port: {port}\n"
    );
    std::fs::write(&path, yaml).unwrap_or_else(|e| panic!("{e}"));
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_round_trip() {
    let Some(bin) = require_tool("kubectl", "PREVIEWD_REQUIRE_KUBECTL") else {
        return;
    };
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = Server::api_only(state.path());
    let k = Kubectl::new(bin, &server.url);
    let files = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));

    // Create, with kubectl's default (strict) validation.
    assert_eq!(
        k.ok(&["apply", "-f", &manifest(files.path(), 8080)]).trim(),
        "previewlink.previewd.dev/demo created"
    );

    // `get` by every name shows the printer columns.
    for name in ["previewlinks", "previewlink", "pl", "previewd"] {
        let out = k.ok(&["get", name]);
        let header = out.lines().next().unwrap_or("");
        for col in ["NAME", "TARGET", "PORT", "PHASE", "URL", "AGE"] {
            assert!(
                header.contains(col),
                "`get {name}` header lacks {col}: {out}"
            );
        }
        assert!(
            !header.contains("EXPIRES"),
            "priority columns only with -o wide: {out}"
        );
        assert!(out.contains("demo") && out.contains("8080"), "{out}");
    }
    assert!(k.ok(&["get", "pl", "-o", "wide"]).contains("EXPIRES"));
    let yaml = k.ok(&["get", "pl", "demo", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: PreviewLink")
            && yaml.contains("resourceVersion:")
            && yaml.contains("access: token"),
        "{yaml}"
    );

    // A watch sees a later change.
    let mut watch = k
        .command(&["get", "pl", "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Re-apply with a new port: a merge patch; the same file again is a no-op.
    assert_eq!(
        k.ok(&["apply", "-f", &manifest(files.path(), 9090)]).trim(),
        "previewlink.previewd.dev/demo configured"
    );
    assert_eq!(
        k.ok(&["apply", "-f", &manifest(files.path(), 9090)]).trim(),
        "previewlink.previewd.dev/demo unchanged"
    );

    // Unknown fields are refused under kubectl's strict validation.
    let bad = files.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: previewd.dev/v1alpha1\nkind: PreviewLink\nmetadata:\n  name: bad\nspec:\n  port: 80\n  bogus: 1\n  target:\n    docker:\n      container: web\n").unwrap_or_else(|e| panic!("{e}"));
    let out = k.run(&["apply", "-f", &bad.display().to_string()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(r#"unknown field "spec.bogus""#),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `wait` returns once something marks the link Ready.
    let client = server.client();
    let status = json!({"status": {"phase": "Ready", "target": "docker/web", "observedGeneration": 2,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Serving", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}]}});
    let req =
        Request::patch("/apis/previewd.dev/v1alpha1/namespaces/default/previewlinks/demo/status")
            .header("content-type", "application/merge-patch+json")
            .body(serde_json::to_vec(&status).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
    let (code, body) = raw(&client, req).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        k.ok(&["wait", "--for=condition=Ready", "pl/demo", "--timeout=20s"])
            .contains("condition met")
    );
    assert!(k.ok(&["get", "pl", "demo"]).contains("docker/web"));

    // Delete, then it is gone.
    assert!(
        k.ok(&["delete", "pl", "demo"])
            .contains(r#"previewlink.previewd.dev "demo" deleted"#)
    );
    let missing = k.run(&["get", "pl", "demo"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains(r#"previewlinks.previewd.dev "demo" not found"#)
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = watch.kill();
    let watched = watch.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&watched.stdout);
    assert!(
        text.contains("8080"),
        "watch printed the initial state: {text}"
    );
    assert!(
        text.contains("9090"),
        "watch printed the re-applied port: {text}"
    );
    assert!(
        text.contains("Ready"),
        "watch printed the status change: {text}"
    );
}

//! The image: the `Dockerfile` builds from the documented context on the local engine, and the
//! image runs previewd as a non-root user.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::require_tool;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The docker CLI with a reachable engine, or `None` (with a loud message) when there is none
/// and PREVIEWD_REQUIRE_DOCKER=1 does not make that a failure.
fn docker_cli() -> Option<PathBuf> {
    let docker = require_tool("docker", "PREVIEWD_REQUIRE_DOCKER")?;
    let version = Command::new(&docker)
        .args(["version", "--format", "{{.Server.Version}}"])
        .output();
    match version {
        Ok(out) if out.status.success() => Some(docker),
        failed => {
            let why = match failed {
                Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            if std::env::var("PREVIEWD_REQUIRE_DOCKER").as_deref() == Ok("1") {
                panic!(
                    "the Docker tests are required (PREVIEWD_REQUIRE_DOCKER=1) but no engine answers: {why}"
                );
            }
            eprintln!(
                "\n!!!!! SKIPPED: no Docker engine ({why}); set PREVIEWD_REQUIRE_DOCKER=1 to make this a failure !!!!!\n"
            );
            None
        }
    }
}

fn run(docker: &Path, args: &[&str]) -> Output {
    let out = Command::new(docker)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"));
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A test image or container, removed when dropped.
struct Removed<'a> {
    docker: &'a Path,
    args: [&'a str; 2],
    name: String,
}

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.docker)
            .args(self.args)
            .arg(&self.name)
            .output();
    }
}

#[test]
fn the_image_builds_from_scratch_and_runs_previewd_as_non_root() {
    let Some(docker) = docker_cli() else {
        return;
    };
    // The documented context: the repository root's Dockerfile and .dockerignore, the binaries
    // where `cargo build --release --bins` puts them.
    let ctx = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let bin_dir = ctx.path().join("target/x86_64-unknown-linux-gnu/release");
    std::fs::create_dir_all(&bin_dir).unwrap_or_else(|e| panic!("{e}"));
    for (from, name) in [
        (env!("CARGO_BIN_EXE_previewd"), "previewd"),
        (env!("CARGO_BIN_EXE_previewd-agent"), "previewd-agent"),
    ] {
        std::fs::copy(from, bin_dir.join(name)).unwrap_or_else(|e| panic!("{from}: {e}"));
    }
    for f in ["Dockerfile", ".dockerignore"] {
        std::fs::copy(repo(f), ctx.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let tag = format!("previewd-test/image:it-{}", suffix.get(..12).unwrap_or("x"));
    let _image = Removed {
        docker: &docker,
        args: ["rmi", "-f"],
        name: tag.clone(),
    };
    let ctx_arg = ctx.path().to_string_lossy().into_owned();
    run(&docker, &["build", "-q", "-t", &tag, &ctx_arg]);

    let version = format!("previewd {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        stdout(&run(&docker, &["run", "--rm", &tag, "--version"])),
        version
    );
    let agent = run(
        &docker,
        &[
            "run",
            "--rm",
            "--entrypoint",
            "/usr/local/bin/previewd-agent",
            &tag,
            "--version",
        ],
    );
    assert!(
        stdout(&agent).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        stdout(&agent)
    );
    let config: Value = serde_json::from_str(&stdout(&run(
        &docker,
        &["image", "inspect", "-f", "{{json .Config}}", &tag],
    )))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/previewd"])
    );
    let layers = stdout(&run(
        &docker,
        &["image", "inspect", "-f", "{{len .RootFS.Layers}}", &tag],
    ));
    assert_eq!(
        layers, "2",
        "an empty root and the two binaries, no base image"
    );

    // `serve` in the image as the cluster runs it: read-only root, no capabilities, its own
    // agent found beside it, a clean exit on SIGTERM.
    let container = format!("previewd-it-image-{}", suffix.get(..12).unwrap_or("x"));
    let _container = Removed {
        docker: &docker,
        args: ["rm", "-f"],
        name: container.clone(),
    };
    run(
        &docker,
        &[
            "run",
            "-d",
            "--name",
            &container,
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--tmpfs",
            "/state:uid=65532,gid=65532",
            &tag,
            "serve",
            "--state-dir",
            "/state",
            "--log-format",
            "json",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let logs = loop {
        let out = run(&docker, &["logs", &container]);
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        if text.contains("preview proxy listening") && text.contains("Docker is unavailable") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "previewd did not start in the image:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !logs.contains("injections will fail"),
        "the agent was not found:\n{logs}"
    );
    run(&docker, &["stop", "-t", "10", &container]);
    let code = stdout(&run(
        &docker,
        &["inspect", "-f", "{{.State.ExitCode}}", &container],
    ));
    assert_eq!(code, "0", "previewd did not exit cleanly on SIGTERM");
}

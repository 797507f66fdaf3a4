//! Test containers on the real Docker engine, shared by the Docker tests and the injection
//! benchmark. Images are built with `docker import` of a tar holding static binaries (the
//! project's agent, and busybox for a shell and servers), so no registry is needed.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures::TryStreamExt;
use previewd::runtime::docker::DockerRuntime;
use previewd::runtime::{ContainerRuntime, ExecSpec};

pub const BUSYBOX_IMAGE: &str = "previewd-test/busybox:it";
pub const NOSHELL_IMAGE: &str = "previewd-test/noshell:it";
const BUSYBOX: &str = "/bin/busybox";

/// The engine, or `None` (with a loud message) when it or busybox is absent and the Docker
/// tests are not required.
pub async fn docker() -> Option<DockerRuntime> {
    let missing = match DockerRuntime::connect().await {
        Ok(d) if std::path::Path::new(BUSYBOX).is_file() => return Some(d),
        Ok(_) => format!("{BUSYBOX} is missing (apt-get install busybox-static)"),
        Err(e) => format!("no Docker engine ({e})"),
    };
    if std::env::var("PREVIEWD_REQUIRE_DOCKER").as_deref() == Ok("1") {
        panic!(
            "the Docker tests are required (PREVIEWD_REQUIRE_DOCKER=1) but cannot run: {missing}"
        );
    }
    eprintln!(
        "\n!!!!! SKIPPED: {missing}; set PREVIEWD_REQUIRE_DOCKER=1 to make this a failure !!!!!\n"
    );
    None
}

fn tar_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_uid(0);
    h.set_gid(0);
    b.append_data(&mut h, path, data)
        .unwrap_or_else(|e| panic!("tar {path}: {e}"));
}

fn tar_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(mode);
    h.set_size(0);
    b.append_data(&mut h, path, std::io::empty())
        .unwrap_or_else(|e| panic!("tar {path}: {e}"));
}

fn tar_symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, path, target)
        .unwrap_or_else(|e| panic!("tar {path}: {e}"));
}

fn etc(b: &mut tar::Builder<Vec<u8>>) {
    tar_dir(b, "etc/", 0o755);
    tar_file(b, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644);
    tar_file(
        b,
        "etc/group",
        b"root:x:0:\napp:x:1000:\nnogroup:x:65534:\n",
        0o644,
    );
    tar_dir(b, "tmp/", 0o1777);
    tar_dir(b, "proc/", 0o755);
    tar_dir(b, "sys/", 0o755);
    tar_dir(b, "dev/", 0o755);
}

async fn import(docker: &Docker, image: &str, rootfs: Vec<u8>, changes: Vec<String>) {
    let (repo, tag) = image.split_once(':').unwrap_or((image, "latest"));
    let opts = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(repo)
        .tag(tag)
        .changes(changes)
        .build();
    docker
        .create_image(Some(opts), Some(bollard::body_full(rootfs.into())), None)
        .try_collect::<Vec<_>>()
        .await
        .unwrap_or_else(|e| panic!("docker import {image}: {e}"));
}

/// A root filesystem with `/etc` and busybox at `/bin/busybox`, linked as `applets`.
fn busybox_root(applets: &[&str]) -> tar::Builder<Vec<u8>> {
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("{BUSYBOX} is needed for the test images (apt-get install busybox-static): {e}")
    });
    let mut b = tar::Builder::new(Vec::new());
    etc(&mut b);
    tar_dir(&mut b, "bin/", 0o755);
    tar_file(&mut b, "bin/busybox", &busybox, 0o755);
    for applet in applets {
        tar_symlink(&mut b, &format!("bin/{applet}"), "busybox");
    }
    b
}

/// Builds both test images once per test run.
pub async fn images(docker: &Docker) {
    static BUILT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    BUILT.get_or_init(|| build_images(docker)).await;
}

async fn build_images(docker: &Docker) {
    let mut b = busybox_root(&[
        "sh", "httpd", "ls", "ps", "cat", "sleep", "id", "kill", "test", "nc", "echo",
    ]);
    // The project's own static test upstream (HTTP, SSE, WebSocket, streams), built by
    // `cargo test` as an example.
    let testapp = std::path::Path::new(env!("CARGO_BIN_EXE_previewd"))
        .with_file_name("examples")
        .join("testapp");
    let testapp = std::fs::read(&testapp).unwrap_or_else(|e| {
        panic!(
            "{} is needed (cargo build --examples): {e}",
            testapp.display()
        )
    });
    tar_dir(&mut b, "usr/", 0o755);
    tar_dir(&mut b, "usr/local/", 0o755);
    tar_dir(&mut b, "usr/local/bin/", 0o755);
    tar_file(&mut b, "usr/local/bin/testapp", &testapp, 0o755);
    tar_dir(&mut b, "www/", 0o755);
    tar_file(
        &mut b,
        "www/index.html",
        b"<h1>hello from busybox httpd</h1>\n",
        0o644,
    );
    tar_dir(&mut b, "home/", 0o755);
    tar_dir(&mut b, "home/app/", 0o777);
    import(
        docker,
        BUSYBOX_IMAGE,
        b.into_inner().unwrap_or_default(),
        vec!["ENV PATH=/bin".into(), "CMD [\"/bin/sh\"]".into()],
    )
    .await;

    // No shell, no tar, no libc: only the project's static agent, serving as the app.
    let agent = std::fs::read(env!("CARGO_BIN_EXE_previewd-agent"))
        .unwrap_or_else(|e| panic!("agent binary: {e}"));
    let mut b = tar::Builder::new(Vec::new());
    etc(&mut b);
    tar_file(&mut b, "server", &agent, 0o755);
    import(
        docker,
        NOSHELL_IMAGE,
        b.into_inner().unwrap_or_default(),
        vec![
            "ENTRYPOINT [\"/server\", \"serve\", \"--listen\", \"0.0.0.0:8080\"]".into(),
            "ENV PREVIEWD_AGENT_SECRET=app-secret-not-for-previewd".into(),
            "USER 65534:65534".into(),
        ],
    )
    .await;
}

/// A busybox image whose applets include tar (pod exec uploads stream into it).
pub const BUSYBOX_TAR_IMAGE: &str = "previewd-test/busybox-tar:it";
/// The same without tar, so pod exec uploads fall back to `sh -c 'cat > …'`.
pub const BUSYBOX_NOTAR_IMAGE: &str = "previewd-test/busybox-notar:it";

/// Builds the two busybox images the pod-exec tests need, once per test run.
pub async fn podexec_images(docker: &Docker) {
    static BUILT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    BUILT.get_or_init(|| build_podexec_images(docker)).await;
}

async fn build_podexec_images(docker: &Docker) {
    for (image, with_tar) in [(BUSYBOX_TAR_IMAGE, true), (BUSYBOX_NOTAR_IMAGE, false)] {
        let mut applets = vec![
            "sh",
            "cat",
            "mkdir",
            "chmod",
            "mv",
            "head",
            "sleep",
            "printf",
            "echo",
            "ps",
            "sha256sum",
            "stat",
            "true",
            "grep",
        ];
        if with_tar {
            applets.push("tar");
        }
        let b = busybox_root(&applets);
        import(
            docker,
            image,
            b.into_inner().unwrap_or_default(),
            vec![
                "ENV PATH=/bin".into(),
                "CMD [\"/bin/sleep\", \"3600\"]".into(),
            ],
        )
        .await;
    }
}

/// A test container, removed (with `-f`) when dropped.
pub struct TestContainer {
    docker: Docker,
    pub name: String,
}

impl TestContainer {
    /// Creates and (unless `start` is false) starts a container.
    pub async fn run(
        docker: &Docker,
        image: &str,
        cmd: Option<Vec<&str>>,
        host: HostConfig,
        user: Option<&str>,
        start: bool,
    ) -> TestContainer {
        let name = format!(
            "previewd-it-{}",
            uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .get(..12)
                .unwrap_or("x")
        );
        TestContainer::run_named(docker, &name, image, cmd, host, user, start).await
    }

    /// Creates (and optionally starts) a container with a given name.
    pub async fn run_named(
        docker: &Docker,
        name: &str,
        image: &str,
        cmd: Option<Vec<&str>>,
        host: HostConfig,
        user: Option<&str>,
        start: bool,
    ) -> TestContainer {
        let name = name.to_owned();
        let body = ContainerCreateBody {
            image: Some(image.into()),
            cmd: cmd.map(|c| c.into_iter().map(str::to_owned).collect()),
            user: user.map(str::to_owned),
            labels: Some(HashMap::from([(
                "previewd-test".to_owned(),
                "1".to_owned(),
            )])),
            host_config: Some(host),
            ..Default::default()
        };
        docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body,
            )
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        if start {
            docker
                .start_container(&name, None)
                .await
                .unwrap_or_else(|e| panic!("start {name}: {e}"));
        }
        TestContainer {
            docker: docker.clone(),
            name,
        }
    }

    /// A container running the project's test upstream on `addr`, once it listens.
    pub async fn testapp(docker: &Docker, addr: &str, host: HostConfig) -> TestContainer {
        let c = TestContainer::run(
            docker,
            BUSYBOX_IMAGE,
            Some(vec!["/usr/local/bin/testapp", addr]),
            host,
            None,
            true,
        )
        .await;
        c.wait_listening(addr).await;
        c
    }

    /// Waits (bounded) until something in the container listens on `addr`'s port, as a
    /// person waits for their app to start before opening its link: the engine says a
    /// container started when its process did, before the app binds (a `via: direct` link is
    /// Ready at once, and answered 502 while nothing listens).
    pub async fn wait_listening(&self, addr: &str) {
        let port: u16 = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {addr:?}"));
        let rt = DockerRuntime::connect()
            .await
            .unwrap_or_else(|e| panic!("the engine: {e}"));
        let spec = ExecSpec {
            argv: vec![
                "/bin/cat".into(),
                "/proc/net/tcp".into(),
                "/proc/net/tcp6".into(),
            ],
            env: Vec::new(),
            user: Some("0:0".into()),
        };
        let local = format!(":{port:04X}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let listing = rt.exec(&self.name, &spec).await.map(|o| o.stdout);
            let listens = listing.as_deref().unwrap_or_default().lines().any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                // sl, local_address, rem_address, st: 0A is LISTEN.
                fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "0A"
            });
            if listens {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nothing listens on port {port} in {} after 30 s: {listing:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A container running the project's test upstream on `addr`, and its misbehaving raw
    /// upstream (`GET /raw/{case}`) on `raw_addr`.
    pub async fn testapp_with_raw(
        docker: &Docker,
        addr: &str,
        raw_addr: &str,
        host: HostConfig,
    ) -> TestContainer {
        TestContainer::run(
            docker,
            BUSYBOX_IMAGE,
            Some(vec!["/usr/local/bin/testapp", addr, raw_addr]),
            host,
            None,
            true,
        )
        .await
    }

    /// A busybox container running `httpd` on `addr` in the foreground, once it listens.
    pub async fn httpd(
        docker: &Docker,
        addr: &str,
        user: Option<&str>,
        host: HostConfig,
    ) -> TestContainer {
        let c = TestContainer::run(
            docker,
            BUSYBOX_IMAGE,
            Some(vec!["/bin/httpd", "-f", "-p", addr, "-h", "/www"]),
            host,
            user,
            true,
        )
        .await;
        c.wait_listening(addr).await;
        c
    }
}

impl Drop for TestContainer {
    fn drop(&mut self) {
        let (docker, name) = (self.docker.clone(), self.name.clone());
        // Drop may run outside a runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    // fuse-overlayfs sometimes fails a removal ("directory not empty") and
                    // leaves the container dead; a second attempt removes it.
                    for _ in 0..3 {
                        let removed = docker
                            .remove_container(
                                &name,
                                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
                            )
                            .await;
                        match removed {
                            Ok(()) => return,
                            Err(bollard::errors::Error::DockerResponseServerError {
                                status_code: 404,
                                ..
                            }) => return,
                            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                        }
                    }
                });
            }
        })
        .join();
    }
}

//! Real apps in a real browser. JupyterLab, Streamlit and Gradio run from an image the tests
//! build (tests/apps/build-image.sh), each bound to 127.0.0.1 in its container with no origin
//! or proxy setting of its own, and are opened through a default link (`access: token`, via
//! the agent) in Debian's headless Chromium, driven by tests/browser/drive.py; then through
//! path URLs (`pathPrefix: keep` plus the app's own base-path setting); and testapp's `/page`
//! is embedded in an `<iframe>` of a page on another site. Each app is also opened directly (a
//! second container with the app on 0.0.0.0, at the container's IP): that baseline must pass,
//! and its timings are printed beside the link's (printed, never asserted).
//!
//! What each test asserts is what a user needs: every step of the scenario succeeds, and
//! Chromium logged no failed request, failed WebSocket or console error beyond the few
//! [`EXCUSES`], each with why.
//!
//! Needs Docker (PREVIEWD_REQUIRE_DOCKER), and Chromium, chromedriver, Python's selenium and
//! debootstrap (PREVIEWD_REQUIRE_BROWSER); without them the tests skip loudly.

use std::path::{Path, PathBuf};
use std::time::Instant;

use bollard::models::HostConfig;
use kube::api::Api;
use previewd::resources::PreviewLink;
use previewd::resources::preview_link::LinkPhase;
use previewd::runtime::docker::DockerRuntime;
use previewd::runtime::{ContainerRuntime, ExecSpec};
use serde_json::{Value, json};

use crate::common::{Server, previewd_bin, raw, require_tool};
use crate::containers::{TestContainer, docker, images};
use crate::docker::{server, server_with, wait_link};

const REQUIRE: &str = "PREVIEWD_REQUIRE_BROWSER";

/// Which URL a scenario opened: an excuse may hold for one form only.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Form {
    /// A link's own host name, or its capability host, or the app opened directly.
    Host,
    /// A link's own host name opened by its token URL: the session rides the token cookie.
    Token,
    /// `/p/NAME.NS/` on the proxy's shared host.
    Path,
}

/// A failed request that is not previewd's to fix: the request's URL path, its status, the
/// URL forms it is excused on, and why.
struct Excuse {
    path: &'static str,
    status: u64,
    forms: &'static [Form],
    why: &'static str,
}

/// Every failure the browser tests excuse. A console error is excused only when all it says
/// is that one of these requests failed (Chromium's "Manifest fetch from URL failed, code N").
const EXCUSES: &[Excuse] = &[
    Excuse {
        path: "/favicon.ico",
        status: 404,
        forms: &[Form::Host, Form::Path],
        why: "a page that declares no icon makes the browser ask the origin root for one: \
              testapp has none, and on a path URL the origin root is previewd's, not the app's",
    },
    Excuse {
        path: "/manifest.json",
        status: 401,
        forms: &[Form::Token],
        why: "browsers fetch a web app manifest without credentials (no cookie), so an origin \
              that authenticates by cookie cannot serve it; the link's capability URL, opened \
              beside it, needs no cookie and serves it",
    },
    Excuse {
        path: "/manifest.json",
        status: 404,
        forms: &[Form::Path],
        why: "Gradio links its manifest as /manifest.json whatever its root_path, so on a path \
              URL the browser asks the origin root, which is previewd's, not the app's",
    },
];

/// The path of an absolute URL (`/` when it has none).
fn url_path(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    path.split(['?', '#']).next().unwrap_or(path)
}

fn without_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// The distinct lines of `lines` in first-seen order, each with its count when repeated.
fn counted(lines: Vec<String>) -> Vec<String> {
    let mut distinct: Vec<(String, usize)> = Vec::new();
    for line in lines {
        match distinct.iter_mut().find(|(l, _)| *l == line) {
            Some((_, n)) => *n += 1,
            None => distinct.push((line, 1)),
        }
    }
    distinct
        .into_iter()
        .map(|(l, n)| if n > 1 { format!("{n}× {l}") } else { l })
        .collect()
}

fn excuse(form: Form, url: &str, status: u64) -> Option<&'static Excuse> {
    EXCUSES
        .iter()
        .find(|e| e.forms.contains(&form) && e.status == status && url_path(url) == e.path)
}

/// Whether a browser, its driver and selenium are here; skips loudly (or fails, when
/// required) otherwise.
fn browser_available() -> bool {
    let tools = ["chromium", "chromedriver", "debootstrap", "python3"]
        .iter()
        .all(|t| require_tool(t, REQUIRE).is_some());
    if !tools {
        return false;
    }
    let selenium = std::process::Command::new("python3")
        .args(["-c", "import selenium"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !selenium {
        if std::env::var(REQUIRE).as_deref() == Ok("1") {
            panic!("Python's selenium is required ({REQUIRE}=1) but cannot be imported");
        }
        eprintln!(
            "\n!!!!! SKIPPED: Python's selenium is not installed (pip install selenium); set {REQUIRE}=1 to make this a failure !!!!!\n"
        );
    }
    selenium
}

/// The Docker engine when it and the browser are here.
async fn setup() -> Option<DockerRuntime> {
    if !browser_available() {
        return None;
    }
    docker().await
}

/// One browser scenario at a time: Chromium and an app on two shared cores are plenty.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Builds (or reuses, by content hash) the image holding the three apps; returns its tag.
async fn app_image() -> &'static str {
    static IMAGE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    IMAGE
        .get_or_init(|| async {
            let log_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("apps-image-build.log");
            let log = std::fs::File::create(&log_path)
                .unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
            let started = Instant::now();
            let out = tokio::process::Command::new("bash")
                .arg(repo_file("tests/apps/build-image.sh"))
                .stderr(log)
                .output()
                .await
                .unwrap_or_else(|e| panic!("build-image.sh: {e}"));
            let build_log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = build_log.lines().rev().take(40).collect();
            assert!(
                out.status.success(),
                "building the app image failed (log: {}):\n{}",
                log_path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            let tag = String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or_default()
                .to_owned();
            println!(
                "app image {tag}: ready in {:.1} s (log: {})",
                started.elapsed().as_secs_f64(),
                log_path.display()
            );
            tag
        })
        .await
}

/// The three apps, as a user would start them.
#[derive(Clone, Copy, Debug)]
enum App {
    Jupyter,
    Streamlit,
    Gradio,
}

impl App {
    fn name(self) -> &'static str {
        match self {
            App::Jupyter => "jupyter",
            App::Streamlit => "streamlit",
            App::Gradio => "gradio",
        }
    }

    /// What to add to the URL of an app opened a second time, so it starts as new: JupyterLab
    /// keeps its workspace (the notebook opened before) on the server, and `?reset` clears it.
    fn second_visit(self) -> &'static str {
        match self {
            App::Jupyter => "lab?reset",
            App::Streamlit | App::Gradio => "",
        }
    }

    fn port(self) -> u16 {
        match self {
            App::Jupyter => 8888,
            App::Streamlit => 8501,
            App::Gradio => 7860,
        }
    }

    /// The command that serves the app on `bind`, under the base path `base` (`/p/NAME.NS/`)
    /// when given. No origin, CORS, XSRF or proxy setting: the apps' defaults. Jupyter's own
    /// token is off (previewd's token guards the link; the direct baseline is a test
    /// container on a private network); Streamlit's usage statistics are off so the page
    /// reports nothing to a third party.
    fn command(self, bind: &str, base: Option<&str>) -> Vec<String> {
        let port = self.port();
        let mut argv: Vec<String> = match self {
            App::Jupyter => [
                "/opt/venv/bin/jupyter",
                "lab",
                "--no-browser",
                &format!("--ServerApp.ip={bind}"),
                &format!("--ServerApp.port={port}"),
                "--IdentityProvider.token=",
                "--ServerApp.root_dir=/home/app",
            ]
            .map(str::to_owned)
            .to_vec(),
            App::Streamlit => [
                "/opt/venv/bin/streamlit",
                "run",
                "/apps/streamlit_app.py",
                &format!("--server.address={bind}"),
                &format!("--server.port={port}"),
                "--browser.gatherUsageStats=false",
            ]
            .map(str::to_owned)
            .to_vec(),
            App::Gradio => [
                "/usr/bin/env",
                &format!("GRADIO_SERVER_NAME={bind}"),
                &format!("GRADIO_SERVER_PORT={port}"),
            ]
            .map(str::to_owned)
            .to_vec(),
        };
        if let Some(base) = base {
            argv.push(match self {
                App::Jupyter => format!("--ServerApp.base_url={base}"),
                App::Streamlit => format!("--server.baseUrlPath={base}"),
                App::Gradio => format!("GRADIO_ROOT_PATH={}", base.trim_end_matches('/')),
            });
        }
        if let App::Gradio = self {
            argv.extend(["/opt/venv/bin/python".into(), "/apps/gradio_app.py".into()]);
        }
        argv
    }

    /// Starts the app in a new container of the app image.
    async fn start(self, rt: &DockerRuntime, bind: &str, base: Option<&str>) -> TestContainer {
        let argv = self.command(bind, base);
        TestContainer::run(
            rt.client(),
            app_image().await,
            Some(argv.iter().map(String::as_str).collect()),
            HostConfig::default(),
            None,
            true,
        )
        .await
    }

    /// Waits (up to two minutes) until the app answers HTTP at `path` inside its container:
    /// one exec that polls, so starting Python over and over does not slow the app's start.
    async fn wait_serving(self, rt: &DockerRuntime, c: &TestContainer, path: &str) {
        let spec = ExecSpec {
            argv: [
                "/opt/venv/bin/python",
                "-c",
                SERVING_PROBE,
                &self.port().to_string(),
                path,
            ]
            .map(str::to_owned)
            .to_vec(),
            env: Vec::new(),
            user: None,
        };
        let out = rt
            .exec(&c.name, &spec)
            .await
            .unwrap_or_else(|e| panic!("exec in {}: {e}", c.name));
        assert_eq!(
            out.exit_code,
            0,
            "{} in {} does not serve {path}: {}",
            self.name(),
            c.name,
            out.stderr
        );
    }
}

/// Python that polls `http://127.0.0.1:{argv[1]}{argv[2]}` until any HTTP answer (exit 0),
/// or gives up after 120 s (exit 1, saying why).
const SERVING_PROBE: &str = r#"
import http.client, sys, time
deadline = time.monotonic() + 120
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=2)
        c.request("GET", sys.argv[2])
        c.getresponse()
        sys.exit(0)
    except OSError as e:
        if time.monotonic() > deadline:
            sys.exit(f"not serving after 120 s: {e}")
        time.sleep(0.2)
"#;

async fn container_ip(rt: &DockerRuntime, c: &TestContainer) -> String {
    rt.client()
        .inspect_container(&c.name, None)
        .await
        .ok()
        .and_then(|i| i.network_settings?.networks)
        .and_then(|nets| nets.values().find_map(|ep| ep.ip_address.clone()))
        .filter(|ip| !ip.is_empty())
        .unwrap_or_else(|| panic!("{} has no IP address", c.name))
}

/// The last lines the app in `c` printed (what it said about the requests it refused).
async fn app_log(rt: &DockerRuntime, c: &TestContainer) -> String {
    use futures::TryStreamExt;
    let opts = bollard::query_parameters::LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .tail("25")
        .build();
    rt.client()
        .logs(&c.name, Some(opts))
        .map_ok(|line| line.to_string())
        .try_collect::<Vec<_>>()
        .await
        .map_or_else(|e| format!("(no log: {e})"), |lines| lines.concat())
}

/// Creates a PreviewLink from raw JSON with `fieldValidation=Strict`, so a field this
/// previewd does not know is refused rather than dropped.
async fn apply(server: &Server, name: &str, container: &str, port: u16, extra: Value) {
    let mut spec = json!({"target": {"docker": {"container": container}}, "port": port});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    let body = json!({
        "apiVersion": "previewd.dev/v1alpha1", "kind": "PreviewLink",
        "metadata": {"name": name}, "spec": spec
    });
    let req = http::Request::post(
        "/apis/previewd.dev/v1alpha1/namespaces/default/previewlinks?fieldValidation=Strict",
    )
    .header("content-type", "application/json")
    .body(serde_json::to_vec(&body).unwrap_or_default())
    .unwrap_or_else(|e| panic!("{e}"));
    let (code, answer) = raw(&server.client(), req).await;
    assert_eq!(code, 201, "creating link {name} with {extra}: {answer}");
}

fn cli(server: &Server, args: &[&str]) -> String {
    let out = std::process::Command::new(previewd_bin())
        .args(args)
        .args(["--server", &server.url])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "previewd {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Applies a link and waits until it is Ready; returns it and the seconds that took.
async fn ready_link(
    server: &Server,
    name: &str,
    container: &str,
    port: u16,
    extra: Value,
) -> (PreviewLink, f64) {
    let started = Instant::now();
    apply(server, name, container, port, extra).await;
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    let link = wait_link(&links, name, LinkPhase::Ready).await;
    (link, started.elapsed().as_secs_f64())
}

/// What drive.py reported for one scenario.
struct Report {
    json: Value,
}

impl Report {
    fn usable_s(&self) -> String {
        self.json
            .get("usable_s")
            .and_then(Value::as_f64)
            .map_or_else(|| "never".to_owned(), |s| format!("{s:.2} s"))
    }

    fn list(&self, key: &str) -> Vec<Value> {
        self.json
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// Everything in the report that a user would call broken, minus the [`EXCUSES`] for
    /// `form`; and what was excused, with why.
    fn problems(&self, form: Form) -> (Vec<String>, Vec<String>) {
        let mut out = Vec::new();
        let mut notes = Vec::new();
        let steps = self.list("steps");
        if steps.is_empty() {
            out.push("no step ran".into());
        }
        for step in steps {
            if step.get("ok") != Some(&Value::Bool(true)) {
                out.push(format!("step failed: {step}"));
            }
        }
        let mut excused = Vec::new();
        for f in self.list("failed_requests") {
            let url = f.get("url").and_then(Value::as_str).unwrap_or("");
            let status = f.get("status").and_then(Value::as_u64).unwrap_or(0);
            match excuse(form, url, status) {
                Some(e) => {
                    notes.push(format!("excused {url} ({status}): {}", e.why));
                    excused.push(format!("{url} failed, code {status}"));
                }
                None => out.push(format!(
                    "failed request: {} {} → {}",
                    f.get("type").and_then(Value::as_str).unwrap_or("?"),
                    without_query(url),
                    f.get("error")
                        .and_then(Value::as_str)
                        .map_or_else(|| status.to_string(), str::to_owned)
                )),
            }
        }
        for ws in self.list("failed_websockets") {
            out.push(format!(
                "failed WebSocket: {} → {}",
                without_query(ws.get("url").and_then(Value::as_str).unwrap_or("?")),
                ws.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no 101 answer")
            ));
        }
        for e in self.list("console_errors") {
            let text = e.as_str().unwrap_or("");
            if excused.iter().any(|x| text.ends_with(x.as_str())) {
                notes.push(format!(
                    "excused console error {text:?}: it reports an excused request"
                ));
            } else {
                out.push(format!("console error: {text}"));
            }
        }
        (counted(out), counted(notes))
    }

    fn summary(&self) -> String {
        format!(
            "{} {}: ok={} usable={} attempts={} screenshot={}\n  steps: {}\n  failed requests: {}\n  websockets: {}\n  event streams: {}\n  console errors: {}\n  page text: {}",
            self.json["scenario"],
            self.json["url"],
            self.json["ok"],
            self.usable_s(),
            self.json["attempts"],
            self.json["screenshot"],
            self.json["steps"],
            self.json["failed_requests"],
            self.json["websockets"],
            self.json["event_streams"],
            self.json["console_errors"],
            self.json["page_text"],
        )
    }
}

/// Runs one scenario in a fresh headless Chromium; the screenshot goes to
/// `target/tmp/browser/{shot}.png`.
async fn drive(scenario: &str, url: &str, shot: &str) -> Report {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let screenshot = dir.join(format!("{shot}.png"));
    let out = tokio::process::Command::new("python3")
        .arg(repo_file("tests/browser/drive.py"))
        .args([scenario, url, "--screenshot"])
        .arg(&screenshot)
        .args(["--timeout", "60"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("drive.py: {e}"));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "drive.py {scenario} {url} printed no report ({e}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let report = Report { json };
    println!("{}", report.summary());
    report
}

/// Asserts that nothing a user would call broken happened (the reports are printed above).
fn assert_works(what: &str, form: Form, report: &Report) {
    let (problems, excused) = report.problems(form);
    for note in excused {
        println!("{what}: {note}");
    }
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// The link URL that carries its token, with `path` in place of `/`.
fn token_url(server: &Server, name: &str, path: &str) -> String {
    let url = cli(server, &["url", name]);
    match url.split_once("/?previewd_token=") {
        Some((origin, token)) => format!("{origin}{path}?previewd_token={token}"),
        None => panic!("previewd url {name} printed {url:?}"),
    }
}

/// An app bound to 127.0.0.1 opened through a default link's host URL, and the same app
/// opened directly as the baseline.
async fn through_host_url(app: App) {
    let Some(rt) = setup().await else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let (local, direct) = tokio::join!(
        app.start(&rt, "127.0.0.1", None),
        app.start(&rt, "0.0.0.0", None)
    );
    tokio::join!(
        app.wait_serving(&rt, &local, "/"),
        app.wait_serving(&rt, &direct, "/")
    );
    let ip = container_ip(&rt, &direct).await;
    let baseline = drive(
        app.name(),
        &format!("http://{ip}:{}/", app.port()),
        &format!("{}-direct", app.name()),
    )
    .await;

    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = server(state.path());
    let name = app.name();
    let (_, ready_s) = ready_link(&server, name, &local.name, app.port(), json!({})).await;
    let linked = drive(
        app.name(),
        &token_url(&server, name, "/"),
        &format!("{name}-host-url"),
    )
    .await;
    let capability = cli(&server, &["url", "--embed", name]);
    let by_capability = drive(
        app.name(),
        &format!("{capability}{}", app.second_visit()),
        &format!("{name}-capability-url"),
    )
    .await;
    println!(
        "{name}: through the link: apply→Ready {ready_s:.2} s, page→UI usable {} (token URL), {} (capability URL) | opened directly: page→UI usable {}",
        linked.usable_s(),
        by_capability.usable_s(),
        baseline.usable_s()
    );
    println!("--- {name}'s log ---\n{}", app_log(&rt, &local).await);
    assert_works(
        &format!("{name} opened directly (the baseline)"),
        Form::Host,
        &baseline,
    );
    assert_works(
        &format!("{name} through the link's token URL"),
        Form::Token,
        &linked,
    );
    assert_works(
        &format!("{name} through the link's capability URL"),
        Form::Host,
        &by_capability,
    );
}

/// An app under its own base path `/p/NAME.default/` opened through the link's path URL, with
/// `pathPrefix: keep` so the app sees the path it was configured for; the baseline is the same
/// app and base path opened directly.
async fn through_path_url(app: App) {
    let Some(rt) = setup().await else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let name = format!("{}-path", app.name());
    let base = format!("/p/{name}.default/");
    let (local, direct) = tokio::join!(
        app.start(&rt, "127.0.0.1", Some(&base)),
        app.start(&rt, "0.0.0.0", Some(&base))
    );
    tokio::join!(
        app.wait_serving(&rt, &local, &base),
        app.wait_serving(&rt, &direct, &base)
    );
    let ip = container_ip(&rt, &direct).await;
    let baseline = drive(
        app.name(),
        &format!("http://{ip}:{}{base}", app.port()),
        &format!("{name}-direct"),
    )
    .await;

    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // Path URLs share one origin, so a server serves them only when told to.
    let server = server_with(state.path(), &[("PREVIEWD_PATH_URLS", "true")]);
    let (_, ready_s) = ready_link(
        &server,
        &name,
        &local.name,
        app.port(),
        json!({"pathPrefix": "keep"}),
    )
    .await;
    let linked = drive(
        app.name(),
        &cli(&server, &["url", "--path", &name]),
        &format!("{name}-path-url"),
    )
    .await;
    println!(
        "{name}: through the path URL: apply→Ready {ready_s:.2} s, page→UI usable {} | opened directly under {base}: page→UI usable {}",
        linked.usable_s(),
        baseline.usable_s()
    );
    println!("--- {name}'s log ---\n{}", app_log(&rt, &local).await);
    assert_works(
        &format!("{} under {base} opened directly (the baseline)", app.name()),
        Form::Host,
        &baseline,
    );
    assert_works(
        &format!("{} through the link's path URL", app.name()),
        Form::Path,
        &linked,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyter_runs_a_notebook_through_a_host_url() {
    through_host_url(App::Jupyter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamlit_round_trips_a_widget_through_a_host_url() {
    through_host_url(App::Streamlit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradio_delivers_a_result_over_sse_through_a_host_url() {
    through_host_url(App::Gradio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyter_runs_a_notebook_through_a_path_url() {
    through_path_url(App::Jupyter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamlit_round_trips_a_widget_through_a_path_url() {
    through_path_url(App::Streamlit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradio_delivers_a_result_over_sse_through_a_path_url() {
    through_path_url(App::Gradio).await;
}

/// testapp's `/page` inside an `<iframe>` of a page served from 127.0.0.1 (cross-site to
/// `*.preview.localhost`), as agent platforms show previews: its script, stylesheet, XHR and
/// WebSocket all load, both through the link's own URL with its token (the cookie then lives
/// in the embedding site's partition) and through its capability URL (`previewd url --embed`,
/// no cookie at all). The same page opened top-level through the link, and embedded straight
/// from the container (no previewd), are the controls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_embedded_in_a_cross_site_iframe_loads_everything() {
    let Some(rt) = setup().await else { return };
    images(rt.client()).await;
    let _one = ONE_AT_A_TIME.lock().await;
    let (local, direct) = tokio::join!(
        TestContainer::testapp(rt.client(), "127.0.0.1:3000", HostConfig::default()),
        TestContainer::testapp(rt.client(), "0.0.0.0:3000", HostConfig::default())
    );
    let ip = container_ip(&rt, &direct).await;
    let unproxied = drive("iframe", &format!("http://{ip}:3000/page"), "iframe-direct").await;

    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = server(state.path());
    ready_link(&server, "embed", &local.name, 3000, json!({})).await;
    let top = drive(
        "page",
        &token_url(&server, "embed", "/page"),
        "page-top-level",
    )
    .await;
    let with_token = drive(
        "iframe",
        &token_url(&server, "embed", "/page"),
        "iframe-token-url",
    )
    .await;
    let capability = cli(&server, &["url", "--embed", "embed"]);
    let capability = match capability.strip_suffix('/') {
        Some(origin) => format!("{origin}/page"),
        None => panic!("previewd url --embed printed {capability:?}"),
    };
    let with_capability = drive("iframe", &capability, "iframe-capability-url").await;
    assert_works(
        "the page embedded straight from the container",
        Form::Host,
        &unproxied,
    );
    assert_works(
        "the page opened top-level through the link",
        Form::Host,
        &top,
    );
    assert_works(
        "the page embedded in a cross-site iframe by the link's token URL",
        Form::Host,
        &with_token,
    );
    assert_works(
        "the page embedded in a cross-site iframe by the link's capability URL",
        Form::Host,
        &with_capability,
    );
}

#[test]
fn excuses_hold_for_their_path_status_and_form_only() {
    assert!(excuse(Form::Path, "http://127.0.0.1:1/manifest.json", 404).is_some());
    assert!(excuse(Form::Path, "http://127.0.0.1:1/manifest.json", 401).is_none());
    assert!(
        excuse(
            Form::Token,
            "http://g.default.preview.localhost:1/manifest.json",
            401
        )
        .is_some()
    );
    assert!(
        excuse(
            Form::Host,
            "http://g--c.default.preview.localhost:1/manifest.json",
            401
        )
        .is_none(),
        "the capability URL must serve the manifest"
    );
    assert!(
        excuse(
            Form::Host,
            "http://g.default.preview.localhost:1/manifest.json",
            404
        )
        .is_none()
    );
    assert!(
        excuse(
            Form::Path,
            "http://127.0.0.1:1/p/g.default/manifest.json?v=1",
            404
        )
        .is_none()
    );
    assert!(
        excuse(
            Form::Host,
            "http://a.default.preview.localhost:1/favicon.ico?x=1",
            404
        )
        .is_some()
    );
    assert!(
        excuse(
            Form::Host,
            "http://a.default.preview.localhost:1/favicon.ico",
            401
        )
        .is_none()
    );
}

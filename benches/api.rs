//! Benchmark of the embedded API (`cargo bench --bench api`).
//!
//! Starts the release `previewd serve` on a temporary state directory and reports, with
//! baselines measured in the same run:
//! - time from `kubectl apply` (or a kube-rs create) to the object appearing in a kube-rs
//!   reflector, against the wall time of the apply itself;
//! - list latency with 10,000 objects in the store (one request, and paged by 500 as kubectl
//!   and kube-rs watchers do, plain and as a kubectl Table), against 100 objects and against a
//!   `/version` round trip.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// The test helpers are shared with the integration tests; not all of them are used here.
#[allow(dead_code)]
#[path = "../tests/it/common.rs"]
mod common;

use futures::StreamExt;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use previewd::resources::target::Target;
use previewd::resources::{PreviewLink, PreviewLinkSpec};

fn link(name: &str) -> PreviewLink {
    PreviewLink::new(name, PreviewLinkSpec::new(Target::docker("web"), 8080))
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples.get(idx).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn time_n<F, Fut>(n: usize, mut f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        out.push(t.elapsed());
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let server = common::Server::start_with(
        state.path(),
        &[("RUST_LOG", "warn,previewd::serve=info"), common::API_ONLY],
    );
    let url = server.url.clone();
    let client = kube::Client::try_from(kube::Config::new(url.parse()?))?;
    let api: Api<PreviewLink> = Api::default_namespaced(client.clone());
    println!("previewd embedded API benchmark against {url} (release build)\n");

    // --- apply → reflector ---
    let (reader, writer) = reflector::store();
    let feed = tokio::spawn(
        reflector(writer, watcher(api.clone(), watcher::Config::default()))
            .applied_objects()
            .for_each(|_| async {}),
    );
    reader.wait_until_ready().await?;
    let appear = |name: String| {
        let reader = reader.clone();
        async move {
            while !reader
                .state()
                .iter()
                .any(|o| o.metadata.name.as_deref() == Some(name.as_str()))
            {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
    };
    let mut create_to_reflector = Vec::new();
    for i in 0..20 {
        let name = format!("api-{i}");
        let t = Instant::now();
        api.create(&PostParams::default(), &link(&name)).await?;
        appear(name).await;
        create_to_reflector.push(t.elapsed());
    }
    let kubectl = which("kubectl");
    let (mut apply_wall, mut apply_to_reflector) = (Vec::new(), Vec::new());
    if let Some(kubectl) = &kubectl {
        let home = tempfile::tempdir()?;
        std::fs::write(home.path().join("kc"), "")?;
        for i in 0..20 {
            let name = format!("kubectl-{i}");
            let manifest = home.path().join(format!("{name}.yaml"));
            std::fs::write(
                &manifest,
                format!(
                    "apiVersion: previewd.dev/v1alpha1\nkind: PreviewLink\nmetadata:\n  name: {name}\nspec:\n  target:\n    docker:\n      container: web\n  port: 8080\n"
                ),
            )?;
            let t = Instant::now();
            let mut child = Command::new(kubectl)
                .env("HOME", home.path())
                .arg("--kubeconfig")
                .arg(home.path().join("kc"))
                .arg("--cache-dir")
                .arg(home.path().join("cache"))
                .args(["--server", &url, "apply", "-f"])
                .arg(&manifest)
                .stdout(Stdio::null())
                .spawn()?;
            // Poll the reflector while kubectl runs: the object may arrive before it exits.
            let (mut seen, mut exited) = (None, None);
            while seen.is_none() || exited.is_none() {
                if seen.is_none()
                    && reader
                        .state()
                        .iter()
                        .any(|o| o.metadata.name.as_deref() == Some(name.as_str()))
                {
                    seen = Some(t.elapsed());
                }
                if exited.is_none()
                    && let Some(status) = child.try_wait()?
                {
                    anyhow::ensure!(status.success(), "kubectl apply failed");
                    exited = Some(t.elapsed());
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            apply_wall.extend(exited);
            apply_to_reflector.extend(seen);
        }
    }
    feed.abort();

    println!("apply → reflector (20 objects each)");
    println!(
        "  kube-rs create → in reflector      p50 {}  p95 {}",
        ms(percentile(&mut create_to_reflector, 0.5)),
        ms(percentile(&mut create_to_reflector, 0.95))
    );
    if kubectl.is_some() {
        let (w50, r50) = (
            percentile(&mut apply_wall, 0.5),
            percentile(&mut apply_to_reflector, 0.5),
        );
        println!(
            "  kubectl apply (process wall time)  p50 {}  p95 {}",
            ms(w50),
            ms(percentile(&mut apply_wall, 0.95))
        );
        println!(
            "  kubectl apply start → in reflector p50 {}  p95 {}",
            ms(r50),
            ms(percentile(&mut apply_to_reflector, 0.95))
        );
        println!(
            "  ratio (kubectl start → in reflector) / (kubectl wall time), p50: {:.3}",
            r50.as_secs_f64() / w50.as_secs_f64()
        );
    } else {
        println!("  kubectl not installed: kubectl rows skipped");
    }

    // --- list latency ---
    let version = time_n(50, || {
        let c = client.clone();
        async move {
            let _ = c.apiserver_version().await;
        }
    })
    .await;
    let fill = |from: usize, to: usize| {
        let api = api.clone();
        async move {
            let t = Instant::now();
            futures::stream::iter(from..to)
                .for_each_concurrent(16, |i| {
                    let api = api.clone();
                    async move {
                        let _ = api
                            .create(&PostParams::default(), &link(&format!("bulk-{i:05}")))
                            .await;
                    }
                })
                .await;
            t.elapsed()
        }
    };
    let existing = api.list(&ListParams::default()).await?.items.len();
    fill(0, 100 - existing).await;
    let mut small = list_timings(&api, &client).await?;
    let fill_time = fill(100, 10_000).await;
    let count = api.list(&ListParams::default()).await?.items.len();
    let mut large = list_timings(&api, &client).await?;
    let mut version = version;
    let v50 = percentile(&mut version, 0.5);
    println!(
        "\nwrites: {} creates (16 concurrent) in {:.1} s = {:.0} creates/s (each fsynced before the answer)",
        10_000 - 100,
        fill_time.as_secs_f64(),
        9_900.0 / fill_time.as_secs_f64()
    );
    println!(
        "\nlist latency, p50 of 20 (objects in the store: 100 vs {count}); GET /version p50 {}",
        ms(v50)
    );
    for (label, s, l) in [
        ("one request, all objects", &mut small.0, &mut large.0),
        (
            "paged by 500 (kubectl, kube-rs)",
            &mut small.1,
            &mut large.1,
        ),
        ("kubectl Table, paged by 500", &mut small.2, &mut large.2),
    ] {
        let (s50, l50) = (percentile(s, 0.5), percentile(l, 0.5));
        println!(
            "  {label:<34} 100: {:>10}   {count}: {:>10}   ratio {:>6.1}x   {count} vs /version {:>7.1}x   per object {:.1} µs",
            ms(s50),
            ms(l50),
            l50.as_secs_f64() / s50.as_secs_f64(),
            l50.as_secs_f64() / v50.as_secs_f64(),
            l50.as_secs_f64() * 1e6 / count as f64
        );
    }
    drop(server);
    Ok(())
}

type Timings = (Vec<Duration>, Vec<Duration>, Vec<Duration>);

async fn list_timings(api: &Api<PreviewLink>, client: &kube::Client) -> anyhow::Result<Timings> {
    let all = time_n(20, || async {
        let _ = api.list(&ListParams::default()).await;
    })
    .await;
    let paged = time_n(20, || async {
        let mut params = ListParams::default().limit(500);
        while let Ok(page) = api.list(&params).await {
            match page.metadata.continue_ {
                Some(c) if !c.is_empty() => params = params.continue_token(&c),
                _ => break,
            }
        }
    })
    .await;
    let table = time_n(20, || async {
        let mut cont = String::new();
        loop {
            let url = format!("/apis/previewd.dev/v1alpha1/namespaces/default/previewlinks?limit=500&continue={cont}");
            let req = http::Request::get(url)
                .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
                .body(Vec::new())
                .unwrap_or_default();
            let Ok(page) = client.request::<serde_json::Value>(req).await else { break };
            match page.pointer("/metadata/continue").and_then(|c| c.as_str()) {
                Some(c) if !c.is_empty() => cont = c.to_owned(),
                _ => break,
            }
        }
    })
    .await;
    Ok((all, paged, table))
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|c| c.is_file())
    })
}

//! Benchmark of daemon injection on the real Docker engine (`cargo bench --bench inject`).
//!
//! Reports time from creating a DaemonInjection to it being Running (p50/p95 over 20
//! containers, one at a time), against the engine's own exec round trip; then
//! `PREVIEWD_BENCH_AT_ONCE` (default 200) injections applied at once — first and all Running,
//! previewd's extra RSS, the warnings their deletion logs — against the engine's own time for
//! the same uploads and execs at the same concurrency, all measured in the same run; and the
//! agent's size.

// The test helpers are shared with the integration tests; not all of them are used here.
#![allow(dead_code)]

#[path = "../tests/it/common.rs"]
mod common;
#[path = "../tests/it/containers.rs"]
mod containers;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use bollard::models::HostConfig;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use previewd::resources::daemon_injection::DaemonPhase;
use previewd::resources::target::Target;
use previewd::resources::{DaemonInjection, DaemonInjectionSpec};
use previewd::runtime::{ContainerRuntime, ExecSpec, FileUpload};

/// The controller's bound on injections at once (src/controller/mod.rs), used by the
/// engine baseline so that both do the same work the same way.
const ENGINE_CONCURRENCY: usize = 16;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples
        .get(((samples.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

async fn until_running(api: &Api<DaemonInjection>, name: &str) {
    loop {
        if let Ok(o) = api.get(name).await
            && o.status.and_then(|s| s.phase) == Some(DaemonPhase::Running)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A number from a process's `/proc/PID/status` (`VmRSS:` in KiB, `Threads:`).
fn status_value(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// Resident memory of a process now (VmRSS), in bytes.
fn rss(pid: u32) -> u64 {
    status_value(pid, "VmRSS:") * 1024
}

/// The highest RSS and thread count of a process, polled every 20 ms until `stop`.
struct Peaks {
    stop: Arc<AtomicBool>,
    rss: Arc<AtomicU64>,
    threads: Arc<AtomicU64>,
}

fn watch_peaks(pid: u32) -> Peaks {
    let peaks = Peaks {
        stop: Arc::new(AtomicBool::new(false)),
        rss: Arc::new(AtomicU64::new(0)),
        threads: Arc::new(AtomicU64::new(0)),
    };
    let (s, r, t) = (peaks.stop.clone(), peaks.rss.clone(), peaks.threads.clone());
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            r.fetch_max(rss(pid), Ordering::Relaxed);
            t.fetch_max(status_value(pid, "Threads:"), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    peaks
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn injection(name: &str, container: &str) -> DaemonInjection {
    DaemonInjection::new(name, DaemonInjectionSpec::new(Target::docker(container)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some(rt) = containers::docker().await else {
        return Ok(());
    };
    containers::images(rt.client()).await;
    let agent = env!("CARGO_BIN_EXE_previewd-agent");
    let at_once: usize = std::env::var("PREVIEWD_BENCH_AT_ONCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut sequential_boxes = Vec::new();
    for _ in 0..20 {
        sequential_boxes.push(
            containers::TestContainer::httpd(
                rt.client(),
                "127.0.0.1:3000",
                None,
                HostConfig::default(),
            )
            .await,
        );
    }
    let parallel_boxes: Vec<_> = futures::stream::iter(0..at_once)
        .map(|_| {
            containers::TestContainer::httpd(
                rt.client(),
                "127.0.0.1:3000",
                None,
                HostConfig::default(),
            )
        })
        .buffer_unordered(8)
        .collect()
        .await;
    // Baseline: one exec round trip through the engine (create + start + wait), same containers.
    let mut exec_rtt = Vec::new();
    for c in &sequential_boxes {
        let t = Instant::now();
        rt.exec(
            &c.name,
            &ExecSpec {
                argv: vec!["/bin/true".into()],
                env: Vec::new(),
                user: None,
            },
        )
        .await?;
        exec_rtt.push(t.elapsed());
    }
    // Baseline for the burst: what an injection asks of the engine — inspect, upload the
    // agent, run it once — for every container, ENGINE_CONCURRENCY at a time.
    let agent_bytes = bytes::Bytes::from(std::fs::read(agent)?);
    let t = Instant::now();
    let engine: Vec<Result<(), previewd::runtime::RuntimeError>> =
        futures::stream::iter(&parallel_boxes)
            .map(|c| {
                let (rt, agent_bytes) = (rt.clone(), agent_bytes.clone());
                async move {
                    rt.resolve(&c.name).await?;
                    let path = "/tmp/previewd-bench/agent".to_owned();
                    rt.upload(
                        &c.name,
                        &[FileUpload {
                            path: path.clone(),
                            contents: agent_bytes,
                            mode: 0o755,
                        }],
                    )
                    .await?;
                    rt.exec(
                        &c.name,
                        &ExecSpec {
                            argv: vec![path.clone(), "--version".into()],
                            env: Vec::new(),
                            user: None,
                        },
                    )
                    .await?;
                    Ok(())
                }
            })
            .buffer_unordered(ENGINE_CONCURRENCY)
            .collect()
            .await;
    let engine_all = t.elapsed();
    engine.into_iter().collect::<Result<Vec<()>, _>>()?;

    let state = tempfile::tempdir()?;
    let server = common::Server::start_with(
        state.path(),
        &[
            ("PREVIEWD_AGENT_BINARY", agent),
            ("RUST_LOG", "warn,previewd::serve=info"),
        ],
    );
    let api: Api<DaemonInjection> = Api::default_namespaced(server.client());
    let mut one_at_a_time = Vec::new();
    for (i, c) in sequential_boxes.iter().enumerate() {
        let name = format!("seq-{i}");
        let t = Instant::now();
        api.create(&PostParams::default(), &injection(&name, &c.name))
            .await?;
        until_running(&api, &name).await;
        one_at_a_time.push(t.elapsed());
    }

    let rss_before = rss(server.pid());
    let threads_before = status_value(server.pid(), "Threads:");
    let peaks = watch_peaks(server.pid());
    let par = ListParams::default().labels("bench=burst");
    let t = Instant::now();
    let created: Vec<kube::Result<DaemonInjection>> =
        futures::stream::iter(parallel_boxes.iter().enumerate())
            .map(|(i, c)| {
                let api = api.clone();
                let mut di = injection(&format!("par-{i}"), &c.name);
                di.metadata.labels = Some([("bench".to_owned(), "burst".to_owned())].into());
                async move { api.create(&PostParams::default(), &di).await }
            })
            .buffer_unordered(at_once.max(1))
            .collect()
            .await;
    created.into_iter().collect::<kube::Result<Vec<_>>>()?;
    let mut first_running = None;
    let all_running = loop {
        let running = api
            .list(&par)
            .await?
            .items
            .iter()
            .filter(|o| o.status.as_ref().and_then(|s| s.phase) == Some(DaemonPhase::Running))
            .count();
        if running > 0 && first_running.is_none() {
            first_running = Some(t.elapsed());
        }
        if running == at_once {
            break t.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    peaks.stop.store(true, Ordering::Relaxed);
    let peak_extra = peaks.rss.load(Ordering::Relaxed).saturating_sub(rss_before);
    let peak_threads = peaks.threads.load(Ordering::Relaxed);

    let log_before = server.log_text().lines().count();
    let deleted: Vec<kube::Result<_>> = futures::stream::iter(0..at_once)
        .map(|i| {
            let api = api.clone();
            async move {
                api.delete(&format!("par-{i}"), &DeleteParams::default())
                    .await
            }
        })
        .buffer_unordered(at_once.max(1))
        .collect()
        .await;
    deleted.into_iter().collect::<kube::Result<Vec<_>>>()?;
    while !api.list(&par).await?.items.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = server.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .skip(log_before)
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        .collect();

    let (e50, s50) = (
        percentile(&mut exec_rtt, 0.5),
        percentile(&mut one_at_a_time, 0.5),
    );
    println!(
        "daemon injection on Docker (local engine exec round trip p50 {})\n",
        ms(e50)
    );
    println!(
        "  apply → Running, one at a time (20)   p50 {}  p95 {}",
        ms(s50),
        ms(percentile(&mut one_at_a_time, 0.95))
    );
    println!(
        "  ratio to one engine exec round trip     {:.1}x (an injection = inspect + upload + 1 exec + health check)",
        s50.as_secs_f64() / e50.as_secs_f64()
    );
    println!("\n{at_once} applied at once");
    println!(
        "  engine alone: inspect + upload + 1 exec each, {ENGINE_CONCURRENCY} at a time   {}",
        ms(engine_all)
    );
    println!(
        "  previewd: first Running {}   all Running {}   ratio to the engine alone {:.2}x",
        ms(first_running.unwrap_or_default()),
        ms(all_running),
        all_running.as_secs_f64() / engine_all.as_secs_f64()
    );
    println!(
        "  previewd RSS before {}   peak extra during the burst {}",
        mib(rss_before),
        mib(peak_extra)
    );
    println!("  previewd threads before {threads_before}   peak during the burst {peak_threads}");
    println!(
        "  warnings and errors logged while all {at_once} were deleted: {}",
        warnings.len()
    );
    for w in warnings.iter().take(5) {
        println!("    {w}");
    }
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).ok();
    println!("\nagent binary");
    println!(
        "  this build ({agent}): {} bytes",
        size(std::path::Path::new(agent)).unwrap_or(0)
    );
    let small = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/x86_64-unknown-linux-gnu/agent/previewd-agent");
    match size(&small) {
        Some(n) => println!("  size profile ({}): {n} bytes", small.display()),
        None => println!(
            "  size profile: build it with `cargo build --profile agent --bin previewd-agent`"
        ),
    }
    let _ = server.terminate(Duration::from_secs(10));
    Ok(())
}

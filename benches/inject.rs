//! Benchmark of daemon injection on the real Docker engine (`cargo bench --bench inject`).
//!
//! Reports time from creating a DaemonInjection to it being Running (p50/p95 over 20
//! containers, one at a time, then all 20 at once), against the engine's own exec round trip
//! measured in the same run, and the agent's size.

// The test helpers are shared with the integration tests; not all of them are used here.
#![allow(dead_code)]

#[path = "../tests/it/common.rs"]
mod common;
#[path = "../tests/it/containers.rs"]
mod containers;

use std::time::{Duration, Instant};

use bollard::models::HostConfig;
use kube::api::{Api, PostParams};
use previewd::resources::daemon_injection::DaemonPhase;
use previewd::resources::target::Target;
use previewd::resources::{DaemonInjection, DaemonInjectionSpec};
use previewd::runtime::{ContainerRuntime, ExecSpec};

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
    let mut sequential_boxes = Vec::new();
    let mut parallel_boxes = Vec::new();
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
        parallel_boxes.push(
            containers::TestContainer::httpd(
                rt.client(),
                "127.0.0.1:3000",
                None,
                HostConfig::default(),
            )
            .await,
        );
    }
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
    let t = Instant::now();
    for (i, c) in parallel_boxes.iter().enumerate() {
        api.create(
            &PostParams::default(),
            &injection(&format!("par-{i}"), &c.name),
        )
        .await?;
    }
    for i in 0..parallel_boxes.len() {
        until_running(&api, &format!("par-{i}")).await;
    }
    let all_at_once = t.elapsed();

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
        "  ratio to one engine exec round trip     {:.1}x (an injection = upload + 3 execs + health check)",
        s50.as_secs_f64() / e50.as_secs_f64()
    );
    println!(
        "  20 applied at once → all Running        {}",
        ms(all_at_once)
    );
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

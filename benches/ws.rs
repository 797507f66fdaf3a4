//! WebSocket echo throughput through the preview proxy (`cargo bench --bench ws`).
//!
//! A testapp container echoes WebSocket messages; 64-byte and 16 KiB messages are sent with a
//! window of 32 in flight over one connection, directly (to the container's bridge address,
//! which previewd itself uses) and through previewd (a `via: direct` link and a `via: agent` link), in
//! interleaved rounds. Prints messages/s and the proxied/direct ratios (medians of 3 rounds).

// The test helpers are shared with the integration tests; not all of them are used here.
#[allow(dead_code)]
#[path = "../tests/it/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "../tests/it/containers.rs"]
mod containers;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::HostConfig;
use futures::{SinkExt, StreamExt};
use kube::api::{Api, PostParams};
use previewd::resources::PreviewLink;
use previewd::resources::preview_link::LinkPhase;
use previewd::runtime::ContainerRuntime;
use tokio_tungstenite::tungstenite::Message;

const WINDOW: usize = 32;
const RUN: Duration = Duration::from_secs(3);

/// Echo messages of `size` bytes for [`RUN`] with [`WINDOW`] in flight; messages per second.
async fn echo_rate(url: &str, size: usize) -> anyhow::Result<f64> {
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    let (mut tx, mut rx) = ws.split();
    let payload = vec![7u8; size];
    let (mut sent, mut received) = (0usize, 0usize);
    let start = Instant::now();
    while sent < WINDOW {
        tx.send(Message::binary(payload.clone())).await?;
        sent += 1;
    }
    while let Some(msg) = rx.next().await {
        if msg?.len() != size {
            anyhow::bail!("echo of the wrong size");
        }
        received += 1;
        if start.elapsed() < RUN {
            tx.send(Message::binary(payload.clone())).await?;
            sent += 1;
        } else if received == sent {
            break;
        }
    }
    Ok(received as f64 / start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some(rt) = containers::docker().await else {
        return Ok(());
    };
    containers::images(rt.client()).await;
    let app =
        containers::TestContainer::testapp(rt.client(), "0.0.0.0:8080", HostConfig::default())
            .await;
    // The baseline talks to the container on its bridge address, as previewd does.
    let ip = rt
        .resolve(&app.name)
        .await?
        .ips
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("the container has no address"))?;
    let state = tempfile::tempdir()?;
    let server = common::Server::start_with(
        state.path(),
        &[
            (
                "PREVIEWD_AGENT_BINARY",
                env!("CARGO_BIN_EXE_previewd-agent"),
            ),
            ("RUST_LOG", "warn,previewd::serve=info"),
        ],
    );
    let links: Api<PreviewLink> = Api::default_namespaced(server.client());
    for (name, via) in [("direct", "direct"), ("agent", "agent")] {
        let link: PreviewLink = serde_json::from_value(serde_json::json!({
            "apiVersion": "previewd.dev/v1alpha1", "kind": "PreviewLink", "metadata": {"name": name},
            "spec": {"target": {"docker": {"container": app.name}}, "port": 8080, "via": via, "access": "public"}
        }))?;
        links.create(&PostParams::default(), &link).await?;
    }
    for name in ["direct", "agent"] {
        while links.get(name).await?.status.and_then(|s| s.phase) != Some(LinkPhase::Ready) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let targets = [
        ("direct", format!("ws://{ip}:8080/ws")),
        (
            "proxy",
            format!("ws://{}/p/direct.default/ws", server.proxy),
        ),
        ("agent", format!("ws://{}/p/agent.default/ws", server.proxy)),
    ];
    println!(
        "WebSocket echo, one connection, {WINDOW} messages in flight, {RUN:?} per run, 3 rounds (release build)\n"
    );
    for size in [64usize, 16 * 1024] {
        let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
        for round in 0..3 {
            for i in 0..targets.len() {
                let (name, url) = &targets[(i + round) % targets.len()];
                rates
                    .entry(name)
                    .or_default()
                    .push(echo_rate(url, size).await?);
            }
        }
        let direct = median(rates.remove("direct").unwrap_or_default());
        println!(
            "{size:>6} B messages: direct {direct:>9.0} msg/s ({:.1} MiB/s each way)",
            direct * size as f64 / 1048576.0
        );
        for name in ["proxy", "agent"] {
            let r = median(rates.remove(name).unwrap_or_default());
            println!(
                "{size:>6} B messages: {name:<6} {r:>9.0} msg/s   ratio to direct {:.3}",
                r / direct
            );
        }
    }
    Ok(())
}

//! The state directory under crashes and bad files: `kill -9` mid-burst, malformed files,
//! and a second server on the same directory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, PostParams};
use previewd::resources::target::Target;
use previewd::resources::{PreviewLink, PreviewLinkSpec};
use tokio::sync::Mutex;

use crate::common::{API_ONLY, Server};

fn link(name: &str, port: i32) -> PreviewLink {
    PreviewLink::new(name, PreviewLinkSpec::new(Target::docker("web"), port))
}

fn rv(o: &PreviewLink) -> u64 {
    o.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_loses_no_acknowledged_write() {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = Server::api_only(state.path());
    let api: Api<PreviewLink> = Api::default_namespaced(server.client());
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let (api, acked) = (api.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("w{w}-{i}");
                match api
                    .create(&PostParams::default(), &link(&name, 1000 + i))
                    .await
                {
                    Ok(o) => {
                        acked.lock().await.insert(name, rv(&o));
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill9();
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().await.clone();
    assert!(
        acked.len() > 20,
        "the burst should have written something before the kill ({} writes)",
        acked.len()
    );

    let restarted = Server::api_only(state.path());
    assert!(
        !restarted
            .log_text()
            .contains("skipping unreadable state file"),
        "a file was torn: {}",
        restarted.log_text()
    );
    let api: Api<PreviewLink> = Api::default_namespaced(restarted.client());
    let list = api
        .list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stored: BTreeMap<String, u64> = list
        .items
        .iter()
        .map(|o| (o.metadata.name.clone().unwrap_or_default(), rv(o)))
        .collect();
    for (name, version) in &acked {
        assert_eq!(
            stored.get(name),
            Some(version),
            "acknowledged write {name}@{version} lost or changed"
        );
    }
    let highest = stored.values().copied().max().unwrap_or(0);
    let after = api
        .create(&PostParams::default(), &link("after-restart", 80))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        rv(&after) > highest,
        "resourceVersions keep increasing across the crash ({} <= {highest})",
        rv(&after)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_files_are_reported_skipped_and_untouched() {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    {
        let server = Server::api_only(state.path());
        let api: Api<PreviewLink> = Api::default_namespaced(server.client());
        api.create(&PostParams::default(), &link("good", 80))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            server.terminate(Duration::from_secs(10)),
            "SIGTERM stops the server cleanly"
        );
    }
    let dir = state
        .path()
        .join("objects/previewlinks.previewd.dev/default");
    let broken = dir.join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: previewd.dev/v1alpha1\nspec: [unclosed\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let server = Server::api_only(state.path());
    let logs = server.log_text();
    assert!(
        logs.contains("skipping unreadable state file") && logs.contains("broken.yaml"),
        "not reported: {logs}"
    );
    let api: Api<PreviewLink> = Api::default_namespaced(server.client());
    let names: Vec<String> = api
        .list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    assert_eq!(names, ["good"]);
    match api
        .create(&PostParams::default(), &link("broken", 80))
        .await
    {
        Err(kube::Error::Api(e)) => {
            assert!(e.message.contains("will not overwrite"), "{}", e.message)
        }
        other => panic!("creating over a malformed file must fail, got {other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(&broken).unwrap_or_default(),
        "apiVersion: previewd.dev/v1alpha1\nspec: [unclosed\n"
    );
}

#[test]
fn a_second_server_on_the_same_directory_refuses() {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let _first = Server::api_only(state.path());
    match Server::try_start(state.path(), &[API_ONLY]) {
        Ok(_) => panic!("a second server started on a locked state directory"),
        Err(output) => assert!(
            output.contains("is in use by another previewd"),
            "unclear refusal: {output}"
        ),
    }
}

//! Kubernetes mode with several replicas: two (then three) `previewd serve --store kube`
//! processes share one API server (a previewd serving only its embedded API stands in for
//! kube-apiserver) and elect a leader with a Lease. Only the leader reconciles; a killed
//! leader is replaced within the lease duration; a terminated one releases the lease.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams, PostParams};
use previewd::resources::{PreviewLink, PreviewLinkSpec, Target};

use crate::common::{Server, eventually, exchange};

const LEASE_SECONDS: u64 = 4;

pub fn kubeconfig(dir: &Path, server: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: previewd\n  cluster: {{server: \"{server}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: previewd, user: u, namespace: default}}\ncurrent-context: c\n"
    );
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    path
}

/// Starts `previewd serve --store kube` against the API server `kubeconfig` names, with the
/// test agent binary and `extra` environment.
pub fn kube_replica(state: &Path, kubeconfig: &Path, extra: &[(&str, &str)]) -> Server {
    let kc = kubeconfig.to_string_lossy().into_owned();
    let mut env = vec![
        ("PREVIEWD_STORE", "kube"),
        ("PREVIEWD_KUBECONFIG", kc.as_str()),
    ];
    env.extend_from_slice(extra);
    crate::docker::server_with(state, &env)
}

fn replica(dir: &Path, kubeconfig: &Path, identity: &str) -> Server {
    let lease = LEASE_SECONDS.to_string();
    kube_replica(
        &dir.join(identity),
        kubeconfig,
        &[
            ("PREVIEWD_IDENTITY", identity),
            ("PREVIEWD_LEASE_DURATION_SECONDS", lease.as_str()),
            ("PREVIEWD_LEASE_GRACE_SECONDS", "1"),
        ],
    )
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("previewd-controller")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

fn leads(server: &Server) -> bool {
    server.log_text().contains("leading: reconciling")
}

/// How many reconciles a replica ran, from its /metrics.
async fn reconciles(server: &Server) -> u64 {
    let addr = server.url.trim_start_matches("http://");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let (_, _, body) = exchange(addr, &request).await;
    body.lines()
        .filter(|l| l.starts_with("previewd_reconciles_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Creates a link and waits until some controller wrote its status.
async fn reconciled(links: &Api<PreviewLink>, name: &str) {
    let mut link = PreviewLink::new(name, PreviewLinkSpec::new(Target::docker("nowhere"), 80));
    link.metadata.namespace = Some("default".into());
    links
        .create(&PostParams::default(), &link)
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
    eventually(Duration::from_secs(20), "the link is reconciled", || {
        let links = links.clone();
        let name = name.to_owned();
        async move { links.get(&name).await.ok().and_then(|l| l.status?.phase) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_reconciles_and_another_takes_over() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let apiserver = Server::api_only(&dir.path().join("apiserver"));
    let kc = kubeconfig(dir.path(), &apiserver.url);
    let client = apiserver.client();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let links: Api<PreviewLink> = Api::namespaced(client, "default");

    let mut replicas = vec![replica(dir.path(), &kc, "b"), replica(dir.path(), &kc, "c")];
    let first = eventually(Duration::from_secs(20), "a leader is elected", || {
        let leases = leases.clone();
        async move { holder(&leases).await }
    })
    .await;
    reconciled(&links, "one").await;
    let leader = usize::from(first == "c");
    assert_eq!(
        replicas.iter().map(leads).collect::<Vec<_>>(),
        [leader == 0, leader == 1],
        "only {first} leads"
    );
    assert!(reconciles(&replicas[leader]).await > 0);
    assert_eq!(
        reconciles(&replicas[1 - leader]).await,
        0,
        "the follower reconciled"
    );

    // Someone else takes the lease (as after a partition): the leader stops at its next
    // renewal, well within the lease duration.
    let stolen_at = Instant::now();
    let steal = serde_json::json!({"spec": {
        "holderIdentity": "intruder",
        "renewTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        "leaseDurationSeconds": LEASE_SECONDS,
    }});
    leases
        .patch(
            "previewd-controller",
            &PatchParams::default(),
            &Patch::Merge(&steal),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let was_leader = &replicas[leader];
    eventually(
        Duration::from_secs(LEASE_SECONDS),
        "the leader stops",
        || async {
            was_leader
                .log_text()
                .contains("lost the lease: reconciling stops now")
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "{first} stopped {:?} after losing its lease",
        stolen_at.elapsed()
    );
    // The intruder never renews: a replica leads again once its lease expires.
    let first = eventually(
        Duration::from_secs(3 * LEASE_SECONDS),
        "a leader again",
        || {
            let leases = leases.clone();
            async move { holder(&leases).await.filter(|h| h != "intruder") }
        },
    )
    .await;
    let leader = usize::from(first == "c");

    // A killed leader keeps its lease until it expires; then the other replica takes over.
    let killed_at = Instant::now();
    replicas.remove(leader).kill9();
    let survivor = &replicas[0];
    let second = eventually(
        Duration::from_secs(3 * LEASE_SECONDS),
        "the survivor leads",
        || {
            let leases = leases.clone();
            let first = first.clone();
            async move { holder(&leases).await.filter(|h| *h != first) }
        },
    )
    .await;
    let took = killed_at.elapsed();
    eprintln!("{second} took over from {first} after {took:?}");
    assert!(
        took <= Duration::from_secs(2 * LEASE_SECONDS),
        "took over after {took:?}"
    );
    eventually(
        Duration::from_secs(5),
        "the survivor reconciles",
        || async { leads(survivor).then_some(()) },
    )
    .await;
    reconciled(&links, "two").await;

    // A terminated leader releases the lease on its way out.
    let standby = replica(dir.path(), &kc, "d");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!leads(&standby));
    assert_eq!(reconciles(&standby).await, 0);
    assert!(replicas.remove(0).terminate(Duration::from_secs(10)));
    let after = holder(&leases).await;
    assert_ne!(
        after.as_deref(),
        Some(second.as_str()),
        "the lease was not released"
    );
    eventually(
        Duration::from_secs(3 * LEASE_SECONDS),
        "the standby leads",
        || async { leads(&standby).then_some(()) },
    )
    .await;
    reconciled(&links, "three").await;
}

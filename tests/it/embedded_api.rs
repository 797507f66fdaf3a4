//! kube-rs's own watcher, reflector, Controller, finalizer helper and event Recorder, run
//! unmodified over `kube::Client::new(router)`: the embedded API is what the controllers
//! will talk to outside a cluster, so it must behave like an API server to them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use http::Request;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use previewd::resources::target::Target;
use previewd::resources::{PreviewLink, PreviewLinkSpec, PreviewLinkStatus};
use previewd::store::{Store, kinds};
use serde_json::{Value, json};

use crate::common::{eventually, raw};

fn in_process(dir: &std::path::Path) -> Client {
    let store =
        Arc::new(Store::open(dir, kinds::all()).unwrap_or_else(|e| panic!("open store: {e}")));
    Client::new(
        previewd::api::internal_router(
            store,
            previewd::metrics::Metrics::new(),
            previewd::watching::Readiness::default(),
            None,
        ),
        "default",
    )
}

fn link(name: &str, port: i32) -> PreviewLink {
    PreviewLink::new(name, PreviewLinkSpec::new(Target::docker("web"), port))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ReconcileError(#[from] kube::Error);

const FINALIZER: &str = "previewd.dev/test-cleanup";

#[tokio::test]
async fn controller_with_finalizer_runs_create_to_cleanup() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let client = in_process(dir.path());
    let api: Api<PreviewLink> = Api::default_namespaced(client.clone());
    let cleanups = Arc::new(AtomicUsize::new(0));
    let reconciles = Arc::new(AtomicUsize::new(0));

    struct Ctx {
        api: Api<PreviewLink>,
        cleanups: Arc<AtomicUsize>,
        reconciles: Arc<AtomicUsize>,
    }
    async fn reconcile(
        obj: Arc<PreviewLink>,
        ctx: Arc<Ctx>,
    ) -> Result<Action, kube::runtime::finalizer::Error<ReconcileError>> {
        ctx.reconciles.fetch_add(1, Ordering::SeqCst);
        let api = ctx.api.clone();
        let cleanups = ctx.cleanups.clone();
        finalizer(&ctx.api, FINALIZER, obj, |event| async move {
            match event {
                FinalizerEvent::Apply(o) => {
                    let status = json!({
                        "apiVersion": "previewd.dev/v1alpha1", "kind": "PreviewLink",
                        "status": PreviewLinkStatus { observed_generation: o.meta().generation, ..Default::default() }
                    });
                    api.patch_status(&o.name_any(), &PatchParams::apply("test-controller").force(), &Patch::Apply(status)).await?;
                    Ok(Action::await_change())
                }
                FinalizerEvent::Cleanup(_) => {
                    cleanups.fetch_add(1, Ordering::SeqCst);
                    Ok(Action::await_change())
                }
            }
        })
        .await
    }
    fn error_policy(
        _: Arc<PreviewLink>,
        _: &kube::runtime::finalizer::Error<ReconcileError>,
        _: Arc<Ctx>,
    ) -> Action {
        Action::requeue(Duration::from_millis(100))
    }

    let ctx = Arc::new(Ctx {
        api: api.clone(),
        cleanups: cleanups.clone(),
        reconciles: reconciles.clone(),
    });
    let controller = tokio::spawn(
        Controller::new(api.clone(), watcher::Config::default())
            .run(reconcile, error_policy, ctx)
            .for_each(|_| async {}),
    );

    api.create(&PostParams::default(), &link("web", 8080))
        .await
        .unwrap_or_else(|e| panic!("create: {e}"));
    let ready = eventually(
        Duration::from_secs(10),
        "finalizer and observedGeneration",
        || {
            let api = api.clone();
            async move {
                let o = api.get("web").await.ok()?;
                let has_finalizer = o.finalizers().iter().any(|f| f == FINALIZER);
                let observed = o.status.as_ref().and_then(|s| s.observed_generation);
                (has_finalizer && observed == Some(1)).then_some(o)
            }
        },
    )
    .await;
    assert_eq!(ready.meta().generation, Some(1));
    // Settle, then count: a status write that changes nothing must not trigger more reconciles.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = reconciles.load(Ordering::SeqCst);
    assert!(
        settled <= 4,
        "reconciled {settled} times for one object: no-op writes are re-triggering"
    );

    api.delete("web", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete: {e}"));
    eventually(Duration::from_secs(10), "the object to be gone", || {
        let api = api.clone();
        async move {
            matches!(api.get("web").await, Err(kube::Error::Api(e)) if e.code == 404).then_some(())
        }
    })
    .await;
    assert_eq!(
        cleanups.load(Ordering::SeqCst),
        1,
        "cleanup ran exactly once"
    );
    controller.abort();
}

#[tokio::test]
async fn watch_sees_exactly_the_changes_made() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let client = in_process(dir.path());
    let api: Api<PreviewLink> = Api::default_namespaced(client);
    let list = api
        .list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("list: {e}"));
    let rv = list.metadata.resource_version.unwrap_or_default();
    let mut stream = api
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap_or_else(|e| panic!("watch: {e}"))
        .boxed();

    // Writes to other kinds must not reach this watch (a typed client would choke on them).
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::default_namespaced(api.clone().into_client());
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "unrelated"}})).unwrap_or_default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    api.create(&PostParams::default(), &link("a", 80))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pp = PatchParams::default();
    api.patch("a", &pp, &Patch::Merge(json!({"spec": {"port": 81}})))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    api.patch("a", &pp, &Patch::Merge(json!({"spec": {"port": 81}})))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    api.patch_status(
        "a",
        &pp,
        &Patch::Merge(json!({"status": {"phase": "Ready"}})),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    api.patch_status(
        "a",
        &pp,
        &Patch::Merge(json!({"status": {"phase": "Ready"}})),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    api.delete("a", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let mut seen = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(700), stream.try_next())
        .await
        .unwrap_or(Ok(None))
        .map(Some)
    {
        match ev {
            Some(WatchEvent::Added(o)) => seen.push(format!("ADDED {}", o.spec.port)),
            Some(WatchEvent::Modified(o)) => seen.push(format!(
                "MODIFIED {} {:?}",
                o.spec.port,
                o.status.and_then(|s| s.phase)
            )),
            Some(WatchEvent::Deleted(o)) => seen.push(format!("DELETED {}", o.spec.port)),
            Some(WatchEvent::Bookmark(_)) => {}
            Some(WatchEvent::Error(e)) => panic!("watch error: {e:?}"),
            None => break,
        }
    }
    assert_eq!(
        seen,
        [
            "ADDED 80",
            "MODIFIED 81 None",
            "MODIFIED 81 Some(Ready)",
            "DELETED 81"
        ]
    );
}

#[tokio::test]
async fn reflector_and_selectors_follow_the_store() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let client = in_process(dir.path());
    let api: Api<PreviewLink> = Api::default_namespaced(client);
    let (reader, writer) = reflector::store();
    let cfg = watcher::Config::default().labels("app=shop");
    let feed = tokio::spawn(
        reflector(writer, watcher(api.clone(), cfg))
            .applied_objects()
            .for_each(|_| async {}),
    );
    let mut labelled = link("in", 80);
    labelled.metadata.labels = Some([("app".to_owned(), "shop".to_owned())].into());
    api.create(&PostParams::default(), &labelled)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    api.create(&PostParams::default(), &link("out", 80))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eventually(
        Duration::from_secs(5),
        "the labelled object in the reflector",
        || {
            let r = reader.clone();
            async move { (r.state().len() == 1 && r.state()[0].name_any() == "in").then_some(()) }
        },
    )
    .await;
    // Relabelling moves an object out of the selected set: the reflector drops it.
    api.patch(
        "in",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "blog"}}})),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eventually(
        Duration::from_secs(5),
        "the relabelled object to leave the reflector",
        || {
            let r = reader.clone();
            async move { r.state().is_empty().then_some(()) }
        },
    )
    .await;
    feed.abort();

    // Streaming lists (sendInitialEvents + the initial-events-end bookmark) work too.
    let (reader, writer) = reflector::store();
    let feed = tokio::spawn(
        reflector(
            writer,
            watcher(api.clone(), watcher::Config::default().streaming_lists()),
        )
        .applied_objects()
        .for_each(|_| async {}),
    );
    tokio::time::timeout(Duration::from_secs(5), reader.wait_until_ready())
        .await
        .unwrap_or_else(|_| panic!("streaming list never became ready"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reader.state().len(), 2);
    feed.abort();
}

#[tokio::test]
async fn recorder_events_repeat_through_patch() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let client = in_process(dir.path());
    let api: Api<PreviewLink> = Api::default_namespaced(client.clone());
    let obj = api
        .create(&PostParams::default(), &link("a", 80))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let recorder = Recorder::new(client.clone(), "previewd-test".into());
    let ev = Event {
        type_: EventType::Warning,
        reason: "ContainerNotFound".into(),
        note: Some("no such container".into()),
        action: "Inject".into(),
        secondary: None,
    };
    let reference = obj.object_ref(&());
    recorder
        .publish(&ev, &reference)
        .await
        .unwrap_or_else(|e| panic!("first event: {e}"));
    recorder
        .publish(&ev, &reference)
        .await
        .unwrap_or_else(|e| panic!("repeated event: {e}"));
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::default_namespaced(client);
    let list = events
        .list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        list.items.len(),
        1,
        "a repeated event is one object with a series"
    );
    assert_eq!(list.items[0].series.as_ref().map(|s| s.count), Some(2));
}

#[tokio::test]
async fn bad_input_gets_clear_status_errors() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let client = in_process(dir.path());
    let base = "/apis/previewd.dev/v1alpha1/namespaces/default/previewlinks";
    let post = |body: Value| {
        Request::post(base)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let spec = |port: Value, target: Value| json!({"apiVersion": "previewd.dev/v1alpha1", "kind": "PreviewLink", "metadata": {"name": "x"}, "spec": {"port": port, "target": target}});
    let web = json!({"docker": {"container": "web"}});

    let (code, body) = raw(&client, post(spec(json!(0), web.clone()))).await;
    assert_eq!(code, 422);
    assert_eq!(body["reason"], "Invalid");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("spec.port: Invalid value: 0: must be between 1 and 65535"),
        "{body}"
    );

    let (code, body) = raw(
        &client,
        post(spec(
            json!(80),
            json!({"docker": {"container": "a"}, "pod": {"name": "b"}}),
        )),
    )
    .await;
    assert_eq!(code, 422);
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("exactly one of docker or pod"),
        "{body}"
    );

    let mut bad_name = spec(json!(80), web.clone());
    bad_name["metadata"]["name"] = json!("Bad_Name");
    let (code, body) = raw(&client, post(bad_name)).await;
    assert_eq!(code, 422);
    assert!(
        body["message"].as_str().unwrap_or("").contains("RFC 1123"),
        "{body}"
    );

    let (code, body) = raw(
        &client,
        post(spec(json!(80), json!({"docker": {"container": "../etc"}}))),
    )
    .await;
    assert_eq!(code, 422, "{body}");

    let (code, body) = raw(
        &client,
        Request::get("/apis/previewd.dev/v1alpha1/namespaces/default/widgets")
            .body(Vec::new())
            .unwrap_or_default(),
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (404, Some("NotFound")));

    let huge = vec![b' '; 4 * 1024 * 1024];
    let (code, body) = raw(
        &client,
        Request::post(base)
            .header("content-type", "application/json")
            .body(huge)
            .unwrap_or_default(),
    )
    .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (413, Some("RequestEntityTooLarge"))
    );

    let (code, body) = raw(
        &client,
        Request::post(base)
            .header("content-type", "application/json")
            .body(b"{not json".to_vec())
            .unwrap_or_default(),
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (400, Some("BadRequest")));

    let (code, _) = raw(
        &client,
        Request::get(format!("{base}?labelSelector=a%20in%20b"))
            .body(Vec::new())
            .unwrap_or_default(),
    )
    .await;
    assert_eq!(code, 400);

    let (code, _) = raw(
        &client,
        Request::get("/apis/previewd.dev/v1alpha1/namespaces/..%2F../previewlinks")
            .body(Vec::new())
            .unwrap_or_default(),
    )
    .await;
    assert_eq!(code, 400, "namespaces with path characters are refused");

    // Nothing of the above was stored.
    let api: Api<PreviewLink> = Api::default_namespaced(client);
    assert!(
        api.list(&Default::default())
            .await
            .map(|l| l.items.is_empty())
            .unwrap_or(false)
    );
}

#[tokio::test]
async fn old_events_expire_as_on_a_real_api_server() {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let server = crate::common::Server::start_with(
        state.path(),
        &[crate::common::API_ONLY, ("PREVIEWD_EVENT_TTL_SECONDS", "2")],
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::default_namespaced(server.client());
    let ev: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": {"name": "old"},
        "eventTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        "reason": "Test", "action": "Test", "type": "Normal",
        "reportingController": "test", "reportingInstance": "test",
        "regarding": {"kind": "PreviewLink", "name": "x"},
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    events
        .create(&PostParams::default(), &ev)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(events.get_opt("old").await.ok().flatten().is_some());
    let dir = state.path().join("objects/events.events.k8s.io/default");
    let files = || std::fs::read_dir(&dir).map_or(0, |d| d.count());
    assert_eq!(files(), 1, "{}", dir.display());
    eventually(Duration::from_secs(10), "the Event to expire", || {
        let events = events.clone();
        async move { events.get_opt("old").await.ok().filter(|e| e.is_none()) }
    })
    .await;
    // Its file is gone too.
    assert_eq!(files(), 0);
}

//! The HTTP face of the store: an `axum::Router` that speaks the Kubernetes API.
//!
//! The same router is served on the API port (for kubectl and the CLI) and wrapped as the
//! in-process tower service behind `kube::Client` (for the controllers), so both see one
//! implementation. Resource URLs are resolved the way the API server's `RequestInfo` does:
//! one parser for every kind instead of a route per kind.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::audit::{self, AuditEntry, AuditLog};
use super::discovery;
use super::error::StoreError;
use super::kinds::Kind;
use super::media::{MediaType, MediaTypeError};
use super::openapi;
use super::patch::{Patch, PatchKind};
use super::selector::Selectors;
use super::state::{
    Change, ChangeType, FieldValidation, Preconditions, Store, Target, Writer, Written,
};
use super::status::ApiError;
use super::table::{self, IncludeObject};
use crate::resources::validation;

/// The largest request body accepted, as on a real API server (3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// How often a watch that asked for bookmarks gets one.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(15);

#[derive(Clone)]
struct ApiState {
    store: Arc<Store>,
    audit: Option<Arc<AuditLog>>,
}

/// Builds the API router over a store.
pub fn router(store: Arc<Store>) -> Router {
    audited_router(store, None)
}

/// Builds the API router over a store, recording resource requests in `audit`.
pub fn audited_router(store: Arc<Store>, audit: Option<Arc<AuditLog>>) -> Router {
    Router::new()
        .route("/version", get(|| async { Json(discovery::version()) }))
        .route("/api", get(core_versions))
        .route("/apis", get(group_list))
        .route("/openapi/v3", get(openapi_index))
        .route("/openapi/v3/{*path}", get(openapi_document))
        .route("/openapi/v2", get(|| async { ApiError::no_resource() }))
        .fallback(resource)
        .with_state(ApiState { store, audit })
}

async fn core_versions(headers: HeaderMap) -> Json<Value> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    Json(discovery::core_versions(host))
}

async fn group_list(State(s): State<ApiState>) -> Json<Value> {
    Json(discovery::group_list(s.store.kinds()))
}

async fn openapi_index(State(s): State<ApiState>) -> Json<Value> {
    Json(openapi::index(s.store.kinds()))
}

async fn openapi_document(State(s): State<ApiState>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let path = uri.path().trim_start_matches("/openapi/v3/");
    openapi::document(s.store.kinds(), path)
        .map(Json)
        .ok_or_else(ApiError::no_resource)
}

/// What a resource URL names.
struct ResourcePath<'a> {
    kind: &'a Kind,
    /// `None` for an all-namespaces collection.
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

enum Resolved<'a> {
    Discovery(Value),
    Resource(ResourcePath<'a>),
}

fn resolve<'a>(kinds: &'a [Kind], path: &str) -> Result<Resolved<'a>, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1"] => {
            return discovery::resource_list(kinds, "", "v1")
                .map(Resolved::Discovery)
                .ok_or_else(ApiError::no_resource);
        }
        ["apis", g] => {
            return discovery::api_group(kinds, g)
                .map(Resolved::Discovery)
                .ok_or_else(ApiError::no_resource);
        }
        ["apis", g, v] => {
            return discovery::resource_list(kinds, g, v)
                .map(Resolved::Discovery)
                .ok_or_else(ApiError::no_resource);
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::no_resource()),
    };
    let (namespace, plural, name, sub) = match rest {
        [plural] => (None, *plural, None, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
        _ => return Err(ApiError::no_resource()),
    };
    let kind = kinds
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)
        .ok_or_else(ApiError::no_resource)?;
    let status = match sub {
        None => false,
        Some("status") if kind.has_status => true,
        Some(_) => return Err(ApiError::no_resource()),
    };
    if let Some(ns) = namespace {
        validation::dns1123_label("metadata.namespace", ns)
            .map_err(|e| ApiError::new(400, "BadRequest", e.to_string()))?;
    }
    Ok(Resolved::Resource(ResourcePath {
        kind,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        status,
    }))
}

async fn resource(
    State(s): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> Response {
    let store = s.store.clone();
    let resolved = match resolve(s.store.kinds(), uri.path()) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let req = match resolved {
        Resolved::Discovery(doc) if method == Method::GET => return Json(doc).into_response(),
        Resolved::Discovery(_) => return method_not_allowed(&method),
        Resolved::Resource(r) => r,
    };
    if q.get("dryRun").is_some_and(|d| !d.is_empty()) {
        return ApiError::new(
            400,
            "BadRequest",
            "dryRun is not supported by the embedded API server",
        )
        .into_response();
    }
    let kind = req.kind.clone();
    let (namespace, name, status) = (req.namespace, req.name, req.status);
    if let Some(audit) = &s.audit {
        audit.record(&AuditEntry {
            verb: audit::verb(&method, name.is_some(), is_true(q.get("watch"))).to_owned(),
            api_group: kind.group.to_owned(),
            resource: kind.plural.to_owned(),
            subresource: if status {
                "status".into()
            } else {
                String::new()
            },
            namespace: namespace.clone().unwrap_or_default(),
            name: name.clone().unwrap_or_default(),
            user_agent: headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
        });
    }
    let Some(fields) = FieldValidation::parse(q.get("fieldValidation").map(String::as_str)) else {
        return ApiError::new(
            400,
            "BadRequest",
            "fieldValidation must be Ignore, Warn or Strict",
        )
        .into_response();
    };
    let result = match (&method, &name) {
        (&Method::GET, None) if is_true(q.get("watch")) => {
            return watch(store, kind, namespace, &q, wants_table(&headers));
        }
        (&Method::GET, None) => {
            let listed = list(
                &store,
                &kind,
                namespace.as_deref(),
                &q,
                wants_table(&headers),
            );
            return listed.unwrap_or_else(IntoResponse::into_response);
        }
        (&Method::POST, None) => match (read_body(body, &headers).await, namespace) {
            (Ok(obj), Some(ns)) => blocking(move || store.create(&kind, &ns, obj, fields))
                .await
                .map(|o| (StatusCode::CREATED, o)),
            (Err(e), _) => Err(e),
            (Ok(_), None) => Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "create needs a namespaced URL",
            )),
        },
        (&Method::GET, Some(name)) => {
            let ns = namespace.clone().unwrap_or_default();
            let stored = match store.get(&kind, &ns, name) {
                Ok(o) => o,
                Err(e) => return ApiError::from(e).into_response(),
            };
            if !wants_table(&headers) {
                return raw_json(stored.json().to_vec());
            }
            stored.value().map_err(ApiError::from).map(|o| {
                let include = IncludeObject::parse(q.get("includeObject").map(String::as_str));
                let object = table::table(&kind, [&o], include, true, json!({"resourceVersion": super::meta::str_at(&o, "/metadata/resourceVersion")}));
                (StatusCode::OK, Written { object, warnings: Vec::new() })
            })
        }
        (&Method::PUT, Some(name)) => {
            let (ns, name, target) = (
                namespace.clone().unwrap_or_default(),
                name.clone(),
                target_of(status),
            );
            match read_body(body, &headers).await {
                Ok(obj) => blocking(move || store.replace(&kind, &ns, &name, target, obj, fields))
                    .await
                    .map(|o| (StatusCode::OK, o)),
                Err(e) => Err(e),
            }
        }
        (&Method::PATCH, Some(name)) => {
            let (ns, name, target) = (
                namespace.clone().unwrap_or_default(),
                name.clone(),
                target_of(status),
            );
            patch(
                store,
                Item {
                    kind,
                    namespace: ns,
                    name,
                },
                target,
                Writer {
                    manager: q
                        .get("fieldManager")
                        .filter(|m| !m.is_empty())
                        .cloned()
                        .unwrap_or_else(|| "unknown".into()),
                    force: is_true(q.get("force")),
                    validation: fields,
                },
                &headers,
                body,
            )
            .await
        }
        (&Method::DELETE, Some(name)) if !status => {
            let (ns, name) = (namespace.clone().unwrap_or_default(), name.clone());
            match read_delete_options(body, &headers).await {
                Ok(pre) => blocking(move || store.delete(&kind, &ns, &name, &pre))
                    .await
                    .map(|o| (StatusCode::OK, o)),
                Err(e) => Err(e),
            }
        }
        _ => return method_not_allowed(&method),
    };
    match result {
        Ok((code, written)) => {
            let mut resp = (code, Json(written.object)).into_response();
            for w in written.warnings {
                let quoted = serde_json::to_string(&w).unwrap_or_default();
                if let Ok(v) = header::HeaderValue::from_str(&format!("299 - {quoted}")) {
                    resp.headers_mut().append(header::WARNING, v);
                }
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}

fn method_not_allowed(method: &Method) -> Response {
    ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow this method on the requested resource: {method}"),
    )
    .into_response()
}

fn target_of(status: bool) -> Target {
    if status { Target::Status } else { Target::Main }
}

fn is_true(v: Option<&String>) -> bool {
    v.is_some_and(|v| v == "true" || v == "1")
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .next()
                .is_some_and(|first| first.contains("as=Table"))
        })
}

/// Store writes handed to blocking threads at once. The store persists one write at a time
/// under its lock, so more in flight only park threads, each with its own stack and
/// allocator heap: 200 injections applied at once grew previewd by 140 threads and 321 MiB.
const WRITES_AT_ONCE: usize = 4;

/// The slots of [`WRITES_AT_ONCE`]; a write waits for one without holding a thread.
static WRITE_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(WRITES_AT_ONCE);

/// Runs a (possibly fsync-bound) store write off the async workers.
async fn blocking<F: FnOnce() -> Result<Written, StoreError> + Send + 'static>(
    f: F,
) -> Result<Written, ApiError> {
    let slot = WRITE_SLOTS.acquire().await.map_err(|_| {
        ApiError::new(
            503,
            "ServiceUnavailable",
            "the store's write slots are closed",
        )
    })?;
    let result = tokio::task::spawn_blocking(f).await;
    drop(slot);
    match result {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            500,
            "InternalError",
            format!("store task failed: {e}"),
        )),
    }
}

async fn read_bytes(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("request body too large: the limit is {MAX_BODY_BYTES} bytes"),
            )
        })
}

async fn read_body(body: Body, headers: &HeaderMap) -> Result<Value, ApiError> {
    let media = match MediaType::of(headers) {
        Ok(m @ (MediaType::Json | MediaType::Yaml)) => m,
        Ok(_) => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                "an object is sent as application/json or application/yaml",
            ));
        }
        Err(e) => return Err(unsupported(e)),
    };
    let bytes = read_bytes(body).await?;
    let parsed = if media.is_yaml() {
        serde_yaml::from_slice::<Value>(&bytes).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice::<Value>(&bytes).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| {
        ApiError::new(
            400,
            "BadRequest",
            format!("the request body is not a valid object: {e}"),
        )
    })
}

/// The 415 for a body whose media type the API does not read.
pub fn unsupported(e: MediaTypeError) -> ApiError {
    ApiError::new(415, "UnsupportedMediaType", e.to_string())
}

async fn read_delete_options(body: Body, headers: &HeaderMap) -> Result<Preconditions, ApiError> {
    let bytes = read_bytes(body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Preconditions::default());
    }
    match MediaType::of(headers) {
        Ok(MediaType::Json) => {}
        Ok(_) => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                "DeleteOptions are sent as application/json",
            ));
        }
        Err(e) => return Err(unsupported(e)),
    }
    let opts: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(400, "BadRequest", format!("invalid DeleteOptions: {e}")))?;
    let field = |f: &str| {
        opts.pointer(&format!("/preconditions/{f}"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    Ok(Preconditions {
        uid: field("uid"),
        resource_version: field("resourceVersion"),
    })
}

/// One object a request names.
struct Item {
    kind: Kind,
    namespace: String,
    name: String,
}

async fn patch(
    store: Arc<Store>,
    item: Item,
    target: Target,
    writer: Writer,
    headers: &HeaderMap,
    body: Body,
) -> Result<(StatusCode, Written), ApiError> {
    let media = MediaType::of(headers).map_err(unsupported)?;
    let patch_kind = PatchKind::of(media).ok_or_else(|| {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("{media:?} is not a patch media type"),
        )
    })?;
    let bytes = read_bytes(body).await?;
    let patch = Patch::decode(patch_kind, &bytes)?;
    let create = patch.creates_missing();
    let Item {
        kind,
        namespace: ns,
        name,
    } = item;
    let existed = store.get(&kind, &ns, &name).is_ok();
    let obj = blocking(move || store.patch(&kind, &ns, &name, target, &patch, &writer)).await?;
    Ok((
        if create && !existed {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        obj,
    ))
}

fn list(
    store: &Store,
    kind: &Kind,
    namespace: Option<&str>,
    q: &HashMap<String, String>,
    as_table: bool,
) -> Result<Response, ApiError> {
    let selectors = Selectors::parse(
        q.get("labelSelector").map(String::as_str),
        q.get("fieldSelector").map(String::as_str),
    )?;
    let limit = match q.get("limit").filter(|l| !l.is_empty()) {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::new(400, "BadRequest", format!("invalid limit {l:?}")))?,
        ),
        None => None,
    };
    let page = store.list(
        kind,
        namespace,
        &selectors,
        limit,
        q.get("continue").map(String::as_str),
    )?;
    let mut list_meta = json!({"resourceVersion": page.revision.to_string()});
    if let Some(c) = &page.continue_token {
        list_meta["continue"] = json!(c);
        list_meta["remainingItemCount"] = json!(page.remaining);
    }
    if as_table {
        let include = IncludeObject::parse(q.get("includeObject").map(String::as_str));
        let objects = page
            .items
            .iter()
            .map(|o| o.value())
            .collect::<Result<Vec<Value>, _>>()?;
        let object = table::table(kind, &objects, include, true, list_meta);
        return Ok((StatusCode::OK, Json(object)).into_response());
    }
    // The items are sent as the store keeps them; only the list's own fields are encoded.
    let head = json!({"kind": format!("{}List", kind.kind), "apiVersion": kind.api_version(), "metadata": list_meta});
    let mut body = serde_json::to_vec(&head).map_err(StoreError::Json)?;
    body.pop(); // the closing brace: the items go before it
    let items: usize = page.items.iter().map(|o| o.size() + 1).sum();
    body.reserve(items + 12);
    body.extend_from_slice(b",\"items\":[");
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item.json());
    }
    body.extend_from_slice(b"]}");
    Ok(raw_json(body))
}

/// A 200 whose JSON body is already encoded (objects as the store keeps them).
fn raw_json(body: Vec<u8>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// How one watch stream encodes and filters events.
struct WatchFilter {
    kind: Kind,
    /// `plural.group` of `kind`.
    resource: String,
    namespace: Option<String>,
    selectors: Selectors,
    as_table: bool,
    include: IncludeObject,
    headers_sent: bool,
}

impl WatchFilter {
    /// The event a change means for this watch, if any: objects entering or leaving the
    /// selected set are ADDED or DELETED, as on a real API server.
    fn event(&mut self, c: &Change) -> Option<Bytes> {
        // The live feed carries every kind's changes.
        if c.key.resource != self.resource
            || self
                .namespace
                .as_ref()
                .is_some_and(|ns| *ns != c.key.namespace)
        {
            return None;
        }
        let (name, namespace) = (&c.key.name, &c.key.namespace);
        let now = self.selectors.matches_stored(name, namespace, &c.object);
        let before = c
            .previous
            .as_ref()
            .is_some_and(|p| self.selectors.matches_stored(name, namespace, p));
        let type_ = match c.change {
            ChangeType::Added if now => "ADDED",
            ChangeType::Modified if now && before => "MODIFIED",
            ChangeType::Modified if now => "ADDED",
            ChangeType::Modified if before => "DELETED",
            ChangeType::Deleted if now || before => "DELETED",
            _ => return None,
        };
        if !self.as_table {
            return Some(raw_line(type_, c.object.json()));
        }
        // An object the store encoded decodes; one that does not is left out of the table.
        let object = c.object.value().ok()?;
        let t = table::table(
            &self.kind,
            [&object],
            self.include,
            !self.headers_sent,
            json!({"resourceVersion": c.revision.to_string()}),
        );
        self.headers_sent = true;
        Some(line(type_, t))
    }

    fn bookmark(&self, revision: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            "BOOKMARK",
            json!({"kind": self.kind.kind, "apiVersion": self.kind.api_version(), "metadata": metadata}),
        )
    }
}

fn line(type_: &str, object: Value) -> Bytes {
    raw_line(type_, &serde_json::to_vec(&object).unwrap_or_default())
}

/// A watch event line around an object's stored JSON, which is sent as it is.
fn raw_line(type_: &str, object: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(object.len() + type_.len() + 24);
    v.extend_from_slice(b"{\"type\":\"");
    v.extend_from_slice(type_.as_bytes());
    v.extend_from_slice(b"\",\"object\":");
    v.extend_from_slice(object);
    v.extend_from_slice(b"}\n");
    Bytes::from(v)
}

fn watch(
    store: Arc<Store>,
    kind: Kind,
    namespace: Option<String>,
    q: &HashMap<String, String>,
    as_table: bool,
) -> Response {
    let selectors = match Selectors::parse(
        q.get("labelSelector").map(String::as_str),
        q.get("fieldSelector").map(String::as_str),
    ) {
        Ok(s) => s,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let from = match q.get("resourceVersion").filter(|v| !v.is_empty()) {
        Some(v) => match v.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return ApiError::new(400, "BadRequest", format!("invalid resourceVersion {v:?}"))
                    .into_response();
            }
        },
        None => None,
    };
    // A closing server starts no watch: ended at once, it would be started again at once by
    // every in-process watcher, a loop that keeps the runtime from shutting down. A 503
    // makes watchers back off, as a real API server's does.
    if store.is_closing() {
        return ApiError::new(503, "ServiceUnavailable", "the server is shutting down")
            .into_response();
    }
    let bookmarks = is_true(q.get("allowWatchBookmarks"));
    let initial_events = is_true(q.get("sendInitialEvents"));
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let include = IncludeObject::parse(q.get("includeObject").map(String::as_str));
    let mut filter = WatchFilter {
        resource: kind.resource_name(),
        kind: kind.clone(),
        namespace: namespace.clone(),
        selectors,
        as_table,
        include,
        headers_sent: false,
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let start = match store.watch(
        &kind,
        namespace.as_deref(),
        if initial_events { None } else { from },
    ) {
        Ok(s) => s,
        Err(e @ StoreError::Gone { .. }) => {
            // As the API server does: a 200 stream whose only event is a 410 ERROR.
            let body = line("ERROR", ApiError::from(e).to_status());
            return watch_response(Body::from(body));
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    let closed = store.closed();
    tokio::spawn(async move {
        let mut last = if from.is_some() && !initial_events {
            from.unwrap_or(0)
        } else {
            start.revision
        };
        for c in &start.backlog {
            last = last.max(c.revision);
            if let Some(ev) = filter.event(c)
                && tx.send(Ok(ev)).await.is_err()
            {
                return;
            }
        }
        if initial_events && tx.send(Ok(filter.bookmark(last, true))).await.is_err() {
            return;
        }
        let mut live = start.live;
        let mut tick = tokio::time::interval(BOOKMARK_INTERVAL);
        tick.tick().await;
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(1800)));
        tokio::pin!(deadline);
        tokio::pin!(closed);
        loop {
            tokio::select! {
                r = live.recv() => match r {
                    Ok(c) => {
                        last = last.max(c.revision);
                        if let Some(ev) = filter.event(&c)
                            && tx.send(Ok(ev)).await.is_err() { return; }
                    }
                    // Fell behind or the store is gone: end the stream; the client resumes
                    // from its last resourceVersion out of the history.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    if tx.send(Ok(filter.bookmark(last, false))).await.is_err() { return; }
                }
                _ = &mut deadline => return,
                _ = &mut closed => return,
                _ = tx.closed() => return,
            }
        }
    });
    watch_response(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
}

fn watch_response(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::DaemonInjection;
    use crate::store::kinds;

    #[test]
    fn bookmarks_parse_as_kube_watch_events() {
        let kind = kinds::all()
            .into_iter()
            .find(|k| k.plural == "daemoninjections");
        let Some(kind) = kind else {
            panic!("kind missing")
        };
        let filter = WatchFilter {
            resource: kind.resource_name(),
            kind,
            namespace: None,
            selectors: Selectors::default(),
            as_table: false,
            include: IncludeObject::Metadata,
            headers_sent: false,
        };
        let line = filter.bookmark(7, true);
        let parsed: Result<kube::core::WatchEvent<DaemonInjection>, _> =
            serde_json::from_slice(&line);
        match parsed {
            Ok(kube::core::WatchEvent::Bookmark(b)) => assert_eq!(b.metadata.resource_version, "7"),
            Ok(other) => panic!("not a bookmark: {other:?}"),
            Err(e) => panic!("{e}: {}", String::from_utf8_lossy(&line)),
        }
    }
}

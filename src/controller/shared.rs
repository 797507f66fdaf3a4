//! What both reconcilers do the same way: write status only when it changed, keep a random
//! value in a Secret they own, and back off per object on failure.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::{Context, Error};
use crate::runtime::ContainerRuntime;

/// Label on objects previewd created (and may delete again).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// Replaces `obj`'s status with `status` unless it is already that (no write, no event, no
/// reconcile loop). A JSON-patch `add` sets the whole status, so fields the new status omits
/// are removed, on a real API server and on the embedded one alike.
pub async fn write_status<K, S>(
    client: &kube::Client,
    obj: &K,
    current: Option<&S>,
    status: &S,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let patch: json_patch::Patch =
        serde_json::from_value(json!([{"op": "add", "path": "/status", "value": status}]))
            .map_err(|e| Error::Injection {
                reason: "InternalError",
                message: format!("cannot encode status: {e}"),
            })?;
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::<()>::Json(patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// The value under `key` in a Secret, when it is there and is text.
pub fn secret_str<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    std::str::from_utf8(&secret.data.as_ref()?.get(key)?.0).ok()
}

/// The value under `key` in the Secret `name` next to `owner`; on first use the Secret is
/// created (owned by `owner`, labelled as previewd's) with `generate()`. A lost creation race
/// yields the winner's value.
pub async fn secret_value<K: Resource<DynamicType = ()>>(
    client: &kube::Client,
    owner: &K,
    name: &str,
    key: &str,
    generate: impl FnOnce() -> String,
) -> Result<String, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &owner.namespace().unwrap_or_default());
    let read = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
    };
    if let Some(value) = api
        .get_opt(name)
        .await
        .map_err(Error::Kube)?
        .as_ref()
        .and_then(read)
    {
        return Ok(value);
    }
    let value = generate();
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: owner.namespace(),
            owner_references: owner.controller_owner_ref(&()).map(|r| vec![r]),
            labels: Some([(MANAGED_BY.to_owned(), "previewd".to_owned())].into()),
            ..Default::default()
        },
        data: Some([(key.to_owned(), ByteString(value.clone().into_bytes()))].into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(value),
        Err(kube::Error::Api(e)) if e.code == 409 => api
            .get(name)
            .await
            .map_err(Error::Kube)
            .map(|s| read(&s).unwrap_or_default()),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Deletes a Secret; one that is already gone is fine.
pub async fn delete_secret(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Counts the failure and retries the object after its next backoff delay.
pub fn back_off<K: Resource, R: ContainerRuntime>(
    controller: &'static str,
    obj: &K,
    err: &Error,
    ctx: &Context<R>,
) -> Action {
    let reason = err.metric_label();
    ctx.metrics.failed(controller, &reason);
    let delay = ctx
        .backoff
        .failed(obj.meta().uid.as_deref().unwrap_or_default());
    tracing::info!(controller, name = obj.meta().name.as_deref().unwrap_or_default(), %reason, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

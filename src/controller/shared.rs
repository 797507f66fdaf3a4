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
    generate: impl FnOnce() -> String + Send,
) -> Result<String, Error> {
    let mut values = secret_values(client, owner, name, vec![(key, Box::new(generate))]).await?;
    Ok(values.pop().unwrap_or_default())
}

/// How a missing value of a Secret is made.
pub type Generator<'a> = Box<dyn FnOnce() -> String + Send + 'a>;

/// The values under `keys` in the Secret `name` next to `owner`, in order; a missing Secret
/// is created (owned by `owner`, labelled as previewd's) and a missing key added, each value
/// made by its generator. Concurrent writers agree: a lost race yields the winner's values.
pub async fn secret_values<K: Resource<DynamicType = ()>>(
    client: &kube::Client,
    owner: &K,
    name: &str,
    keys: Vec<(&str, Generator<'_>)>,
) -> Result<Vec<String>, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &owner.namespace().unwrap_or_default());
    let read = |s: &Secret, key: &str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
    };
    let existing = api.get_opt(name).await.map_err(Error::Kube)?;
    if let Some(secret) = &existing
        && keys.iter().all(|(k, _)| read(secret, k).is_some())
    {
        return Ok(keys
            .iter()
            .map(|(k, _)| read(secret, k).unwrap_or_default())
            .collect());
    }
    let wanted: Vec<String> = keys.iter().map(|(k, _)| (*k).to_owned()).collect();
    let mut data = std::collections::BTreeMap::new();
    for (key, generate) in keys {
        let value = existing
            .as_ref()
            .and_then(|s| read(s, key))
            .unwrap_or_else(generate);
        data.insert(key.to_owned(), value);
    }
    let encoded = |data: &std::collections::BTreeMap<String, String>| {
        data.iter()
            .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let written = match &existing {
        // Keys added to a Secret that has some: with its resourceVersion, so a concurrent
        // addition is not overwritten.
        Some(secret) => {
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": secret.resource_version()},
                "data": encoded(&data)
            });
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map(|_| ())
        }
        None => {
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: owner.namespace(),
                    owner_references: owner.controller_owner_ref(&()).map(|r| vec![r]),
                    labels: Some([(MANAGED_BY.to_owned(), "previewd".to_owned())].into()),
                    ..Default::default()
                },
                data: Some(encoded(&data)),
                ..Default::default()
            };
            api.create(&PostParams::default(), &secret)
                .await
                .map(|_| ())
        }
    };
    match written {
        Ok(()) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let secret = api.get(name).await.map_err(Error::Kube)?;
            return Ok(wanted
                .iter()
                .map(|k| read(&secret, k).unwrap_or_default())
                .collect());
        }
        Err(e) => return Err(Error::Kube(e)),
    }
    Ok(wanted
        .iter()
        .map(|k| data.get(k).cloned().unwrap_or_default())
        .collect())
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

/// Counts the failure and retries the object after its next backoff delay; an object that
/// was deleted meanwhile (a 404 on its own finalizer or status) is no failure and is left.
pub fn back_off<K: Resource, R: ContainerRuntime>(
    controller: &'static str,
    obj: &K,
    err: &Error,
    ctx: &Context<R>,
) -> Action {
    if err.is_gone() {
        tracing::debug!(
            controller,
            name = obj.meta().name.as_deref().unwrap_or_default(),
            "the object is gone"
        );
        ctx.backoff
            .reset(obj.meta().uid.as_deref().unwrap_or_default());
        return Action::await_change();
    }
    let reason = err.metric_label();
    ctx.metrics.failed(controller, &reason);
    let delay = ctx
        .backoff
        .failed(obj.meta().uid.as_deref().unwrap_or_default());
    tracing::info!(controller, name = obj.meta().name.as_deref().unwrap_or_default(), %reason, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

//! Upkeep of the embedded API over time. A real API server drops Events after an hour (its
//! `--event-ttl`); without that the local store would keep one file per Event forever.
//! Runs as a client of the API, like any controller: list, pick the old ones, delete them.
//! And the store's watch history lets aged changes go while nothing is written.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Resource, ResourceExt};

use super::state::Store;

/// How often the store's watch history is checked for changes that aged out.
const HISTORY_SWEEP: Duration = Duration::from_secs(15);

/// Lets the watch history of `store` drop what aged out (writes do it as they come; this
/// covers the quiet after a burst) every [`HISTORY_SWEEP`] until `shutdown`.
pub async fn prune_history(store: Arc<Store>, shutdown: impl Future<Output = ()>) {
    every(HISTORY_SWEEP, shutdown, || async { store.prune_history() }).await;
}

/// Runs `sweep` every `period`, the first time one period from now, until `shutdown`.
async fn every<F, Fut>(period: Duration, shutdown: impl Future<Output = ()>, mut sweep: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let sweeps = async {
        loop {
            tokio::time::sleep(period).await;
            sweep().await;
        }
    };
    tokio::select! {
        _ = sweeps => {},
        _ = shutdown => {},
    }
}

/// How long Events are kept, as kube-apiserver's default.
pub const DEFAULT_EVENT_TTL: Duration = Duration::from_secs(3600);

/// When an Event last happened: its series' last observation, else its event time, else its
/// creation.
fn last_seen(ev: &Event) -> Option<Timestamp> {
    ev.series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or_else(|| ev.event_time.as_ref().map(|t| t.0))
        .or_else(|| ev.meta().creation_timestamp.as_ref().map(|t| t.0))
}

/// The Events older than `ttl` at `now`, as (namespace, name). Pure.
pub fn expired(events: &[Event], now: Timestamp, ttl: Duration) -> Vec<(String, String)> {
    let Ok(ttl) = SignedDuration::try_from(ttl) else {
        return Vec::new();
    };
    let Ok(cutoff) = now.checked_sub(ttl) else {
        return Vec::new();
    };
    events
        .iter()
        .filter(|e| last_seen(e).is_some_and(|t| t < cutoff))
        .map(|e| (e.namespace().unwrap_or_default(), e.name_any()))
        .collect()
}

/// Deletes expired Events every `ttl / 6` (at most every 10 minutes) until `shutdown`.
pub async fn run(client: kube::Client, ttl: Duration, shutdown: impl Future<Output = ()>) {
    let events: Api<Event> = Api::all(client.clone());
    // The sweeps borrow these rather than each taking its own copy.
    let (api, client) = (&events, &client);
    let period = (ttl / 6).clamp(Duration::from_millis(200), Duration::from_secs(600));
    every(period, shutdown, || async move {
        let list = match api.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list Events to expire them");
                return;
            }
        };
        for (ns, name) in expired(&list, Timestamp::now(), ttl) {
            let events: Api<Event> = Api::namespaced(client.clone(), &ns);
            if let Err(e) = events.delete(&name, &DeleteParams::default()).await {
                tracing::debug!(error = %e, event = %name, "cannot delete an expired Event");
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};

    use super::*;

    fn event(name: &str, created: i64, event_time: Option<i64>) -> Event {
        let at = |s| Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH);
        Event {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                creation_timestamp: Some(Time(at(created))),
                ..Default::default()
            },
            event_time: event_time.map(|t| MicroTime(at(t))),
            ..Default::default()
        }
    }

    #[test]
    fn only_events_older_than_the_ttl_go() {
        let now = Timestamp::from_second(10_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let events = [
            event("old", 1_000, None),
            event("fresh", 9_500, None),
            // Created long ago but seen again recently: kept.
            event("repeated", 1_000, Some(9_900)),
        ];
        assert_eq!(
            expired(&events, now, Duration::from_secs(3600)),
            vec![("default".to_owned(), "old".to_owned())]
        );
    }
}

//! Leader election over a `coordination.k8s.io` Lease (kube-lease-manager): with several
//! replicas, only the holder reconciles; every replica keeps serving the proxy and the REST
//! shim from its own reflectors. Losing the lease stops reconciling at once; shutting down
//! stops it gracefully and releases the lease, so another replica takes over without waiting
//! for it to expire.

use std::time::Duration;

use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;

/// Which Lease, held by whom, for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (the pod name in a cluster).
    pub identity: String,
    /// How long a lease lasts without renewal: a crashed leader is replaced after this.
    pub duration: Duration,
    /// How long before expiry the holder renews.
    pub grace: Duration,
}

/// Why leader election cannot run.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// Durations that kube-lease-manager would refuse.
    #[error(
        "the lease grace period ({grace}s) must be at least 1s and shorter than its duration ({duration}s)"
    )]
    Durations {
        /// Seconds.
        duration: u64,
        /// Seconds.
        grace: u64,
    },
    /// Talking to the API about the Lease failed.
    #[error("leader election failed: {0}")]
    Lease(#[source] LeaseManagerError),
}

impl LeaseConfig {
    /// The default Lease name.
    pub const NAME: &'static str = "previewd-controller";

    /// Checks the durations (kube-lease-manager panics on bad ones).
    pub fn validate(&self) -> Result<(), LeaderError> {
        let (duration, grace) = (self.duration.as_secs(), self.grace.as_secs());
        if grace == 0 || grace >= duration {
            return Err(LeaderError::Durations { duration, grace });
        }
        Ok(())
    }

    /// A default identity: the pod name when previewd runs in a pod, else host and pid.
    pub fn default_identity() -> String {
        if let Ok(pod) = std::env::var("POD_NAME")
            && !pod.is_empty()
        {
            return pod;
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "previewd".into());
        format!("{host}-{}", std::process::id())
    }
}

/// Runs `work` while this replica holds the lease, until `shutdown` resolves. `work` gets a
/// receiver that turns `true` when it should stop gracefully (shutdown); on losing the lease
/// it is aborted at once instead, since another replica may already be reconciling.
pub async fn run_while_leader<F, Fut>(
    client: kube::Client,
    config: LeaseConfig,
    shutdown: impl Future<Output = ()> + Send,
    work: F,
) -> Result<(), LeaderError>
where
    F: Fn(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    config.validate()?;
    let manager = LeaseManagerBuilder::new(client, &config.name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(config.duration.as_secs())
        .with_grace(config.grace.as_secs())
        .build()
        .await
        .map_err(LeaderError::Lease)?;
    let (mut leading, lease_task) = manager.watch().await;
    tracing::info!(identity = %config.identity, lease = %config.name, namespace = %config.namespace, "waiting to lead");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            became = async { leading.wait_for(|l| *l).await.map(|_| ()) } => if became.is_err() { break },
        }
        tracing::info!(identity = %config.identity, "leading: reconciling");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut worker = tokio::spawn(work(stop_rx));
        tokio::select! {
            _ = &mut shutdown => {
                let _ = stop_tx.send(true);
                let _ = (&mut worker).await;
                break;
            }
            lost = async { leading.wait_for(|l| !*l).await.map(|_| ()) } => {
                tracing::warn!(identity = %config.identity, "lost the lease: reconciling stops now");
                worker.abort();
                let _ = worker.await;
                if lost.is_err() {
                    break;
                }
            }
            _ = &mut worker => {
                tracing::warn!("the controllers stopped on their own");
                break;
            }
        }
    }
    // Closing the channel makes the lease task release the lease (when held) and end.
    drop(leading);
    match lease_task.await {
        Ok(Ok(_)) => {
            tracing::info!(identity = %config.identity, "released the lease");
            Ok(())
        }
        Ok(Err(e)) => Err(LeaderError::Lease(e)),
        Err(e) => {
            tracing::warn!(error = %e, "the lease task failed");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_that_would_panic_are_refused() {
        let cfg = |d, g| LeaseConfig {
            namespace: "default".into(),
            name: LeaseConfig::NAME.into(),
            identity: "a".into(),
            duration: Duration::from_secs(d),
            grace: Duration::from_secs(g),
        };
        assert!(cfg(15, 5).validate().is_ok());
        assert!(cfg(5, 5).validate().is_err());
        assert!(cfg(5, 0).validate().is_err());
        assert!(cfg(0, 0).validate().is_err());
    }
}

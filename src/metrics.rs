//! Prometheus metrics, served on the API listener at `/metrics`.
//!
//! Labels are bounded (a controller name, a failure reason): no per-object labels, so a store
//! with thousands of objects does not explode the series count.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of reconcile counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// Which controller (`daemoninjection`, `previewlink`).
    pub controller: &'static str,
}

/// Labels of failure counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// Which controller.
    pub controller: &'static str,
    /// The condition reason (`ContainerNotFound`, `ExecFailed`, …).
    pub reason: String,
}

/// Labels of counters per resource kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The kind (`PreviewLink`, `Secret`, …).
    pub kind: &'static str,
}

/// Labels of proxy request counters: the status code answered (a bounded set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// HTTP status code.
    pub code: u16,
}

/// The status codes whose proxy counters are resolved once (all that HTTP defines).
const FIRST_CODE: u16 = 100;
const LAST_CODE: u16 = 599;

/// Every metric previewd exports, with the registry that renders them.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    injection_seconds: Histogram,
    proxy_requests: Family<CodeLabels, Counter>,
    /// The counters of `proxy_requests` for codes 100–599, each resolved from the family on
    /// first use: a request then costs one atomic add, not a lock and a label lookup.
    proxy_codes: Box<[OnceLock<Counter>]>,
    proxy_active: Gauge,
    upstream_seconds: Histogram,
    undecodable: Family<KindLabels, Counter>,
}

/// Counts one in-flight proxied request (or upgraded tunnel) until dropped.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("previewd");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles run, by controller",
            reconciles.clone(),
        );
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Reconciles that ended in a failure, by controller and reason",
            failures.clone(),
        );
        let injection_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "injection_duration_seconds",
            "Time to copy, start and health-check a daemon",
            injection_seconds.clone(),
        );
        let proxy_requests = Family::<CodeLabels, Counter>::default();
        registry.register(
            "proxy_requests",
            "Requests the preview proxy answered, by status code",
            proxy_requests.clone(),
        );
        let proxy_active = Gauge::default();
        registry.register(
            "proxy_active_requests",
            "Requests the proxy is serving now (until their response body is sent)",
            proxy_active.clone(),
        );
        let upstream_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "proxy_upstream_latency_seconds",
            "Time from forwarding a request to the upstream's response head",
            upstream_seconds.clone(),
        );
        let undecodable = Family::<KindLabels, Counter>::default();
        registry.register(
            "undecodable_objects",
            "Objects (each version once) that watches skipped because they do not decode, by kind",
            undecodable.clone(),
        );
        Arc::new(Metrics {
            undecodable,
            registry,
            reconciles,
            failures,
            injection_seconds,
            proxy_requests,
            proxy_codes: (FIRST_CODE..=LAST_CODE).map(|_| OnceLock::new()).collect(),
            proxy_active,
            upstream_seconds,
        })
    }

    /// Counts one reconcile.
    pub fn reconciled(&self, controller: &'static str) {
        self.reconciles
            .get_or_create(&ControllerLabels { controller })
            .inc();
    }

    /// Counts one failure.
    pub fn failed(&self, controller: &'static str, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                controller,
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Records how long an injection took.
    pub fn injected(&self, took: Duration) {
        self.injection_seconds.observe(took.as_secs_f64());
    }

    /// Counts a request the proxy answered.
    pub fn proxied(&self, code: u16) {
        let family = || self.proxy_requests.get_or_create(&CodeLabels { code });
        match code
            .checked_sub(FIRST_CODE)
            .and_then(|i| self.proxy_codes.get(usize::from(i)))
        {
            Some(counter) => counter.get_or_init(|| family().clone()).inc(),
            None => family().inc(),
        };
    }

    /// Marks a request in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.proxy_active.inc();
        InFlight(self.proxy_active.clone())
    }

    /// Records how long the upstream took to answer.
    pub fn upstream_answered(&self, took: Duration) {
        self.upstream_seconds.observe(took.as_secs_f64());
    }

    /// Counts an object version a watch skipped because it does not decode.
    pub fn undecodable(&self, kind: &'static str) {
        self.undecodable.get_or_create(&KindLabels { kind }).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_by_reason() {
        let m = Metrics::new();
        m.reconciled("daemoninjection");
        m.failed("daemoninjection", "ContainerNotFound");
        m.injected(Duration::from_millis(120));
        let text = m.render();
        assert!(
            text.contains(r#"previewd_reconciles_total{controller="daemoninjection"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"previewd_reconcile_failures_total{controller="daemoninjection",reason="ContainerNotFound"} 1"#), "{text}");
        assert!(
            text.contains("previewd_injection_duration_seconds_count 1"),
            "{text}"
        );
    }

    #[test]
    fn proxy_codes_count_in_their_family() {
        let m = Metrics::new();
        m.proxied(200);
        m.proxied(200);
        m.proxied(502);
        m.proxied(999);
        let text = m.render();
        for line in [
            r#"previewd_proxy_requests_total{code="200"} 2"#,
            r#"previewd_proxy_requests_total{code="502"} 1"#,
            r#"previewd_proxy_requests_total{code="999"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}

//! Per-object exponential backoff for failing reconciles (kube-rs has none built in).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Failure counts per object uid; the delay doubles per consecutive failure, capped.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Records a failure of `key` and returns how long to wait before retrying.
    pub fn failed(&self, key: &str) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_owned()).or_insert(0);
        let delay = self
            .base
            .saturating_mul(2u32.saturating_pow(*n))
            .min(self.cap);
        *n = n.saturating_add(1);
        delay
    }

    /// Forgets `key`'s failures after a success (or its deletion).
    pub fn reset(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_resets() {
        let b = Backoff::new(Duration::from_millis(500), Duration::from_secs(3));
        let delays: Vec<u128> = (0..5).map(|_| b.failed("a").as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 3000, 3000]);
        assert_eq!(
            b.failed("other").as_millis(),
            500,
            "objects back off independently"
        );
        b.reset("a");
        assert_eq!(b.failed("a").as_millis(), 500);
    }
}

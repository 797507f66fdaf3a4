//! How long `supervise` waits before starting a child that exited again: doubling from
//! [`FIRST_DELAY`] up to [`MAX_DELAY`], so a daemon that dies at once costs little, and back to
//! the start once a run lasted [`STABLE_RUN`], so a rare crash is restarted quickly.

use std::time::Duration;

/// The wait after the first exit (and after any exit of a run that was stable).
pub const FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest wait.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// A run this long counts as stable: its exit starts the backoff over.
pub const STABLE_RUN: Duration = Duration::from_secs(60);

/// The restart delays of one supervised child.
#[derive(Debug)]
pub struct RestartBackoff {
    next: Duration,
}

impl Default for RestartBackoff {
    fn default() -> Self {
        RestartBackoff { next: FIRST_DELAY }
    }
}

impl RestartBackoff {
    /// The wait before the next start, after a run that lasted `ran_for`.
    pub fn after_exit(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= STABLE_RUN {
            self.next = FIRST_DELAY;
        }
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(MAX_DELAY);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset_after_a_stable_run() {
        let mut b = RestartBackoff::default();
        let quick = Duration::from_millis(5);
        let delays: Vec<u64> = (0..9).map(|_| b.after_exit(quick).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        // Just short of stable: the backoff goes on.
        assert_eq!(b.after_exit(STABLE_RUN - quick), MAX_DELAY);
        assert_eq!(b.after_exit(STABLE_RUN), FIRST_DELAY);
        assert_eq!(b.after_exit(quick), Duration::from_secs(2));
    }
}

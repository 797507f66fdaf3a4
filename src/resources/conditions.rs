//! Standard `metav1.Condition` handling shared by both resources.
//!
//! Controllers rewrite status on every reconcile; these helpers keep `lastTransitionTime`
//! stable unless the condition's status really changes, so a no-op reconcile produces a
//! byte-identical status and the API server can skip the write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The condition type both kinds use to say "this works now".
pub const READY: &str = "Ready";

/// Inserts or updates `new` in `conditions` (keyed by `type`). Keeps the previous
/// `lastTransitionTime` when the status value is unchanged. Returns whether anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            let transition = if old.status == new.status {
                old.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            let updated = Condition {
                last_transition_time: transition,
                ..new
            };
            if *old == updated {
                return false;
            }
            *old = updated;
            true
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Builds a condition stamped now.
pub fn condition(
    type_: &str,
    ready: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ready { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(c: Condition, secs: i64) -> Condition {
        let ts = k8s_openapi::jiff::Timestamp::from_second(secs)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        Condition {
            last_transition_time: Time(ts),
            ..c
        }
    }

    #[test]
    fn same_status_keeps_transition_time_and_reports_no_change() {
        let mut cs = vec![at(condition(READY, true, "Injected", "ok", Some(1)), 100)];
        let changed = set_condition(
            &mut cs,
            at(condition(READY, true, "Injected", "ok", Some(1)), 200),
        );
        assert!(!changed);
        assert_eq!(cs[0].last_transition_time.0.as_second(), 100);
    }

    #[test]
    fn new_message_changes_but_keeps_transition_time() {
        let mut cs = vec![at(condition(READY, false, "Waiting", "a", Some(1)), 100)];
        assert!(set_condition(
            &mut cs,
            at(condition(READY, false, "Waiting", "b", Some(1)), 200)
        ));
        assert_eq!(cs[0].last_transition_time.0.as_second(), 100);
        assert_eq!(cs[0].message, "b");
    }

    #[test]
    fn status_flip_moves_transition_time() {
        let mut cs = vec![at(condition(READY, false, "Waiting", "a", Some(1)), 100)];
        assert!(set_condition(
            &mut cs,
            at(condition(READY, true, "Injected", "ok", Some(1)), 200)
        ));
        assert_eq!(cs[0].last_transition_time.0.as_second(), 200);
        assert_eq!(find(&cs, READY).map(|c| c.status.as_str()), Some("True"));
    }
}

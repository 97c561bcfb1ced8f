//! Deadlines that never overflow.
//!
//! `Instant + Duration` panics when the sum does not fit, and every public setting and argument
//! takes any `Duration`. A duration too large to add means "no bound": it becomes a deadline a
//! century away, which no call reaches.

use std::time::{Duration, Instant};

/// How far away "never" is: long past any process's life, short enough to add to any `Instant`.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The instant `d` from now, saturating at [`NEVER`].
#[inline]
pub(crate) fn deadline_in(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d.min(NEVER))
        .or_else(|| now.checked_add(NEVER))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_duration_is_a_deadline() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ] {
            let deadline = deadline_in(d);
            assert!(deadline >= Instant::now() - Duration::from_secs(1));
        }
        assert!(deadline_in(Duration::MAX) > Instant::now() + Duration::from_secs(1 << 30));
    }
}

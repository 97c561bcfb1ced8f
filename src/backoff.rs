//! Capped exponential backoff with jitter, for retrying a lock that someone else holds.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Successive pauses: each about twice the last, up to a cap, each drawn uniformly from its upper
/// half so that waiters that started together spread out.
#[derive(Debug)]
pub(crate) struct Backoff {
    /// The upper bound of the next pause.
    next: Duration,
    /// The largest upper bound.
    cap: Duration,
    /// xorshift64 state; seeded from the standard library's per-process random keys.
    rng: u64,
}

impl Backoff {
    pub(crate) fn new(first: Duration, cap: Duration) -> Backoff {
        let seed = RandomState::new().build_hasher().finish();
        Backoff {
            next: first,
            cap,
            rng: seed | 1,
        }
    }

    /// The next pause.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let upper = self.next;
        // Any cap is allowed, `Duration::MAX` included: double without overflowing.
        self.next = self.next.saturating_mul(2).min(self.cap);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let upper_ns = u64::try_from(upper.as_nanos()).unwrap_or(u64::MAX);
        let half = upper_ns / 2;
        Duration::from_nanos(half + self.rng % (upper_ns - half).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_cap_is_reached_without_overflow() {
        for cap in [Duration::from_secs(u64::MAX), Duration::MAX] {
            let mut b = Backoff::new(Duration::from_millis(1), cap);
            let mut last = Duration::ZERO;
            for _ in 0..200 {
                last = b.next_pause();
            }
            // 2^199 ms is far past any cap: the pauses saturate instead of panicking (at
            // `u64::MAX` nanoseconds, some 584 years, the most a pause is drawn from).
            assert!(last >= Duration::from_nanos(u64::MAX / 2), "{last:?}");
        }
    }

    #[test]
    fn pauses_grow_to_the_cap_and_stay_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_millis(16));
        let bounds = [1u64, 2, 4, 8, 16, 16, 16];
        for upper in bounds {
            let p = b.next_pause();
            let upper = Duration::from_millis(upper);
            assert!(
                p >= upper / 2 && p <= upper,
                "{p:?} outside [{:?}, {upper:?}]",
                upper / 2
            );
        }
    }
}

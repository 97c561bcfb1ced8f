//! What a manager has been doing: counters kept lock-free on the request path, and the
//! [`Stats`] snapshot [`LockManager::stats`](crate::LockManager::stats) returns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How many bounded buckets a [`Histogram`] has; one more takes everything longer.
pub const BUCKETS: usize = 20;

/// The upper bound of the first bucket; each next one doubles it (100 µs, 200 µs, … about 52 s).
const FIRST_BOUND: Duration = Duration::from_micros(100);

/// A distribution of durations in fixed buckets whose upper bounds double from 100 µs (the last
/// bucket takes everything over about 52 s), from which a median or a 99th percentile can be
/// read to within a factor of two. Counts only: keeping one costs an atomic addition per
/// sample, and a snapshot allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS + 1],
}

impl Histogram {
    /// The upper bound of bucket `i`: 100 µs × 2^i, or `None` for the last, unbounded one (and
    /// past it).
    pub fn bound(i: usize) -> Option<Duration> {
        (i < BUCKETS).then(|| FIRST_BOUND * (1u32 << i))
    }

    /// The samples in each bucket, shortest first (`BUCKETS + 1` of them).
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Samples in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper bound of the bucket that holds the `q` quantile (`0.5`: the median, `0.99`: the
    /// 99th percentile): at least that share of the samples took no longer. `None` without
    /// samples; [`Duration::MAX`] when it falls in the unbounded bucket.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let wanted = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= wanted {
                return Some(Histogram::bound(i).unwrap_or(Duration::MAX));
            }
        }
        Some(Duration::MAX)
    }

    /// The bucket of a sample of `d`: the first whose upper bound is at least `d`.
    fn bucket(d: Duration) -> usize {
        // In 64-bit arithmetic (the request path keeps the hold times): past about 584 years of
        // nanoseconds it saturates, into the last bucket anyway.
        let nanos = d
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()));
        let units = nanos.div_ceil(FIRST_BOUND.as_nanos() as u64);
        if units <= 1 {
            return 0;
        }
        ((u64::BITS - (units - 1).leading_zeros()) as usize).min(BUCKETS)
    }
}

/// A snapshot of a manager: what it holds and who waits now, and what it has done since it
/// was connected. Taken with [`LockManager::stats`](crate::LockManager::stats), without a round
/// trip and without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Exclusive locks held now (semaphore permits not counted), or being acquired this instant.
    pub held_exclusive: u64,
    /// Shared holds now (each shared guard counts), or being acquired this instant.
    pub held_shared: u64,
    /// Semaphore permits held now, or being acquired this instant.
    pub held_permits: u64,
    /// Callers in a waiting call (`lock`, `try_lock_for` and the other waiting forms) now.
    pub waiting: u64,
    /// Whether the manager's own connection (its lock session) is open now.
    pub lock_session_open: bool,
    /// The manager's extra connections open now: waiting connections, or in transaction mode its
    /// lock transactions.
    pub extra_connections_open: u64,
    /// Locks granted (each guard handed out counts once).
    pub grants: u64,
    /// Tries refused because someone else held the lock (or every permit, or one of the keys):
    /// a measure of contention. A waiting call's tries count too (its first try, before it
    /// queues; each try, when it polls).
    pub refusals: u64,
    /// Waiting calls that reached their deadline without the lock, and calls that failed with
    /// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout).
    pub timeouts: u64,
    /// Guards whose lock was lost (counted when the guard is released or dropped).
    pub lost: u64,
    /// Times the manager connected again after losing its connection.
    pub reconnects: u64,
    /// Connects refused because a pooler shares the session
    /// ([`ErrorKind::Pooler`](crate::ErrorKind::Pooler)) or the server's locks would exclude
    /// nobody ([`ErrorKind::NoExclusion`](crate::ErrorKind::NoExclusion)).
    pub refused_servers: u64,
    /// How long waiting calls waited until they were granted.
    pub wait_time: Histogram,
    /// How long locks were held, from the call that took them to their release.
    pub hold_time: Histogram,
}

/// The counters behind [`Stats`]: relaxed atomics, so that keeping them costs the request path an
/// addition or two and no lock.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    waiting: AtomicU64,
    grants: AtomicU64,
    refusals: AtomicU64,
    timeouts: AtomicU64,
    lost: AtomicU64,
    reconnects: AtomicU64,
    refused_servers: AtomicU64,
    wait_time: AtomicHistogram,
    hold_time: AtomicHistogram,
    /// Where the wait and hold times also go, with the `metrics` feature.
    #[cfg(feature = "metrics")]
    facade: std::sync::OnceLock<(metrics::Histogram, metrics::Histogram)>,
}

/// A [`Histogram`] kept with atomics.
#[derive(Debug, Default)]
struct AtomicHistogram {
    counts: [AtomicU64; BUCKETS + 1],
}

impl AtomicHistogram {
    fn record(&self, d: Duration) {
        self.counts[Histogram::bucket(d)].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Histogram {
        let mut h = Histogram::default();
        for (to, from) in h.counts.iter_mut().zip(&self.counts) {
            *to = from.load(Ordering::Relaxed);
        }
        h
    }
}

/// One caller in a waiting call, counted while it lives.
pub(crate) struct Waiting<'a>(&'a Counters);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Counters {
    #[inline]
    pub(crate) fn granted(&self) {
        self.grants.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn refused(&self) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn timed_out(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn lost(&self) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn server_refused(&self) {
        self.refused_servers.fetch_add(1, Ordering::Relaxed);
    }

    /// A waiting call begins; it ends when the returned value is dropped.
    pub(crate) fn wait_begins(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(self)
    }

    pub(crate) fn waited(&self, d: Duration) {
        self.wait_time.record(d);
        #[cfg(feature = "metrics")]
        if let Some((wait, _)) = self.facade.get() {
            wait.record(d.as_secs_f64());
        }
    }

    #[inline]
    pub(crate) fn held(&self, d: Duration) {
        self.hold_time.record(d);
        #[cfg(feature = "metrics")]
        if let Some((_, hold)) = self.facade.get() {
            hold.record(d.as_secs_f64());
        }
    }

    /// With the `metrics` feature: records every later wait and hold time into these too.
    #[cfg(feature = "metrics")]
    pub(crate) fn record_times_into(&self, wait: metrics::Histogram, hold: metrics::Histogram) {
        let _ = self.facade.set((wait, hold));
    }

    /// The counters' part of a snapshot (the rest is filled in by the manager).
    pub(crate) fn snapshot(&self) -> Stats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            waiting: load(&self.waiting),
            grants: load(&self.grants),
            refusals: load(&self.refusals),
            timeouts: load(&self.timeouts),
            lost: load(&self.lost),
            reconnects: load(&self.reconnects),
            refused_servers: load(&self.refused_servers),
            wait_time: self.wait_time.snapshot(),
            hold_time: self.hold_time.snapshot(),
            ..Stats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_the_bucket_of_their_upper_bound_and_quantiles_read_back() {
        let us = Duration::from_micros;
        assert_eq!(Histogram::bucket(Duration::ZERO), 0);
        assert_eq!(Histogram::bucket(us(100)), 0);
        assert_eq!(Histogram::bucket(us(101)), 1);
        assert_eq!(Histogram::bucket(us(200)), 1);
        assert_eq!(Histogram::bucket(us(201)), 2);
        assert_eq!(Histogram::bucket(Duration::from_secs(3600)), BUCKETS);
        assert_eq!(Histogram::bucket(Duration::MAX), BUCKETS);
        assert_eq!(Histogram::bound(1), Some(us(200)));
        assert_eq!(Histogram::bound(BUCKETS), None);
        let h = AtomicHistogram::default();
        for _ in 0..98 {
            h.record(us(150));
        }
        h.record(Duration::from_millis(5));
        h.record(Duration::from_secs(3600));
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert_eq!(s.quantile(0.5), Some(us(200)));
        assert_eq!(s.quantile(0.99), Some(us(6400)));
        assert_eq!(s.quantile(1.0), Some(Duration::MAX));
        assert_eq!(Histogram::default().quantile(0.5), None);
    }
}

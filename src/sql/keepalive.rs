//! How the server watches a lock session's client, so that it ends the session of a client whose
//! host vanished, and frees its locks, within a bound: TCP keepalives for a client it reaches
//! directly, and a lease — the longest the session may sit idle between two statements — for one
//! behind a proxy, whose socket the keepalives would watch instead.

/// How the server should watch a lock session's client, so that a client whose host vanished
/// (no FIN, no RST) loses its session, and its locks, within a bound: TCP keepalive probes after
/// `idle_s` seconds of silence, every `interval_s` seconds, `count` of them unanswered; and at most
/// `user_timeout_ms` for data the client never acknowledges; and `lease_ms` of idleness between two
/// statements (`idle_session_timeout` of a lock session, `idle_in_transaction_session_timeout` of a
/// lock transaction), which the heartbeat renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerKeepalive {
    pub(crate) idle_s: u32,
    pub(crate) interval_s: u32,
    pub(crate) count: u32,
    pub(crate) user_timeout_ms: u32,
    pub(crate) lease_ms: u32,
}

impl ServerKeepalive {
    /// Settings under which a silent client's session ends within `bound` (whole seconds, at
    /// least 2). Linux's keepalive timers fire late (a 5 s timer by up to half a second, each 1 s
    /// probe by tens of milliseconds), so the settings aim a second short of a bound of 3 s or
    /// more: half of that idle, the rest in probes a second or more apart (Linux allows 127 at
    /// most), and the user timeout, which ends the session at the first probe after that much
    /// silence, equal to it. The lease is the user timeout too, but never shorter than
    /// `renewed_within` and a second: the longest a live session goes between two statements
    /// (the heartbeat, and the time its round trip may take before the connection counts as
    /// stalled), so that the lease never ends a live session.
    pub(crate) fn within(
        bound: std::time::Duration,
        renewed_within: std::time::Duration,
    ) -> ServerKeepalive {
        let total = u32::try_from(bound.as_secs()).unwrap_or(u32::MAX).max(2);
        let target = if total > 2 { total - 1 } else { total };
        let idle_s = target / 2;
        let rest = target - idle_s;
        let count = rest.min(10);
        ServerKeepalive {
            idle_s,
            interval_s: rest / count,
            count,
            user_timeout_ms: target.saturating_mul(1000).min(i32::MAX as u32),
            lease_ms: target
                .saturating_mul(1000)
                .max(
                    u32::try_from(renewed_within.as_millis().saturating_add(1000))
                        .unwrap_or(u32::MAX),
                )
                .min(i32::MAX as u32),
        }
    }
}

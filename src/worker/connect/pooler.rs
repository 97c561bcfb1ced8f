//! Telling a session of our own from one a pooler shares.
//!
//! Session advisory locks belong to a server session. A pooler in transaction or statement mode
//! hands each statement to whichever server session is free, so locks land in sessions other
//! clients use and exclude nobody. Each lock connection therefore sets a mark of its own in its
//! session (`SET distlock.session`, a value derived from the manager's salt and the backend) and
//! checks, when connecting, on heartbeats and whenever a lock it should hold is missing, that its
//! statements still run in the backend it identified and that the mark is still its own: several
//! server sessions show as a changed `pg_backend_pid()`, one shared session as a mark another
//! client overwrote (or a mark already there when connecting).

use std::time::Duration;

use postgres::SimpleQueryMessage;

use crate::protocol::link::Backend;
use crate::sql::pooler::PIN_A_BACKEND;
pub(crate) use crate::sql::pooler::probe;
use crate::worker::reply::row_counts;

/// The mark a manager with `salt` sets in `backend`'s session.
pub(crate) fn session_mark(salt: u64, backend: &Backend) -> i64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hasher};
    let mut h = BuildHasherDefault::<DefaultHasher>::default().build_hasher();
    h.write_u64(salt);
    h.write_i32(backend.pid);
    h.write_i64(backend.started_us);
    (h.finish() & i64::MAX as u64) as i64
}

/// The mark of a lock transaction of a manager with `salt` on the backend `pid`: the server
/// computes the same in the transaction's first round trip (`Sql::push_transaction_start`).
pub(crate) fn transaction_mark(salt: u64, pid: i32) -> i64 {
    ((salt as i64) ^ i64::from(pid)) & i64::MAX
}

/// A number no other manager (in this process or another) is likely to use.
pub(crate) fn random_salt() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Proves, when a lock session is opened, that no transaction pooler stands between it and the
/// server even when no other client uses the endpoint — where the marks checked later see
/// nothing, since nobody else writes into the session. The first connection (`client`, on
/// `backend`, marked `mark`) has run its statements and left its server connection idle.
///
/// A helper connection to the same host (made by `connect`, on a thread of its own) opens a
/// transaction and names its backend. Directly or through a session pooler it is a session of its
/// own; through a transaction pooler it is lent one of the pool's server connections — the first
/// connection's own when that is the only one (pool size 1, or a quiet pool that opened no other)
/// or the one released last (pgbouncer's default order). While the helper keeps its connection
/// pinned, the first connection's probe must still find its own backend and mark: through a
/// pooler that lends the oldest idle connection first, it lands in another one. Either answer
/// means a pooler shares the session: `Ok(true)`. `Err` when the first connection itself failed.
///
/// Costs one more connection and two round trips per connect (see the README's Performance
/// section). A helper that is not answered `within` (a session pooler whose pool has no server
/// connection to spare: a quiet transaction pooler always has the first connection's) or cannot
/// be opened (the server's last connection slot is the lock session's) proves nothing: the
/// session is accepted, and the marks are checked on every heartbeat as before. A helper given
/// up on closes its connection when it is answered.
pub(crate) fn shared_by_pooler(
    client: &mut postgres::Client,
    connect: impl FnOnce() -> Result<postgres::Client, postgres::Error> + Send + 'static,
    within: Duration,
    backend: &Backend,
    mark: i64,
) -> Result<bool, postgres::Error> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let spawned = std::thread::Builder::new()
        .name("distlock-connect".into())
        .spawn(move || {
            let pinned = connect().and_then(|mut helper| {
                let pid = backend_pid(&helper.simple_query(PIN_A_BACKEND)?);
                Ok((helper, pid))
            });
            // Unwanted (too late): dropped here, which closes the connection.
            let _ = tx.send(pinned);
        });
    let unproven = |why: &dyn std::fmt::Display| {
        log::info!(
            "distlock: could not prove with a second connection that no transaction pooler \
             shares the session (checked on every heartbeat instead): {why}"
        );
        Ok(false)
    };
    if let Err(e) = spawned {
        return unproven(&e);
    }
    // Dropped (and its transaction ended) when the proof is done.
    let _helper = match rx.recv_timeout(within) {
        Ok(Ok((_, pid))) if pid == Some(backend.pid) => return Ok(true),
        Ok(Ok((helper, _))) => helper,
        Ok(Err(e)) => return unproven(&e),
        Err(_) => return unproven(&format_args!("no answer within {within:?}")),
    };
    let rows = client.simple_query(&probe(backend.pid, mark))?;
    Ok(row_counts(&rows).next() != Some(1))
}

/// How long [`shared_by_pooler`] waits for its helper when the lock session's own connect took
/// `took`: four times that (a helper does as much), at least [`HELPER_WAIT_FLOOR`].
pub(crate) fn helper_wait(took: Duration) -> Duration {
    took.saturating_mul(4).max(HELPER_WAIT_FLOOR)
}

/// The shortest wait for the helper: a few round trips to a loaded server nearby.
const HELPER_WAIT_FLOOR: Duration = Duration::from_millis(250);

/// The backend pid in the first row among `messages`, if any.
fn backend_pid(messages: &[SimpleQueryMessage]) -> Option<i32> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).and_then(|pid| pid.parse().ok()),
        _ => None,
    })
}

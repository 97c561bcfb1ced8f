//! The one acquire path: reserve in the manager's table, ask the worker, and hand out guards or
//! roll the reservation back ([`acquire`]); one try of each kind of grant ([`try_once`]); and
//! the polling wait that repeats a try until it grants ([`poll_until`]).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::caller::guard::LockGuard;
use crate::caller::pool::Taken;
use crate::caller::shared::{Call, Shared};
use crate::caller::table::Reservation;
use crate::clock::deadline_in;
use crate::error::{Error, Result};
use crate::key::LockKey;
use crate::mode::Mode;
use crate::protocol::reply::Reply;
use crate::protocol::request::{Op, Solo};

/// The first pause between two tries of a lock someone else holds.
pub(crate) const FIRST_RETRY: Duration = Duration::from_millis(1);

/// What a caller wants granted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wanted<'a> {
    /// One key, in a mode.
    One(LockKey, Mode),
    /// One key, exclusively, with a fencing token.
    Fenced(LockKey),
    /// Every one of the keys, exclusively, or none.
    All(&'a [LockKey]),
}

impl<'a> Wanted<'a> {
    /// The keys it takes.
    pub(crate) fn keys(&self) -> &[LockKey] {
        match self {
            Wanted::One(key, _) | Wanted::Fenced(key) => std::slice::from_ref(key),
            Wanted::All(keys) => keys,
        }
    }

    /// The mode of every key.
    pub(crate) fn mode(&self) -> Mode {
        match self {
            Wanted::One(_, mode) => *mode,
            Wanted::Fenced(_) | Wanted::All(_) => Mode::Exclusive,
        }
    }
}

impl fmt::Display for Wanted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, key) in self.keys().iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{key}")?;
        }
        Ok(())
    }
}

/// Reserves `keys` in `shared`'s table (`Ok(None)` when a thread of this manager holds one of
/// them), sends the request `ask` makes (told whether the reservation is the manager's only hold
/// of the key), and turns the reply into what the caller gets with `granted`. Unless that is a
/// grant, the reservation is given back.
#[inline(always)]
pub(crate) fn acquire<G>(
    shared: &Shared,
    keys: &[LockKey],
    mode: Mode,
    ask: impl FnOnce(bool) -> Result<Reply>,
    granted: impl FnOnce(Reply) -> Result<Option<G>>,
) -> Result<Option<G>> {
    shared.check_online()?;
    let sole_hold = match shared.reserve_all(keys, mode) {
        Reservation::Reserved { sole } => sole,
        Reservation::Conflict => return Ok(None),
        Reservation::Full => return Err(shared.too_many_locks()),
    };
    // On a timeout the request may still run: the worker then finds nobody waiting and
    // releases the grant itself, before any later request for the keys (the queue is FIFO).
    let outcome = ask(sole_hold).and_then(granted);
    if !matches!(outcome, Ok(Some(_))) {
        shared.unreserve(keys, mode);
        count_refusal(shared, &outcome);
    }
    outcome
}

/// Counts a try that did not grant: refused (someone else holds the lock), or timed out.
#[cold]
fn count_refusal<G>(shared: &Shared, outcome: &Result<Option<G>>) {
    let counters = shared.link().counters();
    match outcome {
        Ok(None) => counters.refused(),
        Err(e) if e.is_timeout() => counters.timed_out(),
        _ => {}
    }
}

/// One try of the plain lock `key`: the local table first, then (if free locally) the server.
#[inline]
pub(crate) fn try_lock(
    shared: &Arc<Shared>,
    key: LockKey,
    mode: Mode,
    deadline: Instant,
) -> Result<Option<LockGuard>> {
    if shared.settings().transactions {
        let guards = in_transaction(shared, Wanted::One(key, mode), deadline, deadline)?;
        return Ok(guards.and_then(|mut guards| guards.pop()));
    }
    acquire(
        shared,
        std::slice::from_ref(&key),
        mode,
        |sole_hold| {
            shared.round_trip(Call {
                op: Op::TryLock,
                mode,
                key,
                generation: 0,
                sole_hold,
                deadline,
            })
        },
        |reply| match reply {
            Reply::Granted(lease) => Ok(Some(LockGuard::new(
                Arc::clone(shared),
                key,
                mode,
                lease,
                None,
                deadline,
            ))),
            _ => Ok(None),
        },
    )
}

/// One try of `wanted`, bounded by `deadline`: a plain try, or one solo request (a fenced
/// grant, or every key or none).
pub(crate) fn try_once(
    shared: &Arc<Shared>,
    wanted: Wanted<'_>,
    deadline: Instant,
) -> Result<Option<Vec<LockGuard>>> {
    if shared.settings().transactions {
        return in_transaction(shared, wanted, deadline, deadline);
    }
    let solo = match wanted {
        Wanted::One(key, mode) => {
            return Ok(try_lock(shared, key, mode, deadline)?.map(|guard| vec![guard]));
        }
        Wanted::Fenced(key) => Solo::Fenced(key),
        Wanted::All([]) => return Ok(Some(Vec::new())),
        Wanted::All(keys) => Solo::All {
            keys: keys.to_vec(),
            mode: Mode::Exclusive,
        },
    };
    acquire(
        shared,
        wanted.keys(),
        wanted.mode(),
        |_| shared.round_trip_solo(solo, deadline),
        |reply| guards(shared, reply),
    )
}

/// The first try of a waiting call whose deadline is `deadline`: its round trip may use the whole
/// request timeout (so that a zero timeout still tries once, as `try_lock` does), but in
/// transaction mode, opening the lock transaction — a connection from the pooler, a transaction
/// slot — ends at the caller's deadline when it has one still ahead, as every wait does.
pub(crate) fn try_first(
    shared: &Arc<Shared>,
    wanted: Wanted<'_>,
    deadline: Option<Instant>,
) -> Result<Option<Vec<LockGuard>>> {
    let request = shared.request_deadline();
    if shared.settings().transactions {
        let open_by = match deadline {
            Some(d) if d > Instant::now() => d.min(request),
            _ => request,
        };
        return in_transaction(shared, wanted, open_by, request);
    }
    try_once(shared, wanted, request)
}

/// Transaction mode: one try of `wanted` (see [`crate::Builder::transaction_pooler`]), each key
/// in a lock transaction of its own, taken in the order of their ids, its keys reserved in this
/// manager's table as any try reserves them. All or nothing: a key refused releases those taken
/// before the call returns. Each guard keeps its transaction's connection (and its reservation)
/// until it is gone. Each lock transaction is opened by `open_by`, each try answered by
/// `deadline`.
#[cold]
#[inline(never)]
fn in_transaction(
    shared: &Arc<Shared>,
    wanted: Wanted<'_>,
    open_by: Instant,
    deadline: Instant,
) -> Result<Option<Vec<LockGuard>>> {
    let mode = wanted.mode();
    let mut keys = wanted.keys().to_vec();
    keys.sort();
    match shared.reserve_all(&keys, mode) {
        Reservation::Reserved { .. } => {}
        Reservation::Conflict => return Ok(None),
        Reservation::Full => return Err(shared.too_many_locks()),
    }
    let mut guards = Vec::with_capacity(keys.len());
    for (i, &key) in keys.iter().enumerate() {
        match one_transaction(shared, key, mode, open_by, deadline) {
            Ok(Some(guard)) => guards.push(guard),
            refused => {
                // The guards taken so far give their keys back (on the server and here).
                shared.unreserve(&keys[i..], mode);
                drop(guards);
                count_refusal(shared, &refused);
                return refused.map(|_| None);
            }
        }
    }
    if let Wanted::Fenced(_) = wanted {
        guards = guards
            .into_iter()
            .map(|g| fence(shared, g))
            .collect::<Result<_>>()?;
    }
    // In the caller's order of the keys.
    let order = wanted.keys();
    guards.sort_by_key(|g| order.iter().position(|&k| k == g.key()));
    Ok(Some(guards))
}

/// One try of `key`, already reserved here, in a lock transaction of its own opened by
/// `open_by`.
fn one_transaction(
    shared: &Arc<Shared>,
    key: LockKey,
    mode: Mode,
    open_by: Instant,
    deadline: Instant,
) -> Result<Option<LockGuard>> {
    let taken = lock_transaction(shared, open_by)?;
    let Some(conn) = taken.conn() else {
        return Ok(None);
    };
    Ok(try_lock(conn, key, mode, deadline)?.map(|guard| guard.borrowed_from(shared, &taken)))
}

/// Transaction mode: a lock transaction of the manager `shared`, to try one lock on, within
/// `deadline` (a [`Error::too_many_transactions`] when none frees up in time).
pub(crate) fn lock_transaction(
    shared: &Shared,
    deadline: Instant,
) -> Result<Arc<Taken<Arc<Shared>>>> {
    let pool = shared.waits().ok_or_else(Error::not_in_transaction_mode)?;
    // A pooler (or server) that refuses or drops connections for a while — a restart, say — is
    // a failure that may pass, as a reconnect is in session mode.
    match pool
        .take(Some(deadline))
        .map_err(Error::offline_if_passing)?
    {
        Some(taken) => Ok(Arc::new(taken)),
        None => Err(Error::too_many_transactions()),
    }
}

/// Transaction mode: the fencing token of `guard`'s fresh grant, drawn after it on the manager's
/// own connection (a token drawn in the lock's transaction would assign it a transaction id).
/// The lock is proven held after the token is drawn, so no later holder can have drawn a smaller
/// one: tokens only grow, as in a session.
pub(crate) fn fence(shared: &Shared, guard: LockGuard) -> Result<LockGuard> {
    let token = match shared.round_trip_solo(Solo::Token, shared.request_deadline())? {
        Reply::Grant(grant) => grant.token,
        other => return Err(Error::unexpected(&other)),
    };
    guard.ensure_held()?;
    Ok(guard.with_token(token))
}

/// The guards of a grant beyond a plain one, one per key held, each with the grant's token.
pub(crate) fn guards(shared: &Arc<Shared>, reply: Reply) -> Result<Option<Vec<LockGuard>>> {
    let since = shared.request_deadline();
    match reply {
        Reply::Grant(grant) => Ok(Some(
            grant
                .held
                .iter()
                .map(|&key| {
                    LockGuard::new(
                        Arc::clone(shared),
                        key,
                        grant.mode,
                        grant.lease.clone(),
                        grant.token,
                        since,
                    )
                })
                .collect(),
        )),
        Reply::Busy => Ok(None),
        other => Err(Error::unexpected(&other)),
    }
}

/// Makes `attempt` (one try, bounded by the deadline it is given) until it grants or `deadline`
/// (`None`: no deadline) passes, pausing with capped exponential backoff plus jitter between
/// tries, and trying at once when a guard of this manager gives a hold back. `what` names the
/// lock in logs.
pub(crate) fn poll_until<T>(
    shared: &Shared,
    deadline: Option<Instant>,
    what: &dyn fmt::Display,
    mut attempt: impl FnMut(Instant) -> Result<Option<T>>,
) -> Result<Option<T>> {
    let mut backoff = Backoff::new(FIRST_RETRY, shared.settings().max_retry_interval);
    // The first try may use the whole request timeout, so that a zero timeout still tries once.
    let mut try_deadline = shared.request_deadline();
    let mut cut_by_caller = false;
    // The transient failure of the latest try, if it failed: at the deadline the caller learns
    // that, rather than an `Ok(None)` that would claim someone else holds the lock.
    let mut failing: Option<Error> = None;
    loop {
        let seen = shared.releases();
        match attempt(try_deadline) {
            Ok(Some(granted)) => return Ok(Some(granted)),
            Ok(None) => failing = None,
            // A try cut short by the caller's own deadline (not by the request timeout) means
            // "not acquired in time"; a grant that arrives later is released by the worker.
            Err(e) if e.is_timeout() && cut_by_caller => return failing.map_or(Ok(None), Err),
            // A lost connection, a reconnect in progress or a stalled worker may pass: keep
            // waiting, within the caller's deadline.
            Err(e) if e.is_transient() => {
                log::debug!("distlock: waiting for {what} through: {e}");
                failing = Some(e);
            }
            Err(e) => return Err(e),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return failing.map_or(Ok(None), Err);
        }
        shared.sleep_unless_released(seen, pause_end(backoff.next_pause(), deadline));
        // A try in flight at the caller's deadline is abandoned (and a late grant released), so
        // the caller gets its answer on time even from a busy worker.
        let request_deadline = shared.request_deadline();
        (try_deadline, cut_by_caller) = match deadline {
            Some(d) if d < request_deadline => (d.max(Instant::now()), true),
            _ => (request_deadline, false),
        };
    }
}

/// When a pause of `pause` from now ends, but not past `deadline`.
pub(crate) fn pause_end(pause: Duration, deadline: Option<Instant>) -> Instant {
    let until = deadline_in(pause);
    deadline.map_or(until, |d| until.min(d))
}

/// The outcome of a wait without a deadline, which ends only with a grant or an error.
pub(crate) fn without_deadline<T>(waited: Result<Option<T>>) -> Result<T> {
    waited?.ok_or_else(Error::wait_ended)
}

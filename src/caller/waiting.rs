//! Waiting for a lock: in PostgreSQL's own lock queue on a waiting connection, or by polling.
//!
//! PostgreSQL queues the sessions that block in `pg_advisory_lock` in arrival order and hands a
//! released lock straight to the first of them; a non-blocking try cannot barge past a queued
//! waiter. So a caller that must wait first tries once on the manager's connection, and if the
//! lock is held, waits in the queue on a *waiting connection* (see [`crate::caller::pool`]): the
//! connection of a manager of its own (its own worker, monitor, heartbeat and loss signal), so
//! that the manager's connection never blocks. The lock is then held by that connection's
//! session and its guard is an ordinary guard of that manager (drop releases it before
//! returning, loss is announced, `ensure_held` works, generations protect it), which also keeps
//! the keys reserved in the caller's manager until it is gone.
//!
//! A manager without waiting connections, or one that cannot open any (a connection limit),
//! polls instead ([`poll_until`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::caller::acquire::{self, FIRST_RETRY, Wanted, guards, pause_end, poll_until, try_once};
use crate::caller::guard::LockGuard;
use crate::caller::pool::Taken;
use crate::caller::shared::{Shared, Waits};
use crate::clock::deadline_in;
use crate::error::{Error, ErrorKind, Result};
use crate::key::LockKey;
use crate::mode::Mode;
use crate::protocol::request::{Fencing, Solo, Wait};

/// How long past its deadline a wait in the lock queue waits for the server's answer to its
/// `lock_timeout`: a round trip, on any network distlock is meant for.
pub(crate) const WAIT_REPLY_GRACE: Duration = Duration::from_millis(100);

/// The longest application name PostgreSQL keeps (`NAMEDATALEN - 1` bytes).
pub(crate) const MAX_APPLICATION_NAME: usize = 63;

/// Waits for `wanted` until `deadline` (`None`: no deadline): in the lock queue when the manager
/// has waiting connections, else by polling. `name`: the name the key was given as, which a
/// waiting connection shows while it waits (else the key's id).
pub(crate) fn wait(
    shared: &Arc<Shared>,
    wanted: Wanted<'_>,
    name: Option<&str>,
    deadline: Option<Instant>,
) -> Result<Option<Vec<LockGuard>>> {
    counted(shared, || wait_uncounted(shared, wanted, name, deadline))
}

/// Runs the waiting call `call`, counted in the manager's statistics: one more caller waiting
/// while it runs, then its wait time, or a timeout.
pub(crate) fn counted<T>(
    shared: &Shared,
    call: impl FnOnce() -> Result<Option<T>>,
) -> Result<Option<T>> {
    let counters = shared.link().counters();
    let waiting = counters.wait_begins();
    let started = Instant::now();
    let outcome = call();
    drop(waiting);
    match &outcome {
        Ok(Some(_)) => counters.waited(started.elapsed()),
        Ok(None) => counters.timed_out(),
        Err(e) if e.is_timeout() => counters.timed_out(),
        Err(_) => {}
    }
    outcome
}

/// [`wait`], not counted (a part of a waiting call counted as a whole).
pub(crate) fn wait_uncounted(
    shared: &Arc<Shared>,
    wanted: Wanted<'_>,
    name: Option<&str>,
    deadline: Option<Instant>,
) -> Result<Option<Vec<LockGuard>>> {
    match (shared.waits(), wanted) {
        (Some(_), Wanted::All(keys)) if shared.settings().transactions => {
            wait_each(shared, keys, deadline)
        }
        (Some(pool), _) => wait_in_queue(shared, pool, wanted, name, deadline),
        (None, _) => poll_until(shared, deadline, &wanted, |d| try_once(shared, wanted, d)),
    }
}

/// Transaction mode: every one of `keys` or none, each waited for in a lock transaction of its
/// own, in the order of their ids (every caller's order, so that such waits cannot deadlock each
/// other), all within `deadline`.
fn wait_each(
    shared: &Arc<Shared>,
    keys: &[LockKey],
    deadline: Option<Instant>,
) -> Result<Option<Vec<LockGuard>>> {
    let mut sorted = keys.to_vec();
    sorted.sort();
    let mut guards = Vec::with_capacity(keys.len());
    for key in sorted {
        match wait_uncounted(shared, Wanted::One(key, Mode::Exclusive), None, deadline)? {
            Some(mut got) => guards.append(&mut got),
            // The guards taken so far release their keys as they drop.
            None => return Ok(None),
        }
    }
    guards.sort_by_key(|g| keys.iter().position(|&k| k == g.key()));
    Ok(Some(guards))
}

/// How a wait in the queue ended: done, or no waiting connection to be had (poll instead).
enum Queued {
    Done(Result<Option<Vec<LockGuard>>>),
    Poll,
}

/// One try on the manager's own connection, then a wait in the lock queue.
fn wait_in_queue(
    shared: &Arc<Shared>,
    pool: &Arc<Waits>,
    wanted: Wanted<'_>,
    name: Option<&str>,
    deadline: Option<Instant>,
) -> Result<Option<Vec<LockGuard>>> {
    let failing = match acquire::try_first(shared, wanted, deadline) {
        Ok(Some(guards)) => return Ok(Some(guards)),
        Ok(None) => None,
        Err(e) if e.is_transient() => Some(e),
        Err(e) => return Err(e),
    };
    let (keys, mode) = (wanted.keys(), wanted.mode());
    // Reserved in this manager's table for the whole wait, as a try reserves: threads of this
    // manager exclude each other here (lost guards included) before anyone queues.
    if !shared.reserve_all_until(keys, mode, deadline)? {
        return failing.map_or(Ok(None), Err);
    }
    let label = waiting_label(shared.name(), name, keys);
    let queued = queue_for(shared, pool, wanted, &label, deadline, failing);
    if !matches!(queued, Queued::Done(Ok(Some(_)))) {
        shared.unreserve(keys, mode);
    }
    match queued {
        Queued::Done(result) => result,
        // No waiting connection can be opened (the server's connection limit, say): poll on
        // the manager's own connection instead, which is still there.
        Queued::Poll => poll_until(shared, deadline, &wanted, |d| try_once(shared, wanted, d)),
    }
}

/// The queue wait of [`wait_in_queue`], keys reserved: on one waiting connection after another
/// while they fail, within the deadline.
fn queue_for(
    shared: &Arc<Shared>,
    pool: &Arc<Waits>,
    wanted: Wanted<'_>,
    label: &str,
    deadline: Option<Instant>,
    mut failing: Option<Error>,
) -> Queued {
    let mut backoff = Backoff::new(FIRST_RETRY, shared.settings().max_retry_interval);
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Queued::Done(failing.map_or(Ok(None), Err));
        }
        let taken = match pool.take(deadline) {
            Ok(Some(taken)) => Arc::new(taken),
            Ok(None) => return Queued::Done(failing.map_or(Ok(None), Err)),
            Err(e) if fails_everywhere(&e) => return Queued::Done(Err(e)),
            Err(e) => {
                log::warn!("distlock: waiting by polling: no waiting connection: {e}");
                return Queued::Poll;
            }
        };
        // In transaction mode a fenced wait's token is drawn afterwards, outside the lock's
        // transaction.
        let fence_after = shared.settings().transactions && matches!(wanted, Wanted::Fenced(_));
        match wait_on(&taken, wanted, label, deadline, !fence_after) {
            Ok(Some(guards)) => {
                let guards = guards.into_iter().map(|g| {
                    let g = g.borrowed_from(shared, &taken);
                    if fence_after {
                        acquire::fence(shared, g)
                    } else {
                        Ok(g)
                    }
                });
                return Queued::Done(guards.collect::<Result<Vec<_>>>().map(Some));
            }
            Ok(None) => return Queued::Done(Ok(None)),
            // That connection failed (or is reconnecting): wait again on another.
            Err(e) if e.is_transient() => {
                failing = Some(e);
                drop(taken);
                let until = pause_end(backoff.next_pause(), deadline);
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
            }
            Err(e) => return Queued::Done(Err(e)),
        }
    }
}

/// On the waiting connection `taken`: waits for `wanted` in the lock queue until `deadline`.
/// `token_here`: a fenced wait draws its token in the same round trip (in transaction mode the
/// caller draws it afterwards, outside the lock's transaction).
fn wait_on(
    taken: &Taken<Arc<Shared>>,
    wanted: Wanted<'_>,
    label: &str,
    deadline: Option<Instant>,
    token_here: bool,
) -> Result<Option<Vec<LockGuard>>> {
    let Some(conn) = taken.conn() else {
        return Ok(None);
    };
    let fencing = match wanted {
        Wanted::Fenced(_) if token_here => Fencing::Token,
        Wanted::Fenced(_) | Wanted::One(..) | Wanted::All(_) => Fencing::NoToken,
    };
    let wait = Wait {
        keys: wanted.keys().to_vec(),
        mode: wanted.mode(),
        fencing,
        deadline,
        label: label.into(),
    };
    // The server ends the wait at the deadline, and its answer takes a round trip more: the
    // caller gives it [`WAIT_REPLY_GRACE`] (at most the request timeout), so that a waiting
    // connection whose backend stopped answering cannot hold the call a request timeout past
    // its deadline.
    let grace = conn.request_timeout().min(WAIT_REPLY_GRACE);
    let reply_deadline = deadline
        .and_then(|d| d.checked_add(grace))
        .unwrap_or_else(|| deadline_in(Duration::MAX));
    acquire::acquire(
        conn,
        wanted.keys(),
        wanted.mode(),
        |_| conn.round_trip_solo(Solo::Wait(wait), reply_deadline),
        |reply| guards(conn, reply),
    )
}

/// What a waiting connection's `application_name` is while it waits: the manager's name with
/// ` (waiting: <what>)` after it, `what` the key's name (else its id, or the ids of several
/// keys), cut on a character boundary to the 63 bytes PostgreSQL keeps: the manager's name stays
/// whole as far as it fits, so that what matches it (`application_name LIKE 'app%'`, a monitoring
/// tool's grouping) still does while it waits. A NUL, which no setting may hold, shows as `?`.
pub(crate) fn waiting_label(manager: &str, name: Option<&str>, keys: &[LockKey]) -> String {
    let what = match name {
        Some(name) => name.replace('\0', "?"),
        None => {
            let ids: Vec<String> = keys.iter().map(LockKey::to_string).collect();
            ids.join(", ")
        }
    };
    let mut label = format!("{manager} (waiting: {what})");
    label.truncate(cut(&label, MAX_APPLICATION_NAME).len());
    label
}

/// `text`'s first `max` bytes at most, cut on a character boundary.
pub(crate) fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// True when `e`, from opening a waiting connection, would fail the manager's own connection
/// too (bad settings, a pooler), so that waiting by polling instead gains nothing.
fn fails_everywhere(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::Config | ErrorKind::Pooler)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_label_names_the_key_within_63_bytes_on_a_character_boundary() {
        let key = LockKey::name("nightly-report");
        assert_eq!(
            waiting_label("worker-7", Some("nightly-report"), &[key]),
            "worker-7 (waiting: nightly-report)"
        );
        assert_eq!(
            waiting_label("w", None, &[LockKey::id(5), LockKey::pair(1, 2)]),
            "w (waiting: 5, (1, 2))"
        );
        let long = "\u{e9}".repeat(40);
        for (manager, name) in [(long.as_str(), "k"), ("m", long.as_str()), (&long, &long)] {
            let label = waiting_label(manager, Some(name), &[key]);
            assert!(label.len() <= 63 && label.len() >= 62, "{label}");
            assert!(
                label.starts_with(&manager[..cut(manager, 62).len()]),
                "{label}"
            );
        }
        let label = waiting_label(
            "distlock run failover/turned-standby",
            Some("failover/turned-standby"),
            &[key],
        );
        assert_eq!(
            label,
            "distlock run failover/turned-standby (waiting: failover/turned-"
        );
        assert_eq!(waiting_label("m", Some("a\0b"), &[key]), "m (waiting: a?b)");
    }
}

//! The manager's calls beyond one key's lock: fenced grants, semaphore permits, all-or-nothing
//! multi-key grants and holder lookups. Each is one request to the worker, one statement, one
//! round trip (see `crate::special`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::deadline_in;
use crate::error::{Error, ErrorKind, Result};
use crate::guard::LockGuard;
use crate::holder::Holder;
use crate::key::LockKey;
use crate::manager::{LockManager, offline_error};
use crate::reply::Reply;
use crate::shared::Call;
use crate::special::{Extra, MAX_KEYS, MAX_PERMITS, Special};
use crate::sql::{Mode, Op};
use crate::table::Reservation;

impl LockManager {
    /// Tries once to take the exclusive lock on `key` with a fencing token, without waiting.
    ///
    /// Like [`LockManager::try_lock`], and the guard's [`LockGuard::fencing_token`] is `Some`:
    /// a number strictly greater than every token issued before for `key` on this cluster. The
    /// token comes in the same round trip as the grant, from the sequence
    /// `public.distlock_fence`, which the first fenced call creates if it is missing (a role that
    /// may not create it gets an error naming the statements to run once).
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock`]; [`ErrorKind::Server`] when the sequence cannot be used
    /// or created.
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// if let Some(guard) = locks.try_lock_fenced("ledger")? {
    ///     let token = guard.fencing_token().expect("fenced grants carry a token");
    ///     // write to the store with `token`; the store refuses tokens lower than its highest
    /// #   let _ = token;
    /// }
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn try_lock_fenced(&self, key: impl Into<LockKey>) -> Result<Option<LockGuard>> {
        self.try_fenced_once(key.into(), self.shared().request_deadline())
    }

    /// Takes the exclusive lock on `key` with a fencing token, waiting up to `timeout`.
    ///
    /// Waits like [`LockManager::try_lock_for`]; the guard carries a token as for
    /// [`LockManager::try_lock_fenced`].
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock_fenced`].
    pub fn try_lock_fenced_for(
        &self,
        key: impl Into<LockKey>,
        timeout: Duration,
    ) -> Result<Option<LockGuard>> {
        self.fenced_wait(key.into(), Some(deadline_in(timeout)))
    }

    /// Takes the exclusive lock on `key` with a fencing token, waiting for as long as it is held.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::lock`] and [`LockManager::try_lock_fenced`].
    pub fn lock_fenced(&self, key: impl Into<LockKey>) -> Result<LockGuard> {
        wait_forever(self.fenced_wait(key.into(), None))
    }

    /// A fenced grant within `deadline`: in the lock queue when the manager has waiting
    /// connections, else by polling.
    fn fenced_wait(&self, key: LockKey, deadline: Option<Instant>) -> Result<Option<LockGuard>> {
        if self.shared().waits.is_some() {
            return Ok(self
                .wait_in_queue(&[key], Mode::Exclusive, true, deadline)?
                .and_then(|mut guards| guards.pop()));
        }
        self.wait_until(deadline, &key, |d| self.try_fenced_once(key, d))
    }

    /// Every one of `keys` within `deadline`: in the lock queue when the manager has waiting
    /// connections, else by polling whole tries.
    fn all_wait(
        &self,
        keys: &[LockKey],
        deadline: Option<Instant>,
    ) -> Result<Option<Vec<LockGuard>>> {
        if keys.is_empty() {
            return Ok(Some(Vec::new()));
        }
        if self.shared().waits.is_some() {
            return self.wait_in_queue(keys, Mode::Exclusive, false, deadline);
        }
        let what = KeysOf(keys);
        self.wait_until(deadline, &what, |d| {
            self.try_all_once(keys, Mode::Exclusive, d)
        })
    }

    /// Tries once to take one of `permits` permits of the semaphore `key`, without waiting.
    ///
    /// A semaphore lets at most `permits` holders in at once, across every process and host:
    /// each permit is a slot, an advisory lock of its own, and a try takes the first free slot
    /// in one statement (one round trip). `Ok(None)` when all `permits` slots are held. Every
    /// caller of one semaphore must pass the same `permits`: a caller that passes more may use
    /// slots the others never look at. The guard releases the permit like any lock guard, and a
    /// lost permit frees its slot with its connection.
    ///
    /// Semaphore slots are two-int keys: the first int folds `key`, the second is
    /// `i32::MIN + slot`. Keep your own two-int keys out of that range.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] when `permits` is 0 or more than 10,000; otherwise as for
    /// [`LockManager::try_lock`].
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// // At most 4 exports at once, fleet-wide.
    /// if let Some(_permit) = locks.try_acquire_permit("exports", 4)? {
    ///     // export
    /// }
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn try_acquire_permit(
        &self,
        key: impl Into<LockKey>,
        permits: u32,
    ) -> Result<Option<LockGuard>> {
        let key = key.into();
        check_permits(permits)?;
        self.try_permit_once(key, permits, self.shared().request_deadline())
    }

    /// Takes one of `permits` permits of the semaphore `key`, waiting up to `timeout` for one.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_acquire_permit`].
    pub fn try_acquire_permit_for(
        &self,
        key: impl Into<LockKey>,
        permits: u32,
        timeout: Duration,
    ) -> Result<Option<LockGuard>> {
        let key = key.into();
        check_permits(permits)?;
        self.permit_wait(key, permits, Some(deadline_in(timeout)))
    }

    /// Takes one of `permits` permits of the semaphore `key`, waiting for as long as all are held.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_acquire_permit`] and [`LockManager::lock`].
    pub fn acquire_permit(&self, key: impl Into<LockKey>, permits: u32) -> Result<LockGuard> {
        let key = key.into();
        check_permits(permits)?;
        wait_forever(self.permit_wait(key, permits, None))
    }

    /// A permit within `deadline`. With waiting connections, waiters of the semaphore queue in
    /// arrival order for its turnstile (a lock of its own, [`TURNSTILE_SLOT`]) in PostgreSQL's
    /// lock queue; the one holding it alone tries the slots, a try every `TURNSTILE_PAUSE`, until
    /// one is free, then passes the turnstile on. Without, every waiter polls.
    fn permit_wait(
        &self,
        key: LockKey,
        permits: u32,
        deadline: Option<Instant>,
    ) -> Result<Option<LockGuard>> {
        if self.shared().waits.is_none() {
            return self.wait_until(deadline, &key, |d| self.try_permit_once(key, permits, d));
        }
        match self.try_permit_once(key, permits, self.shared().request_deadline()) {
            Ok(Some(permit)) => return Ok(Some(permit)),
            Ok(None) => {}
            Err(e) if e.is_transient() => {}
            Err(e) => return Err(e),
        }
        let turnstile = key.permit_slot(TURNSTILE_SLOT);
        let Some(mut turn) = self.wait_in_queue(&[turnstile], Mode::Exclusive, false, deadline)?
        else {
            return Ok(None);
        };
        let turn = turn.pop();
        let permit = loop {
            let failing = match self.try_permit_once(key, permits, self.shared().request_deadline())
            {
                Ok(Some(permit)) => break Ok(Some(permit)),
                Ok(None) => None,
                Err(e) if e.is_transient() => Some(e),
                Err(e) => break Err(e),
            };
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break failing.map_or(Ok(None), Err);
            }
            let until = deadline_in(TURNSTILE_PAUSE);
            let until = deadline.map_or(until, |d| until.min(d));
            std::thread::sleep(until.saturating_duration_since(now));
        };
        drop(turn);
        permit
    }

    /// Tries once to take every one of `keys` exclusively, or none, without waiting.
    ///
    /// One statement, one round trip: every key is tried, and unless all were granted the ones
    /// that were are released in the same statement, so a failure leaves no hold on the server.
    /// The guards come back in the order of `keys`, each released on its own. An empty list is
    /// granted at once.
    ///
    /// Waiting forms ([`LockManager::try_lock_all_for`], [`LockManager::lock_all`]) wait in
    /// PostgreSQL's lock queue, taking the keys one after another in the order of their ids,
    /// whatever order the caller lists them in: they may hold some keys while waiting for others,
    /// but two such callers cannot deadlock each other. A client of another kind that waits for
    /// them the other way round can: PostgreSQL then ends one wait ([`ErrorKind::Deadlock`] when it
    /// is ours, with nothing left held). Without waiting connections they poll whole tries
    /// instead, never holding some keys while waiting for others.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] when a key is listed twice or there are more than 1,000; otherwise
    /// as for [`LockManager::try_lock`].
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// if let Some(guards) = locks.try_lock_all(["account/17", "account/42"])? {
    ///     // move money between the two accounts
    /// #   drop(guards);
    /// }
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn try_lock_all<K: Into<LockKey>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Option<Vec<LockGuard>>> {
        let keys = key_list(keys)?;
        self.try_all_once(&keys, Mode::Exclusive, self.shared().request_deadline())
    }

    /// Takes every one of `keys` exclusively, or none, waiting up to `timeout` for all of them
    /// to be free at once.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock_all`].
    pub fn try_lock_all_for<K: Into<LockKey>>(
        &self,
        keys: impl IntoIterator<Item = K>,
        timeout: Duration,
    ) -> Result<Option<Vec<LockGuard>>> {
        let keys = key_list(keys)?;
        self.all_wait(&keys, Some(deadline_in(timeout)))
    }

    /// Takes every one of `keys` exclusively, waiting for as long as any of them is held.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock_all`] and [`LockManager::lock`].
    pub fn lock_all<K: Into<LockKey>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<LockGuard>> {
        let keys = key_list(keys)?;
        wait_forever(self.all_wait(&keys, None))
    }

    /// The sessions that hold or wait for `key`, from `pg_locks` joined with
    /// `pg_stat_activity`: granted holders first, then waiters, each by pid. This manager's own
    /// session is among them when it holds the key.
    ///
    /// What a role sees: every session's locks, pid and application name; the client address
    /// and backend start only of sessions of its own role, unless it is a member of
    /// `pg_read_all_stats` (see [`Holder`]). One round trip on the manager's connection, bounded
    /// by the request timeout.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock`].
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// for holder in locks.holders("nightly-report")? {
    ///     println!("{} ({:?})", holder.pid(), holder.application_name());
    /// }
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn holders(&self, key: impl Into<LockKey>) -> Result<Vec<Holder>> {
        let key = key.into();
        let shared = self.shared();
        if !shared.link.is_online() {
            return Err(offline_error(&shared.link));
        }
        let call = plain_call(key, Mode::Exclusive, shared.request_deadline());
        match shared.round_trip_special(call, Special::Holders(key))? {
            Reply::Extra(extra) => Ok(extra.holders),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) fn try_fenced_once(
        &self,
        key: LockKey,
        deadline: Instant,
    ) -> Result<Option<LockGuard>> {
        let shared = self.shared();
        if !shared.link.is_online() {
            return Err(offline_error(&shared.link));
        }
        match shared
            .table
            .lock()
            .reserve(key, Mode::Exclusive, shared.max_locks)
        {
            Reservation::Reserved { .. } => {}
            Reservation::Conflict => return Ok(None),
            Reservation::Full => return Err(too_many()),
        }
        let reply = shared.round_trip_special(
            plain_call(key, Mode::Exclusive, deadline),
            Special::Fenced(key),
        );
        match reply {
            Ok(Reply::Extra(extra)) => match *extra {
                Extra {
                    lease: Some(lease),
                    token,
                    ..
                } => Ok(Some(LockGuard::fenced(
                    Arc::clone(shared),
                    key,
                    lease,
                    token,
                ))),
                _ => {
                    shared.unreserve(key, Mode::Exclusive);
                    Err(Error::new(
                        ErrorKind::Server,
                        "a fenced grant without its lease",
                    ))
                }
            },
            Ok(_) => {
                shared.unreserve(key, Mode::Exclusive);
                Ok(None)
            }
            Err(e) => {
                shared.unreserve(key, Mode::Exclusive);
                Err(e)
            }
        }
    }

    fn try_permit_once(
        &self,
        key: LockKey,
        permits: u32,
        deadline: Instant,
    ) -> Result<Option<LockGuard>> {
        let shared = self.shared();
        if !shared.link.is_online() {
            return Err(offline_error(&shared.link));
        }
        if shared.table.lock().len() >= shared.max_locks {
            return Err(too_many());
        }
        let reply = shared.round_trip_special(
            plain_call(key, Mode::Exclusive, deadline),
            Special::Permit { key, permits },
        )?;
        let Reply::Extra(extra) = reply else {
            return Ok(None);
        };
        let (Some(lease), Some(&slot)) = (extra.lease, extra.held.first()) else {
            return Err(Error::new(ErrorKind::Server, "a permit without its slot"));
        };
        // The server skipped the slots this session holds, so the slot is new to the table too.
        let reserved = shared
            .table
            .lock()
            .reserve(slot, Mode::Exclusive, usize::MAX);
        match reserved {
            Reservation::Reserved { .. } => Ok(Some(LockGuard::new(
                Arc::clone(shared),
                slot,
                Mode::Exclusive,
                lease,
            ))),
            // A thread of this manager is taking the slot's key itself, with `try_lock`: the
            // grant stacked on its hold. Give this one back.
            Reservation::Conflict | Reservation::Full => {
                shared.round_trip(Call {
                    op: Op::Unlock,
                    generation: lease.generation,
                    ..plain_call(slot, Mode::Exclusive, shared.request_deadline())
                })?;
                Ok(None)
            }
        }
    }

    pub(crate) fn try_all_once(
        &self,
        keys: &[LockKey],
        mode: Mode,
        deadline: Instant,
    ) -> Result<Option<Vec<LockGuard>>> {
        let shared = self.shared();
        let Some(&first) = keys.first() else {
            return Ok(Some(Vec::new()));
        };
        if !shared.link.is_online() {
            return Err(offline_error(&shared.link));
        }
        // All or nothing in the manager's table too.
        {
            let mut table = shared.table.lock();
            for (i, &key) in keys.iter().enumerate() {
                let failed = match table.reserve(key, mode, shared.max_locks) {
                    Reservation::Reserved { .. } => continue,
                    Reservation::Conflict => None,
                    Reservation::Full => Some(too_many()),
                };
                for &taken in &keys[..i] {
                    table.release(taken, mode, false);
                }
                return failed.map_or(Ok(None), Err);
            }
        }
        let unreserve = || {
            let mut table = shared.table.lock();
            for &key in keys {
                table.release(key, mode, false);
            }
        };
        let reply = shared.round_trip_special(
            plain_call(first, mode, deadline),
            Special::All {
                keys: keys.to_vec(),
                mode,
            },
        );
        match reply {
            Ok(Reply::Extra(extra)) => match extra.lease {
                Some(lease) => Ok(Some(
                    keys.iter()
                        .map(|&key| LockGuard::new(Arc::clone(shared), key, mode, lease.clone()))
                        .collect(),
                )),
                None => {
                    unreserve();
                    Err(Error::new(ErrorKind::Server, "a grant without its lease"))
                }
            },
            Ok(_) => {
                unreserve();
                Ok(None)
            }
            Err(e) => {
                unreserve();
                Err(e)
            }
        }
    }
}

/// The slot number of a semaphore's turnstile, the lock its waiters queue for (never a permit:
/// a semaphore has at most `MAX_PERMITS` slots).
pub(crate) const TURNSTILE_SLOT: u32 = 0x7fff_ffff;

/// The pause between two tries of the slots by the turnstile's holder: a freed permit is taken
/// within about this much plus a round trip, at one statement per pause and semaphore.
const TURNSTILE_PAUSE: Duration = Duration::from_micros(500);

fn plain_call(key: LockKey, mode: Mode, deadline: Instant) -> Call {
    Call {
        op: Op::TryLock,
        mode,
        key,
        generation: 0,
        sole_hold: false,
        deadline,
    }
}

fn check_permits(permits: u32) -> Result<()> {
    if permits == 0 || permits > MAX_PERMITS {
        return Err(Error::new(
            ErrorKind::Config,
            format!("a semaphore has 1 to {MAX_PERMITS} permits, not {permits}"),
        ));
    }
    Ok(())
}

fn key_list<K: Into<LockKey>>(keys: impl IntoIterator<Item = K>) -> Result<Vec<LockKey>> {
    let keys: Vec<LockKey> = keys.into_iter().map(Into::into).collect();
    if keys.len() > MAX_KEYS {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "at most {MAX_KEYS} keys are taken at once, not {}",
                keys.len()
            ),
        ));
    }
    let mut seen = HashSet::with_capacity(keys.len());
    if let Some(twice) = keys.iter().find(|k| !seen.insert(**k)) {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{twice} is listed twice: each key can be taken once"),
        ));
    }
    Ok(keys)
}

fn too_many() -> Error {
    Error::new(
        ErrorKind::TooManyLocks,
        "the lock manager already holds its maximum number of locks",
    )
}

fn unexpected(reply: &Reply) -> Error {
    Error::new(
        ErrorKind::Server,
        format!("the lock manager's worker gave an unexpected reply: {reply:?}"),
    )
}

/// A wait without a deadline only ends with a grant or an error.
fn wait_forever<T>(waited: Result<Option<T>>) -> Result<T> {
    waited?.ok_or_else(|| Error::new(ErrorKind::Timeout, "lock wait ended without a deadline"))
}

/// Names a list of keys in logs.
pub(crate) struct KeysOf<'a>(pub(crate) &'a [LockKey]);

impl std::fmt::Display for KeysOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, key) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{key}")?;
        }
        Ok(())
    }
}

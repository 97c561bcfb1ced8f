//! Semaphores: at most `permits` holders at once across every process and host, with no DDL.
//! Each permit is a slot, a lock of its own ([`LockKey::permit_slot`](crate::LockKey::permit_slot)); a try takes the first
//! free slot in one statement, skipping slots its own session holds. Waiters queue for the
//! semaphore's turnstile, a lock of its own, in PostgreSQL's lock queue; its holder alone tries
//! the slots. Built on the caller side's acquire and waiting paths.

use std::panic::Location;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::caller::acquire::{self, Wanted, poll_until};
use crate::caller::guard::{LockGuard, marked};
use crate::caller::handle::{LockManager, noted};
use crate::caller::shared::{Call, Shared};
use crate::caller::table::Reservation;
use crate::caller::waiting;
use crate::clock::deadline_in;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{IntoLockKey, LockKey};
use crate::mode::Mode;
use crate::protocol::reply::Reply;
use crate::protocol::request::{MAX_PERMITS, Op, Solo};

/// The slot number of a semaphore's turnstile, the lock its waiters queue for (never a permit:
/// a semaphore has at most [`MAX_PERMITS`] slots).
const TURNSTILE_SLOT: u32 = LockKey::TURNSTILE_SLOT;

/// The pause between two tries of the slots by the turnstile's holder: a freed permit is taken
/// within about this much plus a round trip, at one statement per pause and semaphore.
const TURNSTILE_PAUSE: Duration = Duration::from_micros(500);

/// [`TURNSTILE_PAUSE`] in transaction mode, where each try of the slots opens a connection to the
/// pooler and a transaction.
const TRANSACTION_TURNSTILE_PAUSE: Duration = Duration::from_millis(10);

impl LockManager {
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
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) when `permits` is 0 or more than 10,000; otherwise as for
    /// [`LockManager::try_lock`](crate::LockManager::try_lock).
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// // At most 4 exports at once, fleet-wide.
    /// if let Some(_permit) = locks.try_acquire_permit("exports", 4)? {
    ///     // export
    /// }
    /// # Ok::<(), distlock::Error>(())
    /// ```
    #[track_caller]
    pub fn try_acquire_permit(
        &self,
        key: impl IntoLockKey,
        permits: u32,
    ) -> Result<Option<LockGuard>> {
        let (key, name) = key.key_and_name();
        let deadline = self.shared().request_deadline();
        let taken =
            check_permits(permits).and_then(|()| try_permit(self.shared(), key, permits, deadline));
        noted(self.shared(), &taken, key, name);
        marked(self.shared(), taken, Location::caller())
    }

    /// Takes one of `permits` permits of the semaphore `key`, waiting up to `timeout` for one.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_acquire_permit`](crate::LockManager::try_acquire_permit).
    #[track_caller]
    pub fn try_acquire_permit_for(
        &self,
        key: impl IntoLockKey,
        permits: u32,
        timeout: Duration,
    ) -> Result<Option<LockGuard>> {
        let taken = self.wait_permit(key, permits, Some(deadline_in(timeout)));
        marked(self.shared(), taken, Location::caller())
    }

    /// Takes one of `permits` permits of the semaphore `key`, waiting for as long as all are held.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_acquire_permit`](crate::LockManager::try_acquire_permit) and [`LockManager::lock`](crate::LockManager::lock).
    #[track_caller]
    pub fn acquire_permit(&self, key: impl IntoLockKey, permits: u32) -> Result<LockGuard> {
        let taken = acquire::without_deadline(self.wait_permit(key, permits, None));
        marked(self.shared(), taken, Location::caller())
    }

    /// Waits for one of `permits` permits of `key` until `deadline` (`None`: no deadline).
    fn wait_permit(
        &self,
        key: impl IntoLockKey,
        permits: u32,
        deadline: Option<Instant>,
    ) -> Result<Option<LockGuard>> {
        let (key, name) = key.key_and_name();
        let taken = check_permits(permits)
            .and_then(|()| wait_permit(self.shared(), key, name, permits, deadline));
        noted(self.shared(), &taken, key, name);
        taken
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

/// One try of a free slot of the semaphore `key`.
fn try_permit(
    shared: &Arc<Shared>,
    key: LockKey,
    permits: u32,
    deadline: Instant,
) -> Result<Option<LockGuard>> {
    shared.check_online()?;
    if shared.held() >= shared.settings().max_locks {
        return Err(shared.too_many_locks());
    }
    if shared.settings().transactions {
        return try_permit_in_transaction(shared, key, permits, deadline);
    }
    let reply = shared.round_trip_solo(Solo::Permit { key, permits }, deadline)?;
    let grant = match reply {
        Reply::Grant(grant) => grant,
        Reply::Busy => {
            shared.link().counters().refused();
            return Ok(None);
        }
        other => return Err(Error::unexpected(&other)),
    };
    let Some(&slot) = grant.held.first() else {
        return Err(Error::unexpected(&grant));
    };
    // The server skipped the slots this session holds, so the slot is new to the table too:
    // only known now, it is reserved after the grant.
    match shared.reserve_all_unbounded(std::slice::from_ref(&slot), Mode::Exclusive) {
        Reservation::Reserved { .. } => Ok(Some(LockGuard::new(
            Arc::clone(shared),
            slot,
            Mode::Exclusive,
            grant.lease.clone(),
            None,
            shared.request_deadline(),
        ))),
        // A thread of this manager is taking the slot's key itself, with `try_lock`: the
        // grant stacked on its hold. Give this one back.
        Reservation::Conflict | Reservation::Full => {
            shared.round_trip(Call {
                op: Op::Unlock,
                mode: Mode::Exclusive,
                key: slot,
                generation: grant.lease.generation,
                sole_hold: false,
                deadline: shared.request_deadline(),
            })?;
            Ok(None)
        }
    }
}

/// Transaction mode: one try of a free slot in a lock transaction of its own (see
/// [`crate::Builder::transaction_pooler`]); the slot is reserved in this manager's table too once
/// the server has said which it is.
fn try_permit_in_transaction(
    shared: &Arc<Shared>,
    key: LockKey,
    permits: u32,
    deadline: Instant,
) -> Result<Option<LockGuard>> {
    let taken = acquire::lock_transaction(shared, deadline)?;
    let Some(conn) = taken.conn() else {
        return Ok(None);
    };
    let Some(permit) = try_permit(conn, key, permits, deadline)? else {
        return Ok(None);
    };
    match shared.reserve_all_unbounded(std::slice::from_ref(&permit.key()), Mode::Exclusive) {
        Reservation::Reserved { .. } => Ok(Some(permit.borrowed_from(shared, &taken))),
        // A thread of this manager holds that slot's key itself: dropping the permit gives
        // this grant back.
        Reservation::Conflict | Reservation::Full => Ok(None),
    }
}

/// A permit within `deadline`. With waiting connections, waiters of the semaphore queue in
/// arrival order for its turnstile in PostgreSQL's lock queue; the one holding it alone tries
/// the slots, a try every [`TURNSTILE_PAUSE`], until one is free, then passes the turnstile
/// on. Without, every waiter polls.
fn wait_permit(
    shared: &Arc<Shared>,
    key: LockKey,
    name: Option<&str>,
    permits: u32,
    deadline: Option<Instant>,
) -> Result<Option<LockGuard>> {
    waiting::counted(shared, || {
        wait_permit_uncounted(shared, key, name, permits, deadline)
    })
}

/// [`wait_permit`], not counted.
fn wait_permit_uncounted(
    shared: &Arc<Shared>,
    key: LockKey,
    name: Option<&str>,
    permits: u32,
    deadline: Option<Instant>,
) -> Result<Option<LockGuard>> {
    if shared.waits().is_none() {
        return poll_until(shared, deadline, &key, |d| {
            try_permit(shared, key, permits, d)
        });
    }
    match try_permit(shared, key, permits, shared.request_deadline()) {
        Ok(Some(permit)) => return Ok(Some(permit)),
        Ok(None) => {}
        Err(e) if e.is_transient() => {}
        Err(e) => return Err(e),
    }
    let turnstile = Wanted::One(key.permit_slot(TURNSTILE_SLOT), Mode::Exclusive);
    let Some(turn) = waiting::wait_uncounted(shared, turnstile, name, deadline)? else {
        return Ok(None);
    };
    let permit = loop {
        let failing = match try_permit(shared, key, permits, shared.request_deadline()) {
            Ok(Some(permit)) => break Ok(Some(permit)),
            Ok(None) => None,
            Err(e) if e.is_transient() => Some(e),
            Err(e) => break Err(e),
        };
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break failing.map_or(Ok(None), Err);
        }
        // In transaction mode each try opens a transaction of its own: fewer of them.
        let pause = if shared.settings().transactions {
            TRANSACTION_TURNSTILE_PAUSE
        } else {
            TURNSTILE_PAUSE
        };
        let until = acquire::pause_end(pause, deadline);
        std::thread::sleep(until.saturating_duration_since(now));
    };
    drop(turn);
    permit
}

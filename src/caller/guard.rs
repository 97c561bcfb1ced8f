//! `LockGuard`: a held lock, released when the guard is dropped or unlocked.

use std::fmt;
use std::panic::Location;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;

use crate::caller::held_watch::HeldWatch;
use crate::caller::pool::Taken;
use crate::caller::shared::{Call, Shared};
use crate::clock::deadline_in;
use crate::error::Result;
use crate::key::LockKey;
use crate::mode::Mode;
use crate::protocol::link::Lease;
use crate::protocol::reply::Reply;
use crate::protocol::request::Op;
use crate::stats::Counters;

/// A held advisory lock.
///
/// The lock is released when the guard is dropped: when `drop` returns, the server has released it
/// (or the connection is gone, which releases it too), so another process may take it at once.
/// `drop` ignores errors and never waits longer than the manager's request timeout;
/// [`LockGuard::unlock`](crate::LockGuard::unlock) does the same and reports them.
///
/// The guard owns a handle to its manager, so it has no lifetime, may be sent to another thread, and
/// keeps the manager's connection open while it lives.
///
/// # Lost locks
///
/// A session advisory lock lives exactly as long as the connection that took it. If that connection
/// fails — the backend is killed, the server restarts, the network drops, or the backend stalls
/// past the request timeout — the server releases the lock (or the manager makes sure it will), and
/// another process may take it. The guard then reports the loss: [`LockGuard::is_lost`](crate::LockGuard::is_lost) turns true
/// and [`LockGuard::lost`](crate::LockGuard::lost) becomes ready. A loss is noticed within one heartbeat plus a round trip
/// (`Builder::heartbeat`), or at the request timeout for a stalled connection. Releasing a lost
/// guard never touches the manager's newer connection, which may hold the same key again.
///
/// A lost guard still reserves its key in its manager until it is dropped: the server no longer
/// holds the lock, but the thread holding the guard may still be inside its critical section, so
/// other threads of the manager get `Ok(None)` from `try_lock` and wait in `lock`, as they would
/// for a live guard. Drop the lost guard (or [`LockGuard::unlock`](crate::LockGuard::unlock) it, which reports
/// [`crate::ErrorKind::LockLost`]) before taking the key again.
///
/// A lock is a lease, not a guarantee: between a check and the next step, the connection can fail.
/// [`LockGuard::ensure_held`](crate::LockGuard::ensure_held) narrows that window to one round trip before an irreversible step; it
/// cannot close it. Where two holders at once would corrupt data, also make the protected resource
/// reject stale writers (fencing).
#[must_use = "if unused the lock will be released immediately"]
pub struct LockGuard {
    /// The manager the lock was taken through.
    shared: Arc<Shared>,
    /// The lock.
    key: LockKey,
    /// Exclusive or shared.
    mode: Mode,
    /// The connection generation that granted the lock, and its loss signal.
    lease: Lease,
    /// Set once the release has been sent, so that `drop` after `unlock` does nothing.
    released: bool,
    /// The fencing token of a fenced grant.
    token: Option<u64>,
    /// For a lock granted on a waiting connection: its reservation in the manager's own table
    /// and the connection (see [`Borrowed`]).
    borrowed: Option<Box<Borrowed>>,
    /// The request deadline of the call that took the lock: when it began, plus the request
    /// timeout. Its hold time runs from here to the release's own request deadline (the same
    /// timeout later), so neither end needs a clock read or arithmetic of its own.
    since: Instant,
    /// Watched for being held too long ([`crate::Builder::warn_held_after`]): by which watch, as
    /// which guard.
    watched: Option<(Arc<HeldWatch>, u64)>,
}

/// What a guard granted on a waiting connection keeps besides its lock: its key's reservation in
/// the manager's own table (given back when the guard is gone, after its release) and the waiting
/// connection (back in the pool when every guard of the wait is gone).
struct Borrowed {
    /// The manager the caller called.
    main: Arc<Shared>,
    /// The waiting connection that holds the lock.
    _conn: Arc<Taken<Arc<Shared>>>,
}

impl LockGuard {
    /// A guard of the lock `key`, held in `mode` under `lease`, asked for by a call whose request
    /// deadline was `since` (see the field); `token` for a fenced grant.
    pub(crate) fn new(
        shared: Arc<Shared>,
        key: LockKey,
        mode: Mode,
        lease: Lease,
        token: Option<u64>,
        since: Instant,
    ) -> LockGuard {
        shared.link().counters().granted();
        LockGuard {
            shared,
            key,
            mode,
            lease,
            released: false,
            token,
            borrowed: None,
            since,
            watched: None,
        }
    }

    /// This guard, taken at `at` in the caller's code: watched from now on when the manager
    /// warns of locks held too long.
    pub(crate) fn taken_at(mut self, at: &'static Location<'static>) -> LockGuard {
        let main = match &self.borrowed {
            Some(borrowed) => &borrowed.main,
            None => &self.shared,
        };
        if let Some(watch) = main.held_watch() {
            let taken = self
                .since
                .checked_sub(self.shared.request_timeout())
                .unwrap_or(self.since);
            let id = watch.watch(self.key, self.mode, at, taken);
            self.watched = Some((Arc::clone(watch), id));
        }
        self
    }

    /// The counters of the manager the caller called (for a guard of a waiting connection, not
    /// that connection's).
    fn counters(&self) -> &Counters {
        match &self.borrowed {
            Some(borrowed) => borrowed.main.link().counters(),
            None => self.shared.link().counters(),
        }
    }

    /// This guard, with the fencing token drawn for its grant.
    pub(crate) fn with_token(mut self, token: Option<u64>) -> LockGuard {
        self.token = token;
        self
    }

    /// This guard, granted on `conn`, a waiting connection (or lock transaction) of `main`.
    pub(crate) fn borrowed_from(
        mut self,
        main: &Arc<Shared>,
        conn: &Arc<Taken<Arc<Shared>>>,
    ) -> LockGuard {
        main.link().counters().granted();
        self.borrowed = Some(Box::new(Borrowed {
            main: Arc::clone(main),
            _conn: Arc::clone(conn),
        }));
        self
    }

    /// The fencing token of this grant: `Some` only for a guard from a fenced call
    /// ([`crate::LockManager::try_lock_fenced`] and friends).
    ///
    /// A token is strictly greater than every token issued before it for the same key on the same
    /// cluster — by any manager, in any process, across reconnects and server crashes — because
    /// every token comes from one sequence, drawn after the lock was granted, in the same
    /// statement. Pass it to the resource the lock protects, and have that resource refuse any
    /// write carrying a token lower than the highest it has seen: a holder that lost the lock
    /// while paused is then refused, even if it acts long after. See the crate documentation
    /// ("Fencing tokens") for what holds after a failover.
    pub fn fencing_token(&self) -> Option<u64> {
        self.token
    }

    /// True once the connection that holds this lock has been lost: the server has released the lock
    /// (or will, as soon as a stalled backend wakes), and someone else may hold it now.
    ///
    /// Never blocks.
    pub fn is_lost(&self) -> bool {
        // Generations only advance past a lost one, so "not the current generation" is "lost" — and
        // an atomic load is cheaper than polling the loss channel.
        !self
            .shared
            .link()
            .generations
            .is_current(self.lease.generation)
    }

    /// A channel that becomes ready (disconnected) when the lock is lost, to `select!` on beside the
    /// holder's own work. Nothing is ever sent on it; receiving returns `Err` once it is lost.
    ///
    /// ```no_run
    /// use distlock::crossbeam_channel::{select, tick};
    /// use std::time::Duration;
    ///
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// let guard = locks.lock("leader")?;
    /// let work = tick(Duration::from_secs(1));
    /// loop {
    ///     select! {
    ///         recv(guard.lost()) -> _ => {
    ///             eprintln!("leadership lost; stepping down");
    ///             break;
    ///         }
    ///         recv(work) -> _ => { /* one step of the leader's duty */ }
    ///     }
    /// }
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn lost(&self) -> &Receiver<()> {
        &self.lease.lost
    }

    /// Proves, with one round trip, that the session holding this lock is alive and holds it
    /// (`pg_locks` shows it granted to this very backend) — for use right before an irreversible side
    /// effect.
    ///
    /// Blocks for one round trip, at most the request timeout. What it proves holds at the moment the
    /// server answered; see "Lost locks" above for why that is a lease and not a guarantee.
    ///
    /// # Errors
    ///
    /// [`crate::ErrorKind::LockLost`] when the lock is lost or not held, [`crate::ErrorKind::Timeout`],
    /// [`crate::ErrorKind::ConnectionLost`] or [`crate::ErrorKind::Offline`] when the proof could not
    /// be had (treat the lock as lost), [`crate::ErrorKind::Shutdown`].
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// let guard = locks.lock("payouts")?;
    /// // ... prepare the batch ...
    /// guard.ensure_held()?; // still ours, a round trip ago
    /// // ... send the money ...
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn ensure_held(&self) -> Result<()> {
        if self.is_lost() {
            return Err(self
                .shared
                .link()
                .generations
                .lock_lost_error(self.lease.generation));
        }
        let deadline = deadline_in(self.shared.request_timeout());
        let reply = self.shared.round_trip(Call {
            op: Op::Check,
            mode: self.mode,
            key: self.key,
            generation: self.lease.generation,
            // A check changes nothing, so it can always be read back after a failed batch.
            sole_hold: true,
            deadline,
        })?;
        match reply {
            Reply::Held if !self.is_lost() => Ok(()),
            _ => Err(self
                .shared
                .link()
                .generations
                .lock_lost_error(self.lease.generation)),
        }
    }

    /// The key this guard holds (for a semaphore permit, the key of its slot).
    pub fn key(&self) -> LockKey {
        self.key
    }

    /// True for a shared lock, false for an exclusive one.
    pub fn is_shared(&self) -> bool {
        self.mode == Mode::Shared
    }

    /// Releases the lock now and reports whether the server confirmed it.
    ///
    /// Blocks for one round trip, at most the manager's request timeout. Whatever the outcome, the
    /// guard is gone and this manager's threads may take the key again.
    ///
    /// # Errors
    ///
    /// [`crate::ErrorKind::LockLost`] when the lock was lost (its connection ended, so the server had
    /// released it already and someone else may have taken it since; no round trip is made),
    /// [`crate::ErrorKind::Timeout`] when the worker did not answer in time (the release still runs when the
    /// worker gets to it), [`crate::ErrorKind::ConnectionLost`] when the connection failed (which releases
    /// the lock on the server), [`crate::ErrorKind::Shutdown`] when the worker has stopped.
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// let guard = locks.lock("leader")?;
    /// // ... lead ...
    /// if let Err(e) = guard.unlock() {
    ///     eprintln!("we may not have held the lock to the end: {e}");
    /// }
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn unlock(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        if self.is_lost() {
            // The server released it with the connection; a newer connection must not be touched.
            self.counters().lost();
            self.give_back();
            return Err(self
                .shared
                .link()
                .generations
                .lock_lost_error(self.lease.generation));
        }
        let deadline = deadline_in(self.shared.request_timeout());
        // Deadline to deadline: the clock read for the release's dates it (none more here).
        self.counters()
            .held(deadline.saturating_duration_since(self.since));
        let sole_hold = self.shared.sole_hold(self.key, self.mode);
        let outcome = self.shared.round_trip(Call {
            op: Op::Unlock,
            mode: self.mode,
            key: self.key,
            generation: self.lease.generation,
            sole_hold,
            deadline,
        });
        // Forget the hold only now: a local waiter woken by this finds the key free on the server too.
        // On a timeout the unlock is still queued ahead of any later request for the key.
        self.give_back();
        match outcome? {
            Reply::Released => Ok(()),
            _ => Err(self
                .shared
                .link()
                .generations
                .lock_lost_error(self.lease.generation)),
        }
    }
}

impl LockGuard {
    /// Gives the hold back in the table of the manager that granted it and, for a guard of a
    /// waiting connection, in the table of the manager the caller called.
    fn give_back(&mut self) {
        if let Some((watch, id)) = self.watched.take() {
            watch.released(id);
        }
        let key = std::slice::from_ref(&self.key);
        self.shared.release_holds(key, self.mode);
        if let Some(borrowed) = self.borrowed.take() {
            borrowed.main.release_holds(key, self.mode);
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            log::warn!("distlock: releasing {} on drop failed: {e}", self.key);
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .field("shared", &self.is_shared())
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

/// `taken`, its guards marked as taken at `at` when the manager `shared` watches for locks held
/// too long; as it is otherwise (one branch on the request path).
#[inline(always)]
pub(crate) fn marked<T: TakenAt>(shared: &Shared, taken: T, at: &'static Location<'static>) -> T {
    if shared.held_watch().is_none() {
        taken
    } else {
        taken.taken_at(at)
    }
}

/// What the public calls return, marked with the place in the caller's code that took each guard
/// (see [`LockGuard::taken_at`]).
pub(crate) trait TakenAt {
    /// Marks every guard in it as taken at `at`.
    fn taken_at(self, at: &'static Location<'static>) -> Self;
}

impl TakenAt for LockGuard {
    #[inline]
    fn taken_at(self, at: &'static Location<'static>) -> Self {
        LockGuard::taken_at(self, at)
    }
}

impl<T: TakenAt> TakenAt for Option<T> {
    #[inline]
    fn taken_at(self, at: &'static Location<'static>) -> Self {
        self.map(|t| t.taken_at(at))
    }
}

impl<T: TakenAt> TakenAt for Vec<T> {
    fn taken_at(self, at: &'static Location<'static>) -> Self {
        self.into_iter().map(|t| t.taken_at(at)).collect()
    }
}

impl<T: TakenAt> TakenAt for Result<T> {
    #[inline]
    fn taken_at(self, at: &'static Location<'static>) -> Self {
        self.map(|t| t.taken_at(at))
    }
}

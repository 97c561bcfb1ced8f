//! `LockManager` and its `Builder`: the handle callers use.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use object_pool::Pool;
use parking_lot::{Condvar, Mutex};

use crate::backoff::Backoff;
use crate::clock::deadline_in;
use crate::connect::{self, Connector};
use crate::error::{Error, ErrorKind, Result};
use crate::guard::LockGuard;
use crate::key::LockKey;
use crate::link::Link;
use crate::monitor;
use crate::reply::{Reply, ReplySlot, SPIN_HAND_OVER_TURNS};
use crate::shared::{Call, Shared, WakeOnDrop};
use crate::special::Special;
use crate::sql::ServerKeepalive;
use crate::sql::{Mode, Op};
use crate::table::{Reservation, Table};
use crate::tls::{SslMode, Tls};
use crate::waiting::{self, WaitHold, WaitPool};
use crate::worker::{self, Spec};

const DEFAULT_APPLICATION_NAME: &str = "distlock";
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
const DEFAULT_MAX_LOCKS: usize = 1024;
const DEFAULT_DEAD_HOLDER_TIMEOUT: Duration = Duration::from_secs(12);
const DEFAULT_WAIT_CONNECTIONS: usize = 4;
/// Requests that may queue for the worker before senders wait (within their own bound).
const QUEUE_CAPACITY: usize = 1024;
/// Reply slots made up front; the pool grows to the number of calls in flight at once.
const INITIAL_REPLY_SLOTS: usize = 16;
/// The first pause between two tries of a lock someone else holds, and the default largest one.
const FIRST_RETRY: Duration = Duration::from_millis(1);
const DEFAULT_MAX_RETRY_INTERVAL: Duration = Duration::from_millis(8);
/// How long a lone caller spins for its reply with `Builder::spin_wait`: about a millisecond, a few
/// round trips to a nearby server.
const SPIN_TURNS: u32 = 20_000;
/// The shortest heartbeat; shorter settings are raised to it.
const MIN_HEARTBEAT: Duration = Duration::from_millis(1);
/// The largest TCP user timeout Linux accepts (`i32::MAX` milliseconds).
const MAX_TCP_USER_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// A handle to one connection's worth of advisory locks.
///
/// A `LockManager` owns one PostgreSQL connection (one session) through a worker thread. It is cheap
/// to clone; clones share the worker, the connection and the table of held keys, and every thread of
/// the process may use one. Threads sharing a manager exclude each other exactly as separate processes
/// do, although PostgreSQL itself would let one session take the same lock twice.
///
/// The connection stays open while any clone or any [`LockGuard`] is alive; when the last of them is
/// dropped the worker finishes the request it is running, closes the connection, and the server
/// releases anything the session still held. A thread blocked in a call holds a handle too, so
/// waiters and in-flight requests always finish (or time out) normally before that happens.
///
/// If the connection fails, the manager reports the locks it held as lost and reconnects by itself;
/// see the crate docs' "Failure model".
#[derive(Clone)]
pub struct LockManager {
    shared: Arc<Shared>,
}

impl LockManager {
    /// Connects with default settings; `params` is a libpq `key=value` string or a `postgres://`
    /// URL.
    ///
    /// Blocks until the connection is ready or the connect timeout (5 s) has passed. Equivalent to
    /// `LockManager::builder().connect(params)`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for parameters that do not parse, [`ErrorKind::Connect`] when the server
    /// refuses or cannot be reached (wrong host, port, password or database), [`ErrorKind::Timeout`]
    /// when it does not answer in time.
    ///
    /// ```no_run
    /// use distlock::{ErrorKind, LockManager};
    ///
    /// let locks = LockManager::connect("host=localhost user=postgres")?;
    /// let err = LockManager::connect("host=localhost port=notaport").unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Config);
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn connect(params: &str) -> Result<LockManager> {
        Builder::default().connect(params)
    }

    /// A builder for a manager with non-default settings.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Takes the exclusive lock on `key` if nobody holds it, without waiting for holders.
    ///
    /// Returns `Ok(None)` when another session, or another thread of this manager, holds it
    /// (exclusively or shared). Blocks for one round trip to the server, at most the request timeout.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Timeout`] when the worker did not answer within the request timeout (a grant that
    /// arrives later is released at once), [`ErrorKind::Offline`] at once while the manager is
    /// reconnecting, [`ErrorKind::TooManyLocks`] past [`Builder::max_locks`],
    /// [`ErrorKind::ConnectionLost`] when the connection failed during the call,
    /// [`ErrorKind::Server`] when the server rejected the statement, [`ErrorKind::Shutdown`] when the
    /// worker has stopped.
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// match locks.try_lock("nightly-report")? {
    ///     Some(_guard) => { /* we are the only one; the lock is released when _guard drops */ }
    ///     None => println!("someone else is running it"),
    /// }
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn try_lock(&self, key: impl Into<LockKey>) -> Result<Option<LockGuard>> {
        self.try_once(key.into(), Mode::Exclusive, self.shared.request_deadline())
    }

    /// Takes the exclusive lock on `key`, waiting up to `timeout` for its holders to release it.
    ///
    /// Tries once on the manager's connection; if the lock is held, waits in PostgreSQL's own lock
    /// queue on one of the manager's waiting connections ([`Builder::wait_connections`]), where
    /// waiters from every process and host are served in arrival order and a release reaches the
    /// next waiter at once (measured: see the README's Performance section); the server ends the
    /// wait at the deadline (`lock_timeout`), and a grant that races the timeout is still handed
    /// out, never leaked. Threads of this manager wait for each other's holds locally first. With
    /// no waiting connections, it polls instead, with capped exponential backoff and jitter (1 ms
    /// doubling up to [`Builder::max_retry_interval`], 8 ms by default), and at once when a guard
    /// of this manager releases a hold. Returns `Ok(None)` if the lock was still held at the
    /// deadline; it returns within a few milliseconds of it. The first try always runs to completion
    /// (bounded by the request timeout), so a zero `timeout` behaves like [`LockManager::try_lock`].
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock`], except that transient failures ([`Error::is_transient`]:
    /// a reconnect in progress, a lost connection, a stalled worker) do not end the wait: it keeps
    /// trying until the deadline, and returns the latest such error if the last try failed with it.
    /// [`ErrorKind::Deadlock`] when PostgreSQL broke a deadlock by ending this wait (possible only
    /// when other clients also wait for locks this manager holds).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// let Some(guard) = locks.try_lock_for("migrations", Duration::from_secs(30))? else {
    ///     return Err("another deploy held the migration lock for 30 s".into());
    /// };
    /// // ... migrate ...
    /// guard.unlock()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn try_lock_for(
        &self,
        key: impl Into<LockKey>,
        timeout: Duration,
    ) -> Result<Option<LockGuard>> {
        self.wait_for(key.into(), Mode::Exclusive, Some(deadline_in(timeout)))
    }

    /// Takes the exclusive lock on `key`, waiting for as long as it takes.
    ///
    /// Like `Mutex::lock`: it returns only with the lock or an error. It waits as
    /// [`LockManager::try_lock_for`] does (in PostgreSQL's lock queue, in arrival order), without
    /// a deadline.
    ///
    /// A guard of this manager whose lock was lost still reserves its key until it is dropped (its
    /// holder may still be at work), so a `lock` of that key waits for the drop, however long
    /// that takes; see [`LockGuard`]'s "Lost locks".
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock`], except that transient failures ([`Error::is_transient`]) do
    /// not end the wait: it waits through reconnects for as long as it takes. Any other error ends it.
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// let guard = locks.lock(42_i64)?;
    /// assert_eq!(guard.key(), distlock::LockKey::id(42));
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn lock(&self, key: impl Into<LockKey>) -> Result<LockGuard> {
        self.wait_without_deadline(key.into(), Mode::Exclusive)
    }

    /// Takes a shared lock on `key` unless someone holds it exclusively.
    ///
    /// Any number of sessions and threads may hold a key shared at once; an exclusive lock waits for
    /// all of them. Blocks and fails as [`LockManager::try_lock`] does.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock`].
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// let a = locks.try_lock_shared("schema")?.expect("no exclusive holder");
    /// let b = locks.try_lock_shared("schema")?.expect("shared holders coexist");
    /// assert!(locks.try_lock("schema")?.is_none());
    /// # drop((a, b));
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn try_lock_shared(&self, key: impl Into<LockKey>) -> Result<Option<LockGuard>> {
        self.try_once(key.into(), Mode::Shared, self.shared.request_deadline())
    }

    /// Takes a shared lock on `key`, waiting up to `timeout` for an exclusive holder to leave.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock`].
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// if locks.try_lock_shared_for("schema", Duration::from_millis(500))?.is_none() {
    ///     println!("a migration holds the schema");
    /// }
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn try_lock_shared_for(
        &self,
        key: impl Into<LockKey>,
        timeout: Duration,
    ) -> Result<Option<LockGuard>> {
        self.wait_for(key.into(), Mode::Shared, Some(deadline_in(timeout)))
    }

    /// Takes a shared lock on `key`, waiting for as long as an exclusive holder keeps it.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::lock`].
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// let _reading = locks.lock_shared("schema")?;
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn lock_shared(&self, key: impl Into<LockKey>) -> Result<LockGuard> {
        self.wait_without_deadline(key.into(), Mode::Shared)
    }

    /// `wait_for` with no deadline, which only ends with a guard or an error.
    fn wait_without_deadline(&self, key: LockKey, mode: Mode) -> Result<LockGuard> {
        self.wait_for(key, mode, None)?
            .ok_or_else(|| Error::new(ErrorKind::Timeout, "lock wait ended without a deadline"))
    }

    /// One try: the local table first, then (if free locally) the server.
    fn try_once(&self, key: LockKey, mode: Mode, deadline: Instant) -> Result<Option<LockGuard>> {
        let shared = &self.shared;
        if !shared.link.is_online() {
            return Err(offline_error(&shared.link));
        }
        let reserved = shared.table.lock().reserve(key, mode, shared.max_locks);
        let sole_hold = match reserved {
            Reservation::Reserved { sole } => sole,
            Reservation::Conflict => return Ok(None),
            Reservation::Full => {
                return Err(Error::new(
                    ErrorKind::TooManyLocks,
                    "the lock manager already holds its maximum number of locks",
                ));
            }
        };
        match shared.round_trip(Call {
            op: Op::TryLock,
            mode,
            key,
            generation: 0,
            sole_hold,
            deadline,
        }) {
            Ok(Reply::Granted(lease)) => {
                Ok(Some(LockGuard::new(Arc::clone(shared), key, mode, lease)))
            }
            Ok(_) => {
                shared.unreserve(key, mode);
                Ok(None)
            }
            // On a timeout the request may still run: the worker then finds nobody waiting and
            // releases the grant itself, before any later request for the key (the queue is FIFO).
            Err(e) => {
                shared.unreserve(key, mode);
                Err(e)
            }
        }
    }

    /// Tries until granted or `deadline` (`None`: no deadline).
    fn wait_for(
        &self,
        key: LockKey,
        mode: Mode,
        deadline: Option<Instant>,
    ) -> Result<Option<LockGuard>> {
        if self.shared.waits.is_some() {
            return Ok(self
                .wait_in_queue(&[key], mode, false, deadline)?
                .and_then(|mut guards| guards.pop()));
        }
        self.wait_until(deadline, &key, |try_deadline| {
            self.try_once(key, mode, try_deadline)
        })
    }

    /// Makes `attempt` (one try, bounded by the deadline it is given) until it grants or
    /// `deadline` (`None`: no deadline) passes, with the backoff of `try_lock_for`, at once when
    /// a guard of this manager gives a hold back. `what` names the lock in logs.
    pub(crate) fn wait_until<T>(
        &self,
        deadline: Option<Instant>,
        what: &dyn fmt::Display,
        mut attempt: impl FnMut(Instant) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let shared = &self.shared;
        let mut backoff = Backoff::new(FIRST_RETRY, shared.max_retry_interval);
        // The first try may use the whole request timeout, so that a zero timeout still tries once.
        let mut try_deadline = shared.request_deadline();
        let mut cut_by_caller = false;
        // The transient failure of the latest try, if it failed: at the deadline the caller learns
        // that, rather than an `Ok(None)` that would claim someone else holds the lock.
        let mut failing: Option<Error> = None;
        loop {
            let seen = shared.table.lock().releases();
            match attempt(try_deadline) {
                Ok(Some(granted)) => return Ok(Some(granted)),
                Ok(None) => failing = None,
                // A try cut short by the caller's own deadline (not by the request timeout) means
                // "not acquired in time"; a grant that arrives later is released by the worker.
                Err(e) if e.is_timeout() && cut_by_caller => {
                    return failing.map_or(Ok(None), Err);
                }
                // A lost connection, a reconnect in progress or a stalled worker may pass: keep
                // waiting, within the caller's deadline.
                Err(e) if e.is_transient() => {
                    log::debug!("distlock: waiting for {what} through: {e}");
                    failing = Some(e);
                }
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return failing.map_or(Ok(None), Err);
            }
            let mut until = deadline_in(backoff.next_pause());
            if let Some(d) = deadline {
                until = until.min(d);
            }
            // Sleep until the pause ends or a guard of this manager gives a hold back.
            let mut table = shared.table.lock();
            while table.releases() == seen {
                if shared.released.wait_until(&mut table, until).timed_out() {
                    break;
                }
            }
            drop(table);
            // A try in flight at the caller's deadline is abandoned (and a late grant released), so
            // the caller gets its answer on time even from a busy worker.
            let request_deadline = shared.request_deadline();
            (try_deadline, cut_by_caller) = match deadline {
                Some(d) if d < request_deadline => (d.max(Instant::now()), true),
                _ => (request_deadline, false),
            };
        }
    }
}

impl LockManager {
    /// Waits for every one of `keys` in PostgreSQL's lock queue on a waiting connection (see
    /// `crate::waiting`), after one try on the manager's own; `fenced`: one key, with a token.
    /// Only for a manager with waiting connections.
    pub(crate) fn wait_in_queue(
        &self,
        keys: &[LockKey],
        mode: Mode,
        fenced: bool,
        deadline: Option<Instant>,
    ) -> Result<Option<Vec<LockGuard>>> {
        let Some(pool) = &self.shared.waits else {
            return Err(Error::new(ErrorKind::Config, "no waiting connections"));
        };
        let first = match keys {
            [key] if fenced => self.try_lock_fenced(*key).map(|g| g.map(|g| vec![g])),
            [key] => self
                .try_once(*key, mode, self.shared.request_deadline())
                .map(|g| g.map(|g| vec![g])),
            _ => self.try_lock_all(keys.iter().copied()),
        };
        let failing = match first {
            Ok(Some(guards)) => return Ok(Some(guards)),
            Ok(None) => None,
            Err(e) if e.is_transient() => Some(e),
            Err(e) => return Err(e),
        };
        // Reserved in this manager's table for the whole wait, as a try reserves: threads of this
        // manager exclude each other here (lost guards included) before anyone queues.
        if !self.reserve_all_until(keys, mode, deadline)? {
            return failing.map_or(Ok(None), Err);
        }
        let result = self.queue_for(pool, keys, mode, fenced, deadline, failing);
        if !matches!(result, Queued::Done(Ok(Some(_)))) {
            let mut table = self.shared.table.lock();
            for &key in keys {
                table.release(key, mode, false);
            }
        }
        match result {
            Queued::Done(result) => result,
            // No waiting connection can be opened (the server's connection limit, say): poll on
            // the manager's own connection instead, which is still there.
            Queued::Poll => match (keys, fenced) {
                ([key], false) => {
                    let key = *key;
                    Ok(self
                        .wait_until(deadline, &key, |d| self.try_once(key, mode, d))?
                        .map(|guard| vec![guard]))
                }
                ([key], true) => {
                    let key = *key;
                    Ok(self
                        .wait_until(deadline, &key, |d| self.try_fenced_once(key, d))?
                        .map(|guard| vec![guard]))
                }
                _ => {
                    let what = crate::compound::KeysOf(keys);
                    self.wait_until(deadline, &what, |d| self.try_all_once(keys, mode, d))
                }
            },
        }
    }

    /// Reserves every one of `keys` in this manager's table, waiting (until `deadline`) for its
    /// other threads to give back holds in the way. `false` at the deadline.
    fn reserve_all_until(
        &self,
        keys: &[LockKey],
        mode: Mode,
        deadline: Option<Instant>,
    ) -> Result<bool> {
        let shared = &self.shared;
        let mut table = shared.table.lock();
        loop {
            let mut conflict = false;
            for (i, &key) in keys.iter().enumerate() {
                match table.reserve(key, mode, shared.max_locks) {
                    Reservation::Reserved { .. } => continue,
                    Reservation::Conflict => conflict = true,
                    Reservation::Full => {
                        for &taken in &keys[..i] {
                            table.release(taken, mode, false);
                        }
                        return Err(Error::new(
                            ErrorKind::TooManyLocks,
                            "the lock manager already holds its maximum number of locks",
                        ));
                    }
                }
                for &taken in &keys[..i] {
                    table.release(taken, mode, false);
                }
                break;
            }
            if !conflict {
                return Ok(true);
            }
            let timed_out = match deadline {
                Some(d) => shared.released.wait_until(&mut table, d).timed_out(),
                None => {
                    shared.released.wait(&mut table);
                    false
                }
            };
            if timed_out {
                return Ok(false);
            }
        }
    }

    /// The queue wait of [`LockManager::wait_in_queue`], keys reserved.
    fn queue_for(
        &self,
        pool: &Arc<WaitPool>,
        keys: &[LockKey],
        mode: Mode,
        fenced: bool,
        deadline: Option<Instant>,
        failing: Option<Error>,
    ) -> Queued {
        let mut failing = failing;
        let mut backoff = Backoff::new(FIRST_RETRY, self.shared.max_retry_interval);
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Queued::Done(failing.map_or(Ok(None), Err));
            }
            let waiter = match pool.take(deadline) {
                Ok(Some(waiter)) => Arc::new(waiter),
                Ok(None) => return Queued::Done(failing.map_or(Ok(None), Err)),
                Err(e) if waiting::fails_everywhere(&e) => return Queued::Done(Err(e)),
                Err(e) => {
                    log::warn!("distlock: waiting by polling: no waiting connection: {e}");
                    return Queued::Poll;
                }
            };
            let Some(manager) = waiter.manager() else {
                return Queued::Poll;
            };
            match manager.wait_here(keys, mode, fenced, deadline) {
                Ok(Some(mut guards)) => {
                    for guard in &mut guards {
                        guard.keep_waiter(WaitHold {
                            main: Arc::clone(&self.shared),
                            key: guard.key(),
                            mode,
                            _waiter: Arc::clone(&waiter),
                        });
                    }
                    return Queued::Done(Ok(Some(guards)));
                }
                Ok(None) => return Queued::Done(Ok(None)),
                // That connection failed (or is reconnecting): wait again on another, within the
                // deadline.
                Err(e) if e.is_transient() => {
                    failing = Some(e);
                    drop(waiter);
                    pause(backoff.next_pause(), deadline);
                }
                Err(e) => return Queued::Done(Err(e)),
            }
        }
    }

    /// On a waiting connection: waits for `keys` in the lock queue until `deadline`.
    fn wait_here(
        &self,
        keys: &[LockKey],
        mode: Mode,
        fenced: bool,
        deadline: Option<Instant>,
    ) -> Result<Option<Vec<LockGuard>>> {
        let shared = &self.shared;
        let Some(&first) = keys.first() else {
            return Ok(Some(Vec::new()));
        };
        if !shared.link.is_online() {
            return Err(offline_error(&shared.link));
        }
        {
            let mut table = shared.table.lock();
            for (i, &key) in keys.iter().enumerate() {
                if !matches!(
                    table.reserve(key, mode, usize::MAX),
                    Reservation::Reserved { .. }
                ) {
                    for &taken in &keys[..i] {
                        table.release(taken, mode, false);
                    }
                    return Err(Error::new(ErrorKind::Config, "a key is listed twice"));
                }
            }
        }
        let unreserve = || {
            let mut table = shared.table.lock();
            for &key in keys {
                table.release(key, mode, false);
            }
        };
        // In one order for every caller, so that waits for several keys cannot deadlock each
        // other.
        let mut sorted = keys.to_vec();
        sorted.sort();
        // The server ends the wait at the deadline; the reply may take a request timeout more.
        let call_deadline = deadline
            .and_then(|d| d.checked_add(shared.request_timeout))
            .unwrap_or_else(|| deadline_in(Duration::MAX));
        let reply = shared.round_trip_special(
            Call {
                op: Op::TryLock,
                mode,
                key: first,
                generation: 0,
                sole_hold: false,
                deadline: call_deadline,
            },
            Special::Wait {
                keys: sorted,
                mode,
                fenced,
                deadline,
            },
        );
        match reply {
            Ok(Reply::Extra(extra)) => match extra.lease {
                Some(lease) => Ok(Some(
                    keys.iter()
                        .map(|&key| {
                            let mut guard =
                                LockGuard::new(Arc::clone(shared), key, mode, lease.clone());
                            if fenced {
                                guard.set_token(extra.token);
                            }
                            guard
                        })
                        .collect(),
                )),
                None => {
                    unreserve();
                    Err(Error::new(
                        ErrorKind::Server,
                        "a wait granted without its lease",
                    ))
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

    /// True while the manager can serve: connected, and no pooler seen.
    pub(crate) fn is_usable(&self) -> bool {
        self.shared.link.is_online()
    }

    /// The state every clone and guard shares.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

#[cfg(test)]
impl LockManager {
    /// The connection state, where tests install their fault hooks.
    pub(crate) fn link(&self) -> &Arc<Link> {
        &self.shared.link
    }
}

impl fmt::Debug for LockManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockManager")
            .field("held", &self.shared.table.lock().len())
            .field("request_timeout", &self.shared.request_timeout)
            .field("max_locks", &self.shared.max_locks)
            .finish_non_exhaustive()
    }
}

/// Settings for a [`LockManager`], taken by value and consumed by `connect`.
///
/// ```no_run
/// use std::time::Duration;
///
/// let locks = distlock::LockManager::builder()
///     .application_name("billing-cron")
///     .connect_timeout(Duration::from_secs(2))
///     .connect("postgres://locker@db.internal/app")?;
/// # Ok::<(), distlock::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    application_name: String,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_locks: usize,
    max_retry_interval: Duration,
    heartbeat: Duration,
    spin_wait: bool,
    tls: Tls,
    allow_standby: bool,
    dead_holder_timeout: Duration,
    wait_connections: usize,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder {
            application_name: DEFAULT_APPLICATION_NAME.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_locks: DEFAULT_MAX_LOCKS,
            max_retry_interval: DEFAULT_MAX_RETRY_INTERVAL,
            heartbeat: DEFAULT_HEARTBEAT,
            spin_wait: false,
            tls: Tls::new(),
            allow_standby: false,
            dead_holder_timeout: DEFAULT_DEAD_HOLDER_TIMEOUT,
            wait_connections: DEFAULT_WAIT_CONNECTIONS,
        }
    }
}

impl Builder {
    /// The `application_name` of the connection, shown in `pg_stat_activity` next to the locks it
    /// holds. Overrides one given in the connection parameters.
    ///
    /// Defaults to `"distlock"`.
    pub fn application_name(mut self, name: &str) -> Builder {
        name.clone_into(&mut self.application_name);
        self
    }

    /// How long `connect` waits for the connection to be ready, all steps together (TCP, TLS-less
    /// start-up, authentication).
    ///
    /// Defaults to 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Builder {
        self.connect_timeout = timeout;
        self
    }

    /// How long a call waits for the worker to answer one request: a single try of a lock, a
    /// release, or an [`LockGuard::ensure_held`]. A call that passes it fails with
    /// [`ErrorKind::Timeout`].
    ///
    /// It also bounds how long the manager stays behind a stalled connection: when one statement has
    /// run for longer than this or than half of [`Builder::dead_holder_timeout`], whichever is
    /// shorter (but at least 100 ms), the connection is declared lost, its locks are reported lost,
    /// and a new connection takes over.
    ///
    /// Defaults to 10 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Builder {
        self.request_timeout = timeout;
        self
    }

    /// The most locks the manager holds at once (each shared holder counts); a try past it fails with
    /// [`ErrorKind::TooManyLocks`]. Every held lock takes a slot in the server's shared lock table
    /// (`max_locks_per_transaction × max_connections` slots), which a runaway caller could exhaust for
    /// the whole server.
    ///
    /// Defaults to 1024.
    pub fn max_locks(mut self, max: usize) -> Builder {
        self.max_locks = max;
        self
    }

    /// How long the connection may sit idle before the worker checks it with an empty query.
    ///
    /// A session lock lives exactly as long as its connection, and the client does not notice a
    /// connection killed on the server side until it next talks to it; the heartbeat bounds how long a
    /// loss can go unnoticed (one heartbeat plus a round trip). A busy connection needs no heartbeat:
    /// every request proves it alive. Values down to 10 ms work; each check costs the server one
    /// round trip.
    ///
    /// Defaults to 1 s.
    pub fn heartbeat(mut self, interval: Duration) -> Builder {
        self.heartbeat = interval;
        self
    }

    /// The longest pause between two tries while waiting for a lock held by another session
    /// (`lock`, `try_lock_for` and the shared forms). Pauses start at 1 ms and double up to this cap,
    /// each with random jitter. A larger cap puts less load on the server while many callers wait;
    /// a smaller one notices a release by another process sooner. A release by a guard of this
    /// same manager wakes its waiters at once, whatever the cap.
    ///
    /// Defaults to 8 ms: a release by another process is seen within about 8 ms plus a round trip.
    pub fn max_retry_interval(mut self, interval: Duration) -> Builder {
        self.max_retry_interval = interval;
        self
    }

    /// How many extra connections the manager may open to wait in PostgreSQL's own lock queue
    /// (`lock`, `try_lock_for`, their shared and fenced forms, `lock_all`, `try_lock_all_for`).
    ///
    /// Waiting there is fair and fast: PostgreSQL grants a released lock to the session that has
    /// waited longest, across every process and host, straight from the release, and a try
    /// cannot barge past a queued waiter. A waiting call first tries once on the manager's own
    /// connection; if the lock is held, it waits on one of these connections, which then holds
    /// the lock for its guard (an ordinary guard: released on drop, loss announced,
    /// `ensure_held`). The connections are opened when first needed, serve one wait (and its
    /// guards) at a time, and close after 10 s unused; a call that finds all of them busy waits
    /// for one, in arrival order. They use this builder's settings, application name included.
    /// When one cannot be opened (the server's or the role's connection limit, say), that call
    /// waits by polling instead.
    ///
    /// `0` waits by polling on the manager's own connection instead (see
    /// [`Builder::max_retry_interval`]): no extra connection, but a release by another process is
    /// noticed up to a backoff later, and callers are served in no particular order. Semaphore
    /// permits always wait by polling.
    ///
    /// Defaults to 4.
    pub fn wait_connections(mut self, connections: usize) -> Builder {
        self.wait_connections = connections;
        self
    }

    /// Whether a call that is the manager's only one in flight spins on its CPU for its reply,
    /// for up to about a millisecond, before it sleeps.
    ///
    /// Sleeping costs two thread wake-ups a round trip; spinning saves them, which lowers the
    /// latency of one thread's calls (measured: a lock+unlock cycle's median well below the raw
    /// client's, see the README's Performance section), at a price: a CPU is busy while the call
    /// waits, the slowest calls get slower, and each call does several times the CPU work. Calls
    /// made while another is in flight never spin, so many threads do not burn the CPUs; on a
    /// machine with one CPU nobody spins.
    ///
    /// Defaults to `false`.
    pub fn spin_wait(mut self, spin: bool) -> Builder {
        self.spin_wait = spin;
        self
    }

    /// Connects; `params` is a libpq `key=value` string or a `postgres://` URL.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::connect`].
    pub fn connect(self, params: &str) -> Result<LockManager> {
        if params.trim().is_empty() {
            // libpq would try the default socket as the OS user; an empty string is far more
            // often a variable that was never set.
            return Err(Error::new(
                ErrorKind::Config,
                "no connection parameters given (an empty string)",
            ));
        }
        let (config, tls) = Tls::parse_params(params)?;
        let tls = self.tls.overridden_by(&tls);
        self.connect_with(config, tls)
    }

    /// How long the server keeps the locks of a holder whose host vanished — lost power or its
    /// network, with no FIN or RST to end its connections.
    ///
    /// The server notices a silent client only through TCP keepalives, after about two hours with
    /// the kernel's defaults, and every other host waits that long. Each lock session therefore
    /// sets the server's `tcp_keepalives_idle`, `tcp_keepalives_interval`, `tcp_keepalives_count`
    /// and `tcp_user_timeout` for itself (any role may) so that the server ends a silent session,
    /// and frees its locks, within this bound (half of it idle, the rest in unanswered probes).
    /// The holder's own side learns of the loss sooner: a heartbeat or statement that gets no
    /// answer within half the bound (or the request timeout, if shorter) declares the connection
    /// lost, so a holder cut off from the server is told before anyone else can take its locks.
    /// Over a unix-domain socket there is no TCP, and nothing to set.
    ///
    /// Whole seconds, at least 2; longer than 24 days leaves the server's settings alone.
    /// Measured: see the README's Performance section.
    ///
    /// Defaults to 12 s.
    pub fn dead_holder_timeout(mut self, timeout: Duration) -> Builder {
        self.dead_holder_timeout = timeout;
        self
    }

    /// Whether a standby may serve locks. Advisory locks work on a hot standby but are local to
    /// it — never replicated — so locks taken on a read replica exclude nobody on the primary or on
    /// other replicas. By default every connection and reconnection checks `pg_is_in_recovery()`
    /// and refuses a standby with [`ErrorKind::Connect`] (the message says "standby"); with several
    /// hosts, `target_session_attrs=read-write` makes the client skip standbys by itself. Allow it
    /// only when every process that contends for the locks uses that same standby.
    ///
    /// Defaults to `false`.
    pub fn allow_standby(mut self, allow: bool) -> Builder {
        self.allow_standby = allow;
        self
    }

    /// TLS settings (libpq's `sslmode`, `sslrootcert`, `sslcert`, `sslkey`) for connections whose
    /// parameters do not say otherwise; see [`Tls`] and the crate docs' "TLS".
    ///
    /// Defaults to `sslmode=prefer` with no root certificate, as libpq.
    pub fn tls(mut self, tls: Tls) -> Builder {
        self.tls = tls;
        self
    }

    /// Connects with a ready `postgres::Config`; the builder's settings are applied on top of it.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::connect`].
    pub fn connect_config(self, config: postgres::Config) -> Result<LockManager> {
        // The client's own setting (disable, prefer or require) unless the builder says more.
        let mode = match config.get_ssl_mode() {
            postgres::config::SslMode::Disable => SslMode::Disable,
            postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        let tls = Tls::new().mode(mode).overridden_by(&self.tls);
        self.connect_with(config, tls)
    }

    /// Connects with `config` and `tls` as given (the builder's settings applied on top).
    pub(crate) fn connect_with(
        self,
        mut config: postgres::Config,
        tls: Tls,
    ) -> Result<LockManager> {
        let waits = (self.wait_connections > 0).then(|| {
            Arc::new(WaitPool::new(
                self.clone(),
                config.clone(),
                tls.clone(),
                self.wait_connections,
            ))
        });
        connect::libpq_defaults(&mut config)?;
        self.check(&config)?;
        let tls = tls.connector(&mut config)?;
        // TCP keepalives find a peer that vanished while the connection idles between heartbeats
        // (a host that died, a NAT that forgot us); the user timeout bounds how long unacknowledged
        // data may wait on a silent network before the socket fails. Linux takes at most
        // `i32::MAX` ms there (a larger value fails the connect), so a longer request timeout
        // saturates at that.
        config
            .application_name(&self.application_name)
            .connect_timeout(self.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(5)
            .tcp_user_timeout(
                Duration::from_secs(30)
                    .max(self.request_timeout)
                    .min(MAX_TCP_USER_TIMEOUT),
            );
        let spin_turns =
            if self.spin_wait && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
                SPIN_TURNS
            } else {
                0
            };
        // Past 24 days (or never), the server's own keepalive settings are left alone.
        let keepalive = (self.dead_holder_timeout <= MAX_TCP_USER_TIMEOUT)
            .then(|| ServerKeepalive::within(self.dead_holder_timeout));
        let (requests, queue) = crossbeam_channel::bounded(QUEUE_CAPACITY);
        let (shutdown, shutdown_rx) = crossbeam_channel::bounded(0);
        let link = Arc::new(Link::new());
        let spec = Spec {
            connector: Arc::new(Connector::new(
                config,
                tls,
                self.connect_timeout,
                self.allow_standby,
                keepalive,
            )),
            requests: queue,
            link: Arc::clone(&link),
            heartbeat: self.heartbeat.max(MIN_HEARTBEAT),
            // The holder must learn of a loss before the server frees its locks: a silent
            // connection is given up within half the dead-holder bound, if that is sooner than
            // the request timeout.
            stall_limit: self.request_timeout.min(self.dead_holder_timeout / 2),
            hand_over_turns: if spin_turns == 0 {
                1
            } else {
                SPIN_HAND_OVER_TURNS
            },
        };
        let spawn_error = |e| {
            Error::with_source(
                ErrorKind::Io,
                "could not spawn the lock manager's threads",
                e,
            )
        };
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        worker::start_first(spec.clone(), ready_tx).map_err(spawn_error)?;
        // The worker bounds the attempt by the connect timeout; the margin only covers the hand-off.
        match ready_rx.recv_timeout(self.connect_timeout.saturating_add(Duration::from_secs(1))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::timeout("timed out connecting to the server")),
        }
        monitor::start(spec, shutdown_rx).map_err(spawn_error)?;
        Ok(LockManager {
            shared: Arc::new(Shared {
                requests,
                replies: Pool::new(INITIAL_REPLY_SLOTS, ReplySlot::new),
                table: Mutex::new(Table::default()),
                released: Condvar::new(),
                request_timeout: self.request_timeout,
                max_locks: self.max_locks,
                max_retry_interval: self.max_retry_interval.max(FIRST_RETRY),
                link: Arc::clone(&link),
                spin_turns: if self.spin_wait
                    && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
                {
                    SPIN_TURNS
                } else {
                    0
                },
                in_flight: AtomicUsize::new(0),
                _shutdown: shutdown,
                _wake_on_drop: WakeOnDrop(link),
                waits,
            }),
        })
    }

    /// Checks `config` and this builder's settings as [`Builder::connect_config`] does, without
    /// connecting: a host list the client could not use, or a zero connect timeout, request
    /// timeout or heartbeat.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`], saying what is wrong.
    ///
    /// ```
    /// use std::str::FromStr;
    /// use distlock::{ErrorKind, LockManager};
    ///
    /// let config = postgres::Config::from_str("host=a,b,c port=5432,5433")?;
    /// let err = LockManager::builder().check(&config).unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Config);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn check(&self, config: &postgres::Config) -> Result<()> {
        self.check_settings()?;
        check_hosts(config)
    }

    /// Rejects settings that cannot work, before anything is started.
    fn check_settings(&self) -> Result<()> {
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("heartbeat", self.heartbeat),
            ("dead_holder_timeout", self.dead_holder_timeout),
        ] {
            if value.is_zero() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{name} must be longer than zero"),
                ));
            }
        }
        Ok(())
    }
}

/// Why a call finds no connection: a reconnect under way, or, for good, a pooler seen sharing the
/// session. Out of line: the request path only ever tests `is_online`.
#[cold]
#[inline(never)]
pub(crate) fn offline_error(link: &Link) -> Error {
    if link.is_pooled() {
        Error::pooler()
    } else {
        Error::offline()
    }
}

/// How a wait in the queue ended: done, or no waiting connection to be had (poll instead).
enum Queued {
    Done(Result<Option<Vec<LockGuard>>>),
    Poll,
}

/// Sleeps `pause`, but not past `deadline`.
fn pause(pause: Duration, deadline: Option<Instant>) {
    let until = deadline_in(pause);
    let until = deadline.map_or(until, |d| until.min(d));
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
}

/// Rejects host lists the client would only refuse once it tries to connect, so that they are
/// reported as the configuration errors they are.
fn check_hosts(config: &postgres::Config) -> Result<()> {
    let hosts = config.get_hosts().len();
    let addrs = config.get_hostaddrs().len();
    if hosts != 0 && addrs != 0 && hosts != addrs {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{hosts} hosts but {addrs} hostaddrs in the connection parameters"),
        ));
    }
    let ports = config.get_ports().len();
    let targets = hosts.max(addrs);
    if ports > 1 && ports != targets {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "{targets} hosts but {ports} ports in the connection parameters (give one port \
                 for all, or one per host)"
            ),
        ));
    }
    Ok(())
}

//! `LockManager`: the handle callers use. Its public methods are thin: each delegates to the
//! acquire path ([`crate::caller::acquire`]) or the waiting path ([`crate::caller::waiting`]).
//! The calls beyond one lock are the capabilities' (`crate::capability`); connecting is the
//! builder's.

use std::fmt;
use std::panic::Location;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::caller::acquire::{self, Wanted};
use crate::caller::guard::{LockGuard, marked};
use crate::caller::shared::Shared;
use crate::caller::waiting;
use crate::clock::deadline_in;
use crate::error::Result;
use crate::key::{IntoLockKey, LockKey};
use crate::mode::Mode;
use crate::stats::Stats;

/// A handle to one connection's worth of advisory locks.
///
/// A `LockManager` owns one PostgreSQL connection (one session) through a worker thread. It is cheap
/// to clone; clones share the worker, the connection and the table of held keys, and every thread of
/// the process may use one. Threads sharing a manager exclude each other exactly as separate processes
/// do, although PostgreSQL itself would let one session take the same lock twice.
///
/// The connection stays open while any clone or any [`LockGuard`](crate::LockGuard) is alive; when the last of them is
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
    /// Takes the exclusive lock on `key` if nobody holds it, without waiting for holders.
    ///
    /// Returns `Ok(None)` when another session, or another thread of this manager, holds it
    /// (exclusively or shared). Blocks for one round trip to the server, at most the request timeout.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) when the worker did not answer within the request timeout (a grant that
    /// arrives later is released at once), [`ErrorKind::Offline`](crate::ErrorKind::Offline) at once while the manager is
    /// reconnecting, [`ErrorKind::TooManyLocks`](crate::ErrorKind::TooManyLocks) past [`Builder::max_locks`](crate::Builder::max_locks),
    /// [`ErrorKind::ConnectionLost`](crate::ErrorKind::ConnectionLost) when the connection failed during the call,
    /// [`ErrorKind::Server`](crate::ErrorKind::Server) when the server rejected the statement, [`ErrorKind::Shutdown`](crate::ErrorKind::Shutdown) when the
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
    #[track_caller]
    pub fn try_lock(&self, key: impl IntoLockKey) -> Result<Option<LockGuard>> {
        let (key, name) = key.key_and_name();
        let taken = acquire::try_lock(
            &self.shared,
            key,
            Mode::Exclusive,
            self.shared.request_deadline(),
        );
        noted(&self.shared, &taken, key, name);
        marked(self.shared(), taken, Location::caller())
    }

    /// Takes the exclusive lock on `key`, waiting up to `timeout` for its holders to release it.
    ///
    /// Tries once on the manager's connection; if the lock is held, waits in PostgreSQL's own lock
    /// queue on one of the manager's waiting connections ([`Builder::wait_connections`](crate::Builder::wait_connections)), where
    /// waiters from every process and host are served in arrival order and a release reaches the
    /// next waiter at once (measured: see the README's Performance section); the server ends the
    /// wait at the deadline (`lock_timeout`), and a grant that races the timeout is still handed
    /// out, never leaked. Threads of this manager wait for each other's holds locally first. With
    /// no waiting connections, it polls instead, with capped exponential backoff and jitter (1 ms
    /// doubling up to [`Builder::max_retry_interval`](crate::Builder::max_retry_interval), 8 ms by default), and at once when a guard
    /// of this manager releases a hold. Returns `Ok(None)` if the lock was still held at the
    /// deadline; it returns within a few milliseconds of it, and at most 100 ms after it (the time
    /// the server's answer to its `lock_timeout` is given to arrive: past that, a waiting
    /// connection that stopped answering makes it return [`ErrorKind::Timeout`](crate::ErrorKind::Timeout)). The first try always runs to completion
    /// (bounded by the request timeout), so a zero `timeout` behaves like [`LockManager::try_lock`](crate::LockManager::try_lock).
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock`](crate::LockManager::try_lock), except that transient failures ([`Error::is_transient`](crate::Error::is_transient):
    /// a reconnect in progress, a lost connection, a stalled worker) do not end the wait: it keeps
    /// trying until the deadline, and returns the latest such error if the last try failed with it.
    /// [`ErrorKind::Deadlock`](crate::ErrorKind::Deadlock) when PostgreSQL broke a deadlock by ending this wait (possible only
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
    #[track_caller]
    pub fn try_lock_for(
        &self,
        key: impl IntoLockKey,
        timeout: Duration,
    ) -> Result<Option<LockGuard>> {
        let taken = self.wait_one(key, Mode::Exclusive, Some(deadline_in(timeout)));
        marked(self.shared(), taken, Location::caller())
    }

    /// Takes the exclusive lock on `key`, waiting for as long as it takes.
    ///
    /// Like `Mutex::lock`: it returns only with the lock or an error. It waits as
    /// [`LockManager::try_lock_for`](crate::LockManager::try_lock_for) does (in PostgreSQL's lock queue, in arrival order), without
    /// a deadline.
    ///
    /// A guard of this manager whose lock was lost still reserves its key until it is dropped (its
    /// holder may still be at work), so a `lock` of that key waits for the drop, however long
    /// that takes; see [`LockGuard`](crate::LockGuard)'s "Lost locks".
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock`](crate::LockManager::try_lock), except that transient failures ([`Error::is_transient`](crate::Error::is_transient)) do
    /// not end the wait: it waits through reconnects for as long as it takes. Any other error ends it.
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// let guard = locks.lock(42_i64)?;
    /// assert_eq!(guard.key(), distlock::LockKey::id(42));
    /// # Ok::<(), distlock::Error>(())
    /// ```
    #[track_caller]
    pub fn lock(&self, key: impl IntoLockKey) -> Result<LockGuard> {
        let taken = acquire::without_deadline(self.wait_one(key, Mode::Exclusive, None));
        marked(self.shared(), taken, Location::caller())
    }

    /// Takes a shared lock on `key` unless someone holds it exclusively.
    ///
    /// Any number of sessions and threads may hold a key shared at once; an exclusive lock waits for
    /// all of them. Blocks and fails as [`LockManager::try_lock`](crate::LockManager::try_lock) does.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock`](crate::LockManager::try_lock).
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// let a = locks.try_lock_shared("schema")?.expect("no exclusive holder");
    /// let b = locks.try_lock_shared("schema")?.expect("shared holders coexist");
    /// assert!(locks.try_lock("schema")?.is_none());
    /// # drop((a, b));
    /// # Ok::<(), distlock::Error>(())
    /// ```
    #[track_caller]
    pub fn try_lock_shared(&self, key: impl IntoLockKey) -> Result<Option<LockGuard>> {
        let (key, name) = key.key_and_name();
        let taken = acquire::try_lock(
            &self.shared,
            key,
            Mode::Shared,
            self.shared.request_deadline(),
        );
        noted(&self.shared, &taken, key, name);
        marked(self.shared(), taken, Location::caller())
    }

    /// Takes a shared lock on `key`, waiting up to `timeout` for an exclusive holder to leave.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock`](crate::LockManager::try_lock).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// if locks.try_lock_shared_for("schema", Duration::from_millis(500))?.is_none() {
    ///     println!("a migration holds the schema");
    /// }
    /// # Ok::<(), distlock::Error>(())
    /// ```
    #[track_caller]
    pub fn try_lock_shared_for(
        &self,
        key: impl IntoLockKey,
        timeout: Duration,
    ) -> Result<Option<LockGuard>> {
        let taken = self.wait_one(key, Mode::Shared, Some(deadline_in(timeout)));
        marked(self.shared(), taken, Location::caller())
    }

    /// Takes a shared lock on `key`, waiting for as long as an exclusive holder keeps it.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::lock`](crate::LockManager::lock).
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// let _reading = locks.lock_shared("schema")?;
    /// # Ok::<(), distlock::Error>(())
    /// ```
    #[track_caller]
    pub fn lock_shared(&self, key: impl IntoLockKey) -> Result<LockGuard> {
        let taken = acquire::without_deadline(self.wait_one(key, Mode::Shared, None));
        marked(self.shared(), taken, Location::caller())
    }

    /// Waits for `key` in `mode` until `deadline` (`None`: no deadline).
    fn wait_one(
        &self,
        key: impl IntoLockKey,
        mode: Mode,
        deadline: Option<Instant>,
    ) -> Result<Option<LockGuard>> {
        let (key, name) = key.key_and_name();
        let waited = waiting::wait(&self.shared, Wanted::One(key, mode), name, deadline);
        let taken = waited.map(|guards| guards.and_then(|mut guards| guards.pop()));
        noted(&self.shared, &taken, key, name);
        taken
    }

    /// What this manager holds and who waits now, and what it has done since it was connected:
    /// a snapshot, taken without a round trip and without allocating (see [`Stats`] field by
    /// field). Cheap enough to call from a metrics scrape or a health check; keeping the figures
    /// costs the request path a few relaxed atomic additions (measured in the README).
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// let stats = locks.stats();
    /// println!(
    ///     "{} held, {} waiting, {} lost since connect, wait p99 {:?}",
    ///     stats.held_exclusive + stats.held_shared + stats.held_permits,
    ///     stats.waiting,
    ///     stats.lost,
    ///     stats.wait_time.quantile(0.99),
    /// );
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// While the manager's own connection is down: why, as the error a call would get now
    /// ([`crate::ErrorKind::Offline`], naming the last reconnect attempt's failure — a standby, a
    /// refused or silent host — once there is one). `None` while it is connected. No round trip:
    /// for a status line or a health check beside a wait that goes on.
    pub fn offline(&self) -> Option<crate::error::Error> {
        let link = self.shared.link();
        (!link.generations.is_online()).then(|| link.generations.offline_error())
    }

    /// A handle on the caller side of a manager, as the builder starts it.
    pub(crate) fn from_shared(shared: Arc<Shared>) -> LockManager {
        LockManager { shared }
    }

    /// The state every clone and guard shares.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// Notes `name` as granted in the manager's names when `taken` is a grant of a key given by its
/// name (nothing but a test of `name` when it was not, a load when names are not recorded).
#[inline]
pub(crate) fn noted(
    shared: &Shared,
    taken: &Result<Option<LockGuard>>,
    key: LockKey,
    name: Option<&str>,
) {
    if let (Some(name), Ok(Some(_)), Some(id)) = (name, taken, key.as_id()) {
        shared.names().note(id, name);
    }
}

impl fmt::Debug for LockManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = self.shared.settings();
        f.debug_struct("LockManager")
            .field("held", &self.shared.held())
            .field("request_timeout", &settings.request_timeout)
            .field("max_locks", &settings.max_locks)
            .finish_non_exhaustive()
    }
}

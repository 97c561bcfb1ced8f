//! Who holds a lock: `pg_locks` joined with `pg_stat_activity`, in one statement on the
//! manager's connection.

use crate::caller::handle::LockManager;
use crate::error::{Error, Result};
use crate::holder::Holder;
use crate::key::IntoLockKey;
use crate::protocol::reply::Reply;
use crate::protocol::request::Solo;

impl LockManager {
    /// The sessions that hold or wait for `key`, from `pg_locks` joined with
    /// `pg_stat_activity`: granted holders first, then waiters, each by pid. This manager's own
    /// session is among them when it holds the key.
    ///
    /// What a role sees: every session's locks, pid and application name; the client address
    /// and backend start only of sessions of its own role, unless it is a member of
    /// `pg_read_all_stats` (see [`Holder`](crate::Holder)). One round trip on the manager's connection, bounded
    /// by the request timeout.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock`](crate::LockManager::try_lock).
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// for holder in locks.holders("nightly-report")? {
    ///     println!("{} ({:?})", holder.pid(), holder.application_name());
    /// }
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn holders(&self, key: impl IntoLockKey) -> Result<Vec<Holder>> {
        let shared = self.shared();
        shared.check_online()?;
        match shared.round_trip_solo(
            Solo::Holders(key.key_and_name().0),
            shared.request_deadline(),
        )? {
            Reply::Holders(holders) => Ok(holders),
            other => Err(Error::unexpected(&other)),
        }
    }

    /// The names managers recorded for `key` ([`Builder::record_names`](crate::Builder::record_names))
    /// in the server's `public.distlock_names`, in order: for a semaphore slot's key (as
    /// `pg_locks` shows it), the semaphore's names. Empty where none is recorded; more than one
    /// when names share the id (FNV-1a 64 collides rarely, but can), each a candidate, none to be
    /// taken alone. For a screen that shows [`LockManager::holders`](crate::LockManager::holders)
    /// of an id it found elsewhere (`pg_locks`, a log). One round trip on the manager's
    /// connection, bounded by the request timeout.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::holders`](crate::LockManager::holders); a role that may not read the
    /// table gets the server's error.
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// let id = distlock::LockKey::id(4417635575514249131);
    /// println!("{id} is {:?}", locks.names_of(id)?);
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn names_of(&self, key: impl IntoLockKey) -> Result<Vec<String>> {
        let shared = self.shared();
        shared.check_online()?;
        let solo = Solo::Names(key.key_and_name().0);
        match shared.round_trip_solo(solo, shared.request_deadline())? {
            Reply::Names(names) => Ok(names),
            other => Err(Error::unexpected(&other)),
        }
    }
}

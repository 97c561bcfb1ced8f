//! Fencing tokens: an exclusive grant that carries a number strictly greater than every token
//! issued before for its key on the cluster. One try is one statement (`SELECT nextval(..)
//! WHERE pg_try_advisory_lock(k)`); a wait in the lock queue draws the token in the same round
//! trip as the grant. Built on the caller side's acquire and waiting paths.

use std::panic::Location;
use std::time::{Duration, Instant};

use crate::caller::acquire::{self, Wanted};
use crate::caller::guard::{LockGuard, marked};
use crate::caller::handle::{LockManager, noted};
use crate::caller::waiting;
use crate::clock::deadline_in;
use crate::error::Result;
use crate::key::IntoLockKey;

impl LockManager {
    /// Tries once to take the exclusive lock on `key` with a fencing token, without waiting.
    ///
    /// Like [`LockManager::try_lock`](crate::LockManager::try_lock), and the guard's [`LockGuard::fencing_token`](crate::LockGuard::fencing_token) is `Some`:
    /// a number strictly greater than every token issued before for `key` on this cluster. The
    /// token comes in the same round trip as the grant, from the sequence
    /// `public.distlock_fence`, which the first fenced call creates if it is missing (a role that
    /// may not create it gets an error naming the statements to run once).
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock`](crate::LockManager::try_lock); [`ErrorKind::Server`](crate::ErrorKind::Server) when the sequence cannot be used
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
    #[track_caller]
    pub fn try_lock_fenced(&self, key: impl IntoLockKey) -> Result<Option<LockGuard>> {
        let (key, name) = key.key_and_name();
        let deadline = self.shared().request_deadline();
        let taken = single(acquire::try_once(
            self.shared(),
            Wanted::Fenced(key),
            deadline,
        ));
        noted(self.shared(), &taken, key, name);
        marked(self.shared(), taken, Location::caller())
    }

    /// Takes the exclusive lock on `key` with a fencing token, waiting up to `timeout`.
    ///
    /// Waits like [`LockManager::try_lock_for`](crate::LockManager::try_lock_for); the guard carries a token as for
    /// [`LockManager::try_lock_fenced`](crate::LockManager::try_lock_fenced).
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock_fenced`](crate::LockManager::try_lock_fenced).
    #[track_caller]
    pub fn try_lock_fenced_for(
        &self,
        key: impl IntoLockKey,
        timeout: Duration,
    ) -> Result<Option<LockGuard>> {
        let taken = self.wait_fenced(key, Some(deadline_in(timeout)));
        marked(self.shared(), taken, Location::caller())
    }

    /// Takes the exclusive lock on `key` with a fencing token, waiting for as long as it is held.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::lock`](crate::LockManager::lock) and [`LockManager::try_lock_fenced`](crate::LockManager::try_lock_fenced).
    #[track_caller]
    pub fn lock_fenced(&self, key: impl IntoLockKey) -> Result<LockGuard> {
        let taken = acquire::without_deadline(self.wait_fenced(key, None));
        marked(self.shared(), taken, Location::caller())
    }

    /// Waits for `key` with a fencing token until `deadline` (`None`: no deadline).
    fn wait_fenced(
        &self,
        key: impl IntoLockKey,
        deadline: Option<Instant>,
    ) -> Result<Option<LockGuard>> {
        let (key, name) = key.key_and_name();
        let wanted = Wanted::Fenced(key);
        let taken = single(waiting::wait(self.shared(), wanted, name, deadline));
        noted(self.shared(), &taken, key, name);
        taken
    }
}

/// The one guard of a grant of one key.
fn single(granted: Result<Option<Vec<LockGuard>>>) -> Result<Option<LockGuard>> {
    Ok(granted?.and_then(|mut guards| guards.pop()))
}

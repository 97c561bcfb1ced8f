//! `LockGuard`: a held lock, released when the guard is dropped or unlocked.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::key::LockKey;
use crate::manager::Shared;
use crate::reply::Reply;
use crate::sql::{Mode, Op};

/// A held advisory lock.
///
/// The lock is released when the guard is dropped: when `drop` returns, the server has released it
/// (or the connection is gone, which releases it too), so another process may take it at once.
/// `drop` ignores errors and never waits longer than the manager's request timeout;
/// [`LockGuard::unlock`] does the same and reports them.
///
/// The guard owns a handle to its manager, so it has no lifetime, may be sent to another thread, and
/// keeps the manager's connection open while it lives.
#[must_use = "if unused the lock will be released immediately"]
pub struct LockGuard {
    /// The manager the lock was taken through.
    shared: Arc<Shared>,
    /// The lock.
    key: LockKey,
    /// Exclusive or shared.
    mode: Mode,
    /// Set once the release has been sent, so that `drop` after `unlock` does nothing.
    released: bool,
}

impl LockGuard {
    pub(crate) fn new(shared: Arc<Shared>, key: LockKey, mode: Mode) -> LockGuard {
        LockGuard {
            shared,
            key,
            mode,
            released: false,
        }
    }

    /// The key this guard holds.
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
    /// [`ErrorKind::LockLost`] when the session no longer held the lock (its connection ended, so the
    /// server had released it already and someone else may have taken it since),
    /// [`ErrorKind::Timeout`] when the worker did not answer in time (the release still runs when the
    /// worker gets to it), [`ErrorKind::ConnectionLost`] when the connection failed (which releases
    /// the lock on the server), [`ErrorKind::Shutdown`] when the worker has stopped.
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
        let deadline = Instant::now() + self.shared.request_timeout();
        let outcome = self
            .shared
            .round_trip(Op::Unlock, self.mode, self.key, deadline);
        // Forget the hold only now: a local waiter woken by this finds the key free on the server too.
        // On a timeout the unlock is still queued ahead of any later request for the key.
        self.shared.forget(self.key, self.mode);
        match outcome? {
            Reply::Released => Ok(()),
            _ => Err(Error::new(
                ErrorKind::LockLost,
                "the lock was no longer held by its session",
            )),
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
            .finish_non_exhaustive()
    }
}

//! All-or-nothing grants of several keys: one statement tries every key and, unless all were
//! granted, releases the ones it took, so a failure leaves no partial hold. Waiting forms queue
//! for the keys in the order of their ids. Built on the caller side's acquire and waiting paths.

use std::collections::HashSet;
use std::panic::Location;
use std::time::Duration;

use crate::caller::acquire::{self, Wanted};
use crate::caller::guard::{LockGuard, marked};
use crate::caller::handle::LockManager;
use crate::caller::waiting;
use crate::clock::deadline_in;
use crate::error::{Error, ErrorKind, Result};
use crate::key::LockKey;
use crate::protocol::request::MAX_KEYS;

impl LockManager {
    /// Tries once to take every one of `keys` exclusively, or none, without waiting.
    ///
    /// One statement, one round trip: every key is tried, and unless all were granted the ones
    /// that were are released in the same statement, so a failure leaves no hold on the server.
    /// The guards come back in the order of `keys`, each released on its own. An empty list is
    /// granted at once.
    ///
    /// Waiting forms ([`LockManager::try_lock_all_for`](crate::LockManager::try_lock_all_for), [`LockManager::lock_all`](crate::LockManager::lock_all)) wait in
    /// PostgreSQL's lock queue, taking the keys one after another in the order of their ids,
    /// whatever order the caller lists them in: they may hold some keys while waiting for others,
    /// but two such callers cannot deadlock each other. A client of another kind that waits for
    /// them the other way round can: PostgreSQL then ends one wait ([`ErrorKind::Deadlock`](crate::ErrorKind::Deadlock) when it
    /// is ours, with nothing left held). Without waiting connections they poll whole tries
    /// instead, never holding some keys while waiting for others.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) when a key is listed twice or there are more than 1,000; otherwise
    /// as for [`LockManager::try_lock`](crate::LockManager::try_lock).
    ///
    /// ```no_run
    /// # let locks = distlock::LockManager::connect("host=localhost user=postgres")?;
    /// if let Some(guards) = locks.try_lock_all(["account/17", "account/42"])? {
    ///     // move money between the two accounts
    /// #   drop(guards);
    /// }
    /// # Ok::<(), distlock::Error>(())
    /// ```
    #[track_caller]
    pub fn try_lock_all<K: Into<LockKey>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Option<Vec<LockGuard>>> {
        let keys = key_list(keys)?;
        let taken = acquire::try_once(
            self.shared(),
            Wanted::All(&keys),
            self.shared().request_deadline(),
        );
        marked(self.shared(), taken, Location::caller())
    }

    /// Takes every one of `keys` exclusively, or none, waiting up to `timeout` for all of them
    /// to be free at once.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock_all`](crate::LockManager::try_lock_all).
    #[track_caller]
    pub fn try_lock_all_for<K: Into<LockKey>>(
        &self,
        keys: impl IntoIterator<Item = K>,
        timeout: Duration,
    ) -> Result<Option<Vec<LockGuard>>> {
        let keys = key_list(keys)?;
        let taken = waiting::wait(
            self.shared(),
            Wanted::All(&keys),
            None,
            Some(deadline_in(timeout)),
        );
        marked(self.shared(), taken, Location::caller())
    }

    /// Takes every one of `keys` exclusively, waiting for as long as any of them is held.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock_all`](crate::LockManager::try_lock_all) and [`LockManager::lock`](crate::LockManager::lock).
    #[track_caller]
    pub fn lock_all<K: Into<LockKey>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<LockGuard>> {
        let keys = key_list(keys)?;
        let taken =
            acquire::without_deadline(waiting::wait(self.shared(), Wanted::All(&keys), None, None));
        marked(self.shared(), taken, Location::caller())
    }
}

/// The keys of a multi-key call, checked: at most [`MAX_KEYS`], each once.
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

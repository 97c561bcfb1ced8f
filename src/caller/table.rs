//! The manager's own table of held keys.
//!
//! Session advisory locks stack within one session, so PostgreSQL cannot keep apart two threads
//! that share the manager's connection: both would be granted the same exclusive lock. The table
//! refuses the second grant locally, so threads of one manager exclude each other exactly as separate
//! processes do. Every entry stands for holds the session has, or is asking for, on the server.

use std::collections::hash_map::Entry;

use crate::key::{KeyMap, LockKey};
use crate::mode::Mode;

/// How a key is held (or being acquired) through this manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// One exclusive hold.
    Exclusive,
    /// This many shared holds, each one a separate hold on the server.
    Shared(u32),
}

/// The outcome of [`Table::reserve`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reservation {
    /// The key is free locally; the caller now asks the server. `sole`: this reservation is the
    /// manager's only hold of the key (always for an exclusive one).
    Reserved {
        /// No other hold of the key through this manager.
        sole: bool,
    },
    /// A thread of this manager holds or is acquiring the key in a conflicting mode.
    Conflict,
    /// The manager already holds `max_locks` locks.
    Full,
}

/// Why a hold is given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// A guard's hold, released: local waiters are told through the release counter.
    Returned,
    /// A reservation whose try did not grant: nobody is told (the try failed because another
    /// session holds the key, so local waiters gain nothing by trying now, and two waiters of
    /// one key would wake each other in a busy loop).
    Unused,
}

/// Keys held or being acquired, and a counter of releases for waiters to watch.
#[derive(Debug, Default)]
pub(crate) struct Table {
    /// Every key with at least one hold.
    holds: KeyMap<LockKey, Hold>,
    /// Holds in total (a shared key counts each holder).
    count: usize,
    /// Bumped whenever a guard gives its hold back, so a waiter can tell that something was freed
    /// while it slept.
    releases: u64,
}

impl Table {
    /// Reserves a hold of `key` in `mode` unless it conflicts with one this manager has.
    #[inline]
    pub(crate) fn reserve(&mut self, key: LockKey, mode: Mode, max: usize) -> Reservation {
        // One hash lookup: this runs on every try.
        let entry = self.holds.entry(key);
        let conflict = match (&entry, mode) {
            (Entry::Vacant(_), _) => false,
            (Entry::Occupied(_), Mode::Exclusive) => true,
            (Entry::Occupied(e), Mode::Shared) => *e.get() == Hold::Exclusive,
        };
        // A conflict wins over a full table: the caller learns that someone holds the key.
        if conflict {
            return Reservation::Conflict;
        }
        if self.count >= max {
            return Reservation::Full;
        }
        let sole = match entry {
            Entry::Vacant(e) => {
                e.insert(match mode {
                    Mode::Exclusive => Hold::Exclusive,
                    Mode::Shared => Hold::Shared(1),
                });
                true
            }
            Entry::Occupied(mut e) => {
                if let Hold::Shared(n) = e.get_mut() {
                    *n += 1;
                }
                false
            }
        };
        self.count += 1;
        Reservation::Reserved { sole }
    }

    /// Reserves a hold of every one of `keys` in `mode`, or of none: on a conflict or a full
    /// table the ones reserved are given back and the first refusal is the outcome (`sole`: every
    /// key's reservation is the manager's only hold of it).
    #[inline]
    pub(crate) fn reserve_all(&mut self, keys: &[LockKey], mode: Mode, max: usize) -> Reservation {
        let mut all_sole = true;
        for (i, &key) in keys.iter().enumerate() {
            match self.reserve(key, mode, max) {
                Reservation::Reserved { sole } => all_sole &= sole,
                refused => {
                    self.release_all(&keys[..i], mode, Release::Unused);
                    return refused;
                }
            }
        }
        Reservation::Reserved { sole: all_sole }
    }

    /// Gives back one hold of each of `keys`, taken by [`Table::reserve_all`].
    #[inline]
    pub(crate) fn release_all(&mut self, keys: &[LockKey], mode: Mode, why: Release) {
        for &key in keys {
            self.release(key, mode, why);
        }
    }

    /// Gives back one hold taken by [`Table::reserve`].
    pub(crate) fn release(&mut self, key: LockKey, mode: Mode, why: Release) {
        // One hash lookup: this runs on every release.
        match (self.holds.entry(key), mode) {
            (Entry::Occupied(mut e), Mode::Shared) if matches!(e.get(), Hold::Shared(n) if *n > 1) => {
                if let Hold::Shared(n) = e.get_mut() {
                    *n -= 1;
                }
            }
            (Entry::Occupied(e), _)
                if matches!(
                    (e.get(), mode),
                    (Hold::Shared(_), Mode::Shared) | (Hold::Exclusive, Mode::Exclusive)
                ) =>
            {
                e.remove();
            }
            (held, _) => {
                // Cannot happen: every release matches a reservation. Never panic here (this runs
                // in `LockGuard::drop`); say so and leave the table as it is.
                log::error!(
                    "distlock: release of {key} in {mode:?} that was not reserved: {held:?}"
                );
                return;
            }
        }
        self.count -= 1;
        if why == Release::Returned {
            self.releases = self.releases.wrapping_add(1);
        }
    }

    /// Holds of `key` through this manager, in either mode (reserved ones included).
    pub(crate) fn holds(&self, key: LockKey) -> u32 {
        match self.holds.get(&key) {
            None => 0,
            Some(Hold::Exclusive) => 1,
            Some(Hold::Shared(n)) => *n,
        }
    }

    /// The release counter; it changes whenever a guard gives a hold back.
    pub(crate) fn releases(&self) -> u64 {
        self.releases
    }

    /// Holds by kind: exclusive locks, shared holds, semaphore permits (a semaphore's queue,
    /// held only while a waiter tries the slots, is none of them).
    pub(crate) fn held_by_kind(&self) -> (u64, u64, u64) {
        let (mut exclusive, mut shared, mut permits) = (0, 0, 0);
        for (key, hold) in &self.holds {
            match hold {
                Hold::Shared(n) => shared += u64::from(*n),
                Hold::Exclusive if key.is_semaphore_queue() => {}
                Hold::Exclusive if key.semaphore_slot().is_some() => permits += 1,
                Hold::Exclusive => exclusive += 1,
            }
        }
        (exclusive, shared, permits)
    }

    /// Holds in total.
    pub(crate) fn len(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: LockKey = LockKey::id(1);

    #[test]
    fn exclusive_excludes_everything_shared_admits_shared() {
        let mut t = Table::default();
        assert_eq!(
            t.reserve(K, Mode::Exclusive, 10),
            Reservation::Reserved { sole: true }
        );
        assert_eq!(t.reserve(K, Mode::Exclusive, 10), Reservation::Conflict);
        assert_eq!(t.reserve(K, Mode::Shared, 10), Reservation::Conflict);
        t.release(K, Mode::Exclusive, Release::Returned);
        assert_eq!(
            t.reserve(K, Mode::Shared, 10),
            Reservation::Reserved { sole: true }
        );
        assert_eq!(
            t.reserve(K, Mode::Shared, 10),
            Reservation::Reserved { sole: false }
        );
        assert_eq!(t.reserve(K, Mode::Exclusive, 10), Reservation::Conflict);
        t.release(K, Mode::Shared, Release::Returned);
        assert_eq!(t.reserve(K, Mode::Exclusive, 10), Reservation::Conflict);
        t.release(K, Mode::Shared, Release::Returned);
        assert_eq!(t.len(), 0);
        assert_eq!(
            t.reserve(K, Mode::Exclusive, 10),
            Reservation::Reserved { sole: true }
        );
    }

    #[test]
    fn cap_counts_every_hold_and_releases_are_counted() {
        let mut t = Table::default();
        assert_eq!(
            t.reserve(K, Mode::Shared, 2),
            Reservation::Reserved { sole: true }
        );
        assert_eq!(
            t.reserve(K, Mode::Shared, 2),
            Reservation::Reserved { sole: false }
        );
        assert_eq!(
            t.reserve(LockKey::id(2), Mode::Exclusive, 2),
            Reservation::Full
        );
        let before = t.releases();
        t.release(K, Mode::Shared, Release::Unused);
        assert_eq!(t.releases(), before, "a failed try wakes nobody");
        assert_eq!(
            t.reserve(K, Mode::Shared, 2),
            Reservation::Reserved { sole: false }
        );
        t.release(K, Mode::Shared, Release::Returned);
        assert_ne!(t.releases(), before);
        assert_eq!(
            t.reserve(LockKey::id(2), Mode::Exclusive, 2),
            Reservation::Reserved { sole: true }
        );
    }

    #[test]
    fn reserve_all_takes_every_key_or_none() {
        let mut t = Table::default();
        let keys = [LockKey::id(1), LockKey::id(2), LockKey::id(3)];
        assert_eq!(
            t.reserve(LockKey::id(3), Mode::Exclusive, 10),
            Reservation::Reserved { sole: true }
        );
        assert_eq!(
            t.reserve_all(&keys, Mode::Exclusive, 10),
            Reservation::Conflict
        );
        assert_eq!(
            t.len(),
            1,
            "the keys reserved before the conflict are given back"
        );
        assert_eq!(
            t.reserve_all(&keys[..2], Mode::Exclusive, 2),
            Reservation::Full
        );
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.reserve_all(&keys[..2], Mode::Exclusive, 10),
            Reservation::Reserved { sole: true }
        );
        let before = t.releases();
        t.release_all(&keys[..2], Mode::Exclusive, Release::Returned);
        assert_eq!(t.len(), 1);
        assert_ne!(t.releases(), before);
    }
}

//! `LockKey`: which advisory lock a call means, and how names map to ids.

use std::fmt;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes`, read as a signed integer: the id Go's `ldelossa/distlock` and
/// `quay/claircore` give a lock name.
const fn fnv1a64(bytes: &[u8]) -> i64 {
    let mut hash = FNV_OFFSET_BASIS;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(FNV_PRIME);
        i += 1;
    }
    hash as i64
}

/// The identity of one PostgreSQL advisory lock.
///
/// PostgreSQL has two separate advisory key spaces, and a key lives in exactly one:
///
/// * one `bigint` ([`LockKey::id`], `From<i64>`, and names: [`LockKey::name`], `From<&str>`);
/// * a pair of `int4` ([`LockKey::pair`]). `LockKey::pair(0, 1)` and `LockKey::id(1)` are different
///   locks.
///
/// # Names
///
/// A name maps to the FNV-1a 64 hash of its UTF-8 bytes, read as a two's-complement `i64`. This is the
/// mapping of the Go libraries `ldelossa/distlock` and `quay/claircore`, so Rust and Go processes
/// that use the same name contend for the same lock, and SQL can take it with
/// `SELECT pg_advisory_lock(<id>)`. The mapping is part of this crate's stable interface: it does not
/// depend on the platform, the Rust release or this crate's version. Any string is a valid name,
/// including the empty one; distinct names can collide (with probability about 2⁻⁶⁴ per pair).
///
/// ```
/// use distlock::LockKey;
/// assert_eq!(LockKey::name("test-key"), LockKey::id(-8571056458571921465));
/// assert_eq!(LockKey::from("test-key").as_id(), Some(-8571056458571921465));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockKey(pub(crate) Space);

/// The two key spaces of PostgreSQL's advisory locks.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub(crate) enum Space {
    /// `pg_advisory_lock(bigint)`.
    Id(i64),
    /// `pg_advisory_lock(int4, int4)`.
    Pair(i32, i32),
}

impl LockKey {
    /// The key with this `bigint` id, used as it is.
    pub const fn id(id: i64) -> LockKey {
        LockKey(Space::Id(id))
    }

    /// The key of a name: the FNV-1a 64 hash of its UTF-8 bytes (see the type's docs).
    pub const fn name(name: &str) -> LockKey {
        LockKey(Space::Id(fnv1a64(name.as_bytes())))
    }

    /// The key `(a, b)` in PostgreSQL's two-`int4` key space, separate from every `bigint` key.
    pub const fn pair(a: i32, b: i32) -> LockKey {
        LockKey(Space::Pair(a, b))
    }

    /// The `bigint` id, or `None` for a pair key.
    pub const fn as_id(self) -> Option<i64> {
        match self.0 {
            Space::Id(id) => Some(id),
            Space::Pair(..) => None,
        }
    }

    /// How `pg_locks` shows this key: `(classid, objid, objsubid)` of a row with
    /// `locktype = 'advisory'`. A `bigint` key `k` is `(k >> 32, k & 0xffffffff, 1)`, a pair `(a, b)` is
    /// `(a, b, 2)`, each half read as an unsigned 32-bit `oid`.
    ///
    /// ```
    /// use distlock::LockKey;
    /// assert_eq!(LockKey::id(-1).pg_locks_tag(), (u32::MAX, u32::MAX, 1));
    /// assert_eq!(LockKey::pair(1, -2).pg_locks_tag(), (1, u32::MAX - 1, 2));
    /// ```
    pub const fn pg_locks_tag(self) -> (u32, u32, i16) {
        match self.0 {
            Space::Id(k) => ((k >> 32) as u32, k as u32, 1),
            Space::Pair(a, b) => (a as u32, b as u32, 2),
        }
    }

    /// The key a `pg_locks` row with `locktype = 'advisory'` shows, from its `classid`, `objid` and
    /// `objsubid`; `None` for an `objsubid` other than 1 or 2.
    pub const fn from_pg_locks_tag(classid: u32, objid: u32, objsubid: i16) -> Option<LockKey> {
        match objsubid {
            1 => Some(LockKey::id(
                (((classid as u64) << 32) | objid as u64) as i64,
            )),
            2 => Some(LockKey::pair(classid as i32, objid as i32)),
            _ => None,
        }
    }

    /// The `(int4, int4)` pair, or `None` for a `bigint` key.
    pub const fn as_pair(self) -> Option<(i32, i32)> {
        match self.0 {
            Space::Id(_) => None,
            Space::Pair(a, b) => Some((a, b)),
        }
    }

    /// The key of slot `slot` of the semaphore named by this key (see
    /// [`crate::LockManager::try_acquire_permit`]): a pair whose first int folds this key's 64
    /// bits and whose second is `i32::MIN + slot`. `slot` is taken modulo 2³¹.
    ///
    /// ```
    /// use distlock::LockKey;
    /// let slot = LockKey::id(7).permit_slot(2);
    /// assert_eq!(slot, LockKey::pair(7, i32::MIN + 2));
    /// assert_eq!(slot.semaphore_slot(), Some(2));
    /// ```
    pub const fn permit_slot(self, slot: u32) -> LockKey {
        let wide = match self.0 {
            Space::Id(id) => id as u64,
            Space::Pair(a, b) => ((a as u32 as u64) << 32) | b as u32 as u64,
        };
        let class = ((wide >> 32) ^ wide) as u32 as i32;
        LockKey(Space::Pair(class, (0x8000_0000 | slot) as i32))
    }

    /// The slot number of a semaphore's queue (turnstile), the lock its waiters queue for in
    /// PostgreSQL's lock queue: never a permit, since a semaphore has at most 10,000.
    pub(crate) const TURNSTILE_SLOT: u32 = 0x7fff_ffff;

    /// True for the key of a semaphore's queue: the lock that waiters for a permit of the
    /// semaphore queue for, one at a time ([`crate::LockManager::acquire_permit`]).
    ///
    /// ```
    /// use distlock::LockKey;
    /// assert!(!LockKey::id(7).permit_slot(2).is_semaphore_queue());
    /// ```
    pub const fn is_semaphore_queue(self) -> bool {
        matches!(self.semaphore_slot(), Some(LockKey::TURNSTILE_SLOT))
    }

    /// For the key of a semaphore slot ([`LockKey::permit_slot`]), the slot: `Some` for every
    /// pair whose second int is negative, which is how `distlock locks` tells semaphore slots
    /// from other locks.
    pub const fn semaphore_slot(self) -> Option<u32> {
        match self.0 {
            Space::Pair(_, b) if b < 0 => Some(b as u32 & 0x7fff_ffff),
            _ => None,
        }
    }
}

/// A fast hasher for maps keyed by [`LockKey`] (the manager's table, the worker's ledger): a
/// multiply-rotate over the key's integers. The standard SipHash costs more than the rest of a
/// table lookup, and these maps are private to one process, where flooding defenses buy nothing.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }

    fn write_i32(&mut self, v: i32) {
        self.write_u64(u64::from(v as u32));
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }

    fn write_isize(&mut self, v: isize) {
        self.write_u64(v as u64);
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
}

/// A `HashMap` keyed by lock keys, with [`KeyHasher`].
pub(crate) type KeyMap<K, V> =
    std::collections::HashMap<K, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// What a lock call takes as its key: a [`LockKey`], an `i64` id, an `(i32, i32)` pair, or a name
/// (`&str`, `String`), which is hashed as [`LockKey::name`] hashes it.
///
/// A key given as its name keeps the name for the call: a waiting connection shows it in
/// `pg_stat_activity`, and a manager that records names ([`crate::Builder::record_names`]) writes
/// it where `distlock locks` finds it. A [`LockKey`] made with [`LockKey::name`] has only its id.
///
/// ```
/// use distlock::{IntoLockKey, LockKey};
/// assert_eq!("nightly-report".key_and_name(), (LockKey::name("nightly-report"), Some("nightly-report")));
/// assert_eq!(42_i64.key_and_name(), (LockKey::id(42), None));
/// ```
pub trait IntoLockKey {
    /// The key, and the name it is the hash of when it was given as a name.
    fn key_and_name(&self) -> (LockKey, Option<&str>);
}

impl IntoLockKey for LockKey {
    fn key_and_name(&self) -> (LockKey, Option<&str>) {
        (*self, None)
    }
}

impl IntoLockKey for i64 {
    fn key_and_name(&self) -> (LockKey, Option<&str>) {
        (LockKey::id(*self), None)
    }
}

impl IntoLockKey for (i32, i32) {
    fn key_and_name(&self) -> (LockKey, Option<&str>) {
        (LockKey::pair(self.0, self.1), None)
    }
}

impl IntoLockKey for str {
    fn key_and_name(&self) -> (LockKey, Option<&str>) {
        (LockKey::name(self), Some(self))
    }
}

impl IntoLockKey for String {
    fn key_and_name(&self) -> (LockKey, Option<&str>) {
        self.as_str().key_and_name()
    }
}

impl<T: IntoLockKey + ?Sized> IntoLockKey for &T {
    fn key_and_name(&self) -> (LockKey, Option<&str>) {
        (**self).key_and_name()
    }
}

impl From<i64> for LockKey {
    fn from(id: i64) -> LockKey {
        LockKey::id(id)
    }
}

impl From<&str> for LockKey {
    fn from(name: &str) -> LockKey {
        LockKey::name(name)
    }
}

impl From<&String> for LockKey {
    fn from(name: &String) -> LockKey {
        LockKey::name(name)
    }
}

impl From<String> for LockKey {
    fn from(name: String) -> LockKey {
        LockKey::name(&name)
    }
}

impl From<(i32, i32)> for LockKey {
    fn from((a, b): (i32, i32)) -> LockKey {
        LockKey::pair(a, b)
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Space::Id(id) => write!(f, "LockKey({id})"),
            Space::Pair(a, b) => write!(f, "LockKey({a}, {b})"),
        }
    }
}

/// Shows the key as SQL would name it: `123` or `(1, 2)`.
impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Space::Id(id) => write!(f, "{id}"),
            Space::Pair(a, b) => write!(f, "({a}, {b})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Golden values: these pin the name mapping. Changing any of them breaks every deployed process
    // that shares locks with this one (and with the Go libraries), so they must never change.
    #[test]
    fn name_hash_matches_go_distlock_golden_values() {
        assert_eq!(
            LockKey::name("test-key").as_id(),
            Some(-8571056458571921465)
        );
        // FNV-1a 64 of nothing is the offset basis.
        assert_eq!(
            LockKey::name("").as_id(),
            Some(0xcbf2_9ce4_8422_2325_u64 as i64)
        );
        // Published FNV-1a 64 test vectors.
        assert_eq!(
            LockKey::name("a").as_id(),
            Some(0xaf63_dc4c_8601_ec8c_u64 as i64)
        );
        assert_eq!(
            LockKey::name("foobar").as_id(),
            Some(0x8594_4171_f739_67e8_u64 as i64)
        );
        // Non-ASCII names hash their UTF-8 bytes.
        assert_eq!(LockKey::name("é").as_id(), Some(fnv1a64(&[0xc3, 0xa9])));
    }

    #[test]
    fn every_conversion_of_a_name_agrees() {
        let owned = String::from("tenant/42");
        assert_eq!(LockKey::from("tenant/42"), LockKey::name("tenant/42"));
        assert_eq!(LockKey::from(&owned), LockKey::name("tenant/42"));
        assert_eq!(LockKey::from(owned), LockKey::name("tenant/42"));
    }

    #[test]
    fn pg_locks_tags_round_trip() {
        for key in [
            LockKey::id(0),
            LockKey::id(-1),
            LockKey::id(i64::MIN),
            LockKey::id(i64::MAX),
            LockKey::name("test-key"),
            LockKey::pair(i32::MIN, i32::MAX),
            LockKey::pair(-7, 7),
        ] {
            let (c, o, s) = key.pg_locks_tag();
            assert_eq!(LockKey::from_pg_locks_tag(c, o, s), Some(key));
        }
        assert_eq!(LockKey::from_pg_locks_tag(1, 2, 3), None);
    }

    #[test]
    fn pair_and_id_keys_are_distinct() {
        assert_ne!(LockKey::pair(0, 1), LockKey::id(1));
        assert_eq!(LockKey::pair(3, 4).as_pair(), Some((3, 4)));
        assert_eq!(LockKey::pair(3, 4).as_id(), None);
        assert_eq!(LockKey::from((3, 4)), LockKey::pair(3, 4));
        assert_eq!(LockKey::id(7).to_string(), "7");
        assert_eq!(LockKey::pair(-1, 2).to_string(), "(-1, 2)");
    }
}

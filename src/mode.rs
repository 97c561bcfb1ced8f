//! `Mode`: exclusive or shared, the two kinds of hold of an advisory lock.

/// Exclusive or shared: which family of advisory functions a lock uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub(crate) enum Mode {
    /// `pg_try_advisory_lock` / `pg_advisory_unlock`: one holder.
    Exclusive,
    /// `pg_try_advisory_lock_shared` / `pg_advisory_unlock_shared`: any number of holders.
    Shared,
}

impl Mode {
    /// The mode's name in `pg_locks.mode`.
    pub(crate) fn pg_locks_name(self) -> &'static str {
        match self {
            Mode::Exclusive => "ExclusiveLock",
            Mode::Shared => "ShareLock",
        }
    }
}

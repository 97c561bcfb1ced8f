//! Telling a session of our own from one a pooler shares.
//!
//! Session advisory locks belong to a server session. A pooler in transaction or statement mode
//! hands each statement to whichever server session is free, so locks land in sessions other
//! clients use and exclude nobody. Each lock connection therefore sets a mark of its own in its
//! session (`SET distlock.session`, a value derived from the manager's salt and the backend) and
//! checks, when connecting, on heartbeats and whenever a lock it should hold is missing, that its
//! statements still run in the backend it identified and that the mark is still its own: several
//! server sessions show as a changed `pg_backend_pid()`, one shared session as a mark another
//! client overwrote (or a mark already there when connecting).

use crate::link::Backend;

/// The mark a manager with `salt` sets in `backend`'s session.
pub(crate) fn session_mark(salt: u64, backend: &Backend) -> i64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hasher};
    let mut h = BuildHasherDefault::<DefaultHasher>::default().build_hasher();
    h.write_u64(salt);
    h.write_i32(backend.pid);
    h.write_i64(backend.started_us);
    (h.finish() & i64::MAX as u64) as i64
}

/// A number no other manager (in this process or another) is likely to use.
pub(crate) fn random_salt() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}


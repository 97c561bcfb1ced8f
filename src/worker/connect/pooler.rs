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

use crate::protocol::link::Backend;
use crate::worker::sql::{PIN, push_int4, push_int8};

/// The mark a manager with `salt` sets in `backend`'s session.
pub(crate) fn session_mark(salt: u64, backend: &Backend) -> i64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hasher};
    let mut h = BuildHasherDefault::<DefaultHasher>::default().build_hasher();
    h.write_u64(salt);
    h.write_i32(backend.pid);
    h.write_i64(backend.started_us);
    (h.finish() & i64::MAX as u64) as i64
}

/// The mark of a lock transaction of a manager with `salt` on the backend `pid`: the server
/// computes the same in the transaction's first round trip (`Sql::push_transaction_start`).
pub(crate) fn transaction_mark(salt: u64, pid: i32) -> i64 {
    ((salt as i64) ^ i64::from(pid)) & i64::MAX
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

/// A statement that returns its row only in the connection's own session: the backend `pid` it
/// identified, still carrying its `mark`. No row means a pooler handed the statement to another
/// session, or another client set its mark in this one.
pub(crate) fn probe(pid: i32, mark: i64) -> String {
    let mut sql = String::from(PIN);
    sql.push_str("SELECT WHERE pg_catalog.pg_backend_pid() = ");
    push_int4(&mut sql, pid);
    sql.push_str(" AND pg_catalog.current_setting('distlock.session', true) = '");
    push_int8(&mut sql, mark);
    sql.push('\'');
    sql
}

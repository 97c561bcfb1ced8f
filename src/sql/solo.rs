//! The statements of the solo requests, each one statement (one round trip) of its own: a
//! fenced try, a semaphore's first free slot, all-or-nothing keys, the holders of a key, and a
//! wait in the lock queue. Built, like every statement here, only from integers formatted here.

use std::fmt::Write as _;

use crate::key::LockKey;
use crate::mode::Mode;
use crate::protocol::request::Fencing;
use crate::sql::fencing::NEXT_TOKEN;
use crate::sql::{PIN, Scope, push_args, push_int4, try_fn, unlock_fn, wait_fn};

/// An exclusive try that draws a token when, and only when, it granted. The target list is
/// evaluated for rows that passed the WHERE, after the grant: every token drawn before for the
/// key was drawn by a holder that had it before, and the sequence only grows.
pub(crate) fn fenced(key: LockKey) -> String {
    let mut sql = String::with_capacity(96);
    sql.push_str(NEXT_TOKEN);
    sql.push_str(" WHERE ");
    sql.push_str(try_fn(Mode::Exclusive, Scope::Session));
    push_args(&mut sql, key);
    sql.push(')');
    sql
}

/// A try of the first free slot of a semaphore whose slot keys are `(class, i32::MIN + slot)`:
/// slots in order, the first free one taken, and no further one tried (LIMIT 1 stops the scan).
/// A slot this session already holds is skipped before its try: session locks stack, so trying
/// it would succeed again and count one holder twice. CASE fixes the order.
pub(crate) fn permit(class: i32, permits: u32, scope: Scope) -> String {
    let mut sql = String::with_capacity(320);
    sql.push_str(PIN);
    let _ = write!(
        sql,
        "SELECT s FROM pg_catalog.generate_series(0, {last}) s WHERE CASE WHEN EXISTS (SELECT FROM \
         pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND classid = \
         {classid} AND objid::int8 = 2147483648 + s AND objsubid = 2) THEN false ELSE {try_fn}",
        last = permits.saturating_sub(1),
        classid = class as u32,
        try_fn = try_fn(Mode::Exclusive, scope),
    );
    push_int4(&mut sql, class);
    sql.push_str(", (s - 2147483648)::int4) END LIMIT 1");
    sql
}

/// Every key tried once (a materialized CTE runs each try exactly once); then either all were
/// granted and the row comes back, or the ones granted are released in the same statement and
/// no row comes back. CASE fixes the order: the release only runs when not all were granted,
/// and only for keys this statement took.
pub(crate) fn all(keys: &[LockKey], mode: Mode) -> String {
    let mut sql = String::with_capacity(64 + 80 * keys.len());
    sql.push_str(PIN);
    sql.push_str("WITH t(n, got) AS MATERIALIZED (VALUES ");
    for (n, key) in keys.iter().enumerate() {
        if n > 0 {
            sql.push(',');
        }
        let _ = write!(sql, "({n}, ");
        sql.push_str(try_fn(mode, Scope::Session));
        push_args(&mut sql, *key);
        sql.push_str("))");
    }
    sql.push_str(
        ") SELECT WHERE CASE WHEN (SELECT pg_catalog.bool_and(got) FROM t) THEN true ELSE \
         (SELECT pg_catalog.count(*) FROM t WHERE CASE WHEN NOT got THEN false",
    );
    for (n, key) in keys.iter().enumerate() {
        let _ = write!(sql, " WHEN n = {n} THEN ");
        sql.push_str(unlock_fn(mode));
        push_args(&mut sql, *key);
        sql.push(')');
    }
    sql.push_str(" END) < 0 END");
    sql
}

/// The sessions that hold or wait for `key` in this database, granted holders first.
pub(crate) fn holders(key: LockKey) -> String {
    let (classid, objid, objsubid) = key.pg_locks_tag();
    format!(
        "{PIN}SELECT l.pid, l.mode = 'ShareLock', l.granted, a.application_name, \
         pg_catalog.host(a.client_addr), (extract(epoch FROM a.backend_start) * 1000000)::int8 \
         FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.pid IS NOT NULL \
         AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()) \
         AND l.classid = {classid} AND l.objid = {objid} AND l.objsubid = {objsubid} \
         ORDER BY NOT l.granted, l.pid"
    )
}

/// A wait in the lock queue for `keys`, one statement each in the order of their ids (every
/// caller's order, so that waits cannot deadlock each other), ended by the server after
/// `lock_timeout_ms` (0: never); a token drawn after the grant when `fencing` asks for one.
pub(crate) fn wait(
    keys: &[LockKey],
    mode: Mode,
    lock_timeout_ms: u128,
    fencing: Fencing,
    scope: Scope,
) -> String {
    let mut sorted = keys.to_vec();
    sorted.sort();
    let set = match scope {
        Scope::Session => "SET",
        Scope::Transaction => "SET LOCAL",
    };
    let mut sql = format!("{PIN}{set} lock_timeout = {lock_timeout_ms}");
    for key in sorted {
        sql.push_str(";SELECT FROM ");
        sql.push_str(wait_fn(mode, scope));
        push_args(&mut sql, key);
        sql.push(')');
    }
    if fencing == Fencing::Token {
        sql.push(';');
        sql.push_str(NEXT_TOKEN);
    }
    sql
}

/// Sets `application_name` to `$1` (for the transaction only when `$2`).
pub(crate) const SET_LABEL: &str =
    "/*NO LOAD BALANCE*/ SELECT FROM pg_catalog.set_config('application_name', $1, $2)";
/// The connection's own `application_name` again (the one it connected with).
pub(crate) const RESET_LABEL: &str = "/*NO LOAD BALANCE*/ RESET application_name";

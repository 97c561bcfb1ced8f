//! The statements that tell whether a pooler shares a lock session: the probe of the session's
//! own backend and mark, and the helper connection's pinned transaction.

use crate::sql::{PIN, push_int4, push_int8};

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

/// The helper connection's statement: opens a transaction (a transaction pooler keeps the server
/// connection it lends for the transaction's whole life) and names that connection's backend.
pub(crate) const PIN_A_BACKEND: &str =
    "/*NO LOAD BALANCE*/ BEGIN; SELECT pg_catalog.pg_backend_pid()";

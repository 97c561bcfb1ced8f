//! The worker's side of a wait in PostgreSQL's lock queue (on a waiting connection): one round
//! trip that sets `lock_timeout` to the caller's deadline and blocks in `pg_advisory_lock` for
//! every key, in the order of their ids, then draws a fencing token if one is asked for.
//!
//! On any failure the keys this wait took are given back before the reply, so that a failed or
//! timed-out wait leaves nothing held. `lock_timeout` can fire just as the lock is granted, and
//! then still raises its error: the holds are read back from `pg_locks`, and a wait whose every
//! key was granted is a grant.

use std::time::Instant;

use postgres::SimpleQueryMessage;
use postgres::error::SqlState;
use postgres::types::Type;

use crate::error::{Error, ErrorKind};
use crate::protocol::link::Lease;
use crate::protocol::reply::{Grant, Reply};
use crate::protocol::request::{Fencing, Wait};
use crate::sql::Scope;
use crate::sql::fencing::{NEXT_TOKEN, fencing_error};
use crate::sql::solo::{self, RESET_LABEL, SET_LABEL};
use crate::worker::readback::{give_back, held_of};
use crate::worker::reply::column;
use crate::worker::session::{Conn, Failed};

/// The longest `lock_timeout` PostgreSQL accepts, in milliseconds.
const MAX_LOCK_TIMEOUT_MS: u128 = i32::MAX as u128;

/// Waits for `wait`'s keys on `conn` and says what to reply. `Err`: the connection broke.
pub(crate) fn serve(wait: &Wait, conn: &mut Conn, lease: &Lease) -> Result<Reply, Error> {
    // Labelled first, so that the server's end of the wait is counted from after it: the wait
    // still ends at the caller's deadline.
    label(wait, conn)?;
    let mut sql = solo::wait(
        &wait.keys,
        wait.mode,
        lock_timeout_ms(wait.deadline),
        wait.fencing,
        conn.scope,
    );
    // After the grant (and its token), the connection's own name again, in the same round trip.
    sql.push(';');
    sql.push_str(RESET_LABEL);
    #[cfg(test)]
    fault::rewrite_wait(&mut sql);
    let fenced = wait.fencing == Fencing::Token;
    let error = match conn.rows_waiting(&sql, wait.deadline) {
        Ok(rows) => {
            let token = last_token(&rows);
            if fenced && token.is_none() {
                return Ok(Reply::Failed(Error::new(
                    ErrorKind::Server,
                    "the server granted a fenced wait without its token",
                )));
            }
            return Ok(Grant::reply(lease, wait.keys.clone(), wait.mode, token));
        }
        Err(Failed::Broken(e)) => return Err(e),
        Err(Failed::Rejected(e)) => e,
    };
    if conn.scope == Scope::Session {
        // The wait failed before its reset ran (in a lock transaction, the rollback resets).
        match conn.rows(RESET_LABEL) {
            Err(Failed::Broken(e)) => return Err(e),
            Ok(_) | Err(Failed::Rejected(_)) => {}
        }
    }
    after_rejection(wait, conn, lease, error)
}

/// Sets the connection's `application_name` to the wait's label, a bound parameter (the key's
/// name never enters the statement's text); in a lock transaction, for the transaction only. A
/// server that refuses it (a pooler that forbids the setting) leaves the wait unlabelled.
fn label(wait: &Wait, conn: &mut Conn) -> Result<(), Error> {
    let local = conn.scope == Scope::Transaction;
    match conn.typed(
        SET_LABEL,
        &[(&&*wait.label, Type::TEXT), (&local, Type::BOOL)],
    ) {
        Ok(_) => Ok(()),
        Err(Failed::Broken(e)) => Err(e),
        Err(Failed::Rejected(e)) => {
            log::debug!("distlock: a waiting connection could not show what it waits for: {e}");
            Ok(())
        }
    }
}

/// The server's `lock_timeout` for a wait until `deadline`, in whole milliseconds rounded up: 0
/// (never) without one or past the largest it takes, at least 1 ms (0 would mean "never") for a
/// deadline already passed.
fn lock_timeout_ms(deadline: Option<Instant>) -> u128 {
    let Some(deadline) = deadline else {
        return 0;
    };
    // Rounded up: the server gives up no earlier than the deadline, so that a wait that returns
    // "still held" has waited its whole time.
    match deadline
        .saturating_duration_since(Instant::now())
        .as_micros()
        .div_ceil(1000)
    {
        0 => 1,
        ms if ms > MAX_LOCK_TIMEOUT_MS => 0,
        ms => ms,
    }
}

/// The fencing token among a query's rows, if it drew one (the last row).
fn last_token(rows: &[SimpleQueryMessage]) -> Option<u64> {
    rows.iter().rev().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => column(row, 0)?.parse::<u64>().ok(),
        _ => None,
    })
}

/// The wait statement was rejected: a timeout that raced a grant is a grant (read back from
/// `pg_locks`); anything else gives back what the wait took.
fn after_rejection(
    wait: &Wait,
    conn: &mut Conn,
    lease: &Lease,
    error: Error,
) -> Result<Reply, Error> {
    if conn.scope == Scope::Transaction {
        // The error aborted the lock's transaction, and with it anything the wait took: nothing
        // raced the timeout, nothing is held, and the connection serves nothing more.
        return Ok(match error.sql_state() {
            Some(&SqlState::LOCK_NOT_AVAILABLE) => Reply::Busy,
            _ => Reply::Failed(error),
        });
    }
    let held = held_of(&wait.keys, wait.mode, conn).map_err(Failed::into_error)?;
    let timed_out = error.sql_state() == Some(&SqlState::LOCK_NOT_AVAILABLE);
    if timed_out && held.len() == wait.keys.len() {
        // Granted as the timeout fired.
        let token = match wait.fencing {
            Fencing::NoToken => None,
            Fencing::Token => match conn.rows(NEXT_TOKEN) {
                Ok(rows) => last_token(&rows),
                Err(Failed::Broken(e)) => return Err(e),
                Err(Failed::Rejected(e)) => {
                    give_back(&held, wait.mode, conn).map_err(Failed::into_error)?;
                    return Ok(Reply::Failed(fencing_error(e)));
                }
            },
        };
        return Ok(Grant::reply(lease, wait.keys.clone(), wait.mode, token));
    }
    give_back(&held, wait.mode, conn).map_err(Failed::into_error)?;
    if timed_out {
        return Ok(Reply::Busy);
    }
    if error.sql_state() == Some(&SqlState::T_R_DEADLOCK_DETECTED) {
        return Ok(Reply::Failed(Error::with_source(
            ErrorKind::Deadlock,
            "PostgreSQL found a deadlock while this call waited for the lock, and ended the wait",
            error,
        )));
    }
    Ok(Reply::Failed(match wait.fencing {
        Fencing::Token => fencing_error(error),
        Fencing::NoToken => error,
    }))
}

/// Test-only: makes a wait statement misbehave the way the server can.
#[cfg(test)]
pub(crate) mod fault {
    use std::sync::atomic::{AtomicI64, Ordering};

    /// Set to a bigint key (0: none): the next wait statement for it takes its locks and then
    /// fails as `lock_timeout` does when it fires just as the lock is granted.
    pub(crate) static GRANT_THEN_TIME_OUT: AtomicI64 = AtomicI64::new(0);

    pub(crate) fn rewrite_wait(sql: &mut String) {
        let id = GRANT_THEN_TIME_OUT.load(Ordering::Acquire);
        if id != 0
            && sql.contains(&format!("({id})"))
            && GRANT_THEN_TIME_OUT
                .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            sql.push_str(
                ";DO $$ BEGIN RAISE EXCEPTION 'canceling statement due to lock timeout' \
                 USING ERRCODE = 'lock_not_available'; END $$",
            );
        }
    }
}

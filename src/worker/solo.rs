//! The worker's side of the requests beyond one key's: a fenced try, a permit, an
//! all-or-nothing try and a holder lookup each run alone as one statement in the manager's
//! session, built from integers only ([`crate::sql`]), and are granted, like every lock
//! statement, when their statement returns its row. Waits in the lock queue are
//! [`crate::worker::queue_wait`]'s.

use std::time::{Duration, SystemTime};

use postgres::error::SqlState;
use postgres::{SimpleQueryMessage, SimpleQueryRow};

use crate::error::{Error, ErrorKind};
use crate::holder::Holder;
use crate::key::LockKey;
use crate::mode::Mode;
use crate::protocol::link::Lease;
use crate::protocol::reply::{Grant, Reply};
use crate::protocol::request::Solo;
use crate::sql::fencing::{CREATE_FENCE_SEQUENCE, NEXT_TOKEN, fencing_error};
use crate::sql::solo;
use crate::worker::names;
use crate::worker::queue_wait;
use crate::worker::readback::undo;
use crate::worker::reply::column;
use crate::worker::session::{Conn, Failed};

/// Runs `solo` in `conn`'s session and says what to reply. `Err`: the connection broke, and
/// what the statement did is unknown (the session is going, and its holds with it).
pub(crate) fn serve(solo: &Solo, conn: &mut Conn, lease: &Lease) -> Result<Reply, Error> {
    match solo {
        Solo::Wait(wait) => queue_wait::serve(wait, conn, lease),
        Solo::Fenced(key) => fenced(*key, conn, lease),
        Solo::Permit { key, permits } => {
            let sql = solo::permit(semaphore_class(*key), *permits, conn.scope);
            first_row(conn.rows(&sql), |row| {
                match column(row, 0).and_then(|t| t.parse::<u32>().ok()) {
                    Some(slot) => {
                        Grant::reply(lease, vec![key.permit_slot(slot)], Mode::Exclusive, None)
                    }
                    None => Reply::Failed(Error::new(
                        ErrorKind::Server,
                        "the server answered a permit try without a slot number",
                    )),
                }
            })
        }
        Solo::All { keys, mode } => first_row(conn.rows(&solo::all(keys, *mode)), |_| {
            Grant::reply(lease, keys.clone(), *mode, None)
        }),
        Solo::Token => token(conn, lease),
        Solo::Holders(key) => match conn.rows(&solo::holders(*key)) {
            Ok(rows) => Ok(Reply::Holders(
                rows_of(&rows).filter_map(holder_of).collect(),
            )),
            Err(Failed::Broken(e)) => Err(e),
            Err(Failed::Rejected(e)) => Ok(Reply::Failed(e)),
        },
        Solo::Names(key) => names::lookup(*key, conn),
    }
}

/// The first int of the slot keys of the semaphore `key` (see [`LockKey::permit_slot`]).
pub(crate) fn semaphore_class(key: LockKey) -> i32 {
    match key.permit_slot(0).as_pair() {
        Some((class, _)) => class,
        None => 0,
    }
}

/// The rows among a query's messages.
fn rows_of(messages: &[SimpleQueryMessage]) -> impl Iterator<Item = &SimpleQueryRow> {
    messages.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    })
}

/// The reply to a try granted when its statement returns a row: `granted` reads the row, and no
/// row is [`Reply::Busy`]. A rejected statement is [`Reply::Failed`].
fn first_row(
    ran: Result<Vec<SimpleQueryMessage>, Failed>,
    granted: impl FnOnce(&SimpleQueryRow) -> Reply,
) -> Result<Reply, Error> {
    match ran {
        Ok(rows) => Ok(rows_of(&rows).next().map_or(Reply::Busy, granted)),
        Err(Failed::Broken(e)) => Err(e),
        Err(Failed::Rejected(e)) => Ok(Reply::Failed(e)),
    }
}

/// A fenced try. If the server rejects it, the try may have been granted before the token
/// failed (a session lock outlives the statement's error), so the grant is given back; a missing
/// sequence is created and the try made again, once.
fn fenced(key: LockKey, conn: &mut Conn, lease: &Lease) -> Result<Reply, Error> {
    let sql = solo::fenced(key);
    let grant = |row: &SimpleQueryRow| {
        let token = column(row, 0).and_then(|t| t.parse::<u64>().ok());
        Grant::reply(lease, vec![key], Mode::Exclusive, token)
    };
    let error = match conn.rows(&sql) {
        Err(Failed::Rejected(e)) => e,
        ran => return first_row(ran, grant),
    };
    let missing = error.sql_state() == Some(&SqlState::UNDEFINED_TABLE);
    undo(&[key], Mode::Exclusive, conn).map_err(Failed::into_error)?;
    if !missing {
        return Ok(Reply::Failed(fencing_error(error)));
    }
    // Several managers may race to create it: whoever loses finds it there on the retry.
    if let Err(Failed::Broken(e)) = conn.rows(CREATE_FENCE_SEQUENCE) {
        return Err(e);
    }
    match conn.rows(&sql) {
        Err(Failed::Rejected(e)) => {
            // Undo a grant the second try may have made too.
            undo(&[key], Mode::Exclusive, conn).map_err(Failed::into_error)?;
            Ok(Reply::Failed(fencing_error(e)))
        }
        ran => first_row(ran, grant),
    }
}

/// One fencing token, drawn by a statement of its own; a missing sequence is created and the
/// token drawn again, once.
fn token(conn: &mut Conn, lease: &Lease) -> Result<Reply, Error> {
    let grant = |row: &SimpleQueryRow| match column(row, 0).and_then(|t| t.parse::<u64>().ok()) {
        Some(token) => Grant::reply(lease, Vec::new(), Mode::Exclusive, Some(token)),
        None => Reply::Failed(Error::new(
            ErrorKind::Server,
            "the server drew a fencing token without a number",
        )),
    };
    let error = match conn.rows(NEXT_TOKEN) {
        Err(Failed::Rejected(e)) => e,
        ran => return first_row(ran, grant),
    };
    if error.sql_state() != Some(&SqlState::UNDEFINED_TABLE) {
        return Ok(Reply::Failed(fencing_error(error)));
    }
    if let Err(Failed::Broken(e)) = conn.rows(CREATE_FENCE_SEQUENCE) {
        return Err(e);
    }
    match conn.rows(NEXT_TOKEN) {
        Err(Failed::Rejected(e)) => Ok(Reply::Failed(fencing_error(e))),
        ran => first_row(ran, grant),
    }
}

fn holder_of(row: &SimpleQueryRow) -> Option<Holder> {
    let pid = column(row, 0)?.parse().ok()?;
    let started = column(row, 5)
        .and_then(|us| us.parse::<u64>().ok())
        .map(|us| SystemTime::UNIX_EPOCH + Duration::from_micros(us));
    Some(Holder {
        pid,
        shared: column(row, 1) == Some("t"),
        granted: column(row, 2) == Some("t"),
        application_name: column(row, 3).map(str::to_owned),
        client_addr: column(row, 4).map(str::to_owned),
        backend_start: started,
    })
}

//! The worker's side of recording key names ([`crate::Builder::record_names`]): when its
//! connection has been quiet for a monitor tick with nothing queued (or, on a manager never that
//! quiet, at an idle moment once the monitor finds they have waited [`DELAY`]), it writes the
//! names callers noted to `public.distlock_names` in one statement, the names bound
//! as parameters (never in the statement's text). The table is created on first use; a role that
//! may not create or write it gets one warning naming the statements to run once, and the
//! manager records nothing more.

use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::Type;

use crate::error::Error;
use crate::key::LockKey;
use crate::protocol::names::Names;
use crate::protocol::reply::Reply;
use crate::sql::names::{self as names_sql, CREATE_NAMES, INSERT_NAMES, PROBE_NAMES};
use crate::worker::reply::{column, row_counts};
use crate::worker::session::{Conn, Failed};

/// How long noted names wait at most, on a manager that is never quiet for a tick, before they
/// are written at its next idle moment.
pub(crate) const DELAY: Duration = Duration::from_secs(1);

/// Writes the names waiting in `names` on `conn`. `Err`: the connection broke (the names are
/// kept for the next connection); a server that refuses them stops the recording, said once.
///
/// Before the manager's first write the table is probed, and created where it is missing, in
/// simple queries, so that the write (the one statement with bound parameters) is not expected
/// to fail: a proxy that parses the extended protocol (pgpool-II 4.3 was seen to crash on a
/// statement after a failed one) then only sees statements that succeed. Later writes go
/// straight to the table; one that finds it dropped probes again at the next.
pub(crate) fn record(names: &Names, conn: &mut Conn) -> Result<(), Error> {
    let batch = names.take_pending();
    let known = names.table_ready();
    let ready = if known { Ok(Ready::Yes) } else { ready(conn) };
    let outcome = ready.and_then(|ready| match ready {
        Ready::Yes => {
            let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
            let texts: Vec<&str> = batch.iter().map(|(_, name)| &**name).collect();
            conn.typed(
                INSERT_NAMES,
                &[(&ids, Type::INT8_ARRAY), (&texts, Type::TEXT_ARRAY)],
            )
            .map(|_| None)
        }
        Ready::Refused(cause) => Ok(Some(cause)),
    });
    let cause = match outcome {
        Ok(None) => {
            names.set_table_ready(true);
            log::debug!("distlock: recorded {} key name(s)", batch.len());
            return Ok(());
        }
        // Dropped since it was seen: probed (and created) again at the next write.
        Err(Failed::Rejected(e)) if known && e.sql_state() == Some(&SqlState::UNDEFINED_TABLE) => {
            names.set_table_ready(false);
            names.give_back(batch);
            return Ok(());
        }
        Err(Failed::Broken(e)) => {
            names.give_back(batch);
            return Err(e);
        }
        Ok(Some(cause)) => cause,
        Err(Failed::Rejected(e)) => server_said(&e),
    };
    names.stop();
    let create = CREATE_NAMES.trim_start_matches(crate::sql::PIN);
    log::warn!(
        "distlock: key names are not recorded, so `distlock locks` shows this manager's keys as \
         ids: this role cannot create or write public.distlock_names ({cause}). Have a role \
         allowed to, run once: `{create}; GRANT SELECT, INSERT ON public.distlock_names TO <lock \
         users>`"
    );
    Ok(())
}

/// Whether names can be written now.
enum Ready {
    Yes,
    /// Not by this role: why.
    Refused(String),
}

/// What the server said of a refused statement (its error, else the library's message).
fn server_said(e: &Error) -> String {
    std::error::Error::source(e).map_or_else(|| e.to_string(), ToString::to_string)
}

/// Probes the names table, creating it where it is missing.
fn ready(conn: &mut Conn) -> Result<Ready, Failed> {
    let probe = conn.rows(PROBE_NAMES)?;
    let mut counts = row_counts(&probe);
    let (exists, writable) = (counts.next() == Some(1), counts.next() == Some(1));
    if exists {
        return Ok(if writable {
            Ready::Yes
        } else {
            Ready::Refused("permission denied to insert".to_owned())
        });
    }
    match conn.rows(CREATE_NAMES) {
        Ok(_) => {}
        // Another manager created it at the same moment: it is there now.
        Err(Failed::Rejected(e)) if e.sql_state() == Some(&SqlState::UNIQUE_VIOLATION) => {}
        Err(Failed::Rejected(e)) => {
            return Ok(Ready::Refused(server_said(&e)));
        }
        Err(broken) => return Err(broken),
    }
    // Created by this role, or by another one at the same moment: may this one write it?
    let probe = conn.rows(PROBE_NAMES)?;
    Ok(if row_counts(&probe).nth(1) == Some(1) {
        Ready::Yes
    } else {
        Ready::Refused("permission denied to insert".to_owned())
    })
}

/// The names recorded for `key` (for a semaphore slot's or queue's key, the semaphore's), in
/// order: none for a key no name can have (a pair of the caller's own) or where nothing is
/// recorded (no table).
pub(crate) fn lookup(key: LockKey, conn: &mut Conn) -> Result<Reply, Error> {
    let filter = match (key.as_id(), key.semaphore_slot(), key.pg_locks_tag()) {
        (Some(id), ..) => format!("id = {id}"),
        (None, Some(_), (class, ..)) => {
            format!("((id >> 32) # id) & 4294967295 = {class}")
        }
        (None, None, _) => return Ok(Reply::Names(Vec::new())),
    };
    let sql = names_sql::lookup(&filter);
    match conn.rows(&sql) {
        Ok(rows) => Ok(Reply::Names(
            rows.iter()
                .filter_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(row) => column(row, 0).map(str::to_owned),
                    _ => None,
                })
                .collect(),
        )),
        Err(Failed::Broken(e)) => Err(e),
        Err(Failed::Rejected(e)) if e.sql_state() == Some(&SqlState::UNDEFINED_TABLE) => {
            Ok(Reply::Names(Vec::new()))
        }
        Err(Failed::Rejected(e)) => Ok(Reply::Failed(e)),
    }
}

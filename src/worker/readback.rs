//! Reading back from `pg_locks` what a failed statement did, and giving back what it took:
//! session locks outlive a statement's error, so a statement that failed after granting must
//! not leave its grants behind.

use crate::error::{Error, ErrorKind};
use crate::key::LockKey;
use crate::mode::Mode;
use crate::protocol::request::Op;
use crate::worker::session::{Failed, Query, Session};

/// The keys among `keys` that this session holds in `mode`, read back in one round trip.
pub(crate) fn held_of(
    keys: &[LockKey],
    mode: Mode,
    session: &mut impl Session,
) -> Result<Vec<LockKey>, Failed> {
    let mut query = Query::new();
    for &key in keys {
        query.sql.push(Op::Check, mode, key);
    }
    query.run(session)?;
    if query.counts.len() != keys.len() {
        return Err(Failed::Broken(Error::new(
            ErrorKind::ConnectionLost,
            format!(
                "the server answered {} statements of {}",
                query.counts.len(),
                keys.len()
            ),
        )));
    }
    Ok(keys
        .iter()
        .zip(&query.counts)
        .filter(|(_, rows)| **rows == 1)
        .map(|(key, _)| *key)
        .collect())
}

/// Releases one hold of each of `keys`, in one round trip.
pub(crate) fn give_back(
    keys: &[LockKey],
    mode: Mode,
    session: &mut impl Session,
) -> Result<(), Failed> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut query = Query::new();
    for &key in keys {
        query.sql.push(Op::Unlock, mode, key);
    }
    query.run(session)
}

/// Gives back whichever of `keys` this session holds in `mode`: after a failed statement, the
/// grants it made.
pub(crate) fn undo(keys: &[LockKey], mode: Mode, session: &mut impl Session) -> Result<(), Failed> {
    let held = held_of(keys, mode, session)?;
    give_back(&held, mode, session)
}

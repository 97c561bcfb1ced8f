//! Why a connection ended, in words a user can act on: the server's or a pooler's own reason
//! (its `FATAL` message), and the setting behind it where one is known. Kept with the lost
//! generation, so that the error of each of its guards says why the lock was lost.

use crate::error::Error;
use crate::protocol::link::Link;

/// Logs that `generation`'s connection failed with `e`, and notes why for its guards.
pub(crate) fn lost(link: &Link, generation: u64, e: &Error) {
    log::warn!("distlock worker: connection failed: {e}");
    if let Some(cause) = describe(e) {
        link.generations.note_loss(generation, cause);
    }
}

/// The server's or pooler's reason for ending the connection, with the setting to change where
/// one is known; `None` when it gave none (a silent network, a closed socket).
pub(crate) fn describe(e: &Error) -> Option<String> {
    let db = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<postgres::Error>())
        .and_then(postgres::Error::as_db_error)?;
    let said = db.message();
    let hint = HINTS
        .iter()
        .find(|(reason, _)| said.contains(reason))
        .map(|(_, hint)| *hint);
    Some(match hint {
        Some(hint) => format!("{} \"{said}\" ({hint})", db.severity()),
        None => format!("{} \"{said}\"", db.severity()),
    })
}

/// What a reason (a part of the message) means and which setting to change.
const HINTS: [(&str, &str); 7] = [
    (
        "idle transaction timeout",
        "a pooler's idle_transaction_timeout (pgbouncer) ended the lock's transaction between two \
         heartbeats: set it longer than the heartbeat (Builder::heartbeat, distlock run \
         --heartbeat), or to 0",
    ),
    (
        "query timeout",
        "a pooler's query_timeout (pgbouncer) ended it; pgbouncer up to 1.25.2 counts it from the \
         client's last request, so it ends an idle lock transaction: set it to 0 for the locks' \
         database or user",
    ),
    (
        "transaction timeout",
        "a pooler's transaction_timeout (pgbouncer 1.25 and later) ended the lock's \
         transaction: set it to 0 for the locks' database or user",
    ),
    (
        "client_idle_timeout",
        "a pooler's client_idle_timeout (pgbouncer) ended it: set it longer than the heartbeat",
    ),
    (
        "idle-session timeout",
        "the server's lease on the lock session ran out: its holder went longer than the \
         dead-holder bound without a statement (a stopped process, a frozen host)",
    ),
    (
        "idle-in-transaction timeout",
        "the server's lease on the lock transaction ran out: its holder went longer than the \
         dead-holder bound without a statement (a stopped process, a frozen host)",
    ),
    (
        "administrator command",
        "an administrator ended the backend (pg_terminate_backend), or the server is shutting \
         down",
    ),
];

//! Where fencing tokens come from: one sequence, the statements that create it and draw from
//! it, and the error that says what to run when a role may not. Each statement starts with the
//! comment that keeps it off a load-balancing proxy's replicas (`crate::sql::PIN`).

use crate::error::{Error, ErrorKind};

/// The sequence fencing tokens come from, in the schema every role finds it under.
pub(crate) const FENCE_SEQUENCE: &str = "public.distlock_fence";

/// Creates the fencing sequence if it is missing.
pub(crate) const CREATE_FENCE_SEQUENCE: &str =
    "/*NO LOAD BALANCE*/ CREATE SEQUENCE IF NOT EXISTS public.distlock_fence";

/// Draws one fencing token (a statement of its own, or the last of a query's; a fenced try
/// appends its `WHERE`), the token in the first column.
///
/// A sequence writes WAL once per 32 values, and only the draw that writes it waits for that WAL
/// to be flushed and replicated: the next 31 values are handed out at once, to any session, even
/// while that record is not yet on disk or on a synchronous standby — a crash or a failover would
/// then hand them out again. So each draw also writes a small transactional WAL record of its own
/// (a logical decoding message with the prefix `distlock`), which makes its transaction's commit
/// wait until the WAL up to it, the sequence's record included, is flushed and, with a
/// synchronous standby, confirmed by it; and the transaction's `synchronous_commit` is raised to
/// `on` where the session or role has `off` or `local` (stronger settings are kept). The client
/// takes the token only when the statement's transaction has committed.
pub(crate) const NEXT_TOKEN: &str = "/*NO LOAD BALANCE*/ SELECT \
     pg_catalog.nextval('public.distlock_fence'), \
     pg_catalog.pg_logical_emit_message(true, 'distlock', 'fencing token'), \
     CASE WHEN pg_catalog.current_setting('synchronous_commit') IN ('off', 'local') \
     THEN pg_catalog.set_config('synchronous_commit', 'on', true) END";

/// The error of a fenced grant whose token could not be drawn.
pub(crate) fn fencing_error(cause: Error) -> Error {
    Error::with_source(
        ErrorKind::Server,
        format!(
            "fencing tokens come from the sequence {FENCE_SEQUENCE}, which this role cannot use \
             or create: have a role allowed to run `CREATE SEQUENCE IF NOT EXISTS \
             {FENCE_SEQUENCE}; GRANT USAGE ON SEQUENCE {FENCE_SEQUENCE} TO <lock users>`"
        ),
        cause,
    )
}

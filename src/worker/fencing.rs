//! Where fencing tokens come from: one sequence, the statements that create it and draw from
//! it, and the error that says what to run when a role may not. Each statement starts with the
//! comment that keeps it off a load-balancing proxy's replicas (`crate::worker::sql::PIN`).

use crate::error::{Error, ErrorKind};

/// The sequence fencing tokens come from, in the schema every role finds it under.
pub(crate) const FENCE_SEQUENCE: &str = "public.distlock_fence";

/// Creates the fencing sequence if it is missing.
pub(crate) const CREATE_FENCE_SEQUENCE: &str =
    "/*NO LOAD BALANCE*/ CREATE SEQUENCE IF NOT EXISTS public.distlock_fence";

/// Draws one fencing token (a statement of its own, or the last of a query's).
pub(crate) const NEXT_TOKEN: &str = "/*NO LOAD BALANCE*/ SELECT nextval('public.distlock_fence')";

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

//! Reading a server's replies: the row counts the worker decides by, and a row's text columns.
//! Pure functions of the messages a `simple_query` returned; no connection is touched.

use postgres::{SimpleQueryMessage, SimpleQueryRow};

/// The row count of each statement of a query, in order, from its `CommandComplete` messages:
/// how every lock statement's outcome is read (one row: the function returned true).
pub(crate) fn row_counts(messages: &[SimpleQueryMessage]) -> impl Iterator<Item = u64> + '_ {
    messages.iter().filter_map(|m| match m {
        SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    })
}

/// The text of column `i` of `row`: `None` for a NULL, and for a column the row does not have
/// (a server that answers with other columns than asked for is read, never trusted to the point
/// of a panic).
pub(crate) fn column(row: &SimpleQueryRow, i: usize) -> Option<&str> {
    row.try_get(i).ok().flatten()
}

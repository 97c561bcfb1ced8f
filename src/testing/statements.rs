//! The library's own statement texts and their reading, for benchmarks and measurements that run
//! them on a raw client.

/// The row count of a query's first statement, read as the library reads every lock statement's
/// outcome (from its `CommandComplete` message, never from a decoded value): for benchmarks that
/// run the library's statements on a raw client.
pub fn rows_returned(messages: &[postgres::SimpleQueryMessage]) -> u64 {
    crate::worker::reply::row_counts(messages)
        .next()
        .unwrap_or(0)
}

/// The text of a new lock session's set-up for a PostgreSQL 15 server, with `mark` as the
/// session's mark, and with the exclusion proof after it when `proof`: for measuring what the
/// proof costs a connect.
pub fn session_setup_sql(mark: i64, proof: bool) -> String {
    let mut sql = crate::worker::sql::Sql::new();
    sql.push_session_setup(150_000, None, mark);
    if proof {
        sql.push_exclusion_proof(mark);
    }
    sql.as_str().to_owned()
}

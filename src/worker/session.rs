//! The seam between the worker and the server: a [`Session`] runs statement text and reports
//! each statement's row count. The worker's real session is [`Conn`], a `postgres::Client` whose
//! every statement the monitor watches; the batch state machine's unit tests use a scripted one.

use std::sync::Arc;

use postgres::error::SqlState;
use postgres::types::{ToSql, Type};
use postgres::{Client, SimpleQueryMessage};

use crate::error::{Error, ErrorKind};
use crate::key::LockKey;
use crate::mode::Mode;
use crate::protocol::link::{Backend, Link};
use crate::protocol::request::Op;
use crate::sql::{PIN, Scope, Sql};
use crate::worker::connect::pooler;
use crate::worker::reply::row_counts;

/// Something that runs statements: one database session.
pub(crate) trait Session {
    /// Runs `sql` (statements separated by `;`) as one query. On success `counts` holds each
    /// statement's row count, in order.
    fn run(&mut self, sql: &str, counts: &mut Vec<u64>) -> Result<(), Failed>;

    /// Runs `sql`, a single statement, and returns its row count.
    fn run_one(&mut self, sql: &str, counts: &mut Vec<u64>) -> Result<u64, Failed> {
        self.run(sql, counts)?;
        Ok(counts.first().copied().unwrap_or(0))
    }
}

/// Why a query failed.
#[derive(Debug)]
pub(crate) enum Failed {
    /// The server rejected a statement; the session is fine. In a multi-statement query the
    /// statements before it ran (and session locks keep their effect), those after it did not.
    Rejected(Error),
    /// The connection is unusable; what its last query did is unknown.
    Broken(Error),
}

impl Failed {
    /// The error, whichever way the query failed.
    pub(crate) fn into_error(self) -> Error {
        match self {
            Failed::Rejected(e) | Failed::Broken(e) => e,
        }
    }
}

/// A reusable statement buffer and the row counts of its last run.
#[derive(Debug, Default)]
pub(crate) struct Query {
    /// The statement text being built.
    pub(crate) sql: Sql,
    /// Row counts of the last run, one per statement.
    pub(crate) counts: Vec<u64>,
}

impl Query {
    pub(crate) fn new() -> Query {
        Query {
            sql: Sql::new(),
            counts: Vec::with_capacity(64),
        }
    }

    /// Runs the statements in the buffer.
    pub(crate) fn run(&mut self, session: &mut impl Session) -> Result<(), Failed> {
        session.run(self.sql.as_str(), &mut self.counts)
    }

    /// Runs one statement; `true` when it returned its row.
    pub(crate) fn one(
        &mut self,
        session: &mut impl Session,
        op: Op,
        mode: Mode,
        key: LockKey,
    ) -> Result<bool, Failed> {
        self.sql.clear();
        self.sql.push(op, mode, key);
        Ok(session.run_one(self.sql.as_str(), &mut self.counts)? == 1)
    }
}

/// How long one [`Conn::look`] drives the client: long enough for its I/O driver to read what
/// the socket holds, short enough that a request arriving meanwhile hardly waits.
const LOOK_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// The worker's connection: one generation's `postgres::Client`, every statement marked for the
/// monitor, so that none can stall unseen.
pub(crate) struct Conn {
    client: Client,
    link: Arc<Link>,
    /// The connection generation this client serves.
    pub(crate) generation: u64,
    /// The statement that proves this is still the connection's own session (`pooler::probe`),
    /// or, on a connection that keeps no session of its own, that it is alive.
    probe: String,
    /// Session or transaction locks.
    pub(crate) scope: Scope,
}

impl Conn {
    pub(crate) fn new(
        client: Client,
        link: Arc<Link>,
        generation: u64,
        backend: Backend,
        mark: Option<i64>,
        scope: Scope,
    ) -> Conn {
        Conn {
            client,
            link,
            generation,
            probe: match mark {
                Some(mark) => pooler::probe(backend.pid, mark),
                None => format!("{PIN}SELECT"),
            },
            scope,
        }
    }

    /// Proves the connection alive and its session its own, watched like every statement (the
    /// monitor gives it up past the stall limit). `Ok(false)`: a pooler shares the session.
    #[cold]
    #[inline(never)]
    pub(crate) fn heartbeat(&mut self) -> Result<bool, Failed> {
        let mark = self.link.watch.begin_statement(self.generation);
        let messages = watched(&mut self.client, &self.link, mark, &self.probe)?;
        Ok(messages
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::Row(_))))
    }

    /// Looks at the connection without a round trip: drives the client for at most
    /// [`LOOK_WAIT`], so that a session the server ended (its `FATAL` and close, or a reset) is
    /// read the moment it happened rather than at the next heartbeat. `Err`: the connection is
    /// gone. Nothing is sent; a live idle connection has nothing to read.
    #[cold]
    #[inline(never)]
    pub(crate) fn look(&mut self) -> Result<(), Failed> {
        use postgres::fallible_iterator::FallibleIterator;
        match self.client.notifications().timeout_iter(LOOK_WAIT).next() {
            Ok(_) => Ok(()),
            Err(e) => Err(Failed::Broken(Error::with_source(
                ErrorKind::ConnectionLost,
                "the server ended the connection",
                e,
            ))),
        }
    }

    /// Runs `sql` and returns its messages, rows included: for the statements that read values
    /// (tokens, slots, holders). Watched like every statement.
    #[inline]
    pub(crate) fn rows(&mut self, sql: &str) -> Result<Vec<SimpleQueryMessage>, Failed> {
        let mark = self.link.watch.begin_statement(self.generation);
        watched(&mut self.client, &self.link, mark, sql)
    }

    /// Runs `sql`, one statement, with the bound parameters `params` (the extended protocol, one
    /// round trip, no prepared statement left behind), watched as [`Conn::rows`] is; its row count.
    pub(crate) fn typed(
        &mut self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<u64, Failed> {
        let mark = self.link.watch.begin_statement(self.generation);
        let result = self.client.execute_typed(sql, params);
        self.link.watch.end_statement(mark);
        result.map_err(|e| classify(&self.client, e))
    }

    /// As [`Conn::rows`], for a statement that waits in PostgreSQL's lock queue until `deadline`
    /// at most (`None`: until granted): the monitor lets it run that long.
    pub(crate) fn rows_waiting(
        &mut self,
        sql: &str,
        deadline: Option<std::time::Instant>,
    ) -> Result<Vec<SimpleQueryMessage>, Failed> {
        let mark = self.link.watch.begin_wait(self.generation, deadline);
        watched(&mut self.client, &self.link, mark, sql)
    }
}

/// Runs `sql` as the statement `mark` the monitor watches, and sorts a failure into a rejected
/// statement or a broken connection.
#[inline(always)]
fn watched(
    client: &mut Client,
    link: &Link,
    mark: u64,
    sql: &str,
) -> Result<Vec<SimpleQueryMessage>, Failed> {
    let result = client.simple_query(sql);
    link.watch.end_statement(mark);
    result.map_err(|e| classify(client, e))
}

/// Sorts a failed query's error into a rejected statement or a broken connection.
#[cold]
fn classify(client: &Client, e: postgres::Error) -> Failed {
    if connection_failed(client, &e) {
        Failed::Broken(Error::with_source(
            ErrorKind::ConnectionLost,
            "the connection to the server failed",
            e,
        ))
    } else {
        Failed::Rejected(Error::from_query(e))
    }
}

impl Session for Conn {
    #[inline(never)]
    fn run(&mut self, sql: &str, counts: &mut Vec<u64>) -> Result<(), Failed> {
        let messages = self.rows(sql)?;
        counts.clear();
        counts.extend(row_counts(&messages));
        Ok(())
    }
}

/// True when `e` means the connection is unusable, as opposed to one statement failing.
fn connection_failed(client: &Client, e: &postgres::Error) -> bool {
    if client.is_closed() {
        return true;
    }
    match e.as_db_error() {
        None => true,
        Some(db) => {
            let code = db.code();
            // FATAL/PANIC end the session; class 57 (operator intervention: terminated, shutting
            // down) and class 08 (connection exception) too.
            matches!(db.severity(), "FATAL" | "PANIC")
                || *code == SqlState::ADMIN_SHUTDOWN
                || code.code().starts_with("57")
                || code.code().starts_with("08")
        }
    }
}

//! The typed error every fallible call of the library returns.

use std::borrow::Cow;
use std::fmt;

/// A `Result` whose error is the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong, for callers that match on the cause.
///
/// Returned by [`Error::kind`]. New kinds may be added in minor releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The connection parameters could not be parsed or are not usable.
    Config,
    /// The connection could not be established: the host refused or was unreachable, the password was
    /// wrong, the database does not exist, or the connect timeout passed.
    Connect,
    /// A call waited for the worker longer than its bound (`Builder::request_timeout`, or the
    /// connect timeout while connecting).
    Timeout,
    /// The connection to the server failed while the call was under way; locks it held are gone.
    ConnectionLost,
    /// The manager is reconnecting after losing its connection; calls fail fast until it is back.
    /// In transaction mode also: a lock transaction's connection could not be opened for a reason
    /// that may pass (the pooler or the server refused, restarted or did not answer). Waiting calls
    /// retry it until their deadline, in both modes.
    Offline,
    /// The guard's lock was not held by the session any more when it was used or released: the
    /// connection that took it has ended, so the server had already released it.
    LockLost,
    /// The worker has stopped (its connection is closed); the manager can no longer take locks.
    Shutdown,
    /// The manager already holds as many locks as it may: `Builder::max_locks`, or its share of
    /// the server's shared lock table (a quarter), whichever is smaller. The message says which.
    TooManyLocks,
    /// The server rejected a statement (the source is the server's error).
    Server,
    /// An operating-system call failed, such as spawning the worker thread.
    Io,
    /// The manager's server session is shared with other clients: a connection pooler in
    /// transaction or statement mode sits between it and PostgreSQL, and session advisory locks
    /// taken through it exclude nobody. Connect directly, or through session pooling. Once seen,
    /// every call of the manager returns it.
    Pooler,
    /// The server accepts advisory lock calls, but a lock the session takes does not show as
    /// held by it: locks there would exclude nobody. CockroachDB's advisory functions are stubs
    /// that return `true`; YugabyteDB before its advisory-lock support, with the "not supported"
    /// error silenced, turns every call into a no-op; other wire-compatible servers return no row
    /// or keep locks per node. (A schema ahead of `pg_catalog` on the role's `search_path` cannot
    /// shadow them: every function distlock calls is schema-qualified.) Every connect and
    /// reconnect proves, in the same
    /// round trip as the session's set-up and with the SQL the locks use, that a lock taken shows
    /// in `pg_locks` under the session's own backend; otherwise the connection is refused with
    /// this kind, and the message names what the server's `version()` says it is.
    NoExclusion,
    /// PostgreSQL found a deadlock while the call waited in its lock queue (two sessions each
    /// waiting for a lock the other holds) and ended this call's wait to break it. Nothing was
    /// acquired; release what the caller holds, and try again.
    Deadlock,
    /// A defect of distlock itself: one side of the manager answered the other with a reply the
    /// request never gets. Nothing about the server or the network; please report it.
    Internal,
}

/// The error of every fallible call in this crate.
///
/// Match on [`Error::kind`] or use the predicates. When the cause is a `postgres` error, it is
/// available through [`std::error::Error::source`] rather than pasted into the message.
pub struct Error {
    kind: ErrorKind,
    message: Cow<'static, str>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    /// A connect failure that may pass by itself: a refused or unreachable host, a standby, a
    /// server starting up or shutting down, no connection slot left (a timeout always may).
    passing: bool,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
            passing: false,
        }
    }

    pub(crate) fn with_source(
        kind: ErrorKind,
        message: impl Into<Cow<'static, str>>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error {
            kind,
            message: message.into(),
            source: Some(Box::new(source)),
            passing: false,
        }
    }

    /// Classifies an error of the `postgres` client that happened while a statement ran.
    pub(crate) fn from_query(err: postgres::Error) -> Error {
        if err.as_db_error().is_some() {
            Error::with_source(
                ErrorKind::Server,
                "the server rejected a lock statement",
                err,
            )
        } else {
            Error::with_source(
                ErrorKind::ConnectionLost,
                "the connection to the server failed",
                err,
            )
        }
    }

    /// This connect failure may pass by itself (see the field).
    pub(crate) fn passing(mut self) -> Error {
        self.passing = true;
        self
    }

    /// True for a connect failure that may pass by itself; see
    /// [`Builder::connect_retry`](crate::Builder::connect_retry).
    pub(crate) fn may_pass(&self) -> bool {
        self.passing || self.kind == ErrorKind::Timeout
    }

    /// The message, then each cause's, `: `-separated: the whole story in one line.
    pub(crate) fn chain(&self) -> String {
        let mut text = self.message.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            let more = c.to_string();
            if !more.is_empty() && !text.contains(&more) {
                text.push_str(": ");
                text.push_str(&more);
            }
            cause = c.source();
        }
        text
    }

    /// This error with `message` in place of its own; kind, cause and passing kept.
    pub(crate) fn reworded(mut self, message: String) -> Error {
        self.message = Cow::Owned(message);
        self
    }

    pub(crate) fn timeout(what: &'static str) -> Error {
        Error::new(ErrorKind::Timeout, what)
    }

    /// `refusal`: why the last reconnect attempt failed, if one has.
    pub(crate) fn offline(refusal: Option<&str>) -> Error {
        match refusal {
            None => Error::new(
                ErrorKind::Offline,
                "the lock manager is reconnecting to the server",
            ),
            Some(why) => Error::new(
                ErrorKind::Offline,
                format!("the lock manager is reconnecting to the server; the last attempt: {why}"),
            ),
        }
    }

    /// A connect failure that may pass (a refused, unreachable or restarting pooler or server)
    /// as [`ErrorKind::Offline`], which waiting calls retry until their deadline; others as they
    /// are.
    #[cold]
    pub(crate) fn offline_if_passing(self) -> Error {
        if self.kind != ErrorKind::Connect || !self.passing {
            return self;
        }
        let message = format!(
            "could not open a connection for a lock transaction (the pooler or the server may be \
             restarting): {}",
            self.message
        );
        Error {
            kind: ErrorKind::Offline,
            message: message.into(),
            ..self
        }
    }

    #[cold]
    pub(crate) fn pooler() -> Error {
        Error::new(
            ErrorKind::Pooler,
            "the server session is shared with other clients, or the statements of this session \
             run in different backends: a connection pooler in transaction or statement mode \
             (pgbouncer pool_mode=transaction or statement) hands this manager's statements to \
             sessions others use, or a proxy routes them between servers (pgcat or pgdog query \
             routing, a pgpool-II that ignores /*NO LOAD BALANCE*/), and session advisory locks \
             then exclude nobody. Connect to PostgreSQL directly, through session pooling \
             (pool_mode=session), or turn the proxy's read routing off for this database; \
             behind a transaction pooler, use transaction mode \
             (Builder::transaction_pooler(true), distlock --transaction-pooler), where each lock \
             lives in a transaction of its own",
        )
    }

    /// A call transaction mode does not offer.
    #[cold]
    pub(crate) fn not_in_transaction_mode() -> Error {
        Error::new(
            ErrorKind::Config,
            "in transaction mode (Builder::transaction_pooler) the manager's own connection \
             shares its server session through the pooler and takes no lock: every lock lives in \
             a lock transaction of its own",
        )
    }

    /// Transaction mode: the manager already keeps its most lock transactions open.
    #[cold]
    pub(crate) fn too_many_transactions() -> Error {
        Error::new(
            ErrorKind::TooManyLocks,
            "this manager already keeps Builder::max_transactions lock transactions open (locks \
             held and waits in progress), each pinning a server connection through the pooler; \
             drop guards, or raise max_transactions if the pooler's pool has room",
        )
    }

    /// A reply of a kind the request never gets: a defect, reported rather than trusted.
    #[cold]
    pub(crate) fn unexpected(reply: &dyn fmt::Debug) -> Error {
        Error::new(
            ErrorKind::Internal,
            format!("the lock manager's worker gave an unexpected reply: {reply:?}"),
        )
    }

    /// A wait without a deadline ends only with a grant or an error; this is its error if it
    /// ever ended otherwise.
    #[cold]
    pub(crate) fn wait_ended() -> Error {
        Error::new(ErrorKind::Timeout, "lock wait ended without a deadline")
    }

    /// The error of a request whose connection failed before or while it ran.
    pub(crate) fn connection_lost() -> Error {
        Error::new(
            ErrorKind::ConnectionLost,
            "the connection to the server was lost",
        )
    }

    /// A lost lock's error; `cause`: why its connection ended, as the server or a pooler said.
    pub(crate) fn lock_lost(cause: Option<&str>) -> Error {
        match cause {
            None => Error::new(
                ErrorKind::LockLost,
                "the lock was lost: the connection that held it ended",
            ),
            Some(why) => Error::new(
                ErrorKind::LockLost,
                format!("the lock was lost: the connection that held it ended: {why}"),
            ),
        }
    }

    pub(crate) fn shutdown() -> Error {
        Error::new(ErrorKind::Shutdown, "the lock manager's worker has stopped")
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The SQLSTATE of the server error behind this one, if any.
    pub(crate) fn sql_state(&self) -> Option<&postgres::error::SqlState> {
        self.source
            .as_deref()
            .and_then(|s| s.downcast_ref::<postgres::Error>())
            .and_then(postgres::Error::code)
    }

    /// True when a call waited longer than its bound.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }

    /// True when the connection failed or the lock was found lost; locks of that connection are gone.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self.kind, ErrorKind::ConnectionLost | ErrorKind::LockLost)
    }

    /// True for failures that may pass by themselves: a timeout, a lost connection, or a manager
    /// that is reconnecting. Waiting calls (`lock`, `try_lock_for`) retry these until their deadline.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Timeout | ErrorKind::ConnectionLost | ErrorKind::Offline
        )
    }

    /// True when the manager's worker has stopped for good.
    pub fn is_shutdown(&self) -> bool {
        self.kind == ErrorKind::Shutdown
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_the_request_never_gets_is_distlocks_defect_not_the_servers() {
        let err = Error::unexpected(&"Busy");
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert!(!err.is_transient());
    }
}

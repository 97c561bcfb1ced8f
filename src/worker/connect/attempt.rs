//! One connect attempt at one host: connect, identify the backend, refuse what cannot serve
//! locks (a standby, a session a pooler shares), and set the session up with its exclusion proof.

use postgres::error::SqlState;
use postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

use crate::error::{Error, ErrorKind};
use crate::libpq::tls;
use crate::protocol::link::Backend;
use crate::sql::keepalive::ServerKeepalive;
use crate::sql::{IDENTIFY, PROOF_STATEMENTS, Scope, Sql};
use crate::worker::connect::pooler;
use crate::worker::reply::row_counts;

/// What a manager's connection is for, which decides what its set-up may do: asked by name
/// ([`Role::heartbeats`], [`Role::scope`], ...) wherever it matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A lock session: session advisory locks, held as long as the connection.
    LockSession,
    /// Through a transaction pooler, a manager's own connection: it holds no lock and keeps no
    /// session state (the pooler shares the server session), and only reads (`holders`, tokens,
    /// names).
    Coordinator,
    /// Through a transaction pooler, one lock's connection: everything it does runs in one open
    /// transaction (which keeps one server connection pinned), and its locks are transaction
    /// locks, released when the transaction ends.
    LockTransaction,
}

impl Role {
    /// Whether the connection holds locks, so that a heartbeat must prove it alive and a loss
    /// be told (a coordinator's connection holds none, and each statement of it takes a pooler's
    /// server connection: it stays quiet).
    pub(crate) fn heartbeats(self) -> bool {
        self != Role::Coordinator
    }

    /// Whether the connection's server session is its own, to set up, mark and prove unshared.
    pub(crate) fn owns_its_session(self) -> bool {
        self == Role::LockSession
    }

    /// Whether everything the connection does runs in one open transaction.
    pub(crate) fn in_one_transaction(self) -> bool {
        self == Role::LockTransaction
    }

    /// The scope of the locks the connection takes.
    pub(crate) fn scope(self) -> Scope {
        if self.in_one_transaction() {
            Scope::Transaction
        } else {
            Scope::Session
        }
    }
}

/// Column `i` of the identifying row, parsed from its text.
fn field<T: std::str::FromStr>(row: &SimpleQueryRow, i: usize) -> Result<T, Error> {
    row.get(i)
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Server,
                format!("the server's identifying row has no readable column {i}"),
            )
        })
}

/// A boolean column of the identifying row (`t` or `f`).
fn flag(row: &SimpleQueryRow, i: usize) -> Result<bool, Error> {
    match row.get(i) {
        Some("t") => Ok(true),
        Some("f") => Ok(false),
        _ => Err(Error::new(
            ErrorKind::Server,
            format!("the server's identifying row has no boolean column {i}"),
        )),
    }
}

/// What one attempt brings: a client and its backend, or why not.
pub(crate) type Attempt = Result<(Client, Backend, Facts), Error>;

/// One attempt: connect, ask the server who we are, and refuse a standby unless allowed; a lock
/// session is set up, and with `prove_unshared` proven not to be shared through a pooler
/// ([`pooler::shared_by_pooler`]).
pub(super) fn attempt(
    config: &postgres::Config,
    tls: &tls::Connector,
    allow_standby: bool,
    keepalive: Option<ServerKeepalive>,
    salt: u64,
    role: Role,
    prove_unshared: bool,
) -> Attempt {
    #[cfg(test)]
    fault::slow_connect(config);
    let started = std::time::Instant::now();
    let mut client = tls.connect(config).map_err(classify)?;
    if role.in_one_transaction() {
        return begin_transaction(client, allow_standby, keepalive, salt);
    }
    // The simple protocol, as for every statement: a transaction pooler (pgbouncer before 1.21)
    // cannot carry the named statements the extended protocol would prepare.
    let messages = client.simple_query(IDENTIFY).map_err(classify)?;
    let (backend, facts) = identify(&messages, allow_standby, role)?;
    match role {
        // Nothing of the session is set: a transaction pooler shares it with other clients.
        Role::Coordinator | Role::LockTransaction => {}
        Role::LockSession => {
            set_up(&mut client, &backend, &facts, keepalive, salt)?;
            if prove_unshared {
                let mark = pooler::session_mark(salt, &backend);
                let (config, tls) = (config.clone(), tls.clone());
                let within = pooler::helper_wait(started.elapsed());
                let helper = move || tls.connect(&config);
                if pooler::shared_by_pooler(&mut client, helper, within, &backend, mark)
                    .map_err(classify)?
                {
                    return Err(Error::pooler());
                }
            }
        }
    }
    Ok((client, backend, facts))
}

/// A lock transaction's start, in one round trip: the transaction (which the pooler keeps on one
/// server connection while it is open; READ COMMITTED whatever the cluster's default, so that no
/// snapshot outlives a statement), its own settings and mark, the exclusion proof, and the
/// identifying row.
fn begin_transaction(
    mut client: Client,
    allow_standby: bool,
    keepalive: Option<ServerKeepalive>,
    salt: u64,
) -> Attempt {
    let mut start = Sql::new();
    start.push_transaction_start(salt, keepalive);
    start.push_exclusion_proof(pooler::transaction_mark(salt, 0));
    start.push_identify();
    let messages = match client.simple_query(start.as_str()) {
        Ok(messages) => messages,
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_FUNCTION) => {
            return Err(no_exclusion("", "an advisory lock function is missing", e));
        }
        Err(e) => return Err(classify(e)),
    };
    let (backend, facts) = identify(&messages, allow_standby, Role::LockTransaction)?;
    let counts: Vec<u64> = row_counts(&messages).collect();
    // The proof's statements come right before the identifying one.
    let end = counts.len().saturating_sub(1);
    let proof = &counts[end.saturating_sub(PROOF_STATEMENTS)..end];
    if proof.len() == PROOF_STATEMENTS && proof.iter().all(|&rows| rows == 1) {
        return Ok((client, backend, facts));
    }
    Err(no_exclusion(
        &facts.version,
        "a lock this session took does not show as held by it in pg_locks",
        Unproven(proof.to_vec()),
    ))
}

/// The backend and the facts of the identifying row among `messages`; refuses a standby unless
/// allowed, and a lock session already marked by another client.
fn identify(
    messages: &[SimpleQueryMessage],
    allow_standby: bool,
    role: Role,
) -> Result<(Backend, Facts), Error> {
    // The last row: a lock transaction's start returns the proof's rows before it.
    let row = messages
        .iter()
        .rev()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .ok_or_else(|| Error::new(ErrorKind::Server, "the server did not identify the session"))?;
    let backend = Backend {
        pid: field(row, 0)?,
        started_us: field(row, 1)?,
    };
    // A session of our own has never been marked; one that has is shared with another client
    // through a pooler (or was left to us by one without a reset).
    if flag(row, 4)? && role.owns_its_session() {
        return Err(Error::pooler());
    }
    if flag(row, 2)? && !allow_standby {
        // Dropping the client closes the connection.
        return Err(Error::new(
            ErrorKind::Connect,
            "refusing a standby: the server is in recovery (a read replica), and advisory locks \
             taken there exclude nobody on the primary. Connect to the primary (with several \
             hosts, add target_session_attrs=read-write; behind a proxy, make it route this \
             database's statements to the primary), or allow it with \
             Builder::allow_standby(true)",
        )
        .passing());
    }
    let facts = Facts {
        version_num: field(row, 3)?,
        version: field(row, 5)?,
        lock_table: field(row, 6)?,
    };
    if facts.version_num < OLDEST_SUPPORTED {
        return Err(Error::new(
            ErrorKind::Connect,
            format!(
                "refusing PostgreSQL {}.{} (the server says: {}): distlock supports PostgreSQL \
                 {} and later, whose servers can hold a lock session's lease \
                 (idle_session_timeout); upgrade the server",
                facts.version_num / 10_000,
                facts.version_num % 10_000,
                facts.version,
                OLDEST_SUPPORTED / 10_000
            ),
        ));
    }
    Ok((backend, facts))
}

/// The oldest server version distlock supports (`server_version_num`): PostgreSQL 14, the first
/// with `idle_session_timeout`, which keeps the lease of a lock session behind a proxy.
const OLDEST_SUPPORTED: i32 = 140_000;

/// What the server said of itself when a session was identified.
#[derive(Debug, Clone)]
pub(crate) struct Facts {
    /// `server_version_num`.
    version_num: i32,
    /// `version()`: what the server says it is.
    version: String,
    /// Entries of the server's shared lock table.
    pub(crate) lock_table: i64,
}

/// A new lock session's set-up and proof, in one round trip. The session lives as long as its
/// locks: no culls, and a vanished client is noticed. And its locks must exclude: a lock it takes
/// must show in `pg_locks` as held by it (see [`Sql::push_exclusion_proof`]); a server whose
/// advisory functions accept calls and exclude nobody is refused.
fn set_up(
    client: &mut Client,
    backend: &Backend,
    facts: &Facts,
    keepalive: Option<ServerKeepalive>,
    salt: u64,
) -> Result<(), Error> {
    let mark = pooler::session_mark(salt, backend);
    let mut setup = Sql::new();
    setup.push_session_setup(facts.version_num, keepalive, mark);
    setup.push_exclusion_proof(mark);
    let messages = match client.simple_query(setup.as_str()) {
        Ok(messages) => messages,
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_FUNCTION) => {
            return Err(no_exclusion(
                &facts.version,
                "an advisory lock function is missing",
                e,
            ));
        }
        Err(e) => return Err(classify(e)),
    };
    let counts: Vec<u64> = row_counts(&messages).collect();
    let proof = &counts[counts.len().saturating_sub(PROOF_STATEMENTS)..];
    if proof.len() == PROOF_STATEMENTS && proof.iter().all(|&rows| rows == 1) {
        return Ok(());
    }
    Err(no_exclusion(
        &facts.version,
        "a lock this session took does not show as held by it in pg_locks",
        Unproven(proof.to_vec()),
    ))
}

/// The error of a server whose locks would exclude nobody.
fn no_exclusion(
    version: &str,
    why: &str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::with_source(
        ErrorKind::NoExclusion,
        format!(
            "refusing a server whose advisory locks would exclude nobody: {why}. The server \
             says it is {version:?}; lock with a PostgreSQL server (or one whose advisory locks \
             are real), or check that no schema on the role's search_path shadows the \
             pg_catalog advisory lock functions"
        ),
        source,
    )
}

/// The row counts of an exclusion proof that failed (each statement should return one row).
#[derive(Debug)]
struct Unproven(Vec<u64>);

impl std::fmt::Display for Unproven {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rows of the exclusion proof's statements: {:?}", self.0)
    }
}

impl std::error::Error for Unproven {}

/// A failed attempt's kind: the client's own TCP connect timeout is a timeout like ours.
fn classify(e: postgres::Error) -> Error {
    let timed_out = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
    if timed_out {
        Error::with_source(ErrorKind::Timeout, "timed out connecting to the server", e)
    } else if let Some(why) = tls::explain(&e) {
        Error::with_source(
            ErrorKind::Connect,
            format!("could not connect to the server: {why}"),
            e,
        )
    } else if let Some(db) = e.as_db_error() {
        // The server's own reason (a refused password, no pg_hba.conf entry, a missing client
        // certificate): what a user needs to fix it. It never contains the password.
        let why = format!(
            "could not connect to the server: {}: {}",
            db.severity(),
            db.message()
        );
        // Starting up, shutting down, in recovery, or out of connection slots: it may pass.
        let passing = matches!(db.code().code(), "57P01" | "57P03" | "53300");
        let error = Error::with_source(ErrorKind::Connect, why, e);
        if passing { error.passing() } else { error }
    } else {
        // Refused, unreachable, reset — an I/O failure — or closed by the peer during start-up
        // (a pooler or server going down): the host may come back; anything else (a password
        // the client lacks, say) stays as it is.
        let io = e.is_closed()
            || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        let error = Error::with_source(ErrorKind::Connect, "could not connect to the server", e);
        if io { error.passing() } else { error }
    }
}

/// Test-only: makes connecting slow the way a loaded server can.
#[cfg(test)]
pub(crate) mod fault {
    use std::time::Duration;

    use parking_lot::Mutex;

    /// Connections whose application name starts with the text take the duration longer.
    pub(crate) static SLOW_CONNECT: Mutex<Option<(String, Duration)>> = Mutex::new(None);

    pub(crate) fn slow_connect(config: &postgres::Config) {
        let slow = SLOW_CONNECT.lock().clone();
        if let (Some((prefix, delay)), Some(name)) = (slow, config.get_application_name()) {
            if name.starts_with(&prefix) {
                std::thread::sleep(delay);
            }
        }
    }
}

//! Connecting: one attempt in flight per manager, bounded by the connect timeout.
//!
//! The blocking client bounds only the TCP connect itself: a server that accepts the connection
//! but never answers its start-up (a stopped postmaster, an overloaded pooler) would hold the
//! worker for as long as TCP keeps the socket. So each attempt runs on a helper thread and the
//! worker waits for it until the connect timeout. An attempt that outlives its timeout is not
//! forgotten: it stays the manager's one attempt in flight, the next connect waits for it instead of
//! starting another, and when it does finish it is closed at once (its result is too late to
//! trust, and a server that resumes must not receive a burst of connections it is expected to
//! keep). Exactly one of the helper and the waiting worker decides what becomes of a result, under
//! the attempt's lock.
//!
//! A new session's set-up lives here too: its first statement ends the backends of lost
//! connections ([`end_suspects`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Select, TryRecvError};
use parking_lot::Mutex;
use postgres::Client;
use postgres::error::SqlState;

use crate::error::{Error, ErrorKind};
use crate::protocol::link::{Backend, Link, Site};
use crate::worker::session::{Conn, Failed, Query, row_counts};
use crate::worker::sql::{IDENTIFY, PROOF_STATEMENTS, ServerKeepalive, Sql};

mod certs;
pub(crate) mod params;
pub(crate) mod pooler;
pub(crate) mod tls;

/// What one attempt brings: a client and its backend, or why not.
pub(crate) type Attempt = Result<(Client, Backend, Facts), Error>;

/// Makes the manager's connections, one attempt at a time.
pub(crate) struct Connector {
    /// How to connect (with the builder's settings applied).
    config: postgres::Config,
    /// Plaintext, or TLS that checks what `sslmode` asks for.
    tls: tls::Connector,
    /// Bound on one attempt, all steps together.
    timeout: Duration,
    /// Whether a standby (a server in recovery) may serve locks.
    allow_standby: bool,
    /// The server-side keepalives each lock session sets, if any.
    keepalive: Option<ServerKeepalive>,
    /// The attempt still running after its caller stopped waiting, if any.
    in_flight: Mutex<Option<InFlight>>,
    /// Makes this manager's session marks differ from every other client's (see `session_mark`).
    salt: u64,
    /// Entries of the shared lock table of the server last connected to.
    lock_table: AtomicI64,
}

/// An attempt whose caller timed out: the helper still runs, and closes what it gets.
struct InFlight {
    /// Disconnects when the helper thread has finished.
    done: Receiver<Attempt>,
}

impl Connector {
    pub(crate) fn new(
        config: postgres::Config,
        tls: tls::Connector,
        timeout: Duration,
        allow_standby: bool,
        keepalive: Option<ServerKeepalive>,
    ) -> Connector {
        Connector {
            config,
            tls,
            allow_standby,
            keepalive,
            timeout,
            in_flight: Mutex::new(None),
            salt: pooler::random_salt(),
            lock_table: AtomicI64::new(0),
        }
    }

    /// The mark this manager sets in `backend`'s session (`distlock.session`) and later expects
    /// to read there: a session that shows another mark, or a statement that runs in another
    /// backend, means a pooler shares the session. Different for every connection of every
    /// manager.
    pub(crate) fn session_mark(&self, backend: &Backend) -> i64 {
        pooler::session_mark(self.salt, backend)
    }

    /// Connects within the connect timeout (TCP, start-up and authentication together) and
    /// identifies the backend. Never starts a second attempt while one is still running.
    pub(crate) fn connect(&self) -> Result<(Client, Backend), Error> {
        self.connect_while(&mut await_attempt)
    }

    /// As [`Connector::connect`], handing the time it waits for the attempt to `idle`: called
    /// with the attempt's channel and how long it may take at most, it returns when it has done
    /// its own work (a worker answers the requests that queue meanwhile) and the attempt may be
    /// ready, or that time has passed.
    pub(crate) fn connect_while(&self, idle: &mut Idle<'_>) -> Result<(Client, Backend), Error> {
        let (client, backend, facts) = self.attempt_while(idle)?;
        self.lock_table.store(facts.lock_table, Ordering::Relaxed);
        Ok((client, backend))
    }

    /// Entries of the shared lock table of the server last connected to (0 before a connect).
    pub(crate) fn lock_table(&self) -> i64 {
        self.lock_table.load(Ordering::Relaxed)
    }

    fn attempt_while(&self, idle: &mut Idle<'_>) -> Attempt {
        // `None` when the timeout is too large to add to now: no bound of ours, as asked.
        let deadline = Instant::now().checked_add(self.timeout);
        let mut in_flight = self.in_flight.lock();
        if let Some(earlier) = in_flight.take() {
            // Its result was abandoned (the helper closes it); wait for the helper to finish.
            match recv_while(&earlier.done, deadline, idle) {
                Err(RecvTimeoutError::Timeout) => {
                    *in_flight = Some(earlier);
                    return Err(Error::timeout(
                        "timed out connecting to the server (an earlier attempt is still waiting \
                         for its answer)",
                    ));
                }
                Ok(_) | Err(RecvTimeoutError::Disconnected) => {}
            }
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        // Whoever takes this lock second learns the other's decision: the helper, that its result
        // is unwanted; the waiter, that the result is already there.
        let abandoned = Arc::new(Mutex::new(false));
        let helper_abandoned = Arc::clone(&abandoned);
        let config = self.config.clone();
        let tls = self.tls.clone();
        let (allow_standby, keepalive, salt) = (self.allow_standby, self.keepalive, self.salt);
        thread::Builder::new()
            .name("distlock-connect".into())
            .spawn(move || {
                let attempt = attempt(&config, &tls, allow_standby, keepalive, salt);
                let abandoned = helper_abandoned.lock();
                if !*abandoned {
                    let _ = tx.send(attempt);
                }
                // Otherwise `attempt` drops here, closing a connection nobody waits for.
            })
            .map_err(|e| {
                Error::with_source(ErrorKind::Io, "could not spawn a connect thread", e)
            })?;
        match recv_while(&rx, deadline, idle) {
            Ok(result) => result,
            Err(RecvTimeoutError::Disconnected) => Err(Error::new(
                ErrorKind::Connect,
                "the connect thread ended without an answer",
            )),
            Err(RecvTimeoutError::Timeout) => {
                let mut gave_up = abandoned.lock();
                match rx.try_recv() {
                    Ok(result) => result, // it finished just in time
                    Err(_) => {
                        *gave_up = true;
                        drop(gave_up);
                        *in_flight = Some(InFlight { done: rx });
                        Err(Error::timeout("timed out connecting to the server"))
                    }
                }
            }
        }
    }
}

/// A new connection's first statement: end the backends of lost connections that may still hold
/// locks (a stalled backend resumes with its locks), each matched by pid and start time so that a
/// reused pid is never touched. Those it cannot end are kept for the next connection. `Err` when
/// the new connection itself failed meanwhile.
pub(crate) fn end_suspects(
    conn: &mut Conn,
    query: &mut Query,
    link: &Link,
    suspects: Vec<Backend>,
) -> Result<(), Error> {
    if suspects.is_empty() {
        return Ok(());
    }
    link.hook(Site::BeforeEndSuspects);
    query.sql.clear();
    for s in &suspects {
        query.sql.push_terminate(s.pid, s.started_us);
    }
    match query.run(conn) {
        Ok(()) => Ok(()),
        Err(failed) => {
            link.keep_suspects(suspects);
            match failed {
                Failed::Rejected(e) => {
                    log::warn!(
                        "distlock worker: could not end the backends of lost connections: {e}"
                    );
                    Ok(())
                }
                Failed::Broken(e) => Err(e),
            }
        }
    }
}

/// One attempt: connect, ask the server who we are, and refuse a standby unless allowed.
fn attempt(
    config: &postgres::Config,
    tls: &tls::Connector,
    allow_standby: bool,
    keepalive: Option<ServerKeepalive>,
    salt: u64,
) -> Attempt {
    #[cfg(test)]
    fault::slow_connect(config);
    let mut client = tls.connect(config).map_err(classify)?;
    let row = client.query_one(IDENTIFY, &[]).map_err(classify)?;
    let backend = Backend {
        pid: row.try_get(0).map_err(classify)?,
        started_us: row.try_get(1).map_err(classify)?,
    };
    // A session of our own has never been marked; one that has is shared with another client
    // through a pooler (or was left to us by one without a reset).
    let marked: bool = row.try_get(4).map_err(classify)?;
    if marked {
        return Err(Error::pooler());
    }
    let standby: bool = row.try_get(2).map_err(classify)?;
    if standby && !allow_standby {
        // Dropping the client closes the connection.
        return Err(Error::new(
            ErrorKind::Connect,
            "refusing a standby: the server is in recovery (a read replica), and advisory locks \
             taken there exclude nobody on the primary. Connect to the primary (with several \
             hosts, add target_session_attrs=read-write; behind a proxy, make it route this \
             database's statements to the primary), or allow it with \
             Builder::allow_standby(true)",
        ));
    }
    let facts = Facts {
        version_num: row.try_get(3).map_err(classify)?,
        version: row.try_get(5).map_err(classify)?,
        lock_table: row.try_get(6).map_err(classify)?,
    };
    set_up(&mut client, &backend, &facts, keepalive, salt)?;
    Ok((client, backend, facts))
}

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

/// What waits for a connect attempt: see [`Connector::connect_while`].
pub(crate) type Idle<'a> = dyn FnMut(&Receiver<Attempt>, Duration) + 'a;

/// Waits up to `left` for `attempt` to be ready, without taking its result.
pub(crate) fn await_attempt(attempt: &Receiver<Attempt>, left: Duration) {
    let mut ready = Select::new();
    ready.recv(attempt);
    let _ = ready.ready_timeout(left);
}

/// The longest turn `idle` is given while an attempt has no deadline of its own.
const LONGEST_IDLE_TURN: Duration = Duration::from_secs(1);

/// Receives the attempt from `rx` until `deadline`, handing the waiting to `idle`.
fn recv_while(
    rx: &Receiver<Attempt>,
    deadline: Option<Instant>,
    idle: &mut Idle<'_>,
) -> Result<Attempt, RecvTimeoutError> {
    loop {
        match rx.try_recv() {
            Ok(attempt) => return Ok(attempt),
            Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
            Err(TryRecvError::Empty) => {}
        }
        let left = match deadline {
            None => LONGEST_IDLE_TURN,
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => return Err(RecvTimeoutError::Timeout),
            },
        };
        idle(rx, left);
    }
}

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
    } else {
        Error::with_source(ErrorKind::Connect, "could not connect to the server", e)
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

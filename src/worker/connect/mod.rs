//! Connecting: one attempt in flight per host, each bounded by the connect timeout.
//!
//! The blocking client bounds only the TCP connect itself: a server that accepts the connection
//! but never answers its start-up (a stopped postmaster, an overloaded pooler) would hold the
//! worker for as long as TCP keeps the socket. So each attempt runs on a helper thread and the
//! worker waits for it until the connect timeout. An attempt that outlives its timeout is not
//! forgotten: it stays the host's one attempt in flight, the next connect to that host waits for
//! it instead of starting another (with other hosts to try, it moves on to them at once), and when
//! it does finish it is closed at once (its result is too late to trust, and a server that resumes
//! must not receive a burst of connections it is expected to keep). Exactly one of the helper and
//! the waiting worker decides what becomes of a result, under the attempt's lock.
//!
//! With several hosts, each is tried in turn within a connect timeout of its own, as libpq does:
//! handed the whole list, the client would spend one timeout on the first host that accepts TCP
//! and never answers, and never reach the next (the promoted standby of a failover whose old
//! primary went silent).
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

use crate::error::{Error, ErrorKind};
use crate::libpq::{params, tls};
use crate::protocol::link::{Backend, Link, Site};
use crate::sql::keepalive::ServerKeepalive;
pub(crate) use crate::worker::connect::attempt::Role;
use crate::worker::connect::attempt::{Attempt, attempt};
use crate::worker::session::{Conn, Failed, Query};

pub(crate) mod attempt;
pub(crate) mod pooler;

/// Makes the manager's connections, one attempt at a time.
pub(crate) struct Connector {
    /// What the connections are for.
    pub(crate) role: Role,
    /// Whether each lock session is proven, when it is opened, not to be shared through a pooler
    /// (a manager's own connection; its waiting connections go through the same endpoint).
    prove_unshared: bool,
    /// How to connect to each host, in the order given (with the builder's settings applied).
    hosts: Vec<postgres::Config>,
    /// Whether to try the hosts in a random order (`load_balance_hosts=random`).
    shuffle: bool,
    /// Plaintext, or TLS that checks what `sslmode` asks for.
    tls: tls::Connector,
    /// Bound on one attempt at one host, all steps together.
    timeout: Duration,
    /// Whether a standby (a server in recovery) may serve locks.
    allow_standby: bool,
    /// The server-side keepalives each lock session sets, if any.
    keepalive: Option<ServerKeepalive>,
    /// Per host, the attempt still running after its caller stopped waiting, if any.
    in_flight: Vec<Mutex<Option<InFlight>>>,
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
        role: Role,
        prove_unshared: bool,
    ) -> Connector {
        let hosts = params::each_host(&config);
        Connector {
            role,
            prove_unshared,
            in_flight: hosts.iter().map(|_| Mutex::new(None)).collect(),
            hosts,
            shuffle: config.get_load_balance_hosts() == postgres::config::LoadBalanceHosts::Random,
            tls,
            allow_standby,
            keepalive,
            timeout,
            salt: pooler::random_salt(),
            lock_table: AtomicI64::new(0),
        }
    }

    /// The mark this manager sets in `backend`'s session (`distlock.session`) and later expects
    /// to read there: a session that shows another mark, or a statement that runs in another
    /// backend, means a pooler shares the session. Different for every connection of every
    /// manager.
    pub(crate) fn session_mark(&self, backend: &Backend) -> i64 {
        if self.role.in_one_transaction() {
            pooler::transaction_mark(self.salt, backend.pid)
        } else {
            pooler::session_mark(self.salt, backend)
        }
    }

    /// Connects within the connect timeout per host (TCP, start-up and authentication together)
    /// and identifies the backend. Never starts a second attempt at a host while one is still
    /// running.
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

    /// The longest a connect can take: a connect timeout for each host.
    pub(crate) fn bound(&self) -> Duration {
        self.timeout
            .saturating_mul(u32::try_from(self.hosts.len()).unwrap_or(u32::MAX))
    }

    /// Tries the hosts in turn until one serves. The error, when none does, has the kind of the
    /// first that says more than a timeout (a refused password, a standby), else the last's, and
    /// with several hosts its message names every host and why it failed.
    fn attempt_while(&self, idle: &mut Idle<'_>) -> Attempt {
        let mut order: Vec<usize> = (0..self.hosts.len()).collect();
        if self.shuffle {
            shuffle(&mut order);
        }
        let mut telling: Option<Error> = None;
        let mut last = None;
        let mut each = Vec::new();
        for i in order {
            match self.attempt_host(i, idle) {
                Ok(attempt) => return Ok(attempt),
                Err(e) => {
                    if self.hosts.len() > 1 {
                        log::debug!("distlock: host {} of {}: {e}", i + 1, self.hosts.len());
                        each.push(format!(
                            "{}: {}",
                            params::host_label(&self.hosts[i]),
                            e.chain()
                        ));
                    }
                    if telling.is_none() && e.kind() != ErrorKind::Timeout {
                        telling = Some(e);
                    } else {
                        last = Some(e);
                    }
                }
            }
        }
        let error = telling
            .or(last)
            .unwrap_or_else(|| Error::new(ErrorKind::Config, "no host to connect to"));
        if each.len() > 1 {
            let message = format!(
                "could not connect to any of the {} hosts: {}",
                each.len(),
                each.join("; ")
            );
            return Err(error.reworded(message));
        }
        Err(error)
    }

    /// One attempt at host `i`, within the connect timeout.
    fn attempt_host(&self, i: usize, idle: &mut Idle<'_>) -> Attempt {
        // `None` when the timeout is too large to add to now: no bound of ours, as asked.
        let deadline = Instant::now().checked_add(self.timeout);
        let mut in_flight = self.in_flight[i].lock();
        if let Some(earlier) = in_flight.take() {
            // Its result was abandoned (the helper closes it); wait for the helper to finish —
            // or, with other hosts to try, only look.
            let wait_until = if self.hosts.len() > 1 {
                Some(Instant::now())
            } else {
                deadline
            };
            match recv_while(&earlier.done, wait_until, idle) {
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
        let config = self.hosts[i].clone();
        let tls = self.tls.clone();
        let (allow_standby, keepalive, salt) = (self.allow_standby, self.keepalive, self.salt);
        let (role, prove_unshared) = (self.role, self.prove_unshared);
        thread::Builder::new()
            .name("distlock-connect".into())
            .spawn(move || {
                let attempt = attempt(
                    &config,
                    &tls,
                    allow_standby,
                    keepalive,
                    salt,
                    role,
                    prove_unshared,
                );
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
                        Err(Error::timeout(if self.role.owns_its_session() {
                            "timed out connecting to the server"
                        } else {
                            "timed out getting a server connection through the transaction \
                             pooler: its pool may be exhausted (pgbouncer: default_pool_size, \
                             max_db_connections, reserve_pool_size) or the server slow"
                        }))
                    }
                }
            }
        }
    }
}

/// Puts `order` in a random order (Fisher–Yates, seeded by the standard library's hasher keys).
fn shuffle(order: &mut [usize]) {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    for i in (1..order.len()).rev() {
        h.write_usize(i);
        let j = (h.finish() % (i as u64 + 1)) as usize;
        order.swap(i, j);
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
            link.generations.keep_suspects(suspects);
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

//! The thread that owns the `postgres::Client`: it serves requests, checks the connection while
//! idle, and reconnects after a loss.
//!
//! One worker serves at a time. If its connection stalls inside a statement, the monitor
//! ([`crate::monitor`]) declares the generation lost and starts a replacement on the same queue;
//! the stalled worker, if it ever wakes, sees that it is no longer current and exits.

use std::io;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use postgres::error::SqlState;
use postgres::{Client, SimpleQueryMessage};

use crate::backoff::Backoff;
use crate::error::{Error, ErrorKind};
use crate::key::LockKey;
use crate::link::{Backend, Lease, Link};
use crate::reply::{Reply, Request};
use crate::sql::{IDENTIFY, Mode, Op, Sql};

/// The first and the largest pause between two reconnect attempts.
const FIRST_RECONNECT: Duration = Duration::from_millis(50);
const MAX_RECONNECT: Duration = Duration::from_secs(2);

/// Everything a worker needs; the monitor keeps a copy to start a replacement.
#[derive(Clone)]
pub(crate) struct Spec {
    /// How to connect (with the builder's settings applied).
    pub(crate) config: postgres::Config,
    /// The manager's queue, shared with any replacement.
    pub(crate) requests: Receiver<Request>,
    /// The connection state shared with callers, guards and the monitor.
    pub(crate) link: Arc<Link>,
    /// Idle time after which the worker checks its connection.
    pub(crate) heartbeat: Duration,
    /// Bound on a heartbeat's round trip.
    pub(crate) request_timeout: Duration,
    /// Bound on one connection attempt, all steps together.
    pub(crate) connect_timeout: Duration,
}

/// How a connection's service ended.
enum End {
    /// Every handle and guard is gone.
    ManagerGone,
    /// The connection failed; reconnect.
    Lost,
    /// The monitor declared this worker's generation lost and started a replacement.
    Superseded,
}

/// Starts a worker that reports its first connection on `ready` and gives up if that fails.
pub(crate) fn start_first(
    spec: Spec,
    ready: Sender<Result<(), Error>>,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("distlock-worker".into())
        .spawn(move || match connect(&spec.config, spec.connect_timeout) {
            Ok((client, backend)) => {
                // Online before the caller hears of it, so its first call finds the manager ready.
                let online = spec.link.go_online(backend);
                if ready.send(Ok(())).is_ok() {
                    Worker::new(spec).run(client, online);
                } else {
                    // The caller has given up (timed out): drop the connection and end.
                    let (lease, _) = online;
                    spec.link.lose(lease.generation);
                }
            }
            Err(e) => {
                let _ = ready.send(Err(e));
            }
        })
}

/// Starts a replacement worker that connects (retrying) before it serves.
pub(crate) fn start_replacement(spec: Spec) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("distlock-worker".into())
        .spawn(move || {
            let mut worker = Worker::new(spec);
            if let Some((client, backend)) = worker.reconnect() {
                let online = worker.spec.link.go_online(backend);
                worker.run(client, online);
            }
        })
}

/// The worker's state: one connection at a time, and the queue it serves.
struct Worker {
    spec: Spec,
    /// Reused statement buffer.
    sql: Sql,
}

impl Worker {
    fn new(spec: Spec) -> Worker {
        Worker {
            spec,
            sql: Sql::new(),
        }
    }

    /// Serves connection after connection until the manager is gone or this worker is replaced.
    fn run(mut self, mut client: Client, online: (Lease, Vec<Backend>)) {
        let (mut lease, mut suspects) = online;
        loop {
            self.end_suspects(&mut client, std::mem::take(&mut suspects));
            match self.serve(&mut client, &lease) {
                End::ManagerGone => {
                    log::debug!("distlock worker: last handle dropped, closing the connection");
                    return;
                }
                End::Superseded => {
                    log::warn!("distlock worker: replaced after a stalled statement; exiting");
                    return;
                }
                End::Lost => {
                    if !self.spec.link.lose(lease.generation) {
                        // The monitor declared the loss first and has started a replacement.
                        return;
                    }
                    log::warn!("distlock worker: connection lost; reconnecting");
                }
            }
            drop(client); // closes the socket; a stalled backend is ended by the next connection
            match self.reconnect() {
                Some((c, backend)) => {
                    client = c;
                    (lease, suspects) = self.spec.link.go_online(backend);
                }
                None => return,
            }
        }
    }

    /// Connects with capped exponential backoff plus jitter. While offline, queued requests are
    /// answered at once with `Offline`. `None` when the manager is gone.
    fn reconnect(&mut self) -> Option<(Client, Backend)> {
        let mut backoff = Backoff::new(FIRST_RECONNECT, MAX_RECONNECT);
        loop {
            match connect(&self.spec.config, self.spec.connect_timeout) {
                Ok(ok) => return Some(ok),
                Err(e) => log::warn!("distlock worker: reconnect failed: {e}"),
            }
            let until = Instant::now() + backoff.next_pause();
            loop {
                match self.spec.requests.recv_deadline(until) {
                    Ok(request) => {
                        let _ = request.reply.deliver(Reply::Failed(Error::offline()));
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return None,
                }
            }
        }
    }

    /// Ends backends of lost generations that may still hold locks (a stalled backend resumes with
    /// its locks). Those it cannot reach are kept for the next connection.
    fn end_suspects(&mut self, client: &mut Client, suspects: Vec<Backend>) {
        if suspects.is_empty() {
            return;
        }
        self.sql.clear();
        for s in &suspects {
            self.sql.push_terminate(s.pid, s.started_us);
        }
        if let Err(e) = client.simple_query(self.sql.as_str()) {
            log::warn!("distlock worker: could not end the backends of lost connections: {e}");
            self.spec.link.keep_suspects(suspects);
        }
    }

    fn serve(&mut self, client: &mut Client, lease: &Lease) -> End {
        let link = Arc::clone(&self.spec.link);
        loop {
            if !link.is_current(lease.generation) {
                return End::Superseded;
            }
            match self.spec.requests.recv_timeout(self.spec.heartbeat) {
                Ok(request) => {
                    if let Err(end) = self.handle(client, lease, request) {
                        return end;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let mark = link.begin_statement(lease.generation);
                    let alive = client.is_valid(self.spec.request_timeout);
                    link.end_statement(mark);
                    if let Err(e) = alive {
                        log::warn!("distlock worker: heartbeat failed: {e}");
                        return End::Lost;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return End::ManagerGone,
            }
        }
    }

    /// Runs one request and replies. `Err` ends this connection's service.
    fn handle(&mut self, client: &mut Client, lease: &Lease, request: Request) -> Result<(), End> {
        let Request {
            op,
            mode,
            key,
            generation,
            reply,
        } = request;
        if op != Op::TryLock && generation != lease.generation {
            // The hold belonged to an earlier connection, which the server has released; this
            // session may hold the same key for someone else now, so it must not be touched.
            let _ = reply.deliver(Reply::NotHeld);
            return Ok(());
        }
        let outcome = self.execute(client, lease.generation, op, mode, key);
        let current = self.spec.link.is_current(lease.generation);
        let (answer, end) = match outcome {
            Ok(_) if !current => (Reply::Failed(lost_error()), Err(End::Superseded)),
            Ok(true) => (
                match op {
                    Op::TryLock => Reply::Granted(lease.clone()),
                    Op::Unlock => Reply::Released,
                    Op::Check => Reply::Held,
                },
                Ok(()),
            ),
            Ok(false) => (
                match op {
                    Op::TryLock => Reply::Busy,
                    Op::Unlock | Op::Check => Reply::NotHeld,
                },
                Ok(()),
            ),
            Err(e) if connection_failed(client, &e) || !current => (
                Reply::Failed(Error::with_source(
                    ErrorKind::ConnectionLost,
                    "the connection to the server failed",
                    e,
                )),
                Err(if current { End::Lost } else { End::Superseded }),
            ),
            Err(e) => (Reply::Failed(Error::from_query(e)), Ok(())),
        };
        if let Err(Reply::Granted(_)) = reply.deliver(answer) {
            // The caller gave up before the grant arrived: nobody will ever own this hold, so give
            // it back now rather than leak it for the life of the connection.
            if let Err(e) = self.execute(client, lease.generation, Op::Unlock, mode, key) {
                log::warn!("distlock worker: releasing an abandoned grant of {key} failed: {e}");
                return Err(End::Lost);
            }
        }
        end
    }

    /// Runs one statement; `true` when it returned its row.
    fn execute(
        &mut self,
        client: &mut Client,
        generation: u64,
        op: Op,
        mode: Mode,
        key: LockKey,
    ) -> Result<bool, postgres::Error> {
        self.sql.clear();
        self.sql.push(op, mode, key);
        let mark = self.spec.link.begin_statement(generation);
        let result = client.simple_query(self.sql.as_str());
        self.spec.link.end_statement(mark);
        Ok(rows(&result?) == 1)
    }
}

fn lost_error() -> Error {
    Error::new(
        ErrorKind::ConnectionLost,
        "the connection stalled and was replaced",
    )
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

/// Connects within `timeout` (TCP, start-up and authentication together) and identifies the backend.
///
/// The attempt runs on a helper thread: the blocking client bounds only the TCP connect itself, and a
/// server that accepts but never answers must not hold the worker past the timeout. An attempt that
/// finishes late is dropped there, closing its connection.
fn connect(config: &postgres::Config, timeout: Duration) -> Result<(Client, Backend), Error> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let config = config.clone();
    thread::Builder::new()
        .name("distlock-connect".into())
        .spawn(move || {
            let attempt = config.connect(postgres::NoTls).and_then(|mut client| {
                let row = client.query_one(IDENTIFY, &[])?;
                let backend = Backend {
                    pid: row.try_get(0)?,
                    started_us: row.try_get(1)?,
                };
                Ok((client, backend))
            });
            let _ = tx.send(attempt);
        })
        .map_err(|e| Error::with_source(ErrorKind::Io, "could not spawn a connect thread", e))?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(ok)) => Ok(ok),
        Ok(Err(e)) => Err(Error::with_source(
            ErrorKind::Connect,
            "could not connect to the server",
            e,
        )),
        Err(_) => Err(Error::timeout("timed out connecting to the server")),
    }
}

/// The row count of the (single) statement's `CommandComplete`.
fn rows(messages: &[SimpleQueryMessage]) -> u64 {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

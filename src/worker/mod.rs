//! The thread that owns the `postgres::Client`: it serves requests, checks the connection while
//! idle, and reconnects after a loss.
//!
//! One worker serves at a time. If its connection stalls inside a statement, the monitor
//! ([`crate::worker::monitor`]) declares the generation lost and starts a replacement on the same
//! queue; the stalled worker, if it ever wakes, sees that it is no longer current and exits.

use std::time::Duration;
use std::{io, sync::Arc, thread};

use crossbeam_channel::{Sender, TryRecvError};
use postgres::Client;

use crate::error::Error;
use crate::protocol::link::{Backend, DUE_HEARTBEAT, Lease, Link};
use crate::protocol::names::Names;
use crate::protocol::reply::Orphan;
use crate::protocol::request::Request;
use crate::protocol::slot::LateReplies;
use crate::worker::batch::{Batch, MAX_BATCH};
use crate::worker::connect::Connector;
use crate::worker::session::{Conn, Query};

pub(crate) mod batch;
mod cause;
pub(crate) mod connect;
pub(crate) mod monitor;
pub(crate) mod names;
mod offline;
pub(crate) mod queue_wait;
pub(crate) mod readback;
pub(crate) mod reply;
mod respond;
pub(crate) mod session;
pub(crate) mod solo;

/// The first and the largest pause between two reconnect attempts.
pub(crate) const FIRST_RECONNECT: Duration = Duration::from_millis(50);
pub(crate) const MAX_RECONNECT: Duration = Duration::from_secs(1);

/// Everything a worker needs; the monitor keeps a copy to start a replacement.
#[derive(Clone)]
pub(crate) struct Spec {
    /// Makes connections, one attempt at a time, shared by every worker of the manager.
    pub(crate) connector: Arc<Connector>,
    /// The manager's queue, shared with any replacement.
    pub(crate) requests: crossbeam_channel::Receiver<Request>,
    /// The connection state shared with callers, guards and the monitor.
    pub(crate) link: Arc<Link>,
    /// Idle time after which the worker checks its connection.
    pub(crate) heartbeat: Duration,
    /// How long a heartbeat or statement may go unanswered before the connection is given up:
    /// the request timeout, or half the dead-holder bound if that is shorter.
    pub(crate) stall_limit: Duration,
    /// How many times a reply is offered before it is kept for later (more when callers spin).
    pub(crate) hand_over_turns: u32,
    /// A waiting connection's or lock transaction's manager's link: its stalls end a wait.
    pub(crate) owner: Option<Arc<Link>>,
    /// The key names to record, written while idle ([`names::record`]).
    pub(crate) names: Arc<Names>,
}

/// How a connection's service ended.
enum End {
    /// Every handle and guard is gone.
    ManagerGone,
    /// The connection failed; reconnect.
    Lost,
    /// The monitor declared this worker's generation lost and started a replacement.
    Superseded,
    /// A lock connection's transaction ended with its release: nothing more to serve.
    Finished,
}

/// Starts a worker that reports its first connection on `ready` and gives up if that fails.
pub(crate) fn start_first(
    spec: Spec,
    ready: Sender<Result<(), Error>>,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("distlock-worker".into())
        .spawn(move || match spec.connector.connect() {
            Ok((client, backend)) => {
                // Online before the caller hears of it, so its first call finds the manager ready.
                let online = spec.link.generations.go_online(backend);
                if ready.send(Ok(())).is_ok() {
                    Worker::new(spec).run(client, backend, online);
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
                let online = worker.spec.link.generations.go_online(backend);
                worker.run(client, backend, online);
            }
        })
}

/// How long a worker with late replies and nothing else to do waits before it looks at its
/// connection and its heartbeat again (callers arriving at their receive or giving up wake it).
pub(crate) const LATE_TICK: Duration = Duration::from_millis(5);

/// The worker's state: one connection at a time, and the queue it serves.
struct Worker {
    spec: Spec,
    /// The statement buffer and row counts, reused by every query.
    query: Query,
    /// The requests being served together.
    batch: Batch,
    /// Replies claimed for callers that were not receiving yet.
    late: LateReplies,
    /// Grants whose callers gave up after their reply was claimed, to release.
    orphans: Vec<Orphan>,
}

impl Worker {
    fn new(spec: Spec) -> Worker {
        Worker {
            spec,
            query: Query::new(),
            batch: Batch::new(),
            late: LateReplies::new(MAX_BATCH),
            orphans: Vec::with_capacity(MAX_BATCH),
        }
    }

    /// Serves connection after connection until the manager is gone or this worker is replaced.
    fn run(mut self, client: Client, backend: Backend, online: (Lease, Vec<Backend>)) {
        let (mut lease, mut suspects) = online;
        let mut conn = self.session(client, &lease, backend);
        loop {
            let end = match connect::end_suspects(
                &mut conn,
                &mut self.query,
                &self.spec.link,
                suspects,
            ) {
                Ok(()) => self.serve(&mut conn, &lease),
                Err(_) => self.ended(lease.generation),
            };
            match end {
                End::ManagerGone => {
                    log::debug!("distlock worker: last handle dropped, closing the connection");
                    return;
                }
                End::Superseded => {
                    // Late replies still owed are dropped with this worker: their callers time out
                    // at their own deadlines, and grants in them die with the stalled session.
                    log::warn!("distlock worker: replaced after a stalled statement; exiting");
                    return;
                }
                End::Lost | End::Finished if self.spec.connector.role.in_one_transaction() => {
                    // A lock's transaction ended (released, refused, or lost): its connection
                    // serves nothing more, and is never reconnected (that would pin a server
                    // connection for nothing). Its pool closes it.
                    self.spec.link.lose(lease.generation);
                    drop(conn);
                    let _ = self.drain(|_| Error::connection_lost(), None);
                    return;
                }
                End::Lost | End::Finished => {
                    // The loss is announced before anything else happens, late replies included.
                    if !self.spec.link.lose(lease.generation) {
                        // The monitor declared the loss first and has started a replacement.
                        return;
                    }
                    log::warn!("distlock worker: connection lost; reconnecting");
                }
            }
            drop(conn); // closes the socket; a stalled backend is ended by the next connection
            let Some((client, backend)) = self.reconnect() else {
                return;
            };
            (lease, suspects) = self.spec.link.generations.go_online(backend);
            conn = self.session(client, &lease, backend);
        }
    }

    /// The connection of `lease`'s generation, and the statement buffer made to check that the
    /// session still carries this connection's mark.
    fn session(&mut self, client: Client, lease: &Lease, backend: Backend) -> Conn {
        let mark = self.spec.connector.session_mark(&backend);
        let role = self.spec.connector.role;
        let scope = role.scope();
        self.query.sql.own_session(mark);
        self.query.sql.set_scope(scope);
        Conn::new(
            client,
            Arc::clone(&self.spec.link),
            lease.generation,
            backend,
            // A coordinator keeps no session to prove: its heartbeat proves it alive.
            role.heartbeats().then_some(mark),
            scope,
        )
    }

    /// Serves requests on `conn` until it fails, is replaced, or the manager is gone.
    fn serve(&mut self, conn: &mut Conn, lease: &Lease) -> End {
        let link = Arc::clone(&self.spec.link);
        link.parking.set_worker();
        loop {
            if !link.generations.is_current(lease.generation) {
                return End::Superseded;
            }
            match self.spec.requests.try_recv() {
                Ok(first) => {
                    // Grants whose callers gave up go back before anything new runs: such a caller
                    // let go of its reservation, so a request for the same key may be this one.
                    if let Err(end) = self.settle_late(Some(conn)) {
                        self.fail(first, Error::connection_lost());
                        return end;
                    }
                    let served = match first {
                        Request::Solo(solo, reply) => self.serve_solo(conn, lease, &solo, reply),
                        // The uncontended case: one request, one statement.
                        Request::Plain(plain) if self.spec.requests.is_empty() => {
                            self.serve_one(conn, lease, plain)
                        }
                        Request::Plain(plain) => self.serve_batch(conn, lease, plain),
                    };
                    if let Err(end) = served {
                        return end;
                    }
                }
                Err(TryRecvError::Disconnected) => return End::ManagerGone,
                Err(TryRecvError::Empty) if !self.late.is_empty() => {
                    if let Err(end) = self.idle_with_late_replies(conn) {
                        return end;
                    }
                }
                // A busy manager writes the names it noted at an idle moment, once they have
                // waited a while; a quiet one at its next tick (`heartbeat_if_due`).
                Err(TryRecvError::Empty) if self.spec.names.overdue() => {
                    if let Err(end) = self.record_names(conn) {
                        return end;
                    }
                }
                Err(TryRecvError::Empty) => {
                    // Park rather than block in the channel's receive: a parked thread costs
                    // nothing until a caller unparks it, where the channel would spin first and
                    // read the clock on every turn (measured: see the README's design notes).
                    link.parking.set_idle(true);
                    if !self.spec.requests.is_empty() {
                        link.parking.set_idle(false);
                        continue;
                    }
                    std::thread::park();
                    link.parking.set_idle(false);
                    if let Err(end) = self.heartbeat_if_due(conn) {
                        return end;
                    }
                }
            }
        }
    }

    /// Nothing queued, but replies are owed to callers not yet receiving: waits for them (or for a
    /// request, or for one to give up) without blocking on any.
    #[inline(never)]
    fn idle_with_late_replies(&mut self, conn: &mut Conn) -> Result<(), End> {
        self.settle_late(Some(conn))?;
        if !self.late.is_empty() {
            self.late.wait(
                &self.spec.requests,
                self.spec.link.parking.nudges(),
                LATE_TICK,
            );
        }
        self.heartbeat_if_due(conn)
    }

    /// Idle for a whole heartbeat (the monitor keeps the time and asks): prove the connection
    /// alive; idle for one of the monitor's ticks: read what the socket holds.
    #[inline]
    fn heartbeat_if_due(&mut self, conn: &mut Conn) -> Result<(), End> {
        let due = self.spec.link.parking.take_due();
        if due != 0 && self.spec.names.has_pending() && self.spec.requests.is_empty() {
            // Quiet for a tick, and nobody waiting: the names noted meanwhile.
            self.record_names(conn)?;
        }
        if due == 0 || !self.spec.connector.role.heartbeats() {
            return Ok(());
        }
        if due & DUE_HEARTBEAT != 0 {
            return self.heartbeat(conn);
        }
        // Quiet for a tick: read the socket (no round trip), so that a session the server ended
        // (a switchover, `pg_terminate_backend`) is told before a new primary can grant its locks.
        conn.look().map_err(|e| {
            cause::lost(&self.spec.link, conn.generation, &e.into_error());
            End::Lost
        })
    }

    /// Writes the key names noted since the last write ([`names::record`]).
    #[inline(never)]
    fn record_names(&mut self, conn: &mut Conn) -> Result<(), End> {
        names::record(&self.spec.names, conn).map_err(|e| {
            cause::lost(&self.spec.link, conn.generation, &e);
            End::Lost
        })
    }

    #[inline(never)]
    fn heartbeat(&mut self, conn: &mut Conn) -> Result<(), End> {
        match conn.heartbeat() {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.pooler_seen()),
            Err(e) => {
                cause::lost(&self.spec.link, conn.generation, &e.into_error());
                Err(End::Lost)
            }
        }
    }
}

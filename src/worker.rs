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

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use postgres::Client;

use crate::backoff::Backoff;
use crate::batch::{Batch, Broken, MAX_BATCH, Outcome};
use crate::connect::{self, Connector};
use crate::error::{Error, ErrorKind};
use crate::key::LockKey;
use crate::link::{Backend, Lease, Link};
use crate::reply::{LateReplies, Orphan, Reply, Request, Ticket};
use crate::session::{Conn, Failed, Query};
use crate::special;
use crate::sql::{Mode, Op};

/// The first and the largest pause between two reconnect attempts.
const FIRST_RECONNECT: Duration = Duration::from_millis(50);
const MAX_RECONNECT: Duration = Duration::from_secs(1);

/// Everything a worker needs; the monitor keeps a copy to start a replacement.
#[derive(Clone)]
pub(crate) struct Spec {
    /// Makes connections, one attempt at a time, shared by every worker of the manager.
    pub(crate) connector: Arc<Connector>,
    /// The manager's queue, shared with any replacement.
    pub(crate) requests: Receiver<Request>,
    /// The connection state shared with callers, guards and the monitor.
    pub(crate) link: Arc<Link>,
    /// Idle time after which the worker checks its connection.
    pub(crate) heartbeat: Duration,
    /// How long a heartbeat or statement may go unanswered before the connection is given up:
    /// the request timeout, or half the dead-holder bound if that is shorter.
    pub(crate) stall_limit: Duration,
    /// How many times a reply is offered before it is kept for later (more when callers spin).
    pub(crate) hand_over_turns: u32,
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
        .spawn(move || match spec.connector.connect() {
            Ok((client, backend)) => {
                // Online before the caller hears of it, so its first call finds the manager ready.
                let online = spec.link.go_online(backend);
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
                let online = worker.spec.link.go_online(backend);
                worker.run(client, backend, online);
            }
        })
}

/// How long a worker with late replies and nothing else to do waits before it looks at its
/// connection and its heartbeat again. Callers arriving at their receive or giving up wake it
/// sooner.
const LATE_TICK: Duration = Duration::from_millis(5);

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
        let mut conn = Conn::new(
            client,
            Arc::clone(&self.spec.link),
            lease.generation,
            backend,
            self.spec.connector.session_mark(&backend),
        );
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
                End::Lost => {
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
            (lease, suspects) = self.spec.link.go_online(backend);
            conn = Conn::new(
                client,
                Arc::clone(&self.spec.link),
                lease.generation,
                backend,
                self.spec.connector.session_mark(&backend),
            );
        }
    }

    /// Why the connection of `generation` stopped serving: the monitor replaced it, or it failed.
    fn ended(&self, generation: u64) -> End {
        if self.spec.link.is_current(generation) {
            End::Lost
        } else {
            End::Superseded
        }
    }

    /// Connects with capped exponential backoff plus jitter. While offline, queued requests are
    /// answered at once with `Offline`, and late replies are still handed over. `None` when the
    /// manager is gone.
    fn reconnect(&mut self) -> Option<(Client, Backend)> {
        let mut backoff = Backoff::new(FIRST_RECONNECT, MAX_RECONNECT);
        loop {
            if self.spec.link.is_pooled() {
                return self.refuse_for_good();
            }
            match self.spec.connector.connect() {
                Ok(ok) => return Some(ok),
                Err(e) if e.kind() == ErrorKind::Pooler => {
                    self.spec.link.set_pooled();
                    continue;
                }
                Err(e) => log::warn!("distlock worker: reconnect failed: {e}"),
            }
            let until = Instant::now() + backoff.next_pause();
            loop {
                // No connection: a grant given back needs no statement, its session is gone.
                let _ = self.settle_late(None);
                match self.spec.requests.try_recv() {
                    Ok(request) => {
                        let Request {
                            reply, key, mode, ..
                        } = request;
                        self.answer(reply, Reply::Failed(Error::offline()), key, mode);
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => return None,
                    Err(TryRecvError::Empty) => {}
                }
                let now = Instant::now();
                if now >= until {
                    break;
                }
                self.late
                    .wait(&self.spec.requests, self.spec.link.nudges(), until - now);
            }
        }
    }

    /// After a pooler was seen: no more connections; every request is answered with the pooler
    /// error until the manager is gone.
    fn refuse_for_good(&mut self) -> Option<(Client, Backend)> {
        loop {
            let _ = self.settle_late(None);
            match self.spec.requests.try_recv() {
                Ok(request) => {
                    let Request {
                        reply, key, mode, ..
                    } = request;
                    self.answer(reply, Reply::Failed(Error::pooler()), key, mode);
                }
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {
                    self.late
                        .wait(&self.spec.requests, self.spec.link.nudges(), LATE_TICK);
                }
            }
        }
    }

    /// Serves requests on `conn` until it fails, is replaced, or the manager is gone.
    fn serve(&mut self, conn: &mut Conn, lease: &Lease) -> End {
        let link = Arc::clone(&self.spec.link);
        link.set_worker();
        loop {
            if !link.is_current(lease.generation) {
                return End::Superseded;
            }
            match self.spec.requests.try_recv() {
                Ok(first) => {
                    // Grants whose callers gave up go back before anything new runs: such a caller
                    // let go of its reservation, so a request for the same key may be this one.
                    if let Err(end) = self.settle_late(Some(conn)) {
                        let Request {
                            reply, key, mode, ..
                        } = first;
                        self.answer(reply, Reply::Failed(lost_error()), key, mode);
                        return end;
                    }
                    let served = if first.special.is_some() {
                        self.serve_special(conn, lease, first)
                    } else if self.spec.requests.is_empty() {
                        // The uncontended case: one request, one statement.
                        self.serve_one(conn, lease, first)
                    } else {
                        self.serve_batch(conn, lease, first)
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
                Err(TryRecvError::Empty) => {
                    // Park rather than block in the channel's receive: a parked thread costs
                    // nothing until a caller unparks it, where the channel would spin first and
                    // read the clock on every turn (measured: see the README's design notes).
                    link.set_idle(true);
                    if !self.spec.requests.is_empty() {
                        link.set_idle(false);
                        continue;
                    }
                    std::thread::park();
                    link.set_idle(false);
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
            self.late
                .wait(&self.spec.requests, self.spec.link.nudges(), LATE_TICK);
        }
        self.heartbeat_if_due(conn)
    }

    /// Idle for a whole heartbeat (the monitor keeps the time and asks): prove the connection
    /// alive.
    #[inline]
    fn heartbeat_if_due(&mut self, conn: &mut Conn) -> Result<(), End> {
        if !self.spec.link.take_heartbeat() {
            return Ok(());
        }
        self.heartbeat(conn)
    }

    #[inline(never)]
    fn heartbeat(&mut self, conn: &mut Conn) -> Result<(), End> {
        match conn.heartbeat() {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.pooler_seen()),
            Err(e) => {
                log::warn!("distlock worker: heartbeat failed: {e}");
                Err(End::Lost)
            }
        }
    }

    /// Probes whether a pooler shares the session (the probe failing says nothing: the next
    /// statement or heartbeat notices a broken connection). Out of line: the request path only
    /// comes here when a lock the session should hold is missing.
    #[cold]
    #[inline(never)]
    fn session_shared(&self, conn: &mut Conn) -> bool {
        match conn.heartbeat() {
            Ok(false) => {
                self.pooler_seen();
                true
            }
            Ok(true) | Err(_) => false,
        }
    }

    /// A pooler shares the session: from now on the manager answers every call with
    /// `ErrorKind::Pooler`, and this connection's guards are lost.
    fn pooler_seen(&self) -> End {
        log::error!("distlock worker: {}", Error::pooler());
        self.spec.link.set_pooled();
        End::Lost
    }

    /// The uncontended case: one request, one statement, no batch bookkeeping.
    fn serve_one(&mut self, conn: &mut Conn, lease: &Lease, request: Request) -> Result<(), End> {
        let outcome = if request.op != Op::TryLock && request.generation != lease.generation {
            Outcome::Pending // answered `NotHeld` without touching this session
        } else {
            match self.query.one(conn, request.op, request.mode, request.key) {
                Ok(row) => Outcome::Done(row),
                Err(Failed::Rejected(e)) => Outcome::Failed(e),
                Err(Failed::Broken(e)) => {
                    log::warn!("distlock worker: connection failed: {e}");
                    let Request {
                        reply, key, mode, ..
                    } = request;
                    self.answer(reply, Reply::Failed(lost_error()), key, mode);
                    return Err(self.ended(lease.generation));
                }
            }
        };
        let current = self.spec.link.is_current(lease.generation);
        self.reply(conn, lease, current, request, outcome)
    }

    /// Takes whatever requests queued behind `first` (up to a batch), runs them together, and
    /// replies to each.
    fn serve_batch(&mut self, conn: &mut Conn, lease: &Lease, first: Request) -> Result<(), End> {
        // Whatever queued up meanwhile goes to the server in the same round trip.
        self.batch.requests.push(first);
        // A special request ends the batch and runs after it, alone.
        let mut special = None;
        while self.batch.requests.len() < MAX_BATCH {
            match self.spec.requests.try_recv() {
                Ok(request) if request.special.is_some() => {
                    special = Some(request);
                    break;
                }
                Ok(request) => self.batch.requests.push(request),
                Err(_) => break,
            }
        }
        let ran = self.batch.run(&mut self.query, conn, lease.generation);
        let current = ran.is_ok() && self.spec.link.is_current(lease.generation);
        let mut result = match ran {
            Ok(()) => Ok(()),
            Err(Broken(e)) => {
                log::warn!("distlock worker: connection failed: {e}");
                Err(self.ended(lease.generation))
            }
        };
        let mut requests = std::mem::take(&mut self.batch.requests);
        for (i, request) in requests.drain(..).enumerate() {
            let outcome = self.batch.take_outcome(i);
            if result.is_err() {
                // What ran is unknown and the session is going: nobody gets a grant from it.
                let Request {
                    reply, key, mode, ..
                } = request;
                self.answer(reply, Reply::Failed(lost_error()), key, mode);
            } else if let Err(end) = self.reply(conn, lease, current, request, outcome) {
                result = Err(end);
            }
        }
        self.batch.requests = requests; // keeps its capacity
        match special {
            Some(request) if result.is_ok() => self.serve_special(conn, lease, request),
            Some(request) => {
                let Request {
                    reply, key, mode, ..
                } = request;
                self.answer(reply, Reply::Failed(lost_error()), key, mode);
                result
            }
            None => result,
        }
    }

    /// A special request (see `crate::special`): one statement of its own.
    #[inline(never)]
    fn serve_special(
        &mut self,
        conn: &mut Conn,
        lease: &Lease,
        mut request: Request,
    ) -> Result<(), End> {
        let Some(special) = request.special.take() else {
            return self.serve_one(conn, lease, request);
        };
        let Request {
            reply, key, mode, ..
        } = request;
        let answer = match special::serve(&special, conn, lease) {
            Ok(answer) => answer,
            Err(e) => {
                log::warn!("distlock worker: connection failed: {e}");
                self.answer(reply, Reply::Failed(lost_error()), key, mode);
                return Err(self.ended(lease.generation));
            }
        };
        let answer = match answer {
            // Granted by a session that is already being replaced: its holds are gone.
            Reply::Extra(extra)
                if extra.lease.is_some() && !self.spec.link.is_current(lease.generation) =>
            {
                drop(extra);
                Reply::Failed(lost_error())
            }
            answer => answer,
        };
        match reply.claim(answer) {
            Ok(delivery) => {
                if let Err(delivery) = delivery.try_send(self.spec.hand_over_turns) {
                    self.late.push(delivery, key, mode);
                }
                Ok(())
            }
            // The caller gave up: nobody will own these holds.
            Err(Reply::Extra(extra)) => {
                let mut orphans = Vec::new();
                extra.orphans(&mut orphans);
                for orphan in orphans {
                    self.give_back(conn, orphan)?;
                }
                Ok(())
            }
            Err(_) => Ok(()),
        }
    }

    /// Answers one request from its outcome; gives back a grant whose caller has gone.
    fn reply(
        &mut self,
        conn: &mut Conn,
        lease: &Lease,
        current: bool,
        request: Request,
        outcome: Outcome,
    ) -> Result<(), End> {
        let Request {
            op,
            mode,
            key,
            generation,
            reply,
            ..
        } = request;
        // A lock this session should hold and does not: first make sure the session is ours.
        if op == Op::Check
            && generation == lease.generation
            && matches!(outcome, Outcome::Done(false))
            && self.session_shared(conn)
        {
            self.answer(reply, Reply::Failed(Error::pooler()), key, mode);
            return Err(End::Lost);
        }
        let answer = match outcome {
            _ if op != Op::TryLock && generation != lease.generation => Reply::NotHeld,
            _ if !current => Reply::Failed(lost_error()),
            Outcome::Done(true) => match op {
                Op::TryLock => Reply::Granted(lease.clone()),
                Op::Unlock => Reply::Released,
                Op::Check => Reply::Held,
            },
            Outcome::Done(false) => match op {
                Op::TryLock => Reply::Busy,
                Op::Unlock | Op::Check => Reply::NotHeld,
            },
            Outcome::Failed(e) => Reply::Failed(e),
            Outcome::Pending | Outcome::Retry => Reply::Failed(lost_error()),
        };
        match self.answer(reply, answer, key, mode) {
            // The caller gave up before the grant arrived: nobody will ever own this hold, so give
            // it back now rather than leak it for the life of the connection.
            Some(generation) => self.give_back(
                conn,
                Orphan {
                    key,
                    mode,
                    generation,
                },
            ),
            None => Ok(()),
        }
    }

    /// Hands `reply` to the caller of `ticket`: at once when it is receiving, later otherwise, and
    /// never waiting for it. Returns the generation of a grant whose caller has already given up,
    /// which the worker must give back.
    #[inline(always)]
    fn answer(&mut self, ticket: Ticket, reply: Reply, key: LockKey, mode: Mode) -> Option<u64> {
        match ticket.claim(reply) {
            Ok(delivery) => {
                if let Err(delivery) = delivery.try_send(self.spec.hand_over_turns) {
                    self.late.push(delivery, key, mode);
                }
                None
            }
            Err(Reply::Granted(lease)) => Some(lease.generation),
            Err(_) => None,
        }
    }

    /// Offers every late reply again and gives back the grants of callers that gave up. Never
    /// waits. `conn` is the current connection, or `None` while offline.
    #[inline]
    fn settle_late(&mut self, conn: Option<&mut Conn>) -> Result<(), End> {
        // Almost always empty: keep the common case to a length check.
        if self.late.is_empty() {
            return Ok(());
        }
        self.settle_pending(conn)
    }

    /// The body of [`Worker::settle_late`] when something is owed.
    #[inline(never)]
    fn settle_pending(&mut self, mut conn: Option<&mut Conn>) -> Result<(), End> {
        while self.spec.link.nudges().try_recv().is_ok() {}
        self.late.settle(&mut self.orphans);
        let mut orphans = std::mem::take(&mut self.orphans);
        let mut result = Ok(());
        for orphan in orphans.drain(..) {
            // Once a give-back has failed, the connection is in doubt: the ending session
            // releases the rest.
            if let (Some(conn), true) = (conn.as_deref_mut(), result.is_ok()) {
                result = self.give_back(conn, orphan);
            }
        }
        self.orphans = orphans; // keeps its capacity
        result
    }

    /// Releases a grant nobody will own, if it was made on `conn`'s session; the session of an
    /// earlier generation has ended, and its holds with it.
    fn give_back(&mut self, conn: &mut Conn, orphan: Orphan) -> Result<(), End> {
        if orphan.generation != conn.generation {
            return Ok(());
        }
        let Orphan { key, mode, .. } = orphan;
        if let Err(Failed::Rejected(e) | Failed::Broken(e)) =
            self.query.one(conn, Op::Unlock, mode, key)
        {
            log::warn!("distlock worker: releasing an abandoned grant of {key} failed: {e}");
            // The hold may still be there with nobody to release it: end the session instead.
            return Err(self.ended(conn.generation));
        }
        Ok(())
    }
}

fn lost_error() -> Error {
    Error::new(
        ErrorKind::ConnectionLost,
        "the connection to the server was lost",
    )
}

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

use crossbeam_channel::{Receiver, Select, Sender, TryRecvError};
use postgres::error::SqlState;
use postgres::{Client, SimpleQueryMessage};

use crate::backoff::Backoff;
use crate::connect::Connector;
use crate::error::{Error, ErrorKind};
use crate::key::LockKey;
use crate::link::{Backend, Lease, Link, Site};
use crate::reply::{Delivery, Reply, Request, Ticket};
use crate::sql::{Mode, Op, Sql};

/// The first and the largest pause between two reconnect attempts.
const FIRST_RECONNECT: Duration = Duration::from_millis(50);
const MAX_RECONNECT: Duration = Duration::from_secs(2);

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
    /// Bound on a heartbeat's round trip.
    pub(crate) request_timeout: Duration,
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

/// The most requests sent to the server in one query.
const MAX_BATCH: usize = 64;

/// How long a worker with late replies and nothing else to do waits before it looks at its
/// connection and its heartbeat again. Callers arriving at their receive or giving up wake it
/// sooner.
const LATE_TICK: Duration = Duration::from_millis(5);

/// What became of one request of a batch.
#[derive(Debug, Default)]
enum Outcome {
    /// Not run yet.
    #[default]
    Pending,
    /// Ran; whether its statement returned its row.
    Done(bool),
    /// Must run again alone (batch recovery).
    Retry,
    /// The server rejected it.
    Failed(postgres::Error),
}

/// A reply claimed for a caller that was not receiving yet when it was ready.
struct Late {
    /// The reply and the slot it is owed to.
    delivery: Delivery,
    /// The lock of the request, so that a grant can be given back if its caller gives up.
    key: LockKey,
    /// Exclusive or shared, likewise.
    mode: Mode,
}

/// The worker's state: one connection at a time, and the queue it serves. The vectors and the map
/// keep their capacity, so steady-state batches allocate nothing here.
struct Worker {
    spec: Spec,
    /// Reused statement buffer.
    sql: Sql,
    /// The requests of the batch being served, in arrival order.
    batch: Vec<Request>,
    /// Indices into `batch` of the statements in the query, in query order.
    order: Vec<usize>,
    /// Indices into `batch` of requests that run alone after the query.
    solo: Vec<usize>,
    /// The outcome of each request of `batch`.
    outcomes: Vec<Outcome>,
    /// Replies claimed for callers that were not receiving yet. Kept across reconnects: a caller
    /// waits for its reply until its own deadline, whatever happens to the connection.
    late: Vec<Late>,
    /// A second buffer for `late`, so that settling allocates nothing.
    late_spare: Vec<Late>,
}

impl Worker {
    fn new(spec: Spec) -> Worker {
        Worker {
            spec,
            sql: Sql::new(),
            batch: Vec::with_capacity(MAX_BATCH),
            order: Vec::with_capacity(MAX_BATCH),
            solo: Vec::with_capacity(MAX_BATCH),
            outcomes: Vec::with_capacity(MAX_BATCH),
            late: Vec::with_capacity(MAX_BATCH),
            late_spare: Vec::with_capacity(MAX_BATCH),
        }
    }

    /// Serves connection after connection until the manager is gone or this worker is replaced.
    fn run(mut self, mut client: Client, online: (Lease, Vec<Backend>)) {
        let (mut lease, mut suspects) = online;
        loop {
            let end = match self.end_suspects(&mut client, &lease, std::mem::take(&mut suspects)) {
                Ok(()) => self.serve(&mut client, &lease),
                Err(end) => end,
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
    /// answered at once with `Offline`, and late replies are still handed over. `None` when the
    /// manager is gone.
    fn reconnect(&mut self) -> Option<(Client, Backend)> {
        let mut backoff = Backoff::new(FIRST_RECONNECT, MAX_RECONNECT);
        loop {
            match self.spec.connector.connect() {
                Ok(ok) => return Some(ok),
                Err(e) => log::warn!("distlock worker: reconnect failed: {e}"),
            }
            let until = Instant::now() + backoff.next_pause();
            loop {
                // No connection: a grant given back needs no statement, its session is gone.
                let _ = self.settle_late(None, 0);
                match self.spec.requests.try_recv() {
                    Ok(request) => {
                        self.answer(
                            request.reply,
                            Reply::Failed(Error::offline()),
                            request.key,
                            request.mode,
                        );
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => return None,
                    Err(TryRecvError::Empty) => {}
                }
                let now = Instant::now();
                if now >= until {
                    break;
                }
                self.wait_for_event(until - now);
            }
        }
    }

    /// Ends backends of lost generations that may still hold locks (a stalled backend resumes with
    /// its locks). Those it cannot reach are kept for the next connection.
    fn end_suspects(
        &mut self,
        client: &mut Client,
        lease: &Lease,
        suspects: Vec<Backend>,
    ) -> Result<(), End> {
        if suspects.is_empty() {
            return Ok(());
        }
        self.spec.link.hook(Site::BeforeEndSuspects);
        self.sql.clear();
        for s in &suspects {
            self.sql.push_terminate(s.pid, s.started_us);
        }
        if let Err(e) = self.query(client, lease.generation) {
            log::warn!("distlock worker: could not end the backends of lost connections: {e}");
            self.spec.link.keep_suspects(suspects);
            self.statement_failed(client, lease, e)?;
        }
        Ok(())
    }

    fn serve(&mut self, client: &mut Client, lease: &Lease) -> End {
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
                    if let Err(end) = self.settle_late(Some(client), lease.generation) {
                        self.answer(
                            first.reply,
                            Reply::Failed(lost_error()),
                            first.key,
                            first.mode,
                        );
                        return end;
                    }
                    let served = if self.spec.requests.is_empty() {
                        // The uncontended case: one request, one statement.
                        self.serve_one(client, lease, first)
                    } else {
                        self.serve_batch(client, lease, first)
                    };
                    if let Err(end) = served {
                        return end;
                    }
                }
                Err(TryRecvError::Disconnected) => return End::ManagerGone,
                Err(TryRecvError::Empty) if !self.late.is_empty() => {
                    // Nothing queued, but replies are owed to callers not yet receiving: wait for
                    // them (or for a request, or for one to give up) without blocking on any.
                    if let Err(end) = self.settle_late(Some(client), lease.generation) {
                        return end;
                    }
                    if !self.late.is_empty() {
                        self.wait_for_event(LATE_TICK);
                    }
                    if link.take_heartbeat() {
                        if let Err(end) = self.heartbeat(client, lease) {
                            return end;
                        }
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
                    if link.take_heartbeat() {
                        // Idle for a whole heartbeat (the monitor keeps the time): prove the
                        // connection is alive.
                        if let Err(end) = self.heartbeat(client, lease) {
                            return end;
                        }
                    }
                }
            }
        }
    }

    /// Proves the connection alive with an empty query, watched like every statement.
    fn heartbeat(&mut self, client: &mut Client, lease: &Lease) -> Result<(), End> {
        let mark = self.spec.link.begin_statement(lease.generation);
        let alive = client.is_valid(self.spec.request_timeout);
        self.spec.link.end_statement(mark);
        alive.map_err(|e| {
            log::warn!("distlock worker: heartbeat failed: {e}");
            End::Lost
        })
    }

    /// Takes whatever requests queued behind `first` (up to a batch) and serves them together.
    fn serve_batch(
        &mut self,
        client: &mut Client,
        lease: &Lease,
        first: Request,
    ) -> Result<(), End> {
        // Whatever queued up meanwhile goes to the server in the same round trip.
        self.batch.push(first);
        while self.batch.len() < MAX_BATCH {
            match self.spec.requests.try_recv() {
                Ok(request) => self.batch.push(request),
                Err(_) => break,
            }
        }
        let outcome = self.run_batch(client, lease);
        // Normally empty by now; on an early exit, the rest learn why.
        let mut batch = std::mem::take(&mut self.batch);
        for request in batch.drain(..) {
            self.answer(
                request.reply,
                Reply::Failed(lost_error()),
                request.key,
                request.mode,
            );
        }
        self.batch = batch; // keeps its capacity
        outcome
    }

    /// Hands `reply` to the caller of `ticket`: at once when it is receiving, later otherwise, and
    /// never waiting for it. Returns the generation of a grant whose caller has already given up,
    /// which the worker must give back.
    #[inline]
    fn answer(&mut self, ticket: Ticket, reply: Reply, key: LockKey, mode: Mode) -> Option<u64> {
        match ticket.claim(reply) {
            Ok(delivery) => {
                if let Err(delivery) = delivery.try_send() {
                    self.late.push(Late {
                        delivery,
                        key,
                        mode,
                    });
                }
                None
            }
            Err(Reply::Granted(lease)) => Some(lease.generation),
            Err(_) => None,
        }
    }

    /// Offers every late reply again, and gives back the grants of callers that gave up. Never
    /// waits. `client` is the connection of `generation`, or `None` while offline.
    #[inline]
    fn settle_late(&mut self, client: Option<&mut Client>, generation: u64) -> Result<(), End> {
        // Almost always empty: keep the common case to a length check at the call site.
        if self.late.is_empty() {
            return Ok(());
        }
        self.settle_pending(client, generation)
    }

    /// The body of [`Worker::settle_late`] when something is owed.
    #[inline(never)]
    fn settle_pending(
        &mut self,
        mut client: Option<&mut Client>,
        generation: u64,
    ) -> Result<(), End> {
        while self.spec.link.nudges().try_recv().is_ok() {}
        // Offer each from the spare buffer; those still not taken go back into `late`. Both
        // buffers keep their capacity, so this allocates nothing.
        std::mem::swap(&mut self.late, &mut self.late_spare);
        let mut pending = std::mem::take(&mut self.late_spare);
        let mut result = Ok(());
        for late in pending.drain(..) {
            if !late.delivery.is_abandoned() {
                if let Err(delivery) = late.delivery.try_send() {
                    self.late.push(Late { delivery, ..late });
                }
                continue;
            }
            let Reply::Granted(grant) = late.delivery.into_reply() else {
                continue;
            };
            // Once a give-back has failed, the connection is in doubt: the ending session
            // releases the rest.
            if let (Some(client), true) = (client.as_deref_mut(), result.is_ok()) {
                if let Err(end) =
                    self.give_back(client, generation, grant.generation, late.key, late.mode)
                {
                    result = Err(end);
                }
            }
        }
        self.late_spare = pending;
        result
    }

    /// Waits up to `timeout` for something to do: a late caller arriving at its receive, a request,
    /// or a caller giving up on a claimed reply. Does none of them; the caller looks again.
    fn wait_for_event(&self, timeout: Duration) {
        let mut select = Select::new();
        for late in &self.late {
            select.send(late.delivery.sender());
        }
        select.recv(&self.spec.requests);
        select.recv(self.spec.link.nudges());
        let _ = select.ready_timeout(timeout);
    }

    /// Releases a grant nobody will own, if its session is this connection's (`generation`); the
    /// session of an earlier generation has ended, and its holds with it.
    fn give_back(
        &mut self,
        client: &mut Client,
        generation: u64,
        grant_generation: u64,
        key: LockKey,
        mode: Mode,
    ) -> Result<(), End> {
        if grant_generation != generation {
            return Ok(());
        }
        if let Err(e) = self.execute(client, generation, Op::Unlock, mode, key) {
            log::warn!("distlock worker: releasing an abandoned grant of {key} failed: {e}");
            // The hold may still be there with nobody to release it: end the session instead.
            return Err(if self.spec.link.is_current(generation) {
                End::Lost
            } else {
                End::Superseded
            });
        }
        Ok(())
    }

    /// Runs the queued requests in `self.batch`, as one multi-statement query where that is exact,
    /// and replies to each. `Err` ends this connection's service.
    ///
    /// Statement order: releases first, then tries and checks, each group in arrival order. Every
    /// caller has at most one request in flight, so no caller's own order changes; and a try can
    /// only be queued beside a release of the same key when both are shared (the manager's table
    /// refuses anything else), where the order does not change either outcome.
    ///
    /// A multi-statement query is one implicit transaction: if a statement fails, the ones before it
    /// keep their effect (session locks ignore rollback) and the ones after it never run, and the
    /// client does not say which statement failed. So a request joins the batch only if its outcome
    /// can be read back from `pg_locks` afterwards: its key and mode appear once in the batch, and
    /// its own hold is the manager's only hold of the key (`sole_hold`: for a try, the session held
    /// the key not at all before it; for a release, exactly once). The others run alone, after the
    /// batch. (A grant abandoned by its caller is given back before the next batch is formed, so it
    /// never hides behind `sole_hold`.)
    fn run_batch(&mut self, client: &mut Client, lease: &Lease) -> Result<(), End> {
        self.sql.clear();
        self.order.clear();
        self.solo.clear();
        for pass in [Op::Unlock, Op::TryLock] {
            for i in 0..self.batch.len() {
                let r = &self.batch[i];
                let in_pass = match pass {
                    Op::Unlock => r.op == Op::Unlock,
                    _ => r.op != Op::Unlock,
                };
                if !in_pass {
                    continue;
                }
                if r.op != Op::TryLock && r.generation != lease.generation {
                    continue; // answered below without touching this session
                }
                let unique = !self
                    .order
                    .iter()
                    .any(|&j| self.batch[j].key == r.key && self.batch[j].mode == r.mode);
                let readable = unique && (r.sole_hold || r.op == Op::Check);
                if readable {
                    self.sql.push(r.op, r.mode, r.key);
                    self.order.push(i);
                } else {
                    self.solo.push(i);
                }
            }
        }
        self.outcomes.clear();
        self.outcomes
            .resize_with(self.batch.len(), Outcome::default);
        if !self.order.is_empty() {
            self.execute_batch(client, lease)?;
        }
        // Solo requests, in arrival order, one statement each.
        for k in 0..self.solo.len() {
            let i = self.solo[k];
            let (op, mode, key) = (self.batch[i].op, self.batch[i].mode, self.batch[i].key);
            self.outcomes[i] = match self.execute(client, lease.generation, op, mode, key) {
                Ok(row) => Outcome::Done(row),
                Err(e) => self.statement_failed(client, lease, e)?,
            };
        }
        self.reply_all(client, lease)
    }

    /// Runs the batch's statements as one query and records each outcome.
    fn execute_batch(&mut self, client: &mut Client, lease: &Lease) -> Result<(), End> {
        match self.query(client, lease.generation) {
            Ok(messages) => {
                let mut statement = 0;
                for m in &messages {
                    if let SimpleQueryMessage::CommandComplete(n) = m {
                        let Some(&i) = self.order.get(statement) else {
                            break;
                        };
                        self.outcomes[i] = Outcome::Done(*n == 1);
                        statement += 1;
                    }
                }
                if statement != self.order.len() {
                    log::error!(
                        "distlock worker: {statement} results for {} statements",
                        self.order.len()
                    );
                    return Err(End::Lost);
                }
                Ok(())
            }
            Err(e) => {
                let failed = self.statement_failed(client, lease, e)?;
                // The connection is fine; one statement failed and the ones after it did not run.
                // Read back from pg_locks what happened to each, then run the rest again alone.
                log::warn!(
                    "distlock worker: a batched statement failed; recovering statement by statement"
                );
                self.sql.clear();
                for &i in &self.order {
                    let r = &self.batch[i];
                    self.sql.push(Op::Check, r.mode, r.key);
                }
                let checked = match self.query(client, lease.generation) {
                    Ok(messages) => messages,
                    Err(e) => {
                        self.statement_failed(client, lease, e)?;
                        return Err(End::Lost); // cannot tell what happened: start afresh
                    }
                };
                let mut statement = 0;
                for m in &checked {
                    if let SimpleQueryMessage::CommandComplete(n) = m {
                        let Some(&i) = self.order.get(statement) else {
                            break;
                        };
                        statement += 1;
                        let held_now = *n == 1;
                        self.outcomes[i] = match (self.batch[i].op, held_now) {
                            (Op::TryLock, true) => Outcome::Done(true), // it ran and was granted
                            (Op::Unlock, false) => Outcome::Done(true), // it ran and released
                            _ => Outcome::Retry,                        // did not run, or refused
                        };
                    }
                }
                if statement != self.order.len() {
                    return Err(End::Lost);
                }
                for k in 0..self.order.len() {
                    let i = self.order[k];
                    if matches!(self.outcomes[i], Outcome::Retry) {
                        let (op, mode, key) =
                            (self.batch[i].op, self.batch[i].mode, self.batch[i].key);
                        self.outcomes[i] =
                            match self.execute(client, lease.generation, op, mode, key) {
                                Ok(row) => Outcome::Done(row),
                                Err(e) => self.statement_failed(client, lease, e)?,
                            };
                    }
                }
                drop(failed);
                Ok(())
            }
        }
    }

    /// Classifies a failed statement: the connection is gone (`Err`, ending this connection's
    /// service), or the server rejected the statement (its error, for the request's reply).
    fn statement_failed(
        &mut self,
        client: &mut Client,
        lease: &Lease,
        e: postgres::Error,
    ) -> Result<Outcome, End> {
        let current = self.spec.link.is_current(lease.generation);
        if !current {
            return Err(End::Superseded);
        }
        if connection_failed(client, &e) {
            log::warn!("distlock worker: connection failed: {e}");
            return Err(End::Lost);
        }
        Ok(Outcome::Failed(e))
    }

    /// Delivers every request's reply and gives back grants nobody will own.
    fn reply_all(&mut self, client: &mut Client, lease: &Lease) -> Result<(), End> {
        let current = self.spec.link.is_current(lease.generation);
        let mut result = Ok(());
        let mut batch = std::mem::take(&mut self.batch);
        for (i, request) in batch.drain(..).enumerate() {
            let outcome = std::mem::take(&mut self.outcomes[i]);
            if let Err(end) = self.reply(client, lease, current, request, outcome) {
                result = Err(end);
            }
        }
        self.batch = batch; // keeps its capacity
        result
    }

    /// The uncontended case: one request, one statement, no batch bookkeeping.
    fn serve_one(
        &mut self,
        client: &mut Client,
        lease: &Lease,
        request: Request,
    ) -> Result<(), End> {
        let outcome = if request.op != Op::TryLock && request.generation != lease.generation {
            Outcome::Pending // answered `NotHeld` without touching this session
        } else {
            match self.execute(
                client,
                lease.generation,
                request.op,
                request.mode,
                request.key,
            ) {
                Ok(row) => Outcome::Done(row),
                Err(e) => match self.statement_failed(client, lease, e) {
                    Ok(failed) => failed,
                    Err(end) => {
                        self.answer(
                            request.reply,
                            Reply::Failed(lost_error()),
                            request.key,
                            request.mode,
                        );
                        return Err(end);
                    }
                },
            }
        };
        let current = self.spec.link.is_current(lease.generation);
        self.reply(client, lease, current, request, outcome)
    }

    /// Answers one request from its outcome; gives back a grant whose caller has gone.
    fn reply(
        &mut self,
        client: &mut Client,
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
            Outcome::Failed(e) => Reply::Failed(Error::from_query(e)),
            Outcome::Pending | Outcome::Retry => Reply::Failed(lost_error()),
        };
        match self.answer(reply, answer, key, mode) {
            // The caller gave up before the grant arrived: nobody will ever own this hold, so give
            // it back now rather than leak it for the life of the connection.
            Some(granted_by) => self.give_back(client, lease.generation, granted_by, key, mode),
            None => Ok(()),
        }
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
        Ok(rows(&self.query(client, generation)?) == 1)
    }

    /// Runs the statements in the buffer as one query, under the monitor's watch: every statement
    /// the worker sends goes through here (or through `heartbeat`), so none can stall unseen.
    fn query(
        &mut self,
        client: &mut Client,
        generation: u64,
    ) -> Result<Vec<SimpleQueryMessage>, postgres::Error> {
        let mark = self.spec.link.begin_statement(generation);
        let result = client.simple_query(self.sql.as_str());
        self.spec.link.end_statement(mark);
        result
    }
}

fn lost_error() -> Error {
    Error::new(
        ErrorKind::ConnectionLost,
        "the connection to the server was lost",
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

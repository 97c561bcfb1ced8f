//! Serving requests on a connection and answering them: one plain request alone, a batch of
//! them, a solo request; every answer handed over without waiting, and every grant whose
//! caller gave up given back.

use crate::error::Error;
use crate::key::LockKey;
use crate::mode::Mode;
use crate::protocol::link::Lease;
use crate::protocol::reply::{Orphan, Reply};
use crate::protocol::request::{Op, Plain, Request, Solo};
use crate::protocol::slot::Ticket;
use crate::sql::{END_TRANSACTION, Scope};
use crate::worker::batch::{Broken, MAX_BATCH, Outcome};
use crate::worker::session::{Conn, Failed};
use crate::worker::{End, Worker};
use crate::worker::{cause, solo};

impl Worker {
    /// The uncontended case: one request, one statement, no batch bookkeeping.
    pub(super) fn serve_one(
        &mut self,
        conn: &mut Conn,
        lease: &Lease,
        request: Plain,
    ) -> Result<(), End> {
        let outcome = if request.op != Op::TryLock && request.generation != lease.generation {
            Outcome::OtherGeneration
        } else {
            match self.query.one(conn, request.op, request.mode, request.key) {
                Ok(row) => Outcome::Done(row),
                Err(Failed::Rejected(e)) => Outcome::Failed(e),
                Err(Failed::Broken(e)) => {
                    cause::lost(&self.spec.link, lease.generation, &e);
                    self.fail(Request::Plain(request), Error::connection_lost());
                    return Err(self.ended(lease.generation));
                }
            }
        };
        let current = self.spec.link.generations.is_current(lease.generation);
        self.reply(conn, lease, current, request, outcome)
    }

    /// Takes whatever requests queued behind `first` (up to a batch), runs them together, and
    /// replies to each.
    pub(super) fn serve_batch(
        &mut self,
        conn: &mut Conn,
        lease: &Lease,
        first: Plain,
    ) -> Result<(), End> {
        // Whatever queued up meanwhile goes to the server in the same round trip.
        self.batch.requests.push(first);
        // A solo request ends the batch and runs after it, alone.
        let mut solo = None;
        while self.batch.requests.len() < MAX_BATCH {
            match self.spec.requests.try_recv() {
                Ok(Request::Plain(request)) => self.batch.requests.push(request),
                Ok(Request::Solo(request, reply)) => {
                    solo = Some((request, reply));
                    break;
                }
                Err(_) => break,
            }
        }
        let ran = self.batch.run(&mut self.query, conn, lease.generation);
        let current = ran.is_ok() && self.spec.link.generations.is_current(lease.generation);
        let mut result = match ran {
            Ok(()) => Ok(()),
            Err(Broken(e)) => {
                cause::lost(&self.spec.link, lease.generation, &e);
                Err(self.ended(lease.generation))
            }
        };
        let mut requests = std::mem::take(&mut self.batch.requests);
        for (i, request) in requests.drain(..).enumerate() {
            let outcome = self.batch.take_outcome(i);
            if result.is_err() {
                // What ran is unknown and the session is going: nobody gets a grant from it.
                self.fail(Request::Plain(request), Error::connection_lost());
            } else if let Err(end) = self.reply(conn, lease, current, request, outcome) {
                result = Err(end);
            }
        }
        self.batch.requests = requests; // keeps its capacity
        match solo {
            Some((solo, reply)) if result.is_ok() => self.serve_solo(conn, lease, &solo, reply),
            Some((solo, reply)) => {
                self.fail(Request::Solo(solo, reply), Error::connection_lost());
                result
            }
            None => result,
        }
    }

    /// A solo request: one statement (a wait: one round trip) of its own.
    #[inline(never)]
    pub(super) fn serve_solo(
        &mut self,
        conn: &mut Conn,
        lease: &Lease,
        solo: &Solo,
        reply: Ticket,
    ) -> Result<(), End> {
        let answer = match solo::serve(solo, conn, lease) {
            // Granted by a session that is already being replaced: its holds are gone.
            Ok(answer)
                if answer.is_grant()
                    && !self.spec.link.generations.is_current(lease.generation) =>
            {
                Reply::Failed(Error::connection_lost())
            }
            Ok(answer) => answer,
            Err(e) => {
                cause::lost(&self.spec.link, lease.generation, &e);
                self.answer(reply, Reply::Failed(Error::connection_lost()), None);
                return Err(self.ended(lease.generation));
            }
        };
        if conn.scope == Scope::Transaction && !answer.is_grant() {
            return self.end_transaction(conn, reply, answer);
        }
        let mut orphans = Vec::new();
        if let Some(refused) = self.answer(reply, answer, None) {
            // The caller gave up: nobody will own these holds.
            refused.orphans(None, &mut orphans);
        }
        orphans
            .into_iter()
            .try_for_each(|orphan| self.give_back(conn, orphan))
    }

    /// Answers one plain request from its outcome; gives back a grant whose caller has gone.
    fn reply(
        &mut self,
        conn: &mut Conn,
        lease: &Lease,
        current: bool,
        request: Plain,
        outcome: Outcome,
    ) -> Result<(), End> {
        let Plain {
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
            self.answer(reply, Reply::Failed(Error::pooler()), None);
            return Err(End::Lost);
        }
        if conn.scope == Scope::Transaction
            && (op == Op::Unlock && generation == lease.generation
                || op == Op::TryLock && !matches!(outcome, Outcome::Done(true)))
        {
            return self.end_of_transaction(conn, current, op, reply, outcome);
        }
        let answer = match outcome {
            _ if op != Op::TryLock && generation != lease.generation => Reply::NotHeld,
            _ if !current => Reply::Failed(Error::connection_lost()),
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
            Outcome::OtherGeneration | Outcome::Pending | Outcome::Retry => {
                Reply::Failed(Error::connection_lost())
            }
        };
        match self.answer(reply, answer, Some((key, mode))) {
            // The caller gave up before the grant arrived: nobody will ever own this hold, so give
            // it back now rather than leak it for the life of the connection.
            Some(Reply::Granted(lease)) => {
                self.give_back(
                    conn,
                    Orphan {
                        key,
                        mode,
                        generation: lease.generation,
                    },
                )?;
                // Given back by ending the lock's transaction: nothing more to serve.
                match conn.scope {
                    Scope::Transaction => Err(End::Finished),
                    Scope::Session => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// A lock transaction's release (its `ROLLBACK` ran) or refused try: answers, and ends the
    /// transaction first if it is still open, so that a manager that holds nothing keeps no
    /// server connection pinned. Its connection serves nothing more.
    #[cold]
    fn end_of_transaction(
        &mut self,
        conn: &mut Conn,
        current: bool,
        op: Op,
        reply: Ticket,
        outcome: Outcome,
    ) -> Result<(), End> {
        let answer = match outcome {
            Outcome::Done(_) if current && op == Op::Unlock => Reply::Released,
            Outcome::Done(false) if current => Reply::Busy,
            Outcome::Failed(e) => Reply::Failed(e),
            _ => Reply::Failed(Error::connection_lost()),
        };
        if op == Op::Unlock {
            self.answer(reply, answer, None);
            return Err(End::Finished);
        }
        self.end_transaction(conn, reply, answer)
    }

    /// A lock transaction that holds nothing: ends it (`ROLLBACK`, which unpins its server
    /// connection), then answers `answer`. Its connection serves nothing more.
    #[cold]
    fn end_transaction(
        &mut self,
        conn: &mut Conn,
        reply: Ticket,
        answer: Reply,
    ) -> Result<(), End> {
        if let Err(e) = conn.rows(END_TRANSACTION) {
            log::debug!(
                "distlock worker: ending a lock transaction: {}",
                e.into_error()
            );
        }
        self.answer(reply, answer, None);
        Err(End::Finished)
    }

    /// Answers `request` with `error` without running it.
    pub(super) fn fail(&mut self, request: Request, error: Error) {
        let (ticket, plain) = request.into_ticket();
        self.answer(ticket, Reply::Failed(error), plain);
    }

    /// Hands `reply` to the caller of `ticket`: at once when it is receiving, later otherwise, and
    /// never waiting for it. Returns the reply when its caller has already given up (a grant in
    /// it must be given back). `plain`: the key and mode of a plain request.
    #[inline(always)]
    fn answer(
        &mut self,
        ticket: Ticket,
        reply: Reply,
        plain: Option<(LockKey, Mode)>,
    ) -> Option<Reply> {
        match ticket.claim(reply) {
            Ok(delivery) => {
                if let Err(delivery) = delivery.try_send(self.spec.hand_over_turns) {
                    self.late.push(delivery, plain);
                }
                None
            }
            Err(refused) => Some(refused),
        }
    }

    /// Offers every late reply again and gives back the grants of callers that gave up. Never
    /// waits. `conn` is the current connection, or `None` while offline.
    #[inline]
    pub(super) fn settle_late(&mut self, conn: Option<&mut Conn>) -> Result<(), End> {
        // Almost always empty: keep the common case to a length check.
        if self.late.is_empty() {
            return Ok(());
        }
        self.settle_pending(conn)
    }

    /// The body of [`Worker::settle_late`] when something is owed.
    #[inline(never)]
    fn settle_pending(&mut self, mut conn: Option<&mut Conn>) -> Result<(), End> {
        while self.spec.link.parking.nudges().try_recv().is_ok() {}
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
        if let Err(failed) = self.query.one(conn, Op::Unlock, mode, key) {
            let e = failed.into_error();
            log::warn!("distlock worker: releasing an abandoned grant of {key} failed: {e}");
            // The hold may still be there with nobody to release it: end the session instead.
            return Err(self.ended(conn.generation));
        }
        Ok(())
    }

    /// Why the connection of `generation` stopped serving: the monitor replaced it, or it failed.
    pub(super) fn ended(&self, generation: u64) -> End {
        if self.spec.link.generations.is_current(generation) {
            End::Lost
        } else {
            End::Superseded
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
    pub(super) fn pooler_seen(&self) -> End {
        log::error!("distlock worker: {}", Error::pooler());
        self.spec.link.counters().server_refused();
        self.spec.link.generations.set_pooled();
        End::Lost
    }
}

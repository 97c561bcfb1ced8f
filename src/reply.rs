//! Requests to the worker, its replies, and the pool of reusable reply slots.
//!
//! A caller takes a [`ReplySlot`] from the manager's pool, arms it with a fresh ticket, sends the
//! request and waits on the slot's channel. The slot's state word decides, exactly once, whether the
//! reply is delivered or the caller has given up:
//!
//! * the worker moves `(ticket, WAITING)` to `(ticket, DELIVERED)` and only then sends;
//! * a caller whose bound passes moves `(ticket, WAITING)` to `(ticket, ABANDONED)`.
//!
//! Whoever loses the race learns it from the failed compare-and-swap: a worker that cannot deliver a
//! grant releases the lock at once (nobody will ever own it), and a caller that finds the reply
//! delivered receives it after all. A slot back in the pool with a new ticket makes every older ticket
//! fail, so a late reply can never reach the slot's next user.
//!
//! The channel is a rendezvous channel (`bounded(0)`): measured against `bounded(1)`, its receive
//! spins less before parking, which on a machine with few cores leaves the CPU to the worker and the
//! server, and costs fewer instructions (see the crate's Implementation docs for the figures). A
//! rendezvous send waits for the receiver, so the worker never blocks on one while it has work: it
//! hands the reply over with `try_send` when the caller is already waiting (the usual case: the
//! caller waits from the moment it sent its request) and otherwise keeps the [`Delivery`] and
//! completes it when it would go idle.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::error::{Error, ErrorKind};
use crate::key::LockKey;
use crate::link::Lease;
use crate::sql::{Mode, Op};

const WAITING: u64 = 0;
const DELIVERED: u64 = 1;
const ABANDONED: u64 = 2;
const PHASE_BITS: u32 = 2;

/// One request to the worker.
#[derive(Debug)]
pub(crate) struct Request {
    /// Lock or unlock.
    pub(crate) op: Op,
    /// Exclusive or shared.
    pub(crate) mode: Mode,
    /// The advisory lock it concerns.
    pub(crate) key: LockKey,
    /// For `Unlock` and `Check`: the connection generation that granted the hold. A worker of any
    /// other generation answers without touching its session, whose holds are not this guard's.
    pub(crate) generation: u64,
    /// The manager holds (or is taking) this key exactly once: this request's own hold. Then its
    /// statement's effect can be read back from `pg_locks` if a batch fails, so it may be batched.
    pub(crate) sole_hold: bool,
    /// Where the outcome goes.
    pub(crate) reply: Ticket,
}

/// The worker's answer to one request.
#[derive(Debug)]
pub(crate) enum Reply {
    /// `TryLock`: the session now holds the lock, under this lease.
    Granted(Lease),
    /// `TryLock`: another session holds it in a conflicting mode.
    Busy,
    /// `Unlock`: the session released one hold.
    Released,
    /// `Check`: the session holds the lock.
    Held,
    /// `Unlock`, `Check`: the session does not hold the lock (the connection that took it ended, and
    /// the server freed it).
    NotHeld,
    /// The statement failed.
    Failed(Error),
}

/// A slot armed for one request: the slot and the ticket that request may deliver under.
#[derive(Debug)]
pub(crate) struct Ticket {
    slot: Arc<ReplySlot>,
    ticket: u64,
}

impl Ticket {
    /// Claims the right to deliver `reply`: `Ok` when the caller is still waiting (it will take the
    /// reply, so it must be sent), `Err` with the reply when the caller gave up, so that the worker
    /// can undo a grant nobody will own.
    pub(crate) fn claim(self, reply: Reply) -> Result<Delivery, Reply> {
        let waiting = (self.ticket << PHASE_BITS) | WAITING;
        let delivered = (self.ticket << PHASE_BITS) | DELIVERED;
        match self.slot.state.compare_exchange(
            waiting,
            delivered,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(Delivery {
                slot: self.slot,
                reply,
            }),
            Err(_) => Err(reply),
        }
    }

    /// Claims and sends, waiting for the caller if need be (bounded). For paths off the hot loop.
    pub(crate) fn deliver(self, reply: Reply) -> Result<(), Reply> {
        self.claim(reply).map(Delivery::send)
    }
}

/// A claimed reply, owed to a caller that is waiting for it (or about to).
#[derive(Debug)]
pub(crate) struct Delivery {
    slot: Arc<ReplySlot>,
    reply: Reply,
}

impl Delivery {
    /// Hands the reply over if the caller is already blocked in its receive; otherwise gives the
    /// delivery back, to be completed later.
    pub(crate) fn try_send(self) -> Result<(), Delivery> {
        let Delivery { slot, reply } = self;
        match slot.tx.try_send(reply) {
            Ok(()) => Ok(()),
            Err(e) => Err(Delivery {
                slot,
                reply: e.into_inner(),
            }),
        }
    }

    /// Hands the reply over, waiting for the caller to arrive at its receive. The caller is
    /// between sending its request and receiving, or in its grace period, so the wait is short;
    /// it is bounded all the same.
    pub(crate) fn send(self) {
        if self
            .slot
            .tx
            .send_timeout(self.reply, DELIVERY_GRACE)
            .is_err()
        {
            log::error!("distlock: a caller did not take its reply within {DELIVERY_GRACE:?}");
        }
    }
}

/// A reusable reply channel with the state word that arbitrates between worker and caller.
#[derive(Debug)]
pub(crate) struct ReplySlot {
    /// `ticket << 2 | phase`.
    state: AtomicU64,
    /// Rendezvous: see the module docs.
    tx: Sender<Reply>,
    /// Read only by the caller that holds the slot.
    rx: Receiver<Reply>,
}

impl ReplySlot {
    pub(crate) fn new() -> Arc<ReplySlot> {
        let (tx, rx) = crossbeam_channel::bounded(0);
        Arc::new(ReplySlot {
            state: AtomicU64::new(0),
            tx,
            rx,
        })
    }
}

/// Arms a slot the caller holds exclusively (it came from the pool) with a fresh ticket.
pub(crate) fn arm(slot: &Arc<ReplySlot>) -> Ticket {
    // A rendezvous channel holds nothing between a send and its receive, so no earlier reply can
    // be waiting here; a sender that outlived its caller's grace period gives up on its own.
    let ticket = (slot.state.load(Ordering::Acquire) >> PHASE_BITS).wrapping_add(1);
    slot.state
        .store((ticket << PHASE_BITS) | WAITING, Ordering::Release);
    Ticket {
        slot: Arc::clone(slot),
        ticket,
    }
}

/// How long a caller that lost the race to a delivering worker waits for the send that follows.
/// The worker sends right after its compare-and-swap, so this is only ever reached if the worker
/// thread died in between.
const DELIVERY_GRACE: Duration = Duration::from_secs(1);

/// Waits for the reply to `ticket` until `deadline`. `None` means the caller gave up: the worker will
/// not deliver to this ticket any more, and undoes a grant it makes for it.
pub(crate) fn wait(slot: &ReplySlot, ticket: u64, deadline: Instant) -> Option<Reply> {
    match slot.rx.recv_deadline(deadline) {
        Ok(reply) => return Some(reply),
        Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
    }
    let waiting = (ticket << PHASE_BITS) | WAITING;
    let abandoned = (ticket << PHASE_BITS) | ABANDONED;
    match slot
        .state
        .compare_exchange(waiting, abandoned, Ordering::AcqRel, Ordering::Acquire)
    {
        Ok(_) => None,
        // The worker won: its reply is on the way.
        Err(_) => Some(slot.rx.recv_timeout(DELIVERY_GRACE).unwrap_or_else(|_| {
            Reply::Failed(Error::new(
                ErrorKind::Shutdown,
                "the lock manager's worker stopped while replying",
            ))
        })),
    }
}

impl Ticket {
    /// The ticket number, for [`wait`].
    pub(crate) fn number(&self) -> u64 {
        self.ticket
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(200)
    }

    /// Delivers from another thread, as the worker does, while this thread waits.
    fn deliver_from_worker(ticket: Ticket, reply: Reply) -> std::thread::JoinHandle<bool> {
        std::thread::spawn(move || ticket.deliver(reply).is_ok())
    }

    #[test]
    fn delivered_reply_reaches_the_waiting_caller() {
        let slot = ReplySlot::new();
        let ticket = arm(&slot);
        let n = ticket.number();
        let worker = deliver_from_worker(ticket, Reply::Held);
        assert!(matches!(wait(&slot, n, soon()), Some(Reply::Held)));
        assert!(worker.join().unwrap());
    }

    #[test]
    fn try_send_waits_for_a_parked_caller_and_completes_later_otherwise() {
        let slot = ReplySlot::new();
        let ticket = arm(&slot);
        let n = ticket.number();
        // Nobody is receiving yet: the claim succeeds, the hand-over is deferred.
        let delivery = ticket.claim(Reply::Busy).unwrap();
        let delivery = delivery.try_send().unwrap_err();
        let worker = std::thread::spawn(move || delivery.send());
        assert!(matches!(wait(&slot, n, soon()), Some(Reply::Busy)));
        worker.join().unwrap();
    }

    #[test]
    fn reply_after_the_caller_gave_up_is_handed_back() {
        let slot = ReplySlot::new();
        let ticket = arm(&slot);
        assert!(wait(&slot, ticket.number(), Instant::now()).is_none());
        assert!(matches!(ticket.claim(Reply::Held), Err(Reply::Held)));
    }

    #[test]
    fn stale_ticket_never_reaches_the_next_user() {
        let slot = ReplySlot::new();
        let old = arm(&slot);
        assert!(wait(&slot, old.number(), Instant::now()).is_none());
        let new = arm(&slot);
        let n = new.number();
        // The old request's late reply is refused; the new one's is delivered.
        assert!(old.claim(Reply::Held).is_err());
        let worker = deliver_from_worker(new, Reply::Busy);
        assert!(matches!(wait(&slot, n, soon()), Some(Reply::Busy)));
        assert!(worker.join().unwrap());
        // And a ticket that was armed but never delivered to is dead once re-armed.
        let unused = arm(&slot);
        let _next = arm(&slot);
        assert!(unused.claim(Reply::Held).is_err());
    }
}

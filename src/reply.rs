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
    /// Delivers the reply if its caller is still waiting; otherwise hands it back, so that the worker
    /// can undo a grant nobody will own.
    pub(crate) fn deliver(self, reply: Reply) -> Result<(), Reply> {
        let waiting = (self.ticket << PHASE_BITS) | WAITING;
        let delivered = (self.ticket << PHASE_BITS) | DELIVERED;
        if self
            .slot
            .state
            .compare_exchange(waiting, delivered, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(reply);
        }
        // The channel is empty: each ticket delivers at most once, and its caller takes that reply
        // before the slot is armed again. So this never blocks and never fails.
        self.slot.tx.try_send(reply).map_err(|e| e.into_inner())
    }
}

/// A reusable reply channel with the state word that arbitrates between worker and caller.
#[derive(Debug)]
pub(crate) struct ReplySlot {
    /// `ticket << 2 | phase`.
    state: AtomicU64,
    /// Capacity one: the worker's send never waits for the caller.
    tx: Sender<Reply>,
    /// Read only by the caller that holds the slot.
    rx: Receiver<Reply>,
}

impl ReplySlot {
    pub(crate) fn new() -> Arc<ReplySlot> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        Arc::new(ReplySlot {
            state: AtomicU64::new(0),
            tx,
            rx,
        })
    }
}

/// Arms a slot the caller holds exclusively (it came from the pool) with a fresh ticket.
pub(crate) fn arm(slot: &Arc<ReplySlot>) -> Ticket {
    // A reply can only be left behind when a delivered reply was not received within the grace
    // period below; never hand such a reply to the next user.
    while slot.rx.try_recv().is_ok() {}
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
        Instant::now() + Duration::from_millis(20)
    }

    #[test]
    fn delivered_reply_reaches_the_waiting_caller() {
        let slot = ReplySlot::new();
        let ticket = arm(&slot);
        let n = ticket.number();
        assert!(ticket.deliver(Reply::Held).is_ok());
        assert!(matches!(wait(&slot, n, soon()), Some(Reply::Held)));
    }

    #[test]
    fn reply_after_the_caller_gave_up_is_handed_back() {
        let slot = ReplySlot::new();
        let ticket = arm(&slot);
        assert!(wait(&slot, ticket.number(), soon()).is_none());
        assert!(matches!(ticket.deliver(Reply::Held), Err(Reply::Held)));
    }

    #[test]
    fn stale_ticket_never_reaches_the_next_user() {
        let slot = ReplySlot::new();
        let old = arm(&slot);
        assert!(wait(&slot, old.number(), soon()).is_none());
        let new = arm(&slot);
        let n = new.number();
        // The old request's late reply is refused; the new one's is delivered.
        assert!(old.deliver(Reply::Held).is_err());
        assert!(new.deliver(Reply::Busy).is_ok());
        assert!(matches!(wait(&slot, n, soon()), Some(Reply::Busy)));
        // And a ticket that was armed but never delivered to is dead once re-armed.
        let unused = arm(&slot);
        let next = arm(&slot);
        assert!(unused.deliver(Reply::Held).is_err());
        assert!(next.deliver(Reply::Released).is_ok());
    }
}

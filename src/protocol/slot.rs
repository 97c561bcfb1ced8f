//! Reply slots: how a reply reaches exactly the caller that waits for it, and never another.
//!
//! A caller takes a [`ReplySlot`] from the manager's pool, arms it with a fresh ticket, sends the
//! request and waits on the slot's channel until its own deadline. The slot's state word,
//! `ticket << 2 | phase`, decides exactly once who owns the reply:
//!
//! * `WAITING`: the request is out; nobody has decided anything yet.
//! * `CLAIMED`: the worker has a reply for this ticket and will hand it over. Only the worker moves
//!   `WAITING` to `CLAIMED`, and only then does it send.
//! * `ABANDONED`: the caller's deadline passed first. Only the caller moves a phase to `ABANDONED`,
//!   from `WAITING` (no reply yet) or from `CLAIMED` (a reply exists but has not reached it).
//!
//! The races and who loses them:
//!
//! * The caller gives up before the worker claims (`WAITING -> ABANDONED`): the worker's claim
//!   fails, it gets its reply back, and a grant in it is released on the server at once. The slot
//!   holds nothing for anyone, so the caller returns it to the pool.
//! * The worker claims while the caller is already receiving: the hand-over succeeds at once.
//! * The worker claims while the caller is not receiving yet (it was descheduled between sending
//!   its request and receiving): the hand-over is *late*. The worker never waits for it; it keeps
//!   the [`Delivery`] in its [`LateReplies`] and offers it again whenever it looks for work, and
//!   while it has nothing else to do it waits for any late caller to arrive at its receive.
//! * The caller's deadline passes while a late reply is claimed (`CLAIMED -> ABANDONED`): the caller
//!   returns a timeout on time, and the slot is *in doubt*: the worker still holds a reply for it.
//!   The caller therefore never returns such a slot to the pool: it detaches it, and the slot dies
//!   with the worker's last reference. No later user can ever receive on it, so a stale reply can
//!   never reach the wrong caller. The caller then nudges the worker, which sees `ABANDONED` and
//!   releases a grant in the reply at once.
//!
//! A receive that has timed out is over: a rendezvous send succeeds only while its receiver is
//! blocked in the receive, so once the caller has left, no reply can reach it, and its
//! compare-and-swap from `CLAIMED` cannot fail (the worker never moves a claimed phase).
//!
//! A slot back in the pool is re-armed with a new ticket, which makes every claim of an older
//! ticket fail, so a reply to an abandoned `WAITING` request cannot reach the slot's next user.
//!
//! The channel is a rendezvous channel (`bounded(0)`): measured against `bounded(1)`, its receive
//! spins less before parking, which on a machine with few cores leaves the CPU to the worker and the
//! server, and costs fewer instructions (see the README's Performance section).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender};

use crate::key::LockKey;
use crate::mode::Mode;
use crate::protocol::reply::{Orphan, Reply};

const WAITING: u64 = 0;
const CLAIMED: u64 = 1;
const ABANDONED: u64 = 2;
const PHASE_BITS: u32 = 2;

/// A slot armed for one request: the slot and the ticket that request may deliver under.
#[derive(Debug)]
pub(crate) struct Ticket {
    slot: Arc<ReplySlot>,
    ticket: u64,
}

impl Ticket {
    /// Claims the right to deliver `reply`: `Ok` when the caller is still waiting (the reply is
    /// now owed to it), `Err` with the reply when the caller gave up, so that the worker can undo a
    /// grant nobody will own.
    #[inline]
    pub(crate) fn claim(self, reply: Reply) -> Result<Delivery, Reply> {
        match self.slot.state.compare_exchange(
            state(self.ticket, WAITING),
            state(self.ticket, CLAIMED),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(Delivery {
                slot: self.slot,
                ticket: self.ticket,
                reply,
            }),
            Err(_) => Err(reply),
        }
    }
}

/// A claimed reply, owed to a caller that is waiting for it, or about to, or that gave up after the
/// claim.
#[derive(Debug)]
pub(crate) struct Delivery {
    slot: Arc<ReplySlot>,
    ticket: u64,
    reply: Reply,
}

impl Delivery {
    /// Hands the reply over if the caller is blocked in its receive right now; otherwise gives the
    /// delivery back, to be offered again later. Never waits.
    ///
    /// `turns` is how many times to offer it: 1 normally, a few more when callers spin for their
    /// replies (`Builder::spin_wait`).
    #[inline]
    pub(crate) fn try_send(self, turns: u32) -> Result<(), Delivery> {
        let Delivery {
            slot,
            ticket,
            mut reply,
        } = self;
        match slot.tx.try_send(reply) {
            Ok(()) => return Ok(()),
            Err(e) => reply = e.into_inner(),
        }
        // A spinning caller reaches its receive a moment after it sees the claim: offer the reply
        // for those few turns more, and move on after them either way.
        for _ in 1..turns {
            std::hint::spin_loop();
            match slot.tx.try_send(reply) {
                Ok(()) => return Ok(()),
                Err(e) => reply = e.into_inner(),
            }
        }
        Err(Delivery {
            slot,
            ticket,
            reply,
        })
    }

    /// True when the caller gave up after the claim: the reply will never be taken.
    pub(crate) fn is_abandoned(&self) -> bool {
        self.slot.state.load(Ordering::Acquire) == state(self.ticket, ABANDONED)
    }

    /// The reply, taken back from a delivery whose caller gave up.
    pub(crate) fn into_reply(self) -> Reply {
        self.reply
    }

    /// The slot's sending side, for a worker that waits (with `crossbeam_channel::Select`) until
    /// one of its late callers is receiving.
    fn sender(&self) -> &Sender<Reply> {
        &self.slot.tx
    }
}

/// Replies claimed for callers that were not receiving yet when they were ready, kept by the worker
/// until each is taken or its caller gives up. Kept across reconnects: a caller waits for its reply
/// until its own deadline whatever happens to the connection (a wait in the lock queue: or until
/// its connection is declared lost).
#[derive(Debug)]
pub(crate) struct LateReplies {
    /// Owed now.
    owed: Vec<Late>,
    /// A second buffer for `owed`, so that settling allocates nothing.
    spare: Vec<Late>,
}

/// One owed reply, with the plain lock it is about (for a grant beyond a plain one, the reply
/// names its holds itself).
#[derive(Debug)]
struct Late {
    delivery: Delivery,
    plain: Option<(LockKey, Mode)>,
}

impl LateReplies {
    pub(crate) fn new(capacity: usize) -> LateReplies {
        LateReplies {
            owed: Vec::with_capacity(capacity),
            spare: Vec::with_capacity(capacity),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.owed.is_empty()
    }

    /// Keeps a reply whose caller was not receiving yet.
    pub(crate) fn push(&mut self, delivery: Delivery, plain: Option<(LockKey, Mode)>) {
        self.owed.push(Late { delivery, plain });
    }

    /// Offers every owed reply again, and moves the grants of callers that gave up to `orphans`.
    /// Never waits.
    pub(crate) fn settle(&mut self, orphans: &mut Vec<Orphan>) {
        std::mem::swap(&mut self.owed, &mut self.spare);
        for late in self.spare.drain(..) {
            if late.delivery.is_abandoned() {
                late.delivery.into_reply().orphans(late.plain, orphans);
                continue;
            }
            if let Err(delivery) = late.delivery.try_send(1) {
                self.owed.push(Late { delivery, ..late });
            }
        }
    }

    /// Waits up to `timeout` for something to do: a late caller arriving at its receive, a request
    /// on `requests`, or a caller giving up on a claimed reply (a nudge on `nudges`). Does none of
    /// them; the worker looks again.
    pub(crate) fn wait<T>(&self, requests: &Receiver<T>, nudges: &Receiver<()>, timeout: Duration) {
        self.wait_also::<T, ()>(requests, None, nudges, timeout);
    }

    /// As [`LateReplies::wait`], and also for `also` to be ready (a connect attempt's result).
    pub(crate) fn wait_also<T, U>(
        &self,
        requests: &Receiver<T>,
        also: Option<&Receiver<U>>,
        nudges: &Receiver<()>,
        timeout: Duration,
    ) {
        let mut select = Select::new();
        for late in &self.owed {
            select.send(late.delivery.sender());
        }
        select.recv(requests);
        select.recv(nudges);
        if let Some(also) = also {
            select.recv(also);
        }
        let _ = select.ready_timeout(timeout);
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

/// How many times the worker offers a claimed reply before it keeps it for later, when callers
/// spin for their replies.
pub(crate) const SPIN_HAND_OVER_TURNS: u32 = 64;

fn state(ticket: u64, phase: u64) -> u64 {
    (ticket << PHASE_BITS) | phase
}

/// Arms a slot the caller holds exclusively (it came from the pool) with a fresh ticket.
pub(crate) fn arm(slot: &Arc<ReplySlot>) -> Ticket {
    // Only slots whose every reply was taken or refused come back to the pool, so no earlier
    // ticket can deliver here any more; the new ticket makes sure of it.
    let ticket = (slot.state.load(Ordering::Acquire) >> PHASE_BITS).wrapping_add(1);
    slot.state.store(state(ticket, WAITING), Ordering::Release);
    Ticket {
        slot: Arc::clone(slot),
        ticket,
    }
}

/// How a caller's wait for its reply ended.
#[derive(Debug)]
pub(crate) enum Waited {
    /// The reply to this very ticket.
    Reply(Reply),
    /// The deadline passed first, or the connection was lost. `in_doubt`: the worker had claimed a reply that never reached
    /// the caller, so the slot must not go back to the pool (and the worker should be nudged to
    /// release a grant in it).
    GaveUp {
        /// The slot may still be sent to; it must be detached from the pool.
        in_doubt: bool,
        /// It gave up before the deadline: the connection serving the request was lost.
        lost: bool,
    },
}

/// Waits for the reply to `ticket` until `deadline`, and not a moment longer.
///
/// With `spin` turns, the caller first watches the state word, on its CPU, for the worker's claim,
/// and only then blocks in its receive (see `Builder::spin_wait`).
#[inline(always)]
pub(crate) fn wait(slot: &ReplySlot, ticket: u64, deadline: Instant, spin: u32) -> Waited {
    for _ in 0..spin {
        if slot.state.load(Ordering::Acquire) != state(ticket, WAITING) {
            break;
        }
        std::hint::spin_loop();
    }
    // A caller that comes to its receive past its deadline (descheduled, or paused) gives up
    // without receiving a reply the worker has claimed: the worker may be offering it right now
    // (waiting for late callers) and would hand it over. A reply not claimed yet is on offer to
    // nobody, and the receive gives up at the deadline by itself, so only then is the clock read.
    let claimed = slot.state.load(Ordering::Acquire) != state(ticket, WAITING);
    if !claimed || Instant::now() < deadline {
        if let Ok(reply) = slot.rx.recv_deadline(deadline) {
            return Waited::Reply(reply);
        }
    }
    give_up(slot, ticket, false)
}

/// [`wait`] (without spinning), which also gives up once `lost` is ready: the connection the
/// request went to was declared lost, and its reply may never come.
pub(crate) fn wait_or_lost(
    slot: &ReplySlot,
    ticket: u64,
    deadline: Instant,
    lost: &Receiver<()>,
) -> Waited {
    let claimed = slot.state.load(Ordering::Acquire) != state(ticket, WAITING);
    let mut gone = false;
    if !claimed || Instant::now() < deadline {
        let mut select = Select::new();
        let reply = select.recv(&slot.rx);
        select.recv(lost);
        match select.select_deadline(deadline) {
            Ok(op) if op.index() == reply => {
                if let Ok(reply) = op.recv(&slot.rx) {
                    return Waited::Reply(reply);
                }
            }
            Ok(op) => gone = op.recv(lost).is_err(),
            Err(_) => {}
        }
    }
    give_up(slot, ticket, gone)
}

/// The receive is over, so no reply can reach this caller any more: decides the ticket's fate.
#[cold]
fn give_up(slot: &ReplySlot, ticket: u64, lost: bool) -> Waited {
    match slot.state.compare_exchange(
        state(ticket, WAITING),
        state(ticket, ABANDONED),
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => Waited::GaveUp {
            in_doubt: false,
            lost,
        },
        Err(_) => {
            // Claimed by the worker, not delivered: the worker never changes a claimed phase, so
            // this store is the only change and cannot race with another.
            slot.state
                .store(state(ticket, ABANDONED), Ordering::Release);
            Waited::GaveUp {
                in_doubt: true,
                lost,
            }
        }
    }
}

impl Ticket {
    /// The ticket number, for [`wait`].
    pub(crate) fn number(&self) -> u64 {
        self.ticket
    }
}

#[cfg(test)]
#[path = "slot_tests.rs"]
mod tests;

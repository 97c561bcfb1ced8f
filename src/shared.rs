//! The state every clone of a manager and every guard share: the worker's queue, the reply
//! slots, the table of held keys, the connection's state. A guard's release walks guard → shared
//! → table and never enters the manager's file.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{SendTimeoutError, Sender};
use object_pool::Pool;
use parking_lot::{Condvar, Mutex};

use crate::clock::deadline_in;
use crate::error::{Error, Result};
use crate::key::LockKey;
use crate::link::{Link, Site};
use crate::reply::{self, Reply, ReplySlot, Request, Waited};
use crate::special::Special;
use crate::sql::{Mode, Op};
use crate::table::Table;

/// One call to the worker, as a caller makes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call {
    /// Lock, unlock or check.
    pub(crate) op: Op,
    /// Exclusive or shared.
    pub(crate) mode: Mode,
    /// The lock.
    pub(crate) key: LockKey,
    /// For `Unlock` and `Check`: the generation that granted the hold (0 for `TryLock`).
    pub(crate) generation: u64,
    /// The manager's hold of the key is this call's alone (see [`Request::sole_hold`]).
    pub(crate) sole_hold: bool,
    /// When the caller stops waiting.
    pub(crate) deadline: Instant,
}

/// State shared by every clone of a manager and every guard it handed out.
pub(crate) struct Shared {
    /// The worker's queue.
    pub(crate) requests: Sender<Request>,
    /// Reply slots, reused from call to call.
    pub(crate) replies: Pool<Arc<ReplySlot>>,
    /// Keys held or being acquired through this manager.
    pub(crate) table: Mutex<Table>,
    /// Signalled whenever a hold is given back, to wake local waiters at once.
    pub(crate) released: Condvar,
    /// Bound on each wait for the worker.
    pub(crate) request_timeout: Duration,
    /// Most holds at once.
    pub(crate) max_locks: usize,
    /// The cap of the backoff between tries of a held lock.
    pub(crate) max_retry_interval: Duration,
    /// The current connection's state.
    pub(crate) link: Arc<Link>,
    /// Turns a lone caller spins for its reply before it blocks (0: none; `Builder::spin_wait`).
    pub(crate) spin_turns: u32,
    /// Calls waiting for a reply now, counted only when `spin_turns` is not 0.
    pub(crate) in_flight: AtomicUsize,
    /// Dropped with the last handle and guard, which stops the monitor.
    pub(crate) _shutdown: Sender<()>,
    /// Declared after `requests`, so dropped after it: wakes the worker to find its queue closed.
    pub(crate) _wake_on_drop: WakeOnDrop,
    /// The connections that wait in PostgreSQL's lock queue (`Builder::wait_connections`).
    pub(crate) waits: Option<Arc<crate::waiting::WaitPool>>,
}

/// Unparks the worker when dropped.
pub(crate) struct WakeOnDrop(pub(crate) Arc<Link>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        self.0.unpark_worker();
    }
}

impl Shared {
    #[inline]
    pub(crate) fn request_deadline(&self) -> Instant {
        deadline_in(self.request_timeout)
    }

    /// Sends one request and waits for its reply until the call's deadline.
    pub(crate) fn round_trip(&self, call: Call) -> Result<Reply> {
        self.exchange(call, None)
    }

    /// Sends one special request (see `crate::special`) and waits for its reply until the call's
    /// deadline.
    pub(crate) fn round_trip_special(&self, call: Call, special: Special) -> Result<Reply> {
        self.exchange(call, Some(Box::new(special)))
    }

    #[inline(always)]
    fn exchange(&self, call: Call, special: Option<Box<Special>>) -> Result<Reply> {
        let slot = self.replies.pull(ReplySlot::new);
        let ticket = reply::arm(&slot);
        let number = ticket.number();
        let request = Request {
            op: call.op,
            mode: call.mode,
            key: call.key,
            generation: call.generation,
            sole_hold: call.sole_hold,
            reply: ticket,
            special,
        };
        let deadline = call.deadline;
        // The queue is almost never full: try without reading the clock first.
        match self.requests.try_send(request) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(request)) => {
                self.send_when_room(request, deadline)?;
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                return Err(Error::shutdown());
            }
        }
        self.link.wake_worker();
        self.link.hook(Site::BeforeReceive);
        let waited = if self.spin_turns == 0 {
            reply::wait(&slot, number, deadline, 0)
        } else {
            // Spin only as the manager's one call in flight: many spinning callers would take
            // the CPUs from the worker and the server.
            let alone = self.in_flight.fetch_add(1, Ordering::AcqRel) == 0;
            let spin = if alone { self.spin_turns } else { 0 };
            let waited = reply::wait(&slot, number, deadline, spin);
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            waited
        };
        match waited {
            Waited::Reply(Reply::Failed(e)) => Err(e),
            Waited::Reply(reply) => Ok(reply),
            Waited::GaveUp { in_doubt } => {
                if in_doubt {
                    // The worker holds a reply for this slot that never reached us: the slot must
                    // never serve another call. Detached, it dies with the worker's reference; the
                    // nudge makes the worker give back a grant in the reply at once.
                    let _ = slot.detach();
                    self.link.nudge();
                }
                Err(Error::timeout(
                    "timed out waiting for the lock manager's worker",
                ))
            }
        }
    }

    /// Queues `request` in a full queue, waiting for room until `deadline`.
    #[cold]
    #[inline(never)]
    fn send_when_room(&self, request: Request, deadline: Instant) -> Result<()> {
        match self.requests.send_deadline(request, deadline) {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Timeout(_)) => Err(Error::timeout(
                "timed out waiting for the lock manager's queue",
            )),
            Err(SendTimeoutError::Disconnected(_)) => Err(Error::shutdown()),
        }
    }

    /// Gives back the hold of a guard and wakes local waiters: the key may be free now.
    pub(crate) fn release_hold(&self, key: LockKey, mode: Mode) {
        self.table.lock().release(key, mode, true);
        self.released.notify_all();
    }

    /// Gives back a reservation whose try failed. Nobody is woken: the try failed because another
    /// session holds the key, so local waiters gain nothing by trying now (waking them would make
    /// two waiters of one key wake each other in a busy loop).
    pub(crate) fn unreserve(&self, key: LockKey, mode: Mode) {
        self.table.lock().release(key, mode, false);
    }

    /// True when `key` has exactly one hold through this manager: always for an exclusive hold.
    pub(crate) fn sole_hold(&self, key: LockKey, mode: Mode) -> bool {
        mode == Mode::Exclusive || self.table.lock().holds(key) == 1
    }

    /// The state of the manager's connection.
    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    /// The request timeout, the bound on a release.
    pub(crate) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }
}

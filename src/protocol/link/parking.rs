//! The worker's parking and wake-ups: callers and the monitor wake it, it parks when idle.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::thread::Thread;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

/// In [`Parking::take_due`]: a heartbeat is due.
pub(crate) const DUE_HEARTBEAT: u8 = 1;
/// In [`Parking::take_due`]: a look at the socket is due.
pub(crate) const DUE_LOOK: u8 = 2;

/// Where the serving worker parks, and how callers and the monitor wake it.
#[derive(Debug)]
pub(crate) struct Parking {
    /// True while the serving worker is parked (or about to park) for want of requests.
    idle: AtomicBool,
    /// Set by the monitor when the connection has been idle for a heartbeat ([`DUE_HEARTBEAT`]:
    /// the worker, unparked, checks the connection with a round trip) or for one of its ticks
    /// ([`DUE_LOOK`]: it reads its socket). Keeping the clock in the monitor keeps it off the
    /// request path.
    due: AtomicU8,
    /// The thread of the worker serving now, unparked when a request is queued while it is idle.
    worker: Mutex<Option<Thread>>,
    /// A caller that gave up on a reply the worker had already claimed sends here, so that the
    /// worker releases a grant in it at once (see `crate::protocol::slot`). Holds one nudge at most.
    nudge_tx: Sender<()>,
    nudge_rx: Receiver<()>,
}

impl Parking {
    pub(crate) fn new() -> Parking {
        let (nudge_tx, nudge_rx) = crossbeam_channel::bounded(1);
        Parking {
            idle: AtomicBool::new(false),
            due: AtomicU8::new(0),
            worker: Mutex::new(None),
            nudge_tx,
            nudge_rx,
        }
    }

    /// Tells the worker that a caller gave up on a reply it had claimed (see `crate::protocol::slot`).
    pub(crate) fn nudge(&self) {
        let _ = self.nudge_tx.try_send(());
    }

    /// Where the worker hears nudges.
    pub(crate) fn nudges(&self) -> &Receiver<()> {
        &self.nudge_rx
    }

    /// Registers the calling thread as the worker to wake.
    pub(crate) fn set_worker(&self) {
        *self.worker.lock() = Some(std::thread::current());
    }

    /// The worker says it is about to park (`true`) or has woken (`false`).
    ///
    /// The worker sets this, then checks the queue once more before parking; a caller queues its
    /// request, then reads this. Both sequentially consistent, so at least one of them sees the
    /// other's write, and no request waits for a worker that went to sleep past it.
    pub(crate) fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::SeqCst);
    }

    /// The monitor asks the worker for a heartbeat.
    pub(crate) fn request_heartbeat(&self) {
        self.due.fetch_or(DUE_HEARTBEAT, Ordering::SeqCst);
        self.unpark_worker();
    }

    /// The monitor asks the worker, idle since its last tick, to look at its socket.
    pub(crate) fn request_look(&self) {
        self.due.fetch_or(DUE_LOOK, Ordering::SeqCst);
        self.unpark_worker();
    }

    /// The worker takes what the monitor asked for: [`DUE_HEARTBEAT`] and [`DUE_LOOK`] bits, 0
    /// for nothing.
    pub(crate) fn take_due(&self) -> u8 {
        self.due.swap(0, Ordering::SeqCst)
    }

    /// Wakes the worker if it is idle; called after queueing a request.
    #[inline]
    pub(crate) fn wake_worker(&self) {
        if self.idle.load(Ordering::SeqCst) {
            self.unpark_worker();
        }
    }

    /// Wakes the worker unconditionally (the manager is going away: it should notice at once).
    pub(crate) fn unpark_worker(&self) {
        if let Some(worker) = self.worker.lock().as_ref() {
            worker.unpark();
        }
    }
}

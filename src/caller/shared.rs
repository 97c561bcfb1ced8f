//! The state every clone of a manager and every guard share: the worker's queue, the reply
//! slots, the table of held keys, the connection's state, the waiting connections. Its fields are
//! private: the table and the condition variable that wakes local waiters change together, here.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{SendTimeoutError, Sender};
use object_pool::Pool;
use parking_lot::{Condvar, Mutex};

use crate::caller::held_watch::HeldWatch;
use crate::caller::pool::WaitPool;
use crate::caller::table::{Release, Reservation, Table};
use crate::clock::deadline_in;
use crate::error::{Error, ErrorKind, Result};
use crate::key::LockKey;
use crate::mode::Mode;
use crate::protocol::link::{Link, Site};
use crate::protocol::names::Names;
use crate::protocol::reply::Reply;
use crate::protocol::request::{Op, Plain, Request, Solo};
use crate::protocol::slot::{self, ReplySlot, Ticket, Waited};
use crate::stats::Stats;

/// Reply slots made up front; the pool grows to the number of calls in flight at once.
const INITIAL_REPLY_SLOTS: usize = 16;

/// One plain call to the worker, as a caller makes it.
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
    /// The manager's hold of the key is this call's alone (see [`Plain::sole_hold`]).
    pub(crate) sole_hold: bool,
    /// When the caller stops waiting.
    pub(crate) deadline: Instant,
}

/// The caller side's settings, from the builder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Bound on each wait for the worker.
    pub(crate) request_timeout: Duration,
    /// Most holds at once: the builder's `max_locks`, or the manager's share of the server's
    /// lock table when that is smaller.
    pub(crate) max_locks: usize,
    /// Entries of the server's shared lock table (0: unknown), when its share is the limit.
    pub(crate) lock_table_limit: Option<i64>,
    /// The cap of the backoff between tries of a held lock.
    pub(crate) max_retry_interval: Duration,
    /// Turns a lone caller spins for its reply before it blocks (0: none).
    pub(crate) spin_turns: u32,
    /// Transaction mode: every lock lives in a lock transaction of the pool (`waits`).
    pub(crate) transactions: bool,
    /// Warn of guards held longer than this ([`crate::Builder::warn_held_after`]).
    pub(crate) warn_held_after: Option<Duration>,
}

/// The waiting connections of a manager: each one the shared state of a manager of its own.
pub(crate) type Waits = WaitPool<Arc<Shared>>;

/// State shared by every clone of a manager and every guard it handed out.
pub(crate) struct Shared {
    /// The worker's queue.
    requests: Sender<Request>,
    /// Reply slots, reused from call to call.
    replies: Pool<Arc<ReplySlot>>,
    /// Keys held or being acquired through this manager.
    table: Mutex<Table>,
    /// Signalled after every release that wakes local waiters ([`Release::Returned`]).
    released: Condvar,
    settings: Settings,
    /// The current connection's state.
    link: Arc<Link>,
    /// Calls waiting for a reply now, counted only when `spin_turns` is not 0.
    in_flight: AtomicUsize,
    /// Dropped with the last handle and guard, which stops the monitor.
    _shutdown: Sender<()>,
    /// Declared after `requests`, so dropped after it: wakes the worker to find its queue closed.
    _wake_on_drop: WakeOnDrop,
    /// The connections that wait in PostgreSQL's lock queue (none: waits poll).
    waits: Option<Arc<Waits>>,
    /// Guards watched for being held too long, when the manager warns of them.
    held_watch: Option<Arc<HeldWatch>>,
    /// The names this manager records, shared with its worker.
    names: Arc<Names>,
    /// The manager's application name, which a waiting connection's label starts with.
    name: Arc<str>,
}

/// Unparks the worker when dropped.
struct WakeOnDrop(Arc<Link>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        self.0.parking.unpark_worker();
    }
}

impl Shared {
    /// The caller side of a manager whose worker serves `requests` and keeps `link`.
    pub(crate) fn new(
        requests: Sender<Request>,
        link: Arc<Link>,
        shutdown: Sender<()>,
        settings: Settings,
        waits: Option<Waits>,
        names: Arc<Names>,
        name: Arc<str>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            requests,
            replies: Pool::new(INITIAL_REPLY_SLOTS, ReplySlot::new),
            table: Mutex::new(Table::default()),
            released: Condvar::new(),
            link: Arc::clone(&link),
            in_flight: AtomicUsize::new(0),
            _shutdown: shutdown,
            _wake_on_drop: WakeOnDrop(link),
            waits: waits.map(Arc::new),
            held_watch: settings
                .warn_held_after
                .map(|after| Arc::new(HeldWatch::new(after))),
            settings,
            names,
            name,
        })
    }

    /// The names this manager records ([`crate::Builder::record_names`]).
    #[inline]
    pub(crate) fn names(&self) -> &Names {
        &self.names
    }

    /// The manager's application name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The watch of guards held too long, when the manager keeps one.
    #[inline]
    pub(crate) fn held_watch(&self) -> Option<&Arc<HeldWatch>> {
        self.held_watch.as_ref()
    }

    #[inline]
    pub(crate) fn request_deadline(&self) -> Instant {
        deadline_in(self.settings.request_timeout)
    }

    /// The request timeout, the bound on every round trip.
    pub(crate) fn request_timeout(&self) -> Duration {
        self.settings.request_timeout
    }

    /// The settings this manager was built with.
    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The state of the manager's connection.
    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    /// The connection state, where tests install their fault hooks.
    #[cfg(test)]
    pub(crate) fn link_arc(&self) -> &Arc<Link> {
        &self.link
    }

    /// The waiting connections, if the manager has any.
    pub(crate) fn waits(&self) -> Option<&Arc<Waits>> {
        self.waits.as_ref()
    }

    /// Fails fast while there is no connection: a reconnect under way, or, for good, a pooler
    /// seen sharing the session.
    #[inline]
    pub(crate) fn check_online(&self) -> Result<()> {
        if self.link.generations.is_online() {
            Ok(())
        } else {
            Err(self.offline_error())
        }
    }

    /// Out of line: the request path only ever tests `is_online`.
    #[cold]
    #[inline(never)]
    fn offline_error(&self) -> Error {
        if self.link.generations.is_pooled() {
            Error::pooler()
        } else {
            self.link.generations.offline_error()
        }
    }

    /// Sends one plain request and waits for its reply until the call's deadline.
    pub(crate) fn round_trip(&self, call: Call) -> Result<Reply> {
        self.exchange(call.deadline, None, |reply| {
            Request::Plain(Plain {
                op: call.op,
                mode: call.mode,
                key: call.key,
                generation: call.generation,
                sole_hold: call.sole_hold,
                reply,
            })
        })
    }

    /// Sends one solo request and waits for its reply until `deadline`.
    pub(crate) fn round_trip_solo(&self, solo: Solo, deadline: Instant) -> Result<Reply> {
        // In transaction mode the manager's own connection shares its server session through the
        // pooler: it may look (`holders`), never lock.
        if self.settings.transactions
            && !matches!(solo, Solo::Holders(_) | Solo::Names(_) | Solo::Token)
        {
            return Err(Error::not_in_transaction_mode());
        }
        // A wait in the lock queue also ends when its connection is declared lost: a frozen
        // server would otherwise keep it until its deadline.
        let lost = match solo {
            Solo::Wait(_) => self.link.generations.loss_signal(),
            _ => None,
        };
        self.exchange(deadline, lost.as_ref(), |reply| {
            Request::Solo(Box::new(solo), reply)
        })
    }

    /// Sends a request and waits for its reply until `deadline`, or until `lost` is ready.
    #[inline(always)]
    fn exchange(
        &self,
        deadline: Instant,
        lost: Option<&crossbeam_channel::Receiver<()>>,
        request: impl FnOnce(Ticket) -> Request,
    ) -> Result<Reply> {
        let slot = self.replies.pull(ReplySlot::new);
        let ticket = slot::arm(&slot);
        let number = ticket.number();
        let request = request(ticket);
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
        self.link.parking.wake_worker();
        self.link.hook(Site::BeforeReceive);
        let spin_turns = self.settings.spin_turns;
        let waited = if let Some(lost) = lost {
            slot::wait_or_lost(&slot, number, deadline, lost)
        } else if spin_turns == 0 {
            slot::wait(&slot, number, deadline, 0)
        } else {
            // Spin only as the manager's one call in flight: many spinning callers would take
            // the CPUs from the worker and the server.
            let alone = self.in_flight.fetch_add(1, Ordering::AcqRel) == 0;
            let spin = if alone { spin_turns } else { 0 };
            let waited = slot::wait(&slot, number, deadline, spin);
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            waited
        };
        match waited {
            Waited::Reply(Reply::Failed(e)) => Err(e),
            Waited::Reply(reply) => Ok(reply),
            Waited::GaveUp { in_doubt, lost } => {
                if in_doubt {
                    // The worker holds a reply for this slot that never reached us: the slot must
                    // never serve another call. Detached, it dies with the worker's reference; the
                    // nudge makes the worker give back a grant in the reply at once.
                    let _ = slot.detach();
                    self.link.parking.nudge();
                }
                if lost {
                    return Err(Error::new(
                        ErrorKind::ConnectionLost,
                        "the connection waiting in the lock queue was lost (its server stopped \
                         answering)",
                    ));
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

    /// Reserves every one of `keys` (or none) within the manager's `max_locks`.
    #[inline]
    pub(crate) fn reserve_all(&self, keys: &[LockKey], mode: Mode) -> Reservation {
        self.table
            .lock()
            .reserve_all(keys, mode, self.settings.max_locks)
    }

    /// Reserves every one of `keys` (or none) whatever the manager holds: for holds that are
    /// already counted elsewhere (a waiting connection's, a permit's slot).
    pub(crate) fn reserve_all_unbounded(&self, keys: &[LockKey], mode: Mode) -> Reservation {
        self.table.lock().reserve_all(keys, mode, usize::MAX)
    }

    /// Reserves every one of `keys`, waiting (until `deadline`; `None`: no deadline) for this
    /// manager's other threads to give back holds in the way. `false` at the deadline.
    ///
    /// # Errors
    ///
    /// [`crate::ErrorKind::TooManyLocks`] past the manager's `max_locks`.
    pub(crate) fn reserve_all_until(
        &self,
        keys: &[LockKey],
        mode: Mode,
        deadline: Option<Instant>,
    ) -> Result<bool> {
        let mut table = self.table.lock();
        loop {
            match table.reserve_all(keys, mode, self.settings.max_locks) {
                Reservation::Reserved { .. } => return Ok(true),
                Reservation::Full => return Err(self.too_many_locks()),
                Reservation::Conflict => {}
            }
            let timed_out = match deadline {
                Some(d) => self.released.wait_until(&mut table, d).timed_out(),
                None => {
                    self.released.wait(&mut table);
                    false
                }
            };
            if timed_out {
                return Ok(false);
            }
        }
    }

    /// The error of a hold past the manager's limit, saying which limit.
    #[cold]
    #[inline(never)]
    pub(crate) fn too_many_locks(&self) -> Error {
        let max = self.settings.max_locks;
        let message = match self.settings.lock_table_limit {
            Some(entries) => format!(
                "the lock manager already holds {max} locks, its share of the server's shared lock \
                 table ({entries} entries: max_locks_per_transaction × (max_connections + \
                 max_prepared_transactions); each manager may hold a quarter): a session that \
                 filled the table would make every other session's lock requests, and every new \
                 connection, fail with \"out of shared memory\". Raise max_locks_per_transaction \
                 on the server to hold more"
            ),
            None => format!(
                "the lock manager already holds its maximum number of locks ({max}, \
                 Builder::max_locks)"
            ),
        };
        Error::new(ErrorKind::TooManyLocks, message)
    }

    /// Gives back reservations whose try did not grant. Nobody is woken (see
    /// [`Release::Unused`]).
    #[inline]
    pub(crate) fn unreserve(&self, keys: &[LockKey], mode: Mode) {
        self.table.lock().release_all(keys, mode, Release::Unused);
    }

    /// Gives back the holds of guards and wakes local waiters: the keys may be free now.
    pub(crate) fn release_holds(&self, keys: &[LockKey], mode: Mode) {
        self.table.lock().release_all(keys, mode, Release::Returned);
        self.released.notify_all();
    }

    /// True when `key` has exactly one hold through this manager: always for an exclusive hold.
    pub(crate) fn sole_hold(&self, key: LockKey, mode: Mode) -> bool {
        mode == Mode::Exclusive || self.table.lock().holds(key) == 1
    }

    /// Holds in total, reserved ones included.
    pub(crate) fn held(&self) -> usize {
        self.table.lock().len()
    }

    /// A snapshot of the manager's statistics (see [`Stats`]): the counters, what the table holds,
    /// and the connections open.
    pub(crate) fn stats(&self) -> Stats {
        let mut stats = self.link.counters().snapshot();
        (stats.held_exclusive, stats.held_shared, stats.held_permits) =
            self.table.lock().held_by_kind();
        stats.lock_session_open = self.link.generations.is_online();
        stats.extra_connections_open = self
            .waits
            .as_ref()
            .map_or(0, |pool| pool.open_count() as u64);
        stats
    }

    /// The release counter, to pass to [`Shared::sleep_unless_released`].
    pub(crate) fn releases(&self) -> u64 {
        self.table.lock().releases()
    }

    /// Sleeps until `until`, or until a guard of this manager gives a hold back after the
    /// release counter read `seen`.
    pub(crate) fn sleep_unless_released(&self, seen: u64, until: Instant) {
        let mut table = self.table.lock();
        while table.releases() == seen {
            if self.released.wait_until(&mut table, until).timed_out() {
                break;
            }
        }
    }
}

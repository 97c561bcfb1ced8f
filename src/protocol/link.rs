//! The state of the manager's connection, shared by its worker, its monitor, callers and guards.
//!
//! Each connection the manager makes is a *generation*. Guards remember the generation that granted
//! them; when that connection is lost, its loss signal fires for all of them at once, and nothing they
//! do later (unlock, drop, `ensure_held`) reaches a newer session — which may hold the same key again.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::thread::Thread;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::stats::Counters;

/// A backend that may still hold locks nobody vouches for: its pid and start time (µs since the
/// epoch), so that a later connection can end it without ever hitting a reused pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backend {
    /// `pg_backend_pid()`.
    pub(crate) pid: i32,
    /// `backend_start` of that pid in `pg_stat_activity`, in microseconds since the epoch.
    pub(crate) started_us: i64,
}

/// In [`Link::take_due`]: a heartbeat is due.
pub(crate) const DUE_HEARTBEAT: u8 = 1;
/// In [`Link::take_due`]: a look at the socket is due.
pub(crate) const DUE_LOOK: u8 = 2;

/// What is known about the current connection.
#[derive(Debug)]
pub(crate) struct Link {
    /// The generation of the connection that is up and serving, or 0 while there is none (callers
    /// then fail fast). Read on every request, so it is an atomic rather than part of `state`.
    current: AtomicU64,
    /// Numbers statements; each `begin_statement` takes the next.
    statements: AtomicU64,
    /// `statement << 17 | 1 << 16 | generation & 0xffff` while a worker runs a statement, else 0.
    /// The monitor samples it: the same mark seen for longer than the request timeout is a stall.
    busy: AtomicU64,
    /// While a wait in PostgreSQL's lock queue runs (see [`Link::begin_wait`]): until when, in ns
    /// after `epoch` (`u64::MAX`: no deadline). The monitor gives such a statement that long.
    wait_until: AtomicU64,
    /// The origin of `wait_until`.
    epoch: std::time::Instant,
    /// Generations the monitor has declared lost because a statement stalled (see
    /// [`Link::note_stall`]).
    stalls: AtomicU64,
    /// True while the serving worker is parked (or about to park) for want of requests.
    idle: AtomicBool,
    /// Set by the monitor when the connection has been idle for a heartbeat ([`DUE_HEARTBEAT`]:
    /// the worker, unparked, checks the connection with a round trip) or for one of its ticks
    /// ([`DUE_LOOK`]: it reads its socket). Keeping the clock in the monitor keeps it off the
    /// request path.
    due: AtomicU8,
    /// Set for good once a pooler was seen sharing the manager's session (see `ErrorKind::Pooler`).
    pooled: AtomicBool,
    /// The thread of the worker serving now, unparked when a request is queued while it is idle.
    worker: Mutex<Option<Thread>>,
    /// A caller that gave up on a reply the worker had already claimed sends here, so that the
    /// worker releases a grant in it at once (see `crate::protocol::slot`). Holds one nudge at most.
    nudge_tx: Sender<()>,
    nudge_rx: Receiver<()>,
    /// What the manager has been doing (see [`crate::Stats`]).
    counters: Counters,
    /// The rest, changed only on connect and loss.
    state: Mutex<State>,
    /// Test-only fault injection (see [`Site`]).
    #[cfg(test)]
    hook: Mutex<Option<TestHook>>,
}

/// The installed hook; a newtype so that `Link` stays `Debug`.
#[cfg(test)]
#[derive(Clone)]
struct TestHook(Hook);

#[cfg(test)]
impl std::fmt::Debug for TestHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestHook")
    }
}

/// A test's fault injection: called at each [`Site`], on the thread that reaches it.
#[cfg(test)]
pub(crate) type Hook = std::sync::Arc<dyn Fn(Site) + Send + Sync>;

/// Places where a test may pause a thread or break something (`#[cfg(test)]` only; in other
/// builds [`Link::hook`] is an empty inline function).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum Site {
    /// A caller has queued its request and is about to wait for the reply.
    BeforeReceive,
    /// A worker on a new connection is about to end the backends of lost connections.
    BeforeEndSuspects,
}

#[derive(Debug)]
struct State {
    /// Generation of the current (or last) connection; 0 before the first.
    generation: u64,
    /// Dropped when the generation is lost, which makes every clone of `lost_rx` ready.
    lost_tx: Option<Sender<()>>,
    /// Handed to the guards of this generation.
    lost_rx: Receiver<()>,
    /// The backend of the current connection.
    backend: Option<Backend>,
    /// Backends of lost generations that may still be alive (stalled, not dead) and hold locks.
    suspects: Vec<Backend>,
    /// Why the last reconnect attempt failed, while offline (a standby, refused, timed out).
    refusal: Option<std::sync::Arc<str>>,
    /// The last generation lost with a cause the server or a pooler gave, and that cause.
    loss: Option<(u64, std::sync::Arc<str>)>,
}

/// A generation's identity as a guard keeps it.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    /// The connection generation that granted the lock.
    pub(crate) generation: u64,
    /// Ready (disconnected) once that generation is lost.
    pub(crate) lost: Receiver<()>,
}

impl Link {
    /// The manager's counters.
    #[inline]
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    pub(crate) fn new() -> Link {
        let (lost_tx, lost_rx) = crossbeam_channel::bounded(0);
        drop(lost_tx); // generation 0 never held anything
        let (nudge_tx, nudge_rx) = crossbeam_channel::bounded(1);
        Link {
            current: AtomicU64::new(0),
            statements: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            wait_until: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            stalls: AtomicU64::new(0),
            idle: AtomicBool::new(false),
            due: AtomicU8::new(0),
            pooled: AtomicBool::new(false),
            worker: Mutex::new(None),
            nudge_tx,
            nudge_rx,
            counters: Counters::default(),
            #[cfg(test)]
            hook: Mutex::new(None),
            state: Mutex::new(State {
                generation: 0,
                lost_tx: None,
                lost_rx,
                backend: None,
                suspects: Vec::new(),
                refusal: None,
                loss: None,
            }),
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

    /// The backend of the current connection, if one is up.
    #[cfg(test)]
    pub(crate) fn backend(&self) -> Option<Backend> {
        self.state.lock().backend
    }

    /// Installs a test's fault injection.
    #[cfg(test)]
    pub(crate) fn set_hook(&self, hook: Hook) {
        *self.hook.lock() = Some(TestHook(hook));
    }

    /// Runs the test's hook for `site`, if one is installed.
    #[cfg(test)]
    pub(crate) fn hook(&self, site: Site) {
        let hook = self.hook.lock().clone();
        if let Some(TestHook(hook)) = hook {
            hook(site);
        }
    }

    /// Outside tests there are no hooks: this compiles to nothing.
    #[cfg(not(test))]
    #[inline(always)]
    pub(crate) fn hook(&self, _site: Site) {}

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

    /// Statements begun so far; unchanged between two samples means the connection sat idle.
    pub(crate) fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
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

    /// Records, for good, that a pooler shares the manager's session.
    pub(crate) fn set_pooled(&self) {
        self.pooled.store(true, Ordering::SeqCst);
    }

    /// Notes why the last reconnect attempt failed, for the offline error callers get.
    pub(crate) fn note_refusal(&self, why: String) {
        self.state.lock().refusal = Some(why.into());
    }

    /// Notes why `generation`'s connection ended, as the server or a pooler said it.
    pub(crate) fn note_loss(&self, generation: u64, cause: String) {
        self.state.lock().loss = Some((generation, cause.into()));
    }

    /// The error of a guard of `generation` whose lock is lost: says why, when that is known.
    #[cold]
    pub(crate) fn lock_lost_error(&self, generation: u64) -> crate::error::Error {
        let state = self.state.lock();
        let cause = state.loss.as_ref().filter(|(g, _)| *g == generation);
        crate::error::Error::lock_lost(cause.map(|(_, why)| &**why))
    }

    /// The error of a call made while offline: says why the last reconnect attempt failed.
    #[cold]
    pub(crate) fn offline_error(&self) -> crate::error::Error {
        let refusal = self.state.lock().refusal.clone();
        crate::error::Error::offline(refusal.as_deref())
    }

    /// Counts a generation the monitor declared lost because its statement stalled. The waiting
    /// connections of the manager, on the same server, read it: a wait in the lock queue cannot
    /// tell a frozen server from a lock held long, but the manager's own heartbeat can.
    pub(crate) fn note_stall(&self) {
        self.stalls.fetch_add(1, Ordering::Release);
    }

    /// Stalls declared so far (see [`Link::note_stall`]).
    pub(crate) fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Acquire)
    }

    /// The loss signal of the generation serving now, if one is: ready once it is lost.
    pub(crate) fn loss_signal(&self) -> Option<Receiver<()>> {
        let state = self.state.lock();
        self.is_current(state.generation)
            .then(|| state.lost_rx.clone())
            .filter(|_| state.generation != 0)
    }

    /// True once a pooler was seen sharing the manager's session.
    pub(crate) fn is_pooled(&self) -> bool {
        self.pooled.load(Ordering::Acquire)
    }

    /// True while a connection is serving.
    pub(crate) fn is_online(&self) -> bool {
        self.current.load(Ordering::Acquire) != 0
    }

    /// Starts a new generation for a fresh connection; returns its lease and the suspects that the
    /// new connection should end.
    pub(crate) fn go_online(&self, backend: Backend) -> (Lease, Vec<Backend>) {
        let (lost_tx, lost_rx) = crossbeam_channel::bounded(0);
        let mut state = self.state.lock();
        state.generation += 1;
        state.lost_tx = Some(lost_tx);
        state.lost_rx = lost_rx.clone();
        state.backend = Some(backend);
        let suspects = std::mem::take(&mut state.suspects);
        state.refusal = None;
        self.current.store(state.generation, Ordering::Release);
        (
            Lease {
                generation: state.generation,
                lost: lost_rx,
            },
            suspects,
        )
    }

    /// Gives back suspects a connection could not end, for the next one to try.
    pub(crate) fn keep_suspects(&self, suspects: Vec<Backend>) {
        self.state.lock().suspects.extend(suspects);
    }

    /// Declares `generation` lost, if it is still the current, online one: fires its loss signal and
    /// remembers its backend as a suspect. Returns whether this call did it (exactly one caller
    /// wins when the worker and the monitor notice at once).
    pub(crate) fn lose(&self, generation: u64) -> bool {
        let state = &mut *self.state.lock();
        if self.current.load(Ordering::Acquire) != generation || state.generation != generation {
            return false;
        }
        self.current.store(0, Ordering::Release);
        self.busy.store(0, Ordering::Release);
        state.lost_tx = None; // fires the loss signal of every guard of this generation
        if let Some(backend) = state.backend.take() {
            state.suspects.push(backend);
        }
        true
    }

    /// True while `generation` is the current, online connection.
    pub(crate) fn is_current(&self, generation: u64) -> bool {
        self.current.load(Ordering::Acquire) == generation
    }

    /// Marks the start of a statement on `generation`'s connection; returns the mark to clear.
    /// No clock is read here: this runs for every batch, and the monitor keeps the time.
    pub(crate) fn begin_statement(&self, generation: u64) -> u64 {
        let n = self.statements.fetch_add(1, Ordering::Relaxed) + 1;
        let mark = (n << 17) | (1 << 16) | (generation & 0xffff);
        self.busy.store(mark, Ordering::Release);
        mark
    }

    /// Marks a statement that waits in PostgreSQL's lock queue until `deadline` at most (`None`:
    /// for as long as the lock is held): the monitor counts it as stalled only past its deadline
    /// plus the stall limit. Its mark has bit 16 clear. End it with [`Link::end_statement`].
    pub(crate) fn begin_wait(&self, generation: u64, deadline: Option<std::time::Instant>) -> u64 {
        let until = deadline.map_or(u64::MAX, |d| {
            u64::try_from(d.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
        });
        self.wait_until.store(until, Ordering::Release);
        let n = self.statements.fetch_add(1, Ordering::Relaxed) + 1;
        let mark = (n << 17) | (generation & 0xffff);
        self.busy.store(mark, Ordering::Release);
        mark
    }

    /// For a running statement's mark: `None` for an ordinary statement, or how long a wait may
    /// still run before it counts as stalled (`Some(Duration::MAX)`: no bound).
    pub(crate) fn wait_left(&self, mark: u64) -> Option<std::time::Duration> {
        if mark & (1 << 16) != 0 {
            return None;
        }
        let until = self.wait_until.load(Ordering::Acquire);
        if until == u64::MAX {
            return Some(std::time::Duration::MAX);
        }
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        Some(std::time::Duration::from_nanos(until.saturating_sub(now)))
    }

    /// Clears a mark set by [`Link::begin_statement`], unless it was replaced since.
    pub(crate) fn end_statement(&self, mark: u64) {
        let _ = self
            .busy
            .compare_exchange(mark, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// The statement running now on the current generation's connection, if any: its mark, to be
    /// compared between samples, and the generation.
    pub(crate) fn running(&self) -> Option<(u64, u64)> {
        let mark = self.busy.load(Ordering::Acquire);
        let current = self.current.load(Ordering::Acquire);
        (mark != 0 && current != 0 && current & 0xffff == mark & 0xffff).then_some((mark, current))
    }
}

#[cfg(test)]
#[path = "link_tests.rs"]
mod tests;

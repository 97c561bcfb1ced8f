//! Connection generations: which connection serves now, the loss of each, and what a
//! reconnect learnt (suspect backends, refusals, causes).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::protocol::link::{Backend, Lease};

/// The manager's connection generations. Each connection the manager makes is one; guards
/// remember the generation that granted them.
#[derive(Debug)]
pub(crate) struct Generations {
    /// The generation of the connection that is up and serving, or 0 while there is none (callers
    /// then fail fast). Read on every request, so it is an atomic rather than part of `state`.
    current: AtomicU64,
    /// Generations the monitor has declared lost because a statement stalled (see
    /// [`Self::note_stall`]).
    stalls: AtomicU64,
    /// Set for good once a pooler was seen sharing the manager's session (see `ErrorKind::Pooler`).
    pooled: AtomicBool,
    /// The rest, changed only on connect and loss.
    state: Mutex<State>,
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

impl Generations {
    pub(crate) fn new() -> Generations {
        let (lost_tx, lost_rx) = crossbeam_channel::bounded(0);
        drop(lost_tx); // generation 0 never held anything
        Generations {
            current: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            pooled: AtomicBool::new(false),
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

    /// The generation serving now, 0 while none is.
    pub(crate) fn current(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    /// True while a connection is serving.
    pub(crate) fn is_online(&self) -> bool {
        self.current.load(Ordering::Acquire) != 0
    }

    /// True while `generation` is the current, online connection.
    pub(crate) fn is_current(&self, generation: u64) -> bool {
        self.current.load(Ordering::Acquire) == generation
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

    /// The loss signal of the generation serving now, if one is: ready once it is lost.
    pub(crate) fn loss_signal(&self) -> Option<Receiver<()>> {
        let state = self.state.lock();
        self.is_current(state.generation)
            .then(|| state.lost_rx.clone())
            .filter(|_| state.generation != 0)
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

    /// Stalls declared so far (see [`Self::note_stall`]).
    pub(crate) fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Acquire)
    }

    /// True once a pooler was seen sharing the manager's session.
    pub(crate) fn is_pooled(&self) -> bool {
        self.pooled.load(Ordering::Acquire)
    }

    /// Records, for good, that a pooler shares the manager's session.
    pub(crate) fn set_pooled(&self) {
        self.pooled.store(true, Ordering::SeqCst);
    }

    /// The backend of the current connection, if one is up.
    #[cfg(test)]
    pub(crate) fn backend(&self) -> Option<Backend> {
        self.state.lock().backend
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
        state.lost_tx = None; // fires the loss signal of every guard of this generation
        if let Some(backend) = state.backend.take() {
            state.suspects.push(backend);
        }
        true
    }
}

//! The state of the manager's connection, shared by its worker, its monitor, callers and guards.
//!
//! Each connection the manager makes is a *generation*. Guards remember the generation that granted
//! them; when that connection is lost, its loss signal fires for all of them at once, and nothing they
//! do later (unlock, drop, `ensure_held`) reaches a newer session — which may hold the same key again.

#[cfg(test)]
use parking_lot::Mutex;

use crossbeam_channel::Receiver;

use crate::stats::Counters;

mod generations;
mod parking;
mod watch;

pub(crate) use generations::Generations;
pub(crate) use parking::{DUE_HEARTBEAT, Parking};
pub(crate) use watch::Watch;

/// A backend that may still hold locks nobody vouches for: its pid and start time (µs since the
/// epoch), so that a later connection can end it without ever hitting a reused pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backend {
    /// `pg_backend_pid()`.
    pub(crate) pid: i32,
    /// `backend_start` of that pid in `pg_stat_activity`, in microseconds since the epoch.
    pub(crate) started_us: i64,
}

/// What is known about the current connection, in the parts each side uses: its generations
/// (callers, guards, the worker and the monitor), the statement watch (the worker writes it, the
/// monitor reads it), and the worker's parking (callers and the monitor wake it).
#[derive(Debug)]
pub(crate) struct Link {
    /// The connection generations, their losses and what a reconnect learnt.
    pub(crate) generations: Generations,
    /// The statement the worker runs now.
    pub(crate) watch: Watch,
    /// The worker's parking and wake-ups.
    pub(crate) parking: Parking,
    /// What the manager has been doing (see [`crate::Stats`]).
    counters: Counters,
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
        Link {
            generations: Generations::new(),
            watch: Watch::new(),
            parking: Parking::new(),
            counters: Counters::default(),
            #[cfg(test)]
            hook: Mutex::new(None),
        }
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

    /// Declares `generation` lost, if it is still the current, online one: fires its loss signal,
    /// remembers its backend as a suspect and forgets its running statement. Returns whether this
    /// call did it (exactly one caller wins when the worker and the monitor notice at once).
    pub(crate) fn lose(&self, generation: u64) -> bool {
        let lost = self.generations.lose(generation);
        if lost {
            self.watch.clear();
        }
        lost
    }

    /// The statement running now on the current generation's connection, if any: its mark, to be
    /// compared between samples, and the generation.
    pub(crate) fn running(&self) -> Option<(u64, u64)> {
        let mark = self.watch.mark();
        let current = self.generations.current();
        (mark != 0 && current != 0 && current & 0xffff == mark & 0xffff).then_some((mark, current))
    }
}

#[cfg(test)]
#[path = "link_tests.rs"]
mod tests;

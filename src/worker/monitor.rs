//! Watches the worker for a statement stuck past the request timeout, and replaces it.
//!
//! The blocking client cannot time out a statement: a backend stopped by SIGSTOP, or a network that
//! silently drops packets, leaves the worker blocked inside `simple_query` for as long as TCP takes
//! to give up (minutes). Callers already get their timeout at the request bound; the monitor makes
//! sure the manager does not stay wedged either. When the worker has been inside one statement for
//! longer than the request timeout, it declares that connection's generation lost (every guard of it
//! sees its loss signal) and starts a replacement worker on the same queue. The replacement's first
//! act on its new connection is to end the stalled backend, so that a backend that later resumes
//! cannot go on holding locks nobody owns.

use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::worker::names;
use crate::worker::{Spec, start_replacement};

/// The shortest time a statement may run before it counts as stalled, whatever the request timeout:
/// a tiny request timeout should make callers give up early, not make the manager drop healthy
/// connections whose statements take a few milliseconds.
const MIN_STALL: Duration = Duration::from_millis(100);

/// Starts the monitor; it ends when `shutdown` disconnects (the manager is gone).
pub(crate) fn start(spec: Spec, shutdown: Receiver<()>) -> std::io::Result<()> {
    let limit = spec.stall_limit.max(MIN_STALL);
    // Check often enough to act within a small fraction of the stall bound and of the heartbeat,
    // but never spin.
    let tick = (limit / 8)
        .min(spec.heartbeat / 4)
        .clamp(Duration::from_millis(2), Duration::from_millis(250));
    thread::Builder::new()
        .name("distlock-monitor".into())
        .spawn(move || {
            let mut monitor = Monitor {
                quiet: (spec.link.watch.statements(), Instant::now()),
                spec,
                limit,
                tick,
                replacement_due: false,
                seen: None,
                waiting: None,
            };
            while let Err(RecvTimeoutError::Timeout) | Ok(()) = shutdown.recv_timeout(tick) {
                monitor.heartbeat_if_quiet();
                monitor.watch_for_stall();
                // Names noted on a manager never quiet for a tick are written at its next idle
                // moment once they have waited a while; the clock stays here, off the worker's.
                monitor.spec.names.check_overdue(names::DELAY);
            }
        })
        .map(|_| ())
}

/// The monitor's state between two ticks.
struct Monitor {
    spec: Spec,
    /// How long a statement may run before it counts as stalled.
    limit: Duration,
    /// The time between two looks.
    tick: Duration,
    /// Set when a replacement could not be started (no thread available); retried each tick.
    replacement_due: bool,
    /// The running statement last sampled, and when it was first seen.
    seen: Option<(u64, Instant)>,
    /// The statement count last sampled, and since when it has not moved.
    quiet: (u64, Instant),
    /// The wait in the lock queue last sampled, and the owner's stalls when it was first seen.
    waiting: Option<(u64, u64)>,
}

impl Monitor {
    /// Heartbeat: no statement for a heartbeat's length (less one tick, so that the check starts
    /// within the heartbeat) and none running; a look at the socket when quiet for less.
    fn heartbeat_if_quiet(&mut self) {
        let link = &self.spec.link;
        let statements = link.watch.statements();
        if statements != self.quiet.0 {
            self.quiet = (statements, Instant::now());
        } else if link.running().is_some() || !link.generations.is_online() {
        } else if self.quiet.1.elapsed() + self.tick >= self.spec.heartbeat {
            link.parking.request_heartbeat();
            self.quiet.1 = Instant::now();
        } else {
            // Quiet since the last tick: the worker reads its socket, so that a session the
            // server ended is seen within a tick rather than a heartbeat.
            link.parking.request_look();
        }
    }

    /// Declares a generation whose statement has run past the limit lost, and starts its
    /// replacement.
    fn watch_for_stall(&mut self) {
        if let Some(generation) = self.stalled() {
            self.seen = None;
            if self.spec.link.lose(generation) {
                self.spec.link.generations.note_stall();
                log::warn!(
                    "distlock: a statement has run for over {:?}; replacing the connection and \
                     reporting its locks lost",
                    self.limit
                );
                self.replacement_due = true;
            }
        }
        if self.replacement_due {
            match start_replacement(self.spec.clone()) {
                Ok(_) => self.replacement_due = false,
                Err(e) => log::error!("distlock: could not start a replacement worker: {e}"),
            }
        }
    }

    /// The generation of a statement that has run past the limit, if any.
    fn stalled(&mut self) -> Option<u64> {
        let link = &self.spec.link;
        match (link.running(), self.seen) {
            (None, _) => {
                self.seen = None;
                None
            }
            // A wait in the lock queue runs until its own deadline: it counts as stalled only
            // past that, by the same limit, or once the owner's connection to the same server
            // stalls (a frozen server never ends a wait).
            (Some((mark, generation)), _)
                if link
                    .watch
                    .wait_left(mark)
                    .is_some_and(|left| !left.is_zero()) =>
            {
                self.seen = None;
                let stalls = self
                    .spec
                    .owner
                    .as_ref()
                    .map_or(0, |owner| owner.generations.stalls());
                match self.waiting {
                    Some((seen, before)) if seen == mark => {
                        (stalls != before).then_some(generation)
                    }
                    _ => {
                        self.waiting = Some((mark, stalls));
                        None
                    }
                }
            }
            (Some((mark, generation)), Some((last, since))) if mark == last => {
                // It began at most one tick before it was first seen, so it is declared stalled
                // between `limit` and `limit + tick` after it began.
                (since.elapsed() >= self.limit).then_some(generation)
            }
            (Some((mark, _)), _) => {
                self.seen = Some((mark, Instant::now()));
                None
            }
        }
    }
}

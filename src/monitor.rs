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

use crate::worker::{self, Spec};

/// The shortest time a statement may run before it counts as stalled, whatever the request timeout:
/// a tiny request timeout should make callers give up early, not make the manager drop healthy
/// connections whose statements take a few milliseconds.
const MIN_STALL: Duration = Duration::from_millis(100);

/// Starts the monitor; it ends when `shutdown` disconnects (the manager is gone).
pub(crate) fn start(spec: Spec, shutdown: Receiver<()>) -> std::io::Result<()> {
    let limit = spec.stall_limit.max(MIN_STALL);
    let heartbeat = spec.heartbeat;
    // Check often enough to act within a small fraction of the stall bound and of the heartbeat,
    // but never spin.
    let tick = (limit / 8)
        .min(heartbeat / 4)
        .clamp(Duration::from_millis(2), Duration::from_millis(250));
    thread::Builder::new()
        .name("distlock-monitor".into())
        .spawn(move || {
            // Set when a replacement could not be started (no thread available); retried each tick.
            let mut replacement_due = false;
            // The running statement last sampled, and when it was first seen.
            let mut seen: Option<(u64, Instant)> = None;
            // The statement count last sampled, and since when it has not moved.
            let mut quiet: (u64, Instant) = (spec.link.statements(), Instant::now());
            loop {
                match shutdown.recv_timeout(tick) {
                    Err(RecvTimeoutError::Disconnected) => return,
                    Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                }
                // Heartbeat: no statement for a heartbeat's length (less one tick, so that the
                // check starts within the heartbeat) and none running.
                let statements = spec.link.statements();
                if statements != quiet.0 {
                    quiet = (statements, Instant::now());
                } else if quiet.1.elapsed() + tick >= heartbeat
                    && spec.link.running().is_none()
                    && spec.link.is_online()
                {
                    spec.link.request_heartbeat();
                    quiet.1 = Instant::now();
                }
                let stalled = match (spec.link.running(), seen) {
                    (None, _) => {
                        seen = None;
                        None
                    }
                    // A wait in the lock queue runs until its own deadline: it counts as stalled
                    // only past that, by the same limit.
                    (Some((mark, _)), _)
                        if spec
                            .link
                            .wait_left(mark)
                            .is_some_and(|left| !left.is_zero()) =>
                    {
                        seen = None;
                        None
                    }
                    (Some((mark, generation)), Some((last, since))) if mark == last => {
                        // It began at most one tick before it was first seen, so it is declared
                        // stalled between `limit` and `limit + tick` after it began.
                        (since.elapsed() >= limit).then_some(generation)
                    }
                    (Some((mark, _)), _) => {
                        seen = Some((mark, Instant::now()));
                        None
                    }
                };
                if let Some(generation) = stalled {
                    seen = None;
                    if spec.link.lose(generation) {
                        log::warn!(
                            "distlock: a statement has run for over {limit:?}; \
                             replacing the connection and reporting its locks lost"
                        );
                        replacement_due = true;
                    }
                }
                if replacement_due {
                    match worker::start_replacement(spec.clone()) {
                        Ok(_) => replacement_due = false,
                        Err(e) => {
                            log::error!("distlock: could not start a replacement worker: {e}")
                        }
                    }
                }
            }
        })
        .map(|_| ())
}

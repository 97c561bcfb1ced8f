//! Waiting in PostgreSQL's own lock queue, on connections of their own.
//!
//! PostgreSQL queues the sessions that block in `pg_advisory_lock` in arrival order and hands a
//! released lock straight to the first of them; a non-blocking try cannot barge past a queued
//! waiter. So a caller that must wait (`lock`, `try_lock_for` and their forms) first tries once on
//! the manager's connection, and if the lock is held, waits in the queue on a *waiting
//! connection*: an internal manager of its own (its own worker, monitor, heartbeat and loss
//! signal), so that the manager's connection never blocks. The lock is then held by that
//! connection's session and its guard is an ordinary guard of that internal manager: drop releases
//! it before returning, loss is announced, `ensure_held` works, generations protect it. The waiting
//! connection serves nothing else until its guards are gone, then goes back to the pool.
//!
//! The pool is bounded (`Builder::wait_connections`), opened lazily, and a connection idle for
//! `IDLE_CLOSE` is closed. Callers beyond the bound wait for a free connection in this process,
//! first come first served.

use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, ErrorKind, Result};
use crate::key::LockKey;
use crate::manager::{Builder, LockManager};
use crate::shared::Shared;
use crate::sql::Mode;
use crate::tls::Tls;

/// A waiting connection idle this long is closed.
pub(crate) const IDLE_CLOSE: Duration = Duration::from_secs(10);

/// The waiting connections of one manager.
pub(crate) struct WaitPool {
    /// How to open one: the manager's own settings, without a pool of its own.
    builder: Builder,
    config: postgres::Config,
    tls: Tls,
    /// The most open at once.
    max: usize,
    state: Mutex<PoolState>,
    /// Signalled when a connection goes back to the pool or is closed.
    freed: Condvar,
}

#[derive(Default)]
struct PoolState {
    /// Free connections, with when each became free.
    idle: Vec<(LockManager, Instant)>,
    /// Open connections, free or not (and ones being opened).
    open: usize,
    /// Callers waiting for a connection, in arrival order (ticket numbers).
    queue: std::collections::VecDeque<u64>,
    next_ticket: u64,
    /// Set while the thread that closes idle connections runs.
    reaping: bool,
}

/// What a guard granted on a waiting connection keeps besides its lock: its key's reservation in
/// the manager's own table (given back when the guard is gone, after its release) and the waiting
/// connection (back in the pool when every guard of the wait is gone).
pub(crate) struct WaitHold {
    pub(crate) main: Arc<Shared>,
    pub(crate) key: LockKey,
    pub(crate) mode: Mode,
    pub(crate) _waiter: Arc<Waiter>,
}

impl Drop for WaitHold {
    fn drop(&mut self) {
        self.main.release_hold(self.key, self.mode);
    }
}

impl std::fmt::Debug for WaitHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WaitHold")
    }
}

/// A waiting connection taken from the pool; back in the pool when the last holder of it (the
/// wait, then the guards it granted) is dropped.
pub(crate) struct Waiter {
    pool: Arc<WaitPool>,
    manager: Option<LockManager>,
}

impl Waiter {
    /// The waiting connection's manager (always there until the waiter is dropped).
    pub(crate) fn manager(&self) -> Option<&LockManager> {
        self.manager.as_ref()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(manager) = self.manager.take() {
            self.pool.give_back(manager);
        }
    }
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waiter")
    }
}

impl WaitPool {
    pub(crate) fn new(
        builder: Builder,
        config: postgres::Config,
        tls: Tls,
        max: usize,
    ) -> WaitPool {
        WaitPool {
            builder,
            config,
            tls,
            max,
            state: Mutex::new(PoolState::default()),
            freed: Condvar::new(),
        }
    }

    /// A waiting connection, opened if none is free and the bound allows; otherwise waits, in
    /// arrival order, until one is free or `deadline` passes (`Ok(None)`).
    pub(crate) fn take(self: &Arc<Self>, deadline: Option<Instant>) -> Result<Option<Waiter>> {
        let mut state = self.state.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.queue.push_back(ticket);
        loop {
            let first = state.queue.front() == Some(&ticket);
            if first {
                if let Some((manager, _)) = state.idle.pop() {
                    state.queue.pop_front();
                    self.freed.notify_all();
                    return Ok(Some(self.waiter(manager)));
                }
                if state.open < self.max {
                    state.open += 1;
                    state.queue.pop_front();
                    self.freed.notify_all();
                    drop(state);
                    return match self.open() {
                        Ok(manager) => Ok(Some(self.waiter(manager))),
                        Err(e) => {
                            let mut state = self.state.lock();
                            state.open -= 1;
                            self.freed.notify_all();
                            Err(e)
                        }
                    };
                }
            }
            let timed_out = match deadline {
                Some(d) => self.freed.wait_until(&mut state, d).timed_out(),
                None => {
                    self.freed.wait(&mut state);
                    false
                }
            };
            if timed_out {
                state.queue.retain(|t| *t != ticket);
                self.freed.notify_all();
                return Ok(None);
            }
        }
    }

    fn waiter(self: &Arc<Self>, manager: LockManager) -> Waiter {
        Waiter {
            pool: Arc::clone(self),
            manager: Some(manager),
        }
    }

    fn open(self: &Arc<Self>) -> Result<LockManager> {
        let manager = self
            .builder
            .clone()
            .wait_connections(0)
            .connect_with(self.config.clone(), self.tls.clone())?;
        self.start_reaper();
        Ok(manager)
    }

    fn give_back(&self, manager: LockManager) {
        let mut state = self.state.lock();
        if manager.is_usable() {
            state.idle.push((manager, Instant::now()));
        } else {
            state.open -= 1;
        }
        self.freed.notify_all();
    }

    /// Starts the thread that closes idle connections, unless it runs already; it ends with the
    /// pool or when no connection is open.
    fn start_reaper(self: &Arc<Self>) {
        {
            let mut state = self.state.lock();
            if state.reaping {
                return;
            }
            state.reaping = true;
        }
        let pool: Weak<WaitPool> = Arc::downgrade(self);
        let spawned = thread::Builder::new()
            .name("distlock-wait-reaper".into())
            .spawn(move || reap(&pool));
        if spawned.is_err() {
            // Idle connections then stay open until the manager is dropped.
            self.state.lock().reaping = false;
        }
    }
}

fn reap(pool: &Weak<WaitPool>) {
    loop {
        thread::sleep(IDLE_CLOSE / 4);
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let closing: Vec<LockManager> = {
            let mut state = pool.state.lock();
            let (old, fresh): (Vec<_>, Vec<_>) = std::mem::take(&mut state.idle)
                .into_iter()
                .partition(|(_, since)| since.elapsed() >= IDLE_CLOSE);
            state.idle = fresh;
            state.open -= old.len();
            if state.open == 0 {
                state.reaping = false;
            }
            let done = !state.reaping;
            pool.freed.notify_all();
            let closing = old.into_iter().map(|(m, _)| m).collect();
            if done {
                drop(state);
                drop(closing);
                return;
            }
            closing
        };
        // Dropping the last handle closes the connection.
        drop(closing);
    }
}

/// True when `e`, from opening a waiting connection, would fail the manager's own connection
/// too (bad settings, a pooler), so that waiting by polling instead gains nothing.
pub(crate) fn fails_everywhere(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::Config | ErrorKind::Pooler)
}

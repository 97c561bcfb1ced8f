//! The waiting connections of a manager: a bounded pool, opened lazily, idle ones closed.
//!
//! A connection is taken for one wait in PostgreSQL's lock queue and the guards that wait
//! grants, and comes back when the last of them is gone. The pool is bounded; callers beyond the
//! bound wait for a free connection, first come first served. A connection idle for
//! [`IDLE_CLOSE`] is closed by a reaper thread that runs only while connections are open.
//!
//! The pool knows nothing of what a connection is: it opens one with the function it was given
//! and asks another whether one may be reused, so its state machine is tested with fakes.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::Result;

/// A waiting connection idle this long is closed.
pub(crate) const IDLE_CLOSE: Duration = Duration::from_secs(10);

/// Opens one connection, giving up at the deadline (`None`: the opener's own bound).
pub(crate) type Open<C> = Box<dyn Fn(Option<Instant>) -> Result<C> + Send + Sync>;

/// A bounded, lazily opened pool of connections of type `C`.
pub(crate) struct WaitPool<C> {
    /// Opens a connection.
    open: Open<C>,
    /// Whether a connection given back may be used again.
    usable: fn(&C) -> bool,
    /// The most open at once.
    max: usize,
    /// How long a free connection stays open.
    idle_close: Duration,
    state: Mutex<PoolState<C>>,
    /// Signalled when a connection goes back to the pool or is closed.
    freed: Condvar,
}

struct PoolState<C> {
    /// Free connections, with when each became free.
    idle: Vec<(C, Instant)>,
    /// Open connections, free or not (and ones being opened).
    open: usize,
    /// Callers waiting for a connection, in arrival order (ticket numbers).
    queue: VecDeque<u64>,
    next_ticket: u64,
    /// Set while the thread that closes idle connections runs.
    reaping: bool,
}

/// A connection taken from the pool; back in the pool when dropped (or closed, when no longer
/// usable).
pub(crate) struct Taken<C> {
    pool: Arc<WaitPool<C>>,
    conn: Option<C>,
}

impl<C> Taken<C> {
    /// The connection (always there until dropped).
    pub(crate) fn conn(&self) -> Option<&C> {
        self.conn.as_ref()
    }
}

impl<C> Drop for Taken<C> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.give_back(conn);
        }
    }
}

impl<C> std::fmt::Debug for Taken<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Taken")
    }
}

impl<C: Send + 'static> WaitPool<C> {
    /// A pool of at most `max` connections opened by `open`, closing those idle for
    /// `idle_close`.
    pub(crate) fn new(
        open: Open<C>,
        usable: fn(&C) -> bool,
        max: usize,
        idle_close: Duration,
    ) -> WaitPool<C> {
        WaitPool {
            open,
            usable,
            max,
            idle_close,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
                queue: VecDeque::new(),
                next_ticket: 0,
                reaping: false,
            }),
            freed: Condvar::new(),
        }
    }

    /// A connection, opened if none is free and the bound allows (the opening bounded by
    /// `deadline` too); otherwise waits, in arrival order, until one is free or `deadline` passes
    /// (`Ok(None)`).
    ///
    /// # Errors
    ///
    /// Whatever opening a connection failed with.
    pub(crate) fn take(self: &Arc<Self>, deadline: Option<Instant>) -> Result<Option<Taken<C>>> {
        let mut state = self.state.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.queue.push_back(ticket);
        loop {
            if state.queue.front() == Some(&ticket) {
                if let Some((conn, _)) = state.idle.pop() {
                    state.queue.pop_front();
                    self.freed.notify_all();
                    return Ok(Some(self.taken(conn)));
                }
                if state.open < self.max {
                    state.open += 1;
                    state.queue.pop_front();
                    self.freed.notify_all();
                    drop(state);
                    return self.open_one(deadline).map(Some);
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

    /// Connections open now, free or taken.
    pub(crate) fn open_count(&self) -> usize {
        self.state.lock().open
    }

    fn taken(self: &Arc<Self>, conn: C) -> Taken<C> {
        Taken {
            pool: Arc::clone(self),
            conn: Some(conn),
        }
    }

    /// Opens a connection whose place in `open` is already counted, by `deadline`.
    fn open_one(self: &Arc<Self>, deadline: Option<Instant>) -> Result<Taken<C>> {
        match (self.open)(deadline) {
            Ok(conn) => {
                self.start_reaper();
                Ok(self.taken(conn))
            }
            Err(e) => {
                self.state.lock().open -= 1;
                self.freed.notify_all();
                Err(e)
            }
        }
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
        let pool: Weak<WaitPool<C>> = Arc::downgrade(self);
        let spawned = thread::Builder::new()
            .name("distlock-wait-reaper".into())
            .spawn(move || reap(&pool));
        if spawned.is_err() {
            // Idle connections then stay open until the manager is dropped.
            self.state.lock().reaping = false;
        }
    }
}

impl<C> WaitPool<C> {
    fn give_back(&self, conn: C) {
        let mut state = self.state.lock();
        if (self.usable)(&conn) {
            state.idle.push((conn, Instant::now()));
        } else {
            state.open -= 1;
        }
        self.freed.notify_all();
    }

    /// Takes the connections idle for `idle_close` out of the pool, to be closed outside its
    /// lock, and whether the reaper should end (none is open any more).
    fn take_stale(&self) -> (Vec<C>, bool) {
        let mut state = self.state.lock();
        let (old, fresh): (Vec<_>, Vec<_>) = std::mem::take(&mut state.idle)
            .into_iter()
            .partition(|(_, since)| since.elapsed() >= self.idle_close);
        state.idle = fresh;
        state.open -= old.len();
        if state.open == 0 {
            state.reaping = false;
        }
        let done = !state.reaping;
        self.freed.notify_all();
        (old.into_iter().map(|(conn, _)| conn).collect(), done)
    }
}

fn reap<C>(pool: &Weak<WaitPool<C>>) {
    loop {
        let tick = match pool.upgrade() {
            Some(pool) => pool.idle_close / 4,
            None => return,
        };
        thread::sleep(tick);
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let (closing, done) = pool.take_stale();
        // Dropping a connection closes it, outside the pool's lock.
        drop(closing);
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::error::{Error, ErrorKind};

    /// A fake connection: its number, and whether it may be reused.
    struct Fake(usize, bool);

    fn pool(max: usize, opened: &Arc<AtomicUsize>, fail: bool) -> Arc<WaitPool<Fake>> {
        let opened = Arc::clone(opened);
        let open: Open<Fake> = Box::new(move |_| {
            if fail {
                return Err(Error::new(ErrorKind::Connect, "refused"));
            }
            Ok(Fake(opened.fetch_add(1, Ordering::SeqCst), true))
        });
        Arc::new(WaitPool::new(open, |f| f.1, max, Duration::from_millis(40)))
    }

    #[test]
    fn opens_lazily_reuses_and_stays_within_its_bound() {
        let opened = Arc::new(AtomicUsize::new(0));
        let pool = pool(2, &opened, false);
        assert_eq!(pool.open_count(), 0, "nothing opened up front");
        let a = pool.take(None).unwrap().unwrap();
        let b = pool.take(None).unwrap().unwrap();
        assert_eq!(opened.load(Ordering::SeqCst), 2);
        let soon = Instant::now() + Duration::from_millis(30);
        assert!(pool.take(Some(soon)).unwrap().is_none(), "bounded at 2");
        let first = a.conn().unwrap().0;
        drop(a);
        let c = pool.take(None).unwrap().unwrap();
        assert_eq!(c.conn().unwrap().0, first, "a free connection is reused");
        assert_eq!(opened.load(Ordering::SeqCst), 2);
        drop((b, c));
    }

    #[test]
    fn an_unusable_connection_is_closed_and_a_failed_open_frees_its_place() {
        let opened = Arc::new(AtomicUsize::new(0));
        let pool = pool(1, &opened, false);
        let mut a = pool.take(None).unwrap().unwrap();
        a.conn.as_mut().unwrap().1 = false;
        drop(a);
        assert_eq!(pool.open_count(), 0);
        let failing = self::pool(1, &opened, true);
        assert!(failing.take(None).is_err());
        assert_eq!(failing.open_count(), 0);
    }

    #[test]
    fn waiters_are_served_in_arrival_order_and_idle_connections_close() {
        let opened = Arc::new(AtomicUsize::new(0));
        let pool = pool(1, &opened, false);
        let held = pool.take(None).unwrap().unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiters: Vec<_> = (0..3)
            .map(|i| {
                let (pool, order) = (Arc::clone(&pool), Arc::clone(&order));
                // Each arrives after the one before it is queued.
                thread::sleep(Duration::from_millis(20));
                thread::spawn(move || {
                    let taken = pool.take(None).unwrap().unwrap();
                    order.lock().push(i);
                    thread::sleep(Duration::from_millis(5));
                    drop(taken);
                })
            })
            .collect();
        drop(held);
        for w in waiters {
            w.join().unwrap();
        }
        assert_eq!(*order.lock(), [0, 1, 2]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.open_count() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(pool.open_count(), 0, "the idle connection was closed");
    }
}

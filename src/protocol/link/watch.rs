//! The statement watch: which statement the worker runs now, as the monitor samples it.

use std::sync::atomic::{AtomicU64, Ordering};

/// The statement the serving worker runs, if any, and until when a wait in the lock queue may
/// run.
#[derive(Debug)]
pub(crate) struct Watch {
    /// Numbers statements; each `begin_statement` takes the next.
    statements: AtomicU64,
    /// `statement << 17 | 1 << 16 | generation & 0xffff` while a worker runs a statement, else 0.
    /// The monitor samples it: the same mark seen for longer than the request timeout is a stall.
    busy: AtomicU64,
    /// While a wait in PostgreSQL's lock queue runs (see [`Self::begin_wait`]): until when, in ns
    /// after `epoch` (`u64::MAX`: no deadline). The monitor gives such a statement that long.
    wait_until: AtomicU64,
    /// The origin of `wait_until`.
    epoch: std::time::Instant,
}

impl Watch {
    pub(crate) fn new() -> Watch {
        Watch {
            statements: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            wait_until: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        }
    }

    /// Statements begun so far; unchanged between two samples means the connection sat idle.
    pub(crate) fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
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
    /// plus the stall limit. Its mark has bit 16 clear. End it with [`Self::end_statement`].
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

    /// Clears a mark set by [`Self::begin_statement`], unless it was replaced since.
    pub(crate) fn end_statement(&self, mark: u64) {
        let _ = self
            .busy
            .compare_exchange(mark, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// The mark of the statement running now (0: none), of whichever generation.
    pub(crate) fn mark(&self) -> u64 {
        self.busy.load(Ordering::Acquire)
    }

    /// Forgets the running statement (its connection is lost).
    pub(crate) fn clear(&self) {
        self.busy.store(0, Ordering::Release);
    }
}

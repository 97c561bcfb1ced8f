//! The names a manager records for its keys ([`crate::Builder::record_names`]): callers note a
//! name after its lock was granted, the worker writes the names not yet written when its
//! connection is quiet, each name once per manager.
//!
//! A key's id is the FNV-1a hash of its name, which no screen can turn back into the name. The
//! names table (`public.distlock_names`, one row per id and name) is where `distlock locks`
//! finds them again; two names that hash to one id are two rows, shown together.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::key::KeyMap;

/// The names of one manager: those noted, and those still to write.
#[derive(Debug)]
pub(crate) struct Names {
    /// Whether this manager records names at all.
    on: bool,
    /// Set while `book.pending` holds names, read by the idle worker without the lock.
    pending: AtomicBool,
    /// Set by the monitor when pending names have waited long enough; cleared when taken.
    overdue: AtomicBool,
    /// Whether the worker has seen the table there and writable (so it writes without probing).
    table_ready: AtomicBool,
    book: Mutex<Book>,
}

#[derive(Debug, Default)]
struct Book {
    /// The first name noted for each id; `more` holds any other name of the same id.
    seen: KeyMap<i64, Box<str>>,
    more: Vec<(i64, Box<str>)>,
    /// Noted and not yet written, the first of them noted at `since`.
    pending: Vec<(i64, Box<str>)>,
    since: Option<Instant>,
    /// Writing failed for good (the role may not, a standby): nothing more is kept.
    stopped: bool,
}

impl Names {
    /// The names of a manager that records them when `on`.
    pub(crate) fn new(on: bool) -> Names {
        Names {
            on,
            pending: AtomicBool::new(false),
            overdue: AtomicBool::new(false),
            table_ready: AtomicBool::new(false),
            book: Mutex::new(Book::default()),
        }
    }

    /// Notes that `name`, whose key has `id`, was granted: kept to be written if this manager
    /// records names and has not noted it before. A name PostgreSQL cannot store as text (one
    /// with a NUL character) is not kept.
    #[inline]
    pub(crate) fn note(&self, id: i64, name: &str) {
        if self.on {
            self.note_on(id, name);
        }
    }

    // Out of line: `.ci/bench-gate` counts what it costs a cycle by name.
    #[inline(never)]
    fn note_on(&self, id: i64, name: &str) {
        let mut book = self.book.lock();
        if book.stopped {
            return;
        }
        // A name seen before is the common case, and the one that must cost least: checked
        // first, before the name's characters are.
        let seen = book.seen.get(&id);
        if seen.is_some_and(|first| **first == *name) {
            return;
        }
        if name.contains('\0') {
            return;
        }
        match seen {
            Some(_) if book.more.iter().any(|(i, n)| *i == id && **n == *name) => return,
            Some(_) => book.more.push((id, name.into())),
            None => {
                book.seen.insert(id, name.into());
            }
        }
        book.pending.push((id, name.into()));
        book.since.get_or_insert_with(Instant::now);
        self.pending.store(true, Ordering::Release);
    }

    /// True when names wait to be written (a load, for the idle worker).
    #[inline]
    pub(crate) fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// True once the monitor found names waiting long enough to be written
    /// ([`Names::check_overdue`]): a load, for the idle worker, which reads no clock.
    #[inline]
    pub(crate) fn overdue(&self) -> bool {
        self.overdue.load(Ordering::Acquire)
    }

    /// The monitor's tick: marks the names overdue when they have waited `after` or longer (a
    /// load when none wait).
    pub(crate) fn check_overdue(&self, after: Duration) {
        if self.has_pending()
            && self
                .book
                .lock()
                .since
                .is_some_and(|since| since.elapsed() >= after)
        {
            self.overdue.store(true, Ordering::Release);
        }
    }

    /// The names to write now, taken out of the book.
    pub(crate) fn take_pending(&self) -> Vec<(i64, Box<str>)> {
        let mut book = self.book.lock();
        book.since = None;
        self.pending.store(false, Ordering::Release);
        self.overdue.store(false, Ordering::Release);
        std::mem::take(&mut book.pending)
    }

    /// Gives `names` back to be written later (their connection failed before they were).
    pub(crate) fn give_back(&self, names: Vec<(i64, Box<str>)>) {
        let mut book = self.book.lock();
        if book.stopped || names.is_empty() {
            return;
        }
        book.pending.extend(names);
        book.since.get_or_insert_with(Instant::now);
        self.pending.store(true, Ordering::Release);
    }

    /// Whether the worker has seen the table there and writable.
    pub(crate) fn table_ready(&self) -> bool {
        self.table_ready.load(Ordering::Acquire)
    }

    /// The worker saw the table there and writable (`true`), or missing after all (`false`).
    pub(crate) fn set_table_ready(&self, ready: bool) {
        self.table_ready.store(ready, Ordering::Release);
    }

    /// Stops recording for good: the names cannot be written (said once, by the worker).
    pub(crate) fn stop(&self) {
        let mut book = self.book.lock();
        book.stopped = true;
        book.pending.clear();
        book.since = None;
        self.pending.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_name_is_kept_once_and_a_colliding_name_too() {
        let names = Names::new(true);
        names.note(7, "a");
        names.note(7, "a");
        names.note(7, "b");
        names.note(7, "b");
        names.note(8, "nul\0inside");
        assert!(names.has_pending());
        names.check_overdue(Duration::from_secs(60));
        assert!(!names.overdue());
        names.check_overdue(Duration::ZERO);
        assert!(names.overdue());
        let got: Vec<_> = names.take_pending();
        assert_eq!(got, vec![(7, "a".into()), (7, "b".into())]);
        assert!(!names.has_pending());
        assert!(!names.overdue(), "taken names are no longer overdue");
        names.note(7, "a");
        assert!(!names.has_pending());
    }

    #[test]
    fn off_keeps_nothing_and_stopped_keeps_nothing_more() {
        let off = Names::new(false);
        off.note(1, "a");
        assert!(!off.has_pending());
        let on = Names::new(true);
        on.note(1, "a");
        on.stop();
        on.note(2, "b");
        on.give_back(vec![(3, "c".into())]);
        assert!(!on.has_pending());
        assert!(on.take_pending().is_empty());
    }
}

//! Locks held too long ([`crate::Builder::warn_held_after`]): each guard taken while it is set is
//! watched, and one warning names a guard that passes the bound — its key and the place in the
//! caller's code that took it — and another says when it is finally released. A thread of its own,
//! started with the first watched guard, looks every quarter of the bound (at most every second);
//! nothing of it exists while the setting is off.

use std::collections::HashMap;
use std::panic::Location;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::key::LockKey;
use crate::mode::Mode;

/// The guards watched, and the bound.
#[derive(Debug)]
pub(crate) struct HeldWatch {
    after: Duration,
    entries: Mutex<Watched>,
    next: AtomicU64,
}

#[derive(Debug, Default)]
struct Watched {
    guards: HashMap<u64, Entry>,
    looking: bool,
}

#[derive(Debug)]
struct Entry {
    key: LockKey,
    mode: Mode,
    at: &'static Location<'static>,
    since: Instant,
    warned: bool,
}

impl HeldWatch {
    pub(crate) fn new(after: Duration) -> HeldWatch {
        HeldWatch {
            after,
            entries: Mutex::new(Watched::default()),
            next: AtomicU64::new(0),
        }
    }

    /// Watches a guard of `key` taken at `at` since `since`; returns its number for
    /// [`HeldWatch::released`].
    pub(crate) fn watch(
        self: &Arc<Self>,
        key: LockKey,
        mode: Mode,
        at: &'static Location<'static>,
        since: Instant,
    ) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries.lock();
        entries.guards.insert(
            id,
            Entry {
                key,
                mode,
                at,
                since,
                warned: false,
            },
        );
        if !entries.looking {
            let watch = Arc::downgrade(self);
            let tick = (self.after / 4).clamp(Duration::from_millis(1), Duration::from_secs(1));
            entries.looking = thread::Builder::new()
                .name("distlock-held-watch".into())
                .spawn(move || look(&watch, tick))
                .is_ok();
        }
        id
    }

    /// The guard `id` is released; says so if it was reported held too long.
    pub(crate) fn released(&self, id: u64) {
        let entry = self.entries.lock().guards.remove(&id);
        if let Some(e) = entry.filter(|e| e.warned) {
            log::warn!(
                "distlock: {} ({}), held too long, was released after {:?}; taken at {}:{}",
                e.key,
                mode_name(e.mode),
                e.since.elapsed(),
                e.at.file(),
                e.at.line()
            );
        }
    }

    /// Warns once for every guard held past the bound.
    fn warn_overdue(&self) {
        let mut entries = self.entries.lock();
        for e in entries.guards.values_mut() {
            let held = e.since.elapsed();
            if !e.warned && held >= self.after {
                e.warned = true;
                log::warn!(
                    "distlock: {} ({}) has been held for {held:?}, over {:?}; taken at {}:{}",
                    e.key,
                    mode_name(e.mode),
                    self.after,
                    e.at.file(),
                    e.at.line()
                );
            }
        }
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Exclusive => "exclusive",
        Mode::Shared => "shared",
    }
}

/// The watching thread: ends with the manager.
fn look(watch: &Weak<HeldWatch>, tick: Duration) {
    loop {
        thread::sleep(tick);
        match watch.upgrade() {
            Some(watch) => watch.warn_overdue(),
            None => return,
        }
    }
}

//! `Election`: leader election on one lock, for candidates and for observers.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::caller::guard::LockGuard;
use crate::caller::handle::LockManager;
use crate::error::{Error, ErrorKind, Result};
use crate::holder::Holder;
use crate::key::{IntoLockKey, LockKey};

/// Leader election on one advisory lock: whoever holds the lock leads.
///
/// Candidates campaign ([`Election::campaign`] waits, [`Election::try_campaign`] does not) and get
/// a [`Leadership`], which knows whether it still leads and is told the moment it stops
/// ([`Leadership::lost`]): the connection failed, so the server released the lock and another
/// candidate may lead already. Each leadership has a term, a fencing token that grows with every
/// new leader; give it to whatever the leader writes to, so that a deposed leader that acts late
/// is refused.
///
/// Observers that do not campaign ask who leads ([`Election::leader`]) or watch for changes
/// ([`Election::watch`]). A leader is known by its session: pid, application name
/// (`Builder::application_name`, so name your candidates; a candidate that waited for its
/// leadership in the lock queue leads on its waiting connection, whose name ends with
/// ` (waiting connection)`), client address.
///
/// ```no_run
/// use distlock::{Election, LockManager};
///
/// let locks = LockManager::connect("host=db.internal user=app")?;
/// let election = Election::new(&locks, "billing/leader");
/// let leadership = election.campaign()?; // waits until this process leads
/// println!("leading in term {}", leadership.term());
/// while leadership.is_leading() {
///     // do the leader's work, passing leadership.term() to the resources it writes
/// #   break;
/// }
/// leadership.resign()?; // or drop it
/// # Ok::<(), distlock::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Election {
    locks: LockManager,
    key: LockKey,
    /// The name `key` is the hash of, when the election was given one: its campaigns lock by it,
    /// so a manager recording names records it.
    name: Option<Arc<str>>,
}

/// An election's key with its name, as a lock call takes it.
struct Named<'a>(LockKey, Option<&'a str>);

impl IntoLockKey for Named<'_> {
    fn key_and_name(&self) -> (LockKey, Option<&str>) {
        (self.0, self.1)
    }
}

/// Leading an [`Election`]; resigns when dropped.
#[derive(Debug)]
#[must_use = "dropping the leadership resigns at once"]
pub struct Leadership {
    guard: LockGuard,
}

/// Notifications of leader changes from [`Election::watch`]; stops watching when dropped.
#[derive(Debug)]
pub struct Watch {
    changes: Receiver<Option<Holder>>,
    _stop: Sender<()>,
}

impl Election {
    /// An election on `key`, run through `locks` (a clone of the manager is kept).
    pub fn new(locks: &LockManager, key: impl IntoLockKey) -> Election {
        let (key, name) = key.key_and_name();
        Election {
            locks: locks.clone(),
            key,
            name: name.map(Arc::from),
        }
    }

    fn named(&self) -> Named<'_> {
        Named(self.key, self.name.as_deref())
    }

    /// The lock the election runs on.
    pub fn key(&self) -> LockKey {
        self.key
    }

    /// Campaigns until this candidate leads (or an error that waiting cannot pass).
    ///
    /// # Errors
    ///
    /// As for [`LockManager::lock_fenced`](crate::LockManager::lock_fenced).
    #[track_caller]
    pub fn campaign(&self) -> Result<Leadership> {
        Ok(Leadership {
            guard: self.locks.lock_fenced(self.named())?,
        })
    }

    /// Campaigns once: leads now if nobody does, `Ok(None)` otherwise.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock_fenced`](crate::LockManager::try_lock_fenced).
    #[track_caller]
    pub fn try_campaign(&self) -> Result<Option<Leadership>> {
        Ok(self
            .locks
            .try_lock_fenced(self.named())?
            .map(|guard| Leadership { guard }))
    }

    /// Campaigns for up to `timeout`.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::try_lock_fenced_for`](crate::LockManager::try_lock_fenced_for).
    #[track_caller]
    pub fn campaign_for(&self, timeout: Duration) -> Result<Option<Leadership>> {
        Ok(self
            .locks
            .try_lock_fenced_for(self.named(), timeout)?
            .map(|guard| Leadership { guard }))
    }

    /// The session leading now, if any (one round trip; see [`LockManager::holders`](crate::LockManager::holders) for what a
    /// role may see of other sessions).
    ///
    /// # Errors
    ///
    /// As for [`LockManager::holders`](crate::LockManager::holders).
    pub fn leader(&self) -> Result<Option<Holder>> {
        Ok(self
            .locks
            .holders(self.key)?
            .into_iter()
            .find(|h| h.is_granted() && !h.is_shared()))
    }

    /// Watches the election: the returned [`Watch`] receives the leader (`None`: nobody leads)
    /// first as it is now, then each time it changes, as seen by asking every `interval` (at
    /// least 10 ms) on a thread of its own. A change is seen within `interval` plus a round trip;
    /// a leader that came and went between two looks is not reported. While the manager cannot
    /// reach the server, nothing is reported; the next successful look reports a change.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) when the watching thread cannot be started.
    pub fn watch(&self, interval: Duration) -> Result<Watch> {
        let interval = interval.max(Duration::from_millis(10));
        let (changes_tx, changes) = crossbeam_channel::unbounded();
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let election = self.clone();
        thread::Builder::new()
            .name("distlock-election-watch".into())
            .spawn(move || election.watch_loop(interval, &changes_tx, &stopped))
            .map_err(|e| {
                Error::with_source(ErrorKind::Io, "cannot start the watching thread", e)
            })?;
        Ok(Watch {
            changes,
            _stop: stop,
        })
    }

    fn watch_loop(
        &self,
        interval: Duration,
        changes: &Sender<Option<Holder>>,
        stopped: &Receiver<()>,
    ) {
        // The leader as last reported; `None` inside means nobody led.
        let mut last: Option<Option<(i32, Option<std::time::SystemTime>)>> = None;
        loop {
            let started = Instant::now();
            if let Ok(leader) = self.leader() {
                let identity = leader.as_ref().map(|h| (h.pid(), h.backend_start()));
                if last != Some(identity) {
                    last = Some(identity);
                    if changes.send(leader).is_err() {
                        return;
                    }
                }
            }
            let pause = interval.saturating_sub(started.elapsed());
            match stopped.recv_timeout(pause) {
                Err(RecvTimeoutError::Timeout) => {}
                // The `Watch` was dropped.
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

impl Leadership {
    /// True while this candidate still leads: its lock's connection has not been lost.
    pub fn is_leading(&self) -> bool {
        !self.guard.is_lost()
    }

    /// Becomes ready (disconnected) the moment this leadership is lost; wait on it, or use it
    /// in `crossbeam_channel::select!` next to the leader's work.
    pub fn lost(&self) -> &Receiver<()> {
        self.guard.lost()
    }

    /// This leadership's term: a fencing token, greater than every earlier leader's term of this
    /// election (see [`LockGuard::fencing_token`](crate::LockGuard::fencing_token)).
    pub fn term(&self) -> u64 {
        self.guard.fencing_token().unwrap_or(0)
    }

    /// Proves, with a round trip, that this candidate still leads.
    ///
    /// # Errors
    ///
    /// As for [`LockGuard::ensure_held`](crate::LockGuard::ensure_held).
    pub fn ensure_leading(&self) -> Result<()> {
        self.guard.ensure_held()
    }

    /// Steps down, releasing the lock (dropping the leadership does the same, ignoring errors).
    ///
    /// # Errors
    ///
    /// As for [`LockGuard::unlock`](crate::LockGuard::unlock).
    pub fn resign(self) -> Result<()> {
        self.guard.unlock()
    }
}

impl Watch {
    /// The leader changes, the first one being the leader when watching began.
    pub fn changes(&self) -> &Receiver<Option<Holder>> {
        &self.changes
    }
}

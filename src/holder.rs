//! `Holder`: a session that holds, or waits for, an advisory lock.

use std::time::SystemTime;

/// A server session holding or waiting for a lock, as [`crate::LockManager::holders`] finds it in
/// `pg_locks` and `pg_stat_activity`.
///
/// Every role sees every session's locks (`pg_locks` is readable by all), with the pid and the
/// application name. The client address and the backend start come from `pg_stat_activity`,
/// which shows them only for sessions of the same role, or to members of `pg_read_all_stats`
/// (and superusers); for other sessions they are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub(crate) pid: i32,
    pub(crate) shared: bool,
    pub(crate) granted: bool,
    pub(crate) application_name: Option<String>,
    pub(crate) client_addr: Option<String>,
    pub(crate) backend_start: Option<SystemTime>,
}

impl Holder {
    /// The process id of the server backend (`pg_backend_pid()` in that session).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The session's `application_name` (`Builder::application_name` for a distlock manager).
    pub fn application_name(&self) -> Option<&str> {
        self.application_name.as_deref()
    }

    /// The client's address as the server sees it; `None` over a unix socket, or when hidden
    /// from this role.
    pub fn client_addr(&self) -> Option<&str> {
        self.client_addr.as_deref()
    }

    /// When the session's backend started, if visible to this role.
    pub fn backend_start(&self) -> Option<SystemTime> {
        self.backend_start
    }

    /// True for a shared hold (or wait), false for an exclusive one.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// True when the lock is granted to the session; false when the session waits for it in
    /// PostgreSQL's lock queue (a blocking `pg_advisory_lock` of another client).
    pub fn is_granted(&self) -> bool {
        self.granted
    }
}

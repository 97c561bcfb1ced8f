//! The statement texts, formatted into one reused buffer from integers only.
//!
//! Every statement returns one row when its function returned true and none otherwise, so the worker
//! reads the outcome from the `CommandComplete` row count and never decodes a value.
//! `SELECT WHERE f(k)` (a row of no columns) is used rather than `SELECT 1 WHERE f(k)` or
//! `SELECT 1 FROM f(k) l WHERE l`: the same row count, with no function scan to plan and no column
//! for the client to describe and carry (fewer allocations and instructions per cycle on the raw
//! client, measured: see the README's Performance section).
//!
//! Every query text starts with [`PIN`], `/*NO LOAD BALANCE*/`: a proxy that routes read-only
//! statements to a replica (pgpool-II with `load_balance_mode = on`) then runs all of them on the
//! session's own backend, on the primary. A server reads it as a comment.

use std::fmt::Write;

use crate::key::{LockKey, Space};
use crate::mode::Mode;
use crate::protocol::request::Op;
use crate::sql::keepalive::ServerKeepalive;

pub(crate) mod fencing;
pub(crate) mod keepalive;
pub(crate) mod names;
pub(crate) mod pooler;
pub(crate) mod solo;

/// The comment every query text starts with, so that a load-balancing proxy keeps it on the
/// session's own backend (pgpool-II honours it; see the module docs).
pub(crate) const PIN: &str = "/*NO LOAD BALANCE*/ ";

/// A lock transaction's first statement (see [`Scope::Transaction`]): READ COMMITTED whatever the
/// cluster's default, so that no snapshot outlives a statement.
pub(crate) const BEGIN_TRANSACTION: &str =
    "/*NO LOAD BALANCE*/ BEGIN ISOLATION LEVEL READ COMMITTED";

/// Ends a lock transaction that holds nothing.
pub(crate) const END_TRANSACTION: &str = "/*NO LOAD BALANCE*/ ROLLBACK";

/// How long the locks a connection takes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Scope {
    /// Session locks (`pg_try_advisory_lock`), each released by its own unlock.
    #[default]
    Session,
    /// Transaction locks (`pg_try_advisory_xact_lock`) in one open transaction, all released when
    /// it ends (`ROLLBACK`): a connection of this scope holds one lock.
    Transaction,
}

/// Identifies a new connection's backend: its pid, its start time (µs since the epoch), and
/// whether the server is a standby (in recovery).
/// Also what the server says it is (`version()`), and the entries of its shared lock table
/// (`max_locks_per_transaction × (max_connections + max_prepared_transactions)`).
pub(crate) const IDENTIFY: &str = "/*NO LOAD BALANCE*/ SELECT pg_catalog.pg_backend_pid(), \
     (extract(epoch FROM backend_start) * 1000000)::int8, pg_catalog.pg_is_in_recovery(), \
     pg_catalog.current_setting('server_version_num')::int4, \
     coalesce(pg_catalog.current_setting('distlock.session', true), '') <> '', pg_catalog.version(), \
     pg_catalog.current_setting('max_locks_per_transaction')::int8 * \
     (pg_catalog.current_setting('max_connections')::int8 + \
     pg_catalog.current_setting('max_prepared_transactions')::int8) \
     FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid()";

/// How many statements [`Sql::push_exclusion_proof`] appends.
pub(crate) const PROOF_STATEMENTS: usize = 11;

/// A reusable statement buffer: once it has grown to its working size, formatting allocates nothing.
/// Its text always starts with [`PIN`].
#[derive(Debug)]
pub(crate) struct Sql {
    /// The text of the statement(s) being built.
    buf: String,
    /// The argument text of `key_of_text`, kept because a release usually follows the grant of
    /// the same key: its digits need not be formatted twice.
    key_text: String,
    /// The key `key_text` spells.
    key_of_text: Option<LockKey>,
    /// For the lock session's checks: the condition that the session still carries this
    /// connection's mark (empty elsewhere). A check that finds its lock in a session another
    /// client has since marked fails, and the worker then probes for a pooler.
    own: String,
    /// Session or transaction locks.
    scope: Scope,
}

impl Default for Sql {
    fn default() -> Sql {
        Sql::new()
    }
}

impl Sql {
    pub(crate) fn new() -> Sql {
        let mut buf = String::with_capacity(256);
        buf.push_str(PIN);
        Sql {
            buf,
            key_text: String::with_capacity(48),
            key_of_text: None,
            own: String::new(),
            scope: Scope::Session,
        }
    }

    /// Makes the buffer build transaction locks, and `ROLLBACK` for a release.
    pub(crate) fn set_scope(&mut self, scope: Scope) {
        self.scope = scope;
    }

    /// Makes every check also require the session's mark to be `mark` (the lock session's, set by
    /// this connection): a lock found in a session a pooler now shares with another client is not
    /// held by this manager alone.
    pub(crate) fn own_session(&mut self, mark: i64) {
        self.own.clear();
        self.own
            .push_str(" AND pg_catalog.current_setting('distlock.session', true) = '");
        push_int8(&mut self.own, mark);
        self.own.push('\'');
    }

    /// Separates the next statement from any before it.
    fn separate(&mut self) {
        if self.buf.len() > PIN.len() {
            self.buf.push(';');
        }
    }

    /// Empties the buffer (down to its [`PIN`]), keeping its capacity.
    pub(crate) fn clear(&mut self) {
        self.buf.truncate(PIN.len());
    }

    /// Appends one statement, separated from any before it by `;`.
    pub(crate) fn push(&mut self, op: Op, mode: Mode, key: LockKey) {
        let function = match (op, self.scope) {
            (Op::TryLock, scope) => try_fn(mode, scope),
            (Op::Unlock, Scope::Session) => unlock_fn(mode),
            // A transaction lock is released only with its transaction (the connection's one
            // lock: see `Scope::Transaction`).
            (Op::Unlock, Scope::Transaction) => {
                self.separate();
                self.buf.push_str("ROLLBACK");
                return;
            }
            (Op::Check, _) => return self.push_check(mode, key),
        };
        self.separate();
        self.buf.push_str("SELECT WHERE ");
        self.buf.push_str(function);
        if self.key_of_text != Some(key) {
            self.key_text.clear();
            push_args(&mut self.key_text, key);
            self.key_of_text = Some(key);
        }
        self.buf.push_str(&self.key_text);
        self.buf.push(')');
    }

    /// Appends a statement that returns one row when `pg_locks` shows `key` granted in `mode` to
    /// this very session.
    pub(crate) fn push_check(&mut self, mode: Mode, key: LockKey) {
        self.separate();
        self.buf.push_str(
            "SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() \
             AND granted AND ",
        );
        push_lock_tag(&mut self.buf, mode, key);
        self.buf.push_str(&self.own);
    }

    /// Appends a statement that ends the backend `pid` if, and only if, it is still the one that
    /// started at `started_us` (µs since the epoch), so a pid reused since is never touched.
    pub(crate) fn push_terminate(&mut self, pid: i32, started_us: i64) {
        self.separate();
        let _ = write!(
            self.buf,
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE pid = {pid} \
             AND (extract(epoch FROM backend_start) * 1000000)::int8 = {started_us}"
        );
    }

    /// Appends the lock session's set-up for a server of `version` (`server_version_num`): the
    /// server-side keepalives and the lease (`idle_session_timeout`, PostgreSQL 14 and later),
    /// when given; without them no idle-session cull at all. Only settings the server has are set.
    /// (A fencing token's durability is its own statement's: see `fencing::NEXT_TOKEN`.)
    pub(crate) fn push_session_setup(
        &mut self,
        version: i32,
        keepalive: Option<ServerKeepalive>,
        marker: i64,
    ) {
        let set = |buf: &mut String, name: &str, value: u32| {
            if !buf.is_empty() {
                buf.push(';');
            }
            buf.push_str("SET ");
            buf.push_str(name);
            buf.push_str(" = ");
            push_integer(buf, i64::from(value));
        };
        // The session's own mark, which only this connection sets (see `pooler::probe`).
        self.buf.push_str("SET distlock.session = '");
        push_int8(&mut self.buf, marker);
        self.buf.push('\'');
        set(&mut self.buf, "idle_in_transaction_session_timeout", 0);
        if version >= 140_000 {
            let lease = keepalive.map_or(0, |k| k.lease_ms);
            set(&mut self.buf, "idle_session_timeout", lease);
        }
        // PostgreSQL 17 and later: a cluster's or role's transaction_timeout would end a
        // statement that waits in the lock queue past it, and the session with it.
        if version >= 170_000 {
            set(&mut self.buf, "transaction_timeout", 0);
        }
        // A role's or database's statement_timeout or lock_timeout would cut a wait in the lock
        // queue short (and it would queue again at the back); each wait sets its own
        // lock_timeout, to its deadline.
        set(&mut self.buf, "statement_timeout", 0);
        set(&mut self.buf, "lock_timeout", 0);
        if let Some(k) = keepalive {
            set(&mut self.buf, "tcp_keepalives_idle", k.idle_s);
            set(&mut self.buf, "tcp_keepalives_interval", k.interval_s);
            set(&mut self.buf, "tcp_keepalives_count", k.count);
            if version >= 120_000 {
                set(&mut self.buf, "tcp_user_timeout", k.user_timeout_ms);
            }
        }
    }

    /// Starts a lock transaction (see [`Scope::Transaction`]): `BEGIN`, then the transaction's
    /// own settings — the lease as its idle-transaction cull (none without one), the keepalives
    /// where the server has them —
    /// and its mark, computed by the server from `salt` and its backend (see
    /// `pooler::transaction_mark`), so that all of it takes one round trip with what follows.
    pub(crate) fn push_transaction_start(&mut self, salt: u64, keepalive: Option<ServerKeepalive>) {
        self.buf.push_str(&BEGIN_TRANSACTION[PIN.len()..]);
        self.buf
            .push_str(";SET LOCAL idle_in_transaction_session_timeout = ");
        push_integer(
            &mut self.buf,
            i64::from(keepalive.map_or(0, |k| k.lease_ms)),
        );
        // PostgreSQL 17 and later: a cluster's or role's transaction_timeout would end the lock's
        // transaction, and free the lock, however alive its holder.
        self.buf.push_str(
            ";SET LOCAL statement_timeout = 0;SET LOCAL lock_timeout = 0;\
             SELECT pg_catalog.set_config('transaction_timeout', '0', true) \
             WHERE pg_catalog.current_setting('transaction_timeout', true) IS NOT NULL",
        );
        self.buf
            .push_str(";SELECT pg_catalog.set_config('distlock.session', ((");
        push_int8(&mut self.buf, salt as i64);
        self.buf.push_str(
            "::int8 # pg_catalog.pg_backend_pid()::int8) & 9223372036854775807)::text, true)",
        );
        if let Some(k) = keepalive {
            for (name, value) in [
                ("tcp_keepalives_idle", k.idle_s),
                ("tcp_keepalives_interval", k.interval_s),
                ("tcp_keepalives_count", k.count),
                ("tcp_user_timeout", k.user_timeout_ms),
            ] {
                // Only where the server has the setting (tcp_user_timeout: PostgreSQL 12).
                let _ = write!(
                    self.buf,
                    ";SELECT pg_catalog.set_config('{name}', '{value}', true) \
                     WHERE pg_catalog.current_setting('{name}', true) IS NOT NULL"
                );
            }
        }
    }

    /// Appends the identifying statement ([`IDENTIFY`]).
    pub(crate) fn push_identify(&mut self) {
        self.separate();
        self.buf.push_str(&IDENTIFY[PIN.len()..]);
    }

    /// Appends the proof that this session's locks exclude: each family of functions the locks
    /// use (exclusive and shared, `bigint` and `(int4, int4)`, and the waiting form) takes a
    /// lock on a key of `mark`'s; one look at `pg_catalog.pg_locks` (catalog names qualified, so
    /// that nothing on the search path can stand in for them) must find all five granted to this
    /// very backend; and they are released. Every one of its [`PROOF_STATEMENTS`] statements
    /// returns one row on a server whose locks are real.
    pub(crate) fn push_exclusion_proof(&mut self, mark: i64) {
        let (id, pair) = (
            LockKey::id(mark),
            LockKey::pair((mark >> 32) as i32, mark as i32),
        );
        let waited = LockKey::id(mark ^ 1);
        let tries = [
            (id, Mode::Exclusive),
            (id, Mode::Shared),
            (pair, Mode::Exclusive),
            (pair, Mode::Shared),
        ];
        for (key, mode) in tries {
            self.push(Op::TryLock, mode, key);
        }
        self.separate();
        self.buf.push_str("SELECT FROM ");
        self.buf.push_str(wait_fn(Mode::Exclusive, Scope::Session));
        push_args(&mut self.buf, waited);
        self.buf.push(')');
        self.separate();
        self.buf.push_str(
            "SELECT WHERE (SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
             AND pid = pg_catalog.pg_backend_pid() AND granted AND (false",
        );
        for (key, mode) in tries.into_iter().chain([(waited, Mode::Exclusive)]) {
            self.buf.push_str(" OR (");
            push_lock_tag(&mut self.buf, mode, key);
            self.buf.push(')');
        }
        self.buf.push_str(")) = 5");
        for (key, mode) in tries.into_iter().chain([(waited, Mode::Exclusive)]) {
            self.push(Op::Unlock, mode, key);
        }
    }

    /// The statement text built so far.
    pub(crate) fn as_str(&self) -> &str {
        &self.buf
    }
}

// The minimum of each type needs care: PostgreSQL reads `-9223372036854775808` as the negation of
// a literal too large for bigint, which becomes `numeric`, and no advisory function takes
// `numeric`. Spelling it as an expression keeps the type.
pub(crate) fn push_int8(out: &mut String, v: i64) {
    if v == i64::MIN {
        out.push_str("(-9223372036854775807-1)");
    } else {
        push_integer(out, v);
    }
}

pub(crate) fn push_int4(out: &mut String, v: i32) {
    if v == i32::MIN {
        out.push_str("(-2147483647-1)");
    } else {
        push_integer(out, i64::from(v));
    }
}

/// Decimal digits of `v` (not `i64::MIN`), without `core::fmt`: this runs for every statement,
/// and the formatting machinery costs several times the digits themselves. Two digits a step,
/// from a table of two-digit strings.
fn push_integer(out: &mut String, v: i64) {
    const PAIRS: &str = "0001020304050607080910111213141516171819\
                         2021222324252627282930313233343536373839\
                         4041424344454647484950515253545556575859\
                         6061626364656667686970717273747576777879\
                         8081828384858687888990919293949596979899";
    if v < 0 {
        out.push('-');
    }
    let mut n = v.unsigned_abs();
    // The pairs below the leading one or two digits, least significant first.
    let mut pairs = [0u8; 10];
    let mut count = 0;
    while n >= 100 {
        pairs[count] = (n % 100) as u8;
        count += 1;
        n /= 100;
    }
    if n >= 10 {
        let i = n as usize * 2;
        out.push_str(&PAIRS[i..i + 2]);
    } else {
        out.push(char::from(b'0' + n as u8));
    }
    for &pair in pairs[..count].iter().rev() {
        let i = usize::from(pair) * 2;
        out.push_str(&PAIRS[i..i + 2]);
    }
}

/// The condition that a `pg_locks` row is `key`, held in `mode`.
fn push_lock_tag(out: &mut String, mode: Mode, key: LockKey) {
    let (classid, objid, objsubid) = key.pg_locks_tag();
    let _ = write!(
        out,
        "mode = '{mode}' AND classid = {classid} AND objid = {objid} AND objsubid = {objsubid}",
        mode = mode.pg_locks_name(),
    );
}

/// The arguments of an advisory function for `key`: `id` or `a,b`.
pub(crate) fn push_args(out: &mut String, key: LockKey) {
    match key.0 {
        Space::Id(id) => push_int8(out, id),
        Space::Pair(a, b) => {
            push_int4(out, a);
            out.push(',');
            push_int4(out, b);
        }
    }
}

/// The function that tries once, up to its opening parenthesis.
pub(crate) fn try_fn(mode: Mode, scope: Scope) -> &'static str {
    match (mode, scope) {
        (Mode::Exclusive, Scope::Session) => "pg_catalog.pg_try_advisory_lock(",
        (Mode::Shared, Scope::Session) => "pg_catalog.pg_try_advisory_lock_shared(",
        (Mode::Exclusive, Scope::Transaction) => "pg_catalog.pg_try_advisory_xact_lock(",
        (Mode::Shared, Scope::Transaction) => "pg_catalog.pg_try_advisory_xact_lock_shared(",
    }
}

/// The function that releases one hold, up to its opening parenthesis.
pub(crate) fn unlock_fn(mode: Mode) -> &'static str {
    match mode {
        Mode::Exclusive => "pg_catalog.pg_advisory_unlock(",
        Mode::Shared => "pg_catalog.pg_advisory_unlock_shared(",
    }
}

/// The function that waits in the lock queue, up to its opening parenthesis.
pub(crate) fn wait_fn(mode: Mode, scope: Scope) -> &'static str {
    match (mode, scope) {
        (Mode::Exclusive, Scope::Session) => "pg_catalog.pg_advisory_lock(",
        (Mode::Shared, Scope::Session) => "pg_catalog.pg_advisory_lock_shared(",
        (Mode::Exclusive, Scope::Transaction) => "pg_catalog.pg_advisory_xact_lock(",
        (Mode::Shared, Scope::Transaction) => "pg_catalog.pg_advisory_xact_lock_shared(",
    }
}

#[cfg(test)]
#[path = "sql_tests.rs"]
mod tests;

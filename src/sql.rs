//! The statement texts, formatted into one reused buffer from integers only.
//!
//! Every statement returns one row when its function returned true and none otherwise, so the worker
//! reads the outcome from the `CommandComplete` row count and never decodes a value.
//! `SELECT WHERE f(k)` (a row of no columns) is used rather than `SELECT 1 WHERE f(k)` or
//! `SELECT 1 FROM f(k) l WHERE l`: the same row count, with no function scan to plan and no column
//! for the client to describe and carry (fewer allocations and instructions per cycle on the raw
//! client, measured: see the README's Performance section).

use std::fmt::Write;

use crate::key::{LockKey, Space};

/// Identifies a new connection's backend: its pid, its start time (µs since the epoch), and
/// whether the server is a standby (in recovery).
pub(crate) const IDENTIFY: &str = "SELECT pg_backend_pid(), \
     (extract(epoch FROM backend_start) * 1000000)::int8, pg_is_in_recovery(), \
     current_setting('server_version_num')::int4, \
     coalesce(current_setting('distlock.session', true), '') <> '' \
     FROM pg_stat_activity WHERE pid = pg_backend_pid()";

/// How the server should watch a lock session's client, so that a client whose host vanished
/// (no FIN, no RST) loses its session, and its locks, within a bound: TCP keepalive probes after
/// `idle_s` seconds of silence, every `interval_s` seconds, `count` of them unanswered; and at most
/// `user_timeout_ms` for data the client never acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerKeepalive {
    pub(crate) idle_s: u32,
    pub(crate) interval_s: u32,
    pub(crate) count: u32,
    pub(crate) user_timeout_ms: u32,
}

impl ServerKeepalive {
    /// Settings under which a silent client's session ends within `bound` (whole seconds, at
    /// least 2): half of it idle, the rest in probes a second or more apart (Linux allows 127 at
    /// most).
    pub(crate) fn within(bound: std::time::Duration) -> ServerKeepalive {
        let total = u32::try_from(bound.as_secs()).unwrap_or(u32::MAX).max(2);
        let idle_s = total / 2;
        let rest = total - idle_s;
        let count = rest.min(10);
        ServerKeepalive {
            idle_s,
            interval_s: rest / count,
            count,
            user_timeout_ms: total.saturating_mul(1000).min(i32::MAX as u32),
        }
    }
}

/// Exclusive or shared: which family of advisory functions a request uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub(crate) enum Mode {
    /// `pg_try_advisory_lock` / `pg_advisory_unlock`.
    Exclusive,
    /// `pg_try_advisory_lock_shared` / `pg_advisory_unlock_shared`.
    Shared,
}

/// What a statement does to a key.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    /// Try once to take the lock; never waits on the server.
    TryLock,
    /// Release one hold of the lock.
    Unlock,
    /// Prove that this session holds the lock: one row when `pg_locks` shows it granted to us.
    Check,
}

/// A reusable statement buffer: once it has grown to its working size, formatting allocates nothing.
#[derive(Debug, Default)]
pub(crate) struct Sql {
    /// The text of the statement(s) being built.
    buf: String,
    /// The argument text of `key_of_text`, kept because a release usually follows the grant of
    /// the same key: its digits need not be formatted twice.
    key_text: String,
    /// The key `key_text` spells.
    key_of_text: Option<LockKey>,
}

impl Sql {
    pub(crate) fn new() -> Sql {
        Sql {
            buf: String::with_capacity(256),
            key_text: String::with_capacity(48),
            key_of_text: None,
        }
    }

    /// Empties the buffer, keeping its capacity.
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
    }

    /// Appends one statement, separated from any before it by `;`.
    pub(crate) fn push(&mut self, op: Op, mode: Mode, key: LockKey) {
        if !self.buf.is_empty() {
            self.buf.push(';');
        }
        self.buf.push_str(match (op, mode) {
            (Op::TryLock, Mode::Exclusive) => "SELECT WHERE pg_try_advisory_lock(",
            (Op::TryLock, Mode::Shared) => "SELECT WHERE pg_try_advisory_lock_shared(",
            (Op::Unlock, Mode::Exclusive) => "SELECT WHERE pg_advisory_unlock(",
            (Op::Unlock, Mode::Shared) => "SELECT WHERE pg_advisory_unlock_shared(",
            (Op::Check, _) => return self.push_check(mode, key),
        });
        if self.key_of_text != Some(key) {
            self.key_text.clear();
            match key.0 {
                Space::Id(id) => push_int8(&mut self.key_text, id),
                Space::Pair(a, b) => {
                    push_int4(&mut self.key_text, a);
                    self.key_text.push(',');
                    push_int4(&mut self.key_text, b);
                }
            }
            self.key_of_text = Some(key);
        }
        self.buf.push_str(&self.key_text);
        self.buf.push(')');
    }

    // `pg_locks` shows a bigint key k as classid = k >> 32, objid = k & 0xffffffff, objsubid = 1,
    // and a pair (a, b) as classid = a, objid = b, objsubid = 2 (each as an unsigned 32-bit oid).
    fn push_check(&mut self, mode: Mode, key: LockKey) {
        let (classid, objid, objsubid) = match key.0 {
            Space::Id(k) => ((k >> 32) as u32, k as u32, 1),
            Space::Pair(a, b) => (a as u32, b as u32, 2),
        };
        let mode = match mode {
            Mode::Exclusive => "ExclusiveLock",
            Mode::Shared => "ShareLock",
        };
        let _ = write!(
            self.buf,
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() \
             AND granted AND mode = '{mode}' AND classid = {classid} AND objid = {objid} \
             AND objsubid = {objsubid}"
        );
    }

    /// Appends a statement that ends the backend `pid` if, and only if, it is still the one that
    /// started at `started_us` (µs since the epoch), so a pid reused since is never touched.
    pub(crate) fn push_terminate(&mut self, pid: i32, started_us: i64) {
        if !self.buf.is_empty() {
            self.buf.push(';');
        }
        let _ = write!(
            self.buf,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = {pid} \
             AND (extract(epoch FROM backend_start) * 1000000)::int8 = {started_us}"
        );
    }

    /// Appends the lock session's set-up for a server of `version` (`server_version_num`): no
    /// idle-session culls (they would end the session, and its locks, between two statements),
    /// and the server-side keepalives, when given. Only settings the server has are set. A cluster
    /// whose `synchronous_commit` is `off` gets `local` for this session: the sequence record
    /// behind a fencing token is then on disk before the token is returned, so a crash never
    /// issues it again (stronger settings are kept).
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
        self.buf.push_str(
            ";SELECT set_config('synchronous_commit', 'local', false) \
             WHERE current_setting('synchronous_commit') = 'off'",
        );
        if version >= 140_000 {
            set(&mut self.buf, "idle_session_timeout", 0);
        }
        if let Some(k) = keepalive {
            set(&mut self.buf, "tcp_keepalives_idle", k.idle_s);
            set(&mut self.buf, "tcp_keepalives_interval", k.interval_s);
            set(&mut self.buf, "tcp_keepalives_count", k.count);
            if version >= 120_000 {
                set(&mut self.buf, "tcp_user_timeout", k.user_timeout_ms);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_setup_sets_only_what_the_server_has() {
        let keepalive = ServerKeepalive::within(std::time::Duration::from_secs(12));
        assert_eq!(
            keepalive,
            ServerKeepalive {
                idle_s: 6,
                interval_s: 1,
                count: 6,
                user_timeout_ms: 12_000
            }
        );
        let mut sql = Sql::new();
        sql.push_session_setup(150_004, Some(keepalive), -5);
        assert_eq!(
            sql.as_str(),
            "SET distlock.session = '-5';SET idle_in_transaction_session_timeout = 0;\
             SELECT set_config('synchronous_commit', 'local', false) \
             WHERE current_setting('synchronous_commit') = 'off';SET idle_session_timeout = 0;\
             SET tcp_keepalives_idle = 6;SET tcp_keepalives_interval = 1;\
             SET tcp_keepalives_count = 6;SET tcp_user_timeout = 12000"
        );
        sql.clear();
        sql.push_session_setup(110_000, None, 7);
        assert_eq!(
            sql.as_str(),
            "SET distlock.session = '7';SET idle_in_transaction_session_timeout = 0;\
             SELECT set_config('synchronous_commit', 'local', false) \
             WHERE current_setting('synchronous_commit') = 'off'"
        );
        assert_eq!(
            crate::pooler::probe(42, 7),
            "SELECT WHERE pg_backend_pid() = 42 AND current_setting('distlock.session', true) = '7'"
        );
        let long = ServerKeepalive::within(std::time::Duration::from_secs(100));
        assert_eq!((long.idle_s, long.interval_s, long.count), (50, 5, 10));
        let tiny = ServerKeepalive::within(std::time::Duration::from_millis(1));
        assert_eq!((tiny.idle_s, tiny.interval_s, tiny.count), (1, 1, 1));
    }

    #[test]
    fn integers_format_like_display() {
        for v in [
            0,
            1,
            -1,
            9,
            10,
            -10,
            42,
            i64::MAX,
            i64::MIN + 1,
            1 << 40,
            -(1 << 40),
        ] {
            let mut text = String::new();
            push_integer(&mut text, v);
            assert_eq!(text, v.to_string());
        }
    }

    #[test]
    fn a_cached_key_text_is_reused_only_for_its_own_key() {
        let mut sql = Sql::new();
        sql.push(Op::TryLock, Mode::Exclusive, LockKey::id(12));
        sql.push(Op::Unlock, Mode::Exclusive, LockKey::id(12));
        sql.push(Op::Unlock, Mode::Exclusive, LockKey::pair(1, 2));
        sql.push(Op::Unlock, Mode::Exclusive, LockKey::id(3));
        assert_eq!(
            sql.as_str(),
            "SELECT WHERE pg_try_advisory_lock(12);SELECT WHERE pg_advisory_unlock(12);\
             SELECT WHERE pg_advisory_unlock(1,2);SELECT WHERE pg_advisory_unlock(3)"
        );
    }

    #[test]
    fn statements_hold_only_formatted_integers() {
        let mut sql = Sql::new();
        sql.push(Op::TryLock, Mode::Exclusive, LockKey::id(-42));
        assert_eq!(sql.as_str(), "SELECT WHERE pg_try_advisory_lock(-42)");
        sql.clear();
        sql.push(Op::Unlock, Mode::Shared, LockKey::pair(1, i32::MIN));
        assert_eq!(
            sql.as_str(),
            "SELECT WHERE pg_advisory_unlock_shared(1,(-2147483647-1))"
        );
        sql.clear();
        sql.push(Op::TryLock, Mode::Shared, LockKey::id(i64::MIN));
        sql.push(Op::Unlock, Mode::Exclusive, LockKey::id(i64::MAX));
        assert_eq!(
            sql.as_str(),
            "SELECT WHERE pg_try_advisory_lock_shared((-9223372036854775807-1));\
             SELECT WHERE pg_advisory_unlock(9223372036854775807)"
        );
        sql.clear();
        sql.push(Op::Check, Mode::Shared, LockKey::id(-1));
        assert!(sql.as_str().ends_with(
            "mode = 'ShareLock' AND classid = 4294967295 AND objid = 4294967295 AND objsubid = 1"
        ));
    }
}

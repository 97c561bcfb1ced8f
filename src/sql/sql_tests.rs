//! The statement texts, checked to the character.

use super::*;
use crate::protocol::request::Fencing;
use crate::sql::fencing::NEXT_TOKEN;
use crate::sql::solo::{all, fenced, permit, wait};

/// A query's text after its pin, which every query text starts with.
fn unpinned(sql: &str) -> &str {
    sql.strip_prefix(PIN)
        .expect("every query text starts with the pin")
}

/// The text of `sql` after its pin.
fn text(sql: &Sql) -> &str {
    unpinned(sql.as_str())
}

#[test]
fn session_setup_sets_only_what_the_server_has() {
    let keepalive = ServerKeepalive::within(
        std::time::Duration::from_secs(12),
        std::time::Duration::from_secs(5),
    );
    assert_eq!(
        keepalive,
        ServerKeepalive {
            idle_s: 5,
            interval_s: 1,
            count: 6,
            user_timeout_ms: 11_000,
            lease_ms: 11_000,
        }
    );
    // A heartbeat too long for the bound stretches the lease, never ends a live session.
    let stretched = ServerKeepalive::within(
        std::time::Duration::from_secs(12),
        std::time::Duration::from_secs(20),
    );
    assert_eq!(stretched.lease_ms, 21_000);
    assert_eq!(
        ServerKeepalive::within(std::time::Duration::MAX, std::time::Duration::MAX).lease_ms,
        i32::MAX as u32
    );
    let mut sql = Sql::new();
    sql.push_session_setup(150_004, Some(keepalive), -5);
    assert_eq!(
        text(&sql),
        "SET distlock.session = '-5';SET idle_in_transaction_session_timeout = 0;\
         SET idle_session_timeout = 11000;SET statement_timeout = 0;SET lock_timeout = 0;\
         SET tcp_keepalives_idle = 5;SET tcp_keepalives_interval = 1;\
         SET tcp_keepalives_count = 6;SET tcp_user_timeout = 11000"
    );
    sql.clear();
    sql.push_session_setup(110_000, None, 7);
    assert_eq!(
        text(&sql),
        "SET distlock.session = '7';SET idle_in_transaction_session_timeout = 0;\
         SET statement_timeout = 0;SET lock_timeout = 0"
    );
    sql.clear();
    sql.push_session_setup(140_000, None, 7);
    assert!(
        text(&sql).contains("SET idle_session_timeout = 0;"),
        "no lease: no cull"
    );
    sql.clear();
    sql.push_session_setup(170_000, None, 7);
    assert!(
        text(&sql).contains("SET idle_session_timeout = 0;SET transaction_timeout = 0;"),
        "{}",
        text(&sql)
    );
    assert_eq!(
        unpinned(&crate::worker::connect::pooler::probe(42, 7)),
        "SELECT WHERE pg_catalog.pg_backend_pid() = 42 AND pg_catalog.current_setting('distlock.session', true) = '7'"
    );
    let long = ServerKeepalive::within(std::time::Duration::from_secs(100), Default::default());
    assert_eq!((long.idle_s, long.interval_s, long.count), (49, 5, 10));
    let tiny = ServerKeepalive::within(std::time::Duration::from_millis(1), Default::default());
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
        text(&sql),
        "SELECT WHERE pg_catalog.pg_try_advisory_lock(12);SELECT WHERE pg_catalog.pg_advisory_unlock(12);\
         SELECT WHERE pg_catalog.pg_advisory_unlock(1,2);SELECT WHERE pg_catalog.pg_advisory_unlock(3)"
    );
}

#[test]
fn statements_hold_only_formatted_integers() {
    let mut sql = Sql::new();
    sql.push(Op::TryLock, Mode::Exclusive, LockKey::id(-42));
    assert_eq!(
        text(&sql),
        "SELECT WHERE pg_catalog.pg_try_advisory_lock(-42)"
    );
    sql.clear();
    sql.push(Op::Unlock, Mode::Shared, LockKey::pair(1, i32::MIN));
    assert_eq!(
        text(&sql),
        "SELECT WHERE pg_catalog.pg_advisory_unlock_shared(1,(-2147483647-1))"
    );
    sql.clear();
    sql.push(Op::TryLock, Mode::Shared, LockKey::id(i64::MIN));
    sql.push(Op::Unlock, Mode::Exclusive, LockKey::id(i64::MAX));
    assert_eq!(
        text(&sql),
        "SELECT WHERE pg_catalog.pg_try_advisory_lock_shared((-9223372036854775807-1));\
         SELECT WHERE pg_catalog.pg_advisory_unlock(9223372036854775807)"
    );
    sql.clear();
    sql.push(Op::Check, Mode::Shared, LockKey::id(-1));
    assert!(text(&sql).ends_with(
        "mode = 'ShareLock' AND classid = 4294967295 AND objid = 4294967295 AND objsubid = 1"
    ));
    // The lock session's checks also require its own mark; the buffer keeps it across clears.
    sql.own_session(-7);
    sql.clear();
    sql.push(Op::Check, Mode::Exclusive, LockKey::id(1));
    assert!(
        text(&sql).ends_with(
            "objsubid = 1 AND pg_catalog.current_setting('distlock.session', true) = '-7'"
        )
    );
}

#[test]
fn statements_beyond_one_key_are_built_from_integers() {
    assert_eq!(
        unpinned(&fenced(LockKey::id(-5))),
        format!(
            "{} WHERE pg_catalog.pg_try_advisory_lock(-5)",
            unpinned(NEXT_TOKEN)
        ),
    );
    let all = all(&[LockKey::id(1), LockKey::pair(2, 3)], Mode::Shared);
    assert!(
        all.contains(
            "VALUES (0, pg_catalog.pg_try_advisory_lock_shared(1)),(1, pg_catalog.pg_try_advisory_lock_shared(2,3)))"
        ),
        "{all}"
    );
    assert!(
        all.contains("WHEN n = 1 THEN pg_catalog.pg_advisory_unlock_shared(2,3) END"),
        "{all}"
    );
    let permit = unpinned(&permit(7, 3, Scope::Session)).to_owned();
    assert!(
        permit.starts_with("SELECT s FROM pg_catalog.generate_series(0, 2) s"),
        "{permit}"
    );
    assert!(
        permit.contains("pg_catalog.pg_try_advisory_lock(7, (s - 2147483648)::int4)"),
        "{permit}"
    );
    assert_eq!(
        unpinned(&wait(
            &[LockKey::id(9), LockKey::id(-1)],
            Mode::Exclusive,
            250,
            Fencing::Token,
            Scope::Session,
        )),
        "SET lock_timeout = 250;SELECT FROM pg_catalog.pg_advisory_lock(-1);\
         SELECT FROM pg_catalog.pg_advisory_lock(9);/*NO LOAD BALANCE*/ SELECT \
         pg_catalog.nextval('public.distlock_fence'), \
         pg_catalog.pg_logical_emit_message(true, 'distlock', 'fencing token'), \
         CASE WHEN pg_catalog.current_setting('synchronous_commit') IN ('off', 'local') \
         THEN pg_catalog.set_config('synchronous_commit', 'on', true) END",
        "waits take their keys in the order of their ids"
    );
    // In a lock transaction: the transaction's own setting and transaction locks.
    assert_eq!(
        unpinned(&wait(
            &[LockKey::id(9)],
            Mode::Shared,
            5,
            Fencing::NoToken,
            Scope::Transaction,
        )),
        "SET LOCAL lock_timeout = 5;SELECT FROM pg_catalog.pg_advisory_xact_lock_shared(9)"
    );
}

#[test]
fn a_lock_transaction_takes_transaction_locks_and_ends_to_release() {
    let mut sql = Sql::new();
    sql.set_scope(Scope::Transaction);
    sql.push(Op::TryLock, Mode::Exclusive, LockKey::id(3));
    sql.push(Op::TryLock, Mode::Shared, LockKey::pair(1, 2));
    sql.push(Op::Unlock, Mode::Exclusive, LockKey::id(3));
    assert_eq!(
        text(&sql),
        "SELECT WHERE pg_catalog.pg_try_advisory_xact_lock(3);\
         SELECT WHERE pg_catalog.pg_try_advisory_xact_lock_shared(1,2);ROLLBACK"
    );
    sql.clear();
    sql.push_transaction_start(5, None);
    assert_eq!(
        text(&sql),
        "BEGIN ISOLATION LEVEL READ COMMITTED;SET LOCAL idle_in_transaction_session_timeout = 0;\
         SET LOCAL statement_timeout = 0;SET LOCAL lock_timeout = 0;\
         SELECT pg_catalog.set_config('transaction_timeout', '0', true) \
         WHERE pg_catalog.current_setting('transaction_timeout', true) IS NOT NULL;\
         SELECT pg_catalog.set_config('distlock.session', ((5::int8 # pg_catalog.pg_backend_pid()::int8) \
         & 9223372036854775807)::text, true)"
    );
    sql.clear();
    let lease = ServerKeepalive::within(
        std::time::Duration::from_secs(12),
        std::time::Duration::from_secs(5),
    );
    sql.push_transaction_start(5, Some(lease));
    assert!(
        text(&sql).starts_with(
            "BEGIN ISOLATION LEVEL READ COMMITTED;\
             SET LOCAL idle_in_transaction_session_timeout = 11000;"
        ),
        "{}",
        text(&sql)
    );
    // The server computes the mark the client expects.
    assert_eq!(crate::worker::connect::pooler::transaction_mark(5, 3), 6);
}

#[test]
fn slot_keys_are_pairs_with_the_high_bit_of_objid_set() {
    let a = LockKey::id(7).permit_slot(0);
    let b = LockKey::id(7).permit_slot(4);
    assert_ne!(a, b);
    assert_eq!(a.pg_locks_tag(), (7, 0x8000_0000, 2));
    assert_eq!(b.pg_locks_tag(), (7, 0x8000_0004, 2));
    assert_eq!(
        LockKey::pair(1, 2).permit_slot(0),
        LockKey::pair(3, i32::MIN)
    );
    assert_eq!(b.semaphore_slot(), Some(4));
    assert!(!b.is_semaphore_queue());
    assert!(
        LockKey::id(7)
            .permit_slot(LockKey::TURNSTILE_SLOT)
            .is_semaphore_queue()
    );
    assert_eq!(crate::worker::solo::semaphore_class(LockKey::id(7)), 7);
}

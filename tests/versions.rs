//! What differs between server versions. CI runs this file (with the rest of the suite) on every
//! supported version, and on the newest unsupported one, by pointing the test clusters at each
//! installation (`DISTLOCK_PG_BIN`).
//!
//! * A server older than the oldest supported is refused at connect, by name.
//! * PostgreSQL 17 added `transaction_timeout`, which ends any session that stays in one
//!   transaction past it: set for the cluster, it must end neither a wait in the lock queue (one
//!   statement, as long as the caller waits) nor a lock held in transaction mode.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::bouncer::bouncer;
use common::{eventually, version_num};
use distlock::{ErrorKind, LockKey, LockManager};
use postgres::{Client, NoTls};

/// The oldest supported server, as `server_version_num`.
const OLDEST_SUPPORTED: i32 = 140_000;

#[test]
fn a_supported_server_serves_and_an_older_one_is_refused_by_name() {
    let mut plain = common::plain();
    let version = version_num(&mut plain);
    eprintln!("server_version_num {version}");
    let connected = LockManager::builder()
        .application_name("versions")
        .connect(common::url());
    if version >= OLDEST_SUPPORTED {
        let locks = connected.expect("a supported server serves");
        let guard = locks.try_lock("versions/basic").unwrap().expect("free");
        guard.ensure_held().unwrap();
        return;
    }
    let err = connected.expect_err("an unsupported server is refused");
    let major = format!("PostgreSQL {}.", version / 10_000);
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(
        err.to_string().contains(&major) && err.to_string().contains("PostgreSQL 14 and later"),
        "{err}"
    );
    // Refused before anything was taken: nothing of it is left on the server.
    let left: i64 = plain
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND a.application_name = 'versions'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

/// The pid of the one backend whose application name starts with `app` that waits for an
/// advisory lock, if there is one.
fn waiting_backend(client: &mut Client, app: &str) -> Option<i32> {
    client
        .query_opt(
            "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND NOT l.granted \
             AND a.application_name LIKE $1 || '%'",
            &[&app],
        )
        .unwrap()
        .map(|r| r.get(0))
}

#[test]
fn a_cluster_transaction_timeout_ends_no_wait_and_no_lock_in_either_mode() {
    let Some(cluster) = common::bouncer::cluster() else {
        return;
    };
    let mut admin = Client::connect(cluster.url(), NoTls).unwrap();
    let version = version_num(&mut admin);
    if version < OLDEST_SUPPORTED {
        return; // refused at connect: the test above
    }
    // Before 17 the setting does not exist, and what it would break is checked all the same.
    let timeout = common::set_transaction_timeout(&mut admin, "1s");
    if timeout {
        // The cull is real: a plain transaction open past it is ended.
        let mut plain = Client::connect(cluster.url(), NoTls).unwrap();
        plain.batch_execute("BEGIN").unwrap();
        thread::sleep(Duration::from_millis(1500));
        assert!(
            plain.simple_query("SELECT 1").is_err(),
            "transaction_timeout does not cull on this server"
        );
    }
    let held = Duration::from_secs(3);
    // Session mode: a hold and a wait of 3 s; the waiter stays in one place in the queue.
    let holder = LockManager::connect(cluster.url()).unwrap();
    let key = LockKey::name("versions/transaction-timeout");
    let guard = holder.try_lock(key).unwrap().expect("free");
    let url = cluster.url().to_owned();
    let waiter = thread::spawn(move || {
        let locks = LockManager::builder()
            .application_name("tt-waiter")
            .connect(&url)
            .unwrap();
        let started = Instant::now();
        let got = locks.try_lock_for(key, Duration::from_secs(20));
        (started.elapsed(), got.map(|g| g.is_some()))
    });
    assert!(
        eventually(Duration::from_secs(10), || waiting_backend(
            &mut admin,
            "tt-waiter"
        )
        .is_some()),
        "the waiter never queued"
    );
    let first = waiting_backend(&mut admin, "tt-waiter");
    thread::sleep(held);
    assert_eq!(
        waiting_backend(&mut admin, "tt-waiter"),
        first,
        "the wait left its place in the queue (timeout set: {timeout})"
    );
    guard.ensure_held().expect("a session lock held 3 s");
    drop(guard);
    let (waited, got) = waiter.join().unwrap();
    assert!(got.unwrap(), "the waiter was not granted");
    assert!(waited >= held, "waited only {waited:?}");
    // Transaction mode through pgbouncer: a lock held 3 s in its transaction.
    let Some(pooler) = bouncer(&cluster, "transaction", 4) else {
        return;
    };
    let locks = LockManager::builder()
        .transaction_pooler(true)
        .connect(&pooler.url())
        .unwrap();
    let key = LockKey::name("versions/transaction-timeout-tx");
    let guard = locks.try_lock(key).unwrap().expect("free");
    thread::sleep(held);
    assert!(
        !guard.is_lost(),
        "a transaction-mode lock was lost (timeout set: {timeout})"
    );
    guard
        .ensure_held()
        .expect("a transaction-mode lock held 3 s");
    let taken: bool = admin
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key.as_id().unwrap()])
        .unwrap()
        .get(0);
    assert!(!taken, "another session took the lock");
    eprintln!("server {version}: transaction_timeout set: {timeout}; holds and waits of 3 s kept");
}

//! Transaction mode under what a pooler's operators do to it while locks are held, with a real
//! pgbouncer: killed under `distlock run` (the command is stopped and the process exits 76, the
//! server holds nothing), its admin console's `RECONNECT` and `PAUSE`/`RESUME` (a held lock stays
//! held: pgbouncer waits for open transactions), and its `query_timeout` (a held lock survives, a
//! long wait is not ended by it as a grant or as a silent loss).

mod common;

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::bouncer::{bouncer, bouncer_with, cluster};
use common::{eventually, plain_try_lock, plain_unlock};
use distlock::{LockKey, LockManager};
use postgres::{Client, NoTls};

fn transaction_manager(url: &str) -> LockManager {
    LockManager::builder()
        .transaction_pooler(true)
        .connect_timeout(Duration::from_secs(5))
        .request_timeout(Duration::from_secs(5))
        .connect(url)
        .expect("a transaction-mode manager through pgbouncer")
}

/// pgbouncer SIGKILLed under `distlock run --transaction-pooler`: the command is stopped, the
/// process exits 76 within its loss bound, and the server holds nothing of it.
#[test]
fn distlock_run_exits_76_when_the_pooler_is_killed_under_it() {
    let Some(cluster) = cluster() else { return };
    let Some(mut pooler) = bouncer(&cluster, "transaction", 4) else {
        return;
    };
    let key = LockKey::name("admin/killed-under-run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args([
            "run",
            "--transaction-pooler",
            "--key",
            "admin/killed-under-run",
        ])
        .args(["--database-url", &pooler.url(), "--", "sleep", "60"])
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start distlock run");
    let mut plain = Client::connect(cluster.url(), NoTls).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            let free = plain_try_lock(&mut plain, key);
            if free {
                plain_unlock(&mut plain, key);
            }
            !free
        }),
        "distlock run never took its lock"
    );
    pooler.kill();
    let killed = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("distlock run still ran its command 30 s after the pooler was killed");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let exited = killed.elapsed();
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    eprintln!("pooler killed under distlock run: exited {status} after {exited:?}");
    assert_eq!(status.code(), Some(76), "{stderr}");
    assert!(stderr.contains("lost"), "{stderr}");
    // The default loss bound (12 s) tells a holder within half of it; the command's stop follows.
    assert!(
        exited < Duration::from_secs(8),
        "told after {exited:?}: {stderr}"
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let free = plain_try_lock(&mut plain, key);
            if free {
                plain_unlock(&mut plain, key);
            }
            free
        }),
        "the server still holds the lock"
    );
}

/// pgbouncer's admin console `RECONNECT` while a lock is held: pgbouncer replaces a server
/// connection only when its client lets go, so the lock transaction keeps its connection and the
/// lock stays held; the same manager grants new locks on the new connections.
#[test]
fn a_pooler_reconnect_keeps_a_held_lock() {
    let Some(cluster) = cluster() else { return };
    let settings = [("admin_users", "postgres")];
    let Some(pooler) = bouncer_with(&cluster, "transaction", 4, &settings) else {
        return;
    };
    let locks = transaction_manager(&pooler.url());
    let key = LockKey::name("admin/reconnect-held");
    let guard = locks.try_lock(key).unwrap().expect("free");
    let mut admin = admin(&pooler.url());
    admin.simple_query("RECONNECT postgres").expect("RECONNECT");
    thread::sleep(Duration::from_millis(1500));
    guard.ensure_held().expect("held across RECONNECT");
    assert!(!guard.is_lost());
    let mut plain = Client::connect(cluster.url(), NoTls).unwrap();
    assert!(!plain_try_lock(&mut plain, key), "another session took it");
    let other = locks
        .try_lock(LockKey::name("admin/reconnect-other"))
        .unwrap();
    assert!(other.is_some(), "no grant after RECONNECT");
    drop(guard);
    assert!(plain_try_lock(&mut plain, key), "not released");
}

/// `PAUSE` while a lock is held: pgbouncer waits for the lock's transaction, so the lock stays
/// held (and checks on it still answer) until its guard lets go; then `PAUSE` completes, and after
/// `RESUME` the same manager grants again.
#[test]
fn a_pooler_pause_waits_for_a_held_lock() {
    let Some(cluster) = cluster() else { return };
    let settings = [("admin_users", "postgres")];
    let Some(pooler) = bouncer_with(&cluster, "transaction", 4, &settings) else {
        return;
    };
    let locks = transaction_manager(&pooler.url());
    let key = LockKey::name("admin/pause-held");
    let guard = locks.try_lock(key).unwrap().expect("free");
    let url = pooler.url();
    let (paused_tx, paused) = crossbeam_channel::bounded(1);
    let pausing = thread::spawn(move || {
        let mut admin = admin(&url);
        let result = admin.simple_query("PAUSE postgres").map(|_| ());
        let _ = paused_tx.send(result.map_err(|e| e.to_string()));
        admin
    });
    // pgbouncer holds PAUSE while the transaction is open: the lock stays held, and its
    // heartbeats and checks still run in it.
    assert!(
        paused.recv_timeout(Duration::from_secs(3)).is_err(),
        "PAUSE completed while a lock transaction was open"
    );
    guard.ensure_held().expect("held while PAUSE waits");
    assert!(!guard.is_lost());
    let mut plain = Client::connect(cluster.url(), NoTls).unwrap();
    assert!(!plain_try_lock(&mut plain, key), "another session took it");
    let released = Instant::now();
    drop(guard);
    let result = paused
        .recv_timeout(Duration::from_secs(10))
        .expect("PAUSE never completed after the lock was released");
    result.expect("PAUSE");
    eprintln!("PAUSE completed {:?} after the release", released.elapsed());
    assert!(plain_try_lock(&mut plain, key), "not released");
    plain_unlock(&mut plain, key);
    let mut admin = pausing.join().unwrap();
    admin.simple_query("RESUME postgres").expect("RESUME");
    let again = locks.try_lock_for(key, Duration::from_secs(5)).unwrap();
    assert!(again.is_some(), "no grant after RESUME");
}

/// pgbouncer's `query_timeout = 1` (it cancels any statement running longer than 1 s): a lock
/// held 3 s stays held, and a call waiting 4 s for a lock released after 2 s is granted, or told
/// it was not — never granted a lock another holds, never left with a guard for a lock gone.
#[test]
fn a_poolers_query_timeout_leaves_no_lock_silently_gone() {
    let Some(cluster) = cluster() else { return };
    let settings = [("query_timeout", "1")];
    let Some(pooler) = bouncer_with(&cluster, "transaction", 4, &settings) else {
        return;
    };
    let locks = transaction_manager(&pooler.url());
    let key = LockKey::name("admin/query-timeout");
    let guard = locks.try_lock(key).unwrap().expect("free");
    thread::sleep(Duration::from_secs(3));
    guard
        .ensure_held()
        .expect("held past the pooler's query_timeout");
    let mut plain = Client::connect(cluster.url(), NoTls).unwrap();
    assert!(!plain_try_lock(&mut plain, key), "another session took it");
    let waiter = {
        let locks = locks.clone();
        thread::spawn(move || {
            let started = Instant::now();
            let outcome = locks.try_lock_for(key, Duration::from_secs(4));
            (
                started.elapsed(),
                outcome.map(|g| g.map(|g| g.ensure_held().map(|()| g))),
            )
        })
    };
    thread::sleep(Duration::from_secs(2));
    let released = Instant::now();
    drop(guard);
    let (took, outcome) = waiter.join().unwrap();
    eprintln!(
        "query_timeout: the waiter returned after {took:?} ({:?} after the release): {outcome:?}",
        released.elapsed()
    );
    let granted = outcome
        .expect("a wait through a pooler that cancels long statements")
        .expect("not granted although the lock was free for 2 s")
        .expect("granted, and held");
    assert!(!plain_try_lock(&mut plain, key), "granted, but not held");
    drop(granted);
}

fn admin(url: &str) -> Client {
    Client::connect(&url.replace("dbname=postgres", "dbname=pgbouncer"), NoTls)
        .expect("pgbouncer's admin console")
}

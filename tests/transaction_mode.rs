//! Transaction mode through a real pgbouncer in `pool_mode = transaction`: each lock in a
//! transaction of its own, excluding other transaction-mode managers, session-mode managers and
//! the command alike; a lost pinned backend announced; released on drop; harmless to vacuum and
//! to a cluster that culls idle transactions; an exhausted pool named.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::bouncer::{Bouncer, bouncer, cluster};
use common::{eventually, holders, plain_try_lock, plain_unlock, queued, time_to_loss};
use distlock::testing::{Setup, TestCluster};
use distlock::{ErrorKind, LockKey, LockManager};
use postgres::{Client, NoTls};

fn transactional(bouncer: &Bouncer, app: &str) -> LockManager {
    LockManager::builder()
        .application_name(app)
        .transaction_pooler(true)
        .heartbeat(Duration::from_millis(100))
        .connect_timeout(Duration::from_secs(2))
        .connect(&bouncer.url())
        .expect("a transaction-mode manager connects through the pooler")
}

/// Server backends in an open transaction, idle between its statements: the pinned lock
/// transactions. `(pid, backend_xmin is null, backend_xid is null)`.
fn idle_in_transaction(direct: &mut Client) -> Vec<(i32, bool, bool)> {
    direct
        .query(
            "SELECT pid, backend_xmin IS NULL, backend_xid IS NULL FROM pg_stat_activity \
             WHERE state = 'idle in transaction' AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[test]
fn transaction_mode_locks_exclude_every_kind_of_contender_and_pin_one_connection_each() {
    let Some(cluster) = cluster() else { return };
    let Some(bouncer) = bouncer(&cluster, "transaction", 4) else {
        return;
    };
    let a = transactional(&bouncer, "txn-a");
    let b = transactional(&bouncer, "txn-b");
    let session = LockManager::builder()
        .application_name("txn-session")
        .connect(cluster.url())
        .unwrap();
    let mut direct = Client::connect(cluster.url(), NoTls).unwrap();
    // Nothing held: no server connection pinned.
    assert!(idle_in_transaction(&mut direct).is_empty());
    for i in 0..20 {
        let key = LockKey::pair(6161, i);
        let guard = a.try_lock(key).unwrap().expect("free");
        assert!(
            b.try_lock(key).unwrap().is_none(),
            "{key}: two transaction-mode holders"
        );
        assert!(
            b.try_lock_shared(key).unwrap().is_none(),
            "{key}: shared beside exclusive"
        );
        assert!(
            session.try_lock(key).unwrap().is_none(),
            "{key}: a session lock beside it"
        );
        assert!(
            !plain_try_lock(&mut direct, key),
            "{key}: a plain session beside it"
        );
        assert_eq!(
            holders(&mut direct, key),
            vec![(
                "txn-a (lock transaction)".to_owned(),
                "ExclusiveLock".to_owned()
            )]
        );
        // One pinned server connection, which holds back nothing: no snapshot, no xid.
        let pinned = idle_in_transaction(&mut direct);
        assert_eq!(pinned.len(), 1, "{pinned:?}");
        assert!(
            pinned[0].1 && pinned[0].2,
            "the lock transaction holds back vacuum: {pinned:?}"
        );
        guard.ensure_held().unwrap();
        drop(guard);
        // Released on the server when drop returns.
        assert!(
            plain_try_lock(&mut direct, key),
            "{key} still held after drop"
        );
        assert!(plain_unlock(&mut direct, key));
        // A session lock excludes a transaction-mode one too.
        let held = session.try_lock(key).unwrap().expect("free again");
        assert!(
            a.try_lock(key).unwrap().is_none(),
            "{key}: beside a session lock"
        );
        drop(held);
    }
    // Shared holders coexist across the modes.
    let key = LockKey::name("txn/shared");
    let one = a.try_lock_shared(key).unwrap().expect("free");
    let two = b
        .try_lock_shared(key)
        .unwrap()
        .expect("shared beside shared");
    let three = session
        .try_lock_shared(key)
        .unwrap()
        .expect("session shared beside them");
    assert!(
        session
            .try_lock(LockKey::name("txn/other"))
            .unwrap()
            .is_some()
    );
    assert!(b.try_lock(key).unwrap().is_none());
    drop((one, two, three));
    assert!(eventually(Duration::from_secs(5), || idle_in_transaction(
        &mut direct
    )
    .is_empty()));
}

#[test]
fn a_killed_pinned_backend_is_announced_and_frees_the_lock() {
    let Some(cluster) = cluster() else { return };
    let Some(bouncer) = bouncer(&cluster, "transaction", 2) else {
        return;
    };
    let a = transactional(&bouncer, "txn-loss");
    let key = LockKey::name("txn/loss");
    let guard = a.try_lock(key).unwrap().expect("free");
    let mut direct = Client::connect(cluster.url(), NoTls).unwrap();
    let pinned = idle_in_transaction(&mut direct);
    assert_eq!(pinned.len(), 1);
    let killed: bool = direct
        .query_one("SELECT pg_terminate_backend($1)", &[&pinned[0].0])
        .unwrap()
        .get(0);
    assert!(killed);
    let told = time_to_loss(&guard, Duration::from_secs(5)).expect("the loss was announced");
    eprintln!("transaction mode: loss announced {told:?} after the kill (heartbeat 100 ms)");
    assert!(
        told < Duration::from_millis(100) + Duration::from_millis(150),
        "{told:?}"
    );
    assert_eq!(guard.ensure_held().unwrap_err().kind(), ErrorKind::LockLost);
    assert!(
        plain_try_lock(&mut direct, key),
        "the killed transaction kept its lock"
    );
    assert!(plain_unlock(&mut direct, key));
    drop(guard);
    // The manager goes on: a new lock in a new transaction.
    assert!(a.try_lock(key).unwrap().is_some());
}

#[test]
fn a_cluster_that_culls_idle_transactions_does_not_end_a_held_lock() {
    if distlock::testing::database_url().is_some() {
        distlock::testing::skip(
            "DATABASE_URL is set, and this test configures a server of its own",
        );
        return;
    }
    let setup = Setup {
        settings: vec![("idle_in_transaction_session_timeout".into(), "1s".into())],
        ..Default::default()
    };
    let cluster = TestCluster::start_with(&setup).expect("a culling cluster");
    let Some(bouncer) = bouncer(&cluster, "transaction", 2) else {
        return;
    };
    // Heartbeats far apart: without its own setting the transaction would be culled after 1 s.
    let a = LockManager::builder()
        .application_name("txn-cull")
        .transaction_pooler(true)
        .heartbeat(Duration::from_secs(10))
        .connect(&bouncer.url())
        .unwrap();
    let key = LockKey::name("txn/cull");
    let guard = a.try_lock(key).unwrap().expect("free");
    thread::sleep(Duration::from_secs(3));
    assert!(!guard.is_lost());
    guard
        .ensure_held()
        .expect("still held after 3 s idle in its transaction");
    let mut direct = Client::connect(cluster.url(), NoTls).unwrap();
    assert!(
        !plain_try_lock(&mut direct, key),
        "the culled transaction lost its lock"
    );
    // The cull is real: a plain idle transaction is ended.
    let mut idle = Client::connect(cluster.url(), NoTls).unwrap();
    idle.batch_execute("BEGIN").unwrap();
    thread::sleep(Duration::from_secs(2));
    assert!(
        idle.batch_execute("SELECT 1").is_err(),
        "the cluster does not cull"
    );
}

#[test]
fn an_exhausted_pool_is_named_within_the_bound() {
    let Some(cluster) = cluster() else { return };
    let Some(bouncer) = bouncer(&cluster, "transaction", 1) else {
        return;
    };
    let a = transactional(&bouncer, "txn-full-a");
    let b = LockManager::builder()
        .application_name("txn-full-b")
        .transaction_pooler(true)
        .connect_timeout(Duration::from_secs(1))
        .connect(&bouncer.url())
        .unwrap();
    // A's lock pins the pool's one server connection.
    let held = a.try_lock("txn/full").unwrap().expect("free");
    let started = Instant::now();
    let err = b.try_lock("txn/full-other").unwrap_err();
    let took = started.elapsed();
    assert!(err.to_string().contains("pool may be exhausted"), "{err}");
    assert!(err.to_string().contains("default_pool_size"), "{err}");
    assert!(took < Duration::from_secs(3), "returned after {took:?}");
    drop(held);
    assert!(
        b.try_lock("txn/full-other").unwrap().is_some(),
        "the pool has room again"
    );
}

#[test]
fn a_wait_queues_in_the_servers_lock_queue_and_gets_the_lock_on_release() {
    let Some(cluster) = cluster() else { return };
    let Some(bouncer) = bouncer(&cluster, "transaction", 4) else {
        return;
    };
    let a = transactional(&bouncer, "txn-wait-a");
    let b = transactional(&bouncer, "txn-wait-b");
    let key = LockKey::name("txn/wait");
    let held = a.try_lock(key).unwrap().expect("free");
    let waiter = thread::spawn(move || {
        b.try_lock_for(key, Duration::from_secs(10))
            .map(|g| (Instant::now(), g))
    });
    let mut direct = Client::connect(cluster.url(), NoTls).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            queued(&mut direct, "txn-wait-b (waiting: ") == 1
        }),
        "the waiter never queued"
    );
    let released = Instant::now();
    drop(held);
    let (got_at, guard) = waiter.join().unwrap().unwrap();
    let guard = guard.expect("granted on release");
    guard.ensure_held().unwrap();
    eprintln!(
        "transaction mode: handoff {:?}",
        got_at.duration_since(released)
    );
    // A wait that times out leaves nothing held or queued.
    let c = transactional(&bouncer, "txn-wait-c");
    assert!(
        c.try_lock_for(key, Duration::from_millis(300))
            .unwrap()
            .is_none()
    );
    assert!(eventually(Duration::from_secs(5), || {
        direct
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND a.application_name LIKE 'txn-wait-c%'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 0
    }));
}

#[test]
fn fencing_permits_all_or_nothing_and_elections_keep_their_meaning() {
    let Some(cluster) = cluster() else { return };
    let Some(bouncer) = bouncer(&cluster, "transaction", 8) else {
        return;
    };
    let a = transactional(&bouncer, "txn-caps-a");
    let b = transactional(&bouncer, "txn-caps-b");
    let session = LockManager::builder()
        .application_name("txn-caps-session")
        .connect(cluster.url())
        .unwrap();
    let mut direct = Client::connect(cluster.url(), NoTls).unwrap();

    // Fencing tokens only grow, across both modes; the lock transaction draws no xid.
    let key = LockKey::name("txn/fenced");
    let first = a.try_lock_fenced(key).unwrap().expect("free");
    let t1 = first.fencing_token().unwrap();
    assert!(session.try_lock_fenced(key).unwrap().is_none());
    let pinned = idle_in_transaction(&mut direct);
    assert!(pinned.iter().all(|p| p.1 && p.2), "{pinned:?}");
    drop(first);
    let second = session.try_lock_fenced(key).unwrap().expect("free");
    let t2 = second.fencing_token().unwrap();
    drop(second);
    let third = a.lock_fenced(key).unwrap();
    let t3 = third.fencing_token().unwrap();
    assert!(t1 < t2 && t2 < t3, "tokens {t1}, {t2}, {t3}");
    drop(third);

    // A semaphore of 2 permits, shared by both modes.
    let sem = "txn/permits";
    let p1 = a.try_acquire_permit(sem, 2).unwrap().expect("a permit");
    let p2 = session
        .try_acquire_permit(sem, 2)
        .unwrap()
        .expect("a permit");
    assert!(
        b.try_acquire_permit(sem, 2).unwrap().is_none(),
        "a third holder"
    );
    assert!(
        session.try_acquire_permit(sem, 2).unwrap().is_none(),
        "a third holder"
    );
    let waiter = {
        let b = b.clone();
        thread::spawn(move || b.try_acquire_permit_for(sem, 2, Duration::from_secs(10)))
    };
    // The waiter is first in the semaphore's line (it holds the turnstile, slot 0x7fffffff:
    // objid 4294967295, and tries the slots) before the permit is freed.
    assert!(eventually(Duration::from_secs(5), || {
        direct
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objid::int8 = 4294967295 \
                 AND a.application_name LIKE 'txn-caps-b%'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1
    }));
    drop(p1);
    let p3 = waiter.join().unwrap().unwrap().expect("the freed permit");
    assert_ne!(p3.key(), p2.key());
    drop((p2, p3));

    // All or nothing, each key released on its own.
    let (x, y, z) = (
        LockKey::name("txn/x"),
        LockKey::name("txn/y"),
        LockKey::name("txn/z"),
    );
    let both = a.try_lock_all([x, y]).unwrap().expect("free");
    assert_eq!(both.iter().map(|g| g.key()).collect::<Vec<_>>(), vec![x, y]);
    assert!(session.try_lock(x).unwrap().is_none());
    assert!(b.try_lock_all([z, y]).unwrap().is_none(), "y is held");
    assert!(
        holders(&mut direct, z).is_empty(),
        "a refused all-or-nothing try kept z"
    );
    let mut both = both;
    let gx = both.remove(0);
    drop(gx);
    assert!(
        plain_try_lock(&mut direct, x),
        "x still held after its guard dropped"
    );
    assert!(plain_unlock(&mut direct, x));
    assert!(session.try_lock(y).unwrap().is_none(), "y went with x");
    drop(both);
    let waited = b.try_lock_all_for([z, y], Duration::from_secs(5)).unwrap();
    assert_eq!(waited.map(|g| g.len()), Some(2));

    // An election: the leader's transaction is killed, the other candidate leads with a
    // higher term.
    let ea = distlock::Election::new(&a, "txn/election");
    let lead = ea.campaign().unwrap();
    let eb = distlock::Election::new(&b, "txn/election");
    assert!(eb.try_campaign().unwrap().is_none());
    let campaign = thread::spawn(move || eb.campaign_for(Duration::from_secs(10)).unwrap());
    assert!(eventually(Duration::from_secs(5), || queued(
        &mut direct,
        "txn-caps-b"
    ) == 1));
    let pid: i32 = direct
        .query_one(
            "SELECT pid FROM pg_stat_activity \
             WHERE application_name = 'txn-caps-a (lock transaction)' AND state = 'idle in transaction'",
            &[],
        )
        .unwrap()
        .get(0);
    direct
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    assert!(
        time_to_loss_of(&lead).is_some(),
        "the deposed leader was not told"
    );
    let next = campaign.join().unwrap().expect("b leads after a");
    assert!(next.term() > lead.term());
}

fn time_to_loss_of(lead: &distlock::Leadership) -> Option<Duration> {
    let start = Instant::now();
    match lead.lost().recv_timeout(Duration::from_secs(5)) {
        Err(distlock::crossbeam_channel::RecvTimeoutError::Disconnected) => Some(start.elapsed()),
        _ => None,
    }
}

/// Prints (asserts nothing about timing) what a lock costs in each mode on this machine, through
/// the same pgbouncer: the uncontended `try_lock` + drop cycle in transaction mode, in session
/// mode through the pooler's session pool, and in session mode straight to the server.
/// `cargo test --release --test transaction_mode measured -- --ignored --nocapture` reproduces the
/// README's figures.
#[test]
#[ignore]
fn measured_cost_per_lock_in_each_mode() {
    let Some(cluster) = cluster() else { return };
    let Some(txn) = bouncer(&cluster, "transaction", 4) else {
        return;
    };
    let Some(session_pool) = bouncer(&cluster, "session", 4) else {
        return;
    };
    let cases = [
        (
            "transaction mode, through pgbouncer",
            transactional(&txn, "measure-txn"),
        ),
        (
            "session mode, through pgbouncer (session pool)",
            LockManager::builder()
                .application_name("measure-session-pool")
                .connect(&session_pool.url())
                .unwrap(),
        ),
        (
            "session mode, straight to the server",
            LockManager::builder()
                .application_name("measure-direct")
                .connect(cluster.url())
                .unwrap(),
        ),
    ];
    let key = LockKey::name("txn/measure");
    for (name, locks) in &cases {
        for _ in 0..50 {
            drop(locks.try_lock(key).unwrap());
        }
        let mut cycles: Vec<Duration> = (0..1000)
            .map(|_| {
                let started = Instant::now();
                drop(locks.try_lock(key).unwrap().expect("free"));
                started.elapsed()
            })
            .collect();
        cycles.sort();
        eprintln!(
            "measured: {name}: try_lock + drop p50 {:?}, p99 {:?}",
            cycles[cycles.len() / 2],
            cycles[cycles.len() * 99 / 100]
        );
    }
}

/// `distlock run` in transaction mode through the pooler and in session mode straight to the
/// server contend for the same key, with library managers of both modes.
#[test]
fn the_command_in_either_mode_excludes_the_other() {
    let Some(cluster) = cluster() else { return };
    let Some(bouncer) = bouncer(&cluster, "transaction", 4) else {
        return;
    };
    let run = |url: &str, transaction: bool, no_wait: bool, command: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_distlock"));
        cmd.env("DATABASE_URL", url)
            .env_remove("PGAPPNAME")
            .arg("run")
            .args(["--key", "txn/cli"]);
        if transaction {
            cmd.arg("--transaction-pooler");
        }
        if no_wait {
            cmd.arg("--no-wait");
        }
        cmd.arg("--")
            .args(command)
            .stdin(std::process::Stdio::null());
        cmd
    };
    let key = LockKey::name("txn/cli");
    let mut direct = Client::connect(cluster.url(), NoTls).unwrap();
    let txn = transactional(&bouncer, "txn-cli-lib");
    let session = LockManager::connect(cluster.url()).unwrap();
    // Held by the command in transaction mode: refused to the other mode and to both libraries.
    let mut holder = run(&bouncer.url(), true, false, &["sleep", "30"])
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || holders(
        &mut direct,
        key
    )
    .len()
        == 1));
    assert_eq!(
        run(cluster.url(), false, true, &["true"])
            .status()
            .unwrap()
            .code(),
        Some(75)
    );
    assert!(session.try_lock(key).unwrap().is_none());
    assert!(txn.try_lock(key).unwrap().is_none());
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &holder.id().to_string()])
        .status();
    holder.wait().unwrap();
    // Held by the command in session mode: refused to a transaction-mode command.
    let mut holder = run(cluster.url(), false, false, &["sleep", "30"])
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || holders(
        &mut direct,
        key
    )
    .len()
        == 1));
    assert_eq!(
        run(&bouncer.url(), true, true, &["true"])
            .status()
            .unwrap()
            .code(),
        Some(75)
    );
    assert!(txn.try_lock(key).unwrap().is_none());
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &holder.id().to_string()])
        .status();
    holder.wait().unwrap();
    // Free: the transaction-mode command runs.
    assert_eq!(
        run(&bouncer.url(), true, true, &["true"])
            .status()
            .unwrap()
            .code(),
        Some(0)
    );
}

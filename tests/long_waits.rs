//! Long waits keep their place. Waiters whose waits last well past a second are served in
//! arrival order — `distlock run --wait` and the library's `try_lock_for` — also when the role
//! that waits has a `statement_timeout` and a `lock_timeout` of its own (managed services set them
//! per role) and, on PostgreSQL 17 and later, when the cluster has a `transaction_timeout`; and
//! each waiter keeps one backend in the queue for its whole wait.

mod common;

use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use common::eventually;
use distlock::testing::TestCluster;
use distlock::{LockKey, LockManager};
use postgres::{Client, NoTls};

/// Three waiters, this far apart (uneven, so that no slicing of a wait lines up with them).
const GAPS: [Duration; 2] = [Duration::from_millis(300), Duration::from_millis(650)];
/// How long the last waiter waits before the holder lets go.
const LAST_WAITS: Duration = Duration::from_millis(1500);

/// The two servers every test runs on: a plain one, and one whose role `waiter` cuts statements
/// at 100 ms and lock waits at 50 ms and whose `transaction_timeout` (17 and later) is 300 ms.
fn each_server(mut test: impl FnMut(&TestCluster, &str)) {
    let Some(plain) = common::bouncer::cluster() else {
        return;
    };
    test(&plain, plain.url());
    let Some((culling, url)) = cluster() else {
        return;
    };
    test(&culling, &url);
}

/// A cluster whose role `waiter` cuts statements at 100 ms and lock waits at 50 ms, and whose
/// `transaction_timeout` (17 and later) is 300 ms.
fn cluster() -> Option<(TestCluster, String)> {
    let cluster = common::bouncer::cluster()?;
    let mut admin = Client::connect(cluster.url(), NoTls).unwrap();
    admin
        .batch_execute(
            "CREATE ROLE waiter LOGIN SUPERUSER PASSWORD 'waiter-secret'; \
             ALTER ROLE waiter SET statement_timeout = '100ms'; \
             ALTER ROLE waiter SET lock_timeout = '50ms'",
        )
        .unwrap();
    common::set_transaction_timeout(&mut admin, "300ms");
    let url = format!(
        "host=127.0.0.1 port={} user=waiter password=waiter-secret dbname=postgres",
        cluster.port().unwrap()
    );
    Some((cluster, url))
}

/// The waiting backends of sessions whose application name starts with `app`, in pid order.
fn waiting(admin: &mut Client, app: &str) -> Vec<i32> {
    admin
        .query(
            "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND NOT l.granted \
             AND a.application_name LIKE $1 || '%' ORDER BY l.pid",
            &[&app],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Queues `start(i)` for i = 0, 1, 2 behind a plain session holding `key`, the gaps apart, each
/// queued before the next starts; holds on until the last has waited [`LAST_WAITS`], checking
/// that no waiter's backend changed; then lets go.
fn queue_three(
    admin: &mut Client,
    url: &str,
    key: LockKey,
    app: &str,
    mut start: impl FnMut(usize),
) {
    let mut holder = Client::connect(url, NoTls).unwrap();
    let id = key.as_id().unwrap();
    holder
        .query_one("SELECT pg_advisory_lock($1)", &[&id])
        .unwrap();
    for i in 0..3 {
        start(i);
        assert!(
            eventually(Duration::from_secs(20), || waiting(admin, app).len()
                == i + 1),
            "waiter {i} never queued"
        );
        if let Some(&gap) = GAPS.get(i) {
            thread::sleep(gap);
        }
    }
    let queued = waiting(admin, app);
    let until = Instant::now() + LAST_WAITS;
    while Instant::now() < until {
        assert_eq!(
            waiting(admin, app),
            queued,
            "a waiter left its place in the queue (its backend changed or stopped waiting)"
        );
        thread::sleep(Duration::from_millis(50));
    }
    holder
        .query_one("SELECT pg_advisory_unlock($1)", &[&id])
        .unwrap();
}

#[test]
fn distlock_run_waits_keep_arrival_order_under_role_and_cluster_timeouts() {
    each_server(run_waits_keep_arrival_order);
}

fn run_waits_keep_arrival_order(cluster: &TestCluster, url: &str) {
    let url = url.to_owned();
    let mut admin = Client::connect(cluster.url(), NoTls).unwrap();
    let dir = std::env::temp_dir().join(format!(
        "distlock-long-waits-{}-{}",
        std::process::id(),
        cluster.port().unwrap()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let order = dir.join("order");
    let key = "long-waits/run";
    let mut runs: Vec<Child> = Vec::new();
    queue_three(&mut admin, &url, LockKey::name(key), "run-waiter", |i| {
        runs.push(
            Command::new(env!("CARGO_BIN_EXE_distlock"))
                .args(["run", "--key", key, "--wait", "30s", "--database-url"])
                .arg(format!("{url} application_name=run-waiter-{i}"))
                .args(["--", "sh", "-c", r#"echo "$1" >> "$0"; sleep 0.1"#])
                .arg(&order)
                .arg(i.to_string())
                .env_remove("DATABASE_URL")
                .spawn()
                .unwrap(),
        );
    });
    for mut run in runs {
        let status = run.wait().unwrap();
        assert!(status.success(), "a run failed: {status}");
    }
    let served = std::fs::read_to_string(&order).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(served, "0\n1\n2\n", "not served in arrival order");
}

#[test]
fn library_waits_keep_arrival_order_under_role_and_cluster_timeouts() {
    each_server(library_waits_keep_arrival_order);
}

fn library_waits_keep_arrival_order(cluster: &TestCluster, url: &str) {
    let url = url.to_owned();
    let mut admin = Client::connect(cluster.url(), NoTls).unwrap();
    let key = LockKey::name("long-waits/library");
    let (served_tx, served) = crossbeam_channel::unbounded();
    let mut waiters = Vec::new();
    queue_three(&mut admin, &url, key, "lib-waiter", |i| {
        let (url, served_tx) = (url.clone(), served_tx.clone());
        waiters.push(thread::spawn(move || {
            let locks = LockManager::builder()
                .application_name(&format!("lib-waiter-{i}"))
                .connect(&url)
                .unwrap();
            let guard = locks
                .try_lock_for(key, Duration::from_secs(30))
                .unwrap()
                .expect("granted");
            served_tx.send(i).unwrap();
            thread::sleep(Duration::from_millis(100));
            drop(guard);
        }));
    });
    for waiter in waiters {
        waiter.join().unwrap();
    }
    let order: Vec<usize> = served.try_iter().collect();
    assert_eq!(order, vec![0, 1, 2], "not served in arrival order");
}

/// A lock held 5 s, in session mode and in transaction mode through pgbouncer, survives a
/// database whose every session has `statement_timeout = 100ms` and `lock_timeout = 50ms`, and
/// (17 and later) a cluster's `transaction_timeout = 300ms`.
#[test]
fn a_held_lock_survives_the_settings_of_a_database_in_both_modes() {
    let Some(cluster) = common::bouncer::cluster() else {
        return;
    };
    let mut admin = Client::connect(cluster.url(), NoTls).unwrap();
    admin
        .batch_execute("ALTER DATABASE postgres SET statement_timeout = '100ms'")
        .unwrap();
    admin
        .batch_execute("ALTER DATABASE postgres SET lock_timeout = '50ms'")
        .unwrap();
    common::set_transaction_timeout(&mut admin, "300ms");
    let Some(pooler) = common::bouncer::bouncer(&cluster, "transaction", 4) else {
        return;
    };
    let session = LockManager::connect(cluster.url()).unwrap();
    let transactions = LockManager::builder()
        .transaction_pooler(true)
        .connect(&pooler.url())
        .unwrap();
    let (a, b) = (
        LockKey::name("long-waits/held"),
        LockKey::name("long-waits/held-tx"),
    );
    let held = session.try_lock(a).unwrap().expect("free");
    let held_tx = transactions.try_lock(b).unwrap().expect("free");
    thread::sleep(Duration::from_secs(5));
    for (guard, mode) in [(&held, "session"), (&held_tx, "transaction")] {
        assert!(!guard.is_lost(), "{mode} mode: lost");
        guard
            .ensure_held()
            .unwrap_or_else(|e| panic!("{mode} mode: {e}"));
    }
    let mut outside = Client::connect(cluster.url(), NoTls).unwrap();
    for key in [a, b] {
        let taken: bool = outside
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key.as_id().unwrap()])
            .unwrap()
            .get(0);
        assert!(!taken, "another session took {key:?}");
    }
}

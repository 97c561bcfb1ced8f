//! The whole server restarting or going away. These hurt every session of the cluster, so they run
//! one at a time, in their own test binary, and only on the throwaway cluster.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use distlock::{ErrorKind, LockKey, LockManager};
use parking_lot::Mutex;

/// Serializes the tests of this binary: each one restarts or stops the shared server.
static SERVER: Mutex<()> = Mutex::new(());

fn local_cluster_or_skip(test: &str) -> bool {
    if cluster().is_local() {
        return true;
    }
    distlock::testing::skip(&format!(
        "{test}: DATABASE_URL names a server this test must not restart"
    ));
    false
}

fn manager_with(app: &str) -> LockManager {
    LockManager::builder()
        .application_name(app)
        .heartbeat(Duration::from_millis(100))
        .request_timeout(Duration::from_secs(2))
        .connect(url())
        .expect("connect")
}

#[test]
fn a_server_restart_loses_holders_and_waiters_carry_on() {
    if !local_cluster_or_skip("restart") {
        return;
    }
    let _one_at_a_time = SERVER.lock();
    let app = "r-restart";
    let locks = manager_with(app);
    let key = LockKey::name("restart/held");
    let guard = locks.try_lock(key).unwrap().expect("free");
    let waiter_key = LockKey::name("restart/waited");
    let blocker = manager_with("r-restart-blocker");
    let blocking = blocker.try_lock(waiter_key).unwrap().expect("free");
    let waiter = {
        let locks = locks.clone();
        thread::spawn(move || {
            let start = Instant::now();
            (
                locks.try_lock_for(waiter_key, Duration::from_secs(30)),
                start.elapsed(),
            )
        })
    };
    // The waiter is queued before the restart.
    let mut outside = plain();
    assert!(
        eventually(Duration::from_secs(5), || {
            common::queued(&mut outside, "r-restart") == 1
        }),
        "the waiter never queued"
    );
    drop(outside);

    cluster().restart().expect("pg_ctl restart");
    assert!(
        time_to_loss(&guard, Duration::from_secs(5)).is_some(),
        "holder not told"
    );
    assert!(blocking.is_lost());
    // The blocker's lock died with the old server, so the waiter gets the key after the reconnect.
    let (got, waited) = waiter.join().unwrap();
    let got = got.unwrap().expect("the waiter acquires after the restart");
    assert!(waited < Duration::from_secs(30));
    got.ensure_held().unwrap();
    assert_eq!(guard.unlock().unwrap_err().kind(), ErrorKind::LockLost);
    drop(blocking);
    let again = locks
        .try_lock(key)
        .unwrap()
        .expect("the manager grants again");
    again.ensure_held().unwrap();
    drop((got, again));
    let mut outside = plain();
    assert_eq!(locks_of_app(&mut outside, app), 0);
}

#[test]
fn a_server_that_goes_away_gives_clear_errors_within_bounds_and_is_rejoined() {
    if !local_cluster_or_skip("going away") {
        return;
    }
    let _one_at_a_time = SERVER.lock();
    let app = "r-away";
    let locks = manager_with(app);
    let key = LockKey::name("restart/away");
    let guard = locks.try_lock(key).unwrap().expect("free");

    cluster().stop_server().expect("pg_ctl stop");
    let stopped = Instant::now();
    assert!(
        time_to_loss(&guard, Duration::from_secs(5)).is_some(),
        "holder not told"
    );
    // While offline: try_lock fails fast; waiting calls end at their deadline with the cause.
    let start = Instant::now();
    let err = locks.try_lock(key).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Offline, "{err:?}");
    assert!(start.elapsed() < Duration::from_millis(100));
    let start = Instant::now();
    let err = locks
        .try_lock_for(key, Duration::from_millis(700))
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    assert_eq!(guard.ensure_held().unwrap_err().kind(), ErrorKind::LockLost);
    drop(guard);
    // A new manager cannot connect: a clear error, within the connect timeout.
    let start = Instant::now();
    let err = LockManager::builder()
        .connect_timeout(Duration::from_secs(2))
        .connect(url())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
    eprintln!("offline for {:?}", stopped.elapsed());

    cluster().start_again().expect("pg_ctl start");
    assert!(
        eventually(Duration::from_secs(15), || matches!(
            locks.try_lock(key),
            Ok(Some(_))
        )),
        "the manager did not rejoin the server"
    );
}

/// Threads of this process whose name starts with `prefix` (Linux shows 15 bytes of a name).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_server_that_accepts_but_never_answers_gets_one_connect_attempt_at_a_time() {
    if !local_cluster_or_skip("silent server") {
        return;
    }
    let _one_at_a_time = SERVER.lock();
    let app = "r-silent";
    let locks = LockManager::builder()
        .application_name(app)
        .heartbeat(Duration::from_millis(50))
        .request_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_millis(300))
        .connect(url())
        .unwrap();
    let guard = locks.try_lock("restart/silent").unwrap().expect("free");
    let mut outside = plain();
    // The postmaster stops answering (its socket still accepts), and the manager's backend dies.
    let postmaster = cluster().server_pid().expect("local cluster");
    signal(postmaster, "STOP");
    let resume = Resume(postmaster);
    assert_eq!(kill_app(&mut outside, app), 1);
    assert!(time_to_loss(&guard, Duration::from_secs(5)).is_some());
    // Reconnect attempts time out every 300 ms; none may be left running beside the next.
    let until = Instant::now() + Duration::from_secs(3);
    let mut most = 0;
    while Instant::now() < until {
        most = most.max(threads_named("distlock-connec"));
        thread::sleep(Duration::from_millis(20));
    }
    assert!(most >= 1, "no connect attempt was seen");
    assert!(most <= 1, "{most} connect attempts in flight at once");
    // The server answers again: the attempt in flight is closed, a fresh one gets through, and
    // the server is not left with a burst of connections.
    drop(resume);
    let key = LockKey::name("restart/silent-after");
    assert!(
        eventually(Duration::from_secs(10), || matches!(
            locks.try_lock(key),
            Ok(Some(_))
        )),
        "the manager did not come back"
    );
    assert!(
        eventually(Duration::from_secs(5), || sessions_of_app(
            &mut outside,
            app
        ) == 1),
        "{} sessions of one manager",
        sessions_of_app(&mut outside, app)
    );
}

//! Waiting in PostgreSQL's lock queue: arrival order across sessions, a deadline that leaves
//! nothing behind, deadlocks as their own error kind, guards on waiting connections that behave
//! like any guard, and a pool of waiting connections that is bounded, lazy and closed when idle.

mod common;

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{eventually, locks_of_app, pids_of_app, plain};
use distlock::{ErrorKind, LockKey, LockManager};

fn manager(app: &str) -> LockManager {
    LockManager::builder()
        .application_name(app)
        .heartbeat(Duration::from_millis(100))
        .connect(common::url())
        .expect("connect")
}

fn id(key: &str) -> i64 {
    LockKey::name(key).as_id().unwrap()
}

/// Waiting sessions of `app` in `pg_locks` (not granted).
fn waiting_of_app(client: &mut postgres::Client, app: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND NOT l.granted AND (a.application_name = $1 OR starts_with(a.application_name, $1 || ' (waiting'))",
            &[&app],
        )
        .unwrap()
        .get(0)
}

#[test]
fn waiters_of_several_managers_are_served_in_arrival_order() {
    let key = "waiting/order";
    let mut outside = plain();
    outside
        .execute("SELECT pg_advisory_lock($1)", &[&id(key)])
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for i in 0..5 {
        let order = Arc::clone(&order);
        let locks = manager(&format!("waiting-order-{i}"));
        threads.push(thread::spawn(move || {
            let guard = locks.lock(key).unwrap();
            order.lock().unwrap().push(i);
            thread::sleep(Duration::from_millis(20));
            drop(guard);
        }));
        // Each arrives while the ones before it already wait in the queue.
        let app = format!("waiting-order-{i}");
        assert!(eventually(Duration::from_secs(5), || {
            waiting_of_app(&mut outside, &app) == 1
        }));
    }
    outside
        .execute("SELECT pg_advisory_unlock($1)", &[&id(key)])
        .unwrap();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
}

#[test]
fn a_release_reaches_the_next_waiter_at_once() {
    let key = "waiting/handoff";
    let holder = manager("waiting-handoff-holder");
    let waiter = manager("waiting-handoff-waiter");
    let mut delays = Vec::new();
    for _ in 0..20 {
        let guard = holder.try_lock(key).unwrap().unwrap();
        let w = waiter.clone();
        let t = thread::spawn(move || {
            let g = w.try_lock_for(key, Duration::from_secs(5)).unwrap();
            (Instant::now(), g)
        });
        assert!(eventually(Duration::from_secs(5), || {
            waiting_of_app(&mut plain(), "waiting-handoff-waiter") == 1
        }));
        drop(guard);
        let released = Instant::now();
        let (got_at, got) = t.join().unwrap();
        // Handed over through PostgreSQL's queue: the lock is held by the waiter's queued
        // connection itself, not by a later try of its lock session.
        assert_eq!(
            common::holders(&mut plain(), LockKey::name(key)),
            vec![(
                "waiting-handoff-waiter (waiting connection)".to_owned(),
                "ExclusiveLock".to_owned()
            )],
            "the grant did not come from the queue"
        );
        assert!(got.is_some());
        delays.push(got_at.saturating_duration_since(released));
    }
    delays.sort();
    // Not a timing assertion: only that the waiter did not sit out a polling backoff. The
    // figures are in the README's Performance section.
    eprintln!(
        "handoff within a process: median {:?}, max {:?}",
        delays[10], delays[19]
    );
}

#[test]
fn a_deadline_that_passes_leaves_no_grant_and_no_queued_waiter() {
    let key = "waiting/deadline";
    let app = "waiting-deadline";
    let locks = manager(app);
    let mut outside = plain();
    outside
        .execute("SELECT pg_advisory_lock($1)", &[&id(key)])
        .unwrap();
    let started = Instant::now();
    assert!(
        locks
            .try_lock_for(key, Duration::from_millis(300))
            .unwrap()
            .is_none()
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(waiting_of_app(&mut outside, app), 0, "still queued");
    outside
        .execute("SELECT pg_advisory_unlock($1)", &[&id(key)])
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        locks_of_app(&mut outside, app),
        0,
        "granted after the deadline"
    );
    // Fenced and multi-key waits likewise.
    outside
        .execute("SELECT pg_advisory_lock($1)", &[&id(key)])
        .unwrap();
    assert!(
        locks
            .try_lock_fenced_for(key, Duration::from_millis(200))
            .unwrap()
            .is_none()
    );
    assert!(
        locks
            .try_lock_all_for([key, "waiting/deadline-2"], Duration::from_millis(200))
            .unwrap()
            .is_none()
    );
    assert_eq!(
        locks_of_app(&mut outside, app),
        0,
        "a partial multi-key hold stayed"
    );
    outside
        .execute("SELECT pg_advisory_unlock($1)", &[&id(key)])
        .unwrap();
    // And a zero timeout is one try, as documented.
    assert!(locks.try_lock_for(key, Duration::ZERO).unwrap().is_some());
}

#[test]
fn a_deadlock_in_the_queue_is_its_own_error_and_leaves_nothing_held() {
    // The manager takes keys in id order: it will hold `lo` and wait for `hi`.
    let (mut lo, mut hi) = ("waiting/deadlock-a", "waiting/deadlock-b");
    if id(lo) > id(hi) {
        std::mem::swap(&mut lo, &mut hi);
    }
    let app = "waiting-deadlock";
    let locks = manager(app);
    let mut outside = plain();
    outside
        .execute("SELECT pg_advisory_lock($1)", &[&id(hi)])
        .unwrap();
    let waiter = {
        let locks = locks.clone();
        thread::spawn(move || locks.try_lock_all_for([lo, hi], Duration::from_secs(20)))
    };
    assert!(eventually(Duration::from_secs(5), || {
        waiting_of_app(&mut outside, app) == 1
    }));
    // The outsider, holding `hi`, now waits for `lo`: a cycle PostgreSQL breaks (after its
    // deadlock_timeout, 1 s), ending the wait that began first, the manager's.
    let outside_wait = thread::spawn(move || {
        outside
            .execute("SELECT pg_advisory_lock($1)", &[&id(lo)])
            .map(|_| outside)
    });
    let err = waiter
        .join()
        .unwrap()
        .expect_err("the manager's wait is the victim");
    assert_eq!(err.kind(), ErrorKind::Deadlock, "{err:?}");
    let mut outside = outside_wait.join().unwrap().expect("the outsider got lo");
    assert_eq!(locks_of_app(&mut outside, app), 0, "a key stayed held");
    assert_eq!(waiting_of_app(&mut outside, app), 0);
}

#[test]
fn a_guard_from_a_waiting_connection_is_an_ordinary_guard() {
    let key = "waiting/ordinary";
    let app = "waiting-ordinary";
    let locks = manager(app);
    let mut outside = plain();
    outside
        .execute("SELECT pg_advisory_lock($1)", &[&id(key)])
        .unwrap();
    let waiter = {
        let locks = locks.clone();
        thread::spawn(move || locks.lock_fenced(key).unwrap())
    };
    assert!(eventually(Duration::from_secs(5), || {
        waiting_of_app(&mut outside, app) == 1
    }));
    outside
        .execute("SELECT pg_advisory_unlock($1)", &[&id(key)])
        .unwrap();
    let guard = waiter.join().unwrap();
    assert!(guard.fencing_token().is_some());
    guard.ensure_held().unwrap();
    // Other threads of the manager are kept out, as for any guard.
    assert!(locks.try_lock(key).unwrap().is_none());
    // Its session is a waiting connection, not the manager's own: kill every backend of the
    // application; the guard is told.
    let killed = Instant::now();
    for pid in pids_of_app(&mut outside, app) {
        outside
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || guard.is_lost()));
    eprintln!(
        "loss of a waiting connection's guard noticed in {:?}",
        killed.elapsed()
    );
    assert_eq!(guard.ensure_held().unwrap_err().kind(), ErrorKind::LockLost);
    drop(guard);
    // The manager serves again, and a wait works again.
    let again = eventually(Duration::from_secs(10), || {
        matches!(locks.try_lock_for(key, Duration::from_secs(1)), Ok(Some(_)))
    });
    assert!(again);
}

#[test]
fn waiting_connections_are_bounded_lazy_and_closed_when_idle() {
    let key = "waiting/pool";
    let app = "waiting-pool";
    let locks = LockManager::builder()
        .application_name(app)
        .wait_connections(2)
        .connect(common::url())
        .unwrap();
    let mut outside = plain();
    assert_eq!(
        pids_of_app(&mut outside, app).len(),
        1,
        "opened before a wait"
    );
    outside
        .execute("SELECT pg_advisory_lock($1)", &[&id(key)])
        .unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let locks = locks.clone();
            thread::spawn(move || {
                let g = locks
                    .try_lock_shared_for(key, Duration::from_secs(10))
                    .unwrap();
                thread::sleep(Duration::from_millis(50));
                drop(g);
            })
        })
        .collect();
    // Two wait in the queue; the other two wait for a connection.
    assert!(eventually(Duration::from_secs(5), || {
        waiting_of_app(&mut outside, app) == 2
    }));
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        pids_of_app(&mut outside, app).len(),
        3,
        "more than the bound"
    );
    outside
        .execute("SELECT pg_advisory_unlock($1)", &[&id(key)])
        .unwrap();
    for t in threads {
        t.join().unwrap();
    }
    // Idle connections close after 10 s.
    assert!(eventually(Duration::from_secs(20), || {
        pids_of_app(&mut outside, app).len() == 1
    }));
    // With none, waiting polls on the manager's connection.
    let polling = LockManager::builder()
        .application_name("waiting-none")
        .wait_connections(0)
        .connect(common::url())
        .unwrap();
    let held = locks.try_lock(key).unwrap().unwrap();
    assert!(
        polling
            .try_lock_for(key, Duration::from_millis(100))
            .unwrap()
            .is_none()
    );
    assert_eq!(pids_of_app(&mut outside, "waiting-none").len(), 1);
    drop(held);
}

#[test]
fn permit_waiters_are_served_in_arrival_order() {
    let sem = "waiting/permits";
    let holder = manager("waiting-permit-holder");
    let first = holder.try_acquire_permit(sem, 1).unwrap().expect("free");
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut outside = plain();
    let mut threads = Vec::new();
    for i in 0..4 {
        let order = Arc::clone(&order);
        let locks = manager(&format!("waiting-permit-{i}"));
        threads.push(thread::spawn(move || {
            let permit = locks
                .try_acquire_permit_for(sem, 1, Duration::from_secs(20))
                .unwrap()
                .expect("a permit");
            order.lock().unwrap().push(i);
            thread::sleep(Duration::from_millis(20));
            drop(permit);
        }));
        // Each arrives after the ones before it are in line: the first holds the semaphore's
        // queue lock, the others wait for it.
        let app = format!("waiting-permit-{i}");
        assert!(eventually(Duration::from_secs(5), || {
            i == 0 && locks_of_app(&mut outside, &app) == 1
                || i > 0 && waiting_of_app(&mut outside, &app) == 1
        }));
    }
    let released = Instant::now();
    drop(first);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    eprintln!(
        "4 permit waiters served in order in {:?}",
        released.elapsed()
    );
}

#[test]
fn without_a_waiting_connection_to_be_had_the_wait_polls() {
    if !distlock::testing::TestCluster::shared().is_local() {
        distlock::testing::skip("DATABASE_URL is set, and this test creates a role");
        return;
    }
    let mut outside = plain();
    outside
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE waiting_one LOGIN PASSWORD 'one-secret' CONNECTION LIMIT 1; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .unwrap();
    // The role's one connection is the manager's own: no waiting connection can be opened.
    let locks = LockManager::builder()
        .application_name("waiting-one")
        .connect(&format!(
            "{} user=waiting_one password=one-secret",
            common::url()
        ))
        .unwrap();
    let key = "waiting/one-connection";
    outside
        .execute("SELECT pg_advisory_lock($1)", &[&id(key)])
        .unwrap();
    let waiter = {
        let locks = locks.clone();
        thread::spawn(move || locks.try_lock_for(key, Duration::from_secs(10)))
    };
    thread::sleep(Duration::from_millis(300));
    outside
        .execute("SELECT pg_advisory_unlock($1)", &[&id(key)])
        .unwrap();
    let guard = waiter.join().unwrap().unwrap().expect("granted by polling");
    guard.ensure_held().unwrap();
    assert_eq!(pids_of_app(&mut outside, "waiting-one").len(), 1);

    // The fallback's backoff (up to 10 s here) never carries a wait past its deadline.
    drop(guard);
    drop(locks);
    // The role's one connection closes with the manager.
    assert!(eventually(Duration::from_secs(5), || pids_of_app(
        &mut outside,
        "waiting-one"
    )
    .is_empty()));
    let slow = LockManager::builder()
        .application_name("waiting-one-backoff")
        .max_retry_interval(Duration::from_secs(10))
        .connect(&format!(
            "{} user=waiting_one password=one-secret",
            common::url()
        ))
        .unwrap();
    outside
        .execute("SELECT pg_advisory_lock($1)", &[&id(key)])
        .unwrap();
    for wait in [
        Duration::from_millis(50),
        Duration::from_millis(300),
        Duration::from_secs(2),
    ] {
        let started = Instant::now();
        assert!(slow.try_lock_for(key, wait).unwrap().is_none());
        let took = started.elapsed();
        assert!(took >= wait, "{took:?}");
        assert!(
            took < wait + Duration::from_millis(150),
            "returned {took:?} after a {wait:?} deadline: a backoff step late"
        );
    }
    assert_eq!(pids_of_app(&mut outside, "waiting-one-backoff").len(), 1);
    outside
        .execute("SELECT pg_advisory_unlock($1)", &[&id(key)])
        .unwrap();
}

//! `LockManager::stats`: the counters and gauges against what was done, under concurrency and
//! through killed backends.

mod common;

use std::thread;
use std::time::Duration;

use common::{eventually, kill_app, manager, plain, plain_try_lock, plain_unlock, time_to_loss};
use distlock::{LockKey, LockManager};

#[test]
fn grants_refusals_timeouts_and_waits_are_counted_exactly_under_concurrency() {
    let locks = manager("stats-counts");
    let before = locks.stats();
    assert_eq!((before.grants, before.refusals, before.timeouts), (0, 0, 0));
    thread::scope(|s| {
        for t in 0..8 {
            let locks = &locks;
            s.spawn(move || {
                for i in 0..50 {
                    let guard = locks.try_lock(LockKey::pair(8080, t * 100 + i)).unwrap();
                    drop(guard.expect("distinct keys are free"));
                }
            });
        }
    });
    let after = locks.stats();
    assert_eq!(after.grants, 400);
    assert_eq!(after.hold_time.count(), 400);
    assert_eq!(after.refusals, 0);
    assert_eq!(
        (after.held_exclusive, after.held_shared, after.held_permits),
        (0, 0, 0)
    );

    // Someone else holds it: tries are refused, waits time out.
    let key = LockKey::name("stats/held");
    let mut outside = plain();
    assert!(plain_try_lock(&mut outside, key));
    for _ in 0..5 {
        assert!(locks.try_lock(key).unwrap().is_none());
    }
    for _ in 0..2 {
        assert!(
            locks
                .try_lock_for(key, Duration::from_millis(100))
                .unwrap()
                .is_none()
        );
    }
    let held = locks.stats();
    // Each wait's first try, before it queued, was refused too.
    assert_eq!(held.refusals, 5 + 2, "{held:?}");
    assert_eq!(held.timeouts, 2, "{held:?}");
    assert_eq!(held.waiting, 0);
    // A wait that gets the lock: counted waiting while it waits, then its wait time.
    let waiter = {
        let locks = locks.clone();
        thread::spawn(move || locks.try_lock_for(key, Duration::from_secs(10)).unwrap())
    };
    assert!(eventually(Duration::from_secs(5), || locks.stats().waiting == 1));
    assert!(
        locks.stats().extra_connections_open >= 1,
        "the wait has its waiting connection"
    );
    thread::sleep(Duration::from_millis(100));
    assert!(plain_unlock(&mut outside, key));
    let guard = waiter.join().unwrap().expect("granted");
    let got = locks.stats();
    assert_eq!(got.waiting, 0);
    assert_eq!(got.wait_time.count(), 1);
    assert!(got.wait_time.quantile(0.5).unwrap() >= Duration::from_millis(100));
    assert_eq!(got.grants, 401);
    assert_eq!(got.held_exclusive, 1);
    drop(guard);
    assert_eq!(locks.stats().held_exclusive, 0);
}

#[test]
fn held_locks_by_kind_lost_locks_and_reconnects_through_a_killed_backend() {
    let app = "stats-loss";
    let locks = LockManager::builder()
        .application_name(app)
        .heartbeat(Duration::from_millis(50))
        .connect(common::url())
        .unwrap();
    let exclusive = locks.try_lock("stats/x").unwrap().expect("free");
    let shared = locks.try_lock_shared("stats/s").unwrap().expect("free");
    let shared_too = locks.try_lock_shared("stats/s").unwrap().expect("shared");
    let permit = locks
        .try_acquire_permit("stats/p", 3)
        .unwrap()
        .expect("a permit");
    let s = locks.stats();
    assert_eq!(
        (s.held_exclusive, s.held_shared, s.held_permits),
        (1, 2, 1),
        "{s:?}"
    );
    assert!(s.lock_session_open);
    assert_eq!((s.lost, s.reconnects), (0, 0));
    let mut outside = plain();
    assert!(kill_app(&mut outside, app) >= 1);
    assert!(time_to_loss(&exclusive, Duration::from_secs(5)).is_some());
    drop((exclusive, shared, shared_too, permit));
    let s = locks.stats();
    assert_eq!(s.lost, 4, "every lost guard counted once: {s:?}");
    assert_eq!((s.held_exclusive, s.held_shared, s.held_permits), (0, 0, 0));
    assert!(eventually(Duration::from_secs(10), || {
        let s = locks.stats();
        s.reconnects == 1 && s.lock_session_open
    }));
    // And it goes on counting.
    drop(locks.try_lock("stats/after").unwrap().expect("free"));
    assert_eq!(locks.stats().grants, 5);
}

/// Collects distlock's log lines (the test installs it as the logger).
struct Capture;

static LINES: parking_lot::Mutex<Vec<String>> = parking_lot::Mutex::new(Vec::new());

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.level() <= log::Level::Warn {
            LINES.lock().push(record.args().to_string());
        }
    }

    fn flush(&self) {}
}

#[test]
fn a_guard_held_too_long_is_warned_of_once_with_where_it_was_taken_and_its_release() {
    static CAPTURE: Capture = Capture;
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Warn);
    let locks = LockManager::builder()
        .application_name("stats-held-long")
        .warn_held_after(Duration::from_millis(200))
        .connect(common::url())
        .unwrap();
    let (long, quick) = (
        LockKey::name("stats/held-long"),
        LockKey::name("stats/quick"),
    );
    let guard = locks.try_lock(long).unwrap().expect("free");
    let taken_on = line!() - 1;
    drop(locks.try_lock(quick).unwrap().expect("free"));
    let shared = locks
        .try_lock_shared_for(quick, Duration::from_secs(1))
        .unwrap();
    drop(shared);
    thread::sleep(Duration::from_millis(700));
    let about = |key: LockKey| -> Vec<String> {
        LINES
            .lock()
            .iter()
            .filter(|l| l.contains(&key.to_string()))
            .cloned()
            .collect()
    };
    let lines = about(long);
    assert_eq!(lines.len(), 1, "one warning, not one per look: {lines:?}");
    assert!(lines[0].contains("has been held"), "{lines:?}");
    assert!(
        lines[0].contains(&format!("tests/stats.rs:{taken_on}")),
        "the place that took it: {lines:?}"
    );
    assert!(
        about(quick).is_empty(),
        "a quick lock was warned of: {:?}",
        about(quick)
    );
    drop(guard);
    let lines = about(long);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].contains("was released after"), "{lines:?}");
}

//! Locking against a real server: grants, contention seen from outside, release on drop, shared
//! locks, pair keys, waiting, waking, in-process exclusion and the manager's lifetime.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use distlock::{LockGuard, LockKey, LockManager};

#[test]
fn public_types_are_send_sync_and_static() {
    fn send_sync<T: Send + Sync + 'static>() {}
    fn send_static<T: Send + 'static>() {}
    send_sync::<LockManager>();
    send_sync::<distlock::Error>();
    send_sync::<LockKey>();
    send_static::<LockGuard>();
    send_sync::<LockGuard>();
}

#[test]
fn try_lock_grants_a_free_key_and_an_outsider_sees_it_held() {
    let app = "t-grant";
    let locks = manager(app);
    let key = LockKey::name("locking/grant");
    let guard = locks.try_lock(key).unwrap().expect("free key is granted");
    assert_eq!(guard.key(), key);
    assert!(!guard.is_shared());

    let mut outside = plain();
    assert!(
        !plain_try_lock(&mut outside, key),
        "an outsider must be refused"
    );
    assert_eq!(
        holders(&mut outside, key),
        vec![(app.to_owned(), "ExclusiveLock".to_owned())]
    );
    guard.unlock().unwrap();
    assert!(holders(&mut outside, key).is_empty());
    assert!(plain_try_lock(&mut outside, key));
    assert!(plain_unlock(&mut outside, key));
}

#[test]
fn a_key_held_by_a_plain_connection_is_refused_until_it_is_released() {
    let locks = manager("t-outsider");
    let key = LockKey::name("locking/outsider");
    let mut outside = plain();
    assert!(plain_try_lock(&mut outside, key));
    assert!(locks.try_lock(key).unwrap().is_none());
    assert!(locks.try_lock_shared(key).unwrap().is_none());
    assert!(plain_unlock(&mut outside, key));
    assert!(locks.try_lock(key).unwrap().is_some());
}

#[test]
fn two_managers_contend_like_two_processes() {
    let a = manager("t-two-a");
    let b = manager("t-two-b");
    let key = LockKey::id(0x0123_4567_89ab);
    let held = a.try_lock(key).unwrap().expect("a gets it");
    assert!(b.try_lock(key).unwrap().is_none());
    drop(held);
    let held = b
        .try_lock(key)
        .unwrap()
        .expect("b gets it once a dropped its guard");
    assert!(a.try_lock(key).unwrap().is_none());
    drop(held);
}

#[test]
fn the_lock_is_released_on_the_server_when_drop_returns() {
    let locks = manager("t-drop-release");
    let mut outside = plain();
    for i in 0..200 {
        let key = LockKey::pair(77, i);
        let guard = locks.try_lock(key).unwrap().expect("free");
        drop(guard);
        // No sleep, no retry: the release must already have happened.
        assert!(
            plain_try_lock(&mut outside, key),
            "still held after drop #{i}"
        );
        assert!(plain_unlock(&mut outside, key));
    }
}

#[test]
fn shared_holders_coexist_and_exclude_an_exclusive_holder() {
    let a = manager("t-shared-a");
    let b = manager("t-shared-b");
    let key = LockKey::name("locking/shared");
    let s1 = a.try_lock_shared(key).unwrap().expect("first shared");
    let s2 = a
        .try_lock_shared(key)
        .unwrap()
        .expect("second shared, same manager");
    let s3 = b
        .try_lock_shared(key)
        .unwrap()
        .expect("shared, other manager");
    assert!(s1.is_shared());
    assert!(a.try_lock(key).unwrap().is_none());
    assert!(b.try_lock(key).unwrap().is_none());
    let mut outside = plain();
    // pg_locks has one row per session, however often the session holds the key.
    assert_eq!(
        holders(&mut outside, key),
        vec![
            ("t-shared-a".to_owned(), "ShareLock".to_owned()),
            ("t-shared-b".to_owned(), "ShareLock".to_owned())
        ]
    );
    drop(s1);
    drop(s3);
    assert!(
        b.try_lock(key).unwrap().is_none(),
        "s2 still holds it shared"
    );
    drop(s2);
    assert!(holders(&mut outside, key).is_empty());
    let x = b
        .try_lock(key)
        .unwrap()
        .expect("exclusive once every shared holder left");
    assert!(a.try_lock_shared(key).unwrap().is_none());
    drop(x);
}

#[test]
fn pair_keys_and_id_keys_are_separate_locks() {
    let locks = manager("t-pairs");
    let mut outside = plain();
    let pair = LockKey::pair(5, 6);
    let id = LockKey::id((5 << 32) | 6);
    let p = locks.try_lock(pair).unwrap().expect("pair");
    let i = locks
        .try_lock(id)
        .unwrap()
        .expect("the id with the same bits is another lock");
    assert_eq!(holders(&mut outside, pair).len(), 1);
    assert_eq!(holders(&mut outside, id).len(), 1);
    drop((p, i));
}

#[test]
fn extreme_keys_reach_the_server_intact() {
    let locks = manager("t-extremes");
    let mut outside = plain();
    for key in [
        LockKey::id(i64::MIN),
        LockKey::id(i64::MAX),
        LockKey::id(-1),
        LockKey::id(0),
        LockKey::pair(i32::MIN, i32::MAX),
        LockKey::pair(i32::MAX, i32::MIN),
    ] {
        let guard = locks.try_lock(key).unwrap().expect("free");
        assert_eq!(
            holders(&mut outside, key).len(),
            1,
            "{key:?} held under its own tag"
        );
        assert!(!plain_try_lock(&mut outside, key));
        drop(guard);
        let guard = locks.try_lock_shared(key).unwrap().expect("free");
        drop(guard);
        assert!(holders(&mut outside, key).is_empty());
    }
}

#[test]
fn names_map_to_the_go_libraries_ids_on_the_server() {
    let locks = manager("t-golden");
    let mut outside = plain();
    let guard = locks.try_lock("test-key").unwrap().expect("free");
    // The id Go's ldelossa/distlock and quay/claircore use for "test-key".
    let go_id = LockKey::id(-8571056458571921465);
    assert_eq!(holders(&mut outside, go_id).len(), 1);
    assert!(!plain_try_lock(&mut outside, go_id));
    drop(guard);
}

#[test]
fn any_name_is_a_valid_key() {
    let locks = manager("t-names");
    let long = "x".repeat(8 << 20);
    for name in [
        "",
        "é🔒 ключ",
        "with 'quotes'; DROP TABLE x; --",
        long.as_str(),
    ] {
        let guard = locks.try_lock(name).unwrap().expect("free");
        assert_eq!(guard.key(), LockKey::name(name));
        assert!(locks.try_lock(name).unwrap().is_none());
        guard.unlock().unwrap();
    }
}

#[test]
fn threads_of_one_manager_exclude_each_other() {
    let locks = manager("t-threads");
    let key = LockKey::name("locking/threads");
    let inside = AtomicBool::new(false);
    let entries = AtomicUsize::new(0);
    thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..40 {
                    let guard = locks.lock(key).unwrap();
                    assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                    entries.fetch_add(1, Ordering::Relaxed);
                    thread::sleep(Duration::from_micros(200));
                    inside.store(false, Ordering::SeqCst);
                    drop(guard);
                }
            });
        }
    });
    assert_eq!(entries.load(Ordering::Relaxed), 320);
    let mut outside = plain();
    assert!(holders(&mut outside, key).is_empty());
}

#[test]
fn threads_on_two_managers_never_overlap() {
    let managers = [manager("t-overlap-a"), manager("t-overlap-b")];
    let keys = [LockKey::name("overlap/0"), LockKey::name("overlap/1")];
    let inside: [AtomicBool; 2] = Default::default();
    let entries = AtomicUsize::new(0);
    thread::scope(|s| {
        for t in 0..8 {
            let (locks, inside, entries) = (&managers[t % 2], &inside, &entries);
            s.spawn(move || {
                for i in 0..40 {
                    let k = (t + i) % 2;
                    let Some(guard) = locks
                        .try_lock_for(keys[k], Duration::from_secs(20))
                        .unwrap()
                    else {
                        panic!("20 s without the lock");
                    };
                    assert!(
                        !inside[k].swap(true, Ordering::SeqCst),
                        "two holders of {k}"
                    );
                    entries.fetch_add(1, Ordering::Relaxed);
                    thread::sleep(Duration::from_micros(100));
                    inside[k].store(false, Ordering::SeqCst);
                    drop(guard);
                }
            });
        }
    });
    assert_eq!(entries.load(Ordering::Relaxed), 320);
}

/// A manager that waits in PostgreSQL's lock queue (`polling: false`, the default) or polls on its
/// own connection (`wait_connections(0)`), backing off up to `max_retry`.
fn waiting_manager(app: &str, polling: bool, max_retry: Duration) -> LockManager {
    LockManager::builder()
        .application_name(app)
        .wait_connections(if polling { 0 } else { 4 })
        .max_retry_interval(max_retry)
        .connect(url())
        .unwrap()
}

/// While a polling manager waits: no waiting connection, nothing of it queued in `pg_locks`.
fn assert_polls(outside: &mut postgres::Client, app: &str) {
    assert_eq!(
        common::sessions_of_app(outside, app),
        1,
        "a polling manager opened a waiting connection"
    );
    let queued: i64 = outside
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        queued, 0,
        "a polling manager queued in PostgreSQL's lock queue"
    );
}

fn gives_up_close_to_its_deadline(app: &str, polling: bool) {
    let locks = waiting_manager(app, polling, Duration::from_secs(10));
    let key = LockKey::name(&format!("locking/deadline/{app}"));
    let mut outside = plain();
    assert!(plain_try_lock(&mut outside, key));
    for wait in [
        Duration::ZERO,
        Duration::from_millis(50),
        Duration::from_millis(300),
    ] {
        let start = Instant::now();
        assert!(locks.try_lock_for(key, wait).unwrap().is_none());
        let took = start.elapsed();
        assert!(
            took >= wait,
            "returned after {took:?}, before its {wait:?} deadline"
        );
        // Generous: a loaded CI machine may deschedule us; the point is that it is not a backoff step
        // or a request timeout late.
        assert!(
            took < wait + Duration::from_millis(150),
            "returned {took:?} after a {wait:?} deadline"
        );
    }
    if polling {
        let waiter = {
            let locks = locks.clone();
            thread::spawn(move || {
                locks
                    .try_lock_for(key, Duration::from_millis(600))
                    .map(|g| g.is_some())
            })
        };
        thread::sleep(Duration::from_millis(300));
        assert_polls(&mut outside, app);
        assert!(!waiter.join().unwrap().unwrap());
    }
    assert!(plain_unlock(&mut outside, key));
    assert!(
        locks
            .try_lock_for(key, Duration::from_secs(1))
            .unwrap()
            .is_some()
    );
}

#[test]
fn try_lock_for_gives_up_close_to_its_deadline() {
    gives_up_close_to_its_deadline("t-deadline", false);
}

#[test]
fn try_lock_for_gives_up_close_to_its_deadline_when_polling() {
    gives_up_close_to_its_deadline("t-deadline-polling", true);
}

fn takes_the_lock_when_an_outsider_releases_it(app: &str, polling: bool) {
    let locks = waiting_manager(app, polling, Duration::from_millis(100));
    let key = LockKey::name(&format!("locking/wait-outside/{app}"));
    let mut outside = plain();
    assert!(plain_try_lock(&mut outside, key));
    let waiter = {
        let locks = locks.clone();
        thread::spawn(move || locks.lock(key).map(|g| (Instant::now(), g)))
    };
    // The waiter is waiting (queued, or polling) before the release.
    if polling {
        thread::sleep(Duration::from_millis(300));
        assert_polls(&mut outside, app);
    } else {
        assert!(eventually(Duration::from_secs(5), || {
            holders(&mut outside, key).len() == 1
                && outside
                    .query_one(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                         AND objid::int8 = $1",
                        &[&i64::from(key.pg_locks_tag().1)],
                    )
                    .unwrap()
                    .get::<_, i64>(0)
                    == 1
        }));
    }
    assert!(!waiter.is_finished());
    let released = Instant::now();
    assert!(plain_unlock(&mut outside, key));
    let (acquired, guard) = waiter.join().unwrap().unwrap();
    assert!(acquired >= released);
    assert!(!plain_try_lock(&mut outside, key));
    drop(guard);
}

#[test]
fn a_waiter_takes_the_lock_when_an_outsider_releases_it() {
    takes_the_lock_when_an_outsider_releases_it("t-wait-outside", false);
}

#[test]
fn a_polling_waiter_takes_the_lock_when_an_outsider_releases_it() {
    takes_the_lock_when_an_outsider_releases_it("t-wait-outside-polling", true);
}

/// With a 10 s backoff cap, a waiter that only polled would sleep for seconds after a release by
/// a thread of its own manager: the release must wake it.
fn a_local_release_wakes(app: &str, polling: bool) {
    let locks = waiting_manager(app, polling, Duration::from_secs(10));
    let key = LockKey::name(&format!("locking/wake/{app}"));
    let mut outside = plain();
    for mode_shared in [false, true] {
        let holder = locks.try_lock(key).unwrap().expect("free");
        let waiter = {
            let locks = locks.clone();
            thread::spawn(move || {
                let g = if mode_shared {
                    locks.try_lock_shared_for(key, Duration::from_secs(60))
                } else {
                    locks.try_lock_for(key, Duration::from_secs(60))
                };
                (Instant::now(), g)
            })
        };
        // Let the waiter's backoff grow to seconds.
        thread::sleep(Duration::from_secs(3));
        if polling {
            assert_polls(&mut outside, app);
        }
        assert!(!waiter.is_finished());
        let released = Instant::now();
        drop(holder);
        let (acquired, guard) = waiter.join().unwrap();
        let guard = guard.unwrap().expect("acquired");
        let delay = acquired - released;
        assert!(
            delay < Duration::from_millis(900),
            "woken {delay:?} after the release"
        );
        drop(guard);
    }
}

#[test]
fn a_local_release_wakes_a_waiter_at_once_whatever_the_backoff() {
    a_local_release_wakes("t-wake", false);
}

#[test]
fn a_local_release_wakes_a_polling_waiter_at_once_whatever_the_backoff() {
    a_local_release_wakes("t-wake-polling", true);
}

#[test]
fn guards_keep_the_connection_and_the_last_drop_closes_it() {
    let app = "t-lifetime";
    let locks = manager(app);
    let guard = locks.try_lock("locking/lifetime").unwrap().expect("free");
    let other = locks.clone();
    drop(locks);
    drop(other);
    let mut outside = plain();
    assert_eq!(
        sessions_of_app(&mut outside, app),
        1,
        "a live guard keeps the session"
    );
    assert_eq!(locks_of_app(&mut outside, app), 1);
    let moved = thread::spawn(move || guard.key()).join().unwrap();
    assert_eq!(moved, LockKey::name("locking/lifetime"));
    assert!(
        eventually(Duration::from_secs(10), || sessions_of_app(
            &mut outside,
            app
        ) == 0),
        "the connection must close once the last guard and handle are gone"
    );
}

#[test]
fn nothing_is_left_in_pg_locks_after_everything_is_dropped() {
    let app = "t-leftovers";
    let locks = manager(app);
    let mut guards = Vec::new();
    for i in 0..50 {
        guards.push(locks.try_lock(LockKey::pair(9, i)).unwrap().expect("free"));
        guards.push(
            locks
                .try_lock_shared(LockKey::id(9_000 + i as i64))
                .unwrap()
                .expect("free"),
        );
    }
    let mut outside = plain();
    assert_eq!(locks_of_app(&mut outside, app), 100);
    let half = guards.split_off(50);
    drop(guards);
    assert_eq!(locks_of_app(&mut outside, app), 50);
    drop(half);
    assert_eq!(locks_of_app(&mut outside, app), 0);
    drop(locks);
    assert!(eventually(Duration::from_secs(10), || sessions_of_app(
        &mut outside,
        app
    ) == 0));
}

#[test]
fn guards_move_between_threads_and_release_there() {
    let locks = manager("t-move");
    let key = LockKey::name("locking/move");
    let guard = locks.try_lock(key).unwrap().expect("free");
    let shared_manager = Arc::new(locks);
    let handle = thread::spawn(move || guard.unlock());
    handle.join().unwrap().unwrap();
    assert!(shared_manager.try_lock(key).unwrap().is_some());
}

#[test]
fn a_spin_wait_manager_grants_and_excludes_like_any_other() {
    let locks = LockManager::builder()
        .application_name("t-spin-wait")
        .spin_wait(true)
        .connect(url())
        .unwrap();
    let mut outside = plain();
    let key = LockKey::name("locking/spin-wait");
    for _ in 0..50 {
        let guard = locks.try_lock(key).unwrap().expect("free");
        assert_eq!(holders(&mut outside, key).len(), 1);
        assert!(locks.try_lock(key).unwrap().is_none());
        drop(guard);
        assert!(holders(&mut outside, key).is_empty());
    }
    // Many threads at once: only a lone call spins; the rest wait as usual and never overlap.
    let inside = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..30 {
                    let guard = locks.lock(key).unwrap();
                    assert!(!inside.swap(true, std::sync::atomic::Ordering::SeqCst));
                    std::thread::sleep(Duration::from_micros(200));
                    inside.store(false, std::sync::atomic::Ordering::SeqCst);
                    drop(guard);
                }
            });
        }
    });
    assert!(holders(&mut outside, key).is_empty());
}

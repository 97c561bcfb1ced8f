//! Fault tests of waits in PostgreSQL's lock queue.

use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use super::{app_holds, cluster, locks_of_app, manager, plain};
use crate::LockKey;

/// `lock_timeout` can fire just as PostgreSQL grants the lock, and then still raises its error.
/// Forced here: the wait statement takes the lock and then fails with `lock_not_available`. The
/// manager must read the hold back from `pg_locks` and hand out a working guard, not report "not
/// acquired" and leak the lock.
#[test]
fn a_grant_racing_lock_timeout_is_a_grant_not_a_leak() {
    if cluster().is_none() {
        return;
    }
    let app = "ft-wait-race";
    let locks = manager(app, Duration::from_secs(5), Duration::from_secs(1));
    let key = LockKey::name("fault/wait-race");
    let mut outside = plain();
    outside
        .execute("SELECT pg_advisory_lock($1)", &[&key.as_id().unwrap()])
        .unwrap();
    crate::worker::queue_wait::fault::GRANT_THEN_TIME_OUT
        .store(key.as_id().unwrap(), Ordering::Release);
    let waiter = {
        let locks = locks.clone();
        thread::spawn(move || locks.try_lock_for(key, Duration::from_secs(5)))
    };
    thread::sleep(Duration::from_millis(200));
    outside
        .execute("SELECT pg_advisory_unlock($1)", &[&key.as_id().unwrap()])
        .unwrap();
    let guard = waiter
        .join()
        .unwrap()
        .expect("no error")
        .expect("the racing grant is a grant");
    assert_eq!(
        crate::worker::queue_wait::fault::GRANT_THEN_TIME_OUT.load(Ordering::Acquire),
        0,
        "the wait statement was not the forced one"
    );
    // Granted on the manager's waiting connection, which carries its name and says it waits.
    let waiting = format!("{app} (waiting connection)");
    assert!(app_holds(&mut outside, &waiting, key));
    guard.ensure_held().unwrap();
    drop(guard);
    assert_eq!(locks_of_app(&mut outside, &waiting), 0, "the grant leaked");
    assert_eq!(locks_of_app(&mut outside, app), 0, "the grant leaked");
}

//! Fault tests of call bounds: a waiting call keeps its deadline while its manager's connection is
//! lost and connecting again is slow.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use postgres::Client;

use super::{cluster, eventually, plain};
use crate::testing::TestCluster;
use crate::worker::connect::attempt::fault::SLOW_CONNECT;
use crate::{LockKey, LockManager};

/// Ends every session whose application name starts with `prefix`; how many it ended.
fn terminate_prefix(client: &mut Client, prefix: &str) -> i64 {
    client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE starts_with(application_name, $1)",
            &[&prefix],
        )
        .expect("pg_terminate_backend")
        .get(0)
}

/// Makes connects of `prefix` sessions slow until dropped, even when the test fails.
struct SlowConnects;

impl SlowConnects {
    fn new(prefix: &str, delay: Duration) -> SlowConnects {
        *SLOW_CONNECT.lock() = Some((prefix.to_owned(), delay));
        SlowConnects
    }
}

impl Drop for SlowConnects {
    fn drop(&mut self) {
        *SLOW_CONNECT.lock() = None;
    }
}

/// The lock session is killed just before eight threads call `try_lock_for(200 ms)` on a held
/// key, and every connect of the manager (its reconnect, and any waiting connection it opens)
/// takes 800 ms. Requests that queued before the worker noticed the loss must be answered as
/// offline at once rather than wait for the reconnect, and a waiting connection opened for a
/// caller must give up at the caller's deadline: every call returns by its bound plus a small
/// scheduling allowance.
#[test]
fn a_wait_keeps_its_bound_while_the_lock_session_is_killed_and_connects_are_slow() {
    if cluster().is_none() {
        return;
    }
    let app = "ft-bound";
    let locks = LockManager::builder()
        .application_name(app)
        .heartbeat(Duration::from_millis(250))
        .request_timeout(Duration::from_secs(2))
        .connect(TestCluster::shared().url())
        .expect("connect");
    let key = LockKey::name("fault/bound");
    let mut outside = plain();
    outside
        .execute("SELECT pg_advisory_lock($1)", &[&key.as_id().unwrap()])
        .unwrap();
    let slow = Duration::from_millis(800);
    let _slow = SlowConnects::new(app, slow);
    let bound = Duration::from_millis(200);
    let allowance = Duration::from_millis(150);
    let (mut worst, mut kills) = (Duration::ZERO, 0);
    for _ in 0..3 {
        kills += terminate_prefix(&mut outside, app);
        let start = Arc::new(Barrier::new(8));
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let (locks, start) = (locks.clone(), Arc::clone(&start));
                thread::spawn(move || {
                    start.wait();
                    let began = Instant::now();
                    let result = locks.try_lock_for(key, bound);
                    (began.elapsed(), result)
                })
            })
            .collect();
        for call in calls {
            let (took, result) = call.join().unwrap();
            match result {
                Ok(None) => {}
                Err(e) if e.is_transient() => {}
                other => panic!("a held key under a reconnect: {other:?}"),
            }
            worst = worst.max(took);
        }
        // Back online before the next round: the reconnect takes `slow`.
        assert!(eventually(Duration::from_secs(10), || locks
            .try_lock(LockKey::name("fault/bound-probe"))
            .is_ok()));
    }
    assert!(
        kills >= 3,
        "the lock session was not killed ({kills} kills)"
    );
    assert!(
        worst <= bound + allowance,
        "a call with a {bound:?} bound took {worst:?} while connects took {slow:?}"
    );
}

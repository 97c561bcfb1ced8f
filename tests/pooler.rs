//! Through a real pgbouncer (Debian's package): in transaction mode, with one and with four server
//! connections, two managers must never both believe they hold the same lock, and the pooler is
//! named in the error; in session mode everything works as directly.

mod common;

use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use common::bouncer::{Bouncer, bouncer, cluster};
use distlock::{ErrorKind, LockGuard, LockKey, LockManager};

fn manager(bouncer: &Bouncer, app: &str) -> distlock::Result<LockManager> {
    LockManager::builder()
        .application_name(app)
        .heartbeat(Duration::from_millis(50))
        .connect(&bouncer.url())
}

/// Both managers try every key; afterwards no key may be believed held by both (a guard that is
/// not lost and whose `ensure_held` says yes), and the pooler must have been named.
fn two_managers_through(bouncer: &Bouncer) {
    let keys: Vec<LockKey> = (0..50).map(|i| LockKey::pair(5151, i)).collect();
    let mut named = 0;
    let take = |locks: &distlock::Result<LockManager>| -> Vec<Option<LockGuard>> {
        let Ok(locks) = locks else {
            return Vec::new();
        };
        keys.iter()
            .map(|&k| match locks.try_lock(k) {
                Ok(guard) => guard,
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Pooler, "{e:?}");
                    None
                }
            })
            .collect()
    };
    let a = manager(bouncer, "pooled-a");
    let a_guards = take(&a);
    let b = manager(bouncer, "pooled-b");
    let b_guards = take(&b);
    for result in [&a, &b] {
        if let Err(e) = result {
            assert_eq!(e.kind(), ErrorKind::Pooler, "{e:?}");
            assert!(e.to_string().contains("pooler"), "{e}");
            named += 1;
        }
    }
    // Give heartbeats time to look.
    thread::sleep(Duration::from_millis(500));
    let believes = |guards: &[Option<LockGuard>], i: usize| {
        guards
            .get(i)
            .and_then(Option::as_ref)
            .is_some_and(|g| !g.is_lost() && g.ensure_held().is_ok())
    };
    for (i, key) in keys.iter().enumerate() {
        assert!(
            !(believes(&a_guards, i) && believes(&b_guards, i)),
            "both managers believe they hold {key}"
        );
    }
    for locks in [&a, &b].into_iter().flatten() {
        match locks.try_lock("pooler/after") {
            Err(e) if e.kind() == ErrorKind::Pooler => named += 1,
            _ => {}
        }
    }
    assert!(named > 0, "the pooler was never named");
}

#[test]
fn transaction_pooling_with_one_server_connection_is_detected() {
    let Some(cluster) = cluster() else { return };
    let Some(bouncer) = bouncer(&cluster, "transaction", 1) else {
        return;
    };
    two_managers_through(&bouncer);
}

#[test]
fn transaction_pooling_with_four_server_connections_is_detected() {
    let Some(cluster) = cluster() else { return };
    let Some(bouncer) = bouncer(&cluster, "transaction", 4) else {
        return;
    };
    two_managers_through(&bouncer);
}

#[test]
fn session_pooling_works_like_a_direct_connection() {
    let Some(cluster) = cluster() else { return };
    let Some(bouncer) = bouncer(&cluster, "session", 4) else {
        return;
    };
    let a = manager(&bouncer, "session-a").expect("session pooling is fine");
    let b = manager(&bouncer, "session-b").expect("session pooling is fine");
    let started = Instant::now();
    for i in 0..50 {
        let key = LockKey::pair(5252, i);
        let guard = a.try_lock(key).unwrap().expect("free");
        assert!(b.try_lock(key).unwrap().is_none(), "{key} taken twice");
        guard.ensure_held().unwrap();
        drop(guard);
        assert!(b.try_lock(key).unwrap().is_some());
    }
    thread::sleep(Duration::from_millis(300));
    assert!(a.try_lock("pooler/session-after").unwrap().is_some());
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// A manager through `bouncer` with `heartbeat`.
fn manager_beating(bouncer: &Bouncer, app: &str, heartbeat: Duration) -> LockManager {
    LockManager::builder()
        .application_name(app)
        .heartbeat(heartbeat)
        .connect(&bouncer.url())
        .expect("a session pooler lends the manager a server session of its own")
}

/// Another client of the pooler marks the server sessions it lands in as its own, as a second
/// manager would: `rounds` times on each of `clients` connections at once, so that with several
/// server connections every one the pool opened gets marked.
fn others_mark_the_pool(bouncer: &Bouncer, clients: usize, rounds: usize) {
    thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| {
                let mut other = postgres::Client::connect(&bouncer.url(), postgres::NoTls)
                    .expect("another client through the pooler");
                for _ in 0..rounds {
                    other
                        .batch_execute("SET distlock.session = '1'; SELECT pg_sleep(0.005)")
                        .unwrap();
                }
            });
        }
    });
}

/// A manager connects through a session pooler; then an administrator switches the pool to `mode`
/// and another client shares the manager's server session. The heartbeat must notice: every guard
/// told, every call `Pooler`.
fn shared_after_connect_is_noticed_by_the_heartbeat(mode: &str, pool_size: u32) {
    let Some(cluster) = cluster() else { return };
    let Some(mut bouncer) = bouncer(&cluster, "session", pool_size) else {
        return;
    };
    let app = format!("shared-later-{mode}-{pool_size}");
    let locks = manager_beating(&bouncer, &app, Duration::from_millis(50));
    let guards: Vec<LockGuard> = (0..5)
        .map(|i| {
            locks
                .try_lock(LockKey::pair(5353, i))
                .unwrap()
                .expect("free")
        })
        .collect();
    guards[0].ensure_held().expect("its own session so far");
    bouncer
        .switch_pool_mode(mode)
        .expect("switch the pool mode");
    others_mark_the_pool(&bouncer, pool_size as usize, 20);
    for guard in &guards {
        assert!(
            common::time_to_loss(guard, Duration::from_secs(5)).is_some(),
            "a guard in a shared session was never told ({mode}, pool of {pool_size})"
        );
    }
    let err = locks.try_lock("pooler/after-shared").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pooler, "{err:?}");
    assert!(locks.stats().refused_servers >= 1, "{:?}", locks.stats());
    assert!(err.to_string().contains("pool_mode=session"), "{err}");
}

#[test]
fn a_session_shared_after_connect_in_transaction_mode_is_noticed_by_the_heartbeat() {
    shared_after_connect_is_noticed_by_the_heartbeat("transaction", 1);
}

#[test]
fn a_session_shared_after_connect_with_four_server_connections_is_noticed() {
    shared_after_connect_is_noticed_by_the_heartbeat("transaction", 4);
}

#[test]
fn a_session_shared_after_connect_in_statement_mode_is_noticed_by_the_heartbeat() {
    shared_after_connect_is_noticed_by_the_heartbeat("statement", 1);
}

/// With a heartbeat too slow to have looked, `ensure_held` itself must find that the session is no
/// longer the manager's own, although its lock is still in that server session.
#[test]
fn ensure_held_notices_a_session_shared_since_the_last_heartbeat() {
    let Some(cluster) = cluster() else { return };
    let Some(mut bouncer) = bouncer(&cluster, "session", 1) else {
        return;
    };
    let locks = manager_beating(&bouncer, "shared-ensure", Duration::from_secs(10));
    let guard = locks.try_lock("pooler/ensure").unwrap().expect("free");
    guard.ensure_held().expect("its own session so far");
    bouncer.switch_pool_mode("transaction").unwrap();
    others_mark_the_pool(&bouncer, 1, 1);
    assert!(!guard.is_lost(), "noticed before ensure_held looked");
    let started = Instant::now();
    let err = guard.ensure_held().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pooler, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(guard.is_lost(), "the guard was not told");
}

/// `distlock run` through a transaction pooler nobody else uses runs nothing and exits 64, naming
/// the fix.
#[test]
fn distlock_run_through_a_transaction_pooler_exits_64_and_runs_nothing() {
    let Some(cluster) = cluster() else { return };
    let Some(bouncer) = bouncer(&cluster, "transaction", 4) else {
        return;
    };
    let ran = std::env::temp_dir().join(format!("distlock-pooled-ran-{}", std::process::id()));
    let _ = std::fs::remove_file(&ran);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_distlock"))
        .env("DATABASE_URL", bouncer.url())
        .args(["run", "--key", "pooler/cli", "--", "touch"])
        .arg(&ran)
        .stdin(Stdio::null())
        .output()
        .expect("run distlock");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("pool_mode=session"), "{err}");
    assert!(!ran.exists(), "the command ran behind a transaction pooler");
}

/// Opens `n` server connections in `bouncer`'s pool at once (each client holds a transaction while
/// the others open theirs) and lets every client go, so that the pool keeps `n` idle ones.
fn warm_the_pool(bouncer: &Bouncer, n: usize) {
    let barrier = std::sync::Barrier::new(n);
    thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| {
                let mut other = postgres::Client::connect(&bouncer.url(), postgres::NoTls)
                    .expect("a client through the pooler");
                other.batch_execute("BEGIN; SELECT 1").unwrap();
                barrier.wait();
                other.batch_execute("COMMIT").unwrap();
            });
        }
    });
}

/// A session-mode manager through a transaction pooler nobody else uses — a nightly job in the
/// quiet hour — must be refused when it connects, before it grants anything.
fn a_quiet_transaction_pooler_is_refused_at_connect(pool_size: u32, warm: usize, order: &str) {
    let Some(cluster) = cluster() else { return };
    let settings = [("server_round_robin", order)];
    let Some(bouncer) =
        common::bouncer::bouncer_with(&cluster, "transaction", pool_size, &settings)
    else {
        return;
    };
    warm_the_pool(&bouncer, warm);
    let app = format!("quiet-pool-{pool_size}-{warm}-{order}");
    let started = Instant::now();
    match manager(&bouncer, &app) {
        Ok(locks) => panic!(
            "a session-mode manager was accepted through a quiet transaction pooler (pool \
             {pool_size}, {warm} idle server connections, server_round_robin={order}); it \
             granted: {:?}",
            locks.try_lock("pooler/quiet").map(|g| g.is_some())
        ),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Pooler, "{e:?}");
            assert!(e.to_string().contains("pool_mode=session"), "{e}");
        }
    }
    eprintln!(
        "pool {pool_size}, {warm} idle, round robin {order}: refused in {:?}",
        started.elapsed()
    );
}

#[test]
fn a_quiet_transaction_pooler_of_one_server_connection_is_refused_at_connect() {
    a_quiet_transaction_pooler_is_refused_at_connect(1, 0, "0");
}

#[test]
fn a_quiet_transaction_pooler_of_four_server_connections_is_refused_at_connect() {
    a_quiet_transaction_pooler_is_refused_at_connect(4, 0, "0");
    a_quiet_transaction_pooler_is_refused_at_connect(4, 4, "0");
}

#[test]
fn a_quiet_transaction_pooler_of_twenty_server_connections_is_refused_at_connect() {
    a_quiet_transaction_pooler_is_refused_at_connect(20, 0, "0");
    a_quiet_transaction_pooler_is_refused_at_connect(20, 20, "0");
}

/// The same with pgbouncer handing out its server connections in turn (the oldest idle first),
/// with one, two and many idle ones besides the manager's.
#[test]
fn a_quiet_round_robin_transaction_pooler_is_refused_at_connect() {
    for warm in [0, 2, 3, 20] {
        a_quiet_transaction_pooler_is_refused_at_connect(20, warm, "1");
    }
}

//! Bad input gets a clear, typed error within its bound: never a panic, never a hang.

mod common;

use std::error::Error as _;
use std::net::TcpListener;
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use distlock::{ErrorKind, LockKey, LockManager};

#[test]
fn malformed_parameters_are_a_config_error() {
    for params in [
        "host=localhost port=notaport",
        "postgres://[::1",
        "this is = not ' a connection string",
        "host=localhost sslmode=sometimes",
    ] {
        let err = LockManager::connect(params).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{params:?}: {err:?}");
        assert!(err.to_string().contains("invalid connection parameters"));
        assert!(
            err.source().is_some() || err.to_string().contains("sslmode \"sometimes\""),
            "the parser's reason is kept as the source, or said: {err}"
        );
    }
}

#[test]
fn a_refused_port_is_a_connect_error_at_once() {
    // Bind and close a port so nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = Instant::now();
    let err = LockManager::builder()
        .connect_timeout(Duration::from_secs(5))
        .connect(&format!("host=127.0.0.1 port={port} user=postgres"))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_server_that_never_answers_is_a_timeout_at_the_connect_timeout() {
    // Accepts connections and never says a word: a stalled server or a black-holed network.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _accepting = thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(4) {
            held.push(stream);
        }
        thread::sleep(Duration::from_secs(30));
    });
    let start = Instant::now();
    let err = LockManager::builder()
        .connect_timeout(Duration::from_millis(300))
        .connect(&format!("host=127.0.0.1 port={port} user=postgres"))
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "connect took {took:?}");
}

/// Every message in the error's source chain, as `anyhow`'s `{:#}` shows it.
fn chain(err: &distlock::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn config() -> postgres::Config {
    postgres::Config::from_str(url()).unwrap()
}

#[test]
fn a_wrong_password_is_a_connect_error_with_the_servers_reason() {
    let mut admin = plain();
    admin
        .batch_execute(
            "DO $$ BEGIN \
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'distlock_pw') THEN \
                 CREATE ROLE distlock_pw LOGIN PASSWORD 'right-password'; \
               END IF; END $$",
        )
        .unwrap();
    let mut cfg = config();
    cfg.user("distlock_pw").password("wrong-password");
    let err = LockManager::builder().connect_config(cfg).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err:?}");
    let source = chain(&err);
    assert!(source.contains("password"), "{source}");
    if cluster().is_local() {
        // The throwaway cluster asks every role but the superuser for a password, so the right one
        // must work: the failure above was the password and nothing else.
        let mut cfg = config();
        cfg.user("distlock_pw").password("right-password");
        let locks = LockManager::builder().connect_config(cfg).unwrap();
        assert!(locks.try_lock("bad-input/pw").unwrap().is_some());
    }
}

#[test]
fn a_missing_database_is_a_connect_error() {
    let mut cfg = config();
    cfg.dbname("distlock_no_such_database");
    let err = LockManager::builder().connect_config(cfg).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err:?}");
    let source = chain(&err);
    assert!(source.contains("does not exist"), "{source}");
}

#[test]
fn past_max_locks_is_a_typed_error_and_nothing_leaks() {
    let app = "t-max-locks";
    let locks = LockManager::builder()
        .application_name(app)
        .max_locks(3)
        .connect(url())
        .unwrap();
    let a = locks.try_lock(LockKey::pair(31, 1)).unwrap().unwrap();
    let b = locks
        .try_lock_shared(LockKey::pair(31, 2))
        .unwrap()
        .unwrap();
    let c = locks
        .try_lock_shared(LockKey::pair(31, 2))
        .unwrap()
        .unwrap();
    let err = locks.try_lock(LockKey::pair(31, 3)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooManyLocks);
    let err = locks
        .try_lock_for(LockKey::pair(31, 3), Duration::from_secs(1))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooManyLocks);
    let mut outside = plain();
    assert_eq!(
        locks_of_app(&mut outside, app),
        2,
        "no hold for the refused calls"
    );
    drop(c);
    let d = locks
        .try_lock(LockKey::pair(31, 3))
        .unwrap()
        .expect("room again");
    drop((a, b, d));
    assert_eq!(locks_of_app(&mut outside, app), 0);
}

#[test]
fn a_caller_that_gives_up_never_leaks_its_grant() {
    // A 1 ns request timeout gives up on every reply at once: each grant then arrives with nobody
    // waiting, and the worker must release it.
    let app = "t-abandoned";
    let locks = LockManager::builder()
        .application_name(app)
        .request_timeout(Duration::from_nanos(1))
        .connect(url())
        .unwrap();
    let key = LockKey::name("bad-input/abandoned");
    let mut timeouts = 0;
    for _ in 0..20 {
        match locks.try_lock(key) {
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Timeout, "{e:?}");
                timeouts += 1;
            }
            Ok(guard) => drop(guard),
        }
    }
    assert!(timeouts > 0);
    let mut outside = plain();
    assert!(
        eventually(Duration::from_secs(5), || locks_of_app(&mut outside, app)
            == 0),
        "an abandoned grant was left held"
    );
    assert!(plain_try_lock(&mut outside, key));
    assert!(plain_unlock(&mut outside, key));
}

/// A `Builder` setter that takes a duration.
type Setter = fn(distlock::Builder, Duration) -> distlock::Builder;

/// The durations every setting and argument must survive.
const EXTREMES: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_nanos(1),
    Duration::from_secs(u64::MAX),
    Duration::MAX,
];

#[test]
fn unusable_host_lists_are_config_errors_before_any_connect() {
    for params in [
        "",
        "  ",
        "host=a,b,c port=5432,5433 user=postgres",
        "host=a,b hostaddr=127.0.0.1 user=postgres",
    ] {
        let started = std::time::Instant::now();
        let err = LockManager::connect(params).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{params:?}: {err:?}");
        assert!(started.elapsed() < Duration::from_secs(1), "{params:?}");
    }
    let err = LockManager::connect("host=a,b,c port=1,2 user=x").unwrap_err();
    assert_eq!(
        err.to_string(),
        "3 hosts but 2 ports in the connection parameters (give one port for all, or one per host)"
    );
}

#[test]
fn every_builder_duration_saturates_or_is_a_config_error() {
    let key = LockKey::name("bad-input/builder-durations");
    let mut outside = plain();
    for d in EXTREMES {
        let settings: [(&str, Setter); 4] = [
            ("connect_timeout", distlock::Builder::connect_timeout),
            ("request_timeout", distlock::Builder::request_timeout),
            ("heartbeat", distlock::Builder::heartbeat),
            ("max_retry_interval", distlock::Builder::max_retry_interval),
        ];
        for (name, set) in settings {
            let app = format!("t-dur-{name}");
            let result = set(LockManager::builder().application_name(&app), d).connect(url());
            let case = format!("{name}({d:?})");
            match (name, d) {
                // A zero bound can never be met: say so rather than fail every call.
                ("connect_timeout" | "request_timeout" | "heartbeat", Duration::ZERO) => {
                    let err = result.expect_err(&case);
                    assert_eq!(err.kind(), ErrorKind::Config, "{case}: {err:?}");
                    assert!(err.to_string().contains(name), "{case}: {err}");
                }
                // 1 ns to connect: nothing connects that fast, and it is a timeout.
                ("connect_timeout", d) if d == Duration::from_nanos(1) => {
                    let err = result.expect_err(&case);
                    assert_eq!(err.kind(), ErrorKind::Timeout, "{case}: {err:?}");
                }
                // 1 ns per request: connected, and every call times out; nothing is left held.
                ("request_timeout", d) if d == Duration::from_nanos(1) => {
                    let locks = result.expect(&case);
                    let err = locks.try_lock(key).expect_err(&case);
                    assert_eq!(err.kind(), ErrorKind::Timeout, "{case}: {err:?}");
                    assert!(eventually(Duration::from_secs(5), || locks_of_app(
                        &mut outside,
                        &app
                    ) == 0));
                }
                // Everything else works; the huge ones mean "no bound".
                _ => {
                    let locks = result.expect(&case);
                    let guard = locks.try_lock(key).expect(&case).expect(&case);
                    assert!(
                        locks
                            .try_lock_for(key, Duration::from_millis(20))
                            .expect(&case)
                            .is_none()
                    );
                    guard.unlock().expect(&case);
                }
            }
        }
    }
}

#[test]
fn try_lock_for_takes_any_duration() {
    let locks = manager("t-dur-wait");
    let key = LockKey::name("bad-input/wait-durations");
    for d in EXTREMES {
        let guard = locks.try_lock_for(key, d).unwrap().expect("free");
        drop(guard);
        let guard = locks.try_lock_shared_for(key, d).unwrap().expect("free");
        drop(guard);
    }
    let mut outside = plain();
    assert!(plain_try_lock(&mut outside, key));
    for d in [Duration::ZERO, Duration::from_nanos(1)] {
        let started = std::time::Instant::now();
        assert!(locks.try_lock_for(key, d).unwrap().is_none());
        assert!(locks.try_lock_shared_for(key, d).unwrap().is_none());
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    // The longest waits last until the holder leaves.
    for d in [Duration::from_secs(u64::MAX), Duration::MAX] {
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            assert!(plain_unlock(&mut outside, key));
            outside
        });
        let guard = locks
            .try_lock_for(key, d)
            .unwrap()
            .expect("acquired once released");
        outside = release.join().unwrap();
        drop(guard);
        assert!(plain_try_lock(&mut outside, key));
    }
    assert!(plain_unlock(&mut outside, key));
}

#[test]
fn a_huge_retry_cap_survives_many_wake_ups() {
    // Each release by another thread of the manager wakes the waiter and draws the next pause,
    // which doubles: past about 60 of them a doubling overflows unless it saturates.
    let locks = LockManager::builder()
        .application_name("t-dur-retry-cap")
        .max_retry_interval(Duration::MAX)
        .connect(url())
        .unwrap();
    let key = LockKey::name("bad-input/retry-cap");
    let mut outside = plain();
    assert!(plain_try_lock(&mut outside, key));
    let churn = {
        let locks = locks.clone();
        std::thread::spawn(move || {
            for i in 0..300 {
                drop(locks.try_lock(LockKey::pair(77, i)).unwrap());
            }
        })
    };
    assert!(
        locks
            .try_lock_for(key, Duration::from_secs(2))
            .unwrap()
            .is_none()
    );
    churn.join().unwrap();
    assert!(plain_unlock(&mut outside, key));
}

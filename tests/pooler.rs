//! Through a real pgbouncer (Debian's package): in transaction mode, with one and with four server
//! connections, two managers must never both believe they hold the same lock, and the pooler is
//! named in the error; in session mode everything works as directly.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::eventually;
use distlock::testing::TestCluster;
use distlock::{ErrorKind, LockGuard, LockKey, LockManager};

/// A pgbouncer in front of `cluster`, stopped when dropped.
struct Bouncer {
    child: Child,
    port: u16,
    _dir: PathBuf,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bouncer(cluster: &TestCluster, mode: &str, pool_size: u32) -> Option<Bouncer> {
    let Some(exe) = distlock::testing::find_program("pgbouncer") else {
        distlock::testing::skip(
            "pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)",
        );
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir =
        std::env::temp_dir().join(format!("distlock-pgbouncer-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n\
             postgres = host=127.0.0.1 port={} dbname=postgres user=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = any\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 100\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {}\n",
            cluster.port().unwrap(),
            dir.join("pgbouncer.log").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&ini, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = Command::new(exe);
    // pgbouncer refuses to run as root.
    let root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if root.unwrap_or(false) {
        cmd.args(["-u", "postgres"]);
    }
    let child = cmd
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgbouncer");
    let bouncer = Bouncer {
        child,
        port,
        _dir: dir,
    };
    let url = bouncer.url();
    assert!(
        eventually(Duration::from_secs(10), || postgres::Client::connect(
            &url,
            postgres::NoTls
        )
        .is_ok()),
        "pgbouncer did not come up"
    );
    Some(bouncer)
}

impl Bouncer {
    fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
            self.port
        )
    }
}

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

fn cluster() -> Option<TestCluster> {
    if distlock::testing::database_url().is_some() {
        distlock::testing::skip(
            "DATABASE_URL is set, and these tests put a pooler in front of a server of their own",
        );
        return None;
    }
    Some(TestCluster::start().expect("a cluster"))
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
        .expect("alone on the pool, the manager's statements keep to one server session")
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

/// A manager alone on a pool connects (its statements keep to one server session); then another
/// client shares that session. The heartbeat must notice: every guard told, every call `Pooler`.
fn shared_after_connect_is_noticed_by_the_heartbeat(mode: &str, pool_size: u32) {
    let Some(cluster) = cluster() else { return };
    let Some(bouncer) = bouncer(&cluster, mode, pool_size) else {
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
    others_mark_the_pool(&bouncer, pool_size as usize, 20);
    for guard in &guards {
        assert!(
            common::time_to_loss(guard, Duration::from_secs(5)).is_some(),
            "a guard in a shared session was never told ({mode}, pool of {pool_size})"
        );
    }
    let err = locks.try_lock("pooler/after-shared").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pooler, "{err:?}");
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
    let Some(bouncer) = bouncer(&cluster, "transaction", 1) else {
        return;
    };
    let locks = manager_beating(&bouncer, "shared-ensure", Duration::from_secs(10));
    let guard = locks.try_lock("pooler/ensure").unwrap().expect("free");
    guard.ensure_held().expect("its own session so far");
    others_mark_the_pool(&bouncer, 1, 1);
    assert!(!guard.is_lost(), "noticed before ensure_held looked");
    let started = Instant::now();
    let err = guard.ensure_held().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pooler, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(guard.is_lost(), "the guard was not told");
}

/// `distlock run` through a transaction pooler runs nothing and exits 64, naming the fix.
#[test]
fn distlock_run_through_a_transaction_pooler_exits_64_and_runs_nothing() {
    let Some(cluster) = cluster() else { return };
    let Some(bouncer) = bouncer(&cluster, "transaction", 1) else {
        return;
    };
    // A second client on the one server connection first, so that the session is already marked.
    let first = manager_beating(&bouncer, "pooled-cli-first", Duration::from_secs(10));
    let _held = first.try_lock("pooler/cli-first").unwrap();
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

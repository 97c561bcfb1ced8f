//! Helpers shared by the integration tests: the one cluster of this test binary, plain connections
//! and `pg_locks` queries that see locks from outside the library. The sessions "of an app" are a
//! manager's: its lock session (named `app`) and its waiting connections (`app (waiting
//! connection)`, and `app (waiting: <key>)` while one waits).
#![allow(dead_code)]

pub mod bouncer;
pub mod netns;

use std::time::{Duration, Instant};

use distlock::testing::TestCluster;
use distlock::{LockKey, LockManager};
use postgres::{Client, NoTls};

pub fn cluster() -> &'static TestCluster {
    TestCluster::shared()
}

pub fn url() -> &'static str {
    cluster().url()
}

/// A manager whose connection carries `app` as its application name.
pub fn manager(app: &str) -> LockManager {
    LockManager::builder()
        .application_name(app)
        .connect(url())
        .expect("connect")
}

/// A plain connection, outside the library.
pub fn plain() -> Client {
    Client::connect(url(), NoTls).expect("plain connect")
}

/// The row count of a simple query's first statement, from its `CommandComplete` message (as the
/// library reads a lock statement's outcome).
pub fn rows_returned(messages: &[postgres::SimpleQueryMessage]) -> u64 {
    messages
        .iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

/// Granted holds of `key` in `pg_locks`: `(application_name, mode)` per holding session.
pub fn holders(client: &mut Client, key: LockKey) -> Vec<(String, String)> {
    let (classid, objid, objsubid) = key.pg_locks_tag();
    client
        .query(
            "SELECT coalesce(a.application_name, ''), l.mode FROM pg_locks l \
             LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.classid::int8 = $1 \
               AND l.objid::int8 = $2 AND l.objsubid = $3 ORDER BY 1, 2",
            &[&i64::from(classid), &i64::from(objid), &objsubid],
        )
        .expect("pg_locks")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Advisory locks held by sessions whose application name is `app`.
pub fn locks_of_app(client: &mut Client, app: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND (a.application_name = $1 OR starts_with(a.application_name, $1 || ' (waiting'))",
            &[&app],
        )
        .expect("count")
        .get(0)
}

/// Waits in the server's lock queue of sessions whose application name starts with `app` (a
/// manager's lock session, waiting connections and lock transactions alike).
pub fn queued(client: &mut Client, app: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name LIKE $1 || '%'",
            &[&app],
        )
        .expect("pg_locks")
        .get(0)
}

/// Sessions with application name `app`.
pub fn sessions_of_app(client: &mut Client, app: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE (application_name = $1 OR starts_with(application_name, $1 || ' (waiting'))",
            &[&app],
        )
        .expect("count")
        .get(0)
}

/// `SELECT pg_try_advisory_lock(..)` from a plain connection.
pub fn plain_try_lock(client: &mut Client, key: LockKey) -> bool {
    match (key.as_id(), key.as_pair()) {
        (Some(k), _) => client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&k])
            .unwrap()
            .get(0),
        (_, Some((a, b))) => client
            .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&a, &b])
            .unwrap()
            .get(0),
        _ => unreachable!(),
    }
}

pub fn plain_unlock(client: &mut Client, key: LockKey) -> bool {
    match (key.as_id(), key.as_pair()) {
        (Some(k), _) => client
            .query_one("SELECT pg_advisory_unlock($1)", &[&k])
            .unwrap()
            .get(0),
        (_, Some((a, b))) => client
            .query_one("SELECT pg_advisory_unlock($1, $2)", &[&a, &b])
            .unwrap()
            .get(0),
        _ => unreachable!(),
    }
}

/// Polls `f` until it is true or `limit` passes; returns whether it became true.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Backend pids of the sessions whose application name is `app`.
pub fn pids_of_app(client: &mut Client, app: &str) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE (application_name = $1 OR starts_with(application_name, $1 || ' (waiting'))",
            &[&app],
        )
        .expect("pids")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Ends every session whose application name is `app`; returns how many.
pub fn kill_app(client: &mut Client, app: &str) -> i64 {
    client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE (application_name = $1 OR starts_with(application_name, $1 || ' (waiting'))",
            &[&app],
        )
        .expect("terminate")
        .get(0)
}

/// Waits until `guard` reports its lock lost; returns how long that took, or `None` after `limit`.
pub fn time_to_loss(guard: &distlock::LockGuard, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    match guard.lost().recv_timeout(limit) {
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Some(start.elapsed()),
        _ => None,
    }
}

/// Sends `signal` (`"STOP"`, `"CONT"`) to a process, as `kill -SIGNAL pid`.
pub fn signal(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Resumes a stopped backend when dropped, so that a failing test never leaves it stopped (a stopped
/// backend would hold its locks, and the cluster's shutdown, forever).
pub struct Resume(pub i32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Nanoseconds since the epoch, as `date +%s%N` prints them.
pub fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The server's `server_version_num`.
pub fn version_num(client: &mut Client) -> i32 {
    client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .expect("server_version_num")
        .get(0)
}

/// Sets the cluster's `transaction_timeout` to `value` where the server has it (PostgreSQL 17 and
/// later); returns whether it did.
pub fn set_transaction_timeout(client: &mut Client, value: &str) -> bool {
    if version_num(client) < 170_000 {
        return false;
    }
    client
        .batch_execute(&format!("ALTER SYSTEM SET transaction_timeout = '{value}'"))
        .expect("ALTER SYSTEM");
    client
        .batch_execute("SELECT pg_reload_conf()")
        .expect("reload");
    true
}

/// Stops a pgpool-II started with `-n`: SIGINT (its fast shutdown, which also ends the children
/// it forked), then SIGKILL if it has not exited within 10 s. SIGKILL alone would leave its
/// children running.
pub fn stop_pgpool(child: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status();
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

//! Fault tests that need to stop a thread at an exact point inside the library: a caller between
//! queueing its request and receiving the reply, a worker about to end a lost backend. The hooks
//! that do it ([`crate::protocol::link::Site`]) exist only in test builds. Everything else is real: a real
//! server, real backends stopped with SIGSTOP and killed with `pg_terminate_backend`, and the
//! outcome checked from outside through a plain connection and `pg_locks`.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use postgres::{Client, NoTls};

use crate::protocol::link::Site;
use crate::testing::TestCluster;
use crate::{ErrorKind, LockKey, LockManager};

fn cluster() -> Option<&'static TestCluster> {
    let cluster = TestCluster::shared();
    if cluster.is_local() {
        Some(cluster)
    } else {
        // Stopping backends with signals needs the server on this machine, started by this process.
        eprintln!(
            "skipped: the server comes from DATABASE_URL, and this test signals its backends"
        );
        None
    }
}

fn manager(app: &str, request_timeout: Duration, heartbeat: Duration) -> LockManager {
    LockManager::builder()
        .application_name(app)
        .request_timeout(request_timeout)
        .heartbeat(heartbeat)
        .connect(TestCluster::shared().url())
        .expect("connect")
}

fn plain() -> Client {
    Client::connect(TestCluster::shared().url(), NoTls).expect("plain connect")
}

/// Advisory locks held (granted) by sessions whose application name is `app`.
fn locks_of_app(client: &mut Client, app: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1",
            &[&app],
        )
        .expect("pg_locks")
        .get(0)
}

/// True when a session named `app` holds `key` (granted), as `pg_locks` shows it.
fn app_holds(client: &mut Client, app: &str, key: LockKey) -> bool {
    let (classid, objid, objsubid) = key.pg_locks_tag();
    client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1 \
               AND l.classid::int8 = $2 AND l.objid::int8 = $3 AND l.objsubid = $4",
            &[&app, &i64::from(classid), &i64::from(objid), &objsubid],
        )
        .expect("pg_locks")
        .get::<_, i64>(0)
        > 0
}

fn pids_of_app(client: &mut Client, app: &str) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .expect("pids")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn alive(client: &mut Client, pid: i32) -> bool {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .expect("pg_stat_activity")
        .get::<_, i64>(0)
        > 0
}

fn signal(pid: i32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{signal} {pid} failed");
}

/// Resumes stopped backends when dropped, so that a failing test never leaves one stopped.
#[derive(Default)]
struct Resume(Mutex<Vec<i32>>);

impl Resume {
    fn stop(&self, pid: i32) {
        self.0.lock().push(pid);
        signal(pid, "STOP");
    }

    fn resume_all(&self) {
        for pid in self.0.lock().drain(..) {
            signal(pid, "CONT");
        }
    }
}

impl Drop for Resume {
    fn drop(&mut self) {
        self.resume_all();
    }
}

fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Pauses one thread's first call between queueing its request and receiving the reply: `queued`
/// fires when it gets there, and it goes on when `go` is sent to (or dropped).
struct PausedCaller {
    queued: Receiver<()>,
    go: Sender<()>,
}

fn pause_caller(locks: &LockManager, thread: ThreadId) -> PausedCaller {
    let (queued_tx, queued) = crossbeam_channel::bounded(1);
    let (go, go_rx) = crossbeam_channel::bounded::<()>(1);
    let fired = AtomicBool::new(false);
    locks.shared().link_arc().set_hook(Arc::new(move |site| {
        if site == Site::BeforeReceive
            && thread::current().id() == thread
            && !fired.swap(true, Ordering::SeqCst)
        {
            let _ = queued_tx.send(());
            let _ = go_rx.recv_timeout(Duration::from_secs(30));
        }
    }));
    PausedCaller { queued, go }
}

impl PausedCaller {
    /// Lets the paused caller go on and waits for its call to return, which must be at once (its
    /// deadline has passed). Returns the call's outcome.
    fn resume(
        self,
        caller: thread::JoinHandle<(crate::Result<Option<crate::LockGuard>>, Instant)>,
    ) -> crate::Result<Option<crate::LockGuard>> {
        let resumed = Instant::now();
        self.go.send(()).unwrap();
        let (result, returned) = caller.join().unwrap();
        let late_by = returned.duration_since(resumed);
        assert!(
            late_by < Duration::from_millis(200),
            "returned {late_by:?} after resuming"
        );
        result
    }
}

/// Starts a thread that takes `key` once; it is paused before its receive. Returns the pause, and
/// the thread, which yields the call's outcome and the time from its resumption to its return.
#[allow(clippy::type_complexity)]
fn paused_try_lock(
    locks: &LockManager,
    key: LockKey,
) -> (
    PausedCaller,
    thread::JoinHandle<(crate::Result<Option<crate::LockGuard>>, Instant)>,
) {
    let (tid_tx, tid_rx) = crossbeam_channel::bounded(1);
    let (armed_tx, armed_rx) = crossbeam_channel::bounded::<()>(1);
    let caller = locks.clone();
    let handle = thread::spawn(move || {
        tid_tx.send(thread::current().id()).unwrap();
        armed_rx.recv().unwrap();
        let result = caller.try_lock(key);
        (result, Instant::now())
    });
    let pause = pause_caller(locks, tid_rx.recv().unwrap());
    armed_tx.send(()).unwrap();
    pause
        .queued
        .recv_timeout(Duration::from_secs(10))
        .expect("the caller queued its request");
    (pause, handle)
}

#[test]
fn a_claimed_reply_whose_caller_gave_up_is_released_at_once_and_never_delivered_late() {
    let Some(_) = cluster() else { return };
    let app = "f-late-reply";
    let timeout = Duration::from_millis(300);
    let locks = manager(app, timeout, Duration::from_secs(10));
    let mut outside = plain();
    let key = LockKey::name("fault/late-reply");

    let (pause, caller) = paused_try_lock(&locks, key);
    // The worker ran the statement and claimed the reply for a caller that is not receiving.
    assert!(
        eventually(Duration::from_secs(5), || app_holds(&mut outside, app, key)),
        "the grant reached the server"
    );
    // Resume the caller well past its deadline, and past the second for which a worker might
    // have been tempted to wait for it.
    thread::sleep(Duration::from_millis(1300));
    match pause.resume(caller) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Timeout, "{e:?}"),
        Ok(got) => panic!("a reply reached a caller past its deadline: {got:?}"),
    }
    // Nobody owns the grant: the worker gives it back at once.
    assert!(
        eventually(Duration::from_secs(1), || locks_of_app(&mut outside, app)
            == 0),
        "a grant whose caller gave up was left held"
    );
    // Every later call gets its own reply: a guard for its own key, held on the server.
    for i in 0..40 {
        let k = LockKey::pair(8101, i);
        let guard = locks.try_lock(k).unwrap().expect("free key");
        assert_eq!(guard.key(), k);
        assert!(!guard.is_lost());
        assert!(app_holds(&mut outside, app, k));
        drop(guard);
    }
    assert!(
        locks.try_lock(key).unwrap().is_some(),
        "the key is free again"
    );
    assert_eq!(locks_of_app(&mut outside, app), 0);
}

#[test]
fn a_paused_caller_behind_a_stalled_statement_gets_a_timeout_on_time_and_no_stale_reply_reaches_anyone()
 {
    let Some(_) = cluster() else { return };
    let app = "f-stalled-late-reply";
    let timeout = Duration::from_millis(500);
    let locks = manager(app, timeout, Duration::from_secs(10));
    let mut outside = plain();
    let resume = Resume::default();
    let k1 = LockKey::name("fault/stalled-late/1");
    let k2 = LockKey::name("fault/stalled-late/2");

    let (pause, caller) = paused_try_lock(&locks, k1);
    assert!(eventually(Duration::from_secs(5), || app_holds(
        &mut outside,
        app,
        k1
    )));
    // Freeze the backend; the next statement stalls inside the worker.
    let pids = pids_of_app(&mut outside, app);
    assert_eq!(pids.len(), 1);
    resume.stop(pids[0]);
    let stalled = {
        let locks = locks.clone();
        thread::spawn(move || {
            let started = Instant::now();
            let result = locks.try_lock(k2).map(|g| g.is_some());
            (result, started.elapsed())
        })
    };
    // Resume the first caller after its deadline, while the worker is still stuck.
    thread::sleep(Duration::from_millis(700));
    let e = pause
        .resume(caller)
        .expect_err("no reply can arrive from a stalled worker");
    assert_eq!(
        e.kind(),
        ErrorKind::Timeout,
        "a live manager never says Shutdown: {e:?}"
    );
    let (result, took) = stalled.join().unwrap();
    assert_eq!(result.unwrap_err().kind(), ErrorKind::Timeout);
    assert!(took < timeout + Duration::from_millis(300), "{took:?}");

    // The monitor replaces the stalled connection; the manager serves again.
    assert!(eventually(Duration::from_secs(10), || locks
        .try_lock(LockKey::pair(8102, 0))
        .is_ok_and(|g| g.is_some())));
    // Wake the frozen backend: it ends (the new connection asked it to), and the stalled worker
    // returns with the reply it once claimed for the first caller. Whoever calls now must get
    // only its own reply.
    resume.resume_all();
    let until = Instant::now() + Duration::from_millis(1500);
    let mut calls = 0;
    while Instant::now() < until {
        let k = LockKey::pair(8102, 1 + calls % 16);
        match locks.try_lock(k) {
            Ok(Some(guard)) => {
                assert_eq!(guard.key(), k);
                assert!(!guard.is_lost(), "a stale reply reached the next caller");
                assert!(
                    app_holds(&mut outside, app, k),
                    "a guard for a lock nobody holds"
                );
                drop(guard);
            }
            Ok(None) => panic!("{k} is free"),
            Err(e) => assert!(e.is_transient(), "{e:?}"),
        }
        calls += 1;
    }
    assert!(calls > 10, "only {calls} calls");
    // Nothing is held that no guard owns.
    assert!(
        eventually(Duration::from_secs(5), || locks_of_app(&mut outside, app)
            == 0),
        "an unowned lock is left in pg_locks"
    );
    assert!(!pids.iter().any(|&pid| alive(&mut outside, pid)));
}

#[test]
fn the_statement_that_ends_lost_backends_is_watched_like_every_other() {
    let Some(_) = cluster() else { return };
    let app = "f-watched-suspects";
    let locks = manager(app, Duration::from_millis(300), Duration::from_millis(50));
    let mut outside = plain();
    let resume = Arc::new(Resume::default());
    let first = pids_of_app(&mut outside, app);
    assert_eq!(first.len(), 1);
    // When the new connection is about to end the lost backend, freeze the new connection's own
    // backend: that statement stalls.
    {
        let link = Arc::clone(locks.shared().link_arc());
        let resume = Arc::clone(&resume);
        let fired = AtomicBool::new(false);
        locks.shared().link_arc().set_hook(Arc::new(move |site| {
            if site == Site::BeforeEndSuspects && !fired.swap(true, Ordering::SeqCst) {
                let backend = link.generations.backend().expect("online");
                resume.stop(backend.pid);
            }
        }));
    }
    outside
        .execute("SELECT pg_terminate_backend($1)", &[&first[0]])
        .unwrap();
    // The manager gets past the stalled statement by itself and serves again.
    let started = Instant::now();
    let key = LockKey::name("fault/watched-suspects");
    assert!(
        eventually(Duration::from_secs(10), || locks
            .try_lock(key)
            .is_ok_and(|g| g.is_some())),
        "the manager stayed wedged behind the statement that ends lost backends"
    );
    eprintln!("served again {:?} after the kill", started.elapsed());
    let frozen: Vec<i32> = resume.0.lock().clone();
    assert_eq!(frozen.len(), 1, "the hook ran");
    resume.resume_all();
    assert!(
        eventually(Duration::from_secs(10), || !alive(&mut outside, frozen[0])),
        "the frozen backend was ended when it woke"
    );
}

#[test]
fn a_loss_is_announced_before_late_replies_are_settled() {
    let Some(_) = cluster() else { return };
    let app = "f-loss-first";
    let locks = manager(app, Duration::from_secs(3), Duration::from_millis(20));
    let mut outside = plain();
    let held = locks
        .try_lock(LockKey::name("fault/loss-first/held"))
        .unwrap()
        .unwrap();
    let key = LockKey::name("fault/loss-first/late");
    let (pause, caller) = paused_try_lock(&locks, key);
    assert!(eventually(Duration::from_secs(5), || app_holds(
        &mut outside,
        app,
        key
    )));
    // A reply is owed to a caller that is not receiving; now the connection dies.
    let pids = pids_of_app(&mut outside, app);
    outside
        .execute("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .unwrap();
    let killed = Instant::now();
    let announced = match held.lost().recv_timeout(Duration::from_secs(5)) {
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => killed.elapsed(),
        other => panic!("the loss was not announced: {other:?}"),
    };
    assert!(
        announced < Duration::from_millis(500),
        "loss announced {announced:?} after the kill: behind a late reply"
    );
    pause.go.send(()).unwrap();
    let (result, _) = caller.join().unwrap();
    match result {
        // The grant was made on the lost connection: its guard says so.
        Ok(Some(guard)) => assert!(guard.is_lost()),
        Ok(None) => panic!("the key was free"),
        Err(e) => assert!(e.is_transient(), "{e:?}"),
    }
}

mod bounds;
mod measured;
mod queue_wait;

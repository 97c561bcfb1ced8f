//! Lost locks: killed and stalled backends, reconnects, and many threads through repeated kills.
//! These hurt only their own sessions, so they share the binary's cluster with each other.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use distlock::crossbeam_channel::Receiver;
use distlock::{ErrorKind, LockKey, LockManager};
use parking_lot::Mutex;

/// What the loss-detection assertions allow beyond the promised heartbeat: a round trip, the
/// monitor's tick and the scheduling of a loaded two-core machine (the measured maximum at a 100 ms
/// heartbeat is 90 ms; see the README's Performance section).
const ROUND_TRIP_ALLOWANCE: Duration = Duration::from_millis(150);

fn manager_with(app: &str, heartbeat: Duration, request_timeout: Duration) -> LockManager {
    LockManager::builder()
        .application_name(app)
        .heartbeat(heartbeat)
        .request_timeout(request_timeout)
        .connect(url())
        .expect("connect")
}

#[test]
fn a_killed_backend_is_reported_lost_and_the_manager_recovers() {
    let app = "f-kill";
    let heartbeat = Duration::from_millis(100);
    let locks = manager_with(app, heartbeat, Duration::from_secs(5));
    let key = LockKey::name("failures/kill");
    let shared_key = LockKey::name("failures/kill-shared");
    let guard = locks.try_lock(key).unwrap().expect("free");
    let old_shared = locks.try_lock_shared(shared_key).unwrap().expect("free");
    guard.ensure_held().unwrap();
    assert!(!guard.is_lost());

    let mut outside = plain();
    assert_eq!(kill_app(&mut outside, app), 1);
    let detected = time_to_loss(&guard, Duration::from_secs(10)).expect("loss signal");
    eprintln!("loss detected {detected:?} after pg_terminate_backend (heartbeat {heartbeat:?})");
    assert!(
        detected < heartbeat + ROUND_TRIP_ALLOWANCE,
        "loss noticed only after {detected:?}, past one heartbeat and a round trip"
    );
    assert!(guard.is_lost() && old_shared.is_lost());
    assert_eq!(guard.ensure_held().unwrap_err().kind(), ErrorKind::LockLost);

    // The server released it with the session: another process takes it.
    let other = manager("f-kill-other");
    let taken = other
        .try_lock(key)
        .unwrap()
        .expect("released by the server");

    // The manager reconnects by itself and grants again.
    assert!(
        eventually(Duration::from_secs(10), || {
            matches!(locks.try_lock("failures/kill-after"), Ok(Some(_)))
        }),
        "the manager did not come back"
    );
    let new_shared = locks
        .try_lock_shared(shared_key)
        .unwrap()
        .expect("shared again");
    new_shared.ensure_held().unwrap();

    // Stale guards release nothing of the new sessions: neither the other manager's exclusive
    // lock, nor this manager's new shared hold of the same key.
    assert_eq!(guard.unlock().unwrap_err().kind(), ErrorKind::LockLost);
    drop(old_shared);
    assert!(!plain_try_lock(&mut outside, key));
    assert_eq!(
        holders(&mut outside, key),
        vec![("f-kill-other".into(), "ExclusiveLock".into())]
    );
    assert_eq!(
        holders(&mut outside, shared_key),
        vec![(app.into(), "ShareLock".into())]
    );
    new_shared.ensure_held().unwrap();
    drop((taken, new_shared));
    assert_eq!(locks_of_app(&mut outside, app), 0);

    // A few more kills, for the detection figure in the README.
    let mut samples = vec![detected];
    for i in 0..6 {
        let guard = match locks.try_lock_for(LockKey::pair(4040, i), Duration::from_secs(10)) {
            Ok(Some(g)) => g,
            other => panic!("manager did not come back: {other:?}"),
        };
        // Kill at a random point of the heartbeat cycle (an idle waiting connection of the
        // manager, opened by a wait while it reconnected, may go with it).
        thread::sleep(Duration::from_millis(17 * (i as u64 + 1)));
        assert!(kill_app(&mut outside, app) >= 1);
        samples.push(time_to_loss(&guard, Duration::from_secs(10)).expect("loss signal"));
    }
    samples.sort();
    eprintln!(
        "loss detection after pg_terminate_backend, heartbeat {heartbeat:?}, {} kills: \
         min {:?}, median {:?}, max {:?}",
        samples.len(),
        samples[0],
        samples[samples.len() / 2],
        samples[samples.len() - 1]
    );
    assert!(
        samples[samples.len() - 1] < heartbeat + ROUND_TRIP_ALLOWANCE,
        "loss noticed only after {:?}, past one heartbeat and a round trip",
        samples[samples.len() - 1]
    );
}

#[test]
fn a_stalled_backend_times_out_callers_is_reported_lost_and_cannot_keep_its_locks() {
    let app = "f-stall";
    let request_timeout = Duration::from_millis(500);
    let locks = manager_with(app, Duration::from_millis(100), request_timeout);
    let key = LockKey::name("failures/stall");
    let guard = locks.try_lock(key).unwrap().expect("free");
    let mut outside = plain();
    let pids = pids_of_app(&mut outside, app);
    assert_eq!(pids.len(), 1);
    let pid = pids[0];

    signal(pid, "STOP");
    let resume = Resume(pid);
    let start = Instant::now();
    let err = locks.try_lock("failures/stall-2").unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Timeout | ErrorKind::Offline | ErrorKind::ConnectionLost
        ),
        "{err:?}"
    );
    assert!(
        took < request_timeout + Duration::from_millis(300),
        "returned after {took:?}"
    );
    let lost = time_to_loss(&guard, request_timeout + Duration::from_secs(2));
    assert!(
        lost.is_some(),
        "the stalled connection's lock was not reported lost"
    );

    // The manager works again on a new connection while the old backend is still stopped.
    assert!(
        eventually(Duration::from_secs(10), || {
            matches!(locks.try_lock("failures/stall-3"), Ok(Some(_)))
        }),
        "the manager stayed wedged behind the stalled connection"
    );
    // The stopped backend still holds the key (nothing can release a frozen process's locks)...
    assert!(!plain_try_lock(&mut outside, key));
    // ...but once it resumes it must not keep it: the manager has already asked it to end.
    drop(resume);
    assert!(
        eventually(Duration::from_secs(10), || pids_of_app(&mut outside, app)
            == vec![]
            || !pids_of_app(&mut outside, app).contains(&pid)),
        "the stalled backend survived"
    );
    assert!(
        plain_try_lock(&mut outside, key),
        "a zombie session kept the lock"
    );
    assert!(plain_unlock(&mut outside, key));
    drop(guard);
    let again = locks.try_lock(key).unwrap().expect("usable again");
    again.ensure_held().unwrap();
}

#[test]
fn many_threads_survive_repeated_kills_and_every_overlap_is_announced() {
    let apps = ["f-storm-a", "f-storm-b"];
    let managers =
        apps.map(|app| manager_with(app, Duration::from_millis(50), Duration::from_secs(2)));
    let keys = [LockKey::name("storm/0"), LockKey::name("storm/1")];
    // The current holder of each key: its loss signal.
    let holders_now: [Mutex<Option<Receiver<()>>>; 2] = Default::default();
    // Overlaps seen: the old holder had not been told yet. Each must be told soon after.
    let unannounced: Mutex<Vec<Receiver<()>>> = Mutex::new(Vec::new());
    let acquisitions = AtomicUsize::new(0);
    let errors = AtomicUsize::new(0);
    let lost_holds = AtomicUsize::new(0);
    let killed = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(4);

    thread::scope(|s| {
        s.spawn(|| {
            let mut outside = plain();
            while Instant::now() < deadline {
                thread::sleep(Duration::from_millis(300));
                for app in apps {
                    killed.fetch_add(kill_app(&mut outside, app) as usize, Ordering::Relaxed);
                }
            }
            stop.store(true, Ordering::SeqCst);
        });
        for t in 0..6 {
            let (locks, keys, holders_now, unannounced, acquisitions, errors, lost_holds, stop) = (
                &managers[t % 2],
                &keys,
                &holders_now,
                &unannounced,
                &acquisitions,
                &errors,
                &lost_holds,
                &stop,
            );
            s.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::SeqCst) {
                    let k = i % 2;
                    i += 1;
                    let started = Instant::now();
                    match locks.try_lock_for(keys[k], Duration::from_millis(500)) {
                        Ok(Some(guard)) => {
                            {
                                let mut slot = holders_now[k].lock();
                                if let Some(previous) = slot.take() {
                                    if !matches!(
                                        previous.try_recv(),
                                        Err(crossbeam_channel::TryRecvError::Disconnected)
                                    ) {
                                        unannounced.lock().push(previous);
                                    }
                                }
                                *slot = Some(guard.lost().clone());
                            }
                            acquisitions.fetch_add(1, Ordering::Relaxed);
                            thread::sleep(Duration::from_millis(20));
                            let mut slot = holders_now[k].lock();
                            if slot.as_ref().is_some_and(|r| r.same_channel(guard.lost())) {
                                *slot = None;
                            }
                            drop(slot);
                            match guard.unlock() {
                                Ok(()) => {}
                                Err(e) if e.kind() == ErrorKind::LockLost => {
                                    lost_holds.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    // The kill ended the connection while this guard held its
                                    // lock, before the loss was announced: a hit all the same.
                                    assert!(e.is_transient(), "{e:?}");
                                    errors.fetch_add(1, Ordering::Relaxed);
                                    lost_holds.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            assert!(e.is_transient() || e.kind() == ErrorKind::LockLost, "{e:?}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // Never longer than the wait plus one request timeout and a margin.
                    assert!(started.elapsed() < Duration::from_secs(4), "a call hung");
                }
            });
        }
    });
    let acquisitions = acquisitions.load(Ordering::Relaxed);
    let lost_holds = lost_holds.load(Ordering::Relaxed);
    assert!(acquisitions > 20, "only {acquisitions} acquisitions");
    assert!(
        killed.load(Ordering::Relaxed) > 0,
        "the storm killed nothing"
    );
    assert!(
        lost_holds > 0,
        "no kill ever hit a holder: the test proved nothing"
    );
    for previous in unannounced.into_inner() {
        assert!(
            matches!(
                previous.recv_timeout(Duration::from_secs(3)),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected)
            ),
            "two holders at once, and the old one was never told"
        );
    }
    // Everything recovers: both managers lock again, and nothing stays held.
    for locks in &managers {
        assert!(eventually(Duration::from_secs(10), || matches!(
            locks.try_lock("storm/after"),
            Ok(Some(_))
        )));
    }
    drop(managers);
    let mut outside = plain();
    for app in apps {
        assert!(eventually(Duration::from_secs(10), || locks_of_app(
            &mut outside,
            app
        ) == 0));
    }
    eprintln!(
        "storm: {acquisitions} acquisitions, {lost_holds} holds lost, {} sessions killed, \
         {} transient errors",
        killed.into_inner(),
        errors.into_inner()
    );
}

#[test]
fn a_waiter_rides_through_a_lost_connection_within_its_deadline() {
    let app = "f-waiter";
    let locks = manager_with(app, Duration::from_millis(50), Duration::from_secs(2));
    let key = LockKey::name("failures/waiter");
    let mut outside = plain();
    assert!(plain_try_lock(&mut outside, key));
    let waiter = {
        let locks = locks.clone();
        thread::spawn(move || locks.try_lock_for(key, Duration::from_secs(20)))
    };
    // The waiter is in the queue (on a waiting connection) before the manager's sessions die.
    assert!(
        eventually(Duration::from_secs(5), || {
            common::queued(&mut outside, app) == 1
        }),
        "the waiter never queued"
    );
    assert!(kill_app(&mut outside, app) >= 1, "nothing was killed");
    // The wait goes on (it rides through the loss) while the lock is still held outside.
    thread::sleep(Duration::from_millis(200));
    assert!(
        !waiter.is_finished(),
        "the wait ended with the lost connection"
    );
    assert!(plain_unlock(&mut outside, key));
    let guard = waiter
        .join()
        .unwrap()
        .unwrap()
        .expect("acquired after the reconnect");
    guard.ensure_held().unwrap();
}

#[test]
fn a_10_ms_heartbeat_works_and_notices_a_kill_quickly() {
    let app = "f-heartbeat-10ms";
    let heartbeat = Duration::from_millis(10);
    let locks = manager_with(app, heartbeat, Duration::from_secs(5));
    let guard = locks
        .try_lock("failures/heartbeat-10ms")
        .unwrap()
        .expect("free");
    // Idle for many heartbeats: the connection stays up and the lock held.
    thread::sleep(Duration::from_millis(300));
    assert!(!guard.is_lost());
    guard.ensure_held().unwrap();
    let mut outside = plain();
    assert_eq!(kill_app(&mut outside, app), 1);
    let detected = time_to_loss(&guard, Duration::from_secs(5)).expect("loss signal");
    assert!(
        detected < heartbeat + ROUND_TRIP_ALLOWANCE,
        "noticed after {detected:?}"
    );
}

#[test]
fn a_lost_guard_keeps_its_key_reserved_in_this_manager_until_it_is_dropped() {
    let app = "f-lost-reserved";
    let locks = manager_with(app, Duration::from_millis(50), Duration::from_secs(5));
    let key = LockKey::name("failures/lost-reserved");
    let guard = locks.try_lock(key).unwrap().expect("free");
    let mut outside = plain();
    assert_eq!(kill_app(&mut outside, app), 1);
    assert!(time_to_loss(&guard, Duration::from_secs(5)).is_some());
    // On the server nobody holds it any more: another session takes it at once.
    assert!(plain_try_lock(&mut outside, key));
    assert!(plain_unlock(&mut outside, key));
    assert!(eventually(Duration::from_secs(10), || matches!(
        locks.try_lock("failures/lost-reserved-other"),
        Ok(Some(_))
    )));
    // In this manager the lost guard still reserves the key: its holder may still be inside its
    // critical section, and no other thread of the process may enter it until the guard is gone.
    assert!(locks.try_lock(key).unwrap().is_none());
    assert!(locks.try_lock_shared(key).unwrap().is_none());
    let waiter = {
        let locks = locks.clone();
        thread::spawn(move || {
            let guard = locks.lock(key).unwrap();
            (Instant::now(), guard.is_lost())
        })
    };
    thread::sleep(Duration::from_millis(300));
    assert!(
        !waiter.is_finished(),
        "a waiter got past a lost guard that was not dropped"
    );
    let dropped = Instant::now();
    assert_eq!(
        guard.unlock().unwrap_err().kind(),
        ErrorKind::LockLost,
        "unlocking a lost guard says so"
    );
    let (acquired, lost) = waiter.join().unwrap();
    assert!(!lost);
    assert!(
        acquired.duration_since(dropped) < Duration::from_millis(500),
        "the waiter was woken by the release"
    );
}

/// `ensure_held` right before an irreversible step, on a lock whose backend is already gone but
/// whose loss no heartbeat has noticed yet (10 s apart): its own round trip must find out.
/// A TCP forwarder to the test cluster whose `cut` ends the server's side of every connection
/// (the backends end, their locks go) while the clients' sides stay open and silent — as a NAT
/// or a proxy that lost its upstream would leave them. A client learns of it only when it next
/// sends something.
struct SilentCut {
    port: u16,
    upstreams: std::sync::Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl SilentCut {
    fn start(server_port: u16) -> SilentCut {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstreams = std::sync::Arc::new(Mutex::new(Vec::new()));
        let kept = upstreams.clone();
        thread::spawn(move || {
            // Bounded: a test makes a handful of connections.
            for client in listener.incoming().take(64).flatten() {
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", server_port)) else {
                    continue;
                };
                kept.lock().push(server.try_clone().unwrap());
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_in, mut c_out) = (server, client);
                // Client to server: once the server's side is gone, the client's is closed too.
                thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = c_in.shutdown(std::net::Shutdown::Both);
                });
                // Server to client: the server's end is not passed on.
                thread::spawn(move || {
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                });
            }
        });
        SilentCut { port, upstreams }
    }

    fn cut(&self) {
        for server in self.upstreams.lock().drain(..) {
            let _ = server.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_session_the_server_ended_is_told_without_waiting_for_the_heartbeat() {
    let app = "f-ended-idle";
    let locks = manager_with(app, Duration::from_secs(10), Duration::from_secs(5));
    let guard = locks
        .try_lock(LockKey::name("failures/ended-idle"))
        .unwrap()
        .expect("free");
    let mut outside = plain();
    assert_eq!(kill_app(&mut outside, app), 1);
    let detected = time_to_loss(&guard, Duration::from_secs(15)).expect("loss signal");
    eprintln!("an idle session the server ended: told after {detected:?} (heartbeat 10 s)");
    assert!(
        detected < Duration::from_millis(500),
        "told only after {detected:?}: the idle worker did not look at its socket"
    );
}

#[test]
fn ensure_held_finds_a_loss_no_heartbeat_has_noticed_yet() {
    let Some(server_port) = cluster().port() else {
        distlock::testing::skip("DATABASE_URL is set; this test forwards to a local cluster");
        return;
    };
    let proxy = SilentCut::start(server_port);
    let app = "f-ensure-unnoticed";
    let locks = LockManager::builder()
        .application_name(app)
        .heartbeat(Duration::from_secs(10))
        .connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            proxy.port
        ))
        .expect("connect through the forwarder");
    let key = LockKey::name("failures/ensure-unnoticed");
    let guard = locks.try_lock(key).unwrap().expect("free");
    guard.ensure_held().unwrap();
    let mut outside = plain();
    proxy.cut();
    assert!(
        eventually(Duration::from_secs(5), || pids_of_app(&mut outside, app)
            .is_empty()),
        "the backend did not end"
    );
    // Gone on the server: another session can take the lock.
    assert!(plain_try_lock(&mut outside, key));
    assert!(!guard.is_lost(), "noticed before ensure_held looked");
    let started = Instant::now();
    let err = guard.ensure_held().unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::LockLost | ErrorKind::ConnectionLost),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not within the request timeout"
    );
    assert!(guard.is_lost(), "the guard was not told");
    assert!(plain_unlock(&mut outside, key));
}

/// A wait in the lock queue whose waiting connection's backend stops answering (SIGSTOP) still
/// ends at its deadline, and does not wait a request timeout more for the server's answer.
#[test]
fn a_wait_whose_waiting_connection_stops_answering_ends_at_its_deadline() {
    let app = "f-stall-wait";
    let request_timeout = Duration::from_secs(3);
    let holder = manager("f-stall-wait-holder");
    let key = LockKey::name("bounds/stopped-wait");
    let guard = holder.try_lock(key).unwrap().expect("free");
    let waiter = manager_with(app, Duration::from_secs(10), request_timeout);
    // A first wait opens the waiting connection.
    assert!(
        waiter
            .try_lock_for(key, Duration::from_millis(50))
            .unwrap()
            .is_none()
    );
    let mut outside = plain();
    let pid: i32 = outside
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 || ' (waiting connection)'",
            &[&app],
        )
        .expect("the waiting connection")
        .get(0);
    signal(pid, "STOP");
    let _resume = Resume(pid);
    let wait = Duration::from_millis(300);
    let started = Instant::now();
    let outcome = waiter.try_lock_for(key, wait);
    let took = started.elapsed();
    eprintln!("a wait on a stopped waiting connection returned after {took:?}: {outcome:?}");
    assert!(!matches!(outcome, Ok(Some(_))), "granted while held");
    // The deadline, the answer's grace (100 ms) and scheduling on a loaded machine; a request
    // timeout (3 s) more without the grace.
    assert!(
        took < wait + Duration::from_millis(900),
        "the wait outlasted its deadline by {:?}",
        took - wait
    );
    drop(guard);
}

/// Every kind of call, made while the lock session's backend is stopped (SIGSTOP: no error, no
/// answer), returns by its documented bound: a single request by the request timeout, a call with
/// a timeout by that timeout (its first try by the request timeout), and the calls that wait
/// without a deadline with their lock once the stalled connection is replaced.
#[test]
fn every_call_returns_by_its_bound_while_the_backend_is_stopped() {
    let app = "f-stall-bounds";
    let request_timeout = Duration::from_millis(500);
    let wait = Duration::from_secs(1);
    // What a bound allows for scheduling on a loaded two-core machine.
    let allowance = Duration::from_millis(300);
    let locks = manager_with(app, Duration::from_secs(10), request_timeout);
    let exclusive = locks.try_lock("bounds/held").unwrap().expect("free");
    let permit = locks
        .try_acquire_permit("bounds/permits", 3)
        .unwrap()
        .expect("a permit");
    let fenced = locks
        .try_lock_fenced("bounds/fenced")
        .unwrap()
        .expect("free");
    let all = locks
        .try_lock_all(["bounds/all-a", "bounds/all-b"])
        .unwrap()
        .expect("free");
    let mut outside = plain();
    let pid: i32 = outside
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .expect("the lock session")
        .get(0);
    signal(pid, "STOP");
    let _resume = Resume(pid);

    type Call = Box<dyn FnOnce() -> String + Send>;
    let single = request_timeout + allowance;
    let timed = wait.max(request_timeout) + allowance;
    let unbounded_but_free = Duration::from_secs(5);
    let calls: Vec<(&str, Duration, Call)> = vec![
        (
            "unlock",
            single,
            Box::new(move || format!("{:?}", exclusive.unlock())),
        ),
        (
            "drop",
            single,
            Box::new(move || {
                drop(permit);
                "dropped".into()
            }),
        ),
        (
            "ensure_held",
            single,
            Box::new(move || format!("{:?}", fenced.ensure_held())),
        ),
        (
            "drop all",
            single,
            Box::new(move || {
                drop(all);
                "dropped".into()
            }),
        ),
        ("holders", single, {
            let locks = locks.clone();
            Box::new(move || format!("{:?}", locks.holders("bounds/held").map(|h| h.len())))
        }),
        ("try_lock", single, {
            let locks = locks.clone();
            Box::new(move || format!("{:?}", locks.try_lock("bounds/try").map(|g| g.is_some())))
        }),
        ("try_lock_all", single, {
            let locks = locks.clone();
            Box::new(move || {
                format!(
                    "{:?}",
                    locks
                        .try_lock_all(["bounds/t1", "bounds/t2"])
                        .map(|g| g.is_some())
                )
            })
        }),
        ("try_acquire_permit", single, {
            let locks = locks.clone();
            Box::new(move || {
                format!(
                    "{:?}",
                    locks
                        .try_acquire_permit("bounds/p2", 2)
                        .map(|g| g.is_some())
                )
            })
        }),
        ("try_lock_fenced", single, {
            let locks = locks.clone();
            Box::new(move || {
                format!(
                    "{:?}",
                    locks.try_lock_fenced("bounds/f2").map(|g| g.is_some())
                )
            })
        }),
        ("try_lock_for", timed, {
            let locks = locks.clone();
            Box::new(move || {
                format!(
                    "{:?}",
                    locks.try_lock_for("bounds/w1", wait).map(|g| g.is_some())
                )
            })
        }),
        ("try_lock_all_for", timed, {
            let locks = locks.clone();
            Box::new(move || {
                format!(
                    "{:?}",
                    locks
                        .try_lock_all_for(["bounds/w2", "bounds/w3"], wait)
                        .map(|g| g.is_some())
                )
            })
        }),
        ("try_acquire_permit_for", timed, {
            let locks = locks.clone();
            Box::new(move || {
                format!(
                    "{:?}",
                    locks
                        .try_acquire_permit_for("bounds/w4", 2, wait)
                        .map(|g| g.is_some())
                )
            })
        }),
        ("try_lock_fenced_for", timed, {
            let locks = locks.clone();
            Box::new(move || {
                format!(
                    "{:?}",
                    locks
                        .try_lock_fenced_for("bounds/w5", wait)
                        .map(|g| g.is_some())
                )
            })
        }),
        ("campaign_for", timed, {
            let locks = locks.clone();
            Box::new(move || {
                format!(
                    "{:?}",
                    distlock::Election::new(&locks, "bounds/e1")
                        .campaign_for(wait)
                        .map(|g| g.is_some())
                )
            })
        }),
        // Free keys: these wait through the replacement of the stalled connection and then get
        // their locks.
        ("lock_all", unbounded_but_free, {
            let locks = locks.clone();
            Box::new(move || {
                format!(
                    "{:?}",
                    locks.lock_all(["bounds/l1", "bounds/l2"]).map(|g| g.len())
                )
            })
        }),
        ("campaign", unbounded_but_free, {
            let locks = locks.clone();
            Box::new(move || {
                format!(
                    "{:?}",
                    distlock::Election::new(&locks, "bounds/e2")
                        .campaign()
                        .map(|l| l.is_leading())
                )
            })
        }),
    ];
    let started = Instant::now();
    let results: Vec<(&str, Duration, Duration, String)> = thread::scope(|s| {
        let running: Vec<_> = calls
            .into_iter()
            .map(|(name, bound, call)| {
                (
                    name,
                    bound,
                    s.spawn(move || {
                        let out = call();
                        (started.elapsed(), out)
                    }),
                )
            })
            .collect();
        running
            .into_iter()
            .map(|(name, bound, h)| {
                let (took, out) = h.join().expect("a call panicked");
                (name, bound, took, out)
            })
            .collect()
    });
    for (name, bound, took, out) in &results {
        eprintln!("stopped backend: {name} returned after {took:?} (bound {bound:?}): {out}");
    }
    for (name, bound, took, out) in &results {
        assert!(
            took <= bound,
            "{name} returned after {took:?}, past its bound {bound:?}: {out}"
        );
    }
    for (name, _, _, out) in &results {
        if ["lock_all", "campaign"].contains(name) {
            assert!(
                out.starts_with("Ok("),
                "{name} did not get its free lock: {out}"
            );
        }
    }
    // The stall was real: the backend is still stopped, and a single request against it timed out.
    let state: String = outside
        .query_one("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .unwrap_or_default();
    eprintln!("the stopped backend's state: {state:?}");
    assert!(
        results
            .iter()
            .any(|(_, _, _, out)| out.contains("Timeout") || out.contains("Offline")),
        "no call met the stall"
    );
}

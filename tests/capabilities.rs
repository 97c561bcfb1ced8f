//! Fencing tokens, semaphores, all-or-nothing multi-key locks and holder lookup, against real
//! servers: several processes (this test binary, run again as a child), crashes of the server,
//! killed backends, and `pg_locks` read from outside the library.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::{eventually, holders, locks_of_app, manager, pids_of_app, plain, url};
use distlock::testing::TestCluster;
use distlock::{ErrorKind, LockKey, LockManager};

/// Set in a child process: which role it plays, and the server it uses.
const ROLE: &str = "DISTLOCK_CAPS_ROLE";
const CHILD_URL: &str = "DISTLOCK_CAPS_URL";

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Runs this test binary again as a child playing `role` against `url`; its stdout is piped.
fn child(role: &str, url: &str, id: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(CHILD_URL, url)
        .env("DISTLOCK_CAPS_ID", id.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn a child process")
}

/// Lines a child printed that start with `prefix`, split on spaces (the prefix removed).
fn records(child: Child, prefix: &str) -> Vec<Vec<String>> {
    let mut child = child;
    let out = child.stdout.take().unwrap();
    let lines: Vec<Vec<String>> = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            l.strip_prefix(prefix)
                .map(|rest| rest.split_whitespace().map(str::to_owned).collect())
        })
        .collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "a child process failed: {status}");
    lines
}

/// The child's side: not a test of its own (returns at once when run as one).
#[test]
fn child_process() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let url = std::env::var(CHILD_URL).unwrap();
    let id: usize = std::env::var("DISTLOCK_CAPS_ID").unwrap().parse().unwrap();
    match role.as_str() {
        "fence" => fence_child(&url, id),
        "permits" => permit_child(&url, id),
        other => panic!("unknown role {other}"),
    }
}

/// Takes fenced grants of three keys for 6 s, through crashes, and prints each grant:
/// `grant <key> <token> <ns since the epoch when granted>`.
fn fence_child(url: &str, id: usize) {
    let locks = LockManager::builder()
        .application_name(&format!("fence-child-{id}"))
        .request_timeout(Duration::from_secs(2))
        .heartbeat(Duration::from_millis(100))
        .connect(url)
        .expect("connect");
    let started = Instant::now();
    let mut i = id;
    while started.elapsed() < Duration::from_secs(6) {
        i += 1;
        let key = format!("fenced/{}", i % 3);
        match locks.try_lock_fenced_for(key.as_str(), Duration::from_millis(300)) {
            Ok(Some(guard)) => {
                let token = guard.fencing_token().expect("a fenced grant has a token");
                println!("grant {key} {token} {}", now_ns());
                thread::sleep(Duration::from_millis(3));
                drop(guard);
            }
            Ok(None) => {}
            // The server is down or restarting: keep trying.
            Err(e) if e.is_transient() || e.kind() == ErrorKind::Server => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

/// Four threads on one manager take permits of a 3-permit semaphore for 3 s and print each hold:
/// `hold <start ns> <end ns>`, both inside the hold.
fn permit_child(url: &str, id: usize) {
    let locks = LockManager::builder()
        .application_name(&format!("permit-child-{id}"))
        .connect(url)
        .expect("connect");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let locks = locks.clone();
            thread::spawn(move || {
                let started = Instant::now();
                let mut holds = Vec::new();
                while started.elapsed() < Duration::from_secs(3) {
                    let permit = locks
                        .try_acquire_permit_for("semaphore/three", 3, Duration::from_millis(500))
                        .expect("permit");
                    if let Some(permit) = permit {
                        let begin = now_ns();
                        thread::sleep(Duration::from_millis(4));
                        holds.push((begin, now_ns()));
                        drop(permit);
                    }
                }
                holds
            })
        })
        .collect();
    for t in threads {
        for (begin, end) in t.join().unwrap() {
            println!("hold {begin} {end}");
        }
    }
}

#[test]
fn fenced_grants_carry_growing_tokens_in_the_same_round_trip() {
    let a = manager("fence-a");
    let b = manager("fence-b");
    let first = a.try_lock_fenced("fence/basic").unwrap().expect("free");
    let t1 = first.fencing_token().expect("token");
    assert!(b.try_lock_fenced("fence/basic").unwrap().is_none(), "held");
    assert!(b.try_lock("fence/basic").unwrap().is_none(), "held");
    // A busy fenced try leaves nothing behind on the server.
    assert_eq!(locks_of_app(&mut plain(), "fence-b"), 0);
    drop(first);
    let second = b
        .try_lock_fenced("fence/basic")
        .unwrap()
        .expect("free again");
    let t2 = second.fencing_token().unwrap();
    assert!(t2 > t1, "{t2} after {t1}");
    drop(second);
    // Plain grants carry none; waiting forms carry one.
    assert_eq!(
        a.try_lock("fence/basic").unwrap().unwrap().fencing_token(),
        None
    );
    let waited = a
        .try_lock_fenced_for("fence/basic", Duration::from_secs(1))
        .unwrap()
        .unwrap();
    assert!(waited.fencing_token().unwrap() > t2);
    drop(waited);
    assert!(
        a.lock_fenced("fence/basic")
            .unwrap()
            .fencing_token()
            .unwrap()
            > t2
    );
}

#[test]
fn the_fencing_sequence_is_created_on_first_use_and_a_refusal_leaks_nothing() {
    if !TestCluster::shared().is_local() {
        distlock::testing::skip(
            "DATABASE_URL is set, and this test drops and revokes the sequence",
        );
        return;
    }
    let cluster = TestCluster::start().expect("a cluster");
    let mut admin = postgres::Client::connect(cluster.url(), postgres::NoTls).unwrap();
    admin
        .batch_execute("DROP SEQUENCE IF EXISTS public.distlock_fence")
        .unwrap();
    let locks = LockManager::connect(cluster.url()).unwrap();
    let guard = locks
        .try_lock_fenced("fence/first-use")
        .unwrap()
        .expect("free");
    assert!(guard.fencing_token().is_some());
    drop(guard);
    // A role that may not use the sequence gets a clear error, and holds nothing afterwards.
    admin
        .batch_execute(
            "CREATE ROLE fence_user LOGIN PASSWORD 'fence-secret'; \
             GRANT CONNECT ON DATABASE postgres TO fence_user",
        )
        .unwrap();
    let user_url = format!("{} user=fence_user password=fence-secret", cluster.url());
    let user = LockManager::builder()
        .application_name("fence-refused")
        .connect(&user_url)
        .unwrap();
    let err = user.try_lock_fenced("fence/refused").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server, "{err:?}");
    assert!(err.to_string().contains("GRANT USAGE ON SEQUENCE"), "{err}");
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND a.application_name = 'fence-refused'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "a refused fenced try left a lock behind");
    // The key is free for anyone else, and the refused manager still works for plain locks.
    assert!(locks.try_lock("fence/refused").unwrap().is_some());
    assert!(user.try_lock("fence/other").unwrap().is_some());
    // What an unprivileged role sees of another role's holder: the lock, its pid and application
    // name, not the client address or the backend start.
    let held = locks.try_lock("fence/seen").unwrap().unwrap();
    let seen = user.holders("fence/seen").unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].pid() > 0 && seen[0].is_granted() && !seen[0].is_shared());
    assert_eq!(seen[0].application_name(), Some("distlock"), "{seen:?}");
    assert_eq!(seen[0].backend_start(), None, "{seen:?}");
    assert_eq!(seen[0].client_addr(), None, "{seen:?}");
    drop(held);
    // Its own session's details it does see.
    let own = user.try_lock("fence/own").unwrap().unwrap();
    let seen = user.holders("fence/own").unwrap();
    assert_eq!(
        seen[0].application_name(),
        Some("fence-refused"),
        "{seen:?}"
    );
    assert!(seen[0].backend_start().is_some(), "{seen:?}");
    drop(own);
    // Granted the sequence, an unprivileged role draws tokens: every part of the draw (the WAL
    // record that makes it wait for a synchronous standby included) is open to it.
    admin
        .batch_execute("GRANT USAGE ON SEQUENCE public.distlock_fence TO fence_user")
        .unwrap();
    let fenced = user
        .try_lock_fenced("fence/granted")
        .expect("an unprivileged role with USAGE draws a token")
        .expect("free");
    assert!(fenced.fencing_token().is_some_and(|t| t > 0));
}

#[test]
fn fenced_tokens_only_grow_across_processes_and_server_crashes() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    if !TestCluster::shared().is_local() {
        distlock::testing::skip("DATABASE_URL is set, and this test crashes its server");
        return;
    }
    let cluster = TestCluster::start().expect("a cluster");
    let children: Vec<Child> = (0..3).map(|i| child("fence", cluster.url(), i)).collect();
    let mut restarts = Vec::new();
    for pause in [1500, 1500] {
        thread::sleep(Duration::from_millis(pause));
        cluster.crash().expect("crash");
        thread::sleep(Duration::from_millis(200));
        cluster.start_again().expect("start again");
        restarts.push(now_ns());
    }
    let mut by_key: BTreeMap<String, Vec<(u128, u64)>> = BTreeMap::new();
    let mut per_child = Vec::new();
    for c in children {
        let lines = records(c, "grant ");
        per_child.push(lines.len());
        for l in lines {
            by_key
                .entry(l[0].clone())
                .or_default()
                .push((l[2].parse().unwrap(), l[1].parse().unwrap()));
        }
    }
    assert!(
        per_child.iter().all(|&n| n > 0),
        "grants per process: {per_child:?}"
    );
    for (key, grants) in &mut by_key {
        grants.sort();
        for pair in grants.windows(2) {
            assert!(
                pair[1].1 > pair[0].1,
                "{key}: token {} granted after token {}",
                pair[1].1,
                pair[0].1
            );
        }
        let after_last = grants.iter().filter(|g| g.0 > restarts[1]).count();
        assert!(after_last > 0, "{key}: no grant after the last restart");
    }
    eprintln!(
        "fenced grants per key: {:?}",
        by_key.iter().map(|(k, g)| (k, g.len())).collect::<Vec<_>>()
    );
}

#[test]
fn a_semaphore_never_lets_more_than_its_permits_in() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let children: Vec<Child> = (0..3).map(|i| child("permits", url(), i)).collect();
    // Meanwhile, from outside: the server's own view. Every slot of the semaphore's class counts,
    // in any mode (a slot past the permits, or a shared hold, is an excess too) — all but the
    // semaphore's queue (its turnstile, slot 0x7fffffff: objid 4294967295), which waiters hold and
    // which is no permit — sampled 200 times inside each statement so no round trip leaves a gap.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = Arc::clone(&sampling);
        thread::spawn(move || {
            let mut client = plain();
            let (classid, _, _) = distlock_slot_class("semaphore/three");
            let (mut most, mut samples) = (0, 0);
            let started = Instant::now();
            while sampling.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(30) {
                let n: i64 = client
                    .query_one(
                        "SELECT max(n) FROM generate_series(1, 200) g, LATERAL (\
                           SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' \
                           AND granted AND classid::int8 = $1 AND objsubid = 2 \
                           AND objid::int8 <> 4294967295 AND g > 0) s",
                        &[&i64::from(classid)],
                    )
                    .unwrap()
                    .get(0);
                most = most.max(n);
                samples += 200;
            }
            (most, samples)
        })
    };
    let mut holds = Vec::new();
    for c in children {
        for l in records(c, "hold ") {
            holds.push((l[0].parse::<u128>().unwrap(), l[1].parse::<u128>().unwrap()));
        }
    }
    sampling.store(false, Ordering::Relaxed);
    let (most_seen, samples) = sampler.join().unwrap();
    assert!(most_seen <= 3, "pg_locks showed {most_seen} slots held");
    assert_eq!(most_seen, 3, "the sampler never saw the semaphore full");
    // The most holds overlapping at once, from the processes' own records.
    let mut events: Vec<(u128, i32)> = holds.iter().flat_map(|&(b, e)| [(b, 1), (e, -1)]).collect();
    events.sort_by_key(|&(t, d)| (t, d));
    let (mut now, mut most) = (0, 0);
    for (_, d) in events {
        now += d;
        most = most.max(now);
    }
    assert!(most <= 3, "{most} holders at once");
    assert_eq!(most, 3, "the test never filled the semaphore");
    assert!(holds.len() > 100, "only {} holds", holds.len());
    eprintln!(
        "permits: {} holds, at most {most} at once; {samples} samples of pg_locks, at most \
         {most_seen} slots",
        holds.len()
    );
}

/// The slot key of slot 0 of a semaphore, as `pg_locks` shows it (through a real grant).
fn distlock_slot_class(name: &str) -> (u32, u32, i16) {
    let locks = manager("slot-class");
    let permit = locks.try_acquire_permit(name, 1_000).unwrap().unwrap();
    let tag = permit.key().pg_locks_tag();
    drop(permit);
    tag
}

#[test]
fn a_dropped_or_lost_permit_frees_its_slot() {
    let a = manager("permit-a");
    let b = manager("permit-b");
    let one = a
        .try_acquire_permit("semaphore/two", 2)
        .unwrap()
        .expect("slot");
    let two = a
        .try_acquire_permit("semaphore/two", 2)
        .unwrap()
        .expect("slot");
    assert_ne!(one.key(), two.key(), "one session took one slot twice");
    assert!(b.try_acquire_permit("semaphore/two", 2).unwrap().is_none());
    assert!(a.try_acquire_permit("semaphore/two", 2).unwrap().is_none());
    drop(one);
    let three = b
        .try_acquire_permit("semaphore/two", 2)
        .unwrap()
        .expect("a freed slot");
    // Lost: kill b's backend; the slot is free again for a.
    let mut outside = plain();
    for pid in pids_of_app(&mut outside, "permit-b") {
        outside
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || three.is_lost()));
    assert!(eventually(Duration::from_secs(5), || {
        a.try_acquire_permit("semaphore/two", 2)
            .ok()
            .flatten()
            .map(std::mem::forget)
            .is_some()
    }));
    drop(two);
    drop(three);
    // Bad counts are refused before anything is sent.
    for bad in [0, 10_001, u32::MAX] {
        let err = a.try_acquire_permit("semaphore/bad", bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{bad}: {err:?}");
    }
}

#[test]
fn all_or_nothing_leaves_no_partial_hold() {
    let locks = manager("all-a");
    let other = manager("all-b");
    let keys = ["all/a", "all/b", "all/c", "all/d"];
    let blocker = other.try_lock("all/c").unwrap().unwrap();
    assert!(locks.try_lock_all(keys).unwrap().is_none());
    let mut outside = plain();
    assert_eq!(
        locks_of_app(&mut outside, "all-a"),
        0,
        "a partial hold stayed"
    );
    // Nor locally: each free key is still free for the manager's own threads.
    assert!(locks.try_lock("all/a").unwrap().is_some());
    drop(blocker);
    let guards = locks.try_lock_all(keys).unwrap().expect("all free");
    assert_eq!(guards.len(), 4);
    for (guard, key) in guards.iter().zip(keys) {
        assert_eq!(guard.key(), LockKey::from(key));
        assert_eq!(holders(&mut outside, key.into()).len(), 1);
    }
    assert!(other.try_lock("all/d").unwrap().is_none());
    drop(guards);
    assert_eq!(locks_of_app(&mut outside, "all-a"), 0);
    // Shared keys of the manager's own: a conflict in its own table is also all-or-nothing.
    let mine = locks.try_lock("all/b").unwrap().unwrap();
    assert!(locks.try_lock_all(keys).unwrap().is_none());
    assert_eq!(locks_of_app(&mut outside, "all-a"), 1);
    drop(mine);
    assert!(
        locks
            .try_lock_all(Vec::<LockKey>::new())
            .unwrap()
            .unwrap()
            .is_empty()
    );
    let err = locks.try_lock_all(["all/x", "all/x"]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let many: Vec<LockKey> = (0..1001).map(LockKey::id).collect();
    assert_eq!(
        locks.try_lock_all(many).unwrap_err().kind(),
        ErrorKind::Config
    );
}

#[test]
fn waiting_multi_key_callers_never_deadlock_whatever_the_order() {
    let forward = ["order/a", "order/b", "order/c"];
    let backward = ["order/c", "order/b", "order/a"];
    let started = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            thread::spawn(move || {
                let locks = manager(&format!("order-{i}"));
                let keys = if i % 2 == 0 { forward } else { backward };
                for _ in 0..50 {
                    let guards = locks
                        .try_lock_all_for(keys, Duration::from_secs(10))
                        .unwrap()
                        .expect("no deadlock, no starvation past 10 s");
                    thread::sleep(Duration::from_millis(1));
                    drop(guards);
                }
                let guards = locks.lock_all(keys).unwrap();
                assert_eq!(guards.len(), 3);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    eprintln!("4 x 51 multi-key grants in {:?}", started.elapsed());
}

#[test]
fn holders_name_the_sessions_their_mode_and_waiters() {
    let a = manager("holders-a");
    let b = manager("holders-b");
    let probe = manager("holders-probe");
    assert!(probe.holders("holders/x").unwrap().is_empty());
    let guard = a.try_lock("holders/x").unwrap().unwrap();
    let found = probe.holders("holders/x").unwrap();
    let pid_a = pids_of_app(&mut plain(), "holders-a")[0];
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].pid(), pid_a);
    assert_eq!(found[0].application_name(), Some("holders-a"));
    assert!(!found[0].is_shared());
    assert!(found[0].is_granted());
    assert!(found[0].backend_start().is_some());
    drop(guard);
    // Two shared holders, and an outsider queued for the exclusive lock.
    let s1 = a.try_lock_shared("holders/x").unwrap().unwrap();
    let s2 = b.try_lock_shared("holders/x").unwrap().unwrap();
    let waiter = thread::spawn(|| {
        let mut c = plain();
        c.batch_execute("SET application_name = 'holders-waiter'")
            .unwrap();
        c.execute(
            "SELECT pg_advisory_lock($1)",
            &[&LockKey::from("holders/x").id_or_zero()],
        )
        .unwrap();
    });
    assert!(eventually(Duration::from_secs(5), || {
        probe.holders("holders/x").unwrap().len() == 3
    }));
    let found = probe.holders("holders/x").unwrap();
    assert!(
        found[..2].iter().all(|h| h.is_shared() && h.is_granted()),
        "{found:?}"
    );
    assert!(!found[2].is_granted() && !found[2].is_shared(), "{found:?}");
    assert_eq!(found[2].application_name(), Some("holders-waiter"));
    drop((s1, s2));
    waiter.join().unwrap();
}

/// The bigint id of a name key, for an outsider's `pg_advisory_lock`.
trait IdOrZero {
    fn id_or_zero(self) -> i64;
}

impl IdOrZero for LockKey {
    fn id_or_zero(self) -> i64 {
        let (hi, lo, sub) = self.pg_locks_tag();
        assert_eq!(sub, 1);
        ((u64::from(hi) << 32) | u64::from(lo)) as i64
    }
}

#[test]
fn an_election_has_one_leader_that_is_told_when_it_stops_leading() {
    use distlock::Election;
    let a = LockManager::builder()
        .application_name("candidate-a")
        .heartbeat(Duration::from_millis(100))
        .connect(url())
        .unwrap();
    let b = manager("candidate-b");
    let observer = manager("election-observer");
    let (ea, eb) = (
        Election::new(&a, "election/x"),
        Election::new(&b, "election/x"),
    );
    let watching = Election::new(&observer, "election/x");
    assert!(watching.leader().unwrap().is_none());
    let lead_a = ea.try_campaign().unwrap().expect("nobody leads");
    assert!(lead_a.is_leading());
    lead_a.ensure_leading().unwrap();
    assert!(eb.try_campaign().unwrap().is_none(), "two leaders");
    let leader = watching.leader().unwrap().expect("a leader");
    assert_eq!(leader.application_name(), Some("candidate-a"));
    let watch = watching.watch(Duration::from_millis(20)).unwrap();
    let first = watch
        .changes()
        .recv_timeout(Duration::from_secs(5))
        .unwrap();
    assert_eq!(first.unwrap().application_name(), Some("candidate-a"));
    // B campaigns (waiting in the queue) while A leads; A's backend is killed.
    let campaign = thread::spawn(move || eb.campaign_for(Duration::from_secs(10)).unwrap());
    let mut outside = plain();
    assert!(
        eventually(Duration::from_secs(5), || {
            common::queued(&mut outside, "candidate-b") == 1
        }),
        "B never queued behind A"
    );
    let killed_at = Instant::now();
    let mut killed = 0;
    for pid in pids_of_app(&mut outside, "candidate-a") {
        outside
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap();
        killed += 1;
    }
    assert!(killed >= 1, "A had no session to kill");
    assert_eq!(
        lead_a.lost().recv_timeout(Duration::from_secs(5)),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected),
        "lost() must disconnect (never time out, never be sent to)"
    );
    assert!(!lead_a.is_leading());
    eprintln!("the deposed leader knew after {:?}", killed_at.elapsed());
    let lead_b = campaign.join().unwrap().expect("B leads after A");
    assert!(
        lead_b.term() > lead_a.term(),
        "{} after {}",
        lead_b.term(),
        lead_a.term()
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            matches!(watch.changes().try_recv(), Ok(Some(h)) if h.application_name().is_some_and(|n| n.starts_with("candidate-b")))
        }),
        "the observer never saw B lead"
    );
    lead_b.resign().unwrap();
    assert!(eventually(Duration::from_secs(5), || watching
        .leader()
        .unwrap()
        .is_none()));
    drop(lead_a);
}

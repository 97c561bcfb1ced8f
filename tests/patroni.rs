//! High availability the way people run it: a real Patroni cluster (etcd, two PostgreSQL nodes,
//! `ttl` 10 s) on loopback. A planned switchover and a node's death tell the holder before a
//! queued waiter is granted on the new leader, and a holding `distlock run`'s command is gone
//! before the waiting one starts; a frozen leader cannot leave two commands running with the
//! command's defaults; fencing tokens only grow across a failover to a synchronous standby after a
//! replication stall; a standby is named. One cluster at a time.

mod common;
#[path = "common/patroni.rs"]
mod patroni;

use std::thread;
use std::time::{Duration, Instant};

use common::{eventually, now_ns};
use distlock::{LockKey, LockManager};
use parking_lot::Mutex;
use patroni::{Cluster, TTL_S};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn cluster(synchronous: bool) -> Option<Cluster> {
    if let Some(why) = patroni::unavailable() {
        distlock::testing::skip(&why);
        return None;
    }
    eprintln!("patroni: {}", Cluster::versions());
    Some(Cluster::start(synchronous))
}
/// A holder and a waiter queued behind it on the leader, and two `distlock run`s on another
/// key; `fault` strikes; the holder must be told before the waiter is granted on the new leader,
/// and the holding command must be gone before the waiting one starts.
fn holder_told_and_waiter_granted(c: &Cluster, what: &str, key: LockKey, fault: impl FnOnce()) {
    let old = c.leader().expect("a leader");
    let holder = LockManager::builder()
        .application_name("ha-holder")
        .connect(&c.url())
        .expect("the holder connects");
    let guard = holder.try_lock(key).unwrap().expect("free");
    let lost = guard.lost().clone();
    let waiter = queued_waiter(c, old, key, "ha-waiter");
    let commands = Commands::start(c, &format!("ha/{}-command", what.replace(' ', "-")));
    // Told when the loss signal fires, watched from before the fault (a switchover's command
    // returns only when the switchover is done).
    let told = thread::spawn(move || {
        lost.recv_timeout(Duration::from_secs(60))
            .err()
            .map(|_| Instant::now())
    });
    let struck = Instant::now();
    fault();
    let told = told.join().unwrap();
    let (granted_at, granted) = waiter.join().unwrap();
    let told = told.expect("the holder was never told");
    assert_eq!(
        granted.unwrap(),
        Some(true),
        "{what}: the waiter was not granted and held"
    );
    let new = c.leader().expect("a leader after the fault");
    assert_ne!(new, old, "{what}: the leadership did not move");
    eprintln!(
        "patroni {what}: holder told after {:?}, waiter granted on the new leader after {:?}",
        told.duration_since(struck),
        granted_at.duration_since(struck)
    );
    assert!(
        told <= granted_at,
        "{what}: the waiter was granted {:?} before the holder was told",
        told.duration_since(granted_at)
    );
    drop(guard);
    commands.never_overlapped(what);
}

/// A waiter of a manager of its own, queued on node `leader` for `key` (for up to 90 s) when
/// this returns; it answers when its wait ended and whether it was granted and held.
fn queued_waiter(
    c: &Cluster,
    leader: usize,
    key: LockKey,
    name: &'static str,
) -> thread::JoinHandle<(Instant, distlock::Result<Option<bool>>)> {
    let url = c.url();
    let waiter = thread::spawn(move || {
        let locks = LockManager::builder()
            .application_name(name)
            .connect(&url)
            .expect("the waiter connects");
        let granted = locks.try_lock_for(key, Duration::from_secs(90));
        (
            Instant::now(),
            granted.map(|g| g.map(|g| g.ensure_held().is_ok())),
        )
    });
    let mut node = postgres::Client::connect(&c.node_url(leader), postgres::NoTls).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || common::queued(&mut node, name)
            == 1),
        "the waiter never queued"
    );
    waiter
}

/// Two `distlock run`s on one key with every setting at its default: a holder whose command
/// writes the time every 20 ms until SIGTERM ends it, and a waiter whose command writes the time
/// once when it starts.
struct Commands {
    dir: std::path::PathBuf,
    holder: std::process::Child,
    waiter: std::process::Child,
}

impl Commands {
    fn start(c: &Cluster, key: &str) -> Commands {
        let dir = std::env::temp_dir().join(format!(
            "distlock-ha-cmd-{}-{}",
            std::process::id(),
            key.replace(['/', ' '], "-")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let run = |wait: &[&str], script: &str, file: &str| {
            std::process::Command::new(env!("CARGO_BIN_EXE_distlock"))
                .args(["run", "--key", key, "--database-url", &c.url()])
                .args(wait)
                .args(["--", "sh", "-c", script])
                .arg(dir.join(file))
                .env_remove("DATABASE_URL")
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut holder = run(
            &["--no-wait"],
            r#"while :; do date +%s%N >> "$0"; sleep 0.02; done"#,
            "holder",
        );
        let ran = eventually(Duration::from_secs(30), || {
            std::fs::metadata(dir.join("holder")).is_ok_and(|m| m.len() > 0)
        });
        if !ran {
            let _ = holder.kill();
            let out = holder.wait_with_output().unwrap();
            panic!(
                "the holder's command never ran: {:?} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let waiter = run(&["--wait", "90s"], r#"date +%s%N >> "$0""#, "waiter");
        Commands {
            dir,
            holder,
            waiter,
        }
    }

    fn never_overlapped(mut self, what: &str) {
        let waiter = self.waiter.wait().unwrap();
        assert!(
            eventually(Duration::from_secs(30), || self
                .holder
                .try_wait()
                .ok()
                .flatten()
                .is_some()),
            "{what}: the holder's distlock run did not exit"
        );
        let holder = self.holder.wait().unwrap();
        let read = |file: &str| -> Vec<u128> {
            std::fs::read_to_string(self.dir.join(file))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        };
        let (last, first) = (
            read("holder").into_iter().max(),
            read("waiter").into_iter().min(),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
        assert_eq!(waiter.code(), Some(0), "{what}: the waiting run");
        assert_eq!(holder.code(), Some(76), "{what}: the holding run");
        let (last, first) = (last.unwrap(), first.expect("the waiter's command ran"));
        eprintln!(
            "patroni {what}: the holder's command last wrote {:.3} s before the waiter's started",
            (first as f64 - last as f64) / 1e9
        );
        assert!(last < first, "{what}: two commands ran at once");
    }
}

#[test]
fn a_switchover_and_a_node_death_tell_the_holder_and_grant_the_waiter_on_the_new_leader() {
    let _one = ONE_AT_A_TIME.lock();
    let Some(c) = cluster(false) else {
        return;
    };
    holder_told_and_waiter_granted(&c, "switchover", LockKey::name("ha/switchover"), || {
        c.switchover()
    });
    // The old leader follows the new one; a standby is named, not shown as "no locks".
    assert!(
        eventually(Duration::from_secs(60), || c
            .members()
            .iter()
            .filter(|(_, _, state)| state == "running" || state == "streaming")
            .count()
            == 2),
        "the old leader never followed"
    );
    let replica = 1 - c.leader().unwrap();
    let mut stderr = String::new();
    assert!(
        eventually(Duration::from_secs(60), || {
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_distlock"))
                .args(["locks", "--database-url", &c.node_url(replica)])
                .env_remove("DATABASE_URL")
                .output()
                .unwrap();
            stderr = String::from_utf8_lossy(&o.stderr).into_owned();
            o.status.code() == Some(69) && stderr.contains("standby")
        }),
        "distlock locks on the old leader: {stderr}"
    );
    let leader = c.leader().unwrap();
    holder_told_and_waiter_granted(&c, "node death", LockKey::name("ha/death"), || {
        c.signal_node(leader, "KILL")
    });
}

/// The leader freezes (every process of its node stopped: no FIN, no RST). `distlock run` with
/// every setting at its default holds the lock for a command deaf to SIGTERM; another process
/// polls for the lock through both hosts. The command's last write must come before that
/// process's grant on the new leader. A waiter queued on the frozen leader behind a library
/// holder leaves its silent wait and is granted on the new leader, after the holder was told.
#[test]
fn a_frozen_leader_cannot_leave_two_commands_running_with_the_defaults() {
    let _one = ONE_AT_A_TIME.lock();
    let Some(c) = cluster(false) else {
        return;
    };
    let old = c.leader().unwrap();
    let dir = std::env::temp_dir().join(format!("distlock-ha-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let writes = dir.join("writes");
    let key = "ha/frozen";
    let mut holder = std::process::Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["run", "--key", key, "--no-wait", "--database-url", &c.url()])
        .args(["--", "sh", "-c"])
        .arg(r#"trap '' TERM; while :; do date +%s%N >> "$0"; sleep 0.02; done"#)
        .arg(&writes)
        .env_remove("DATABASE_URL")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || std::fs::metadata(&writes)
            .is_ok_and(|m| m.len() > 0)),
        "the command never ran"
    );
    let contender = LockManager::builder()
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(1))
        .connect(&c.url())
        .unwrap();
    let lock_key = LockKey::name(key);
    assert!(contender.try_lock(lock_key).unwrap().is_none(), "not held");
    let queue_key = LockKey::name("ha/frozen-queue");
    let queue_holder = LockManager::builder()
        .application_name("ha-frozen-holder")
        .connect(&c.url())
        .expect("the holder connects");
    let queue_guard = queue_holder.try_lock(queue_key).unwrap().expect("free");
    let lost = queue_guard.lost().clone();
    let told = thread::spawn(move || {
        lost.recv_timeout(Duration::from_secs(90))
            .err()
            .map(|_| Instant::now())
    });
    let waiter = queued_waiter(&c, old, queue_key, "ha-frozen-waiter");
    let frozen = Instant::now();
    c.signal_node(old, "STOP");
    let mut granted = None;
    while frozen.elapsed() < Duration::from_secs(TTL_S * 6) {
        if let Ok(Some(guard)) = contender.try_lock(lock_key) {
            granted = Some((now_ns(), frozen.elapsed(), guard));
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let (granted_ns, after, _guard) = granted.expect("never granted on the new leader");
    assert!(
        eventually(Duration::from_secs(30), || holder
            .try_wait()
            .ok()
            .flatten()
            .is_some()),
        "distlock run did not exit"
    );
    let status = holder.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(holder.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let last: u128 = std::fs::read_to_string(&writes)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "patroni freeze: another process granted {after:?} after the freeze; the command's last \
         write {:.2} s before that",
        (granted_ns as f64 - last as f64) / 1e9
    );
    assert_eq!(status.code(), Some(76), "{stderr}");
    assert!(last < granted_ns, "two commands ran at once:\n{stderr}");
    let (waited_at, waited) = waiter.join().unwrap();
    let told = told.join().unwrap().expect("the holder was never told");
    eprintln!(
        "patroni freeze: a holder told after {:?}, the waiter queued behind it granted on the new \
         leader after {:?}",
        told.duration_since(frozen),
        waited_at.duration_since(frozen)
    );
    assert_eq!(
        waited.unwrap(),
        Some(true),
        "the waiter queued on the frozen leader was not granted on the new one"
    );
    assert!(
        told <= waited_at,
        "the waiter was granted before the holder was told"
    );
    drop(queue_guard);
}

/// `synchronous_mode`: the leader's WAL sender stops for 3 s while four managers draw fenced
/// tokens, then the leader's node is killed and Patroni promotes the synchronous standby. No
/// token repeats, and every token drawn after the failover is above every one drawn before.
#[test]
fn fencing_tokens_only_grow_across_a_synchronous_failover_after_a_replication_stall() {
    let _one = ONE_AT_A_TIME.lock();
    let Some(c) = cluster(true) else {
        return;
    };
    let old = c.leader().unwrap();
    let started = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drawers: Vec<_> = (0..4)
        .map(|m| {
            let (url, stop) = (c.url(), stop.clone());
            thread::spawn(move || {
                let mut tokens: Vec<(Instant, u64)> = Vec::new();
                let locks = LockManager::builder()
                    .connect_timeout(Duration::from_secs(1))
                    .request_timeout(Duration::from_secs(1))
                    .connect_retry(Duration::from_secs(30))
                    .connect(&url)
                    .expect("a drawer connects");
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && started.elapsed() < Duration::from_secs(120)
                {
                    i += 1;
                    match locks.try_lock_fenced(LockKey::pair(9000 + m, i)) {
                        Ok(Some(guard)) => {
                            tokens.extend(guard.fencing_token().map(|t| (Instant::now(), t)))
                        }
                        _ => thread::sleep(Duration::from_millis(5)),
                    }
                }
                tokens
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(1));
    let walsender = c.walsender(old).expect("the leader streams");
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &walsender.to_string()])
        .status();
    thread::sleep(Duration::from_secs(3));
    let killed = Instant::now();
    c.signal_node(old, "KILL");
    let (_, promoted) = c
        .new_leader(old, Duration::from_secs(TTL_S * 6))
        .expect("the synchronous standby was never promoted");
    // Draw on the new leader for a while.
    thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all: Vec<(Instant, u64)> = drawers
        .into_iter()
        .flat_map(|d| d.join().unwrap())
        .collect();
    all.sort();
    let before: Vec<u64> = all
        .iter()
        .filter(|(at, _)| *at < killed)
        .map(|&(_, t)| t)
        .collect();
    let after: Vec<u64> = all
        .iter()
        .filter(|(at, _)| *at > promoted)
        .map(|&(_, t)| t)
        .collect();
    eprintln!(
        "patroni synchronous failover: {} tokens before the kill, {} after the promotion \
         ({:?} after the kill)",
        before.len(),
        after.len(),
        promoted.duration_since(killed)
    );
    assert!(
        before.len() >= 10 && after.len() >= 10,
        "too few tokens to tell"
    );
    let mut tokens: Vec<u64> = all.iter().map(|&(_, t)| t).collect();
    tokens.sort_unstable();
    let n = tokens.len();
    tokens.dedup();
    assert_eq!(tokens.len(), n, "a token was issued twice");
    let highest = before.iter().max().unwrap();
    let lowest_after = after.iter().min().unwrap();
    assert!(
        lowest_after > highest,
        "token {lowest_after} after the failover; {highest} was issued before it"
    );
}

//! Behind a proxy the fault promises hold as on a direct connection. The proxy is a real
//! pgbouncer (session and transaction pool mode) or pgpool-II that reaches the server over its
//! unix socket;
//! the client that vanishes reaches the pooler over loopback TCP in a private network namespace
//! (`unshare -n`, as root), and the loopback goes down, which cuts it off silently (no FIN, no
//! RST). The pooler's own socket to that client stays open for hours (its keepalives run on the
//! kernel's defaults), so only the server's lease on the session frees what the client held: a
//! holder's locks, and a lock granted to a waiter after it vanished. A holder that is alive but
//! stopped past the bound (SIGSTOP, then SIGCONT) has lost its locks too, and is told so at its
//! next call.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::bouncer::{Bouncer, bouncer};
use common::eventually;
use common::netns::{INSIDE, in_namespace, ip};
use distlock::testing::TestCluster;
use distlock::{LockKey, LockManager};
use postgres::{Client, NoTls};

/// The test that runs a scenario inside the namespace.
const RUNNER: &str = "scenario_inside_a_namespace";
/// Set in the re-executed process that plays a stopped holder: the libpq parameters it uses.
const STOPPED: &str = "DISTLOCK_STOPPED_HOLDER";
/// With [`STOPPED`]: `transaction` for a holder in transaction mode.
const STOPPED_MODE: &str = "DISTLOCK_STOPPED_HOLDER_MODE";
/// The default bound, and what each check allows on top of it: the heartbeat (1 s by default),
/// and a quarter of a second for the contender's next try to see the free lock.
const BOUND: Duration = Duration::from_secs(12);
const SLACK: Duration = Duration::from_millis(1250);

#[test]
fn a_vanished_client_behind_pgbouncer_or_pgpool_holds_nothing_past_the_bound() {
    if std::env::var(INSIDE).is_ok() || std::env::var(STOPPED).is_ok() {
        return;
    }
    if distlock::testing::database_url().is_some() {
        distlock::testing::skip("DATABASE_URL is set, and this test starts servers of its own");
        return;
    }
    // Each scenario in a namespace of its own, two at a time.
    let scenarios = [
        "session holder",
        "transaction holder",
        "session waiter",
        "transaction waiter",
        "pgpool holder",
        "pgpool waiter",
    ];
    for pair in scenarios.chunks(2) {
        let runs: Vec<_> = pair
            .iter()
            .map(|&s| (s, thread::spawn(move || in_namespace(RUNNER, s))))
            .collect();
        for (scenario, run) in runs {
            let Some(out) = run.join().unwrap() else {
                return;
            };
            for line in out.lines().filter(|l| l.starts_with("behind a proxy")) {
                eprintln!("{line}");
            }
            assert!(
                out.contains(&format!("behind a proxy: {scenario}")),
                "{out}"
            );
        }
    }
}

/// Inside the namespace (the test above runs it): a server, a pgbouncer in front of it over the
/// unix socket, the client that vanishes over TCP to the pooler, a contender over the server's
/// unix socket; then the loopback goes down.
#[test]
fn scenario_inside_a_namespace() {
    let Ok(scenario) = std::env::var(INSIDE) else {
        return;
    };
    ip(&["link", "set", "lo", "up"]);
    let (mode, role) = scenario.split_once(' ').expect("mode and role");
    let cluster = TestCluster::start().expect("a cluster in the namespace");
    let (url, proxy): (String, Box<dyn std::any::Any>) = if mode == "pgpool" {
        let pool = Pgpool::start(&cluster);
        (pool.url(), Box::new(pool))
    } else {
        let Some(pooler) = bouncer(&cluster, mode, 4) else {
            panic!("pgbouncer is not installed");
        };
        (pooler.url(), Box::new(pooler))
    };
    let vanishing = LockManager::builder()
        .application_name("vanishing")
        .transaction_pooler(mode == "transaction")
        .connect(&url)
        .expect("connects through the proxy");
    let contender = LockManager::connect(&socket_url(&cluster)).unwrap();
    let key = LockKey::name("proxy/vanished");
    match role {
        "holder" => vanished_holder(&vanishing, &contender, key, &scenario),
        _ => vanished_waiter(vanishing, &contender, &cluster, key, &scenario),
    }
    drop(proxy);
}

/// A pgpool-II (Debian's `pgpool2`) with one backend, the cluster over its unix socket, listening
/// on loopback TCP; stopped when dropped.
struct Pgpool {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for Pgpool {
    fn drop(&mut self) {
        common::stop_pgpool(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pgpool {
    fn start(cluster: &TestCluster) -> Pgpool {
        let exe = distlock::testing::find_program("pgpool")
            .expect("pgpool-II is not installed (apt-get install pgpool2; .ci/run does)");
        let port = common::free_port();
        let dir =
            std::env::temp_dir().join(format!("distlock-pgpool-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("pgpool.conf");
        std::fs::write(
            &conf,
            format!(
                "backend_clustering_mode = 'raw'\n\
                 listen_addresses = '127.0.0.1'\n\
                 port = {port}\n\
                 unix_socket_directories = '{dir}'\n\
                 pcp_listen_addresses = ''\n\
                 pcp_port = {pcp}\n\
                 pcp_socket_dir = '{dir}'\n\
                 backend_hostname0 = '{socket}'\n\
                 backend_port0 = {server}\n\
                 backend_weight0 = 1\n\
                 enable_pool_hba = off\n\
                 health_check_period = 0\n\
                 failover_on_backend_error = off\n\
                 pid_file_name = '{dir}/pgpool.pid'\n\
                 logdir = '{dir}'\n\
                 num_init_children = 8\n\
                 max_pool = 2\n\
                 connection_cache = on\n",
                dir = dir.display(),
                pcp = common::free_port(),
                socket = cluster.socket_dir().unwrap().display(),
                server = cluster.port().unwrap(),
            ),
        )
        .unwrap();
        std::fs::write(dir.join("pcp.conf"), "").unwrap();
        let child = Command::new(exe)
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-F")
            .arg(dir.join("pcp.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("pgpool.log")).unwrap(),
            ))
            .spawn()
            .expect("start pgpool");
        let pool = Pgpool { child, port, dir };
        let url = pool.url();
        assert!(
            eventually(Duration::from_secs(20), || Client::connect(&url, NoTls)
                .is_ok()),
            "pgpool did not come up; see {}",
            pool.dir.join("pgpool.log").display()
        );
        pool
    }

    fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

/// libpq parameters for the cluster's unix socket (unaffected by the loopback going down).
fn socket_url(cluster: &TestCluster) -> String {
    format!(
        "host={} port={} user=postgres dbname=postgres",
        cluster.socket_dir().unwrap().display(),
        cluster.port().unwrap()
    )
}

/// Tries `key` every 10 ms for up to 40 s; when it was granted, after `since`.
fn free_after(contender: &LockManager, key: LockKey, since: Instant) -> Option<Duration> {
    while since.elapsed() < Duration::from_secs(40) {
        if let Ok(Some(guard)) = contender.try_lock(key) {
            drop(guard);
            return Some(since.elapsed());
        }
        thread::sleep(Duration::from_millis(10));
    }
    None
}

fn vanished_holder(vanishing: &LockManager, contender: &LockManager, key: LockKey, what: &str) {
    let guard = vanishing.try_lock(key).unwrap().expect("free");
    assert!(contender.try_lock(key).unwrap().is_none(), "not held");
    let lost = guard.lost().clone();
    let cut = Instant::now();
    ip(&["link", "set", "lo", "down"]);
    let told = thread::spawn(move || {
        let _ = lost.recv_timeout(Duration::from_secs(60));
        cut.elapsed()
    });
    let freed = free_after(contender, key, cut).expect("the server never freed the lock");
    let told = told.join().unwrap();
    eprintln!(
        "behind a proxy: {what} — told after {told:?}, the lock free on the server after \
         {freed:?}"
    );
    assert!(
        told <= freed,
        "the holder was told after the lock was taken"
    );
    assert!(
        told <= BOUND / 2,
        "told after {told:?}, past half the bound"
    );
    assert!(
        freed <= BOUND + SLACK,
        "freed after {freed:?}, past the bound"
    );
}

/// A waiter queued through the pooler vanishes; the lock is then released to it. The server must
/// end the session that was granted the lock within the bound, and give its connection back.
fn vanished_waiter(
    vanishing: LockManager,
    contender: &LockManager,
    cluster: &TestCluster,
    key: LockKey,
    what: &str,
) {
    let blocker = contender.try_lock(key).unwrap().expect("free");
    thread::spawn(move || {
        let _ = vanishing.try_lock_for(key, Duration::from_secs(120));
    });
    let mut plain = Client::connect(&socket_url(cluster), NoTls).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || common::queued(
            &mut plain,
            "vanishing"
        ) == 1),
        "the waiter never queued"
    );
    ip(&["link", "set", "lo", "down"]);
    thread::sleep(Duration::from_secs(1));
    // The vanished waiter's session is granted the lock, for nobody.
    let released = Instant::now();
    drop(blocker);
    assert!(
        eventually(Duration::from_secs(5), || common::queued(
            &mut plain,
            "vanishing"
        ) == 0),
        "the vanished waiter was never granted"
    );
    let freed = free_after(contender, key, released).expect("the server never freed the lock");
    let backends = |plain: &mut Client| -> i64 {
        plain
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'vanishing%'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    assert!(
        eventually(Duration::from_secs(5), || backends(&mut plain) == 0),
        "the vanished client's server connections were not given back: {}",
        backends(&mut plain)
    );
    eprintln!(
        "behind a proxy: {what} — granted to the vanished waiter, free again after {freed:?}"
    );
    assert!(
        freed <= BOUND + SLACK,
        "freed after {freed:?}, past the bound"
    );
}

#[test]
fn a_holder_stopped_past_the_bound_is_told_at_its_next_call_direct_and_behind_pgbouncer() {
    if let Ok(url) = std::env::var(STOPPED) {
        return stopped_holder(&url);
    }
    if std::env::var(INSIDE).is_ok() {
        return;
    }
    let Some(cluster) = common::bouncer::cluster() else {
        return;
    };
    let direct = socket_url(&cluster);
    stopped_and_resumed(&cluster, &direct, "direct", "session");
    for mode in ["session", "transaction"] {
        let Some(pooler): Option<Bouncer> = bouncer(&cluster, mode, 4) else {
            return;
        };
        stopped_and_resumed(&cluster, &pooler.url(), "pgbouncer", mode);
    }
}

/// The bound of a stopped holder: short, so that the test waits little.
const STOPPED_BOUND: Duration = Duration::from_secs(4);

/// Starts a holder process through `url`, stops it past the bound, checks that the lock is free
/// meanwhile, resumes it and reads what its next call said.
fn stopped_and_resumed(cluster: &TestCluster, url: &str, via: &str, mode: &str) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_holder_stopped_past_the_bound_is_told_at_its_next_call_direct_and_behind_pgbouncer",
            "--nocapture",
        ])
        .env(STOPPED, url)
        .env(STOPPED_MODE, mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || loop {
        let line = lines.next().expect("the holder's output").unwrap();
        if let Some(said) = line.strip_prefix("stopped holder: ") {
            return said.to_owned();
        }
    };
    assert_eq!(next(), "held");
    let key = LockKey::name("proxy/stopped");
    let contender = LockManager::connect(&socket_url(cluster)).unwrap();
    assert!(contender.try_lock(key).unwrap().is_none(), "not held");
    let pid = child.id() as i32;
    common::signal(pid, "STOP");
    let stopped = Instant::now();
    let freed = free_after(&contender, key, stopped);
    common::signal(pid, "CONT");
    let freed = freed.expect("the lock of a stopped holder was never freed");
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let said = next();
    let status = child.wait().unwrap();
    eprintln!(
        "stopped holder ({via}, {mode} mode, bound {STOPPED_BOUND:?}): free after {freed:?}; \
         at its next call: {said}"
    );
    assert!(status.success(), "the holder process failed: {said}");
    assert!(
        said.starts_with("ensure_held refused") && said.ends_with("lost"),
        "{via} {mode}: {said}"
    );
    assert!(freed <= STOPPED_BOUND + SLACK, "freed after {freed:?}");
    let mut plain = Client::connect(&socket_url(cluster), NoTls).unwrap();
    let left: i64 = plain
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND a.application_name LIKE 'stopped-holder%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "{via} {mode}: the stopped holder left locks held");
}

/// The holder process: takes the lock, says so, waits for a line (the parent stops it in
/// between), then makes its next calls and says what they answered.
fn stopped_holder(url: &str) {
    let transaction = std::env::var(STOPPED_MODE).is_ok_and(|m| m == "transaction");
    let locks = LockManager::builder()
        .application_name("stopped-holder")
        .dead_holder_timeout(STOPPED_BOUND)
        .transaction_pooler(transaction)
        .connect(url)
        .expect("the holder connects");
    let guard = locks
        .try_lock(LockKey::name("proxy/stopped"))
        .unwrap()
        .expect("free");
    println!("stopped holder: held");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let said = match guard.ensure_held() {
        Ok(()) => "ensure_held said held".to_owned(),
        Err(e) => format!("ensure_held refused ({:?}: {e})", e.kind()),
    };
    let lost = if guard.is_lost() { "lost" } else { "not lost" };
    println!("stopped holder: {said}; the guard: {lost}");
}

/// pgbouncer's own `idle_transaction_timeout` (1 s) shorter than the heartbeat (1.5 s) ends a
/// transaction-mode lock between two heartbeats: the guard is told, and its error — and
/// `distlock run`'s message — names the pooler's reason and the setting to change.
#[test]
fn a_lock_the_pooler_ends_is_told_with_the_poolers_reason_and_setting() {
    if std::env::var(INSIDE).is_ok() || std::env::var(STOPPED).is_ok() {
        return;
    }
    let Some(cluster) = common::bouncer::cluster() else {
        return;
    };
    let settings = [("idle_transaction_timeout", "1")];
    let Some(pooler) = common::bouncer::bouncer_with(&cluster, "transaction", 4, &settings) else {
        return;
    };
    let locks = LockManager::builder()
        .transaction_pooler(true)
        .heartbeat(Duration::from_millis(1500))
        .connect(&pooler.url())
        .unwrap();
    let guard = locks
        .try_lock(LockKey::name("proxy/pooler-ended"))
        .unwrap()
        .expect("free");
    let taken = Instant::now();
    let lost = guard.lost().clone();
    assert!(
        lost.recv_timeout(Duration::from_secs(10)).is_err(),
        "the guard was never told"
    );
    let told = taken.elapsed();
    let err = guard.ensure_held().expect_err("lost");
    eprintln!("pooler ended the lock: told after {told:?}: {err}");
    assert_eq!(err.kind(), distlock::ErrorKind::LockLost, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("idle transaction timeout") && text.contains("idle_transaction_timeout"),
        "{text}"
    );
    // The command says the same when it loses its lock.
    let out = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args([
            "run",
            "--key",
            "proxy/pooler-ended-run",
            "--transaction-pooler",
        ])
        .args(["--heartbeat", "1500ms", "--database-url", &pooler.url()])
        .args(["--", "sleep", "5"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(76), "{stderr}");
    assert!(stderr.contains("idle_transaction_timeout"), "{stderr}");
}

/// pgbouncer SIGKILLed while transaction-mode locks are held, and started again a second later,
/// under callers that keep taking locks with a deadline: every held lock is told lost, no caller
/// whose deadline had not passed gets a connect error (the outage is waited out, as a server's
/// is), and the same manager grants again once the pooler is back.
#[test]
fn a_pooler_restart_is_waited_out_in_transaction_mode() {
    if std::env::var(INSIDE).is_ok() || std::env::var(STOPPED).is_ok() {
        return;
    }
    let Some(cluster) = common::bouncer::cluster() else {
        return;
    };
    let Some(mut pooler) = bouncer(&cluster, "transaction", 8) else {
        return;
    };
    let locks = LockManager::builder()
        .transaction_pooler(true)
        .connect_timeout(Duration::from_millis(500))
        .connect(&pooler.url())
        .unwrap();
    let held = locks
        .try_lock(LockKey::name("proxy/restart-held"))
        .unwrap()
        .expect("free");
    let lost = held.lost().clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..3)
        .map(|i| {
            let (locks, stop) = (locks.clone(), stop.clone());
            thread::spawn(move || {
                let key = LockKey::name(&format!("proxy/restart-{i}"));
                let (mut grants, mut failures) = (Vec::new(), Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let wait = Duration::from_millis(200);
                    let deadline = Instant::now() + wait;
                    match locks.try_lock_for(key, wait) {
                        Ok(Some(guard)) => {
                            grants.push(Instant::now());
                            drop(guard);
                        }
                        Ok(None) => {}
                        // A failure past the deadline is the call's bound; one before it is not.
                        Err(e) if !e.is_transient() || Instant::now() < deadline => {
                            failures.push(format!("{e:?}"));
                        }
                        Err(_) => {}
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                (grants, failures)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    pooler.kill();
    let killed = Instant::now();
    assert!(
        lost.recv_timeout(Duration::from_secs(10)).is_err(),
        "a lock held through the pooler was never told lost"
    );
    let told = killed.elapsed();
    thread::sleep(Duration::from_secs(1).saturating_sub(killed.elapsed()));
    pooler.start_again().expect("pgbouncer starts again");
    let back = Instant::now();
    thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut regranted = 0;
    for caller in callers {
        let (grants, failures) = caller.join().unwrap();
        assert!(failures.is_empty(), "callers saw: {failures:?}");
        regranted += grants.iter().filter(|&&at| at > back).count();
    }
    eprintln!(
        "pooler killed: the held lock told after {told:?}; {regranted} grants after the restart"
    );
    assert!(
        regranted > 0,
        "the manager granted nothing after the pooler came back"
    );
    assert!(held.is_lost());
    // Nothing is left held on the server.
    drop(held);
    let mut plain = postgres::Client::connect(cluster.url(), NoTls).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || common::locks_of_app(
            &mut plain, "distlock"
        ) == 0),
        "locks left on the server"
    );
}

/// pgbouncer paused (its admin console's `PAUSE`): a transaction-mode `try_lock_for(200 ms)`
/// returns by its deadline (and a little), not after a connect timeout or a request timeout, and
/// the manager grants again after `RESUME`.
#[test]
fn a_paused_pooler_keeps_no_call_past_its_deadline() {
    if std::env::var(INSIDE).is_ok() || std::env::var(STOPPED).is_ok() {
        return;
    }
    let Some(cluster) = common::bouncer::cluster() else {
        return;
    };
    let settings = [("admin_users", "postgres")];
    let Some(pooler) = common::bouncer::bouncer_with(&cluster, "transaction", 4, &settings) else {
        return;
    };
    let locks = LockManager::builder()
        .transaction_pooler(true)
        .connect_timeout(Duration::from_secs(5))
        .request_timeout(Duration::from_secs(5))
        .connect(&pooler.url())
        .unwrap();
    let admin_url = pooler.url().replace("dbname=postgres", "dbname=pgbouncer");
    let mut admin = Client::connect(&admin_url, NoTls).expect("pgbouncer's admin console");
    admin.simple_query("PAUSE postgres").expect("PAUSE");
    let wait = Duration::from_millis(200);
    let mut longest = Duration::ZERO;
    for i in 0..3 {
        let started = Instant::now();
        let outcome = locks.try_lock_for(LockKey::name(&format!("proxy/paused-{i}")), wait);
        let took = started.elapsed();
        longest = longest.max(took);
        assert!(
            !matches!(outcome, Ok(Some(_))),
            "granted through a paused pooler"
        );
    }
    admin.simple_query("RESUME postgres").expect("RESUME");
    eprintln!("paused pooler: the longest try_lock_for(200 ms) took {longest:?}");
    // The deadline, and scheduling on a loaded machine; a connect or request timeout (5 s) without
    // the bound.
    assert!(
        longest < wait + Duration::from_millis(800),
        "a call outlasted its deadline by {:?}",
        longest - wait
    );
    let guard = locks
        .try_lock_for(LockKey::name("proxy/paused-after"), Duration::from_secs(5))
        .unwrap();
    assert!(guard.is_some(), "no grant after RESUME");
}

/// pgbouncer's pool full (one server connection, pinned by a lock held in transaction mode): a
/// second manager's `try_lock_for(200 ms)` returns by its deadline (and a little), not after a
/// connect or request timeout.
#[test]
fn a_full_pool_keeps_no_call_past_its_deadline() {
    if std::env::var(INSIDE).is_ok() || std::env::var(STOPPED).is_ok() {
        return;
    }
    let Some(cluster) = common::bouncer::cluster() else {
        return;
    };
    let Some(pooler) = bouncer(&cluster, "transaction", 1) else {
        return;
    };
    let manager = || {
        LockManager::builder()
            .transaction_pooler(true)
            .connect_timeout(Duration::from_secs(5))
            .request_timeout(Duration::from_secs(5))
            .connect(&pooler.url())
            .unwrap()
    };
    let (holder, other) = (manager(), manager());
    let pinned = holder
        .try_lock(LockKey::name("proxy/full-held"))
        .unwrap()
        .expect("free");
    let wait = Duration::from_millis(200);
    let started = Instant::now();
    let outcome = other.try_lock_for(LockKey::name("proxy/full-other"), wait);
    let took = started.elapsed();
    eprintln!("full pool: try_lock_for(200 ms) took {took:?}: {outcome:?}");
    assert!(
        !matches!(outcome, Ok(Some(_))),
        "granted without a server connection"
    );
    assert!(
        took < wait + Duration::from_millis(800),
        "the call outlasted its deadline by {:?}",
        took - wait
    );
    drop(pinned);
    assert!(
        other
            .try_lock_for(LockKey::name("proxy/full-other"), Duration::from_secs(5))
            .unwrap()
            .is_some(),
        "no grant once the pool had room"
    );
}

//! `distlock bench`: the wall-clock suite. Latency and throughput of `LockManager` against the raw
//! client and pgbench running the same statements, cross-process handoff, and loss detection, all in
//! one run on one server, so that the ratios compare like with like.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use distlock::testing::TestCluster;
use distlock::{LockKey, LockManager};
use postgres::{Client, NoTls, SimpleQueryMessage};

/// One line of the results: a case, a figure, its unit.
struct Figure {
    case: String,
    value: f64,
    unit: &'static str,
}

#[derive(Default)]
struct Report {
    figures: Vec<Figure>,
}

impl Report {
    fn add(&mut self, case: impl Into<String>, value: f64, unit: &'static str) {
        let case = case.into();
        println!("{case:<58} {value:>12.1} {unit}");
        self.figures.push(Figure { case, value, unit });
    }

    fn get(&self, case: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.case == case)
            .map(|f| f.value)
    }

    fn json(&self) -> String {
        let figures: Vec<serde_json::Value> = self
            .figures
            .iter()
            .map(|f| serde_json::json!({"case": f.case, "value": f.value, "unit": f.unit}))
            .collect();
        serde_json::to_string_pretty(&serde_json::json!({ "figures": figures })).unwrap_or_default()
    }
}

/// `distlock bench`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// How long each throughput case runs.
    #[arg(long, default_value = "2s", value_parser = crate::duration::parse)]
    per_case: Duration,
    /// How long the 8 contending processes of the fairness case run.
    #[arg(long, default_value = "30s", value_parser = crate::duration::parse)]
    fairness_for: Duration,
    /// Where to write the figures.
    #[arg(long, default_value = "target/distlock-bench.json")]
    json: PathBuf,
}

pub fn run(url: Option<&str>, args: Args) -> Result<ExitCode> {
    let (per_case, json) = (args.per_case, args.json.as_path());
    let cluster = crate::connection::demo_server(url).context("starting PostgreSQL")?;
    println!(
        "distlock bench: {} ({}), {} cores",
        cluster.url(),
        if cluster.is_local() {
            "throwaway local cluster"
        } else {
            "DATABASE_URL"
        },
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut report = Report::default();
    latency(&cluster, &mut report)?;
    capabilities(&cluster, &mut report)?;
    throughput(&cluster, per_case, &mut report)?;
    pgbench(&cluster, per_case, &mut report)?;
    handoff(&cluster, &mut report)?;
    fairness(&cluster, args.fairness_for, &mut report)?;
    loss_detection(&cluster, &mut report)?;

    println!();
    if let (Some(m), Some(r)) = (
        report.get("latency p50: LockManager try_lock+drop"),
        report.get("latency p50: raw simple_query (SELECT WHERE)"),
    ) {
        println!("ratio p50 LockManager / raw client: {:.3}", m / r);
    }
    if let (Some(m), Some(p)) = (
        report.get("throughput: LockManager, 64 threads"),
        report.get("throughput: pgbench -M prepared -c 8 -j 2"),
    ) {
        println!(
            "ratio 64 threads on one LockManager / pgbench -c 8 -M prepared: {:.3}",
            m / p
        );
    }
    if let Some(dir) = json.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(json, report.json()).with_context(|| format!("writing {}", json.display()))?;
    println!("figures written to {}", json.display());
    Ok(ExitCode::SUCCESS)
}

fn rows(messages: &[SimpleQueryMessage]) -> u64 {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Uncontended lock+unlock cycles, one thread, the candidates interleaved in rounds so that drift
/// of the machine affects them all alike.
fn latency(cluster: &TestCluster, report: &mut Report) -> Result<()> {
    const ROUNDS: usize = 20;
    const PER_ROUND: usize = 250;
    let mut raw = Client::connect(cluster.url(), NoTls)?;
    let lock_stmt = raw.prepare("SELECT WHERE pg_try_advisory_lock($1)")?;
    let unlock_stmt = raw.prepare("SELECT WHERE pg_advisory_unlock($1)")?;
    let locks = LockManager::builder()
        .application_name("distlock-bench")
        .connect(cluster.url())?;
    let spinning = LockManager::builder()
        .application_name("distlock-bench-spin")
        .spin_wait(true)
        .connect(cluster.url())?;
    let mut sql = String::with_capacity(128);
    let names = [
        "raw simple_query (SELECT WHERE)",
        "raw simple_query (SELECT 1 WHERE)",
        "raw simple_query (SELECT 1 FROM .. l WHERE l)",
        "raw prepared execute",
        "LockManager try_lock+drop",
        "LockManager try_lock+drop, spin_wait",
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    for round in 0..ROUNDS {
        for (case, out) in samples.iter_mut().enumerate() {
            for i in 0..PER_ROUND {
                let key = 0x0be0_0000 + ((round * PER_ROUND + i) % 64) as i64;
                let start = Instant::now();
                match case {
                    0..=2 => {
                        for f in ["pg_try_advisory_lock", "pg_advisory_unlock"] {
                            sql.clear();
                            let _ = match case {
                                0 => write!(sql, "SELECT WHERE {f}({key})"),
                                1 => write!(sql, "SELECT 1 WHERE {f}({key})"),
                                _ => write!(sql, "SELECT 1 FROM {f}({key}) l WHERE l"),
                            };
                            if rows(&raw.simple_query(&sql)?) != 1 {
                                bail!("raw {f}({key}) returned no row");
                            }
                        }
                    }
                    3 => {
                        if raw.execute(&lock_stmt, &[&key])? != 1
                            || raw.execute(&unlock_stmt, &[&key])? != 1
                        {
                            bail!("raw prepared cycle of {key} failed");
                        }
                    }
                    4 => {
                        let guard = locks.try_lock(key)?.context("bench key was taken")?;
                        drop(guard);
                    }
                    _ => {
                        let guard = spinning.try_lock(key)?.context("bench key was taken")?;
                        drop(guard);
                    }
                }
                out.push(start.elapsed());
            }
        }
    }
    for (name, mut s) in names.iter().zip(samples) {
        s.sort();
        report.add(
            format!("latency p50: {name}"),
            micros(percentile(&s, 0.5)),
            "µs",
        );
        report.add(
            format!("latency p99: {name}"),
            micros(percentile(&s, 0.99)),
            "µs",
        );
    }
    Ok(())
}

/// Fenced grants, permits and all-or-nothing grants against their plain counterparts, one thread,
/// interleaved in rounds like `latency`.
fn capabilities(cluster: &TestCluster, report: &mut Report) -> Result<()> {
    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 100;
    let locks = LockManager::builder()
        .application_name("distlock-bench-capabilities")
        .connect(cluster.url())?;
    // The fencing sequence exists before anything is timed.
    drop(locks.try_lock_fenced(0x0be1_ffff)?);
    let names = [
        "try_lock+drop",
        "try_lock_fenced+drop",
        "try_acquire_permit (4 permits)+drop",
        "8 x try_lock, then 8 drops",
        "try_lock_all of 8, then 8 drops",
        "8 x try_lock (acquiring only)",
        "try_lock_all of 8 (acquiring only)",
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    let eight = |i: usize| -> Vec<i64> {
        (0..8)
            .map(|k| 0x0be1_0000 + (i % 8 * 8 + k) as i64)
            .collect()
    };
    for round in 0..ROUNDS {
        for (case, out) in samples.iter_mut().enumerate() {
            for i in 0..PER_ROUND {
                let key = 0x0be1_1000 + ((round * PER_ROUND + i) % 64) as i64;
                let start = Instant::now();
                let mut acquired = None;
                match case {
                    0 => drop(locks.try_lock(key)?.context("bench key was taken")?),
                    1 => drop(locks.try_lock_fenced(key)?.context("bench key was taken")?),
                    2 => drop(
                        locks
                            .try_acquire_permit(key, 4)?
                            .context("no free permit")?,
                    ),
                    3 | 5 => {
                        let guards = eight(i)
                            .into_iter()
                            .map(|k| locks.try_lock(k)?.context("bench key was taken"))
                            .collect::<Result<Vec<_>>>()?;
                        acquired = Some(start.elapsed());
                        drop(guards);
                    }
                    _ => {
                        let guards = locks
                            .try_lock_all(eight(i))?
                            .context("bench keys were taken")?;
                        acquired = Some(start.elapsed());
                        drop(guards);
                    }
                }
                out.push(match case {
                    5 | 6 => acquired.unwrap_or_default(),
                    _ => start.elapsed(),
                });
            }
        }
    }
    for (name, mut s) in names.iter().zip(samples) {
        s.sort();
        report.add(
            format!("capability p50: {name}"),
            micros(percentile(&s, 0.5)),
            "µs",
        );
    }
    let ratio = |a: &str, b: &str| {
        let (a, b) = (
            report.get(&format!("capability p50: {a}")),
            report.get(&format!("capability p50: {b}")),
        );
        a.zip(b).map(|(a, b)| a / b)
    };
    for (a, b) in [
        ("try_lock_fenced+drop", "try_lock+drop"),
        ("try_acquire_permit (4 permits)+drop", "try_lock+drop"),
        (
            "try_lock_all of 8, then 8 drops",
            "8 x try_lock, then 8 drops",
        ),
        (
            "try_lock_all of 8 (acquiring only)",
            "8 x try_lock (acquiring only)",
        ),
    ] {
        if let Some(r) = ratio(a, b) {
            println!("ratio p50 {a} / {b}: {r:.2}");
        }
    }
    Ok(())
}

/// Lock+unlock cycles per second with many threads on one manager, each on its own keys.
fn throughput(cluster: &TestCluster, per_case: Duration, report: &mut Report) -> Result<()> {
    for (spin, threads) in [
        (false, 1usize),
        (false, 4),
        (false, 16),
        (false, 64),
        (true, 1),
        (true, 64),
    ] {
        let locks = LockManager::builder()
            .application_name("distlock-bench")
            .spin_wait(spin)
            .connect(cluster.url())?;
        let cycles = AtomicU64::new(0);
        let failed = AtomicBool::new(false);
        let deadline = Instant::now() + per_case;
        let start = Instant::now();
        thread::scope(|s| {
            for t in 0..threads {
                let (locks, cycles, failed) = (&locks, &cycles, &failed);
                s.spawn(move || {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let key = LockKey::pair(0x0be1, (t * 1000 + (n as usize % 1000)) as i32);
                        match locks.try_lock(key) {
                            Ok(Some(guard)) => drop(guard),
                            _ => {
                                failed.store(true, Ordering::Relaxed);
                                return;
                            }
                        }
                        n += 1;
                    }
                    cycles.fetch_add(n, Ordering::Relaxed);
                });
            }
        });
        if failed.load(Ordering::Relaxed) {
            bail!("a throughput thread failed to lock a free key");
        }
        let rate = cycles.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        let variant = if spin { " spin_wait" } else { "" };
        report.add(
            format!("throughput: LockManager{variant}, {threads} threads"),
            rate,
            "cycles/s",
        );
    }
    Ok(())
}

fn find_pgbench(cluster: &TestCluster) -> Option<std::path::PathBuf> {
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Some(dir) = cluster.bin_dir() {
        candidates.push(dir.join("pgbench"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("pgbench")));
    }
    if let Ok(dirs) = std::fs::read_dir("/usr/lib/postgresql") {
        candidates.extend(dirs.flatten().map(|d| d.path().join("bin/pgbench")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// pgbench running the same two statements per transaction, as the outside peer.
fn pgbench(cluster: &TestCluster, per_case: Duration, report: &mut Report) -> Result<()> {
    let Some(pgbench) = find_pgbench(cluster) else {
        println!("pgbench not found: skipping the pgbench cases");
        return Ok(());
    };
    let script = std::env::temp_dir().join(format!("distlock-bench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "\\set k random(1, 1000000000)\n\
         SELECT WHERE pg_try_advisory_lock(:k);\n\
         SELECT WHERE pg_advisory_unlock(:k);\n",
    )?;
    let seconds = per_case.as_secs().max(1).to_string();
    for (mode, clients, jobs) in [
        ("simple", "1", "1"),
        ("prepared", "1", "1"),
        ("simple", "8", "2"),
        ("prepared", "8", "2"),
    ] {
        let out = Command::new(&pgbench)
            .args(["-n", "-f"])
            .arg(&script)
            .args(["-M", mode, "-c", clients, "-j", jobs, "-T", &seconds])
            .arg(cluster.url())
            .output()
            .context("running pgbench")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let tps = text
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l["tps = ".len()..].split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok());
        match tps {
            Some(tps) => report.add(
                format!("throughput: pgbench -M {mode} -c {clients} -j {jobs}"),
                tps,
                "cycles/s",
            ),
            None => println!(
                "pgbench -M {mode} -c {clients} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }
    let _ = std::fs::remove_file(script);
    Ok(())
}

/// A holder in manager A releases; a waiter in manager B (`try_lock_for`) takes the key. The time
/// from A's unlock returning (the server has released) to B's acquisition.
fn handoff(cluster: &TestCluster, report: &mut Report) -> Result<()> {
    const SAMPLES: usize = 200;
    for (how, wait_connections) in [("lock queue", 4), ("polling", 0)] {
        let connect = |app: &str| {
            LockManager::builder()
                .application_name(app)
                .wait_connections(wait_connections)
                .connect(cluster.url())
        };
        let a = connect("distlock-bench-a")?;
        let b = connect("distlock-bench-b")?;
        let key = LockKey::name("bench/handoff");
        let mut delays = Vec::with_capacity(SAMPLES);
        for i in 0..SAMPLES {
            let guard = a.try_lock(key)?.context("handoff key taken")?;
            let waiter = {
                let b = b.clone();
                thread::spawn(move || {
                    b.try_lock_for(key, Duration::from_secs(10))
                        .map(|g| (Instant::now(), g))
                })
            };
            // Hold for a varying time, so that a polling waiter is caught at every point of its
            // backoff.
            thread::sleep(Duration::from_micros(2_000 + (i as u64 * 7_919) % 40_000));
            guard.unlock()?;
            let released = Instant::now();
            let (acquired, got) = waiter
                .join()
                .map_err(|_| anyhow::anyhow!("waiter panicked"))??;
            let got = got.context("the waiter did not get the key within 10 s")?;
            delays.push(acquired.saturating_duration_since(released));
            drop(got);
        }
        delays.sort();
        report.add(
            format!("handoff p50: manager A release -> waiting manager B, {how}"),
            micros(percentile(&delays, 0.5)),
            "µs",
        );
        report.add(
            format!("handoff p99: manager A release -> waiting manager B, {how}"),
            micros(percentile(&delays, 0.99)),
            "µs",
        );
    }
    Ok(())
}

/// Waiting across processes, in PostgreSQL's lock queue (the default) and by polling: handoff
/// between two processes, and 8 processes on one key.
fn fairness(cluster: &TestCluster, run_for: Duration, report: &mut Report) -> Result<()> {
    let hold = Duration::from_millis(5);
    for (how, polling) in [("lock queue", false), ("polling", true)] {
        let two = crate::fairness::measure(
            cluster,
            &format!("bench/handoff-2-{how}"),
            2,
            hold,
            run_for.min(Duration::from_secs(10)),
            polling,
        )?;
        let mut handoffs = two.handoffs;
        handoffs.sort();
        if !handoffs.is_empty() {
            report.add(
                format!("handoff p50: between two processes, {how}"),
                micros(percentile(&handoffs, 0.5)),
                "µs",
            );
            report.add(
                format!("handoff p99: between two processes, {how}"),
                micros(percentile(&handoffs, 0.99)),
                "µs",
            );
        }
        report.add(
            format!("grants handed to the other process (of all), {how}"),
            handoffs.len() as f64 / two.grants as f64 * 100.0,
            "%",
        );
        let eight = crate::fairness::measure(
            cluster,
            &format!("bench/fair-8-{how}"),
            8,
            hold,
            run_for,
            polling,
        )?;
        let what = format!(
            "8 processes, 5 ms holds, {}, {how}",
            crate::duration::human(run_for)
        );
        report.add(format!("{what}: grants"), eight.grants as f64, "");
        report.add(
            format!("{what}: grants overtaking an earlier waiter"),
            eight.overtakes as f64 / eight.grants as f64 * 100.0,
            "%",
        );
        report.add(
            format!("{what}: mean wait"),
            micros(eight.mean_wait) / 1000.0,
            "ms",
        );
        report.add(
            format!("{what}: longest wait"),
            micros(eight.longest_wait) / 1000.0,
            "ms",
        );
        report.add(
            format!("{what}: longest / mean wait"),
            eight.longest_wait.as_secs_f64() / eight.mean_wait.as_secs_f64().max(1e-9),
            "x",
        );
    }
    Ok(())
}

/// From `pg_terminate_backend` of a holder's backend to its guard's loss signal.
fn loss_detection(cluster: &TestCluster, report: &mut Report) -> Result<()> {
    let mut outside = Client::connect(cluster.url(), NoTls)?;
    for (heartbeat, samples) in [
        (Duration::from_millis(100), 10),
        (Duration::from_secs(1), 5),
    ] {
        let app = format!("distlock-bench-loss-{}", heartbeat.as_millis());
        let locks = LockManager::builder()
            .application_name(&app)
            .heartbeat(heartbeat)
            .connect(cluster.url())?;
        let mut delays = Vec::new();
        for i in 0..samples {
            let guard = locks
                .try_lock_for(LockKey::pair(0x0be2, i), Duration::from_secs(10))?
                .context("loss key taken")?;
            thread::sleep(heartbeat.mul_f64(0.37 * (i as f64 % 3.0)));
            let killed = Instant::now();
            outside.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )?;
            match guard
                .lost()
                .recv_timeout(heartbeat + Duration::from_secs(5))
            {
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    delays.push(killed.elapsed())
                }
                _ => bail!("the loss was not reported within heartbeat + 5 s"),
            }
        }
        delays.sort();
        let hb = heartbeat.as_millis();
        report.add(
            format!("loss detection median, heartbeat {hb} ms"),
            micros(percentile(&delays, 0.5)) / 1e3,
            "ms",
        );
        report.add(
            format!("loss detection max, heartbeat {hb} ms"),
            micros(delays[delays.len() - 1]) / 1e3,
            "ms",
        );
    }
    Ok(())
}

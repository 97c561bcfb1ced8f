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

mod capabilities;
mod names;
mod waiting;

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
    capabilities::capabilities(&cluster, &mut report)?;
    names::names(&cluster, &mut report)?;
    throughput(&cluster, per_case, &mut report)?;
    pgbench(&cluster, per_case, &mut report)?;
    waiting::handoff(&cluster, &mut report)?;
    waiting::fairness(&cluster, args.fairness_for, &mut report)?;
    waiting::loss_detection(&cluster, &mut report)?;

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
                            if rows_returned(&raw.simple_query(&sql)?) != 1 {
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

/// The row count of a query's first statement, read as the library reads a lock statement's
/// outcome: from its `CommandComplete` message, never from a decoded value.
fn rows_returned(messages: &[SimpleQueryMessage]) -> u64 {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

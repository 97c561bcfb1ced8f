//! `distlock demo`: threads on two managers contending for a few keys, checked for overlaps.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::exit::Failure;
use distlock::{LockKey, LockManager};

/// Per-key overlap detectors: set while some thread believes it holds the key.
struct Key {
    key: LockKey,
    held: AtomicBool,
}

/// `distlock demo`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Threads per manager.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// How long to run.
    #[arg(long, default_value = "3s", value_parser = crate::duration::parse)]
    duration: Duration,
}

/// Runs the demo; exit code 1 when a check failed.
pub fn run(url: Option<&str>, args: Args) -> Result<ExitCode, Failure> {
    Ok(demo(url, usize::from(args.threads), args.duration)?)
}

fn demo(url: Option<&str>, threads_per_manager: usize, run_for: Duration) -> Result<ExitCode> {
    let started = Instant::now();
    let cluster = crate::connection::demo_server(url).context("starting PostgreSQL")?;
    println!(
        "server: {} ({}, ready in {:.2?})",
        cluster.url(),
        if cluster.is_local() {
            "throwaway local cluster"
        } else {
            "DATABASE_URL"
        },
        started.elapsed()
    );
    let managers = ["distlock-demo-a", "distlock-demo-b"].map(|app| {
        LockManager::builder()
            .application_name(app)
            .connect(cluster.url())
    });
    let [a, b] = managers;
    let managers = [
        a.context("connecting manager a")?,
        b.context("connecting manager b")?,
    ];
    let keys: Vec<Key> = ["demo/alpha", "demo/beta", "demo/gamma"]
        .iter()
        .map(|name| Key {
            key: LockKey::name(name),
            held: AtomicBool::new(false),
        })
        .collect();
    let tally = Tally::default();
    let deadline = Instant::now() + run_for;
    let mut cycles = thread::scope(|s| -> Result<Vec<Duration>> {
        let handles: Vec<_> = (0..threads_per_manager * 2)
            .map(|t| {
                let (locks, keys, tally) = (&managers[t % 2], &keys, &tally);
                s.spawn(move || contend(locks, keys, tally, t, deadline))
            })
            .collect();
        let mut cycles = Vec::new();
        for handle in handles {
            let result = handle
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a demo thread panicked")));
            cycles.extend(result?);
        }
        Ok(cycles)
    })?;
    cycles.sort();

    // Check from outside the library that nothing is left behind.
    let mut outside = postgres::Client::connect(cluster.url(), postgres::NoTls)?;
    let leftover: i64 = outside
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE l.locktype = 'advisory' AND a.application_name LIKE 'distlock-demo-%'",
            &[],
        )?
        .get(0);
    drop(managers);
    report(
        &cycles,
        &tally,
        threads_per_manager * 2,
        keys.len(),
        run_for,
        leftover,
    )
}

/// What the demo's threads saw.
#[derive(Default)]
struct Tally {
    /// Holds that found the key already held: never more than 0.
    overlaps: AtomicU64,
    /// Tries that found the key held and waited.
    contended: AtomicU64,
}

/// One demo thread: takes the keys in turn until `deadline`, holding each 50 µs, and records
/// each cycle's latency.
fn contend(
    locks: &LockManager,
    keys: &[Key],
    tally: &Tally,
    first: usize,
    deadline: Instant,
) -> Result<Vec<Duration>> {
    let mut cycles = Vec::new();
    let mut i = first;
    while Instant::now() < deadline {
        let k = &keys[i % keys.len()];
        i += 1;
        let start = Instant::now();
        let guard = match locks.try_lock(k.key)? {
            Some(g) => g,
            None => {
                tally.contended.fetch_add(1, Ordering::Relaxed);
                match locks.try_lock_for(k.key, Duration::from_secs(5))? {
                    Some(g) => g,
                    None => bail!("waited 5 s for {}", k.key),
                }
            }
        };
        if k.held.swap(true, Ordering::SeqCst) {
            tally.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        thread::sleep(Duration::from_micros(50));
        k.held.store(false, Ordering::SeqCst);
        guard.unlock()?;
        cycles.push(start.elapsed());
    }
    Ok(cycles)
}

/// Prints the demo's figures; exit code 1 when two holders overlapped, a lock was left held or
/// nothing was acquired.
fn report(
    cycles: &[Duration],
    tally: &Tally,
    threads: usize,
    keys: usize,
    run_for: Duration,
    leftover: i64,
) -> Result<ExitCode> {
    let n = cycles.len();
    let pct = |p: f64| cycles[((n as f64 * p) as usize).min(n.saturating_sub(1))];
    let overlaps = tally.overlaps.load(Ordering::SeqCst);
    println!("{threads} threads on 2 managers, {keys} keys, {run_for:.1?}");
    println!(
        "acquisitions:      {n} ({:.0}/s)",
        n as f64 / run_for.as_secs_f64()
    );
    println!(
        "contended tries:   {}",
        tally.contended.load(Ordering::Relaxed)
    );
    if n > 0 {
        println!(
            "cycle latency:     p50 {:.2?}  p99 {:.2?}  (lock + 50 µs hold + unlock)",
            pct(0.5),
            pct(0.99)
        );
    }
    println!("overlapping holds: {overlaps}");
    println!("locks left held:   {leftover}");
    if overlaps > 0 || leftover > 0 || n == 0 {
        eprintln!("distlock demo: FAILED");
        return Ok(ExitCode::from(1));
    }
    println!("ok: no two holders ever overlapped");
    Ok(ExitCode::SUCCESS)
}

//! The calls beyond one lock, timed against their plain counterparts.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use distlock::LockManager;
use distlock::testing::TestCluster;

use super::{Report, micros, percentile};

/// Fenced grants, permits and all-or-nothing grants against their plain counterparts, one thread,
/// interleaved in rounds like `latency`.
pub(super) fn capabilities(cluster: &TestCluster, report: &mut Report) -> Result<()> {
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
                out.push(one_case(&locks, case, key, &eight(i))?);
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
    print_ratios(report);
    Ok(())
}

/// One timed call of case `case` (see `capabilities`' names) on `key`, or on `eight` keys.
fn one_case(locks: &LockManager, case: usize, key: i64, eight: &[i64]) -> Result<Duration> {
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
            let guards = eight
                .iter()
                .map(|&k| locks.try_lock(k)?.context("bench key was taken"))
                .collect::<Result<Vec<_>>>()?;
            acquired = Some(start.elapsed());
            drop(guards);
        }
        _ => {
            let guards = locks
                .try_lock_all(eight.iter().copied())?
                .context("bench keys were taken")?;
            acquired = Some(start.elapsed());
            drop(guards);
        }
    }
    Ok(match case {
        5 | 6 => acquired.unwrap_or_default(),
        _ => start.elapsed(),
    })
}

/// Prints each call beyond one lock against its plain counterpart.
fn print_ratios(report: &Report) {
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
}

//! What recording key names costs (`Builder::record_names`): a lock of a name already recorded, the
//! first lock of a name, and the call right after one (which may find the worker writing it),
//! against the same call by a manager that records nothing.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use distlock::LockManager;
use distlock::testing::TestCluster;
use postgres::{Client, NoTls};

use super::{Report, micros, percentile};

/// The prefix of every name this case locks (removed from the names table afterwards).
const PREFIX: &str = "distlock-bench/names/";

/// The four cases, one thread, interleaved in rounds like `latency`.
pub(super) fn names(cluster: &TestCluster, report: &mut Report) -> Result<()> {
    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 100;
    let manager = |app: &str, record: bool| {
        LockManager::builder()
            .application_name(app)
            .record_names(record)
            .connect(cluster.url())
    };
    let quiet = manager("distlock-bench-names-off", false)?;
    let recording = manager("distlock-bench-names-on", true)?;
    let known: Vec<String> = (0..64).map(|i| format!("{PREFIX}known-{i}")).collect();
    // Every known name recorded (and the table created) before anything is timed.
    for name in &known {
        drop(recording.try_lock(name.as_str())?);
    }
    std::thread::sleep(Duration::from_millis(200));
    let cases = [
        "try_lock(name)+drop, names not recorded",
        "try_lock(name)+drop, name already recorded",
        "try_lock(new name)+drop, recording",
        "the next try_lock+drop after a new name",
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for round in 0..ROUNDS {
        for (case, out) in samples.iter_mut().enumerate() {
            for i in 0..PER_ROUND {
                let name = known[(round * PER_ROUND + i) % known.len()].as_str();
                let timed = |locks: &LockManager, name: &str| -> Result<Duration> {
                    let start = Instant::now();
                    drop(locks.try_lock(name)?.context("bench key was taken")?);
                    Ok(start.elapsed())
                };
                let fresh = format!("{PREFIX}new-{case}-{round}-{i}");
                out.push(match case {
                    0 => timed(&quiet, name)?,
                    1 => timed(&recording, name)?,
                    2 => timed(&recording, &fresh)?,
                    _ => {
                        drop(recording.try_lock(fresh.as_str())?);
                        timed(&recording, name)?
                    }
                });
            }
        }
    }
    for (name, mut s) in cases.iter().zip(samples) {
        s.sort();
        report.add(
            format!("names p50: {name}"),
            micros(percentile(&s, 0.5)),
            "µs",
        );
        report.add(
            format!("names p99: {name}"),
            micros(percentile(&s, 0.99)),
            "µs",
        );
    }
    if let Ok(mut client) = Client::connect(cluster.url(), NoTls) {
        let _ = client.execute(
            "DELETE FROM public.distlock_names WHERE starts_with(name, $1)",
            &[&PREFIX],
        );
    }
    Ok(())
}

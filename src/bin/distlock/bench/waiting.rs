//! Waiting and losing: the handoff to a waiter, fairness across processes, and how soon a lost
//! lock is noticed.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use distlock::testing::TestCluster;
use distlock::{LockKey, LockManager};
use postgres::{Client, NoTls};

use super::{Report, micros, percentile};

/// A holder in manager A releases; a waiter in manager B (`try_lock_for`) takes the key. The time
/// from A's unlock returning (the server has released) to B's acquisition.
pub(super) fn handoff(cluster: &TestCluster, report: &mut Report) -> Result<()> {
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
pub(super) fn fairness(
    cluster: &TestCluster,
    run_for: Duration,
    report: &mut Report,
) -> Result<()> {
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
    long_waits(cluster, run_for, report)
}

/// Waits of seconds in the lock queue: 4 processes holding 1 s each, so that each waits about
/// 3 s; overtakes, and the server sessions opened per wait (`pg_stat_database.sessions`, which
/// counts every session begun, including each process's own).
fn long_waits(cluster: &TestCluster, run_for: Duration, report: &mut Report) -> Result<()> {
    let mut client = postgres::Client::connect(cluster.url(), postgres::NoTls)?;
    let sessions = |client: &mut postgres::Client| -> Result<i64> {
        // Counted when a session ends: read after the processes are gone.
        Ok(client
            .query_one(
                "SELECT sessions FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )?
            .get(0))
    };
    client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .ok();
    let before = sessions(&mut client)?;
    let run_for = run_for.max(Duration::from_secs(10));
    let four = crate::fairness::measure(
        cluster,
        "bench/fair-4-long",
        4,
        Duration::from_secs(1),
        run_for,
        false,
    )?;
    // Session counts reach the statistics when each session ends and its backend flushes them.
    std::thread::sleep(Duration::from_secs(1));
    let after = sessions(&mut client)?;
    let what = format!(
        "4 processes, 1 s holds, {}, lock queue",
        crate::duration::human(run_for)
    );
    report.add(format!("{what}: grants"), four.grants as f64, "");
    report.add(
        format!("{what}: grants overtaking an earlier waiter"),
        four.overtakes as f64 / four.grants.max(1) as f64 * 100.0,
        "%",
    );
    report.add(
        format!("{what}: mean wait"),
        micros(four.mean_wait) / 1000.0,
        "ms",
    );
    report.add(
        format!("{what}: longest head start of an overtaken waiter"),
        micros(four.overtake_gap),
        "µs",
    );
    report.add(
        format!(
            "{what}: server sessions opened in the run (each process: its lock session and one \
             waiting connection)"
        ),
        (after - before) as f64,
        "",
    );
    Ok(())
}

/// From `pg_terminate_backend` of a holder's backend to its guard's loss signal.
pub(super) fn loss_detection(cluster: &TestCluster, report: &mut Report) -> Result<()> {
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
                // The manager's sessions: its lock session and its waiting connections (a
                // grant after a wait is held by one of those).
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE starts_with(application_name, $1)",
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

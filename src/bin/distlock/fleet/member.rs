//! One member process of `distlock fleet`: its managers, each on a thread of its own, lock one of
//! the keys after another, claiming and releasing a witness row inside each hold.

use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use distlock::{LockKey, LockManager};
use postgres::{Client, NoTls};

use super::{BUCKETS, Tally, WITNESSES};
use std::process::ExitCode;

/// `distlock __fleet-member`'s arguments (internal: started by `fleet`).
#[derive(clap::Args)]
pub struct MemberArgs {
    /// Where the managers connect.
    #[arg(long)]
    url: String,
    /// Where the witness connections go (straight to the server).
    #[arg(long)]
    witness: String,
    /// Transaction mode (else session mode).
    #[arg(long)]
    transaction: bool,
    #[arg(long)]
    managers: u32,
    #[arg(long)]
    keys: u32,
    #[arg(long = "for", value_parser = crate::duration::parse)]
    run_for: Duration,
    #[arg(long, value_parser = crate::duration::parse)]
    hold: Duration,
    /// This process's number.
    #[arg(long)]
    id: u32,
}

/// A member process: its managers, each on a thread of its own, lock and release until the end.
pub fn member(args: MemberArgs) -> Result<ExitCode> {
    let witness = Arc::new(Witness::open(&args.witness, WITNESSES as usize)?);
    let deadline = Instant::now() + args.run_for;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let threads: Vec<_> = (0..args.managers)
        .map(|i| {
            let (tally, witness) = (Arc::clone(&tally), Arc::clone(&witness));
            let (url, transaction, keys, hold) =
                (args.url.clone(), args.transaction, args.keys, args.hold);
            let owner = i32::try_from(args.id * 100_000 + i).unwrap_or(i32::MAX);
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mine = manage(&url, transaction, keys, hold, owner, deadline, &witness);
                    tally
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .add(&mine.counts(), &mine.waits);
                })
        })
        .collect::<std::io::Result<_>>()?;
    // The most threads this process ran, sampled while its managers run.
    let most_threads = {
        let mut most = 0;
        while Instant::now() < deadline {
            most = most.max(threads_now());
            thread::sleep(Duration::from_millis(100));
        }
        most
    };
    for t in threads {
        let _ = t.join();
    }
    println!("threads {most_threads} {}", args.managers);
    let t = tally.lock().unwrap_or_else(|e| e.into_inner());
    let all: Vec<String> = t
        .counts()
        .iter()
        .chain(&t.waits)
        .map(i64::to_string)
        .collect();
    println!("tally {}", all.join(" "));
    Ok(ExitCode::SUCCESS)
}

/// One manager's loop.
fn manage(
    url: &str,
    transaction: bool,
    keys: u32,
    hold: Duration,
    owner: i32,
    deadline: Instant,
    witness: &Witness,
) -> Tally {
    let mut t = Tally::default();
    // Processes of a fleet start over some seconds, not all in one instant: each manager connects
    // at a point of the first few seconds of the run.
    let mut seed = u64::from(owner.unsigned_abs()).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let spread = deadline
        .saturating_duration_since(Instant::now())
        .min(Duration::from_secs(10))
        / 2;
    thread::sleep(spread.mul_f64((seed % 1000) as f64 / 1000.0));
    let locks = match LockManager::builder()
        .application_name("fleet")
        .transaction_pooler(transaction)
        .max_transactions(1)
        .connect_timeout(Duration::from_secs(30))
        .connect(url)
    {
        Ok(locks) => locks,
        Err(_) => {
            t.refused = 1;
            return t;
        }
    };
    t.connected = 1;
    while Instant::now() < deadline {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let k = i32::try_from(seed % u64::from(keys.max(1))).unwrap_or(0);
        let asked = Instant::now();
        let guard = match locks.try_lock_for(LockKey::pair(7070, k), Duration::from_secs(2)) {
            Ok(Some(guard)) => guard,
            Ok(None) => continue,
            Err(_) => {
                t.errors += 1;
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let waited = u64::try_from(asked.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        t.waits[(63 - waited.leading_zeros() as usize).min(BUCKETS - 1)] += 1;
        t.grants += 1;
        let claimed = witness.update(
            "UPDATE fleet_witness SET owner = $1 WHERE k = $2 AND owner IS NULL",
            owner,
            k,
        );
        thread::sleep(hold);
        let released = witness.update(
            "UPDATE fleet_witness SET owner = NULL WHERE k = $2 AND owner = $1",
            owner,
            k,
        );
        let lost = guard.is_lost();
        let overlap = claimed != Some(1) || released != Some(1);
        t.overlaps += i64::from(overlap);
        t.unannounced += i64::from(overlap && !lost);
        t.lost += i64::from(lost);
        drop(guard);
    }
    t
}

/// A few connections straight to the server for the witness rows, shared by a process's
/// managers.
struct Witness {
    idle: Mutex<Vec<Client>>,
    freed: Condvar,
}

impl Witness {
    fn open(url: &str, n: usize) -> Result<Witness> {
        let idle = (0..n)
            .map(|_| Client::connect(url, NoTls).context("a witness connection"))
            .collect::<Result<_>>()?;
        Ok(Witness {
            idle: Mutex::new(idle),
            freed: Condvar::new(),
        })
    }

    /// Rows `sql` updated, or `None` when it failed.
    fn update(&self, sql: &str, owner: i32, k: i32) -> Option<u64> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut client = loop {
            match idle.pop() {
                Some(client) => break client,
                None => idle = self.freed.wait(idle).unwrap_or_else(|e| e.into_inner()),
            }
        };
        drop(idle);
        let rows = client.execute(sql, &[&owner, &k]).ok();
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(client);
        self.freed.notify_one();
        rows
    }
}

/// This process's threads now, as Linux counts them (`Threads:` in `/proc/self/status`; 0 where
/// it cannot be read).
fn threads_now() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

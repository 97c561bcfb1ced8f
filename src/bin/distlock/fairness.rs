//! How waiting behaves under contention across processes: handoff delay from one process's release
//! to the next holder's grant, how often a later arrival overtakes an earlier waiter, and the
//! longest wait against the mean. Each contender is a `distlock __contend` process of its own.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use distlock::LockManager;
use distlock::testing::TestCluster;

/// The hidden subcommand a contender runs as.
pub const SUBCOMMAND: &str = "__contend";

/// `distlock __contend`'s arguments (internal: started by `bench`).
#[derive(clap::Args)]
pub struct Args {
    /// The lock's name.
    #[arg(long)]
    key: String,
    /// How long each grant is held.
    #[arg(long, value_parser = crate::duration::parse)]
    hold: Duration,
    /// How long to keep contending.
    #[arg(long = "for", value_parser = crate::duration::parse)]
    run_for: Duration,
    /// This contender's number, printed with its records.
    #[arg(long)]
    id: u32,
    /// Wait by polling (no waiting connections) instead of in PostgreSQL's lock queue.
    #[arg(long)]
    polling: bool,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Takes the lock again and again (closed loop: it waits again as soon as it released) and prints
/// one line per grant: `acq <id> <waiting since> <granted> <released>`, in ns since the epoch.
pub fn contend(url: Option<&str>, args: Args) -> Result<ExitCode> {
    let url = url
        .map(str::to_owned)
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .context("__contend needs the server's URL (DATABASE_URL)")?;
    let locks = LockManager::builder()
        .application_name(&format!("distlock-contend-{}", args.id))
        .wait_connections(if args.polling { 0 } else { 4 })
        .connect(&url)?;
    let started = Instant::now();
    let mut out = String::new();
    while started.elapsed() < args.run_for {
        let left = args.run_for.saturating_sub(started.elapsed());
        let arrived = now_ns();
        let Some(guard) = locks.try_lock_for(args.key.as_str(), left)? else {
            break;
        };
        let granted = now_ns();
        std::thread::sleep(args.hold);
        guard.unlock()?;
        let released = now_ns();
        out.push_str(&format!("acq {} {arrived} {granted} {released}\n", args.id));
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// One grant, as a contender recorded it.
#[derive(Clone, Copy)]
struct Grant {
    process: u32,
    arrived: u128,
    granted: u128,
    released: u128,
}

/// What `measure` found.
pub struct Fairness {
    pub grants: usize,
    /// Release → next grant, when the next holder was already waiting at the release.
    pub handoffs: Vec<Duration>,
    /// Grants that went to a waiter while another process had been waiting longer.
    pub overtakes: usize,
    /// The longest an overtaken waiter had arrived before the grant that overtook it.
    pub overtake_gap: Duration,
    pub mean_wait: Duration,
    pub longest_wait: Duration,
}

/// Runs `processes` contenders for `key` holding `hold` each time, for `run_for`.
pub fn measure(
    cluster: &TestCluster,
    key: &str,
    processes: u32,
    hold: Duration,
    run_for: Duration,
    polling: bool,
) -> Result<Fairness> {
    let exe = std::env::current_exe().context("finding the distlock executable")?;
    let children = (0..processes)
        .map(|id| {
            Command::new(&exe)
                .env("DATABASE_URL", cluster.url())
                .args([SUBCOMMAND, "--key", key, "--id", &id.to_string()])
                .args(["--hold", &format!("{}ms", hold.as_millis())])
                .args(["--for", &format!("{}ms", run_for.as_millis())])
                .args(polling.then_some("--polling"))
                .stdout(Stdio::piped())
                .spawn()
                .context("starting a contender")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut grants = Vec::new();
    for mut child in children {
        let out = child.stdout.take().context("a contender's output")?;
        for line in BufReader::new(out).lines() {
            let line = line?;
            let f: Vec<&str> = line.split_whitespace().collect();
            if let ["acq", id, a, g, r] = f[..] {
                grants.push(Grant {
                    process: id.parse()?,
                    arrived: a.parse()?,
                    granted: g.parse()?,
                    released: r.parse()?,
                });
            }
        }
        if !child.wait()?.success() {
            bail!("a contender failed");
        }
    }
    if grants.is_empty() {
        bail!("no grants");
    }
    grants.sort_by_key(|g| g.granted);
    let handoffs = grants
        .windows(2)
        .filter(|w| w[1].process != w[0].process && w[1].arrived < w[0].released)
        .map(|w| ns(w[1].granted.saturating_sub(w[0].released)))
        .collect();
    // A grant overtakes when another process was already waiting when this one arrived and was
    // still waiting when this one was granted.
    let overtaken_by = |a: &Grant| {
        grants
            .iter()
            .filter(|b| b.process != a.process && b.arrived < a.arrived && b.granted > a.granted)
            .map(|b| a.arrived - b.arrived)
            .max()
    };
    let gaps: Vec<u128> = grants.iter().filter_map(overtaken_by).collect();
    let overtakes = gaps.len();
    let waits: Vec<u128> = grants.iter().map(|g| g.granted - g.arrived).collect();
    let mean = waits.iter().sum::<u128>() / waits.len() as u128;
    Ok(Fairness {
        grants: grants.len(),
        handoffs,
        overtakes,
        overtake_gap: ns(gaps.iter().copied().max().unwrap_or(0)),
        mean_wait: ns(mean),
        longest_wait: ns(waits.iter().copied().max().unwrap_or(0)),
    })
}

fn ns(v: u128) -> Duration {
    Duration::from_nanos(u64::try_from(v).unwrap_or(u64::MAX))
}

//! `distlock fleet`: thousands of managers on one small server, through a transaction pooler.
//!
//! A server with `max_connections = 60`, a real pgbouncer in transaction mode in front of it, and
//! processes of managers (`distlock __fleet-member`) each locking one of a few hundred keys in a
//! loop with short holds. Inside each hold a witness row is claimed and released on a connection
//! of its own (straight to the server): a claim that finds the row owned, or a release that finds
//! it taken over, is an overlap; one whose guard was never told it was lost is an unannounced
//! loss. Then the same processes in session mode straight to the server, as many managers as it
//! takes. Not a test: it prints figures for the README.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use distlock::testing::{BouncerSetup, Pgbouncer, Setup, TestCluster};
use postgres::{Client, NoTls};

mod member;

pub use member::{MemberArgs, member};

/// The hidden subcommand a member process runs as.
pub const SUBCOMMAND: &str = "__fleet-member";

/// Witness connections per member process.
const WITNESSES: u32 = 4;

/// Wait-time buckets: powers of two of microseconds, up to about 70 minutes.
const BUCKETS: usize = 32;

/// `distlock fleet`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Managers in all, split evenly over the processes.
    #[arg(long, default_value_t = 2000)]
    managers: u32,
    /// Member processes.
    #[arg(long, default_value_t = 4)]
    processes: u32,
    /// Keys the managers contend for.
    #[arg(long, default_value_t = 200)]
    keys: u32,
    /// How long each mode runs.
    #[arg(long = "for", default_value = "60s", value_parser = crate::duration::parse)]
    run_for: Duration,
    /// How long each grant is held.
    #[arg(long, default_value = "1ms", value_parser = crate::duration::parse)]
    hold: Duration,
    /// The server's max_connections.
    #[arg(long, default_value_t = 60)]
    max_connections: u32,
    /// The pooler's default_pool_size (server connections).
    #[arg(long, default_value_t = 20)]
    pool: u32,
}

/// What one member process counted.
#[derive(Default)]
struct Tally {
    connected: i64,
    refused: i64,
    grants: i64,
    overlaps: i64,
    unannounced: i64,
    lost: i64,
    errors: i64,
    waits: [i64; BUCKETS],
    /// The most threads one member process ran.
    threads: u64,
    /// The managers of each member process.
    managers_per_process: u64,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let setup = Setup {
        settings: vec![("max_connections".into(), args.max_connections.to_string())],
        ..Default::default()
    };
    let cluster = TestCluster::start_with(&setup).context("starting PostgreSQL")?;
    let bouncer = Pgbouncer::start(
        &cluster,
        &BouncerSetup {
            mode: "transaction".into(),
            pool_size: args.pool,
            max_clients: args.managers * 2 + 1000,
            settings: Vec::new(),
        },
    )
    .context("starting pgbouncer")?;
    let mut direct = Client::connect(cluster.url(), NoTls)?;
    direct.batch_execute(&format!(
        "CREATE TABLE fleet_witness (k int PRIMARY KEY, owner int); \
         INSERT INTO fleet_witness SELECT generate_series(0, {}), NULL",
        args.keys.saturating_sub(1)
    ))?;
    println!(
        "distlock fleet: {} managers in {} processes, {} keys, {:?} holds, {:?} per mode; \
         server max_connections = {}, pgbouncer transaction mode, default_pool_size = {}",
        args.managers,
        args.processes,
        args.keys,
        args.hold,
        args.run_for,
        args.max_connections,
        args.pool
    );
    for transaction in [true, false] {
        let url = if transaction {
            bouncer.socket_url()
        } else {
            cluster.url().to_owned()
        };
        let (tally, most) = one_mode(&args, &url, cluster.url(), transaction)?;
        // The witness connections (4 per process) and the sampler's own are not the managers'.
        let theirs = most - i64::from(args.processes) * i64::from(WITNESSES) - 1;
        report(&args, transaction, &tally, theirs);
        if tally.overlaps > 0 || tally.unannounced > 0 {
            bail!(
                "{} overlaps, {} unannounced losses",
                tally.overlaps,
                tally.unannounced
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the member processes in one mode; returns their tallies and the most server backends
/// seen meanwhile.
fn one_mode(args: &Args, url: &str, witness: &str, transaction: bool) -> Result<(Tally, i64)> {
    let exe = std::env::current_exe()?;
    let per = args.managers / args.processes.max(1);
    let children: Vec<_> = (0..args.processes)
        .map(|id| {
            let mut cmd = Command::new(&exe);
            cmd.arg(SUBCOMMAND)
                .args(["--url", url, "--witness", witness])
                .args([
                    "--managers",
                    &per.to_string(),
                    "--keys",
                    &args.keys.to_string(),
                ])
                .args(["--for", &format!("{}ms", args.run_for.as_millis())])
                .args(["--hold", &format!("{}ms", args.hold.as_secs_f64() * 1000.0)])
                .args(["--id", &id.to_string()])
                .stdout(Stdio::piped());
            if transaction {
                cmd.arg("--transaction");
            }
            cmd.spawn().context("starting a member process")
        })
        .collect::<Result<_>>()?;
    let sampling = Arc::new(AtomicBool::new(true));
    let most = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (sampling, most, witness) =
            (Arc::clone(&sampling), Arc::clone(&most), witness.to_owned());
        thread::spawn(move || -> Result<()> {
            let mut client = Client::connect(&witness, NoTls)?;
            while sampling.load(Ordering::Relaxed) {
                let n: i64 = client
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                        &[],
                    )?
                    .get(0);
                most.fetch_max(n, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })
    };
    let mut total = Tally::default();
    for mut child in children {
        let out = child.stdout.take().context("member output")?;
        for line in BufReader::new(out).lines() {
            let line = line?;
            if let Some(rest) = line.strip_prefix("tally ") {
                add(&mut total, rest)?;
            } else if let Some(rest) = line.strip_prefix("threads ") {
                let n: Vec<u64> = rest
                    .split_whitespace()
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
                if let [threads, managers] = n[..] {
                    total.threads = total.threads.max(threads);
                    total.managers_per_process = managers;
                }
            }
        }
        child.wait()?;
    }
    sampling.store(false, Ordering::Relaxed);
    sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the sampler panicked"))??;
    Ok((total, most.load(Ordering::Relaxed)))
}

/// Adds a member's `tally` line to `total`.
fn add(total: &mut Tally, line: &str) -> Result<()> {
    let n: Vec<i64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if n.len() != 7 + BUCKETS {
        bail!("a malformed tally line: {line}");
    }
    total.add(&n[..7], &n[7..]);
    Ok(())
}

fn report(args: &Args, transaction: bool, t: &Tally, most: i64) {
    let mode = if transaction {
        "transaction mode, through pgbouncer"
    } else {
        "session mode, straight to the server"
    };
    let per_s = t.grants as f64 / args.run_for.as_secs_f64();
    println!("{mode}:");
    println!(
        "  managers connected       {} of {} ({} refused)",
        t.connected, args.managers, t.refused
    );
    println!("  grants                   {} ({per_s:.0}/s)", t.grants);
    println!("  overlaps (witness)       {}", t.overlaps);
    println!("  unannounced losses       {}", t.unannounced);
    println!("  announced losses         {}", t.lost);
    println!("  errors                   {}", t.errors);
    if transaction {
        println!(
            "  most server backends     {most} (the managers'; the pool has {})",
            args.pool
        );
    } else {
        println!("  most server backends     {most} (lock sessions and waiting connections)");
    }
    // Each manager of a member runs on a caller thread of its own, beside the main thread.
    let library = t.threads.saturating_sub(t.managers_per_process + 1);
    let connected_per_process = t.connected as f64 / f64::from(args.processes.max(1));
    println!(
        "  threads per process      {} at most ({} callers, {library} of the library: {:.1} per connected manager)",
        t.threads,
        t.managers_per_process,
        library as f64 / connected_per_process.max(1.0)
    );
    println!(
        "  wait p50 / p99           {} / {}",
        bucket_label(percentile(&t.waits, 0.50)),
        bucket_label(percentile(&t.waits, 0.99))
    );
}

/// The bucket under which `q` of the samples fall.
fn percentile(waits: &[i64; BUCKETS], q: f64) -> usize {
    let total: i64 = waits.iter().sum();
    let mut seen = 0;
    for (i, &n) in waits.iter().enumerate() {
        seen += n;
        if seen as f64 >= q * total as f64 && n > 0 {
            return i;
        }
    }
    0
}

fn bucket_label(i: usize) -> String {
    let us = 1u64 << i;
    if us >= 1_000_000 {
        format!("≤ {:.1} s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("≤ {:.1} ms", us as f64 / 1e3)
    } else {
        format!("≤ {us} µs")
    }
}

impl Tally {
    pub(super) fn counts(&self) -> [i64; 7] {
        let t = self;
        [
            t.connected,
            t.refused,
            t.grants,
            t.overlaps,
            t.unannounced,
            t.lost,
            t.errors,
        ]
    }

    /// Adds `counts` (in the order of [`Tally::counts`]) and `waits` (bucket by bucket).
    pub(super) fn add(&mut self, counts: &[i64], waits: &[i64]) {
        for (a, b) in self.counts_mut().into_iter().zip(counts) {
            *a += b;
        }
        for (a, b) in self.waits.iter_mut().zip(waits) {
            *a += b;
        }
    }

    fn counts_mut(&mut self) -> [&mut i64; 7] {
        let t = self;
        [
            &mut t.connected,
            &mut t.refused,
            &mut t.grants,
            &mut t.overlaps,
            &mut t.unannounced,
            &mut t.lost,
            &mut t.errors,
        ]
    }
}

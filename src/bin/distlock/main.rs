//! The `distlock` command.

mod bench;
mod cluster;
mod demo;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: distlock <command> [options]

commands:
  demo [--threads N] [--seconds S]
      Threads on two lock managers contend for a few keys against DATABASE_URL or a throwaway
      local PostgreSQL cluster; checks that no two holders ever overlapped and prints a summary.
      --threads is per manager (default 4), --seconds the run time (default 3).
  bench [--seconds S] [--json PATH]
      The wall-clock benchmark suite: latency, throughput, pgbench, cross-process handoff and
      loss detection, against DATABASE_URL or a throwaway cluster. Prints a table and writes the
      figures as JSON (default target/distlock-bench.json). --seconds per throughput case (default 2).
  cluster [-- COMMAND [ARGS...]]
      Starts a throwaway PostgreSQL cluster and runs COMMAND with DATABASE_URL set to it, then
      stops the cluster and exits with COMMAND's status. Without COMMAND, prints the URL and keeps
      the cluster until standard input closes.";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("distlock: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `--flag value` pairs after a subcommand.
fn options(args: &[String], known: &[&str]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if !known.contains(&flag.as_str()) {
            bail!("unknown option {flag}\n\n{USAGE}");
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        out.push((flag.clone(), value.clone()));
    }
    Ok(out)
}

fn seconds(flag: &str, value: &str) -> Result<Duration> {
    let s: f64 = value
        .parse()
        .with_context(|| format!("{flag} takes a number of seconds"))?;
    if !s.is_finite() || s <= 0.0 {
        bail!("{flag} must be positive");
    }
    Ok(Duration::from_secs_f64(s))
}

fn run(args: Vec<String>) -> Result<ExitCode> {
    let Some((command, rest)) = args.split_first() else {
        bail!("no command given\n\n{USAGE}");
    };
    match command.as_str() {
        "demo" => {
            let (mut threads, mut run_for) = (4, Duration::from_secs(3));
            for (flag, value) in options(rest, &["--threads", "--seconds"])? {
                match flag.as_str() {
                    "--threads" => threads = value.parse().context("--threads takes a number")?,
                    _ => run_for = seconds(&flag, &value)?,
                }
            }
            if threads == 0 {
                bail!("--threads must be positive");
            }
            demo::run(threads, run_for)
        }
        "bench" => {
            let mut per_case = Duration::from_secs(2);
            let mut json = std::path::PathBuf::from("target/distlock-bench.json");
            for (flag, value) in options(rest, &["--seconds", "--json"])? {
                match flag.as_str() {
                    "--seconds" => per_case = seconds(&flag, &value)?,
                    _ => json = value.into(),
                }
            }
            bench::run(per_case, &json)
        }
        "cluster" => {
            let command = match rest.split_first() {
                None => &[][..],
                Some((dashes, command)) if dashes == "--" => command,
                Some(_) => bail!("usage: distlock cluster [-- COMMAND [ARGS...]]"),
            };
            cluster::run(command)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

//! `distlock cluster`: a throwaway PostgreSQL cluster around a command.

use std::io::Read;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use distlock::testing::TestCluster;

/// `distlock cluster`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// The command to run; without one, prints the URL and waits until stdin closes.
    #[arg(last = true)]
    command: Vec<String>,
}

/// Starts a cluster, runs the command with `DATABASE_URL` pointing at it (or waits for stdin to
/// close), then stops the cluster.
pub fn run(args: Args) -> Result<ExitCode> {
    let command = &args.command;
    let cluster = TestCluster::start().context("starting a throwaway PostgreSQL cluster")?;
    let Some((program, args)) = command.split_first() else {
        println!("{}", cluster.url());
        eprintln!("distlock: cluster running; close standard input (Ctrl-D) to stop it");
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        return Ok(ExitCode::SUCCESS);
    };
    let status = Command::new(program)
        .args(args)
        .env("DATABASE_URL", cluster.url())
        .status()
        .with_context(|| format!("running {program}"))?;
    drop(cluster);
    Ok(ExitCode::from(crate::exit::of_status(status)))
}

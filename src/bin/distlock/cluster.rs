//! `distlock cluster`: a throwaway PostgreSQL cluster around a command.

use std::io::Read;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use distlock::testing::TestCluster;

/// Starts a cluster, runs `command` with `DATABASE_URL` pointing at it (or waits for stdin to
/// close), then stops the cluster.
pub fn run(command: &[String]) -> Result<ExitCode> {
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
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::from(1),
    })
}

//! The `distlock` command: run anything under a lock, see who holds what.

mod bench;
mod child;
mod cluster;
mod connection;
mod demo;
mod duration;
mod exit;
mod fairness;
mod fleet;
mod locks;
mod run;
mod status;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

const AFTER_HELP: &str = "\
Examples:
  distlock run --key nightly-report -- ./report.sh          wait for the lock, then run
  distlock run --key migrate --no-wait -- ./migrate         skip (exit 75) if someone holds it
  distlock run --key cache --wait 30s -- make cache         wait at most 30 s
  distlock run --key schema --shared -- ./read-only-job     many shared holders at once
  distlock locks                                            who holds or awaits which lock
  distlock key nightly-report                               the bigint id SQL uses for a name

Server: --database-url, else DATABASE_URL, else the libpq variables PGHOST, PGPORT, PGUSER,
PGPASSWORD, PGDATABASE, PGAPPNAME (no PGHOST: libpq's default socket); a password missing from those is looked
up in PGPASSFILE or ~/.pgpass, as libpq does. Only `demo` and `bench` fall back to a throwaway local
cluster. A password on the command line (--database-url) is visible to every user of the host in
ps: prefer PGPASSWORD, ~/.pgpass or DATABASE_URL. The command run by `run` does not inherit
DATABASE_URL or PGPASSWORD unless --keep-db-env is given.

The command of `run` dies with distlock on Linux, even if distlock is killed with SIGKILL (its lock
is then free, and the command must not run on without it). Elsewhere a command survives a
SIGKILLed distlock; other signals are forwarded to it everywhere.

Exit codes: 0-255 the command's own status (run); 128+N the command died of signal N; 64 usage
error; 69 server unavailable; 70 internal error; 75 lock not acquired (--conflict-exit-code);
76 lock lost while the command ran; 126 command not executable; 127 command not found.";

#[derive(Parser)]
#[command(
    name = "distlock",
    version,
    about = "Distributed locks on PostgreSQL advisory locks: flock(1) across hosts",
    after_help = AFTER_HELP
)]
struct Cli {
    /// PostgreSQL connection: a postgres:// URL or libpq key=value string [default: DATABASE_URL,
    /// then the PG* variables]. A password given here is visible to every user of this host (ps,
    /// /proc): keep it in PGPASSWORD, ~/.pgpass (PGPASSFILE) or DATABASE_URL instead
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command while holding a lock, like flock(1) across hosts.
    #[command(after_help = AFTER_HELP)]
    Run(run::Args),
    /// List every advisory lock on the server, held or awaited.
    Locks(locks::Args),
    /// Print the bigint id a name maps to (FNV-1a 64, as the library and the Go libraries do).
    Key {
        /// The lock's name.
        name: String,
    },
    /// Threads on two managers contend for a few keys; checks that no two holders overlap.
    Demo(demo::Args),
    /// The wall-clock benchmark suite; prints a table and writes JSON.
    Bench(bench::Args),
    /// Thousands of managers on one small server through a transaction pooler, then in session
    /// mode; prints the figures (throwaway server and pgbouncer of its own).
    Fleet(fleet::Args),
    /// Start a throwaway PostgreSQL cluster and run COMMAND with DATABASE_URL set to it.
    Cluster(cluster::Args),
    /// Internal: how `run` starts its command (see child.rs).
    #[command(name = child::SUBCOMMAND, hide = true)]
    Child(child::Args),
    /// Internal: one member process of `fleet` (see fleet.rs).
    #[command(name = fleet::SUBCOMMAND, hide = true)]
    FleetMember(fleet::MemberArgs),
    /// Internal: one contender of `bench`'s fairness measurement (see fairness.rs).
    #[command(name = fairness::SUBCOMMAND, hide = true)]
    Contend(fairness::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let url = cli.database_url.as_deref();
    let outcome = match cli.command {
        Command::Run(args) => run::run(url, args),
        Command::Locks(args) => locks::run(url, args),
        Command::Key { name } => {
            let key = distlock::LockKey::name(&name);
            println!("{}", key.as_id().unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(url, args),
        Command::Bench(args) => bench::run(url, args).map_err(Into::into),
        Command::Cluster(args) => cluster::run(args).map_err(Into::into),
        Command::Fleet(args) => fleet::run(args).map_err(Into::into),
        Command::FleetMember(args) => fleet::member(args).map_err(Into::into),
        Command::Child(args) => Ok(child::exec(args)),
        Command::Contend(args) => fairness::contend(url, args).map_err(Into::into),
    };
    outcome.unwrap_or_else(exit::Failure::report)
}

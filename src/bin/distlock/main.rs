//! The `distlock` command: run anything under a lock, see who holds what.

mod bench;
mod child;
mod cluster;
mod connection;
mod demo;
mod locks;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit codes of `distlock` itself (`run` otherwise exits with its command's status).
pub mod exit {
    /// Bad usage: an unknown flag, a missing command, a malformed duration or connection string,
    /// no server given.
    pub const USAGE: u8 = 64;
    /// The server could not be reached, or refused the connection.
    pub const UNAVAILABLE: u8 = 69;
    /// Anything else that went wrong inside distlock.
    pub const SOFTWARE: u8 = 70;
    /// `run`: the lock was not acquired (`--no-wait`, or `--wait` passed). `--conflict-exit-code`
    /// changes it.
    pub const CONFLICT: u8 = 75;
    /// `run`: the lock was lost while the command ran (its connection failed), and the command was
    /// terminated (`--on-lost terminate`, the default).
    pub const LOST: u8 = 76;
    /// `run`: the command exists but could not be executed.
    pub const NOT_EXECUTABLE: u8 = 126;
    /// `run`: the command was not found.
    pub const NOT_FOUND: u8 = 127;
}

const AFTER_HELP: &str = "\
Examples:
  distlock run --key nightly-report -- ./report.sh          wait for the lock, then run
  distlock run --key migrate --no-wait -- ./migrate         skip (exit 75) if someone holds it
  distlock run --key cache --wait 30s -- make cache         wait at most 30 s
  distlock run --key schema --shared -- ./read-only-job     many shared holders at once
  distlock locks                                            who holds or awaits which lock
  distlock key nightly-report                               the bigint id SQL uses for a name

Server: --database-url, else DATABASE_URL, else the libpq variables PGHOST, PGPORT, PGUSER,
PGPASSWORD, PGDATABASE, PGAPPNAME (PGHOST is required then); a password missing from those is looked
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
    Run(RunArgs),
    /// List every advisory lock on the server, held or awaited.
    Locks {
        /// Print JSON (an array of objects) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the bigint id a name maps to (FNV-1a 64, as the library and the Go libraries do).
    Key {
        /// The lock's name.
        name: String,
    },
    /// Threads on two managers contend for a few keys; checks that no two holders overlap.
    Demo {
        /// Threads per manager.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// How long to run.
        #[arg(long, default_value = "3s", value_parser = connection::parse_duration)]
        duration: Duration,
    },
    /// The wall-clock benchmark suite; prints a table and writes JSON.
    Bench {
        /// How long each throughput case runs.
        #[arg(long, default_value = "2s", value_parser = connection::parse_duration)]
        per_case: Duration,
        /// Where to write the figures.
        #[arg(long, default_value = "target/distlock-bench.json")]
        json: PathBuf,
    },
    /// Start a throwaway PostgreSQL cluster and run COMMAND with DATABASE_URL set to it.
    Cluster {
        /// The command to run; without one, prints the URL and waits until stdin closes.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Internal: how `run` starts its command (see child.rs).
    #[command(name = child::SUBCOMMAND, hide = true)]
    Child {
        /// The pid of the `distlock run` that started this.
        #[arg(long)]
        parent: u32,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The lock's name (mapped to a bigint id with FNV-1a 64).
    #[arg(long, value_name = "NAME")]
    key: String,
    /// Take the lock shared: shared holders run at once; exclusive ones wait for all of them.
    #[arg(long)]
    shared: bool,
    /// Wait at most this long for the lock (500ms, 30s, 2m, 1h) [default: forever].
    #[arg(long, value_name = "DURATION", value_parser = connection::parse_duration, conflicts_with = "no_wait")]
    wait: Option<Duration>,
    /// Do not wait: exit at once (75) if someone holds the lock.
    #[arg(long)]
    no_wait: bool,
    /// What to do if the lock is lost while the command runs.
    #[arg(long, value_enum, default_value_t = OnLost::Terminate)]
    on_lost: OnLost,
    /// After a lost lock, how long the command has between SIGTERM and SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = connection::parse_duration)]
    kill_after: Duration,
    /// Exit code when the lock is not acquired.
    #[arg(long, value_name = "N", default_value_t = exit::CONFLICT)]
    conflict_exit_code: u8,
    /// No status line while waiting.
    #[arg(long, short)]
    quiet: bool,
    /// Pass DATABASE_URL and PGPASSWORD on to the command. By default it does not inherit
    /// distlock's own connection secrets.
    #[arg(long)]
    keep_db_env: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// What `run` does when its lock is lost.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnLost {
    /// SIGTERM the command, SIGKILL it after --kill-after, exit 76.
    Terminate,
    /// Report it on stderr and let the command finish.
    Ignore,
}

/// An error with the exit code it should produce.
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code,
            error: error.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure::new(exit::SOFTWARE, error)
    }
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
    match dispatch(cli) {
        Ok(code) => code,
        Err(Failure { code, error }) => {
            eprintln!("distlock: {error:#}");
            ExitCode::from(code)
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode, Failure> {
    let url = cli.database_url;
    match cli.command {
        Command::Run(args) => run::run(url.as_deref(), args),
        Command::Locks { json } => locks::run(url.as_deref(), json),
        Command::Key { name } => {
            let key = distlock::LockKey::name(&name);
            println!("{}", key.as_id().unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { threads, duration } => {
            if threads == 0 {
                return Err(Failure::new(
                    exit::USAGE,
                    anyhow::anyhow!("--threads must be positive"),
                ));
            }
            Ok(demo::run(url.as_deref(), threads, duration)?)
        }
        Command::Bench { per_case, json } => Ok(bench::run(url.as_deref(), per_case, &json)?),
        Command::Cluster { command } => Ok(cluster::run(&command)?),
        Command::Child { parent, command } => Ok(child::exec(parent, &command)),
    }
}

//! The command's side of `distlock run`: dies with distlock, then becomes the command.
//!
//! `distlock run` does not spawn the command directly. It spawns itself as
//! `distlock __child --parent PID -- COMMAND...`, which, before anything else, asks Linux to send
//! it SIGKILL when its parent dies (`PR_SET_PDEATHSIG`), checks that the parent is still the one
//! that started it (if distlock died in between, no signal would ever come), and then replaces
//! itself with the command (`exec`): same process, same pid, so signals forwarded to that pid
//! reach the command itself. Were distlock killed with SIGKILL, the server would free its lock at
//! once, and a command left running would run beside the next holder; with this, it cannot.
//!
//! Elsewhere than Linux there is no parent-death signal: the command is spawned directly, and
//! survives a distlock killed with SIGKILL (other signals are forwarded to it, as on Linux).

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use crate::exit;

/// The hidden subcommand's arguments.
#[derive(clap::Args)]
pub struct Args {
    /// The pid of the `distlock run` that started this.
    #[arg(long)]
    parent: u32,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// The hidden subcommand's name.
pub const SUBCOMMAND: &str = "__child";

/// The command line that runs `command` as a child of this process that dies with it.
pub fn command(command: &[String]) -> Option<Command> {
    let (program, rest) = command.split_first()?;
    if cfg!(target_os = "linux") {
        // /proc/self/exe is this very binary, even if its file was replaced or removed since.
        let mut child = Command::new("/proc/self/exe");
        child
            .arg(SUBCOMMAND)
            .arg("--parent")
            .arg(std::process::id().to_string())
            .arg("--")
            .arg(program)
            .args(rest);
        Some(child)
    } else {
        let mut child = Command::new(program);
        child.args(rest);
        Some(child)
    }
}

/// Runs in the child: arrange to die with `parent`, then become `command`. Returns only on error.
pub fn exec(args: Args) -> ExitCode {
    let Args { parent, command } = args;
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Signal, getppid, set_parent_process_death_signal};
        if let Err(e) = set_parent_process_death_signal(Some(Signal::KILL)) {
            eprintln!("distlock: cannot tie the command to distlock's life: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
        // The signal is only sent for a death after the call above: check that it has not
        // happened already.
        if getppid().map(|p| p.as_raw_pid()) != i32::try_from(parent).ok() {
            eprintln!("distlock: distlock ended before the command started; not running it");
            return ExitCode::from(exit::LOST);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = parent;
    let Some((program, rest)) = command.split_first() else {
        eprintln!("distlock: no command given after --");
        return ExitCode::from(exit::USAGE);
    };
    let error = Command::new(program).args(rest).exec();
    eprintln!("distlock: cannot run {program}: {error}");
    ExitCode::from(match error.kind() {
        std::io::ErrorKind::NotFound => exit::NOT_FOUND,
        _ => exit::NOT_EXECUTABLE,
    })
}

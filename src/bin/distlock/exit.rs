//! Exit codes of `distlock` itself (`run` otherwise exits with its command's status), and the
//! error type that carries one.

use std::process::ExitCode;

/// Bad usage: an unknown flag, a missing command, a malformed duration or connection string, an
/// unusable host list, no server given.
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
/// The server's advisory locks would exclude nobody (a server that only looks like PostgreSQL,
/// or lock functions shadowed on the search path): nothing is run.
pub const NO_EXCLUSION: u8 = 78;
/// `run`: the command exists but could not be executed.
pub const NOT_EXECUTABLE: u8 = 126;
/// `run`: the command was not found.
pub const NOT_FOUND: u8 = 127;

/// An error with the exit code it should produce.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code,
            error: error.into(),
        }
    }

    /// Reports the failure on stderr and turns it into the process's exit code.
    pub fn report(self) -> ExitCode {
        eprintln!("distlock: {:#}", self.error);
        ExitCode::from(self.code)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure::new(SOFTWARE, error)
    }
}

/// A child's status as a shell reports it: its code, or 128 + the signal that ended it.
pub fn of_status(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(255),
        (None, None) => 1,
    }
}

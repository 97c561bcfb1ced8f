//! Skipping a test that cannot run here, visibly.
//!
//! A test that needs something this machine or this run lacks (root, a network namespace, a
//! pooler, a cluster of its own rather than `DATABASE_URL`) calls [`skip`] and returns. By default
//! that prints why on standard error and the test passes, so that a developer without root still
//! runs the rest. With [`REQUIRE_ALL`] set to `1` (as CI sets it), a skip fails the test instead:
//! a run that was meant to prove everything cannot pass while proving less.

/// The environment variable that turns every skip into a failure when it is `1`.
pub const REQUIRE_ALL: &str = "DISTLOCK_TEST_REQUIRE_ALL";

/// Whether skips fail this run ([`REQUIRE_ALL`] is `1`).
pub fn skips_fail() -> bool {
    std::env::var(REQUIRE_ALL).is_ok_and(|v| v.trim() == "1")
}

/// Says on standard error that the calling test is skipped and why; panics instead when
/// [`REQUIRE_ALL`] is `1`. The caller returns right after.
#[track_caller]
pub fn skip(why: &str) {
    if skips_fail() {
        panic!("a test was skipped although {REQUIRE_ALL}=1 requires it to run: {why}");
    }
    eprintln!("skipped: {why}");
}

/// `Some(url)` when `DATABASE_URL` is set and not empty: the server a test that needs a cluster of
/// its own must not use (it then calls [`skip`]).
pub fn database_url() -> Option<String> {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// Where a program a test needs is installed: the first of `PATH`, `/usr/sbin` and `/usr/bin` that
/// has it (Debian installs pgbouncer and pgpool-II in `/usr/sbin`, which a user's `PATH` may lack).
/// `.ci/run` looks in the same places before it installs one.
pub fn find_program(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin"].map(std::path::PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

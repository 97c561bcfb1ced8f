//! Private network namespaces for tests that cut a network silently: the test binary runs one of
//! its own tests again inside `unshare -n` (root), with its own loopback to take down.

use std::process::Command;

/// Set in the re-executed test process that runs inside the namespace: which scenario.
pub const INSIDE: &str = "DISTLOCK_NETNS_SCENARIO";

/// Runs the test `runner` of this binary in a private network namespace with [`INSIDE`] set to
/// `scenario`; returns its stderr, or `None` (said why) where the machine does not allow
/// namespaces.
pub fn in_namespace(runner: &str, scenario: &str) -> Option<String> {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["-n", "--"])
        .arg(&exe)
        .args(["--exact", runner, "--nocapture", "--test-threads=1"])
        .env(INSIDE, scenario)
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            distlock::testing::skip(&format!(
                "cannot run unshare ({e}); this test needs a network namespace"
            ));
            return None;
        }
    };
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() && err.contains("unshare failed") {
        distlock::testing::skip(&format!(
            "this machine forbids network namespaces (unshare -n needs root): {}",
            err.trim()
        ));
        return None;
    }
    assert!(
        out.status.success(),
        "scenario {scenario} failed:\n{}\n{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    Some(err)
}

/// Runs `ip` (iproute2) with `args`; panics when it fails.
pub fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("ip (iproute2)");
    assert!(status.success(), "ip {args:?}");
}

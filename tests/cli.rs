//! The `distlock` command, end to end: the built binary against this binary's throwaway cluster.

mod common;

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use distlock::LockKey;

fn distlock() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_distlock"));
    cmd.env("DATABASE_URL", url())
        .env_remove("PGHOST")
        .env_remove("PGAPPNAME")
        .stdin(Stdio::null());
    cmd
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("run distlock")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Starts `distlock run` in the background and waits until its lock shows in pg_locks.
fn hold(args: &[&str], key: &str, holders_expected: usize) -> Child {
    let child = distlock()
        .arg("run")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut outside = plain();
    assert!(
        eventually(Duration::from_secs(10), || {
            holders(&mut outside, LockKey::name(key)).len() >= holders_expected
        }),
        "the background run never took {key}"
    );
    child
}

fn wait_exit(child: &mut Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "distlock did not exit within {limit:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_run_waits_like_flock_or_exits_75_without_waiting() {
    let key = "cli/flock";
    let started = Instant::now();
    let mut first = hold(&["--key", key, "--", "sleep", "1.5"], key, 1);

    let out = output(distlock().args(["run", "--key", key, "--no-wait", "--", "echo", "ran"]));
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    assert!(
        out.stdout.is_empty(),
        "the command must not run without the lock"
    );

    let out = output(distlock().args([
        "run",
        "--key",
        key,
        "--no-wait",
        "--conflict-exit-code",
        "3",
        "--",
        "true",
    ]));
    assert_eq!(code(&out), 3);

    let before = Instant::now();
    let out = output(distlock().args(["run", "--key", key, "--wait", "200ms", "--", "true"]));
    assert_eq!(code(&out), 75);
    assert!(before.elapsed() >= Duration::from_millis(200));

    // Without --wait it waits for as long as it takes: until the first run's command ends.
    let out = output(distlock().args(["run", "--key", key, "--", "echo", "second"]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "second\n");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "ran before the holder finished"
    );
    assert_eq!(wait_exit(&mut first, Duration::from_secs(10)), 0);
}

#[test]
fn shared_runs_overlap_and_an_exclusive_run_waits_for_all_of_them() {
    let key = "cli/shared";
    let started = Instant::now();
    let mut a = hold(&["--key", key, "--shared", "--", "sleep", "1.5"], key, 1);
    let mut b = hold(&["--key", key, "--shared", "--", "sleep", "1.5"], key, 2);
    let mut outside = plain();
    let modes: Vec<String> = holders(&mut outside, LockKey::name(key))
        .into_iter()
        .map(|h| h.1)
        .collect();
    assert_eq!(
        modes,
        vec!["ShareLock", "ShareLock"],
        "both shared runs hold the key at once"
    );

    let out = output(distlock().args(["run", "--key", key, "--no-wait", "--", "true"]));
    assert_eq!(
        code(&out),
        75,
        "an exclusive run must not join shared holders"
    );
    let out = output(distlock().args(["run", "--key", key, "--", "true"]));
    assert_eq!(code(&out), 0);
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(wait_exit(&mut a, Duration::from_secs(10)), 0);
    assert_eq!(wait_exit(&mut b, Duration::from_secs(10)), 0);
}

#[test]
fn the_commands_status_is_forwarded_and_the_lock_released_even_after_a_crash() {
    let key = "cli/status";
    let mut outside = plain();
    let out = output(distlock().args(["run", "--key", key, "--", "sh", "-c", "exit 7"]));
    assert_eq!(code(&out), 7);
    let out = output(distlock().args(["run", "--key", key, "--", "sh", "-c", "kill -KILL $$"]));
    assert_eq!(
        code(&out),
        128 + 9,
        "a command killed by a signal exits 128+N"
    );
    assert!(
        plain_try_lock(&mut outside, LockKey::name(key)),
        "the lock was left held"
    );
    assert!(plain_unlock(&mut outside, LockKey::name(key)));

    let out = output(distlock().args(["run", "--key", key, "--", "/nonexistent/command"]));
    assert_eq!(code(&out), 127);
    assert!(stderr(&out).contains("cannot run /nonexistent/command"));
    assert!(plain_try_lock(&mut outside, LockKey::name(key)));
    assert!(plain_unlock(&mut outside, LockKey::name(key)));
}

#[test]
fn sigterm_to_distlock_reaches_the_command_and_the_lock_is_released() {
    let key = "cli/signal";
    let mut run = hold(&["--key", key, "--", "sleep", "30"], key, 1);
    let start = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(wait_exit(&mut run, Duration::from_secs(10)), 128 + 15);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the command did not get the signal"
    );
    let mut outside = plain();
    assert!(plain_try_lock(&mut outside, LockKey::name(key)));
    assert!(plain_unlock(&mut outside, LockKey::name(key)));
}

#[test]
fn a_lost_lock_terminates_the_command_with_exit_76() {
    let key = "cli/lost";
    let app = "cli-lost-test";
    let mut run = distlock()
        .env("PGAPPNAME", app)
        .args([
            "run",
            "--key",
            key,
            "--kill-after",
            "2s",
            "--",
            "sleep",
            "30",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut outside = plain();
    assert!(eventually(Duration::from_secs(10), || {
        holders(&mut outside, LockKey::name(key))
            == vec![(app.to_owned(), "ExclusiveLock".to_owned())]
    }));
    let killed = Instant::now();
    assert_eq!(kill_app(&mut outside, app), 1);
    assert_eq!(wait_exit(&mut run, Duration::from_secs(15)), 76);
    // One heartbeat (1 s) plus a round trip, then SIGTERM; sleep dies at once.
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "took {:?}",
        killed.elapsed()
    );
    let mut err = String::new();
    run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("lost the lock on cli/lost"), "{err}");
}

#[test]
fn locks_lists_a_held_lock_with_its_id_application_and_mode() {
    let key = "cli/locks";
    let id = LockKey::name(key).as_id().unwrap();
    let mut run = distlock()
        .env("PGAPPNAME", "cli-locks-test")
        .args(["run", "--key", key, "--shared", "--", "sleep", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut outside = plain();
    assert!(eventually(Duration::from_secs(10), || !holders(
        &mut outside,
        LockKey::name(key)
    )
    .is_empty()));

    let out = output(distlock().arg("locks"));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    let line = table
        .lines()
        .find(|l| l.starts_with(&id.to_string()))
        .unwrap_or_else(|| panic!("{id} not in:\n{table}"));
    assert!(
        line.contains("shared") && line.contains("held") && line.contains("cli-locks-test"),
        "{line}"
    );

    let out = output(distlock().args(["locks", "--json"]));
    assert_eq!(code(&out), 0);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == serde_json::json!(id))
        .expect("the lock in the JSON");
    assert_eq!(row["mode"], "shared");
    assert_eq!(row["granted"], true);
    assert_eq!(row["application_name"], "cli-locks-test");
    assert!(row["pid"].as_i64().unwrap() > 0);
    assert_eq!(wait_exit(&mut run, Duration::from_secs(10)), 0);
}

#[test]
fn key_prints_the_librarys_id() {
    for name in ["test-key", "nightly-report", ""] {
        let out = output(distlock().args(["key", name]));
        assert_eq!(code(&out), 0);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            LockKey::name(name).as_id().unwrap().to_string()
        );
    }
    let out = output(distlock().args(["key", "test-key"]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "-8571056458571921465\n"
    );
}

#[test]
fn bad_input_gets_one_readable_line_and_its_exit_code() {
    let refused_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = format!("host=127.0.0.1 port={refused_port} user=postgres connect_timeout=2");
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec![
                "--database-url",
                "postgres://[::1",
                "run",
                "--key",
                "x",
                "--",
                "true",
            ],
            64,
            "invalid connection string",
        ),
        (
            vec![
                "--database-url",
                &unreachable,
                "run",
                "--key",
                "x",
                "--",
                "true",
            ],
            69,
            "cannot connect",
        ),
        (
            vec!["--database-url", &unreachable, "locks"],
            69,
            "cannot connect",
        ),
        (vec!["run", "--key", "x"], 64, "required"),
        (
            vec!["run", "--key", "x", "--bogus", "--", "true"],
            64,
            "unexpected argument",
        ),
        (
            vec!["run", "--key", "x", "--wait", "soon", "--", "true"],
            64,
            "not a duration",
        ),
        (
            vec![
                "run",
                "--key",
                "x",
                "--wait",
                "1s",
                "--no-wait",
                "--",
                "true",
            ],
            64,
            "cannot be used with",
        ),
        (vec!["frobnicate"], 64, "unrecognized subcommand"),
    ];
    for (args, expected, message) in cases {
        let out = output(distlock().args(&args));
        let err = stderr(&out);
        assert_eq!(code(&out), expected, "{args:?}: {err}");
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{args:?}: {err}"
        );
    }
    // No server at all: run and locks say so; they never fall back to a local cluster.
    for args in [vec!["locks"], vec!["run", "--key", "x", "--", "true"]] {
        let out = output(distlock().env_remove("DATABASE_URL").args(&args));
        assert_eq!(code(&out), 64);
        assert!(stderr(&out).contains("no server given"), "{}", stderr(&out));
    }
}

#[test]
fn the_demo_runs_and_finds_no_overlap() {
    let out = output(distlock().args(["demo", "--threads", "2", "--duration", "1s"]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("overlapping holds: 0"), "{text}");
    assert!(text.contains("locks left held:   0"), "{text}");
    assert!(
        text.contains("ok: no two holders ever overlapped"),
        "{text}"
    );
}

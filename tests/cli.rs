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
    hold_with(distlock(), args, key, holders_expected)
}

/// As [`hold`], from a prepared command (extra environment, say).
fn hold_with(mut cmd: Command, args: &[&str], key: &str, holders_expected: usize) -> Child {
    let child = cmd
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
fn locks_lists_a_held_lock_with_its_name_id_application_and_mode() {
    let key = "cli/locks";
    let id = LockKey::name(key).as_id().unwrap();
    let mut run = distlock()
        .env("PGAPPNAME", "cli-locks-test")
        .args(["run", "--key", key, "--shared", "--", "sleep", "5"])
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

    // `distlock run` records the names of its keys: the table names the lock.
    let mut table = String::new();
    assert!(
        eventually(Duration::from_secs(4), || {
            let out = output(distlock().arg("locks"));
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            table = String::from_utf8_lossy(&out.stdout).into_owned();
            table.lines().any(|l| l.starts_with("cli/locks "))
        }),
        "{key} not named in:\n{table}"
    );
    let line = table.lines().find(|l| l.starts_with("cli/locks ")).unwrap();
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
    assert_eq!(row["names"], serde_json::json!([key]));
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
        (
            vec!["--database-url", "", "run", "--key", "x", "--", "true"],
            64,
            "empty connection string",
        ),
        (
            vec!["--database-url", "host=a,b,c port=1,2 user=x", "locks"],
            64,
            "3 hosts but 2 ports",
        ),
        (
            vec![
                "--database-url",
                "host=a,b,c port=1,2 user=x",
                "run",
                "--key",
                "x",
                "--",
                "true",
            ],
            64,
            "3 hosts but 2 ports",
        ),
        (
            vec![
                "run",
                "--key",
                "x",
                "--wait",
                "99999999999999999999999h",
                "--",
                "true",
            ],
            64,
            "out of range",
        ),
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

/// Creates a login role with a password on the local cluster (once) and returns the cluster's
/// port; `None` (said why) when the server comes from `DATABASE_URL`.
fn role_on_local_cluster(role: &str, password: &str) -> Option<u16> {
    let Some(port) = cluster().port() else {
        distlock::testing::skip("needs the local cluster, whose roles this test may create");
        return None;
    };
    plain()
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {role} LOGIN PASSWORD '{password}'; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))
        .unwrap();
    Some(port)
}

/// True while `pid` exists and is not a zombie.
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // "pid (comm) S ...": the state follows the last ')'.
            stat.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn temp_path(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("distlock-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn a_distlock_killed_with_sigkill_takes_its_command_with_it() {
    if !cfg!(target_os = "linux") {
        distlock::testing::skip("only Linux has a parent-death signal");
        return;
    }
    let key = "cli/sigkill";
    let pidfile = temp_path("sigkill.pid");
    let script = format!("echo $$ > {}; exec sleep 60", pidfile.display());
    let mut run = hold(&["--key", key, "--", "sh", "-c", &script], key, 1);
    assert!(eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&pidfile).is_ok_and(|t| t.ends_with('\n'))
    }));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(running(pid));
    run.kill().unwrap(); // SIGKILL: distlock gets no chance to do anything
    run.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !running(pid)),
        "the command outlived distlock and would run beside the next holder"
    );
    // The lock is free, and nothing of the old run is left running beside the new one.
    let out = output(distlock().args(["run", "--key", key, "--no-wait", "--", "true"]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let _ = std::fs::remove_file(&pidfile);
}

#[test]
fn a_signal_before_the_command_starts_keeps_it_from_starting_and_frees_the_lock() {
    let key = "cli/early-signal";
    let marker = temp_path("early-signal.ran");
    let mut paused = distlock();
    paused.env("DISTLOCK_INTERNAL_PAUSE_BEFORE_SPAWN_MS", "3000");
    let marker_arg = marker.to_string_lossy().into_owned();
    let mut run = hold_with(paused, &["--key", key, "--", "touch", &marker_arg], key, 1);
    let mut outside = plain();
    // distlock holds the lock and has not started the command yet.
    let status = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(wait_exit(&mut run, Duration::from_secs(10)), 128 + 15);
    let mut err = String::new();
    run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("not running it"), "{err}");
    thread::sleep(Duration::from_millis(200));
    assert!(
        !marker.exists(),
        "the command ran after distlock was told to stop"
    );
    assert!(plain_try_lock(&mut outside, LockKey::name(key)));
    assert!(plain_unlock(&mut outside, LockKey::name(key)));
}

#[test]
fn the_command_does_not_inherit_distlocks_connection_secrets_unless_asked() {
    let key = "cli/secrets";
    let url_with_secret = format!("{} password=url-secret-123", url());
    let env_of_child = |extra: &[&str]| {
        let out = output(
            distlock()
                .env("DATABASE_URL", &url_with_secret)
                .env("PGPASSWORD", "env-secret-456")
                .env("UNRELATED_SETTING", "kept")
                .args(["run", "--key", key])
                .args(extra)
                .args(["--", "env"]),
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let env = env_of_child(&[]);
    assert!(env.contains("UNRELATED_SETTING=kept"), "{env}");
    assert!(!env.contains("url-secret-123"), "{env}");
    assert!(!env.contains("env-secret-456"), "{env}");
    assert!(!env.contains("DATABASE_URL="), "{env}");
    let env = env_of_child(&["--keep-db-env"]);
    assert!(env.contains("url-secret-123"), "{env}");
    assert!(env.contains("PGPASSWORD=env-secret-456"), "{env}");
    // The help says where a password is safer than on the command line.
    let out = output(distlock().args(["run", "--help"]));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("visible to every user"), "{help}");
    assert!(help.contains("--keep-db-env"), "{help}");
}

#[test]
fn extreme_durations_mean_forever_and_never_panic() {
    let key = "cli/durations";
    for wait in ["5000000000000000h", "0s", "0.000000001s"] {
        let out = output(distlock().args([
            "run",
            "--key",
            key,
            "--wait",
            wait,
            "--kill-after",
            "5000000000000000h",
            "--",
            "true",
        ]));
        assert_eq!(code(&out), 0, "--wait {wait}: {}", stderr(&out));
    }
    // Held elsewhere: a zero wait gives up at once, a huge one waits until the holder leaves.
    let mut outside = plain();
    assert!(plain_try_lock(&mut outside, LockKey::name(key)));
    let out = output(distlock().args(["run", "--key", key, "--wait", "0s", "--", "true"]));
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    let mut run = distlock()
        .args([
            "run",
            "--key",
            key,
            "--wait",
            "5000000000000000h",
            "--",
            "true",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // It waits: queued in the server's lock queue, still running.
    assert!(eventually(Duration::from_secs(10), || {
        outside
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND objid::int8 = $1",
                &[&i64::from(LockKey::name(key).pg_locks_tag().1)],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1
    }));
    assert!(run.try_wait().unwrap().is_none(), "it waits");
    assert!(plain_unlock(&mut outside, LockKey::name(key)));
    assert_eq!(wait_exit(&mut run, Duration::from_secs(10)), 0);
}

#[test]
fn a_password_file_is_used_like_libpq_and_ignored_when_others_can_read_it() {
    let Some(port) = role_on_local_cluster("distlock_pgpass", "pgpass-secret") else {
        return;
    };
    let passfile = temp_path("pgpass");
    std::fs::write(
        &passfile,
        format!("# comment\nother:*:*:*:wrong\n127.0.0.1:{port}:*:distlock_pgpass:pgpass-secret\n"),
    )
    .unwrap();
    let set_mode = |mode| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let run = || {
        output(
            distlock()
                .env(
                    "DATABASE_URL",
                    format!("host=127.0.0.1 port={port} user=distlock_pgpass dbname=postgres"),
                )
                .env("PGPASSFILE", &passfile)
                .env_remove("PGPASSWORD")
                .args(["run", "--key", "cli/pgpass", "--", "true"]),
        )
    };
    set_mode(0o600);
    let out = run();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    set_mode(0o644);
    let out = run();
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("group or world access"),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_file(&passfile);
}

#[test]
fn a_rejected_password_never_appears_in_the_commands_output() {
    let Some(port) = role_on_local_cluster("distlock_cli_pw", "the-right-one") else {
        return;
    };
    let base = format!("host=127.0.0.1 port={port} user=distlock_cli_pw dbname=postgres");
    for (url, env_password) in [
        (format!("{base} password=url-wrong-secret-31"), None),
        (base.clone(), Some("env-wrong-secret-32")),
    ] {
        for args in [vec!["run", "--key", "cli/pw", "--", "true"], vec!["locks"]] {
            let mut cmd = distlock();
            cmd.env("DATABASE_URL", &url).env_remove("PGPASSWORD");
            if let Some(p) = env_password {
                cmd.env("PGPASSWORD", p);
            }
            let out = output(cmd.args(&args));
            assert_eq!(code(&out), 69, "{args:?}: {}", stderr(&out));
            let shown = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
            assert!(!shown.contains("wrong-secret"), "{args:?}: {shown}");
            assert!(shown.contains("password"), "the reason is said: {shown}");
        }
    }
    // PGPASSWORD serves a connection string without a password, as in libpq.
    let out = output(
        distlock()
            .env("DATABASE_URL", &base)
            .env("PGPASSWORD", "the-right-one")
            .args(["run", "--key", "cli/pw", "--", "true"]),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn fence_passes_a_growing_token_to_the_command() {
    let token = |_: usize| -> u64 {
        let out = output(distlock().args([
            "run",
            "--key",
            "cli/fence",
            "--fence",
            "--",
            "sh",
            "-c",
            "echo \"$DISTLOCK_TOKEN\"",
        ]));
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("DISTLOCK_TOKEN is a number")
    };
    let tokens: Vec<u64> = (0..3).map(token).collect();
    assert!(tokens.windows(2).all(|w| w[1] > w[0]), "{tokens:?}");
    // Without --fence there is no token.
    let out = output(distlock().args([
        "run",
        "--key",
        "cli/fence",
        "--",
        "sh",
        "-c",
        "echo \"[${DISTLOCK_TOKEN-unset}]\"",
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[unset]");
}

#[test]
fn limit_runs_at_most_n_commands_at_once_and_locks_shows_the_slots() {
    let key = "cli/limit";
    let slot0 = LockKey::name(key).permit_slot(0);
    let slot1 = LockKey::name(key).permit_slot(1);
    let spawn = || {
        distlock()
            .env("PGAPPNAME", "cli-limit-test")
            .args(["run", "--key", key, "--limit", "2", "--", "sleep", "3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    let mut second = spawn();
    let mut outside = plain();
    assert!(
        eventually(Duration::from_secs(10), || {
            holders(&mut outside, slot0).len() == 1 && holders(&mut outside, slot1).len() == 1
        }),
        "two permits were not taken"
    );
    let limited = |extra: &[&str]| {
        let mut args = vec!["run", "--key", key, "--limit", "2"];
        args.extend_from_slice(extra);
        output(distlock().args(args))
    };
    let out = limited(&["--no-wait", "--", "true"]);
    assert_eq!(code(&out), 75, "a third holder got in: {}", stderr(&out));
    let out = output(distlock().arg("locks"));
    let table = String::from_utf8_lossy(&out.stdout);
    let slots = table
        .lines()
        .filter(|l| l.contains("cli-limit-test") && l.starts_with("semaphore "))
        .count();
    assert_eq!(slots, 2, "{table}");
    let out = output(distlock().args(["locks", "--json"]));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let permits: Vec<u64> = json
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["application_name"] == "cli-limit-test")
        .filter_map(|r| r["permit"]["slot"].as_u64())
        .collect();
    assert_eq!(permits.len(), 2, "{json}");
    assert_eq!(wait_exit(&mut first, Duration::from_secs(15)), 0);
    assert_eq!(wait_exit(&mut second, Duration::from_secs(15)), 0);
    // The slot reaches the command; bad limits are usage errors.
    let out = limited(&["--", "sh", "-c", "echo $DISTLOCK_SLOT"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    for bad in ["0", "10001", "-1", "x"] {
        let out = output(distlock().args(["run", "--key", key, "--limit", bad, "--", "true"]));
        assert_eq!(code(&out), 64, "--limit {bad}: {}", stderr(&out));
    }
    let out = output(distlock().args([
        "run", "--key", key, "--limit", "2", "--shared", "--", "true",
    ]));
    assert_eq!(code(&out), 64);
}

/// Runs `distlock run --key key` with `extra` flags around `sh -c script`, named `app`, and waits
/// until it holds its lock.
fn run_script(app: &str, key: &str, extra: &[&str], script: &str) -> Child {
    let mut cmd = distlock();
    cmd.env("PGAPPNAME", app).args(["run", "--key", key]);
    cmd.args(extra).args(["--", "sh", "-c", script]);
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut outside = plain();
    assert!(
        eventually(Duration::from_secs(10), || holders(
            &mut outside,
            LockKey::name(key)
        )
        .len()
            == 1),
        "the run never took {key}"
    );
    child
}

fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

#[test]
fn a_command_that_ignores_sigterm_after_a_loss_gets_sigkill_after_kill_after() {
    let (key, app) = ("cli/kill-after", "cli-kill-after");
    let marks = temp_path("kill-after-marks");
    let script = format!(
        "trap 'echo term >> {m}' TERM; echo $$ > {m}.pid; while :; do sleep 0.1; done",
        m = marks.display()
    );
    let mut run = run_script(app, key, &["--kill-after", "1s"], &script);
    assert!(eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("{}.pid", marks.display()))
            .is_ok_and(|p| p.trim().parse::<i32>().is_ok())
    }));
    let pid: i32 = std::fs::read_to_string(format!("{}.pid", marks.display()))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut outside = plain();
    let killed = Instant::now();
    assert_eq!(kill_app(&mut outside, app), 1);
    assert_eq!(wait_exit(&mut run, Duration::from_secs(15)), 76);
    let took = killed.elapsed();
    // Told within a heartbeat (1 s) and a round trip; SIGTERM, ignored; SIGKILL 1 s later.
    assert!(
        took >= Duration::from_secs(1),
        "exited after {took:?}: before --kill-after"
    );
    assert!(took < Duration::from_secs(4), "exited after {took:?}");
    assert!(
        std::fs::read_to_string(&marks).is_ok_and(|m| m.contains("term")),
        "the command never got SIGTERM"
    );
    assert!(!running(pid), "the command survived its SIGKILL");
    assert!(stderr_of(&mut run).contains("SIGKILL in 1s"));
    let _ = std::fs::remove_file(&marks);
    let _ = std::fs::remove_file(format!("{}.pid", marks.display()));
}

#[test]
fn on_lost_ignore_lets_the_command_finish_and_exits_with_its_status() {
    let (key, app) = ("cli/on-lost-ignore", "cli-on-lost-ignore");
    let mut run = run_script(app, key, &["--on-lost", "ignore"], "sleep 2; exit 7");
    let started = Instant::now();
    let mut outside = plain();
    assert_eq!(kill_app(&mut outside, app), 1);
    assert_eq!(wait_exit(&mut run, Duration::from_secs(15)), 7);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the command was cut short after {:?}",
        started.elapsed()
    );
    let err = stderr_of(&mut run);
    assert!(
        err.contains("lost the lock on cli/on-lost-ignore") && err.contains("keeps running"),
        "{err}"
    );
}

#[test]
fn sigint_and_sighup_to_distlock_reach_the_command() {
    for (signal, number) in [("INT", 2), ("HUP", 1)] {
        let key = format!("cli/forward-{signal}");
        let marks = temp_path(&format!("forward-{signal}"));
        // The command says which signal it got, and exits with a status of its own.
        let script = format!(
            "trap 'echo {signal} > {m}; exit 3' {signal}; while :; do sleep 0.1; done",
            m = marks.display()
        );
        let mut run = run_script(&format!("cli-forward-{signal}"), &key, &[], &script);
        thread::sleep(Duration::from_millis(200));
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(run.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(
            wait_exit(&mut run, Duration::from_secs(10)),
            3,
            "SIG{signal} ({number}) did not reach the command"
        );
        assert_eq!(
            std::fs::read_to_string(&marks).unwrap_or_default().trim(),
            signal
        );
        let mut outside = plain();
        assert!(plain_try_lock(&mut outside, LockKey::name(&key)));
        assert!(plain_unlock(&mut outside, LockKey::name(&key)));
        let _ = std::fs::remove_file(&marks);
    }
}

/// The live waiting line on a real terminal: `distlock run` inside tmux, waiting behind a holder.
#[test]
fn a_waiting_run_on_a_terminal_shows_who_holds_the_lock() {
    let Some(tmux) = distlock::testing::find_program("tmux") else {
        distlock::testing::skip("tmux is not installed (apt-get install tmux; .ci/run does)");
        return;
    };
    let key = "cli/live-line";
    let mut holder = run_script("cli-live-holder", key, &[], "sleep 30");
    let session = format!("distlock-test-{}", std::process::id());
    let done = temp_path("live-line-done");
    let _ = std::fs::remove_file(&done);
    let inner = format!(
        "DATABASE_URL='{}' {} run --key {key} -- true; echo exit=$? > {}; sleep 30",
        url(),
        env!("CARGO_BIN_EXE_distlock"),
        done.display()
    );
    let tmux = Tmux::start(&tmux, &session, 160, 10, &inner);
    let screen = || tmux.screen(false);
    // What a person sees: how long it has waited, for which key, and the holder's application.
    let mut seen = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            seen = screen();
            seen.contains("distlock: waiting")
                && seen.contains("cli/live-line")
                && seen.contains("cli-live-holder")
        }),
        "the terminal showed:\n{seen}"
    );
    let first = seen.clone();
    // The line is refreshed in place: the waited time moves, and it stays one line.
    assert!(
        eventually(Duration::from_secs(5), || {
            seen = screen();
            seen != first
        }),
        "the line never changed:\n{seen}"
    );
    assert_eq!(
        seen.lines()
            .filter(|l| l.contains("distlock: waiting"))
            .count(),
        1,
        "{seen}"
    );
    // Released: the run takes the lock, runs `true`, and clears the line.
    let status = Command::new("kill")
        .args(["-TERM", &holder.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_exit(&mut holder, Duration::from_secs(10));
    assert!(
        eventually(Duration::from_secs(10), || std::fs::read_to_string(&done)
            .is_ok_and(|d| d.trim() == "exit=0")),
        "the waiting run did not finish"
    );
    let after = screen();
    assert!(
        !after.contains("distlock: waiting"),
        "the line was not cleared:\n{after}"
    );
    let _ = std::fs::remove_file(&done);
}

/// `distlock run` names its session after its key, and `distlock locks --key NAME` shows that
/// name's lock alone: its holder, then its queue.
#[test]
fn locks_key_shows_one_named_lock_with_its_holder_and_queue() {
    let key = "cli/named-job";
    let mut holder = hold(&["--key", key, "--", "sleep", "30"], key, 1);
    let mut waiter = distlock()
        .args(["run", "--key", key, "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut outside = plain();
    assert!(eventually(Duration::from_secs(10), || {
        outside
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE \
                 'distlock run cli/named-job%' AND wait_event = 'advisory'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1
    }));
    // Something else held meanwhile, which the filter leaves out.
    let other = LockKey::name("cli/other-job");
    assert!(plain_try_lock(&mut outside, other));
    let out = output(distlock().args(["locks", "--key", key]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(key)).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("held") && lines[0].contains("distlock run cli/named-job"),
        "{text}"
    );
    assert!(
        lines[1].contains("waiting") && lines[1].contains("distlock run cli/named-job"),
        "{text}"
    );
    let id = LockKey::name(key).as_id().unwrap().to_string();
    assert!(lines[0].contains(&id), "{text}");
    assert!(
        !text.contains(&other.as_id().unwrap().to_string()),
        "{text}"
    );
    let nobody = output(distlock().args(["locks", "--key", "cli/nobody"]));
    assert!(
        String::from_utf8_lossy(&nobody.stdout).contains("(nobody holds or waits for cli/nobody)")
    );
    assert!(plain_unlock(&mut outside, other));
    let _ = Command::new("kill")
        .args(["-TERM", &holder.id().to_string()])
        .status();
    wait_exit(&mut holder, Duration::from_secs(10));
    assert_eq!(wait_exit(&mut waiter, Duration::from_secs(10)), 0);
}

/// `distlock locks --watch` on a real terminal (tmux): holders, waiters with whom they wait
/// for, semaphore slots, a changed key marked, a resize followed, and `q` giving the terminal back.
#[test]
fn locks_watch_is_a_live_view_in_a_real_terminal() {
    let Some(tmux) = distlock::testing::find_program("tmux") else {
        distlock::testing::skip("tmux is not installed (apt-get install tmux; .ci/run does)");
        return;
    };
    let holder = distlock::LockManager::builder()
        .application_name("watch-holder")
        .connect(url())
        .unwrap();
    let held = holder.try_lock("cli/watch-a").unwrap().expect("free");
    let permit = holder
        .try_acquire_permit("cli/watch-sem", 2)
        .unwrap()
        .expect("a permit");
    let waiter = distlock::LockManager::builder()
        .application_name("watch-waiter")
        .connect(url())
        .unwrap();
    let waiting = {
        let waiter = waiter.clone();
        thread::spawn(move || waiter.try_lock_for("cli/watch-a", Duration::from_secs(60)))
    };
    let holder_pid: i32 = plain()
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'watch-holder'",
            &[],
        )
        .unwrap()
        .get(0);
    let session = format!("distlock-watch-{}", std::process::id());
    let done = temp_path("watch-done");
    let _ = std::fs::remove_file(&done);
    let inner = format!(
        "DATABASE_URL='{}' {} locks --watch 200ms; echo exit=$? > {}; sleep 30",
        url(),
        env!("CARGO_BIN_EXE_distlock"),
        done.display()
    );
    let tmux = Tmux::start(&tmux, &session, 220, 30, &inner);
    let screen = |escapes: bool| tmux.screen(escapes);
    let a = LockKey::name("cli/watch-a").as_id().unwrap().to_string();
    let mut seen = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            seen = screen(false);
            seen.contains("distlock locks --watch")
                && seen
                    .lines()
                    .any(|l| l.contains(&a) && l.contains("held") && l.contains("watch-holder"))
                && seen.lines().any(|l| {
                    l.contains(&a)
                        && l.contains("waiting")
                        && l.contains("watch-waiter")
                        && l.contains(&holder_pid.to_string())
                })
                && seen.contains("semaphore")
                && seen.contains("WAITS FOR")
        }),
        "the terminal showed:\n{seen}"
    );
    eprintln!("captured `distlock locks --watch` screen:\n{seen}");
    // A new holder: its key stands out (reverse video) at the next refresh.
    let b = LockKey::name("cli/watch-b");
    let new = holder.try_lock(b).unwrap().expect("free");
    let b_id = b.as_id().unwrap().to_string();
    assert!(
        eventually(Duration::from_secs(5), || {
            seen = screen(true);
            seen.lines()
                .any(|l| l.contains(&b_id) && l.contains("\u{1b}[7m"))
        }),
        "the new key was not marked:\n{seen}"
    );
    // Resized to 60 columns: the view follows, no line wider.
    let resized = tmux.run(&["resize-window", "-t", &session, "-x", "60", "-y", "30"]);
    assert!(
        resized.status.success(),
        "{}",
        String::from_utf8_lossy(&resized.stderr)
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            seen = screen(false);
            seen.contains("distlock locks --watch") && seen.lines().all(|l| l.chars().count() <= 60)
        }),
        "after the resize:\n{seen}"
    );
    // q quits, with status 0, and gives the main screen back.
    tmux.run(&["send-keys", "-t", &session, "q"]);
    assert!(
        eventually(Duration::from_secs(5), || std::fs::read_to_string(&done)
            .is_ok_and(|d| d.trim() == "exit=0")),
        "q did not quit"
    );
    let after = screen(false);
    assert!(
        !after.contains("distlock locks --watch"),
        "the screen was not restored:\n{after}"
    );
    drop((held, permit, new));
    assert!(waiting.join().unwrap().unwrap().is_some());
    let _ = std::fs::remove_file(&done);
}

/// `distlock locks --watch` names what it can: keys recorded by their managers (a held lock, its
/// waiter, whose connection says what it waits for, and a semaphore's slots), a key of a process
/// that records nothing named by `--names FILE`, and two names of one id shown together.
#[test]
fn locks_watch_shows_names_recorded_given_and_shared() {
    let Some(tmux) = distlock::testing::find_program("tmux") else {
        distlock::testing::skip("tmux is not installed (apt-get install tmux; .ci/run does)");
        return;
    };
    let recording = |app: &str| {
        distlock::LockManager::builder()
            .application_name(app)
            .record_names(true)
            .connect(url())
            .unwrap()
    };
    let holder = recording("names-holder");
    let held = holder.try_lock("cli/names-a").unwrap().expect("free");
    let permit = holder
        .try_acquire_permit("cli/names-sem", 2)
        .unwrap()
        .expect("a permit");
    let waiter = recording("names-waiter");
    let waiting = {
        let waiter = waiter.clone();
        thread::spawn(move || waiter.try_lock_for("cli/names-a", Duration::from_secs(60)))
    };
    // A process that records nothing (the Go original, say) holds "cli/names-go" by its id.
    let mut go = plain();
    let go_id = LockKey::name("cli/names-go").as_id().unwrap();
    go.execute("SELECT pg_advisory_lock($1)", &[&go_id])
        .unwrap();
    let file = temp_path("names-file");
    std::fs::write(&file, "cli/names-go\nsomething else\n").unwrap();
    // A second name of one id (as a collision would be): both are shown, neither alone.
    let b = LockKey::name("cli/names-b");
    let shared_id = holder.try_lock("cli/names-b").unwrap().expect("free");
    let mut outside = plain();
    assert!(eventually(Duration::from_secs(10), || {
        outside
            .query_one(
                "SELECT count(*) FROM public.distlock_names WHERE name LIKE 'cli/names-%'",
                &[],
            )
            .is_ok_and(|r| r.get::<_, i64>(0) >= 3)
    }));
    outside
        .execute(
            "INSERT INTO public.distlock_names VALUES ($1, 'cli/names-b-alias') \
             ON CONFLICT DO NOTHING",
            &[&b.as_id().unwrap()],
        )
        .unwrap();
    let session = format!("distlock-names-{}", std::process::id());
    let inner = format!(
        "DATABASE_URL='{}' {} locks --watch 200ms --names {}; sleep 30",
        url(),
        env!("CARGO_BIN_EXE_distlock"),
        file.display()
    );
    let tmux = Tmux::start(&tmux, &session, 220, 30, &inner);
    let mut seen = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            seen = tmux.screen(false);
            let line = |words: &[&str]| seen.lines().any(|l| words.iter().all(|w| l.contains(w)));
            line(&["cli/names-a ", "held", "names-holder"])
                && line(&[
                    "cli/names-a ",
                    "waiting",
                    "names-waiter (waiting: cli/names-a)",
                ])
                && line(&["semaphore cli/names-sem slot 0", "held", "names-holder"])
                && line(&["cli/names-go ", "held"])
                && line(&["cli/names-b | cli/names-b-alias ", "held"])
        }),
        "the terminal showed:\n{seen}"
    );
    eprintln!("captured `distlock locks --watch --names` screen:\n{seen}");
    assert!(!seen.contains(&go_id.to_string()), "{seen}");
    drop((held, permit, shared_id));
    assert!(waiting.join().unwrap().unwrap().is_some());
    let _ = std::fs::remove_file(&file);
}

/// `distlock locks --watch --key NAME`: the live view of one name's lock only.
#[test]
fn locks_watch_key_shows_only_that_names_lock() {
    let Some(tmux) = distlock::testing::find_program("tmux") else {
        distlock::testing::skip("tmux is not installed (apt-get install tmux; .ci/run does)");
        return;
    };
    let holder = distlock::LockManager::builder()
        .application_name("watch-key-holder")
        .connect(url())
        .unwrap();
    let mine = holder.try_lock("cli/watch-key").unwrap().expect("free");
    let other = holder
        .try_lock("cli/watch-key-other")
        .unwrap()
        .expect("free");
    let session = format!("distlock-watch-key-{}", std::process::id());
    let inner = format!(
        "DATABASE_URL='{}' {} locks --watch 200ms --key cli/watch-key; sleep 30",
        url(),
        env!("CARGO_BIN_EXE_distlock"),
    );
    let tmux = Tmux::start(&tmux, &session, 200, 20, &inner);
    let mine_id = LockKey::name("cli/watch-key").as_id().unwrap().to_string();
    let other_id = LockKey::name("cli/watch-key-other")
        .as_id()
        .unwrap()
        .to_string();
    let mut seen = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            seen = tmux.screen(false);
            seen.lines().any(|l| {
                l.starts_with("cli/watch-key = ") && l.contains(&mine_id) && l.contains("held")
            })
        }),
        "the terminal showed:\n{seen}"
    );
    assert!(!seen.contains(&other_id), "another key was shown:\n{seen}");
    assert!(seen.contains("1 held, 0 waiting"), "{seen}");
    drop((mine, other));
}

/// A tmux server of a test's own (its own socket), killed when dropped.
struct Tmux {
    program: std::path::PathBuf,
    socket: String,
}

impl Tmux {
    /// Runs `command` in a new detached session `socket` of `width` × `height` characters.
    fn start(
        program: &std::path::Path,
        socket: &str,
        width: u32,
        height: u32,
        command: &str,
    ) -> Tmux {
        let tmux = Tmux {
            program: program.to_owned(),
            socket: socket.to_owned(),
        };
        let (width, height) = (width.to_string(), height.to_string());
        let started = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            socket,
            "-x",
            &width,
            "-y",
            &height,
            command,
        ]);
        assert!(
            started.status.success(),
            "{}",
            String::from_utf8_lossy(&started.stderr)
        );
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.program)
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux")
    }

    /// What the pane shows now; with `escapes`, with its colours and attributes.
    fn screen(&self, escapes: bool) -> String {
        let args: &[&str] = if escapes {
            &["capture-pane", "-e", "-p"]
        } else {
            &["capture-pane", "-p"]
        };
        String::from_utf8_lossy(&self.run(args).stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

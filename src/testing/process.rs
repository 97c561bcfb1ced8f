//! The processes behind a throwaway cluster: running PostgreSQL's programs quietly and within a
//! bound, the watchdog that cleans up after a process that ends without dropping its cluster,
//! finding the binaries, and the user, directory and port a server gets.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{INSTALL_HINT, WATCHDOG};

pub(super) fn run_quietly(
    mut cmd: Command,
    dir: &Path,
    run_as: Option<(u32, u32)>,
    limit: Duration,
) -> io::Result<()> {
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
    let program = cmd.get_program().to_owned();
    let mut child = cmd.spawn().map_err(|e| annotate(e, &program))?;
    // Read stderr on the side so that a chatty command cannot block on a full pipe.
    let stderr = child.stderr.take();
    let reader = thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stderr {
            let _ = io::Read::read_to_string(&mut s, &mut text);
        }
        text
    });
    let status = wait_bounded(&mut child, limit)?;
    let text = reader.join().unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        let log_hint = dir.join("server.log");
        let log = fs::read_to_string(&log_hint).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        Err(io::Error::other(format!(
            "{} failed ({status}): {}{}",
            Path::new(&program).display(),
            text.trim(),
            if tail.is_empty() {
                String::new()
            } else {
                format!(
                    "\nserver log:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            }
        )))
    }
}

pub(super) fn wait_bounded(
    child: &mut Child,
    limit: Duration,
) -> io::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("command did not finish within {limit:?}"),
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn annotate(e: io::Error, program: &OsStr) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", Path::new(program).display()))
}

pub(super) fn spawn_watchdog(
    bin: &Path,
    data: &Path,
    root: &Path,
    run_as: Option<(u32, u32)>,
) -> io::Result<(Child, ChildStdin)> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(WATCHDOG)
        .arg(bin.join("pg_ctl"))
        .arg(data)
        .arg(root)
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
    // Its own process group: a Ctrl-C aimed at the test run must not kill the watchdog before it
    // has stopped the server.
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|e| annotate(e, OsStr::new("sh")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| io::Error::other("watchdog has no stdin"))?;
    stdin.flush()?;
    Ok((child, stdin))
}

/// `installation` if given, else the one named by [`super::PG_BIN`], if set; else `initdb` on
/// `PATH`, else the newest under `/usr/lib/postgresql`.
pub(super) fn find_bin_dir(installation: Option<&Path>) -> io::Result<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let named = installation
        .map(|dir| (dir.to_path_buf(), "the installation given"))
        .or_else(|| {
            env::var_os(super::PG_BIN)
                .filter(|d| !d.is_empty())
                .map(|dir| (PathBuf::from(dir), super::PG_BIN))
        });
    if let Some((dir, by)) = named {
        return if has_tools(&dir) {
            Ok(dir)
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{by} ({}) holds no initdb and pg_ctl", dir.display()),
            ))
        };
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            if has_tools(&dir) {
                // Links on PATH (Debian's wrappers, say) lead to the installation's own
                // directory, which has the other tools (pg_basebackup, pgbench) too.
                let real = fs::canonicalize(dir.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .filter(|real| has_tools(real));
                return Ok(real.unwrap_or(dir));
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, INSTALL_HINT))
}

pub(super) fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The uid and gid of the `postgres` OS user, from `/etc/passwd`.
pub(super) fn postgres_user() -> io::Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            if fields.next()? != "postgres" {
                return None;
            }
            let _password = fields.next()?;
            let uid = fields.next()?.parse().ok()?;
            let gid = fields.next()?.parse().ok()?;
            Some((uid, gid))
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "running as root, but there is no `postgres` OS user to run the server as \
                 (PostgreSQL refuses root); installing the postgresql package creates it",
            )
        })
}

pub(super) fn make_root_dir(run_as: Option<(u32, u32)>) -> io::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Unix socket paths are limited to about 100 bytes, so keep this short.
    let mut name = OsString::from("distlock-");
    name.push(format!(
        "{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let root = env::temp_dir().join(name);
    fs::create_dir(&root)?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(&root, Some(uid), Some(gid))?;
    }
    Ok(root)
}

pub(super) fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Writes a new cluster's `pg_hba.conf`, its settings (the throwaway defaults, then `setup`'s) and
/// `setup`'s files into `data`, the files owned by `run_as` when given.
pub(super) fn configure(
    data: &Path,
    setup: &super::Setup,
    run_as: Option<(u32, u32)>,
) -> io::Result<()> {
    // Superuser `postgres` needs no password; every other role must give a correct one, so
    // tests can check how a wrong password is reported. The set-up's rules come first: the
    // first matching line decides.
    let mut hba = String::new();
    for line in &setup.hba {
        hba.push_str(line);
        hba.push('\n');
    }
    hba.push_str(
        "local all all trust\n\
             local replication all trust\n\
             host replication postgres 127.0.0.1/32 trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all postgres ::1/128 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host all all ::1/128 scram-sha-256\n",
    );
    fs::write(data.join("pg_hba.conf"), hba)?;
    // A throwaway cluster's defaults first, so that the setup's own settings (later lines win)
    // can change them.
    let mut conf = String::from(
        "\n# distlock::testing defaults\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nmax_connections = 300\nshared_buffers = '32MB'\n\
             # distlock::testing::Setup\n",
    );
    for (name, value) in &setup.settings {
        conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
    }
    fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut f| f.write_all(conf.as_bytes()))?;
    for (name, contents) in &setup.files {
        let path = data.join(name);
        fs::write(&path, contents)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

//! A throwaway PostgreSQL cluster for tests, benchmarks and demos.
//!
//! [`TestCluster::from_env`] uses `DATABASE_URL` when it is set. Otherwise it runs `initdb` and starts
//! a server from a PostgreSQL installation — the directory of binaries [`PG_BIN`] names when it is
//! set, else the local one (`initdb` and `pg_ctl` on `PATH`, or the newest under
//! `/usr/lib/postgresql/*/bin`) — in a new directory under the system's temporary directory, listening
//! on a unix socket there and on a free loopback TCP port. When the process runs as root, the server
//! runs as the `postgres` OS user, since PostgreSQL refuses to run as root.
//!
//! The server is stopped and its directory removed when the [`TestCluster`] is dropped — and also
//! when the process ends without dropping it (a `static`, a panic, a kill): a small watchdog process
//! waits on a pipe from this process and cleans up once the pipe closes.
//!
//! This module is for development (the crate's own tests, benchmarks and `distlock demo` use it);
//! a deployment points the library at its real server. It is compiled only with the `testing`
//! feature (which the `cli` feature turns on), on Unix.

use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command};
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;

mod bouncer;
mod process;
mod skip;
mod standby;

pub use bouncer::{BouncerSetup, Pgbouncer};
pub use skip::{REQUIRE_ALL, database_url, find_program, skip, skips_fail};

use process::{
    configure, find_bin_dir, free_port, is_root, make_root_dir, postgres_user, run_quietly,
    spawn_watchdog, wait_bounded,
};

/// A PostgreSQL server to test against: a throwaway local cluster, or the one `DATABASE_URL` names.
#[derive(Debug)]
pub struct TestCluster {
    /// Connection parameters for the superuser.
    url: String,
    /// Present when this process started the server.
    local: Option<Local>,
}

/// Extra configuration for [`TestCluster::start_with`].
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// `pg_hba.conf` lines placed before the default rules (the first matching line decides).
    pub hba: Vec<String>,
    /// `postgresql.conf` settings, `(name, value)`.
    pub settings: Vec<(String, String)>,
    /// Files written into the data directory, `(name, contents)`, readable by the server only
    /// (certificates and keys, say).
    pub files: Vec<(String, Vec<u8>)>,
    /// SQL the superuser runs once the server is up (roles, say).
    pub sql: Vec<String>,
    /// Directories for more unix-domain sockets, besides the cluster's own directory (the default
    /// socket directory, say: [`default_socket_dir`]).
    pub socket_dirs: Vec<PathBuf>,
    /// The PostgreSQL installation to run: a directory holding `initdb`, `pg_ctl` and `postgres`.
    /// `None`: the one [`PG_BIN`] names, else the local one.
    pub installation: Option<PathBuf>,
}

/// Where a connection whose parameters name no host looks for the server's socket, as libpq does:
/// `/var/run/postgresql` where it exists, else `/tmp`.
pub fn default_socket_dir() -> &'static Path {
    crate::libpq::params::default_socket_dir()
}

/// A cluster this process started.
#[derive(Debug)]
struct Local {
    /// Holds the data directory and the socket.
    root: PathBuf,
    /// The data directory.
    data: PathBuf,
    /// The directory holding `pg_ctl`, `initdb`, `postgres`.
    bin: PathBuf,
    /// The TCP port on 127.0.0.1.
    port: u16,
    /// The unix-domain socket directories, comma-separated (the root first).
    sockets: String,
    /// `(uid, gid)` to run the server as, when this process is root.
    run_as: Option<(u32, u32)>,
    /// The watchdog and the write end of its pipe; dropping the pipe makes it stop the server.
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
}

/// The environment variable that points the test clusters at a PostgreSQL installation: a
/// directory holding `initdb`, `pg_ctl` and `postgres` (of any supported version).
pub const PG_BIN: &str = "DISTLOCK_PG_BIN";

pub(crate) const INSTALL_HINT: &str = "no PostgreSQL server binaries found (initdb and pg_ctl on PATH or under \
     /usr/lib/postgresql/*/bin); install them, e.g. `apt-get install postgresql` on Debian or Ubuntu, \
     `brew install postgresql` on macOS — or set DATABASE_URL to a server to use";

/// Stops the server once its stdin closes, then removes the cluster's directory.
pub(crate) const WATCHDOG: &str =
    r#"read _ignored; "$0" -D "$1" -m immediate -w -t 30 stop >/dev/null 2>&1; rm -rf "$2""#;

impl TestCluster {
    /// `DATABASE_URL` when it is set and not empty, else a new local cluster.
    ///
    /// # Errors
    ///
    /// When no PostgreSQL installation can be found (the message says how to install one), or
    /// `initdb` or the server fails to start.
    pub fn from_env() -> io::Result<TestCluster> {
        match env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => Ok(TestCluster { url, local: None }),
            _ => TestCluster::start(),
        }
    }

    /// A server this process did not start and will not stop: `url` is used as it is.
    pub fn external(url: &str) -> TestCluster {
        TestCluster {
            url: url.to_owned(),
            local: None,
        }
    }

    /// One cluster for the whole process, made by [`TestCluster::from_env`] on first use.
    ///
    /// # Panics
    ///
    /// When the cluster cannot be started: this is for tests, where that is the right outcome.
    pub fn shared() -> &'static TestCluster {
        static SHARED: OnceLock<TestCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            TestCluster::from_env()
                .unwrap_or_else(|e| panic!("cannot start a PostgreSQL server for tests: {e}"))
        })
    }

    /// Starts a new local cluster, ignoring `DATABASE_URL`.
    ///
    /// # Errors
    ///
    /// As for [`TestCluster::from_env`].
    pub fn start() -> io::Result<TestCluster> {
        TestCluster::start_with(&Setup::default())
    }

    /// Starts a new local cluster with extra configuration: TLS files and settings, `pg_hba.conf`
    /// rules, roles.
    ///
    /// # Errors
    ///
    /// As for [`TestCluster::from_env`], or when the set-up SQL fails.
    pub fn start_with(setup: &Setup) -> io::Result<TestCluster> {
        let bin = find_bin_dir(setup.installation.as_deref())?;
        let run_as = if is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let root = make_root_dir(run_as)?;
        let data = root.join("data");
        let cleanup = |e: io::Error| {
            let _ = fs::remove_dir_all(&root);
            e
        };
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        run_quietly(initdb, &root, run_as, Duration::from_secs(120)).map_err(cleanup)?;
        configure(&data, setup, run_as).map_err(cleanup)?;
        let watchdog = spawn_watchdog(&bin, &data, &root, run_as).map_err(cleanup)?;
        let mut sockets = root.display().to_string();
        for dir in &setup.socket_dirs {
            sockets.push(',');
            sockets.push_str(&dir.display().to_string());
        }
        let cluster = Local::start(root, data, bin, run_as, watchdog, sockets)?;
        if !setup.sql.is_empty() {
            let mut client = postgres::Client::connect(cluster.url(), postgres::NoTls)
                .map_err(io::Error::other)?;
            for sql in &setup.sql {
                client.batch_execute(sql).map_err(io::Error::other)?;
            }
        }
        Ok(cluster)
    }

    /// Starts a streaming standby of this local cluster, listening on a port of its own; it is
    /// stopped and removed like any [`TestCluster`]. Made with `pg_basebackup -R` where the
    /// installation has it, else with the server's low-level backup and a copy of the data
    /// directory.
    ///
    /// # Errors
    ///
    /// For a cluster named by `DATABASE_URL`, or when the backup or the server fails.
    pub fn start_standby(&self) -> io::Result<TestCluster> {
        let primary = self.local_or_err()?;
        let (bin, run_as) = (primary.bin.clone(), primary.run_as);
        let root = make_root_dir(run_as)?;
        let data = root.join("data");
        if let Err(e) = standby::make(primary, &data, &root) {
            let _ = fs::remove_dir_all(&root);
            return Err(e);
        }
        let watchdog = spawn_watchdog(&bin, &data, &root, run_as)?;
        let sockets = root.display().to_string();
        Local::start(root, data, bin, run_as, watchdog, sockets)
    }

    /// Promotes a standby to a primary and waits until it accepts writes (`pg_ctl promote -w`).
    ///
    /// # Errors
    ///
    /// For a cluster named by `DATABASE_URL`, or when `pg_ctl` fails.
    pub fn promote(&self) -> io::Result<()> {
        let local = self.local_or_err()?;
        let mut cmd = Command::new(local.bin.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&local.data)
            .args(["-w", "-t", "60", "promote"]);
        run_quietly(cmd, &local.root, local.run_as, Duration::from_secs(90))
    }

    /// Stops a local server at once, as a crash would (`pg_ctl stop -m immediate`): no checkpoint,
    /// sessions cut. [`TestCluster::start_again`] brings it back (with crash recovery).
    ///
    /// # Errors
    ///
    /// For a cluster named by `DATABASE_URL`, or when `pg_ctl` fails.
    pub fn crash(&self) -> io::Result<()> {
        let local = self.local_or_err()?;
        let mut cmd = Command::new(local.bin.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&local.data)
            .args(["-m", "immediate", "-w", "-t", "60", "stop"]);
        run_quietly(cmd, &local.root, local.run_as, Duration::from_secs(90))
    }

    /// libpq `key=value` connection parameters for a superuser.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// True when this process started the server, so a test may restart or stop it.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// The directory of a local cluster's unix-domain socket (`host=<dir>` connects through it).
    pub fn socket_dir(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.root.as_path())
    }

    /// The TCP port of a local cluster.
    pub fn port(&self) -> Option<u16> {
        self.local.as_ref().map(|l| l.port)
    }

    /// The pid of a local cluster's postmaster (from `postmaster.pid`), for tests that stop it
    /// with a signal.
    pub fn server_pid(&self) -> Option<i32> {
        let local = self.local.as_ref()?;
        let text = fs::read_to_string(local.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The data directory of a local cluster (a test may put `standby.signal` there, say).
    pub fn data_dir(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.data.as_path())
    }

    /// The directory of the PostgreSQL binaries of a local cluster (`pgbench` may live there too).
    pub fn bin_dir(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.bin.as_path())
    }

    /// Restarts a local server (`pg_ctl restart -m fast`): every session ends, every advisory lock is
    /// released, the server comes back on the same port.
    ///
    /// # Errors
    ///
    /// For a cluster named by `DATABASE_URL`, or when `pg_ctl` fails.
    pub fn restart(&self) -> io::Result<()> {
        let local = self.local_or_err()?;
        let mut cmd = Command::new(local.bin.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&local.data)
            .args(["-m", "fast", "-w", "-t", "60", "restart"])
            .arg("-l")
            .arg(local.root.join("server.log"));
        run_quietly(cmd, &local.root, local.run_as, Duration::from_secs(90))
    }

    /// Stops a local server and waits until it is down (`pg_ctl stop -m fast`); [`TestCluster::restart`]
    /// or [`TestCluster::start_again`] bring it back.
    ///
    /// # Errors
    ///
    /// For a cluster named by `DATABASE_URL`, or when `pg_ctl` fails.
    pub fn stop_server(&self) -> io::Result<()> {
        let local = self.local_or_err()?;
        let mut cmd = Command::new(local.bin.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&local.data)
            .args(["-m", "fast", "-w", "-t", "60", "stop"]);
        run_quietly(cmd, &local.root, local.run_as, Duration::from_secs(90))
    }

    /// Starts a local server stopped by [`TestCluster::stop_server`], on the same port.
    ///
    /// # Errors
    ///
    /// For a cluster named by `DATABASE_URL`, or when `pg_ctl` fails.
    pub fn start_again(&self) -> io::Result<()> {
        self.local_or_err()?.pg_ctl_start()
    }

    fn local_or_err(&self) -> io::Result<&Local> {
        self.local.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "the server comes from DATABASE_URL; only a local cluster can be restarted or stopped",
            )
        })
    }
}

impl Local {
    /// Starts the server of a prepared data directory on a free loopback port.
    fn start(
        root: PathBuf,
        data: PathBuf,
        bin: PathBuf,
        run_as: Option<(u32, u32)>,
        watchdog: (Child, ChildStdin),
        sockets: String,
    ) -> io::Result<TestCluster> {
        let mut local = Local {
            sockets,
            root,
            data,
            bin,
            port: 0,
            run_as,
            watchdog: Mutex::new(Some(watchdog)),
        };
        // A free port can be taken by someone else between our probe and the server's bind; try
        // again.
        let mut last = None;
        for _ in 0..5 {
            local.port = free_port()?;
            match local.pg_ctl_start() {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(e); // dropping `local` stops the watchdog, which removes the directory
        }
        let url = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            local.port
        );
        Ok(TestCluster {
            url,
            local: Some(local),
        })
    }

    fn pg_ctl_start(&self) -> io::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port, self.sockets
        );
        let mut cmd = Command::new(self.bin.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.root.join("server.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(options)
            .arg("start");
        run_quietly(cmd, &self.root, self.run_as, Duration::from_secs(90))
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self.watchdog.lock().take() {
            drop(stdin);
            // The watchdog stops the server (`-t 30`) and removes the directory; bound the wait.
            let _ = wait_bounded(&mut child, Duration::from_secs(45));
        }
    }
}

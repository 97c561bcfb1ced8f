//! A real pgbouncer in front of a throwaway cluster, for the pooler tests and the fleet benchmark.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TestCluster;
use super::process::{free_port, is_root};
use super::skip::find_program;

/// How a [`Pgbouncer`] pools.
#[derive(Debug, Clone)]
pub struct BouncerSetup {
    /// `pool_mode`: `session`, `transaction` or `statement`.
    pub mode: String,
    /// `default_pool_size`: server connections per database and user.
    pub pool_size: u32,
    /// `max_client_conn`: client connections it accepts.
    pub max_clients: u32,
    /// More `[pgbouncer]` settings, `(name, value)` (`idle_transaction_timeout`, say).
    pub settings: Vec<(String, String)>,
}

/// A pgbouncer (Debian's package) in front of a local cluster, on a free loopback port and a unix
/// socket in a directory of its own; stopped when dropped. As root, it runs as the `postgres`
/// user (pgbouncer refuses root) with a file-descriptor limit raised for `max_clients`.
#[derive(Debug)]
pub struct Pgbouncer {
    child: Child,
    port: u16,
    dir: PathBuf,
    /// How it was started, to start it again.
    command: Command,
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pgbouncer {
    /// Starts one in front of `cluster` and waits (up to 10 s) until it accepts connections.
    ///
    /// # Errors
    ///
    /// When pgbouncer is not installed ([`io::ErrorKind::NotFound`]), the cluster is not local,
    /// or it does not come up.
    pub fn start(cluster: &TestCluster, setup: &BouncerSetup) -> io::Result<Pgbouncer> {
        let exe = find_program("pgbouncer").ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)",
            )
        })?;
        let server_port = cluster
            .port()
            .ok_or_else(|| io::Error::other("pgbouncer needs a local cluster"))?;
        // The server over its unix socket where it has one: a pooler's own connections then
        // survive a test that takes the loopback down to cut its clients off.
        let server_host = cluster
            .socket_dir()
            .map_or_else(|| "127.0.0.1".to_owned(), |d| d.display().to_string());
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("distlock-pgbouncer-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 postgres = host={server_host} port={server_port} dbname=postgres user=postgres\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir = {dir}\n\
                 auth_type = any\n\
                 pool_mode = {mode}\n\
                 default_pool_size = {pool}\n\
                 max_client_conn = {clients}\n\
                 ignore_startup_parameters = extra_float_digits,options\n\
                 logfile = {dir}/pgbouncer.log\n{extra}",
                dir = dir.display(),
                mode = setup.mode,
                pool = setup.pool_size,
                clients = setup.max_clients,
                extra = setup
                    .settings
                    .iter()
                    .map(|(name, value)| format!("{name} = {value}\n"))
                    .collect::<String>(),
            ),
        )?;
        std::fs::set_permissions(&ini, std::fs::Permissions::from_mode(0o644))?;
        // Room for every client, the server connections and its own files.
        let files = u64::from(setup.max_clients) + u64::from(setup.pool_size) + 100;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "ulimit -n {files} 2>/dev/null || true; exec \"$0\" \"$@\""
            ))
            .arg(exe);
        if is_root() {
            command.args(["-u", "postgres"]);
        }
        command
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn()?;
        let mut bouncer = Pgbouncer {
            child,
            port,
            dir,
            command,
        };
        bouncer.wait_up()?;
        Ok(bouncer)
    }

    /// Kills it at once (SIGKILL): its clients' connections are cut, and its server connections
    /// closed by the server.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again after [`Pgbouncer::kill`], on the same port and settings, and waits (up to
    /// 10 s) until it accepts connections.
    ///
    /// # Errors
    ///
    /// When it cannot be started or does not come up.
    pub fn start_again(&mut self) -> io::Result<()> {
        self.child = self.command.spawn()?;
        self.wait_up()
    }

    /// Switches its pool mode to `mode` as an administrator would: the setting rewritten in its
    /// configuration file, and a reload (SIGHUP). Connected clients stay connected.
    ///
    /// # Errors
    ///
    /// When the file cannot be rewritten or the signal not sent.
    pub fn switch_pool_mode(&mut self, mode: &str) -> io::Result<()> {
        let ini = self.dir.join("pgbouncer.ini");
        let text = std::fs::read_to_string(&ini)?;
        let switched: String = text
            .lines()
            .map(|line| {
                if line.starts_with("pool_mode = ") {
                    format!("pool_mode = {mode}\n")
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        std::fs::write(&ini, switched)?;
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            return Err(io::Error::other("could not signal pgbouncer to reload"));
        }
        // pgbouncer reloads in its event loop: give it a moment.
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
    }

    fn wait_up(&mut self) -> io::Result<()> {
        let started = Instant::now();
        while postgres::Client::connect(&self.url(), postgres::NoTls).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                return Err(io::Error::other("pgbouncer did not come up within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// libpq parameters for the superuser through the pooler, over loopback TCP.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
            self.port
        )
    }

    /// libpq parameters through the pooler's unix socket (no TCP, so no ports left in
    /// TIME_WAIT by many short connections).
    pub fn socket_url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.display(),
            self.port
        )
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

//! A real pgbouncer in front of a throwaway cluster, for the pooler and transaction-mode tests.
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use distlock::testing::TestCluster;

use super::eventually;

/// A pgbouncer in front of `cluster`, stopped when dropped.
pub struct Bouncer {
    child: Child,
    pub port: u16,
    _dir: PathBuf,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn bouncer(cluster: &TestCluster, mode: &str, pool_size: u32) -> Option<Bouncer> {
    let Some(exe) = distlock::testing::find_program("pgbouncer") else {
        distlock::testing::skip(
            "pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)",
        );
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir =
        std::env::temp_dir().join(format!("distlock-pgbouncer-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n\
             postgres = host=127.0.0.1 port={} dbname=postgres user=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = any\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 100\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {}\n",
            cluster.port().unwrap(),
            dir.join("pgbouncer.log").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&ini, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = Command::new(exe);
    // pgbouncer refuses to run as root.
    let root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if root.unwrap_or(false) {
        cmd.args(["-u", "postgres"]);
    }
    let child = cmd
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgbouncer");
    let bouncer = Bouncer {
        child,
        port,
        _dir: dir,
    };
    let url = bouncer.url();
    assert!(
        eventually(Duration::from_secs(10), || postgres::Client::connect(
            &url,
            postgres::NoTls
        )
        .is_ok()),
        "pgbouncer did not come up"
    );
    Some(bouncer)
}

impl Bouncer {
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
            self.port
        )
    }
}

/// A throwaway cluster of this test's own, or `None` (said why) under `DATABASE_URL`.
pub fn cluster() -> Option<TestCluster> {
    if distlock::testing::database_url().is_some() {
        distlock::testing::skip(
            "DATABASE_URL is set, and these tests put a pooler in front of a server of their own",
        );
        return None;
    }
    Some(TestCluster::start().expect("a cluster"))
}

//! A real Patroni cluster for the HA tests: one etcd and two Patroni nodes, each with its own
//! PostgreSQL, all on 127.0.0.1 with ports of their own, run as the `postgres` user, with a short
//! `ttl` (10 s, `loop_wait` 1 s, `retry_timeout` 3 s) so that a failover takes seconds. Dropping it
//! kills every process it started and removes its directory.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{eventually, free_port};

/// The leader key's time to live, in seconds: the longest a dead leader keeps the leadership.
pub const TTL_S: u64 = 10;

/// One etcd and two Patroni nodes.
pub struct Cluster {
    root: PathBuf,
    etcd: Child,
    pub nodes: Vec<Node>,
}

/// One Patroni node and its PostgreSQL.
pub struct Node {
    pub name: String,
    /// PostgreSQL's port on 127.0.0.1.
    pub port: u16,
    config: PathBuf,
    data: PathBuf,
    patroni: Option<Child>,
}

/// Why the cluster cannot run here, said by `skip`, or `None` when it can.
pub fn unavailable() -> Option<String> {
    if distlock::testing::database_url().is_some() {
        return Some(
            "DATABASE_URL is set, and these tests run a Patroni cluster of their own".into(),
        );
    }
    for program in ["patroni", "patronictl", "etcd"] {
        if distlock::testing::find_program(program).is_none() {
            return Some(format!(
                "{program} is not installed (Debian: apt-get install patroni etcd-server)"
            ));
        }
    }
    if pg_bin().is_none() {
        return Some("no PostgreSQL server binaries (initdb) found".into());
    }
    if uid_of("postgres").is_none() && is_root() {
        return Some("no postgres user to run PostgreSQL as".into());
    }
    None
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn uid_of(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// The directory of `initdb`, with links resolved (Debian's live under /usr/lib/postgresql).
fn pg_bin() -> Option<PathBuf> {
    let initdb = distlock::testing::find_program("initdb")?;
    Some(fs::canonicalize(initdb).ok()?.parent()?.to_path_buf())
}
/// A command run as the `postgres` user when this process is root.
fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new(program);
    if is_root() {
        let (uid, gid) = uid_of("postgres").expect("a postgres user");
        cmd.uid(uid).gid(gid);
    }
    cmd
}

impl Cluster {
    /// Starts etcd and two nodes, the first bootstrapping the cluster; returns when both run and
    /// the second streams from the first. `synchronous`: Patroni's `synchronous_mode`.
    pub fn start(synchronous: bool) -> Cluster {
        let root = std::env::temp_dir().join(format!(
            "distlock-patroni-{}-{}",
            std::process::id(),
            free_port()
        ));
        fs::create_dir_all(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        let (client, peer) = (free_port(), free_port());
        let etcd = as_postgres("etcd")
            .args(["--name", "e1", "--data-dir"])
            .arg(root.join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=e1=http://127.0.0.1:{peer}"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(root.join("etcd.log")).unwrap())
            .spawn()
            .expect("etcd");
        let mut cluster = Cluster {
            root,
            etcd,
            nodes: Vec::new(),
        };
        for n in 1..=2 {
            let node = cluster.configure(n, client, synchronous);
            cluster.nodes.push(node);
        }
        cluster.nodes[0].start();
        assert!(
            eventually(Duration::from_secs(90), || cluster.leader().is_some()),
            "the first node never led:\n{}",
            cluster.log(0)
        );
        cluster.nodes[1].start();
        let want = if synchronous {
            "Sync Standby"
        } else {
            "Replica"
        };
        assert!(
            eventually(Duration::from_secs(90), || {
                cluster.members().iter().any(|(_, role, state)| {
                    role == want && (state == "streaming" || state == "running")
                })
            }),
            "the second node never became a {want}:\n{}",
            cluster.log(1)
        );
        cluster
    }

    fn configure(&self, n: usize, etcd_port: u16, synchronous: bool) -> Node {
        let name = format!("node{n}");
        let dir = self.root.join(&name);
        fs::create_dir_all(&dir).unwrap();
        let (port, rest) = (free_port(), free_port());
        let bin = pg_bin().expect("PostgreSQL binaries");
        let data = dir.join("data");
        let yaml = format!(
            "scope: distlock-test\nname: {name}\n\
             restapi:\n  listen: 127.0.0.1:{rest}\n  connect_address: 127.0.0.1:{rest}\n\
             etcd3:\n  hosts: 127.0.0.1:{etcd_port}\n\
             bootstrap:\n  dcs:\n    ttl: {TTL_S}\n    loop_wait: 1\n    retry_timeout: 3\n\
             \x20   synchronous_mode: {synchronous}\n    postgresql:\n      use_pg_rewind: false\n\
             \x20     parameters:\n        max_connections: 100\n        fsync: 'off'\n\
             \x20 initdb:\n    - encoding: UTF8\n    - locale: C\n\
             \x20 pg_hba:\n    - local all all trust\n    - host all all 127.0.0.1/32 trust\n\
             \x20   - host replication all 127.0.0.1/32 trust\n\
             postgresql:\n  listen: 127.0.0.1:{port}\n  connect_address: 127.0.0.1:{port}\n\
             \x20 data_dir: {data}\n  bin_dir: {bin}\n  pgpass: {pgpass}\n\
             \x20 authentication:\n    replication: {{username: postgres}}\n\
             \x20   superuser: {{username: postgres}}\n\
             \x20 parameters:\n    unix_socket_directories: {dir}\n",
            data = data.display(),
            bin = bin.display(),
            pgpass = dir.join("pgpass").display(),
            dir = dir.display(),
        );
        let config = dir.join("node.yml");
        fs::write(&config, yaml).unwrap();
        if let Some((uid, gid)) = is_root().then(|| uid_of("postgres")).flatten() {
            for path in [&dir, &config] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
            }
        }
        Node {
            name,
            port,
            config,
            data,
            patroni: None,
        }
    }

    /// `(name, role, state)` of each member, as `patronictl list` says.
    pub fn members(&self) -> Vec<(String, String, String)> {
        let out = Command::new("patronictl")
            .arg("-c")
            .arg(&self.nodes[0].config)
            .args(["list", "-f", "json"])
            .stderr(Stdio::null())
            .output();
        let Ok(out) = out else { return Vec::new() };
        let Ok(list) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return Vec::new();
        };
        list.as_array()
            .map(|members| {
                members
                    .iter()
                    .map(|m| {
                        let text = |k: &str| m[k].as_str().unwrap_or_default().to_owned();
                        (text("Member"), text("Role"), text("State"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The index of the running leader, if there is one.
    pub fn leader(&self) -> Option<usize> {
        let members = self.members();
        let (name, _, _) = members
            .iter()
            .find(|(_, role, state)| role == "Leader" && state == "running")?;
        self.nodes.iter().position(|n| &n.name == name)
    }

    /// Connection parameters naming both nodes, for whichever is the writable leader.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres \
             target_session_attrs=read-write",
            self.nodes[0].port, self.nodes[1].port
        )
    }

    /// Connection parameters for one node alone.
    pub fn node_url(&self, i: usize) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.nodes[i].port
        )
    }

    /// Patroni's switchover from the leader to the other node, as an operator runs it.
    pub fn switchover(&self) {
        let leader = self.leader().expect("a leader");
        let candidate = 1 - leader;
        let out = Command::new("patronictl")
            .arg("-c")
            .arg(&self.nodes[0].config)
            .args(["switchover", "--force", "--leader"])
            .arg(&self.nodes[leader].name)
            .arg("--candidate")
            .arg(&self.nodes[candidate].name)
            .output()
            .expect("patronictl switchover");
        assert!(out.status.success(), "switchover: {out:?}");
    }

    /// Every process of node `i`: Patroni, the postmaster and its children.
    pub fn processes(&self, i: usize) -> Vec<i32> {
        let node = &self.nodes[i];
        let mut pids = Vec::new();
        if let Some(child) = &node.patroni {
            pids.push(child.id() as i32);
        }
        if let Some(postmaster) = node.postmaster() {
            let out = Command::new("pgrep")
                .args(["-P", &postmaster.to_string()])
                .output()
                .expect("pgrep");
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
            pids.push(postmaster);
        }
        pids
    }

    /// Sends `signal` to every process of node `i`.
    pub fn signal_node(&self, i: usize, signal: &str) {
        for pid in self.processes(i) {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// The pid of node `i`'s WAL sender (the leader's, streaming to the other node).
    pub fn walsender(&self, i: usize) -> Option<i32> {
        let mut client = postgres::Client::connect(&self.node_url(i), postgres::NoTls).ok()?;
        let row = client
            .query_opt("SELECT pid FROM pg_stat_replication LIMIT 1", &[])
            .ok()??;
        Some(row.get(0))
    }

    /// The last lines of node `i`'s Patroni log.
    pub fn log(&self, i: usize) -> String {
        let text = fs::read_to_string(self.root.join(&self.nodes[i].name).join("patroni.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until a leader other than `old` runs; returns when, or `None` after `limit`.
    pub fn new_leader(&self, old: usize, limit: Duration) -> Option<(usize, Instant)> {
        let mut found = None;
        eventually(limit, || {
            found = self
                .leader()
                .filter(|&l| l != old)
                .map(|l| (l, Instant::now()));
            found.is_some()
        });
        found
    }

    /// Patroni's version, for the README's compatibility line.
    pub fn versions() -> String {
        let version = |program: &str, arg: &str| {
            Command::new(program)
                .arg(arg)
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_owned()
                })
                .unwrap_or_default()
        };
        format!(
            "{}; {}",
            version("patroni", "--version"),
            version("etcd", "--version")
        )
    }
}

impl Node {
    fn start(&mut self) {
        let dir = self.config.parent().unwrap().to_path_buf();
        let child = as_postgres("patroni")
            .arg(&self.config)
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("patroni.log")).unwrap())
            .spawn()
            .expect("patroni");
        self.patroni = Some(child);
    }

    fn postmaster(&self) -> Option<i32> {
        read_pid(&self.data.join("postmaster.pid"))
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            // SIGCONT first: a stopped process ignores nothing but SIGKILL, and its children
            // must be found.
            self.signal_node(i, "CONT");
            self.signal_node(i, "KILL");
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.patroni.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        let _ = fs::remove_dir_all(&self.root);
    }
}

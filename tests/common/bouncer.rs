//! A real pgbouncer in front of a throwaway cluster, for the pooler and transaction-mode tests.
#![allow(dead_code)]

use distlock::testing::{BouncerSetup, Pgbouncer, TestCluster};

/// The pgbouncer of a test.
pub type Bouncer = Pgbouncer;

/// A pgbouncer in `mode` with `pool_size` server connections in front of `cluster`, or `None`
/// (said why) where pgbouncer is not installed.
pub fn bouncer(cluster: &TestCluster, mode: &str, pool_size: u32) -> Option<Bouncer> {
    bouncer_with(cluster, mode, pool_size, &[])
}

/// [`bouncer`], with more `[pgbouncer]` settings.
pub fn bouncer_with(
    cluster: &TestCluster,
    mode: &str,
    pool_size: u32,
    settings: &[(&str, &str)],
) -> Option<Bouncer> {
    let setup = BouncerSetup {
        mode: mode.to_owned(),
        pool_size,
        max_clients: 100,
        settings: settings
            .iter()
            .map(|&(name, value)| (name.to_owned(), value.to_owned()))
            .collect(),
    };
    match Pgbouncer::start(cluster, &setup) {
        Ok(bouncer) => Some(bouncer),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            distlock::testing::skip(&e.to_string());
            None
        }
        Err(e) => panic!("pgbouncer: {e}"),
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

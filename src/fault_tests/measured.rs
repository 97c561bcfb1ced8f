//! Measurements of the library's own statement texts on a raw connection (ignored tests that
//! print figures).

use std::time::Instant;

use postgres::{Client, NoTls};

use crate::sql::Sql;
use crate::testing::TestCluster;

/// The text of a new lock session's set-up for a PostgreSQL 15 server, with `mark` as the
/// session's mark, and with the exclusion proof after it when `proof`.
fn session_setup_sql(mark: i64, proof: bool) -> String {
    let mut sql = Sql::new();
    sql.push_session_setup(150_000, None, mark);
    if proof {
        sql.push_exclusion_proof(mark);
    }
    sql.as_str().to_owned()
}

/// What the exclusion proof adds to a connect, in wall-clock time: the set-up statements alone
/// against the set-up with the proof, each one round trip on a raw connection, interleaved. Run:
/// `cargo test --release --lib measured_exclusion_proof_cost -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement; prints figures"]
fn measured_exclusion_proof_cost() {
    let setup = session_setup_sql(42, false);
    let with_proof = session_setup_sql(42, true);
    let mut client = Client::connect(TestCluster::shared().url(), NoTls).expect("connect");
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..500 {
        for (sql, out) in [(&setup, &mut without), (&with_proof, &mut with)] {
            let started = Instant::now();
            client.simple_query(sql).expect("set-up");
            out.push(started.elapsed());
        }
    }
    without.sort();
    with.sort();
    println!(
        "connect set-up round trip p50: {:?} without the proof, {:?} with it",
        without[250], with[250]
    );
}

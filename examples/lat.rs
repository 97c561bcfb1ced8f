use postgres::{Client, NoTls, SimpleQueryMessage};
use std::time::{Duration, Instant};
fn rows(m: &[SimpleQueryMessage]) -> u64 {
    m.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}
fn main() -> anyhow::Result<()> {
    let c = distlock::testing::TestCluster::from_env()?;
    let mut raw = Client::connect(c.url(), NoTls)?;
    let locks = distlock::LockManager::connect(c.url())?;
    let order: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    for &case in &order {
        let mut v = Vec::new();
        for i in 0..3000i64 {
            let t = Instant::now();
            if case == 0 {
                rows(&raw.simple_query(&format!("SELECT 1 WHERE pg_try_advisory_lock({i})"))?);
                rows(&raw.simple_query(&format!("SELECT 1 WHERE pg_advisory_unlock({i})"))?);
            } else if case == 3 {
                let mut sql = String::new();
                use std::fmt::Write;
                for f in ["pg_try_advisory_lock", "pg_advisory_unlock"] {
                    sql.clear();
                    write!(sql, "SELECT 1 WHERE {f}({i})").unwrap();
                    assert_eq!(rows(&raw.simple_query(&sql)?), 1);
                }
            } else if case == 4 {
                for f in ["pg_try_advisory_lock", "pg_advisory_unlock"] {
                    assert_eq!(
                        rows(&raw.simple_query(&format!("SELECT 1 WHERE {f}({i})"))?),
                        1
                    );
                }
            } else if case == 1 {
                rows(&raw.simple_query(&format!(
                    "SELECT 1 FROM pg_try_advisory_lock({i}) l WHERE l"
                ))?);
                rows(
                    &raw.simple_query(&format!("SELECT 1 FROM pg_advisory_unlock({i}) l WHERE l"))?,
                );
            } else {
                drop(locks.try_lock(i)?.unwrap());
            }
            v.push(t.elapsed());
        }
        v.sort();
        println!(
            "case {case}: p50 {:?} p99 {:?}",
            v[v.len() / 2],
            v[v.len() * 99 / 100]
        );
    }
    let _ = Duration::ZERO;
    Ok(())
}

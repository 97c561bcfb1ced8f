//! Deterministic benchmarks: instructions (callgrind) and heap allocations (DHAT) per lock+unlock
//! cycle, for the raw `postgres::Client` running the same SQL and for `LockManager`.
//!
//! Everything in the process is counted — the worker thread included (`EntryPoint::None`) — so each
//! benchmark runs twice, with a short and a long loop, and `.ci/bench-gate` takes the per-cycle figure
//! as the difference divided by the difference in cycles: connecting, starting the throwaway cluster
//! and thread start-up cancel out.
//!
//! Run: `cargo bench --bench iai` (needs `valgrind` and `iai-callgrind-runner` 0.16.1; uses
//! `DATABASE_URL`, or starts a throwaway cluster per benchmark process).

use std::hint::black_box;

use distlock::testing::TestCluster;
use distlock::{LockKey, LockManager};
use iai_callgrind::{
    Callgrind, Dhat, EntryPoint, LibraryBenchmarkConfig, library_benchmark,
    library_benchmark_group, main,
};
use postgres::{Client, SimpleQueryMessage};

/// Loop lengths; the gate divides the difference of the two runs by `LONG - SHORT`.
const SHORT: u64 = 100;
const LONG: u64 = 600;

/// The server for this benchmark process. Kept alive until the process exits; the cluster's watchdog
/// then stops it, outside the measurement.
fn server() -> &'static TestCluster {
    TestCluster::shared()
}

/// A throwaway cluster of this process's own with `ssl = on` and a self-signed certificate, for
/// the cost of a cycle over TLS. Certificate generation and start-up cancel out like connecting.
fn tls_server() -> &'static TestCluster {
    static TLS: std::sync::OnceLock<TestCluster> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let setup = distlock::testing::Setup {
            settings: vec![
                ("ssl".into(), "on".into()),
                ("ssl_cert_file".into(), "server.crt".into()),
                ("ssl_key_file".into(), "server.key".into()),
            ],
            files: vec![
                ("server.crt".into(), cert.pem().into_bytes()),
                ("server.key".into(), key.serialize_pem().into_bytes()),
            ],
            ..Default::default()
        };
        TestCluster::start_with(&setup).unwrap()
    })
}

fn rows(messages: &[SimpleQueryMessage]) -> u64 {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

/// The raw client, connected through the library's own connector (`sslmode=disable`): the
/// client's connection driver is then instantiated once, in the library, for the raw client and
/// the manager alike, so that moving library code cannot shift the floor's inlining and the
/// gate compares the library's own work only.
fn raw_client() -> Client {
    let config: postgres::Config = server().url().parse().unwrap();
    distlock::Tls::new()
        .mode(distlock::SslMode::Disable)
        .connect_client(&config)
        .unwrap()
}

// The floor: the raw client, the same statements, formatted the way a careful caller would, on
// a thread of its own as the manager's worker runs the same client. A process with a second
// thread makes the C library take its multi-threaded paths (a cancellation point around every
// socket call, a malloc arena per thread); the raw client pays them here as the manager's worker
// does, so that the gate compares the library's own work.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn raw_client_cycle(cycles: u64) -> u64 {
    std::thread::spawn(move || raw_cycles(cycles))
        .join()
        .unwrap()
}

// The same floor on the process's only thread: what the raw client costs in a single-threaded
// program (reported, not gated).
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn raw_client_main_thread_cycle(cycles: u64) -> u64 {
    raw_cycles(cycles)
}

fn raw_cycles(cycles: u64) -> u64 {
    let mut client = raw_client();
    let mut sql = String::with_capacity(128);
    let mut granted = 0;
    for i in 0..cycles {
        let key = 0x5eed_0000 + (i % 16) as i64;
        sql.clear();
        std::fmt::Write::write_fmt(
            &mut sql,
            format_args!("SELECT WHERE pg_catalog.pg_try_advisory_lock({key})"),
        )
        .unwrap();
        granted += rows(&client.simple_query(&sql).unwrap());
        sql.clear();
        std::fmt::Write::write_fmt(
            &mut sql,
            format_args!("SELECT WHERE pg_catalog.pg_advisory_unlock({key})"),
        )
        .unwrap();
        granted += rows(&client.simple_query(&sql).unwrap());
    }
    assert_eq!(granted, 2 * cycles);
    black_box(granted)
}

/// A manager on a plaintext connection (`sslmode=disable`): the same connector, stream type and
/// driver code as [`raw_client`], so that the gate compares the library's own work.
fn manager() -> LockManager {
    manager_with(&format!("{} sslmode=disable", server().url()))
}

fn manager_with(params: &str) -> LockManager {
    LockManager::builder()
        .application_name("distlock-iai")
        // The heartbeat runs per second of idle time, not per cycle: keep it out of the counts
        // (under valgrind the long run takes seconds longer than the short one).
        .heartbeat(std::time::Duration::from_secs(3600))
        .connect(params)
        .unwrap()
}

// `try_lock` + drop on a free key with default settings (`sslmode=prefer`) against a server
// without TLS: the connection stays plaintext, but its stream is the TLS-capable connector's,
// whose every read and write goes through one more dispatch. Reported, not gated.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_prefer_cycle(cycles: u64) -> u64 {
    let locks = manager_with(server().url());
    for i in 0..cycles {
        let guard = locks.try_lock(LockKey::id(0x5eed_5000 + (i % 16) as i64));
        drop(black_box(guard.unwrap().unwrap()));
    }
    cycles
}

// `try_lock` + drop on a free key.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_cycle(cycles: u64) -> u64 {
    let locks = manager();
    for i in 0..cycles {
        let guard = locks.try_lock(LockKey::id(0x5eed_1000 + (i % 16) as i64));
        drop(black_box(guard.unwrap().unwrap()));
    }
    cycles
}

// `try_lock` + drop on a free key, by a manager whose lone caller spins for its reply
// (`Builder::spin_wait`): reported, not gated, since spinning is CPU work by design.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_spin_wait_cycle(cycles: u64) -> u64 {
    let locks = LockManager::builder()
        .application_name("distlock-iai-spin")
        .heartbeat(std::time::Duration::from_secs(3600))
        .spin_wait(true)
        .connect(&format!("{} sslmode=disable", server().url()))
        .unwrap();
    for i in 0..cycles {
        let guard = locks.try_lock(LockKey::id(0x5eed_3000 + (i % 16) as i64));
        drop(black_box(guard.unwrap().unwrap()));
    }
    cycles
}

// `try_lock` + drop on a free key over TLS (`sslmode=require`), against `manager_cycle` in plain
// text: the steady-state cost of encryption. Reported, not gated.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_tls_cycle(cycles: u64) -> u64 {
    let params = format!("{} sslmode=require", tls_server().url());
    let locks = LockManager::builder()
        .application_name("distlock-iai-tls")
        .heartbeat(std::time::Duration::from_secs(3600))
        .connect(&params)
        .unwrap();
    for i in 0..cycles {
        let guard = locks.try_lock(LockKey::id(0x5eed_4000 + (i % 16) as i64));
        drop(black_box(guard.unwrap().unwrap()));
    }
    cycles
}

// `try_lock_shared` + drop on a free key.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_shared_cycle(cycles: u64) -> u64 {
    let locks = manager();
    for i in 0..cycles {
        let guard = locks.try_lock_shared(LockKey::id(0x5eed_2000 + (i % 16) as i64));
        drop(black_box(guard.unwrap().unwrap()));
    }
    cycles
}

// A `try_lock` the server refuses: another session holds the key.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_refused(cycles: u64) -> u64 {
    let mut holder = raw_client();
    holder
        .simple_query("SELECT pg_advisory_lock(1592061952)")
        .unwrap();
    let locks = manager();
    for _ in 0..cycles {
        assert!(black_box(locks.try_lock(LockKey::id(1_592_061_952)).unwrap()).is_none());
    }
    cycles
}

// Eight threads on one manager, each `try_lock` + drop on its own keys: the worker batches what
// queues up. Counts across threads vary from run to run (batch sizes depend on scheduling).
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_8_threads(cycles: u64) -> u64 {
    let locks = manager();
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let locks = &locks;
            s.spawn(move || {
                for i in 0..cycles / 8 {
                    let key = LockKey::pair(0x5eed, (t * 1000 + i % 16) as i32);
                    drop(black_box(locks.try_lock(key).unwrap().unwrap()));
                }
            });
        }
    });
    cycles
}

// Hashing a 32-byte name to its key.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn key_from_name(cycles: u64) -> i64 {
    let mut acc = 0i64;
    for i in 0..cycles {
        let name = black_box("tenant-0000000042/nightly-report");
        acc ^= LockKey::name(name).as_id().unwrap().wrapping_add(i as i64);
    }
    black_box(acc)
}

library_benchmark_group!(
    name = cycles;
    benchmarks = raw_client_cycle, raw_client_main_thread_cycle, manager_cycle, manager_shared_cycle, manager_refused,
        manager_8_threads, manager_spin_wait_cycle, manager_prefer_cycle, manager_tls_cycle,
        key_from_name
);

main!(
    config = LibraryBenchmarkConfig::default()
        // Count every thread of the process, the manager's worker included.
        // Only this process: the throwaway cluster's initdb and pg_ctl run outside valgrind.
        .tool(Callgrind::with_args(["--trace-children=no"]).entry_point(EntryPoint::None))
        // Tokio's stacks are deep: a shallow stack setting undercounts allocations.
        .tool(
            Dhat::with_args(["--num-callers=100", "--trace-children=no"])
                .entry_point(EntryPoint::None)
        )
        .env_clear(false);
    library_benchmark_groups = cycles
);

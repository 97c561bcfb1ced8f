//! Deterministic benchmarks of the calls beyond one lock — fenced grants, semaphore permits,
//! all-or-nothing grants of 8 keys and the 8 single tries they replace, and locks by name with
//! and without recording the names — counted like `benches/iai.rs` (every thread, short and long
//! loops), reported by `.ci/bench-gate` (which gates only what recording a name costs). A bench binary of their own, so that adding or changing them cannot change how the
//! compiler lays out the gated benchmarks' binary.
//!
//! Run: `cargo bench --bench iai_capabilities` (as `benches/iai.rs`).

use std::hint::black_box;

use distlock::testing::TestCluster;
use distlock::{LockKey, LockManager};
use iai_callgrind::{
    Callgrind, Dhat, EntryPoint, LibraryBenchmarkConfig, library_benchmark,
    library_benchmark_group, main,
};

/// Loop lengths, as in `benches/iai.rs`.
const SHORT: u64 = 100;
const LONG: u64 = 600;

/// A plaintext manager on this process's throwaway cluster, as the gated benchmarks use.
fn manager() -> LockManager {
    LockManager::builder()
        .application_name("distlock-iai")
        .heartbeat(std::time::Duration::from_secs(3600))
        .connect(&format!("{} sslmode=disable", TestCluster::shared().url()))
        .unwrap()
}

// `try_lock_fenced` + drop on a free key: the token comes in the same statement. Reported, not
// gated.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_fenced_cycle(cycles: u64) -> u64 {
    let locks = manager();
    // The sequence exists before the counted loop.
    drop(locks.try_lock_fenced(LockKey::id(0x5eed_6fff)).unwrap());
    for i in 0..cycles {
        let guard = locks.try_lock_fenced(LockKey::id(0x5eed_6000 + (i % 16) as i64));
        drop(black_box(guard.unwrap().unwrap()));
    }
    cycles
}

// `try_acquire_permit` of a 4-permit semaphore + drop. Reported, not gated.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_permit_cycle(cycles: u64) -> u64 {
    let locks = manager();
    for i in 0..cycles {
        let permit = locks.try_acquire_permit(LockKey::id(0x5eed_7000 + (i % 16) as i64), 4);
        drop(black_box(permit.unwrap().unwrap()));
    }
    cycles
}

/// Eight free keys for `try_lock_all` and the eight single tries it is compared with.
fn eight(i: u64) -> [LockKey; 8] {
    std::array::from_fn(|k| LockKey::id(0x5eed_8000 + ((i % 4) * 8 + k as u64) as i64))
}

// `try_lock_all` of 8 keys, then the 8 drops, once per 4 cycles (the gate's per-cycle figure is
// a quarter of one such operation). Reported, not gated.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_lock_all_8(cycles: u64) -> u64 {
    let locks = manager();
    for i in 0..cycles / 4 {
        let guards = locks.try_lock_all(eight(i)).unwrap().unwrap();
        drop(black_box(guards));
    }
    cycles
}

// 8 single `try_lock`s, then the 8 drops, once per 4 cycles: what `manager_lock_all_8` replaces.
// Reported, not gated.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_8_single_tries(cycles: u64) -> u64 {
    let locks = manager();
    for i in 0..cycles / 4 {
        let guards: Vec<_> = eight(i)
            .into_iter()
            .map(|k| locks.try_lock(k).unwrap().unwrap())
            .collect();
        drop(black_box(guards));
    }
    cycles
}

/// Sixteen key names of 32 bytes, as a caller that locks by name passes them.
const NAMES: [&str; 16] = [
    "tenant-0000000040/nightly-report",
    "tenant-0000000041/nightly-report",
    "tenant-0000000042/nightly-report",
    "tenant-0000000043/nightly-report",
    "tenant-0000000044/nightly-report",
    "tenant-0000000045/nightly-report",
    "tenant-0000000046/nightly-report",
    "tenant-0000000047/nightly-report",
    "tenant-0000000048/nightly-report",
    "tenant-0000000049/nightly-report",
    "tenant-0000000050/nightly-report",
    "tenant-0000000051/nightly-report",
    "tenant-0000000052/nightly-report",
    "tenant-0000000053/nightly-report",
    "tenant-0000000054/nightly-report",
    "tenant-0000000055/nightly-report",
];

/// `try_lock` + drop of keys given by name, by a manager that records names when `record`.
fn named_cycles(cycles: u64, record: bool) -> u64 {
    let locks = LockManager::builder()
        .application_name("distlock-iai")
        .heartbeat(std::time::Duration::from_secs(3600))
        .record_names(record)
        .connect(&format!("{} sslmode=disable", TestCluster::shared().url()))
        .unwrap();
    for i in 0..cycles {
        let guard = locks.try_lock(black_box(NAMES[(i % 16) as usize]));
        drop(black_box(guard.unwrap().unwrap()));
    }
    cycles
}

// `try_lock` + drop of a key given by its name (hashed on every call), names not recorded.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_named_cycle(cycles: u64) -> u64 {
    named_cycles(cycles, false)
}

// The same with `Builder::record_names(true)`: each of the 16 names is written once, in both
// runs alike, so the per-cycle difference is what a name already recorded costs.
#[library_benchmark]
#[bench::short(SHORT)]
#[bench::long(LONG)]
fn manager_named_recorded_cycle(cycles: u64) -> u64 {
    named_cycles(cycles, true)
}

library_benchmark_group!(
    name = capabilities;
    benchmarks = manager_fenced_cycle, manager_permit_cycle, manager_lock_all_8,
        manager_8_single_tries, manager_named_cycle, manager_named_recorded_cycle
);

main!(
    config = LibraryBenchmarkConfig::default()
        .tool(Callgrind::with_args(["--trace-children=no"]).entry_point(EntryPoint::None))
        .tool(
            Dhat::with_args(["--num-callers=100", "--trace-children=no"])
                .entry_point(EntryPoint::None)
        )
        .env_clear(false);
    library_benchmark_groups = capabilities
);

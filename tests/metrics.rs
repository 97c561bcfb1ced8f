//! The `metrics` feature (`cargo test --features metrics --test metrics`, as CI runs it): a real
//! recorder, the Prometheus exporter's, installed; a scripted run; the figures read back from
//! what it renders.
#![cfg(feature = "metrics")]

mod common;

use std::collections::HashMap;
use std::thread;
use std::time::Duration;

use common::{eventually, kill_app, plain, plain_try_lock, plain_unlock, time_to_loss};
use distlock::{LockKey, LockManager};
use metrics_exporter_prometheus::PrometheusBuilder;

/// `name{labels} value` lines of the rendered text, by `name{labels}`.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[test]
fn a_real_recorder_renders_every_figure_labelled_with_the_application() {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .expect("install the Prometheus recorder");
    let app = "metrics-app";
    let locks = LockManager::builder()
        .application_name(app)
        .heartbeat(Duration::from_millis(50))
        .connect(common::url())
        .unwrap();
    drop(locks.try_lock("metrics/a").unwrap().expect("free"));
    let held = locks.try_lock("metrics/b").unwrap().expect("free");
    let shared = locks.try_lock_shared("metrics/c").unwrap().expect("free");
    let mut outside = plain();
    let busy = LockKey::name("metrics/d");
    assert!(plain_try_lock(&mut outside, busy));
    assert!(locks.try_lock(busy).unwrap().is_none());
    assert!(
        locks
            .try_lock_for(busy, Duration::from_millis(100))
            .unwrap()
            .is_none()
    );
    assert!(plain_unlock(&mut outside, busy));
    assert!(kill_app(&mut outside, app) >= 1);
    assert!(time_to_loss(&held, Duration::from_secs(5)).is_some());
    drop((held, shared));
    assert!(eventually(Duration::from_secs(10), || locks
        .stats()
        .reconnects
        == 1));
    let last = locks.try_lock("metrics/e").unwrap().expect("free");
    // The counters and gauges are published every second.
    thread::sleep(Duration::from_millis(1500));
    let text = handle.render();
    let figures = parse(&text);
    let get = |series: &str| {
        *figures
            .get(series)
            .unwrap_or_else(|| panic!("{series} is missing from:\n{text}"))
    };
    let l = format!("application=\"{app}\"");
    assert_eq!(get(&format!("distlock_grants_total{{{l}}}")), 4.0);
    assert_eq!(get(&format!("distlock_refusals_total{{{l}}}")), 2.0);
    assert_eq!(get(&format!("distlock_timeouts_total{{{l}}}")), 1.0);
    assert_eq!(get(&format!("distlock_lost_total{{{l}}}")), 2.0);
    assert_eq!(get(&format!("distlock_reconnects_total{{{l}}}")), 1.0);
    assert_eq!(get(&format!("distlock_refused_servers_total{{{l}}}")), 0.0);
    assert_eq!(
        get(&format!("distlock_held_locks{{{l},kind=\"exclusive\"}}")),
        1.0
    );
    assert_eq!(
        get(&format!("distlock_held_locks{{{l},kind=\"shared\"}}")),
        0.0
    );
    assert_eq!(get(&format!("distlock_waiting_callers{{{l}}}")), 0.0);
    assert_eq!(get(&format!("distlock_lock_session_open{{{l}}}")), 1.0);
    // Hold times: the one guard released while held (a lost guard counts as lost instead).
    assert_eq!(get(&format!("distlock_hold_seconds_count{{{l}}}")), 1.0);
    drop(last);
    eprintln!("{text}");
}

//! The `metrics` feature: every manager's statistics through the `metrics` facade, labelled with
//! its application name. Counters and gauges are published from [`Stats`] snapshots once a
//! second (and when the manager goes away) by a thread of the manager; the wait and hold times
//! are recorded as they happen. Until the application installs a recorder, the facade does
//! nothing with them.

use std::sync::{Arc, Weak};
use std::thread;
use std::time::Duration;

use metrics::{Counter, Gauge, counter, gauge, histogram};

use crate::caller::shared::Shared;
use crate::stats::Stats;

/// How often the counters and gauges are published.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// The handles of one manager's figures.
struct Published {
    counters: [Counter; 6],
    held: [Gauge; 3],
    waiting: Gauge,
    session: Gauge,
    extra: Gauge,
}

impl Published {
    fn new(app: &str) -> Published {
        let label = |name: &'static str| counter!(name, "application" => app.to_owned());
        let held = |kind: &'static str| gauge!("distlock_held_locks", "application" => app.to_owned(), "kind" => kind);
        Published {
            counters: [
                label("distlock_grants_total"),
                label("distlock_refusals_total"),
                label("distlock_timeouts_total"),
                label("distlock_lost_total"),
                label("distlock_reconnects_total"),
                label("distlock_refused_servers_total"),
            ],
            held: [held("exclusive"), held("shared"), held("permit")],
            waiting: gauge!("distlock_waiting_callers", "application" => app.to_owned()),
            session: gauge!("distlock_lock_session_open", "application" => app.to_owned()),
            extra: gauge!("distlock_extra_connections", "application" => app.to_owned()),
        }
    }

    fn publish(&self, s: &Stats) {
        let values = [
            s.grants,
            s.refusals,
            s.timeouts,
            s.lost,
            s.reconnects,
            s.refused_servers,
        ];
        for (counter, value) in self.counters.iter().zip(values) {
            counter.absolute(value);
        }
        for (gauge, value) in
            self.held
                .iter()
                .zip([s.held_exclusive, s.held_shared, s.held_permits])
        {
            gauge.set(value as f64);
        }
        self.waiting.set(s.waiting as f64);
        self.session.set(f64::from(u8::from(s.lock_session_open)));
        self.extra.set(s.extra_connections_open as f64);
    }
}

/// Starts publishing the figures of the manager `shared`, named `app`; it ends with the manager.
pub(crate) fn publish(shared: &Arc<Shared>, app: &str) {
    shared.link().counters().record_times_into(
        histogram!("distlock_wait_seconds", "application" => app.to_owned()),
        histogram!("distlock_hold_seconds", "application" => app.to_owned()),
    );
    let published = Published::new(app);
    published.publish(&shared.stats());
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let _ = thread::Builder::new()
        .name("distlock-metrics".into())
        .spawn(move || {
            loop {
                thread::sleep(PUBLISH_EVERY);
                match weak.upgrade() {
                    Some(shared) => published.publish(&shared.stats()),
                    None => return,
                }
            }
        });
}

//! Starting a manager: the worker side (the worker thread with its connection, and the monitor)
//! and the caller side (the shared state every handle and guard keeps), joined by the request
//! queue; and, opened later and only when needed, its waiting connections, each a manager of its
//! own started the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::caller::acquire::FIRST_RETRY;
use crate::caller::handle::LockManager;
use crate::caller::pool::{IDLE_CLOSE, Open, WaitPool};
use crate::caller::shared::{Settings, Shared, Waits};
use crate::caller::waiting::{MAX_APPLICATION_NAME, cut};
use crate::error::{Error, ErrorKind, Result};
use crate::libpq::params;
use crate::libpq::tls::{self, Tls};
use crate::protocol::link::Link;
use crate::protocol::names::Names;
use crate::protocol::slot::SPIN_HAND_OVER_TURNS;
use crate::sql::keepalive::ServerKeepalive;
use crate::worker::connect::{Connector, Role};
use crate::worker::{self, Spec, monitor};

/// The application name of a lock session whose builder and parameters name none.
const DEFAULT_APPLICATION_NAME: &str = "distlock";
/// What a waiting connection's application name adds to its manager's.
const WAITING_SUFFIX: &str = " (waiting connection)";
/// What the application name of a lock transaction's connection ends with (transaction mode).
const TRANSACTION_SUFFIX: &str = " (lock transaction)";

/// A manager holds at most this fraction (1 / it) of the server's shared lock table.
const LOCK_TABLE_SHARE: i64 = 4;
/// Requests that may queue for the worker before senders wait (within their own bound).
const QUEUE_CAPACITY: usize = 1024;
/// How long a lone caller spins for its reply with `Builder::spin_wait`: about a millisecond, a few
/// round trips to a nearby server.
const SPIN_TURNS: u32 = 20_000;
/// The shortest connect timeout a waiting connection is opened with, however close the waiting
/// caller's deadline.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_millis(1);
/// The shortest heartbeat; shorter settings are raised to it.
const MIN_HEARTBEAT: Duration = Duration::from_millis(1);
/// The largest TCP user timeout Linux accepts (`i32::MAX` milliseconds).
const MAX_TCP_USER_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// A manager's settings, as the builder collected them (its docs say what each means).
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// `None`: the connection parameters', else [`DEFAULT_APPLICATION_NAME`].
    pub(crate) application_name: Option<String>,
    pub(crate) connect_timeout: Duration,
    /// How long the first connect keeps trying a failure that may pass.
    pub(crate) connect_retry: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) max_locks: usize,
    pub(crate) max_retry_interval: Duration,
    pub(crate) heartbeat: Duration,
    pub(crate) spin_wait: bool,
    pub(crate) tls: Tls,
    pub(crate) allow_standby: bool,
    pub(crate) dead_holder_timeout: Duration,
    pub(crate) wait_connections: usize,
    pub(crate) transaction_pooler: bool,
    pub(crate) warn_held_after: Option<Duration>,
    /// A waiting connection or lock transaction of another manager: that manager's link, whose
    /// stalls end this one's waits.
    pub(crate) owner: Option<Arc<Link>>,
    pub(crate) max_transactions: usize,
    /// What this manager's own connection is for (a lock transaction's manager is a
    /// [`Role::LockTransaction`]).
    pub(crate) role: Role,
    /// Record the names of the keys locked by name ([`crate::Builder::record_names`]).
    pub(crate) record_names: bool,
}

/// Connects with `config` and `tls` as given, the builder's settings applied on top, and starts
/// both sides of the manager.
pub(crate) fn start(
    options: Options,
    mut config: postgres::Config,
    tls: Tls,
) -> Result<LockManager> {
    let name = options
        .application_name
        .clone()
        .or_else(|| config.get_application_name().map(str::to_owned))
        .unwrap_or_else(|| DEFAULT_APPLICATION_NAME.to_owned());
    config.application_name(&name);
    let link = Arc::new(Link::new());
    let (options, waits) = if options.transaction_pooler {
        let waits = lock_transactions(&options, &name, &config, &tls, &link);
        let control = Options {
            role: Role::Coordinator,
            ..options
        };
        (control, waits)
    } else {
        let waits = waiting_connections(&options, &name, &config, &tls, &link);
        (options, waits)
    };
    params::libpq_defaults(&mut config)?;
    options.check_settings()?;
    params::check_hosts(&config)?;
    let connector = tls.connector(&mut config)?;
    apply_settings(&options, &mut config);
    let spin_turns = spin_turns(options.spin_wait);
    let (requests, queue) = crossbeam_channel::bounded(QUEUE_CAPACITY);
    // A waiting connection's or lock transaction's names are its owner's to record.
    let names = Arc::new(Names::new(options.record_names && options.owner.is_none()));
    let (shutdown, shutdown_rx) = crossbeam_channel::bounded(0);
    let spec = Spec {
        connector: Arc::new(worker_connector(&options, config, connector)),
        requests: queue,
        link: Arc::clone(&link),
        heartbeat: options.heartbeat.max(MIN_HEARTBEAT),
        stall_limit: stall_limit(&options),
        hand_over_turns: if spin_turns == 0 {
            1
        } else {
            SPIN_HAND_OVER_TURNS
        },
        owner: options.owner.clone(),
        names: Arc::clone(&names),
    };
    start_worker_within(&spec, options.connect_retry)?;
    let (max_locks, lock_table_limit) = lock_limit(options.max_locks, spec.connector.lock_table());
    monitor::start(spec, shutdown_rx).map_err(spawn_error)?;
    let settings = Settings {
        request_timeout: options.request_timeout,
        max_locks,
        lock_table_limit,
        max_retry_interval: options.max_retry_interval.max(FIRST_RETRY),
        spin_turns,
        transactions: options.transaction_pooler,
        warn_held_after: options.warn_held_after,
    };
    let shared = Shared::new(
        requests,
        link,
        shutdown,
        settings,
        waits,
        names,
        name.as_str().into(),
    );
    // A manager's waiting connections and lock transactions are counted in its own figures.
    #[cfg(feature = "metrics")]
    if options.owner.is_none() {
        crate::caller::metrics::publish(&shared, &name);
    }
    Ok(LockManager::from_shared(shared))
}

/// The most holds a manager may have: the builder's `max_locks`, or a quarter of the server's
/// shared lock table of `entries` (0: unknown) when that is smaller (then also the entries).
fn lock_limit(max_locks: usize, entries: i64) -> (usize, Option<i64>) {
    let share = usize::try_from(entries / LOCK_TABLE_SHARE).unwrap_or(0);
    if entries > 0 && share < max_locks {
        (share, Some(entries))
    } else {
        (max_locks, None)
    }
}

/// The waiting connections of a manager named `name` (none with `wait_connections(0)`): each a
/// manager of its own, with the same settings, a name that says it waits, and no waiting
/// connections of its own.
fn waiting_connections(
    options: &Options,
    name: &str,
    config: &postgres::Config,
    tls: &Tls,
    owner: &Arc<Link>,
) -> Option<Waits> {
    if options.wait_connections == 0 {
        return None;
    }
    let one = Options {
        wait_connections: 0,
        // Opened for a caller, within its deadline: one attempt.
        connect_retry: Duration::ZERO,
        application_name: Some(suffixed(name, WAITING_SUFFIX)),
        ..options.clone()
    };
    let usable = |shared: &Arc<Shared>| shared.link().generations.is_online();
    Some(pool_of(
        one,
        config,
        tls,
        options.wait_connections,
        usable,
        owner,
    ))
}

/// The lock transactions of a manager named `name` in transaction mode: each a manager of its own
/// whose connection runs one transaction ([`Role::LockTransaction`]), named with
/// [`TRANSACTION_SUFFIX`], opened for one lock (or one wait) and closed when it is done, never
/// reused (an idle one would keep a server connection pinned for nothing).
fn lock_transactions(
    options: &Options,
    name: &str,
    config: &postgres::Config,
    tls: &Tls,
    owner: &Arc<Link>,
) -> Option<Waits> {
    let one = Options {
        wait_connections: 0,
        transaction_pooler: false,
        role: Role::LockTransaction,
        connect_retry: Duration::ZERO,
        application_name: Some(suffixed(name, TRANSACTION_SUFFIX)),
        ..options.clone()
    };
    Some(pool_of(
        one,
        config,
        tls,
        options.max_transactions,
        |_| false,
        owner,
    ))
}

/// A pool of at most `max` managers started with `one`'s settings, each opened for a caller
/// that waits: the connect gives up at the caller's deadline, so that the call keeps its bound.
fn pool_of(
    mut one: Options,
    config: &postgres::Config,
    tls: &Tls,
    max: usize,
    usable: fn(&Arc<Shared>) -> bool,
    owner: &Arc<Link>,
) -> Waits {
    one.owner = Some(Arc::clone(owner));
    let (config, tls) = (config.clone(), tls.clone());
    let hosts = u32::try_from(params::each_host(&config).len()).unwrap_or(u32::MAX);
    let open: Open<Arc<Shared>> = Box::new(move |deadline| {
        let mut options = one.clone();
        if let Some(deadline) = deadline {
            // Each host gets its own connect timeout: together they stay within the deadline.
            let per_host = deadline.saturating_duration_since(Instant::now()) / hosts;
            options.connect_timeout = options
                .connect_timeout
                .min(per_host.max(MIN_CONNECT_TIMEOUT));
        }
        let manager = start(options, config.clone(), tls.clone())?;
        Ok(Arc::clone(manager.shared()))
    });
    WaitPool::new(open, usable, max, IDLE_CLOSE)
}

/// `name` with `suffix` after it, cut on a character boundary so that the whole fits in what
/// PostgreSQL keeps of an application name.
fn suffixed(name: &str, suffix: &str) -> String {
    format!("{}{suffix}", cut(name, MAX_APPLICATION_NAME - suffix.len()))
}

/// How long one statement may run before its connection counts as stalled and is given up.
///
/// The holder must learn of a loss before the server frees its locks, and the README promises it
/// within half the dead-holder bound of the cut. After a silent cut the next statement starts
/// within a heartbeat; the monitor declares it stalled past the limit plus up to two of its ticks
/// (each at most an eighth of the limit). So the limit is four fifths of what half the bound leaves
/// after a heartbeat — but never under a quarter of the bound, so that a heartbeat too long for the
/// promise (over a sixth of the bound, documented) does not make healthy slow statements count as
/// stalls — and never over the request timeout.
fn stall_limit(options: &Options) -> Duration {
    let half = options.dead_holder_timeout / 2;
    let after_heartbeat = half.saturating_sub(options.heartbeat.max(MIN_HEARTBEAT));
    options
        .request_timeout
        .min((after_heartbeat / 5 * 4).max(half / 2))
}

/// The client settings every lock connection uses (its application name is set already).
fn apply_settings(options: &Options, config: &mut postgres::Config) {
    // TCP keepalives find a peer that vanished while the connection idles between heartbeats
    // (a host that died, a NAT that forgot us); the user timeout bounds how long unacknowledged
    // data may wait on a silent network before the socket fails. Linux takes at most
    // `i32::MAX` ms there (a larger value fails the connect), so a longer request timeout
    // saturates at that.
    config
        .connect_timeout(options.connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(5)
        .tcp_user_timeout(
            Duration::from_secs(30)
                .max(options.request_timeout)
                .min(MAX_TCP_USER_TIMEOUT),
        );
}

/// The turns a lone caller spins for its reply: none unless asked for, and none on one CPU.
fn spin_turns(spin_wait: bool) -> u32 {
    if spin_wait && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
        SPIN_TURNS
    } else {
        0
    }
}

/// The worker's connector: how it connects, and what it sets up in every lock session.
fn worker_connector(
    options: &Options,
    config: postgres::Config,
    connector: tls::Connector,
) -> Connector {
    // Past 24 days (or never), the server's own keepalive settings are left alone.
    let keepalive = (options.dead_holder_timeout <= MAX_TCP_USER_TIMEOUT).then(|| {
        let renewed_within = options
            .heartbeat
            .max(MIN_HEARTBEAT)
            .saturating_add(stall_limit(options));
        ServerKeepalive::within(options.dead_holder_timeout, renewed_within)
    });
    Connector::new(
        config,
        connector,
        options.connect_timeout,
        options.allow_standby,
        keepalive,
        options.role,
        options.owner.is_none(),
    )
}

/// Starts the worker and waits for its first connection; a failure that may pass is tried again,
/// with the reconnect backoff, until `retry_for` has passed.
fn start_worker_within(spec: &Spec, retry_for: Duration) -> Result<()> {
    let deadline = Instant::now().checked_add(retry_for);
    let mut backoff = Backoff::new(worker::FIRST_RECONNECT, worker::MAX_RECONNECT);
    loop {
        match start_worker(spec.clone(), spec.connector.bound()) {
            Err(e) if e.may_pass() => {
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left.is_some_and(|left| left.is_zero()) {
                    return Err(e);
                }
                log::info!("distlock: connect failed, trying again: {e}");
                let pause = backoff.next_pause();
                std::thread::sleep(left.map_or(pause, |left| pause.min(left)));
            }
            done => return done,
        }
    }
}

/// Starts the worker and waits for its first connection, within the connect timeout.
fn start_worker(spec: Spec, bound: Duration) -> Result<()> {
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    worker::start_first(spec, ready_tx).map_err(spawn_error)?;
    // The worker bounds the attempt by the connect timeout per host; the margin only covers the
    // hand-off.
    match ready_rx.recv_timeout(bound.saturating_add(Duration::from_secs(1))) {
        Ok(result) => result,
        Err(_) => Err(Error::timeout("timed out connecting to the server")),
    }
}

impl Options {
    /// Rejects settings that cannot work, before anything is started.
    pub(crate) fn check_settings(&self) -> Result<()> {
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("heartbeat", self.heartbeat),
            ("dead_holder_timeout", self.dead_holder_timeout),
        ] {
            if value.is_zero() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{name} must be longer than zero"),
                ));
            }
        }
        Ok(())
    }
}

fn spawn_error(e: std::io::Error) -> Error {
    Error::with_source(
        ErrorKind::Io,
        "could not spawn the lock manager's threads",
        e,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_connections_name_fits_and_says_it_waits() {
        assert_eq!(
            suffixed("billing", WAITING_SUFFIX),
            "billing (waiting connection)"
        );
        let long = "é".repeat(40); // 80 bytes
        let name = suffixed(&long, WAITING_SUFFIX);
        assert!(name.len() <= MAX_APPLICATION_NAME, "{} bytes", name.len());
        assert!(name.ends_with(WAITING_SUFFIX));
        assert!(name.starts_with("éé"));
    }

    #[test]
    fn a_manager_holds_at_most_a_quarter_of_the_servers_lock_table() {
        assert_eq!(lock_limit(1024, 6400), (1024, None));
        assert_eq!(lock_limit(1024, 3000), (750, Some(3000)));
        assert_eq!(lock_limit(1024, 0), (1024, None), "unknown: the builder's");
    }
}

//! `Builder`: a manager's settings, each with its default, and the ways to connect.

use std::time::Duration;

use crate::caller::handle::LockManager;
use crate::error::{Error, ErrorKind, Result};
use crate::libpq::params;
use crate::libpq::tls::{SslMode, Tls};
use crate::start::{self, Options};
use crate::worker::connect::Role;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
const DEFAULT_MAX_LOCKS: usize = 1024;
const DEFAULT_DEAD_HOLDER_TIMEOUT: Duration = Duration::from_secs(12);
const DEFAULT_WAIT_CONNECTIONS: usize = 4;
const DEFAULT_MAX_TRANSACTIONS: usize = 16;
const DEFAULT_MAX_RETRY_INTERVAL: Duration = Duration::from_millis(8);

impl LockManager {
    /// Connects with default settings; `params` is a libpq `key=value` string or a `postgres://`
    /// URL.
    ///
    /// Blocks until the connection is ready or the connect timeout (5 s) has passed. Equivalent to
    /// `LockManager::builder().connect(params)`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) for parameters that do not parse, [`ErrorKind::Connect`](crate::ErrorKind::Connect) when the server
    /// refuses or cannot be reached (wrong host, port, password or database), [`ErrorKind::Timeout`](crate::ErrorKind::Timeout)
    /// when it does not answer in time.
    ///
    /// ```no_run
    /// use distlock::{ErrorKind, LockManager};
    ///
    /// let locks = LockManager::connect("host=localhost user=postgres")?;
    /// let err = LockManager::connect("host=localhost port=notaport").unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Config);
    /// # Ok::<(), distlock::Error>(())
    /// ```
    pub fn connect(params: &str) -> Result<LockManager> {
        Builder::default().connect(params)
    }

    /// A builder for a manager with non-default settings.
    pub fn builder() -> Builder {
        Builder::default()
    }
}

/// Settings for a [`LockManager`](crate::LockManager), taken by value and consumed by `connect`.
///
/// ```no_run
/// use std::time::Duration;
///
/// let locks = distlock::LockManager::builder()
///     .application_name("billing-cron")
///     .connect_timeout(Duration::from_secs(2))
///     .connect("postgres://locker@db.internal/app")?;
/// # Ok::<(), distlock::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    options: Options,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder {
            options: Options {
                application_name: None,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                connect_retry: Duration::ZERO,
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                max_locks: DEFAULT_MAX_LOCKS,
                max_retry_interval: DEFAULT_MAX_RETRY_INTERVAL,
                heartbeat: DEFAULT_HEARTBEAT,
                spin_wait: false,
                tls: Tls::new(),
                allow_standby: false,
                dead_holder_timeout: DEFAULT_DEAD_HOLDER_TIMEOUT,
                wait_connections: DEFAULT_WAIT_CONNECTIONS,
                transaction_pooler: false,
                warn_held_after: None,
                owner: None,
                max_transactions: DEFAULT_MAX_TRANSACTIONS,
                role: Role::LockSession,
                record_names: false,
            },
        }
    }
}

impl Builder {
    /// The `application_name` of the lock session, shown in `pg_stat_activity` next to the locks
    /// it holds. Overrides one given in the connection parameters.
    ///
    /// The manager's waiting connections carry the same name with ` (waiting connection)` after
    /// it (the name cut to fit PostgreSQL's 63 bytes), so an operator — or a monitoring tool that
    /// flags long-running statements — can tell a queued waiter from the lock session. A lock
    /// granted after a wait in the queue is held by that connection, under that name.
    ///
    /// Defaults to the connection parameters' `application_name`, else `"distlock"`.
    pub fn application_name(mut self, name: &str) -> Builder {
        self.options.application_name = Some(name.to_owned());
        self
    }

    /// Records the name of each key this manager locks by its name (`&str`, `String`) in the
    /// table `public.distlock_names` (`id`, `name`), so that `distlock locks` and its live view
    /// show names instead of FNV-1a ids. Each name is written once per manager, by the worker
    /// when its connection is quiet after the name's first grant: never on a call's path (what the first
    /// lock of a name costs is in the README's Performance section). The table is created on
    /// first use, as the fencing sequence is; a role that may not create it or write to it gets
    /// one warning naming the statement to run once, and locking is unaffected.
    ///
    /// Defaults to off (`distlock run` turns it on).
    pub fn record_names(mut self, on: bool) -> Builder {
        self.options.record_names = on;
        self
    }

    /// How long a connect waits for each host to be ready, all steps together (TCP, TLS, start-up,
    /// authentication). With several hosts, each gets a timeout of its own and they are tried in
    /// turn, as libpq's `connect_timeout` does, so `connect` takes at most this once per host: a
    /// host that accepts TCP and never answers (a stopped or hung server) costs one timeout and
    /// the next host is tried.
    ///
    /// Defaults to 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Builder {
        self.options.connect_timeout = timeout;
        self
    }

    /// How long `connect` keeps trying when the first connection fails for a reason that may
    /// pass by itself: every host refused or unreachable, a timeout, a standby (a failover in
    /// progress), a server starting up or shutting down, no connection slot left. It tries again
    /// with the reconnect backoff (50 ms doubling to 1 s, with jitter) and returns the last error
    /// once this much time has passed since it began — so `connect` takes at most this plus one
    /// attempt (a connect timeout per host). A refused password, a missing database, a bad
    /// certificate or bad parameters fail at once. `Duration::MAX` keeps trying for as long as it
    /// takes.
    ///
    /// Defaults to zero: one attempt.
    pub fn connect_retry(mut self, retry_for: Duration) -> Builder {
        self.options.connect_retry = retry_for;
        self
    }

    /// How long a call waits for the worker to answer one request: a single try of a lock, a
    /// release, or an [`LockGuard::ensure_held`](crate::LockGuard::ensure_held). A call that passes it fails with
    /// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout).
    ///
    /// It also bounds how long the manager stays behind a stalled connection: when one statement has
    /// run for longer than this or than the stall bound [`Builder::dead_holder_timeout`](crate::Builder::dead_holder_timeout)
    /// derives (4 s by default), whichever is shorter (but at least 100 ms), the connection is
    /// declared lost, its locks are reported lost, and a new connection takes over.
    ///
    /// Defaults to 10 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Builder {
        self.options.request_timeout = timeout;
        self
    }

    /// The most locks the manager holds at once (each shared holder counts, and the holds of its
    /// waiting connections); a try past it fails with
    /// [`ErrorKind::TooManyLocks`](crate::ErrorKind::TooManyLocks).
    ///
    /// Every held lock takes an entry of the server's shared lock table, about
    /// `max_locks_per_transaction × (max_connections + max_prepared_transactions)` entries for all
    /// sessions together. A session that fills it makes every other session's lock requests fail
    /// — and every new connection, with `FATAL: out of shared memory`. So, whatever this setting
    /// says, a manager holds at most a quarter of that table, read from the server at connect
    /// (the error's message then says so). A fleet of managers shares the table too: keep the
    /// locks all of them hold at once well below it (the server's own sessions need entries as
    /// well), or raise `max_locks_per_transaction`.
    ///
    /// Defaults to 1024.
    pub fn max_locks(mut self, max: usize) -> Builder {
        self.options.max_locks = max;
        self
    }

    /// How long the connection may sit idle before the worker checks it with an empty query.
    ///
    /// A session lock lives exactly as long as its connection. A session the server ends is seen
    /// sooner, within a quarter of a second at most: an idle worker reads its socket at each tick
    /// of the manager's monitor (at most 250 ms apart, and a quarter of the heartbeat when that is
    /// shorter) without sending anything. A connection that goes silent (a stopped server, a lost
    /// network) says nothing, and the heartbeat bounds how long that loss can go unnoticed (one
    /// heartbeat plus a round trip). A busy connection needs no heartbeat: every request proves it
    /// alive. Values down to 10 ms work; each check costs the server one round trip.
    ///
    /// Defaults to 1 s.
    pub fn heartbeat(mut self, interval: Duration) -> Builder {
        self.options.heartbeat = interval;
        self
    }

    /// The longest pause between two tries while waiting for a lock held by another session
    /// (`lock`, `try_lock_for` and the shared forms). Pauses start at 1 ms and double up to this cap,
    /// each with random jitter. A larger cap puts less load on the server while many callers wait;
    /// a smaller one notices a release by another process sooner. A release by a guard of this
    /// same manager wakes its waiters at once, whatever the cap.
    ///
    /// Defaults to 8 ms: a release by another process is seen within about 8 ms plus a round trip.
    pub fn max_retry_interval(mut self, interval: Duration) -> Builder {
        self.options.max_retry_interval = interval;
        self
    }

    /// How many extra connections the manager may open to wait in PostgreSQL's own lock queue
    /// (`lock`, `try_lock_for`, their shared and fenced forms, `lock_all`, `try_lock_all_for`).
    ///
    /// Waiting there is fair and fast: PostgreSQL grants a released lock to the session that has
    /// waited longest, across every process and host, straight from the release, and a try
    /// cannot barge past a queued waiter. A waiting call first tries once on the manager's own
    /// connection; if the lock is held, it waits on one of these connections, which then holds
    /// the lock for its guard (an ordinary guard: released on drop, loss announced,
    /// `ensure_held`). The connections are opened when first needed, serve one wait (and its
    /// guards) at a time, and close after 10 s unused; a call that finds all of them busy waits
    /// for one, in arrival order. They use this builder's settings, application name included.
    /// When one cannot be opened (the server's or the role's connection limit, say), that call
    /// waits by polling instead.
    ///
    /// `0` waits by polling on the manager's own connection instead (see
    /// [`Builder::max_retry_interval`](crate::Builder::max_retry_interval)): no extra connection, but a release by another process is
    /// noticed up to a backoff later, and callers are served in no particular order (semaphore
    /// permits too; with waiting connections they queue for their semaphore's turnstile).
    ///
    /// Defaults to 4.
    pub fn wait_connections(mut self, connections: usize) -> Builder {
        self.options.wait_connections = connections;
        self
    }

    /// Warns (through `log`, at `warn` level) of every guard held longer than `after`: once when
    /// it passes the bound, naming its key and the place in the caller's code that took it
    /// (`file:line`), and once more when it is finally released, with how long it was held. A
    /// lock held for too long is how a stuck job or a forgotten guard shows; this tells which.
    ///
    /// Off by default; while off, nothing is kept. When on, each guard is registered in a small
    /// table and a thread of the manager looks at it every quarter of `after` (at most every
    /// second), so a warning comes within that much past the bound.
    pub fn warn_held_after(mut self, after: Duration) -> Builder {
        self.options.warn_held_after = Some(after);
        self
    }

    /// Transaction mode: for a connection string that names a *transaction pooler* (pgbouncer
    /// `pool_mode = transaction`, Supabase's pooled port, Neon's `-pooler` host), where a session
    /// lock would exclude nobody (the pooler shares server sessions between clients).
    ///
    /// Each lock then lives in a transaction of its own, on a connection to the pooler of its own
    /// (`pg_try_advisory_xact_lock` and the other transaction-lock functions, granted by row count
    /// like every lock here), and is released when that transaction ends: when `drop(guard)`
    /// returns, the server has released it. The pooler pins one server connection to each open
    /// transaction, so the server connections a fleet uses follow the locks held and the waits in
    /// progress, not the processes: a manager that holds nothing holds no server connection (its
    /// own connection to the pooler runs only `holders` lookups). Each transaction is READ
    /// COMMITTED and sets its own `idle_in_transaction_session_timeout` to the lease (see
    /// [`Builder::dead_holder_timeout`]; a shorter server-wide cull would otherwise end it, and
    /// free its lock) and assigns no transaction id, so a held lock
    /// never holds back vacuum. Loss is announced (heartbeats run inside the transaction, on its
    /// pinned server connection), `ensure_held` proves the lock, and waits queue in PostgreSQL's
    /// lock queue — each wait in a transaction of its own, which pins a server connection while it
    /// waits. At most [`Builder::max_transactions`] are open at once per manager.
    ///
    /// What it costs: every try opens a connection to the pooler and a transaction (a few round
    /// trips more than a try on a session, measured in the README), and each lock held or awaited
    /// pins a server connection. A transaction-mode lock and a session lock on the same key
    /// exclude each other, so managers of both modes can share keys.
    ///
    /// Everything else keeps its meaning. A fencing token is drawn right after the grant on the
    /// manager's own connection (drawing it inside the lock's transaction would assign that a
    /// transaction id), and the lock is proven still held afterwards, so tokens only grow, across
    /// both modes. A semaphore permit is one slot in one transaction. All-or-nothing keys are
    /// each held in a transaction of their own, taken in the order of their ids; a refused key
    /// releases the others before the call returns, and each guard releases its own key. An
    /// election's leadership is a fenced lock like any other.
    ///
    /// Chosen explicitly, never detected: a manager cannot tell a transaction pooler from a
    /// server it may keep a session on before it has handed out a lock, and the two modes cost
    /// differently. Connecting in session mode through a transaction pooler fails with
    /// [`ErrorKind::Pooler`](crate::ErrorKind::Pooler), whose message names this setting.
    ///
    /// Defaults to `false`.
    pub fn transaction_pooler(mut self, on: bool) -> Builder {
        self.options.transaction_pooler = on;
        self
    }

    /// In transaction mode ([`Builder::transaction_pooler`]), the most lock transactions one
    /// manager keeps open at once — locks held plus waits in progress — and so the most server
    /// connections it pins through the pooler. A call beyond it waits for one to close — a try
    /// up to the request timeout, a waiting call up to its deadline — and then fails with
    /// [`ErrorKind::TooManyLocks`](crate::ErrorKind::TooManyLocks) (a waiting call without a
    /// deadline waits for as long as it takes).
    ///
    /// Defaults to 16.
    pub fn max_transactions(mut self, transactions: usize) -> Builder {
        self.options.max_transactions = transactions;
        self
    }

    /// Whether a call that is the manager's only one in flight spins on its CPU for its reply,
    /// for up to about a millisecond, before it sleeps.
    ///
    /// Sleeping costs two thread wake-ups a round trip; spinning saves them, which lowers the
    /// latency of one thread's calls (measured: a lock+unlock cycle's median well below the raw
    /// client's, see the README's Performance section), at a price: a CPU is busy while the call
    /// waits, the slowest calls get slower, and each call does several times the CPU work. Calls
    /// made while another is in flight never spin, so many threads do not burn the CPUs; on a
    /// machine with one CPU nobody spins.
    ///
    /// Defaults to `false`.
    pub fn spin_wait(mut self, spin: bool) -> Builder {
        self.options.spin_wait = spin;
        self
    }

    /// How long the server keeps the locks of a holder whose host vanished — lost power or its
    /// network, with no FIN or RST to end its connections.
    ///
    /// The server notices a silent client only through TCP keepalives, after about two hours with
    /// the kernel's defaults, and every other host waits that long. Each lock session therefore
    /// sets the server's `tcp_keepalives_idle`, `tcp_keepalives_interval`, `tcp_keepalives_count`
    /// and `tcp_user_timeout` for itself (any role may) so that the server ends a silent session,
    /// and frees its locks, within this bound (aiming a second short of it, for the kernel's late
    /// timers: half idle, the rest in unanswered probes).
    /// The holder's own side learns of the loss sooner, within half the bound: a heartbeat or
    /// statement that gets no answer in time (at most four fifths of what half the bound leaves
    /// after a heartbeat, and at most the request timeout) declares the connection lost, so a holder
    /// cut off from the server is told before anyone else can take its locks. That promise needs a
    /// heartbeat of at most a sixth of the bound (the defaults, 1 s and 12 s, keep it); with a
    /// longer heartbeat the holder is still told, within a heartbeat and a quarter of the bound.
    /// Over a unix-domain socket there is no TCP, and nothing to set.
    ///
    /// Behind a proxy (a pooler, pgpool-II) the keepalives watch the proxy's socket, not the
    /// client's, so the server also keeps a lease on each lock session and lock transaction: its
    /// `idle_session_timeout` (PostgreSQL 14 and later) or `idle_in_transaction_session_timeout`
    /// is set to the bound less a second, and every statement — the heartbeat, when nothing else
    /// runs — renews it. A client that vanished behind any proxy loses its locks within the bound.
    /// The lease is never shorter than a heartbeat plus the time one may take before the
    /// connection counts as stalled, plus a second, so it never ends a live session; but a holder
    /// stopped past it (SIGSTOP, a frozen VM) loses its locks too, and is told at its next call
    /// ([`crate::LockGuard::ensure_held`] refuses).
    ///
    /// Whole seconds, at least 2; longer than 24 days leaves the server's settings alone.
    /// Measured: see the README's Performance section.
    ///
    /// Defaults to 12 s.
    pub fn dead_holder_timeout(mut self, timeout: Duration) -> Builder {
        self.options.dead_holder_timeout = timeout;
        self
    }

    /// Whether a standby may serve locks. Advisory locks work on a hot standby but are local to
    /// it — never replicated — so locks taken on a read replica exclude nobody on the primary or on
    /// other replicas. By default every connection and reconnection checks `pg_is_in_recovery()`
    /// and refuses a standby with [`ErrorKind::Connect`](crate::ErrorKind::Connect) (the message says "standby"); with several
    /// hosts, `target_session_attrs=read-write` makes the client skip standbys by itself. Allow it
    /// only when every process that contends for the locks uses that same standby.
    ///
    /// Defaults to `false`.
    pub fn allow_standby(mut self, allow: bool) -> Builder {
        self.options.allow_standby = allow;
        self
    }

    /// TLS settings (libpq's `sslmode`, `sslrootcert`, `sslcert`, `sslkey`) for connections whose
    /// parameters do not say otherwise; see [`Tls`] and the crate docs' "TLS".
    ///
    /// Defaults to `sslmode=prefer` with no root certificate, as libpq.
    pub fn tls(mut self, tls: Tls) -> Builder {
        self.options.tls = tls;
        self
    }

    /// Connects; `params` is a libpq `key=value` string or a `postgres://` URL.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::connect`](crate::LockManager::connect).
    pub fn connect(self, params: &str) -> Result<LockManager> {
        if params.trim().is_empty() {
            // libpq would try the default socket as the OS user; an empty string is far more
            // often a variable that was never set.
            return Err(Error::new(
                ErrorKind::Config,
                "no connection parameters given (an empty string)",
            ));
        }
        let (config, tls) = Tls::parse_params(params)?;
        let tls = self.options.tls.overridden_by(&tls);
        start::start(self.options, config, tls)
    }

    /// Connects with a ready `postgres::Config`; the builder's settings are applied on top of it.
    ///
    /// # Errors
    ///
    /// As for [`LockManager::connect`](crate::LockManager::connect).
    pub fn connect_config(self, config: postgres::Config) -> Result<LockManager> {
        // The client's own setting (disable, prefer or require) unless the builder says more.
        let mode = match config.get_ssl_mode() {
            postgres::config::SslMode::Disable => SslMode::Disable,
            postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        let tls = Tls::new().mode(mode).overridden_by(&self.options.tls);
        start::start(self.options, config, tls)
    }

    /// Checks `config` and this builder's settings as [`Builder::connect_config`](crate::Builder::connect_config) does, without
    /// connecting: a host list the client could not use, or a zero connect timeout, request
    /// timeout or heartbeat.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config), saying what is wrong.
    ///
    /// ```
    /// use std::str::FromStr;
    /// use distlock::{ErrorKind, LockManager};
    ///
    /// let config = postgres::Config::from_str("host=a,b,c port=5432,5433")?;
    /// let err = LockManager::builder().check(&config).unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Config);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn check(&self, config: &postgres::Config) -> Result<()> {
        self.options.check_settings()?;
        params::check_hosts(config)
    }
}

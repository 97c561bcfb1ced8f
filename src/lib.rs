//! Distributed locks on PostgreSQL session advisory locks, for threaded (non-async) programs.
//!
//! Processes on many hosts that share nothing but a PostgreSQL database get `std::sync::Mutex`
//! semantics across all of them: one [`LockManager`] per process holds one connection, any number of
//! threads take locks through it, and each lock is held by an RAII [`LockGuard`] that releases it on
//! drop.
//!
//! ```no_run
//! use std::time::Duration;
//! use distlock::{LockKey, LockManager};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let locks = LockManager::builder()
//!         .application_name("report-cron")
//!         .connect("host=db.internal user=app dbname=app")?;
//!
//!     // Run the nightly report on one host only; the others skip it.
//!     match locks.try_lock("nightly-report")? {
//!         Some(guard) => {
//!             // ... write the report ...
//!             guard.unlock()?; // or just let it drop
//!         }
//!         None => println!("another host is writing the report"),
//!     }
//!
//!     // Wait up to 30 s for a per-tenant lock; keys may also be integers or (int4, int4) pairs.
//!     if let Some(_guard) = locks.try_lock_for(LockKey::pair(7, 1234), Duration::from_secs(30))? {
//!         // ... migrate tenant 1234 ...
//!     }
//!
//!     // Many readers, one writer.
//!     let _reading = locks.lock_shared("schema")?;
//!     Ok(())
//! }
//! ```
//!
//! # Semantics
//!
//! * `Ok(None)` means someone else holds the lock: another process, or another thread of this
//!   manager. `Err` is kept for real failures (see [`ErrorKind`]).
//! * Threads sharing a manager exclude each other exactly as separate processes do.
//! * Shared locks ([`LockManager::try_lock_shared`] and friends) admit any number of holders in and
//!   across processes; an exclusive lock waits until none is left.
//! * When `drop(guard)` returns, the server has released the lock, so another process can take it at
//!   once.
//! * Names map to ids with FNV-1a 64, the mapping of Go's `ldelossa/distlock` and `quay/claircore`,
//!   stable across versions and platforms (see [`LockKey`]).
//! * **Fair, fast waiting.** `lock`, `try_lock_for` and their shared, fenced and multi-key forms
//!   wait in PostgreSQL's own lock queue, on waiting connections of the manager
//!   ([`Builder::wait_connections`], 4 by default, opened when needed, closed after 10 s unused):
//!   waiters of every process and host are served in arrival order, a try cannot barge past a
//!   queued waiter, and a release reaches the next waiter straight from the server. A lock granted
//!   there is an ordinary guard. The server ends a wait at its deadline (`lock_timeout`); a grant
//!   that races the timeout is read back from `pg_locks` and handed out, and a wait that ends
//!   without a grant leaves nothing held. Waiters for a semaphore permit queue in arrival order for
//!   the semaphore's turnstile, a lock of its own; its holder tries the slots every 0.5 ms.
//!
//! # Beyond one lock
//!
//! Each of these is one statement, one round trip, on the manager's own connection, granted
//! (like every lock here) when its statement returns its row:
//!
//! * **Fencing tokens.** [`LockManager::try_lock_fenced`], [`LockManager::try_lock_fenced_for`]
//!   and [`LockManager::lock_fenced`] grant like `try_lock`, and [`LockGuard::fencing_token`]
//!   returns a number strictly greater than every token issued before for that key on the
//!   cluster — across managers, processes, reconnects and server crashes. A lock is a lease: a
//!   holder paused by a GC or a network stall can act after it lost the lock; a resource that
//!   refuses writes with a token lower than the highest it has seen refuses that holder. Tokens
//!   come from one sequence, `public.distlock_fence`, drawn after the grant in the same
//!   statement (`SELECT nextval(..) WHERE pg_try_advisory_lock(k)`), so a later holder's token is
//!   always higher. The first fenced call creates the sequence if it is missing; a role that may
//!   not gets an error naming what to run once (`CREATE SEQUENCE IF NOT EXISTS
//!   public.distlock_fence; GRANT USAGE ON SEQUENCE public.distlock_fence TO ..`).
//!   **Crashes and synchronous standbys:** a sequence writes WAL once per 32 values, and only the
//!   draw that writes it waits for that WAL; the next 31 values would be handed out at once,
//!   before their WAL is on disk or on a synchronous standby. So each draw also writes a small
//!   WAL record of its own in its transaction (a logical decoding message, prefix `distlock`;
//!   `pg_logical_emit_message` is callable by every role unless an administrator revoked it),
//!   with `synchronous_commit` raised to `on` for that transaction where it is `off` or `local`:
//!   the token is returned only once the WAL up to it is flushed and, with a synchronous standby
//!   (`synchronous_standby_names`, as Patroni's `synchronous_mode` sets it), confirmed by the
//!   standby. No token is issued twice after a crash, and tokens only grow across a failover to
//!   a synchronous standby, replication stalls included (tested: a stalled WAL sender, the
//!   primary killed, the standby promoted). The cost is one WAL flush per fenced grant, and one
//!   round trip to the synchronous standby (see the README's Performance section); while the
//!   standby does not confirm, fenced calls wait and end at their bound like any stalled
//!   statement. **Failover to an asynchronous standby:** the promoted standby's sequence is
//!   where the WAL it had received left it, so tokens the old primary issued within the
//!   replication lag (plus up to the 32 values a sequence logs ahead) can be issued again by the
//!   new primary — any value above the highest the standby had received, up to the highest the
//!   old primary issued. A resource that checks tokens then sees a token it already saw (or a
//!   lower one) and refuses that holder, which is safe but stops new holders until the sequence
//!   passes the highest token it has seen. Restore the guarantee after such a failover with
//!   `SELECT setval('public.distlock_fence', <a value above any token issued>)`, or let the
//!   resource hand its highest seen token back to an operator.
//! * **Semaphores.** [`LockManager::try_acquire_permit`] (and `_for`, [`LockManager::acquire_permit`])
//!   admit at most `permits` holders at once across all processes, with no DDL: each permit is a
//!   slot, a lock of its own ([`LockKey::permit_slot`]); a try takes the first free slot in one
//!   statement, skipping slots its own session already holds. A dropped or lost permit frees its
//!   slot.
//! * **All-or-nothing.** [`LockManager::try_lock_all`] (and `_for`, [`LockManager::lock_all`])
//!   takes every key or none in one statement: the keys it got are released in that same
//!   statement when any was busy, so a failure leaves no partial hold. Waiting forms queue for
//!   the keys in the order of their ids, whatever order callers list them in, so they cannot
//!   deadlock each other; a client of another kind waiting the other way round can deadlock with
//!   them, and PostgreSQL then ends one wait ([`ErrorKind::Deadlock`] when it is ours, with
//!   nothing left held).
//! * **Who holds it.** [`LockManager::holders`] reads `pg_locks` joined with `pg_stat_activity`:
//!   pid, application name, client address, backend start, shared or exclusive, granted or
//!   waiting ([`Holder`]). Every role sees every session's locks, pids and application names,
//!   but client addresses and backend starts only of its own role's sessions (or with
//!   `pg_read_all_stats`).
//! * **Leader election.** [`Election`] campaigns (waiting or trying) on one lock; a
//!   [`Leadership`] knows whether it leads, is told the moment it stops
//!   ([`Leadership::lost`]), and has a term (its fencing token). Observers ask who leads
//!   ([`Election::leader`]) or [`Election::watch`] for changes.
//!
//! # Failure model
//!
//! A session advisory lock lives exactly as long as the connection that took it. When a backend is
//! killed, the server restarts, a failover happens or the network stalls, the server frees the lock
//! and another host may take it, while the holder may still believe it holds it. distlock notices,
//! tells the holder, recovers by itself, and never leaves a caller hanging:
//!
//! * **Lost.** A guard is *lost* when the connection that granted it fails. [`LockGuard::is_lost`]
//!   turns true and [`LockGuard::lost`] becomes ready (a `crossbeam_channel::Receiver` to `select!`
//!   on). An idle worker reads its socket at each tick of the manager's monitor (at most 250 ms
//!   apart) without sending anything, so a session the server ends — a killed backend, a
//!   restart, a planned switchover, a pooler that closes its client — is noticed within about
//!   that; it also checks the connection with a round trip every
//!   [`Builder::heartbeat`] (1 s by default) and TCP keepalives are on, so a connection that went
//!   silent is noticed within one heartbeat plus a round trip; a busy connection notices at its
//!   next statement.
//! * **Stalled.** The blocking client cannot time out a statement. Callers get
//!   [`ErrorKind::Timeout`] at [`Builder::request_timeout`] all the same, and if a statement runs
//!   longer than that or than the stall bound the dead-holder bound leaves (4 s by default: see
//!   [`Builder::dead_holder_timeout`]), whichever is shorter (a backend stopped
//!   with SIGSTOP, a silent network), a monitor thread declares the connection lost (its guards
//!   are told) and starts a replacement connection, whose first act is to end the stalled backend
//!   with `pg_terminate_backend` (matched by pid *and* start time), so that it cannot keep its locks
//!   when it resumes. A frozen backend does keep its locks while it stays frozen: nothing can release
//!   them before the server ends it.
//! * **Vanished hosts.** A host that loses power or its network sends no FIN and no RST; the server
//!   would keep its session, and its locks, until TCP gives up (about two hours with kernel
//!   defaults). Every lock session sets the server's TCP keepalives for itself so that the server
//!   frees a silent holder's locks within [`Builder::dead_holder_timeout`] (12 s by default), and
//!   the holder, whose heartbeats and statements then go unanswered, gives the connection up and is
//!   told within half of that (with a heartbeat of at most a sixth of it, as by default) — before
//!   anyone else can take its locks. Behind a proxy the keepalives would watch the proxy's socket,
//!   so the server also holds a **lease** on each lock session (`idle_session_timeout`, PostgreSQL
//!   14 and later) and lock transaction (`idle_in_transaction_session_timeout`): the bound less a
//!   second, renewed by the heartbeat. A client that vanishes behind any proxy has its session
//!   ended and its locks freed within the bound; a holder alive but stalled past it (a stopped
//!   process, a frozen VM) loses them the same way and is told at its next call
//!   ([`LockGuard::ensure_held`] refuses). Measured with real packet loss: see the README's
//!   Performance section.
//! * **Culls.** Cluster-wide `idle_session_timeout` and `idle_in_transaction_session_timeout`
//!   would end a lock session idle between statements, and free its locks; every lock session
//!   replaces both with its own lease (never shorter than a heartbeat and the time one may take),
//!   or with 0 when the bound is past 24 days.
//! * **Reconnect.** After a loss the worker reconnects by itself, with capped exponential backoff
//!   (50 ms doubling to 1 s) plus jitter. While it is offline, `try_lock`, `unlock` and
//!   `ensure_held` fail fast with [`ErrorKind::Offline`]; waiting calls (`lock`, `try_lock_for` and
//!   the shared forms) keep trying within their own deadline and, if it passes while the manager is
//!   still offline, return that error rather than `Ok(None)`.
//! * **Generations.** Each connection is a new generation. A guard of an earlier generation never
//!   touches the newer session when it is dropped, unlocked or checked: that session may hold the same
//!   key again, for someone else.
//! * **Nothing leaks.** A grant that arrives after its caller gave up is released by the worker at
//!   once — also one the worker had ready for a caller that was descheduled between sending its
//!   request and receiving, and came back after its deadline. When the last manager handle and the
//!   last guard are dropped, the worker closes the connection and the server releases whatever the
//!   session held; a caller blocked in a call holds a handle itself, so in-flight requests and
//!   waiters always finish normally first.
//! * **Every call keeps its bound.** A call returns by its own deadline (the request timeout, or
//!   the caller's timeout) with its own reply or [`ErrorKind::Timeout`], whatever the worker is
//!   doing: the worker never waits for a caller to take a reply, and a reply that did not reach
//!   its caller in time is never delivered to anyone later. [`ErrorKind::Shutdown`] means only that
//!   the manager's worker has stopped for good.
//! * **One connection attempt at a time per host.** A server that accepts connections but never
//!   answers (a stopped postmaster, an overloaded pooler) costs each attempt the connect timeout.
//!   An attempt that outlives it stays that host's only one: no second attempt starts beside it,
//!   and when it completes late, its connection is closed. With several hosts, each is tried in
//!   turn within a connect timeout of its own, as in libpq, so a silent host does not keep the
//!   manager from the next one (the promoted standby of a failover).
//! * **A lost guard keeps its place in this manager.** The server freed the lock when the
//!   connection ended, and other processes may take it; but within this manager the key stays
//!   reserved until the lost guard is dropped, because its holder may still be inside its
//!   critical section. `try_lock` of that key returns `Ok(None)` and `lock` waits until then, as
//!   they would for a live guard. Drop a lost guard before taking its key again.
//! * **Refused, and why.** A manager refuses to connect to a standby (its locks would be local
//!   to it; [`ErrorKind::Connect`]), through a pooler that shares its session
//!   ([`ErrorKind::Pooler`]), and to a server whose advisory locks exclude nobody
//!   ([`ErrorKind::NoExclusion`]): every connect and reconnect takes a lock of each kind the
//!   manager uses, with the same SQL, and proves it shows in `pg_catalog.pg_locks` under the
//!   session's own backend, in the same round trip as the session's set-up. It refuses a hold
//!   past its share of the server's lock table ([`ErrorKind::TooManyLocks`], see "Slots are
//!   finite").
//! * **Every call keeps its bound, also while reconnecting.** Requests that queued before a loss
//!   was noticed are answered with [`ErrorKind::Offline`] while the worker connects again, not
//!   after; a waiting connection opened for a waiting call gives up at that call's deadline.
//! * **A lease, not a guarantee.** [`LockGuard::ensure_held`] proves with one round trip that the
//!   session holding the lock is alive and holds it (`pg_locks`), right before an irreversible step.
//!   The connection can still fail a moment later; where two holders at once would corrupt data, make
//!   the protected resource reject stale writers too: see "Fencing tokens" above.
//!
//! Every failure is a distinct [`ErrorKind`]: `Timeout`, `ConnectionLost`, `LockLost`, `Offline`,
//! `Shutdown`, `TooManyLocks`, `Server`, `Deadlock` (PostgreSQL ended a wait in its lock queue to
//! break a deadlock), `Pooler` (a pooler shares the session; for good), `Io` (a thread could not be
//! started), `Internal` (a defect of distlock's own, never the server's), plus `Config`/`Connect` and `NoExclusion` (the server's advisory locks would exclude
//! nobody) when connecting.
//!
//! # Connecting: TLS, passwords, standbys
//!
//! Connection parameters are libpq's, as a `key=value` string or a `postgres://` URL, and mean
//! what they mean to libpq:
//!
//! * **TLS** through rustls. `sslmode` is `disable`, `allow`/`prefer` (the default: encrypted
//!   whenever the server offers TLS, certificate not checked), `require` (always encrypted; the
//!   chain is checked only when a root certificate is given or `~/.postgresql/root.crt` exists),
//!   `verify-ca` (the chain must lead to `sslrootcert`) or `verify-full` (and the certificate must
//!   name the host or IP address connected to). `sslrootcert` is a PEM file or `system` (the
//!   operating system's trust store); `sslcert`/`sslkey` present a client certificate (a key file
//!   that group or others can read is refused, as libpq refuses it). A rejected certificate is
//!   [`ErrorKind::Connect`] with a message that says so and why. [`Tls`] sets the same from code
//!   (and [`Tls::from_env`] from `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`);
//!   `channel_binding=require` binds SCRAM to the TLS channel. Where libpq tries plaintext first
//!   (`allow`), distlock tries TLS first.
//!
//!   ```no_run
//!   let locks = distlock::LockManager::connect(
//!       "host=db.example.com user=app dbname=app sslmode=verify-full sslrootcert=system",
//!   )?;
//!   # Ok::<(), distlock::Error>(())
//!   ```
//! * **Passwords**: SCRAM-SHA-256 and md5 roles, in the parameters. (The `distlock` command also
//!   reads `PGPASSWORD` and `~/.pgpass`/`PGPASSFILE`, as libpq does.) Unix-domain sockets are a
//!   `host=/path/to/socket/dir`; parameters that name no host mean libpq's default socket
//!   (`/var/run/postgresql` where it exists, as Debian's and Ubuntu's libpq, else `/tmp`), and no
//!   user means the operating-system user (`USER`). An entirely empty string is an
//!   [`ErrorKind::Config`] error: it is far more often a variable that was never set. No password
//!   appears in any `Display`, `Debug` or log line.
//! * **Names.** A lock session shows in `pg_stat_activity` under [`Builder::application_name`],
//!   else the parameters' `application_name`, else `distlock` (the `distlock` command also reads
//!   `PGAPPNAME`); its waiting connections under the same name with ` (waiting connection)` after
//!   it, so a queued waiter (`wait_event` `advisory`) is told from the lock session at a glance. A
//!   lock granted after a wait in the queue is held by that connection, under that name.
//! * **Never a standby.** Advisory locks work on a hot standby but are local to it, so a lock taken
//!   on a read replica excludes nobody on the primary. Every connection and reconnection checks
//!   `pg_is_in_recovery()` and refuses a standby (the error says "standby") unless
//!   [`Builder::allow_standby`] says otherwise.
//! * **Failover.** With several hosts (`host=a,b` and `target_session_attrs=read-write`), a primary
//!   that dies loses its connection — every guard is told, as for any lost connection — and the
//!   manager's reconnect attempts (at most a second apart) find whichever host is the writable
//!   primary now. A grant on the new primary comes only after every guard of the old connection
//!   was told it is lost. Measured figures are in the README's Performance section.
//!
//! # Operating
//!
//! [`LockManager::stats`] returns a [`Stats`] snapshot — locks held, callers waiting, connections
//! open, and since connect: grants, refusals, timeouts, lost locks, reconnects, refused servers,
//! wait and hold times in [`Histogram`]s — without a round trip or an allocation; the counters
//! cost the request path a few relaxed atomic additions. With the `metrics` feature the same
//! figures go through the `metrics` facade (`distlock_*`, labelled with the application name; the
//! README has the table). [`Builder::warn_held_after`] logs a warning for a guard held too long,
//! naming the place in the caller's code that took it. The README's "Operating" section says what
//! to alert on and how a manager's sessions show in `pg_stat_activity`.
//!
//! # Notes on advisory locks
//!
//! * **Session-scoped.** A session advisory lock belongs to the connection that took it, not to a
//!   transaction. The server releases every lock of a session when its connection ends, so a
//!   crashed process never leaks a lock — and a dropped connection silently ends every lock it held.
//! * **They stack.** One session can take the same lock many times and must release it as often.
//!   PostgreSQL therefore does not keep apart two threads that share a connection; this library keeps
//!   its own table of held keys so that it does.
//! * **One key space per database.** Every client of the database shares the advisory key space:
//!   another application using advisory locks can contend with your keys. The `bigint` space and the
//!   `(int4, int4)` space are separate; names live in the `bigint` one.
//! * **Visible in `pg_locks`.** A held key `k` shows as `locktype = 'advisory'`,
//!   `classid = k >> 32`, `objid = k & 0xffffffff`, `objsubid = 1` (`2` for a pair), next to the
//!   session's `application_name` in `pg_stat_activity`.
//! * **Session locks not through a transaction pooler.** pgbouncer in transaction (or statement)
//!   pooling mode hands each statement to any server connection, so a lock and its unlock land in
//!   different sessions, or two clients' locks stack in one shared session, and session locks
//!   exclude nobody. Connect directly, through session pooling, or use transaction mode
//!   ([`Builder::transaction_pooler`]), where each lock lives in a transaction of its own, which
//!   the pooler keeps on one server connection. distlock detects a pooler in session mode: each
//!   lock session carries a mark of its own (`distlock.session`); a session found already marked
//!   at connect, or a heartbeat or a failed [`LockGuard::ensure_held`] check that lands in another
//!   backend or finds another client's mark (every check requires it), makes the manager fail for
//!   good with [`ErrorKind::Pooler`] (its guards are told they are lost). Between two heartbeats a
//!   pooler can go unseen: the heartbeat bounds it.
//! * **Behind a load-balancing proxy.** pgpool-II with `load_balance_mode = on` sends a session's
//!   read-only statements to a replica, whose `pg_locks` shows none of the primary's locks: every
//!   query distlock sends starts with `/*NO LOAD BALANCE*/`, which keeps it on the session's own
//!   primary backend (a comment to the server itself). Proxies that ignore it and route a
//!   statement elsewhere are caught like a transaction pooler ([`ErrorKind::Pooler`]). The
//!   README's "Proxies and poolers" has a table of them.
//! * **Slots are finite.** Each held lock uses an entry of the server's shared lock table
//!   (`max_locks_per_transaction × (max_connections + max_prepared_transactions)` for every
//!   session together); one that fills it takes the server down for everyone, new connections
//!   included. A manager holds at most [`Builder::max_locks`], and never more than a quarter of
//!   the table.
//!
//! # Implementation
//!
//! * One worker thread per manager owns one blocking `postgres::Client`. Callers send it requests
//!   over a bounded `crossbeam-channel` queue and unpark it if it is idle (a parked worker costs
//!   nothing; blocking in the channel's receive spun and read the clock on every turn). The monitor
//!   thread keeps the heartbeat's clock, so the request path reads no clock on the worker. Each request carries a reply channel taken from an `object-pool`
//!   pool and returned afterwards, so steady-state calls allocate no channels.
//! * A caller sleeps while it waits for its reply, so a waiting thread costs no CPU. With
//!   [`Builder::spin_wait`], a caller that is its manager's only call in flight spins instead,
//!   which saves the two thread wake-ups of a round trip at the price of a busy CPU.
//! * Reply channels are rendezvous channels (`bounded(0)`): measured against `bounded(1)`, the
//!   caller spins less before it parks and leaves the CPU to the worker and the server (see the
//!   README's Performance section). The worker hands a reply over with `try_send`, which never
//!   waits; a reply whose caller is not receiving yet is kept and offered again whenever the worker
//!   looks for work, and while it has nothing else to do it waits for any such caller to arrive,
//!   for a request, or for a caller to give up, whichever comes first.
//! * The worker runs `SELECT WHERE pg_try_advisory_lock(<id>)` (or `pg_advisory_unlock`, or the
//!   `_shared` forms) with `simple_query`, and reads the outcome from the statement's
//!   `CommandComplete` row count: one row (of no columns) means the function returned true. It never
//!   decodes a value.
//!   The SQL text is formatted into one reused buffer from integers only; no caller text reaches SQL.
//!   This form plans cheaper than `SELECT 1 FROM pg_try_advisory_lock(<id>) l WHERE l`, and having no
//!   column it saves the client allocations over `SELECT 1 WHERE …` (measured: see the README's
//!   Performance section).
//! * **Batching.** Requests that queued while the worker was busy go to the server as one
//!   multi-statement query, each statement's row count mapped back to its request (about ten times
//!   the throughput at 64 threads; the README has the figures). Releases go first; each caller has one request in
//!   flight, so no caller's order changes. A failing statement stops the rest of a multi-statement
//!   query without saying which one failed, so a request joins a batch only when its effect can be
//!   read back from `pg_locks` afterwards (its own hold is the manager's only hold of the key); after
//!   a failure the worker reads back what happened and runs the rest again one by one, never
//!   reporting a grant or a release that did not happen.
//! * The manager's own worker never runs a blocking `pg_advisory_lock`: that would stall every
//!   queued release behind one wait. Waits run on waiting connections (see "Fair, fast waiting"):
//!   each is a manager of its own whose worker serves one wait, `SET lock_timeout` and one
//!   `pg_advisory_lock` per key in one round trip, the monitor allowing it until its deadline.
//!   Without waiting connections (`Builder::wait_connections(0)`, or when none can be opened),
//!   waiting callers retry on their own thread with capped exponential backoff plus jitter (1 ms
//!   doubling to 8 ms: a release by another process is seen within about 8 ms plus a round trip),
//!   and are woken at once when a guard of the same manager releases a hold.
//! * A reply slot's state word decides exactly once whether a reply is delivered or its caller gave
//!   up: a grant that arrives after its caller's deadline is released by the worker at once, and a
//!   slot whose reply may still be on its way never goes back to the pool, so no call can receive
//!   another call's reply.
//! * Durations: any `Duration` is accepted where one is taken. One too large to add to the clock
//!   means "no bound" (`Duration::MAX` waits forever); a zero connect timeout, request timeout or
//!   heartbeat is an [`ErrorKind::Config`] error, since nothing could meet it.
//! * A monitor thread watches every statement the worker sends, the heartbeat and the statement
//!   that ends lost backends included, for one stuck past the request timeout (see "Failure
//!   model").
//! * **The layout.** Folders name the two sides of the worker's channel and the capabilities;
//!   each floor imports only the floors below it (`.ci/house` checks it in CI, along with no
//!   import circle, files of at most 450 lines and functions of at most 80):
//!
//!   | floor | where | what lives there | may import |
//!   |---|---|---|---|
//!   | ground | `error`, `key`, `mode`, `holder`, `clock`, `backoff`, `stats`, `libpq/` | leaf types, the statistics counters, libpq's configuration (connection strings, hosts, TLS, certificates) | the ground floor only |
//!   | protocol | `protocol/` | requests, typed replies, reply slots, the connection's state | ground |
//!   | statements | `sql/` | every statement text: lock sessions, lock transactions, solo requests, fencing, names, pooler probes, the server's watch of its client (pure functions) | ground, protocol |
//!   | caller side | `caller/` | the handle, shared state, table, guard, the one acquire path, waiting, the waiting-connection pool | ground, protocol |
//!   | capabilities | `capability/` | fenced, permits, multi-key, holders, election: one room each | ground, protocol, caller side |
//!   | worker side | `worker/` | the loop, responses, batches, session, the solo requests (beyond one key: fenced, permits, all-or-nothing, holders, names, tokens), queue waits, read-backs, monitor; `worker/connect/`: one attempt per host, pooler detection | ground, protocol, statements |
//!   | top | `lib`, `builder`, `start`, `testing/` | the builder and the start of both sides | anything |
//! * Costs are measured, not assumed: instructions and allocations per lock+unlock cycle against
//!   the raw client running the same SQL (every thread counted; CI fails above 1.15 × the raw
//!   client's instructions or on any allocation of the library's own), latency and throughput
//!   against the raw client and pgbench. The README's Performance section has every figure and the
//!   commands that produce them.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

// The ground floor: leaf types, importing nothing of the crate.
mod backoff;
mod clock;
mod error;
mod holder;
mod key;
// libpq's configuration: connection strings, hosts, TLS and certificates.
mod libpq;
mod mode;
mod stats;
// The messages between the two sides of the worker's channel.
mod protocol;
// Every statement text: pure functions of integers the library formats itself.
mod sql;
// The caller side: the handle, its shared state, the table, guards, acquiring and waiting.
mod caller;
// One room per capability, built on the caller side.
mod capability;
// The worker side: the thread that owns the connection, and connecting.
mod worker;
// The top: starting both sides.
mod builder;
#[cfg(all(test, unix))]
mod fault_tests;
mod start;
#[cfg(all(unix, any(test, feature = "testing")))]
pub mod testing;

pub use builder::Builder;
pub use caller::guard::LockGuard;
pub use caller::handle::LockManager;
pub use capability::election::{Election, Leadership, Watch};
pub use crossbeam_channel;
pub use error::{Error, ErrorKind, Result};
pub use holder::Holder;
pub use key::{IntoLockKey, LockKey};
pub use libpq::tls::{SslMode, Tls};
pub use postgres;
pub use stats::{BUCKETS, Histogram, Stats};

/// The README's examples, compiled as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

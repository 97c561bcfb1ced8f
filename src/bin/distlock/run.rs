//! `distlock run`: flock(1) across hosts. Waits for the lock, runs the command, forwards signals
//! and the exit status, releases the lock when the command exits, and acts if the lock is lost.

use std::io::IsTerminal;
use std::process::{Child, ExitCode, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use crossbeam_channel::select;
use distlock::{ErrorKind, LockGuard, LockKey, LockManager};
use rustix::process::{Pid, Signal, kill_process};
use signal_hook::consts::{SIGHUP, SIGINT, SIGKILL, SIGTERM};
use signal_hook::iterator::Signals;

use crate::child;
use crate::connection::{Server, application_name, shared_server};
use crate::duration::{self, human};
use crate::exit::{self, Failure};
use crate::status::StatusLine;

/// `distlock run`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// The lock's name (mapped to a bigint id with FNV-1a 64).
    #[arg(long, value_name = "NAME")]
    key: String,
    /// Take the lock shared: shared holders run at once; exclusive ones wait for all of them.
    #[arg(long, conflicts_with_all = ["fence", "limit"])]
    shared: bool,
    /// Take the lock with a fencing token and pass it to the command as DISTLOCK_TOKEN: a number
    /// greater than every token issued before for this lock, for the resources the command
    /// writes to (they refuse lower tokens).
    #[arg(long, conflicts_with = "limit")]
    fence: bool,
    /// Run as one of at most N holders at once (a semaphore of N permits named by --key); every
    /// holder must pass the same N. The slot taken is passed as DISTLOCK_SLOT.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: Option<u32>,
    /// Wait at most this long for the lock (500ms, 30s, 2m, 1h) [default: forever].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse, conflicts_with = "no_wait")]
    wait: Option<Duration>,
    /// Do not wait: exit at once (75) if someone holds the lock.
    #[arg(long)]
    no_wait: bool,
    /// What to do if the lock is lost while the command runs.
    #[arg(long, value_enum, default_value_t = OnLost::Terminate)]
    on_lost: OnLost,
    /// After a lost lock, how long the command has between SIGTERM and SIGKILL [default: what
    /// --dead-holder-timeout leaves after the loss is told, so that the command is gone before
    /// the server frees the lock for anyone else: 3s with the defaults].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    kill_after: Option<Duration>,
    /// How often the lock's connection is checked while the command runs.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration::parse)]
    heartbeat: Duration,
    /// How long the server keeps the lock of a holder whose host vanished (lost power or its
    /// network); distlock is told within half of it and stops the command before the rest
    /// has passed.
    #[arg(long, value_name = "DURATION", default_value = "12s", value_parser = duration::parse)]
    dead_holder_timeout: Duration,
    /// Exit code when the lock is not acquired.
    #[arg(long, value_name = "N", default_value_t = exit::CONFLICT)]
    conflict_exit_code: u8,
    /// No status line while waiting.
    #[arg(long, short)]
    quiet: bool,
    /// The server is reached through a transaction pooler (pgbouncer pool_mode=transaction, a
    /// managed service's pooled endpoint): hold the lock in a transaction of its own, which pins
    /// one server connection while the command runs. Not with --fence or --limit.
    #[arg(long, conflicts_with_all = ["fence", "limit"])]
    transaction_pooler: bool,
    /// Pass DATABASE_URL and PGPASSWORD on to the command. By default it does not inherit
    /// distlock's own connection secrets.
    #[arg(long)]
    keep_db_env: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// What `run` does when its lock is lost.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnLost {
    /// SIGTERM the command, SIGKILL it after --kill-after, exit 76.
    Terminate,
    /// Report it on stderr and let the command finish.
    Ignore,
}

/// How often the status line is refreshed while waiting.
const STATUS_EVERY: Duration = Duration::from_millis(500);

pub fn run(url: Option<&str>, args: Args) -> Result<ExitCode, Failure> {
    let server = shared_server(url)?;
    let window = loss_window(args.heartbeat, args.dead_holder_timeout);
    if args.kill_after() > window && args.on_lost == OnLost::Terminate {
        eprintln!(
            "distlock: warning: --kill-after {} is longer than the {} that --dead-holder-timeout \
             {} leaves after a lost lock is told: another host may be granted the lock while the \
             command still runs (use --fence, or a longer --dead-holder-timeout)",
            human(args.kill_after()),
            human(window),
            human(args.dead_holder_timeout)
        );
    }
    let locks = connect(&server, &args)?;
    let key = LockKey::name(&args.key);
    let Some(guard) = acquire(&locks, key, &args, &server)? else {
        if !args.quiet {
            eprintln!(
                "distlock: {} is held by someone else; not running the command",
                args.key
            );
        }
        return Ok(ExitCode::from(args.conflict_exit_code));
    };

    // Signals are caught from here on, before the command exists: a SIGTERM now must not end
    // distlock (which would free the lock) and leave a command running; it is either forwarded to
    // the command or, if it comes before the command starts, keeps the command from starting.
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    pause_before_spawn();
    if let Some(signal) = signals.pending().next() {
        let _ = guard.unlock();
        eprintln!("distlock: got signal {signal} before the command started; not running it");
        return Ok(ExitCode::from(u8::try_from(128 + signal).unwrap_or(255)));
    }
    let child = spawn(&args, &guard)?;
    let pid = child.id();

    // Forward SIGINT, SIGTERM and SIGHUP to the command; distlock itself stays to release the lock.
    let signal_handle = signals.handle();
    thread::spawn(move || {
        for signal in signals.forever() {
            send_signal(pid, signal);
        }
    });
    let (status, lost_at) = supervise(child, &guard, &args)?;
    signal_handle.close();

    let lost = lost_at.is_some() || guard.is_lost();
    if let Err(e) = guard.unlock() {
        if !lost {
            eprintln!("distlock: releasing {} failed: {e}", args.key);
        }
    }
    if lost && args.on_lost == OnLost::Terminate {
        return Ok(ExitCode::from(exit::LOST));
    }
    Ok(ExitCode::from(exit::of_status(status)))
}

impl Args {
    /// `--kill-after`, or by default the loss window the loss-detection settings leave.
    fn kill_after(&self) -> Duration {
        self.kill_after
            .unwrap_or_else(|| loss_window(self.heartbeat, self.dead_holder_timeout))
    }
}

/// How long the command may take to exit after a lost lock is told, so that it is gone before
/// the server can free the lock for anyone else: the server frees a vanished holder's locks no
/// sooner than a second short of the dead-holder bound after the last packet it received, which
/// may be a heartbeat before the cut; distlock is told within half the bound of the cut; and a
/// second is kept for the kill itself and the kernel's timers.
fn loss_window(heartbeat: Duration, dead_holder_timeout: Duration) -> Duration {
    dead_holder_timeout
        .saturating_sub(Duration::from_secs(1))
        .saturating_sub(heartbeat)
        .saturating_sub(dead_holder_timeout / 2)
        .saturating_sub(Duration::from_secs(1))
}

/// The lock manager of a run: named after the connection string's `application_name`, else
/// `distlock`. A run with `--wait` keeps trying to connect (a failover, a restart) until its
/// wait is over.
fn connect(server: &Server, args: &Args) -> Result<LockManager, Failure> {
    // Named after the key, so that `distlock locks` and pg_stat_activity tell which job holds
    // (or waits for) which lock; PostgreSQL keeps the first 63 bytes.
    let app = application_name(&server.config, &format!("distlock run {}", args.key));
    // Only a run given a deadline: without one, a host that never answers would hold a job
    // forever, where a wrong host name should fail it at once.
    let connect_retry = match (args.no_wait, args.wait) {
        (false, Some(wait)) => wait,
        _ => Duration::ZERO,
    };
    LockManager::builder()
        .application_name(&app)
        .heartbeat(args.heartbeat)
        .dead_holder_timeout(args.dead_holder_timeout)
        .connect_retry(connect_retry)
        .transaction_pooler(args.transaction_pooler)
        .record_names(true)
        .tls(server.tls.clone())
        .connect_config(server.config.clone())
        .map_err(|e| {
            let code = match e.kind() {
                ErrorKind::Config | ErrorKind::Pooler => exit::USAGE,
                ErrorKind::NoExclusion => exit::NO_EXCLUSION,
                _ => exit::UNAVAILABLE,
            };
            Failure::new(code, anyhow!(e).context("cannot connect to the server"))
        })
}

/// Starts the command under the lock `guard` holds, with its token and slot in the environment.
fn spawn(args: &Args, guard: &LockGuard) -> Result<Child, Failure> {
    let program = args.command.first().map(String::as_str).unwrap_or_default();
    let mut command = child::command(&args.command)
        .ok_or_else(|| Failure::new(exit::USAGE, anyhow!("no command given after --")))?;
    command.stdin(Stdio::inherit());
    if let Some(token) = guard.fencing_token() {
        command.env("DISTLOCK_TOKEN", token.to_string());
    }
    if args.limit.is_some() {
        if let Some(slot) = guard.key().semaphore_slot() {
            command.env("DISTLOCK_SLOT", slot.to_string());
        }
    }
    if !args.keep_db_env {
        // distlock's own connection secrets are not the command's business.
        command.env_remove("DATABASE_URL").env_remove("PGPASSWORD");
    }
    // Spawned from the main thread, which lives until distlock exits: Linux sends the parent-death
    // signal when the spawning *thread* ends.
    command.spawn().map_err(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => exit::NOT_FOUND,
            _ => exit::NOT_EXECUTABLE,
        };
        Failure::new(code, anyhow!(e).context(format!("cannot run {program}")))
    })
}

/// Waits for the command to exit while watching the lock: on a loss, terminates the command
/// (SIGKILL after --kill-after) or lets it finish, as --on-lost says. Returns its status and
/// when the lock was lost, if it was.
fn supervise(
    mut child: Child,
    guard: &LockGuard,
    args: &Args,
) -> Result<(ExitStatus, Option<Instant>), Failure> {
    let pid = child.id();
    let (exited_tx, exited) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let _ = exited_tx.send(child.wait());
    });
    let mut lost_at: Option<Instant> = None;
    let mut killed = false;
    let never = crossbeam_channel::never();
    loop {
        let timeout = match lost_at.map(|at| at.checked_add(args.kill_after())) {
            // A --kill-after too large to add to now never comes.
            Some(Some(kill_at)) if args.on_lost == OnLost::Terminate && !killed => {
                kill_at.saturating_duration_since(Instant::now())
            }
            _ => Duration::from_secs(3600),
        };
        let watch_loss = lost_at.is_none();
        select! {
            recv(exited) -> status => {
                let status = status
                    .map_err(|_| anyhow!("lost track of the command"))?
                    .context("waiting for the command")?;
                return Ok((status, lost_at));
            }
            recv(if watch_loss { guard.lost() } else { &never }) -> _ => {
                lost_at = Some(Instant::now());
                // A lost guard answers at once, with why its connection ended when that is known.
                let why = guard.ensure_held().err().map(|e| e.to_string());
                announce_loss(pid, args, why.as_deref().unwrap_or("the lock was lost"));
            }
            default(timeout) => {
                if lost_at.is_some() && args.on_lost == OnLost::Terminate && !killed {
                    eprintln!("distlock: the command did not exit after SIGTERM; sending SIGKILL");
                    send_signal(pid, SIGKILL);
                    killed = true;
                }
            }
        }
    }
}

/// Says that the lock was lost, and terminates the command unless --on-lost ignore.
fn announce_loss(pid: u32, args: &Args, why: &str) {
    match args.on_lost {
        OnLost::Terminate => {
            eprintln!(
                "distlock: lost the lock on {} ({why}); terminating the command (SIGKILL in {})",
                args.key,
                human(args.kill_after())
            );
            send_signal(pid, SIGTERM);
        }
        OnLost::Ignore => eprintln!(
            "distlock: lost the lock on {} ({why}); the command keeps running (--on-lost ignore)",
            args.key
        ),
    }
}

/// Sends `signal` to `pid`.
fn send_signal(pid: u32, signal: i32) {
    let pid = i32::try_from(pid).ok().and_then(Pid::from_raw);
    if let (Some(pid), Some(signal)) = (pid, Signal::from_named_raw(signal)) {
        let _ = kill_process(pid, signal);
    }
}

/// An internal hook for the command's own tests, not an interface: with
/// `DISTLOCK_INTERNAL_PAUSE_BEFORE_SPAWN_MS` set, `run` sleeps that long between taking the lock
/// (signal handling installed) and starting the command, so that a test can send a signal in
/// that window.
fn pause_before_spawn() {
    if let Some(ms) = std::env::var("DISTLOCK_INTERNAL_PAUSE_BEFORE_SPAWN_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        thread::sleep(Duration::from_millis(ms.min(60_000)));
    }
}

/// Waits for the lock as asked; `None` when it was not acquired in time. One wait, one place in
/// the lock queue for its whole length: the live status line is drawn beside it, by a thread of
/// its own.
fn acquire(
    locks: &LockManager,
    key: LockKey,
    args: &Args,
    server: &Server,
) -> Result<Option<LockGuard>, Failure> {
    let unavailable =
        |e: distlock::Error| Failure::new(exit::UNAVAILABLE, anyhow!(e).context("taking the lock"));
    if args.no_wait {
        return take(locks, key, args, Some(Duration::ZERO)).map_err(unavailable);
    }
    let started = Instant::now();
    // A --wait too large to add to now is no deadline at all.
    let deadline = args.wait.and_then(|w| started.checked_add(w));
    let status = Status::start(locks, key, args, server, started);
    let outcome = loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match take(locks, key, args, left) {
            Ok(got) => break Ok(got),
            // The manager gave up on a failure that may pass before the deadline (it waits
            // through reconnects by itself): wait again.
            Err(e) if e.is_transient() && deadline.is_none_or(|d| Instant::now() < d) => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => break Err(unavailable(e)),
        }
    };
    status.stop();
    outcome
}

/// One waiting call of the kind `args` asks for: until `wait` has passed (`None`: until granted).
/// The key is given by its name (`key` is its hash), which the manager records and a waiting
/// connection shows.
fn take(
    locks: &LockManager,
    key: LockKey,
    args: &Args,
    wait: Option<Duration>,
) -> distlock::Result<Option<LockGuard>> {
    debug_assert_eq!(key, LockKey::name(&args.key));
    let key = args.key.as_str();
    match (wait, args.shared, args.fence, args.limit) {
        (Some(w), true, ..) => locks.try_lock_shared_for(key, w),
        (Some(w), _, true, _) => locks.try_lock_fenced_for(key, w),
        (Some(w), _, _, Some(permits)) => locks.try_acquire_permit_for(key, permits, w),
        (Some(w), ..) => locks.try_lock_for(key, w),
        (None, true, ..) => locks.lock_shared(key).map(Some),
        (None, _, true, _) => locks.lock_fenced(key).map(Some),
        (None, _, _, Some(permits)) => locks.acquire_permit(key, permits).map(Some),
        (None, ..) => locks.lock(key).map(Some),
    }
}

/// The thread that draws the live status line while the wait goes on, and says once why the
/// manager is reconnecting (a standby, a refused host) when it is.
struct Status {
    stop: crossbeam_channel::Sender<()>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Status {
    fn start(
        locks: &LockManager,
        key: LockKey,
        args: &Args,
        server: &Server,
        started: Instant,
    ) -> Status {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let mut line = StatusLine::new(!args.quiet && std::io::stderr().is_terminal(), server);
        let (locks, name, limit, quiet) = (locks.clone(), args.key.clone(), args.limit, args.quiet);
        let thread = thread::Builder::new()
            .name("distlock-status".into())
            .spawn(move || {
                // What the manager last said of a reconnect, said once.
                let mut said: Option<String> = None;
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(STATUS_EVERY)
                {
                    if let Some(e) = locks.offline().filter(|_| !quiet) {
                        let text = e.to_string();
                        if said.as_ref() != Some(&text) {
                            line.clear();
                            eprintln!("distlock: still waiting for {name}: {text}");
                            said = Some(text);
                        }
                    }
                    line.show(&name, key, limit, started.elapsed());
                }
                line.clear();
            })
            .ok();
        Status { stop, thread }
    }

    /// Stops the thread and clears the line, before anything else is printed.
    fn stop(mut self) {
        drop(self.stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

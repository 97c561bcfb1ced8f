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
//! * **Not through a transaction pooler.** pgbouncer in transaction (or statement) pooling mode hands
//!   each statement to any server connection, so a lock and its unlock land in different sessions and
//!   locks are held by nobody you know. Connect directly, or through session pooling.
//! * **Slots are finite.** Each held lock uses a slot of the server's shared lock table
//!   (`max_locks_per_transaction × max_connections`); [`Builder::max_locks`] caps one manager.
//!
//! # Implementation
//!
//! * One worker thread per manager owns one blocking `postgres::Client`. Callers send it requests
//!   over a bounded `crossbeam-channel` queue; each request carries a reply slot taken from an
//!   `object-pool` pool and returned afterwards, so steady-state calls allocate no channels.
//! * The worker runs `SELECT 1 WHERE pg_try_advisory_lock(<id>)` (or `pg_advisory_unlock`, or the
//!   `_shared` forms) with `simple_query`, and reads the outcome from the statement's
//!   `CommandComplete` row count: one row means the function returned true. It never decodes a value.
//!   The SQL text is formatted into one reused buffer from integers only; no caller text reaches SQL.
//! * The worker never runs a blocking `pg_advisory_lock`: that would stall every queued release
//!   behind one wait. Waiting callers retry on their own thread with capped exponential backoff plus
//!   jitter, and are woken at once when a guard of the same manager releases a hold.
//! * A reply slot's state word decides exactly once whether a reply is delivered or its caller gave
//!   up: a grant that arrives after its caller's deadline is released by the worker at once, and a
//!   slot reused for the next call can never carry the previous call's reply.
//! * Measured costs (instructions, allocations, latency and throughput against the raw client and
//!   pgbench) are in the README's Performance section, with the commands that produce them.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod backoff;
mod error;
mod guard;
mod key;
mod link;
mod manager;
mod monitor;
mod reply;
mod sql;
mod table;
pub mod testing;
mod worker;

pub use crossbeam_channel;
pub use error::{Error, ErrorKind, Result};
pub use guard::LockGuard;
pub use key::LockKey;
pub use manager::{Builder, LockManager};
pub use postgres;

/// The README's examples, compiled as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

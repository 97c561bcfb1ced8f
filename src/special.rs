//! Requests that are more than one key's try, release or check: fenced grants, semaphore
//! permits, all-or-nothing multi-key grants and holder lookups.
//!
//! Each runs alone (never batched) as one statement in the manager's session, built from integers
//! only, and, like every lock statement, is granted when its statement returns its row. Their
//! replies carry what a plain grant does not (the token, the slot, the holders) in one boxed
//! [`Extra`], so the plain request path keeps its size.

use std::fmt::Write;
use std::time::{Duration, SystemTime};

use postgres::SimpleQueryMessage;
use postgres::error::SqlState;

use crate::error::{Error, ErrorKind};
use crate::holder::Holder;
use crate::key::{LockKey, Space};
use crate::link::Lease;
use crate::reply::Reply;
use crate::session::{Conn, Failed};
use crate::sql::{Mode, push_int4, push_int8};

/// The sequence fencing tokens come from, in the schema every role finds it under.
pub(crate) const FENCE_SEQUENCE: &str = "public.distlock_fence";

/// The most permits a semaphore may have: each try may look at every slot before a free one.
pub(crate) const MAX_PERMITS: u32 = 10_000;

/// The most keys one all-or-nothing grant may take.
pub(crate) const MAX_KEYS: usize = 1_000;

/// What a special request asks for.
#[derive(Debug)]
pub(crate) enum Special {
    /// An exclusive try that also draws a fencing token.
    Fenced(LockKey),
    /// A try of a free slot of the semaphore `key` with `permits` slots.
    Permit { key: LockKey, permits: u32 },
    /// Every key or none, in `mode`.
    All { keys: Vec<LockKey>, mode: Mode },
    /// Who holds or waits for `key`.
    Holders(LockKey),
    /// Waits in PostgreSQL's lock queue for every one of `keys` (sorted), in `mode`, until
    /// `deadline` (`None`: until granted); with a fencing token when `fenced`. Runs on a waiting
    /// connection, never on the manager's own.
    Wait {
        keys: Vec<LockKey>,
        mode: Mode,
        fenced: bool,
        deadline: Option<std::time::Instant>,
    },
}

/// The reply to a special request (boxed in [`Reply::Extra`]).
#[derive(Debug)]
pub(crate) struct Extra {
    /// For a grant: the lease it was granted under.
    pub(crate) lease: Option<Lease>,
    /// For a grant: the keys the session now holds for the caller (one for a fenced grant or a
    /// permit, every key for an all-or-nothing grant), all in `mode`.
    pub(crate) held: Vec<LockKey>,
    /// The mode of `held`.
    pub(crate) mode: Mode,
    /// For a fenced grant: its token.
    pub(crate) token: Option<u64>,
    /// For a holder lookup: the holders and waiters.
    pub(crate) holders: Vec<Holder>,
}

impl Extra {
    /// The holds of a grant nobody will own, to be given back.
    pub(crate) fn orphans(&self, orphans: &mut Vec<crate::reply::Orphan>) {
        if let Some(lease) = &self.lease {
            orphans.extend(self.held.iter().map(|&key| crate::reply::Orphan {
                key,
                mode: self.mode,
                generation: lease.generation,
            }));
        }
    }

    fn grant(lease: &Lease, held: Vec<LockKey>, mode: Mode, token: Option<u64>) -> Reply {
        Reply::Extra(Box::new(Extra {
            lease: Some(lease.clone()),
            held,
            mode,
            token,
            holders: Vec::new(),
        }))
    }
}

/// The first int of the slot keys of the semaphore `key` (see [`LockKey::permit_slot`]).
fn semaphore_class(key: LockKey) -> i32 {
    match key.permit_slot(0).as_pair() {
        Some((class, _)) => class,
        None => 0,
    }
}

fn push_args(sql: &mut String, key: LockKey) {
    match key.0 {
        Space::Id(id) => push_int8(sql, id),
        Space::Pair(a, b) => {
            push_int4(sql, a);
            sql.push(',');
            push_int4(sql, b);
        }
    }
}

fn try_fn(mode: Mode) -> &'static str {
    match mode {
        Mode::Exclusive => "pg_try_advisory_lock(",
        Mode::Shared => "pg_try_advisory_lock_shared(",
    }
}

fn unlock_fn(mode: Mode) -> &'static str {
    match mode {
        Mode::Exclusive => "pg_advisory_unlock(",
        Mode::Shared => "pg_advisory_unlock_shared(",
    }
}

/// The statement of a special request.
pub(crate) fn statement(special: &Special) -> String {
    let mut sql = String::with_capacity(256);
    match special {
        // The token is drawn only when the lock was granted (the target list is evaluated for
        // rows that passed the WHERE), after the grant: every token drawn before for the key was
        // drawn by a holder that had it before, and the sequence only grows.
        Special::Fenced(key) => {
            let _ = write!(sql, "SELECT nextval('{FENCE_SEQUENCE}') WHERE ");
            sql.push_str(try_fn(Mode::Exclusive));
            push_args(&mut sql, *key);
            sql.push(')');
        }
        // Slots in order, the first free one taken, and no further one tried (LIMIT 1 stops the
        // scan). A slot this session already holds is skipped before its try: session locks stack,
        // so trying it would succeed again and count one holder twice. CASE fixes the order.
        Special::Permit { key, permits } => {
            let class = semaphore_class(*key);
            let _ = write!(
                sql,
                "SELECT s FROM generate_series(0, {last}) s WHERE CASE WHEN EXISTS (SELECT FROM \
                 pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND classid = \
                 {classid} AND objid::int8 = 2147483648 + s AND objsubid = 2) THEN false ELSE \
                 pg_try_advisory_lock(",
                last = permits.saturating_sub(1),
                classid = class as u32,
            );
            push_int4(&mut sql, class);
            sql.push_str(", (s - 2147483648)::int4) END LIMIT 1");
        }
        // Every key tried once (a materialized CTE runs each try exactly once); then either all
        // were granted and the row comes back, or the ones granted are released in the same
        // statement and no row comes back. CASE fixes the order: the release only runs when not
        // all were granted, and only for keys this statement took.
        Special::All { keys, mode } => {
            sql.push_str("WITH t(n, got) AS MATERIALIZED (VALUES ");
            for (n, key) in keys.iter().enumerate() {
                if n > 0 {
                    sql.push(',');
                }
                let _ = write!(sql, "({n}, ");
                sql.push_str(try_fn(*mode));
                push_args(&mut sql, *key);
                sql.push_str("))");
            }
            sql.push_str(
                ") SELECT WHERE CASE WHEN (SELECT bool_and(got) FROM t) THEN true ELSE \
                 (SELECT count(*) FROM t WHERE CASE WHEN NOT got THEN false",
            );
            for (n, key) in keys.iter().enumerate() {
                let _ = write!(sql, " WHEN n = {n} THEN ");
                sql.push_str(unlock_fn(*mode));
                push_args(&mut sql, *key);
                sql.push(')');
            }
            sql.push_str(" END) < 0 END");
        }
        Special::Wait { .. } => {}
        Special::Holders(key) => {
            let (classid, objid, objsubid) = key.pg_locks_tag();
            let _ = write!(
                sql,
                "SELECT l.pid, l.mode = 'ShareLock', l.granted, a.application_name, \
                 host(a.client_addr), (extract(epoch FROM a.backend_start) * 1000000)::int8 \
                 FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.pid IS NOT NULL \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND l.classid = {classid} AND l.objid = {objid} AND l.objsubid = {objsubid} \
                 ORDER BY NOT l.granted, l.pid"
            );
        }
    }
    sql
}

/// Runs `special` in `conn`'s session and says what to reply. `Err`: the connection broke, and
/// what the statement did is unknown (the session is going, and its holds with it).
pub(crate) fn serve(special: &Special, conn: &mut Conn, lease: &Lease) -> Result<Reply, Error> {
    if let Special::Wait {
        keys,
        mode,
        fenced,
        deadline,
    } = special
    {
        return serve_wait(keys, *mode, *fenced, *deadline, conn, lease);
    }
    let sql = statement(special);
    let result = conn.rows(&sql);
    let rows = match result {
        Ok(rows) => rows,
        Err(Failed::Broken(e)) => return Err(e),
        Err(Failed::Rejected(e)) => return recover(special, conn, lease, &sql, e),
    };
    Ok(read(special, &rows, lease))
}

fn read(special: &Special, rows: &[SimpleQueryMessage], lease: &Lease) -> Reply {
    let mut found = rows.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    match special {
        Special::Fenced(key) => match found.next() {
            Some(row) => {
                let token = row.get(0).and_then(|t| t.parse::<u64>().ok());
                Extra::grant(lease, vec![*key], Mode::Exclusive, token)
            }
            None => Reply::Busy,
        },
        Special::Permit { key, .. } => match found.next() {
            Some(row) => match row.get(0).and_then(|t| t.parse::<u32>().ok()) {
                Some(slot) => {
                    Extra::grant(lease, vec![key.permit_slot(slot)], Mode::Exclusive, None)
                }
                None => Reply::Failed(Error::new(
                    ErrorKind::Server,
                    "the server answered a permit try without a slot number",
                )),
            },
            None => Reply::Busy,
        },
        Special::All { keys, mode } => match found.next() {
            Some(_) => Extra::grant(lease, keys.clone(), *mode, None),
            None => Reply::Busy,
        },
        Special::Wait { .. } => Reply::Busy,
        Special::Holders(_) => {
            let holders = found.filter_map(holder_of).collect();
            Reply::Extra(Box::new(Extra {
                lease: None,
                held: Vec::new(),
                mode: Mode::Exclusive,
                token: None,
                holders,
            }))
        }
    }
}

fn holder_of(row: &postgres::SimpleQueryRow) -> Option<Holder> {
    let pid = row.get(0)?.parse().ok()?;
    let started = row
        .get(5)
        .and_then(|us| us.parse::<u64>().ok())
        .map(|us| SystemTime::UNIX_EPOCH + Duration::from_micros(us));
    Some(Holder {
        pid,
        shared: row.get(1) == Some("t"),
        granted: row.get(2) == Some("t"),
        application_name: row.get(3).map(str::to_owned),
        client_addr: row.get(4).map(str::to_owned),
        backend_start: started,
    })
}

/// The server rejected the statement. A fenced try may have been granted before the token failed
/// (a session lock outlives the statement's error), so it is released; a missing sequence is
/// created and the try made again, once.
fn recover(
    special: &Special,
    conn: &mut Conn,
    lease: &Lease,
    sql: &str,
    error: Error,
) -> Result<Reply, Error> {
    let Special::Fenced(key) = special else {
        return Ok(Reply::Failed(error));
    };
    let missing = error.sql_state() == Some(&SqlState::UNDEFINED_TABLE);
    undo(&[*key], Mode::Exclusive, conn)?;
    if !missing {
        return Ok(Reply::Failed(fencing_error(error)));
    }
    // Several managers may race to create it: whoever loses finds it there on the retry.
    let create = format!("CREATE SEQUENCE IF NOT EXISTS {FENCE_SEQUENCE}");
    if let Err(Failed::Broken(e)) = conn.rows(&create) {
        return Err(e);
    }
    match conn.rows(sql) {
        Ok(rows) => Ok(read(special, &rows, lease)),
        Err(Failed::Broken(e)) => Err(e),
        Err(Failed::Rejected(e)) => {
            // Undo a grant the second try may have made too.
            undo(&[*key], Mode::Exclusive, conn)?;
            Ok(Reply::Failed(fencing_error(e)))
        }
    }
}

/// The longest `lock_timeout` PostgreSQL accepts, in milliseconds.
const MAX_LOCK_TIMEOUT_MS: u128 = i32::MAX as u128;

/// Waits in the lock queue for `keys` (one statement each, in order, in one round trip), the
/// server ending the wait at `deadline` (`lock_timeout`). On any failure, the keys this wait took
/// are given back before the reply, so that a failed or timed-out wait leaves nothing held.
/// `lock_timeout` can fire just as the lock is granted, and then still raises its error: the
/// holds are read back from `pg_locks`, and a wait whose every key was granted is a grant.
fn serve_wait(
    keys: &[LockKey],
    mode: Mode,
    fenced: bool,
    deadline: Option<std::time::Instant>,
    conn: &mut Conn,
    lease: &Lease,
) -> Result<Reply, Error> {
    let timeout_ms = match deadline {
        None => 0,
        Some(d) => match d
            .saturating_duration_since(std::time::Instant::now())
            .as_millis()
        {
            // Past: no wait at all. 0 would mean "no timeout" to PostgreSQL.
            0 => 1,
            ms if ms > MAX_LOCK_TIMEOUT_MS => 0,
            ms => ms,
        },
    };
    let mut sql = format!("SET lock_timeout = {timeout_ms}");
    let wait_fn = match mode {
        Mode::Exclusive => "pg_advisory_lock(",
        Mode::Shared => "pg_advisory_lock_shared(",
    };
    for key in keys {
        sql.push_str(";SELECT FROM ");
        sql.push_str(wait_fn);
        push_args(&mut sql, *key);
        sql.push(')');
    }
    if fenced {
        let _ = write!(sql, ";SELECT nextval('{FENCE_SEQUENCE}')");
    }
    #[cfg(test)]
    crate::special::fault::rewrite_wait(&mut sql);
    let error = match conn.rows_waiting(&sql, deadline) {
        Ok(rows) => {
            let token = rows.iter().rev().find_map(|m| match m {
                SimpleQueryMessage::Row(row) if fenced => row.get(0)?.parse::<u64>().ok(),
                _ => None,
            });
            if fenced && token.is_none() {
                return Ok(Reply::Failed(Error::new(
                    ErrorKind::Server,
                    "the server granted a fenced wait without its token",
                )));
            }
            return Ok(Extra::grant(lease, keys.to_vec(), mode, token));
        }
        Err(Failed::Broken(e)) => return Err(e),
        Err(Failed::Rejected(e)) => e,
    };
    // Which of the keys does the session hold now?
    let held = held_of(keys, mode, conn)?;
    let timed_out = error.sql_state() == Some(&SqlState::LOCK_NOT_AVAILABLE);
    if timed_out && held.len() == keys.len() {
        // Granted as the timeout fired.
        let token = if fenced {
            match conn.rows(&format!("SELECT nextval('{FENCE_SEQUENCE}')")) {
                Ok(rows) => rows.iter().find_map(|m| match m {
                    SimpleQueryMessage::Row(row) => row.get(0)?.parse::<u64>().ok(),
                    _ => None,
                }),
                Err(Failed::Broken(e)) => return Err(e),
                Err(Failed::Rejected(e)) => {
                    give_back(&held, mode, conn)?;
                    return Ok(Reply::Failed(fencing_error(e)));
                }
            }
        } else {
            None
        };
        return Ok(Extra::grant(lease, keys.to_vec(), mode, token));
    }
    give_back(&held, mode, conn)?;
    if timed_out {
        return Ok(Reply::Busy);
    }
    if error.sql_state() == Some(&SqlState::T_R_DEADLOCK_DETECTED) {
        return Ok(Reply::Failed(Error::with_source(
            ErrorKind::Deadlock,
            "PostgreSQL found a deadlock while this call waited for the lock, and ended the wait",
            error,
        )));
    }
    Ok(Reply::Failed(if fenced {
        fencing_error(error)
    } else {
        error
    }))
}

/// The keys among `keys` that this session holds in `mode`.
fn held_of(keys: &[LockKey], mode: Mode, conn: &mut Conn) -> Result<Vec<LockKey>, Error> {
    let mut held = Vec::new();
    for key in keys {
        let (classid, objid, objsubid) = key.pg_locks_tag();
        let mode_name = match mode {
            Mode::Exclusive => "ExclusiveLock",
            Mode::Shared => "ShareLock",
        };
        let sql = format!(
            "SELECT FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() \
             AND granted AND mode = '{mode_name}' AND classid = {classid} AND objid = {objid} \
             AND objsubid = {objsubid}"
        );
        match conn.rows(&sql) {
            Ok(rows) if rows.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))) => {
                held.push(*key);
            }
            Ok(_) => {}
            Err(Failed::Broken(e)) => return Err(e),
            Err(Failed::Rejected(e)) => return Err(e),
        }
    }
    Ok(held)
}

/// Gives back whichever of `keys` this session holds in `mode`: after a failed statement, the
/// grants it made (session locks outlive the statement's error).
fn undo(keys: &[LockKey], mode: Mode, conn: &mut Conn) -> Result<(), Error> {
    let held = held_of(keys, mode, conn)?;
    give_back(&held, mode, conn)
}

/// Releases one hold of each of `keys`.
fn give_back(keys: &[LockKey], mode: Mode, conn: &mut Conn) -> Result<(), Error> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut sql = String::new();
    for key in keys {
        if !sql.is_empty() {
            sql.push(';');
        }
        sql.push_str("SELECT ");
        sql.push_str(unlock_fn(mode));
        push_args(&mut sql, *key);
        sql.push(')');
    }
    match conn.rows(&sql) {
        Ok(_) => Ok(()),
        Err(Failed::Broken(e) | Failed::Rejected(e)) => Err(e),
    }
}

/// Test-only: makes a wait statement misbehave the way the server can.
#[cfg(test)]
pub(crate) mod fault {
    use std::sync::atomic::{AtomicI64, Ordering};

    /// Set to a bigint key (0: none): the next wait statement for it takes its locks and then
    /// fails as `lock_timeout` does when it fires just as the lock is granted.
    pub(crate) static GRANT_THEN_TIME_OUT: AtomicI64 = AtomicI64::new(0);

    pub(crate) fn rewrite_wait(sql: &mut String) {
        let id = GRANT_THEN_TIME_OUT.load(Ordering::Acquire);
        if id != 0
            && sql.contains(&format!("({id})"))
            && GRANT_THEN_TIME_OUT
                .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            sql.push_str(
                ";DO $$ BEGIN RAISE EXCEPTION 'canceling statement due to lock timeout' \
                 USING ERRCODE = 'lock_not_available'; END $$",
            );
        }
    }
}

fn fencing_error(cause: Error) -> Error {
    Error::with_source(
        ErrorKind::Server,
        format!(
            "fencing tokens come from the sequence {FENCE_SEQUENCE}, which this role cannot use \
             or create: have a role allowed to run `CREATE SEQUENCE IF NOT EXISTS \
             {FENCE_SEQUENCE}; GRANT USAGE ON SEQUENCE {FENCE_SEQUENCE} TO <lock users>`"
        ),
        cause,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_built_from_integers() {
        assert_eq!(
            statement(&Special::Fenced(LockKey::id(-5))),
            "SELECT nextval('public.distlock_fence') WHERE pg_try_advisory_lock(-5)"
        );
        let all = statement(&Special::All {
            keys: vec![LockKey::id(1), LockKey::pair(2, 3)],
            mode: Mode::Shared,
        });
        assert!(
            all.contains(
                "VALUES (0, pg_try_advisory_lock_shared(1)),(1, pg_try_advisory_lock_shared(2,3)))"
            ),
            "{all}"
        );
        assert!(
            all.contains("WHEN n = 1 THEN pg_advisory_unlock_shared(2,3) END"),
            "{all}"
        );
        let permit = statement(&Special::Permit {
            key: LockKey::id(7),
            permits: 3,
        });
        assert!(
            permit.starts_with("SELECT s FROM generate_series(0, 2) s"),
            "{permit}"
        );
        assert!(
            permit.contains("pg_try_advisory_lock(7, (s - 2147483648)::int4)"),
            "{permit}"
        );
    }

    #[test]
    fn slot_keys_are_pairs_with_the_high_bit_of_objid_set() {
        let a = LockKey::id(7).permit_slot(0);
        let b = LockKey::id(7).permit_slot(4);
        assert_ne!(a, b);
        assert_eq!(a.pg_locks_tag(), (7, 0x8000_0000, 2));
        assert_eq!(b.pg_locks_tag(), (7, 0x8000_0004, 2));
        assert_eq!(
            LockKey::pair(1, 2).permit_slot(0),
            LockKey::pair(3, i32::MIN)
        );
        assert_eq!(b.semaphore_slot(), Some(4));
        assert_eq!(semaphore_class(LockKey::id(7)), 7);
    }
}

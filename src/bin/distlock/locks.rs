//! `distlock locks`: every advisory lock on the server, held or awaited.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use distlock::LockKey;
use serde_json::json;

use crate::connection::shared_server;
use crate::duration::human;
use crate::exit::{self, Failure};
use crate::watch;

/// `distlock locks`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON (an array of objects) instead of a table.
    #[arg(long)]
    json: bool,
    /// A live view, refreshed every INTERVAL (1s when not given) in place, like top: holders,
    /// waiters in queue order with whom they wait for, keys that changed marked. q or Ctrl-C quits.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "1s",
          value_parser = crate::duration::parse, conflicts_with = "json")]
    watch: Option<Duration>,
    /// Only the lock of this name (as `distlock run --key NAME` takes it, a semaphore's slots and
    /// queue included): its holders and its queue, in order.
    #[arg(long, value_name = "NAME")]
    key: Option<String>,
    /// Names ids from FILE, one key name a line (as `distlock run --key` and `LockManager::lock`
    /// take it), beside those managers record in the server's `public.distlock_names`: for the
    /// keys of processes that record none.
    #[arg(long, value_name = "FILE")]
    names: Option<std::path::PathBuf>,
    /// Show a standby's own locks. A standby's pg_locks shows none of the primary's locks, so by
    /// default distlock refuses one.
    #[arg(long)]
    allow_standby: bool,
}

/// One advisory lock of one session, as `pg_locks` and `pg_stat_activity` show it.
struct Row {
    key: Option<LockKey>,
    /// The names of the key (of its semaphore, for a slot or a queue), as recorded or given with
    /// `--names`: none when unknown, several when names share the id.
    names: Vec<String>,
    database: String,
    mode: &'static str,
    granted: bool,
    pid: i32,
    application: String,
    client: String,
    /// Waiting: how long it has waited. Granted: how long its connection has existed (PostgreSQL
    /// does not record when a lock was granted).
    age: Duration,
    /// Waiting: the sessions it waits for (`pg_blocking_pids`).
    blocking: String,
}

// `/*NO LOAD BALANCE*/`: a proxy that sends reads to replicas (pgpool-II) keeps this one on the
// primary, whose pg_locks has the locks.
const QUERY: &str = "/*NO LOAD BALANCE*/ SELECT l.classid::int8, l.objid::int8, l.objsubid::int4, l.mode, l.granted, l.pid, \
       coalesce(d.datname, ''), coalesce(a.application_name, ''), \
       coalesce(host(a.client_addr), 'local'), \
       extract(epoch FROM now() - coalesce(l.waitstart, a.backend_start, now()))::float8, \
       CASE WHEN l.granted THEN '' ELSE array_to_string(pg_blocking_pids(l.pid), ',') END \
     FROM pg_locks l \
     LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
     LEFT JOIN pg_database d ON d.oid = l.database \
     WHERE l.locktype = 'advisory' \
     ORDER BY l.classid, l.objid, l.objsubid, l.granted DESC, l.waitstart, l.pid";

pub fn run(url: Option<&str>, args: Args) -> Result<ExitCode, Failure> {
    let server = shared_server(url)?;
    let mut config = server.config.clone();
    config.connect_timeout(Duration::from_secs(10));
    if config.get_application_name().is_none() {
        config.application_name("distlock locks");
    }
    let mut client = server.tls.connect_client(&config).map_err(|e| {
        let code = match e.kind() {
            distlock::ErrorKind::Config => exit::USAGE,
            _ => exit::UNAVAILABLE,
        };
        Failure::new(code, anyhow!(e).context("cannot connect to the server"))
    })?;
    if !args.allow_standby {
        refuse_standby(&mut client)?;
    }
    let given = match &args.names {
        Some(path) => Names::from_file(path).map_err(|e| Failure::new(exit::USAGE, e))?,
        None => Names::default(),
    };
    if let Some(every) = args.watch {
        let name = args.key.as_deref();
        watch::run(every, || Ok(frame(fetch(&mut client, &given)?, name)))
            .map_err(|e| Failure::new(exit::UNAVAILABLE, e))?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows = only_named(fetch(&mut client, &given)?, args.key.as_deref());
    if args.json {
        println!("{}", to_json(&rows));
    } else {
        print_table(&rows, args.key.as_deref());
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses a standby: its `pg_locks` shows only the locks taken on it, none of the primary's, and
/// an empty list there would say "no locks" while the primary's are held.
fn refuse_standby(client: &mut postgres::Client) -> Result<(), Failure> {
    let in_recovery: bool = client
        .query_one("/*NO LOAD BALANCE*/ SELECT pg_is_in_recovery()", &[])
        .map_err(|e| Failure::new(exit::UNAVAILABLE, anyhow!(e).context("asking the server")))?
        .get(0);
    if in_recovery {
        return Err(Failure::new(
            exit::UNAVAILABLE,
            anyhow!(
                "the server is a standby (in recovery, a read replica): its pg_locks shows none \
                 of the primary's locks. Point distlock at the primary (with several hosts, add \
                 target_session_attrs=read-write), or pass --allow-standby to see the locks \
                 taken on this standby itself"
            ),
        ));
    }
    Ok(())
}

/// Every advisory lock on the server, held or awaited, in key order (holders first, then the
/// queue in arrival order), each with the names of its key: those `given` and those recorded.
fn fetch(client: &mut postgres::Client, given: &Names) -> anyhow::Result<Vec<Row>> {
    let mut rows: Vec<Row> = client
        .query(QUERY, &[])
        .map_err(|e| anyhow!(e).context("reading pg_locks"))?
        .iter()
        .map(|r| {
            let (classid, objid, objsubid): (i64, i64, i32) = (r.get(0), r.get(1), r.get(2));
            let mode: String = r.get(3);
            Row {
                key: LockKey::from_pg_locks_tag(classid as u32, objid as u32, objsubid as i16),
                names: Vec::new(),
                database: r.get(6),
                mode: if mode == "ShareLock" {
                    "shared"
                } else {
                    "exclusive"
                },
                granted: r.get(4),
                pid: r.get(5),
                application: r.get(7),
                client: r.get(8),
                age: Duration::from_secs_f64(r.get::<_, f64>(9).max(0.0)),
                blocking: r.get(10),
            }
        })
        .collect();
    let recorded = Names::recorded(client, &rows);
    for row in &mut rows {
        row.names = given.of(row.key);
        for name in recorded.of(row.key) {
            if !row.names.contains(&name) {
                row.names.push(name);
            }
        }
        row.names.sort();
    }
    Ok(rows)
}

/// Names of keys by id, and by the first int of a semaphore's slots (the id's fold).
#[derive(Default)]
struct Names {
    ids: HashMap<i64, Vec<String>>,
    folds: HashMap<i32, Vec<String>>,
}

/// The names recorded for the ids `$1` and the semaphore folds `$2` (unsigned, as pg_locks
/// shows them).
const RECORDED: &str = "/*NO LOAD BALANCE*/ SELECT id, name FROM public.distlock_names \
     WHERE id = ANY($1) OR ((id >> 32) # id) & 4294967295 = ANY($2)";

impl Names {
    /// The names of `path`, one a line (blank lines skipped).
    fn from_file(path: &std::path::Path) -> anyhow::Result<Names> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!(e).context(format!("cannot read --names {}", path.display())))?;
        let mut names = Names::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            names.add(LockKey::name(line), line);
        }
        Ok(names)
    }

    /// The names recorded on the server for the keys of `rows`: none where no manager records
    /// them (no table) or this role may not read them.
    fn recorded(client: &mut postgres::Client, rows: &[Row]) -> Names {
        let mut names = Names::default();
        let ids: Vec<i64> = rows.iter().filter_map(|r| r.key?.as_id()).collect();
        let folds: Vec<i64> = rows
            .iter()
            .filter_map(|r| semaphore(r.key).map(|(class, _)| i64::from(class as u32)))
            .collect();
        if ids.is_empty() && folds.is_empty() {
            return names;
        }
        let table = "/*NO LOAD BALANCE*/ SELECT to_regclass('public.distlock_names') IS NOT NULL";
        if !client
            .query_one(table, &[])
            .is_ok_and(|r| r.get::<_, bool>(0))
        {
            return names;
        }
        // A role that may not read the table sees ids, as without one.
        if let Ok(found) = client.query(RECORDED, &[&ids, &folds]) {
            for row in found {
                let name: String = row.get(1);
                names.add(LockKey::id(row.get(0)), &name);
            }
        }
        names
    }

    fn add(&mut self, key: LockKey, name: &str) {
        let (Some(id), Some((fold, _))) = (key.as_id(), key.permit_slot(0).as_pair()) else {
            return;
        };
        for list in [
            self.ids.entry(id).or_default(),
            self.folds.entry(fold).or_default(),
        ] {
            if !list.iter().any(|n| n == name) {
                list.push(name.to_owned());
            }
        }
    }

    /// The names of `key`: of its id, or of its semaphore for a slot or a queue.
    fn of(&self, key: Option<LockKey>) -> Vec<String> {
        let found = match (key.and_then(LockKey::as_id), semaphore(key)) {
            (Some(id), _) => self.ids.get(&id),
            (None, Some((fold, _))) => self.folds.get(&fold),
            (None, None) => None,
        };
        found.cloned().unwrap_or_default()
    }
}

/// `rows`, only `name`'s lock when given.
fn only_named(rows: Vec<Row>, name: Option<&str>) -> Vec<Row> {
    match name {
        Some(name) => rows.into_iter().filter(|r| is_named(r.key, name)).collect(),
        None => rows,
    }
}

/// The live view's frame of `rows` (only `name`'s with one).
fn frame(rows: Vec<Row>, name: Option<&str>) -> watch::Frame {
    let rows = only_named(rows, name);
    let mut state: HashMap<String, Vec<(i32, bool)>> = HashMap::new();
    for r in &rows {
        state
            .entry(key_text(r))
            .or_default()
            .push((r.pid, r.granted));
    }
    let held = rows.iter().filter(|r| r.granted).count();
    watch::Frame {
        held,
        waiting: rows.len() - held,
        lines: table(&rows, name, true),
        state,
    }
}

/// The key of `row` as the table shows it.
fn key_text(row: &Row) -> String {
    key_label(row.key, &row.names)
}

/// `key` as the table shows it: by `names` where it has any (names that share its id joined by
/// ` | `, never one of them alone), else by its integers.
fn key_label(key: Option<LockKey>, names: &[String]) -> String {
    let named = (!names.is_empty()).then(|| names.join(" | "));
    if let Some((class, slot)) = semaphore(key) {
        let class = named.unwrap_or_else(|| class.to_string());
        if key.is_some_and(LockKey::is_semaphore_queue) {
            return format!("semaphore {class} queue");
        }
        return format!("semaphore {class} slot {slot}");
    }
    if let Some(named) = named {
        return named;
    }
    match key.map(|k| (k.as_id(), k.as_pair())) {
        Some((Some(id), _)) => id.to_string(),
        Some((_, Some((a, b)))) => format!("({a}, {b})"),
        _ => "?".to_owned(),
    }
}

/// Whether `key` is the lock `name` maps to, or a slot or the queue of the semaphore `name`.
fn is_named(key: Option<LockKey>, name: &str) -> bool {
    let named = LockKey::name(name);
    let class = named.permit_slot(0).as_pair().map(|(class, _)| class);
    key == Some(named) || (semaphore(key).map(|(c, _)| c) == class && class.is_some())
}

fn print_table(rows: &[Row], name: Option<&str>) {
    for line in table(rows, name, false).into_iter().map(|(_, line)| line) {
        println!("{line}");
    }
    if rows.is_empty() {
        match name {
            Some(name) => println!("(nobody holds or waits for {name})"),
            None => println!("(no advisory locks)"),
        }
    } else {
        println!(
            "FOR: how long a waiter has waited; ~ for held locks: the age of the holding connection."
        );
    }
}

/// The table's lines, header first, each with the text of its key (empty for the header);
/// `blockers`: a last column, WAITS FOR, with the sessions a waiter waits for.
fn table(rows: &[Row], name: Option<&str>, blockers: bool) -> Vec<(String, String)> {
    let mut header = vec![
        "KEY",
        "MODE",
        "STATE",
        "PID",
        "APPLICATION",
        "CLIENT",
        "FOR",
        "DATABASE",
    ];
    if blockers {
        header.push("WAITS FOR");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![
                match name {
                    Some(name) => format!("{name} = {}", key_label(r.key, &[])),
                    None => key_text(r),
                },
                r.mode.to_owned(),
                if r.granted { "held" } else { "waiting" }.to_owned(),
                r.pid.to_string(),
                r.application.clone(),
                r.client.clone(),
                if r.granted {
                    format!("~{}", human(r.age))
                } else {
                    human(r.age)
                },
                r.database.clone(),
            ];
            if blockers {
                cells.push(r.blocking.clone());
            }
            cells
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let text: Vec<String> = cols
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        text.join("  ").trim_end().to_owned()
    };
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut lines = vec![(String::new(), line(&header))];
    for (row, r) in cells.iter().zip(rows) {
        lines.push((key_text(r), line(row)));
    }
    lines
}

/// For a semaphore slot's key (`distlock run --limit`, `LockManager::try_acquire_permit`): the
/// semaphore's first int and the slot.
fn semaphore(key: Option<LockKey>) -> Option<(i32, u32)> {
    let key = key?;
    Some((key.as_pair()?.0, key.semaphore_slot()?))
}

/// The rows as a JSON array, one object per lock and session.
fn to_json(rows: &[Row]) -> String {
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let (key, pair) = match r.key.map(|k| (k.as_id(), k.as_pair())) {
                Some((Some(id), _)) => (json!(id), json!(null)),
                Some((_, Some((a, b)))) => (json!(null), json!([a, b])),
                _ => (json!(null), json!(null)),
            };
            let seconds = (r.age.as_secs_f64() * 1000.0).round() / 1000.0;
            let semaphore =
                semaphore(r.key).map(|(class, slot)| json!({"semaphore": class, "slot": slot}));
            json!({
                "key": key,
                "pair": pair,
                "permit": semaphore,
                "names": r.names,
                "mode": r.mode,
                "granted": r.granted,
                "pid": r.pid,
                "application_name": r.application,
                "client_addr": r.client,
                "database": r.database,
                "waiting_seconds": if r.granted { None } else { Some(seconds) },
                "connection_age_seconds": if r.granted { Some(seconds) } else { None },
            })
        })
        .collect();
    serde_json::to_string_pretty(&items).unwrap_or_else(|_| "[]".to_owned())
}

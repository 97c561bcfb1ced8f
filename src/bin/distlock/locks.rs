//! `distlock locks`: every advisory lock on the server, held or awaited.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use distlock::LockKey;
use serde_json::json;

use crate::connection::shared_server;
use crate::duration::human;
use crate::exit::{self, Failure};

/// `distlock locks`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON (an array of objects) instead of a table.
    #[arg(long)]
    json: bool,
    /// Only the lock of this name (as `distlock run --key NAME` takes it, a semaphore's slots and
    /// queue included): its holders and its queue, in order.
    #[arg(long, value_name = "NAME")]
    key: Option<String>,
}

/// One advisory lock of one session, as `pg_locks` and `pg_stat_activity` show it.
struct Row {
    key: Option<LockKey>,
    database: String,
    mode: &'static str,
    granted: bool,
    pid: i32,
    application: String,
    client: String,
    /// Waiting: how long it has waited. Granted: how long its connection has existed (PostgreSQL
    /// does not record when a lock was granted).
    age: Duration,
}

// `/*NO LOAD BALANCE*/`: a proxy that sends reads to replicas (pgpool-II) keeps this one on the
// primary, whose pg_locks has the locks.
const QUERY: &str = "/*NO LOAD BALANCE*/ SELECT l.classid::int8, l.objid::int8, l.objsubid::int4, l.mode, l.granted, l.pid, \
       coalesce(d.datname, ''), coalesce(a.application_name, ''), \
       coalesce(host(a.client_addr), 'local'), \
       extract(epoch FROM now() - coalesce(l.waitstart, a.backend_start, now()))::float8 \
     FROM pg_locks l \
     LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
     LEFT JOIN pg_database d ON d.oid = l.database \
     WHERE l.locktype = 'advisory' \
     ORDER BY l.classid, l.objid, l.objsubid, l.granted DESC, l.pid";

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
    let rows: Vec<Row> = client
        .query(QUERY, &[])
        .map_err(|e| anyhow!(e).context("reading pg_locks"))?
        .iter()
        .map(|r| {
            let (classid, objid, objsubid): (i64, i64, i32) = (r.get(0), r.get(1), r.get(2));
            let mode: String = r.get(3);
            Row {
                key: LockKey::from_pg_locks_tag(classid as u32, objid as u32, objsubid as i16),
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
            }
        })
        .collect();
    let rows = match &args.key {
        Some(name) => rows.into_iter().filter(|r| is_named(r.key, name)).collect(),
        None => rows,
    };
    if args.json {
        println!("{}", to_json(&rows));
    } else {
        print_table(&rows, args.key.as_deref());
    }
    Ok(ExitCode::SUCCESS)
}

fn key_text(key: Option<LockKey>) -> String {
    if let Some((class, slot)) = semaphore(key) {
        if key.is_some_and(LockKey::is_semaphore_queue) {
            return format!("semaphore {class} queue");
        }
        return format!("semaphore {class} slot {slot}");
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
    let header = [
        "KEY",
        "MODE",
        "STATE",
        "PID",
        "APPLICATION",
        "CLIENT",
        "FOR",
        "DATABASE",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                match name {
                    Some(name) => format!("{name} = {}", key_text(r.key)),
                    None => key_text(r.key),
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
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let text: Vec<String> = cols
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(&header.map(str::to_owned));
    for row in &cells {
        line(row);
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

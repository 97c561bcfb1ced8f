//! `distlock run`'s live status line while it waits: how long, and who holds the lock, read from
//! `pg_locks` on a connection of its own.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use distlock::LockKey;

use crate::connection::Server;
use crate::duration::human;

/// The live line shown on a terminal while waiting: how long, and who holds the lock.
pub struct StatusLine {
    /// Set when the line is shown at all (a terminal, not --quiet).
    on: bool,
    server: Server,
    /// A separate, lazily opened connection for the pg_locks query.
    client: Option<postgres::Client>,
    shown: bool,
}

impl StatusLine {
    pub fn new(on: bool, server: &Server) -> StatusLine {
        StatusLine {
            on,
            server: server.clone(),
            client: None,
            shown: false,
        }
    }

    /// `limit`: the key names a semaphore of that many permits (`--limit`), whose slots are shown.
    pub fn show(&mut self, name: &str, key: LockKey, limit: Option<u32>, waited: Duration) {
        if !self.on {
            return;
        }
        let holders = self
            .holders(key, limit)
            .unwrap_or_else(|e| format!("(holders unknown: {e})"));
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[Kdistlock: waiting {} for {name} ({}): {holders}",
            human(waited),
            key.as_id().unwrap_or_default()
        );
        let _ = err.flush();
        self.shown = true;
    }

    pub fn clear(&mut self) {
        if self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.shown = false;
        }
    }

    fn holders(&mut self, key: LockKey, limit: Option<u32>) -> anyhow::Result<String> {
        if self.client.is_none() {
            let mut config = self.server.config.clone();
            config
                .application_name("distlock status")
                .connect_timeout(Duration::from_secs(2));
            self.client = Some(self.server.tls.connect_client(&config)?);
        }
        let client = self.client.as_mut().context("no status connection")?;
        // A lock is one (classid, objid, objsubid); a semaphore's slots share the classid and
        // take consecutive objids.
        let (classid, objid, objsubid, slots) = match limit {
            Some(n) => {
                let (classid, objid, objsubid) = key.permit_slot(0).pg_locks_tag();
                (classid, objid, objsubid, n)
            }
            None => {
                let (classid, objid, objsubid) = key.pg_locks_tag();
                (classid, objid, objsubid, 1)
            }
        };
        let last = i64::from(objid) + i64::from(slots) - 1;
        let rows = client.query(
            "/*NO LOAD BALANCE*/ SELECT l.pid, coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'local'), \
                    extract(epoch FROM now() - a.backend_start)::float8 \
             FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.classid::int8 = $1 \
               AND l.objid::int8 BETWEEN $2 AND $4 AND l.objsubid = $3 ORDER BY l.pid",
            &[&i64::from(classid), &i64::from(objid), &objsubid, &last],
        )?;
        if rows.is_empty() {
            return Ok("free a moment ago, retrying".to_owned());
        }
        let holders: Vec<String> = rows
            .iter()
            .map(|r| {
                let (pid, app, addr, age): (i32, String, String, f64) =
                    (r.get(0), r.get(1), r.get(2), r.get(3));
                format!(
                    "held by pid {pid} ({app:?}, {addr}, connected {})",
                    human(Duration::from_secs_f64(age.max(0.0)))
                )
            })
            .collect();
        Ok(holders.join("; "))
    }
}

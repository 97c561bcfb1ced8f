//! Where the server is: the flag, DATABASE_URL, the libpq variables, the password file.

use std::env;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use distlock::testing::TestCluster;
use distlock::{LockManager, Tls};
use postgres::config::Host;

use crate::exit::{self, Failure};

/// Where the shared server is and how to reach it.
#[derive(Clone)]
pub struct Server {
    /// The client's configuration.
    pub config: postgres::Config,
    /// TLS: the connection string's settings over `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`,
    /// `PGSSLKEY`, as libpq combines them.
    pub tls: Tls,
}

/// The server for `run` and `locks`: `--database-url`, else `DATABASE_URL`, else the libpq
/// variables. A real shared server is required: there is no throwaway fallback here.
pub fn shared_server(flag: Option<&str>) -> Result<Server, Failure> {
    let usage = |e: distlock::Error| Failure::new(exit::USAGE, anyhow!(e));
    let (mut config, tls) = given_server(flag)?;
    let tls = tls.with_defaults(Tls::from_env().map_err(usage)?);
    // As libpq: the connection string's password, else PGPASSWORD, else the password file.
    if config.get_password().is_none() {
        if let Some(password) = nonempty("PGPASSWORD") {
            config.password(password);
        } else {
            password_from_file(&mut config);
        }
    }
    LockManager::builder().check(&config).map_err(usage)?;
    Ok(Server { config, tls })
}

fn given_server(flag: Option<&str>) -> Result<(postgres::Config, Tls), Failure> {
    if let Some(url) = flag.map(str::to_owned).or_else(|| nonempty("DATABASE_URL")) {
        if url.trim().is_empty() {
            return Err(Failure::new(
                exit::USAGE,
                anyhow!("empty connection string given to --database-url"),
            ));
        }
        return Tls::parse_params(&url).map_err(|e| {
            Failure::new(
                exit::USAGE,
                anyhow!(e).context(
                    "invalid connection string (expected a postgres:// URL or key=value pairs)",
                ),
            )
        });
    }
    if ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE"]
        .iter()
        .all(|var| nonempty(var).is_none())
    {
        return Err(Failure::new(
            exit::USAGE,
            anyhow!(
                "no server given: pass --database-url, or set DATABASE_URL or the libpq variables \
                 PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE (without PGHOST, libpq's default \
                 socket). The lock must live on the server that every host shares."
            ),
        ));
    }
    let mut config = postgres::Config::new();
    // Without PGHOST the library uses libpq's default socket; a host starting with `/` is a
    // socket directory.
    for host in nonempty("PGHOST").iter().flat_map(|h| h.split(',')) {
        config.host(host);
    }
    if let Some(port) = nonempty("PGPORT") {
        let port = port.parse().map_err(|_| {
            Failure::new(
                exit::USAGE,
                anyhow!("PGPORT is not a port number: {port:?}"),
            )
        })?;
        config.port(port);
    }
    let user = nonempty("PGUSER")
        .or_else(|| nonempty("USER"))
        .or_else(|| nonempty("LOGNAME"))
        .ok_or_else(|| Failure::new(exit::USAGE, anyhow!("no user: set PGUSER")))?;
    config.user(&user);
    if let Some(db) = nonempty("PGDATABASE") {
        config.dbname(&db);
    }
    Ok((config, Tls::new()))
}

/// libpq's password file: `PGPASSFILE`, else `~/.pgpass`, read as libpq reads it. Lines are
/// `hostname:port:database:username:password`, `*` matches anything, `\` escapes `:` and `\`,
/// and the first line that matches the first host wins (one password serves every host of the
/// connection). A unix-domain socket matches `localhost`. A file that group or others may read is
/// ignored with a warning, as libpq does.
fn password_from_file(config: &mut postgres::Config) {
    let Some(path) = nonempty("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| nonempty("HOME").map(|home| Path::new(&home).join(".pgpass")))
    else {
        return;
    };
    let Ok(meta) = fs::metadata(&path) else {
        return;
    };
    if !meta.is_file() {
        return;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        eprintln!(
            "distlock: warning: password file {} has group or world access; permissions should be \
             u=rw (0600) or less",
            path.display()
        );
        return;
    }
    let Ok(text) = fs::read_to_string(&path) else {
        return;
    };
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        _ => "localhost".to_owned(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default().to_owned();
    let database = config
        .get_dbname()
        .map_or_else(|| user.clone(), str::to_owned);
    let wanted = [
        host.as_str(),
        port.as_str(),
        database.as_str(),
        user.as_str(),
    ];
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = pgpass_fields(line);
        let [h, p, d, u, password] = fields.as_slice() else {
            continue;
        };
        if [h, p, d, u]
            .iter()
            .zip(wanted)
            .all(|(field, value)| field.as_str() == "*" || field.as_str() == value)
        {
            config.password(password.as_str());
            return;
        }
    }
}

/// The `:`-separated fields of a password file line, with `\` escapes undone.
fn pgpass_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(next), Some(field)) = (chars.next(), fields.last_mut()) {
                    field.push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(field) = fields.last_mut() {
                    field.push(c);
                }
            }
        }
    }
    fields
}

/// The application name a connection of the command shows: the connection string's, else
/// `PGAPPNAME`, else `fallback`.
pub fn application_name(config: &postgres::Config, fallback: &str) -> String {
    config
        .get_application_name()
        .map(str::to_owned)
        .or_else(|| nonempty("PGAPPNAME"))
        .unwrap_or_else(|| fallback.to_owned())
}

/// The server for `demo` and `bench`: `--database-url`, else `DATABASE_URL`, else a throwaway
/// local cluster.
pub fn demo_server(flag: Option<&str>) -> anyhow::Result<TestCluster> {
    match flag {
        Some(url) => Ok(TestCluster::external(url)),
        None => Ok(TestCluster::from_env()?),
    }
}

fn nonempty(var: &str) -> Option<String> {
    env::var(var).ok().filter(|v| !v.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_file_lines_split_like_libpq() {
        assert_eq!(
            pgpass_fields(r"db\:1:5432:*:app:pa\:ss\\word:x"),
            ["db:1", "5432", "*", "app", "pa:ss\\word:x"]
        );
        assert_eq!(pgpass_fields("a:b"), ["a", "b"]);
    }
}

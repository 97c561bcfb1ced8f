//! libpq's connection parameters where the `postgres` crate differs: parameters it does not
//! know taken out of the string first ([`split`]), libpq's defaults for a missing host and user
//! ([`libpq_defaults`]), and host lists checked before any connect ([`check_hosts`]).

use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// Takes the parameters `take` accepts (it returns `true` for those) out of a connection string,
/// and returns what is left for the `postgres` crate's parser. Accepts both libpq forms, `key=value` pairs (values may be
/// single-quoted, with `\` escapes) and `postgres://` URLs (settings in the query string). Text it
/// cannot split is passed on whole, for the client's parser to report.
pub(crate) fn split(
    params: &str,
    mut take: impl FnMut(&str, &str) -> Result<bool>,
) -> Result<String> {
    let trimmed = params.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let Some((base, query)) = params.split_once('?') else {
            return Ok(params.to_owned());
        };
        let mut kept: Vec<&str> = Vec::new();
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(name), Some(value)) = (percent_decode(name), percent_decode(value)) else {
                kept.push(pair);
                continue;
            };
            if !take(&name, &value)? {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok(rest);
    }
    let Some(pairs) = key_values(params) else {
        return Ok(params.to_owned());
    };
    let mut rest = String::with_capacity(params.len());
    for (name, value) in pairs {
        if take(&name, &value)? {
            continue;
        }
        if !rest.is_empty() {
            rest.push(' ');
        }
        rest.push_str(&name);
        rest.push_str("='");
        for c in value.chars() {
            if c == '\'' || c == '\\' {
                rest.push('\\');
            }
            rest.push(c);
        }
        rest.push('\'');
    }
    Ok(rest)
}

/// libpq's `key = value` pairs; `None` when the text is not of that form.
fn key_values(text: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(pairs);
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            name.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') || name.is_empty() {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((name, value));
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The directory of the server's unix-domain socket when the parameters name no host, as libpq
/// has it: `/var/run/postgresql` where that directory exists (Debian's and Ubuntu's libpq), else
/// `/tmp` (upstream PostgreSQL's default).
pub(crate) fn default_socket_dir() -> &'static Path {
    let debian = Path::new("/var/run/postgresql");
    if debian.is_dir() {
        debian
    } else {
        Path::new("/tmp")
    }
}

/// Fills in what libpq would when the parameters leave it out: no host (and no `hostaddr`) means
/// the default unix-domain socket, and no user means the operating-system user (`USER`, else
/// `LOGNAME`).
pub(crate) fn libpq_defaults(config: &mut postgres::Config) -> Result<()> {
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        config.host_path(default_socket_dir());
    }
    if config.get_user().is_none() {
        let user = ["USER", "LOGNAME"]
            .iter()
            .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    "no user given in the connection parameters, and none in USER or LOGNAME",
                )
            })?;
        config.user(&user);
    }
    Ok(())
}

/// Rejects host lists the client would only refuse once it tries to connect, so that they are
/// reported as the configuration errors they are.
pub(crate) fn check_hosts(config: &postgres::Config) -> Result<()> {
    let hosts = config.get_hosts().len();
    let addrs = config.get_hostaddrs().len();
    if hosts != 0 && addrs != 0 && hosts != addrs {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{hosts} hosts but {addrs} hostaddrs in the connection parameters"),
        ));
    }
    let ports = config.get_ports().len();
    let targets = hosts.max(addrs);
    if ports > 1 && ports != targets {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "{targets} hosts but {ports} ports in the connection parameters (give one port \
                 for all, or one per host)"
            ),
        ));
    }
    Ok(())
}

/// One configuration per host of a host list, in order, each otherwise as `config`, so that each
/// host can be tried within a connect timeout of its own (as libpq does). A list of one host (or
/// none) is returned as it is.
/// `host:port` (or the socket directory and port) of a one-host configuration, for messages.
pub(crate) fn host_label(config: &postgres::Config) -> String {
    use postgres::config::Host;
    let host = match (config.get_hostaddrs().first(), config.get_hosts().first()) {
        (Some(addr), _) => addr.to_string(),
        (None, Some(Host::Tcp(name))) => name.clone(),
        (None, Some(Host::Unix(path))) => path.display().to_string(),
        (None, None) => "localhost".to_owned(),
    };
    match config.get_ports().first() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    }
}

pub(crate) fn each_host(config: &postgres::Config) -> Vec<postgres::Config> {
    use postgres::config::Host;
    let (hosts, addrs, ports) = (
        config.get_hosts(),
        config.get_hostaddrs(),
        config.get_ports(),
    );
    let targets = hosts.len().max(addrs.len());
    if targets <= 1 {
        return vec![config.clone()];
    }
    (0..targets)
        .map(|i| {
            let mut one = postgres::Config::new();
            match hosts.get(i) {
                Some(Host::Tcp(name)) => {
                    one.host(name);
                }
                Some(Host::Unix(path)) => {
                    one.host_path(path);
                }
                None => {}
            }
            if let Some(&addr) = addrs.get(i) {
                one.hostaddr(addr);
            }
            if let Some(&port) = ports.get(i).or(ports.first()) {
                one.port(port);
            }
            copy_settings(config, &mut one);
            one
        })
        .collect()
}

/// Everything of `from` but its hosts and ports, onto `to`.
fn copy_settings(from: &postgres::Config, to: &mut postgres::Config) {
    if let Some(user) = from.get_user() {
        to.user(user);
    }
    if let Some(password) = from.get_password() {
        to.password(password);
    }
    if let Some(dbname) = from.get_dbname() {
        to.dbname(dbname);
    }
    if let Some(options) = from.get_options() {
        to.options(options);
    }
    if let Some(name) = from.get_application_name() {
        to.application_name(name);
    }
    if let Some(&timeout) = from.get_connect_timeout() {
        to.connect_timeout(timeout);
    }
    if let Some(&timeout) = from.get_tcp_user_timeout() {
        to.tcp_user_timeout(timeout);
    }
    if let Some(interval) = from.get_keepalives_interval() {
        to.keepalives_interval(interval);
    }
    if let Some(retries) = from.get_keepalives_retries() {
        to.keepalives_retries(retries);
    }
    to.ssl_mode(from.get_ssl_mode())
        .ssl_negotiation(from.get_ssl_negotiation())
        .keepalives(from.get_keepalives())
        .keepalives_idle(from.get_keepalives_idle())
        .target_session_attrs(from.get_target_session_attrs())
        .channel_binding(from.get_channel_binding());
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    #[test]
    fn a_host_list_becomes_one_configuration_per_host_with_everything_else_kept() {
        let config = postgres::Config::from_str(
            "host=a,b port=5432,6432 user=u password=p dbname=d application_name=x \
             target_session_attrs=read-write connect_timeout=3",
        )
        .unwrap();
        let each = super::each_host(&config);
        assert_eq!(each.len(), 2);
        for (one, (host, port)) in each.iter().zip([("a", 5432), ("b", 6432)]) {
            assert_eq!(one.get_hosts(), &[postgres::config::Host::Tcp(host.into())]);
            assert_eq!(one.get_ports(), &[port]);
            assert_eq!(one.get_user(), Some("u"));
            assert_eq!(one.get_password(), Some(&b"p"[..]));
            assert_eq!(one.get_dbname(), Some("d"));
            assert_eq!(one.get_application_name(), Some("x"));
            assert_eq!(
                one.get_target_session_attrs(),
                postgres::config::TargetSessionAttrs::ReadWrite
            );
            assert_eq!(
                one.get_connect_timeout(),
                Some(&std::time::Duration::from_secs(3))
            );
        }
        let single = postgres::Config::from_str("host=a port=1 user=u").unwrap();
        assert_eq!(super::each_host(&single).len(), 1);
    }
}

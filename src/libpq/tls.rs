//! TLS the way libpq does it — `sslmode`, `sslrootcert`, `sslcert`, `sslkey` — through rustls.
//!
//! The `postgres` crate's own parser knows only `sslmode=disable|prefer|require` and rejects the
//! other settings, so they are taken out of the connection string first ([`split`]) and applied
//! here. What each mode means follows libpq:
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | never | – |
//! | `allow`, `prefer` (the default) | when the server offers TLS | no |
//! | `require` | always | no — unless a root certificate is given, then as `verify-ca` |
//! | `verify-ca` | always | chain to the root certificate |
//! | `verify-full` | always | chain, and the host name (or IP address) in the certificate |
//!
//! `sslrootcert` is a PEM file, or `system` for the operating system's trust store. Without one,
//! `verify-ca`/`verify-full` read `~/.postgresql/root.crt`, as libpq does, and `require` turns into
//! `verify-ca` when that file exists. `sslcert`/`sslkey` (default `~/.postgresql/postgresql.crt` and
//! `.key`, when present) present a client certificate; a key file that group or others can read is
//! refused, as libpq refuses it. (`allow` tries TLS first here, where libpq tries plaintext first.)

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::{CertificateError, ClientConfig};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, ErrorKind, Result};
use crate::libpq::certs::{Lenient, Roots, read_certs, read_key, root_store};
use crate::libpq::params;

/// How much TLS a connection asks for: libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, without checking its certificate; plaintext otherwise. The
    /// default, as in libpq.
    Prefer,
    /// TLS always, without checking the server's certificate (unless a root certificate is given:
    /// then as [`SslMode::VerifyCa`]).
    Require,
    /// TLS always; the server's certificate must chain to the root certificate.
    VerifyCa,
    /// TLS always; the certificate must chain to the root certificate and name the host.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "invalid connection parameters: sslmode {other:?} is not disable, allow, \
                         prefer, require, verify-ca or verify-full"
                    ),
                ));
            }
        })
    }

    /// What the `postgres` crate is told: it only decides whether TLS is asked for.
    fn for_client(self) -> postgres::config::SslMode {
        match self {
            SslMode::Disable => postgres::config::SslMode::Disable,
            SslMode::Prefer => postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                postgres::config::SslMode::Require
            }
        }
    }
}

/// TLS settings: libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`.
///
/// A connection string's own settings win over these, which serve as defaults (as the `PGSSL*`
/// environment variables do for libpq). See the crate docs' "TLS" for what each mode checks.
///
/// ```
/// use distlock::{SslMode, Tls};
///
/// let tls = Tls::new()
///     .mode(SslMode::VerifyFull)
///     .root_cert("/etc/ssl/certs/db-ca.pem")
///     .client_cert("/etc/app/client.crt", "/etc/app/client.key");
/// # let _ = tls;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    mode: Option<SslMode>,
    roots: Option<Roots>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl Tls {
    /// No settings: `sslmode=prefer`, no root certificate, no client certificate (unless the
    /// default files under `~/.postgresql` exist).
    pub fn new() -> Tls {
        Tls::default()
    }

    /// The `sslmode`.
    pub fn mode(mut self, mode: SslMode) -> Tls {
        self.mode = Some(mode);
        self
    }

    /// `sslrootcert`: a PEM file of the CA certificates the server's certificate must chain to.
    pub fn root_cert(mut self, path: impl Into<PathBuf>) -> Tls {
        self.roots = Some(Roots::File(path.into()));
        self
    }

    /// `sslrootcert=system`: the operating system's trust store.
    pub fn system_roots(mut self) -> Tls {
        self.roots = Some(Roots::System);
        self
    }

    /// `sslcert` and `sslkey`: a client certificate and its private key, both PEM files.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Tls {
        self.cert = Some(cert.into());
        self.key = Some(key.into());
        self
    }

    /// The settings libpq takes from the environment: `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`,
    /// `PGSSLKEY` (those that are set and not empty).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a `PGSSLMODE` libpq would not accept either.
    pub fn from_env() -> Result<Tls> {
        let mut tls = Tls::new();
        for (var, name) in [
            ("PGSSLMODE", "sslmode"),
            ("PGSSLROOTCERT", "sslrootcert"),
            ("PGSSLCERT", "sslcert"),
            ("PGSSLKEY", "sslkey"),
        ] {
            if let Some(value) = std::env::var(var).ok().filter(|v| !v.trim().is_empty()) {
                tls.set(name, &value)?;
            }
        }
        Ok(tls)
    }

    /// Parses libpq connection parameters (`key=value` pairs or a `postgres://` URL) as
    /// `Builder::connect` does: the client's configuration, and the TLS settings they contain.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for parameters that do not parse.
    pub fn parse_params(params: &str) -> Result<(postgres::Config, Tls)> {
        let (rest, tls) = split(params)?;
        let config = rest.parse::<postgres::Config>().map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                "invalid connection parameters (expected key=value pairs or a postgres:// URL)",
                e,
            )
        })?;
        Ok((config, tls))
    }

    /// These settings, with `defaults`' wherever these have none (a connection string's own
    /// settings over the environment's, say).
    pub fn with_defaults(self, defaults: Tls) -> Tls {
        defaults.overridden_by(&self)
    }

    /// Connects a plain `postgres::Client` with these settings, for queries of your own on the
    /// same server (the `distlock` command's `locks` does). Blocks for as long as the client's
    /// own connect does (its `connect_timeout`).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for unusable TLS files, [`ErrorKind::Connect`] when the connection
    /// fails (a rejected certificate says so).
    pub fn connect_client(&self, config: &postgres::Config) -> Result<postgres::Client> {
        let mut config = config.clone();
        params::libpq_defaults(&mut config)?;
        let connector = self.connector(&mut config)?;
        connector.connect(&config).map_err(|e| {
            let message = match explain(&e) {
                Some(why) => format!("could not connect to the server: {why}"),
                None => "could not connect to the server".to_owned(),
            };
            Error::with_source(ErrorKind::Connect, message, e)
        })
    }

    /// Sets one libpq TLS parameter from its text, as a connection string or the environment has it.
    /// `false` when `name` is not a TLS parameter.
    pub(crate) fn set(&mut self, name: &str, value: &str) -> Result<bool> {
        match name {
            "sslmode" => self.mode = Some(SslMode::parse(value)?),
            "sslrootcert" => {
                self.roots = Some(match value {
                    "system" => Roots::System,
                    path => Roots::File(PathBuf::from(path)),
                })
            }
            "sslcert" => self.cert = Some(PathBuf::from(value)),
            "sslkey" => self.key = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// These settings, each overridden by `over`'s where it has one.
    pub(crate) fn overridden_by(&self, over: &Tls) -> Tls {
        Tls {
            mode: over.mode.or(self.mode),
            roots: over.roots.clone().or_else(|| self.roots.clone()),
            cert: over.cert.clone().or_else(|| self.cert.clone()),
            key: over.key.clone().or_else(|| self.key.clone()),
        }
    }

    /// The mode, defaulting as libpq does.
    pub(crate) fn effective_mode(&self) -> SslMode {
        self.mode.unwrap_or(SslMode::Prefer)
    }

    /// Applies the mode to the client's configuration and builds the connector that checks what
    /// the mode asks for.
    pub(crate) fn connector(&self, config: &mut postgres::Config) -> Result<Connector> {
        let mode = self.effective_mode();
        config.ssl_mode(mode.for_client());
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let default_file = |name: &str| home.as_ref().map(|h| h.join(".postgresql").join(name));
        let roots = match (&self.roots, mode) {
            (Some(roots), _) => Some(roots.clone()),
            // libpq reads the default root file for the verifying modes, and lets `require`
            // verify when it exists.
            (None, SslMode::VerifyCa | SslMode::VerifyFull) => Some(Roots::File(
                default_file("root.crt").unwrap_or_else(|| PathBuf::from("root.crt")),
            )),
            (None, SslMode::Require) => default_file("root.crt")
                .filter(|p| p.is_file())
                .map(Roots::File),
            (None, _) => None,
        };
        let check = match (mode, &roots) {
            (SslMode::Disable, _) => return Ok(Connector::Plain),
            (SslMode::VerifyFull, _) => Check::Full,
            (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => Check::Chain,
            _ => Check::Nothing,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::with_source(ErrorKind::Config, "no usable TLS versions", e))?;
        let verifier: Arc<dyn ServerCertVerifier> = match check {
            Check::Nothing => Arc::new(Lenient::nothing(provider)),
            Check::Chain | Check::Full => {
                let store = root_store(roots.as_ref())?;
                let webpki = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(store),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| {
                    Error::with_source(ErrorKind::Config, "unusable root certificates", e)
                })?;
                if check == Check::Full {
                    webpki
                } else {
                    Arc::new(Lenient::chain_only(webpki, provider))
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let (cert, key) = match (&self.cert, &self.key) {
            (Some(cert), key) => (
                Some(cert.clone()),
                key.clone().or_else(|| Some(cert.with_extension("key"))),
            ),
            (None, _) => {
                let cert = default_file("postgresql.crt").filter(|p| p.is_file());
                let key = self.key.clone().or_else(|| default_file("postgresql.key"));
                (cert, key)
            }
        };
        // As libpq: a certificate file that does not exist means no client certificate.
        let client = match (cert.filter(|c| c.exists()), key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(&cert)?;
                let key = read_key(&key)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    Error::with_source(ErrorKind::Config, "unusable client certificate", e)
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Connector::Tls(MakeRustlsConnect::new(client)))
    }
}

/// What is checked about the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    Full,
}

/// The connector a connection attempt uses.
#[derive(Clone)]
pub(crate) enum Connector {
    /// `sslmode=disable`.
    Plain,
    /// Everything else.
    Tls(MakeRustlsConnect),
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Connector::Plain => "Plain",
            Connector::Tls(_) => "Tls",
        })
    }
}

impl Connector {
    /// Connects with this connector.
    pub(crate) fn connect(
        &self,
        config: &postgres::Config,
    ) -> std::result::Result<postgres::Client, postgres::Error> {
        match self {
            Connector::Plain => config.connect(postgres::NoTls),
            Connector::Tls(tls) => config.connect(tls.clone()),
        }
    }
}

/// The TLS parameters of a connection string taken out of it: what is left for the `postgres`
/// crate's parser, and the settings (see [`params::split`]).
pub(crate) fn split(params: &str) -> Result<(String, Tls)> {
    let mut tls = Tls::default();
    let rest = params::split(params, |name, value| tls.set(name, value))?;
    Ok((rest, tls))
}

/// Says what went wrong in a connection attempt when TLS was the cause, for the error's message.
pub(crate) fn explain(e: &postgres::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut said = String::new();
    while let Some(s) = source {
        said.push_str(&s.to_string());
        // An `io::Error` hides the error it wraps from `source()`; look inside.
        let inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        let tls = inner
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .or_else(|| s.downcast_ref::<rustls::Error>());
        if let Some(tls) = tls {
            return Some(match tls {
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                ) => "the server's certificate was rejected: it is not valid for the host name \
                      connected to (sslmode=verify-full)"
                    .to_owned(),
                rustls::Error::InvalidCertificate(why) => {
                    format!("the server's certificate was rejected: {why:?}")
                }
                other => format!("the TLS handshake failed: {other}"),
            });
        }
        source = inner.or_else(|| s.source());
    }
    said.contains("does not support TLS").then(|| {
        "the server does not support TLS, and the sslmode asks for it (require, verify-ca or \
         verify-full)"
            .to_owned()
    })
}

#[cfg(test)]
#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;

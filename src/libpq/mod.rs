//! libpq's configuration, read the way libpq reads it: connection strings and their parameters,
//! host lists and defaults ([`params`]), and TLS with its certificates ([`tls`], the public
//! [`Tls`](tls::Tls) and [`SslMode`](tls::SslMode)). Pure configuration on the ground floor:
//! nothing here runs on a thread of its own or talks to a server; the worker's connect uses it.

mod certs;
pub(crate) mod params;
pub(crate) mod tls;

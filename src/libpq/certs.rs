//! The certificates of a TLS connection: reading root certificates, client certificates and
//! keys (with libpq's rule on key file permissions), and the two checks rustls does not offer as
//! libpq means them: `prefer`/`require` check nothing, `verify-ca` checks the chain but not the
//! name.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct as Dss, RootCertStore, SignatureScheme};

/// A certificate, as the verifier's signature checks take it.
type Cert<'a> = CertificateDer<'a>;
/// The outcome of a handshake signature check.
type Signature = std::result::Result<HandshakeSignatureValid, rustls::Error>;

use crate::error::{Error, ErrorKind, Result};

/// The trust anchors for checking a server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Roots {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

pub(crate) fn root_store(roots: Option<&Roots>) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match roots {
        Some(Roots::File(path)) => {
            for cert in read_certs(path)? {
                store.add(cert).map_err(|e| {
                    Error::with_source(
                        ErrorKind::Config,
                        format!("unusable root certificate in {}", path.display()),
                        e,
                    )
                })?;
            }
        }
        Some(Roots::System) => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = store.add(cert);
            }
            if store.is_empty() {
                return Err(Error::new(
                    ErrorKind::Config,
                    "sslrootcert=system: the system's trust store has no usable certificate",
                ));
            }
        }
        None => {}
    }
    Ok(store)
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let unreadable = |e: rustls::pki_types::pem::Error| {
        Error::with_source(
            ErrorKind::Config,
            format!("cannot read certificates from {}", path.display()),
            e,
        )
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(unreadable)?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    if certs.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("no certificate in {}", path.display()),
        ));
    }
    Ok(certs)
}

pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = fs::metadata(path).map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("cannot read the private key {}", path.display()),
                e,
            )
        })?;
        // libpq's rule: 0600 or less, or 0640 or less when root owns it.
        let mode = meta.permissions().mode();
        let too_open = if meta.uid() == 0 {
            mode & 0o037 != 0
        } else {
            mode & 0o077 != 0
        };
        if too_open {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "private key file {} has group or world access; permissions should be u=rw \
                     (0600) or less",
                    path.display()
                ),
            ));
        }
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("cannot read the private key {}", path.display()),
            e,
        )
    })
}

/// The checks of the server's certificate that rustls does not offer as libpq means them: none
/// at all (`prefer`, and `require` without a root certificate: encrypt, check nothing), or the
/// chain without the name (`verify-ca`). Handshake signatures are always checked.
#[derive(Debug)]
pub(crate) struct Lenient {
    /// The chain's check, whose name errors are ignored; `None`: nothing is checked.
    chain: Option<Arc<WebPkiServerVerifier>>,
    /// The signature algorithms.
    provider: Arc<CryptoProvider>,
}

impl Lenient {
    /// Checks nothing.
    pub(crate) fn nothing(provider: Arc<CryptoProvider>) -> Lenient {
        Lenient {
            chain: None,
            provider,
        }
    }

    /// Checks the chain, not the name.
    pub(crate) fn chain_only(
        chain: Arc<WebPkiServerVerifier>,
        provider: Arc<CryptoProvider>,
    ) -> Lenient {
        Lenient {
            chain: Some(chain),
            provider,
        }
    }
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // The chain is checked before the name: a name error means the chain was good.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(&self, m: &[u8], c: &Cert<'_>, d: &Dss) -> Signature {
        verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, m: &[u8], c: &Cert<'_>, d: &Dss) -> Signature {
        verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

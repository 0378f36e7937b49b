//! The TLS settings of a `rediss://` `REDIS_URL` beyond what a URL can say: which certificate
//! authorities to trust (`REDIS_CA_CERT`) and which certificate to present to a server that asks
//! for one (`REDIS_CLIENT_CERT`, `REDIS_CLIENT_KEY`). It reads and checks the PEM files at start,
//! so a wrong file stops the binary with one line naming the setting instead of failing every
//! connection later with a handshake error.
//!
//! Without `REDIS_CA_CERT` a server is verified against the Mozilla roots compiled into the
//! binary (as for PostgreSQL), which covers the managed services whose certificates chain to a
//! public authority; a private or per-instance authority needs the file. There is no setting that
//! skips verification.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use redis::{ClientTlsConfig, TlsCertificates};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::one_line;

/// TLS files for a `rediss://` server; flattened into [`crate::config::CommonArgs`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RedisTlsArgs {
    /// PEM file of the certificate authorities to trust for a rediss:// REDIS_URL, instead of the
    /// bundled Mozilla roots (a private CA, a cloud provider's per-instance CA)
    #[arg(long, env = "REDIS_CA_CERT")]
    pub redis_ca_cert: Option<PathBuf>,

    /// PEM file of the client certificate (chain) to present to a rediss:// server that requires
    /// one (`tls-auth-clients yes`); needs REDIS_CLIENT_KEY
    #[arg(long, env = "REDIS_CLIENT_CERT")]
    pub redis_client_cert: Option<PathBuf>,

    /// PEM file of the private key of REDIS_CLIENT_CERT
    #[arg(long, env = "REDIS_CLIENT_KEY")]
    pub redis_client_key: Option<PathBuf>,
}

impl RedisTlsArgs {
    /// The certificates for a client of a `REDIS_URL` that asks for TLS (`rediss://`) or not:
    /// `None` when no file is set, which leaves a TLS server verified against the bundled
    /// roots. Fails naming the setting when a file is set for a URL without TLS, cannot be
    /// read, or holds no certificate (or key).
    pub fn certificates(&self, url_asks_for_tls: bool) -> anyhow::Result<Option<TlsCertificates>> {
        let set = [
            ("REDIS_CA_CERT", &self.redis_ca_cert),
            ("REDIS_CLIENT_CERT", &self.redis_client_cert),
            ("REDIS_CLIENT_KEY", &self.redis_client_key),
        ];
        let Some((first_set, _)) = set.iter().find(|(_, path)| path.is_some()) else {
            return Ok(None);
        };
        if !url_asks_for_tls {
            return Err(anyhow!(
                "invalid {first_set}: only used with a rediss:// REDIS_URL (this one is not TLS)"
            ));
        }
        let root_cert = match &self.redis_ca_cert {
            Some(path) => Some(read_certificates("REDIS_CA_CERT", path)?),
            None => None,
        };
        let client_tls = match (&self.redis_client_cert, &self.redis_client_key) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read_certificates("REDIS_CLIENT_CERT", cert)?,
                client_key: read_private_key("REDIS_CLIENT_KEY", key)?,
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(anyhow!(
                    "invalid REDIS_CLIENT_CERT: needs REDIS_CLIENT_KEY, its private key"
                ));
            }
            (None, Some(_)) => {
                return Err(anyhow!(
                    "invalid REDIS_CLIENT_KEY: needs REDIS_CLIENT_CERT, its certificate"
                ));
            }
        };
        Ok(Some(TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

fn read(setting: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| anyhow!("invalid {setting}: {}: {}", path.display(), one_line(&e)))
}

/// The file's bytes, once checked to hold at least one PEM certificate and nothing malformed.
fn read_certificates(setting: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = read(setting, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("invalid {setting}: {}: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(anyhow!(
            "invalid {setting}: no PEM certificate in {}",
            path.display()
        ));
    }
    Ok(pem)
}

/// The file's bytes, once checked to hold a PEM private key.
fn read_private_key(setting: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = read(setting, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        anyhow!(
            "invalid {setting}: no PEM private key in {}: {e}",
            path.display()
        )
    })?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_means_the_bundled_roots() {
        let none = RedisTlsArgs::default();
        assert!(none.certificates(true).expect("no file").is_none());
        assert!(none.certificates(false).expect("no file").is_none());
    }
}

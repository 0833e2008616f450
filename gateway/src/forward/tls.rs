//! TLS and mTLS for the upstream connection: rustls on ring, the one crypto provider built.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::UpstreamConfig;

/// A TLS setup problem, naming the key and file.
#[derive(Debug, thiserror::Error)]
#[error("upstream TLS: key `upstream.{key}` ({path}): {what}")]
pub struct TlsError {
    key: &'static str,
    path: String,
    what: String,
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    crate::pem::certs(path).map_err(|what| TlsError {
        key,
        path: path.display().to_string(),
        what,
    })
}

/// Builds the rustls client config from `[upstream]` `ca_file`, `cert_file`, `key_file`.
pub fn client_config(cfg: &UpstreamConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    if cfg.ca_file.as_os_str().is_empty() {
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(TlsError {
                key: "ca_file",
                path: "(system roots)".into(),
                what: "no system CA certificates found; set ca_file to the CA that signed the broker's certificate".into(),
            });
        }
    } else {
        for c in certs("ca_file", &cfg.ca_file)? {
            roots.add(c).map_err(|e| TlsError {
                key: "ca_file",
                path: cfg.ca_file.display().to_string(),
                what: format!("unusable CA certificate: {e}"),
            })?;
        }
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots);
    let config = if cfg.cert_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let chain = certs("cert_file", &cfg.cert_file)?;
        let key: PrivateKeyDer<'static> =
            crate::pem::private_key(&cfg.key_file).map_err(|what| TlsError {
                key: "key_file",
                path: cfg.key_file.display().to_string(),
                what,
            })?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError {
                key: "key_file",
                path: cfg.key_file.display().to_string(),
                what: format!("cert_file and key_file are not a usable pair: {e}"),
            })?
    };
    Ok(Arc::new(config))
}

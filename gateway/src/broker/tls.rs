//! The broker's TLS listener: rustls on ring (the one crypto provider built), a PEM
//! certificate chain and key from `tls_cert` / `tls_key`.

use std::path::Path;
use std::sync::Arc;

use rumqttc::tokio_rustls::TlsAcceptor;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// A TLS setup problem, naming the key and file.
#[derive(Debug, thiserror::Error)]
#[error("embedded broker TLS: key `ingest.mqtt.{key}` ({path}): {what}")]
pub struct TlsError {
    key: &'static str,
    path: String,
    what: String,
}

/// The acceptor for `tls_listen`.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let err = |k: &'static str, p: &Path, what: String| TlsError {
        key: k,
        path: p.display().to_string(),
        what,
    };
    let chain: Vec<CertificateDer<'static>> =
        crate::pem::certs(cert).map_err(|what| err("tls_cert", cert, what))?;
    let private: PrivateKeyDer<'static> =
        crate::pem::private_key(key).map_err(|what| err("tls_key", key, what))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| {
            err(
                "tls_key",
                key,
                format!("tls_cert and tls_key are not a usable pair: {e}"),
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

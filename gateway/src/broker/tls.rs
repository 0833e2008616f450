//! The broker's TLS listener: rustls on ring (the one crypto provider built), a PEM
//! certificate chain and key from `tls_cert` / `tls_key`.

use std::io::BufReader;
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

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError {
        key,
        path: path.display().to_string(),
        what: format!("cannot read: {e}"),
    })
}

/// The acceptor for `tls_listen`.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let err = |k: &'static str, p: &Path, what: String| TlsError {
        key: k,
        path: p.display().to_string(),
        what,
    };
    let pem = read("tls_cert", cert)?;
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut BufReader::new(pem.as_slice()))
            .collect::<Result<_, _>>()
            .map_err(|e| err("tls_cert", cert, format!("not a PEM certificate file: {e}")))?;
    if chain.is_empty() {
        return Err(err(
            "tls_cert",
            cert,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let pem = read("tls_key", key)?;
    let private: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut BufReader::new(pem.as_slice()))
            .ok()
            .flatten()
            .ok_or_else(|| {
                err(
                    "tls_key",
                    key,
                    "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
                )
            })?;
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

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

/// A TLS error about `[upstream]`'s files as one about the keys under `prefix` (e.g.
/// `sink[0]`, whose files are read the same way).
pub fn error_for(e: &TlsError, prefix: &str) -> String {
    e.to_string()
        .replacen("upstream TLS: ", "TLS: ", 1)
        .replacen("`upstream.", &format!("`{prefix}."), 1)
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

/// The rustls error anywhere in `e`'s chain (an I/O error carries it inside, unseen by
/// `source()`).
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut at = Some(e);
    while let Some(e) = at {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(r) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        at = e.source();
    }
    None
}

/// A name as rustls shows it (`DnsName("a.example")`, `IpAddress(10.0.0.1)`), as a user
/// writes it.
fn plain_name(shown: &str) -> &str {
    match (shown.find('('), shown.rfind(')')) {
        (Some(a), Some(b)) if a < b => shown[a + 1..b].trim_matches('"'),
        _ => shown,
    }
}

fn days(from: u64, to: u64) -> String {
    match to.saturating_sub(from) / 86_400 {
        0 => "less than a day".into(),
        1 => "1 day".into(),
        n => format!("{n} days"),
    }
}

/// What a failed TLS connection means to whoever wrote `[upstream]`: which of the usual
/// causes it is (unknown CA, expired, wrong host name, client certificate wanted or refused)
/// and the key to look at. `None` when `e` is not a TLS error.
pub fn explain(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let why = match rustls_error(e)? {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "unknown CA: the broker's certificate is not signed by a CA in upstream.ca_file (check ca_file)".to_string(),
            C::ExpiredContext { time, not_after } => format!(
                "the broker's certificate expired {} ago (renew it on the broker, or check this machine's clock)",
                days(not_after.as_secs(), time.as_secs())
            ),
            C::Expired => "the broker's certificate has expired (renew it on the broker, or check this machine's clock)".into(),
            C::NotValidYetContext { time, not_before } => format!(
                "the broker's certificate is not valid for another {} (check this machine's clock)",
                days(time.as_secs(), not_before.as_secs())
            ),
            C::NotValidYet => "the broker's certificate is not valid yet (check this machine's clock)".into(),
            C::NotValidForNameContext { expected, presented } => format!(
                "the broker's certificate is not valid for host {}: it names {} (use one of those in upstream.url, or fix the certificate)",
                expected.to_str(),
                presented.iter().map(|p| plain_name(p)).collect::<Vec<_>>().join(", ")
            ),
            C::NotValidForName => "the broker's certificate is not valid for the host in upstream.url".into(),
            other => format!("the broker's certificate was refused: {other} (check upstream.ca_file)"),
        },
        E::AlertReceived(A::CertificateRequired) => {
            "the broker requires a client certificate: set upstream.cert_file and key_file".into()
        }
        E::AlertReceived(
            a @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::AccessDenied),
        ) => format!(
            "the broker refused the client certificate ({a:?}): check upstream.cert_file and key_file, and that the broker trusts the CA that signed them"
        ),
        E::AlertReceived(A::HandshakeFailure) => "the broker refused the handshake (HandshakeFailure): if it requires a client certificate, set upstream.cert_file and key_file; else compare its TLS versions and ciphers".into(),
        other => format!(
            "{other} (check upstream.ca_file, cert_file, key_file and the host in upstream.url)"
        ),
    };
    Some(format!("TLS handshake failed: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::{AlertDescription, CertificateError, Error};

    /// As the TLS stream hands it up: a rustls error inside an I/O error.
    fn io(e: Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    fn said(e: Error) -> String {
        explain(&io(e)).expect("a TLS error is explained")
    }

    #[test]
    fn each_usual_cause_is_told_apart_with_the_key_to_check() {
        let day = |d: u64| UnixTime::since_unix_epoch(std::time::Duration::from_secs(d * 86_400));
        let cases = [
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "unknown CA: the broker's certificate is not signed by a CA in upstream.ca_file",
            ),
            (
                Error::InvalidCertificate(CertificateError::ExpiredContext {
                    time: day(20_010),
                    not_after: day(20_000),
                }),
                "certificate expired 10 days ago",
            ),
            (
                Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                    expected: ServerName::try_from("127.0.0.1").unwrap(),
                    presented: vec![
                        "DnsName(\"elsewhere.invalid\")".into(),
                        "IpAddress(10.0.0.1)".into(),
                    ],
                }),
                "not valid for host 127.0.0.1: it names elsewhere.invalid, 10.0.0.1",
            ),
            (
                Error::AlertReceived(AlertDescription::CertificateRequired),
                "requires a client certificate: set upstream.cert_file and key_file",
            ),
            (
                Error::AlertReceived(AlertDescription::UnknownCA),
                "refused the client certificate (UnknownCA)",
            ),
        ];
        for (e, want) in cases {
            let got = said(e);
            assert!(got.starts_with("TLS handshake failed: "), "{got}");
            assert!(got.contains(want), "{got}\nwants: {want}");
        }
    }

    #[test]
    fn found_inside_a_chain_and_only_there() {
        #[derive(Debug, thiserror::Error)]
        #[error("state: {0}")]
        struct Outer(#[from] std::io::Error);
        let e = Outer(io(Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )));
        assert!(explain(&e).unwrap().contains("unknown CA"));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(explain(&plain), None);
    }
}

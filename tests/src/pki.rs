//! Test certificates, made in the test (rcgen on ring, ECDSA P-256): a CA and what it signs —
//! a server certificate for 127.0.0.1 and localhost, the same expired, one for another host,
//! a client certificate — and a second, unrelated CA. Written as PEM files into a private
//! temp dir; each path is a `String`, ready for a TOML or Mosquitto config.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: String,
    /// Its private key (PEM, PKCS#8).
    pub key: String,
}

/// The test PKI (files live as long as this value).
pub struct Pki {
    /// The CA that signs everything below (PEM certificate; its key stays in memory).
    pub ca: String,
    /// A CA that signed nothing here: trusting it, a client must refuse every server below.
    pub other_ca: String,
    /// A server certificate for IP 127.0.0.1 and DNS localhost, valid now.
    pub server: CertFiles,
    /// The same names, but expired (valid 2020-01-01 to 2021-01-01).
    pub expired: CertFiles,
    /// Valid now, but only for `elsewhere.invalid`.
    pub wrong_host: CertFiles,
    /// A client certificate (CN `gateway`, client auth).
    pub client: CertFiles,
    dir: tempfile::TempDir,
}

struct Issuer {
    cert: Certificate,
    key: KeyPair,
}

fn ca(cn: &str) -> Issuer {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Issuer { cert, key }
}

fn leaf(cn: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names = sans;
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p
}

fn localhost() -> Vec<SanType> {
    vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::DnsName("localhost".try_into().unwrap()),
    ]
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn sign(dir: &Path, name: &str, issuer: &Issuer, p: CertificateParams) -> CertFiles {
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer.cert, &issuer.key).unwrap();
    CertFiles {
        cert: write(dir, &format!("{name}.pem"), &cert.pem()),
        key: write(dir, &format!("{name}.key"), &key.serialize_pem()),
    }
}

impl Pki {
    /// Makes every certificate (a few milliseconds).
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let root = ca("tidepool-test-ca");
        let other = ca("tidepool-other-ca");
        let server = sign(
            d,
            "server",
            &root,
            leaf(
                "127.0.0.1",
                localhost(),
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
        );
        let mut old = leaf(
            "127.0.0.1",
            localhost(),
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        old.not_before = rcgen::date_time_ymd(2020, 1, 1);
        old.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let expired = sign(d, "expired", &root, old);
        let wrong_host = sign(
            d,
            "wrong-host",
            &root,
            leaf(
                "elsewhere.invalid",
                vec![SanType::DnsName("elsewhere.invalid".try_into().unwrap())],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
        );
        let client = sign(
            d,
            "client",
            &root,
            leaf("gateway", Vec::new(), ExtendedKeyUsagePurpose::ClientAuth),
        );
        Pki {
            ca: write(d, "ca.pem", &root.cert.pem()),
            other_ca: write(d, "other-ca.pem", &other.cert.pem()),
            server,
            expired,
            wrong_host,
            client,
            dir,
        }
    }

    /// The folder holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

//! Throwaway certificate authorities for TLS tests: a CA, server certificates for loopback names,
//! and client certificates carrying a SPIFFE ID, DNS name or common name, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// A certificate authority made for one test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// The name a client certificate carries.
pub enum ClientName<'a> {
    SpiffeId(&'a str),
    DnsName(&'a str),
    CommonName(&'a str),
}

/// When a certificate is valid.
#[derive(Clone, Copy)]
pub enum Validity {
    Current,
    Expired,
    /// Valid from an hour ago until this many seconds from now.
    ForSeconds(i64),
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(30);
        let key = KeyPair::generate().expect("a CA key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("a CA certificate"),
        }
    }

    /// Writes the CA certificate to `path`.
    pub fn write_certificate(&self, path: &Path) {
        std::fs::write(path, self.issuer.pem()).expect("write the CA certificate");
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        validity: Validity,
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = match validity {
            Validity::Current => (now - Duration::hours(1), now + Duration::days(7)),
            Validity::Expired => (now - Duration::days(10), now - Duration::days(1)),
            Validity::ForSeconds(seconds) => {
                (now - Duration::hours(1), now + Duration::seconds(seconds))
            }
        };
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("a key");
        let certificate = params
            .signed_by(&key, &self.issuer)
            .expect("sign a certificate");
        (certificate.pem(), key.serialize_pem())
    }

    /// A server certificate for `names` (DNS names or IP addresses), written as
    /// `<stem>.crt` and `<stem>.key` in `directory`; returns both paths.
    pub fn server_certificate(
        &self,
        names: &[&str],
        validity: Validity,
        directory: &Path,
        stem: &str,
    ) -> (PathBuf, PathBuf) {
        let params = CertificateParams::new(
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )
        .expect("server certificate names");
        let (certificate, key) = self.issue(params, validity, ExtendedKeyUsagePurpose::ServerAuth);
        write_pair(directory, stem, &certificate, &key)
    }

    /// A client certificate carrying `name`, written as `<stem>.crt` and `<stem>.key`.
    pub fn client_certificate(
        &self,
        name: ClientName<'_>,
        validity: Validity,
        directory: &Path,
        stem: &str,
    ) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        match name {
            ClientName::SpiffeId(id) => params
                .subject_alt_names
                .push(SanType::URI(id.try_into().expect("a SPIFFE ID"))),
            ClientName::DnsName(dns) => params
                .subject_alt_names
                .push(SanType::DnsName(dns.try_into().expect("a DNS name"))),
            ClientName::CommonName(common) => {
                params.distinguished_name.push(DnType::CommonName, common)
            }
        }
        let (certificate, key) = self.issue(params, validity, ExtendedKeyUsagePurpose::ClientAuth);
        write_pair(directory, stem, &certificate, &key)
    }
}

fn write_pair(directory: &Path, stem: &str, certificate: &str, key: &str) -> (PathBuf, PathBuf) {
    let certificate_path = directory.join(format!("{stem}.crt"));
    let key_path = directory.join(format!("{stem}.key"));
    std::fs::write(&certificate_path, certificate).expect("write a certificate");
    std::fs::write(&key_path, key).expect("write a key");
    (certificate_path, key_path)
}

//! Mutual TLS 1.3 for the ring: who may talk to whom.
//!
//! Every member of an epoch holds a certificate signed by the run's CA whose subject alternative
//! name is its member name (a DNS-style label such as `worker-3f2a` or `rank-0`). A connection is
//! accepted only when the peer's chain verifies against that CA **and** the end-entity certificate
//! names a member of the current epoch; the dialer additionally checks that the server is the
//! very member it meant to reach. Anything else fails the handshake with a TLS alert, and the
//! refusal is reported with its reason.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use thiserror::Error;

/// ALPN of the ring protocol; a peer speaking anything else is refused.
pub const ALPN: &[u8] = b"longhaul-ring/1";

/// Problems with certificates, keys or names.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("invalid member name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("could not read {what}: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("could not read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("CA certificate is not usable as a trust anchor: {0}")]
    BadCa(String),
}

/// A member's certificate chain and private key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("chain_len", &self.chain.len()).finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl Identity {
    /// Reads a PEM certificate chain and a PEM private key.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem { what: "certificate chain", reason: e.to_string() })?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                what: "certificate chain",
                reason: "no certificate".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TlsError::Pem { what: "private key", reason: e.to_string() })?;
        Ok(Self { chain, key })
    }

    /// Reads `cert.pem` and `key.pem` from `dir/name/`.
    pub fn load(dir: &Path, name: &str) -> Result<Self, TlsError> {
        let chain = read(&dir.join(name).join("cert.pem"))?;
        let key = read(&dir.join(name).join("key.pem"))?;
        Self::from_pem(&chain, &key)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io { path: path.display().to_string(), source })
}

/// The run's certificate authority, as trusted by the ring.
#[derive(Clone, Debug)]
pub struct TrustAnchor {
    pub ca: CertificateDer<'static>,
}

impl TrustAnchor {
    pub fn from_pem(pem: &[u8]) -> Result<Self, TlsError> {
        let ca = CertificateDer::from_pem_slice(pem)
            .map_err(|e| TlsError::Pem { what: "CA certificate", reason: e.to_string() })?;
        Ok(Self { ca })
    }

    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        Self::from_pem(&read(&dir.join("ca.pem"))?)
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(|e| TlsError::BadCa(e.to_string()))?;
        Ok(Arc::new(roots))
    }
}

/// Checks that `name` can be a member name (it is used as a DNS name in certificates).
pub fn check_member_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    let bad = |reason: &str| TlsError::BadName { name: name.to_owned(), reason: reason.to_owned() };
    if name.is_empty() || name.len() > 63 {
        return Err(bad("must be 1 to 63 characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') || name.starts_with('-') {
        return Err(bad("only letters, digits and '-' (not first) are allowed"));
    }
    ServerName::try_from(name.to_owned()).map_err(|e| bad(&e.to_string()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which member, of `members`, the end-entity certificate `cert` names (its chain already
/// verified).
pub fn member_named_by(cert: &CertificateDer<'_>, members: &[String]) -> Option<usize> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    members.iter().position(|m| {
        ServerName::try_from(m.as_str())
            .map(|n| ee.verify_is_valid_for_subject_name(&n).is_ok())
            .unwrap_or(false)
    })
}

/// Accepts a client only if its chain verifies against the CA and it names an allowed member.
#[derive(Debug)]
struct MemberVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    members: Vec<String>,
}

impl ClientCertVerifier for MemberVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if member_named_by(end_entity, &self.members).is_none() {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                rustls::OtherError(Arc::new(NotAMember(self.members.clone()))),
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Error)]
#[error("certificate names no member of this epoch (members: {})", .0.join(", "))]
struct NotAMember(Vec<String>);

// rustls shows the `Debug` form of custom errors in its alerts and messages: make it readable.
impl fmt::Debug for NotAMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// TLS server configuration for a ring endpoint: TLS 1.3 only, client certificates required and
/// restricted to `members`.
pub fn server_config(
    anchor: &TrustAnchor,
    identity: &Identity,
    members: &[String],
) -> Result<rustls::ServerConfig, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(anchor.roots()?, provider())
        .build()
        .map_err(|e| TlsError::BadCa(e.to_string()))?;
    let verifier = Arc::new(MemberVerifier { inner, members: members.to_vec() });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// TLS client configuration for a ring endpoint: TLS 1.3 only, servers verified against the CA
/// (the server name given at connect time must be named by its certificate), and this member's
/// certificate presented.
pub fn client_config(
    anchor: &TrustAnchor,
    identity: &Identity,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(anchor.roots()?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// A throwaway certificate authority for tests, benchmarks and local demos. A real run's CA
/// lives in the coordinator.
pub struct DevCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca: CertificateDer<'static>,
    ca_pem: String,
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

impl DevCa {
    pub fn new(common_name: &str) -> Result<Self, TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.key_usages =
            vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            ca: cert.der().clone(),
            ca_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    pub fn anchor(&self) -> TrustAnchor {
        TrustAnchor { ca: self.ca.clone() }
    }

    /// Issues a certificate naming `member`.
    pub fn issue(&self, member: &str) -> Result<Identity, TlsError> {
        let (chain_pem, key_pem) = self.issue_pem(member)?;
        Identity::from_pem(chain_pem.as_bytes(), key_pem.as_bytes())
    }

    /// Issues a certificate naming `member`, as (certificate PEM, key PEM).
    pub fn issue_pem(&self, member: &str) -> Result<(String, String), TlsError> {
        check_member_name(member)?;
        let mut params = rcgen::CertificateParams::new(vec![member.to_owned()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, member);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes `ca.pem` and `NAME/{cert,key}.pem` for every member into `dir`, the layout that
    /// [`TrustAnchor::load`] and [`Identity::load`] read.
    pub fn write_dir(&self, dir: &Path, members: &[String]) -> Result<(), TlsError> {
        let write = |path: &Path, data: &[u8]| {
            std::fs::write(path, data)
                .map_err(|source| TlsError::Io { path: path.display().to_string(), source })
        };
        let mkdir = |path: &Path| {
            std::fs::create_dir_all(path)
                .map_err(|source| TlsError::Io { path: path.display().to_string(), source })
        };
        mkdir(dir)?;
        write(&dir.join("ca.pem"), self.ca_pem.as_bytes())?;
        for m in members {
            let (cert, key) = self.issue_pem(m)?;
            mkdir(&dir.join(m))?;
            write(&dir.join(m).join("cert.pem"), cert.as_bytes())?;
            write(&dir.join(m).join("key.pem"), key.as_bytes())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_are_checked() {
        assert!(check_member_name("rank-0").is_ok());
        assert!(check_member_name("worker-3f2a9").is_ok());
        for bad in ["", "-x", "a b", "a.b", "x/y", &"a".repeat(64)] {
            assert!(check_member_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn issued_certificates_name_their_member() {
        let ca = DevCa::new("test").unwrap();
        let id = ca.issue("rank-1").unwrap();
        let members = vec!["rank-0".to_owned(), "rank-1".to_owned()];
        assert_eq!(member_named_by(&id.chain[0], &members), Some(1));
        assert_eq!(member_named_by(&id.chain[0], &members[..1]), None);
    }

    #[test]
    fn pki_round_trips_through_files() {
        let dir = std::env::temp_dir().join(format!("lh-pki-{}", std::process::id()));
        let ca = DevCa::new("test").unwrap();
        ca.write_dir(&dir, &["rank-0".to_owned()]).unwrap();
        let anchor = TrustAnchor::load(&dir).unwrap();
        let id = Identity::load(&dir, "rank-0").unwrap();
        assert_eq!(anchor.ca, ca.anchor().ca);
        assert!(server_config(&anchor, &id, &["rank-0".to_owned()]).is_ok());
        let err = Identity::load(&dir, "rank-9").unwrap_err();
        assert!(err.to_string().contains("rank-9"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_pem_is_a_clear_error() {
        let err = Identity::from_pem(b"not a pem", b"nope").unwrap_err();
        assert!(err.to_string().contains("certificate chain"), "{err}");
    }
}

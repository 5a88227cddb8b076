//! The coordinator's certificate authority and credentials.
//!
//! On first start the coordinator creates, in its state directory: a CA (`ca.pem`, `ca.key`),
//! an admin credential (`admin.token`, readable by the owner only), and at every start a fresh
//! server certificate for the names it serves under. Workers pin the CA by the SHA-256 of its
//! DER encoding (`sha256:<hex>`, printed by `longhaul ca-hash`) and receive a certificate for
//! their member name (`worker-<id>`, client and server auth: it serves both gRPC and the QUIC
//! ring). Join tokens are random, expire, and only their SHA-256 is stored.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use client::pki::{ca_hash, hex};
use hmac::{Hmac, Mac};
use rand::RngCore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The prefix of dashboard viewer tokens ([`Pki::viewer_token`]).
pub const VIEWER_PREFIX: &str = "lh_view_";

/// How long a worker certificate is valid. Workers rejoin (with a token) to renew.
pub const WORKER_CERT_DAYS: i64 = 30;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

#[derive(Debug, Error)]
pub enum SignError {
    #[error(
        "the certificate signing request is not valid PEM PKCS#10 or its signature is wrong: {0}"
    )]
    BadCsr(rcgen::Error),
    #[error("signing failed: {0}")]
    Sign(rcgen::Error),
}

/// The CA with its key, the server identity and the admin credential.
pub struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub server_chain: Vec<CertificateDer<'static>>,
    pub server_key: PrivateKeyDer<'static>,
    admin_hash: [u8; 32],
    /// The key of lease grants (see [`Pki::lease_grant`]), derived from the CA's key so that it
    /// survives restarts and needs no file of its own.
    grant_key: [u8; 32],
    /// The CA's key (PKCS#8), which signs ledgers.
    ca_key: Vec<u8>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("ca", &ca_hash(&self.ca_der)).finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_owned(), source }
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let tmp = path.with_extension("tmp");
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// What a lease gave whom: what its grant binds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub run: u64,
    pub worker: u64,
    pub lease: u64,
    pub shard: u32,
    pub data_epoch: u64,
}

/// SHA-256 of a secret, for storage and comparison.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// A fresh random secret with a recognisable prefix (`lh_join_…`, `lh_admin_…`).
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex(&bytes))
}

/// Compares two secrets or hashes in constant time (in their contents; a length mismatch is
/// not equal).
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the CA certificate of a state directory, for `longhaul ca-hash`.
pub fn read_ca_der(dir: &Path) -> Result<CertificateDer<'static>, PkiError> {
    let path = dir.join("ca.pem");
    let pem = fs::read(&path).map_err(io(&path))?;
    CertificateDer::from_pem_slice(&pem)
        .map_err(|e| PkiError::Corrupt { path, reason: e.to_string() })
}

impl Pki {
    /// Opens the PKI in `dir`, creating the CA and the admin credential on first use, and
    /// issues a server certificate for `server_names` (DNS names or IP addresses).
    pub fn open_or_create(dir: &Path, server_names: &[String]) -> Result<Self, PkiError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let (ca_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        if !ca_path.exists() {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, "longhaul coordinator CA");
            params.key_usages =
                vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
            params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
            params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
            let key = rcgen::KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            fs::write(&ca_path, cert.pem()).map_err(io(&ca_path))?;
        }
        let ca_pem = fs::read_to_string(&ca_path).map_err(io(&ca_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let corrupt = |path: &Path, e: &dyn std::fmt::Display| PkiError::Corrupt {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| corrupt(&key_path, &e))?;
        let ca_key = key.serialize_der();
        let issuer =
            rcgen::Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| corrupt(&ca_path, &e))?;
        let ca_der =
            CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| corrupt(&ca_path, &e))?;

        let admin_path = dir.join("admin.token");
        if !admin_path.exists() {
            write_private(&admin_path, new_secret("lh_admin_").as_bytes())?;
        }
        let admin = fs::read_to_string(&admin_path).map_err(io(&admin_path))?;
        let admin_hash = secret_hash(admin.trim());

        // A fresh server certificate at every start.
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        for name in server_names {
            params.subject_alt_names.push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => rcgen::SanType::IpAddress(ip),
                Err(_) => rcgen::SanType::DnsName(
                    name.clone().try_into().map_err(|e| corrupt(Path::new(name), &e))?,
                ),
            });
        }
        params.distinguished_name.push(rcgen::DnType::CommonName, "longhaul coordinator");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
        let server_key = rcgen::KeyPair::generate()?;
        let server_cert = params.signed_by(&server_key, &issuer)?;
        let server_chain = vec![server_cert.der().clone(), ca_der.clone()];
        let server_key = PrivateKeyDer::try_from(server_key.serialize_der())
            .map_err(|e| corrupt(&key_path, &e))?;
        let grant_key = {
            let mut h = Sha256::new();
            h.update(b"longhaul lease grant key v1\0");
            h.update(key_pem.as_bytes());
            h.finalize().into()
        };
        Ok(Self { ca_pem, ca_der, issuer, server_chain, server_key, admin_hash, grant_key, ca_key })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    pub fn ca_hash(&self) -> String {
        ca_hash(&self.ca_der)
    }

    /// Whether `token` is the admin credential.
    pub fn is_admin(&self, token: &str) -> bool {
        hashes_equal(&secret_hash(token), &self.admin_hash)
    }

    /// The signature line of a ledger whose body is `body` (see `ledger`), under the CA's key
    /// (an error if that key is not ECDSA P-256, the kind this coordinator generates).
    pub fn sign_ledger(&self, body: &[u8]) -> Result<String, String> {
        use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &self.ca_key, &rng)
            .map_err(|e| format!("the CA key cannot sign ledgers (not ECDSA P-256?): {e}"))?;
        let sig = key.sign(&rng, body).map_err(|e| format!("signing the ledger: {e}"))?;
        Ok(crate::ledger::signature_line(&self.ca_der, sig.as_ref()))
    }

    /// The key of audit draws (see `cluster::audits`): secret like the grant key, and the same
    /// after a restart.
    pub fn audit_key(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"longhaul audit key v1\0");
        h.update(self.grant_key);
        h.finalize().into()
    }

    /// The grant of a lease: a MAC, under a key only the coordinator holds, over what the lease
    /// gave whom (32 hex digits). A worker echoes it in the data spans it commits to, so the
    /// coordinator checks that it leased that shard to that worker without keeping every lease
    /// it ever granted, across restarts.
    pub fn lease_grant(&self, g: &Grant) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.grant_key).expect("HMAC takes any key length");
        mac.update(b"longhaul lease grant v1\0");
        for v in [g.run, g.worker, g.lease, u64::from(g.shard), g.data_epoch] {
            mac.update(&v.to_le_bytes());
        }
        hex(&mac.finalize().into_bytes()[..16])
    }

    /// A read-only dashboard credential valid until `expires_ms` (Unix ms):
    /// `lh_view_<expires_ms>_<MAC>`, the MAC under a key derived from the grant key. Stateless:
    /// nothing is stored, and it cannot be revoked before it expires (keep lifetimes short).
    pub fn viewer_token(&self, expires_ms: u64) -> String {
        format!("{VIEWER_PREFIX}{expires_ms}_{}", self.viewer_mac(expires_ms))
    }

    /// When `token` expires (Unix ms), if it is a viewer token this coordinator issued that has
    /// not expired at `now_ms` (the MAC compared in constant time); `None` otherwise.
    pub fn viewer_expiry(&self, token: &str, now_ms: u64) -> Option<u64> {
        let (expires, mac) = token.strip_prefix(VIEWER_PREFIX)?.split_once('_')?;
        // Digits only, no leading zero: `u64::from_str` would also take a leading '+' or '0', a
        // second spelling of the same expiry.
        if expires.is_empty()
            || expires.len() > 20
            || !expires.bytes().all(|b| b.is_ascii_digit())
            || (expires.len() > 1 && expires.starts_with('0'))
        {
            return None;
        }
        let expires = expires.parse::<u64>().ok()?;
        (hashes_equal(self.viewer_mac(expires).as_bytes(), mac.as_bytes()) && now_ms < expires)
            .then_some(expires)
    }

    fn viewer_mac(&self, expires_ms: u64) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.grant_key).expect("HMAC takes any key length");
        mac.update(b"longhaul viewer token v1\0");
        mac.update(&expires_ms.to_le_bytes());
        hex(&mac.finalize().into_bytes())
    }

    /// Whether `grant` is the grant of `g` (in constant time).
    pub fn check_grant(&self, g: &Grant, grant: &str) -> bool {
        hashes_equal(self.lease_grant(g).as_bytes(), grant.as_bytes())
    }

    /// Signs a worker's CSR for `member` (its public key is kept; every other field is ours:
    /// not a CA, digital signatures only, a random serial).
    pub fn sign_worker(&self, csr_pem: &str, member: &str) -> Result<String, SignError> {
        let mut csr =
            rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(SignError::BadCsr)?;
        let mut params =
            rcgen::CertificateParams::new(vec![member.to_owned()]).map_err(SignError::Sign)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, member);
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let mut serial = [0u8; 16];
        rand::rng().fill_bytes(&mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(WORKER_CERT_DAYS);
        csr.params = params;
        let cert = csr.signed_by(&self.issuer).map_err(SignError::Sign)?;
        Ok(cert.pem())
    }
}

/// The identity of the key a CSR carries: SHA-256 of its SubjectPublicKeyInfo, hex. A worker is
/// its key: `Join` with the same key is the same worker, and bans apply to it.
pub fn csr_key_id(csr_pem: &str) -> Result<String, SignError> {
    use rcgen::PublicKeyData;
    let csr =
        rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(SignError::BadCsr)?;
    Ok(hex(&Sha256::digest(csr.public_key.subject_public_key_info())))
}

//! What a client needs of X.509: a key pair and its signing request, a certificate's validity,
//! the CA pin.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("key or CSR generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("unreadable certificate: {0}")]
    BadCert(String),
}

/// `sha256:<hex>` of a certificate's DER encoding: the CA pin.
pub fn ca_hash(der: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(der)))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// 64 lower-case hex digits (as [`hex`] writes 32 bytes) back to the bytes; `None` for anything
/// else.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    unhex(s)?.try_into().ok()
}

/// Lower-case hex (as [`hex`] writes it) back to the bytes; `None` for anything else (an odd
/// length, upper case, other characters).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    b.chunks_exact(2).map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?)).collect()
}

/// A fresh key pair and a CSR for it, PEM: `(csr, key)`.
pub fn new_csr() -> Result<(String, String), PkiError> {
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// A CSR for an existing key (a worker renewing its certificate keeps its key, its identity).
pub fn csr_for_key(key_pem: &str) -> Result<String, PkiError> {
    let key = rcgen::KeyPair::from_pem(key_pem)?;
    let params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    Ok(params.serialize_request(&key)?.pem()?)
}

/// A certificate's remaining and total validity.
pub fn cert_validity(
    cert_pem: &str,
) -> Result<(std::time::Duration, std::time::Duration), PkiError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| PkiError::BadCert(e.to_string()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::BadCert(e.to_string()))?;
    let v = cert.validity();
    let (from, until) = (v.not_before.timestamp(), v.not_after.timestamp());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let secs = |s: i64| std::time::Duration::from_secs(s.max(0) as u64);
    Ok((secs(until - now), secs(until - from)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn a_renewal_csr_carries_the_same_key() {
        let (_, key) = new_csr().unwrap();
        let again = csr_for_key(&key).unwrap();
        let a = rcgen::CertificateSigningRequestParams::from_pem(&again).unwrap();
        let k = rcgen::KeyPair::from_pem(&key).unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(a.public_key.subject_public_key_info(), k.subject_public_key_info());
    }

    #[test]
    fn garbage_is_an_unreadable_certificate() {
        assert!(matches!(cert_validity("not a certificate"), Err(PkiError::BadCert(_))));
    }
}

//! ES256 keys: P-256 in PEM (SPKI public keys, PKCS#8 private keys), signing
//! and verification in the JWS fixed-width `r || s` form. Only ES256 exists here.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};

/// DER prefix of a SubjectPublicKeyInfo for an uncompressed P-256 point:
/// SEQ { SEQ { id-ecPublicKey, prime256v1 }, BIT STRING { 0x00, <65-byte point> } }.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
    0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const P256_POINT_LEN: usize = 65;
/// Fixed-width JWS ES256 signature: 32-byte r then 32-byte s.
pub const ES256_SIGNATURE_LEN: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a PEM document with label {0}")]
    NotPem(&'static str),
    #[error("PEM body is not valid base64")]
    BadBase64,
    #[error("not a P-256 public key (only ES256 keys are accepted)")]
    NotP256Public,
    #[error("not a PKCS#8 P-256 private key (only ES256 keys are accepted; convert with `openssl pkcs8 -topk8 -nocrypt`)")]
    NotP256Private,
    #[error("signing failed")]
    SigningFailed,
}

/// A trusted ES256 verification key.
#[derive(Clone)]
pub struct PublicKey {
    point: [u8; P256_POINT_LEN],
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey(P-256 {})", crate::trust::hex(&self.point[1..9]))
    }
}

impl PublicKey {
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let der = pem_decode(pem, "PUBLIC KEY")?;
        Self::from_spki_der(&der)
    }

    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        if der.len() != P256_SPKI_PREFIX.len() + P256_POINT_LEN || !der.starts_with(&P256_SPKI_PREFIX) {
            return Err(KeyError::NotP256Public);
        }
        let mut point = [0u8; P256_POINT_LEN];
        point.copy_from_slice(&der[P256_SPKI_PREFIX.len()..]);
        if point[0] != 0x04 {
            return Err(KeyError::NotP256Public);
        }
        Ok(Self { point })
    }

    pub fn to_pem(&self) -> String {
        let mut der = P256_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.point);
        pem_encode(&der, "PUBLIC KEY")
    }

    /// Verifies a fixed-width `r || s` signature over `message`. Any other
    /// length (a DER signature, say) is simply invalid.
    pub fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        if sig.len() != ES256_SIGNATURE_LEN {
            return false;
        }
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.point[..])
            .verify(message, sig)
            .is_ok()
    }
}

/// An ES256 private key. Its Debug output never shows key material.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    pub fn generate() -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| KeyError::SigningFailed)?;
        Self::from_pkcs8_der(doc.as_ref())
    }

    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let der = pem_decode(pem, "PRIVATE KEY")?;
        Self::from_pkcs8_der(&der)
    }

    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|_| KeyError::NotP256Private)?;
        Ok(Self { pair, pkcs8: der.to_vec() })
    }

    pub fn to_pem(&self) -> String {
        pem_encode(&self.pkcs8, "PRIVATE KEY")
    }

    pub fn public_key(&self) -> PublicKey {
        let mut point = [0u8; P256_POINT_LEN];
        point.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey { point }
    }

    /// Signs `message`, returning the 64-byte `r || s` form.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        self.pair.sign(&rng, message).map(|s| s.as_ref().to_vec()).map_err(|_| KeyError::SigningFailed)
    }
}

impl Drop for SigningKey {
    fn drop(&mut self) {
        // Best effort: do not leave the PKCS#8 copy lying in freed memory.
        self.pkcs8.iter_mut().for_each(|b| *b = 0);
    }
}

pub fn pem_encode(der: &[u8], label: &str) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub fn pem_decode(pem: &str, label: &'static str) -> Result<Vec<u8>, KeyError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin).ok_or(KeyError::NotPem(label))? + begin.len();
    let stop = pem[start..].find(&end).ok_or(KeyError::NotPem(label))? + start;
    let body: String = pem[start..stop].chars().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD.decode(body).map_err(|_| KeyError::BadBase64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_roundtrip_through_pem() {
        let key = SigningKey::generate().unwrap();
        let key2 = SigningKey::from_pem(&key.to_pem()).unwrap();
        let public = PublicKey::from_pem(&key.public_key().to_pem()).unwrap();
        let sig = key2.sign(b"hello").unwrap();
        assert_eq!(sig.len(), ES256_SIGNATURE_LEN);
        assert!(public.verify(b"hello", &sig));
        assert!(!public.verify(b"hellO", &sig));
    }

    #[test]
    fn rejects_wrong_labels_and_junk() {
        let key = SigningKey::generate().unwrap();
        assert_eq!(PublicKey::from_pem(&key.to_pem()).unwrap_err(), KeyError::NotPem("PUBLIC KEY"));
        assert!(SigningKey::from_pem(&key.public_key().to_pem()).is_err());
        let junk = pem_encode(&[1, 2, 3], "PUBLIC KEY");
        assert_eq!(PublicKey::from_pem(&junk).unwrap_err(), KeyError::NotP256Public);
    }

    #[test]
    fn debug_output_hides_private_key() {
        let key = SigningKey::generate().unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.to_pem()[30..60]));
        assert!(shown.contains("redacted"));
    }
}

//! ES256 keys: P-256 in PEM (SPKI public keys; PKCS#8 or SEC1 private
//! keys), signing and verification in the JWS fixed-width `r || s` form.
//! Only ES256 exists here, and only low-S signatures: (r, s) and (r, n - s)
//! both satisfy ECDSA, so accepting both would give one signature two
//! encodings; we make and accept the one with s <= n/2.

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
/// P-256's group order n, big-endian.
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xbc,
    0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];
/// floor(n / 2): the largest `s` of a low-S signature.
const P256_HALF_ORDER: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xde,
    0x73, 0x7d, 0x56, 0xd3, 0x8b, 0xcf, 0x42, 0x79, 0xdc, 0xe5, 0x61, 0x7e, 0x31, 0x92, 0xa8,
];

/// Whether the 32-byte big-endian `s` is at most n/2 (equal-length byte
/// strings compare as the numbers they encode).
pub fn is_low_s(s: &[u8]) -> bool {
    s.len() == 32 && s <= &P256_HALF_ORDER[..]
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a PEM document with label {0}")]
    NotPem(&'static str),
    #[error("PEM body is not valid base64")]
    BadBase64,
    #[error("not a P-256 public key (only ES256 keys are accepted)")]
    NotP256Public,
    #[error("not a P-256 private key in PKCS#8 (`BEGIN PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`) PEM; only ES256 keys are accepted")]
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
        if sig.len() != ES256_SIGNATURE_LEN || !is_low_s(&sig[32..]) {
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

    /// A PKCS#8 (`BEGIN PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`, as
    /// `openssl ecparam -genkey` writes) P-256 key.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        Self::from_pkcs8_der(&private_key_pkcs8_der(pem)?)
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

    /// Signs `message`, returning the 64-byte `r || s` form with a low `s`
    /// (ring may return either twin; n - s is the other).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        let mut sig = self
            .pair
            .sign(&rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| KeyError::SigningFailed)?;
        if sig.len() != ES256_SIGNATURE_LEN {
            return Err(KeyError::SigningFailed);
        }
        if !is_low_s(&sig[32..]) {
            let high: [u8; 32] = sig[32..].try_into().map_err(|_| KeyError::SigningFailed)?;
            sig[32..].copy_from_slice(&order_minus(&high));
        }
        Ok(sig)
    }
}

impl Drop for SigningKey {
    fn drop(&mut self) {
        // Best effort: do not leave the PKCS#8 copy lying in freed memory.
        self.pkcs8.iter_mut().for_each(|b| *b = 0);
    }
}

/// n - s, for 0 < s < n (big-endian, 32 bytes).
fn order_minus(s: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut borrow = 0u16;
    for i in (0..32).rev() {
        let subtrahend = u16::from(s[i]) + borrow;
        let minuend = u16::from(P256_ORDER[i]);
        if minuend >= subtrahend {
            out[i] = (minuend - subtrahend) as u8;
            borrow = 0;
        } else {
            out[i] = (minuend + 256 - subtrahend) as u8;
            borrow = 1;
        }
    }
    out
}

/// DER of AlgorithmIdentifier { id-ecPublicKey, prime256v1 }.
const P256_ALGORITHM_ID: [u8; 21] = [
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07,
];
/// DER of the prime256v1 OID, as SEC1's `[0] parameters` carries it.
const P256_CURVE_OID: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The PKCS#8 DER of a private key PEM, PKCS#8 or SEC1.
fn private_key_pkcs8_der(pem: &str) -> Result<Vec<u8>, KeyError> {
    match pem_decode(pem, "PRIVATE KEY") {
        Ok(der) => Ok(der),
        Err(KeyError::NotPem(_)) => pkcs8_from_sec1(&pem_decode(pem, "EC PRIVATE KEY")?),
        Err(e) => Err(e),
    }
}

/// A private key PEM as PKCS#8 PEM (what ring and rcgen read), from
/// PKCS#8 or SEC1.
pub fn private_key_pem_as_pkcs8(pem: &str) -> Result<String, KeyError> {
    let der = private_key_pkcs8_der(pem)?;
    // Checked here, so a caller gets this module's named error, not a parser's.
    SigningKey::from_pkcs8_der(&der)?;
    Ok(pem_encode(&der, "PRIVATE KEY"))
}

/// Wraps a SEC1 `ECPrivateKey` (RFC 5915) for P-256 as PKCS#8 (RFC 5958):
/// SEQUENCE { INTEGER 0, AlgorithmIdentifier, OCTET STRING { ECPrivateKey } }.
/// A key naming another curve is refused; ring checks the rest.
fn pkcs8_from_sec1(sec1: &[u8]) -> Result<Vec<u8>, KeyError> {
    let (tag, mut body, rest) = crate::der::tlv(sec1).ok_or(KeyError::NotP256Private)?;
    if tag != 0x30 || !rest.is_empty() {
        return Err(KeyError::NotP256Private);
    }
    // version 1, privateKey, then optional [0] parameters and [1] publicKey.
    for _ in 0..2 {
        body = crate::der::tlv(body).ok_or(KeyError::NotP256Private)?.2;
    }
    while let Some((tag, content, rest)) = crate::der::tlv(body) {
        if tag == 0xa0 && content != P256_CURVE_OID {
            return Err(KeyError::NotP256Private);
        }
        body = rest;
    }
    let mut inner = vec![0x02, 0x01, 0x00];
    inner.extend_from_slice(&P256_ALGORITHM_ID);
    inner.extend(der_wrap(0x04, sec1));
    Ok(der_wrap(0x30, &inner))
}

/// A DER TLV of `tag` around `content` (lengths up to 64 KiB).
fn der_wrap(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match content.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n < 0x100 => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(content);
    out
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

    /// What `openssl ecparam -genkey -name prime256v1 -noout` writes (SEC1).
    const SEC1_P256: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIE1VaTiATDWKUy/WH+iT7aOoc0NS5OgKJEbt9jvlxwAzoAoGCCqGSM49
AwEHoUQDQgAEqAzFrtHlY6pKt8UeG3CPltwEBp7YjatsnwJrKgSxb6piOLIwMgTI
NLVV+CMdK6SWJ+7Y6u0cVjOvsPL8vWRdlg==
-----END EC PRIVATE KEY-----
";
    /// Its public key, from `openssl ec -pubout`.
    const SEC1_P256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqAzFrtHlY6pKt8UeG3CPltwEBp7Y
jatsnwJrKgSxb6piOLIwMgTINLVV+CMdK6SWJ+7Y6u0cVjOvsPL8vWRdlg==
-----END PUBLIC KEY-----
";
    /// A P-384 key in SEC1: not ES256, refused.
    const SEC1_P384: &str = "-----BEGIN EC PRIVATE KEY-----
MIGkAgEBBDBemnEN20xOjTOqcinJIKShV7Z8hoPNAjlkrNUcgUDCfZWhuGc6JyyZ
Yi77Gcto6JCgBwYFK4EEACKhZANiAATORmFnI06apVCY+cm7x9RyaVJM/hvU5k99
NofNKeTPzxxKeUG3M5sksZMMtRxcLe6Ny2NAEuINc3KfF4BJ+KLhBo4+KscRocKo
6PYhF5rLxXF2Goa3/r39lHqT0dYm9kw=
-----END EC PRIVATE KEY-----
";

    #[test]
    fn a_sec1_key_as_openssl_ecparam_writes_it_signs_like_its_pkcs8_form() {
        let key = SigningKey::from_pem(SEC1_P256).expect("SEC1 P-256");
        let public = PublicKey::from_pem(SEC1_P256_PUBLIC).unwrap();
        assert_eq!(key.public_key().to_pem(), public.to_pem());
        assert!(public.verify(b"m", &key.sign(b"m").unwrap()));
        // Its PKCS#8 form is what rcgen and `to_pem` take.
        let pkcs8 = private_key_pem_as_pkcs8(SEC1_P256).unwrap();
        assert!(pkcs8.starts_with("-----BEGIN PRIVATE KEY-----"), "{}", &pkcs8[..30]);
        assert_eq!(SigningKey::from_pem(&pkcs8).unwrap().public_key().to_pem(), public.to_pem());
        assert_eq!(private_key_pem_as_pkcs8(&pkcs8).unwrap(), pkcs8, "PKCS#8 passes through");
        assert_eq!(SigningKey::from_pem(SEC1_P384).unwrap_err(), KeyError::NotP256Private);
        let junk = pem_encode(&[0x30, 0x03, 0x02, 0x01, 0x01], "EC PRIVATE KEY");
        assert_eq!(SigningKey::from_pem(&junk).unwrap_err(), KeyError::NotP256Private);
    }
}

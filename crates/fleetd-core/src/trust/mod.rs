//! The co-signed update message (`update-message-v1.md`): parse, verify
//! against the device's policy, and sign.
//!
//! Architecture invariant: nothing outside this module decides whether a
//! message is trusted, and nothing in it performs IO — callers pass the clock,
//! the stored state and the keys in.

mod claims;
mod envelope;
pub mod halt;
pub mod keys;
mod verify;

pub use claims::{check_url, valid_jti, valid_sha256};
pub use claims::{
    Claims, Encoding, Image, IndexRef, Rollout, Target, Wave, CLAIMS_TYPE, MAX_INDEX_BYTES, MAX_SPREAD_S,
    SUPPORTED_FEATURES,
};
pub use envelope::{Envelope, Signature, MAX_MESSAGE_BYTES};
pub use keys::{KeyError, PublicKey, SigningKey};
pub use verify::{
    check_validity_window, check_window, verify_signatures, Policy, TrustState, Verified, Window,
    DEFAULT_MAX_VALIDITY_S,
};

crate::error_name::named_error! {
    /// Why a message was refused. `name()` is the stable name from the wire-format
    /// document; it reaches the log, the status report and the CLI unchanged.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[non_exhaustive]
    pub enum VerifyError {
        #[name = "message-too-large"]
        #[error("{name}: more than {limit} bytes")]
        TooLarge { limit: usize },
        #[name = "malformed"]
        #[error("{name}: {0}")]
        Malformed(String),
        #[name = "alg-rejected"]
        #[error("{name}: {0:?} (only ES256 is accepted)")]
        AlgRejected(String),
        #[name = "header-rejected"]
        #[error("{name}: {0}")]
        HeaderRejected(String),
        #[name = "kid-unknown"]
        #[error("{name}: {0:?}")]
        KidUnknown(String),
        #[name = "kid-duplicate"]
        #[error("{name}: {0:?} signs twice")]
        KidDuplicate(String),
        #[name = "signature-missing"]
        #[error("{name}: no signature by required key {0:?}")]
        SignatureMissing(String),
        #[name = "signature-invalid"]
        #[error("{name}: signature by {0:?} does not verify")]
        SignatureInvalid(String),
        #[name = "wrong-type"]
        #[error("{name}: typ is {0:?}, expected \"fleetd.update.v1\"")]
        WrongType(String),
        #[name = "expired"]
        #[error("{name}: exp {exp} + leeway is not after now {now}")]
        Expired { exp: u64, now: u64 },
        #[name = "not-yet-valid"]
        #[error("{name}: nbf {nbf} - leeway is after now {now}")]
        NotYetValid { nbf: u64, now: u64 },
        #[name = "iat-invalid"]
        #[error("{name}: iat {iat} is {why}")]
        IatInvalid { iat: u64, why: String },
        #[name = "validity-too-long"]
        #[error("{name}: {seconds} s between nbf and exp, at most {max} s allowed")]
        ValidityTooLong { seconds: u64, max: u64 },
        #[name = "replayed"]
        #[error("{name}: jti {0:?} was already accepted")]
        Replayed(String),
        #[name = "version-not-newer"]
        #[error("{name}: version {offered} is not greater than installed {installed}")]
        VersionNotNewer { offered: u64, installed: u64 },
        #[name = "wrong-project"]
        #[error("{name}: message is for {got:?}, device is in {want:?}")]
        WrongProject { got: String, want: String },
        #[name = "wrong-hardware"]
        #[error("{name}: message is for {got:?}, device is {want:?}")]
        WrongHardware { got: String, want: String },
        #[name = "requires-unsupported"]
        #[error("{name}: the message requires {0:?}, which this fleetd does not implement")]
        RequiresUnsupported(String),
        #[name = "not-targeted"]
        #[error("{name}: device {0:?} and its groups are not among the targets")]
        NotTargeted(String),
        #[name = "image-too-large"]
        #[error("{name}: {size} bytes does not fit the {slot} bytes of the smallest slot")]
        ImageTooLarge { size: u64, slot: u64 },
        #[name = "url-scheme-rejected"]
        #[error("{name}: {0}")]
        UrlSchemeRejected(String),
    }
}

/// The jti of a message, unverified: only to recognise a job already accepted.
pub fn peek_jti(input: &[u8]) -> Option<String> {
    let envelope = Envelope::parse(input).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&envelope.payload_bytes().ok()?).ok()?;
    claims.get("jti")?.as_str().map(str::to_string)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// Strict base64url without padding: `=`, `+`, `/`, whitespace and
/// non-canonical trailing bits are all errors.
pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()
}

pub fn b64url_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A random identifier of `[A-Za-z0-9_-]`, suitable as a `jti`.
pub fn random_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    // SystemRandom only fails when the OS has no entropy source at all.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&nanos.to_le_bytes());
    }
    b64url_encode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b64url_is_strict() {
        assert_eq!(b64url_decode("aGk").unwrap(), b"hi");
        assert!(b64url_decode("aGk=").is_none(), "padding");
        assert!(b64url_decode("+/8").is_none(), "standard alphabet");
        assert!(b64url_decode("aG k").is_none(), "whitespace");
        assert!(b64url_decode("aGl").is_none(), "non-canonical trailing bits");
    }

    #[test]
    fn hex_and_random_id() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
        let id = random_id();
        assert_eq!(id.len(), 22);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(id, random_id());
    }
}

#[cfg(test)]
mod rule_tests;

//! The JWS general JSON serialization (RFC 7515 §7.2.1) as this project
//! restricts it: ES256 only, `kid` required, no `crit`, no unprotected `alg`/`kid`.

use super::keys::SigningKey;
use super::{b64url_decode, b64url_encode, VerifyError};
use serde::{Deserialize, Serialize};

/// Inputs larger than this are refused before any parsing.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub payload: String,
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub protected: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<serde_json::Map<String, serde_json::Value>>,
    pub signature: String,
}

/// A decoded protected header. Duplicate members are a parse error.
#[derive(Debug, Deserialize)]
struct ProtectedHeader {
    alg: Option<serde_json::Value>,
    kid: Option<serde_json::Value>,
    crit: Option<serde_json::Value>,
}

/// One signature after its header passed the checks: the kid it claims, the
/// bytes it signs, and the raw signature.
#[derive(Debug)]
pub(crate) struct CheckedSignature {
    pub kid: String,
    pub signing_input: Vec<u8>,
    pub signature: Vec<u8>,
}

impl Envelope {
    /// Parses the outer JSON, refusing compact and flattened serializations
    /// with a message that says so.
    pub fn parse(input: &[u8]) -> Result<Self, VerifyError> {
        if input.len() > MAX_MESSAGE_BYTES {
            return Err(VerifyError::TooLarge { limit: MAX_MESSAGE_BYTES });
        }
        let text =
            std::str::from_utf8(input).map_err(|_| VerifyError::Malformed("message is not UTF-8".into()))?;
        let trimmed = text.trim();
        if !trimmed.starts_with('{') {
            if trimmed.split('.').count() == 3 {
                return Err(VerifyError::Malformed(
                    "compact serialization is not accepted; use the general JSON serialization".into(),
                ));
            }
            return Err(VerifyError::Malformed("message is not a JSON object".into()));
        }
        // serde_json stops at 128 levels of nesting, so hostile depth is an
        // error, not a stack overflow.
        let value: serde_json::Value = serde_json::from_str(trimmed)
            .map_err(|e| VerifyError::Malformed(format!("invalid JSON: {e}")))?;
        if let Some(obj) = value.as_object() {
            if obj.contains_key("signature") || obj.contains_key("protected") {
                return Err(VerifyError::Malformed(
                    "flattened serialization is not accepted; use the general JSON serialization".into(),
                ));
            }
        }
        // Typed from the text, not the Value: a Value keeps only the last of
        // two `payload` (or `signatures`) members, the derive refuses both.
        drop(value);
        serde_json::from_str(trimmed).map_err(|e| VerifyError::Malformed(format!("envelope: {e}")))
    }

    pub fn to_json(&self) -> String {
        // Serializing plain strings and maps cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// A new envelope over `claims_json`, with no signature yet.
    pub fn new(claims_json: &[u8]) -> Self {
        Self { payload: b64url_encode(claims_json), signatures: Vec::new() }
    }

    /// Adds one ES256 signature by `key` under `kid`.
    pub fn add_signature(&mut self, key: &SigningKey, kid: &str) -> Result<(), super::KeyError> {
        let header = serde_json::json!({ "alg": "ES256", "kid": kid });
        let protected = b64url_encode(header.to_string().as_bytes());
        let input = format!("{protected}.{}", self.payload);
        let sig = key.sign(input.as_bytes())?;
        self.signatures.push(Signature { protected, header: None, signature: b64url_encode(&sig) });
        Ok(())
    }

    /// The kids this envelope claims to be signed by, in order (unchecked).
    pub fn kids(&self) -> Vec<String> {
        self.signatures.iter().filter_map(|s| check_header(s, "").ok().map(|c| c.kid)).collect()
    }

    pub(crate) fn checked_signatures(&self) -> Result<Vec<CheckedSignature>, VerifyError> {
        // The payload's encoding is checked first so that padding is reported
        // as malformed rather than as a signature that fails to verify.
        self.payload_bytes()?;
        if self.signatures.is_empty() {
            return Err(VerifyError::Malformed("no signatures".into()));
        }
        self.signatures.iter().map(|s| check_header(s, &self.payload)).collect()
    }

    pub fn payload_bytes(&self) -> Result<Vec<u8>, VerifyError> {
        b64url_decode(&self.payload)
            .ok_or_else(|| VerifyError::Malformed("payload is not unpadded base64url".into()))
    }
}

/// Parses JSON into `T` with serde_json's depth limit applied to every value,
/// including members `T` ignores (skipped values are otherwise unbounded),
/// and with duplicate members of `T` refused.
pub(crate) fn parse_bounded<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice::<serde_json::Value>(bytes)?;
    serde_json::from_slice(bytes)
}

fn check_header(sig: &Signature, payload: &str) -> Result<CheckedSignature, VerifyError> {
    if let Some(unprotected) = &sig.header {
        for name in ["alg", "kid", "crit"] {
            if unprotected.contains_key(name) {
                return Err(VerifyError::HeaderRejected(format!(
                    "unprotected header names {name:?}; it must be in the protected header"
                )));
            }
        }
    }
    let raw = b64url_decode(&sig.protected)
        .ok_or_else(|| VerifyError::Malformed("protected header is not unpadded base64url".into()))?;
    let header: ProtectedHeader =
        parse_bounded(&raw).map_err(|e| VerifyError::Malformed(format!("protected header: {e}")))?;
    match &header.alg {
        Some(serde_json::Value::String(alg)) if alg == "ES256" => {}
        Some(serde_json::Value::String(alg)) => return Err(VerifyError::AlgRejected(alg.clone())),
        Some(other) => return Err(VerifyError::AlgRejected(other.to_string())),
        None => return Err(VerifyError::AlgRejected("<missing>".into())),
    }
    if header.crit.is_some() {
        return Err(VerifyError::HeaderRejected("crit is not supported".into()));
    }
    let kid = match header.kid {
        Some(serde_json::Value::String(kid)) => kid,
        _ => return Err(VerifyError::Malformed("protected header has no string kid".into())),
    };
    let signature = b64url_decode(&sig.signature)
        .ok_or_else(|| VerifyError::Malformed("signature is not unpadded base64url".into()))?;
    let mut signing_input = Vec::with_capacity(sig.protected.len() + 1 + payload.len());
    signing_input.extend_from_slice(sig.protected.as_bytes());
    signing_input.push(b'.');
    signing_input.extend_from_slice(payload.as_bytes());
    Ok(CheckedSignature { kid, signing_input, signature })
}

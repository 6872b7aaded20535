//! Enrollment with the registrar: what the device and the registrar must
//! compute alike, and the bodies they exchange. Pure.
//!
//! - The **enrollment key** is derived from the PoP under a label of its
//!   own: it is the registry row's `pop_key`, recorded at manufacturing
//!   (`fleetd factory-row`). It opens neither the access point nor the
//!   portal, whose keys come from other labels.
//! - A **claim** is a single-use code an installer gets for one serial: 80
//!   bits, typed like the PoP. The registrar stores only its SHA-256.
//! - The **enrollment MAC** binds a claim to the CSR of the device that
//!   holds the PoP: a claim stolen from a phone cannot enroll another
//!   machine when the row has a `pop_key`.
//! - A **renewal** is a new CSR signed (ES256) by the device's current key.

use super::identity::{DeviceKey, IdentityError};
use super::pop::{display_code, parse_code, Pop, POP_BYTES};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;
use serde::{Deserialize, Serialize};

const ENROLLMENT_KEY_LABEL: &str = "fleetd enrollment key v1";
const ENROLLMENT_MAC_LABEL: &[u8] = b"fleetd enrollment mac v1\0";
const RENEWAL_LABEL: &[u8] = b"fleetd renewal v1\0";

/// The longest a claim may live (the registrar's setting is capped by it).
pub const MAX_CLAIM_TTL_S: u64 = 3600;

crate::error_name::named_error! {
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum EnrollError {
        #[name = "claim-malformed"]
        #[error("{name}: a claim code is 16 characters of 0-9 and A-Z (no I, L, O, U), got {0}")]
        ClaimMalformed(String),
        #[name = "pop-key-malformed"]
        #[error("{name}: a pop_key is 43 characters of unpadded base64url (32 bytes)")]
        KeyMalformed,
    }
}

/// The device's enrollment key (the registry's `pop_key`). `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentKey([u8; 32]);

impl std::fmt::Debug for EnrollmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnrollmentKey(<redacted>)")
    }
}

impl EnrollmentKey {
    /// The key for `device_id`, from its PoP.
    pub fn derive(pop: &Pop, device_id: &str) -> Self {
        let tag = pop.derive(ENROLLMENT_KEY_LABEL, device_id.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(tag.as_ref());
        Self(key)
    }

    /// As the registry's CSV carries it: unpadded base64url.
    pub fn to_text(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn parse(text: &str) -> Result<Self, EnrollError> {
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| EnrollError::KeyMalformed)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| EnrollError::KeyMalformed)?;
        Ok(Self(key))
    }

    /// The MAC over `(claim, csr_pem)` that enrollment carries.
    pub fn mac(&self, claim: &ClaimCode, csr_pem: &str) -> String {
        URL_SAFE_NO_PAD.encode(hmac::sign(&self.hmac_key(), &mac_input(claim, csr_pem)).as_ref())
    }

    /// Whether `mac` is this key's MAC over `(claim, csr_pem)`, compared in
    /// constant time.
    pub fn verify_mac(&self, claim: &ClaimCode, csr_pem: &str, mac: &str) -> bool {
        let Ok(tag) = URL_SAFE_NO_PAD.decode(mac.trim()) else { return false };
        hmac::verify(&self.hmac_key(), &mac_input(claim, csr_pem), &tag).is_ok()
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }
}

fn mac_input(claim: &ClaimCode, csr_pem: &str) -> Vec<u8> {
    let mut input = Vec::with_capacity(ENROLLMENT_MAC_LABEL.len() + POP_BYTES + csr_pem.len());
    input.extend_from_slice(ENROLLMENT_MAC_LABEL);
    input.extend_from_slice(&claim.0);
    input.extend_from_slice(csr_pem.as_bytes());
    input
}

/// A claim code. `Debug` hides it; `display_code` is for the installer.
#[derive(Clone, PartialEq, Eq)]
pub struct ClaimCode([u8; POP_BYTES]);

impl std::fmt::Debug for ClaimCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClaimCode(<redacted>)")
    }
}

impl ClaimCode {
    pub fn from_bytes(bytes: [u8; POP_BYTES]) -> Self {
        Self(bytes)
    }

    /// A new claim from the system's randomness.
    pub fn generate() -> Result<Self, ring::error::Unspecified> {
        super::pop::random_code().map(Self)
    }

    /// Parses a code as people type it (any case, dashes and spaces ignored).
    pub fn parse(text: &str) -> Result<Self, EnrollError> {
        parse_code(text).map(Self).map_err(EnrollError::ClaimMalformed)
    }

    /// `XXXX-XXXX-XXXX-XXXX`.
    pub fn display_code(&self) -> String {
        display_code(&self.0)
    }

    /// What the registrar stores and looks up: SHA-256 of the code's bytes,
    /// hex. Only the installer and the device ever hold the code itself.
    pub fn digest_hex(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, &self.0).as_ref())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a renewal signature covers: the new CSR, under its own label so a
/// signature made for anything else never passes.
fn renewal_input(csr_pem: &str) -> Vec<u8> {
    let mut input = RENEWAL_LABEL.to_vec();
    input.extend_from_slice(csr_pem.as_bytes());
    input
}

/// The device signs its renewal with its current key (ES256, ASN.1 DER,
/// base64url).
pub fn sign_renewal(current_key: &DeviceKey, csr_pem: &str) -> Result<String, IdentityError> {
    let signature = current_key.sign(&renewal_input(csr_pem))?;
    Ok(URL_SAFE_NO_PAD.encode(signature))
}

/// Whether `signature` over `csr_pem` was made by the key whose public
/// point (SEC1, uncompressed) is `public_key`.
pub fn verify_renewal(public_key: &[u8], csr_pem: &str, signature: &str) -> bool {
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature.trim()) else { return false };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public_key)
        .verify(&renewal_input(csr_pem), &signature)
        .is_ok()
}

/// `POST /v1/login`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest").field("user", &self.user).field("password", &"<redacted>").finish()
    }
}

/// The answer to a login: an opaque bearer token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginResponse {
    pub token: String,
    /// Seconds since the epoch.
    pub expires_at: u64,
}

/// `POST /v1/claims`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    pub serial: String,
}

/// A claim for one serial: single use, at most [`MAX_CLAIM_TTL_S`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimResponse {
    /// The code, `XXXX-XXXX-XXXX-XXXX`.
    pub claim: String,
    pub expires_at: u64,
}

/// `POST /v1/enroll`, by the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub claim: String,
    pub csr_pem: String,
    /// Required when the registry row has a `pop_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// `POST /v1/renew`, by the device: a new CSR signed by its current key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr_pem: String,
    /// [`sign_renewal`]'s output.
    pub signature: String,
}

/// What the registrar answers to an enrollment or a renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub cert_pem: String,
    /// The issuing CA (and any intermediates) up to the broker's trust anchor.
    pub chain_pem: String,
    pub mqtt: BrokerSettings,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The broker an enrolled device is told to use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerSettings {
    pub host: String,
    pub port: u16,
    pub ca_pem: String,
}

/// Every error the registrar answers: `{error: NAME, detail}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pop(seed: u8) -> Pop {
        Pop::from_bytes([seed; POP_BYTES])
    }

    #[test]
    fn enrollment_key_is_per_device_and_differs_from_the_portal_keys() {
        let key = EnrollmentKey::derive(&pop(7), "gw-0042");
        assert_eq!(key, EnrollmentKey::derive(&pop(7), "gw-0042"), "stable");
        assert_ne!(key, EnrollmentKey::derive(&pop(7), "gw-0043"));
        assert_ne!(key, EnrollmentKey::derive(&pop(8), "gw-0042"));
        let text = key.to_text();
        assert_eq!(text.len(), 43);
        assert_eq!(EnrollmentKey::parse(&text).unwrap(), key);
        // Neither the request key nor the AP passphrase can be computed from it.
        let request_tag = hmac::sign(&pop(7).request_key("gw-0042"), b"x");
        assert!(hmac::verify(&key.hmac_key(), b"x", request_tag.as_ref()).is_err());
        assert!(!text.contains(&pop(7).ap_passphrase("gw-0042")));
        assert!(!format!("{key:?}").contains(&text));
    }

    #[test]
    fn malformed_keys_and_claims_are_named() {
        for bad in ["", "abc", &"A".repeat(44), "!!!!"] {
            assert_eq!(EnrollmentKey::parse(bad).unwrap_err().name(), "pop-key-malformed", "{bad}");
        }
        for bad in ["", "1111-1111", "1111-1111-1111-111U", "'; DROP TABLE devices; --"] {
            assert_eq!(ClaimCode::parse(bad).unwrap_err().name(), "claim-malformed", "{bad}");
        }
    }

    #[test]
    fn claims_round_trip_and_are_stored_by_digest() {
        let claim = ClaimCode::generate().unwrap();
        let code = claim.display_code();
        assert_eq!(ClaimCode::parse(&code.to_lowercase()).unwrap(), claim);
        assert_eq!(claim.digest_hex().len(), 64);
        assert!(!claim.digest_hex().contains(&code.replace('-', "").to_lowercase()));
        assert_ne!(claim.digest_hex(), ClaimCode::generate().unwrap().digest_hex());
        assert!(!format!("{claim:?}").contains(&code));
    }

    #[test]
    fn the_mac_binds_the_claim_to_the_csr_and_the_device() {
        let key = EnrollmentKey::derive(&pop(7), "gw-0042");
        let claim = ClaimCode::from_bytes([1; POP_BYTES]);
        let mac = key.mac(&claim, "CSR-A");
        assert!(key.verify_mac(&claim, "CSR-A", &mac));
        let table: [(&EnrollmentKey, &ClaimCode, &str, &str); 4] = [
            (&key, &ClaimCode::from_bytes([2; POP_BYTES]), "CSR-A", "another claim"),
            (&key, &claim, "CSR-B", "another CSR"),
            (&EnrollmentKey::derive(&pop(7), "gw-0043"), &claim, "CSR-A", "another device's key"),
            (&key, &claim, "CSR-A", "garbage"),
        ];
        for (k, c, csr, why) in table {
            let candidate = if why == "garbage" { "%%%" } else { mac.as_str() };
            assert!(!k.verify_mac(c, csr, candidate), "{why}");
        }
    }

    #[test]
    fn a_renewal_verifies_only_under_the_signing_key_and_for_its_csr() {
        let key = DeviceKey::generate().unwrap();
        let other = DeviceKey::generate().unwrap();
        let signature = sign_renewal(&key, "NEW-CSR").unwrap();
        let public = key.public_key().unwrap();
        assert!(verify_renewal(&public, "NEW-CSR", &signature));
        assert!(!verify_renewal(&public, "OTHER-CSR", &signature));
        assert!(!verify_renewal(&other.public_key().unwrap(), "NEW-CSR", &signature));
        assert!(!verify_renewal(&public, "NEW-CSR", "not base64 !"));
    }

    #[test]
    fn bodies_refuse_unknown_fields() {
        let err = serde_json::from_str::<EnrollRequest>(r#"{"claim":"x","csr_pem":"y","extra":1}"#);
        assert!(err.is_err());
        let ok: EnrollRequest = serde_json::from_str(r#"{"claim":"x","csr_pem":"y"}"#).unwrap();
        assert_eq!(ok.mac, None);
        assert!(!format!("{:?}", LoginRequest { user: "u".into(), password: "hunter2".into() })
            .contains("hunter2"));
    }
}

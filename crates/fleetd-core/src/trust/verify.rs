//! The device's policy and the verification of a message against it.

use super::claims::{check_url, Claims};
use super::envelope::Envelope;
use super::keys::PublicKey;
use super::VerifyError;
use std::collections::BTreeMap;

/// The longest validity window a message may claim, unless `trust.max_validity_s` says otherwise.
pub const DEFAULT_MAX_VALIDITY_S: u64 = 7 * 24 * 3600;

/// What the device trusts and who it is. Built from the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Every kid listed is required; no other kid is accepted.
    pub keys: Vec<(String, PublicKey)>,
    pub project: String,
    pub hardware: String,
    pub device_id: String,
    pub groups: Vec<String>,
    pub leeway_s: u64,
    pub max_validity_s: u64,
    pub allow_http: bool,
    /// The smallest slot's size, when known.
    pub max_image_size: Option<u64>,
}

/// The persistent facts verification depends on.
#[derive(Debug, Clone, Copy)]
pub struct TrustState<'a> {
    pub installed_version: u64,
    /// The largest `iat` accepted so far (at least the daemon's build time).
    pub clock_floor: u64,
    /// jti → exp of every message accepted and not yet expired.
    pub seen_jtis: &'a BTreeMap<String, u64>,
}

/// A message that passed every check.
#[derive(Debug, Clone)]
pub struct Verified {
    pub claims: Claims,
    /// The `now` the checks used: the system clock, or the clock floor when
    /// the system clock reads earlier.
    pub effective_now: u64,
}

impl Policy {
    /// Verifies `input` completely. Every signature is checked before any
    /// claim is read. Pure: `system_now` and the state are passed in.
    pub fn verify(
        &self,
        input: &[u8],
        state: &TrustState<'_>,
        system_now: u64,
    ) -> Result<Verified, VerifyError> {
        let envelope = Envelope::parse(input)?;
        verify_signatures(&envelope, &self.keys)?;
        let claims = Claims::parse(&envelope.payload_bytes()?)?;
        let effective_now = system_now.max(state.clock_floor);
        self.check_claims(&claims, state, effective_now)?;
        Ok(Verified { claims, effective_now })
    }

    /// The project, the hardware, and this device among the targets (by id or group).
    pub(crate) fn check_target(&self, project: &str, target: &super::Target) -> Result<(), VerifyError> {
        if project != self.project {
            return Err(VerifyError::WrongProject { got: project.to_string(), want: self.project.clone() });
        }
        if target.hardware != self.hardware {
            return Err(VerifyError::WrongHardware {
                got: target.hardware.clone(),
                want: self.hardware.clone(),
            });
        }
        let by_device = target.devices.contains(&self.device_id);
        let by_group = target.groups.iter().any(|g| self.groups.contains(g));
        if !(by_device || by_group) {
            return Err(VerifyError::NotTargeted(self.device_id.clone()));
        }
        Ok(())
    }

    fn check_claims(&self, claims: &Claims, state: &TrustState<'_>, now: u64) -> Result<(), VerifyError> {
        claims.check_structure()?;
        if let Some(feature) = claims.unsupported_requirement() {
            return Err(VerifyError::RequiresUnsupported(feature.to_string()));
        }
        check_validity_window(claims, now, self.leeway_s, self.max_validity_s)?;
        self.check_target(&claims.project, &claims.target)?;
        if claims.version <= state.installed_version {
            return Err(VerifyError::VersionNotNewer {
                offered: claims.version,
                installed: state.installed_version,
            });
        }
        check_url(&claims.image.url, self.allow_http)?;
        if let Some(index) = &claims.image.index {
            check_url(&index.url, self.allow_http)?;
        }
        if let Some(slot) = self.max_image_size {
            if claims.image.size > slot {
                return Err(VerifyError::ImageTooLarge { size: claims.image.size, slot });
            }
        }
        if state.seen_jtis.contains_key(&claims.jti) {
            return Err(VerifyError::Replayed(claims.jti.clone()));
        }
        Ok(())
    }
}

/// `nbf - leeway <= now < exp + leeway`, `exp - nbf <= max_validity`, and
/// `iat <= exp`, `iat <= now + leeway`: an `iat` from the future would raise
/// the device's clock floor past every later message. Shared by the device
/// and the co-signer.
pub fn check_validity_window(
    claims: &Claims,
    now: u64,
    leeway_s: u64,
    max_validity_s: u64,
) -> Result<(), VerifyError> {
    check_window(&claims.window(), now, leeway_s, max_validity_s)
}

/// The times every signed message carries.
pub struct Window {
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
}

/// `check_validity_window` for any message's times (an update or a halt).
pub fn check_window(
    claims: &Window,
    now: u64,
    leeway_s: u64,
    max_validity_s: u64,
) -> Result<(), VerifyError> {
    if claims.exp < claims.nbf {
        return Err(VerifyError::Malformed("exp is before nbf".into()));
    }
    let seconds = claims.exp - claims.nbf;
    if seconds > max_validity_s {
        return Err(VerifyError::ValidityTooLong { seconds, max: max_validity_s });
    }
    if now < claims.nbf.saturating_sub(leeway_s) {
        return Err(VerifyError::NotYetValid { nbf: claims.nbf, now });
    }
    if now >= claims.exp.saturating_add(leeway_s) {
        return Err(VerifyError::Expired { exp: claims.exp, now });
    }
    if claims.iat > claims.exp {
        return Err(VerifyError::IatInvalid { iat: claims.iat, why: format!("after exp {}", claims.exp) });
    }
    if claims.iat > now.saturating_add(leeway_s) {
        return Err(VerifyError::IatInvalid {
            iat: claims.iat,
            why: format!("in the future (now {now}, leeway {leeway_s} s)"),
        });
    }
    Ok(())
}

/// Checks that the kids in `envelope` are exactly those of `keys`, each once,
/// and that every signature verifies.
pub fn verify_signatures(envelope: &Envelope, keys: &[(String, PublicKey)]) -> Result<(), VerifyError> {
    let signatures = envelope.checked_signatures()?;
    let mut seen: Vec<&str> = Vec::with_capacity(signatures.len());
    for sig in &signatures {
        if seen.contains(&sig.kid.as_str()) {
            return Err(VerifyError::KidDuplicate(sig.kid.clone()));
        }
        if !keys.iter().any(|(kid, _)| *kid == sig.kid) {
            return Err(VerifyError::KidUnknown(sig.kid.clone()));
        }
        seen.push(&sig.kid);
    }
    if let Some((missing, _)) = keys.iter().find(|(kid, _)| !seen.contains(&kid.as_str())) {
        return Err(VerifyError::SignatureMissing(missing.clone()));
    }
    for sig in &signatures {
        let key = keys
            .iter()
            .find(|(kid, _)| *kid == sig.kid)
            .map(|(_, key)| key)
            .ok_or_else(|| VerifyError::KidUnknown(sig.kid.clone()))?;
        if !key.verify(&sig.signing_input, &sig.signature) {
            return Err(VerifyError::SignatureInvalid(sig.kid.clone()));
        }
    }
    Ok(())
}

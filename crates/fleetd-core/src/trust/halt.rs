//! The halt message (`typ: "fleetd.halt.v1"`): the same envelope and
//! signatures as an update, naming in `halts` the jti of the rollout it
//! stops. Verified as strictly as an update; its own jti enters the replay
//! cache, and it can only ever stop the one rollout it names.

use super::claims::{valid_jti, Target};
use super::envelope::Envelope;
use super::verify::{check_window, verify_signatures, Policy, TrustState, Window};
use super::VerifyError;
use serde::{Deserialize, Serialize};

pub const HALT_TYPE: &str = "fleetd.halt.v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltClaims {
    pub typ: String,
    pub jti: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub project: String,
    pub target: Target,
    /// The jti of the update message this halt stops.
    pub halts: String,
}

impl HaltClaims {
    pub fn parse(bytes: &[u8]) -> Result<Self, VerifyError> {
        super::envelope::parse_bounded(bytes, "claims")
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// What holds whoever checks it (the device, the co-signer): its type,
    /// and the two jtis' form.
    pub fn check_structure(&self) -> Result<(), VerifyError> {
        if self.typ != HALT_TYPE {
            return Err(VerifyError::WrongType(self.typ.clone()));
        }
        if !valid_jti(&self.jti) || !valid_jti(&self.halts) {
            return Err(VerifyError::Malformed(
                "jti and halts must be 8-128 characters of [A-Za-z0-9_-]".into(),
            ));
        }
        Ok(())
    }

    pub fn window(&self) -> Window {
        Window { iat: self.iat, nbf: self.nbf, exp: self.exp }
    }
}

/// `typ` of a message, unverified: which verification to run.
pub fn peek_type(input: &[u8]) -> Option<String> {
    payload_type(&Envelope::parse(input).ok()?.payload_bytes().ok()?)
}

/// Whether a message claims to be a halt (unverified: which verification
/// to run, and what a busy worker must not leave waiting).
pub fn is_halt(input: &[u8]) -> bool {
    peek_type(input).as_deref() == Some(HALT_TYPE)
}

/// `typ` of a message's payload (its claims), unverified.
pub fn payload_type(payload: &[u8]) -> Option<String> {
    let claims: serde_json::Value = serde_json::from_slice(payload).ok()?;
    claims.get("typ")?.as_str().map(str::to_string)
}

impl Policy {
    /// Verifies a halt completely: signatures first, then its claims.
    pub fn verify_halt(
        &self,
        input: &[u8],
        state: &TrustState<'_>,
        system_now: u64,
    ) -> Result<HaltClaims, VerifyError> {
        let envelope = Envelope::parse(input)?;
        verify_signatures(&envelope, &self.keys)?;
        let claims = HaltClaims::parse(&envelope.payload_bytes()?)?;
        claims.check_structure()?;
        let now = system_now.max(state.clock_floor);
        check_window(&claims.window(), now, self.leeway_s, self.max_validity_s)?;
        self.check_target(&claims.project, &claims.target)?;
        if state.seen_jtis.contains_key(&claims.jti) {
            return Err(VerifyError::Replayed(claims.jti));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::SigningKey;
    use std::collections::BTreeMap;

    const NOW: u64 = 1_800_000_000;

    fn setup() -> (Policy, SigningKey, SigningKey) {
        let (fleet, cosigner) = (SigningKey::generate().unwrap(), SigningKey::generate().unwrap());
        let policy = Policy {
            keys: vec![("fleet".into(), fleet.public_key()), ("cosigner".into(), cosigner.public_key())],
            project: "acme".into(),
            hardware: "rpi4".into(),
            device_id: "gw-1".into(),
            groups: vec!["field".into()],
            leeway_s: 60,
            max_validity_s: 86_400,
            allow_http: false,
            max_image_size: None,
        };
        (policy, fleet, cosigner)
    }

    fn halt() -> HaltClaims {
        HaltClaims {
            typ: HALT_TYPE.into(),
            jti: "halt-0000001".into(),
            iat: NOW,
            nbf: NOW,
            exp: NOW + 3600,
            project: "acme".into(),
            target: Target { hardware: "rpi4".into(), devices: vec![], groups: vec!["field".into()] },
            halts: "rollout-00001".into(),
        }
    }

    fn signed(claims: &HaltClaims, keys: &[(&SigningKey, &str)]) -> Vec<u8> {
        let mut e = Envelope::new(&claims.to_json());
        for (key, kid) in keys {
            e.add_signature(key, kid).unwrap();
        }
        e.to_json().into_bytes()
    }

    #[test]
    fn halts_are_verified_like_updates() {
        let (policy, fleet, cosigner) = setup();
        let both = [(&fleet, "fleet"), (&cosigner, "cosigner")];
        let seen = BTreeMap::new();
        let state = TrustState { installed_version: 0, clock_floor: 0, seen_jtis: &seen };
        let check = |claims: &HaltClaims, keys: &[(&SigningKey, &str)]| {
            policy.verify_halt(&signed(claims, keys), &state, NOW).map(|c| c.halts).map_err(|e| e.name())
        };
        assert_eq!(check(&halt(), &both), Ok("rollout-00001".into()));
        assert_eq!(check(&halt(), &[(&fleet, "fleet")]), Err("signature-missing"), "the fleet key alone");
        // (change, refusal)
        type Change = fn(&mut HaltClaims);
        let cases: Vec<(Change, &str)> = vec![
            (|c| c.typ = "fleetd.update.v1".into(), "wrong-type"),
            (|c| c.halts = "x".into(), "malformed"),
            (|c| c.exp = NOW - 3600, "malformed"),
            (
                |c| {
                    c.nbf = NOW - 7200;
                    c.exp = NOW - 3600;
                },
                "expired",
            ),
            (|c| c.project = "other".into(), "wrong-project"),
            (|c| c.target.hardware = "x86".into(), "wrong-hardware"),
            (|c| c.target.groups = vec!["lab".into()], "not-targeted"),
        ];
        for (change, name) in cases {
            let mut claims = halt();
            change(&mut claims);
            assert_eq!(check(&claims, &both), Err(name), "{claims:?}");
        }
        // A halt seen before is a replay.
        let seen = BTreeMap::from([("halt-0000001".to_string(), NOW + 3600)]);
        let state = TrustState { installed_version: 0, clock_floor: 0, seen_jtis: &seen };
        let replay = policy.verify_halt(&signed(&halt(), &both), &state, NOW).unwrap_err();
        assert_eq!(replay.name(), "replayed");
        assert_eq!(peek_type(&signed(&halt(), &both)).as_deref(), Some(HALT_TYPE));
    }
}

//! Arbitrary bytes through the whole verifier: parse, signature checks,
//! claims. Must never panic, hang or allocate without bound.
#![no_main]

use fleetd::trust::{Policy, PublicKey, TrustState};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::OnceLock;

// Test-only keys, committed so seeds signed by them reach the claim checks.
const FLEET_PUB: &str = include_str!("../keys/fleet.pub.pem");
const COSIGNER_PUB: &str = include_str!("../keys/cosigner.pub.pem");

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| Policy {
        keys: vec![
            ("fleet".into(), PublicKey::from_pem(FLEET_PUB).expect("fleet key")),
            ("cosigner".into(), PublicKey::from_pem(COSIGNER_PUB).expect("cosigner key")),
        ],
        project: "acme-gateways".into(),
        hardware: "rpi4-gw".into(),
        device_id: "gw-0042".into(),
        groups: vec!["pilot".into()],
        leeway_s: 60,
        max_validity_s: 7 * 86400,
        allow_http: false,
        max_image_size: Some(1 << 30),
    })
}

fuzz_target!(|data: &[u8]| {
    let seen = BTreeMap::new();
    let state = TrustState { installed_version: 7, clock_floor: 0, seen_jtis: &seen };
    let _ = policy().verify(data, &state, 1_795_000_010);
});

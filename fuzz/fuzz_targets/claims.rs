//! Arbitrary bytes as claims (what lies behind valid signatures): parse and
//! every structural rule. Must never panic.
#![no_main]

use fleetd::trust::{check_url, check_validity_window, Claims};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(claims) = Claims::parse(data) {
        let _ = claims.check_structure();
        let _ = check_url(&claims.image.url, false);
        let _ = check_validity_window(&claims, 1_795_000_010, 60, 7 * 86400);
    }
});

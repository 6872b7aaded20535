//! Interop with an independent JWS implementation (Python jwcrypto): its
//! messages verify in fleetd, and fleetctl's verify in it.

use crate::common;
use common::*;
use std::process::Command;

fn python_with_jwcrypto() -> Option<Command> {
    let ok =
        Command::new("python3").args(["-c", "import jwcrypto"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "jwcrypto must be installed in CI (scripts/setup)");
        eprintln!("SKIP: python3 with jwcrypto not available; run scripts/setup");
        return None;
    }
    let mut cmd = Command::new("python3");
    cmd.arg(crate::common::root().join("tests/it/interop/jose_interop.py"));
    Some(cmd)
}

#[test]
fn a_jwcrypto_message_verifies_in_fleetd() {
    let Some(mut py) = python_with_jwcrypto() else {
        return;
    };
    let d = Device::new();
    // Replace the device's trusted keys with keys made by jwcrypto.
    std::fs::remove_dir_all(d.keys()).unwrap();
    ok(py.arg("make").arg(d.path()).arg(now().to_string()));
    let msg = d.path().join("py-message.json");
    let (code, out) = d.verify(&msg, false);
    assert_eq!((code, out.trim()), (0, "accepted: made-by-jwcrypto v9"));

    // Its private keys (PKCS#8 from the cryptography package) also sign with fleetctl.
    let own = d.cosigned("own", &[]);
    assert_eq!(d.verify(&own, false).0, 0);

    // A flipped byte in jwcrypto's payload is caught by fleetd.
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&msg).unwrap()).unwrap();
    let payload = v["payload"].as_str().unwrap().to_string();
    let mut bytes = fleetd::trust::b64url_decode(&payload).unwrap();
    let i = bytes.iter().position(|b| *b == b'9').unwrap();
    bytes[i] = b'8';
    v["payload"] = fleetd::trust::b64url_encode(&bytes).into();
    std::fs::write(&msg, v.to_string()).unwrap();
    assert!(d.verify(&msg, false).1.starts_with("rejected: signature-invalid"));
}

#[test]
fn a_fleetctl_message_verifies_in_jwcrypto() {
    let Some(mut py) = python_with_jwcrypto() else {
        return;
    };
    let d = Device::new();
    let msg = d.cosigned("m", &[]);
    let out = ok(py.arg("verify").arg(d.path()).arg(&msg));
    let claims: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(claims["typ"], "fleetd.update.v1");
    assert_eq!(claims["version"], 8);

    // jwcrypto must refuse it when one signature is broken.
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&msg).unwrap()).unwrap();
    let sig = v["signatures"][1]["signature"].as_str().unwrap().to_string();
    let mut raw = fleetd::trust::b64url_decode(&sig).unwrap();
    raw[10] ^= 1;
    v["signatures"][1]["signature"] = fleetd::trust::b64url_encode(&raw).into();
    std::fs::write(&msg, v.to_string()).unwrap();
    let mut py = python_with_jwcrypto().unwrap();
    let out = run(py.arg("verify").arg(d.path()).arg(&msg));
    assert!(!out.status.success(), "jwcrypto accepted a broken signature");
}

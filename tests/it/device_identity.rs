//! The device id from a factory-written `id_file`, shown with its source
//! by `fleetd status`, and the registry row `fleetd factory-row` prints.

use crate::common;
use common::*;
use fleetd::provision::enroll::EnrollmentKey;
use fleetd::provision::pop::Pop;

/// A device whose `[device]` names `id_file = "device-id"` (and `id =
/// "auto"`, which the file overrides), with a portal section for the PoP.
fn device_with_id_file(id_line: &str) -> Device {
    let d = Device::new();
    let config = std::fs::read_to_string(d.config())
        .unwrap()
        .replace("id = \"gw-0042\"", "id = \"auto\"\nid_file = \"device-id\"");
    let config = config + "\n[provision]\nbackend = \"none\"\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(d.config(), config).unwrap();
    std::fs::write(d.path().join("device-id"), id_line).unwrap();
    d
}

#[test]
fn id_file_sets_the_id_and_status_names_its_source() {
    let d = device_with_id_file("gw-factory-7\nignored second line\n");
    let json: serde_json::Value =
        serde_json::from_str(&ok(fleetd().args(["status", "--json", "--config"]).arg(d.config()))).unwrap();
    assert_eq!(json["device"], "gw-factory-7");
    assert_eq!(json["device_id_source"], "id_file");
    let human = ok(fleetd().args(["status", "--config"]).arg(d.config()));
    let line = human.lines().find(|l| l.starts_with("device")).unwrap_or_default();
    assert!(line.contains("gw-factory-7 (from id_file;"), "{human}");

    // The access point keeps deriving from the resolved id.
    let label = ok(fleetd().args(["status", "--pop", "--config"]).arg(d.config()));
    assert!(label.contains("fleetd-gw-factory-7, passphrase "), "{label}");

    // An id fleetd cannot use is refused by name, with its key.
    std::fs::write(d.path().join("device-id"), "gw 7/../x\n").unwrap();
    let out = run(fleetd().args(["status", "--config"]).arg(d.config()));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`device.id_file`") && stderr(&out).contains("device-id-invalid"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn factory_row_is_one_csv_line_with_the_enrollment_key() {
    let d = device_with_id_file("gw-0099\n");
    let row = ok(fleetd().args(["factory-row", "--config"]).arg(d.config()));
    assert_eq!(row.lines().count(), 1, "{row}");
    let fields: Vec<&str> = row.trim_end().split(',').collect();
    assert_eq!(fields[..4], ["gw-0099", "acme-gateways", "rpi4-gw", "pilot"], "{row}");

    // The PoP the row was made from is the device's (made once, kept).
    let label = ok(fleetd().args(["status", "--pop", "--config"]).arg(d.config()));
    let pop = Pop::parse(label.lines().last().unwrap()).unwrap();
    let key = fields[4];
    assert_eq!(key, EnrollmentKey::derive(&pop, "gw-0099").to_text());
    // It opens neither the access point nor the portal's API.
    assert_ne!(key, pop.ap_passphrase("gw-0099"));
    assert!(!label.contains(key));
    let key_bytes = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, key).unwrap();
    let as_hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key_bytes);
    let request_tag = ring::hmac::sign(&pop.request_key("gw-0099"), b"GET /api/v1/networks");
    assert!(ring::hmac::verify(&as_hmac, b"GET /api/v1/networks", request_tag.as_ref()).is_err());

    let row = ok(fleetd().args(["factory-row", "--groups", "eu;pilot", "--config"]).arg(d.config()));
    assert!(row.starts_with("gw-0099,acme-gateways,rpi4-gw,eu;pilot,"), "{row}");
    assert!(row.trim_end().ends_with(key), "the same PoP, the same key: {row}");
    let out = run(fleetd().args(["factory-row", "--groups", "bad group", "--config"]).arg(d.config()));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

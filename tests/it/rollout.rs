//! Rollouts on one device through the real binaries: a job scheduled by its
//! wave waits (status `scheduled`, with its start), survives a kill and
//! starts on time; a halt stops a scheduled job, is a duplicate when seen
//! again, and refuses its update when it comes first.

use crate::common;
use common::gateway::*;
use common::imageserver::ImageServer;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SLOT: u64 = 4 << 20;

fn setup() -> (Gateway, ImageServer, PathBuf, Vec<u8>) {
    let g = Gateway::new(Bootloader::Grub, SLOT);
    std::fs::write(g.slot("A"), image_bytes(SLOT as usize, 99)).unwrap();
    let image = image_bytes((1 << 20) + 17, 5);
    let file = g.path().join("image.bin");
    std::fs::write(&file, &image).unwrap();
    (g, ImageServer::start(), file, image)
}

fn scheduled_message(g: &Gateway, server: &ImageServer, file: &Path, name: &str, start: u64) -> PathBuf {
    let url = server.add("/img", std::fs::read(file).unwrap());
    let wave = format!("100@{start}");
    g.dev.cosigned(name, &["--url", &url, "--image", file.to_str().unwrap(), "--wave", &wave])
}

fn jti_of(message: &Path) -> String {
    let bytes = std::fs::read(message).unwrap();
    fleetd::trust::peek_jti(&bytes).unwrap()
}

/// A halt for `halts`, signed by the fleet and co-signer keys on disk.
fn halt(g: &Gateway, jti: &str, halts: &str) -> PathBuf {
    use fleetd::trust::halt::{HaltClaims, HALT_TYPE};
    let n = now();
    let claims = HaltClaims {
        typ: HALT_TYPE.into(),
        jti: jti.into(),
        iat: n,
        nbf: n,
        exp: n + 3600,
        project: "acme-gateways".into(),
        target: fleetd::trust::Target {
            hardware: "rpi4-gw".into(),
            devices: vec!["gw-0042".into()],
            groups: vec![],
        },
        halts: halts.into(),
    };
    let mut envelope = fleetd::trust::Envelope::new(&claims.to_json());
    for kid in ["fleet", "cosigner"] {
        let pem = std::fs::read_to_string(g.dev.keys().join(format!("{kid}.key.pem"))).unwrap();
        envelope.add_signature(&fleetd::trust::SigningKey::from_pem(&pem).unwrap(), kid).unwrap();
    }
    let path = g.path().join(format!("{jti}.json"));
    std::fs::write(&path, envelope.to_json()).unwrap();
    path
}

/// `fleetd install --no-reboot` killed (SIGKILL) once its job is stored as scheduled.
fn install_until_scheduled(g: &Gateway, message: &Path) {
    g.kill_install_when(message, "the scheduled job", Duration::from_secs(20), |state| {
        state["job"]["phase"]["phase"] == "scheduled"
    });
}

#[test]
fn a_scheduled_job_waits_for_its_wave_and_survives_a_restart() {
    let (g, server, file, image) = setup();
    let t0 = Instant::now();
    let start = now() + 4;
    let msg = scheduled_message(&g, &server, &file, "roll", start);
    install_until_scheduled(&g, &msg);
    let st = g.status();
    assert_eq!(st["state"], "scheduled", "{st}");
    assert_eq!(st["job"]["start_at"], start, "{st}");
    assert!(server.log().is_empty(), "a scheduled job downloaded: {:?}", server.log());
    // The restarted daemon keeps the time, waits for it, then installs.
    let out = g.run_once();
    assert!(out.status.success(), "{}", stderr(&out));
    let first = server.log().first().map(|s| s.at).expect("the image was fetched");
    // `start` is whole seconds: the wait is at least what was left of them, less one.
    assert!(
        first >= t0 + Duration::from_secs(3),
        "the download began {:?} after the message, before its wave",
        first - t0
    );
    let st = g.status();
    assert_eq!(st["state"], "reboot-pending", "{st}");
    assert!(std::fs::read(g.slot("B")).unwrap()[..image.len()] == image[..]);
}

#[test]
fn a_halt_stops_a_scheduled_job_and_refuses_an_update_it_came_before() {
    let (g, server, file, _) = setup();
    let slot_a = std::fs::read(g.slot("A")).unwrap();
    let msg = scheduled_message(&g, &server, &file, "roll", now() + 3600);
    install_until_scheduled(&g, &msg);
    let stop = halt(&g, "halt-0000001", &jti_of(&msg));
    let out = g.fleetd(&["install", stop.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let st = g.status();
    assert_eq!(st["state"], "halted", "{st}");
    assert!(st["last_error"].as_str().unwrap().starts_with("halted: stopped by halt halt-0000001"), "{st}");
    assert_eq!(st["primary_slot"], "A", "{st}");
    assert!(server.log().is_empty(), "a halted job downloaded");
    assert!(std::fs::read(g.slot("A")).unwrap() == slot_a, "the running slot was written");
    // The same halt again changes nothing.
    let out = g.fleetd(&["install", stop.to_str().unwrap()]);
    assert_eq!(g.status()["state"], "halted", "{}", stderr(&out));

    // A fresh device that sees the halt first refuses the rollout's update.
    let (g, server, file, _) = setup();
    let msg = scheduled_message(&g, &server, &file, "roll", now());
    let out = g.fleetd(&["install", halt(&g, "halt-0000002", &jti_of(&msg)).to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = g.install(&msg);
    assert!(!out.status.success(), "the halted rollout installed");
    let st = g.status();
    assert!(st["last_error"].as_str().unwrap_or_default().starts_with("halted"), "{st}");
    assert!(server.log().is_empty());
}

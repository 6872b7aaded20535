//! Full update cycles through a boot simulator that reads and writes the
//! boot environment exactly as the shipped boot script does: install →
//! reboot → health check → commit; a failing health check → rollback; a slot
//! that never boots → the bootloader falls back.

use crate::common;
use common::gateway::*;
use common::imageserver::ImageServer;
use common::*;

const SLOT: u64 = 8 << 20;

fn setup(bootloader: Bootloader) -> (Gateway, ImageServer, std::path::PathBuf, Vec<u8>) {
    let g = Gateway::new(bootloader, SLOT);
    let server = ImageServer::start();
    let image = image_bytes(3 << 20 | 12345, 7);
    let file = g.path().join("v8.img");
    std::fs::write(&file, &image).unwrap();
    let url = server.add("/v8.img", image.clone());
    let msg = g.message("v8", &url, &file, 8);
    (g, server, msg, image)
}

fn install_ok(g: &Gateway, msg: &std::path::Path) {
    let out = g.install(msg);
    assert!(out.status.success(), "install: {}{}", stdout(&out), stderr(&out));
    let st = g.status();
    assert_eq!(st["state"], "reboot-pending", "{st}");
    let expected_reboot_arg = if g.bootloader == Bootloader::Tryboot { "0 tryboot" } else { "" };
    assert_eq!(g.reboot_requested().as_deref(), Some(expected_reboot_arg), "fleetd asked for the reboot");
    if g.bootloader != Bootloader::Tryboot {
        // Tryboot's normal boot stays on the committed slot; the trial is one-shot.
        assert_eq!(st["primary_slot"], "B", "{st}");
    }
}

fn committed_cycle(bootloader: Bootloader) {
    let (mut g, _server, msg, image) = setup(bootloader);
    install_ok(&g, &msg);
    assert_eq!(&std::fs::read(g.slot("B")).unwrap()[..image.len()], &image[..]);
    assert_eq!(g.power_on(&|_| true).as_deref(), Some("B"));
    let out = g.run_once();
    assert!(out.status.success(), "{}", stderr(&out));
    let st = g.status();
    assert_eq!(st["state"], "committed", "{st}");
    assert_eq!(st["installed_version"], 8);
    assert_eq!(st["booted_slot"], "B");
    assert_eq!(st["primary_slot"], "B");
    assert_eq!(st["slots"]["B"]["state"], "good");
    assert_eq!(st["slots"]["B"]["version"], 8);
    assert_eq!(st["last_error"], serde_json::Value::Null);
    // The next power-on stays on the committed slot.
    assert_eq!(g.power_on(&|_| true).as_deref(), Some("B"));
}

fn health_failure_rolls_back(bootloader: Bootloader) {
    let (mut g, _server, msg, _) = setup(bootloader);
    install_ok(&g, &msg);
    g.set_health(false);
    assert_eq!(g.power_on(&|_| true).as_deref(), Some("B"));
    g.run_once();
    let st = g.status();
    assert_eq!(st["state"], "rolled-back", "{st}");
    assert!(st["last_error"].as_str().unwrap().contains("health-check-failed"), "{st}");
    assert_eq!(st["slots"]["B"]["state"], "bad");
    // fleetd asked for a reboot; the bootloader now picks the old slot.
    assert_eq!(g.power_on(&|_| true).as_deref(), Some("A"));
    g.run_once();
    let st = g.status();
    assert_eq!(st["state"], "rolled-back");
    assert_eq!(st["installed_version"], 0);
    assert_eq!(st["booted_slot"], "A");
}

fn never_boots_falls_back(bootloader: Bootloader) {
    let (mut g, _server, msg, _) = setup(bootloader);
    install_ok(&g, &msg);
    // Slot B's kernel crashes every time: the bootloader gives up on it.
    assert_eq!(g.power_on(&|slot| slot != "B").as_deref(), Some("A"));
    let out = g.run_once();
    assert!(out.status.success(), "{}", stderr(&out));
    let st = g.status();
    assert_eq!(st["state"], "rolled-back", "{st} {:?} {}", g.boot_env(), stderr(&out));
    assert!(st["last_error"].as_str().unwrap().starts_with("rolled-back"), "{st}");
    assert_eq!(st["slots"]["B"]["state"], "bad");
    assert_eq!(st["primary_slot"], "A", "{st} {:?} {}", g.boot_env(), stderr(&out));
    if g.bootloader == Bootloader::Uboot {
        // U-Boot spent all its tries on B before falling back; fw_printenv agrees.
        let env = g.boot_env();
        assert_eq!(env.get("BOOT_B_LEFT").map(String::as_str), Some("0"), "{env:?}");
        assert_eq!(env.get("BOOT_ORDER").map(String::as_str), Some("A"), "{env:?}");
        assert_eq!(env.get("bootdelay").map(String::as_str), Some("2"), "other variables kept");
    }
}

#[test]
fn grub_install_reboot_health_ok_commits() {
    committed_cycle(Bootloader::Grub);
}

#[test]
fn grub_health_failure_rolls_back() {
    health_failure_rolls_back(Bootloader::Grub);
}

#[test]
fn grub_slot_that_never_boots_falls_back() {
    never_boots_falls_back(Bootloader::Grub);
}

#[test]
fn uboot_install_reboot_health_ok_commits() {
    committed_cycle(Bootloader::Uboot);
}

#[test]
fn uboot_health_failure_rolls_back() {
    health_failure_rolls_back(Bootloader::Uboot);
}

#[test]
fn uboot_slot_that_never_boots_falls_back() {
    never_boots_falls_back(Bootloader::Uboot);
}

#[test]
fn tryboot_install_reboot_health_ok_commits() {
    committed_cycle(Bootloader::Tryboot);
}

#[test]
fn tryboot_health_failure_rolls_back() {
    health_failure_rolls_back(Bootloader::Tryboot);
}

#[test]
fn tryboot_slot_that_never_boots_falls_back() {
    never_boots_falls_back(Bootloader::Tryboot);
}

#[test]
fn mark_bad_and_mark_good_outside_a_trial_change_the_booted_slot() {
    let g = Gateway::new(Bootloader::Grub, SLOT);
    let out = g.fleetd(&["mark-bad"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(g.boot_env()["A_OK"], "0", "grub-editenv sees slot A given up");
    assert_eq!(g.status()["slots"]["A"]["state"], "bad");
    let out = g.fleetd(&["mark-good"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!((g.boot_env()["A_OK"].as_str(), g.boot_env()["A_TRY"].as_str()), ("1", "0"));
    assert_eq!(g.status()["slots"]["A"]["state"], "good");
}

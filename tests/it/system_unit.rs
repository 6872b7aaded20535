//! The package as users run it: a QEMU guest (software emulation) booting
//! Debian from a disk image with systemd as PID 1 and a real system bus,
//! which installs the project's .deb with `apt-get install` and drives the
//! shipped unit, unchanged. The host side is here; the guest side is
//! `system_unit.sh`, which fleetd-tier.service runs from a tier disk.
//!
//! The guest has slots A and B as virtio-scsi disks (`/dev/sd*`, named in
//! the config by their serials), a Raspberry Pi-style boot partition (vfat, mounted at
//! `/boot/firmware`) holding `uboot.env`, and user networking to this
//! host's broker (mosquitto, mutual TLS) and image server. This test plays
//! the bootloader between the two boots: `boot.cmd`, step by step, on the
//! environment taken out of the boot partition (tests/it/common/bootsim_uboot.rs).
//!
//! Run by `scripts/test-system systemd` (`FLEETD_SYSTEM_TESTS=1`, the guest
//! from scripts/system/build-systemd-guest, the .deb from scripts/package).

use crate::common;
use common::bootsim_uboot;
use common::cloud::{Broker, Pki, BROKER_HOST};
use common::imageserver::ImageServer;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEVICE: &str = "gw-0000";
const PROJECT: &str = "my-fleet";
const HARDWARE: &str = "rpi4-gw";
/// Twice the shipped `checkpoint_mib` (64 MiB): the download restarted
/// after the watchdog resumes from the first checkpoint with a range.
const IMAGE_SIZE: usize = 128 << 20;
const SLOT_SIZE: u64 = 160 << 20;
/// The download takes about 32 s at this rate: still running through a
/// stop, a restart and a watchdog kill past the checkpoint.
const IMAGE_RATE: u64 = 4 << 20;
const ENV_SIZE: usize = 0x4000;
const VERSION: u64 = 3;
/// The guest's view of this host under QEMU's user networking.
const HOST_FROM_GUEST: &str = "10.0.2.2";
/// One boot: about 25 s to multi-user under TCG, the install, the
/// watchdog's 60 s and the rest of the download; this catches a hang.
const BOOT_DEADLINE: Duration = Duration::from_secs(600);
const MARK: &str = "FLEETD-TIER ";

#[test]
fn systemd_runs_the_package_the_bus_policy_and_an_install() {
    if std::env::var_os("FLEETD_SYSTEM_TESTS").is_none() {
        eprintln!("SKIP: the systemd tier runs from scripts/test-system");
        return;
    }
    let guest = PathBuf::from(std::env::var("FLEETD_SYSTEMD_GUEST_DIR").expect("FLEETD_SYSTEMD_GUEST_DIR"));
    let deb = PathBuf::from(std::env::var("FLEETD_DEB").expect("FLEETD_DEB (scripts/package)"));
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let tier = dir.join("tier");
    std::fs::create_dir_all(&tier).unwrap();

    // The cloud: a broker on loopback (the guest reaches it as 10.0.2.2,
    // named broker.test as in its certificate) and the image server.
    let pki = Pki::new(&dir.join("pki"), "127.0.0.1".parse().unwrap());
    let broker_port = free_port();
    let _broker =
        Broker::start_local(&pki, &dir.join("broker"), broker_port, &[(DEVICE, PROJECT, "all")], None);
    let (cert, key) = pki.client(DEVICE);
    let server = ImageServer::start();
    server.set_rate(Some(IMAGE_RATE));
    let port = server.base.rsplit(':').next().unwrap().to_string();

    // The update: signed by the fleet key and co-signed, for this device.
    let keys = dir.join("keys");
    for name in ["fleet", "cosigner"] {
        ok(fleetctl().args(["keygen", "--out"]).arg(&keys).args(["--name", name]));
        std::fs::copy(keys.join(format!("{name}.pub.pem")), tier.join(format!("{name}.pub.pem"))).unwrap();
    }
    let image: Vec<u8> = (0..IMAGE_SIZE).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let image_file = dir.join("v3.img");
    std::fs::write(&image_file, &image).unwrap();
    server.add("/v3.img", image.clone());
    let url = format!("http://{HOST_FROM_GUEST}:{port}/v3.img");
    let signed = dir.join("update.fleet.json");
    let version = VERSION.to_string();
    ok(fleetctl()
        .args(["sign", "--kid", "fleet", "--key"])
        .arg(keys.join("fleet.key.pem"))
        .args(["--project", PROJECT, "--hardware", HARDWARE, "--device", DEVICE, "--url", &url])
        .arg("--image")
        .arg(&image_file)
        .args(["--name", "2026.12.0", "--version", &version, "--out"])
        .arg(&signed));
    ok(fleetctl()
        .args(["cosign", "--kid", "cosigner", "--key"])
        .arg(keys.join("cosigner.key.pem"))
        .arg("--out")
        .arg(tier.join("update.json"))
        .arg(&signed));
    let jti = fleetd::trust::peek_jti(&std::fs::read(tier.join("update.json")).unwrap()).unwrap();

    // The disks: slot A holds the running system's bytes, B is empty.
    let slot_a = dir.join("slot-a.img");
    let slot_b = dir.join("slot-b.img");
    let running: Vec<u8> = (0..SLOT_SIZE).map(|i| (i.wrapping_mul(40_503) >> 7) as u8).collect();
    std::fs::write(&slot_a, &running).unwrap();
    std::fs::File::create(&slot_b).unwrap().set_len(SLOT_SIZE).unwrap();
    let running_sha = sha256_hex(&running);
    let running_head_sha = sha256_hex(&running[..16 << 20]);
    let checkpoint = fleetd::config::Update::default().checkpoint_mib << 20;
    assert_eq!(checkpoint * 2, IMAGE_SIZE as u64, "the image spans two checkpoints");

    // The boot partition, as on a Pi: vfat, uboot.env in one copy.
    let env = dir.join("uboot.env");
    let env_config = dir.join("fw_env.config");
    std::fs::write(&env, vec![0u8; ENV_SIZE]).unwrap();
    std::fs::write(&env_config, format!("{} 0x0 {ENV_SIZE:#x}\n", env.display())).unwrap();
    fleetd::boot::uboot::initialize(
        &env_config,
        &[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")],
    )
    .unwrap();
    let boot = dir.join("boot.img");
    sh(&format!("mkfs.vfat -n BOOT -C {} 32768 > /dev/null", boot.display()));
    std::fs::write(tier.join("fw_env.config"), format!("/boot/firmware/uboot.env 0x0000 {ENV_SIZE:#x}\n"))
        .unwrap();

    // The tier disk: the package, the script, the board's files.
    std::fs::copy(&deb, tier.join(deb.file_name().unwrap())).unwrap();
    std::fs::copy(root().join("tests/it/system_unit.sh"), tier.join("run")).unwrap();
    std::fs::copy(&pki.ca_pem, tier.join("mqtt-ca.pem")).unwrap();
    std::fs::copy(&cert, tier.join("cert.pem")).unwrap();
    std::fs::copy(&key, tier.join("key.pem")).unwrap();
    let wedge_after = checkpoint + (4 << 20);
    // What the download takes at the server's rate, twice over.
    let install_bound = 2 * IMAGE_SIZE as u64 / IMAGE_RATE + 60;
    std::fs::write(
        tier.join("tier.env"),
        format!(
            "JTI={jti}\nVERSION={VERSION}\nSLOT_A_HEAD_SHA256={running_head_sha}\n\
             WEDGE_AFTER_BYTES={wedge_after}\n\
             INSTALL_BOUND_S={install_bound}\nBROKER_HOST={BROKER_HOST}\nBROKER_ADDRESS={HOST_FROM_GUEST}\nBROKER_PORT={broker_port}\n"
        ),
    )
    .unwrap();
    let tier_img = dir.join("tier.img");
    sh(&format!(
        "mke2fs -q -t ext4 -L FLEETD-TIER -d {} {} 64M > /dev/null",
        tier.display(),
        tier_img.display()
    ));
    let root_img = dir.join("root.img");
    sh(&format!("cp --sparse=always {} {}", guest.join("root.img").display(), root_img.display()));
    let disks =
        Disks { root: root_img, boot, tier: tier_img, slot_a: slot_a.clone(), slot_b: slot_b.clone() };

    // Boot 1: the bootloader picks A; the guest installs, and fleetd reboots it.
    let slot = play_bootloader(&disks.boot, &env, &env_config);
    assert_eq!(slot, "A");
    let first = boot_guest(&guest, &disks, &slot, 1, &dir.join("serial-1.log"));
    first.assert_no_failure();
    assert!(first.rebooted, "boot 1 did not end in the reboot fleetd asks for (serial console above)");
    assert_eq!(sha256_hex(&std::fs::read(&slot_a).unwrap()), running_sha, "the running slot A was written");
    let written = std::fs::read(&slot_b).unwrap();
    assert!(written[..IMAGE_SIZE] == image[..], "slot B does not hold the image");
    let served = server.log();
    assert!(
        served.iter().filter(|s| s.path == "/v3.img").count() >= 3,
        "three downloads (start, after the stop, after the watchdog): {served:?}"
    );
    assert!(
        served.iter().any(|s| s.path == "/v3.img" && s.range_start == checkpoint),
        "no download resumed from the checkpoint: {served:?}"
    );

    // Boot 2: the bootloader takes the trial slot B; fleetd commits it.
    let slot = play_bootloader(&disks.boot, &env, &env_config);
    assert_eq!(slot, "B", "the environment fleetd wrote does not boot B");
    let second = boot_guest(&guest, &disks, &slot, 2, &dir.join("serial-2.log"));
    second.assert_no_failure();
    assert!(second.passed, "boot 2 did not pass (serial console above)");
    assert_eq!(sha256_hex(&std::fs::read(&slot_a).unwrap()), running_sha, "slot A was written in boot 2");
    sh(&format!("mcopy -o -i {} ::uboot.env {}", disks.boot.display(), env.display()));
    let vars = bootsim_uboot::printenv(&env_config);
    assert_eq!(vars.get("BOOT_ORDER").map(String::as_str), Some("B A"), "{vars:?}");
    eprintln!("systemd tier: boot 1 {} s, boot 2 {} s", first.took.as_secs(), second.took.as_secs());
}

struct Disks {
    root: PathBuf,
    boot: PathBuf,
    tier: PathBuf,
    slot_a: PathBuf,
    slot_b: PathBuf,
}

struct Boot {
    lines: Vec<String>,
    rebooted: bool,
    passed: bool,
    took: Duration,
}

impl Boot {
    fn assert_no_failure(&self) {
        let failed: Vec<&String> =
            self.lines.iter().filter(|l| l.starts_with("FAIL") || l.starts_with("CRASH")).collect();
        assert!(failed.is_empty(), "the guest failed: {failed:?} (serial console above)");
    }
}

/// U-Boot's part: the environment out of the boot partition, one run of
/// boot.cmd over it (real fw_printenv/fw_setenv), the result put back.
fn play_bootloader(boot: &Path, env: &Path, env_config: &Path) -> String {
    if sh_ok(&format!("mdir -i {} ::uboot.env > /dev/null 2>&1", boot.display())) {
        sh(&format!("mcopy -o -i {} ::uboot.env {}", boot.display(), env.display()));
    }
    let slot = bootsim_uboot::run_boot_script(env_config).expect("boot.cmd found no slot to boot");
    sh(&format!("mcopy -o -i {} {} ::uboot.env", boot.display(), env.display()));
    slot
}

fn boot_guest(guest: &Path, disks: &Disks, slot: &str, phase: u32, serial: &Path) -> Boot {
    let drive = |file: &Path, rest: &str| format!("file={},format=raw,{rest}", file.display());
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "1024"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initrd.img"))
        .arg("-append")
        .arg(format!(
            "root=/dev/vda rw console=ttyS0 systemd.show_status=auto fleetd.slot={slot} fleetd.tier={phase}"
        ))
        .args(["-drive", &drive(&disks.root, "if=virtio")])
        .args(["-drive", &drive(&disks.boot, "if=virtio")])
        .args(["-drive", &drive(&disks.tier, "if=virtio,readonly=on")])
        .args(["-device", "virtio-scsi-pci,id=scsi"])
        .args(["-drive", &drive(&disks.slot_a, "if=none,id=slota")])
        .args(["-device", "scsi-hd,drive=slota,bus=scsi.0,scsi-id=0,lun=0,serial=fleetd-slot-a"])
        .args(["-drive", &drive(&disks.slot_b, "if=none,id=slotb")])
        .args(["-device", "scsi-hd,drive=slotb,bus=scsi.0,scsi-id=1,lun=0,serial=fleetd-slot-b"])
        .args(["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"])
        .args(["-display", "none", "-serial", &format!("file:{}", serial.display()), "-monitor", "none"])
        .arg("-no-reboot")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // A file: an unread pipe would stall QEMU once full.
        .stderr(std::fs::File::create(serial.with_extension("qemu.err")).unwrap())
        .spawn()
        .expect("qemu-system-x86_64");
    let timed_out = loop {
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        if started.elapsed() > BOOT_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default()).replace('\r', "");
    let qemu_said = std::fs::read_to_string(serial.with_extension("qemu.err")).unwrap_or_default();
    eprintln!("---- boot {phase} (slot {slot}), {} s:\n{text}\nqemu: {qemu_said}", took.as_secs());
    assert!(!timed_out, "boot {phase} did not end within {BOOT_DEADLINE:?}");
    let lines: Vec<String> =
        text.lines().filter_map(|l| l.trim().strip_prefix(MARK)).map(str::to_string).collect();
    Boot {
        passed: lines.iter().any(|l| l == "RESULT pass"),
        rebooted: text.contains("reboot: Restarting system"),
        lines,
        took,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    fleetd::trust::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn sh_ok(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(cmd).status().map(|s| s.success()).unwrap_or(false)
}

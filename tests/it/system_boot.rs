//! The shipped boot scripts on real bootloaders under QEMU (software
//! emulation): U-Boot with its environment in `uboot.env` on a FAT
//! partition, as on a Raspberry Pi, and GRUB (EFI, OVMF) with its grubenv
//! on the ESP. Only each script's board section is replaced, by one that
//! prints the chosen slot on the serial console and resets. Each QEMU run
//! is one boot; between boots the environment file is copied out of the FAT
//! partition with mtools, fleetd reads and writes it through its config
//! (`fw_env.config`, `grubenv`) as a device does, and it is copied back.
//!
//! `scripts/test-system` runs these (tiers `u-boot` and `grub`): it builds
//! and caches U-Boot and sets `FLEETD_SYSTEM_TESTS=1`. Without it they skip.

use crate::common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Where the FAT partition starts on the disk (sectors 2048..).
const PART_OFFSET: u64 = 1 << 20;
/// U-Boot's CONFIG_ENV_SIZE, the size `mkenvimage -s` makes.
const UBOOT_ENV_SIZE: u64 = 0x40000;
const ATTEMPTS: u32 = 3;
/// A boot under TCG takes a few seconds; this only catches a hung guest.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const BOARD_BEGIN: &str = "# --- fleetd: board section begin ---";
const BOARD_END: &str = "# --- fleetd: board section end ---";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Loader {
    Uboot,
    Grub,
}

#[derive(Debug, PartialEq, Eq)]
enum Boot {
    /// The bootloader chose this slot.
    Slot(String),
    /// It found nothing to boot, restored attempts and reset (U-Boot).
    Reset,
}

/// Replaces each board section of a shipped script, in order.
fn with_board_sections(script: &str, sections: &[&str]) -> String {
    let mut out = String::new();
    let mut rest = script;
    for section in sections {
        let begin = rest.find(BOARD_BEGIN).expect("a board section begins");
        let end = rest[begin..].find(BOARD_END).expect("a board section ends") + begin + BOARD_END.len();
        out.push_str(&rest[..begin]);
        out.push_str(section);
        rest = &rest[end..];
    }
    assert!(!rest.contains(BOARD_BEGIN), "more board sections than replacements");
    out.push_str(rest);
    out
}

fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}{}", stdout(&out), stderr(&out));
    out
}

struct Machine {
    loader: Loader,
    dev: Device,
    disk: PathBuf,
    mnt: PathBuf,
    mounted: bool,
    booted: String,
    boots: u32,
    /// Every slot the bootloader chose, in order.
    history: Vec<Boot>,
}

impl Machine {
    /// `None` (after saying why) where the tier cannot run.
    fn new(loader: Loader) -> Option<Machine> {
        if std::env::var_os("FLEETD_SYSTEM_TESTS").is_none() {
            eprintln!("SKIP: the real-bootloader tier runs from scripts/test-system");
            return None;
        }
        let dev = Device::with_slot_size(8 << 20);
        let disk = dev.path().join("disk.img");
        let mnt = dev.path().join("boot");
        std::fs::create_dir_all(&mnt).unwrap();
        let mut m = Machine {
            loader,
            dev,
            disk,
            mnt,
            mounted: false,
            booted: "A".into(),
            boots: 0,
            history: Vec::new(),
        };
        m.make_disk();
        m.mount();
        m.write_config();
        m.set_health();
        Some(m)
    }

    fn path(&self) -> &Path {
        self.dev.path()
    }

    /// A 64 MiB disk, one FAT partition: the boot files of the real loader,
    /// the shipped script with the test board section, and its environment.
    fn make_disk(&self) {
        let dir = self.path();
        sh(Command::new("truncate").args(["-s", "64M"]).arg(&self.disk));
        let mut sfdisk = Command::new("sfdisk");
        sfdisk.arg("-q").arg(&self.disk).stdin(std::process::Stdio::piped());
        let mut child = sfdisk.spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"label: dos\nstart=2048, type=c\n").unwrap();
        assert!(child.wait().unwrap().success());
        sh(Command::new("mkfs.vfat").args(["-F", "32", "--offset", "2048"]).arg(&self.disk).arg("64512"));
        let fat = format!("{}@@{PART_OFFSET}", self.disk.display());
        let root = crate::common::root();
        match self.loader {
            Loader::Uboot => {
                let shipped = std::fs::read_to_string(root.join("packaging/boot/uboot/boot.cmd")).unwrap();
                let script = with_board_sections(
                    &shipped,
                    &[
                        "slot_A_root=test-a\nslot_A_dev=none\nslot_B_root=test-b\nslot_B_dev=none\n",
                        "echo \"FLEETD-BOOTED ${fleetd_slot}\"\nreset\n",
                    ],
                );
                std::fs::write(dir.join("boot.cmd"), script).unwrap();
                sh(Command::new("mkimage")
                    .args(["-A", "arm64", "-T", "script", "-C", "none", "-d"])
                    .arg(dir.join("boot.cmd"))
                    .arg(dir.join("boot.scr")));
                // What the board's image build puts in uboot.env: how to find
                // the script, and fleetd's variables.
                std::fs::write(
                    dir.join("env.txt"),
                    format!(
                        "bootcmd=load virtio 0:1 ${{scriptaddr}} boot.scr; source ${{scriptaddr}}\n\
                         scriptaddr=0x40200000\nbootdelay=0\nBOOT_ORDER=A B\nBOOT_A_LEFT={ATTEMPTS}\nBOOT_B_LEFT={ATTEMPTS}\n"
                    ),
                )
                .unwrap();
                sh(Command::new("mkenvimage")
                    .args(["-s", &format!("{UBOOT_ENV_SIZE:#x}"), "-o"])
                    .arg(dir.join("uboot.env"))
                    .arg(dir.join("env.txt")));
                sh(Command::new("mcopy")
                    .arg("-i")
                    .arg(&fat)
                    .arg(dir.join("boot.scr"))
                    .arg(dir.join("uboot.env"))
                    .arg("::/"));
            }
            Loader::Grub => {
                let shipped = std::fs::read_to_string(root.join("packaging/boot/grub/grub.cfg")).unwrap();
                let entries: String = ["A", "B"]
                    .iter()
                    .map(|s| format!("menuentry \"Slot {s}\" --id slot-{s} {{\n    echo \"FLEETD-BOOTED {s}\"\n    halt\n}}\n"))
                    .collect();
                std::fs::write(dir.join("grub.cfg"), with_board_sections(&shipped, &[&entries])).unwrap();
                // The EFI image only finds the ESP and reads the shipped file there.
                std::fs::write(
                    dir.join("memdisk.cfg"),
                    "set root=(hd0,msdos1)\nset prefix=($root)/boot/grub\nconfigfile $prefix/grub.cfg\n",
                )
                .unwrap();
                let modules = "part_msdos fat loadenv echo test halt configfile normal";
                sh(Command::new("grub-mkstandalone")
                    .args(["-O", "x86_64-efi", "--locales=", "--fonts=", "--themes="])
                    .arg(format!("--modules={modules}"))
                    .arg(format!("--install-modules={modules}"))
                    .arg("-o")
                    .arg(dir.join("BOOTX64.EFI"))
                    .arg(format!("boot/grub/grub.cfg={}", dir.join("memdisk.cfg").display())));
                sh(Command::new("mmd").arg("-i").arg(&fat).args([
                    "::/EFI",
                    "::/EFI/BOOT",
                    "::/boot",
                    "::/boot/grub",
                ]));
                sh(Command::new("mcopy")
                    .arg("-i")
                    .arg(&fat)
                    .arg(dir.join("BOOTX64.EFI"))
                    .arg("::/EFI/BOOT/"));
                sh(Command::new("mcopy").arg("-i").arg(&fat).arg(dir.join("grub.cfg")).arg("::/boot/grub/"));
            }
        }
    }

    /// The boot environment's file, inside the FAT partition.
    fn env_file(&self) -> &'static str {
        match self.loader {
            Loader::Uboot => "uboot.env",
            Loader::Grub => "boot/grub/grubenv",
        }
    }

    /// Brings the environment file out of the FAT partition into `mnt`,
    /// where fleetd reads and writes it (mtools: no loop mount needed).
    fn mount(&mut self) {
        if !self.mounted {
            let local = self.mnt.join(self.env_file());
            std::fs::create_dir_all(local.parent().unwrap()).unwrap();
            let fat = format!("{}@@{PART_OFFSET}", self.disk.display());
            let inside = format!("::/{}", self.env_file());
            let out =
                Command::new("mcopy").args(["-n", "-o", "-i", &fat, &inside]).arg(&local).output().unwrap();
            // A fresh GRUB disk has no grubenv until fleetd writes one.
            if !out.status.success() {
                let _ = std::fs::remove_file(&local);
            }
            self.mounted = true;
        }
    }

    /// Puts the environment file back, as fleetd left it.
    fn unmount(&mut self) {
        if self.mounted {
            let local = self.mnt.join(self.env_file());
            if local.exists() {
                let fat = format!("{}@@{PART_OFFSET}", self.disk.display());
                sh(Command::new("mcopy")
                    .args(["-o", "-i", &fat])
                    .arg(&local)
                    .arg(format!("::/{}", self.env_file())));
            }
            self.mounted = false;
        }
    }

    /// fleetd's config: the environment on the mounted partition, the slot
    /// the bootloader chose (as the kernel command line would say).
    fn write_config(&self) {
        let boot = match self.loader {
            Loader::Uboot => {
                std::fs::write(
                    self.path().join("fw_env.config"),
                    format!("{} 0x0 {UBOOT_ENV_SIZE:#x}\n", self.mnt.join("uboot.env").display()),
                )
                .unwrap();
                format!("backend = \"uboot\"\nenv_config = \"fw_env.config\"\nattempts = {ATTEMPTS}\nbooted_slot = \"{}\"", self.booted)
            }
            Loader::Grub => format!(
                "backend = \"grub\"\ngrubenv = {:?}\nbooted_slot = \"{}\"",
                self.mnt.join("boot/grub/grubenv"),
                self.booted
            ),
        };
        let text = fleetd_fixture::DeviceConfig {
            trust: "allow_http = true".into(),
            slots: vec![("A".into(), "slot-a.img".into(), None), ("B".into(), "slot-b.img".into(), None)],
            boot: format!("{boot}\nboot_id_file = \"boot_id\""),
            update: Some("reboot = \"none\"\nretry_base_ms = 50\ncheckpoint_mib = 1".into()),
            health: Some("command = \"health-check\"\ntimeout_s = 20".into()),
            ..Default::default()
        }
        .to_toml();
        std::fs::write(self.dev.config(), text).unwrap();
        std::fs::write(self.path().join("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
    }

    /// A health check that passes: a slot that reaches fleetd is healthy.
    fn set_health(&self) {
        let script = self.path().join("health-check");
        std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// One power-on: the real bootloader runs its script against the
    /// environment on the disk and prints its choice.
    fn power_on(&mut self) -> Boot {
        self.unmount();
        let serial = self.path().join(format!("serial-{}.log", self.boots + 1));
        let mut qemu = match self.loader {
            Loader::Uboot => {
                let bin = std::env::var("FLEETD_UBOOT_BIN").expect("FLEETD_UBOOT_BIN (scripts/test-system)");
                let mut c = Command::new("qemu-system-aarch64");
                c.args(["-M", "virt", "-cpu", "cortex-a57", "-m", "512", "-bios", &bin]);
                c
            }
            Loader::Grub => {
                let vars = self.path().join("OVMF_VARS.fd");
                if !vars.exists() {
                    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
                }
                let mut c = Command::new("qemu-system-x86_64");
                c.args(["-machine", "q35", "-accel", "tcg", "-m", "256"])
                    .args(["-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"])
                    .arg("-drive")
                    .arg(format!("if=pflash,format=raw,file={}", vars.display()));
                c
            }
        };
        qemu.args(["-nographic", "-no-reboot", "-nic", "none", "-drive"])
            .arg(format!("file={},format=raw,if=virtio", self.disk.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&serial).unwrap())
            .stderr(std::process::Stdio::null());
        let mut child = qemu.spawn().unwrap();
        let deadline = Instant::now() + BOOT_DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the guest never finished booting:\n{}",
                    std::fs::read_to_string(&serial).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = String::from_utf8_lossy(&std::fs::read(&serial).unwrap()).replace('\r', "");
        assert!(status.success(), "qemu: {status}\n{text}");
        let boot = match text.lines().find_map(|l| l.trim().strip_prefix("FLEETD-BOOTED ")) {
            Some(slot) => Boot::Slot(slot.trim().to_string()),
            None if text.contains("no slot in BOOT_ORDER has attempts left") => Boot::Reset,
            None => panic!("no slot chosen:\n{text}"),
        };
        self.boots += 1;
        if let Boot::Slot(slot) = &boot {
            self.booted = slot.clone();
        }
        self.history.push(match &boot {
            Boot::Slot(s) => Boot::Slot(s.clone()),
            Boot::Reset => Boot::Reset,
        });
        eprintln!("power-on {}: {boot:?}", self.boots);
        self.mount();
        self.write_config();
        boot
    }

    /// Powers on until a slot is chosen (U-Boot resets once when nothing
    /// has attempts left).
    fn boot_a_slot(&mut self) -> String {
        for _ in 0..3 {
            if let Boot::Slot(slot) = self.power_on() {
                return slot;
            }
        }
        panic!("no slot booted in three power-ons: {:?}", self.history);
    }

    fn fleetd(&self, args: &[&str]) -> Output {
        run(fleetd().args(args).arg("--config").arg(self.dev.config()))
    }

    /// The boot-time run of the unit: confirm, resume, health, commit.
    fn boot_time_run(&self) {
        let out = self.fleetd(&["run", "--once"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    fn status(&self) -> serde_json::Value {
        let out = self.fleetd(&["status", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The environment as the loader's own host tool reads it.
    fn env(&self) -> BTreeMap<String, String> {
        let out = match self.loader {
            Loader::Uboot => sh(Command::new("fw_printenv").arg("-c").arg(self.path().join("fw_env.config"))),
            Loader::Grub => {
                sh(Command::new("grub-editenv").arg(self.mnt.join("boot/grub/grubenv")).arg("list"))
            }
        };
        stdout(&out)
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect()
    }

    fn message(&self, server: &common::imageserver::ImageServer, version: u64, size: usize) -> PathBuf {
        let image = common::gateway::image_bytes(size, version);
        let file = self.path().join(format!("v{version}.img"));
        std::fs::write(&file, &image).unwrap();
        let url = server.add(&format!("/v{version}.img"), image);
        self.dev.cosigned(
            &format!("v{version}"),
            &["--url", &url, "--image", file.to_str().unwrap(), "--version", &version.to_string()],
        )
    }

    fn install(&self, message: &Path) {
        let out = run(fleetd().args(["install", "--config"]).arg(self.dev.config()).arg(message));
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// The first power-on of a fresh device: fleetd writes the environment
/// (U-Boot's image build did; GRUB's grubenv comes from fleetd here), the
/// loader boots A, fleetd confirms it.
fn first_boot(loader: Loader) -> Option<Machine> {
    let mut m = Machine::new(loader)?;
    if loader == Loader::Grub {
        fleetd::boot::grub::GrubEnv::initialize(&m.mnt.join("boot/grub/grubenv"), &["A".into(), "B".into()])
            .unwrap();
    }
    assert_eq!(m.boot_a_slot(), "A");
    m.boot_time_run();
    Some(m)
}

/// install → the trial boot picks B → the health check commits it → B stays.
fn install_trial_commit(loader: Loader) {
    let Some(mut m) = first_boot(loader) else { return };
    let server = common::imageserver::ImageServer::start();
    m.install(&m.message(&server, 2, 2 << 20));
    assert_eq!(m.status()["state"], "reboot-pending");
    assert_eq!(m.boot_a_slot(), "B", "the trial boot: {:?}", m.env());
    m.boot_time_run();
    let status = m.status();
    assert_eq!(status["state"], "committed", "{status}");
    assert_eq!(status["installed_version"], 2);
    for _ in 0..2 {
        assert_eq!(m.boot_a_slot(), "B", "a committed slot stays: {:?}", m.env());
        m.boot_time_run();
    }
    match loader {
        Loader::Uboot => assert_eq!(m.env().get("BOOT_B_LEFT").map(String::as_str), Some("3")),
        Loader::Grub => assert_eq!(m.env().get("B_TRY").map(String::as_str), Some("0")),
    }
}

/// install → B boots but never reaches fleetd (or fails its health check)
/// → after its attempts the loader falls back to A → fleetd records the
/// rollback and A stays.
fn install_never_good_falls_back(loader: Loader) {
    let Some(mut m) = first_boot(loader) else { return };
    let server = common::imageserver::ImageServer::start();
    m.install(&m.message(&server, 2, 2 << 20));
    let tries = match loader {
        Loader::Uboot => ATTEMPTS,
        Loader::Grub => 1, // grub.cfg gives a new slot one try
    };
    for n in 0..tries {
        assert_eq!(m.boot_a_slot(), "B", "try {} of {tries}: {:?}", n + 1, m.env());
        // The new system crashes before fleetd runs: nothing is confirmed.
    }
    assert_eq!(m.boot_a_slot(), "A", "the fallback after {tries} failed tries: {:?}", m.env());
    m.boot_time_run();
    let status = m.status();
    assert_eq!(status["state"], "rolled-back", "{status}");
    assert_eq!(status["installed_version"], 0);
    for _ in 0..2 {
        assert_eq!(m.boot_a_slot(), "A", "the given-up slot never comes back: {:?}", m.env());
        m.boot_time_run();
    }
}

/// Power cuts mid-download, and boots that never reach fleetd: the
/// half-written slot is never chosen, also once the running slot's
/// attempts run out (U-Boot's reset branch must not resurrect it).
fn power_cuts_mid_download_never_boot_the_half_written_slot(loader: Loader) {
    let Some(mut m) = first_boot(loader) else { return };
    let server = common::imageserver::ImageServer::start();
    server.set_rate(Some(1 << 20));
    let message = m.message(&server, 2, 6 << 20);
    for cut in 0..2 {
        let mut install = fleetd()
            .args(["install", "--config"])
            .arg(m.dev.config())
            .arg(&message)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // The cut comes after a checkpoint is on disk (a real download in progress).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let written = std::fs::read(m.dev.state_dir().join("state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|s| s["job"]["written"].as_u64())
                .unwrap_or(0);
            if written > (cut as u64) << 20 {
                break;
            }
            assert!(Instant::now() < deadline, "no checkpoint");
            std::thread::sleep(Duration::from_millis(20));
        }
        install.kill().unwrap();
        let _ = install.wait();
        // Boots that never reach fleetd: twice what the running slot has
        // attempts for, so U-Boot's reset branch runs and is run past.
        for _ in 0..2 * (ATTEMPTS + 1) {
            if let Boot::Slot(slot) = m.power_on() {
                assert_eq!(slot, "A", "the half-written slot booted: {:?}\n{:?}", m.env(), m.history);
            }
        }
    }
    assert!(m.history.iter().all(|b| *b != Boot::Slot("B".into())), "{:?}", m.history);
    // fleetd's next start resumes the download and finishes the install.
    server.set_rate(None);
    m.install(&message);
    assert_eq!(m.status()["state"], "reboot-pending");
    assert_eq!(m.boot_a_slot(), "B");
    m.boot_time_run();
    assert_eq!(m.status()["state"], "committed");
}

#[test]
fn uboot_install_trial_commit() {
    install_trial_commit(Loader::Uboot);
}

#[test]
fn uboot_install_never_good_falls_back() {
    install_never_good_falls_back(Loader::Uboot);
}

#[test]
fn uboot_power_cuts_mid_download() {
    power_cuts_mid_download_never_boot_the_half_written_slot(Loader::Uboot);
}

#[test]
fn grub_install_trial_commit() {
    install_trial_commit(Loader::Grub);
}

#[test]
fn grub_install_never_good_falls_back() {
    install_never_good_falls_back(Loader::Grub);
}

#[test]
fn grub_power_cuts_mid_download() {
    power_cuts_mid_download_never_boot_the_half_written_slot(Loader::Grub);
}

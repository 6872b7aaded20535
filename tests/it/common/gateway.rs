//! A simulated gateway for install tests: file-backed slots, a real boot
//! environment read and written by the real tools through a boot simulator,
//! and `fleetd` run as a process the way systemd would, once per "boot".

use super::*;
use std::process::Output;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootloader {
    Grub,
    /// Redundant environment, read and written by the real fw_printenv/fw_setenv.
    Uboot,
    /// Raspberry Pi firmware: autoboot.txt and a one-shot tryboot flag.
    Tryboot,
}

pub const ENV_SIZE: usize = 0x4000;
pub const ATTEMPTS: u32 = 3;

/// Slot → boot partition number (tryboot).
pub fn partitions() -> Vec<(String, u32)> {
    vec![("A".into(), 2), ("B".into(), 3)]
}

pub struct Gateway {
    pub dev: Device,
    pub bootloader: Bootloader,
    pub booted: String,
    boots: u32,
    pub extra_config: String,
    /// `update.give_up_after_s`: 0 gives up after the retries alone.
    pub give_up_after_s: u64,
}

impl Gateway {
    pub fn new(bootloader: Bootloader, slot_size: u64) -> Self {
        let dev = Device::with_slot_size(slot_size);
        let g = Self {
            dev,
            bootloader,
            booted: "A".into(),
            boots: 1,
            extra_config: String::new(),
            give_up_after_s: 0,
        };
        match bootloader {
            Bootloader::Grub => {
                fleetd::boot::grub::GrubEnv::initialize(&g.grubenv(), &["A".into(), "B".into()])
                    .expect("initialize grubenv")
            }
            Bootloader::Uboot => {
                let env = g.path().join("uboot.env");
                std::fs::write(&env, vec![0u8; 2 * ENV_SIZE]).unwrap();
                let text =
                    format!("{e} 0x0 {ENV_SIZE:#x}\n{e} {ENV_SIZE:#x} {ENV_SIZE:#x}\n", e = env.display());
                std::fs::write(g.fw_env_config(), text).unwrap();
                fleetd::boot::uboot::initialize(
                    &g.fw_env_config(),
                    &[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3"), ("bootdelay", "2")],
                )
                .expect("initialize U-Boot env");
            }
            Bootloader::Tryboot => {
                fleetd::boot::tryboot::RpiTryboot::initialize(&g.autoboot_txt(), 2, 3).expect("autoboot.txt");
                std::fs::write(g.path().join("dt-partition"), 2u32.to_be_bytes()).unwrap();
            }
        }
        g.set_health(true);
        g.write_boot_id();
        g.write_config();
        g
    }

    pub fn path(&self) -> &Path {
        self.dev.path()
    }

    pub fn grubenv(&self) -> PathBuf {
        self.path().join("grubenv")
    }

    pub fn fw_env_config(&self) -> PathBuf {
        self.path().join("fw_env.config")
    }

    pub fn autoboot_txt(&self) -> PathBuf {
        self.path().join("autoboot.txt")
    }

    fn reboot_request(&self) -> PathBuf {
        self.path().join("reboot-request")
    }

    pub fn slot(&self, name: &str) -> PathBuf {
        self.path().join(format!("slot-{}.img", name.to_lowercase()))
    }

    fn write_boot_id(&self) {
        std::fs::write(self.path().join("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
    }

    /// The health check passes or fails, as a real command.
    pub fn set_health(&self, healthy: bool) {
        let script = self.path().join("health-check");
        std::fs::write(&script, format!("#!/bin/sh\nexit {}\n", if healthy { 0 } else { 3 })).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    pub fn write_config(&self) {
        // Tryboot detects the booted slot as on a Pi (from the firmware's
        // partition number); the others are told, as a kernel cmdline would.
        let boot = match self.bootloader {
            Bootloader::Grub => format!("backend = \"grub\"\ngrubenv = \"grubenv\"\nbooted_slot = \"{}\"", self.booted),
            Bootloader::Uboot => format!(
                "backend = \"uboot\"\nenv_config = \"fw_env.config\"\nattempts = {ATTEMPTS}\nbooted_slot = \"{}\"",
                self.booted
            ),
            Bootloader::Tryboot => "backend = \"rpi-tryboot\"\nautoboot_txt = \"autoboot.txt\"\n\
                                    tryboot_partition_file = \"dt-partition\"\nbooted_slot = \"auto\""
                .to_string(),
        };
        let reboot_request = self.reboot_request();
        let text = fleetd_fixture::DeviceConfig {
            trust: "allow_http = true".into(),
            slots: vec![
                ("A".into(), "slot-a.img".into(), Some(2)),
                ("B".into(), "slot-b.img".into(), Some(3)),
            ],
            boot: format!("{boot}\nboot_id_file = \"boot_id\""),
            update: Some(format!(
                "reboot = \"command\"\n\
                 reboot_command = \"printf '%s' \\\"$FLEETD_REBOOT_ARG\\\" > '{}'\"\n\
                 retry_base_ms = 50\ngive_up_after_s = {}\ncheckpoint_mib = 1\n{}",
                reboot_request.display(),
                self.give_up_after_s,
                self.extra_config,
            )),
            health: Some("command = \"health-check\"\ntimeout_s = 20".into()),
            ..Default::default()
        }
        .to_toml();
        std::fs::write(self.dev.config(), text).unwrap();
    }

    /// A co-signed message for `image` served at `url`.
    pub fn message(&self, name: &str, url: &str, image: &Path, version: u64) -> PathBuf {
        self.dev.cosigned(
            name,
            &["--url", url, "--image", image.to_str().unwrap(), "--version", &version.to_string()],
        )
    }

    pub fn fleetd(&self, args: &[&str]) -> Output {
        run(fleetd().args(args).arg("--config").arg(self.dev.config()))
    }

    /// `fleetd install`: it ends by asking for a reboot (recorded, not done).
    pub fn install(&self, message: &Path) -> Output {
        run(fleetd().args(["install", "--config"]).arg(self.dev.config()).arg(message))
    }

    /// Whether fleetd asked for a reboot since the last power-on, and its argument.
    pub fn reboot_requested(&self) -> Option<String> {
        std::fs::read_to_string(self.reboot_request()).ok()
    }

    /// Runs `fleetd install --no-reboot` and kills it (SIGKILL: no chance to
    /// clean up) as soon as its state file satisfies `ready`, within `within`
    /// (the child is killed on a timeout too).
    pub fn kill_install_when(
        &self,
        msg: &Path,
        what: &str,
        within: std::time::Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) {
        struct KillOnDrop(std::process::Child);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _child = KillOnDrop(
            fleetd()
                .args(["install", "--no-reboot", "--config"])
                .arg(self.dev.config())
                .arg(msg)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let state_file = self.path().join("state/state.json");
        let deadline = std::time::Instant::now() + within;
        loop {
            let state = std::fs::read(&state_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .unwrap_or_default();
            if ready(&state) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    pub fn run_once(&self) -> Output {
        self.fleetd(&["run", "--once"])
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.fleetd(&["status", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Power cycle: the bootloader picks a slot (the real tools read and
    /// write its env), a new boot id, and the config names the booted slot.
    pub fn power_on(&mut self, boots_ok: &dyn Fn(&str) -> bool) -> Option<String> {
        let tryboot_flag = self.reboot_requested().is_some_and(|arg| arg.contains("tryboot"));
        let _ = std::fs::remove_file(self.reboot_request());
        let booted = match self.bootloader {
            Bootloader::Grub => bootsim_grub::power_on(&self.grubenv(), boots_ok),
            Bootloader::Uboot => bootsim_uboot::power_on(&self.fw_env_config(), boots_ok),
            Bootloader::Tryboot => bootsim_tryboot::power_on(
                &self.autoboot_txt(),
                tryboot_flag,
                &partitions(),
                &self.path().join("dt-partition"),
                boots_ok,
            ),
        };
        self.boots += 1;
        self.write_boot_id();
        if let Some(slot) = &booted {
            self.booted = slot.clone();
            self.write_config();
        }
        booted
    }

    /// The boot environment as the bootloader's own tools print it.
    pub fn boot_env(&self) -> BTreeMap<String, String> {
        match self.bootloader {
            Bootloader::Grub => bootsim_grub::list(&self.grubenv()),
            Bootloader::Uboot => bootsim_uboot::printenv(&self.fw_env_config()),
            Bootloader::Tryboot => {
                let text = std::fs::read_to_string(self.autoboot_txt()).unwrap_or_default();
                BTreeMap::from([("autoboot.txt".to_string(), text)])
            }
        }
    }
}

use std::collections::BTreeMap;

/// Deterministic pseudo-random image bytes.
pub fn image_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

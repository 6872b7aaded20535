//! A simulated gateway for install tests: file-backed slots, a real boot
//! environment read and written by the real tools through a boot simulator,
//! and `fleetd` run as a process the way systemd would, once per "boot".

use super::*;
use std::process::Output;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootloader {
    Grub,
}

pub struct Gateway {
    pub dev: Device,
    pub bootloader: Bootloader,
    pub booted: String,
    boots: u32,
    pub extra_config: String,
}

impl Gateway {
    pub fn new(bootloader: Bootloader, slot_size: u64) -> Self {
        let dev = Device::with_slot_size(slot_size);
        let g = Self { dev, bootloader, booted: "A".into(), boots: 1, extra_config: String::new() };
        match bootloader {
            Bootloader::Grub => {
                fleetd::boot::grub::GrubEnv::initialize(&g.grubenv(), &["A".into(), "B".into()])
                    .expect("initialize grubenv")
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
        let boot = match self.bootloader {
            Bootloader::Grub => "backend = \"grub\"\ngrubenv = \"grubenv\"",
        };
        let text = format!(
            r#"[device]
id = "gw-0042"
project = "acme-gateways"
hardware = "rpi4-gw"
groups = ["pilot"]
state_dir = "state"

[trust]
allow_http = true
[trust.keys]
fleet = "keys/fleet.pub.pem"
cosigner = "keys/cosigner.pub.pem"

[slots.A]
device = "slot-a.img"
[slots.B]
device = "slot-b.img"

[boot]
{boot}
booted_slot = "{booted}"
boot_id_file = "boot_id"

[update]
reboot = "none"
retry_base_ms = 50
checkpoint_mib = 1
{extra}

[health]
command = "health-check"
timeout_s = 20
"#,
            booted = self.booted,
            extra = self.extra_config,
        );
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

    pub fn install(&self, message: &Path) -> Output {
        run(fleetd().args(["install", "--no-reboot", "--config"]).arg(self.dev.config()).arg(message))
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
        let booted = match self.bootloader {
            Bootloader::Grub => bootsim_grub::power_on(&self.grubenv(), boots_ok),
        };
        self.boots += 1;
        self.write_boot_id();
        if let Some(slot) = &booted {
            self.booted = slot.clone();
            self.write_config();
        }
        booted
    }

    pub fn boot_env(&self) -> BTreeMap<String, String> {
        match self.bootloader {
            Bootloader::Grub => bootsim_grub::list(&self.grubenv()),
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

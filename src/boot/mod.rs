//! Boot control: which slot boots next, and each slot's state, behind one
//! trait with one file per backend (RAUC's layout). The backend is chosen and
//! validated once, when the configuration loads; errors carry its name.
//!
//! Architecture invariant: only this module writes the boot environment, and
//! every change is one atomic store.

pub mod grub;
pub mod script;
pub use fleetd_core::boot::slot;
pub mod tryboot;
pub mod uboot;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A slot's state as the bootloader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Bootable and confirmed (or never tried since it was made primary).
    Good,
    /// Booted for a trial and not yet confirmed, where the backend can tell.
    Trying,
    /// The bootloader will not choose it.
    Bad,
}

impl SlotState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::Trying => "trying",
            Self::Bad => "bad",
        }
    }
}

crate::error_name::named_error! {
    #[derive(Debug, thiserror::Error)]
    #[non_exhaustive]
    pub enum BootError {
        /// Reading or writing the environment's storage failed.
        #[name = "boot-env-io"]
        #[error("{backend}: {name}: {path}: {source}")]
        Io { backend: &'static str, path: PathBuf, source: std::io::Error },
        /// No valid copy of the environment (bad CRC, wrong size, garbage).
        #[name = "boot-env-corrupt"]
        #[error("{backend}: {name}: {detail}")]
        Corrupt { backend: &'static str, detail: String },
        /// The backend's own configuration (fw_env.config, slot mapping) is wrong.
        #[name = "boot-config"]
        #[error("{backend}: {name}: {detail}")]
        Config { backend: &'static str, detail: String },
        /// A slot name the backend does not know.
        #[name = "unknown-slot"]
        #[error("{backend}: {name}: {slot:?}")]
        UnknownSlot { backend: &'static str, slot: String },
        /// An external command (custom script) failed or printed something unexpected.
        #[name = "boot-command"]
        #[error("{backend}: {name}: {detail}")]
        Command { backend: &'static str, detail: String },
    }
}

/// What every boot backend offers. Slot names are the configuration's
/// (`[slots.A]` → `"A"`). Each mutating call is one atomic store of the
/// environment: after a power cut the bootloader sees all of it or none.
pub trait BootControl: Send {
    /// The backend's name, as in the config (`uboot`, `grub`, ...).
    fn backend(&self) -> &'static str;

    /// The slot the bootloader will try first on the next boot, if any.
    fn primary(&self) -> Result<Option<String>, BootError>;

    /// The slot's state as the bootloader sees it.
    fn state(&self, slot: &str) -> Result<SlotState, BootError>;

    /// Makes `slot` the first to try on the next boot with the configured
    /// number of attempts, keeping the other slot as the fallback.
    fn set_primary_for_trial(&mut self, slot: &str) -> Result<(), BootError>;

    /// Commits `slot`: it stays primary, with its attempts restored.
    fn mark_good(&mut self, slot: &str) -> Result<(), BootError>;

    /// Gives `slot` up: the bootloader will not choose it.
    fn mark_bad(&mut self, slot: &str) -> Result<(), BootError>;

    /// Makes sure `slot` cannot boot while it is being written. Most
    /// backends mark it bad; one whose bootloader can never pick the slot
    /// on its own (tryboot) need not write anything.
    fn invalidate(&mut self, slot: &str) -> Result<(), BootError> {
        self.mark_bad(slot)
    }

    /// The running slot, outside a trial, gets back what booting it spent
    /// (U-Boot's attempts, GRUB's try flag), so a device that is power-cut
    /// again and again during a download never drains its only good slot.
    /// A slot fleetd gave up on stays given up. Writes only on a change.
    fn confirm_booted(&mut self, slot: &str) -> Result<(), BootError> {
        if self.state(slot)? == SlotState::Trying {
            self.mark_good(slot)?;
        }
        Ok(())
    }

    /// The slot the bootloader reports it booted, where it can tell.
    fn booted_hint(&self) -> Result<Option<String>, BootError> {
        Ok(None)
    }

    /// The argument a trial reboot needs (Raspberry Pi tryboot: `0 tryboot`).
    fn trial_reboot_arg(&self) -> Option<&'static str> {
        None
    }
}

/// Builds the configured backend. Called once at startup; a backend that
/// cannot work with this configuration fails here, not on first use.
pub fn from_config(config: &crate::config::Config) -> Result<Box<dyn BootControl>, BootError> {
    use crate::config::BootBackend;
    let slots: Vec<String> = config.slots.keys().cloned().collect();
    let boot = &config.boot;
    Ok(match &boot.backend {
        BootBackend::Uboot { env_config, single_copy_in_place } => {
            Box::new(uboot::UbootEnv::open_with(env_config, &slots, boot.attempts, *single_copy_in_place)?)
        }
        BootBackend::Grub { grubenv } => Box::new(grub::GrubEnv::new(grubenv.clone(), &slots)?),
        BootBackend::RpiTryboot { autoboot_txt, partition_file } => {
            let mut partitions = Vec::new();
            for (name, slot) in &config.slots {
                let number =
                    slot.boot_partition.or_else(|| trailing_number(&slot.device)).ok_or_else(|| {
                        BootError::Config {
                            backend: "rpi-tryboot",
                            detail: format!(
                                "slots.{name}.boot_partition is needed: {} ends in no partition number",
                                slot.device.display()
                            ),
                        }
                    })?;
                partitions.push((name.clone(), number));
            }
            Box::new(tryboot::RpiTryboot::new(autoboot_txt.clone(), partitions, partition_file.clone())?)
        }
        BootBackend::Script { script } => Box::new(script::ScriptBoot::new(script.clone(), &slots)?),
    })
}

/// `mmcblk0p2` → 2, `sda3` → 3.
fn trailing_number(device: &std::path::Path) -> Option<u32> {
    let name = device.file_name()?.to_str()?;
    let digits: String = name.chars().rev().take_while(char::is_ascii_digit).collect();
    digits.chars().rev().collect::<String>().parse().ok()
}

/// Which slot is running: the configured name, else (for `auto`) the kernel
/// command line (`fleetd.slot=` or `rauc.slot=`), the bootloader's own word,
/// or the slot whose device is mounted at `/`.
pub fn booted_slot(config: &crate::config::Config, boot: &dyn BootControl) -> Result<String, BootError> {
    let known = |s: &str| config.slots.contains_key(s);
    if config.boot.booted_slot != "auto" {
        return Ok(config.boot.booted_slot.clone());
    }
    if let Ok(cmdline) = std::fs::read_to_string("/proc/cmdline") {
        for word in cmdline.split_whitespace() {
            if let Some(slot) = word.strip_prefix("fleetd.slot=").or_else(|| word.strip_prefix("rauc.slot="))
            {
                if known(slot) {
                    return Ok(slot.to_string());
                }
            }
        }
    }
    if let Some(slot) = boot.booted_hint()? {
        if known(&slot) {
            return Ok(slot);
        }
    }
    for (name, slot) in &config.slots {
        if crate::sys::block::device_backs_root(&slot.device) {
            return Ok(name.clone());
        }
    }
    Err(BootError::Config {
        backend: boot.backend(),
        detail: "cannot tell which slot is booted: set boot.booted_slot, or pass fleetd.slot= on the kernel command line".into(),
    })
}

/// This boot's id (changes at every boot): tells a reboot from a restart.
pub fn boot_id(config: &crate::config::Config) -> Result<String, BootError> {
    let path = &config.boot.boot_id_file;
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).map_err(|source| BootError::Io {
        backend: "boot-id",
        path: path.clone(),
        source,
    })
}

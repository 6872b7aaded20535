//! Boot control: which slot boots next, and each slot's state, behind one
//! trait with one file per backend (RAUC's layout). The backend is chosen and
//! validated once, when the configuration loads; errors carry its name.
//!
//! Architecture invariant: only this module writes the boot environment, and
//! every change is one atomic store.

pub mod grub;
pub mod script;
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

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// Reading or writing the environment's storage failed.
    #[error("{backend}: boot-env-io: {path}: {source}")]
    Io {
        backend: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// No valid copy of the environment (bad CRC, wrong size, garbage).
    #[error("{backend}: boot-env-corrupt: {detail}")]
    Corrupt {
        backend: &'static str,
        detail: String,
    },
    /// The backend's own configuration (fw_env.config, slot mapping) is wrong.
    #[error("{backend}: boot-config: {detail}")]
    Config {
        backend: &'static str,
        detail: String,
    },
    /// A slot name the backend does not know.
    #[error("{backend}: unknown-slot: {slot:?}")]
    UnknownSlot { backend: &'static str, slot: String },
    /// An external command (custom script) failed or printed something unexpected.
    #[error("{backend}: boot-command: {detail}")]
    Command {
        backend: &'static str,
        detail: String,
    },
}

impl BootError {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Io { .. } => "boot-env-io",
            Self::Corrupt { .. } => "boot-env-corrupt",
            Self::Config { .. } => "boot-config",
            Self::UnknownSlot { .. } => "unknown-slot",
            Self::Command { .. } => "boot-command",
        }
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

    /// The slot the bootloader reports it booted, where it can tell.
    fn booted_hint(&self) -> Result<Option<String>, BootError> {
        Ok(None)
    }

    /// The argument a trial reboot needs (Raspberry Pi tryboot: `0 tryboot`).
    fn trial_reboot_arg(&self) -> Option<&'static str> {
        None
    }
}

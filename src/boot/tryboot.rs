//! Raspberry Pi `tryboot` backend: `autoboot.txt` on the first FAT partition.
//!
//! ```text
//! [all]
//! tryboot_a_b=1
//! boot_partition=2      <- committed slot: every normal boot
//! [tryboot]
//! boot_partition=3      <- trial slot: one boot after `reboot "0 tryboot"`
//! ```
//!
//! The firmware clears the tryboot flag before it boots, so a crashed trial
//! comes back on the committed slot by itself. It keeps no record of tries,
//! so the states are derived from the file and the booted partition:
//!
//! | slot's partition | state |
//! | --- | --- |
//! | `[all]` | Good |
//! | `[tryboot]` only, and booted now | Trying (running the trial, unconfirmed) |
//! | `[tryboot]` only, not booted now | Good (a tryboot reboot runs it) |
//! | neither | Bad (the firmware never runs it) |
//!
//! [`Autoboot`] is the codec (no IO); [`RpiTryboot`] reads the files and
//! rewrites `autoboot.txt` atomically.

use super::slot::{Pair, Slot};
use super::{BootControl, BootError, SlotState};
use crate::fsutil;
use std::io;
use std::path::{Path, PathBuf};

const BACKEND: &str = "rpi-tryboot";
/// autoboot.txt holds a handful of lines; anything larger is not one.
const MAX_AUTOBOOT_BYTES: usize = 4096;
/// A change that keeps the file's length and fits one 512-byte sector is
/// written in place (see `write_autoboot`).
const SECTOR: usize = 512;
const ALL: &str = "all";
const TRYBOOT: &str = "tryboot";
const BOOT_PARTITION: &str = "boot_partition";
const TRYBOOT_A_B: &str = "tryboot_a_b";

/// A parsed `autoboot.txt`. Lines are kept as written; only the two
/// `boot_partition` lines are ever rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Autoboot {
    lines: Vec<String>,
    /// Line index and value of `[all] boot_partition`.
    committed: (usize, u32),
    /// Line index and value of `[tryboot] boot_partition`.
    trial: (usize, u32),
}

impl Autoboot {
    /// The canonical file fleetd provisions.
    pub fn fresh(committed: u32, trial: u32) -> Self {
        Self {
            lines: vec![
                format!("[{ALL}]"),
                format!("{TRYBOOT_A_B}=1"),
                format!("{BOOT_PARTITION}={committed}"),
                format!("[{TRYBOOT}]"),
                format!("{BOOT_PARTITION}={trial}"),
            ],
            committed: (2, committed),
            trial: (4, trial),
        }
    }

    /// Parses strictly: `[all]` must hold `tryboot_a_b=1` and one
    /// `boot_partition`, `[tryboot]` one `boot_partition` after it, and no
    /// other place may set either. Comments, blank lines, other settings and
    /// other sections are kept.
    pub fn parse(text: &str) -> Result<Self, BootError> {
        let mut lines = Vec::new();
        let mut section: Option<String> = None;
        let mut committed = None;
        let mut trial = None;
        let mut a_b = false;
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            lines.push(line.to_string());
            let at = || format!("line {}", index + 1);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = Some(name.trim().to_string());
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(corrupt(format!("{}: not a setting: {line:?}", at())));
            };
            let (key, value) = (key.trim(), value.trim());
            let slot = match (key, section.as_deref()) {
                (BOOT_PARTITION, Some(ALL)) => &mut committed,
                (BOOT_PARTITION, Some(TRYBOOT)) => &mut trial,
                (TRYBOOT_A_B, Some(ALL)) if value == "1" && !a_b => {
                    a_b = true;
                    continue;
                }
                (BOOT_PARTITION | TRYBOOT_A_B, _) => {
                    return Err(corrupt(format!(
                        "{}: {line:?} under {}: only one {TRYBOOT_A_B}=1 in [{ALL}] and one \
                         {BOOT_PARTITION} in each of [{ALL}] and [{TRYBOOT}] are understood",
                        at(),
                        section.as_deref().map_or("no section".into(), |s| format!("[{s}]"))
                    )))
                }
                _ => continue,
            };
            if slot.is_some() {
                return Err(corrupt(format!("{}: second {line:?}", at())));
            }
            let partition = value
                .parse::<u32>()
                .map_err(|_| corrupt(format!("{}: {line:?} is not a partition number", at())))?;
            *slot = Some((lines.len() - 1, partition));
        }
        if !a_b {
            return Err(corrupt(format!("[{ALL}] lacks {TRYBOOT_A_B}=1")));
        }
        let committed = committed.ok_or_else(|| corrupt(format!("[{ALL}] lacks {BOOT_PARTITION}")))?;
        let trial = trial.ok_or_else(|| corrupt(format!("[{TRYBOOT}] lacks {BOOT_PARTITION}")))?;
        // The firmware applies settings in order: an [all] line after the
        // [tryboot] one would override it on a trial boot.
        if trial.0 < committed.0 {
            return Err(corrupt(format!("[{TRYBOOT}] {BOOT_PARTITION} comes before the [{ALL}] one")));
        }
        Ok(Self { lines, committed, trial })
    }

    pub fn render(&self) -> String {
        let mut text = self.lines.join("\n");
        text.push('\n');
        text
    }

    /// The partition every normal boot runs.
    pub fn committed(&self) -> u32 {
        self.committed.1
    }

    /// The partition a tryboot reboot runs.
    pub fn trial(&self) -> u32 {
        self.trial.1
    }

    pub fn set_committed(&mut self, partition: u32) {
        self.committed.1 = partition;
        self.lines[self.committed.0] = format!("{BOOT_PARTITION}={partition}");
    }

    pub fn set_trial(&mut self, partition: u32) {
        self.trial.1 = partition;
        self.lines[self.trial.0] = format!("{BOOT_PARTITION}={partition}");
    }

    /// A slot's state given the partition booted now (see the module table).
    pub fn state_of(&self, partition: u32, booted: Option<u32>) -> SlotState {
        if partition == self.committed() {
            SlotState::Good
        } else if partition == self.trial() {
            if booted == Some(partition) {
                SlotState::Trying
            } else {
                SlotState::Good
            }
        } else {
            SlotState::Bad
        }
    }
}

/// Decodes the device-tree property: one big-endian u32.
pub fn decode_partition_property(bytes: &[u8]) -> Result<u32, BootError> {
    let array: [u8; 4] = bytes
        .try_into()
        .map_err(|_| corrupt(format!("booted partition property is {} bytes, expected 4", bytes.len())))?;
    Ok(u32::from_be_bytes(array))
}

fn corrupt(detail: String) -> BootError {
    BootError::Corrupt { backend: BACKEND, detail }
}

fn io_error(path: &Path, source: io::Error) -> BootError {
    BootError::Io { backend: BACKEND, path: path.to_path_buf(), source }
}

#[derive(Debug)]
pub struct RpiTryboot {
    autoboot_txt: PathBuf,
    /// Slot name → boot partition number; exactly two.
    partitions: Pair<u32>,
    booted_partition_file: PathBuf,
    writes: std::cell::Cell<u32>,
}

impl RpiTryboot {
    /// `partitions` maps each of the two slots to its boot partition number;
    /// `booted_partition_file` is normally
    /// `/proc/device-tree/chosen/bootloader/partition`.
    pub fn new(
        autoboot_txt: PathBuf,
        partitions: Vec<(String, u32)>,
        booted_partition_file: PathBuf,
    ) -> Result<Self, BootError> {
        let config = |detail: String| BootError::Config { backend: BACKEND, detail };
        let [(_, pa), (_, pb)] = partitions.as_slice() else {
            return Err(config(format!("tryboot needs exactly two slots, got {}", partitions.len())));
        };
        let (pa, pb) = (*pa, *pb);
        let partitions = partitions.into_iter().map(|(name, p)| (Slot::new(name), p)).collect();
        let partitions = Pair::new(partitions).map_err(config)?;
        if pa == pb || pa == 0 || pb == 0 {
            return Err(config(format!("slots need distinct non-zero boot partitions, got {pa} and {pb}")));
        }
        Ok(Self { autoboot_txt, partitions, booted_partition_file, writes: Default::default() })
    }

    /// Writes a fresh autoboot.txt for provisioning and tests.
    pub fn initialize(autoboot_txt: &Path, committed: u32, trial: u32) -> Result<(), BootError> {
        write_autoboot(autoboot_txt, &Autoboot::fresh(committed, trial))
    }

    pub fn read(&self) -> Result<Autoboot, BootError> {
        let bytes = fsutil::read_prefix(&self.autoboot_txt, MAX_AUTOBOOT_BYTES + 1)
            .map_err(|e| io_error(&self.autoboot_txt, e))?;
        if bytes.len() > MAX_AUTOBOOT_BYTES {
            return Err(corrupt(format!("autoboot.txt is larger than {MAX_AUTOBOOT_BYTES} bytes")));
        }
        let text = String::from_utf8(bytes).map_err(|_| corrupt("autoboot.txt is not UTF-8".into()))?;
        Autoboot::parse(&text)
    }

    /// The partition the firmware booted, or None where it does not say.
    pub fn booted_partition(&self) -> Result<Option<u32>, BootError> {
        match fsutil::read_prefix(&self.booted_partition_file, 5) {
            Ok(bytes) => decode_partition_property(&bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&self.booted_partition_file, e)),
        }
    }

    fn partition_of(&self, slot: &str) -> Result<u32, BootError> {
        self.partitions
            .get(slot)
            .copied()
            .ok_or_else(|| BootError::UnknownSlot { backend: BACKEND, slot: slot.to_string() })
    }

    fn slot_of(&self, partition: u32) -> Option<&str> {
        self.partitions.find(|p| *p == partition).map(Slot::as_str)
    }

    /// The partition of the slot that is not `slot`.
    fn other_partition(&self, slot: &str) -> u32 {
        self.partitions.other(slot).map_or(0, |(_, partition)| *partition)
    }

    /// Read, change, and store in one write; no write if nothing changed.
    /// An update writes the file once, at the commit: invalidating the
    /// target changes nothing (see `invalidate`), and `[tryboot]` already
    /// points at the next target after the previous commit.
    fn update(&self, change: impl FnOnce(&mut Autoboot) -> Result<(), BootError>) -> Result<(), BootError> {
        let before = self.read()?;
        let mut after = before.clone();
        change(&mut after)?;
        if after == before {
            return Ok(());
        }
        self.writes.set(self.writes.get() + 1);
        replace_autoboot(&self.autoboot_txt, &before.render(), &after.render())
    }

    /// How many times this instance wrote autoboot.txt (for tests).
    pub fn writes(&self) -> u32 {
        self.writes.get()
    }
}

fn write_autoboot(path: &Path, autoboot: &Autoboot) -> Result<(), BootError> {
    fsutil::atomic_write(path, autoboot.render().as_bytes(), 0o644).map_err(|e| io_error(path, e))
}

/// Why this is safe on vfat, which journals nothing: a rename rewrites two
/// directory entries and the FAT, and a power cut between them can leave no
/// autoboot.txt at all. Swapping `boot_partition=2` for `=3` keeps the
/// length, so when the file fits one sector the new bytes go in place: one
/// data sector (which SD cards program whole), with the directory entry
/// changing only its timestamp, never its size or first cluster. Anything
/// else (a longer number, a larger file) falls back to temp + fsync +
/// rename + fsync of the directory.
fn replace_autoboot(path: &Path, before: &str, after: &str) -> Result<(), BootError> {
    use std::os::unix::fs::FileExt;
    if before.len() == after.len() && after.len() <= SECTOR {
        let file = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| io_error(path, e))?;
        let on_disk = file.metadata().map_err(|e| io_error(path, e))?.len();
        if on_disk == after.len() as u64 {
            return file
                .write_all_at(after.as_bytes(), 0)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_error(path, e));
        }
    }
    fsutil::atomic_write(path, after.as_bytes(), 0o644).map_err(|e| io_error(path, e))
}

impl BootControl for RpiTryboot {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    /// The committed (`[all]`) slot: what a normal boot runs.
    fn primary(&self) -> Result<Option<String>, BootError> {
        let autoboot = self.read()?;
        Ok(self.slot_of(autoboot.committed()).map(str::to_string))
    }

    fn state(&self, slot: &str) -> Result<SlotState, BootError> {
        let partition = self.partition_of(slot)?;
        let autoboot = self.read()?;
        Ok(autoboot.state_of(partition, self.booted_partition()?))
    }

    /// `[tryboot]` points at the slot; `[all]` keeps the committed one, which
    /// the firmware falls back to after any failed trial boot.
    fn set_primary_for_trial(&mut self, slot: &str) -> Result<(), BootError> {
        let partition = self.partition_of(slot)?;
        self.update(|autoboot| {
            autoboot.set_trial(partition);
            Ok(())
        })
    }

    /// `[all]` becomes the slot; `[tryboot]` the other one.
    fn mark_good(&mut self, slot: &str) -> Result<(), BootError> {
        let partition = self.partition_of(slot)?;
        let other = self.other_partition(slot);
        self.update(|autoboot| {
            autoboot.set_committed(partition);
            autoboot.set_trial(other);
            Ok(())
        })
    }

    /// The firmware runs `[tryboot]` only after a reboot with the one-shot
    /// tryboot flag, which fleetd asks for only once the slot is written and
    /// verified; a normal boot, a crash or a power cut runs `[all]`. So a
    /// slot being written needs no change here, unless it is the committed
    /// one (which is running and never written: refused as in `mark_bad`).
    fn invalidate(&mut self, slot: &str) -> Result<(), BootError> {
        let partition = self.partition_of(slot)?;
        if self.read()?.committed() == partition {
            return self.mark_bad(slot);
        }
        Ok(())
    }

    /// A trial target is dropped (`[tryboot]` points at the committed slot).
    /// The committed slot cannot be marked bad: nothing else would boot.
    fn mark_bad(&mut self, slot: &str) -> Result<(), BootError> {
        let partition = self.partition_of(slot)?;
        self.update(|autoboot| {
            if autoboot.committed() == partition {
                return Err(BootError::Config {
                    backend: BACKEND,
                    detail: format!(
                        "refusing to mark {slot:?} bad: it is the committed slot \
                         ([{ALL}] {BOOT_PARTITION}={partition}) and nothing else would boot"
                    ),
                });
            }
            if autoboot.trial() == partition {
                autoboot.set_trial(autoboot.committed());
            }
            Ok(())
        })
    }

    /// The slot whose partition the firmware reports it booted.
    fn booted_hint(&self) -> Result<Option<String>, BootError> {
        let Some(partition) = self.booted_partition()? else {
            return Ok(None);
        };
        match self.slot_of(partition) {
            Some(slot) => Ok(Some(slot.to_string())),
            None => Err(BootError::Config {
                backend: BACKEND,
                detail: format!("booted from partition {partition}, which no slot names"),
            }),
        }
    }

    fn trial_reboot_arg(&self) -> Option<&'static str> {
        Some("0 tryboot")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANONICAL: &str = "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n";

    fn corrupt_name(text: &str) -> &'static str {
        Autoboot::parse(text).unwrap_err().name()
    }

    #[test]
    fn fresh_renders_the_canonical_file_and_parses_back() {
        let fresh = Autoboot::fresh(2, 3);
        assert_eq!(fresh.render(), CANONICAL);
        assert_eq!(Autoboot::parse(CANONICAL).unwrap(), fresh);
        assert_eq!((fresh.committed(), fresh.trial()), (2, 3));
    }

    #[test]
    fn rewrites_only_the_partition_lines() {
        let text = "# provisioned\n[all]\ntryboot_a_b=1\nboot_partition=2\nfoo=bar\n\n\
                    [pi4]\nx=1\n[tryboot]\nboot_partition=3\n";
        let mut autoboot = Autoboot::parse(text).unwrap();
        assert_eq!(autoboot.render(), text);
        autoboot.set_committed(3);
        autoboot.set_trial(2);
        assert_eq!(
            autoboot.render(),
            "# provisioned\n[all]\ntryboot_a_b=1\nboot_partition=3\nfoo=bar\n\n\
             [pi4]\nx=1\n[tryboot]\nboot_partition=2\n"
        );
    }

    #[test]
    fn tolerates_spaces_and_crlf() {
        let autoboot = Autoboot::parse(
            "[all]\r\ntryboot_a_b = 1\r\n boot_partition= 2\r\n[tryboot]\r\nboot_partition=3",
        )
        .unwrap();
        assert_eq!((autoboot.committed(), autoboot.trial()), (2, 3));
        assert_eq!(
            autoboot.render(),
            "[all]\ntryboot_a_b = 1\nboot_partition= 2\n[tryboot]\nboot_partition=3\n"
        );
    }

    #[test]
    fn strict_about_what_decides_the_boot() {
        for text in [
            "",
            "[all]\nboot_partition=2\n[tryboot]\nboot_partition=3\n",
            "[all]\ntryboot_a_b=0\nboot_partition=2\n[tryboot]\nboot_partition=3\n",
            "[all]\ntryboot_a_b=1\n[tryboot]\nboot_partition=3\n",
            "[all]\ntryboot_a_b=1\nboot_partition=2\n",
            "[all]\ntryboot_a_b=1\nboot_partition=2\nboot_partition=2\n[tryboot]\nboot_partition=3\n",
            "[all]\ntryboot_a_b=1\nboot_partition=two\n[tryboot]\nboot_partition=3\n",
            "[all]\ntryboot_a_b=1\nboot_partition=-1\n[tryboot]\nboot_partition=3\n",
            "boot_partition=2\n[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n",
            "[all]\ntryboot_a_b=1\nboot_partition=2\n[pi4]\nboot_partition=5\n[tryboot]\nboot_partition=3\n",
            "[tryboot]\nboot_partition=3\n[all]\ntryboot_a_b=1\nboot_partition=2\n",
            "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\ngarbage\n",
        ] {
            assert_eq!(corrupt_name(text), "boot-env-corrupt", "{text:?}");
        }
    }

    #[test]
    fn state_mapping() {
        let autoboot = Autoboot::fresh(2, 3);
        assert_eq!(autoboot.state_of(2, None), SlotState::Good);
        assert_eq!(autoboot.state_of(2, Some(2)), SlotState::Good);
        assert_eq!(autoboot.state_of(3, Some(2)), SlotState::Good);
        assert_eq!(autoboot.state_of(3, None), SlotState::Good);
        assert_eq!(autoboot.state_of(3, Some(3)), SlotState::Trying);
        let dropped = Autoboot::fresh(2, 2);
        assert_eq!(dropped.state_of(3, None), SlotState::Bad);
        assert_eq!(dropped.state_of(2, Some(2)), SlotState::Good);
    }

    #[test]
    fn partition_property_is_four_bytes_big_endian() {
        assert_eq!(decode_partition_property(&[0, 0, 0, 3]).unwrap(), 3);
        assert_eq!(decode_partition_property(&[0, 0, 1, 0]).unwrap(), 256);
        for bad in [&[][..], &[3], &[0, 0, 0, 0, 3]] {
            assert_eq!(decode_partition_property(bad).unwrap_err().name(), "boot-env-corrupt");
        }
    }

    #[test]
    fn new_validates_the_slot_mapping() {
        let p = || PathBuf::from("/nonexistent");
        let new = |parts: Vec<(&str, u32)>| {
            RpiTryboot::new(p(), parts.into_iter().map(|(s, n)| (s.to_string(), n)).collect(), p())
        };
        assert!(new(vec![("A", 2), ("B", 3)]).is_ok());
        for bad in [
            vec![("A", 2)],
            vec![("A", 2), ("B", 3), ("C", 4)],
            vec![("A", 2), ("A", 3)],
            vec![("A", 2), ("B", 2)],
            vec![("A", 0), ("B", 2)],
        ] {
            assert_eq!(new(bad).unwrap_err().name(), "boot-config");
        }
    }

    /// The engine's order for one update: invalidate the target, set it
    /// primary for the trial, commit it. On the FAT, that is one write.
    #[test]
    fn an_update_writes_autoboot_txt_once_and_in_place() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let autoboot = dir.path().join("autoboot.txt");
        let partition = dir.path().join("partition");
        RpiTryboot::initialize(&autoboot, 2, 3).unwrap();
        let mut boot =
            RpiTryboot::new(autoboot.clone(), vec![("A".into(), 2), ("B".into(), 3)], partition.clone())
                .unwrap();
        let inode = std::fs::metadata(&autoboot).unwrap().ino();
        for (target, committed_after) in [("B", 3u32), ("A", 2), ("B", 3)] {
            let writes_before = boot.writes();
            boot.invalidate(target).unwrap();
            boot.set_primary_for_trial(target).unwrap();
            // The trial boot runs the target (the firmware says so), then commit.
            std::fs::write(&partition, committed_after.to_be_bytes()).unwrap();
            assert_eq!(boot.state(target).unwrap(), SlotState::Trying);
            boot.mark_good(target).unwrap();
            assert_eq!(boot.writes() - writes_before, 1, "update to {target}");
            assert_eq!(boot.read().unwrap().committed(), committed_after);
        }
        assert_eq!(std::fs::metadata(&autoboot).unwrap().ino(), inode, "rewritten in place, never renamed");
        // The committed (running) slot cannot be invalidated.
        assert_eq!(boot.invalidate("B").unwrap_err().name(), "boot-config");
    }
}

//! A Raspberry Pi firmware stand-in for tests: reads `autoboot.txt` as the
//! firmware does and reports the booted partition as the device tree does.
//! It parses the file itself, independently of fleetd's codec.
#![allow(dead_code)]

use std::path::Path;

/// Crashing boots are retried this often before giving up.
const MAX_POWER_ONS: usize = 8;

/// The `boot_partition` the firmware applies: settings in file order, lines
/// before any section and `[all]` always, `[tryboot]` only with the flag;
/// the last one applied wins. Other filters never match here.
pub fn selected_partition(autoboot_txt: &str, tryboot: bool) -> Option<u32> {
    let mut applies = true;
    let mut partition = None;
    for line in autoboot_txt.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            applies = match section.trim() {
                "all" => true,
                "tryboot" => tryboot,
                _ => false,
            };
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            if applies && key.trim() == "boot_partition" {
                partition = value.trim().parse().ok();
            }
        }
    }
    partition
}

/// Powers on until a boot succeeds (bounded). The one-shot tryboot flag
/// applies to the first boot only: the firmware clears it before booting,
/// so a crashed trial comes back on `[all]`. Each boot writes its partition
/// (4 bytes, big-endian) to `booted_partition_file`, then the slot's kernel
/// runs and crashes unless `boots_ok(slot)`. Returns the slot that came up.
pub fn power_on(
    autoboot_txt: &Path,
    tryboot_flag: bool,
    partitions: &[(String, u32)],
    booted_partition_file: &Path,
    boots_ok: &dyn Fn(&str) -> bool,
) -> Option<String> {
    let mut tryboot = tryboot_flag;
    for _ in 0..MAX_POWER_ONS {
        let text = std::fs::read_to_string(autoboot_txt).expect("read autoboot.txt");
        let partition = selected_partition(&text, tryboot)?;
        tryboot = false;
        std::fs::write(booted_partition_file, partition.to_be_bytes()).expect("write booted partition");
        let slot = partitions.iter().find(|(_, p)| *p == partition).map(|(name, _)| name.as_str());
        // A partition no slot owns holds nothing bootable.
        if let Some(slot) = slot {
            if boots_ok(slot) {
                return Some(slot.to_string());
            }
        }
    }
    None
}

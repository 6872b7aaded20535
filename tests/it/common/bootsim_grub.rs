//! A GRUB stand-in for tests: each power-on does what the shipped
//! `packaging/boot/grub/grub.cfg` does, reading and writing the environment
//! with the real `grub-editenv`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// The slots the shipped grub.cfg has menu entries for.
const SLOTS: [&str; 2] = ["A", "B"];
/// Crashing boots are retried this often before giving up.
const MAX_POWER_ONS: usize = 8;

/// Whether `grub-editenv` runs. When it does not, tests fail under `CI` and
/// otherwise print why they skip.
pub fn grub_editenv_available() -> bool {
    let found = Command::new("grub-editenv")
        .arg("--version")
        .output()
        .map(|out| out.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set and grub-editenv is missing: install grub-common"
        );
        eprintln!("skipping: grub-editenv is not installed");
    }
    found
}

/// Runs `grub-editenv FILE args...`, asserting success; returns stdout.
pub fn editenv(grubenv: &Path, args: &[&str]) -> String {
    let out = Command::new("grub-editenv").arg(grubenv).args(args).output().expect("run grub-editenv");
    assert!(out.status.success(), "grub-editenv {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("grub-editenv prints UTF-8")
}

/// `grub-editenv FILE list` as name → value.
pub fn list(grubenv: &Path) -> BTreeMap<String, String> {
    editenv(grubenv, &["list"])
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// Powers the machine on until a boot succeeds (bounded): GRUB picks a slot
/// as grub.cfg does, then the slot's kernel runs, and crashes unless
/// `boots_ok(slot)`. Returns the slot that came up, or None.
pub fn power_on(grubenv: &Path, boots_ok: &dyn Fn(&str) -> bool) -> Option<String> {
    for _ in 0..MAX_POWER_ONS {
        let slot = grub_select(grubenv);
        if boots_ok(&slot) {
            return Some(slot);
        }
    }
    None
}

/// One run of grub.cfg: returns the slot it boots, after saving its counting.
fn grub_select(grubenv: &Path) -> String {
    let env = list(grubenv);
    // grub.cfg's defaults, overridden by load_env's five variables.
    let var = |name: &str, default: &str| env.get(name).cloned().unwrap_or(default.into());
    let order = var("ORDER", "A B");
    let ok: BTreeMap<&str, String> = SLOTS.iter().map(|s| (*s, var(&format!("{s}_OK"), "0"))).collect();
    let mut tried: BTreeMap<&str, String> =
        SLOTS.iter().map(|s| (*s, var(&format!("{s}_TRY"), "0"))).collect();

    let pick = |tried: &BTreeMap<&str, String>| {
        order
            .split_whitespace()
            .filter_map(|name| SLOTS.iter().find(|s| **s == name).copied())
            .find(|s| ok[s] == "1" && tried[s] == "0")
    };
    let mut chosen = pick(&tried);
    if chosen.is_none() {
        for slot in SLOTS {
            if ok[slot] == "1" {
                tried.insert(slot, "0".into());
            }
        }
        chosen = pick(&tried);
    }
    match chosen {
        Some(slot) => {
            tried.insert(slot, "1".into());
            // save_env A_TRY B_TRY
            let assignments: Vec<String> = SLOTS.iter().map(|s| format!("{s}_TRY={}", tried[s])).collect();
            let mut args = vec!["set"];
            args.extend(assignments.iter().map(String::as_str));
            editenv(grubenv, &args);
            slot.to_string()
        }
        // Nothing OK: the first known slot in ORDER boots, uncounted.
        None => order.split_whitespace().find(|name| SLOTS.contains(name)).unwrap_or("A").to_string(),
    }
}
